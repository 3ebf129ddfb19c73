"""Checkpoints: one directory per step, written atomically, found again by `--resume`.

    out_dir/checkpoints/step-000123/     accelerate save_state: model (model.safetensors, FSDP2
                                         DCP shards or DeepSpeed files), optimizer, scheduler,
                                         random_states_<rank>.pkl (python/numpy/torch RNG)
                                         + config.yaml (resolved) + trainer_state.json
    out_dir/checkpoints/latest           "step-000123": the newest complete checkpoint

A checkpoint is written by every process into `step-000123.tmp/` (trainer_state.json last),
then renamed by rank 0: a directory named `step-NNNNNN` is always complete. If writing fails
anywhere (disk full, ...) the temp directory is removed, the previous checkpoint stays as it
was, and `CheckpointError` says so on every rank. Loading goes through accelerate's
load_state, which reads weights with safetensors / `torch.load(weights_only=True)`. DeepSpeed's
own loader asks for `weights_only=False`; jetfm holds it to weights_only=True too, allowing only
the few plain DeepSpeed classes its ZeRO files name (loss scaler, stage enum, fragment address):
a checkpoint never runs code.

trainer_state.json: step, epoch, the data-loader state (one for all ranks: any process count resumes it),
MLflow run id, last metrics.

A failed write names the checkpoint, the system's reason and the free space (torch's zip writer
reports a full disk only as "unexpected pos N vs M"; the free space left tells it apart). Pruning
first renames a checkpoint to `step-NNNNNN.pruned` (one rename), then deletes it: a prune killed
half-way leaves no step directory without its files. An unreadable `random_states_<rank>.pkl`
(accelerate skips it with a log line at info level) is a warning that the resume is not exact.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from . import messages
from .artifacts.atomic import atomic_write_text, describe_write_failure, free_space, fsync_dir, replace_directory

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or found; the message says what is still intact."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _write_text(path: Path, text: str) -> None:
    """Write-then-rename with fsync: the file is either the old or the new version, never half."""
    atomic_write_text(path, text)


_fsync_dir = fsync_dir


def _anyone(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (one small all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


# --------------------------------------------------------------------------- finding
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (a checkpoints/ directory), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` points to if complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _STEP_DIR.match(target.name) and (target / STATE_FILE).is_file():
            return target
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def find_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """What `--resume` means: None (fresh run), "auto" (latest under run_dir, or None), or a path.

    A path may be a checkpoint directory, a checkpoints/ directory or a run directory.
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(Path(run_dir) / CHECKPOINTS)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / CHECKPOINTS, path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"--resume {resume}: no complete checkpoint there (expected a step-NNNNNN directory holding {STATE_FILE}, "
        "or a run directory with checkpoints/)"
    )


def read_trainer_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable trainer state ({error})") from error


# --------------------------------------------------------------------------- writing
def save_checkpoint(accelerator, run_dir: Path, step: int, *, config_yaml: str, trainer_state: dict, keep: int = 0) -> Path:
    """Write checkpoint `step` (collective: every process calls it). Returns its directory."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_name(step)
    tmp = root / (step_name(step) + ".tmp")
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash while writing this step before
    accelerator.wait_for_everyone()
    previous = latest_checkpoint(root)

    # phase 1: every process writes its part into the temp directory
    error: BaseException | None = None
    try:
        accelerator.save_state(str(tmp))
        if main:
            _write_text(tmp / CONFIG_FILE, config_yaml)
            state = dict(trainer_state, step=step, saved_at=_now())
            _write_text(tmp / STATE_FILE, json.dumps(state, indent=1))  # last: marks the directory complete
            _fsync_dir(tmp)
    except Exception as caught:  # noqa: BLE001 - any failure must leave the old checkpoint usable
        error = caught
        free = free_space(tmp)  # before the cleanup gives the space back
    if _anyone(accelerator, error is not None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_failure(final, error, previous, free if error is not None else None)) from error

    # phase 2: rank 0 publishes it (rename, pointer, pruning)
    error = None
    if main:
        try:
            replace_directory(tmp, final)  # same step written before (e.g. a rerun): swapped out whole
            _write_text(root / LATEST, final.name + "\n")
            prune(root, keep)
        except Exception as caught:  # noqa: BLE001
            error = caught
            shutil.rmtree(tmp, ignore_errors=True)
    if _anyone(accelerator, error is not None):
        raise CheckpointError(_failure(final, error, previous))
    accelerator.wait_for_everyone()
    return final


def _failure(final: Path, error: BaseException | None, previous: Path | None, free=None) -> str:
    if error is None:
        cause = "writing checkpoint {final} failed on another rank (see its log)".format(final=final)
    else:
        cause = describe_write_failure(final, error, free)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return f"{cause}; its temporary directory was removed and {kept}"


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (0 keeps all) and stale temp dirs.

    Each checkpoint leaves its name in one rename (to `.pruned`) before its files go, so a
    prune killed at any instant leaves complete `step-NNNNNN` directories only; the leftovers
    of such a prune are removed by the next one."""
    root = Path(root)
    removed = []
    for entry in root.iterdir():  # leftovers first: a `.pruned` name must be free for the rename below
        if entry.is_dir() and entry.name.endswith((".tmp", ".old", ".pruned")):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if keep > 0:
        latest = latest_checkpoint(root)
        doomed = []
        for _, path in list_checkpoints(root)[:-keep]:
            if path != latest:
                doomed.append(path.with_name(path.name + ".pruned"))
                os.replace(path, doomed[-1])  # from here on it is no checkpoint, whatever happens next
                removed.append(path)
        fsync_dir(root)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    return removed


