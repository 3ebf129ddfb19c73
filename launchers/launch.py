"""Run `accelerate launch` or `torchrun` so that a stop signal ends in a checkpoint and exit 0.

    python launchers/launch.py accelerate --config_file configs/accelerate/ddp.yaml ... jetfm/train.py --config X
    python launchers/launch.py torchrun --nproc_per_node 8 ... jetfm/train.py --config X

(launchers/slurm.sh and launchers/torchrun.sh call it; the arguments after the first are the
launcher's own.) Both launchers run torch elastic, which on SIGTERM/SIGINT forwards SIGTERM to
the training processes, kills them 30 s later and exits 1 — and a second SIGTERM (SLURM signals
every process of a job step, repeatedly) aborts its wait, so the job step ends and SLURM kills
the processes in the middle of their checkpoint. Here the launcher process instead:

- forwards SIGTERM to its children (the trainers; they run in their own sessions, so a Ctrl-C or
  a `kill` of the launcher alone would not reach them) and otherwise absorbs SIGTERM, SIGINT
  and repeats of them: it keeps waiting while the trainers finish their step and write the
  checkpoint (jetfm/train.py absorbs repeats too);
- exits with the trainers' status: 0 after a clean stop, so the job is marked done and a
  requeued job resumes (`--resume auto`).

Torch elastic keeps handling SIGHUP and SIGQUIT (PET_SIGNALS_TO_HANDLE); SIGKILL from the
scheduler at the end of a grace period still ends everything.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

import psutil  # a dependency of accelerate; imported here, never inside the signal handler

LAUNCHERS = {"accelerate": "accelerate.commands.launch", "torchrun": "torch.distributed.run"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Forwarder:
    """Signal handler of the launcher process: SIGTERM to every child, once per signal received."""

    def __init__(self):
        self.received = 0

    def __call__(self, signum, frame) -> None:
        self.received += 1
        children = psutil.Process().children()
        if self.received == 1:
            note = (f"[jetfm launcher] {signal.Signals(signum).name}: SIGTERM to {len(children)} training "
                    "process(es); waiting for their checkpoint (repeats are absorbed)\n")
            try:
                os.write(2, note.encode())
            except OSError:
                pass
        for child in children:
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.Error:  # exited meanwhile
                pass


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in LAUNCHERS:
        sys.exit(f"usage: {sys.argv[0]} accelerate|torchrun [launcher arguments ...]")
    module = LAUNCHERS[argv[0]]
    # torch elastic must not act on the stop signals itself (it would kill the trainers 30 s later
    # and exit 1); it keeps its handling of the others
    os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ.get("JETFM_LAUNCHER_SIGNALS", "SIGHUP,SIGQUIT")
    forward = Forwarder()
    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
