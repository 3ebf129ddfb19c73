"""The gradient of a global batch does not depend on how it is cut into micro-batches and processes.

The real pre-training model (dropout 0) on one global batch of 2b jets with Gamma-distributed
multiplicities, split after sorting by multiplicity (the worst split: short jets on one side,
long ones on the other). Three ways to take the step, each through the trainer's own
`loss_norms` and a real accelerate `Accelerator` (gloo on CPU):

    1 process  x 2b                 the reference
    1 process  x b, accumulation 2  accelerate's accumulate + backward
    2 processes x b                 DDP over 2 spawned gloo processes

MPM masks come from a per-step seed and each jet's index in the global batch (`LossNorm`), so
every split masks the same particles. The old normalisation (a mean per micro-batch, averaged by
accumulation and DDP) is measured too: it is what the new one must beat.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jetfm.data.batch import JetBatch

CODEBOOK, B = 30, 12  # b jets per micro-batch; the global batch has 2b
OBJECTIVES = ("ntp", "mpm", "joint")


def _model(objective: str):
    from jetfm.models.config import ModelConfig, ObjectiveConfig
    from jetfm.models.pretrain import build_pretrain_model

    torch.manual_seed(0)
    cfg = SimpleNamespace(
        model=ModelConfig(dim=16, num_heads=2, num_blocks=2, head_blocks=1, dropout=0.0, max_particles=64),
        objective=ObjectiveConfig(name=objective, ntp_weight=0.7, mpm_weight=1.3),
        data=SimpleNamespace(features={"part_pt": {}, "part_etarel": {}, "part_phirel": {}}, inputs="raw"),
    )
    return build_pretrain_model(cfg, SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=["QCD", "Tbqq"]))


def _jets(lengths: torch.Tensor, g: torch.Generator) -> JetBatch:
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    T, n = int(lengths.sum()), len(lengths)
    return JetBatch(x=torch.randn(T, 3, generator=g), cu_seqlens=cu, max_seqlen=int(lengths.max()),
                    labels=torch.zeros(n, dtype=torch.long), jet=torch.zeros(n, 6),
                    tokens=torch.randint(1, CODEBOOK + 1, (T,), generator=g))


def global_batch() -> tuple[JetBatch, JetBatch, JetBatch]:
    """(all 2b jets, first half, second half): Gamma(k=2, theta=10) multiplicities in [1, 64]
    (like jets' particle counts: a long tail), sorted, so the halves differ in size several-fold."""
    g = torch.Generator().manual_seed(3)
    gamma = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(0.1))
    torch.manual_seed(4)
    lengths = gamma.sample((2 * B,)).round().long().clamp(1, 64).sort().values
    full = _jets(lengths, g)
    halves = []
    cu = full.cu_seqlens.long()
    for lo, hi in ((0, B), (B, 2 * B)):
        t0, t1 = int(cu[lo]), int(cu[hi])
        halves.append(JetBatch(x=full.x[t0:t1], cu_seqlens=(cu[lo:hi + 1] - t0).int(),
                               max_seqlen=int(lengths[lo:hi].max()), labels=full.labels[lo:hi], jet=full.jet[lo:hi],
                               tokens=full.tokens[t0:t1]))
    return full, halves[0], halves[1]


def _flat_grad(model) -> list[float]:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()]).tolist()


