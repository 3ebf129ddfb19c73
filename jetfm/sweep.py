"""The data-efficiency study: fine-tune over a grid of training-set sizes, pre-trainings, input
modes and fine-tuning modes; evaluate every run on the test split; tabulate and plot.

    jetfm sweep finetune --base configs/finetune_toptag.yaml --data data/toptag-tokens \\
        --train-sizes 100,1000,10000 \\
        --pretrained none=,ntp=runs/ntp-{input}/final,mpm=runs/mpm-{input}/final,joint=runs/joint-{input}/final \\
        --inputs continuous,token --modes full,frozen --out runs/study [--seeds 0,1,2] [--set optim.lr=3e-4]

The grid. `--pretrained NAME=PATH,...`: `none=` (empty path) trains from scratch (finetune.mode
scratch, once per input mode); every other entry is a pre-training export (out_dir/final) and
runs in each of `--modes`; `{input}` in PATH is replaced by each of `--inputs`, and a PATH
without it is used for the input mode it was pre-trained with only. A pre-trained run's backbone
architecture (model.dim, num_blocks, ...) is its checkpoint's; scratch runs take that of the
first pre-trained checkpoint of their input mode (the base config's only if there is none), so
that the study compares initialisations, not model sizes. `--set key=value` overrides the base
config of every run (applied last; repeatable).

Training sets. For each size N, the first N jets of a seeded, class-stratified permutation of
the training split are written once as a shard set OUT/data/train-N (val and test shards are
linked, not copied): deterministic, the same jets for every run of that size, and nested (the
100 jets are among the 1,000). A size >= the whole split uses the data as it is.

Every run goes through the one trainer (in this process, or with `--launcher "accelerate launch
..."` as a subprocess) into OUT/runs/<name>, logs to one MLflow experiment (default tracking: the
sqlite file OUT/mlflow.db) with the grid values as tags (study.train_size, study.pretrained,
study.input, study.mode, study.seed), and is evaluated on `--eval-split` with the best validated
model (`jetfm evaluate classifier`, logged to the same run). The sweep is resumable: rerun the
same command and finished runs (OUT/runs/<name>/result.json) are skipped, interrupted ones resume
from their last checkpoint.

Outputs: OUT/study.csv (one row per run), OUT/study.md (accuracy, AUC and 1/eps_B at eps_S=30%
per combination and size; mean ± std over seeds, or ± the statistical uncertainty with one seed),
OUT/accuracy.png, OUT/auc.png, OUT/rejection30.png (one curve per pre-training/input/mode; with
several input modes also one set per input mode, e.g. OUT/accuracy_token.png).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCRATCH = "none"
TRAIN_PY = Path(__file__).resolve().parent / "train.py"


# --------------------------------------------------------------------------- training subsets
def stratified_choice(labels: np.ndarray, n_jets: int, seed: int) -> np.ndarray:
    """Indices of n_jets jets: per class the first ones of a seeded permutation, class fractions as
    in `labels` (largest remainder), then shuffled. For one seed the choice of N is a subset of
    the choice of any larger N."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, 0])
    perms = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]  # independent of n_jets
    exact = n_jets * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quota), kind="stable")[: n_jets - quota.sum()]:
        quota[i] += 1
    if n_jets >= len(classes):
        quota = np.maximum(quota, 1)  # every class present, even a rare one
        while quota.sum() > n_jets:
            quota[np.argmax(quota)] -= 1
    chosen = np.concatenate([p[:q] for p, q in zip(perms, quota)])
    return chosen[np.random.default_rng([seed, 1, n_jets]).permutation(len(chosen))]


