/* Cross-entropy of logit rows and its gradient with respect to the logits, on CPU, in one call:
 *     loss_sum = sum_r [log sum_v exp z[r, v] - z[r, t_r]],  correct = #{r : z[r, t_r] >= max_v z[r, v]}
 *     g[r, v]  = softmax(z[r])[v] - [v == t_r]          (when need_grad; written over z, in its dtype)
 *
 * Why: `linear_cross_entropy` projects hidden rows onto the vocabulary a chunk of rows at a time;
 * with torch ops each chunk's logits are copied to fp32, reduced for the max, shifted,
 * exponentiated, summed, divided, corrected at the targets and copied back to the matmul's dtype
 * (seven passes over the chunk). Here: one pass for the max, one for the exponentials (kept in a
 * per-thread fp32 row), one to write the gradient in place. Arithmetic in fp32, the loss summed
 * in double. z: (R, V) row-major, fp32 or bf16 (z_bf16 = 1); targets (R,) int64 in [0, V).
 * Returns 0, or -1 when a target lies outside [0, V) or a buffer cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "elements.h"

#if defined(__x86_64__)
__attribute__((simd("notinbranch"))) extern float expf(float);
#endif

int jetfm_softmax_xent(void *z, int z_bf16, const int64_t *targets, int64_t R, int64_t V, int need_grad,
                       double *loss_out, int64_t *correct_out, int nthreads) {
    double loss = 0.0;
    int64_t correct = 0;
    int failed = 0;
    for (int64_t r = 0; r < R; r++)
        if (targets[r] < 0 || targets[r] >= V) return -1;
#pragma omp parallel num_threads(nthreads) reduction(+ : loss, correct)
    {
        float *e = (float *)malloc(sizeof(float) * (size_t)V);
        if (!e) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            if (!e) continue;
            const int64_t row = r * V;
            float m = -INFINITY;
#pragma omp simd reduction(max : m)
            for (int64_t v = 0; v < V; v++) {
                const float x = load_elem(z, row + v, z_bf16);
                m = x > m ? x : m;
            }
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t v = 0; v < V; v++) {
                e[v] = expf(load_elem(z, row + v, z_bf16) - m);
                s += e[v];
            }
            const float zt = load_elem(z, row + targets[r], z_bf16);
            loss += (double)(logf(s) + m - zt);
            correct += zt >= m;
            if (need_grad) {
                const float inv_s = 1.0f / s;
#pragma omp simd
                for (int64_t v = 0; v < V; v++) store_elem(z, row + v, e[v] * inv_s, z_bf16);
                store_elem(z, row + targets[r], e[targets[r]] * inv_s - 1.0f, z_bf16);
            }
        }
        free(e);
    }
    *loss_out = loss;
    *correct_out = correct;
    return failed ? -1 : 0;
}
