"""Train a jetfm stage (tokenizer, pretrain or finetune): the one training loop.

    accelerate launch jetfm/train.py --config configs/joint.yaml [key.sub=value ...]
    python jetfm/train.py --config configs/joint.yaml train.max_steps=200   # one process
    python jetfm/train.py --config configs/joint.yaml --dry-run             # print the resolved config, exit
    accelerate launch jetfm/train.py --config configs/joint.yaml --resume   # = --resume auto
    python jetfm/train.py --keys                                            # every config key, documented
    python jetfm/train.py --config configs/joint.yaml --restart             # start over: old run moved aside

Parallelism comes from the launcher: `accelerate launch --config_file
configs/accelerate/{ddp,fsdp,deepspeed_zero2,multinode}.yaml` (CPU recipes in
jetfm/distributed.py; SLURM and torchrun scripts in launchers/). The stage's model comes from
jetfm/stages.py: `forward(batch) -> {"loss": ..., **metrics}`.

The script reads top to bottom: `train` = `setup` (config -> Accelerator -> seed -> data ->
model, optimizer and schedule -> prepare -> resume -> tracking, held in a `Run`), then the loop:
`train_step` (forward, backward, clip, optimizer step, hook) on every step, and on the steps
that ask for it `check_finite`, `log_window`, `run_validation`, `write_checkpoint`; then the
export and `summarize`.

The loop meets the device only on those steps: loss, gradient norm and metrics are summed on
the device and read once (with the NaN check), so between them the host runs ahead of the GPU
(a model may still sync itself: MPM repacking reads one count per step).

NaN policy. Under nan_policy=stop a non-finite loss or gradient norm is noted on the device and
found at the next log, validation or checkpoint step (at most train.log_every steps later); the
run then stops naming the first bad step, and nothing after it is logged, validated, saved or
exported, so a NaN never reaches a checkpoint. Its optimizer step is not skipped (skipping needs
the host to decide each step): the weights of the steps after it are discarded with the run.
nan_policy=skip does skip the update, and pays one host sync per step for that decision.

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
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
from jetfm.artifacts.atomic import WriteError, append_text
from jetfm.checkpoint import (CheckpointError, find_checkpoint, load_checkpoint, load_initial_weights,
                              read_trainer_state, save_checkpoint)
from jetfm.config import Config, ConfigError
from jetfm.config_io import describe_keys, load_config
from jetfm.data.format import DataError
from jetfm.data.reader import make_loader
from jetfm.data.shards import Manifest
from jetfm.distributed import describe, make_accelerator, shard_model, sync_replicas, unwrap
from jetfm.estimate import long_run_warning
from jetfm.models.optim import build_optimizer
from jetfm.resume import _apply_optimizer_settings, _check_config_changes, _optimizer_settings
from jetfm.rundir import RunDirError, claim_run_dir, release_run_dir
from jetfm.step_sync import StopSignals, add_metrics, loss_norms, make_stop_vote, step_seed
from jetfm.tracking import start_tracking
from jetfm.train_metrics import (Diverged, Window, format_summary, grad_norm_tensor, memory_gb,
                                 nonfinite_now, write_summary)
from jetfm.validation import _guarded_export, _improves, export_final, validate

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_DIVERGED = 0, 1, 2, 3
STOP_TRACKER_TIMEOUT = 1.0  # seconds a stopped run gives MLflow to take its last records (the rest is spilled)


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
    parser.add_argument("--restart", action="store_true",
                        help="out_dir holds a previous run: start over, moving it into out_dir/replaced-<time>/ "
                             "(without --resume or --restart such a run is refused; nothing is ever deleted)")
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
    try:
        return train(cfg, resume=args.resume, restart=args.restart)
    except (ConfigError, DataError) as error:  # the user's input: a message, not a traceback
        print(f"jetfm: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (CheckpointError, stages.StageError, RunDirError, WriteError) as error:
        print(f"jetfm: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        release_run_dir(Path(cfg.out_dir))  # also when setup failed after taking the lock


# --------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One training run on this process: built by `setup`, advanced by the loop, read by `summarize`."""

    cfg: Config
    accelerator: Any
    info: dict  # describe(accelerator): what the run actually runs on
    manifest: Manifest
    train_loader: Any
    val_loader: Any | None
    val_start: dict | None  # the validation loader's start: every validation reads the same batches
    model: nn.Module  # as prepared (DDP / FSDP / DeepSpeed wrapper)
    unwrapped: nn.Module  # the stage's module inside it: hooks, export
    optimizer: Any
    scheduler: Any
    evaluate: Callable | None  # the stage's evaluator (None: mean validation loss)
    tracker: Any
    stop_vote: Callable[[bool], bool]
    n_params: int
    say: Callable[[str], None]
    t_start: float
    resumed_from: Path | None = None
    step: int = 0  # optimizer steps done (the last good one after a divergence)
    start_step: int = 0
    last_checkpoint: Path | None = None
    last_train: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)
    best: dict | None = None  # the stage's best validated model so far: {"step", "metric", "value", "val"}
    jets_total: float = 0.0  # all processes, logged windows
    train_time_total: float = 0.0
    window: Window | None = None
    compute: Any = None  # scaling.ComputeMeter: cumulative FLOPs, particles, jets (carried in checkpoints)
    # this process's [flops, particles, jets, steps] since the last fold into `compute`
    compute_pending: list = field(default_factory=lambda: [0.0, 0.0, 0.0, 0])

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def train(cfg: Config, resume: str | None = None, restart: bool = False) -> int:
    """Train `cfg` to cfg.train.max_steps (or from a checkpoint, see find_checkpoint). Exit status."""
    run = setup(cfg, resume, restart)
    status, message, exit_code = "completed", "", EXIT_OK
    stop = StopSignals()
    stop.install()
    bar = tqdm(total=cfg.train.max_steps, initial=run.step, disable=not (run.is_main and cfg.train.progress_bar),
               dynamic_ncols=True, desc=cfg.stage, unit="step",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)  # log files: a line per 30 s
    try:
        try:
            status, message = train_loop(run, stop, bar)
        except Diverged:
            raise
        except BaseException as error:
            # a step that went non-finite earlier is the cause (e.g. a stage hook choking on NaN weights)
            diverged = run.window.first_nonfinite(local=True) if run.window is not None else None
            if diverged is None:
                raise
            raise diverged from error
    except Diverged as error:
        status, exit_code = "diverged", EXIT_DIVERGED
        run.step = error.step - 1  # what follows the first bad step is discarded
        message = (f"{error}. No checkpoint was written for it; the last good checkpoint is "
                   f"{run.last_checkpoint or 'none (none was written yet)'}. Try a lower optim.lr, "
                   "optim.warmup_steps > 0, train.precision=fp32, or train.detect_anomaly=true to find the op")
        print(f"jetfm: {message}", file=sys.stderr)
    except BaseException as error:
        status, message = "failed", f"{type(error).__name__}: {error}"
        run.tracker.close("FAILED")
        write_summary(run.run_dir, run.is_main, summarize(run, status, message))
        release_run_dir(run.run_dir)
        raise
    finally:
        stop.restore()
        bar.close()

    # ---- the trained model for the next stage: out_dir/final
    final_dir = None
    if status == "completed":
        final_dir, export_error = _guarded_export(export_final, run.accelerator, run.model, run.unwrapped, cfg,
                                                  run.manifest, run.run_dir)
        if export_error:
            status, message, exit_code = "failed", export_error, EXIT_ERROR
        else:
            run.say(f"final model: {final_dir}")

    # ---- summary
    # a stopped run never waits on the tracker (a pre-emption grace period is short): unsent records are spilled
    run.tracker.close({"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"),
                      timeout=STOP_TRACKER_TIMEOUT if status == "interrupted" else 30.0)
    summary = summarize(run, status, message, final_dir)
    write_summary(run.run_dir, run.is_main, summary)
    run.say(format_summary(summary))
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    release_run_dir(run.run_dir)
    return exit_code


