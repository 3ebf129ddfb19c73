"""The fast generation path (compiled one-query attention and block step on a position-major CPU
KV cache, padded logits buffer, per-cache memo) samples exactly the tokens of the plain path.

The models here have head dim 16, the smallest the compiled kernels take, so that the fast path
really runs (the tiny models of the other generation tests, head dim 4, take the SDPA fallback).
Random weights, fp32, CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jetfm.models.attention import KVCache, derived_from
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.pretrain import PretrainModel
from jetfm import sampling
from jetfm.sampling import _sample_inplace, generate_jets
from jetfm.tokenizer.config import TokenizerConfig
from jetfm.tokenizer.model import ParticleTokenizer

CODES, L = 48, 32


@pytest.fixture(scope="module")
def kernel():
    module = KVCache._kernel()
    if module is None:
        pytest.skip("the compiled KV-cache kernels cannot be built here (no C++ compiler?)")
    return module


def _models(input_mode: str, conditioning: str = "none"):
    torch.manual_seed(0)
    model = PretrainModel(
        ModelConfig(dim=32, num_heads=2, num_blocks=2, head_blocks=1, input_mode=input_mode, max_particles=L,
                    conditioning=conditioning),
        ObjectiveConfig(name="ntp"), vocab_size=CODES + 2, num_features=3, num_classes=3,
    ).eval()
    tokenizer = ParticleTokenizer(TokenizerConfig(codebook_size=CODES, hidden_dim=32, num_heads=2, encoder_blocks=1,
                                                  decoder_blocks=2)).eval()
    with torch.no_grad():  # peaked logits (random init gives near-uniform ones), so that jets also stop
        model.ntp.head.out.weight.mul_(40.0)
    return model, tokenizer


def _generate(model, tokenizer, use_cache: bool, **kwargs):
    return generate_jets(model, tokenizer, 40, batch_size=32, max_length=L, temperature=3.0,
                         generator=torch.Generator().manual_seed(7), use_cache=use_cache, **kwargs)


@pytest.mark.parametrize("input_mode,conditioning", [("continuous", "none"), ("token", "none"),
                                                     ("continuous", "class"), ("token", "multiplicity")])
def test_fast_path_tokens_equal_recompute(kernel, input_mode, conditioning):
    model, tokenizer = _models(input_mode, conditioning)
    cond = {"class": {"labels": torch.arange(40) % 3}, "multiplicity": {"multiplicity": torch.arange(40) % L + 1},
            "none": {}}[conditioning]
    fast, full = (_generate(model, tokenizer, use_cache, **cond) for use_cache in (True, False))
    assert torch.equal(fast.cu_seqlens, full.cu_seqlens)
    assert torch.equal(fast.tokens, full.tokens)
    torch.testing.assert_close(fast.features, full.features, atol=1e-4, rtol=1e-4)
    # a quarter of the first batch stopped: the caches were compacted mid-batch (sampling.py)
    assert int(fast.stopped[:32].sum()) >= 8 and (~fast.stopped).any()


@pytest.mark.parametrize("input_mode", ["continuous", "token"])
def test_fast_path_tokens_equal_block_by_block_steps(kernel, input_mode, monkeypatch):
    """The compiled block step + kernels against the Python block steps with SDPA on the same cache
    machinery (the path of machines without a compiler)."""
    model, tokenizer = _models(input_mode)
    fast = _generate(model, tokenizer, True)
    monkeypatch.setattr(KVCache, "_kernel", staticmethod(lambda: None))
    plain = _generate(model, tokenizer, True)
    assert torch.equal(fast.tokens, plain.tokens) and torch.equal(fast.cu_seqlens, plain.cu_seqlens)
    torch.testing.assert_close(fast.features, plain.features, atol=1e-5, rtol=1e-5)


def test_step_logits_equal_block_by_block(kernel, monkeypatch):
    model, _ = _models("continuous")
    x_BNF = torch.randn(5, 9, 3)

    def run():
        cache = model.new_cache(5, max_len=10)
        with torch.inference_mode():
            out = [model.ntp_logits_step(cache)] + [model.ntp_logits_step(cache, x_BF=x_BNF[:, i]) for i in range(9)]
        return torch.stack(out, 1)

    fast = run()
    monkeypatch.setattr(KVCache, "_kernel", staticmethod(lambda: None))
    torch.testing.assert_close(fast, run(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("V", [8194, 8320, 300, 50, 16])
def test_compiled_sampler_draws_the_torch_samplers_tokens(kernel, V):
    """The compiled softmax + two-level inverse CDF (sample_rows) picks the torch sampler's token
    in every row but where u falls within float32 rounding of a token boundary (its block sums add
    in another order; 1 row in 6,000 here, either token is then a correct draw): masked start/stop, -inf padding past the vocabulary (the cached path's buffer),
    temperature, top-k, flat and peaked rows, a row length that is not a multiple of 16."""
    gen = torch.Generator().manual_seed(V)
    for scale, temperature, top_k, allow_stop in ((1.0, 1.0, None, False), (8.0, 1.0, None, True),
                                                  (40.0, 1.5, None, False), (3.0, 0.7, 5, True)):
        logits = torch.randn(1500, V, generator=gen) * scale
        if V == 8320:
            logits[:, 8194:] = -math.inf
        u = torch.rand(1500, generator=gen)
        args = dict(stop_id=min(V, 8194) - 1, allow_stop=allow_stop, temperature=temperature, top_k=top_k, top_p=None)
        plain = _sample_inplace(logits.clone(), u, **args)
        fast = _sample_inplace(logits.clone(), u, **args, kernel=kernel)
        differ = torch.nonzero(fast != plain).flatten().tolist()
        assert len(differ) <= 2, differ
        for i in differ:  # only where u falls within rounding (float32 sums) of the boundary between them
            masked = logits[i].double() / temperature
            masked[0] = -math.inf
            if not allow_stop:
                masked[args["stop_id"]] = -math.inf
            cdf = torch.cumsum(torch.softmax(masked, 0), 0)
            lo, hi = sorted((int(fast[i]), int(plain[i])))
            assert abs(float(cdf[lo]) - float(u[i])) < 1e-6 and abs(float(cdf[hi - 1]) - float(u[i])) < 1e-6
        assert int(fast.min()) >= 1 and int(fast.max()) < min(V, 8194) - (0 if allow_stop else 1)
    with pytest.raises(RuntimeError, match="every token masked"):
        kernel.sample_rows(torch.full((2, V), -math.inf), torch.rand(2), 128)


@pytest.mark.parametrize("input_mode", ["continuous", "token"])
def test_compiled_sampler_generates_the_torch_samplers_tokens(kernel, input_mode, monkeypatch):
    """Whole generation with the compiled sampler against the torch sampler, the rest unchanged."""
    model, tokenizer = _models(input_mode)
    fast = _generate(model, tokenizer, True)
    monkeypatch.setattr(sampling, "_sampling_kernel", lambda model, device: None)
    plain = _generate(model, tokenizer, True)
    assert torch.equal(fast.tokens, plain.tokens) and torch.equal(fast.cu_seqlens, plain.cu_seqlens)


def test_packed_weights_follow_weight_changes(kernel):
    """Packed weights are kept across generate calls but never outlive a change of the weight: in
    place (an optimizer step) or swapped (`.data =`); the cached path then still equals the recompute."""
    calls = []
    weight = torch.randn(32, 8)
    make = lambda: calls.append(1) or weight.sum().item()  # noqa: E731
    assert derived_from(weight, "x", make) == derived_from(weight, "x", make) and len(calls) == 1
    weight.mul_(2)
    assert derived_from(weight, "x", make) == pytest.approx(weight.sum().item()) and len(calls) == 2
    weight.data = torch.randn(32, 8)
    assert derived_from(weight, "x", make) == pytest.approx(weight.sum().item()) and len(calls) == 3
    with torch.inference_mode():  # no version counter: made afresh on every call
        weight = torch.randn(32, 8)
        derived_from(weight, "x", make), derived_from(weight, "x", make)
    assert len(calls) == 5

    model, tokenizer = _models("token")
    before = _generate(model, tokenizer, True)
    with torch.no_grad():
        model.ntp.head.out.weight.mul_(-1.0)  # the vocabulary projection (padded + packed copies)
        model.backbone.stack.blocks[0].fc1.weight.mul_(3.0)  # a block weight (packed copy)
    after, full = (_generate(model, tokenizer, use_cache) for use_cache in (True, False))
    assert not torch.equal(before.tokens, after.tokens)
    assert torch.equal(after.tokens, full.tokens) and torch.equal(after.cu_seqlens, full.cu_seqlens)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_one_query_kernels_equal_sdpa(kernel, n):
    """scores + softmax over positions + mix on the position-major layout (L, N, D) equal SDPA;
    head dim 16 and 32."""
    for D in (16, 32):
        gen = torch.Generator().manual_seed(n * D)
        k_LND, v_LND = torch.randn(41, 12, D, generator=gen), torch.randn(41, 12, D, generator=gen)
        q_ND = torch.randn(12, 3 * D, generator=gen)[:, D: 2 * D]  # strided rows, as from a qkv block
        scores_nN = kernel.scores(q_ND, k_LND, n, 1 / math.sqrt(D))
        assert scores_nN.shape == (n, 12)
        out = kernel.mix(torch.softmax(scores_nN, 0), v_LND, n)
        ref = F.scaled_dot_product_attention(q_ND[:, None], k_LND[:n].transpose(0, 1), v_LND[:n].transpose(0, 1))
        torch.testing.assert_close(out, ref[:, 0], atol=1e-5, rtol=1e-5)


def test_position_major_cache_views_and_select(kernel):
    """k(layer)/v(layer) stay (B, H, L, D) views and select() keeps jets in order on the CPU layout."""
    B, H, D = 4, 2, 16
    cache = KVCache(1, B, H, D, max_len=6, backend="auto")
    assert cache.position_major and cache.batch_size == B
    q, k, v = (torch.randn(3, B, H, D) for _ in range(3))
    outs = []
    for i in range(3):
        outs.append(cache.attend(0, q[i], k[i], v[i]))
        cache.advance()
    torch.testing.assert_close(cache.k(0)[:, :, :3], k.permute(1, 2, 0, 3))
    ref = F.scaled_dot_product_attention(q[2][:, :, None], k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))[:, :, 0]
    torch.testing.assert_close(outs[2], ref, atol=1e-5, rtol=1e-5)
    cache.select(torch.tensor([3, 1]))
    assert cache.batch_size == 2 and cache.lengths.tolist() == [3, 3]
    torch.testing.assert_close(cache.v(0)[:, :, :3], v.permute(1, 2, 0, 3)[[3, 1]])


def test_kernels_split_over_threads(kernel):
    """Rows split over torch's threads (at::parallel_for, 64 rows a chunk) give the one-thread result."""
    gen = torch.Generator().manual_seed(1)
    k_LND, v_LND, q_ND = torch.randn(30, 200, 16, generator=gen), torch.randn(30, 200, 16, generator=gen), \
        torch.randn(200, 16, generator=gen)
    p_nN = torch.softmax(kernel.scores(q_ND, k_LND, 30, 0.25), 0)  # (torch's softmax may round per split)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            outs.append((kernel.scores(q_ND, k_LND, 30, 0.25), kernel.mix(p_nN, v_LND, 30)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("input_mode", ["continuous", "token"])
def test_sharded_batches_give_the_unsharded_tokens(input_mode, monkeypatch):
    """Jets of a batch generated in groups on parallel threads (sampling.py `shards`) are the jets
    of one group: random numbers drawn before the split, jets independent. Under inference mode
    too (per-thread state the workers must take from the caller)."""
    import jetfm.sampling as sampling

    monkeypatch.setattr(sampling, "MIN_JETS_PER_SHARD", 8)  # up to 4 groups of the 32-jet batches
    model, tokenizer = _models(input_mode)
    one = _generate(model, tokenizer, True, shards=1)
    threads = torch.get_num_threads()
    for shards in (2, 3):
        with torch.inference_mode():
            split = _generate(model, tokenizer, True, shards=shards)
        assert torch.get_num_threads() == threads  # restored after the workers
        assert torch.equal(split.tokens, one.tokens) and torch.equal(split.cu_seqlens, one.cu_seqlens)
        assert torch.equal(split.stopped, one.stopped)
        torch.testing.assert_close(split.features, one.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 32, 37])