#: Plain-data classes inside DeepSpeed ZeRO checkpoint files, allowed to the weights-only unpickler.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside the block uses weights_only=True (DeepSpeed passes False)."""
    allowed = []
    if "deepspeed" in sys.modules:  # importing it costs seconds; a DeepSpeed run has it already
        for name in DEEPSPEED_SAFE_GLOBALS:
            module, _, attr = name.rpartition(".")
            try:
                allowed.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError):
                pass
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore model/optimizer/scheduler/RNG from `checkpoint` (collective); returns trainer_state."""
    from accelerate.utils import DistributedType

    state = read_trainer_state(checkpoint)
    check_random_states(checkpoint, accelerator.process_index)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    try:
        with _weights_only_loads() if deepspeed else contextlib.nullcontext():
            accelerator.load_state(str(checkpoint))
    except Exception as error:
        raise CheckpointError(
            f"{checkpoint}: cannot restore the training state ({type(error).__name__}: {error}); a checkpoint "
            "resumes under the same parallelism (DDP/FSDP/DeepSpeed) and model config it was written with"
        ) from error
    return state


def check_random_states(checkpoint: Path, rank: int) -> bool:
    """Whether this rank's RNG states load; if not, a warning that the resume will not be exact.

    accelerate's load_state skips an unreadable random_states_<rank>.pkl with a log line at
    info level and goes on with the current RNG (dropout, masking and shuffling then differ from
    the uninterrupted run). The file is read here the same way accelerate reads it: torch.load
    with weights_only=True and numpy arrays allowed, so nothing in it can run code."""
    from accelerate.utils.other import load

    path = Path(checkpoint) / f"random_states_{rank}.pkl"
    try:
        states = load(path)
        for key in ("random_state", "numpy_random_seed", "torch_manual_seed"):
            states[key]
    except Exception as error:  # noqa: BLE001 - any reason: missing, torn, not a weights-only pickle
        reason = "missing" if not path.exists() else f"unreadable ({type(error).__name__}: {str(error)[:200]})"
        messages.warn(f"{path} is {reason}: rank {rank} resumes with fresh random states, so dropout, masking and "
                      "sampling after the resume differ from an uninterrupted run (the resume is not exact)",
                      all_ranks=True)
        return False
    return True


def load_initial_weights(model: torch.nn.Module, path) -> Path:
    """`train.init_from`: load the weights of a checkpoint (step-N, checkpoints/ or run directory) or
    of a stage export (final/, best/) into `model`, strictly; returns the weights file read.

    Only model.safetensors is read (never a pickle). The weights must fit this run's model exactly:
    the same stage and model config (fine-tuning from a pre-trained backbone is finetune.pretrained).
    """
    from safetensors.torch import load_file

    path = Path(path)
    candidates = [path]
    if not (path / "model.safetensors").is_file():
        try:
            found = find_checkpoint(str(path), path) if path.exists() else None
        except CheckpointError:
            found = None
        if found is not None:
            candidates.insert(0, found)
    weights = next((c / "model.safetensors" for c in candidates if (c / "model.safetensors").is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"train.init_from={path}: no model.safetensors there (expected a checkpoint step-NNNNNN of a DDP or "
            "single-process run, its run directory, or a stage export such as out_dir/final; a sharded FSDP/DeepSpeed "
            "checkpoint holds no whole weights: use that run's final/)")
    state = load_file(str(weights), device="cpu")
    mine = model.state_dict()
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    wrong = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"train.init_from={path}: {weights} does not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {wrong[:5]}); it must come from a run of the same stage and model "
            "config (a pre-trained backbone for fine-tuning goes in finetune.pretrained)")
    model.load_state_dict(state)
    return weights


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
