// Generation on CPU: one-query attention on the position-major KV cache, whole-stack block steps
// and the small-batch linear layers they run, as a torch C++ extension (the block step calls ATen
// ops: layer_norm, gelu, softmax).
// Built on first use by jetfm/models/cpu_kernels.py (decode_extension); see KVCache in
// jetfm/models/attention.py for the layout and the reasons.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// software prefetch distance in floats along the stream (hardware prefetchers stop at pages)
static const int64_t PREFETCH = 1024;

static inline v16 load16(const float* p) { v16 x; std::memcpy(&x, p, sizeof(x)); return x; }

static inline float hsum16(v16 x) {  // a tree, not 15 dependent adds
  v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline void store16(float* p, v16 x) { std::memcpy(p, &x, sizeof(x)); }
static inline v16 splat(float a) { return v16{} + a; }
typedef int32_t vi16 __attribute__((vector_size(64)));

// e^x for x <= 0 (a softmax row after its max is subtracted; erf's e^(-z^2)): x = n ln2 + r,
// |r| <= ln2 / 2, e^r by its Taylor series to r^7 (relative error < 1e-8 before rounding), 2^n
// by the exponent bits; below -87 (where e^x < 2^-125) the result is ~0, never a denormal.
static inline v16 exp16_nonpos(v16 x) {
  x = x > splat(-87.0f) ? x : splat(-87.0f);
  const vi16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi16);  // round(x / ln2), x <= 0
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187045e-06f;  // ln2 in two parts
  v16 e = splat(1.0f / 5040);
  e = e * r + 1.0f / 720; e = e * r + 1.0f / 120; e = e * r + 1.0f / 24; e = e * r + 1.0f / 6;
  e = e * r + 0.5f; e = e * r + 1.0f; e = e * r + 1.0f;
  const vi16 bits = (n + 127) << 23;
  v16 two_n; std::memcpy(&two_n, &bits, sizeof(two_n));
  return e * two_n;
}

