/* Element access shared by jetfm's C kernels: an element of an fp32 or bf16 array as fp32, and
 * an fp32 value stored back in the array's dtype.
 *
 * Why one header: every kernel reads and writes both dtypes, and bf16 rounding must be the same
 * everywhere (round to nearest even, as torch's fp32 -> bf16 conversion; a NaN stays a quiet NaN
 * rather than rounding up into an infinity), so the copies cannot drift apart.
 */
#ifndef JETFM_ELEMENTS_H
#define JETFM_ELEMENTS_H

#include <stdint.h>
#include <string.h>

static inline float load_elem(const void *base, int64_t i, int is_bf16) {
    if (is_bf16) {
        uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float *)base)[i];
}

static inline void store_elem(void *base, int64_t i, float f, int is_bf16) {
    if (is_bf16) {
        uint32_t bits;
        memcpy(&bits, &f, 4);
        const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  /* round to nearest even */
        const int is_nan = (bits & 0x7fffffffu) > 0x7f800000u;  /* a NaN stays a (quiet) NaN */
        /* a select, not a branch: the loops that store stay vectorised */
        ((uint16_t *)base)[i] = is_nan ? (uint16_t)((bits >> 16) | 0x40u) : (uint16_t)rounded;
        return;
    }
    ((float *)base)[i] = f;
}

#endif