def setup(cfg: Config, resume: str | None, restart: bool = False) -> Run:
    """Accelerator, seed, data, model, optimizer and schedule, prepare, resume, tracking: the Run."""
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    run_dir = Path(cfg.out_dir)

    # ---- processes: DDP / FSDP2 / DeepSpeed as launched; precision and accumulation from cfg
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = cfg.train.grad_accum_steps
    info = describe(accelerator)
    say = _printer(is_main)
    say(f"jetfm {cfg.stage} '{cfg.name}' -> {run_dir} | {info['distributed_type']} x{world} on {info['device']}, "
        f"precision {cfg.train.precision} | global batch {cfg.data.batch_size * world * accum} jets "
        f"({cfg.data.batch_size} x {world} processes x {accum} accumulation)")
    checkpoint_dir = find_checkpoint(resume, run_dir)
    # one run per directory (rank 0 locks it), and no silent start-over on a previous run (jetfm/rundir.py)
    for note in claim_run_dir(accelerator, run_dir, resume=resume, restart=restart,
                              resume_step=read_trainer_state(checkpoint_dir)["step"] if checkpoint_dir else None):
        say(note)
    if resume == "auto" and checkpoint_dir is None:
        say(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting fresh")

    # ---- seed: the same initial weights on every process
    set_seed(cfg.seed)
    torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly)

    # ---- data: global batches from data.streams virtual streams, this process's block of them
    # (the order depends on the global batch only, not on the process count)
    if cfg.data.streams % world:
        raise ConfigError(f"data.streams={cfg.data.streams} cannot be shared by {world} processes: the process count "
                          f"must divide data.streams (set data.streams to a multiple of {world} for a new run, or "
                          "launch a number of processes that divides it)")
    manifest = Manifest.load(cfg.data.path)
    require_tokens = stages.requires_tokens(cfg)
    train_loader = make_loader(cfg.data, cfg.data.train_split, rank=rank, world_size=world, seed=cfg.seed,
                               shuffle=True, drop_uneven=True, require_tokens=require_tokens, accum=accum)
    if train_loader.batches_per_epoch() == 0:
        raise ConfigError(train_loader.dataset.shortfall())
    val_loader = val_start = None
    if cfg.train.eval_every:  # every jet of the split, in the same global batches at any process count
        val_loader = make_loader(cfg.data, cfg.data.val_split, rank=rank, world_size=world, seed=cfg.seed,
                                 shuffle=False, drop_uneven=False, require_tokens=require_tokens, accum=accum)
        val_start = val_loader.state_dict()

    # ---- model, optimizer (the stage's own parameter groups, if it has them), schedule
    model = stages.build_model(cfg, manifest)
    if cfg.train.init_from and checkpoint_dir is None:
        source = load_initial_weights(model, cfg.train.init_from)
        say(f"train.init_from: weights from {source}; optimizer, schedule and data order start fresh")
    model = shard_model(accelerator, model, cfg)  # FSDP2: per block, before the optimizer sees the parameters
    n_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)  # not the loaders
    unwrapped = unwrap(accelerator, model)
    set_seed(cfg.seed + rank)  # different dropout / masking on every process from here on
    say(f"model: {type(unwrapped).__name__}, {n_params:,} parameters; train: {train_loader.batches_per_epoch()} "
        f"batches per epoch per process")

    # ---- resume: weights, optimizer, schedule, RNG (accelerate), then the data position
    step, trainer_state = 0, {}
    if checkpoint_dir is not None:
        changes = _check_config_changes(checkpoint_dir, cfg)  # refuses what cannot change before loading anything
        fresh = _optimizer_settings(optimizer, scheduler)
        trainer_state = load_checkpoint(accelerator, checkpoint_dir)
        step = int(trainer_state["step"])
        _apply_optimizer_settings(optimizer, scheduler, fresh)  # this config's lr, schedule and AdamW settings
        loader_state = trainer_state.get("loader") or {}
        try:
            train_loader.load_state_dict(loader_state)
        except ValueError as error:
            saved_batch, per = loader_state.get("global_batch"), world * accum
            hint = (f"; with {world} process(es) x {accum} accumulation that is data.batch_size={saved_batch // per}"
                    if isinstance(saved_batch, int) and saved_batch % per == 0 and saved_batch != 0 else "")
            raise ConfigError(f"--resume {checkpoint_dir}: {error}{hint}") from error
        saved_world = trainer_state.get("world_size")
        say(f"resumed from {checkpoint_dir}: step {step}, epoch {train_loader.epoch}"
            + (f" (written by {saved_world} processes, continued by {world})" if saved_world not in (None, world) else ""))
        if changes:
            say("config changes applied on resume: " + ", ".join(changes))

    # ---- tracking (rank 0; the same MLflow run when resuming)
    tracker = start_tracking(cfg, is_main=is_main, run_id=trainer_state.get("mlflow_run_id"),
                             run_key=trainer_state.get("mlflow_run_key"))
    tracker.log_config(cfg)
    tracker.set_tags({"jetfm.distributed_type": info["distributed_type"], "jetfm.num_processes": str(world),
                      "jetfm.parameters": str(n_params)})
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics = trainer_state.get("metrics", {})
    compute = make_compute_meter(cfg, unwrapped, train_loader, trainer_state.get("compute"), tracker)
    return Run(compute=compute, cfg=cfg, accelerator=accelerator, info=info, manifest=manifest, train_loader=train_loader,
               val_loader=val_loader, val_start=val_start, model=model, unwrapped=unwrapped, optimizer=optimizer,
               scheduler=scheduler, evaluate=stages.stage_evaluator(cfg), tracker=tracker,
               stop_vote=make_stop_vote(accelerator), n_params=n_params, say=say, t_start=t_start,
               resumed_from=checkpoint_dir, step=step, start_step=step, last_checkpoint=checkpoint_dir,
               last_train=metrics.get("train", {}), last_val=metrics.get("val", {}), best=trainer_state.get("best"))