// the exact (erf) GELU: x/2 (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute
// error <= 1.5e-7), the form torch's vectorised CPU erf takes
static inline v16 gelu16(v16 x) {
  const v16 z = x * 0.70710678118654752f;
  const v16 az = z < splat(0.0f) ? -z : z;
  const v16 t = splat(1.0f) / (az * 0.3275911f + 1.0f);
  const v16 poly = ((((t * 1.061405429f - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const v16 erf_az = splat(1.0f) - poly * exp16_nonpos(-az * az);
  return x * 0.5f * ((z < splat(0.0f) ? -erf_az : erf_az) + 1.0f);
}

// Linear layers of a generation step: out (M, N) = x (M, K) @ W (K, N) + bias, the weight packed
// once per cache (pack_weight) into panels of 32 columns, each (K, 32) contiguous (a last one of 16).
// Why not addmm: at a few dozen rows (one new particle per jet) the library GEMM spends its time
// packing and dispatching; this register tile of MR rows x NV 16-float column vectors, over k in
// order, with the weight panel staying in L1 across the row tiles, ran 1.5-1.7x faster at the
// reference size (32 rows: 128x384 51 -> 32 us, 512x128 63 -> 39 us, the 128x8256 vocabulary
// projection 1250 -> 720 us); packed, a panel is one sequential stream from memory (the weights of
// a step, ~15 MB, no longer sit in cache when the next step reads them). Each output is one
// fused multiply-add chain over k, then + bias, then the epilogue: results do not depend on the
// thread count. Epilogues: none, GELU, or + a residual row (which `out` may be: in place).
enum Epilogue { PLAIN = 0, GELU = 1, RESIDUAL = 2 };

struct LinearArgs {
  const float* x; int64_t xs;   // rows of x (stride xs)
  const float* w;                // packed weight (pack_weight)
  const float* bias;            // N or nullptr
  const float* res; int64_t rs; // residual rows (RESIDUAL)
  float* out; int64_t os;
  int64_t K;
};

template <int MR, int NV, int EPI>
static inline void linear_tile(const LinearArgs& a, int64_t row, int64_t col, const float* next) {
  const float* x = a.x + row * a.xs; const float* w = a.w + col * a.K;  // the panel at col: (K, 16 NV)
  v16 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = v16{};
  for (int64_t k = 0; k < a.K; ++k) {
    v16 wv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) wv[j] = load16(w + k * 16 * NV + 16 * j);
    if (next) {  // the next panel (32 columns: 2 cache lines a k) on its way from memory meanwhile
      __builtin_prefetch(next + 32 * k);
      __builtin_prefetch(next + 32 * k + 16);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float xr = x[r * a.xs + k];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += xr * wv[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      v16 y = a.bias ? acc[r][j] + load16(a.bias + col + 16 * j) : acc[r][j];
      if (EPI == GELU) y = gelu16(y);
      if (EPI == RESIDUAL) y = y + load16(a.res + (row + r) * a.rs + col + 16 * j);
      store16(a.out + (row + r) * a.os + col + 16 * j, y);
    }
}

// all M rows of the panel of 16 NV columns at `col`: tiles of MR rows, then the rest in one tile;
// the first tile prefetches the next panel (`next`, or nullptr)
template <int NV, int EPI>
static void linear_panel(const LinearArgs& a, int64_t M, int64_t col, const float* next) {
  constexpr int MR = 12;  // 12 x 2 accumulators + 2 weight vectors + a broadcast: within 32 registers
  int64_t r = 0;
  for (; r + MR <= M; r += MR, next = nullptr) linear_tile<MR, NV, EPI>(a, r, col, next);
  switch (M - r) {
    case 0: break;
#define JETFM_ROWS(n) case n: linear_tile<n, NV, EPI>(a, r, col, next); break;
    JETFM_ROWS(1) JETFM_ROWS(2) JETFM_ROWS(3) JETFM_ROWS(4) JETFM_ROWS(5) JETFM_ROWS(6)
    JETFM_ROWS(7) JETFM_ROWS(8) JETFM_ROWS(9) JETFM_ROWS(10) JETFM_ROWS(11)
#undef JETFM_ROWS
  }
}

// M rows, N % 16 == 0 columns, in panels of 32 columns (one of 16 at the end) over torch's threads
template <int EPI>
static void linear_rows(const LinearArgs& a, int64_t M, int64_t N) {
  const int64_t panels = N / 32, odd = N % 32;
  at::parallel_for(0, panels + (odd ? 1 : 0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* next = p + 1 < end ? a.w + 32 * (p + 1) * a.K : nullptr;
      if (p < panels) linear_panel<2, EPI>(a, M, 32 * p, next);
      else linear_panel<1, EPI>(a, M, 32 * p, next);
    }
  });
}

// weight (N, K) as nn.Linear holds it, N % 16 == 0 -> packed (K * N): panels of 32 output columns,
// each (K, 32) contiguous, the last of 16 where N % 32 == 16
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(0) % 16 == 0,
              "pack_weight: fp32 (N, K) weight with N a multiple of 16 expected");
  const int64_t N = weight.size(0), K = weight.size(1);
  auto wt = weight.t().contiguous();  // (K, N)
  auto packed = torch::empty({K * N}, weight.options());
  const float* src = wt.data_ptr<float>(); float* dst = packed.data_ptr<float>();
  for (int64_t col = 0; col < N; col += 32) {
    const int64_t width = std::min<int64_t>(32, N - col);
    for (int64_t k = 0; k < K; ++k) std::memcpy(dst + col * K + k * width, src + k * N + col, width * sizeof(float));
  }
  return packed;
}

// out (M, N) = x (M, K) @ W + bias (N; empty: none), W packed by pack_weight; rows of x and out may
// be strided (unit stride within a row)
void linear_into(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& bias, torch::Tensor& out) {
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0) && x.stride(1) == 1 && out.stride(1) == 1
              && packed.is_contiguous() && packed.numel() == x.size(1) * out.size(1) && out.size(1) % 16 == 0,
              "linear: x (M, K), packed weight (K * N), out (M, N) with N a multiple of 16 expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat
              && (!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == out.size(1))),
              "linear: fp32 tensors expected");
  LinearArgs a{x.data_ptr<float>(), x.stride(0), packed.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr,
               nullptr, 0, out.data_ptr<float>(), out.stride(0), x.size(1)};
  linear_rows<PLAIN>(a, x.size(0), out.size(1));
}

