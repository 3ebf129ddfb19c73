"""`jetfm demo`: the whole chain, small, on jets generated here — the README's main job.

    jetfm demo --out runs/demo            # ~4 CPU-minutes on a 2-core laptop (measured: README)
    mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db   # printed at the end

1. Pythia 8 + FastJet: top vs QCD jets (toptag preset)       -> OUT/data
2. VQ-VAE tokenizer (configs/small/tokenizer.yaml)           -> OUT/tokenizer/final
3. tokenize the shards (token ids + reconstructed features)  -> OUT/data-tokens
4. joint NTP + MPM pre-training (configs/small/joint.yaml)   -> OUT/joint/final
5. generate jets with the pre-trained model, compare them with the data -> OUT/generated, OUT/generated/evaluation
6. fine-tune a top tagger from the pre-trained backbone and from scratch
   (configs/small/finetune_toptag.yaml)                      -> OUT/finetune-pretrained, OUT/finetune-scratch
7. score both classifiers on the test split                  -> OUT/finetune-*/eval/
8. OUT/report.md: the key numbers and plots on one page.

Every stage goes through its command (`jetfm data ...`, `python jetfm/train.py ...`, `jetfm
generate`, `jetfm evaluate ...`), exactly as a user would type it, so the demo checks the chain
the README documents. All runs go to ONE MLflow store, OUT/mlflow.db, experiment `jetfm-demo`:
a run per training stage, with the tokenizer's plots, the generative evaluation (logged to the
pre-training run that made the jets) and the classifier evaluations as artifacts.

Every step is resumable: rerunning the command continues where it stopped (a finished stage
is skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from . import messages

EXPERIMENT = "jetfm-demo"
#: the generative report's headline observables (plots shown in the report)
REPORT_OBSERVABLES = ("jet_mass", "jet_nparticles", "jet_tau32", "part_ptrel")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--jets", type=int, default=500,
                        help="training jets per class to generate (default 500; val/test get a fifth each)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each training stage (default 300)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="use this top-vs-QCD shard set (train/val/test) instead of generating one")
    parser.add_argument("--gen-jets", type=int, default=300, help="jets to sample from the pre-trained model (default 300)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="jets per training batch of every stage (default: each small preset's, 64-100)")
    parser.add_argument("--workers", type=int, default=2, help="Pythia worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generation and training (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the small models (default 1: their steps are too small to gain from "
                             "more, and spinning OpenMP threads slow down badly when a laptop is busy)")


class DemoError(RuntimeError):
    """A stage's command failed; its own message is already on stderr."""


def _run(what: str, main, argv: list[str]) -> None:
    messages.info(f"$ {what} {' '.join(argv)}")
    status = main(argv)
    if status:
        raise DemoError(f"`{what} {' '.join(argv[:3])} ...` failed (exit status {status}); rerun `jetfm demo` with "
                        "the same --out to continue after fixing it")


