"""MLflow tracking that never stops training.

    tracker = start_tracking(cfg, is_main=accelerator.is_main_process, run_id=None)
    tracker.log_config(cfg)                    # flattened params + resolved config.yaml artifact
    tracker.log_metrics({"train/loss": 2.3}, step=10)   # buffered
    tracker.close("FINISHED")

Only rank 0 logs; other ranks get a `NullTracker` with the same methods. Default URI:
sqlite:///<out_dir>/mlflow.db (no server); `tracking.uri` in the config, else
$MLFLOW_TRACKING_URI, points elsewhere (a server for multi-node runs).

Every MLflow call runs on one background thread, so a slow server never blocks a training
step: metrics are buffered and sent with one `log_batch` every `tracking.flush_every` logged
steps or `tracking.flush_seconds`, whichever comes first (one log_metric costs ≈6 ms on
sqlite, ≈60 ms over HTTP). A tracking outage (server down, connection refused, disk full)
warns once and training goes on: what could not be sent is appended to
out_dir/mlflow_spill.jsonl, the server is retried every `tracking.retry_seconds`, and on
recovery the spilled records are replayed into the run. If the process ends first, nothing is
lost: the spill file holds it (`replay_spill(path, uri, run_id)` sends it later).

The training thread never waits on the server: `run_id` is whatever is known now (None until
the first connection succeeds; checkpoints also record `run_key`, a tag set when the run is
created, by which a resumed run finds its MLflow run when the id was not known yet). HTTP
requests carry a short timeout and few retries (tracking.http_timeout / http_retries); only
`close` waits, at most its `timeout`, and a stopped run passes a short one. Several jobs may
share one new sqlite file: creating the store (MLflow's alembic migrations) and the experiment
runs under an fcntl lock on `<file>.lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from jetfm import messages
from jetfm.config import Config, config_to_dict
from jetfm.config_io import flatten

SPILL_FILE = "mlflow_spill.jsonl"
RUN_KEY_TAG = "jetfm.run_key"
_MAX_METRICS = 1000  # MLflow log_batch limits
_MAX_PARAMS = 100
_MAX_PARAM_LENGTH = 6000


def default_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.out_dir).resolve() / 'mlflow.db'}"


def sanitize_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . space /: replace anything else."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get: every call is a no-op."""

    run_id: str | None = None
    uri: str | None = None
    run_key: str | None = None
    online = False

    def log_config(self, cfg: Config) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        pass


