/* Attention within packed variable-length sequences on CPU, forward and backward.
 *
 * Why a kernel of our own: jets are short (5-130 particles) and the heads narrow (head dim 16 at
 * the reference size). torch's CPU SDPA needs a padded layout (jets scattered into buckets and
 * gathered back around every layer) and runs one tiny GEMM call per (jet, head, block), so the
 * per-call overhead outweighs the arithmetic. Here one task = one (jet, head): its keys and
 * values are copied once, transposed, into a per-thread buffer, and every score row is computed
 * with loops vectorised over the keys. No padding, no masks: a causal row simply stops at its
 * own position. Softmax statistics are kept per row (log-sum-exp) so that the backward
 * recomputes the probabilities instead of storing them (the flash-attention recipe).
 *
 * Layouts (row-major): qkv (T, 3, H, D); out, dout (T, H, D); lse (T, H) fp32; dqkv (T, 3, H, D).
 * Element type: fp32, or bf16 (is_bf16 = 1) for qkv/out/dout/dqkv; all arithmetic in fp32.
 * cu_seqlens (B + 1,) int32, cu_seqlens[0] = 0, non-decreasing, cu_seqlens[B] = T.
 * Returns 0, -1 when a per-thread buffer cannot be allocated, -2 for invalid cu_seqlens, -3 for a
 * head dim outside [1, 256].
 * Two implementations of the same algorithm: the vector path (head dims a multiple of 16 up to
 * 64, the reference size's 16 among them) written with GCC vector types, whole rows per vector,
 * our own exponential and 8 query rows per block; and the generic loops for any other head dim,
 * vectorised by the compiler, with glibc's vector expf (libmvec, declared below). At the
 * reference size (64 jets of ~46 particles, 8 heads of 16, one thread) the vector path took the
 * forward from 3.1 to 2.0 ms and the backward from 5.4 to 3.5 ms (bf16, causal).
 * Built by jetfm/models/cpu_kernels.py with -O3 -march=native -fopenmp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "elements.h"

#if defined(__x86_64__)
/* glibc's libmvec provides 4/8/16-lane versions of expf; this declaration lets gcc call them. */
__attribute__((simd("notinbranch"))) extern float expf(float);
#endif

/* Index of element (t, which, h, d) in (T, 3, H, D). */
#define QKV(t, which, h, d) ((((int64_t)(t) * 3 + (which)) * H + (h)) * D + (d))
/* Index of element (t, h, d) in (T, H, D). */
#define THD(t, h, d) (((int64_t)(t) * H + (h)) * D + (d))

/* Largest sequence length (sizes the per-thread buffers); -1 when cu_seqlens is not a valid
 * prefix sum (does not start at 0, or decreases). */
static int max_length(const int32_t *cu, int B) {
    int n_max = 0;
    if (cu[0] != 0) return -1;
    for (int b = 0; b < B; b++) {
        int n = cu[b + 1] - cu[b];
        if (n < 0) return -1;
        if (n > n_max) n_max = n;
    }
    return n_max;
}

#define INLINE static inline __attribute__((always_inline))

/* Loops over keys run to a multiple of LANES (the widest vector: 16 floats), over zero-padded
 * buffers, with scores past a row's last key set to -inf (weight exp(-inf) = 0): no scalar
 * remainder loops, whose scalar expf calls cost more than a short row's vector work. (Clamping
 * the exponent and selecting zeros instead measured 30% slower.) */
#define LANES 16
/* Per-row scratch vectors are fixed-size arrays (not VLAs: an alloca would keep them in memory
 * and stop the loops over d from vectorising); head dims above this are refused (status -3). */
#define MAX_HEAD_DIM 256
static inline int round_up(int n) { return (n + LANES - 1) / LANES * LANES; }

/* Copy block `which` (0 q, 1 k, 2 v) of head h, rows t0..t0+n-1, to fp32: row-major (n, D) into
 * `rows` (scaled by `scale`) and/or transposed (D, ns) into `cols`, zero past n (either may be NULL). */
