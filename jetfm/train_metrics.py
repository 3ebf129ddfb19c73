"""What the training loop measures, kept on the device until a log step: the Window of sums
over a logging interval, the NaN policy's record of the first non-finite step, and summary.json.

The loop adds to a Window every step without waiting for the device; `Window.totals` reads every
process's sums once (a gather) on the steps that log, validate or checkpoint, and the NaN check,
the logged record and the throughput all come from that one read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from jetfm import messages
from jetfm.artifacts.atomic import atomic_write_text


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm at `step`: the run stops with exit status 3."""

    def __init__(self, step: int, loss: float, grad_norm: float | None, reason: str):
        self.step, self.loss, self.grad_norm, self.reason = step, loss, grad_norm, reason
        super().__init__(f"non-finite {reason} at step {step}: loss={loss}, grad_norm={grad_norm}")


class Window:
    """Sums over one logging interval, kept on the device and read once, at a log or checkpoint step.

    It also notes the interval's first non-finite step (loss or gradient norm), which the
    NaN policy checks there. Loss and gradient norm sum in float64, as the host did before.
    """

    def __init__(self, device: torch.device, first_step: int):
        self.first_step = first_step  # the step number of the interval's first step
        self.steps = self.micro = self.jets = self.particles = self.grad_norm_steps = 0
        self.time, self.lr = 0.0, 0.0
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros_like(self.loss)
        self.finite_steps = torch.zeros_like(self.loss)  # steps before the first non-finite one
        self.first_bad = torch.zeros(3, dtype=torch.float64, device=device)  # [seen, its loss, its grad norm]
        self.metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (sum, count), float64
        self.extra: dict[str, Any] = {}

    def add(self, loss, grad_norm, metric_sums, micro, jets, particles, lr) -> None:
        """One optimizer step: `loss` (this process's mean) and `grad_norm` are 0-dim device tensors;
        `metric_sums` maps a name to (sum, count) 0-dim tensors over the step's micro-batches."""
        self.steps += 1
        self.micro += micro
        self.jets += jets
        self.particles += particles
        self.lr = lr
        loss = loss.double()
        self.loss += loss
        finite = torch.isfinite(loss)
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.grad_norm_steps += 1
            finite &= torch.isfinite(grad_norm)
        for key, (total, count) in metric_sums.items():
            prev = self.metrics.get(key)
            total, count = total.to(self.loss.device), count.to(self.loss.device)
            self.metrics[key] = (total, count) if prev is None else (prev[0] + total, prev[1] + count)
        clean = self.first_bad[0] == 0  # no non-finite step before this one
        self.finite_steps += clean & finite
        record = torch.stack([torch.ones_like(loss), loss, grad_norm if grad_norm is not None else loss * math.nan])
        self.first_bad = torch.where(clean & ~finite, record, self.first_bad)

    def _row(self) -> torch.Tensor:
        """(8 + 2K,) this process's [loss, grad_norm, finite_steps, seen, bad loss, bad grad norm, jets,
        particles], then (sum, count) of each metric in name order (the same names on every process)."""
        counts = torch.tensor([self.jets, self.particles], dtype=torch.float64)
        metrics = [v for key in sorted(self.metrics) for v in self.metrics[key]]
        return torch.cat([torch.stack([self.loss, self.grad_norm, self.finite_steps]), self.first_bad,
                          counts.to(self.loss.device, non_blocking=True),
                          torch.stack(metrics) if metrics else self.loss.new_zeros(0)])

    def totals(self, accelerator) -> dict:
        """Every process's row, read on the host: the interval's one device sync (collective)."""
        row = self._row()[None]
        rows = (accelerator.gather(row) if accelerator.num_processes > 1 else row).tolist()
        return {"rows": rows, "rank": accelerator.process_index, "jets": sum(r[6] for r in rows),
                "particles": sum(r[7] for r in rows)}

    def first_nonfinite(self, totals: dict | None = None, *, local: bool = False) -> Diverged | None:
        """The first non-finite step over all processes (or this one, `local`: no collective), if any."""
        try:
            rows = self._row()[None].tolist() if local else totals["rows"]
        except Exception:  # noqa: BLE001 - a broken device cannot tell; the caller's error stands
            return None
        bad = [r for r in rows if r[3] > 0]
        if not bad:
            return None
        first = min(bad, key=lambda r: r[2])
        loss, grad_norm = first[4], (first[5] if self.grad_norm_steps else None)
        reason = "loss" if not math.isfinite(loss) else "gradient norm"
        return Diverged(self.first_step + int(first[2]), loss, grad_norm, reason)

    def summary(self, totals: dict, *, world: int, memory_gb: float, epoch: float) -> dict[str, float]:
        """The logged record: mean loss over steps and processes, metrics over every process (sum /
        count: per prediction for the stage's Ratios, per micro-batch for plain numbers), throughput."""
        steps = max(self.steps, 1)
        rows = totals["rows"]
        out = {"train/loss": sum(r[0] for r in rows) / world / steps}
        for i, key in enumerate(sorted(self.metrics)):
            total, count = (sum(r[8 + 2 * i + j] for r in rows) for j in (0, 1))
            out[f"train/{key}"] = total / count if count else math.nan
        for key, value in self.extra.items():
            out[f"train/{key}"] = float(value)
        out["lr"] = self.lr
        if self.grad_norm_steps:  # the same on every process
            out["grad_norm"] = rows[totals["rank"]][1] / self.grad_norm_steps
        seconds = max(self.time, 1e-9)
        out["perf/jets_per_s"] = totals["jets"] / seconds
        out["perf/particles_per_s"] = totals["particles"] / seconds
        out["perf/step_time_s"] = self.time / steps
        out["perf/memory_gb"] = memory_gb
        out["epoch"] = float(epoch)
        return out


