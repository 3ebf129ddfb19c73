"""Fast paths equal the plain paths: the fused vocabulary cross-entropy and the random-bits dropout."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from jetfm.data.batch import JetBatch
from jetfm.models.backbone import dropout
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.objectives import linear_cross_entropy, mask_particles
from jetfm.models.pretrain import build_pretrain_model

CODEBOOK = 61
MANIFEST = SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=["QCD"])


def plain_sums(h_MD, w_VD, t_M):
    logits_MV = F.linear(h_MD, w_VD)
    loss_sum = F.cross_entropy(logits_MV.float(), t_M, reduction="sum")
    target_M = logits_MV.float().gather(1, t_M[:, None]).squeeze(1)
    return loss_sum, (target_M >= logits_MV.float().amax(-1)).sum()


@pytest.mark.parametrize("rows", [1, 7, 64, 65])  # below, at and across chunk boundaries (chunk 8)
def test_linear_cross_entropy_equals_unfused_fp32(rows):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = torch.randn(CODEBOOK + 2, 16, generator=g, requires_grad=True)
    t = torch.randint(0, CODEBOOK + 2, (rows,), generator=g)
    t[0] = int(F.linear(h, w)[0].argmax())  # at least one hit
    loss, correct = linear_cross_entropy(h, w, t, chunk_rows=8)
    (1.7 * loss).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_loss, ref_correct = plain_sums(h, w, t)
    (1.7 * ref_loss).backward()
    assert loss.dtype == torch.float32 and correct.dtype == torch.int64
    assert int(correct) == int(ref_correct) >= 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_bf16_autocast_matches_nn_linear():
    """Under autocast the product runs in bf16 like nn.Linear, the softmax and sums in fp32, and
    the gradients come back in the inputs' dtypes (fp32 master weights)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(CODEBOOK + 2, 32, generator=g)).requires_grad_()
    t = torch.randint(0, CODEBOOK + 2, (300,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, correct = linear_cross_entropy(h, w, t, chunk_rows=128)
        ref_loss, ref_correct = plain_sums(h, w, t)
    loss.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_loss.backward()
    assert loss.dtype == torch.float32 and grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-3)
    assert abs(int(correct) - int(ref_correct)) <= 1  # a bf16 tie may round either way
    torch.testing.assert_close(grads[0], h.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], w.grad, rtol=2e-2, atol=2e-2)


def test_linear_cross_entropy_without_rows_keeps_the_graph():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    loss, correct = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(correct) == 0 and torch.equal(w.grad, torch.zeros_like(w))


def _model(objective):
    torch.manual_seed(0)
    cfg = SimpleNamespace(
        model=ModelConfig(dim=16, num_heads=2, num_blocks=2, head_blocks=1, dropout=0.0, max_particles=16),
        objective=ObjectiveConfig(name=objective),
        data=SimpleNamespace(features={"part_pt": {}, "part_etarel": {}, "part_phirel": {}}, inputs="raw"),
    )
    return build_pretrain_model(cfg, MANIFEST)


def _batch(seed=0, jets=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (jets,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    T = int(lengths.sum())
    return JetBatch(x=torch.randn(T, 3, generator=g), cu_seqlens=cu, max_seqlen=int(lengths.max()),
                    labels=torch.zeros(jets, dtype=torch.long), jet=torch.zeros(jets, 6),
                    tokens=torch.randint(1, CODEBOOK + 1, (T,), generator=g))


@pytest.mark.parametrize("objective", ["ntp", "mpm"])
def test_model_loss_and_gradients_equal_the_logits_path(objective):
    """The training loss (fused) equals cross-entropy over the model's own logits, gradients too."""
    model, batch = _model(objective), _batch()
    out = model(batch, generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    if objective == "ntp":
        logits, targets = model.ntp_logits(batch)
    else:
        packing = model.packing(batch)
        masked = mask_particles(packing, model.objective_cfg.mask_fraction, torch.Generator().manual_seed(3))
        logits, targets, _ = model.mpm_logits(batch, masked)
    ref = F.cross_entropy(logits.float(), targets)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[f"{objective}_acc"].value, (logits.argmax(-1) == targets).float().mean())
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fused.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(400, 500, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(1 - float(kept.float().mean()) - 0.1) < 0.003  # 200k draws: 0.1 +- 7 sigma
    scale = 65536 / (65536 - round(0.1 * 65536))
    torch.testing.assert_close(y[kept], x.detach()[kept] * scale)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g * scale, 0.0))
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x


def test_dropout_is_reproducible_with_the_seed_and_keeps_bf16():
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    torch.manual_seed(5)
    a = dropout(x, 0.25, True)
    torch.manual_seed(5)
    b = dropout(x, 0.25, True)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.25, True))
