"""Classifier evaluation: the fine-tuning stage's validation and `jetfm evaluate classifier`.

    jetfm evaluate classifier --checkpoint runs/finetune_toptag/best --data data/toptag [--split test] [--out DIR]

prints and writes (DIR, default <run>/eval/<split>_<checkpoint name>/):
    metrics.json     accuracy, AUC (macro one-vs-rest for > 2 classes), background rejection
                     1/eps_B at eps_S = 0.3 and 0.5 with its binomial uncertainty and the number of
                     background jets (and of those passing), per-class table, confusion matrix
    roc.png          1/eps_B vs eps_S, every class against the background class
    confusion.png    row-normalised confusion matrix
The data may hold fewer classes than the classifier, or declare more (a JetClass conversion of
only TTBar_* and ZJetsToNuNu_* files declares all ten): data classes are matched to the
classifier's by name (`--class-map DATA=MODEL` renames), and the classes with jets in the split
are scored (`--classes` picks them), probabilities renormalised over them; the metrics then say
which classes they cover (`scored_classes`, MLflow keys `<split>_on_QCD-Tbqq/...`).

and logs the metrics (`<split>/accuracy`, `<split>/auc`, `<split>/rejection_eff0.3`, ...) and the
files to the MLflow run that trained the checkpoint (its id is in <run>/summary.json).

During training the trainer calls `evaluate(model, batches, cfg, out_dir)` on every rank: it
returns {"loss", "acc", "auc"} over the validation batches of ALL ranks (predictions are
gathered first: an AUC is not a mean of per-rank AUCs).

Legend: N jets, C classes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jetfm import messages

EFFICIENCIES = (0.3, 0.5)


# --------------------------------------------------------------------------- predictions
@torch.no_grad()
def predict(model, batches, device=None, progress=None, label_map=None) -> dict:
    """{"labels" (N,) int64, "probs" (N, C) float64, "loss" mean cross-entropy} over `batches`.

    label_map: optional (C_data,) int64 tensor, data label -> classifier class index, or -1 to
    leave the jet out (data whose manifest declares other classes; see class_mapping)."""
    labels, probs = [], []
    loss_sum, n = 0.0, 0
    for batch in batches:
        if device is not None:
            batch = batch.to(device)
        labels_B = batch.labels if label_map is None else label_map.to(batch.labels.device)[batch.labels]
        keep_B = labels_B >= 0
        labels_B = labels_B[keep_B]
        model.check_labels(labels_B)
        logits_BC = model.logits(batch).float()[keep_B]
        loss_sum += float(F.cross_entropy(logits_BC, labels_B, reduction="sum"))
        n += int(labels_B.numel())
        labels.append(labels_B.cpu().numpy())
        probs.append(logits_BC.softmax(-1).double().cpu().numpy())
        if progress is not None:
            progress.update(batch.num_jets)
    C = model.num_classes
    return {
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "probs": np.concatenate(probs) if probs else np.zeros((0, C)),
        "loss": loss_sum / max(n, 1),
        "n": n,
    }


def _gather(result: dict) -> dict:
    """Predictions of every rank, concatenated in rank order (identical on all ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: result[k] for k in ("labels", "probs", "loss", "n")})
    n = sum(p["n"] for p in parts)
    return {
        "labels": np.concatenate([p["labels"] for p in parts]),
        "probs": np.concatenate([p["probs"] for p in parts]),
        "loss": sum(p["loss"] * p["n"] for p in parts) / max(n, 1),
        "n": n,
    }


def _safe_auc(labels, probs) -> float:
    from jetfm.metrics import auc

    try:
        return auc(labels, probs)
    except ValueError:  # a class absent from these few validation jets
        return math.nan