INLINE void load_block(const void *qkv, int is_bf16, int t0, int n, int ns, int which, int h, int H, const int D,
                       float scale, float *rows, float *cols) {
    for (int k = 0; k < n; k++)
        for (int d = 0; d < D; d++) {
            const float x = load_elem(qkv, QKV(t0 + k, which, h, d), is_bf16) * scale;
            if (rows) rows[(int64_t)k * D + d] = x;
            if (cols) cols[(int64_t)d * ns + k] = x;
        }
    if (cols)
        for (int d = 0; d < D; d++)
            for (int k = n; k < ns; k++) cols[(int64_t)d * ns + k] = 0.0f;
}

/* Query rows are processed ROWS at a time: each key's (and value's) vector is loaded once for
 * the block and feeds ROWS independent FMA chains, and the backward's dK/dV rows are read and
 * written once per block instead of once per query. */
#define ROWS 4

/* Scores of a block of ROWS query rows: s[r * ns + k] = q_r . K[k] for k < kend[r], and `fill`
 * (-inf for attention scores, 0 for dO . v) for kend[r] <= k < kpad; K given transposed (D, ns).
 * Vectorised over k, the sums over d in registers (D is a compile-time constant in the
 * specialised callers). */
INLINE void block_scores(const float q[ROWS][MAX_HEAD_DIM], const float *kt, int ns, const int kend[ROWS], int kpad,
                         const int D, float fill, float *s) {
#pragma omp simd
    for (int k = 0; k < kpad; k++) {
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int d = 0; d < D; d++) {
            const float kd = kt[(int64_t)d * ns + k];
            a0 += q[0][d] * kd;
            a1 += q[1][d] * kd;
            a2 += q[2][d] * kd;
            a3 += q[3][d] * kd;
        }
        s[k] = k < kend[0] ? a0 : fill;
        s[ns + k] = k < kend[1] ? a1 : fill;
        s[2 * ns + k] = k < kend[2] ? a2 : fill;
        s[3 * ns + k] = k < kend[3] ? a3 : fill;
    }
}

/* A block of `rows` query rows i0 .. i0 + nr - 1 (nr <= rows): how many keys each sees (0 for
 * absent rows), and the largest of them. */
INLINE int block_ends(int i0, int nr, int n, int causal, int rows, int *kend) {
    for (int r = 0; r < rows; r++) kend[r] = r < nr ? (causal ? i0 + r + 1 : n) : 0;
    return causal ? i0 + nr : n;
}

/* One (sequence, head) forward: out rows and log-sum-exp. Buffer: K^T (D, ns), V (n, D), s (ROWS, ns). */
INLINE void fwd_task(const void *qkv, int is_bf16, int t0, int n, int h, int H, const int D, int causal, float scale,
                     void *out, float *lse, float *buf) {
    const int ns = round_up(n);
    float *kt = buf, *v = buf + (size_t)D * ns, *s = v + (size_t)D * n;
    float q[ROWS][MAX_HEAD_DIM], o[ROWS][MAX_HEAD_DIM], l[ROWS], m[ROWS];
    int kend[ROWS];
    load_block(qkv, is_bf16, t0, n, ns, 1, h, H, D, 1.0f, NULL, kt);
    load_block(qkv, is_bf16, t0, n, ns, 2, h, H, D, 1.0f, v, NULL);
    for (int i0 = 0; i0 < n; i0 += ROWS) {
        const int nr = n - i0 < ROWS ? n - i0 : ROWS;
        const int kmax = block_ends(i0, nr, n, causal, ROWS, kend), kpad = round_up(kmax);
        for (int r = 0; r < ROWS; r++)
            for (int d = 0; d < D; d++) q[r][d] = r < nr ? load_elem(qkv, QKV(t0 + i0 + r, 0, h, d), is_bf16) * scale : 0.0f;
        block_scores(q, kt, ns, kend, kpad, D, -INFINITY, s);
        for (int r = 0; r < ROWS; r++) {
            float *sr = s + (size_t)r * ns;
            if (r >= nr) {  /* absent row: zero weights */
                for (int k = 0; k < kpad; k++) sr[k] = 0.0f;
                m[r] = 0.0f, l[r] = 1.0f;
                continue;
            }
            float mr = sr[0];
#pragma omp simd reduction(max : mr)
            for (int k = 0; k < kpad; k++) mr = sr[k] > mr ? sr[k] : mr;
            float lr = 0.0f;
#pragma omp simd reduction(+ : lr)
            for (int k = 0; k < kpad; k++) {
                sr[k] = expf(sr[k] - mr);
                lr += sr[k];
            }
            m[r] = mr, l[r] = lr;
        }
        for (int r = 0; r < ROWS; r++)
            for (int d = 0; d < D; d++) o[r][d] = 0.0f;
        for (int k = 0; k < kmax; k++) {
            const float w0 = s[k], w1 = s[ns + k], w2 = s[2 * ns + k], w3 = s[3 * ns + k];
            const float *vk = v + (int64_t)k * D;
#pragma omp simd
            for (int d = 0; d < D; d++) {
                o[0][d] += w0 * vk[d];
                o[1][d] += w1 * vk[d];
                o[2][d] += w2 * vk[d];
                o[3][d] += w3 * vk[d];
            }
        }
        for (int r = 0; r < nr; r++) {
            const float inv_l = 1.0f / l[r];
            for (int d = 0; d < D; d++) store_elem(out, THD(t0 + i0 + r, h, d), o[r][d] * inv_l, is_bf16);
            lse[(int64_t)(t0 + i0 + r) * H + h] = m[r] + logf(l[r]);
        }
    }
}

