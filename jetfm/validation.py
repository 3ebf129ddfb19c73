"""Validation and the exports of a training run: `validate` (the stage's evaluate or the mean loss
per prediction, over every process), `export_final` (out_dir/final or out_dir/best in the stage's
format), `_guarded_export` (a failed export still lets the run close) and `_improves` (model
selection). Used by jetfm/train.py, kept apart so the training entry point stays short.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any

import torch

from jetfm import stages
from jetfm.artifacts.exports import export_stage
from jetfm.config import Config
from jetfm.distributed import full_state_dict
from jetfm.models.objectives import Ratio
from jetfm.step_sync import add_metrics, loss_norms, step_seed


def validate(model, unwrapped, loader, start_state, evaluate, cfg: Config, accelerator, out_dir: Path | None) -> dict:
    """Validation metrics over every process (losses per prediction where the stage counts them);
    never disturbs the training RNG streams."""
    loader.load_state_dict(start_state)
    device = accelerator.device
    batches = (b.to(device) for b in itertools.islice(loader, cfg.train.eval_batches))
    rng_devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            if evaluate is not None:
                result = evaluate(unwrapped, batches, cfg, out_dir)
                # the stage's own order (the same on every rank), numbers only: a Ratio is added over
                # processes before dividing, a plain number is averaged over processes
                names = [k for k, v in result.items()
                         if isinstance(v, (int, float, Ratio)) or torch.is_tensor(v)]
                pairs = [(v.total, v.count) if isinstance(v, Ratio) else (float(v), 1.0)
                         for v in (result[k] for k in names)]
                values = torch.tensor([[float(t), float(c)] for t, c in pairs], device=device, dtype=torch.float64)
                if accelerator.num_processes > 1:
                    values = accelerator.reduce(values, reduction="sum")
                return {k: (t / c if c else math.nan) for k, (t, c) in zip(names, values.tolist())}
            # the mean loss, per prediction over every batch of every process (the same masks and
            # normalisation as training: the stage's loss_counts hook, one denominator for the lot)
            batches = list(batches)
            norms = loss_norms(unwrapped, batches, accelerator, step_seed(cfg.seed, 0))
            counted = bool(norms) and norms[0] is not None
            # with norms every batch's loss is its share of the mean: over all batches and processes they
            # add up to (processes x batches) x the per-prediction mean; without, losses are weighted per jet
            loss_total = torch.zeros((), device=device, dtype=torch.float64)
            weight = float(len(batches)) if counted else float(sum(b.num_jets for b in batches))
            metric_sums: dict[str, Any] = {}
            for batch, norm in zip(batches, norms):
                out = model(batch) if norm is None else model(batch, norm=norm)
                loss_total += out["loss"].double() * (1.0 if counted else batch.num_jets)
                add_metrics(metric_sums, out)
            names = sorted(metric_sums)
            stats = torch.stack([loss_total, torch.tensor(weight, device=device, dtype=torch.float64)]
                                + [v.to(device) for k in names for v in metric_sums[k]])
            if accelerator.num_processes > 1:
                stats = accelerator.reduce(stats, reduction="sum")
            loss = stats[0] / stats[1].clamp(min=1)
            result = {"loss": loss.item()}
            for i, k in enumerate(names):
                total, count = stats[2 + 2 * i].item(), stats[3 + 2 * i].item()
                result[k] = total / count if count else math.nan
            return result
    finally:
        model.train()


def export_final(accelerator, model, unwrapped, cfg: Config, manifest, run_dir: Path, name: str = "final",
                 note: dict | None = None) -> Path:
    """Write the trained model to run_dir/<name> (final, or best: the stage's best_metric) with the
    stage's exporter (collective call); `note` is written beside it as <name>/selection.json. The
    directory is published whole (jetfm.artifacts.exports.export_stage): a run killed while
    exporting leaves the previous <name>/ or none, never half of one.

    Sharded runs (FSDP2, DeepSpeed) gather the full weights and rank 0 loads them into a fresh
    CPU copy of the model; replicated runs export the module itself.
    """
    from accelerate.utils import DistributedType

    final = run_dir / name
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = full_state_dict(accelerator, model)  # collective: full (fp32 master) tensors
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return final
        with torch.random.fork_rng(devices=[]):
            module = stages.build_model(cfg, manifest)
        module.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    else:
        module = unwrapped
    if accelerator.is_main_process:
        # one directory published whole: weights, config and selection.json, or the previous export
        export_stage(stages.stage_exporter(cfg), module, cfg, final, note)
    accelerator.wait_for_everyone()
    return final


def _guarded_export(export, *args) -> tuple[Path | None, str]:
    """(directory, "") or (None, message): a failed export still lets the run close its MLflow run,
    write summary.json and exit non-zero with the message (the last checkpoint stays usable)."""
    try:
        return export(*args), ""
    except Exception as error:  # noqa: BLE001 - reported, and the exit status says it failed
        message = f"export of the trained model failed: {type(error).__name__}: {error}"
        print(f"jetfm: {message}", file=sys.stderr)
        return None, message


def _improves(value, best: dict | None, direction: str) -> bool:
    """Whether a validation value beats the best so far (non-finite values never do)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if direction == "max" else value < best["value"]
