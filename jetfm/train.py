"""Train a jetfm stage (tokenizer, pretrain or finetune): the one training loop.

    accelerate launch jetfm/train.py --config configs/joint.yaml [key.sub=value ...]
    python jetfm/train.py --config configs/joint.yaml train.max_steps=200   # one process
    python jetfm/train.py --config configs/joint.yaml --dry-run             # print the resolved config, exit
    accelerate launch jetfm/train.py --config configs/joint.yaml --resume   # = --resume auto
    python jetfm/train.py --keys                                            # every config key, documented

Parallelism comes from the launcher: `accelerate launch --config_file
configs/accelerate/{ddp,fsdp,deepspeed_zero2,multinode}.yaml` (CPU recipes in
jetfm/distributed.py; SLURM and torchrun scripts in launchers/). The stage's model comes from
jetfm/stages.py: `forward(batch) -> {"loss": ..., **metrics}`.

The script reads top to bottom: config -> Accelerator -> seed -> data -> model -> optimizer and
schedule -> prepare -> resume -> tracking -> loop (forward, backward, clip, NaN check, step,
hook, metrics, validation, checkpoint) -> summary.

A run writes to out_dir (default runs/<name>): checkpoints/step-NNNNNN/ and checkpoints/latest,
final/ (the trained model in the stage's format, e.g. the tokenizer for `jetfm data tokenize`),
best/ (stages whose model has best_metric(): the best validated model so far, same format),
metrics.jsonl (every logged step), summary.json, mlflow.db (default tracking), eval/ (plots).

Exit status: 0 done, or stopped by SIGTERM/SIGINT after writing a checkpoint (resume with
--resume); 2 bad config or data; 3 non-finite loss (stopped; the last good checkpoint is kept);
1 other (checkpoint not writable, stage code broke its contract, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python jetfm/train.py`: import jetfm from this checkout, and keep this directory's modules
    # (config.py, data/, ...) from shadowing top-level packages
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from jetfm import stages
from jetfm.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from jetfm.config import Config, ConfigError, OptimConfig, describe_keys, flatten, load_config, load_yaml
from jetfm.distributed import describe, make_accelerator, sync_replicas, unwrap
from jetfm.estimate import long_run_warning

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_DIVERGED = 0, 1, 2, 3


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float, grad_norm: float | None, reason: str):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"non-finite {reason} at step {step}: loss={loss}, grad_norm={grad_norm}")


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="jetfm/train.py",
        description=doc[0] + "\n\n" + doc[1],
        epilog="\n\n".join(doc[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="YAML", help="experiment config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML: optim.lr=3e-4 data.batch_size=64 "
                             "optim.betas=[0.9,0.99] tracking.uri=null")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                        help="continue from the latest checkpoint of out_dir (auto; a fresh start if there is none) "
                             "or from PATH (a checkpoint, checkpoints/ or run directory): same MLflow run, same data order")
    parser.add_argument("--keys", action="store_true", help="list every config key with type, default and meaning, then exit")
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume key=value`: the override was taken as PATH
        args.resume = "auto"
    if not args.keys and not args.config:
        parser.error("--config is required (e.g. --config configs/joint.yaml)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keys:
        for key, type_name, default, doc in describe_keys():
            print(f"{key} ({type_name}, default {default!r})\n    {doc}")
        return EXIT_OK
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.path is None and not args.dry_run:
            raise ConfigError("data.path is not set (a shard directory from `jetfm data generate|convert`)")
    except ConfigError as error:
        print(f"jetfm: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        if os.environ.get("RANK", "0") == "0":
            print(cfg.to_yaml(), end="")
        return EXIT_OK
    from jetfm.data.format import DataError

    try:
        return train(cfg, resume=args.resume)
    except (ConfigError, DataError) as error:  # the user's input: a message, not a traceback
        print(f"jetfm: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (CheckpointError, stages.StageError) as error:
        print(f"jetfm: {error}", file=sys.stderr)
        return EXIT_ERROR


# --------------------------------------------------------------------------- the run
def train(cfg: Config, resume: str | None = None) -> int:
    """Train `cfg` to cfg.train.max_steps (or from a checkpoint, see find_checkpoint). Exit status."""
    from accelerate.utils import set_seed

    from jetfm.data.reader import make_loader
    from jetfm.data.shards import Manifest
    from jetfm.tracking import start_tracking

    t_start = time.perf_counter()
    run_dir = Path(cfg.out_dir)

    # ---- processes: DDP / FSDP2 / DeepSpeed as launched; precision and accumulation from cfg
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accum = cfg.train.grad_accum_steps
    info = describe(accelerator)
    bar_on = is_main and cfg.train.progress_bar
    say = _printer(is_main)
    say(f"jetfm {cfg.stage} '{cfg.name}' -> {run_dir} | {info['distributed_type']} x{world} on {info['device']}, "
        f"precision {cfg.train.precision} | global batch {cfg.data.batch_size * world * accum} jets "
        f"({cfg.data.batch_size} x {world} processes x {accum} accumulation)")
    checkpoint_dir = find_checkpoint(resume, run_dir)
    if resume == "auto" and checkpoint_dir is None:
        say(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting fresh")

    # ---- seed: the same initial weights on every process
    set_seed(cfg.seed)
    torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)

    # ---- data: the reader shards by rank itself; drop_uneven keeps ranks in step
    manifest = Manifest.load(cfg.data.path)
    require_tokens = stages.requires_tokens(cfg)
    train_loader = make_loader(cfg.data, cfg.data.train_split, rank=rank, world_size=world, seed=cfg.seed,
                               shuffle=True, drop_uneven=True, require_tokens=require_tokens)
    if train_loader.batches_per_epoch() == 0:
        raise ConfigError(train_loader.dataset.shortfall())
    val_loader = val_start = None
    if cfg.train.eval_every:
        val_loader = make_loader(cfg.data, cfg.data.val_split, rank=rank, world_size=world, seed=cfg.seed,
                                 shuffle=False, drop_uneven=True, require_tokens=require_tokens)
        if val_loader.batches_per_epoch() == 0:
            raise ConfigError(val_loader.dataset.shortfall() + " (or set train.eval_every=0)")
        val_start = val_loader.state_dict()  # every validation reads the same batches

    # ---- model, optimizer, schedule
    model = stages.build_model(cfg, manifest)
    n_params = sum(p.numel() for p in model.parameters())
    evaluate = stages.stage_evaluator(cfg)
    # a stage may split its own groups, each with its "lr" (e.g. a smaller backbone lr when fine-tuning)
    groups = (model.param_groups(cfg.optim.lr, cfg.optim.weight_decay) if hasattr(model, "param_groups")
              else param_groups(model, cfg.optim.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, cfg.train.max_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)  # not the loaders
    unwrapped = unwrap(accelerator, model)
    on_step_end = getattr(unwrapped, "on_step_end", None)
    set_seed(cfg.seed + rank)  # different dropout / masking on every process from here on
    say(f"model: {type(unwrapped).__name__}, {n_params:,} parameters; train: {train_loader.batches_per_epoch()} "
        f"batches per epoch per process")

    # ---- resume: weights, optimizer, schedule, RNG (accelerate), then the data position
    step, trainer_state = 0, {}
    if checkpoint_dir is not None:
        trainer_state = load_checkpoint(accelerator, checkpoint_dir)
        step = int(trainer_state["step"])
        loader_states = trainer_state.get("loader") or []
        if len(loader_states) != world:
            raise CheckpointError(
                f"{checkpoint_dir} was written by {len(loader_states)} processes, this run has {world}: the data order "
                "cannot be continued; resume with the same number of processes (or start a new run from its weights)"
            )
        train_loader.load_state_dict(loader_states[rank])
        say(f"resumed from {checkpoint_dir}: step {step}, epoch {train_loader.epoch}")
        _note_config_changes(say, checkpoint_dir, cfg)

    # the stage's model selection, if any: best_metric() -> (validation key, "max"|"min") -> out_dir/best
    best_metric = unwrapped.best_metric() if hasattr(unwrapped, "best_metric") else None
    best: dict | None = trainer_state.get("best")

    # ---- tracking (rank 0; the same MLflow run when resuming)
    tracker = start_tracking(cfg, is_main=is_main, run_id=trainer_state.get("mlflow_run_id"))
    tracker.log_config(cfg)
    tracker.set_tags({"jetfm.distributed_type": info["distributed_type"], "jetfm.num_processes": str(world),
                      "jetfm.parameters": str(n_params)})

    # ---- the loop
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    stop = StopSignals()
    stop.install()
    batches = _batches(train_loader)
    window = Window()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not bar_on, dynamic_ncols=True, desc=cfg.stage,
               unit="step", mininterval=1.0 if sys.stderr.isatty() else 30.0)  # log files: a line per 30 s
    status, message, exit_code = "completed", "", EXIT_OK
    last_checkpoint = checkpoint_dir
    last_train: dict = trainer_state.get("metrics", {}).get("train", {})
    last_val: dict = trainer_state.get("metrics", {}).get("val", {})
    jets_total = train_time_total = 0.0
    bad_steps = 0
    start_step = step
    model.train()

    def write_checkpoint() -> None:
        nonlocal last_checkpoint
        from accelerate.utils import gather_object

        state = {
            "epoch": train_loader.epoch,
            "loader": gather_object([train_loader.state_dict()]),  # one per rank, rank order
            "world_size": world,
            "distributed": info,
            "mlflow_run_id": tracker.run_id,
            "mlflow_uri": tracker.uri,
            "metrics": {"train": last_train, "val": last_val},
            "best": best,
        }
        last_checkpoint = save_checkpoint(accelerator, run_dir, step, config_yaml=cfg.to_yaml(), trainer_state=state,
                                          keep=cfg.train.keep_checkpoints)
        say(f"step {step}: checkpoint {last_checkpoint}")

    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            # forward / backward over grad_accum_steps micro-batches (gradients sync on the last)
            loss_sum = torch.zeros((), device=device)
            metric_sums: dict[str, torch.Tensor | float] = {}
            jets = particles = 0
            for _ in range(accum):
                batch = next(batches).to(device, non_blocking=True)
                with accelerator.accumulate(model):
                    out = model(batch)
                    if not isinstance(out, dict) or "loss" not in out:
                        raise stages.StageError(f"{type(unwrapped).__name__}.forward must return a dict with 'loss' "
                                                f"(docs/CONTRACTS.md), got {type(out).__name__}")
                    loss = out["loss"]
                    accelerator.backward(loss)
                loss_sum += loss.detach().float()
                for key, value in out.items():
                    if key != "loss":
                        value = value.detach().float() if torch.is_tensor(value) else float(value)
                        metric_sums[key] = metric_sums.get(key, 0.0) + value
                jets += batch.num_jets
                particles += batch.num_particles
            if not accelerator.sync_gradients:
                raise RuntimeError("gradient accumulation out of step with accelerate's counter")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
            grad_norm = _to_float(grad_norm)
            lr = optimizer.param_groups[0]["lr"]

            # one all-reduce per step: global mean loss, throughput, and whether anyone got a signal
            stats = torch.stack([loss_sum / accum, torch.tensor(float(jets), device=device),
                                 torch.tensor(float(particles), device=device),
                                 torch.tensor(1.0 if stop.received else 0.0, device=device)])
            loss_value, step_jets, step_particles, stop_votes = accelerator.reduce(stats, reduction="sum").tolist()
            loss_value /= world

            # non-finite loss or gradient: stop (or skip), never step into NaN weights
            finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm))
            if not finite:
                bad_steps += 1
                reason = "loss" if not math.isfinite(loss_value) else "gradient norm"
                if cfg.train.nan_policy == "stop" or bad_steps >= cfg.train.max_bad_steps:
                    raise Diverged(step + 1, loss_value, grad_norm, reason)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                say(f"step {step}: non-finite {reason} (loss={loss_value}, grad_norm={grad_norm}); update skipped "
                    f"({bad_steps} in a row, limit {cfg.train.max_bad_steps})")
                continue
            bad_steps = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            hook_metrics = on_step_end(step) if on_step_end is not None else None
            if hook_metrics is not None:
                sync_replicas(accelerator, unwrapped)  # the hook edited weights: replicas must agree
            step_time = time.perf_counter() - t0
            if step == start_step + 1 and (warning := long_run_warning(cfg.name, step_time, cfg.train.max_steps - step)):
                say(warning)
            jets_total += step_jets
            train_time_total += step_time
            window.add(loss_value, metric_sums, accum, grad_norm, step_jets, step_particles, step_time)
            if isinstance(hook_metrics, dict):
                window.extra.update({k: float(v) for k, v in hook_metrics.items()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", jets_s=f"{step_jets / step_time:,.0f}", refresh=False)

            # metrics: batched to MLflow, one line per logged step in metrics.jsonl
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                last_train = window.summary(lr=lr, memory_gb=_memory_gb(device), epoch=_epochs_done(train_loader))
                window = Window()
                tracker.log_metrics(last_train, step)
                _append_jsonl(metrics_path, {"step": step, **last_train}, is_main)
                if not bar_on:
                    say(f"step {step}/{cfg.train.max_steps} | loss {last_train['train/loss']:.4g} | lr {lr:.3g} | "
                        f"{last_train['perf/jets_per_s']:,.0f} jets/s")

            # validation: the stage's evaluate, or the mean loss over eval_batches
            if val_loader is not None and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
                last_val = validate(model, unwrapped, val_loader, val_start, evaluate, cfg, accelerator,
                                    run_dir / "eval" if is_main else None)
                tracker.log_metrics({f"val/{k}": v for k, v in last_val.items()}, step)
                _append_jsonl(metrics_path, {"step": step, **{f"val/{k}": v for k, v in last_val.items()}}, is_main)
                text = " | ".join(f"{k} {v:.4g}" for k, v in list(last_val.items())[:6])
                say(f"step {step}: val {text}")
                if best_metric is not None and _improves(last_val.get(best_metric[0]), best, best_metric[1]):
                    best = {"step": step, "metric": best_metric[0], "value": last_val[best_metric[0]], "val": last_val}
                    export_final(accelerator, model, unwrapped, cfg, manifest, run_dir, name="best", note=best)
                    say(f"step {step}: best val {best_metric[0]} so far -> {run_dir / 'best'}")

            # checkpoint: periodic, final, or on SIGTERM/SIGINT (any rank) then stop
            stopping = stop_votes > 0
            every = cfg.train.checkpoint_every
            if stopping or step == cfg.train.max_steps or (every and step % every == 0):
                write_checkpoint()
            if stopping:
                status = "interrupted"
                message = f"stopped by {stop.received or 'a signal on another rank'} at step {step}; resume with --resume"
                break
    except Diverged as error:
        status, exit_code = "diverged", EXIT_DIVERGED
        message = (f"{error}. No checkpoint was written for it; the last good checkpoint is "
                   f"{last_checkpoint or 'none (none was written yet)'}. Try a lower optim.lr, optim.warmup_steps > 0, "
                   "train.precision=fp32, or train.detect_anomaly=true to find the op")
        print(f"jetfm: {message}", file=sys.stderr)
    except BaseException as error:
        status, message = "failed", f"{type(error).__name__}: {error}"
        tracker.close("FAILED")
        _write_summary(run_dir, is_main, _summary_dict(**locals()))
        raise
    finally:
        stop.restore()
        bar.close()

    # ---- the trained model for the next stage: out_dir/final
    final_dir = None
    if status == "completed":
        final_dir = export_final(accelerator, model, unwrapped, cfg, manifest, run_dir)
        say(f"final model: {final_dir}")

    # ---- summary
    tracker.close({"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
    summary = _summary_dict(**locals())
    _write_summary(run_dir, is_main, summary)
    say(_format_summary(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


# --------------------------------------------------------------------------- pieces of the loop
#: Modules whose `weight` is decayed; every other parameter (biases, norms, embeddings,
#: codebooks, learned start/mask vectors) is not.
DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on Linear/Conv weights only, minus model.no_weight_decay() names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            weight = (isinstance(module, DECAYED) and name == "weight") or (
                isinstance(module, nn.MultiheadAttention) and name.endswith("proj_weight"))
            (decay if weight and full_name not in skip else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(optim: OptimConfig, max_steps: int):
    """LambdaLR factor of the step count: linear warm-up, then constant / cosine / linear to min_lr_ratio."""
    warmup, kind, floor = optim.warmup_steps, optim.schedule, optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - floor) * progress

    return factor


def validate(model, unwrapped, loader, start_state, evaluate, cfg: Config, accelerator, out_dir: Path | None) -> dict:
    """Validation metrics averaged over processes; never disturbs the training RNG streams."""
    loader.load_state_dict(start_state)
    device = accelerator.device
    batches = (b.to(device) for b in itertools.islice(loader, cfg.train.eval_batches))
    rng_devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            if evaluate is not None:
                result = evaluate(unwrapped, batches, cfg, out_dir)
                # the stage's own order (the same on every rank), numbers only
                names = [k for k, v in result.items() if isinstance(v, (int, float)) or torch.is_tensor(v)]
                values = torch.tensor([float(result[k]) for k in names], device=device, dtype=torch.float64)
                values = accelerator.reduce(values, reduction="mean") if accelerator.num_processes > 1 else values
                return dict(zip(names, values.tolist()))
            total = torch.zeros(2, device=device, dtype=torch.float64)
            for batch in batches:
                out = model(batch)
                total += torch.stack([out["loss"].double() * batch.num_jets, torch.tensor(float(batch.num_jets), device=device, dtype=torch.float64)])
            total = accelerator.reduce(total, reduction="sum")
            return {"loss": (total[0] / total[1].clamp(min=1)).item()}
    finally:
        model.train()


def export_final(accelerator, model, unwrapped, cfg: Config, manifest, run_dir: Path, name: str = "final",
                 note: dict | None = None) -> Path:
    """Write the trained model to run_dir/<name> (final, or best: the stage's best_metric) with the
    stage's exporter (collective call); `note` is written beside it as <name>/selection.json.

    Sharded runs (FSDP2, DeepSpeed) gather the full weights and rank 0 loads them into a fresh
    CPU copy of the model; replicated runs export the module itself.
    """
    from accelerate.utils import DistributedType

    final = run_dir / name
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = accelerator.get_state_dict(model)  # collective: full tensors on rank 0
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return final
        with torch.random.fork_rng(devices=[]):
            module = stages.build_model(cfg, manifest)
        module.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    else:
        module = unwrapped
    if accelerator.is_main_process:
        exporter = stages.stage_exporter(cfg)
        if exporter is not None:
            exporter(module, final)
        else:
            from safetensors.torch import save_file

            tmp = run_dir / f"{name}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "jetfm", "stage": cfg.stage})
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
        if note is not None:
            (final / "selection.json").write_text(json.dumps(note, indent=1, default=str) + "\n")
    accelerator.wait_for_everyone()
    return final


def _improves(value, best: dict | None, direction: str) -> bool:
    """Whether a validation value beats the best so far (non-finite values never do)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if direction == "max" else value < best["value"]


class Window:
    """Sums over one logging interval."""

    def __init__(self):
        self.steps = 0
        self.loss = self.grad_norm = self.jets = self.particles = self.time = 0.0
        self.grad_norm_steps = 0
        self.micro = 0
        self.metrics: dict[str, torch.Tensor | float] = {}
        self.extra: dict[str, float] = {}

    def add(self, loss, metric_sums, micro, grad_norm, jets, particles, seconds) -> None:
        self.steps += 1
        self.loss += loss
        self.micro += micro
        for key, value in metric_sums.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.grad_norm_steps += 1
        self.jets += jets
        self.particles += particles
        self.time += seconds

    def summary(self, *, lr: float, memory_gb: float, epoch: float) -> dict[str, float]:
        steps = max(self.steps, 1)
        out = {"train/loss": self.loss / steps}
        for key, value in self.metrics.items():  # this rank's micro-batch mean
            out[f"train/{key}"] = float(value) / max(self.micro, 1)
        for key, value in self.extra.items():
            out[f"train/{key}"] = value
        out["lr"] = lr
        if self.grad_norm_steps:
            out["grad_norm"] = self.grad_norm / self.grad_norm_steps
        seconds = max(self.time, 1e-9)
        out["perf/jets_per_s"] = self.jets / seconds
        out["perf/particles_per_s"] = self.particles / seconds
        out["perf/step_time_s"] = self.time / steps
        out["perf/memory_gb"] = memory_gb
        out["epoch"] = float(epoch)
        return out


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits. A second signal acts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        print(f"\n[jetfm] {self.received}: finishing this step, writing a checkpoint, then exiting "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _batches(loader):
    """Batches over epochs, forever (the loader's state tracks the position)."""
    empty = 0
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        empty = empty + 1 if n == 0 else 0
        if empty >= 2:  # one empty pass is legitimate: resumed exactly at the end of an epoch
            raise RuntimeError("the training loader yields no batches")


def _epochs_done(loader) -> float:
    """Epochs completed, fractional (the loader's own counter moves on only when the next one starts)."""
    return round(loader.epoch + loader.batches_done / max(1, loader.batches_per_epoch()), 4)


def _to_float(value) -> float | None:
    if value is None:
        return None
    if hasattr(value, "full_tensor"):  # FSDP2 returns a replicated DTensor
        value = value.full_tensor()
    return float(value)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _printer(is_main: bool):
    def say(text: str) -> None:
        if is_main:
            tqdm.write(text, file=sys.stderr)

    return say


def _append_jsonl(path: Path, record: dict, is_main: bool) -> None:
    if is_main:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _note_config_changes(say, checkpoint_dir: Path, cfg: Config) -> None:
    try:
        saved = flatten(load_yaml(checkpoint_dir / "config.yaml"))
    except Exception:  # noqa: BLE001 - only a note
        return
    current = flatten(cfg.to_dict())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        say("config differs from the checkpoint's in: " + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
                                                                     for k in changed[:10]))


def _summary_dict(**scope) -> dict:
    cfg: Config = scope["cfg"]
    tracker = scope.get("tracker")
    train_time = scope.get("train_time_total", 0.0)
    return {
        "status": scope.get("status"),
        "message": scope.get("message"),
        "stage": cfg.stage,
        "name": cfg.name,
        "out_dir": str(cfg.out_dir),
        "steps": scope.get("step"),
        "steps_this_session": (scope.get("step") or 0) - (scope.get("start_step") or 0),
        "max_steps": cfg.train.max_steps,
        "epoch": _epochs_done(scope["train_loader"]) if scope.get("train_loader") else None,
        "resumed_from": str(scope["checkpoint_dir"]) if scope.get("checkpoint_dir") else None,
        "checkpoint": str(scope["last_checkpoint"]) if scope.get("last_checkpoint") else None,
        "final": str(scope["final_dir"]) if scope.get("final_dir") else None,
        "wall_time_s": round(time.perf_counter() - scope["t_start"], 2),
        "train_time_s": round(train_time, 2),
        "mean_jets_per_s": scope.get("jets_total", 0.0) / train_time if train_time else None,
        "global_batch_jets": cfg.data.batch_size * cfg.train.grad_accum_steps * (scope.get("world") or 1),
        "parameters": scope.get("n_params"),
        "distributed": scope.get("info"),
        "train": scope.get("last_train"),
        "val": scope.get("last_val"),
        "best": scope.get("best"),
        "mlflow": {"uri": getattr(tracker, "uri", None), "run_id": getattr(tracker, "run_id", None)},
    }


def _write_summary(run_dir: Path, is_main: bool, summary: dict) -> None:
    if not is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    os.replace(tmp, run_dir / "summary.json")


def _format_summary(s: dict) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
