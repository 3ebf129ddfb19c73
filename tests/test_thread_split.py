"""A CPU pre-training step split over threads (models/thread_split.py) gives the one-pass step's
losses, metrics and gradients, draws the same MPM masks, reproduces for a seed, and applies only
where it should. Real model (head dim 16: the CPU kernels run), uneven jet multiplicities, 2 threads.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from jetfm.data.batch import JetBatch
from jetfm.models import thread_split
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.objectives import LossNorm
from jetfm.models.pretrain import build_pretrain_model

CODEBOOK = 40
MANIFEST = SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=[])


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _model(objective="joint", dropout=0.0, attention="auto", conditioning="none"):
    torch.manual_seed(0)
    cfg = SimpleNamespace(
        model=ModelConfig(dim=32, num_heads=2, num_blocks=2, head_blocks=1, dropout=dropout, max_particles=64,
                          attention=attention, conditioning=conditioning),
        objective=ObjectiveConfig(name=objective),
        data=SimpleNamespace(features={"part_pt": {}, "part_etarel": {}, "part_phirel": {}}, inputs="raw"),
    )
    return build_pretrain_model(cfg, MANIFEST).train()


def _batch(jets=37, seed=0):
    """Multiplicities 1..64, skewed like jets' (a few long ones): groups cut by particles, not jets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.randint(1, 12, (jets - 4,), generator=g), torch.tensor([64, 50, 1, 33])])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    T = int(lengths.sum())
    return JetBatch(x=torch.randn(T, 3, generator=g), cu_seqlens=cu, max_seqlen=int(lengths.max()),
                    labels=torch.zeros(jets, dtype=torch.long), jet=torch.zeros(jets, 6),
                    tokens=torch.randint(1, CODEBOOK + 1, (T,), generator=g))


def _step(model, batch, split: bool, *, norm=None, bf16=False, seed=1):
    model.thread_split = split
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch, generator=torch.Generator().manual_seed(seed), norm=norm)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _groups_used(monkeypatch) -> list:
    calls = []
    run = thread_split.run_groups
    monkeypatch.setattr(thread_split, "run_groups", lambda parts, params: calls.append(len(parts)) or run(parts, params))
    return calls


@pytest.mark.parametrize("objective", ["joint", "ntp", "mpm"])
@pytest.mark.parametrize("with_norm", [False, True])
def test_split_step_equals_one_pass(two_threads, monkeypatch, objective, with_norm):
    """fp32, no dropout: loss, every metric (sum and count) and every gradient of the split step
    equal the one-pass step's, with the batch's own counts and with the trainer's LossNorm (global
    denominators, per-jet mask seed, jet offset)."""
    model, batch = _model(objective, conditioning="multiplicity"), _batch()
    norm = None
    if with_norm:
        counts = model.loss_counts(batch)
        norm = LossNorm({k: 3.0 * v for k, v in counts.items()}, mask_seed=1234, jet_offset=17)
    calls = _groups_used(monkeypatch)
    one, g_one = _step(model, batch, False, norm=norm)
    split, g_split = _step(model, batch, True, norm=norm)
    assert calls == [2]  # the split ran, on two groups
    torch.testing.assert_close(split["loss"], one["loss"], rtol=1e-6, atol=1e-6)
    for key in one:
        if key != "loss":
            assert float(split[key].count) == float(one[key].count)  # same predictions: same masks
            torch.testing.assert_close(split[key].total.float(), one[key].total.float(), rtol=1e-5, atol=1e-5)
    assert g_split.keys() == g_one.keys()
    for name in g_one:
        torch.testing.assert_close(g_split[name], g_one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_step_in_bf16_matches_one_pass(two_threads):
    """Under bf16 autocast the split step's gradients lie as close to the one pass as the one pass
    lies to fp32 (bf16 rounding, another order of the sums)."""
    model, batch = _model(), _batch()
    _, g32 = _step(model, batch, False)
    one, g_one = _step(model, batch, False, bf16=True)
    split, g_split = _step(model, batch, True, bf16=True)
    torch.testing.assert_close(split["loss"], one["loss"], rtol=1e-3, atol=1e-3)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    err_one = (flat(g_one) - flat(g32)).norm()
    err_split = (flat(g_split) - flat(g32)).norm()
    assert err_split < 2 * err_one + 1e-6 * flat(g32).norm()


def test_split_step_with_dropout_reproduces_for_a_seed(two_threads):
    """Dropout draws from one generator per group, seeded from torch's RNG: the same seed gives the
    same bits however the threads are scheduled; another seed gives other masks."""
    model, batch = _model(dropout=0.1), _batch()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(_step(model, batch, True)[1])
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_split_step_trains(two_threads):
    """Optimizer steps on the split loss lower it (gradients reach the parameters through backward)."""
    model, batch = _model(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(batch, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] - 0.1 and all(math.isfinite(v) for v in losses)


def test_split_applies_only_where_it_should(two_threads, monkeypatch):
    calls = _groups_used(monkeypatch)
    batch = _batch()
    _step(_model(attention="sdpa"), batch, True)  # the plain torch path: no split
    _step(_model(), batch.jets(0, 2 * thread_split.MIN_JETS_PER_GROUP - 1), True)  # too few jets for 2 groups
    torch.set_num_threads(1)
    _step(_model(), batch, True)  # one thread
    assert calls == []
    torch.set_num_threads(2)
    with torch.no_grad():  # validation: split forward, no gradients
        out = _model()(batch, generator=torch.Generator().manual_seed(1))
    assert calls == [2] and not out["loss"].requires_grad


def test_sharded_parameters_keep_one_pass(two_threads, monkeypatch):
    """FSDP's DTensor parameters and DeepSpeed ZeRO-3's (ds_id) are gathered by hooks around the
    forward and backward, which must not run on several threads: no split then."""
    import os
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _model()
    assert thread_split.group_count(model, 64, torch.device("cpu")) == 2
    model.backbone.start.ds_id = 7
    assert thread_split.group_count(model, 64, torch.device("cpu")) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)]))
        assert thread_split._sharded(param) and not thread_split._sharded(torch.nn.Parameter(torch.zeros(4, 2)))
    finally:
        dist.destroy_process_group()


