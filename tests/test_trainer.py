"""The training loop on one process: outputs, exact resume, NaN handling, checkpoints, schedule.

A tiny stage-contract model (defined here, built through `builder: test_trainer:build_tiny_model`)
trains on a tiny real shard set, so every test exercises the real reader and the real loop.
The helpers are shared with test_distributed.py and test_tracking.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from jetfm import checkpoint as ckpt
from jetfm import train as trainer
from jetfm.config_io import load_config
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, JetArrays
from jetfm.data.shards import Manifest, ShardWriter, creation_info
from jetfm.models.optim import lr_factor, param_groups

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# --------------------------------------------------------------------------- tiny data + model
BATCH = 16  # jets per process per micro-step; also the chunk size, see write_tiny_dataset


def tiny_jets(rng, n_jets: int) -> JetArrays:
    """Massless constituents around a random axis; the label shifts the pT scale (learnable)."""
    label = rng.integers(0, 2, n_jets)
    mult = rng.integers(2, 20, n_jets)
    offsets = np.concatenate([[0], np.cumsum(mult)]).astype(np.int64)
    jet_of = np.repeat(np.arange(n_jets), mult)
    pt = rng.exponential(10.0, offsets[-1]) * np.where(label[jet_of] == 1, 3.0, 1.0) + 0.5
    for b in range(n_jets):
        s = slice(offsets[b], offsets[b + 1])
        pt[s] = np.sort(pt[s])[::-1]
    eta = rng.normal(0, 0.2, offsets[-1]) + np.repeat(rng.uniform(-1, 1, n_jets), mult)
    phi = rng.normal(0, 0.2, offsets[-1]) + np.repeat(rng.uniform(-2, 2, n_jets), mult)
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], 1).astype(np.float32)
    jet = np.zeros((n_jets, len(JET_FEATURES)), np.float32)
    jet[:, 5] = mult
    return JetArrays(p4, offsets, jet, label.astype(np.int64))


def write_tiny_dataset(root: Path, chunks_per_split=(8, 2), shards=2, chunk_size=BATCH, seed=0) -> Path:
    """Shards whose chunks all hold exactly `chunk_size` jets (whole chunks = whole batches)."""
    rng = np.random.default_rng(seed)
    manifest = Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=["QCD", "Tbqq"], chunk_size=chunk_size,
                        created_by=creation_info())
    for split, n_chunks in zip(("train", "val"), chunks_per_split):
        n_shards = min(shards, n_chunks)
        for k in range(n_shards):
            chunks = n_chunks // n_shards + (1 if k < n_chunks % n_shards else 0)
            writer = ShardWriter(root, f"{split}/shard-{k:06d}.tar", manifest.particle_features,
                                 manifest.jet_features, 2, chunk_size=chunk_size)
            writer.write(tiny_jets(rng, chunks * chunk_size))
            manifest.add_shard(split, writer.close())
    manifest.save(root)
    return root


class TinyJetModel(nn.Module):
    """Per-particle MLP, mean-pooled per jet, class logits; loss = mean over jets (stage contract)."""

    hook_steps: list[int] = []  # on_step_end calls of the last model built (tests read it)

    def __init__(self, n_features: int, n_classes: int, dim: int = 16, dropout: float = 0.0, nan_at: int = 0):
        super().__init__()
        self.embed = nn.Linear(n_features, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.class_bias = nn.Embedding(n_classes, 1)
        self.nan_at = nan_at  # forward call number that returns a NaN loss (0: never)
        self.calls = 0
        TinyJetModel.hook_steps = []

    def forward(self, batch) -> dict:
        self.calls += self.training
        h_TD = self.drop(F.gelu(self.embed(batch.x)))
        lengths = batch.seqlens.long()
        jet_index = torch.repeat_interleave(torch.arange(batch.num_jets, device=h_TD.device), lengths)
        pooled_BD = torch.zeros(batch.num_jets, h_TD.shape[1], device=h_TD.device, dtype=h_TD.dtype)
        pooled_BD = pooled_BD.index_add(0, jet_index, h_TD) / lengths[:, None].to(h_TD.dtype)
        logits = self.head(self.norm(pooled_BD)) + self.class_bias.weight.squeeze(1)
        loss = F.cross_entropy(logits.float(), batch.labels)
        if self.training and self.calls == self.nan_at:
            loss = loss * float("nan")
        accuracy = (logits.argmax(1) == batch.labels).float().mean()
        return {"loss": loss, "acc": accuracy.detach()}

    def on_step_end(self, step: int):
        TinyJetModel.hook_steps.append(step)
        return {"hook_marker": float(step)} if step % 2 == 0 else None


def build_tiny_model(cfg, manifest):
    nan_at = int(os.environ.get("JETFM_TEST_NAN_AT", "0"))
    return TinyJetModel(len(cfg.data.features), len(manifest.classes), dim=cfg.model.dim,
                        dropout=cfg.model.dropout, nan_at=nan_at)


def tiny_config(tmp_path: Path, data_dir: Path, name: str = "tiny", **sections) -> Path:
    """A YAML experiment config for the tiny model; `sections` override/extend it."""
    cfg = {
        "stage": "pretrain",
        "name": name,
        "seed": 3,
        "out_dir": str(tmp_path / name),
        "builder": "test_trainer:build_tiny_model",
        "data": {"path": str(data_dir), "batch_size": BATCH, "shuffle_buffer": BATCH},
        "model": {"dim": 16, "num_heads": 2, "dropout": 0.0},
        "optim": {"lr": 1e-2, "weight_decay": 0.01},
        "train": {"max_steps": 6, "log_every": 1, "eval_every": 0, "eval_batches": 2, "checkpoint_every": 0,
                  "progress_bar": False},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value from metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def read_metric_records(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if key in r]


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(monkeypatch):
    """Each in-process run gets its own Accelerator state; tests import the tiny builder by name.

    One thread: on a loaded 2-core machine, 2 OpenMP threads spin-wait and make these tiny
    steps ~100x slower.
    """
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.delenv("JETFM_TEST_NAN_AT", raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(config: Path, *args: str) -> int:
    return trainer.main(["--config", str(config), *args])


# --------------------------------------------------------------------------- command line
def test_help_answers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "accelerate launch jetfm/train.py --config" in out
    assert "--resume" in out and "--dry-run" in out and "key.sub=value" in out


def test_dry_run_prints_resolved_config(tmp_path, tiny_data, capsys):
    config = tiny_config(tmp_path, tiny_data)
    assert run(config, "--dry-run", "optim.lr=3e-4", "train.max_steps=1e3") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 3e-4 and resolved["train"]["max_steps"] == 1000
    assert resolved["data"]["features"]["part_pt"] == {"function": "signed_log", "subtract": 1.8, "multiply": 1.0}
    assert resolved["tracking"]["run_name"] == "tiny"
    assert not (tmp_path / "tiny").exists()  # a dry run writes nothing


def test_bad_override_exits_2_naming_the_key(tmp_path, tiny_data, capsys):
    config = tiny_config(tmp_path, tiny_data)
    assert run(config, "train.lr=0.1") == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "optim.lr" in err


def test_keys_lists_documented_keys(capsys):
    assert trainer.main(["--keys"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr (float, default 0.001)" in out and "train.nan_policy" in out


# --------------------------------------------------------------------------- a run
def test_run_writes_metrics_checkpoints_summary(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2,
                                                     "eval_every": 4, "log_every": 2})
    assert run(config) == 0
    run_dir = tmp_path / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["distributed"]["distributed_type"] == "NO" and summary["global_batch_jets"] == BATCH
    assert summary["epoch"] == 1.0  # 8 train chunks of BATCH jets = 8 steps per epoch
    assert summary["mean_jets_per_s"] > 0 and summary["val"]["loss"] > 0
    losses = read_metrics(run_dir)
    assert sorted(losses) == [2, 4, 6, 8]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train/loss", "train/acc", "lr", "grad_norm", "perf/jets_per_s", "perf/particles_per_s",
                "perf/memory_gb", "epoch"):
        assert key in record, key
    assert read_metrics(run_dir, "train/hook_marker") == {2: 2.0, 4: 4.0, 6: 6.0, 8: 8.0}
    assert TinyJetModel.hook_steps == list(range(1, 9))  # after every optimizer step
    assert sorted(read_metrics(run_dir, "val/loss")) == [4, 8]
    # checkpoints: the last two kept, `latest` points at the final one, each holds state + config
    kept = [p.name for _, p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    assert kept == ["step-000006", "step-000008"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000008"
    final = run_dir / "checkpoints" / "step-000008"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["loader"]["epoch"] == 0 and state["loader"]["global_batches_done"] == 8
    assert (final / "model.safetensors").exists() and (final / "optimizer.bin").exists()
    assert load_config(final / "config.yaml").train.max_steps == 8


def test_grad_accumulation_equals_the_bigger_batch(tmp_path, tiny_data):
    """batch 2b in one step == 2 accumulated micro-batches of b (the same jets: whole chunks)."""
    big = tiny_config(tmp_path, tiny_data, name="big", data={"batch_size": 2 * BATCH, "shuffle_buffer": BATCH})
    acc = tiny_config(tmp_path, tiny_data, name="acc", train={"grad_accum_steps": 2})
    assert run(big) == 0 and run(acc) == 0
    a, b = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
    assert a[6] < a[1]  # it learns


def test_back_to_back_runs_in_one_process_bf16_and_schedule(tmp_path, tiny_data):
    """Two stages in one process (as `jetfm demo` does), the second in bf16 with warm-up + cosine."""
    first = tiny_config(tmp_path, tiny_data, name="first", train={"grad_accum_steps": 2, "max_steps": 2})
    second = tiny_config(tmp_path, tiny_data, name="second", train={"precision": "bf16"},
                         optim={"lr": 0.01, "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1})
    assert run(first) == 0 and run(second) == 0
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["distributed"]["mixed_precision"] == "bf16"
    lr = read_metrics(tmp_path / "second", "lr")
    assert lr[1] == pytest.approx(0.005) and lr[2] == pytest.approx(0.01)  # lr used by each step
    assert lr[2] > lr[4] > lr[6] > 0.001
    assert all(math.isfinite(v) for v in read_metrics(tmp_path / "second").values())


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, tiny_data):
    """Crash after the step-4 checkpoint, resume: steps 5..8 repeat bit for bit (dropout on), same MLflow run."""
    config = tiny_config(tmp_path, tiny_data, model={"dropout": 0.2},
                         train={"max_steps": 8, "checkpoint_every": 4, "keep_checkpoints": 0, "eval_every": 4},
                         tracking={"enabled": True, "flush_every": 4})
    assert run(config) == 0
    run_dir = tmp_path / "tiny"
    first = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir / "checkpoints" / "step-000008")  # as if the run died after step 4's checkpoint
    before, val_before = read_metric_records(run_dir), read_metric_records(run_dir, "val/loss")
    assert run(config, "--resume") == 0
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["resumed_from"].endswith("step-000004") and second["steps_this_session"] == 4

    records = read_metric_records(run_dir)  # the re-run steps' rows replace theirs: no duplicates
    assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert records == before  # exact, not approximately
    val = read_metric_records(run_dir, "val/loss")
    assert [s for s, _ in val] == [4, 8] and val == val_before  # step 8's validation, before and after the resume

    assert first["mlflow"]["run_id"] and second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(first["mlflow"]["uri"])
    history = client.get_metric_history(first["mlflow"]["run_id"], "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))
    # MLflow keeps every value logged (no overwrite by step): the re-run steps 5..8 are there twice, equal
    assert len(history) == 12 and len({(m.step, m.value) for m in history}) == 8
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "FINISHED"


def test_resume_at_an_epoch_boundary_from_a_path_into_a_new_run_dir(tmp_path, tiny_data):
    """8 batches per epoch: the step-8 checkpoint sits exactly at the end of epoch 0."""
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 11, "checkpoint_every": 8, "keep_checkpoints": 0})
    assert run(config) == 0
    source = tmp_path / "tiny" / "checkpoints" / "step-000008"
    other = tiny_config(tmp_path, tiny_data, name="other", train={"max_steps": 11})
    assert run(other, "--resume", str(source)) == 0
    a, b = read_metrics(tmp_path / "tiny"), read_metrics(tmp_path / "other")
    assert sorted(b) == [9, 10, 11] and all(a[s] == b[s] for s in b)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.find_checkpoint(str(tmp_path / "nowhere"), tmp_path)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("JETFM_TEST_NAN_AT", "5")  # the 5th training forward = step 5
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 8, "checkpoint_every": 2})
    assert run(config) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 5" in err and "step-000004" in err
    run_dir = tmp_path / "tiny"
    assert [p.name for _, p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000002", "step-000004"]
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-000004"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 4


def test_nan_found_at_the_next_checkpoint_step_names_the_first_bad_step(tmp_path, tiny_data, capsys, monkeypatch):
    """Losses stay on the device between log steps: a NaN at step 5 (log_every=4) is found at the
    step-6 checkpoint, before anything is written for it; steps 5 and 6 are discarded."""
    monkeypatch.setenv("JETFM_TEST_NAN_AT", "5")
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 8, "checkpoint_every": 2, "log_every": 4})
    assert run(config) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 5: loss=nan" in err and "step-000004" in err
    run_dir = tmp_path / "tiny"
    assert [p.name for _, p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000002", "step-000004"]
    losses = read_metrics(run_dir)
    assert list(losses) == [4] and math.isfinite(losses[4])  # the window of steps 5..8 never logged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 4


def test_nan_policy_skip_drops_one_update(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("JETFM_TEST_NAN_AT", "3")
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 6, "nan_policy": "skip"})
    assert run(config) == 0
    losses = read_metrics(tmp_path / "tiny")
    assert sorted(losses) == [1, 2, 4, 5, 6]  # step 3 was skipped, not logged
    assert all(math.isfinite(v) for v in losses.values())
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["status"] == "completed"


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_data, monkeypatch, capsys):
    real = ckpt._write_text

    def disk_full_at_step_4(path, text):
        if path.name == ckpt.STATE_FILE and "step-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(ckpt, "_write_text", disk_full_at_step_4)
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 6, "checkpoint_every": 2})
    assert run(config) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-000002 is intact" in err
    root = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]  # no step-000004.tmp left
    assert (root / "latest").read_text().strip() == "step-000002"
    assert json.loads((root / "step-000002" / "trainer_state.json").read_text())["step"] == 2


def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, tiny_data):
    """A real SIGTERM to a training process: checkpoint, exit 0; the resumed losses match a clean run."""
    config = tiny_config(tmp_path, tiny_data, name="killed", model={"dropout": 0.1},
                         train={"max_steps": 100000, "checkpoint_every": 0})
    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen([sys.executable, str(REPO / "jetfm" / "train.py"), "--config", str(config)],
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = (tmp_path / "killed.log").read_text()
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    stopped = summary["steps"]
    assert ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints").name == ckpt.step_name(stopped)

    end = stopped + 2
    assert run(config, "--resume", f"train.max_steps={end}") == 0  # constant lr: max_steps does not shape it
    clean = tiny_config(tmp_path, tiny_data, name="clean", model={"dropout": 0.1}, train={"max_steps": end})
    assert run(clean) == 0
    resumed, reference = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "clean")
    assert sorted(resumed) == list(range(1, end + 1))
    assert [resumed[s] for s in range(1, end + 1)] == [reference[s] for s in range(1, end + 1)]


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    """Even where a library asks torch.load for weights_only=False (DeepSpeed does), jetfm refuses code."""

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"weights": torch.ones(2), "evil": Boom()}, tmp_path / "state.pt")
    with ckpt._weights_only_loads():
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            torch.load(tmp_path / "state.pt", weights_only=False)
    assert not (tmp_path / "pwned").exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored


def test_real_stages_through_the_trainer(tmp_path, tiny_data):
    """The contract with the real stage code: tokenizer (evaluate, on_step_end, export) -> tokenize -> pretrain."""
    from jetfm.tokenizer.tokenize import main as tokenize_main

    tokenizer = tiny_config(tmp_path, tiny_data, name="tok", builder=None, stage="tokenizer",
                            tokenizer={"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                                       "latent_dim": 4, "codebook_size": 16, "dead_code_every": 2,
                                       "min_utilisation": 0.0},
                            train={"max_steps": 4, "eval_every": 4, "eval_batches": 1, "log_every": 2})
    assert run(tokenizer) == 0
    summary = json.loads((tmp_path / "tok" / "summary.json").read_text())
    assert summary["val"]["codes_used"] > 0 and (tmp_path / "tok" / "final" / "tokenizer.json").exists()
    assert read_metrics(tmp_path / "tok", "train/dead_codes_replaced")  # the hook's metrics are logged

    tokens = tmp_path / "tokens"
    assert tokenize_main(["--tokenizer", str(tmp_path / "tok" / "final"), "--data", str(tiny_data),
                          "--out", str(tokens), "--splits", "train,val"]) == 0
    pretrain = tiny_config(tmp_path, tokens, name="pre", builder=None,
                           model={"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.1},
                           train={"max_steps": 3, "eval_every": 3, "eval_batches": 1})
    assert run(pretrain) == 0
    losses = read_metrics(tmp_path / "pre", "train/ntp_loss")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert (tmp_path / "pre" / "final" / "model.safetensors").exists()


# --------------------------------------------------------------------------- pieces
def test_weight_decay_only_on_linear_weights():
    model = TinyJetModel(3, 2)
    model.extra = nn.Parameter(torch.zeros(4, 4))  # a learned table, e.g. mask vectors
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model.embed.weight), id(model.head.weight)}
    for p in (model.embed.bias, model.norm.weight, model.norm.bias, model.class_bias.weight, model.extra):
        assert id(p) in ids(no_decay)
    model.no_weight_decay = lambda: {"head.weight"}
    decay, _ = param_groups(model, 0.1)
    assert ids(decay) == {id(model.embed.weight)}


@pytest.mark.parametrize("schedule, end", [("constant", 1.0), ("cosine", 0.1), ("linear", 0.1)])
def test_lr_schedules(schedule, end):
    from jetfm.config import OptimConfig

    factor = lr_factor(OptimConfig(schedule=schedule, warmup_steps=4, min_lr_ratio=0.1), max_steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(end) and factor(100) == pytest.approx(end)
    if schedule == "cosine":
        assert factor(12) == pytest.approx(0.55)
