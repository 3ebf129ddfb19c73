"""MLflow tracking: a real local sqlite store, and a real unreachable server that must not stop training."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from test_trainer import (  # noqa: F401 - fixtures
    _fresh_accelerate_state,
    read_metrics,
    run,
    subprocess_env,
    tiny_config,
    tiny_data,
)

from jetfm.config_io import load_config
from jetfm.tracking import SPILL_FILE, NullTracker, Tracker, default_uri, replay_spill, start_tracking


def closed_port_uri() -> str:
    """http://127.0.0.1:<port nobody listens on>: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def fast_http_failures(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def spilled(out_dir, key=None) -> list[dict]:
    path = out_dir / SPILL_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in lines if key is None or r.get("metric") == key]


def test_sqlite_run_gets_params_config_and_batched_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts must not land in ./mlruns
    cfg = load_config(None, ["stage=pretrain", "name=trk", f"out_dir={tmp_path / 'run'}", "tracking.tags={team: jets}"])
    tracker = start_tracking(cfg, is_main=True)
    assert isinstance(tracker, Tracker) and tracker.uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    tracker.log_config(cfg)
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step, "perf/jets per s": 100.0 * step, "bad:key": 1.0}, step)
    tracker.close("FINISHED")
    assert not tracker.warnings, tracker.warnings

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)
    finished = client.get_run(tracker.run_id)
    assert finished.info.status == "FINISHED" and finished.info.run_name == "trk"
    assert finished.data.params["optim.lr"] == "0.001" and finished.data.params["data.batch_size"] == "250"
    assert finished.data.tags["team"] == "jets" and finished.data.tags["jetfm.stage"] == "pretrain"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / s) for s in range(1, 6)]
    assert len(client.get_metric_history(tracker.run_id, "bad_key")) == 5  # sanitised, not rejected
    artifact = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert load_config(artifact).name == "trk"
    assert str(tmp_path / "run" / "mlartifacts") in finished.info.artifact_uri
    assert not (tmp_path / "mlruns").exists()


@pytest.fixture
def hanging_server_uri():
    """A server that accepts connections and never answers (requests wait for the read timeout)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("outage", ["refused", "hanging"])
def test_unreachable_server_never_blocks_and_spills_everything(tmp_path, fast_http_failures, outage, request):
    uri = closed_port_uri() if outage == "refused" else request.getfixturevalue("hanging_server_uri")
    tracker = Tracker(uri, tmp_path, flush_every=1, retry_seconds=3600)
    cfg = load_config(None, ["stage=tokenizer"])
    tracker.log_config(cfg)
    start = time.perf_counter()
    for step in range(1, 51):  # a training loop logging every step
        tracker.log_metrics({"train/loss": float(step), "lr": 1e-3}, step)
    # the loop never waits for the server (a hanging one holds each request for 2 s)
    assert time.perf_counter() - start < 1.0
    tracker.close("FINISHED", timeout=60)
    assert tracker.run_id is None and not tracker.online
    outage = [w for w in tracker.warnings if "unreachable" in w]
    assert len(outage) == 1 and "training goes on" in outage[0] and str(tmp_path / SPILL_FILE) in outage[0]
    records = spilled(tmp_path, "train/loss")
    assert [(r["step"], r["value"]) for r in records] == [(s, float(s)) for s in range(1, 51)]
    assert len(spilled(tmp_path, "lr")) == 50
    kinds = {next(iter(r)) for r in spilled(tmp_path)}
    assert {"params", "artifact", "terminate"} <= kinds


def test_spilled_metrics_are_replayed_when_the_server_answers(tmp_path, fast_http_failures):
    tracker = Tracker(closed_port_uri(), tmp_path, flush_every=1, retry_seconds=0.05)
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": float(step)}, step)
    assert tracker.flush(timeout=60)
    assert len(spilled(tmp_path, "train/loss")) == 3 and tracker.run_id is None
    tracker.uri = f"sqlite:///{tmp_path / 'back.db'}"  # the server is back (here: a store that works)
    time.sleep(0.1)
    for step in range(4, 6):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.close("FINISHED")
    assert tracker.online and tracker.run_id is not None
    assert not (tmp_path / SPILL_FILE).exists() or not spilled(tmp_path)

    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]


def test_training_goes_on_through_a_tracking_outage(tmp_path, tiny_data, fast_http_failures):
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 6, "checkpoint_every": 3},
                         tracking={"enabled": True, "uri": closed_port_uri(), "flush_every": 2})
    assert run(config) == 0
    run_dir = tmp_path / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["mlflow"]["run_id"] is None
    assert sorted(r["step"] for r in spilled(run_dir, "train/loss")) == sorted(read_metrics(run_dir)) == list(range(1, 7))
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] is None


def test_only_rank_0_tracks_and_uri_precedence(tmp_path, monkeypatch):
    cfg = load_config(None, ["stage=pretrain", f"out_dir={tmp_path}"])
    assert type(start_tracking(cfg, is_main=False)) is NullTracker
    off = load_config(None, ["stage=pretrain", "tracking.enabled=false"])
    assert type(start_tracking(off, is_main=True)) is NullTracker
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_uri(cfg) == "http://tracking.example:5000"
    pinned = load_config(None, ["stage=pretrain", "tracking.uri=http://other:5000"])
    assert default_uri(pinned) == "http://other:5000"  # the config wins over the environment
    null = NullTracker()
    null.log_metrics({"x": 1.0}, 1)
    null.close()


@pytest.fixture
def silent_server_uri():
    """A thread on 127.0.0.1 that accepts every connection and never answers a byte."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_silent_server_never_delays_a_checkpoint(tmp_path, tiny_data, silent_server_uri, monkeypatch, capsys):
    """Each request waits 5 s for an answer that never comes; checkpoints and steps do not wait on it."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from jetfm import train as trainer

    # time from the step's metrics line (written just before) to the end of the checkpoint write
    durations, step_ends = [], []
    append, save = trainer._append_jsonl, trainer.save_checkpoint

    def mark_step_end(*args, **kwargs):
        step_ends.append(time.perf_counter())
        return append(*args, **kwargs)

    def timed_save(*args, **kwargs):
        out = save(*args, **kwargs)
        durations.append(time.perf_counter() - step_ends[-1])
        return out

    monkeypatch.setattr(trainer, "_append_jsonl", mark_step_end)
    monkeypatch.setattr(trainer, "save_checkpoint", timed_save)
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 6, "checkpoint_every": 2},
                         tracking={"enabled": True, "uri": silent_server_uri, "flush_every": 1, "retry_seconds": 3600})
    start = time.perf_counter()
    assert run(config) == 0
    total = time.perf_counter() - start
    assert len(durations) == 3 and max(durations) < 2.0, durations  # the old run-id wait held the first one ~5 s
    run_dir = tmp_path / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["mlflow"]["run_id"] is None
    state = json.loads((run_dir / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] is None
    # every step's metrics are in the spill file, and they replay into a store that answers
    assert sorted(r["step"] for r in spilled(run_dir, "train/loss")) == list(range(1, 7))
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'later.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("later")).info.run_id
    assert replay_spill(run_dir / SPILL_FILE, uri, run_id) >= 6
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
    print(f"silent server: checkpoints {[round(d, 3) for d in durations]} s, run {total:.1f} s")


RACE_SCRIPT = """
import sys, time
from pathlib import Path
import mlflow.tracking  # imported before the start line: both processes open the store together
from jetfm.tracking import Tracker
uri, out, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True)
(out / "ready").touch()
while not go.exists():
    time.sleep(0.001)