def write_train_subset(src, dst, n_jets: int, *, seed: int = 0, split: str = "train",
                       jets_per_shard: int = 10_000) -> Path:
    """Shard set `dst` = `src` with split `split` cut to n_jets jets (stratified_choice); the other
    splits' shards are symlinked (copied where links fail). Reused if already written."""
    from jetfm.data.format import DataError, JetArrays
    from jetfm.data.reader import iterate_jets
    from jetfm.artifacts.atomic import atomic_directory
    from jetfm.data.shards import Manifest, ShardSetWriter, creation_info

    from jetfm.data.remote import location, resolved

    src, dst = location(src), Path(dst)  # src may be a URL (data/remote.py)
    manifest = Manifest.load(src)
    info = {"subset_of": resolved(src), "split": split, "n_jets": int(n_jets), "seed": int(seed)}
    if (dst / Manifest.FILENAME).exists():
        existing = Manifest.load(dst)
        if existing.source.get("subset") != info:
            raise DataError(f"{dst} holds another subset ({existing.source.get('subset')}), wanted {info}")
        return dst
    labels = np.concatenate([jets.label for jets in iterate_jets(src, split)])
    if n_jets > len(labels):
        raise DataError(f"{src}: split {split!r} has {len(labels)} jets, fewer than the {n_jets} asked for")
    order = stratified_choice(labels, n_jets, seed)
    wanted = np.sort(order)

    pieces, start = [], 0
    for jets in iterate_jets(src, split):
        lo, hi = np.searchsorted(wanted, [start, start + len(jets)])
        if hi > lo:
            pieces.append(jets.select(wanted[lo:hi] - start))
        start += len(jets)
    chosen = JetArrays.concat(pieces).select(np.searchsorted(wanted, order))  # file order -> chosen order
    subset = Manifest(source={**manifest.source, "subset": info}, particle_features=manifest.particle_features,
                      jet_features=manifest.jet_features, classes=manifest.classes,
                      max_particles=manifest.max_particles, chunk_size=manifest.chunk_size,
                      created_by=creation_info(), tokens=manifest.tokens, reco_features=manifest.reco_features)
    with atomic_directory(dst) as tmp:
        writer = ShardSetWriter(tmp, split, subset, jets_per_shard=jets_per_shard, save_each=True)
        writer.write(chosen)
        writer.finish()
        for other, shards in manifest.splits.items():
            if other == split:
                continue
            for shard in shards:
                target, link = (src / shard["path"]).resolve(), tmp / shard["path"]
                link.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.symlink(target, link)
                except OSError:
                    shutil.copy2(target, link)
            subset.splits[other] = [dict(s) for s in shards]
        subset.save(tmp)
    return dst


# --------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Job:
    train_size: int
    pretrained: str  # name in --pretrained ("none" = scratch)
    checkpoint: str | None
    input: str  # model.input_mode
    mode: str  # finetune.mode
    seed: int
    objective: str | None = None  # of the pre-training checkpoint

    @property
    def name(self) -> str:
        return f"n{self.train_size}-{self.pretrained}-{self.input}-{self.mode}-s{self.seed}"

    @property
    def combo(self) -> str:
        """The curve this run belongs to."""
        return f"{self.pretrained} {self.input} {self.mode}" if self.pretrained != SCRATCH else f"scratch {self.input}"


def _split_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    try:
        return [cast(t) for t in items]
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def parse_pretrained(text: str) -> dict[str, str | None]:
    """'none=,ntp=runs/ntp-{input}/final' -> {"none": None, "ntp": "runs/ntp-{input}/final"}."""
    out: dict[str, str | None] = {}
    for item in _split_list(text, "--pretrained"):
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--pretrained: expected NAME=PATH (NAME of letters, digits, - and _), got {item!r}")
        if name in out:
            raise ValueError(f"--pretrained: {name!r} given twice")
        path = path.strip() or None
        if (name == SCRATCH) != (path is None):
            raise ValueError(f"--pretrained: {SCRATCH}= (no path) is the from-scratch baseline; {item!r} mixes them up")
        out[name] = path
    return out


def checkpoint_config(path: str) -> dict:
    from jetfm.artifacts.exports import read_pretrain

    return read_pretrain(path, where=f"finetune.pretrained={path}").saved


