"""jetfm's C attention kernel for packed jets on CPU (models/cpu_kernels.py) against the float64
per-jet reference: outputs and gradients of q, k, v, causal and bidirectional, fp32 and bf16,
jets of 0 and 1 particles; `auto` dispatch; the pre-training model's loss and gradients equal
to the SDPA path; bad cu_seqlens refused; no compiler -> a warning and SDPA."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jetfm.models import cpu_kernels
from jetfm.models.objectives import linear_cross_entropy
from jetfm.models.attention import AttentionBackend, reference_attention, varlen_attention_qkv

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the kernel cannot be built")


def packed(lengths, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, H, D, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return qkv, cu


def reference(qkv, cu, causal, grad_out):
    x = qkv.clone().requires_grad_()
    out = reference_attention(x[:, 0], x[:, 1], x[:, 2], cu, causal=causal)
    (out * grad_out).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,D", [(8, 16), (2, 8), (4, 32), (2, 48), (2, 64), (3, 12)])  # the vector path's dims and generic ones
def test_fp32_matches_reference_values_and_gradients(causal, H, D):
    lengths = [5, 1, 17, 0, 40, 3, 99, 2]
    qkv, cu = packed(lengths, H, D)
    grad_out = torch.randn(qkv.shape[0], H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grad = reference(qkv, cu, causal, grad_out)
    x = qkv.float().requires_grad_()
    out = cpu_kernels.varlen_attention_cpu(x, cu, causal=causal)
    (out * grad_out.float()).sum().backward()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,D", [(8, 16), (2, 64), (2, 24)])
def test_bf16_in_bf16_out_within_bf16_rounding(causal, H, D):
    lengths = [7, 30, 1, 64]
    qkv, cu = packed(lengths, H, D)
    grad_out = torch.randn(qkv.shape[0], H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grad = reference(qkv.bfloat16().double(), cu, causal, grad_out.bfloat16().double())
    x = qkv.bfloat16().requires_grad_()
    out = cpu_kernels.varlen_attention_cpu(x, cu, causal=causal)
    (out * grad_out.bfloat16()).sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    # fp32 arithmetic inside; only the stored results are rounded to bf16 (8 bits of mantissa)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=2e-2, rtol=2e-2)


def test_thread_count_does_not_change_results():
    qkv, cu = packed([9, 33, 4, 51, 12], 8, 16)
    x = qkv.float()
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = x.clone().requires_grad_()
            out = cpu_kernels.varlen_attention_cpu(y, cu, causal=True)
            out.square().sum().backward()
            outs.append((out.detach(), y.grad))
    finally:
        torch.set_num_threads(threads)
    for out, grad in outs[1:]:  # each (jet, head) is one task: bitwise the same on any thread count
        assert torch.equal(out, outs[0][0]) and torch.equal(grad, outs[0][1])


def test_auto_backend_runs_the_kernel_on_cpu_and_sdpa_stays_available():
    qkv, cu = packed([6, 2, 11], 2, 8)
    x = qkv.float()
    ref = reference_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, causal=True)
    auto = varlen_attention_qkv(x, cu, 11, causal=True, backend=AttentionBackend.AUTO)
    sdpa = varlen_attention_qkv(x, cu, 11, causal=True, backend=AttentionBackend.SDPA)
    kernel = cpu_kernels.varlen_attention_cpu(x, cu, causal=True)
    assert torch.equal(auto, kernel)
    torch.testing.assert_close(sdpa.double(), ref, atol=1e-5, rtol=1e-5)
    assert AttentionBackend.AUTO.resolve("cpu", torch.float32) is AttentionBackend.SDPA  # SDPA family (kernel inside)


def test_bad_cu_seqlens_are_refused():
    qkv, cu = packed([4, 4], 2, 8)
    with pytest.raises(ValueError, match="ends at"):
        cpu_kernels.varlen_attention_cpu(qkv.float(), torch.tensor([0, 4, 7], dtype=torch.int32), causal=True)
    with pytest.raises(ValueError, match="never decrease"):
        cpu_kernels.varlen_attention_cpu(qkv.float(), torch.tensor([0, 5, 3, 8], dtype=torch.int32), causal=False)
    with pytest.raises(TypeError, match="causal"):
        cpu_kernels.varlen_attention_cpu(qkv.float(), cu, causal=1)
    wide = torch.randn(8, 3, 1, 300)
    assert not cpu_kernels.supports(wide)  # auto then runs SDPA
    with pytest.raises(ValueError, match="head dim"):
        cpu_kernels.varlen_attention_cpu(wide, cu, causal=False)


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16)])
def test_dropout_add_keeps_the_right_fraction_scaled_and_backward_uses_the_same_mask(x_dtype, y_dtype):
    torch.manual_seed(0)
    x = torch.randn(3000, 128).to(x_dtype).requires_grad_()
    y = (torch.rand(3000, 128) + 1.0).to(y_dtype).requires_grad_()  # never 0: a zero branch means dropped
    out = cpu_kernels.dropout_add(x, y, 0.1)
    assert out.dtype == x_dtype
    branch = (out.float() - x.float()).detach()
    kept = branch.abs() > 0.5
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.003  # 384k draws: 0.1 +- 5 sigma
    scale = 65536 / (65536 - round(0.1 * 65536))
    expected = (x.detach().float() + kept * y.detach().float() * scale).to(x_dtype)
    tol = dict(atol=1e-6, rtol=1e-6) if x_dtype == torch.float32 else dict(atol=0.05, rtol=0.01)  # bf16 sum rounding
    torch.testing.assert_close(out.detach().float(), expected.float(), **tol)
    grad = torch.randn(out.shape).to(x_dtype)
    out.backward(grad)
    assert torch.equal(x.grad, grad)
    assert torch.equal(y.grad != 0, kept & (grad != 0))  # the mask is recomputed from the seed, not stored
    torch.testing.assert_close(y.grad.float()[kept], (grad.float() * scale).to(y_dtype).float()[kept])


def test_dropout_add_seeds_come_from_torch_rng():
    x, y = torch.randn(50, 64), torch.randn(50, 64)
    torch.manual_seed(7)
    a = cpu_kernels.dropout_add(x, y, 0.3)
    b = cpu_kernels.dropout_add(x, y, 0.3)
    torch.manual_seed(7)
    assert torch.equal(a, cpu_kernels.dropout_add(x, y, 0.3))  # manual_seed reproduces
    assert not torch.equal(a, b)  # and consecutive calls differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_equals_the_torch_chunk_path(dtype):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(700, 32, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(61, 32, generator=g, dtype=torch.float64)
    t = torch.randint(0, 61, (700,), generator=g)
    res = {}
    for kernel in (False, True):
        hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        loss, correct = linear_cross_entropy(hh, ww, t, kernel=kernel, chunk_rows=256)
        (0.5 * loss).backward()
        res[kernel] = (loss.detach(), correct, hh.grad.float(), ww.grad.float())
    torch.testing.assert_close(res[True][0], res[False][0], atol=1e-3, rtol=1e-6)
    assert res[True][1] == res[False][1]
    for got, expected in zip(res[True][2:], res[False][2:]):
        torch.testing.assert_close(got, expected, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-4)
    with torch.no_grad():  # validation: loss without the gradient products
        loss, _ = linear_cross_entropy(h.to(dtype), w.to(dtype), t, kernel=True)
    torch.testing.assert_close(loss, res[False][0], atol=1e-3, rtol=1e-6)
    with pytest.raises(ValueError, match="targets must lie"):
        cpu_kernels.softmax_cross_entropy_(torch.randn(3, 5), torch.tensor([0, 5, 1]), need_grad=False)


def _pretrain_model(attention):
    from types import SimpleNamespace

    from jetfm.models.config import ModelConfig, ObjectiveConfig
    from jetfm.models.pretrain import build_pretrain_model

    torch.manual_seed(0)
    cfg = SimpleNamespace(model=ModelConfig(dim=32, num_heads=2, num_blocks=2, head_blocks=1, dropout=0.0,
                                            max_particles=64, attention=attention),
                          objective=ObjectiveConfig(name="joint"),
                          data=SimpleNamespace(features={"a": {}, "b": {}, "c": {}}, inputs="raw"))
    return build_pretrain_model(cfg, SimpleNamespace(tokens={"codebook_size": 30}, classes=[])).train()


@pytest.mark.parametrize("bf16", [False, True])
def test_pretrain_loss_and_gradients_equal_the_sdpa_path(bf16):
    """The model's mathematics do not change with the kernels: joint loss and every parameter's
    gradient agree with attention=sdpa (uneven jets, fp32 and bf16 autocast; dropout 0, since the
    two paths draw different random numbers)."""
    from jetfm.data.batch import JetBatch

    lengths = [3, 17, 1, 40, 8, 25, 2, 12, 30, 5, 9, 21, 14, 6, 33, 11, 19]  # >= 16 jets: SDPA uses buckets
    g = torch.Generator().manual_seed(3)
    T = sum(lengths)
    batch = JetBatch(x=torch.randn(T, 3, generator=g),
                     cu_seqlens=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32),
                     max_seqlen=max(lengths), labels=torch.zeros(len(lengths), dtype=torch.long),
                     jet=torch.zeros(len(lengths), 6), tokens=torch.randint(1, 31, (T,), generator=g))
    results = {}
    for attention in ("sdpa", "auto"):
        model = _pretrain_model(attention)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch, generator=torch.Generator().manual_seed(4))
        out["loss"].backward()
        results[attention] = (out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()})
    tol = dict(atol=3e-2, rtol=3e-2) if bf16 else dict(atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(results["auto"][0], results["sdpa"][0], **tol)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["auto"][1][name], grad, **tol, msg=lambda m: f"{name}: {m}")


def test_dropout_on_trains_with_the_kernels():
    """Dropout on: the fused path trains (finite loss, gradients everywhere) and its loss lies
    within noise of the plain path's, averaged over draws."""
    from jetfm.data.batch import JetBatch

    lengths = [12, 30, 7, 21, 16, 9, 25, 4]
    g = torch.Generator().manual_seed(9)
    T = sum(lengths)
    batch = JetBatch(x=torch.randn(T, 3, generator=g),
                     cu_seqlens=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32),
                     max_seqlen=max(lengths), labels=torch.zeros(len(lengths), dtype=torch.long),
                     jet=torch.zeros(len(lengths), 6), tokens=torch.randint(1, 31, (T,), generator=g))
    means = {}
    for attention in ("sdpa", "auto"):
        model = _pretrain_model(attention)
        for block in model.modules():
            if hasattr(block, "dropout") and isinstance(block.dropout, float):
                block.dropout = 0.3
        losses = []
        for i in range(20):
            out = model(batch, generator=torch.Generator().manual_seed(4))
            losses.append(float(out["loss"]))
        out["loss"].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        means[attention] = sum(losses) / len(losses)
        assert len(set(losses)) > 1  # dropout draws differ from call to call
    assert abs(means["auto"] - means["sdpa"]) < 0.05 * means["sdpa"]