tracker = Tracker(uri, out, run_name=out.name, flush_every=1, retry_seconds=3600)
for step in range(1, 4):
    tracker.log_metrics({"train/loss": float(step)}, step)
tracker.close("FINISHED")
assert not tracker.warnings, tracker.warnings
print(tracker.run_id)
"""


def test_two_jobs_creating_one_sqlite_store_both_get_their_runs(tmp_path):
    """Without the lock around store creation one of the two lost its run (alembic migration race)."""
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, uri, str(tmp_path / f"job{j}"), str(go)],
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for j in (1, 2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"job{j}" / "ready").exists() for j in (1, 2)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()  # both past their imports: released at the same instant
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    run_ids = [out.strip().splitlines()[-1] for out, _ in outputs]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for j, run_id in zip((1, 2), run_ids):
        run = client.get_run(run_id)
        assert run.info.run_name == f"job{j}" and run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3]
        assert not (tmp_path / f"job{j}" / SPILL_FILE).exists()


def test_a_resume_without_the_run_id_finds_the_run_by_its_key(tmp_path):
    """A checkpoint written before the server first answered holds no run id, only the run key."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, tmp_path / "a", run_name="keyed")
    key = first.run_key  # known at once: a checkpoint records it before any answer
    first.log_metrics({"train/loss": 1.0}, 1)
    first.close("KILLED")
    resumed = Tracker(uri, tmp_path / "a", run_id=None, run_key=key)
    resumed.log_metrics({"train/loss": 2.0}, 2)
    resumed.close("FINISHED")
    assert resumed.run_id == first.run_id and resumed.run_key == key
    assert not first.warnings and not resumed.warnings, (first.warnings, resumed.warnings)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss")) == [1, 2]
    other = Tracker(uri, tmp_path / "b")  # a new run gets a new key and a new MLflow run
    other.close("FINISHED")
    assert other.run_key != key and other.run_id != first.run_id


def test_sigterm_stop_never_waits_on_a_silent_server(tmp_path, tiny_data, silent_server_uri):
    """Requests hang 60 s; a SIGTERM still ends in a checkpoint and exit 0 within seconds (the old close waited 30 s)."""
    import signal

    from test_trainer import REPO

    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 100000, "checkpoint_every": 0},
                         tracking={"enabled": True, "uri": silent_server_uri, "flush_every": 1})
    log = open(tmp_path / "stop.log", "w+")
    proc = subprocess.Popen([sys.executable, str(REPO / "jetfm" / "train.py"), "--config", str(config)],
                            env=subprocess_env({"MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                                                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}),
                            stdout=log, stderr=subprocess.STDOUT)
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, (tmp_path / "stop.log").read_text()[-3000:]
        time.sleep(0.05)
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stop_seconds = time.perf_counter() - signalled
    out = (tmp_path / "stop.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert stop_seconds < 15, (stop_seconds, out[-2000:])
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["mlflow"]["run_id"] is None
    assert (tmp_path / "tiny" / "checkpoints" / f"step-{summary['steps']:06d}" / "trainer_state.json").is_file()
    assert "did not answer within 1 s" in out  # the unsent records went to the spill file
    assert len(spilled(tmp_path / "tiny", "train/loss")) >= 1
    print(f"SIGTERM to exit with a silent tracking server: {stop_seconds:.1f} s")