def plan(pretrained: dict[str, str | None], inputs: list[str], modes: list[str], sizes: list[int],
         seeds: list[int]) -> tuple[list[Job], dict[str, dict]]:
    """(jobs, backbones): backbones maps a checkpoint path to its `model:` config, and "scratch:<input>"
    to the first checkpoint's of that input mode (the size of the scratch runs). Checkpoints are
    read here, so that a missing or mismatched one fails before hours of training."""
    entries: list[tuple[str, str | None, str, str | None]] = []  # (name, checkpoint, input, objective)
    backbones: dict[str, dict] = {}
    for name, path in pretrained.items():
        if path is None:
            entries += [(name, None, inp, None) for inp in inputs]
            continue
        for inp in inputs if "{input}" in path else [None]:
            resolved = path.replace("{input}", inp) if inp else path
            saved = checkpoint_config(resolved)
            model = saved.get("model") or {}
            actual = model.get("input_mode", "continuous")
            if inp is not None and actual != inp:
                raise ValueError(f"--pretrained {name}: {resolved} was pre-trained with input_mode={actual}, not {inp}")
            if actual not in inputs:
                print(f"[jetfm sweep] {name}: {resolved} has input_mode={actual}, not in --inputs; skipped", file=sys.stderr)
                continue
            entries.append((name, resolved, actual, (saved.get("objective") or {}).get("name")))
            backbones[resolved] = model
            backbones.setdefault(f"scratch:{actual}", model)
    jobs = []
    for size in sizes:
        for name, path, inp, objective in entries:
            for mode in (["scratch"] if path is None else [m for m in modes if m != "scratch"]):
                for seed in seeds:
                    jobs.append(Job(size, name, path, inp, mode, seed, objective))
    return jobs, backbones


# --------------------------------------------------------------------------- one run
def job_overrides(job: Job, *, data_dir: Path, run_dir: Path, base, backbones: dict[str, dict], steps: int,
                  eval_every: int) -> list[str]:
    """The run's `key=value` config overrides (before the user's --set ones)."""
    from jetfm.finetune.model import BACKBONE_KEYS

    def value(v) -> str:
        return json.dumps(v) if not isinstance(v, str) else v

    overrides = [
        f"name={job.name}", f"out_dir={run_dir}", f"seed={job.seed}", f"data.path={data_dir}",
        f"data.batch_size={min(base.data.batch_size, job.train_size)}",
        f"model.input_mode={job.input}", f"finetune.mode={job.mode}",
        f"finetune.pretrained={job.checkpoint if job.checkpoint else 'null'}",
        f"train.max_steps={steps}", f"train.eval_every={eval_every}",
    ]
    # the backbone: the checkpoint's own; scratch runs take that of the pre-trained runs of their input
    # mode, so that the study compares initialisations, not model sizes (the base's model.* otherwise)
    backbone = backbones.get(job.checkpoint or f"scratch:{job.input}", {})
    overrides += [f"model.{k}={value(backbone[k])}" for k in BACKBONE_KEYS if k != "input_mode" and k in backbone]
    if job.mode == "frozen" or job.checkpoint is None:
        overrides.append("finetune.backbone_lr_scale=1.0")
    return overrides


def job_tags(job: Job, study: str) -> dict[str, str]:
    """MLflow tags of a run: the study and its grid values."""
    return {"study": study, "study.train_size": str(job.train_size), "study.pretrained": job.pretrained,
            "study.objective": job.objective or "none", "study.input": job.input, "study.mode": job.mode,
            "study.seed": str(job.seed), "study.combo": job.combo}


def train_job(cfg, config_path: Path, launcher: str | None) -> int:
    """Train (or resume) one run; the trainer's exit status."""
    if launcher:
        command = [*shlex.split(launcher), str(TRAIN_PY), "--config", str(config_path), "--resume"]
        return subprocess.call(command)
    from jetfm import train as trainer

    return trainer.train(cfg, resume="auto")  # a fresh Accelerator state per run (make_accelerator)