def train_loop(run: Run, stop: StopSignals, bar) -> tuple[str, str]:
    """Steps to max_steps; on the steps that ask for it: NaN check, log, validation, checkpoint.

    Returns (status, message): ("completed", "") or ("interrupted", why) after a stop signal.
    """
    cfg, train_cfg = run.cfg, run.cfg.train
    batches = _batches(run.train_loader)
    run.window = Window(run.accelerator.device, first_step=run.step + 1)
    bad_steps = 0  # nan_policy=skip: skipped in a row
    run.model.train()
    while run.step < train_cfg.max_steps:
        t0 = time.perf_counter()
        skipped = train_step(run, batches, run.window)
        run.step += 1
        bar.update(1)
        if skipped is not None:  # nan_policy=skip: the update was dropped
            bad_steps += 1
            if bad_steps >= train_cfg.max_bad_steps:
                raise skipped
            run.say(f"step {run.step}: non-finite {skipped.reason} (loss={skipped.loss}, grad_norm={skipped.grad_norm}); "
                    f"update skipped ({bad_steps} in a row, limit {train_cfg.max_bad_steps})")
            continue  # neither logged nor checkpointed
        bad_steps = 0
        step_time = time.perf_counter() - t0
        run.window.time += step_time
        if run.step == run.start_step + 1 and (warning := long_run_warning(cfg.name, step_time,
                                                                           train_cfg.max_steps - run.step)):
            run.say(warning)

        # a signal on any process stops every process after this step (agreed on the host: no device sync)
        stopping = run.stop_vote(stop.received is not None)
        step, every = run.step, train_cfg.checkpoint_every
        log = step % train_cfg.log_every == 0 or step == train_cfg.max_steps
        validation = run.val_loader is not None and (step % train_cfg.eval_every == 0 or step == train_cfg.max_steps)
        checkpoint = stopping or step == train_cfg.max_steps or (every and step % every == 0)
        if not (log or validation or checkpoint):
            continue

        # the one host-device sync of the interval: the window's sums, and the NaN check on them
        t0 = time.perf_counter()
        totals = run.window.totals(run.accelerator)
        run.window.time += time.perf_counter() - t0
        check_finite(run.window, totals)
        fold_compute(run)
        if log:
            log_window(run, totals, bar)
        elif stopping:
            run.jets_total += totals["jets"]
            run.train_time_total += run.window.time
        if validation:
            run_validation(run)
        if checkpoint:
            write_checkpoint(run)
        if stopping:
            message = f"stopped by {stop.received or 'a signal on another rank'} at step {step}; resume with --resume"
            if stop.absorbed:
                message += f" ({stop.absorbed} repeated signal(s) absorbed)"
            return "interrupted", message
    return "completed", ""


