"""Classification metrics for jet tagging (docs/METHOD.md §5): accuracy, ROC, AUC, 1/eps_B.

    report = classification_report(labels, probs, class_names, signal_class="Tbqq")
    report["rejection@0.3"], report["auc"], report["classes"]["Tbqq"]

Conventions:
- `roc_curve` returns (eff_b, eff_s, thresholds) = sklearn's (fpr, tpr, thresholds) order, one
  point per distinct score (ties are one step), starting at (0, 0) with threshold +inf. No
  point is dropped.
- `background_rejection` takes no interpolation: the cut is the tightest one that keeps at
  least the target signal efficiency (score >= the ceil(eff * N_S)-th highest signal score),
  so eps_B is a count ratio k / N_B with a binomial error.
- Multi-class rejection of class X (JetClass style, as in ParT): jets of class X and of the
  background class only, ranked by p_X / (p_X + p_bkg).

Legend: N jets, C classes.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np


def _as_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D class indices, got shape {labels.shape}")
    return labels.astype(np.int64)


def predictions(scores) -> np.ndarray:
    """Class predictions: argmax of (N, C) probabilities/logits, or score >= 0.5 for (N,) scores."""
    scores = np.asarray(scores)
    return scores.argmax(axis=1) if scores.ndim == 2 else (scores >= 0.5).astype(np.int64)


def accuracy(labels, scores_or_predictions) -> float:
    """Fraction correct; takes (N,) integer predictions, (N,) binary scores in [0, 1] or (N, C) scores."""
    labels = _as_labels(labels)
    values = np.asarray(scores_or_predictions)
    pred = values if values.ndim == 1 and np.issubdtype(values.dtype, np.integer) else predictions(values)
    if len(pred) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(pred)} predictions")
    return float(np.mean(pred == labels))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eff_b, eff_s, thresholds) for binary labels (nonzero = signal) and (N,) scores.

    Point k selects score >= thresholds[k]; equal scores enter together (one diagonal step).
    """
    positive = np.asarray(labels).ravel() != 0
    scores = np.asarray(scores, np.float64).ravel()
    if len(scores) != len(positive):
        raise ValueError(f"{len(positive)} labels but {len(scores)} scores")
    n_sig, n_bkg = int(positive.sum()), int((~positive).sum())
    if n_sig == 0 or n_bkg == 0:
        raise ValueError(f"roc_curve needs both classes; got {n_sig} signal and {n_bkg} background jets")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sig_cum = np.cumsum(positive[order])
    # last index of every run of equal scores
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    tp = sig_cum[ends]
    fp = ends + 1 - tp
    eff_s = np.r_[0.0, tp / n_sig]
    eff_b = np.r_[0.0, fp / n_bkg]
    return eff_b, eff_s, np.r_[np.inf, sorted_scores[ends]]


def _binary_auc(labels, scores) -> float:
    eff_b, eff_s, _ = roc_curve(labels, scores)
    return float(np.sum(np.diff(eff_b) * (eff_s[1:] + eff_s[:-1]) / 2))  # trapezoids: ties count half