def run_job(job: Job, cfg, config_path: Path, *, launcher: str | None, eval_split: str, signal,
            progress: bool) -> dict:
    """Train + evaluate one run; its result row (also written to <run>/result.json)."""
    from jetfm.finetune.evaluate import evaluate_classifier

    run_dir = Path(cfg.out_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    t0 = time.perf_counter()
    if summary.get("status") != "completed" or not (run_dir / "final").is_dir():
        code = train_job(cfg, config_path, launcher)
        if code != 0:
            raise RuntimeError(f"training exited with status {code} (see {run_dir}/summary.json)")
        summary = json.loads(summary_path.read_text())
    checkpoint = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "final"
    record = evaluate_classifier(checkpoint, cfg.data.path, split=eval_split, out=run_dir / "eval" / eval_split,
                                 signal=signal, mlflow=cfg.tracking.enabled, progress=progress)
    row = {
        **{k: v for k, v in dataclasses.asdict(job).items() if k != "checkpoint"},
        "combo": job.combo,
        "name": job.name,
        "checkpoint": job.checkpoint,
        "evaluated": str(checkpoint),
        "best_step": (summary.get("best") or {}).get("step"),
        "steps": summary.get("steps"),
        "train_seconds": summary.get("train_time_s"),
        "sweep_seconds": round(time.perf_counter() - t0, 1),
        "mlflow_run_id": (summary.get("mlflow") or {}).get("run_id"),
        "n_test": record["n_jets"],
        "accuracy": record["accuracy"],
        "auc": record["auc"],
        "n_background": record["n_background"],
    }
    for eff in (0.3, 0.5):
        key = f"rejection@{eff}"
        row[key] = record.get(key)
        row[f"{key}_unc"] = record.get(f"{key}_unc")
        row[f"{key}_n_background_passing"] = record.get(f"{key}_n_background_passing")
    from jetfm.finetune.evaluate import _json_safe

    row = _json_safe(row)  # non-finite (a rejection with no background passing) -> null, as when read back
    (run_dir / "result.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


# --------------------------------------------------------------------------- tables and plots
COLUMNS = ["train_size", "pretrained", "objective", "input", "mode", "seed", "n_test", "accuracy", "auc",
           "rejection@0.3", "rejection@0.3_unc", "rejection@0.3_n_background_passing", "rejection@0.5",
           "rejection@0.5_unc", "n_background", "best_step", "steps", "train_seconds", "name", "mlflow_run_id"]


def _finite(value) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else math.nan


def _groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["combo"], int(row["train_size"])), []).append(row)
    return groups


def aggregate(rows: list[dict], metric: str) -> dict[tuple[str, int], tuple[float, float, int]]:
    """{(combo, size): (mean, uncertainty, seeds)}: the std over seeds (>= 2 runs), else the run's
    statistical uncertainty (binomial for accuracy, the rejection's own; none for AUC)."""
    out = {}
    for key, group in _groups(rows).items():
        values = np.array([_finite(r.get(metric)) for r in group])
        ok = values[np.isfinite(values)]
        if len(ok) == 0:
            out[key] = (math.nan, math.nan, len(group))
            continue
        mean = float(ok.mean())
        if len(ok) >= 2:
            unc = float(ok.std(ddof=1))
        elif metric == "accuracy":
            unc = math.sqrt(mean * (1 - mean) / max(group[0]["n_test"], 1))
        elif metric.startswith("rejection@"):
            unc = _finite(group[0].get(f"{metric}_unc"))
        else:
            unc = math.nan
        out[key] = (mean, unc, len(group))
    return out


