"""One run per run directory: an exclusive lock, and no silent start-over on a previous run.

    lock = claim_run_dir(accelerator, run_dir, resume=None, restart=False)   # in setup(), rank 0 holds it
    ...
    release_run_dir(run_dir)                                                 # at the end of train()

The lock is `out_dir/.jetfm.lock`, held with `fcntl.flock` by rank 0 for the whole run. The
kernel drops a flock when its holder dies (SIGKILL, OOM, node reboot), so a dead run never blocks
the next one; the file's text (host, pid, start time) only names the holder in the refusal. A lock
file that still names someone while nobody holds the lock is stale: the run that wrote it died;
that is reported, then taken over. flock on NFS is only as good as the server's lock support.

A directory that already holds a run (checkpoints, final/, best/, metrics.jsonl, summary.json)
is not started over by default: the run needs `--resume` (continue it) or `--restart` (move the
old run into `out_dir/replaced-<UTC time>/` and start fresh); nothing is deleted either way.

On resume, metrics.jsonl loses the rows logged after the checkpoint it resumes from: those steps
are about to run again and their new rows replace the old ones instead of repeating them.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from .artifacts.atomic import WriteError, atomic_write_text, describe_write_failure
from .checkpoint import CHECKPOINTS, list_checkpoints

LOCK_FILE = ".jetfm.lock"
METRICS_FILE = "metrics.jsonl"
#: what makes a directory "hold a run" (a start-over would replace or mix with it)
RUN_OUTPUTS = ("final", "best", METRICS_FILE, "summary.json")

_HELD: dict[Path, int] = {}  # run directory -> the open, flocked lock file of this process


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the copies of this process's lock files.
    Why: a flock belongs to the open file, which fork shares, so a child kept the run's lock alive
    for as long as it lived; a trainer killed with SIGKILL then blocked its own `--resume` until
    the last of its children had gone. Closing the child's copy leaves the parent's lock as it is."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunDirError(RuntimeError):
    """The run directory is taken by another run, or holds one that this run would clobber."""


def _holder_text() -> str:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}) + "\n"


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (the lock file names none)"


def acquire_lock(run_dir: Path) -> str | None:
    """Take the exclusive lock of `run_dir` for this process (re-entrant within the process).

    Returns a note when a stale lock file (a dead holder) was taken over, else None; raises
    RunDirError naming the holder when another live process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return None
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # a read-only or full filesystem, no permission
        raise WriteError(describe_write_failure(path, error), error) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RunDirError(f"{path}: cannot lock the run directory ({error.strerror})") from error
        raise RunDirError(
            f"{run_dir} is in use by another run: {_describe_holder(_read(path))} holds {path}. Wait for it to end, "
            "stop it, or give this run another out_dir"
        ) from None
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        os.fsync(fd)
    except OSError as error:
        os.close(fd)
        raise WriteError(describe_write_failure(path, error), error) from error
    _HELD[run_dir] = fd
    if previous:
        return (f"stale lock {path} taken over: {_describe_holder(previous)} did not release it (it died or was "
                "killed); its run directory is continued or checked as usual")
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def release_run_dir(run_dir: Path) -> None:
    """Drop this process's lock on `run_dir` (emptied first: an empty lock file is not stale)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing the only descriptor releases the flock


def previous_run(run_dir: Path) -> list[str]:
    """What of an earlier run `run_dir` holds (empty: nothing a fresh start would touch)."""
    run_dir = Path(run_dir)
    found = []
    checkpoints = list_checkpoints(run_dir / CHECKPOINTS)
    if checkpoints:
        found.append(f"checkpoints up to step {checkpoints[-1][0]}")
    found += [f"{name}/" if (run_dir / name).is_dir() else name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    return found


def move_aside(run_dir: Path) -> Path:
    """`--restart`: every entry of `run_dir` but the lock into `run_dir/replaced-<UTC time>/` (renames only)."""
    run_dir = Path(run_dir)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = run_dir / f"replaced-{stamp}"
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_FILE and entry != aside and not entry.name.startswith("replaced-"):
            os.replace(entry, aside / entry.name)
    return aside


def drop_rerun_rows(path: Path, step: int) -> int:
    """Remove the rows of steps after `step` (and a torn last line) from a metrics.jsonl; how many went."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a torn line (the writer died mid-line) or foreign text
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def claim_run_dir(accelerator, run_dir: Path, *, resume: str | None, restart: bool,
                  resume_step: int | None) -> list[str]:
    """Lock `run_dir` (rank 0), refuse to clobber a previous run, prepare metrics.jsonl (collective).

    `resume_step`: the step of the checkpoint this run resumes from (None: a fresh start).
    Returns notes for the log; raises RunDirError on every rank when rank 0 refuses."""
    from accelerate.utils import broadcast_object_list

    notes: list[str] = []
    failure: str | None = None
    if accelerator.is_main_process:
        try:
            failure = _claim(Path(run_dir), resume, restart, resume_step, notes)
        except (RunDirError, WriteError) as error:
            failure = str(error)
    if accelerator.num_processes > 1:
        failure = broadcast_object_list([failure])[0]
    if failure is not None:
        raise RunDirError(failure)
    return notes


def _claim(run_dir: Path, resume: str | None, restart: bool, resume_step: int | None, notes: list[str]) -> str | None:
    if restart and resume is not None:
        return "--restart and --resume exclude each other: continue the run (--resume) or start it over (--restart)"
    stale = acquire_lock(run_dir)
    if stale:
        notes.append(stale)
    try:
        held = previous_run(run_dir)
        if restart and held:
            notes.append(f"--restart: the previous run ({', '.join(held)}) was moved to {move_aside(run_dir)}")
        elif resume is None and held:
            release_run_dir(run_dir)
            return (f"{run_dir} holds a previous run ({', '.join(held)}); continue it with --resume, start over with "
                    "--restart (moves it into a replaced-<time>/ subdirectory, nothing is deleted), or choose another "
                    "out_dir")
        if resume_step is not None:
            dropped = drop_rerun_rows(run_dir / METRICS_FILE, resume_step)
            if dropped:
                notes.append(f"{METRICS_FILE}: {dropped} row(s) after step {resume_step} removed; those steps run again")
        elif resume is not None and (run_dir / METRICS_FILE).exists():  # --resume auto with no checkpoint yet
            drop_rerun_rows(run_dir / METRICS_FILE, 0)
    except BaseException:
        release_run_dir(run_dir)
        raise
    return None