def train_step(run: Run, batches: Iterator, window: Window) -> Diverged | None:
    """One optimizer step: forward and backward over grad_accum_steps micro-batches (gradients sync
    on the last), clip, optimizer and schedule step, the stage's on_step_end hook.

    A stage with `loss_counts` gets each micro-batch's LossNorm (`loss_norms`: the step's global
    prediction counts, one all-reduce before the first forward), so the gradient is the global
    batch's per-prediction mean however it is cut into micro-batches and processes.

    Loss, gradient norm and metrics are added to `window` on the device; nothing here waits for
    the device, except under nan_policy=skip, which must know before stepping: then a non-finite
    step returns its Diverged (the update dropped) instead of None.
    """
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    accum = cfg.train.grad_accum_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    metric_sums: dict[str, Any] = {}
    jets = particles = 0
    micro = []
    for _ in range(accum):
        batch = next(batches)
        if run.compute is not None:  # from the host copy of the multiplicities: no device sync
            run.compute_pending[0] += run.compute.count(batch.seqlens)
        micro.append(batch.to(accelerator.device, non_blocking=True))
    norms = loss_norms(run.unwrapped, micro, accelerator, step_seed(cfg.seed, run.step + 1))
    for batch, norm in zip(micro, norms):
        with accelerator.accumulate(model):
            out = model(batch) if norm is None else model(batch, norm=norm)
            if not isinstance(out, dict) or "loss" not in out:
                raise stages.StageError(f"{type(run.unwrapped).__name__}.forward must return a dict with 'loss' "
                                        f"(docs/CONTRACTS.md), got {type(out).__name__}")
            loss = out["loss"]
            accelerator.backward(loss)
        loss_sum += loss.detach().float()
        add_metrics(metric_sums, out)
        jets += batch.num_jets
        particles += batch.num_particles
    run.compute_pending[1:] = [run.compute_pending[1] + particles, run.compute_pending[2] + jets, run.compute_pending[3] + 1]
    if not accelerator.sync_gradients:
        raise RuntimeError("gradient accumulation out of step with accelerate's counter")
    grad_norm = grad_norm_tensor(accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf),
                             accelerator.device)
    loss_mean = loss_sum / accum

    if cfg.train.nan_policy == "skip":  # the host decides before stepping: one sync per step
        skipped = nonfinite_now(accelerator, loss_mean, grad_norm, run.step + 1)
        if skipped is not None:
            run.optimizer.zero_grad(set_to_none=True)
            return skipped
    lr = run.optimizer.param_groups[0]["lr"]  # the lr this step uses
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    window.add(loss_mean, grad_norm, metric_sums, accum, jets, particles, lr)
    on_step_end = getattr(run.unwrapped, "on_step_end", None)
    hook_metrics = on_step_end(run.step + 1) if on_step_end is not None else None
    if hook_metrics is not None:
        sync_replicas(accelerator, run.unwrapped)  # the hook edited weights: replicas must agree
    if isinstance(hook_metrics, dict):
        window.extra.update(hook_metrics)
    return None