// LayerNorm of B rows of D (% 16 == 0) floats: mean, then the variance about it (two passes)
static void layer_norm_rows(const float* x, int64_t B, int64_t D, const float* w, const float* b, float eps, float* out) {
  for (int64_t i = 0; i < B; ++i) {
    const float* xi = x + i * D; float* oi = out + i * D;
    v16 sum = v16{};
    for (int64_t c = 0; c < D; c += 16) sum += load16(xi + c);
    const float mean = hsum16(sum) / static_cast<float>(D);
    v16 sq = v16{};
    for (int64_t c = 0; c < D; c += 16) { const v16 d = load16(xi + c) - mean; sq += d * d; }
    const float rstd = 1.0f / std::sqrt(hsum16(sq) / static_cast<float>(D) + eps);
    for (int64_t c = 0; c < D; c += 16) store16(oi + c, (load16(xi + c) - mean) * rstd * load16(w + c) + load16(b + c));
  }
}

// One-query attention of a block step, fused: for N = B*H rows (jet, head), q of row i at
// qkv + (i / H) * q_stride + (i % H) * K, keys/values k, v (L, N, K) position-major with n filled
// positions; a (N, K) = softmax over l of (scale q . k[l, i]) mixed with v[l, i]. Rows go in one
// block per thread, so that keys and values are still read as one sequential stream per thread
// (blocks of a few rows, strided across positions, ran 1.6x slower); the block's scores (n x rows)
// stay in L2 from the dot products through the softmax to the mix, with no allocation or dispatch
// between them (the unfused scores / torch softmax / mix cost one each, per layer).
static void attend_rows(const float* qkv, int64_t q_stride, int64_t H, int64_t K, const float* kc, const float* vc,
                        int64_t N, int64_t n, float scale, float* a) {
  const int64_t C = K / 16, threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t R = std::max<int64_t>(16, ((N + threads - 1) / threads + 15) / 16 * 16);  // rows per block
  at::parallel_for(0, (N + R - 1) / R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n * R + R * K);
    float* s = buf.data();            // (n, R) scores, then probabilities
    float* q = buf.data() + n * R;    // (R, K) the block's query rows, gathered from qkv
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * R, rows = std::min(R, N - i0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        std::memcpy(q + r * K, qkv + (i / H) * q_stride + (i % H) * K, K * sizeof(float));
      }
      for (int64_t l = 0; l < n; ++l) {
        const float* kl = kc + (l * N + i0) * K;
        for (int64_t r = 0; r < rows; ++r) {
          const float* qi = q + r * K; const float* ki = kl + r * K;
          __builtin_prefetch(ki + PREFETCH);
          v16 dot = load16(qi) * load16(ki);
          for (int64_t c = 1; c < C; ++c) dot += load16(qi + 16 * c) * load16(ki + 16 * c);
          s[l * R + r] = hsum16(dot) * scale;
        }
        for (int64_t r = rows; r < R; ++r) s[l * R + r] = 0.0f;
      }
      for (int64_t g = 0; g < R; g += 16) {  // softmax over l, 16 rows a vector
        v16 mx = load16(s + g);
        for (int64_t l = 1; l < n; ++l) { const v16 y = load16(s + l * R + g); mx = y > mx ? y : mx; }
        v16 sum = v16{};
        for (int64_t l = 0; l < n; ++l) {
          const v16 e = exp16_nonpos(load16(s + l * R + g) - mx);
          store16(s + l * R + g, e); sum += e;
        }
        const v16 inv = splat(1.0f) / sum;
        for (int64_t l = 0; l < n; ++l) store16(s + l * R + g, load16(s + l * R + g) * inv);
      }
      int64_t r0 = 0;
      if (C == 1) {  // head dim 16: 16 rows' sums stay in registers over all positions
        for (; r0 + 16 <= rows; r0 += 16) {
          v16 acc[16];
          const float* v0 = vc + (i0 + r0) * 16;
          for (int r = 0; r < 16; ++r) acc[r] = s[r0 + r] * load16(v0 + 16 * r);
          for (int64_t l = 1; l < n; ++l) {
            const float* vl = v0 + l * N * 16; const float* pl = s + l * R + r0;
            for (int r = 0; r < 16; ++r) __builtin_prefetch(vl + 4 * N * 16 + 16 * r);
            for (int r = 0; r < 16; ++r) acc[r] += pl[r] * load16(vl + 16 * r);
          }
          for (int r = 0; r < 16; ++r) store16(a + (i0 + r0 + r) * 16, acc[r]);
        }
      }
      for (int64_t r = r0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) store16(a + (i0 + r) * K + 16 * c, s[r] * load16(vc + (i0 + r) * K + 16 * c));
      for (int64_t l = 1; l < n && r0 < rows; ++l) {
        const float* vl = vc + (l * N + i0) * K;
        for (int64_t r = r0; r < rows; ++r) {
          const float p = s[l * R + r];
          float* ai = a + (i0 + r) * K; const float* vi = vl + r * K;
          __builtin_prefetch(vi + PREFETCH);
          for (int64_t c = 0; c < C; ++c) store16(ai + 16 * c, load16(ai + 16 * c) + p * load16(vi + 16 * c));
        }
      }
    }
  });
}

