"""Which MLflow run made an artifact, and logging to it after training (evaluations, studies).

    record = find_run_record("runs/joint/final")   # {"uri", "run_id", "record"} or None
    log_to_run(record["uri"], record["run_id"], {"test/auc": 0.98}, artifacts=[(path, "eval/test")])

A run is found from the trainer's own records, nearest first: the export's trainer_state.json
or summary.json, the run directory's summary.json (PATH/.. for PATH = final or best), then the
run's latest checkpoint. Every MLflow call goes through jetfm.tracking; these functions raise on
a tracking failure and their callers turn it into a warning (tracking never fails a result
that is already on disk).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import tracking


def find_run_record(checkpoint_dir) -> dict | None:
    """{"uri", "run_id", "record"} of the MLflow run that trained an export or checkpoint, from the
    trainer's records (module docstring); None when no record names a run."""
    from ..checkpoint import CHECKPOINTS, latest_checkpoint

    directory = Path(checkpoint_dir)
    candidates = [
        (directory / "trainer_state.json", ("mlflow_uri", "mlflow_run_id")),
        (directory / "summary.json", ("mlflow", None)),
        (directory.parent / "summary.json", ("mlflow", None)),
    ]
    for root in (directory, directory.parent):
        latest = latest_checkpoint(root / CHECKPOINTS)
        if latest is not None:
            candidates.append((latest / "trainer_state.json", ("mlflow_uri", "mlflow_run_id")))
    for path, (uri_key, run_key) in candidates:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if run_key is None:
            entry = record.get(uri_key) or {}
            uri, run_id = entry.get("uri"), entry.get("run_id")
        else:
            uri, run_id = record.get(uri_key), record.get(run_key)
        if uri and run_id:
            return {"uri": uri, "run_id": run_id, "record": str(path)}
    return None


def recorded_step(record: dict | None) -> int:
    """The training step a run record was written at (0 when unknown): where post-hoc metrics go."""
    try:
        saved = json.loads(Path(record["record"]).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return int(saved.get("step") or saved.get("steps") or 0)


def open_run(uri: str, run_id: str | None, *, experiment: str, run_name: str,
             tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run id, new): the recorded run if it still exists, else a new run in `experiment`."""
    if run_id and tracking.run_exists(uri, run_id):
        return run_id, False
    return tracking.create_run(uri, experiment, run_name=run_name, tags=tags), True


def ensure_experiment(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created with its artifacts at `artifact_location` if it does not exist."""
    return tracking.experiment_id(uri, experiment, artifact_location)


def log_to_run(uri: str, run_id: str, metrics: dict[str, float] | None = None, *, step: int = 0,
               artifacts: list[tuple[Path, str | None]] = (), tags: dict[str, str] | None = None,
               terminate: bool = False) -> int:
    """Metrics (non-finite left out), tags and artifacts (file or directory, artifact path) logged
    to an ended run; the number of metrics logged."""
    return tracking.log_after_run(uri, run_id, metrics, step=step, artifacts=artifacts, tags=tags,
                                  terminate=terminate)