def auc(labels, scores) -> float:
    """ROC AUC. (N,) scores: binary (nonzero label = signal). (N, C) scores: macro one-vs-rest
    mean over classes (class c vs all others, ranked by scores[:, c]); a class absent from the
    labels (no positives) is skipped. (N, 2) is treated as binary with scores[:, 1]."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim == 1:
        return _binary_auc(labels, scores)
    labels = _as_labels(labels)
    if scores.shape[1] == 2:
        return _binary_auc(labels == 1, scores[:, 1])
    per_class = [
        _binary_auc(labels == c, scores[:, c])
        for c in range(scores.shape[1])
        if 0 < np.sum(labels == c) < len(labels)
    ]
    if not per_class:
        raise ValueError("auc: every class is absent or alone in the labels")
    return float(np.mean(per_class))


class Rejection(NamedTuple):
    """Background rejection 1/eps_B at a target signal efficiency (unpacks as a 4-tuple)."""

    rejection: float
    """1/eps_B; inf when no background passes (see `no_background_passed`)."""
    uncertainty: float
    """Binomial: sigma(eps_B) = sqrt(eps_B (1 - eps_B) / N_B), sigma(1/eps) = sigma(eps) / eps^2.
    inf when no background passes."""
    n_background_passing: int
    n_background: int

    @property
    def no_background_passed(self) -> bool:
        """True when the cut rejects every background jet: quote `lower_limit` instead."""
        return self.n_background_passing == 0

    @property
    def lower_limit(self) -> float:
        """95% CL lower limit on 1/eps_B when no background passed (rule of three: eps_B < 3/N_B)."""
        return self.n_background / 3.0 if self.no_background_passed else math.nan


def background_rejection(labels, scores, signal_efficiency: float) -> Rejection:
    """1/eps_B at the tightest cut score >= t that keeps eps_S >= signal_efficiency.

    t is the k-th highest signal score, k = ceil(signal_efficiency * N_S); ties at t pass too,
    so the achieved eps_S can exceed the target slightly. No interpolation between ROC points.
    Zero background passing returns rejection = inf (uncertainty inf) and a RuntimeWarning;
    `Rejection.lower_limit` then gives N_B / 3.
    """
    if not 0 < signal_efficiency <= 1:
        raise ValueError(f"signal_efficiency must be in (0, 1], got {signal_efficiency}")
    positive = np.asarray(labels).ravel() != 0
    scores = np.asarray(scores, np.float64).ravel()
    sig = np.sort(scores[positive])[::-1]
    bkg = scores[~positive]
    if len(sig) == 0 or len(bkg) == 0:
        raise ValueError(f"background_rejection needs both classes; got {len(sig)} signal, {len(bkg)} background")
    # the -1e-9 keeps a product a hair above an integer from adding a jet
    k = max(1, math.ceil(signal_efficiency * len(sig) - 1e-9))
    threshold = sig[k - 1]
    n_pass = int(np.sum(bkg >= threshold))
    n_bkg = len(bkg)
    if n_pass == 0:
        warnings.warn(
            f"no background jet of {n_bkg} passes the cut at signal efficiency {signal_efficiency}: "
            f"rejection is inf (95% CL lower limit {n_bkg / 3:.4g}); use more background jets",
            RuntimeWarning,
            stacklevel=2,
        )
        return Rejection(math.inf, math.inf, 0, n_bkg)
    eff = n_pass / n_bkg
    sigma_eff = math.sqrt(eff * (1 - eff) / n_bkg)
    return Rejection(1 / eff, sigma_eff / eff**2, n_pass, n_bkg)


def confusion_matrix(labels, predicted, n_classes: int | None = None, *, normalize: str | None = None) -> np.ndarray:
    """(C, C): row = true class, column = predicted class. normalize="true" divides each row by its count."""
    labels = _as_labels(labels)
    predicted = _as_labels(predicted)
    n = n_classes if n_classes is not None else int(max(labels.max(initial=-1), predicted.max(initial=-1)) + 1)
    matrix = np.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
    if normalize is None:
        return matrix
    if normalize != "true":
        raise ValueError(f"normalize must be None or 'true', got {normalize!r}")
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)


def _class_index(value, class_names: list[str]) -> int:
    if isinstance(value, str):
        if value not in class_names:
            raise KeyError(f"class {value!r} not in {class_names}")
        return class_names.index(value)
    index = int(value)
    if not 0 <= index < len(class_names):
        raise IndexError(f"class index {index} outside [0, {len(class_names)})")
    return index


def signal_vs_background(labels, probs, signal: int, background: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_signal, score) over jets of the two classes, score = p_sig / (p_sig + p_bkg)."""
    labels = _as_labels(labels)
    probs = np.asarray(probs, np.float64)
    keep = (labels == signal) | (labels == background)
    p_sig, p_bkg = probs[keep, signal], probs[keep, background]
    total = p_sig + p_bkg
    score = np.divide(p_sig, total, out=np.full(len(total), 0.5), where=total > 0)
    return labels[keep] == signal, score