def _worker(rank: int, world: int, port: int, out_file: str, threads: int = 1) -> None:
    """Every objective's gradient under this process count, normalised as the trainer does
    (and, for the bias report, as a mean per micro-batch). threads 2: each step split over two
    threads (models/thread_split.py) inside every process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    from jetfm.models.thread_split import group_count
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from jetfm.step_sync import add_metrics, loss_norms, step_seed
    from jetfm.train_metrics import Window

    full, *halves = global_batch()
    report = {}
    try:
        for objective in OBJECTIVES:
            # one micro-batch: its own mean is the global one, so 1 x 2b is the reference of both schemes
            runs = [("per_micro_batch", "2x_b", 1), ("global", "2x_b", 1)] if world == 2 else \
                [("global", "1x_2b", 1), ("global", "1x_b_accum2", 2), ("per_micro_batch", "1x_b_accum2", 2)]
            for scheme, name, accum in runs:
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
                accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
                assert accelerator.num_processes == world
                model = accelerator.prepare(_model(objective))
                unwrapped = accelerator.unwrap_model(model)
                micro = [full] if name == "1x_2b" else halves if accum == 2 else [halves[rank]]
                norms = loss_norms(unwrapped, micro, accelerator, step_seed(0, 1))
                window, metric_sums, loss_sum = Window(accelerator.device, first_step=1), {}, 0.0
                for batch, norm in zip(micro, norms):
                    report[f"{objective}/{scheme}/{name}/groups"] = group_count(unwrapped, batch.num_jets, batch.x.device)
                    with accelerator.accumulate(model):
                        if scheme == "per_micro_batch":  # main's: each micro-batch's own mean, same masks
                            norm = type(norm)(unwrapped.loss_counts(batch), norm.mask_seed, norm.jet_offset)
                        out = model(batch, norm=norm)
                        accelerator.backward(out["loss"])
                    loss_sum = loss_sum + out["loss"].detach()
                    add_metrics(metric_sums, out)
                assert accelerator.sync_gradients
                report[f"{objective}/{scheme}/{name}"] = _flat_grad(unwrapped)
                # the logged record, as the trainer builds it: metrics over every process's predictions
                window.add(loss_sum / accum, None, metric_sums, accum, sum(b.num_jets for b in micro),
                           sum(b.num_particles for b in micro), 0.0)
                record = window.summary(window.totals(accelerator), world=world, memory_gb=0.0, epoch=0.0)
                report[f"{objective}/{scheme}/{name}/logged"] = {k: v for k, v in record.items()
                                                                 if k.startswith("train/")}
        if rank == 0:
            Path(out_file).write_text(json.dumps(report))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawn(world: int, tmp_path: Path, threads: int = 1) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"world{world}-threads{threads}.json"
    mp.spawn(_worker, args=(world, port, str(out), threads), nprocs=world, join=True)
    prefix = "" if threads == 1 else f"threads{threads}:"
    return {prefix + key: value for key, value in json.loads(out.read_text()).items()}


def _rel(a, b) -> float:
    a_, b_ = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a_ - b_).norm() / b_.norm())


@pytest.fixture(scope="module")
def grads(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("invariance")
    return {**_spawn(1, tmp), **_spawn(2, tmp), **_spawn(2, tmp, threads=2), **_spawn(1, tmp, threads=2)}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_any_split_of_the_global_batch_gives_the_same_gradient(grads, objective):
    ref = grads[f"{objective}/global/1x_2b"]
    assert math.isfinite(sum(ref)) and any(ref)
    for split in ("1x_b_accum2", "2x_b"):
        assert _rel(grads[f"{objective}/global/{split}"], ref) < 2e-6, (objective, split)
    # the old per-micro-batch mean is biased on this split: the test can tell
    for split in ("1x_b_accum2", "2x_b"):
        old = _rel(grads[f"{objective}/per_micro_batch/{split}"], ref)
        assert old > 1e-2, (objective, split, old)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_steps_split_over_threads_give_the_same_gradient(grads, objective):
    """With two torch threads a process splits each micro-batch's step over two threads
    (models/thread_split.py): under DDP on 2 processes, with gradient accumulation and on one batch,
    the gradient is still the one-thread one-pass gradient of the global batch."""
    ref = grads[f"{objective}/global/1x_2b"]
    for split in ("1x_2b", "1x_b_accum2", "2x_b"):
        assert grads[f"threads2:{objective}/global/{split}/groups"] == 2  # the split ran
        assert _rel(grads[f"threads2:{objective}/global/{split}"], ref) < 2e-6, (objective, split)
        logged, ref_logged = grads[f"threads2:{objective}/global/{split}/logged"], grads[f"{objective}/global/1x_2b/logged"]
        for key, value in ref_logged.items():
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_logged_metrics_cover_every_process_per_prediction(grads, objective):
    """train/loss, train/<objective>_loss and _acc of 2 processes x b are those of the whole global
    batch (sum over both processes / their count), not rank 0's micro-batch."""
    ref, logged = grads[f"{objective}/global/1x_2b/logged"], grads[f"{objective}/global/2x_b/logged"]
    assert logged.keys() == ref.keys() and "train/loss" in ref
    assert any(key.endswith("_acc") for key in ref)
    for key, value in ref.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    accumulated = grads[f"{objective}/global/1x_b_accum2/logged"]
    for key, value in ref.items():
        assert accumulated[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_validation_loss_is_per_prediction_over_every_batch(tmp_path):
    """`validate` of the real joint model on real token shards: each objective's loss over all its
    predictions of all validation batches (not a mean of batch means weighted by jets), with the
    masks a training step would draw (per jet, from the validation seed)."""
    import dataclasses

    import numpy as np
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from jetfm import stages
    from jetfm.config_io import load_config
    from jetfm.data.reader import make_loader
    from jetfm.data.shards import Manifest, ShardWriter, creation_info
    from jetfm.models.objectives import LossNorm
    from jetfm.step_sync import step_seed
    from jetfm.validation import validate
    from test_trainer import BATCH as CHUNK, JET_FEATURES, KINEMATIC_FEATURES, tiny_config, tiny_jets

    rng = np.random.default_rng(5)
    manifest = Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=["QCD", "Tbqq"], chunk_size=CHUNK,
                        created_by=creation_info(), tokens={"codebook_size": CODEBOOK})
    for split, n_chunks in (("train", 1), ("val", 3)):
        writer = ShardWriter(tmp_path, f"{split}/shard-000000.tar", manifest.particle_features, manifest.jet_features,
                             2, chunk_size=CHUNK)
        jets = tiny_jets(rng, n_chunks * CHUNK)
        writer.write(dataclasses.replace(jets, tokens=rng.integers(1, CODEBOOK + 1, len(jets.part))))
        manifest.add_shard(split, writer.close())
    manifest.save(tmp_path)
    cfg = load_config(tiny_config(tmp_path, tmp_path, name="val", builder=None,
                                  model={"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1},
                                  objective={"name": "joint", "ntp_weight": 0.7, "mpm_weight": 1.3},
                                  train={"eval_every": 1, "eval_batches": 3}))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = stages.build_model(cfg, Manifest.load(tmp_path))
    loader = make_loader(cfg.data, cfg.data.val_split, rank=0, world_size=1, seed=cfg.seed, shuffle=False,
                         drop_uneven=True, require_tokens=True)
    start = loader.state_dict()
    result = validate(model, model, loader, start, None, cfg, accelerator, None)

    loader.load_state_dict(start)
    sums = {"ntp": [0.0, 0.0], "mpm": [0.0, 0.0]}
    per_jet = jets = 0.0
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            out = model(batch, norm=LossNorm(model.loss_counts(batch), step_seed(cfg.seed, 0), i * cfg.data.batch_size))
            for name in sums:
                sums[name][0] += float(out[f"{name}_loss"].total)
                sums[name][1] += float(out[f"{name}_loss"].count)
            per_jet += float(out["loss"]) * batch.num_jets
            jets += batch.num_jets
    assert i == 2  # 3 batches of uneven particle counts
    expected = 0.7 * sums["ntp"][0] / sums["ntp"][1] + 1.3 * sums["mpm"][0] / sums["mpm"][1]
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["ntp_loss"] == pytest.approx(sums["ntp"][0] / sums["ntp"][1], rel=1e-6)
    assert result["mpm_loss"] == pytest.approx(sums["mpm"][0] / sums["mpm"][1], rel=1e-6)
    assert 0 <= result["ntp_acc"] <= 1 and 0 <= result["mpm_acc"] <= 1
    # the old weighting differs (by 1.6e-4 relative here: an untrained model is near log V everywhere)
    assert abs(per_jet / jets - expected) > 1e-5 * expected


def test_a_jets_mask_depends_on_its_seed_and_global_index_only():
    """Seeded MPM masks: m(n) particles per jet, the same for a jet whatever batch it is cut into,
    different for another step's seed."""
    from jetfm.models.attention import Packing
    from jetfm.models.objectives import mask_particles, masked_count

    full, first, second = global_batch()
    pack = lambda b: Packing(b.cu_seqlens, b.max_seqlen, b.num_particles)  # noqa: E731
    whole = mask_particles(pack(full), 0.4, seed=11)
    parts = torch.cat([mask_particles(pack(first), 0.4, seed=11, jet_offset=0),
                       mask_particles(pack(second), 0.4, seed=11, jet_offset=B)])
    assert torch.equal(whole, parts)
    cu = full.cu_seqlens.long()
    per_jet = torch.stack([whole[cu[j]:cu[j + 1]].sum() for j in range(2 * B)])
    assert torch.equal(per_jet, masked_count(full.seqlens, 0.4))
    assert not torch.equal(whole, mask_particles(pack(full), 0.4, seed=12))
    assert not torch.equal(parts, torch.cat([mask_particles(pack(first), 0.4, seed=11),
                                             mask_particles(pack(second), 0.4, seed=11)]))  # offsets matter


def test_seeded_masks_are_uniform_over_positions():
    """Every position of a 10-particle jet is masked 40% of the time (4 of 10) over 4,000 jets."""
    from jetfm.models.attention import Packing
    from jetfm.models.objectives import mask_particles

    cu = torch.arange(0, 40_001, 10, dtype=torch.int32)
    masked = mask_particles(Packing(cu, 10, 40_000), 0.4, seed=7).view(4000, 10).float().mean(0)
    assert (masked - 0.4).abs().max() < 0.03, masked  # 3.9 standard deviations
