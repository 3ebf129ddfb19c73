"""The sharded backends on CPU: FSDP2 per-block sharding and its precision policy, DeepSpeed bf16
and ZeRO-3 with the real pre-training model, the export that gathers the weights, and the
tokenizer's refusal under sharding.

FSDP2 is checked in 2 spawned gloo processes on the real PretrainModel (fast); the DeepSpeed runs
go through `accelerate launch` with DS_ACCELERATOR=cpu as a user would (slow: the first run
builds a CPU op, ~1 min).
"""

from __future__ import annotations

import json
import math
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_distributed import check_parallel_run, launch
from test_trainer import (  # noqa: F401 - the fixtures are used by name
    BATCH,
    _fresh_accelerate_state,
    build_tiny_model,  # noqa: F401 - this module is the exporter-failing builder's module
    read_metric_records,
    read_metrics,
    run,
    tiny_config,
    tiny_data,
    tiny_jets,
)

from jetfm.data.batch import JetBatch
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES
from jetfm.data.shards import Manifest, ShardWriter, creation_info
from jetfm.distributed import fsdp_policy, shard_blocks

CODEBOOK = 14


# --------------------------------------------------------------------------- FSDP2, 2 gloo processes
def _model_and_batches():
    """The real pre-training model (2 backbone blocks, 1 block per NTP/MPM head) and one batch per rank."""
    from jetfm.models.config import ModelConfig, ObjectiveConfig
    from jetfm.models.pretrain import build_pretrain_model

    torch.manual_seed(0)
    cfg = SimpleNamespace(
        model=ModelConfig(dim=16, num_heads=2, num_blocks=2, head_blocks=1, dropout=0.0, max_particles=16),
        objective=ObjectiveConfig(name="ntp"),
        data=SimpleNamespace(features={"part_pt": {}, "part_etarel": {}, "part_phirel": {}}, inputs="raw"),
    )
    model = build_pretrain_model(cfg, SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=["QCD", "Tbqq"]))
    g = torch.Generator().manual_seed(1)
    batches = []
    for num_jets in (5, 3):  # uneven halves
        lengths = torch.randint(2, 9, (num_jets,), generator=g)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
        T = int(lengths.sum())
        batches.append(JetBatch(x=torch.randn(T, 3, generator=g), cu_seqlens=cu, max_seqlen=int(lengths.max()),
                                labels=torch.zeros(num_jets, dtype=torch.long), jet=torch.zeros(num_jets, 6),
                                tokens=torch.randint(1, CODEBOOK + 1, (T,), generator=g)))
    return model, batches


def _fsdp_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        report = {}
        for precision in ("fp32", "bf16"):
            model, batches = _model_and_batches()
            blocks = shard_blocks(model, precision)
            units = {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
            shards = {}
            for name in blocks:
                for pname, p in units[name].named_parameters():
                    assert isinstance(p, DTensor), (name, pname)
                    shards[f"{name}.{pname}"] = (p.device_mesh.size(), [str(pl) for pl in p.placements],
                                                 p.to_local().shape[0], p.shape[0], str(p.dtype))
            loss = model(batches[rank])["loss"]
            loss.backward()
            grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if p.grad is not None}
            grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
            report[precision] = {"blocks": blocks, "roots": sorted(units), "shards": shards, "grads": grads,
                                 "grad_dtypes": grad_dtypes, "loss": float(loss),
                                 "policy": str(units[blocks[0]]._get_fsdp_state()._mp_policy)}
            assert all(pl == [str(Shard(0))] for _, pl, *_ in shards.values())
        if rank == 0:
            Path(out_file).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_every_block_with_an_fp32_reduction_policy(tmp_path):
    """Every transformer block (backbone and heads) is its own FSDP2 unit whose parameters are
    DTensors sharded over the 2 processes; the gradients equal the unsharded model's (DDP-style
    mean over the two ranks' batches); under bf16 the compute runs in bf16 while gradients and
    master weights stay fp32."""
    import torch.multiprocessing as mp

    out = tmp_path / "report.json"
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    report = json.loads(out.read_text())

    fp32 = report["fp32"]
    assert fp32["blocks"] == ["backbone.stack.blocks.0", "backbone.stack.blocks.1", "ntp.head.stack.blocks.0"]
    assert set(fp32["roots"]) == {"", *fp32["blocks"]}  # the blocks, then the root
    for name, (mesh_size, _, local_rows, rows, dtype) in fp32["shards"].items():
        assert mesh_size == 2 and local_rows == math.ceil(rows / 2), name  # rank 0 holds the first half
        assert dtype == "torch.float32"
    # reference: one process, unsharded, the mean of the two ranks' losses
    model, batches = _model_and_batches()
    loss = sum(model(b)["loss"] for b in batches) / 2
    loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fp32["grads"].keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(torch.tensor(fp32["grads"][name]), grad, rtol=1e-5, atol=1e-7, msg=name)

    bf16 = report["bf16"]
    assert "param_dtype=torch.bfloat16" in bf16["policy"] and "reduce_dtype=torch.float32" in bf16["policy"]
    assert bf16["grad_dtypes"] == ["torch.float32"]
    assert all(dtype == "torch.float32" for *_, dtype in bf16["shards"].values())  # master weights
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and bf16["loss"] != fp32["loss"]  # computed in bf16
    for name, grad in reference.items():  # bf16 compute: close, not equal
        got = torch.tensor(bf16["grads"][name])
        assert (got - grad).norm() <= 0.1 * grad.norm() + 1e-6, name


