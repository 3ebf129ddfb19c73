"""The per-step collectives of the training loop, and how its losses are normalised.

`loss_norms` gives each micro-batch of a step its LossNorm from the global prediction counts (one
all-reduce before the first forward), `step_seed` the step's MPM mask seed, `add_metrics` adds a
micro-batch's metrics on the device; `host_group` and `make_stop_vote` agree on a stop signal over
gloo on the host, and `StopSignals` catches SIGTERM/SIGINT. Kept apart from jetfm/train.py so the
loop reads top to bottom and validation (jetfm/validation.py) uses the same normalisation.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import torch

from jetfm.models.objectives import LossNorm, Ratio


def loss_norms(unwrapped, micro: list, accelerator, mask_seed: int) -> list[LossNorm | None]:
    """One LossNorm per micro-batch of a step, from the stage's `loss_counts(batch)` hook (None
    each if it has none: its forward then normalises per micro-batch).

    The counts of every micro-batch of every process are added in one all-reduce before any
    forward; each denominator is that global count / (processes x micro-batches), see LossNorm.
    A jet's place in the global batch (for its MPM mask) is rank-major, from the jet counts of every
    micro-batch of every process, gathered on the host (micro-batches may differ by a jet: the data
    streams split a global batch as evenly as they can), so a split never moves a jet.
    """
    counts_of = getattr(unwrapped, "loss_counts", None)
    if counts_of is None:
        return [None] * len(micro)
    accum = len(micro)  # the same on every process
    counts = [counts_of(batch) for batch in micro]
    names = sorted(counts[0])
    total = torch.stack([sum(c[name] for c in counts).float().reshape(()) for name in names])
    world = accelerator.num_processes
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    # an objective with no prediction anywhere has a zero sum: any positive denominator keeps it 0
    denominators = dict(zip(names, (total.clamp(min=1) / (world * accum)).unbind()))
    rank = accelerator.process_index
    jets = torch.tensor([batch.num_jets for batch in micro], dtype=torch.int64)  # host ints: no device sync
    if world > 1:
        import torch.distributed as dist

        every = [torch.empty_like(jets) for _ in range(world)]
        dist.all_gather(every, jets, group=host_group())
        jets = torch.cat(every)
    offsets = [0, *torch.cumsum(jets, 0).tolist()]
    return [LossNorm(denominators, mask_seed, offsets[rank * accum + i]) for i in range(len(micro))]


def step_seed(seed: int, step: int) -> int:
    """The MPM mask seed of optimizer step `step` (validation uses step 0): the same on every process."""
    return (seed * 1_000_003 + step) & 0xFFFFFFFF


def add_metrics(sums: dict, out: dict) -> None:
    """Add a micro-batch's metrics to `sums`: Ratios add sum and count; a plain number adds itself
    and 1 (a mean over micro-batches)."""
    for key, value in out.items():
        if key == "loss":
            continue
        total, count = value if isinstance(value, Ratio) else (value, 1.0)
        total = torch.as_tensor(total).detach().double()
        count = torch.as_tensor(count).detach().double().to(total.device)
        prev = sums.get(key)
        sums[key] = (total, count) if prev is None else (prev[0] + total, prev[1] + count)


_HOST_GROUPS: dict = {}


def host_group():
    """The process group for small host-side collectives: the default one when it is gloo, else a
    second, gloo group (created on first use: a collective call, made by every process in step)."""
    import torch.distributed as dist

    if "gloo" in str(dist.get_backend()):
        return None
    if "gloo" not in _HOST_GROUPS:
        _HOST_GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _HOST_GROUPS["gloo"]


def make_stop_vote(accelerator) -> Callable[[bool], bool]:
    """`vote(received) -> bool`: whether any process got SIGTERM/SIGINT, agreed on every step.

    Several processes all-reduce one number on the host, over gloo (a second, CPU group when the
    main one is NCCL), so agreeing never waits for the device's queue of work.
    """
    if accelerator.num_processes == 1:
        return lambda received: received
    import torch.distributed as dist

    group = host_group()  # collective the first time

    def vote(received: bool) -> bool:
        flag = torch.tensor([1.0 if received else 0.0])
        dist.all_reduce(flag, group=group)
        return bool(flag.item() > 0)

    return vote


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 0.

    Signals after the first are absorbed: a pre-empted job gets SIGTERM several times (SLURM
    signals every process of the step, the launcher forwards its own copy, the batch script
    forwards the time-limit warning), and a repeat must not kill a process that is writing the
    checkpoint. Once stopped, the process keeps ignoring them until it exits (restore() turns a
    default, fatal disposition into "ignore"); SIGKILL still aborts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.absorbed = 0  # signals after the first
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self.absorbed += 1
            if self.absorbed == 1:
                _signal_note(f"[jetfm] {name} again: already stopping, absorbed until the checkpoint is written and "
                             "the process exits (SIGKILL aborts)")
            return
        self.received = name
        _signal_note(f"\n[jetfm] {name}: finishing this step, writing a checkpoint, then exiting (further signals "
                     "are absorbed)")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if self.received is not None and handler in (signal.SIG_DFL, None):
                handler = signal.SIG_IGN  # on its way out: a repeated pre-emption signal must not make it a crash
            signal.signal(sig, handler)
        self._previous = {}


def _signal_note(text: str) -> None:
    """Write from a signal handler: os.write, because print() into a stderr write that the signal
    interrupted raises "reentrant call" inside the training loop."""
    try:
        os.write(2, (text + "\n").encode())
    except (OSError, ValueError):
        pass