def run_demo(args) -> int:
    import torch

    from . import cli
    from . import train as trainer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    data = Path(args.data) if args.data else out / "data"
    tokens, generated = out / "data-tokens", out / "generated"
    val = max(1, args.jets // 5)
    timings: dict[str, float] = {}
    tracking = [f"tracking.uri={store}", f"tracking.experiment={EXPERIMENT}"]
    short = [f"train.checkpoint_every={max(1, args.steps // 2)}", f"optim.warmup_steps={min(20, args.steps // 10)}"]
    if args.batch_size:
        short.append(f"data.batch_size={args.batch_size}")

    def train(name: str, config: str, data_dir: Path, *overrides: str, evaluations: int = 1) -> Path:
        """One training stage; validated `evaluations` times (fine-tuning: twice, to pick the best)."""
        run_dir = out / name
        done = _read(run_dir / "summary.json")
        if done.get("status") == "completed" and done.get("steps") == args.steps and (run_dir / "final").is_dir():
            messages.info(f"{name}: done already ({run_dir / 'final'})")  # a rerun: nothing to set up or load
            return run_dir
        argv = ["--config", config, f"data.path={data_dir}", f"out_dir={run_dir}", f"name={name}",
                f"train.max_steps={args.steps}", f"seed={args.seed}", f"train.eval_every={max(1, args.steps // evaluations)}",
                *short, *tracking, *overrides, "--resume"]
        _run("python jetfm/train.py", trainer.main, argv)
        _log_plots(run_dir)
        return run_dir

    stages = [
        ("generate jets with Pythia 8", lambda: _run("jetfm", cli.main, [
            "data", "generate", str(data), "--preset", "toptag", "--train", str(args.jets), "--val", str(val),
            "--test", str(val), "--workers", str(args.workers), "--seed", str(args.seed)])),
        ("train the tokenizer", lambda: train("tokenizer", "small/tokenizer.yaml", data)),
        ("tokenize the jets", lambda: _run("jetfm", cli.main, [
            "data", "tokenize", "--tokenizer", str(out / "tokenizer" / "final"), "--data", str(data),
            "--out", str(tokens), "--with-reco"])),
        ("joint NTP + MPM pre-training", lambda: train("joint", "small/joint.yaml", tokens)),
        ("generate jets with the pre-trained model and compare them with the data", lambda: None if (
            generated / "evaluation" / "metrics.json").is_file() else (  # done (`jetfm generate` does not resume)
            _run("jetfm", cli.main, ["generate", "--checkpoint", str(out / "joint" / "final"),
                                     "--n-jets", str(args.gen_jets), "--out", str(generated), "--seed",
                                     str(args.seed), "--quiet", "--overwrite"]),
            _run("jetfm", cli.main, ["evaluate", "generative", "--generated", str(generated), "--reference",
                                     str(data), "--tracking-uri", store, "--no-class-plots", "--no-tokenized-plots"]))),
        ("fine-tune a top tagger: pre-trained backbone vs from scratch", lambda: (
            train("finetune-pretrained", "small/finetune_toptag.yaml", tokens,
                  f"finetune.pretrained={out / 'joint' / 'final'}", evaluations=2),
            train("finetune-scratch", "small/finetune_toptag.yaml", tokens,
                  "finetune.mode=scratch", "finetune.pretrained=null", evaluations=2))),
        ("score both classifiers on the test split", lambda: [
            _run("jetfm", cli.main, ["evaluate", "classifier", "--checkpoint", str(out / name / "best"),
                                     "--data", str(tokens), "--split", "test", "--out", str(out / name / "eval" / "test"),
                                     "--no-progress"])
            for name in ("finetune-pretrained", "finetune-scratch")
            if not (out / name / "eval" / "test" / "metrics.json").is_file()]),  # scored already
    ]
    if args.data:
        stages = stages[1:]
    started = time.perf_counter()
    try:
        for i, (what, step) in enumerate(stages, 1):
            messages.info(f"[{i}/{len(stages)}] {what}")
            t0 = time.perf_counter()
            step()
            timings[what] = time.perf_counter() - t0
    except DemoError as error:
        messages.error(f"demo: {error}")
        return 1
    timings["total"] = time.perf_counter() - started
    report = write_report(out, timings, args)
    messages.output(f"done in {timings['total'] / 60:.1f} min: {report}\n"
                    f"open the runs:  mlflow ui --backend-store-uri {store}")
    return 0


def _log_plots(run_dir: Path) -> None:
    """The stage's validation plots (run_dir/eval/*.png) as artifacts of its MLflow run."""
    try:
        record = json.loads((run_dir / "summary.json").read_text()).get("mlflow") or {}
        pngs = sorted((run_dir / "eval").glob("*.png"))
        if record.get("run_id") and pngs:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(record["uri"])
            for png in pngs:
                client.log_artifact(record["run_id"], str(png), "plots")
    except Exception as error:  # noqa: BLE001 - the plots stay on disk; tracking is a convenience here
        messages.warn(f"demo: could not log {run_dir}/eval plots to MLflow ({type(error).__name__}: {error})")


# --------------------------------------------------------------------------- the report
def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _image(out: Path, path: Path, title: str) -> str:
    return f"![{title}]({path.relative_to(out).as_posix()})" if path.is_file() else f"({title}: no plot)"


def write_report(out: Path, timings: dict[str, float], args) -> Path:
    """OUT/report.md: what ran, the key numbers and plots, where the rest is."""
    tok, joint = _read(out / "tokenizer" / "summary.json"), _read(out / "joint" / "summary.json")
    gen = _read(out / "generated" / "evaluation" / "metrics.json")
    classifiers = {name: _read(out / f"finetune-{name}" / "eval" / "test" / "metrics.json")
                   for name in ("pretrained", "scratch")}
    lines = [
        "# jetfm demo report", "",
        (f"Top vs QCD jets from {args.data}, " if args.data else
         f"Top vs QCD jets from Pythia 8 ({args.jets} training jets per class, seed {args.seed}), ") +
        f"{args.steps} steps per training stage, small models (configs/small/). "
        f"Total {timings.get('total', 0) / 60:.1f} min. All runs: `mlflow ui --backend-store-uri "
        f"sqlite:///{(out / 'mlflow.db').resolve()}` (experiment `{EXPERIMENT}`).", "",
        "| stage | minutes |", "|---|---|",
        *[f"| {what} | {seconds / 60:.1f} |" for what, seconds in timings.items() if what != "total"], "",
        "## Tokenizer (VQ-VAE)", "",
        "Validation: " + ", ".join(f"{k} {_num(v)}" for k, v in list((tok.get("val") or {}).items())[:6]), "",
        _image(out, out / "tokenizer" / "eval" / "features.png", "true vs reconstructed features"), "",
        "## Joint NTP + MPM pre-training", "",
        "Validation: " + ", ".join(f"{k} {_num(v)}" for k, v in list((joint.get("val") or {}).items())[:6]), "",
        "## Generated jets vs the data", "",
    ]
    rows = (((gen.get("comparisons") or {}).get("reference") or {}).get("all") or {}).get("rows") or []
    if rows:
        lines += [f"{gen['generated']['n_jets']} generated jets vs {gen['reference']['n_jets']} test jets "
                  "(KL in reference-quantile bins; W1 exact; lower is closer):", "",
                  "| observable | KL | W1 |", "|---|---|---|",
                  *[f"| {r['observable']} | {_num(r.get('kl'), 3)} | {_num(r.get('w1'), 3)} |" for r in rows], ""]
        plots = out / "generated" / "evaluation" / "plots" / "reference" / "all"
        lines += [" ".join(_image(out, plots / f"{name}.png", name) for name in REPORT_OBSERVABLES), ""]
    else:
        lines += ["(no generative evaluation found)", ""]
    lines += ["## Top tagging: pre-trained backbone vs from scratch", "",
              "| backbone | accuracy | AUC | 1/ε_B at ε_S = 30% | 1/ε_B at ε_S = 50% |", "|---|---|---|---|---|"]
    def rejection(m: dict, eff: float) -> str:  # no background jet passing: a lower limit, not infinity
        limit = m.get(f"rejection@{eff}_lower_limit")
        return f"> {limit:.3g}" if limit else _num(m.get(f"rejection@{eff}"), 3)

    for name, m in classifiers.items():
        lines.append(f"| {name} | {_num(m.get('accuracy'))} | {_num(m.get('auc'))} | {rejection(m, 0.3)} | "
                     f"{rejection(m, 0.5)} |")
    lines += ["", " ".join(_image(out, out / f"finetune-{name}" / "eval" / "test" / "roc.png", f"ROC, {name}")
                           for name in classifiers), "",
              "A demo this small is a smoke test of the chain, not a physics result: the published "
              "numbers (docs/METHOD.md) need millions of jets and GPU-days.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