def evaluate(model, loader, cfg, out_dir) -> dict[str, float]:
    """The trainer's validation (called on every rank, eval mode, no_grad): loss, acc, auc."""
    result = _gather(predict(model, loader))
    labels, probs = result["labels"], result["probs"]
    if result["n"] == 0:
        return {"loss": math.nan, "acc": math.nan, "auc": math.nan}
    return {
        "loss": float(result["loss"]),
        "acc": float(np.mean(probs.argmax(1) == labels)),
        "auc": _safe_auc(labels, probs),
    }


# --------------------------------------------------------------------------- jetfm evaluate classifier
def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def find_mlflow_run(checkpoint: Path) -> tuple[str | None, str | None]:
    """(tracking uri, run id) of the run that wrote `checkpoint` (jetfm.artifacts.runs), or (None, None)."""
    from jetfm.artifacts.runs import find_run_record

    record = find_run_record(Path(checkpoint).resolve()) or {}
    return record.get("uri"), record.get("run_id")


def _class_index(name, classes: list[str], what: str) -> int:
    if name in classes:
        return classes.index(name)
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        index = int(name)
        if 0 <= index < len(classes):
            return index
    raise ValueError(f"{what} {name!r} is not one of the classes {classes}")


def parse_class_map(text: str | None) -> dict[str, str]:
    """`--class-map top=Tbqq,light=QCD` -> {"top": "Tbqq", "light": "QCD"} (data class -> classifier class)."""
    mapping = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        data_name, sep, model_name = item.partition("=")
        if not sep or not data_name.strip() or not model_name.strip():
            raise ValueError(f"--class-map {text!r}: expected DATA_CLASS=CLASSIFIER_CLASS[,...], got {item!r}")
        mapping[data_name.strip()] = model_name.strip()
    return mapping


