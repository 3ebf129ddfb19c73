"""Stopping cleanly under a scheduler: repeated signals, launchers/slurm.sh with a fake SLURM.

A pre-empted SLURM job gets SIGTERM in every process of its step (the launcher and each
trainer), often more than once (the launcher forwards its own copy, the batch script the
time-limit warning). The trainer must absorb the repeats until its checkpoint is written, and
the launcher must wait for it and exit 0. The fast test sends a storm of SIGTERMs to one
trainer through its checkpoint write; the slow test runs the real batch script with fake
`srun`/`scontrol`/`scancel` on PATH (2 processes, gloo): a time-limit warning that ends in a
requeue, then 10 pre-emptions in a row, each resumed from the checkpoint of the one before.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_trainer import (  # noqa: F401 - fixtures
    REPO,
    _fresh_accelerate_state,
    read_metric_records,
    subprocess_env,
    tiny_config,
    tiny_data,
)

from jetfm import checkpoint as ckpt


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} had {n} lines")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


def assert_loadable(checkpoint: Path) -> dict:
    """A complete checkpoint: weights load (safetensors), the trainer state parses."""
    from safetensors.torch import load_file

    assert checkpoint.is_dir() and not checkpoint.name.endswith(".tmp"), checkpoint
    weights = load_file(checkpoint / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    return json.loads((checkpoint / ckpt.STATE_FILE).read_text())


def test_repeated_signals_during_the_checkpoint_write_are_absorbed(tmp_path, tiny_data):
    """SIGTERM every few ms from step 3 until the process exits: one checkpoint, exit 0."""
    config = tiny_config(tmp_path, tiny_data, name="storm", train={"max_steps": 100000, "checkpoint_every": 0})
    log = open(tmp_path / "storm.log", "w+")
    proc = subprocess.Popen([sys.executable, str(REPO / "jetfm" / "train.py"), "--config", str(config)],
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "storm"
    wait_for_lines(run_dir / "metrics.jsonl", 3, proc)
    sent = during_write = 0
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        writing = any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").glob("step-*"))
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        during_write += writing
        time.sleep(0.002)
    proc.wait(timeout=60)
    out = (tmp_path / "storm.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert sent > 20 and during_write >= 1, (sent, during_write)  # the storm reached into the checkpoint write
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "absorbed" in summary["message"], summary["message"]
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == ckpt.step_name(summary["steps"])
    assert assert_loadable(latest)["step"] == summary["steps"]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


# --------------------------------------------------------------------------- a fake SLURM
FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: runs its one task on this machine, as SLURM node 0; records the step for scancel
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
echo $$ >> "$FAKE_SLURM_DIR/steps"
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_ID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: the node list is this machine; a requeue is recorded
case "$1" in
    show) [[ $2 == hostnames ]] && echo 127.0.0.1 ;;
    requeue) echo "$2" >> "$FAKE_SLURM_DIR/requeued" ;;
    *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""
FAKE_SCANCEL = """#!{python}
# fake scancel --signal=SIG JOBID: the signal to every process of the job's steps (not the batch shell)
import os, signal, sys
import psutil
sig = getattr(signal, "SIG" + sys.argv[1].split("=", 1)[1].removeprefix("SIG"))
for line in open(os.path.join(os.environ["FAKE_SLURM_DIR"], "steps")):
    try:
        step = psutil.Process(int(line))
        for p in [step, *step.children(recursive=True)]:
            p.send_signal(sig)
    except psutil.Error:
        pass
