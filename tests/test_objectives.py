"""NTP / MPM / joint objectives: targets, causality, masking, loss placement, learnability."""

import math
from types import SimpleNamespace

import pytest
import torch

from jetfm.data.batch import JetBatch
from jetfm.models.attention import Packing
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.pretrain import build_pretrain_model
from jetfm.models.objectives import cross_entropy_and_accuracy, mask_particles, mask_ranks, masked_count

F_IN, CODEBOOK = 3, 30
VOCAB = CODEBOOK + 2
MANIFEST = SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=["QCD", "Tbqq"])



def make_model(objective="joint", seed=0, **model_kw):
    torch.manual_seed(seed)
    base = dict(dim=16, num_heads=2, num_blocks=2, head_blocks=1, dropout=0.0, max_particles=16)
    cfg = SimpleNamespace(
        model=ModelConfig(**{**base, **model_kw}),
        objective=ObjectiveConfig(name=objective),
        data=SimpleNamespace(features={"part_pt": {}, "part_etarel": {}, "part_phirel": {}}, inputs="raw"),
    )
    return build_pretrain_model(cfg, MANIFEST)


def learnable_batch(num_jets, seed, period=8, stride=1) -> JetBatch:
    """Jets whose token sequence runs (s, s + stride, s + 2 stride, ...) mod `period`, with features
    encoding the token (angle on a circle) and the pT order: with stride 1 the next token follows
    from the current particle; with stride 0 a masked token equals every other one of its jet."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (num_jets,), generator=g)
    s_B = torch.randint(0, period, (num_jets,), generator=g)
    jet_T = torch.repeat_interleave(torch.arange(num_jets), lengths)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    pos_T = torch.arange(int(lengths.sum())) - cu[jet_T]
    code_T = (s_B[jet_T] + stride * pos_T) % period
    angle = 2 * math.pi * code_T / period
    x = torch.stack([-0.3 * pos_T.float(), torch.cos(angle), torch.sin(angle)], 1)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return JetBatch(x=x, cu_seqlens=cu.int(), max_seqlen=int(lengths.max()), labels=torch.zeros(num_jets, dtype=torch.long),
                    jet=torch.zeros(num_jets, 6), tokens=code_T + 1)


# --------------------------------------------------------------------------- NTP
def test_ntp_targets_layout():
    model = make_model("ntp")
    batch = learnable_batch(3, seed=1)
    logits, targets = model.ntp_logits(batch)
    T, B = batch.num_particles, batch.num_jets
    assert logits.shape == (T + B, VOCAB)
    cu = batch.cu_seqlens.tolist()
    for j in range(B):
        seq = targets[cu[j] + j: cu[j + 1] + j + 1].tolist()
        assert seq == batch.tokens[cu[j]:cu[j + 1]].tolist() + [VOCAB - 1]  # t1..tn, stop


@pytest.mark.parametrize("input_mode", ["continuous", "token"])
def test_ntp_never_sees_the_future(input_mode):
    """Logits predicting particle i+1 depend on particles <= i only (perturb particle j)."""
    model = make_model("ntp", input_mode=input_mode).eval()
    batch = learnable_batch(3, seed=2)
    cu = batch.cu_seqlens.tolist()
    j_jet, j = 1, 2  # particle 2 (0-based) of jet 1
    row_of = lambda i: cu[j_jet] + j_jet + i  # NTP row whose input is position i (0 = start)  # noqa: E731
    with torch.no_grad():
        base, _ = model.ntp_logits(batch)
        batch.x[cu[j_jet] + j] += 2.0
        batch.tokens[cu[j_jet] + j] = batch.tokens[cu[j_jet] + j] % CODEBOOK + 1
        out, _ = model.ntp_logits(batch)
    # rows start..p_j predict particles 1..j+1 (0-based 0..j): they see particles < j only
    torch.testing.assert_close(out[row_of(0): row_of(j) + 1], base[row_of(0): row_of(j) + 1])
    assert not torch.allclose(out[row_of(j + 1)], base[row_of(j + 1)])  # input p_j itself
    other = torch.ones(out.shape[0], dtype=torch.bool)
    other[cu[j_jet] + j_jet: cu[j_jet + 1] + j_jet + 1] = False
    torch.testing.assert_close(out[other], base[other])  # other jets untouched


# --------------------------------------------------------------------------- masking
def test_mask_counts_and_reproducibility():
    lengths = [1, 2, 3, 5, 10, 50, 128]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packing = Packing(cu, 128, sum(lengths))
    masked = mask_particles(packing, 0.4, torch.Generator().manual_seed(3))
    counts = [int(masked[a:b].sum()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert counts == [0, 1, 1, 2, 4, 20, 51] == masked_count(torch.tensor(lengths), 0.4).tolist()
    again = mask_particles(packing, 0.4, torch.Generator().manual_seed(3))
    other = mask_particles(packing, 0.4, torch.Generator().manual_seed(4))
    assert torch.equal(masked, again) and not torch.equal(masked, other)


def test_mask_is_uniform_over_positions():
    cu = torch.tensor([0, 10], dtype=torch.int32)
    packing = Packing(cu, 10, 10)
    g = torch.Generator().manual_seed(0)
    freq = torch.stack([mask_particles(packing, 0.4, g) for _ in range(2000)]).float().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.4), atol=0.05)


def test_mask_ranks_follow_pt_order():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    masked = torch.tensor([0, 1, 0, 1, 1, 1, 0, 0, 1], dtype=torch.bool)
    ranks = mask_ranks(Packing(cu, 5, 9), masked)
    assert ranks[masked].tolist() == [0, 1, 2, 0, 1]


# --------------------------------------------------------------------------- MPM
@pytest.mark.parametrize("input_mode", ["continuous", "token"])
def test_masked_particles_are_removed_from_attention(input_mode):
    model = make_model("mpm", input_mode=input_mode).eval()
    batch = learnable_batch(4, seed=5)
    masked = mask_particles(Packing(batch.cu_seqlens, batch.max_seqlen, batch.num_particles), 0.4,
                            torch.Generator().manual_seed(0))
    with torch.no_grad():
        base, targets, _ = model.mpm_logits(batch, masked)
        assert base.shape == (int(masked.sum()), VOCAB)  # logits at masked particles only
        assert torch.equal(targets, batch.tokens[masked])
        # masked particles' inputs change nothing at all
        x0, t0 = batch.x.clone(), batch.tokens.clone()
        batch.x[masked] += 5.0
        batch.tokens[masked] = batch.tokens[masked] % CODEBOOK + 1
        same, _, _ = model.mpm_logits(batch, masked)
        torch.testing.assert_close(same, base)
        # an unmasked particle's input does change them
        batch.x, batch.tokens = x0.clone(), t0.clone()
        first_unmasked = int(torch.nonzero(~masked)[0])
        batch.x[first_unmasked] += 5.0
        batch.tokens[first_unmasked] = batch.tokens[first_unmasked] % CODEBOOK + 1
        changed, _, _ = model.mpm_logits(batch, masked)
        assert not torch.allclose(changed, base)


def test_mpm_loss_only_on_masked_particles():
    model = make_model("mpm").eval()  # continuous input: tokens are targets only
    batch = learnable_batch(4, seed=6)
    with torch.no_grad():
        base = model(batch, generator=torch.Generator().manual_seed(1))
        masked = model.mpm_logits(batch, generator=torch.Generator().manual_seed(1))[2]
        batch.tokens[~masked] = batch.tokens[~masked] % CODEBOOK + 1
        same = model(batch, generator=torch.Generator().manual_seed(1))
        batch.tokens[masked] = batch.tokens[masked] % CODEBOOK + 1
        changed = model(batch, generator=torch.Generator().manual_seed(1))
    assert set(base) == {"loss", "mpm_loss", "mpm_acc"}
    torch.testing.assert_close(same["loss"], base["loss"])
    assert not torch.allclose(changed["loss"], base["loss"])


def test_joint_loss_is_weighted_sum():
    model = make_model("joint").eval()
    model.objective_cfg.ntp_weight, model.objective_cfg.mpm_weight = 0.5, 2.0
    with torch.no_grad():
        out = model(learnable_batch(4, seed=7), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "ntp_loss", "ntp_acc", "mpm_loss", "mpm_acc"}
    ntp_loss, mpm_loss = out["ntp_loss"].value, out["mpm_loss"].value  # Ratios: sum / count
    torch.testing.assert_close(out["loss"], 0.5 * ntp_loss + 2.0 * mpm_loss)
    # untrained: both cross-entropies near log(V)
    assert abs(ntp_loss - math.log(VOCAB)) < 0.3 and abs(mpm_loss - math.log(VOCAB)) < 0.3


def test_token_errors_are_clear():
    model = make_model("ntp")
    batch = learnable_batch(2, seed=8)
    tokens = batch.tokens
    batch.tokens = None
    with pytest.raises(ValueError, match="token ids"):
        model(batch)
    for bad in (0, VOCAB - 1):
        batch.tokens = tokens.clone()
        batch.tokens[1] = bad
        with pytest.raises(ValueError, match="tokenizer/vocabulary mismatch"):
            model(batch)


def test_rejects_jets_longer_than_max_particles():
    model = make_model("ntp", max_particles=8)
    batch = learnable_batch(4, seed=9)
    batch.max_seqlen = 12
    with pytest.raises(ValueError, match="max_particles"):
        model(batch)


# --------------------------------------------------------------------------- learning
@pytest.mark.parametrize("objective", ["ntp", "mpm", "joint"])
def test_loss_decreases(objective):
    model = make_model(objective, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    stride = 1 if objective == "ntp" else 0
    data = [learnable_batch(16, seed=100 + i, stride=stride) for i in range(4)]
    losses = []
    for step in range(40):
        out = model(data[step % 4], generator=g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (objective, first, last)
    assert all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------- loss function
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 50, generator=g)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[:5] = logits[:5].argmax(-1)  # some hits
    loss, acc = cross_entropy_and_accuracy(logits, targets)
    (2.0 * loss).backward()
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_logits, targets)
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref)
    assert acc == (logits.float().argmax(-1) == targets).float().mean() and not acc.requires_grad
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


@pytest.mark.parametrize("objective", ["ntp", "mpm", "joint"])
@pytest.mark.parametrize("model_kw", [dict(), dict(input_mode="token", conditioning="multiplicity"), dict(conditioning="class")])
def test_every_parameter_gets_a_gradient(objective, model_kw):
    """DDP (find_unused_parameters=False) needs every parameter in the graph of every step."""
    model = make_model(objective, **model_kw)
    model(learnable_batch(4, seed=10), generator=torch.Generator().manual_seed(0))["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_mpm_with_nothing_to_mask():
    """Single-particle jets mask nothing: a zero loss that still backpropagates, no crash."""
    model = make_model("mpm")
    batch = learnable_batch(3, seed=11)
    cu = torch.arange(4, dtype=torch.int32)
    batch = JetBatch(x=batch.x[:3], cu_seqlens=cu, max_seqlen=1, labels=batch.labels, jet=batch.jet, tokens=batch.tokens[:3])
    out = model(batch)
    out["loss"].backward()
    assert out["loss"].item() == 0.0