def check_finite(window: Window, totals: dict) -> None:
    """Raise Diverged naming the first non-finite step of the window (any process), if there was one."""
    diverged = window.first_nonfinite(totals=totals)
    if diverged is not None:
        raise diverged


def log_window(run: Run, totals: dict, bar) -> None:
    """Train metrics of the window: MLflow (batched), metrics.jsonl, the bar or a line; a new window."""
    window, step = run.window, run.step
    run.last_train = window.summary(totals, world=run.world, memory_gb=memory_gb(run.accelerator.device),
                                    epoch=_epochs_done(run.train_loader))
    run.jets_total += totals["jets"]
    run.train_time_total += window.time
    run.window = Window(run.accelerator.device, first_step=step + 1)
    run.last_train.update(compute_metrics(run))
    run.tracker.log_metrics(run.last_train, step)
    _append_jsonl(run.run_dir / "metrics.jsonl", {"step": step, **run.last_train}, run.is_main)
    loss, jets_s = run.last_train["train/loss"], run.last_train["perf/jets_per_s"]
    bar.set_postfix(loss=f"{loss:.4g}", jets_s=f"{jets_s:,.0f}", refresh=False)
    if bar.disable:
        run.say(f"step {step}/{run.cfg.train.max_steps} | loss {loss:.4g} | lr {run.last_train['lr']:.3g} | "
                f"{jets_s:,.0f} jets/s")


def run_validation(run: Run) -> None:
    """The stage's evaluate (or the mean loss over eval_batches), logged; out_dir/best when it improves."""
    step, run_dir = run.step, run.run_dir
    run.last_val = validate(run.model, run.unwrapped, run.val_loader, run.val_start, run.evaluate, run.cfg,
                            run.accelerator, run_dir / "eval" if run.is_main else None)
    record = {f"val/{k}": v for k, v in run.last_val.items()}
    run.tracker.log_metrics(record, step)
    _append_jsonl(run_dir / "metrics.jsonl", {"step": step, **record}, run.is_main)
    run.say(f"step {step}: val " + " | ".join(f"{k} {v:.4g}" for k, v in list(run.last_val.items())[:6]))
    # the stage's model selection, if any: best_metric() -> (validation key, "max"|"min") -> out_dir/best
    best_metric = run.unwrapped.best_metric() if hasattr(run.unwrapped, "best_metric") else None
    if best_metric is not None and _improves(run.last_val.get(best_metric[0]), run.best, best_metric[1]):
        run.best = {"step": step, "metric": best_metric[0], "value": run.last_val[best_metric[0]], "val": run.last_val}
        export_final(run.accelerator, run.model, run.unwrapped, run.cfg, run.manifest, run_dir, name="best",
                     note=run.best)
        run.say(f"step {step}: best val {best_metric[0]} so far -> {run_dir / 'best'}")