"""


def fake_slurm(tmp_path: Path) -> tuple[Path, dict]:
    """A bin directory with fake srun/scontrol/scancel and the job's SLURM environment."""
    bin_dir, state = tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("scancel", FAKE_SCANCEL.format(python=sys.executable))):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    while True:  # a job id whose derived port (20000 + id % 20000) is free here
        job_id = random.randrange(1000, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
                break
            except OSError:
                continue
    env = subprocess_env({
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(state),
        "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
        "SLURM_SUBMIT_DIR": str(tmp_path),  # not the checkout: JETFM_DIR says where it is
        "JETFM_DIR": str(REPO), "JETFM_ACTIVATE": f"echo activated for job {job_id}",
        "PYTHON": sys.executable, "GPUS_PER_NODE": "2",
        "ACCELERATE_CONFIG": "configs/accelerate/ddp.yaml", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
    })
    env.pop("MASTER_PORT", None)
    return state, env


class Job:
    """One run of launchers/slurm.sh (a job, or its requeued restart) under the fake SLURM."""

    def __init__(self, tmp_path: Path, env: dict, config: Path, *args: str, restart: int = 0):
        self.log_path = tmp_path / f"job-{restart}.log"
        self.log = open(self.log_path, "w")
        env = {**env, "SLURM_RESTART_COUNT": str(restart)}
        self.proc = subprocess.Popen(["bash", str(REPO / "launchers" / "slurm.sh"), str(config), *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def processes(self) -> list[psutil.Process]:
        """The batch shell, the launcher and the trainers."""
        try:
            shell = psutil.Process(self.proc.pid)
            return [shell, *shell.children(recursive=True)]
        except psutil.Error:
            return []

    def preempt(self, repeats: int = 3, every: float = 0.3) -> None:
        """SIGTERM to every process of the job, `repeats` times (a pre-emption as SLURM sends it, repeated)."""
        for _ in range(repeats):
            for p in self.processes():
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
            time.sleep(every)

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc, self.log_path.read_text()


@pytest.mark.slow
def test_slurm_time_limit_requeue_and_ten_preemptions(tmp_path, tiny_data):
    state, env = fake_slurm(tmp_path)
    config = tiny_config(tmp_path, tiny_data, name="slurm", train={"max_steps": 100000, "checkpoint_every": 0})
    run_dir = tmp_path / "slurm"
    metrics = run_dir / "metrics.jsonl"
    port = 20000 + int(env["SLURM_JOB_ID"]) % 20000

    # time limit: USR1 to the batch shell -> SIGTERM to the step -> checkpoint -> exit 0 -> requeue
    job = Job(tmp_path, env, config)
    wait_for_lines(metrics, 2, job.proc)
    job.proc.send_signal(signal.SIGUSR1)
    rc, out = job.wait()
    assert rc == 0, out[-4000:]
    assert f"master 127.0.0.1:{port}" in out and "time limit near" in out
    assert f"activated for job {env['SLURM_JOB_ID']}" in out  # JETFM_ACTIVATE ran on the node
    assert (state / "requeued").read_text().split() == [env["SLURM_JOB_ID"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["distributed"]["num_processes"] == 2
    previous = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert previous.name == ckpt.step_name(summary["steps"])
    assert_loadable(previous)

    # pre-emptions: every process gets SIGTERM three times; each requeued job resumes the previous checkpoint
    for restart in range(1, 11):
        lines = len(metrics.read_text().splitlines())
        job = Job(tmp_path, env, config, restart=restart)
        wait_for_lines(metrics, lines + 2, job.proc)
        job.preempt()
        rc, out = job.wait()
        assert rc == 0, f"pre-emption {restart}: exit {rc}\n{out[-4000:]}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted", (restart, summary["message"])
        assert summary["resumed_from"] == str(previous), (restart, summary["resumed_from"], str(previous))
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        assert latest.name == ckpt.step_name(summary["steps"]) and latest != previous
        assert assert_loadable(latest)["step"] == summary["steps"]
        previous = latest
    assert (state / "requeued").read_text().split() == [env["SLURM_JOB_ID"]]  # pre-emption: SLURM requeues

    # the last requeued job finishes: every step logged, in order, none lost across the 11 stops
    end = summary["steps"] + 2
    job = Job(tmp_path, env, config, f"train.max_steps={end}", restart=11)
    rc, out = job.wait()
    assert rc == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == end and (run_dir / "final").is_dir()
    steps = [s for s, _ in read_metric_records(run_dir)]
    assert sorted(set(steps)) == list(range(1, end + 1))
