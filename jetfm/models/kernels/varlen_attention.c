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
 * Returns 0, -1 when a per-thread buffer cannot be allocated, -2 for invalid cu_seqlens.
 * Built by jetfm/models/cpu_kernels.py with -O3 -march=native -fopenmp; the exponential is
 * glibc's vector expf (libmvec), declared below so that loops over keys vectorise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
/* glibc's libmvec provides 4/8/16-lane versions of expf; this declaration lets gcc call them. */
__attribute__((simd("notinbranch"))) extern float expf(float);
#endif

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
        if ((bits & 0x7fffffffu) > 0x7f800000u) {  /* NaN stays a (quiet) NaN */
            ((uint16_t *)base)[i] = (uint16_t)((bits >> 16) | 0x40u);
            return;
        }
        bits += 0x7fffu + ((bits >> 16) & 1u);  /* round to nearest even */
        ((uint16_t *)base)[i] = (uint16_t)(bits >> 16);
        return;
    }
    ((float *)base)[i] = f;
}

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
 * buffers, with scores beyond a row's last key set to -inf: no scalar remainder loops (whose
 * scalar expf calls would cost more than the vector work of a short row). */
#define LANES 16
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

/* s[k] = q . K[k] for k < kend and -inf for kend <= k < round_up(kend); K given transposed
 * (D, ns): vectorised over k, the sum over d in registers (D is a compile-time constant in the
 * specialised callers). */
INLINE void scores(const float *q, const float *kt, int ns, int kend, const int D, float *s) {
    const int kpad = round_up(kend);
#pragma omp simd
    for (int k = 0; k < kpad; k++) {
        float acc = 0.0f;
        for (int d = 0; d < D; d++) acc += q[d] * kt[(int64_t)d * ns + k];
        s[k] = k < kend ? acc : -INFINITY;
    }
}

/* One (sequence, head) forward: out rows and log-sum-exp. Buffer: K^T (D, ns), V (n, D), s (ns). */
INLINE void fwd_task(const void *qkv, int is_bf16, int t0, int n, int h, int H, const int D, int causal, float scale,
                     void *out, float *lse, float *buf) {
    const int ns = round_up(n);
    float *kt = buf, *v = buf + (size_t)D * ns, *s = v + (size_t)D * n;
    float q[D > 0 ? D : 1], o[D > 0 ? D : 1];
    load_block(qkv, is_bf16, t0, n, ns, 1, h, H, D, 1.0f, NULL, kt);
    load_block(qkv, is_bf16, t0, n, ns, 2, h, H, D, 1.0f, v, NULL);
    for (int i = 0; i < n; i++) {
        const int kend = causal ? i + 1 : n, kpad = round_up(kend);
        for (int d = 0; d < D; d++) q[d] = load_elem(qkv, QKV(t0 + i, 0, h, d), is_bf16) * scale;
        scores(q, kt, ns, kend, D, s);
        float m = s[0];
#pragma omp simd reduction(max : m)
        for (int k = 0; k < kpad; k++) m = s[k] > m ? s[k] : m;
        float l = 0.0f;
#pragma omp simd reduction(+ : l)
        for (int k = 0; k < kpad; k++) {  /* exp(-inf) = 0 past kend */
            s[k] = expf(s[k] - m);
            l += s[k];
        }
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (int k = 0; k < kend; k++) {
            const float pk = s[k];
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] += pk * v[(int64_t)k * D + d];
        }
        const float inv_l = 1.0f / l;
        for (int d = 0; d < D; d++) store_elem(out, THD(t0 + i, h, d), o[d] * inv_l, is_bf16);
        lse[(int64_t)(t0 + i) * H + h] = m + logf(l);
    }
}

/* One (sequence, head) backward (probabilities recomputed from the log-sum-exp).
 * Buffer: K^T, V^T (D, n); K, dK, dV, Q (scaled), dO (n, D); p, ds, delta (n). */
