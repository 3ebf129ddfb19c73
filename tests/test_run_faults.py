"""Faults of a run directory: a second run on it, a rerun without --resume, a full disk, an
unreadable RNG state, an interrupted prune, the rows of re-run steps.

The full disk is real: a small tmpfs mounted for the test (needs root; skipped otherwise) and a
file-size limit (`RLIMIT_FSIZE`, any user) in a child process. The trainer runs the tiny model of
test_trainer.py on its tiny real shard set.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jetfm import checkpoint as ckpt
from jetfm import rundir
from jetfm.artifacts.atomic import WriteError, append_text, atomic_directory, atomic_write_text
from test_trainer import read_metrics, run, subprocess_env, tiny_config, write_tiny_dataset
from test_trainer import _fresh_accelerate_state  # noqa: F401 - autouse: a fresh Accelerator state per run

PAGE = 4096


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def small_disk(tmp_path):
    """`fill(free_bytes)` -> a directory on a fresh 1 MiB tmpfs with about `free_bytes` left."""
    mounts = []

    def fill(free_bytes: int) -> Path:
        mount = tmp_path / f"disk{len(mounts)}"
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
        mounts.append(mount)
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * (free - free_bytes))
        return mount

    yield fill
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# --------------------------------------------------------------------------- the lock
HOLDER = textwrap.dedent("""
    import sys
    from jetfm import rundir
    print(rundir.acquire_lock(sys.argv[1]), flush=True)
    sys.stdin.read()
""")


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path, tiny_data, capsys):
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 2})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "tiny")], env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "None"  # locked, no stale lock before
        assert run(config) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and "in use by another run" in err
        assert not (tmp_path / "tiny" / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock, the lock file still names the dead holder
        holder.wait()
    assert run(config) == 0
    err = capsys.readouterr().err
    assert f"stale lock {tmp_path / 'tiny' / rundir.LOCK_FILE} taken over: pid {holder.pid}" in err
    assert (tmp_path / "tiny" / rundir.LOCK_FILE).read_text() == ""  # released at the end: not stale


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path):
    """A child forked while the lock is held (a DataLoader worker) drops its copy of the lock file: once
    the parent lets go, the directory can be locked again while the child still lives."""
    import os
    import time

    run_dir = tmp_path / "run"
    assert rundir.acquire_lock(run_dir) is None
    child = os.fork()
    if child == 0:  # the child outlives the parent's hold on the lock
        time.sleep(10)
        os._exit(0)
    try:
        time.sleep(0.2)
        rundir.release_run_dir(run_dir)
        assert rundir.acquire_lock(run_dir) is None  # not "in use by another run" (the child)
        rundir.release_run_dir(run_dir)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


@pytest.mark.slow  # ~26 s: two processes start accelerate and gloo
def test_two_processes_refuse_a_locked_directory_on_every_rank(tmp_path, tiny_data):
    """DDP on 2 CPU processes: rank 0 finds the lock taken, every rank stops (no rank waits in a collective)."""
    from test_distributed import launch

    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 2})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "tiny")], env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        rc, out, _ = launch("ddp", config, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert rc != 0 and out.count(f"in use by another run: pid {holder.pid} on host") >= 1, out[-3000:]
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


def test_a_rerun_without_resume_is_refused_and_restart_moves_the_old_run_aside(tmp_path, tiny_data, capsys):
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 2})
    run_dir = tmp_path / "tiny"
    assert run(config) == 0
    final = (run_dir / "final" / "model.safetensors").read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert run(config, "train.max_steps=1") == 1
    err = capsys.readouterr().err
    assert "holds a previous run (checkpoints up to step 2, final/, metrics.jsonl, summary.json)" in err
    assert "--resume" in err and "--restart" in err
    assert (run_dir / "final" / "model.safetensors").read_bytes() == final  # nothing touched
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-000002"

    assert run(config, "--restart", "--resume") == 1
    assert "exclude each other" in capsys.readouterr().err

    assert run(config, "--restart", "train.max_steps=1") == 0
    aside = [p for p in run_dir.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in capsys.readouterr().err
    assert (aside[0] / "final" / "model.safetensors").read_bytes() == final
    assert (aside[0] / "metrics.jsonl").read_text() == metrics
    assert ckpt.latest_checkpoint(aside[0] / "checkpoints").name == "step-000002"
    assert sorted(read_metrics(run_dir)) == [1]  # the new run's own rows only
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-000001"


# --------------------------------------------------------------------------- a full disk
def test_a_full_disk_at_checkpoint_time_names_the_path_the_reason_and_the_free_space(tmp_path, tiny_data,
                                                                                    small_disk, capsys):
    disk = small_disk(3 * PAGE)  # the lock file and a little more: the checkpoint's weights do not fit
    config = tiny_config(tmp_path, tiny_data, out_dir=str(disk / "run"), model={"dim": 64},
                         train={"max_steps": 4, "checkpoint_every": 2, "log_every": 100})
    assert run(config) == 1
    err = capsys.readouterr().err
    step_dir = disk / "run" / "checkpoints" / "step-000002"
    assert f"jetfm: cannot write {step_dir}: No space left on device (ENOSPC" in err, err
    assert f"free on {disk}" in err and "no earlier checkpoint exists" in err
    assert "unexpected pos" not in err.split("ENOSPC")[0]  # the reason comes first, the writer's words after
    assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == []  # no .tmp left
    assert not list((disk / "run").glob("*.tmp"))


def test_a_full_disk_while_logging_leaves_whole_lines_and_no_temporary_file(tmp_path, tiny_data, small_disk,
                                                                           capsys):
    disk = small_disk(2 * PAGE)  # one page for the lock file, one for metrics.jsonl (about a dozen rows)
    config = tiny_config(tmp_path, tiny_data, out_dir=str(disk / "run"), train={"max_steps": 200})
    assert run(config) == 1
    err = capsys.readouterr().err
    path = disk / "run" / "metrics.jsonl"
    assert f"jetfm: cannot write {path}: No space left on device (ENOSPC); " in err, err
    assert f"free on {disk}" in err
    assert "warning: summary not written: cannot write" in err  # one line, not a second traceback
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and 5 < len(rows) < 200
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in (disk / "run").iterdir()) == [rundir.LOCK_FILE, "metrics.jsonl"]


def test_torch_writer_on_a_full_disk_is_called_a_full_disk(small_disk):
    """torch's zip writer says only "unexpected pos"; the free space left says why."""
    disk = small_disk(64 * PAGE)
    with pytest.raises(WriteError) as caught:
        with atomic_directory(disk / "export") as tmp:
            torch.save(torch.zeros(2**18), tmp / "weights.pt")  # 1 MiB into 256 KiB
    message = str(caught.value)
    assert message.startswith(f"cannot write {disk / 'export'}: No space left on device (ENOSPC")
    assert "free on" in message
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no temporary directory left