def grad_norm_tensor(value, device: torch.device) -> torch.Tensor | None:
    """The gradient norm as a 0-dim float64 tensor on the device, without waiting for it (None: unknown)."""
    if value is None:
        return None
    if hasattr(value, "full_tensor"):  # FSDP2 returns a replicated DTensor
        value = value.full_tensor()
    if not torch.is_tensor(value):  # DeepSpeed reports a number
        value = torch.tensor(float(value), dtype=torch.float64).to(device, non_blocking=True)
    return value.detach().to(torch.float64).reshape(())


def nonfinite_now(accelerator, loss, grad_norm, step: int) -> Diverged | None:
    """nan_policy=skip: this step's mean loss over processes and its gradient norm, read on the host."""
    values = torch.stack([loss.double(), grad_norm if grad_norm is not None else torch.zeros_like(loss.double())])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum") / accelerator.num_processes
    loss_value, norm_value = values.tolist()
    norm_value = norm_value if grad_norm is not None else None
    if math.isfinite(loss_value) and (norm_value is None or math.isfinite(norm_value)):
        return None
    return Diverged(step, loss_value, norm_value, "loss" if not math.isfinite(loss_value) else "gradient norm")


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_summary(run_dir: Path, is_main: bool, summary: dict) -> bool:
    """summary.json, whole or not at all: a write that fails (a full disk) leaves the previous one
    (or none) and no temporary file, and is one warning naming the file and the free space, not an
    error on top of the one that may be ending the run. Whether it was written."""
    if not is_main:
        return True
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    except OSError as error:  # WriteError from atomic_write_text; mkdir's own OSError
        messages.warn(f"summary not written: {error}")
        return False
    return True


def format_summary(s: dict) -> str:
    train, val = s.get("train") or {}, s.get("val") or {}
    rows = [
        ("status", f"{s['status']}" + (f" — {s['message']}" if s.get("message") else "")),
        ("steps", f"{s['steps']} / {s['max_steps']} ({s['epoch']} epochs)"),
        ("train loss", f"{train['train/loss']:.4g}" if "train/loss" in train else "- (before the first log step)"),
        ("val", ", ".join(f"{k} {v:.4g}" for k, v in list(val.items())[:4]) or "-"),
        ("throughput", f"{s['mean_jets_per_s']:,.0f} jets/s" if s.get("mean_jets_per_s") else "-"),
        ("time", f"{s['wall_time_s']:.1f} s wall, {s['train_time_s']:.1f} s in steps"),
        ("checkpoint", s.get("checkpoint") or "-"),
        ("mlflow", f"{s['mlflow']['uri']} run {s['mlflow']['run_id']}" if s["mlflow"]["run_id"] else "off"),
        ("summary", f"{s['out_dir']}/summary.json"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