def test_group_bounds_balance_particles():
    cu = [0] + torch.tensor([1] * 30 + [100, 100]).cumsum(0).tolist()
    bounds = thread_split.group_bounds(cu, 2)
    assert bounds[0] == 0 and bounds[-1] == 32 and bounds[1] == 31  # the 30 short jets + one long one
    for groups in (2, 3, 5, 32):
        bounds = thread_split.group_bounds(cu, groups)
        assert len(bounds) == groups + 1 and all(a < b for a, b in zip(bounds[:-1], bounds[1:]))


def test_jet_slices_are_batches():
    batch = _batch()
    part = batch.jets(3, 10)
    assert part.num_jets == 7 and int(part.cu_seqlens[0]) == 0
    t0, t1 = int(batch.cu_seqlens[3]), int(batch.cu_seqlens[10])
    assert torch.equal(part.x, batch.x[t0:t1]) and torch.equal(part.tokens, batch.tokens[t0:t1])
    assert torch.equal(part.seqlens, batch.seqlens[3:10])
    with pytest.raises(ValueError, match="first < stop"):
        batch.jets(5, 5)


def _token_shards(root):
    """The trainer's tiny jets with random particle token ids (a manifest that records a codebook)."""
    import dataclasses

    import numpy as np
    from test_trainer import BATCH, tiny_jets

    from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES
    from jetfm.data.shards import Manifest, ShardWriter, creation_info

    rng = np.random.default_rng(0)
    manifest = Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=["QCD", "Tbqq"], chunk_size=BATCH,
                        created_by=creation_info(), tokens={"codebook_size": CODEBOOK, "tokenizer": "random ids"})
    for split, n_chunks in (("train", 8), ("val", 2)):
        writer = ShardWriter(root, f"{split}/shard-000000.tar", manifest.particle_features, manifest.jet_features, 2,
                             chunk_size=BATCH)
        jets = tiny_jets(rng, n_chunks * BATCH)
        writer.write(dataclasses.replace(jets, tokens=rng.integers(1, CODEBOOK + 1, len(jets.part)).astype(np.int32)))
        manifest.add_shard(split, writer.close())
    manifest.save(root)
    return root


def test_trainer_resume_with_the_split_repeats_the_steps_exactly(tmp_path, monkeypatch):
    """The real pre-training stage through the trainer on 2 threads (every step split, dropout on):
    killed after the step-2 checkpoint and resumed, steps 3-4 repeat bit for bit (the groups' dropout
    generators come from torch's RNG, which the checkpoint restores)."""
    import shutil

    from accelerate.state import AcceleratorState, GradientState
    from test_trainer import read_metric_records, run, tiny_config

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    calls = _groups_used(monkeypatch)
    config = tiny_config(tmp_path, _token_shards(tmp_path / "tokens"), name="pre", builder=None,
                         model={"dim": 32, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.2},
                         train={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0, "eval_every": 0})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for attempt in ("first", "resumed"):
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            if attempt == "first":
                assert run(config) == 0
                before = read_metric_records(tmp_path / "pre")
                shutil.rmtree(tmp_path / "pre" / "checkpoints" / "step-000004")  # as if killed after step 2's
            else:
                assert run(config, "--resume") == 0
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert calls and set(calls) == {2}  # every step ran split over the two threads
    after = read_metric_records(tmp_path / "pre")
    assert [s for s, _ in after] == [1, 2, 3, 4] and after == before