def _cell(mean: float, unc: float, runs: int, digits: int, show_runs: bool) -> str:
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:.{digits}f}" if digits else f"{mean:.3g}"
    if math.isfinite(unc):
        text += f" ± {unc:.{digits}f}" if digits else f" ± {unc:.2g}"
    return text + (f" ({runs})" if show_runs else "")


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    rows = sorted(rows, key=lambda r: (r["combo"], int(r["train_size"]), r["seed"]))
    with open(out / "study.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    sizes = sorted({int(r["train_size"]) for r in rows})
    combos = sorted({r["combo"] for r in rows})
    n_test = sorted({r["n_test"] for r in rows})
    n_bkg = sorted({r["n_background"] for r in rows})
    per_cell = {len(group) for group in _groups(rows).values()}
    mixed = len(per_cell) > 1
    if per_cell == {1}:
        how = "One seed per point: ± is the test set's statistical uncertainty (binomial; none for AUC)."
    else:
        how = ("± is the std over seeds (the number of seeds in brackets) where a point has several, else the "
               "test set's statistical uncertainty (binomial; none for AUC)." if mixed else
               f"Mean ± std over {per_cell.pop()} seeds (training seed; the same training jets).")
    lines = [f"# Fine-tuning data-efficiency study ({len(rows)} runs)", "",
             f"Test jets per run: {', '.join(map(str, n_test))} ({', '.join(map(str, n_bkg))} background). " + how, ""]
    for metric, title, digits in (("accuracy", "Accuracy", 4), ("auc", "AUC", 4),
                                  ("rejection@0.3", "Background rejection 1/eps_B at eps_S = 30%", 0),
                                  ("rejection@0.5", "Background rejection 1/eps_B at eps_S = 50%", 0)):
        table = aggregate(rows, metric)
        if all(not math.isfinite(v[0]) for v in table.values()):
            continue
        lines += [f"## {title}", "", "| pre-training / input / mode | " + " | ".join(f"N = {s:,}" for s in sizes) + " |",
                  "|---" * (len(sizes) + 1) + "|"]
        for combo in combos:
            cells = [_cell(*table[(combo, s)], digits, mixed) if (combo, s) in table else "" for s in sizes]
            lines.append(f"| {combo} | " + " | ".join(cells) + " |")
        lines.append("")
    infinite = [r["name"] for r in rows if r.get("rejection@0.3_n_background_passing") == 0]
    if infinite:
        lines += [f"No background jet passes at eps_S = 30% in: {', '.join(infinite)} (rejection > N_B / 3, "
                  "95% CL; left out of the table).", ""]
    (out / "study.md").write_text("\n".join(lines))
    return out / "study.csv", out / "study.md"


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """accuracy.png, auc.png, rejection30.png: one curve per combination; with several input modes
    also one set per input mode (<metric>_<input>.png), which stays readable with many curves."""
    from jetfm.metrics.plots import plot_scaling

    sizes = sorted({int(r["train_size"]) for r in rows})
    inputs = sorted({r["input"] for r in rows})
    subsets = [("", rows)] + ([(f"_{i}", [r for r in rows if r["input"] == i]) for i in inputs] if len(inputs) > 1 else [])
    paths = []
    for metric, name, label, logy in (("accuracy", "accuracy", "Test accuracy", False),
                                      ("auc", "auc", "Test AUC", False),
                                      ("rejection@0.3", "rejection30", r"$1/\varepsilon_B$ at $\varepsilon_S = 30\%$", True)):
        for suffix, subset in subsets:
            table = aggregate(subset, metric)
            if all(not math.isfinite(v[0]) for v in table.values()):
                continue
            series = {}
            for combo in sorted({r["combo"] for r in subset}):
                y = [table.get((combo, s), (math.nan,))[0] for s in sizes]
                e = [table.get((combo, s), (math.nan, math.nan))[1] for s in sizes]
                series[combo] = (np.array(y), np.nan_to_num(np.array(e), nan=0.0))
            title = "Fine-tuning data efficiency" + (f" ({suffix[1:]} input)" if suffix else "")
            paths.append(plot_scaling(sizes, series, out / f"{name}{suffix}.png", "Training jets", label, logy=logy,
                                      title=title))
    return paths


def _log_study(uri: str, experiment: str, out: Path, files: list[Path]) -> None:
    """The study's table and plots as artifacts of one summary run of the experiment (reused on rerun)."""
    from jetfm.artifacts.runs import log_to_run, open_run

    state_path = out / "study.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    run_id, new = open_run(uri, state.get("summary_run_id"), experiment=experiment, run_name="study-summary",
                           tags={"study": str(out), "study.summary": "1"})
    if new:
        state["summary_run_id"] = run_id
        state_path.write_text(json.dumps(state, indent=1) + "\n")
    log_to_run(uri, run_id, artifacts=[(path, None) for path in files], terminate=new)