static void check(const torch::Tensor& rows, const torch::Tensor& cache, int64_t n) {
  TORCH_CHECK(rows.scalar_type() == at::kFloat && cache.scalar_type() == at::kFloat);
  TORCH_CHECK(rows.dim() == 2 && cache.dim() == 3 && rows.stride(1) == 1 && cache.is_contiguous());
  TORCH_CHECK(cache.size(1) == rows.size(0) && cache.size(2) % 16 == 0 && n >= 1 && n <= cache.size(0));
}

// scores (n, N) = scale * k[:n] (L, N, D) . q (N, D), position-major like the cache, so that both
// the keys and the scores are written and read in order (softmax then runs over dim 0). q's rows
// may be strided (q of a qkv block).
torch::Tensor scores(torch::Tensor q, torch::Tensor k, int64_t n, double scale) {
  check(q, k, n);
  const int64_t N = k.size(1), D = k.size(2), C = D / 16;
  TORCH_CHECK(q.size(1) == D);
  auto out = torch::empty({n, N}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); float* op = out.data_ptr<float>();
  const int64_t qs = q.stride(0);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t l = 0; l < n; ++l) {
      const float* kl = kp + l * N * D;
      for (int64_t i = begin; i < end; ++i) {
        const float* qi = qp + i * qs; const float* ki = kl + i * D;
        __builtin_prefetch(ki + PREFETCH);
        v16 dot = load16(qi) * load16(ki);
        for (int64_t c = 1; c < C; ++c) dot += load16(qi + 16 * c) * load16(ki + 16 * c);
        op[l * N + i] = hsum16(dot) * sc;
      }
    }
  });
  return out;
}