def test_without_a_compiler_it_warns_once_and_falls_back_to_sdpa(tmp_path):
    script = textwrap.dedent("""
        import torch
        from jetfm.models import cpu_kernels
        from jetfm.models.attention import AttentionBackend, varlen_attention_qkv
        assert not cpu_kernels.available() and not cpu_kernels.available()
        qkv = torch.randn(7, 3, 2, 8)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        out = varlen_attention_qkv(qkv, cu, 4, causal=True, backend=AttentionBackend.AUTO)
        assert out.shape == (7, 2, 8)
        print("fell back")
    """)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), JETFM_KERNEL_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fell back" in run.stdout
    assert run.stderr.count("no C compiler") == 1 and "no-such-cc" in run.stderr


def test_build_is_cached_by_source_compiler_and_cpu(tmp_path):
    """A fresh cache directory builds once; a second process loads the same file without compiling."""
    script = "from jetfm.models import cpu_kernels; assert cpu_kernels.available(); print(cpu_kernels._build('cc'))"
    env = dict(os.environ, JETFM_KERNEL_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    built = list(tmp_path.glob("jetfm_cpu_kernels-*.so"))
    assert len(built) == 1 and first.stdout.strip() == str(built[0])
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and built[0].stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [built[0].name]  # no temp files left behind


def test_every_kernel_source_ships_with_the_package():
    """The kernels are compiled from their sources on the user's machine, so an installed wheel
    must carry every file under jetfm/models/kernels (the generation step's C++ included)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(cpu_kernels.__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["jetfm.models"]
    sources = sorted(p.relative_to(cpu_kernels.KERNELS.parent).as_posix() for p in cpu_kernels.KERNELS.iterdir())
    missing = [s for s in sources if not any(fnmatch.fnmatch(s, g) for g in globs)]
    assert not missing, f"not in pyproject's package-data for jetfm.models: {missing}"
    used = {p.name for p in (*cpu_kernels.SOURCES, *cpu_kernels.HEADERS, cpu_kernels.DECODE_SOURCE)}
    assert used == {Path(s).name for s in sources}
