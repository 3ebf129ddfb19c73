"""Analytic FLOPs of a pre-training step against torch's FlopCounterMode on the real model."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jetfm.data.batch import JetBatch
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.pretrain import build_pretrain_model
from jetfm.scaling.flops import ComputeMeter, ModelShapes, batch_flops, step_flops

CODEBOOK = 30
MANIFEST = SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=["QCD", "Tbqq"])


def make_model(objective, input_mode="continuous"):
    torch.manual_seed(0)
    cfg = SimpleNamespace(
        # attention=sdpa: FlopCounterMode sees torch's SDPA calls (the `padded` convention is what
        # they execute); jetfm's C kernel (auto on CPU) executes the `useful` pairs, unseen by torch
        model=ModelConfig(dim=32, num_heads=4, num_blocks=2, head_blocks=1, dropout=0.0, max_particles=64,
                          input_mode=input_mode, attention="sdpa"),
        objective=ObjectiveConfig(name=objective, mask_fraction=0.4),
        data=SimpleNamespace(features={"part_pt": {}, "part_etarel": {}, "part_phirel": {}}, inputs="raw"),
    )
    return build_pretrain_model(cfg, MANIFEST)


def uneven_batch(num_jets=40, seed=0) -> JetBatch:
    """A packed batch with multiplicities from 1 to 59 (single-particle jets included: MPM masks nothing there)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (num_jets,), generator=g)
    lengths[3] = 1
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    T = int(lengths.sum())
    return JetBatch(x=torch.randn(T, 3, generator=g), cu_seqlens=cu, max_seqlen=int(lengths.max()),
                    labels=torch.zeros(num_jets, dtype=torch.long), jet=torch.zeros(num_jets, 6),
                    tokens=torch.randint(1, CODEBOOK + 1, (T,), generator=g))


@pytest.mark.parametrize("objective", ["ntp", "mpm", "joint"])
@pytest.mark.parametrize("input_mode", ["continuous", "token"])
def test_flops_match_flop_counter_on_the_real_model(objective, input_mode):
    """Forward + backward of the real model on a real packed batch. The math SDPA kernel computes
    the padded buckets' full squares, which torch counts as bmm: compare with attention="padded"."""
    model = make_model(objective, input_mode)
    batch = uneven_batch()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    measured = counter.get_total_flops()
    padded = batch_flops(model, batch, attention="padded")
    assert padded.total == pytest.approx(measured, rel=0.05)
    assert padded.total == pytest.approx(measured, rel=1e-9)  # in fact exact: every product is accounted for
    useful = batch_flops(model, batch)
    # only attention differs between the conventions, and useful < executed (padding, causal half)
    assert 0.8 * measured < useful.total < measured
    for part, (fwd, _) in useful.parts.items():
        if not part.endswith("attention"):
            assert fwd == padded.parts[part][0]
        else:
            assert fwd < padded.parts[part][0]


def test_forward_only_matches_flop_counter_in_eval():
    model = make_model("joint").eval()
    batch = uneven_batch(seed=3)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    assert batch_flops(model, batch, attention="padded", backward=False).total == pytest.approx(
        counter.get_total_flops(), rel=1e-9)


def test_useful_attention_and_logit_rows_by_hand():
    """Jets of 1, 2 and 3 particles, D=8, V=10, one block, one head block, no continuous input."""
    shapes = ModelShapes(dim=8, num_blocks=1, head_blocks=1, mlp_hidden=32, head_mlp_hidden=16, vocab_size=10,
                         num_features=None)
    lengths = torch.tensor([1, 2, 3])
    ntp = step_flops(shapes, lengths, objective="ntp", backward=False).parts
    # NTP sequences [start, p..] have lengths 2, 3, 4: causal pairs 3 + 6 + 10 = 19, over 2 layers
    assert ntp["ntp/backbone/attention"][0] == 4 * 8 * 19
    assert ntp["ntp/logits"][0] == 2 * (6 + 3) * 8 * 10
    mpm = step_flops(shapes, lengths, objective="mpm", mask_fraction=0.4, backward=False).parts
    # masked per jet: 0, 1, 1 -> backbone sees lengths 1, 1, 2 (pairs 1 + 1 + 4), head 1, 2, 3 (1 + 4 + 9)
    assert mpm["mpm/backbone/attention"][0] == 4 * 8 * 6
    assert mpm["mpm/head/attention"][0] == 4 * 8 * 14
    assert mpm["mpm/logits"][0] == 2 * 2 * 8 * 10
    assert mpm["mpm/backbone/linear"][0] == 4 * shapes.block_row_flops(32)
    full = step_flops(shapes, lengths, objective="mpm").parts
    assert full["mpm/logits"] == (2 * 2 * 8 * 10, 2 * 2 * 2 * 8 * 10)  # backward = 2 x forward


def test_shapes_from_config_equal_shapes_from_model():
    model = make_model("joint")
    assert ModelShapes.from_model(model) == ModelShapes.from_config(model.model_cfg, CODEBOOK + 2, 3)


def test_bad_input_is_refused():
    shapes = ModelShapes.from_model(make_model("ntp"))
    with pytest.raises(ValueError, match="objective"):
        step_flops(shapes, torch.tensor([3]), objective="clm")
    with pytest.raises(ValueError, match="attention"):
        step_flops(shapes, torch.tensor([3]), objective="ntp", attention="flash")
    with pytest.raises(ValueError, match="lengths"):
        step_flops(shapes, torch.tensor([[3]]), objective="ntp")


def test_compute_meter_sums_steps_and_resumes_exactly():
    model = make_model("joint")
    batches = [uneven_batch(num_jets=8, seed=s) for s in range(4)]
    uninterrupted = ComputeMeter.for_model(model)
    for b in batches:
        uninterrupted.add(uninterrupted.count(b.seqlens), b.num_particles, b.num_jets)
    first = ComputeMeter.for_model(model)
    for b in batches[:2]:
        first.add(first.count(b.seqlens), b.num_particles, b.num_jets)
    resumed = ComputeMeter.for_model(model)
    resumed.load_state_dict(first.state_dict())
    for b in batches[2:]:
        resumed.add(resumed.count(b.seqlens), b.num_particles, b.num_jets)
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert uninterrupted.flops == sum(batch_flops(model, b).total for b in batches)
    assert uninterrupted.particles == sum(b.num_particles for b in batches) and uninterrupted.steps == 4
    with pytest.raises(ValueError, match="objective 'joint' cannot continue a 'ntp' run"):
        ComputeMeter.for_model(make_model("ntp")).load_state_dict(first.state_dict())
