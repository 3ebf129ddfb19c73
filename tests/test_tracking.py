"""MLflow tracking: a real local sqlite store, and a real unreachable server that must not stop training."""

from __future__ import annotations

import json
import socket
import time

import pytest
from test_trainer import _fresh_accelerate_state, read_metrics, run, tiny_config, tiny_data  # noqa: F401 - fixtures

from jetfm.config import load_config
from jetfm.tracking import SPILL_FILE, NullTracker, Tracker, default_uri, start_tracking


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