def test_summary_on_a_full_disk_keeps_the_old_one_and_no_temporary_file(small_disk):
    disk = small_disk(PAGE)
    atomic_write_text(disk / "summary.json", "{}\n")  # the last page
    with pytest.raises(WriteError, match=r"summary.json: No space left on device \(ENOSPC\); \d+ B free on"):
        atomic_write_text(disk / "summary.json", "x" * (2 * PAGE))
    assert (disk / "summary.json").read_text() == "{}\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "summary.json"]


APPEND_OVER_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from jetfm.artifacts.atomic import WriteError, append_text
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    try:
        append_text(sys.argv[1], sys.argv[3])
    except WriteError as error:
        print(error)
""")


def test_append_over_a_file_size_limit_leaves_no_torn_line(tmp_path):
    """RLIMIT_FSIZE: the kernel writes what fits (a short write), then refuses; the part is cut off."""
    path = tmp_path / "metrics.jsonl"
    append_text(path, '{"step": 1}\n')
    before = path.read_bytes()
    line = json.dumps({"step": 2, "pad": "x" * 200}) + "\n"
    done = subprocess.run([sys.executable, "-c", APPEND_OVER_LIMIT, str(path), str(len(before) + 50), line],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith(f"cannot write {path}: File too large (EFBIG); "), done.stdout + done.stderr
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- RNG states, prune, re-run rows
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["garbage", "payload"])
def test_an_unreadable_rng_state_warns_that_the_resume_is_not_exact(tmp_path, tiny_data, capsys, damage):
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0})
    assert run(config) == 0
    checkpoint = tmp_path / "tiny" / "checkpoints" / "step-000002"
    shutil.rmtree(checkpoint.parent / "step-000004")
    states = checkpoint / "random_states_0.pkl"
    marker = tmp_path / "payload-ran"
    if damage == "garbage":
        states.write_bytes(states.read_bytes()[:100])  # torn
    else:
        torch.save({"random_state": _Payload(marker)}, states, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    capsys.readouterr()
    assert run(config, "--resume") == 0
    err = capsys.readouterr().err
    assert f"jetfm: warning: {states} is unreadable" in err and "the resume is not exact" in err
    assert not marker.exists()  # read weights-only: nothing in it runs


def test_an_intact_rng_state_gives_no_warning(tmp_path, tiny_data, capsys):
    config = tiny_config(tmp_path, tiny_data, train={"max_steps": 2, "checkpoint_every": 2})
    assert run(config) == 0
    assert ckpt.check_random_states(tmp_path / "tiny" / "checkpoints" / "step-000002", 0)
    assert "not exact" not in capsys.readouterr().err


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / ckpt.step_name(step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 100)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_an_interrupted_prune_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(root, step)
    (root / ckpt.LATEST).write_text("step-000006\n")
    real_rmtree = shutil.rmtree

    def killed_after_the_weights(path, *args, **kwargs):  # the process dies inside the first deletion
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(root, keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    # every step-NNNNNN left is complete; the half-deleted one no longer carries a step name
    for _, path in ckpt.list_checkpoints(root):
        assert (path / "model.safetensors").is_file(), path
    assert ckpt.latest_checkpoint(root).name == "step-000006"
    ckpt.prune(root, keep=1)  # the next prune finishes the job
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000006"]


def test_rerun_rows_are_replaced_and_a_torn_line_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": s / 10}) + "\n" for s in (1, 2, 3, 4))
                    + json.dumps({"step": 4, "val/loss": 1.0}) + "\n" + '{"step": 5, "train/lo')
    assert rundir.drop_rerun_rows(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert rundir.drop_rerun_rows(path, 3) == 0
