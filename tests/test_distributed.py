"""2-process CPU runs (gloo) of the real trainer: DDP, FSDP2 and DeepSpeed ZeRO-2.

Each parallel run must give the 1-process run's loss curve at equal global batch: 2 processes
× BATCH jets vs 1 process × 2·BATCH jets. The shard chunks hold exactly BATCH jets and the
shuffle buffer is one chunk, so step t sees the same jets either way (chunks 2t and 2t+1 of the
epoch's permutation); the tiny model's loss is a mean over jets, dropout is 0. Each test also
resumes its run from a mid-run checkpoint under the same parallelism and checks the steps
repeat exactly. DeepSpeed builds a small CPU op on first use (~1 min): marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
from test_trainer import (  # noqa: F401 - the fixtures are used by name
    BATCH,
    _fresh_accelerate_state,
    read_metric_records,
    read_metrics,
    run,
    subprocess_env,
    tiny_config,
    tiny_data,
)

from jetfm.config_io import load_config
from jetfm.distributed import REPO, configure_deepspeed, launch_command, make_accelerator


def launch(kind: str, config, *args: str, timeout: float = 300) -> tuple[int, str, float]:
    argv, env = launch_command(kind, 2, ["--config", str(config), *args])
    start = time.time()
    proc = subprocess.run(argv, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout,
                          cwd=config.parent)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


def reference_run(tmp_path, tiny_data, steps: int) -> dict[int, float]:
    """The 1-process run at the same global batch (2 × BATCH jets per step)."""
    config = tiny_config(tmp_path, tiny_data, name="single", data={"batch_size": 2 * BATCH},
                         train={"max_steps": steps, "eval_every": 3, "eval_batches": 1})
    assert run(config) == 0
    return read_metrics(tmp_path / "single"), read_metrics(tmp_path / "single", "val/loss")


def check_parallel_run(tmp_path, tiny_data, kind: str, expect_type: str, *, rtol: float) -> dict:
    steps = 6
    config = tiny_config(tmp_path, tiny_data, name=kind,
                         train={"max_steps": steps, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3,
                                "keep_checkpoints": 0})
    rc, out, seconds = launch(kind, config)
    assert rc == 0, out[-4000:]
    run_dir = tmp_path / kind
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distributed"]["distributed_type"] == expect_type, out[-2000:]
    assert summary["distributed"]["num_processes"] == 2 and summary["global_batch_jets"] == 2 * BATCH
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and (state["loader"]["epoch"], state["loader"]["global_batches_done"]) == (1, 2)

    # the same loss curve (and validation) as one process with the same global batch
    train, val = reference_run(tmp_path, tiny_data, steps)
    parallel, parallel_val = read_metrics(run_dir), read_metrics(run_dir, "val/loss")
    assert sorted(parallel) == list(range(1, steps + 1))
    np.testing.assert_allclose([parallel[s] for s in range(1, steps + 1)], [train[s] for s in range(1, steps + 1)],
                               rtol=rtol)
    np.testing.assert_allclose([parallel_val[3], parallel_val[6]], [val[3], val[6]], rtol=rtol)
    assert train[steps] < train[1]
    # the final weights (gathered from the shards for FSDP/DeepSpeed) equal the 1-process ones
    from safetensors.torch import load_file

    mine, reference = (load_file(d / "final" / "model.safetensors") for d in (run_dir, tmp_path / "single"))
    assert mine.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-6)

    # resume under the same parallelism from step 3: steps 4..6 repeat exactly
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    before = read_metric_records(run_dir)
    rc, out, resume_seconds = launch(kind, config, "--resume")
    assert rc == 0, out[-4000:]
    records = read_metric_records(run_dir)  # the re-run steps' rows replace theirs
    assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6] and records == before
    print(f"{kind}: run {seconds:.1f} s, resume {resume_seconds:.1f} s")
    return summary


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "multinode": "MULTI_GPU"}
    for name, kind in expected.items():
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
        assert config.distributed_type.value == kind
        assert config.mixed_precision in (None, "no")  # precision belongs to the jetfm config
    assert load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds and "scheduler" not in ds
    assert ds["train_batch_size"] != "auto" and ds["train_micro_batch_size_per_gpu"] != "auto"


def test_launch_recipes_on_cpu():
    argv, env = launch_command("ddp", 2, ["--config", "x.yaml"])
    assert any(a.endswith("configs/accelerate/ddp.yaml") for a in argv)
    assert env["ACCELERATE_USE_CPU"] == "1" and argv[-2:] == ["--config", "x.yaml"]
    argv, env = launch_command("fsdp", 2, [])
    assert any(a.endswith("configs/accelerate/fsdp.yaml") for a in argv) and env["ACCELERATE_USE_CPU"] == "1"
    argv, env = launch_command("deepspeed", 2, [])
    assert env["DS_ACCELERATOR"] == "cpu" and "ACCELERATE_USE_CPU" not in env  # that would silently give DDP


def test_lone_copies_are_refused(monkeypatch):
    """2 launched processes that accelerate sees as 1 each (torchrun on CPU without ACCELERATE_USE_CPU)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="every process would train alone"):
        make_accelerator(load_config(None, ["stage=tokenizer"]))


def test_deepspeed_asked_but_not_given_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(Exception, match="DS_ACCELERATOR=cpu"):
        make_accelerator(load_config(None, ["stage=tokenizer"]))


def test_deepspeed_config_takes_the_batch_geometry_from_jetfm():
    class Plugin:
        deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 999,
                            "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}

    class State:
        deepspeed_plugin = Plugin()

    class FakeAccelerator:
        state = State()
        num_processes = 4

    cfg = load_config(None, ["stage=pretrain", "data.batch_size=64", "train.grad_accum_steps=2", "optim.grad_clip=0.5"])
    notes = configure_deepspeed(FakeAccelerator(), cfg)
    ds = Plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (64, 2, 512, 0.5)
    assert any("train_batch_size: 999" in n for n in notes)


def test_ddp_two_processes_match_one_process_and_resume(tmp_path, tiny_data):
    check_parallel_run(tmp_path, tiny_data, "ddp", "MULTI_CPU", rtol=1e-5)


def test_fsdp2_two_processes_match_one_process_and_resume(tmp_path, tiny_data):
    summary = check_parallel_run(tmp_path, tiny_data, "fsdp", "FSDP", rtol=1e-5)
    assert summary["distributed"]["fsdp_version"] == 2
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000006" / "pytorch_model_fsdp_0").is_dir()  # sharded (DCP)


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_match_one_process_and_resume(tmp_path, tiny_data):
    pytest.importorskip("deepspeed")
    summary = check_parallel_run(tmp_path, tiny_data, "deepspeed", "DEEPSPEED", rtol=1e-5)
    assert summary["distributed"]["zero_stage"] == 2
    assert (tmp_path / "deepspeed" / "checkpoints" / "step-000006" / "pytorch_model").is_dir()