/* One (sequence, head) backward (probabilities recomputed from the log-sum-exp).
 * Buffer: K^T, V^T (D, ns); K, dK, dV (n, D); p, ds (ROWS, ns). */
INLINE void bwd_task(const void *qkv, const void *out, const void *dout, const float *lse, int is_bf16, int t0, int n,
                     int h, int H, const int D, int causal, float scale, void *dqkv, float *buf) {
    const int ns = round_up(n);
    const size_t dn = (size_t)D * n, dns = (size_t)D * ns;
    float *kt = buf, *vt = kt + dns, *kr = vt + dns, *dk = kr + dn, *dv = dk + dn;
    float *p = dv + dn, *ds = p + (size_t)ROWS * ns;
    float q[ROWS][MAX_HEAD_DIM], g[ROWS][MAX_HEAD_DIM], dq[ROWS][MAX_HEAD_DIM], row_lse[ROWS], delta[ROWS];
    int kend[ROWS];
    load_block(qkv, is_bf16, t0, n, ns, 1, h, H, D, 1.0f, kr, kt);
    load_block(qkv, is_bf16, t0, n, ns, 2, h, H, D, 1.0f, NULL, vt);
    memset(dk, 0, sizeof(float) * dn);
    memset(dv, 0, sizeof(float) * dn);
    for (int i0 = 0; i0 < n; i0 += ROWS) {
        const int nr = n - i0 < ROWS ? n - i0 : ROWS;
        const int kmax = block_ends(i0, nr, n, causal, ROWS, kend), kpad = round_up(kmax);
        for (int r = 0; r < ROWS; r++) {
            float dl = 0.0f;
            for (int d = 0; d < D; d++) {
                const int ok = r < nr;
                const int64_t t = t0 + i0 + (ok ? r : 0);
                q[r][d] = ok ? load_elem(qkv, QKV(t, 0, h, d), is_bf16) * scale : 0.0f;
                g[r][d] = ok ? load_elem(dout, THD(t, h, d), is_bf16) : 0.0f;
                dl += ok ? g[r][d] * load_elem(out, THD(t, h, d), is_bf16) : 0.0f;
            }
            delta[r] = dl;
            row_lse[r] = r < nr ? lse[(int64_t)(t0 + i0 + r) * H + h] : 0.0f;
        }
        block_scores(q, kt, ns, kend, kpad, D, -INFINITY, p);  /* scaled scores, -inf past kend */
        block_scores(g, vt, ns, kend, kpad, D, 0.0f, ds);      /* dO_i . v_k, 0 past kend */
        for (int r = 0; r < ROWS; r++) {
            float *pr = p + (size_t)r * ns, *dsr = ds + (size_t)r * ns;
            const float lr = row_lse[r], dr = delta[r];
#pragma omp simd
            for (int k = 0; k < kpad; k++) {  /* p = 0 and ds = 0 past kend and for absent rows */
                pr[k] = expf(pr[k] - lr);
                dsr[k] = pr[k] * (dsr[k] - dr);
            }
        }
        for (int r = 0; r < ROWS; r++)
            for (int d = 0; d < D; d++) dq[r][d] = 0.0f;
        for (int k = 0; k < kmax; k++) {
            const float p0 = p[k], p1 = p[ns + k], p2 = p[2 * ns + k], p3 = p[3 * ns + k];
            const float s0 = ds[k], s1 = ds[ns + k], s2 = ds[2 * ns + k], s3 = ds[3 * ns + k];
            float *dvk = dv + (int64_t)k * D, *dkk = dk + (int64_t)k * D;
            const float *kk = kr + (int64_t)k * D;
#pragma omp simd
            for (int d = 0; d < D; d++) {
                dvk[d] += (p0 * g[0][d] + p1 * g[1][d]) + (p2 * g[2][d] + p3 * g[3][d]);
                dkk[d] += (s0 * q[0][d] + s1 * q[1][d]) + (s2 * q[2][d] + s3 * q[3][d]);  /* q carries the scale */
                dq[0][d] += s0 * kk[d];
                dq[1][d] += s1 * kk[d];
                dq[2][d] += s2 * kk[d];
                dq[3][d] += s3 * kk[d];
            }
        }
        for (int r = 0; r < nr; r++)
            for (int d = 0; d < D; d++) store_elem(dqkv, QKV(t0 + i0 + r, 0, h, d), dq[r][d] * scale, is_bf16);
    }
    for (int k = 0; k < n; k++)
        for (int d = 0; d < D; d++) {
            store_elem(dqkv, QKV(t0 + k, 1, h, d), dk[(int64_t)k * D + d], is_bf16);
            store_elem(dqkv, QKV(t0 + k, 2, h, d), dv[(int64_t)k * D + d], is_bf16);
        }
}

