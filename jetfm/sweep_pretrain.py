"""The pre-training scaling study: a grid of model sizes x training-set sizes x (steps or compute
budgets) through the one trainer, then the L(N, D) fit and its report.

    jetfm sweep pretrain --base configs/small/joint.yaml --data data/toptag-tokens \\
        --ladder configs/scaling/ladder.yaml --sizes xxs,xs,s,m --train-jets 2000,6000,12000 \\
        --steps 200 --out runs/scaling [--runner local|parallel|slurm] [--parallel 2] [--dry-run]
    jetfm sweep pretrain ... --epochs 1               # steps per point: one pass over its subset
    jetfm sweep pretrain ... --budgets 1e12,1e13      # steps per point from a compute budget (FLOPs)

The grid. Each `--sizes` entry is a ladder size (configs/scaling/ladder.yaml: model overrides of
the base config), each `--train-jets` a nested training subset (`data.train_jets`,
jetfm/data/subset.py: D1 ⊂ D2 ⊂ …, validation always on the whole held-out split). Per point
one of: `--steps` optimizer steps; `--epochs E` passes over its subset (steps = floor(E x subset
jets / global batch): the data-scaling design, where D grows with the subset and nothing
repeats at E <= 1); or, with `--budgets`, as many steps as the budget buys at the point's
analytic FLOPs per step (jetfm/scaling/flops.py, measured on the first batches of its subset).
`--set key=value` overrides the base config of every point.

Points. Each point's resolved config is written to OUT/configs/<point>.yaml and trained into
OUT/runs/<point> by `python jetfm/train.py --config OUT/configs/<point>.yaml --resume auto` — in
this process (`--runner local`, the default), as up to `--parallel K` subprocesses (`--runner
parallel`), or as a SLURM array job (`--runner slurm`: OUT/slurm/points.txt, one config per line,
submitted with `sbatch --array=0-(n-1) launchers/sweep_slurm.sh OUT/slurm/points.txt`, which runs
each task through launchers/slurm.sh; rerun the same sweep command once the array is done to
collect the results and fit). A point whose summary.json says completed at its step count is
skipped: the sweep is resumable, and an interrupted point resumes from its last checkpoint.

Tracking. One MLflow experiment (`--experiment`, default jetfm-scaling-<OUT name>; tracking URI:
the base config's, else $MLFLOW_TRACKING_URI, else sqlite OUT/mlflow.db): a parent run for the
study (id kept in OUT/study.json) and one child run per point (tag mlflow.parentRunId) tagged
jetfm.size, jetfm.N, jetfm.D (training jets of the subset), jetfm.budget, jetfm.objective. Each
child logs the trainer's compute metrics (compute/flops, compute/particles_seen, ...) and
params (scaling.N, ...).

After the runs: the fit and report of jetfm/scaling/report.py (OUT/fit/study.md, fit.json,
plots) from the points' summary.json files, logged to the parent run. `--dry-run` prints the
ladder and the grid — N, FLOPs per point and a time estimate from a short measured throughput
(`--measure-steps` timed steps per size on this machine) — and trains nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parent / "train.py"
SLURM_ARRAY = Path(__file__).resolve().parent.parent / "launchers" / "sweep_slurm.sh"
RUNNERS = ("local", "parallel", "slurm")


@dataclass(frozen=True)
class Point:
    """One run of the study."""

    size: str
    train_jets: int
    steps: int | None = None
    budget: float | None = None
    epochs: float | None = None

    @property
    def name(self) -> str:
        if self.budget is not None:
            plan = f"C{self.budget:.0e}".replace("+", "")
        else:
            plan = f"s{self.steps}" if self.epochs is None else f"e{self.epochs:g}"
        return f"{self.size}-D{self.train_jets}-{plan}"


def plan_points(sizes: list[str], train_jets: list[int], steps: int | None, budgets: list[float],
                epochs: float | None = None) -> list[Point]:
    """The grid: sizes x training subsets x (one step count | one epoch count | each budget)."""
    if (steps is not None) + bool(budgets) + (epochs is not None) != 1:
        raise ValueError("give exactly one of --steps, --epochs and --budgets")
    if (steps is not None and steps < 1) or (epochs is not None and epochs <= 0):
        raise ValueError("--steps must be >= 1 and --epochs > 0")
    if steps is not None:
        plans = [dict(steps=steps)]
    elif epochs is not None:
        plans = [dict(epochs=epochs)]
    else:
        plans = [dict(budget=b) for b in budgets]
    return [Point(size, n, **plan) for size in sizes for n in train_jets for plan in plans]


def point_config(base, point: Point, overrides: dict, *, out: Path, experiment: str, uri: str, parent: str | None,
                 N: int, steps: int):
    """The point's resolved config: ladder size, subset, steps, run directory and MLflow tags."""
    tags = {**base.tracking.tags, "jetfm.study": out.name, "jetfm.size": point.size, "jetfm.N": str(N),
            "jetfm.D": str(point.train_jets), "jetfm.objective": base.objective.name,
            "jetfm.budget": "" if point.budget is None else f"{point.budget:.6g}"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return dataclasses.replace(  # replace() reruns the config's cross-checks
        base, name=point.name, out_dir=str(out / "runs" / point.name),
        model=dataclasses.replace(base.model, **overrides),
        data=dataclasses.replace(base.data, train_jets=point.train_jets),
        train=dataclasses.replace(base.train, max_steps=steps),
        tracking=dataclasses.replace(base.tracking, experiment=experiment, uri=uri, run_name=point.name, tags=tags))


def finished(run_dir: Path, steps: int) -> bool:
    """A point is done when its summary says completed at (or past) its planned step count."""
    path = run_dir / "summary.json"
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    return summary.get("status") == "completed" and (summary.get("steps") or 0) >= steps


# --------------------------------------------------------------------------- measurement
def measure(cfg, manifest, *, batches: int = 4, steps: int = 2) -> tuple[float, float]:
    """(analytic FLOPs per optimizer step, measured seconds per step) of a point's config on this
    machine: FLOPs averaged over the first `batches` batches of its subset, time over `steps`
    forward + backward + update steps after one warm-up step (0 steps: FLOPs only, time nan)."""
    import itertools

    import torch

    from jetfm import stages
    from jetfm.data.reader import make_loader
    from jetfm.models.optim import build_optimizer
    from jetfm.scaling.flops import ComputeMeter

    loader = make_loader(cfg.data, cfg.data.train_split, seed=cfg.seed, shuffle=True, drop_uneven=True,
                         require_tokens=stages.requires_tokens(cfg))
    sample = list(itertools.islice(loader, max(batches, steps + 1)))
    with torch.random.fork_rng(devices=[]):
        model = stages.build_model(cfg, manifest)
        meter = ComputeMeter.for_model(model)
        flops = sum(meter.count(b.seqlens) for b in sample[:batches]) / min(batches, len(sample))
        flops *= cfg.train.grad_accum_steps
        if steps == 0:
            return flops, math.nan
        optimizer, _ = build_optimizer(model, cfg.optim, max(cfg.train.max_steps, 1))
        model.train()
        times = []
        for batch in sample[: steps + 1]:
            t0 = time.perf_counter()
            for _ in range(cfg.train.grad_accum_steps):
                model(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return flops, sum(times[1:]) / len(times[1:])


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- runners
def _train_command(config_path: Path) -> list[str]:
    return [sys.executable, str(TRAIN_PY), "--config", str(config_path), "--resume", "auto"]


def run_local(cfg) -> int:
    from jetfm import train as trainer

    return trainer.train(cfg, resume="auto")  # a fresh Accelerator state per run (make_accelerator)


def run_parallel(jobs: list[tuple[Point, Path, Path]], k: int, say) -> list[str]:
    """Train the points as subprocesses, k at a time; the names of those that failed."""
    waiting, running, failed = list(jobs), [], []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while waiting or running:
        while waiting and len(running) < k:
            point, config_path, run_dir = waiting.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a")
            say(f"start {point.name} (log {run_dir / 'train.log'})")
            running.append((point, subprocess.Popen(_train_command(config_path), stdout=log, stderr=subprocess.STDOUT,
                                                    env=env), log))
        time.sleep(1.0)
        for item in list(running):
            point, process, log = item
            if process.poll() is not None:
                running.remove(item)
                log.close()
                say(f"{point.name}: {'done' if process.returncode == 0 else f'failed (exit {process.returncode})'}")
                if process.returncode != 0:
                    failed.append(point.name)
    return failed


def submit_slurm(config_paths: list[Path], out: Path, say) -> str:
    """Write OUT/slurm/points.txt and submit the array (or print the command when sbatch is absent)."""
    import shutil

    slurm = out / "slurm"
    slurm.mkdir(parents=True, exist_ok=True)
    points = slurm / "points.txt"
    points.write_text("".join(f"{p}\n" for p in config_paths))
    command = ["sbatch", f"--array=0-{len(config_paths) - 1}", f"--output={slurm}/point-%a-%j.out", str(SLURM_ARRAY),
               str(points)]
    if shutil.which("sbatch") is None:
        say("sbatch not found: submit the array from a login node with\n  " + shlex.join(command))
        return shlex.join(command)
    subprocess.run(command, check=True)
    say(f"submitted {len(config_paths)} points; rerun this command when the array is done to collect and fit")
    return shlex.join(command)


# --------------------------------------------------------------------------- the study
def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--base", required=True, type=Path, help="pre-training config of every point (stage pretrain)")
    parser.add_argument("--data", type=Path, default=None, help="tokenized shard set (default the base config's data.path)")
    parser.add_argument("--out", required=True, type=Path, help="study directory (configs, runs, fit, mlflow.db)")
    parser.add_argument("--ladder", type=Path, default=Path("configs/scaling/ladder.yaml"), help="model-size ladder YAML")
    parser.add_argument("--sizes", required=True, help="ladder sizes, e.g. xxs,xs,s,m")
    parser.add_argument("--train-jets", required=True, help="training subsets in jets, e.g. 2000,6000,12000 (nested)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every point")
    parser.add_argument("--epochs", type=float, default=None, help="passes over each point's subset (instead of --steps)")
    parser.add_argument("--budgets", default="", help="compute budgets in FLOPs, e.g. 1e12,1e13 (instead of --steps)")
    parser.add_argument("--runner", choices=RUNNERS, default="local", help="local (sequential), parallel, slurm")
    parser.add_argument("--parallel", type=int, default=2, metavar="K", help="--runner parallel: points at a time")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default jetfm-scaling-<OUT name>)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits of the fit's intervals")
    parser.add_argument("--data-unit", choices=("particles", "jets"), default="particles", help="D of the fit")
    parser.add_argument("--measure-steps", type=int, default=2, help="--dry-run: timed steps per size (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the base config for every point (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the ladder and the grid with FLOPs and times")


def run_pretrain_sweep(args: argparse.Namespace) -> int:
    from jetfm.config import ConfigError
    from jetfm.config_io import load_config
    from jetfm.data.format import DataError
    from jetfm.data.shards import Manifest
    from jetfm.messages import error, info, output
    from jetfm.data.plan import split_units
    from jetfm.data.subset import subset_jets, subset_units
    from jetfm.scaling.ladder import build_ladder, format_ladder, load_ladder

    out = args.out.resolve()
    try:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        train_jets = sorted({int(float(n)) for n in args.train_jets.split(",") if n.strip()})
        budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()})
        points = plan_points(sizes, train_jets, args.steps, budgets, args.epochs)
        if args.runner == "parallel" and args.parallel < 1:
            raise ValueError("--parallel must be >= 1")
        overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
        base = load_config(args.base, overrides)
        if base.stage != "pretrain":
            raise ConfigError(f"{args.base}: stage is {base.stage!r}; a pre-training sweep needs stage pretrain")
        manifest = Manifest.load(base.data.path)
        if not manifest.tokens:
            raise DataError(f"{base.data.path}: shards carry no token ids; run `jetfm data tokenize` first")
        ladder = load_ladder(args.ladder)
        unknown = [s for s in sizes if s not in ladder]
        if unknown:
            raise ValueError(f"--sizes: {unknown} not in {args.ladder} (sizes: {', '.join(ladder)})")
        rungs = {r.name: r for r in build_ladder({s: ladder[s] for s in sizes}, base,
                                                 vocab_size=manifest.tokens["codebook_size"] + 2,
                                                 num_classes=len(manifest.classes))}
    except (ConfigError, DataError, ValueError, OSError) as err:
        error(f"jetfm sweep pretrain: {err}")
        return 2
    experiment = args.experiment or f"jetfm-scaling-{out.name}"
    uri = base.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"

    # FLOPs per step of every point (its subset's first batches), time per step per size
    plans = []
    try:
        timing: dict[str, float] = {}
        for point in points:
            cfg = point_config(base, point, ladder[point.size], out=out, experiment=experiment, uri=uri, parent=None,
                               N=rungs[point.size].N, steps=point.steps or base.train.max_steps)
            measure_steps = args.measure_steps if args.dry_run and point.size not in timing else 0
            flops, seconds = measure(cfg, manifest, steps=measure_steps)
            timing.setdefault(point.size, seconds)
            if point.budget is not None:
                steps = max(1, round(point.budget / flops))
            elif point.epochs is not None:
                unique = subset_jets(subset_units(split_units(manifest, base.data.train_split), point.train_jets,
                                                  where=str(base.data.path)))
                steps = max(1, math.floor(point.epochs * unique / (base.data.batch_size * base.train.grad_accum_steps)))
            else:
                steps = point.steps
            plans.append((point, steps, flops))
    except (ConfigError, DataError, ValueError) as err:
        error(f"jetfm sweep pretrain: {err}")
        return 2
    if args.dry_run:
        output(format_ladder(list(rungs.values())))
        head = f"{'point':<24} {'N':>10} {'train jets':>10} {'steps':>7} {'FLOPs/step':>11} {'FLOPs':>10} {'s/step':>7} {'time':>9}"
        lines = [head, "-" * len(head)]
        total = 0.0
        for point, steps, flops in plans:
            seconds = timing[point.size] * steps
            total += seconds if math.isfinite(seconds) else 0.0
            lines.append(f"{point.name:<24} {rungs[point.size].N:>10,} {point.train_jets:>10,} {steps:>7,} "
                         f"{flops:>11.3g} {flops * steps:>10.3g} {timing[point.size]:>7.3f} {_duration(seconds):>9}")
        lines.append(f"{len(plans)} points, about {_duration(total)} one after another on this machine "
                     f"(from {args.measure_steps} timed step(s) per size)")
        output("\n".join(lines))
        return 0

    # the parent run, the points' configs, the runner
    from jetfm.artifacts.runs import ensure_experiment, log_to_run, open_run

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "study.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    parent = None
    try:
        ensure_experiment(uri, experiment, (out / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None)
        parent, new = open_run(uri, state.get("parent_run_id"), experiment=experiment, run_name=f"study-{out.name}",
                               tags={"jetfm.study": out.name, "jetfm.study.parent": "1"})
        if new:
            state["parent_run_id"] = parent
            state_path.write_text(json.dumps(state, indent=1) + "\n")
    except Exception as err:  # noqa: BLE001 - tracking never stops a study
        info(f"jetfm sweep pretrain: MLflow parent run unavailable ({type(err).__name__}: {err}); points run untracked by it")
    (out / "configs").mkdir(exist_ok=True)
    todo, configs = [], {}
    for point, steps, _ in plans:
        cfg = point_config(base, point, ladder[point.size], out=out, experiment=experiment, uri=uri, parent=parent,
                           N=rungs[point.size].N, steps=steps)
        path = out / "configs" / f"{point.name}.yaml"
        path.write_text(cfg.to_yaml())
        configs[point.name] = path
        if finished(Path(cfg.out_dir), steps):
            info(f"{point.name}: finished, skipped")
        else:
            todo.append((point, path, Path(cfg.out_dir), cfg))
    failed = []
    if args.runner == "slurm" and todo:
        submit_slurm([path for _, path, _, _ in todo], out, info)
        return 0
    if args.runner == "parallel":
        failed = run_parallel([(p, path, d) for p, path, d, _ in todo], args.parallel, info)
    else:
        for i, (point, _, _, cfg) in enumerate(todo, 1):
            info(f"[{i}/{len(todo)}] {point.name}")
            if run_local(cfg) != 0:
                failed.append(point.name)

    # the fit and report, logged to the parent run
    from jetfm.scaling.report import RecordError, load_records, write_report

    try:
        records, skipped = load_records(out / "runs", args.data_unit)
        result = write_report(records, out / "fit", skipped=skipped, bootstrap=args.bootstrap,
                              data_unit=args.data_unit)
    except (RecordError, ValueError) as err:
        error(f"jetfm sweep pretrain: no fit ({err})")
        return 1
    for obj, res in result["objectives"].items():
        law = res.get("law")
        info(f"{obj}: {res['runs']} runs: " + (f"alpha {law['alpha']:.3f}, beta {law['beta']:.3f}, E {law['E']:.4g}"
                                               if law else "; ".join(res["notes"])))
    info(f"wrote {out / 'fit'}/study.md, fit.json and {len(result['plots'])} plots")
    if parent:
        try:
            log_to_run(uri, parent, artifacts=[(out / "fit", "fit")], tags={"jetfm.points": str(len(plans))},
                       terminate=not failed)
        except Exception as err:  # noqa: BLE001
            info(f"jetfm sweep pretrain: could not log the fit to MLflow ({type(err).__name__}: {err})")
    if failed:
        error(f"jetfm sweep pretrain: {len(failed)} point(s) failed: {', '.join(failed)}; rerun to retry them")
        return 1
    return 0