def write_checkpoint(run: Run) -> None:
    """Checkpoint this step (collective): weights, optimizer, schedule, RNG, the data position (one for all ranks)."""
    state = {
        "epoch": run.train_loader.epoch,
        "loader": run.train_loader.state_dict(),  # the same on every rank: resumable by any process count
        "world_size": run.world,
        "distributed": run.info,
        "mlflow_run_id": run.tracker.run_id,  # None until the server first answers (never waited for) ...
        "mlflow_run_key": run.tracker.run_key,  # ... then the resumed run finds its MLflow run by this tag
        "mlflow_uri": run.tracker.uri,
        "metrics": {"train": run.last_train, "val": run.last_val},
        "best": run.best,
        "compute": run.compute.state_dict() if run.compute is not None else None,
    }
    run.last_checkpoint = save_checkpoint(run.accelerator, run.run_dir, run.step, config_yaml=run.cfg.to_yaml(),
                                          trainer_state=state, keep=run.cfg.train.keep_checkpoints)
    run.say(f"step {run.step}: checkpoint {run.last_checkpoint}")


def summarize(run: Run, status: str, message: str, final_dir: Path | None = None) -> dict:
    """summary.json: how the run ended, where its outputs are, its last metrics and throughput."""
    cfg = run.cfg
    return {
        "status": status,
        "message": message,
        "stage": cfg.stage,
        "name": cfg.name,
        "out_dir": str(cfg.out_dir),
        "steps": run.step,
        "steps_this_session": run.step - run.start_step,
        "max_steps": cfg.train.max_steps,
        "epoch": _epochs_done(run.train_loader),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "final": str(final_dir) if final_dir else None,
        "wall_time_s": round(time.perf_counter() - run.t_start, 2),
        "train_time_s": round(run.train_time_total, 2),
        "mean_jets_per_s": run.jets_total / run.train_time_total if run.train_time_total else None,
        "global_batch_jets": cfg.data.batch_size * cfg.train.grad_accum_steps * run.world,
        "parameters": run.n_params,
        "distributed": run.info,
        "train": run.last_train,
        "val": run.last_val,
        "best": run.best,
        "mlflow": {"uri": getattr(run.tracker, "uri", None), "run_id": getattr(run.tracker, "run_id", None)},
        "scaling": run.compute.summary() if run.compute is not None else None,
    }


# --------------------------------------------------------------------------- pieces of the loop


def make_compute_meter(cfg: Config, unwrapped, train_loader, state: dict | None, tracker):
    """The run's ComputeMeter (pre-training models: FLOPs too; other stages count particles and
    jets only), continued from the checkpoint's state; the static numbers go to MLflow as params."""
    from jetfm.data.subset import subset_jets
    from jetfm.scaling.flops import ComputeMeter
    from jetfm.scaling.ladder import model_parameters

    tags = cfg.tracking.tags
    meter = ComputeMeter.for_run(unwrapped, unique_jets=subset_jets(train_loader.dataset.units),
                                 parameters=model_parameters(unwrapped), size=tags.get("jetfm.size"),
                                 budget=tags.get("jetfm.budget"))
    if state:
        meter.load_state_dict(state)
    tracker.log_params(meter.params())
    return meter


def fold_compute(run: Run) -> None:
    """Add this interval's compute, summed over processes, to the run's meter (one small collective)."""
    pending = run.compute_pending
    if run.world > 1:
        pending = run.accelerator.reduce(torch.tensor(pending, device=run.accelerator.device, dtype=torch.float64),
                                         reduction="sum").tolist()
        pending[3] = run.compute_pending[3]  # steps: the same on every process
    run.compute.add(*pending[:3], steps=int(pending[3]))
    run.compute_pending = [0.0, 0.0, 0.0, 0]


def compute_metrics(run: Run) -> dict[str, float]:
    """The cumulative compute as MLflow metrics (compute/flops, compute/particles_seen, ...)."""
    return {f"compute/{k}": v for k, v in run.compute.metrics().items()}


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


def _printer(is_main: bool):
    def say(text: str) -> None:
        if is_main:
            tqdm.write(text, file=sys.stderr)

    return say


def _append_jsonl(path: Path, record: dict, is_main: bool) -> None:
    """One whole line or none (a full disk raises WriteError naming the file and the free space)."""
    if is_main:
        append_text(path, json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