/* ------------------------------------------------------------------ the vector path
 * Head dims that are a multiple of 16, up to 64 (NV = D / 16 vectors of 16 floats per row): the
 * reference size's head dim 16 makes every q, k, v row exactly one vector. Rows are loaded and
 * stored as whole vectors (bf16 widened and rounded in registers), the exponential is our own
 * polynomial (glibc's vector expf sends every -inf lane, i.e. every masked key, down a scalar
 * slow path: 30% of the forward's time), and masked lanes are selected away, so the loops carry
 * no remainder. Same algorithm as fwd_task / bwd_task above. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
#define MAX_NV 4

INLINE v16 vsplat(float x) { return (v16){0} + x; }
INLINE v16 vselect(vi16 mask, v16 a, v16 b) { return (v16)(((vi16)a & mask) | ((vi16)b & ~mask)); }
/* Horizontal sum and maximum of the 16 lanes, as a tree of shuffles (a chain of 15 scalar adds
 * per row measured 8% of the forward). */
static const vi16 HALF8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
static const vi16 HALF4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
static const vi16 HALF2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
static const vi16 HALF1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
INLINE float vsum(v16 x) {
    x += __builtin_shuffle(x, HALF8);
    x += __builtin_shuffle(x, HALF4);
    x += __builtin_shuffle(x, HALF2);
    x += __builtin_shuffle(x, HALF1);
    return x[0];
}
INLINE v16 vmax(v16 a, v16 b) { return vselect(a > b, a, b); }
INLINE float vmax_lanes(v16 x) {
    x = vmax(x, __builtin_shuffle(x, HALF8));
    x = vmax(x, __builtin_shuffle(x, HALF4));
    x = vmax(x, __builtin_shuffle(x, HALF2));
    x = vmax(x, __builtin_shuffle(x, HALF1));
    return x[0];
}
static const vi16 LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* 16 elements from element i of base, as fp32. */
INLINE v16 vload(const void *base, int64_t i, const int is_bf16) {
    v16 f;
    if (is_bf16) {
        vh16 half;
        memcpy(&half, (const uint16_t *)base + i, sizeof half);
        const vu16 bits = __builtin_convertvector(half, vu16) << 16;
        memcpy(&f, &bits, sizeof f);
    } else {
        memcpy(&f, (const float *)base + i, sizeof f);
    }
    return f;
}

