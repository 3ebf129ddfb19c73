"""Talk-ready PNG plots: distributions with a ratio panel, ROC (1/eps_B vs eps_S), confusion
matrix, and scaling curves (data-efficiency scans).

    paths = plot_distributions(ref_obs, gen_obs, "out/plots", annotations={"jet_mass": "KL = 0.003"})
    plot_roc(roc_curves_vs_background(labels, probs, names), "out/roc.png")

Figures are built on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
these work in headless jobs and threads. Every function returns the written path(s).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .observables import LABELS

#: Large fonts for slides.
STYLE = {
    "font.size": 16,
    "axes.labelsize": 18,
    "axes.titlesize": 18,
    "legend.fontsize": 15,
    "xtick.labelsize": 15,
    "ytick.labelsize": 15,
    "lines.linewidth": 2.0,
}
#: Observables drawn with a logarithmic y axis by default (steeply falling or long-tailed).
LOG_Y = frozenset({"part_ptrel", "part_etarel", "part_phirel", "jet_tau1", "jet_tau2", "jet_tau3"})
REF_COLOR, GEN_COLOR = "0.55", "tab:red"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    return out_path


def _axis_label(name: str, units: dict[str, str] | None) -> str:
    if units and name in units:
        return f"{LABELS.get(name, name).split(' [')[0]} [{units[name]}]" if units[name] else LABELS.get(name, name)
    return LABELS.get(name, name)


def histogram_edges(ref: np.ndarray, gen: np.ndarray, bins: int = 50) -> np.ndarray:
    """Common bin edges: integer-centred bins for integer data, else the 0.1%-99.9% range of
    both samples (so outliers of either do not squash the plot)."""
    both = np.concatenate([ref, gen])
    if np.all(both == np.round(both)) and both.max() - both.min() <= 300:
        lo, hi = both.min(), both.max()
        step = max(1, int(np.ceil((hi - lo + 1) / bins)))
        return np.arange(lo - 0.5, hi + 0.5 + step, step)
    lo, hi = np.quantile(both, [0.001, 0.999])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def plot_distribution(
    name: str, ref: np.ndarray, gen: np.ndarray, out_path, *, labels=("reference", "generated"),
    units: dict[str, str] | None = None, bins: int = 50, logy: bool | None = None, annotation: str | None = None,
) -> Path:
    """One observable: normalised histograms on top, ratio labels[1]/labels[0] (gen/ref) with
    Poisson errors of both samples below (bins empty in either sample are left out)."""
    ref = np.asarray(ref, np.float64)
    gen = np.asarray(gen, np.float64)
    ref, gen = ref[np.isfinite(ref)], gen[np.isfinite(gen)]
    if len(ref) == 0 or len(gen) == 0:
        raise ValueError(f"plot_distribution({name!r}): {len(ref)} reference and {len(gen)} generated finite values")
    edges = histogram_edges(ref, gen, bins)
    n_ref, _ = np.histogram(ref, edges)
    n_gen, _ = np.histogram(gen, edges)
    widths = np.diff(edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    dens_ref = n_ref / (len(ref) * widths)
    dens_gen = n_gen / (len(gen) * widths)
    logy = (name in LOG_Y) if logy is None else logy

    with matplotlib.rc_context(STYLE):
        fig = _new_figure(8, 7.5)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
        top.stairs(dens_ref, edges, fill=True, color=REF_COLOR, alpha=0.5, label=f"{labels[0]} ({len(ref):,})")
        top.stairs(dens_gen, edges, color=GEN_COLOR, label=f"{labels[1]} ({len(gen):,})")
        top.errorbar(centres, dens_gen, yerr=np.sqrt(n_gen) / (len(gen) * widths), fmt="none", ecolor=GEN_COLOR, lw=1)
        top.set_ylabel("Normalised entries")
        peak = max(dens_ref.max(), dens_gen.max(), 1e-300)
        if logy:
            top.set_yscale("log")
            positive = np.concatenate([dens_ref[dens_ref > 0], dens_gen[dens_gen > 0]])
            top.set_ylim(positive.min() / 2 if len(positive) else None, peak * 30)  # headroom for the legend
        else:
            top.set_ylim(0, peak * 1.35)
        # the annotation (e.g. KL and W1) is the legend title, so it never hides the histogram
        top.legend(loc="upper right", frameon=False, title=annotation, title_fontsize=14, alignment="right")

        # ratio gen/ref with Poisson errors of both samples, where both bins are populated
        ok = (n_ref > 0) & (n_gen > 0)
        ratio = np.full(len(centres), np.nan)
        ratio[ok] = dens_gen[ok] / dens_ref[ok]
        err = np.full(len(centres), np.nan)
        err[ok] = ratio[ok] * np.sqrt(1 / n_gen[ok] + 1 / n_ref[ok])
        bottom.axhline(1.0, color=REF_COLOR, lw=1.5)
        bottom.errorbar(centres, ratio, yerr=err, xerr=widths / 2, fmt="o", ms=3, color=GEN_COLOR, lw=1)
        bottom.set_ylim(0.5, 1.5)
        bottom.set_ylabel("Ratio")
        bottom.set_xlabel(_axis_label(name, units))
        bottom.grid(alpha=0.3)
        return _save(fig, out_path)


def plot_distributions(
    ref: dict[str, np.ndarray], gen: dict[str, np.ndarray], out_dir, *, labels=("reference", "generated"),
    units: dict[str, str] | None = None, names: list[str] | None = None, bins: int = 50,
    annotations: dict[str, str] | None = None, prefix: str = "",
) -> list[Path]:
    """One PNG per observable (in both dicts): out_dir/{prefix}{name}.png.

    units: {name: unit} overrides the unit in the default axis label (e.g. {"jet_mass": "TeV"}).
    annotations: {name: text} written in the top panel (e.g. the KL and W1 values).
    """
    names = list(names) if names is not None else [name for name in ref if name in gen]
    out_dir = Path(out_dir)
    return [
        plot_distribution(
            name, ref[name], gen[name], out_dir / f"{prefix}{name}.png", labels=labels, units=units, bins=bins,
            annotation=(annotations or {}).get(name),
        )
        for name in names
    ]


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], out_path, *, title: str | None = None,
    mark_efficiencies=(0.3, 0.5),
) -> Path:
    """Background rejection 1/eps_B (log) vs signal efficiency eps_S; curves: {name: (eff_s, eff_b)}."""
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(8, 6.5)
        ax = fig.subplots()
        for name, (eff_s, eff_b) in curves.items():
            eff_s, eff_b = np.asarray(eff_s), np.asarray(eff_b)
            ok = eff_b > 0
            ax.plot(eff_s[ok], 1 / eff_b[ok], label=name)
        grid = np.linspace(0.01, 1, 200)
        ax.plot(grid, 1 / grid, color="0.5", ls=":", lw=1.5, label="random")
        for eff in mark_efficiencies:
            ax.axvline(eff, color="0.7", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_xlabel(r"Signal efficiency $\varepsilon_S$")
        ax.set_ylabel(r"Background rejection $1/\varepsilon_B$")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", frameon=False)
        return _save(fig, out_path)


def plot_confusion(matrix, class_names, out_path, *, normalize: bool = True, title: str | None = None) -> Path:
    """Confusion matrix (rows = true class), row-normalised to fractions by default, with the values printed."""
    matrix = np.asarray(matrix, np.float64)
    if normalize:
        rows = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(class_names)
    size = max(6.0, 0.8 * n + 3)
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(size + 1.5, size)
        ax = fig.subplots()
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else None)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Fraction of true class" if normalize else "Jets")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        cell_font = 14 if n <= 6 else 10
        high = (1.0 if normalize else matrix.max()) / 2  # white text on the darker half of the colour map
        for i in range(n):
            for j in range(n):
                text = f"{matrix[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=cell_font,
                        color="white" if matrix[i, j] > high else "black")
        if title:
            ax.set_title(title)
        return _save(fig, out_path)


def plot_scaling(
    x, series: dict[str, tuple[np.ndarray, np.ndarray | None]], out_path, xlabel: str, ylabel: str, *,
    logx: bool = True, logy: bool = False, title: str | None = None,
) -> Path:
    """Metric vs training-set size (or any scan): series = {name: (y, yerr or None)}, one line each."""
    x = np.asarray(x, np.float64)
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(8, 6)
        ax = fig.subplots()
        for name, (y, yerr) in series.items():
            ax.errorbar(x, np.asarray(y, np.float64), yerr=None if yerr is None else np.asarray(yerr, np.float64),
                        marker="o", ms=6, capsize=4, label=name)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", frameon=False)
        return _save(fig, out_path)