def ensure_experiment(uri: str, experiment: str, out: Path) -> None:
    """Create the experiment with its artifacts beside the sqlite database (not in ./mlruns)."""
    from jetfm.artifacts.runs import ensure_experiment as ensure

    ensure(uri, experiment, (out / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None)


# --------------------------------------------------------------------------- command line
def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `jetfm sweep finetune|pretrain` (the study kind is the first positional)."""
    from jetfm.sweep_pretrain import add_pretrain_arguments

    parser.description = ("finetune: the data-efficiency study (fine-tunings over training-set sizes); "
                          "pretrain: the scaling study (pre-training over model sizes x data x compute, then the fit)")
    studies = parser.add_subparsers(dest="study", required=True, metavar="{finetune,pretrain}")
    add_finetune_arguments(studies.add_parser("finetune", help="fine-tune over a grid of training-set sizes"))
    add_pretrain_arguments(studies.add_parser("pretrain", help="pre-train over sizes x data x compute, fit L(N, D)"))


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `jetfm sweep finetune`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--base", required=True, type=Path, help="fine-tuning config of every run (stage finetune)")
    parser.add_argument("--data", default=None, help="shard set, directory or URL (default the base config's data.path)")
    parser.add_argument("--out", required=True, type=Path, help="study directory (runs, subsets, table, plots)")
    parser.add_argument("--train-sizes", required=True, help="training jets per run, e.g. 100,1000,10000")
    parser.add_argument("--pretrained", default=f"{SCRATCH}=",
                        help=f"NAME=PATH,...: pre-training exports; {SCRATCH}= is from scratch; {{input}} in PATH "
                             "becomes each input mode (default none=)")
    parser.add_argument("--inputs", default="continuous", help="input modes: continuous,token (default continuous)")
    parser.add_argument("--modes", default="full,frozen", help="fine-tuning modes of pre-trained runs (default full,frozen)")
    parser.add_argument("--seeds", default="0", help="training seeds per grid point, e.g. 0,1,2 (default 0)")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed choosing the training subsets (default 0)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="train each run for this many epochs of its N jets, at least --min-steps and at most "
                             "the base config's train.max_steps (default: train.max_steps for every size)")
    parser.add_argument("--min-steps", type=int, default=50, help="with --epochs: the fewest steps of a run (default 50)")
    parser.add_argument("--evals", type=int, default=10,
                        help="validations per run (model selection of out_dir/best; default 10)")
    parser.add_argument("--eval-split", default="test", help="split every run is evaluated on (default test)")
    parser.add_argument("--signal", default=None, help="headline signal class (default: the other class of a binary task)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default jetfm-study-<OUT name>)")
    parser.add_argument("--launcher", default=None,
                        help="run training as a subprocess with this launcher, e.g. 'accelerate launch --num_processes 4' "
                             "(default: in this process)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable), e.g. --set optim.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_sweep(args: argparse.Namespace) -> int:
    if args.study == "pretrain":
        from jetfm.sweep_pretrain import run_pretrain_sweep

        return run_pretrain_sweep(args)
    from jetfm.config import ConfigError
    from jetfm.config_io import load_config
    from jetfm.data.format import DataError
    from jetfm.data.shards import Manifest
    from jetfm.data.remote import location

    out = args.out.resolve()
    try:
        sizes = sorted(set(_split_list(args.train_sizes, "--train-sizes", int)))
        if sizes[0] < 1:
            raise ValueError("--train-sizes must be >= 1")
        inputs = _split_list(args.inputs, "--inputs")
        modes = _split_list(args.modes, "--modes")
        seeds = _split_list(args.seeds, "--seeds", int)
        for value in inputs:
            if value not in ("continuous", "token"):
                raise ValueError(f"--inputs: {value!r} is not continuous or token")
        for value in modes:
            if value not in ("full", "frozen", "scratch"):
                raise ValueError(f"--modes: {value!r} is not full or frozen")
        base = load_config(args.base, args.overrides)
        if base.stage != "finetune":
            raise ConfigError(f"{args.base}: stage {base.stage}, expected finetune")
        data = location(args.data or base.data.path or "")
        manifest = Manifest.load(data)
        n_train = manifest.n_jets(base.data.train_split)
        if sizes[-1] > n_train:  # "all of it": the table says how many that is
            print(f"jetfm sweep: {data} holds {n_train:,} training jets; sizes above are run as {n_train:,}",
                  file=sys.stderr)
            sizes = sorted({min(s, n_train) for s in sizes})
        jobs, backbones = plan(parse_pretrained(args.pretrained), inputs, modes, sizes, seeds)
    except (ConfigError, DataError, ValueError) as error:
        print(f"jetfm sweep: error: {error}", file=sys.stderr)
        return 2
    if not jobs:
        print("jetfm sweep: error: the grid is empty", file=sys.stderr)
        return 2
    explicit = {o.split("=", 1)[0].strip() for o in args.overrides}
    user_uri = base.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = user_uri or f"sqlite:///{out / 'mlflow.db'}"
    experiment = args.experiment or (base.tracking.experiment if "tracking.experiment" in explicit
                                     else f"jetfm-study-{out.name}")

    def steps_for(size: int) -> int:
        if args.epochs is None:
            return base.train.max_steps
        batch = min(base.data.batch_size, size)
        return int(min(base.train.max_steps, max(args.min_steps, math.ceil(args.epochs * size / batch))))

    print(f"jetfm sweep: {len(jobs)} runs -> {out} (data {data}: {n_train:,} training jets; MLflow {uri}, "
          f"experiment {experiment})", file=sys.stderr)
    if args.dry_run:
        for job in jobs:
            print(f"{job.name}  steps {steps_for(job.train_size)}  checkpoint {job.checkpoint or '-'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "study.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    state_path.write_text(json.dumps(state, indent=1, default=str) + "\n")
    if base.tracking.enabled:
        try:
            ensure_experiment(uri, experiment, out)
        except Exception as error:  # noqa: BLE001 - the trainer's tracker copes with an outage itself
            print(f"jetfm sweep: MLflow at {uri}: {type(error).__name__}: {error}", file=sys.stderr)

    rows, failed = [], []
    for i, job in enumerate(jobs, 1):
        run_dir = out / "runs" / job.name
        result = run_dir / "result.json"
        if result.exists():
            rows.append(json.loads(result.read_text()))
            print(f"[{i}/{len(jobs)}] {job.name}: done before, skipped", file=sys.stderr)
            continue
        try:
            if job.train_size >= n_train:
                data_dir = data
            else:
                data_dir = write_train_subset(data, out / "data" / f"train-{job.train_size}", job.train_size,
                                              seed=args.subset_seed, split=base.data.train_split)
            steps = steps_for(job.train_size)
            eval_every = max(1, steps // max(1, args.evals))
            overrides = job_overrides(job, data_dir=data_dir, run_dir=run_dir, base=base, backbones=backbones,
                                      steps=steps, eval_every=eval_every)
            user = list(args.overrides)
            if job.mode != "full":  # a backbone lr only means something when the backbone trains with the head
                user = [o for o in user if o.split("=", 1)[0].strip() != "finetune.backbone_lr_scale"]
            overrides = [o for o in overrides if o.split("=", 1)[0] not in {u.split("=", 1)[0].strip() for u in user}]
            overrides += user
            cfg = load_config(args.base, overrides)
            cfg.tracking.uri, cfg.tracking.experiment = uri, experiment
            cfg.tracking.tags.update(job_tags(job, out.name))
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path = run_dir / "sweep_config.yaml"
            config_path.write_text(cfg.to_yaml())
            print(f"[{i}/{len(jobs)}] {job.name}: {steps} steps on {job.train_size:,} jets", file=sys.stderr)
            rows.append(run_job(job, cfg, config_path, launcher=args.launcher, eval_split=args.eval_split,
                                signal=args.signal, progress=not args.no_progress))
            r = rows[-1]
            print(f"[{i}/{len(jobs)}] {job.name}: accuracy {r['accuracy']:.4f}, AUC {r['auc']:.4f}"
                  + (f", 1/eps_B@30% {r['rejection@0.3']:.3g}" if r.get("rejection@0.3") else ""), file=sys.stderr)
        except KeyboardInterrupt:
            print(f"jetfm sweep: interrupted in {job.name}; rerun the same command to continue", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - one broken run must not cost the others
            failed.append(job.name)
            print(f"jetfm sweep: {job.name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    # the tables cover every finished run of the study directory: a study extended in pieces
    # (more seeds, more sizes) is tabulated as a whole
    done = {r["name"] for r in rows}
    for path in sorted((out / "runs").glob("*/result.json")):
        row = json.loads(path.read_text())
        if row.get("name") not in done:
            rows.append(row)
            done.add(row.get("name"))
    if rows:
        csv_path, md_path = write_tables(rows, out)
        plots = write_plots(rows, out)
        print(md_path.read_text())
        print(f"written: {csv_path}, {md_path}, " + ", ".join(p.name for p in plots), file=sys.stderr)
        if base.tracking.enabled:
            try:
                _log_study(uri, experiment, out, [csv_path, md_path, *plots])
            except Exception as error:  # noqa: BLE001
                print(f"jetfm sweep: could not log the study to MLflow ({type(error).__name__}: {error})", file=sys.stderr)
    if failed:
        print(f"jetfm sweep: {len(failed)} run(s) failed: {', '.join(failed)}; rerun to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m jetfm.sweep finetune|pretrain ...` (the same as `jetfm sweep ...`)."""
    parser = argparse.ArgumentParser(prog="jetfm sweep")
    add_sweep_arguments(parser)
    return run_sweep(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