/* 16 elements to element i of base (bf16: round to nearest even, NaN stays a quiet NaN). */
INLINE void vstore(void *base, int64_t i, v16 f, const int is_bf16) {
    if (!is_bf16) {
        memcpy((float *)base + i, &f, sizeof f);
        return;
    }
    const vu16 bits = (vu16)f;
    const vu16 nan = (vu16)((bits & 0x7fffffffu) > 0x7f800000u);
    const vu16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const vh16 half = __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan), vh16);
    memcpy((uint16_t *)base + i, &half, sizeof half);
}

/* e^x for x <= 0 (softmax weights: a score minus its row's maximum or log-sum-exp; a rounding
 * excess above 0 is harmless), 0 below -87 and for -inf: x = n ln2 + r, |r| <= ln2 / 2, e^r by its
 * Taylor series to r^7 (relative error < 1e-8 before rounding), 2^n from the exponent bits. */
INLINE v16 vexp_nonpos(v16 x) {
    const vi16 live = x >= vsplat(-87.0f);
    const v16 xc = vselect(live, x, vsplat(-87.0f));
    const vi16 n = __builtin_convertvector(xc * 1.44269504088896341f - 0.5f, vi16);  /* round(x / ln2) */
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = (xc - nf * 0.693145751953125f) - nf * 1.428606765330187045e-06f;  /* ln2 in two parts */
    v16 e = vsplat(1.0f / 5040);
    e = e * r + 1.0f / 720; e = e * r + 1.0f / 120; e = e * r + 1.0f / 24; e = e * r + 1.0f / 6;
    e = e * r + 0.5f; e = e * r + 1.0f; e = e * r + 1.0f;
    const v16 two_n = (v16)((n + 127) << 23);
    return (v16)((vi16)(e * two_n) & live);
}

/* Block `which` of head h, rows t0..t0+n-1, transposed into cols (D, ns), zero past n. */
INLINE void vload_cols(const void *qkv, const int is_bf16, int t0, int n, int ns, int which, int h, int H, const int NV,
                       float *cols) {
    const int D = 16 * NV;
    for (int k = 0; k < n; k++)
        for (int j = 0; j < NV; j++) {
            const v16 x = vload(qkv, QKV(t0 + k, which, h, 16 * j), is_bf16);
            for (int l = 0; l < 16; l++) cols[(int64_t)(16 * j + l) * ns + k] = x[l];
        }
    for (int d = 0; d < D; d++)
        for (int k = n; k < ns; k++) cols[(int64_t)d * ns + k] = 0.0f;
}

/* Query rows per block in the vector path: 8 independent FMA chains (two per FMA unit at a
 * 4-cycle latency) where 4 left half of them idle. */
#define VROWS 8

/* s[r][kb / 16] = (a_r . cols[:, kb..kb+15]) for key blocks kb < kpad, a_r given as D floats per row;
 * lanes at or past kend[r] set to `fill`. */
INLINE void vscores(const float a[VROWS][16 * MAX_NV], const float *cols, int ns, const int kend[VROWS], int kpad,
                    const int NV, float fill, v16 *s) {
    const int D = 16 * NV, nsv = ns / 16;
    for (int kb = 0; kb < kpad; kb += 16) {
        v16 acc[VROWS];
#pragma GCC unroll 8
        for (int r = 0; r < VROWS; r++) acc[r] = vsplat(0.0f);
#pragma GCC unroll 64
        for (int d = 0; d < D; d++) {
            const v16 c = *(const v16 *)(cols + (int64_t)d * ns + kb);
#pragma GCC unroll 8
            for (int r = 0; r < VROWS; r++) acc[r] += a[r][d] * c;
        }
        const vi16 key = LANE + kb;
        const v16 f = vsplat(fill);
#pragma GCC unroll 8
        for (int r = 0; r < VROWS; r++) s[r * nsv + kb / 16] = vselect(key < kend[r], acc[r], f);
    }
}