INLINE void bwd_task(const void *qkv, const void *out, const void *dout, const float *lse, int is_bf16, int t0, int n,
                     int h, int H, const int D, int causal, float scale, void *dqkv, float *buf) {
    const int ns = round_up(n);
    const size_t dn = (size_t)D * n, dns = (size_t)D * ns;
    float *kt = buf, *vt = kt + dns, *kr = vt + dns, *dk = kr + dn, *dv = dk + dn, *qr = dv + dn, *dor = qr + dn;
    float *p = dor + dn, *ds = p + ns, *delta = ds + ns;
    float dq[D > 0 ? D : 1];
    load_block(qkv, is_bf16, t0, n, ns, 0, h, H, D, scale, qr, NULL);
    load_block(qkv, is_bf16, t0, n, ns, 1, h, H, D, 1.0f, kr, kt);
    load_block(qkv, is_bf16, t0, n, ns, 2, h, H, D, 1.0f, NULL, vt);
    memset(dk, 0, sizeof(float) * dn);
    memset(dv, 0, sizeof(float) * dn);
    for (int i = 0; i < n; i++) {
        float dl = 0.0f;
        for (int d = 0; d < D; d++) {
            const float g = load_elem(dout, THD(t0 + i, h, d), is_bf16);
            dor[(int64_t)i * D + d] = g;
            dl += g * load_elem(out, THD(t0 + i, h, d), is_bf16);
        }
        delta[i] = dl;
    }
    for (int i = 0; i < n; i++) {
        const int kend = causal ? i + 1 : n, kpad = round_up(kend);
        const float *q = qr + (int64_t)i * D, *g = dor + (int64_t)i * D;
        scores(q, kt, ns, kend, D, p);   /* scaled scores, -inf past kend */
        scores(g, vt, ns, kend, D, ds);  /* dO_i . v_k */
        const float row_lse = lse[(int64_t)(t0 + i) * H + h], di = delta[i];
#pragma omp simd
        for (int k = 0; k < kpad; k++) {  /* p = 0 and ds = 0 past kend */
            p[k] = expf(p[k] - row_lse);
            ds[k] = p[k] * (ds[k] - di);
        }
        for (int d = 0; d < D; d++) dq[d] = 0.0f;
        for (int k = 0; k < kend; k++) {
            const float pk = p[k], dsk = ds[k];
#pragma omp simd
            for (int d = 0; d < D; d++) {
                dv[(int64_t)k * D + d] += pk * g[d];
                dk[(int64_t)k * D + d] += dsk * q[d];  /* q carries the scale */
                dq[d] += dsk * kr[(int64_t)k * D + d];
            }
        }
        for (int d = 0; d < D; d++) store_elem(dqkv, QKV(t0 + i, 0, h, d), dq[d] * scale, is_bf16);
    }
    for (int k = 0; k < n; k++)
        for (int d = 0; d < D; d++) {
            store_elem(dqkv, QKV(t0 + k, 1, h, d), dk[(int64_t)k * D + d], is_bf16);
            store_elem(dqkv, QKV(t0 + k, 2, h, d), dv[(int64_t)k * D + d], is_bf16);
        }
}

/* Head dims with an unrolled specialisation; any other D runs the generic (slower) loops. */
#define DISPATCH_D(call)               \
    switch (D) {                       \
        case 16: call(16); break;      \
        case 32: call(32); break;      \
        case 64: call(64); break;      \
        default: call(D); break;       \
    }

int jetfm_attn_fwd(const void *qkv, int is_bf16, const int32_t *cu, int B, int H, int D, int causal, float scale,
                   void *out, float *lse, int nthreads) {
    const int n_max = max_length(cu, B);
    int failed = 0;
    if (n_max < 0) return -2;
    if (n_max == 0) return 0;
#pragma omp parallel num_threads(nthreads)
    {
        const size_t ns = (size_t)round_up(n_max);
        float *buf = (float *)malloc(sizeof(float) * ((size_t)D * ns + (size_t)D * n_max + ns));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < (int64_t)B * H; task++) {
            const int b = (int)(task / H), h = (int)(task % H);
            const int t0 = cu[b], n = cu[b + 1] - cu[b];
            if (!buf || n <= 0) continue;
#define FWD(DD) fwd_task(qkv, is_bf16, t0, n, h, H, DD, causal, scale, out, lse, buf)
            DISPATCH_D(FWD)
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
    if (n_max == 0) return 0;
#pragma omp parallel num_threads(nthreads)
    {
        const size_t ns = (size_t)round_up(n_max);
        float *buf = (float *)malloc(sizeof(float) * ((size_t)2 * D * ns + (size_t)5 * D * n_max + 3 * ns));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < (int64_t)B * H; task++) {
            const int b = (int)(task / H), h = (int)(task % H);
            const int t0 = cu[b], n = cu[b + 1] - cu[b];
            if (!buf || n <= 0) continue;
#define BWD(DD) bwd_task(qkv, out, dout, lse, is_bf16, t0, n, h, H, DD, causal, scale, dqkv, buf)
            DISPATCH_D(BWD)
#undef BWD
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