def test_compiled_linear_equals_addmm(kernel, rows):
    """The generation step's linear layer (packed weight, register tiles of 12 rows, panels of 32
    columns and a last one of 16) equals torch's addmm / mm, into strided output rows too."""
    gen = torch.Generator().manual_seed(rows)
    for n_out, n_in in ((48, 32), (384, 128), (128, 512), (8256, 128)):
        x = torch.randn(rows, n_in, generator=gen)
        weight, bias = torch.randn(n_out, n_in, generator=gen) * 0.1, torch.randn(n_out, generator=gen)
        packed = kernel.pack_weight(weight)
        out = torch.full((rows, n_out + 16), float("nan"))[:, :n_out]  # rows strided by n_out + 16
        kernel.linear_into(x, packed, bias, out)
        torch.testing.assert_close(out, torch.addmm(bias, x, weight.t()), atol=1e-5, rtol=1e-5)
        kernel.linear_into(x, packed, torch.empty(0), out)
        torch.testing.assert_close(out, x @ weight.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.pack_weight(torch.randn(20, 8))


def test_block_step_independent_of_threads(kernel):
    """The compiled block step (LayerNorm, fused linear epilogues, fused one-query attention whose
    row blocks follow the thread count) gives the same bits on 1 and 2 threads, and matches the
    Python block steps on the same cache."""
    model, _ = _models("token")
    stack = model.backbone.stack
    gen = torch.Generator().manual_seed(3)
    x_BND = torch.randn(19, 6, 32, generator=gen)  # 19 jets x 2 heads: rows not a multiple of 16

    def run(threads: int, compiled: bool = True):
        torch.set_num_threads(threads)
        cache = model.new_cache(19, max_len=6)
        outs = []
        with torch.inference_mode():
            for i in range(6):
                if compiled:
                    outs.append(stack.step(x_BND[:, i], cache))
                else:
                    y = x_BND[:, i]
                    for j, block in enumerate(stack.blocks):
                        y = block.step(y, cache, stack.layer_offset + j)
                    outs.append(stack.norm(y))
                cache.advance()
        return torch.stack(outs, 1)

    threads = torch.get_num_threads()
    try:
        one, two, plain = run(1), run(2), run(1, compiled=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, plain, atol=1e-5, rtol=1e-5)