def roc_curves_vs_background(
    labels, probs, class_names, background_class=0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{class name: (eff_s, eff_b)} of every class against the background class, for plot_roc."""
    class_names = list(class_names)
    bkg = _class_index(background_class, class_names)
    labels = _as_labels(labels)
    curves = {}
    for c, name in enumerate(class_names):
        if c == bkg or not np.any(labels == c):
            continue
        eff_b, eff_s, _ = roc_curve(*signal_vs_background(labels, probs, c, bkg))
        curves[name] = (eff_s, eff_b)
    return curves


def classification_report(
    labels,
    probs,
    class_names,
    *,
    signal_class=None,
    background_class=0,
    efficiencies=(0.3, 0.5),
) -> dict:
    """Accuracy, macro AUC, confusion matrix and rejections, as a JSON-ready dict.

    probs: (N, C) class probabilities (softmax outputs); for C = 2 also (N,) signal
    probabilities p(class 1), read as (1 - p, p). background_class: name or index (QCD
    is class 0 in JetClass and top tagging). signal_class: the headline class; default the
    other class when C = 2, none otherwise. Per class: n, recall (= per-class accuracy),
    precision, one-vs-rest AUC and, for non-background classes, 1/eps_B against the background
    class at each efficiency (keys "rejection@0.3", "rejection@0.3_unc"). Top level repeats the
    signal class's rejections. A rejection with no background passing is inf and is listed in
    "warnings".
    """
    labels = _as_labels(labels)
    probs = np.asarray(probs, np.float64)
    class_names = list(class_names)
    if probs.ndim == 1 and len(class_names) == 2:
        probs = np.stack([1 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape != (len(labels), len(class_names)):
        raise ValueError(f"probs must be (N={len(labels)}, C={len(class_names)}), got {probs.shape}")
    bkg = _class_index(background_class, class_names)
    if signal_class is None and len(class_names) == 2:
        signal_class = 1 - bkg
    sig = None if signal_class is None else _class_index(signal_class, class_names)
    pred = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, pred, len(class_names))
    report = {
        "n_jets": len(labels),
        "accuracy": accuracy(labels, pred),
        "auc": auc(labels, probs),
        "class_names": class_names,
        "background_class": class_names[bkg],
        "signal_class": None if sig is None else class_names[sig],
        "confusion_matrix": matrix.tolist(),
        "classes": {},
        "warnings": [],
    }
    for c, name in enumerate(class_names):
        n_c = int(matrix[c].sum())
        n_pred = int(matrix[:, c].sum())
        row = {
            "n": n_c,
            "recall": matrix[c, c] / n_c if n_c else math.nan,
            "precision": matrix[c, c] / n_pred if n_pred else math.nan,
            "auc_ovr": _binary_auc(labels == c, probs[:, c]) if 0 < n_c < len(labels) else math.nan,
        }
        if c != bkg and n_c and matrix[bkg].sum():
            is_sig, score = signal_vs_background(labels, probs, c, bkg)
            if len(class_names) > 2:
                row["auc_vs_background"] = _binary_auc(is_sig, score)
            for eff in efficiencies:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    result = background_rejection(is_sig, score, eff)
                row[f"rejection@{eff}"] = result.rejection
                row[f"rejection@{eff}_unc"] = result.uncertainty
                row[f"rejection@{eff}_n_background_passing"] = result.n_background_passing
                if result.no_background_passed:
                    report["warnings"].append(
                        f"{name} vs {class_names[bkg]} at eff_S={eff}: no background passes; "
                        f"1/eps_B > {result.lower_limit:.4g} (95% CL)"
                    )
        report["classes"][name] = row
    if sig is not None:
        for key, value in report["classes"][class_names[sig]].items():
            if key.startswith("rejection@"):
                report[key] = value
    return report


def format_report(report: dict) -> str:
    """Readable per-class table of a classification_report."""
    effs = sorted({k.split("@")[1] for row in report["classes"].values() for k in row
                   if k.startswith("rejection@") and k.count("_") == 0})
    header = "| class | n | recall | precision | AUC (OvR) |" + "".join(f" 1/eps_B @ {e} |" for e in effs)
    lines = [
        f"accuracy {report['accuracy']:.4f}   macro AUC {report['auc']:.4f}   "
        f"background {report['background_class']}   signal {report['signal_class']}",
        header,
        "|---" * (5 + len(effs)) + "|",
    ]
    for name, row in report["classes"].items():
        cells = [name, str(row["n"]), f"{row['recall']:.3f}", f"{row['precision']:.3f}", f"{row['auc_ovr']:.4f}"]
        for e in effs:
            value = row.get(f"rejection@{e}")
            cells.append("—" if value is None else f"{value:.4g} ± {row[f'rejection@{e}_unc']:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