class Tracker(NullTracker):
    """Rank 0's MLflow run, driven by a background thread (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        out_dir: Path,
        *,
        experiment: str = "jetfm",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        run_key: str | None = None,
        flush_every: int = 50,
        flush_seconds: float = 30.0,
        retry_seconds: float = 60.0,
        http_timeout: float = 10.0,
        http_retries: int = 2,
    ):
        self.uri = uri
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.spill_path = self.out_dir / SPILL_FILE
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self._run_id = run_id
        self.resumed_run_id = run_id
        # known without the server, so every checkpoint can name the run: a run resumed from a
        # checkpoint written before the server first answered (run id None) finds its run by this tag
        self.resumed_run_key = run_key
        self.run_key = run_key or uuid.uuid4().hex
        self.tags.setdefault(RUN_KEY_TAG, self.run_key)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.retry_seconds = retry_seconds
        if uri.startswith(("http://", "https://")):
            # MLflow's defaults (120 s timeout, 7 retries with back-off) would hold the tracker for minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, http_timeout))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(http_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # default 2: 2 s, 4 s, ... between tries
        self.online = False
        self.warnings: list[str] = []
        self._client = None
        self._down_since: float | None = None
        self._next_retry = 0.0
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._buffered_steps = 0
        self._last_flush = time.monotonic()
        self._jobs: queue.Queue = queue.Queue()
        self._pending: list[tuple] = []  # jobs handed to the thread and not yet done (spilled on close timeout)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="jetfm-mlflow", daemon=True)
        self._submit(("connect",))
        self._thread.start()

    # ------------------------------------------------------------------ public (training thread)
    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None while the server has not answered yet (never waits: a checkpoint
        written before the first answer records None, the next ones the id)."""
        return self._run_id

    def log_config(self, cfg: Config) -> None:
        params = {k: _param_value(v) for k, v in flatten(config_to_dict(cfg)).items()}
        self._submit(("params", params))
        self._submit(("artifact", cfg.to_yaml(), "config.yaml"))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit(("tags", {k: str(v) for k, v in tags.items()}))

    def log_params(self, params: dict) -> None:
        self._submit(("params", {k: _param_value(v) for k, v in params.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._buffer.append((sanitize_key(key), float(value), now, int(step)))
        self._buffered_steps += 1
        if self._buffered_steps >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self._flush_buffer()

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Send the buffer and wait (at most timeout s) until the thread is idle; True if it is."""
        self._flush_buffer()
        done = threading.Event()
        self._submit(("barrier", done))
        return done.wait(timeout)

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Flush, mark the run terminated, stop the thread; whatever is still unsent is spilled."""
        self._flush_buffer()
        self._submit(("terminate", status))
        self._submit(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                stuck = list(self._pending)
            for job in stuck:
                self._spill(job)
            self._warn(f"MLflow did not answer within {timeout:.0f} s at close; {len(stuck)} pending record(s) "
                       f"written to {self.spill_path}")

    # ------------------------------------------------------------------ background thread
    def _flush_buffer(self) -> None:
        if self._buffer:
            self._submit(("metrics", self._buffer))
            self._buffer = []
        self._buffered_steps = 0
        self._last_flush = time.monotonic()

    def _submit(self, job) -> None:
        if job is not None:
            with self._lock:
                self._pending.append(job)
        self._jobs.put(job)

    def _done(self, job) -> None:
        with self._lock:
            try:
                self._pending.remove(job)
            except ValueError:
                pass

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as error:  # noqa: BLE001 - an outage must never reach training
                if _is_outage(error):
                    self._outage(error)
                else:  # the server answered "no": keep the record locally, do not retry it forever
                    self._warn(f"MLflow rejected a {job[0]} record ({type(error).__name__}: {str(error)[:300]}); "
                               f"kept in {self.spill_path}")
                self._spill(job)
            finally:
                self._done(job)

    def _run(self, job) -> None:
        kind = job[0]
        if kind == "barrier":
            job[1].set()
            return
        if not self.online:
            if time.monotonic() < self._next_retry:
                self._spill(job)
                return
            self._connect()  # raises while the server is still down
        if kind == "connect":
            return
        client = self._client
        if kind == "metrics":
            from mlflow.entities import Metric

            records = job[1]
            for i in range(0, len(records), _MAX_METRICS):
                chunk = [Metric(k, v, t, s) for k, v, t, s in records[i : i + _MAX_METRICS]]
                client.log_batch(self._run_id, metrics=chunk, synchronous=True)
        elif kind == "params":
            from mlflow.entities import Param

            params = dict(job[1])
            existing = client.get_run(self._run_id).data.params
            changed = sorted(k for k in params if k in existing and existing[k] != params[k])
            if changed:  # a resumed run whose config was edited: MLflow params are immutable
                self._warn(f"resumed MLflow run {self._run_id}: config changed since it started ({', '.join(changed)}); "
                           "the run keeps the first values, the new config is logged as an artifact")
                client.set_tag(self._run_id, "jetfm.config_changed_on_resume", ", ".join(changed)[:5000])
            items = [Param(k, v) for k, v in params.items() if k not in existing]
            for i in range(0, len(items), _MAX_PARAMS):
                client.log_batch(self._run_id, params=items[i : i + _MAX_PARAMS], synchronous=True)
        elif kind == "tags":
            from mlflow.entities import RunTag

            client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in job[1].items()], synchronous=True)
        elif kind == "artifact":
            text, name = job[1], job[2]
            client.log_text(self._run_id, text, name)
        elif kind == "terminate":
            client.set_terminated(self._run_id, status=job[1])

    def _connect(self) -> None:
        """Open the client, find or create experiment and run, then replay anything spilled."""
        from mlflow.tracking import MlflowClient

        with store_lock(self.uri):  # a new sqlite file: one process creates its tables and the experiment
            client = MlflowClient(tracking_uri=self.uri)
            self._find_or_create_run(client)  # its first query creates (migrates) the store
        self._client = client
        if not self.online and self._down_since is not None:
            messages.info(f"MLflow at {self.uri} answers again after {time.monotonic() - self._down_since:.0f} s")
        self.online = True
        self._down_since = None
        self._replay()

    def _find_or_create_run(self, client) -> None:
        if self._run_id is not None:
            try:
                run = client.get_run(self._run_id)
                if run.info.status != "RUNNING":
                    client.update_run(self._run_id, status="RUNNING")
            except Exception as error:  # noqa: BLE001
                if _is_outage(error):
                    raise
                self._warn(f"MLflow run {self._run_id} (from the checkpoint) is not in {self.uri}; starting a new run")
                self._run_id = None
        if self._run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is not None and self.resumed_run_key:
                found = client.search_runs([experiment.experiment_id], max_results=1,
                                           filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.resumed_run_key}'")
                if found:
                    self._run_id = found[0].info.run_id
                    if found[0].info.status != "RUNNING":
                        client.update_run(self._run_id, status="RUNNING")
                    return
            if experiment is None:
                location = None
                if self.uri.startswith("sqlite:"):  # keep artifacts beside the database, not in ./mlruns
                    location = (self.out_dir / "mlartifacts").resolve().as_uri()
                experiment_id = client.create_experiment(self.experiment, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            tags = dict(self.tags)
            if self.resumed_run_id:
                tags["jetfm.resumed_from_run"] = self.resumed_run_id
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self._run_id = run.info.run_id

    def _outage(self, error: BaseException) -> None:
        if self.online or self._down_since is None:
            self._warn(
                f"MLflow at {self.uri} is unreachable ({type(error).__name__}: {str(error)[:300]}); training goes on, "
                f"metrics are kept in {self.spill_path} and replayed when it answers (retry every {self.retry_seconds:.0f} s)"
            )
            self._down_since = time.monotonic()
        self.online = False
        self._next_retry = time.monotonic() + self.retry_seconds

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            messages.warn(message)

    # ------------------------------------------------------------------ spill file
    def _spill(self, job) -> None:
        kind = job[0]
        lines = []
        if kind == "metrics":
            lines = [{"metric": k, "value": v, "timestamp": t, "step": s} for k, v, t, s in job[1]]
        elif kind == "params":
            lines = [{"params": job[1]}]
        elif kind == "tags":
            lines = [{"tags": job[1]}]
        elif kind == "artifact":
            lines = [{"artifact": job[2], "text": job[1]}]
        elif kind == "terminate":
            lines = [{"terminate": job[1]}]
        if not lines:
            return
        try:
            with open(self.spill_path, "a") as handle:
                for line in lines:
                    handle.write(json.dumps(line) + "\n")
        except OSError as error:
            self._warn(f"cannot write {self.spill_path} ({error}); tracking records are being dropped")

    def _replay(self) -> None:
        """Send what was spilled while the server was down, then truncate the spill file."""
        if not self.spill_path.exists() or self.spill_path.stat().st_size == 0:
            return
        replayed = self.spill_path.with_name(self.spill_path.name + f".replayed-{int(time.time())}")
        os.replace(self.spill_path, replayed)
        try:
            replay_spill(replayed, client=self._client, run_id=self._run_id)
        except Exception as error:
            if not _is_outage(error):  # a record the server refuses: keep the file aside, go on
                self._warn(f"MLflow refused replaying {replayed} ({str(error)[:300]}); the file is kept")
                return
            # put it back for the next attempt (new spills append after it)
            with open(replayed) as src, open(self.spill_path, "a") as dst:
                dst.write(src.read())
            replayed.unlink()
            raise
        replayed.unlink()


def replay_spill(path: Path, uri: str | None = None, run_id: str | None = None, *, client=None) -> int:
    """Send a spill file's records to MLflow run `run_id`; returns the number of metric records."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri=uri)
    metrics, count = [], 0
    terminate = None
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "metric" in record:
            metrics.append(Metric(record["metric"], record["value"], record["timestamp"], record["step"]))
            count += 1
            if len(metrics) >= _MAX_METRICS:
                client.log_batch(run_id, metrics=metrics, synchronous=True)
                metrics = []
        elif "params" in record:
            existing = client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in record["params"].items() if k not in existing]
            for i in range(0, len(params), _MAX_PARAMS):
                client.log_batch(run_id, params=params[i : i + _MAX_PARAMS], synchronous=True)
        elif "tags" in record:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()], synchronous=True)
        elif "artifact" in record:
            client.log_text(run_id, record["text"], record["artifact"])
        elif "terminate" in record:
            terminate = record["terminate"]
    if metrics:
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    if terminate:
        client.set_terminated(run_id, status=terminate)
    return count


#: MLflow error codes that are an answer from a working server, not an outage.
_ANSWERS = {"RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_PARAMETER_VALUE", "BAD_REQUEST",
            "INVALID_STATE", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "MALFORMED_REQUEST"}


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = 60.0):
    """Hold an exclusive fcntl lock on `<sqlite file>.lock` (other URIs: nothing to lock).

    Two jobs that open the same new sqlite store at once both run MLflow's alembic migrations and
    one fails ("table ... already exists"), or both create the experiment; under the lock the
    second finds the finished store. After `timeout` s it goes on unlocked (a holder that hangs
    must not stop tracking for good).
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        deadline = time.monotonic() + timeout
        locked = False
        while not locked:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def _is_outage(error: BaseException) -> bool:
    """Connection-level failures (refused, timeout, 5xx, database unavailable) vs. answers like 'no such run'."""
    return getattr(error, "error_code", None) not in _ANSWERS


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:_MAX_PARAM_LENGTH]


def start_tracking(cfg: Config, *, is_main: bool, run_id: str | None = None,
                   run_key: str | None = None) -> NullTracker:
    """Rank 0 with tracking on: a Tracker (connecting in the background); else a NullTracker."""
    if not is_main or not cfg.tracking.enabled:
        return NullTracker()
    t = cfg.tracking
    return Tracker(
        default_uri(cfg),
        Path(cfg.out_dir),
        experiment=t.experiment,
        run_name=t.run_name or cfg.name,
        tags={"jetfm.stage": cfg.stage, **t.tags},
        run_id=run_id,
        run_key=run_key,
        flush_every=t.flush_every,
        flush_seconds=t.flush_seconds,
        retry_seconds=t.retry_seconds,
        http_timeout=t.http_timeout,
        http_retries=t.http_retries,
    )


# --------------------------------------------------------------------------- after a run
# Logging to a run that has ended (evaluations, studies): synchronous, from one process, and it
# raises on failure: the callers (jetfm.artifacts.runs) decide that a tracking failure is a warning.
def client(uri: str):
    """An MlflowClient for `uri`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """The id of `experiment`, created (with `artifact_location`) if it does not exist."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return mlflow_client.create_experiment(experiment, artifact_location=artifact_location)


def create_run(uri: str, experiment: str, *, run_name: str, tags: dict[str, str] | None = None) -> str:
    """A new run in `experiment` (created if needed); its id."""
    return client(uri).create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags or {}).info.run_id


def run_exists(uri: str, run_id: str) -> bool:
    try:
        client(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, never existed, or another store
        return False
    return True


def log_after_run(uri: str, run_id: str, metrics: dict[str, float] | None = None, *, step: int = 0,
                  artifacts: list[tuple[Path, str | None]] = (), tags: dict[str, str] | None = None,
                  terminate: bool = False) -> int:
    """Log metrics (keys sanitized, non-finite values left out, in log_batch-sized pieces), tags and
    artifacts ((file or directory, artifact path)) to a run; the number of metrics logged."""
    import math

    from mlflow.entities import Metric

    mlflow_client = client(uri)
    now = int(time.time() * 1000)
    batch = [Metric(sanitize_key(k), float(v), now, int(step)) for k, v in (metrics or {}).items()
             if v is not None and math.isfinite(float(v))]
    for i in range(0, len(batch), _MAX_METRICS):
        mlflow_client.log_batch(run_id, metrics=batch[i:i + _MAX_METRICS], synchronous=True)
    for key, value in (tags or {}).items():
        mlflow_client.set_tag(run_id, key, value)
    for path, artifact_path in artifacts:
        if Path(path).is_dir():
            mlflow_client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
        else:
            mlflow_client.log_artifact(run_id, str(path), artifact_path)
    if terminate:
        mlflow_client.set_terminated(run_id)
    return len(batch)
