/* Residual add with dropout on the branch, forward and backward, on CPU:
 *     out = x + keep(i) * y * scale            (forward)
 *     dy  = keep(i) * dout * scale, dx = dout  (backward)
 *
 * Why: a pre-LN block adds a dropped-out branch to its residual stream twice; done with torch ops
 * that is a random draw, a mask tensor kept for the backward, a select and an add per call. Here
 * the mask bit of element i is a hash of (seed, i): one pass forward, one backward, no mask
 * stored, identical for any thread count. Each element draws 16 bits (the top half of a 32-bit
 * murmur3-style finaliser of the index and the seed); it is kept when the draw is >= `dropped`,
 * i.e. with probability 1 - dropped / 65536, and scaled by 65536 / (65536 - dropped).
 *
 * x/out share a dtype, y/dy share a dtype; each fp32 or bf16 (flags x_bf16, y_bf16). n < 2^32.
 */
#include <stdint.h>
#include <string.h>

#include "elements.h"

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* 1.0f where element i is kept, 0.0f where it is dropped. */
static inline float keep(uint64_t seed, uint32_t i, uint32_t dropped) {
    const uint32_t h = fmix32(fmix32(i * 0x9e3779b1u ^ (uint32_t)seed) ^ (uint32_t)(seed >> 32));
    return (h >> 16) >= dropped ? 1.0f : 0.0f;
}

#define BLOCK 4096

void jetfm_dropout_add_fwd(const void *x, int x_bf16, const void *y, int y_bf16, void *out, int64_t n, uint64_t seed,
                           uint32_t dropped, float scale, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t end = b + BLOCK < n ? b + BLOCK : n;
#pragma omp simd
        for (int64_t i = b; i < end; i++)
            store_elem(out, i, load_elem(x, i, x_bf16) + keep(seed, (uint32_t)i, dropped) * scale * load_elem(y, i, y_bf16), x_bf16);
    }
}

void jetfm_dropout_bwd(const void *grad, int g_bf16, void *dy, int y_bf16, int64_t n, uint64_t seed, uint32_t dropped,
                       float scale, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t end = b + BLOCK < n ? b + BLOCK : n;
#pragma omp simd
        for (int64_t i = b; i < end; i++) store_elem(dy, i, keep(seed, (uint32_t)i, dropped) * scale * load_elem(grad, i, g_bf16), y_bf16);
    }
}