/* Buffer (64-byte aligned): K^T (D, ns); V (n, NV) vectors; s (VROWS, ns). */
INLINE void fwd_task_v(const void *qkv, const int is_bf16, int t0, int n, int h, int H, const int NV, int causal,
                       float scale, void *out, float *lse, float *buf) {
    const int D = 16 * NV, ns = round_up(n), nsv = ns / 16;
    float *kt = buf;
    v16 *v = (v16 *)(kt + (size_t)D * ns), *s = v + (size_t)n * NV;
    float q[VROWS][16 * MAX_NV] __attribute__((aligned(64)));
    v16 o[VROWS][MAX_NV];
    float l[VROWS], m[VROWS];
    int kend[VROWS];
    vload_cols(qkv, is_bf16, t0, n, ns, 1, h, H, NV, kt);
    for (int k = 0; k < n; k++)
        for (int j = 0; j < NV; j++) v[k * NV + j] = vload(qkv, QKV(t0 + k, 2, h, 16 * j), is_bf16);
    for (int i0 = 0; i0 < n; i0 += VROWS) {
        const int nr = n - i0 < VROWS ? n - i0 : VROWS;
        const int kmax = block_ends(i0, nr, n, causal, VROWS, kend), kpad = round_up(kmax);
        for (int r = 0; r < VROWS; r++)
            for (int j = 0; j < NV; j++) {
                const v16 x = r < nr ? vload(qkv, QKV(t0 + i0 + r, 0, h, 16 * j), is_bf16) * scale : vsplat(0.0f);
                memcpy(&q[r][16 * j], &x, sizeof x);
            }
        vscores(q, kt, ns, kend, kpad, NV, -INFINITY, s);
        for (int r = 0; r < VROWS; r++) {
            v16 *sr = s + (size_t)r * nsv;
            if (r >= nr) {  /* absent row: zero weights */
                for (int kb = 0; kb < kpad / 16; kb++) sr[kb] = vsplat(0.0f);
                m[r] = 0.0f, l[r] = 1.0f;
                continue;
            }
            v16 mx = sr[0];
            for (int kb = 1; kb < kpad / 16; kb++) mx = vmax(sr[kb], mx);
            const float mr = vmax_lanes(mx);
            v16 sum = {0};
            for (int kb = 0; kb < kpad / 16; kb++) {
                sr[kb] = vexp_nonpos(sr[kb] - mr);
                sum += sr[kb];
            }
            m[r] = mr, l[r] = vsum(sum);
        }
        const float *w = (const float *)s;
#pragma GCC unroll 8
        for (int r = 0; r < VROWS; r++)
            for (int j = 0; j < NV; j++) o[r][j] = vsplat(0.0f);
        for (int k = 0; k < kmax; k++)
            for (int j = 0; j < NV; j++) {
                const v16 vk = v[k * NV + j];
#pragma GCC unroll 8
                for (int r = 0; r < VROWS; r++) o[r][j] += w[r * ns + k] * vk;
            }
        for (int r = 0; r < nr; r++) {
            const float inv_l = 1.0f / l[r];
            for (int j = 0; j < NV; j++) vstore(out, THD(t0 + i0 + r, h, 16 * j), o[r][j] * inv_l, is_bf16);
            lse[(int64_t)(t0 + i0 + r) * H + h] = m[r] + logf(l[r]);
        }
    }
}

