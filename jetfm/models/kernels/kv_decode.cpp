// Generation on CPU: one-query attention on the position-major KV cache and whole-stack block
// steps, as a torch C++ extension (the block step calls ATen ops: addmm, layer_norm, gelu).
// Built on first use by jetfm/models/cpu_kernels.py (decode_extension); see KVCache in
// jetfm/models/attention.py for the layout and the reasons.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>

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
// (norm1 w/b, qkv w/b, proj w/b, norm2 w/b, fc1 w/b, fc2 w/b); block i on cache layer first_layer + i,
// caches (layers, L, B, H, K); the new k/v go to position pos
torch::Tensor stack_step(torch::Tensor x, std::vector<torch::Tensor> params, torch::Tensor kc_all,
                         torch::Tensor vc_all, int64_t first_layer, int64_t pos, int64_t H, double eps, double scale) {
  TORCH_CHECK(params.size() % 12 == 0 && x.dim() == 2 && x.scalar_type() == at::kFloat);
  TORCH_CHECK(kc_all.is_contiguous() && vc_all.is_contiguous() && kc_all.dim() == 5 && pos < kc_all.size(1));
  const int64_t B = x.size(0), D = x.size(1), K = D / H, N = B * H, L = kc_all.size(1);
  TORCH_CHECK(kc_all.size(2) == B && kc_all.size(3) == H && kc_all.size(4) == K && K % 16 == 0);
  for (size_t i = 0; i < params.size() / 12; ++i) {
    const torch::Tensor* p = params.data() + 12 * i;
    auto qkv = at::addmm(p[3], at::layer_norm(x, {D}, p[0], p[1], eps), p[2].t());  // (B, 3D)
    auto kc = kc_all.select(0, first_layer + i).view({L, N, K});
    auto vc = vc_all.select(0, first_layer + i).view({L, N, K});
    const float* src = qkv.data_ptr<float>();
    float* kdst = kc.data_ptr<float>() + pos * N * K; float* vdst = vc.data_ptr<float>() + pos * N * K;
    for (int64_t b = 0; b < B; ++b) {  // row b of qkv is [q | k | v], each (H, K): k, v rows are (H*K) contiguous
      std::memcpy(kdst + b * D, src + b * 3 * D + D, D * sizeof(float));
      std::memcpy(vdst + b * D, src + b * 3 * D + 2 * D, D * sizeof(float));
    }
    auto q = qkv.view({B, 3, H, K}).select(1, 0).reshape({N, K});  // copy: q's rows are strided per jet
    auto a = mix(at::softmax(scores(q, kc, pos + 1, scale), 0), vc, pos + 1).view({B, D});
    x = at::addmm(p[5], a, p[4].t()).add_(x);  // x + proj(a): fp addition commutes exactly
    auto m = at::gelu(at::addmm(p[9], at::layer_norm(x, {D}, p[6], p[7], eps), p[8].t()));
    x = at::addmm(p[11], m, p[10].t()).add_(x);
  }
  return x;
}

// The GIL is released while a kernel runs: generation shards run side by side on threads
// (jetfm/sampling.py), and the Python between kernels is short.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", torch::wrap_pybind_function_no_gil(scores));
  m.def("mix", torch::wrap_pybind_function_no_gil(mix));
  m.def("stack_step", torch::wrap_pybind_function_no_gil(stack_step));
}