def test_fsdp_policy_follows_the_precision():
    assert fsdp_policy("fp32").param_dtype is None and fsdp_policy("fp32").reduce_dtype == torch.float32
    assert fsdp_policy("bf16").param_dtype == torch.bfloat16 and fsdp_policy("bf16").reduce_dtype == torch.float32


# --------------------------------------------------------------------------- refusals and export failures
def test_tokenizer_stage_is_refused_under_fsdp_with_a_message(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, name="tok", builder=None, stage="tokenizer",
                         tokenizer={"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                                    "latent_dim": 4, "codebook_size": 16})
    rc, out, _ = launch("fsdp", config, timeout=240)
    assert rc != 0, out[-3000:]  # the workers exit 2 (config error); the launcher reports 1
    assert "exitcode  : 2" in out and "stage tokenizer cannot run under FSDP" in out and "configs/accelerate/ddp.yaml" in out
    assert not (tmp_path / "tok" / "checkpoints").exists()


def export(model, directory):
    """The exporter of this module's builder (cfg.builder = test_backends:build_tiny_model): fails."""
    raise OSError(28, "No space left on device", str(directory))


def test_failed_export_closes_the_run_and_writes_the_summary(tmp_path, tiny_data, capsys):
    import mlflow

    config = tiny_config(tmp_path, tiny_data, name="exp", builder="test_backends:build_tiny_model",
                         train={"max_steps": 2, "checkpoint_every": 2}, tracking={"enabled": True})
    assert run(config) == 1
    err = capsys.readouterr().err  # one line naming the path, the reason and the free space
    assert "export of the trained model failed: WriteError: cannot write" in err and "No space left on device" in err
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["message"]
    assert summary["final"] is None and summary["checkpoint"].endswith("step-000002")
    client = mlflow.tracking.MlflowClient(summary["mlflow"]["uri"])
    assert client.get_run(summary["mlflow"]["run_id"]).info.status == "FAILED"


# --------------------------------------------------------------------------- DeepSpeed (slow)
@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> Path:
    """Tiny shards with token ids (random codes): the pre-training stage's input."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(5)
    manifest = Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=["QCD", "Tbqq"], chunk_size=BATCH,
                        created_by=creation_info(), tokens={"codebook_size": CODEBOOK})
    for split, n_chunks in (("train", 8), ("val", 2)):
        writer = ShardWriter(root, f"{split}/shard-000000.tar", manifest.particle_features, manifest.jet_features, 2,
                             chunk_size=BATCH)
        jets = tiny_jets(rng, n_chunks * BATCH)
        jets = dataclasses.replace(jets, tokens=rng.integers(1, CODEBOOK + 1, len(jets.part)))
        writer.write(jets)
        manifest.add_shard(split, writer.close())
    manifest.save(root)
    return root


def pretrain_config(tmp_path, data, name, **train):
    return tiny_config(tmp_path, data, name=name, builder=None,
                       model={"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
                       objective={"name": "joint"}, train={"max_steps": 3, **train})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "deepspeed", "deepspeed_zero3"])
def test_bf16_pretrains_sharded_and_exports_a_loadable_final(tmp_path, token_data, kind):
    """bf16 under FSDP2 (per-block units), ZeRO-2 and ZeRO-3 trains the real pre-training model;
    final/ holds the fp32 master weights and loads with the loader generation and fine-tuning use."""
    if kind.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from jetfm.generate import load_pretrain_checkpoint

    config = pretrain_config(tmp_path, token_data, kind, precision="bf16", checkpoint_every=2, keep_checkpoints=0)
    rc, out, seconds = launch(kind, config, timeout=600)
    assert rc == 0, out[-4000:]
    summary = json.loads((tmp_path / kind / "summary.json").read_text())
    assert summary["distributed"]["num_processes"] == 2
    if kind == "fsdp":
        assert summary["distributed"]["distributed_type"] == "FSDP"
    else:
        assert summary["distributed"]["distributed_type"] == "DEEPSPEED"
        assert summary["distributed"]["zero_stage"] == (3 if kind.endswith("zero3") else 2)
    assert summary["distributed"]["mixed_precision"] == "bf16" and summary["status"] == "completed"
    losses = read_metrics(tmp_path / kind)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    # the same initial weights and jets as a 1-process fp32 run: the first loss agrees to bf16 accuracy
    reference = pretrain_config(tmp_path, token_data, "single", max_steps=1, precision="fp32")
    reference.write_text(reference.read_text().replace(f"batch_size: {BATCH}", f"batch_size: {2 * BATCH}"))
    assert run(reference) == 0
    assert losses[1] == pytest.approx(read_metrics(tmp_path / "single")[1], rel=3e-2)

    weights = load_file(tmp_path / kind / "final" / "model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"} and all(w.numel() for w in weights.values())
    # the fp32 master weights, not the bf16 compute copies widened to fp32
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())
    cfg, model, _ = load_pretrain_checkpoint(tmp_path / kind / "final")
    assert cfg.stage == "pretrain" and cfg.train.precision == "bf16"
    initial = load_file(tmp_path / "single" / "final" / "model.safetensors")  # one step from the same init
    moved = [k for k in weights if not torch.equal(weights[k], initial[k])]
    assert moved  # trained, and not bf16-rounded copies of fp32 values that never moved
    if kind == "fsdp":  # per-block units through the sharded checkpoint: step 3 repeats exactly
        import shutil

        before = read_metric_records(tmp_path / kind)
        shutil.rmtree(tmp_path / kind / "checkpoints" / "step-000003")
        rc, out, _ = launch(kind, config, "--resume")
        assert rc == 0, out[-4000:]
        records = read_metric_records(tmp_path / kind)  # the re-run step replaces its row, with the same loss
        assert [s for s, _ in records] == [1, 2, 3] and records == before
    print(f"{kind} bf16: {seconds:.1f} s, losses {losses}, 1-process fp32 step 1: {read_metrics(tmp_path / 'single')[1]}")


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process_and_resumes(tmp_path, tiny_data):
    pytest.importorskip("deepspeed")
    summary = check_parallel_run(tmp_path, tiny_data, "deepspeed_zero3", "DEEPSPEED", rtol=1e-5)
    assert summary["distributed"]["zero_stage"] == 3


def test_zero3_accelerate_config_parses():
    from accelerate.commands.config.config_args import load_config_from_file

    from jetfm.distributed import REPO

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"))
    assert config.distributed_type.value == "DEEPSPEED" and config.mixed_precision in (None, "no")
    assert config.deepspeed_config["deepspeed_config_file"] == "configs/deepspeed/zero3.json"
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and "optimizer" not in ds and "scheduler" not in ds