/* Buffer (64-byte aligned): K^T, V^T (D, ns); K, dK, dV (n, NV) vectors; p, ds (VROWS, ns). */
INLINE void bwd_task_v(const void *qkv, const void *out, const void *dout, const float *lse, const int is_bf16, int t0,
                       int n, int h, int H, const int NV, int causal, float scale, void *dqkv, float *buf) {
    const int D = 16 * NV, ns = round_up(n), nsv = ns / 16;
    const size_t dns = (size_t)D * ns;
    float *kt = buf, *vt = kt + dns;
    v16 *kr = (v16 *)(vt + dns), *dk = kr + (size_t)n * NV, *dv = dk + (size_t)n * NV;
    v16 *p = dv + (size_t)n * NV, *ds = p + (size_t)VROWS * nsv;
    float q[VROWS][16 * MAX_NV] __attribute__((aligned(64))), g[VROWS][16 * MAX_NV] __attribute__((aligned(64)));
    v16 qv[VROWS][MAX_NV], gv[VROWS][MAX_NV], dq[VROWS][MAX_NV];
    int kend[VROWS];
    vload_cols(qkv, is_bf16, t0, n, ns, 1, h, H, NV, kt);
    vload_cols(qkv, is_bf16, t0, n, ns, 2, h, H, NV, vt);
    for (int k = 0; k < n; k++)
        for (int j = 0; j < NV; j++) {
            kr[k * NV + j] = vload(qkv, QKV(t0 + k, 1, h, 16 * j), is_bf16);
            dk[k * NV + j] = dv[k * NV + j] = vsplat(0.0f);
        }
    for (int i0 = 0; i0 < n; i0 += VROWS) {
        const int nr = n - i0 < VROWS ? n - i0 : VROWS;
        const int kmax = block_ends(i0, nr, n, causal, VROWS, kend), kpad = round_up(kmax);
        float row_lse[VROWS], delta[VROWS];
        for (int r = 0; r < VROWS; r++) {
            v16 dl = {0};
            for (int j = 0; j < NV; j++) {
                const int64_t t = t0 + i0 + r;
                qv[r][j] = r < nr ? vload(qkv, QKV(t, 0, h, 16 * j), is_bf16) * scale : vsplat(0.0f);
                gv[r][j] = r < nr ? vload(dout, THD(t, h, 16 * j), is_bf16) : vsplat(0.0f);
                if (r < nr) dl += gv[r][j] * vload(out, THD(t, h, 16 * j), is_bf16);
                memcpy(&q[r][16 * j], &qv[r][j], sizeof(v16));
                memcpy(&g[r][16 * j], &gv[r][j], sizeof(v16));
            }
            delta[r] = vsum(dl);
            row_lse[r] = r < nr ? lse[(int64_t)(t0 + i0 + r) * H + h] : INFINITY;  /* absent row: p = 0 */
        }
        vscores(q, kt, ns, kend, kpad, NV, -INFINITY, p);  /* scaled scores, -inf past kend */
        vscores(g, vt, ns, kend, kpad, NV, 0.0f, ds);      /* dO_i . v_k, 0 past kend */
        for (int r = 0; r < VROWS; r++)
            for (int kb = 0; kb < kpad / 16; kb++) {  /* p = 0 and ds = 0 past kend and for absent rows */
                v16 *pr = p + (size_t)r * nsv + kb, *dsr = ds + (size_t)r * nsv + kb;
                *pr = vexp_nonpos(*pr - row_lse[r]);
                *dsr = *pr * (*dsr - delta[r]);
            }
#pragma GCC unroll 8
        for (int r = 0; r < VROWS; r++)
            for (int j = 0; j < NV; j++) dq[r][j] = vsplat(0.0f);
        const float *pw = (const float *)p, *sw = (const float *)ds;
        for (int k = 0; k < kmax; k++)
            for (int j = 0; j < NV; j++) {
                const v16 kk = kr[k * NV + j];
                v16 dvk = dv[k * NV + j], dkk = dk[k * NV + j];
#pragma GCC unroll 8
                for (int r = 0; r < VROWS; r++) {
                    const float pk = pw[r * ns + k], sk = sw[r * ns + k];
                    dvk += pk * gv[r][j];
                    dkk += sk * qv[r][j];  /* q carries the scale */
                    dq[r][j] += sk * kk;
                }
                dv[k * NV + j] = dvk, dk[k * NV + j] = dkk;
            }
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < NV; j++) vstore(dqkv, QKV(t0 + i0 + r, 0, h, 16 * j), dq[r][j] * scale, is_bf16);
    }
    for (int k = 0; k < n; k++)
        for (int j = 0; j < NV; j++) {
            vstore(dqkv, QKV(t0 + k, 1, h, 16 * j), dk[k * NV + j], is_bf16);
            vstore(dqkv, QKV(t0 + k, 2, h, 16 * j), dv[k * NV + j], is_bf16);
        }
}