def class_mapping(data_classes: list[str], counts: list[int], model_classes: list[str],
                  class_map: dict[str, str] | None = None, only: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Which classifier class each data class is, and which classifier classes are scored.

    Data classes are matched by name (JetClass and top tagging share "QCD" and "Tbqq"), after
    renaming by `class_map` (data name -> classifier name). Scored: the classifier classes given
    in `only`, else those with jets in the split. Returns (label_map, scored): label_map[data
    label] = classifier index, or -1 for a jet left out (its class empty or not scored); scored
    = sorted classifier indices. An unmatched data class that holds jets is an error: its jets
    would be scored as something they are not.
    """
    class_map = dict(class_map or {})
    for data_name, model_name in class_map.items():
        if data_name not in data_classes:
            raise ValueError(f"--class-map: {data_name!r} is not a class of the data {data_classes}")
        if model_name not in model_classes:
            raise ValueError(f"--class-map: {model_name!r} is not a class of the classifier {model_classes}")
    for name in only or []:
        if name not in model_classes:
            raise ValueError(f"--classes: {name!r} is not a class of the classifier {model_classes}")
    label_map = []
    for name, n in zip(data_classes, counts):
        target = class_map.get(name, name)
        index = model_classes.index(target) if target in model_classes else -1
        if index < 0 and n > 0 and (not only or target in only):
            raise ValueError(f"the data's class {name!r} ({n} jets) is not a class of the classifier {model_classes}; "
                             f"map it with --class-map {name}=CLASS or score other classes with --classes")
        if only and target not in only:
            index = -1
        label_map.append(index)
    present = sorted({i for i, n in zip(label_map, counts) if i >= 0 and n > 0})
    scored = sorted(model_classes.index(name) for name in only) if only else present
    missing = [model_classes[i] for i in scored if i not in present]
    if missing:
        raise ValueError(f"--classes: no jets of {missing} in this split")
    if len(scored) < 2:
        raise ValueError(f"only {[model_classes[i] for i in scored]} would be scored: a classifier needs jets of two "
                         "classes at least (--classes, --class-map)")
    return label_map, scored


def restrict(labels, probs, scored: list[int]):
    """Labels and probabilities over the scored classes only: classifier indices -> 0..S-1 and
    probabilities renormalised over them (the classifier's choice among the classes present)."""
    index = np.full(probs.shape[1], -1, np.int64)
    index[scored] = np.arange(len(scored))
    sub = probs[:, scored]
    return index[labels], sub / np.clip(sub.sum(1, keepdims=True), 1e-300, None)


def headline(report: dict) -> dict:
    """The numbers a table row needs: accuracy, auc and, with a signal class, its rejections
    (value, uncertainty, background jets, background jets passing, lower limit if none passed)."""
    out = {"n_jets": report["n_jets"], "accuracy": report["accuracy"], "auc": report["auc"],
           "scored_classes": report.get("scored_classes"),
           "signal_class": report.get("signal_class"), "background_class": report["background_class"]}
    n_bkg = report["classes"][report["background_class"]]["n"]
    out["n_background"] = n_bkg
    sig = report.get("signal_class")
    if sig is not None:
        row = report["classes"][sig]
        out["n_signal"] = row["n"]
        for eff in EFFICIENCIES:
            key = f"rejection@{eff}"
            if key in row:
                passing = row[f"{key}_n_background_passing"]
                out[key] = row[key]
                out[f"{key}_unc"] = row[f"{key}_unc"]
                out[f"{key}_n_background_passing"] = passing
                out[f"{key}_lower_limit"] = n_bkg / 3.0 if passing == 0 else None
    return out


def format_headline(h: dict) -> str:
    lines = [f"jets {h['n_jets']:,}   accuracy {h['accuracy']:.4f}   AUC {h['auc']:.4f}"]
    if h.get("scored_classes"):
        lines[0] += (f"   (scored on {len(h['scored_classes'])} classes {h['scored_classes']} of the classifier's "
                     f"{h['model_classes']}; probabilities renormalised over them)")
    if h.get("signal_class") is not None:
        for eff in EFFICIENCIES:
            key = f"rejection@{eff}"
            if key not in h:
                continue
            if h[f"{key}_n_background_passing"] == 0:
                value = f"> {h[f'{key}_lower_limit']:.4g} (95% CL; no background jet passes)"
            else:
                value = f"{h[key]:.4g} ± {h[f'{key}_unc']:.2g}"
            lines.append(f"1/eps_B at eps_S = {eff:.0%} ({h['signal_class']} vs {h['background_class']}): {value}   "
                         f"[{h['n_background']:,} background jets, {h[f'{key}_n_background_passing']} passing]")
    return "\n".join(lines)


def _log_to_mlflow(uri: str, run_id: str, split: str, tag: str, h: dict, report: dict, files: list[Path]) -> str:
    from jetfm.artifacts.runs import log_to_run

    values = {f"{split}/accuracy": h["accuracy"], f"{split}/auc": h["auc"]}
    for eff in EFFICIENCIES:
        key = f"rejection@{eff}"
        if key in h:
            values[f"{split}/rejection_eff{eff}"] = h[key]
            values[f"{split}/rejection_eff{eff}_unc"] = h[f"{key}_unc"]
            values[f"{split}/rejection_eff{eff}_n_background_passing"] = h[f"{key}_n_background_passing"]
    for name, row in report["classes"].items():
        for key in ("recall", "precision", "auc_ovr"):
            values[f"{split}/{name}/{key}"] = row[key]
    log_to_run(uri, run_id, values, artifacts=[(path, f"eval/{tag}") for path in files])
    return run_id


def evaluate_classifier(checkpoint, data, *, split: str = "test", out=None, batch_size: int | None = None,
                        device: str = "cpu", background=None, signal=None, mlflow: bool = True,
                        progress: bool = True, class_map: dict[str, str] | None = None,
                        classes_only: list[str] | None = None) -> dict:
    """Evaluate an exported classifier on one split of `data`; writes metrics.json + plots to `out`
    and returns the metrics.json content (see the module docstring).

    The data may declare other classes than the classifier (a ten-class JetClass conversion of
    TTBar + ZJetsToNuNu files for a binary top tagger): see class_mapping. When fewer classes
    than the classifier's are scored, every metric is over those classes only, with the
    probabilities renormalised over them, and says so (`scored_classes`, metric names)."""
    from tqdm.auto import tqdm

    from jetfm.data.format import DataError
    from jetfm.data.reader import make_loader
    from jetfm.data.shards import Manifest
    from jetfm.metrics import classification_report, format_report, roc_curves_vs_background
    from jetfm.metrics.plots import plot_confusion, plot_roc

    from .model import load_classifier

    from jetfm.data.remote import location, resolved

    checkpoint, data = Path(checkpoint), location(data)  # data may be a URL (data/remote.py)
    model, cfg, meta = load_classifier(checkpoint, device=device)
    model_classes = list(meta["classes"])
    manifest = Manifest.load(data)
    if split not in manifest.splits:
        raise DataError(f"{data}: no split {split!r} (splits: {list(manifest.splits)})")
    try:
        label_map, scored = class_mapping(list(manifest.classes), list(manifest.class_counts(split)), model_classes,
                                          class_map, classes_only)
    except ValueError as error:
        raise DataError(f"classes differ: the classifier {checkpoint} predicts {model_classes}, the data {data} has "
                        f"{list(manifest.classes)}: {error}") from None
    classes = [model_classes[i] for i in scored]
    restricted = len(scored) < len(model_classes)
    token_mode = cfg.model.input_mode == "token"
    if token_mode:
        codebook = (manifest.tokens or {}).get("codebook_size")
        if codebook is None or int(codebook) + 2 != model.vocab_size:
            raise DataError(f"vocabulary differs: the classifier {checkpoint} reads {model.vocab_size} token ids, "
                            f"the data {data} has {'no tokens' if codebook is None else f'codebook {codebook}'}")
    default_bkg = "QCD" if "QCD" in classes else 0
    bkg = _class_index(background if background is not None else default_bkg, classes, "--background")
    sig = None if signal is None else _class_index(signal, classes, "--signal")
    if sig is not None and sig == bkg:
        raise ValueError(f"--signal and --background are the same class {classes[sig]!r}")

    if not token_mode and cfg.data.inputs == "raw":
        check_features_present(manifest, cfg.data.features, str(data), f"the classifier {checkpoint}")
    cfg.data.path = str(data)
    cfg.data.num_workers = 0
    loader = make_loader(cfg.data, split, shuffle=False, drop_uneven=False, require_tokens=token_mode,
                         batch_size=batch_size or cfg.data.batch_size)
    n_total = manifest.n_jets(split)
    with tqdm(total=n_total, disable=not progress, unit="jet", desc=f"evaluate {split}", dynamic_ncols=True) as bar:
        result = predict(model, loader, device=device, progress=bar, label_map=torch.tensor(label_map))
    labels, probs = result["labels"], result["probs"]
    if restricted:
        labels, probs = restrict(labels, probs, scored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(labels, probs, classes, signal_class=sig, background_class=bkg,
                                       efficiencies=EFFICIENCIES)
    if restricted:
        report["scored_classes"] = classes
    h = headline(report)
    h["model_classes"] = model_classes

    tag = f"{split}_{checkpoint.resolve().name}" + (f"_on_{'-'.join(classes)}" if restricted else "")
    out = Path(out) if out is not None else checkpoint.resolve().parent / "eval" / tag
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(roc_curves_vs_background(labels, probs, classes, background_class=bkg), out / "roc.png",
                   title=f"{cfg.name}: {split}")
    confusion = plot_confusion(report["confusion_matrix"], classes, out / "confusion.png")
    record = {
        "checkpoint": str(checkpoint.resolve()),
        "data": resolved(data),
        "split": split,
        "loss": result["loss"],
        **h,
        "report": report,
        "classifier": {k: meta.get(k) for k in ("mode", "pretrained", "pretrained_objective", "input_mode", "inputs")},
        "plots": {"roc": str(roc), "confusion": str(confusion)},
        "mlflow": None,
    }
    if mlflow:
        uri, run_id = find_mlflow_run(checkpoint)
        if run_id is None:
            messages.info(f"no MLflow run recorded for {checkpoint} (tracking off?): metrics only written to {out}")
        else:
            try:
                (out / "metrics.json").write_text(json.dumps(_json_safe(record), indent=1) + "\n")
                _log_to_mlflow(uri, run_id, f"{split}_on_{'-'.join(classes)}" if restricted else split, tag, h,
                               report, [out / "metrics.json", roc, confusion])
                record["mlflow"] = {"uri": uri, "run_id": run_id}
            except Exception as error:  # noqa: BLE001 - results on disk matter more than tracking
                messages.warn(f"could not log to MLflow run {run_id} at {uri} ({type(error).__name__}: "
                              f"{str(error)[:200]}); results are in {out}")
    (out / "metrics.json").write_text(json.dumps(_json_safe(record), indent=1) + "\n")
    record["text"] = format_headline(h) + "\n" + format_report(report)
    return record


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `jetfm evaluate classifier`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="an exported classifier: a fine-tuning run's out_dir/best or out_dir/final")
    parser.add_argument("--data", required=True, help="shard set (directory or URL) to evaluate on (same classes)")
    parser.add_argument("--split", default="test", help="split of --data (default test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default <run>/eval/<split>_<checkpoint name>)")
    parser.add_argument("--batch-size", type=int, default=None, help="jets per batch (default the run's data.batch_size)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--background", default=None, help="background class name or index (default class 0, QCD)")
    parser.add_argument("--signal", default=None,
                        help="headline signal class (default: the other class of a binary classifier)")
    parser.add_argument("--class-map", default=None, metavar="DATA=MODEL[,...]",
                        help="rename data classes to the classifier's (default: matched by name; JetClass and top "
                             "tagging share QCD and Tbqq)")
    parser.add_argument("--classes", default=None, metavar="NAME[,NAME...]",
                        help="score only jets of these classifier classes, probabilities renormalised over them "
                             "(default: the classes with jets in the split)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the checkpoint's MLflow run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_features_present(manifest, features, data_where: str, reader: str) -> None:
    """DataError unless every model input feature is stored in the shards or derivable from the
    four-momentum they always store (a classifier trained with part_charge on data without it)."""
    from jetfm.data.features import DERIVED_FEATURES
    from jetfm.data.format import DataError

    stored = list(manifest.particle_features)
    missing = [name for name in features if name not in stored and name not in DERIVED_FEATURES]
    if missing:
        raise DataError(f"{data_where}: {reader} reads particle features {missing}, which these shards neither "
                        f"store ({stored}) nor can derive ({list(DERIVED_FEATURES)}); evaluate on data that "
                        f"carries them (e.g. a JetClass conversion with its PID branches)")


def run_classifier(args: argparse.Namespace) -> int:
    from jetfm.config import ConfigError
    from jetfm.data.format import DataError

    try:
        record = evaluate_classifier(args.checkpoint, args.data, split=args.split, out=args.out,
                                     batch_size=args.batch_size, device=args.device, background=args.background,
                                     signal=args.signal, mlflow=not args.no_mlflow, progress=not args.no_progress,
                                     class_map=parse_class_map(args.class_map),
                                     classes_only=[c.strip() for c in args.classes.split(",") if c.strip()]
                                     if args.classes else None)
    except (ConfigError, DataError, ValueError) as error:
        messages.error(str(error))
        return 2
    messages.output(f"{record['checkpoint']} on {record['data']} [{record['split']}]")
    messages.output(record["text"])
    messages.output(f"written: {Path(record['plots']['roc']).parent / 'metrics.json'}, roc.png, confusion.png"
                    + (f"; logged to MLflow run {record['mlflow']['run_id']}" if record["mlflow"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m jetfm.finetune.evaluate ...` (the same as `jetfm evaluate classifier ...`)."""
    parser = argparse.ArgumentParser(prog="jetfm evaluate classifier")
    add_classifier_arguments(parser)
    return run_classifier(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