// out (N, D) = sum over l < n, in order, of p[l, i] v[l, i]; p (n, N), v (L, N, D)
torch::Tensor mix(torch::Tensor p, torch::Tensor v, int64_t n) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && p.is_contiguous() && v.is_contiguous());
  TORCH_CHECK(p.dim() == 2 && v.dim() == 3 && p.size(0) == n && p.size(1) == v.size(1) && n <= v.size(0));
  TORCH_CHECK(v.size(2) % 16 == 0 && n >= 1);
  const int64_t N = v.size(1), D = v.size(2), C = D / 16;
  auto out = torch::empty({N, D}, p.options());
  const float* pp = p.data_ptr<float>(); const float* vp = v.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    if (C == 1) {  // head dim 16: 16 rows' sums stay in registers over all positions
      for (; begin + 16 <= end; begin += 16) {
        v16 acc[16];
        for (int r = 0; r < 16; ++r) acc[r] = pp[begin + r] * load16(vp + (begin + r) * 16);
        for (int64_t l = 1; l < n; ++l) {
          const float* vl = vp + (l * N + begin) * 16; const float* pl = pp + l * N + begin;
          for (int r = 0; r < 16; ++r) __builtin_prefetch(vl + 4 * N * 16 + 16 * r);
          for (int r = 0; r < 16; ++r) acc[r] += pl[r] * load16(vl + 16 * r);
        }
        for (int r = 0; r < 16; ++r) std::memcpy(op + (begin + r) * 16, &acc[r], sizeof(v16));
      }
    }
    for (int64_t i = begin; i < end; ++i)
      for (int64_t c = 0; c < C; ++c) {
        v16 x = pp[i] * load16(vp + i * D + 16 * c);
        std::memcpy(op + i * D + 16 * c, &x, sizeof(x));
      }
    for (int64_t l = 1; l < n; ++l) {
      const float* vl = vp + l * N * D;
      for (int64_t i = begin; i < end; ++i)
        for (int64_t c = 0; c < C; ++c) {
          __builtin_prefetch(vl + i * D + 16 * c + PREFETCH);
          v16 x = load16(op + i * D + 16 * c) + pp[l * N + i] * load16(vl + i * D + 16 * c);
          std::memcpy(op + i * D + 16 * c, &x, sizeof(x));
        }
    }
  });
  return out;
}