/* The vector path's instantiations (NV = D / 16 and is_bf16 as compile-time constants) for every
 * head dim it takes; the rest runs the generic loops. */
#define VCALL_DTYPE(vcall, NV) \
    if (is_bf16)               \
        vcall(NV, 1);          \
    else                       \
        vcall(NV, 0)
#define DISPATCH(vcall, call)                       \
    switch (D % 16 == 0 ? D / 16 : 0) {             \
        case 1: VCALL_DTYPE(vcall, 1); break;       \
        case 2: VCALL_DTYPE(vcall, 2); break;       \
        case 3: VCALL_DTYPE(vcall, 3); break;       \
        case 4: VCALL_DTYPE(vcall, 4); break;       \
        default: call(D); break;                    \
    }

/* Per-thread buffers, 64-byte aligned (the vector path loads whole vectors from them). */
static float *alloc_buffer(size_t floats) {
    const size_t bytes = (sizeof(float) * floats + 63) / 64 * 64;
    return (float *)aligned_alloc(64, bytes);
}

int jetfm_attn_fwd(const void *qkv, int is_bf16, const int32_t *cu, int B, int H, int D, int causal, float scale,
                   void *out, float *lse, int nthreads) {
    const int n_max = max_length(cu, B);
    int failed = 0;
    if (n_max < 0) return -2;
    if (D < 1 || D > MAX_HEAD_DIM) return -3;
    if (n_max == 0) return 0;
#pragma omp parallel num_threads(nthreads)
    {
        const size_t ns = (size_t)round_up(n_max);
        float *buf = alloc_buffer((size_t)D * ns + (size_t)D * n_max + (size_t)VROWS * ns);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < (int64_t)B * H; task++) {
            const int b = (int)(task / H), h = (int)(task % H);
            const int t0 = cu[b], n = cu[b + 1] - cu[b];
            if (!buf || n <= 0) continue;
#define FWD_V(NV, BF16) fwd_task_v(qkv, BF16, t0, n, h, H, NV, causal, scale, out, lse, buf)
#define FWD(DD) fwd_task(qkv, is_bf16, t0, n, h, H, DD, causal, scale, out, lse, buf)
            DISPATCH(FWD_V, FWD)
#undef FWD_V
#undef FWD
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

int jetfm_attn_bwd(const void *qkv, const void *out, const void *dout, const float *lse, int is_bf16,
                   const int32_t *cu, int B, int H, int D, int causal, float scale, void *dqkv, int nthreads) {
    const int n_max = max_length(cu, B);
    int failed = 0;
    if (n_max < 0) return -2;
    if (D < 1 || D > MAX_HEAD_DIM) return -3;
    if (n_max == 0) return 0;
#pragma omp parallel num_threads(nthreads)
    {
        const size_t ns = (size_t)round_up(n_max);
        float *buf = alloc_buffer((size_t)2 * D * ns + (size_t)3 * D * n_max + (size_t)2 * VROWS * ns);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < (int64_t)B * H; task++) {
            const int b = (int)(task / H), h = (int)(task % H);
            const int t0 = cu[b], n = cu[b + 1] - cu[b];
            if (!buf || n <= 0) continue;
#define BWD_V(NV, BF16) bwd_task_v(qkv, out, dout, lse, BF16, t0, n, h, H, NV, causal, scale, dqkv, buf)
#define BWD(DD) bwd_task(qkv, out, dout, lse, is_bf16, t0, n, h, H, DD, causal, scale, dqkv, buf)
            DISPATCH(BWD_V, BWD)
#undef BWD_V
#undef BWD
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
