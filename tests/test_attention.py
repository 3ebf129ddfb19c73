"""Attention kernels against a plain per-jet softmax(QK^T)V reference: causal and bidirectional,
packed and padded, KV-cache steps; flash-attn parity on a GPU (`gpu` marker)."""

import math

import pytest
import torch

from jetfm.models.attention import (
    AttentionBackend,
    KVCache,
    Packing,
    flash_available,
    padded_sdpa,
    reference_attention,
    varlen_attention,
)

H, D = 2, 8



def packed_qkv(lengths, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[5, 1, 7, 3], [4, 4, 4], [1], [3, 0, 6], [9, 2, 2, 8, 1, 5, 3]])
@pytest.mark.parametrize("buckets", [1, 3])
def test_sdpa_matches_reference(causal, lengths, buckets):
    """Packed input, padded kernel (one bucket, or jets sorted by length into several)."""
    q, k, v, cu = packed_qkv(lengths)
    packing = Packing(cu, max(lengths), q.shape[0], buckets=buckets)
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal, packing=packing)
    ref = reference_attention(q, k, v, cu, causal=causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_buckets_group_jets_by_length():
    lengths = [9, 2, 2, 8, 1, 5, 3, 7]
    _, _, _, cu = packed_qkv(lengths)
    packing = Packing(cu, 9, sum(lengths), buckets=3)
    order, inverse, parts = packing.bucketing
    assert [sub.cu_seqlens.diff().tolist() for sub in parts] == [[1, 2, 2], [3, 5, 7], [8, 9]]
    assert [sub.max_seqlen for sub in parts] == [2, 7, 9]
    assert torch.equal(order[inverse], torch.arange(sum(lengths)))
    assert Packing(cu, 9, sum(lengths)).buckets == 1  # auto: fewer than 16 jets -> one bucket


@pytest.mark.parametrize("causal", [True, False])
def test_length_sorted_packing_needs_no_reordering(causal):
    """A stack may sort its jets by length once (length_sorted); its buckets then attend without
    reordering tokens, and mapping back with `inverse` gives the reference on the original order."""
    lengths = [9, 2, 2, 8, 1, 5, 3, 7]
    q, k, v, cu = packed_qkv(lengths)
    sorted_packing, order, inverse = Packing(cu, 9, sum(lengths), buckets=3).length_sorted()
    assert sorted_packing.lengths.tolist() == [1, 2, 2, 3, 5, 7, 8, 9] and sorted_packing.bucketing[0] is None
    assert torch.equal(q[order][inverse], q)
    out = varlen_attention(q[order], k[order], v[order], sorted_packing.cu_seqlens, 9, causal=causal, packing=sorted_packing)
    torch.testing.assert_close(out[inverse], reference_attention(q, k, v, cu, causal=causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_sdpa_with_key_mask_matches_reference(causal):
    """The padded entry point (for code that keeps a (B, H, N, D) layout): key mask + causal flag."""
    lengths = [5, 2, 4]
    q, k, v, cu = packed_qkv(lengths, dtype=torch.bfloat16)
    packing = Packing(cu, 5, q.shape[0])
    q_B, k_B, v_B = (packing.pad(t).transpose(1, 2) for t in (q, k, v))
    out = padded_sdpa(q_B, k_B, v_B, causal=causal, attn_mask=packing.key_mask)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q, k, v, cu, causal=causal)
    torch.testing.assert_close(packing.unpad(out.transpose(1, 2)).float(), ref.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(TypeError):
        padded_sdpa(q_B, k_B, v_B, causal=None)


def test_causal_flag_is_honoured_both_ways():
    """The bug to never have: a fallback silently ignoring causal=False (or True)."""
    q, k, v, cu = packed_qkv([6, 4])
    causal = varlen_attention(q, k, v, cu, 6, causal=True)
    bidir = varlen_attention(q, k, v, cu, 6, causal=False)
    # only the last token of each jet sees the same keys under both
    last = torch.tensor([5, 9])
    torch.testing.assert_close(causal[last], bidir[last])
    assert not torch.allclose(causal[:5], bidir[:5])
    # first token under causal attends to itself only
    torch.testing.assert_close(causal[0], v[0])


def test_causal_is_required():
    q, k, v, cu = packed_qkv([3])
    with pytest.raises(TypeError):
        varlen_attention(q, k, v, cu, 3)  # no default for causal
    with pytest.raises(TypeError):
        varlen_attention(q, k, v, cu, 3, causal=None)


def test_max_seqlen_upper_bound_and_no_cross_talk():
    """Padding to a larger N changes nothing; perturbing one jet leaves the others untouched."""
    q, k, v, cu = packed_qkv([4, 6, 2])
    for causal in (True, False):
        a = varlen_attention(q, k, v, cu, 6, causal=causal)
        b = varlen_attention(q, k, v, cu, 11, causal=causal)
        torch.testing.assert_close(a, b)
        k2, v2 = k.clone(), v.clone()
        k2[4:10] += 1.0
        v2[4:10] -= 2.0
        c = varlen_attention(q, k2, v2, cu, 6, causal=causal)
        torch.testing.assert_close(a[:4], c[:4])
        torch.testing.assert_close(a[10:], c[10:])
        assert not torch.allclose(a[4:10], c[4:10])


@pytest.mark.parametrize("buckets", [1, 2])
def test_padded_layout_roundtrip_and_no_nan_gradients(buckets):
    """Empty jets (fully padded rows) give no NaN in outputs or gradients; pad/unpad invert."""
    q, k, v, cu = packed_qkv([3, 0, 5, 0])
    packing = Packing(cu, 5, q.shape[0], buckets=buckets)
    padded = packing.pad(q)
    assert padded.shape == (4, 5, H, D)
    assert padded[1].abs().sum() == 0 and padded[0, 3:].abs().sum() == 0
    torch.testing.assert_close(packing.unpad(padded), q)
    for causal in (True, False):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = varlen_attention(qg, kg, vg, cu, 5, causal=causal, packing=packing)
        out.square().sum().backward()
        for t in (out, qg.grad, kg.grad, vg.grad):
            assert torch.isfinite(t).all()
        # gradients against the reference
        qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
        reference_attention(qr, kr, vr, cu, causal=causal).square().sum().backward()
        for a, b in ((qg, qr), (kg, kr), (vg, vr)):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_close_to_reference():
    q, k, v, cu = packed_qkv([5, 9, 2], dtype=torch.bfloat16)
    for causal in (True, False):
        out = varlen_attention(q, k, v, cu, 9, causal=causal)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference_attention(q, k, v, cu, causal=causal).float(),
                                   atol=2e-2, rtol=2e-2)


def test_kv_cache_steps_equal_causal_pass():
    lengths = [6, 6, 6]
    q, k, v, cu = packed_qkv(lengths)
    full = varlen_attention(q, k, v, cu, 6, causal=True).view(3, 6, H, D)
    qB, kB, vB = (t.view(3, 6, H, D) for t in (q, k, v))
    cache = KVCache(2, 3, H, D, max_len=8)
    for i in range(6):
        out0 = cache.attend(0, qB[:, i], kB[:, i], vB[:, i])
        out1 = cache.attend(1, qB[:, i], kB[:, i] * 2, vB[:, i])  # second layer: its own k/v
        cache.advance()
        torch.testing.assert_close(out0, full[:, i], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out1, out0) or i == 0
    assert cache.lengths.tolist() == [6, 6, 6] and cache.seen == 6
    torch.testing.assert_close(cache.k(0)[:, :, :6], kB.transpose(1, 2))
    cache.advance(), cache.advance()
    with pytest.raises(RuntimeError, match="full"):
        cache.attend(0, qB[:, 0], kB[:, 0], vB[:, 0])


def test_flash_unsupported_raises_on_cpu():
    if flash_available():
        pytest.skip("flash-attn is usable here")
    with pytest.raises(ValueError, match="flash"):
        AttentionBackend.FLASH.assert_supported()
    AttentionBackend.SDPA.assert_supported("cpu", torch.float32)
    q, k, v, cu = packed_qkv([3])
    with pytest.raises(ValueError, match="flash"):
        varlen_attention(q, k, v, cu, 3, causal=False, backend="flash")


# --------------------------------------------------------------------------- GPU parity
def test_flash_head_dim_checked_when_built():
    """flash-attn's kernels take head dims divisible by 8 and <= 256: refused at build, on any machine."""
    for head_dim in (12, 264):
        with pytest.raises(ValueError, match="head dim"):
            AttentionBackend.FLASH.assert_supported(head_dim=head_dim)
    AttentionBackend.SDPA.assert_supported(head_dim=12)  # SDPA takes any head dim


needs_flash = pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")


@pytest.mark.gpu
@needs_flash
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_varlen_matches_reference(causal, dtype):
    lengths = [37, 1, 128, 64, 5]
    q, k, v, cu = packed_qkv(lengths, dtype=dtype, device="cuda")
    ref = reference_attention(q, k, v, cu, causal=causal)
    flash = varlen_attention(q, k, v, cu, max(lengths), causal=causal, backend="flash")
    sdpa = varlen_attention(q, k, v, cu, max(lengths), causal=causal, backend="sdpa")
    torch.testing.assert_close(flash.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_flash
def test_flash_rejects_fp32():
    q, k, v, cu = packed_qkv([4], device="cuda")
    with pytest.raises(ValueError, match="fp16/bf16"):
        varlen_attention(q, k, v, cu, 4, causal=True, backend="flash")


@pytest.mark.gpu
@needs_flash
def test_flash_kv_cache_matches_sdpa_cache():
    B, n = 4, 9
    q, k, v, cu = packed_qkv([n] * B, dtype=torch.bfloat16, device="cuda")
    qB, kB, vB = (t.view(B, n, H, D) for t in (q, k, v))
    caches = {b: KVCache(1, B, H, D, max_len=16, device="cuda", dtype=torch.bfloat16, backend=b) for b in ("sdpa", "flash")}
    full = reference_attention(q, k, v, cu, causal=True).view(B, n, H, D)
    for i in range(n):
        outs = {}
        for name, cache in caches.items():
            outs[name] = cache.attend(0, qB[:, i], kB[:, i], vB[:, i], softmax_scale=1 / math.sqrt(D))
            cache.advance()
        torch.testing.assert_close(outs["flash"].float(), full[:, i].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(outs["flash"].float(), outs["sdpa"].float(), atol=2e-2, rtol=2e-2)