// blocks of Block.step: x + proj(attn(LN1(x))), then + fc2(gelu(fc1(LN2(x)))); 12 tensors per block
// (norm1 w/b, qkv W/b, proj W/b, norm2 w/b, fc1 W/b, fc2 W/b), the linear weights packed by
// pack_weight (Stack._step_params); block i on cache layer first_layer + i, caches (layers, L, B, H, K);
// the new k/v go to position pos. Every op is jetfm's own (LayerNorm, the linear layers with bias,
// GELU and residual fused, the fused attention), on one workspace: at a few dozen rows the ATen
// ops' allocations and dispatch cost as much as their arithmetic. Two more tensors after the blocks
// (a LayerNorm's w/b, same eps): the stack's final LayerNorm, applied to the output.
torch::Tensor stack_step(torch::Tensor x, std::vector<torch::Tensor> params, torch::Tensor kc_all,
                         torch::Tensor vc_all, int64_t first_layer, int64_t pos, int64_t H, double eps, double scale) {
  const size_t blocks = params.size() / 12;
  const bool final_norm = params.size() % 12 == 2;
  TORCH_CHECK((params.size() % 12 == 0 || final_norm) && x.dim() == 2 && x.scalar_type() == at::kFloat,
              "stack_step: 12 tensors per block (+ 2 for a final LayerNorm) and (B, D) fp32 input expected");
  TORCH_CHECK(kc_all.is_contiguous() && vc_all.is_contiguous() && kc_all.dim() == 5 && pos < kc_all.size(1)
              && first_layer >= 0 && first_layer + static_cast<int64_t>(blocks) <= kc_all.size(0));
  const int64_t B = x.size(0), D = x.size(1), K = D / H, N = B * H, L = kc_all.size(1);
  TORCH_CHECK(kc_all.size(2) == B && kc_all.size(3) == H && kc_all.size(4) == K && K % 16 == 0);
  int64_t hidden = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous(), "stack_step: fp32 contiguous parameters expected");
    if (i % 12 == 9) hidden = std::max(hidden, p.numel());
  }
  for (size_t i = 0; i < blocks; ++i) {
    const torch::Tensor* p = params.data() + 12 * i;
    const int64_t F = p[9].numel();
    TORCH_CHECK(p[2].numel() == 3 * D * D && p[3].numel() == 3 * D && p[4].numel() == D * D && p[5].numel() == D
                && F % 16 == 0 && p[8].numel() == D * F && p[10].numel() == F * D && p[11].numel() == D,
                "stack_step: packed linear weights (pack_weight) and an MLP width that is a multiple of 16 expected");
  }
  auto out = x.contiguous().clone();
  auto work = torch::empty({B * (D + 3 * D + D + hidden)}, x.options());
  float* xo = out.data_ptr<float>();
  float* h = work.data_ptr<float>(); float* qkv = h + B * D; float* a = qkv + B * 3 * D; float* m = a + B * D;
  const float e = static_cast<float>(eps), sc = static_cast<float>(scale);
  for (size_t i = 0; i < blocks; ++i) {
    const torch::Tensor* p = params.data() + 12 * i;
    const float* P[12];
    for (int j = 0; j < 12; ++j) P[j] = p[j].data_ptr<float>();
    const int64_t F = p[9].numel();
    float* kc = kc_all.data_ptr<float>() + (first_layer + static_cast<int64_t>(i)) * kc_all.stride(0);
    float* vc = vc_all.data_ptr<float>() + (first_layer + static_cast<int64_t>(i)) * vc_all.stride(0);
    layer_norm_rows(xo, B, D, P[0], P[1], e, h);
    linear_rows<PLAIN>({h, D, P[2], P[3], nullptr, 0, qkv, 3 * D, D}, B, 3 * D);
    float* kdst = kc + pos * N * K; float* vdst = vc + pos * N * K;
    for (int64_t b = 0; b < B; ++b) {  // row b of qkv is [q | k | v], each (H, K): k, v rows are (H*K) contiguous
      std::memcpy(kdst + b * D, qkv + b * 3 * D + D, D * sizeof(float));
      std::memcpy(vdst + b * D, qkv + b * 3 * D + 2 * D, D * sizeof(float));
    }
    attend_rows(qkv, 3 * D, H, K, kc, vc, N, pos + 1, sc, a);
    linear_rows<RESIDUAL>({a, D, P[4], P[5], xo, D, xo, D, D}, B, D);       // x += proj(a)
    layer_norm_rows(xo, B, D, P[6], P[7], e, h);
    linear_rows<GELU>({h, D, P[8], P[9], nullptr, 0, m, F, D}, B, F);       // gelu(fc1(LN2(x)))
    linear_rows<RESIDUAL>({m, F, P[10], P[11], xo, D, xo, D, F}, B, D);     // x += fc2(m)
  }
  if (final_norm) {
    const torch::Tensor& w = params[12 * blocks]; const torch::Tensor& b = params[12 * blocks + 1];
    TORCH_CHECK(w.numel() == D && b.numel() == D, "stack_step: final LayerNorm of width D expected");
    layer_norm_rows(xo, B, D, w.data_ptr<float>(), b.data_ptr<float>(), e, xo);  // in place: row by row
  }
  return out;
}

// Inverse-CDF draws from softmax rows, the sampler of jetfm/sampling.py (_sample_inplace) after
// its masks, fused: per row the max, then e^(x - max) in place (exactly 0 at -inf: masked tokens),
// the sums of blocks of `block` tokens, their running sum (accumulated in double, stored in float,
// as torch's CPU cumsum), the block holding u * total and the token inside it by the same rule.
// Why: the torch version is ~15 ops a step over the (B, V) logits (max, subtract, exp, block sums,
// two cumsums, searches, flips, gathers), each a pass and a dispatch; here one row is two passes
// while it sits in L1/L2. Same arithmetic but the order of the block sums, so a token differs from
// the torch sampler's only where u * total falls within rounding of a block boundary.
// logits (B, V) fp32 with unit stride in a row, overwritten by the weights; u (B,) fp32 in [0, 1).
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor u, int64_t block) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "sample_rows: (B, V) fp32 logits with contiguous rows expected");
  TORCH_CHECK(u.dim() == 1 && u.scalar_type() == at::kFloat && u.is_contiguous() && u.size(0) == logits.size(0),
              "sample_rows: (B,) fp32 uniform numbers expected");
  TORCH_CHECK(block >= 16 && block % 16 == 0, "sample_rows: a block of a multiple of 16 tokens expected");
  const int64_t B = logits.size(0), V = logits.size(1), rs = logits.stride(0), nb = (V + block - 1) / block;
  auto tokens = torch::empty({B}, logits.options().dtype(at::kLong));
  float* lp = logits.data_ptr<float>(); const float* up = u.data_ptr<float>(); int64_t* tp = tokens.data_ptr<int64_t>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::atomic<bool> all_masked{false};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(nb), cdf(nb);
    for (int64_t b = begin; b < end; ++b) {
      float* x = lp + b * rs;
      const int64_t V16 = V / 16 * 16;
      v16 mv = splat(neg_inf);
      for (int64_t i = 0; i < V16; i += 16) { const v16 y = load16(x + i); mv = y > mv ? y : mv; }
      float mx = neg_inf;
      for (int j = 0; j < 16; ++j) mx = std::max(mx, mv[j]);
      for (int64_t i = V16; i < V; ++i) mx = std::max(mx, x[i]);
      if (mx == neg_inf) { all_masked.store(true); tp[b] = 0; continue; }
      const v16 vmx = splat(mx);
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t lo = k * block, hi = std::min(V, lo + block);
        v16 acc = v16{};
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
          const v16 y = load16(x + i);
          const v16 e = y == splat(neg_inf) ? splat(0.0f) : exp16_nonpos(y - vmx);
          store16(x + i, e); acc += e;
        }
        float s = hsum16(acc);
        for (; i < hi; ++i) {  // a row length that is not a multiple of 16: the tail one by one
          const float e = x[i] == neg_inf ? 0.0f : std::exp(x[i] - mx);
          x[i] = e; s += e;
        }
        sums[k] = s;
      }
      double run = 0.0;
      int64_t last_block = nb - 1;
      for (int64_t k = 0; k < nb; ++k) { run += sums[k]; cdf[k] = static_cast<float>(run); }
      while (last_block > 0 && !(sums[last_block] > 0.0f)) --last_block;
      const float target = up[b] * cdf[nb - 1];
      const int64_t k = std::min<int64_t>(std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin(), last_block);
      const float rest = target - (cdf[k] - sums[k]);
      const int64_t lo = k * block, width = std::min(V, lo + block) - lo;
      // inside the block: the first token whose running sum (double, stored as float) exceeds the
      // rest, but not past the last token with weight (rounding may leave the rest at the total)
      int64_t last = width - 1;
      while (last > 0 && !(x[lo + last] > 0.0f)) --last;
      double in_run = 0.0;
      int64_t j = 0;
      for (; j < width; ++j) { in_run += x[lo + j]; if (static_cast<float>(in_run) > rest) break; }
      tp[b] = lo + std::min(j, last);
    }
  });
  TORCH_CHECK(!all_masked.load(), "sample_rows: a row with every token masked (probability 0 everywhere)");
  return tokens;
}

// The GIL is released while a kernel runs: generation shards run side by side on threads
// (jetfm/sampling.py), and the Python between kernels is short.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", torch::wrap_pybind_function_no_gil(scores));
  m.def("mix", torch::wrap_pybind_function_no_gil(mix));
  m.def("stack_step", torch::wrap_pybind_function_no_gil(stack_step));
  m.def("pack_weight", torch::wrap_pybind_function_no_gil(pack_weight));
  m.def("linear_into", torch::wrap_pybind_function_no_gil(linear_into));
  m.def("sample_rows", torch::wrap_pybind_function_no_gil(sample_rows));
}
