"""Every PNG jetfm writes, in one style: large fonts for slides, built on matplotlib's Agg
canvas directly (no pyplot, no global backend switch), so they work in headless jobs and threads.

    paths = plot_distributions(ref_obs, gen_obs, "out/plots", annotations={"jet_mass": "KL = 0.003"})
    plot_roc(roc_curves_vs_background(labels, probs, names), "out/roc.png")

| plot                       | written by                          | shows                                      |
|----------------------------|-------------------------------------|--------------------------------------------|
| plot_distribution(s)       | `jetfm evaluate generative`         | reference vs generated, ratio panel        |
| plot_roc, plot_confusion   | `jetfm evaluate classifier`, finetune | 1/eps_B vs eps_S; row-normalised confusion |
| plot_scaling               | `jetfm sweep`                       | metric vs training-set size                |
| plot_law_curves            | `jetfm scaling fit`, `sweep pretrain` | loss vs compute / N / D, points + curves  |
| plot_law_residuals         | `jetfm scaling fit`, `sweep pretrain` | log(loss / fitted law) vs N and D         |
| plot_reconstruction        | tokenizer evaluation                | original vs reconstructed, ratio panels    |
| plot_residuals             | tokenizer evaluation                | per-particle (and jet) resolution          |
| plot_code_usage            | tokenizer evaluation                | particles per code, by rank                |
| plot_class_histograms      | `jetfm data inspect`                | a jet observable per class, panel per split |

Callers pass numbers and axis labels, never models or shard sets. Every function returns the
written path(s).
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
#: Line width of step histograms (matplotlib draws them as patches, which lines.linewidth misses).
HIST_WIDTH = 1.8


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


# ------------------------------------------------------------------------- scaling laws
def plot_law_curves(
    groups: list[tuple[str, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]], out_path, xlabel: str,
    ylabel: str, *, extra: list[tuple[str, np.ndarray, np.ndarray, str]] = (),
    stars: list[tuple[float, float]] = (), legend_title: str | None = None,
) -> Path:
    """Loss against a scaling variable (compute, N or D) on a log x axis: groups = [(label, x, y,
    (curve_x, curve_y) or None)], points in one colour per group with the group's fitted curve
    dashed; extra = [(label, x, y, style)] lines drawn in black/red over them (a frontier, the
    law's compute-optimal curve, drawn as 'step' when style is 'step'); stars mark optima, one
    per group in group order."""
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(8, 6)
        ax = fig.subplots()
        cmap = matplotlib.colormaps["viridis"]
        for i, (label, x, y, curve) in enumerate(groups):
            color = cmap(i / max(1, len(groups) - 1))
            order = np.argsort(np.asarray(x, np.float64))
            ax.plot(np.asarray(x)[order], np.asarray(y)[order], "o", color=color, label=label)
            if curve is not None:
                ax.plot(curve[0], curve[1], "--", color=color, lw=1.5)
            if i < len(stars):
                ax.plot(*stars[i], "*", color=color, ms=16, mec="k")
        for label, x, y, style in extra:
            if style == "step":
                ax.step(x, y, where="post", color="k", lw=1.5, label=label)
            else:
                ax.plot(x, y, style, color="tab:red", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(frameon=False, fontsize=11, title=legend_title, title_fontsize=11)
        return _save(fig, out_path)


def plot_law_residuals(N: np.ndarray, D: np.ndarray, resid: np.ndarray, out_path) -> Path:
    """log(loss / fitted law) per run against N (left) and D (right)."""
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(12, 5)
        left, right = fig.subplots(1, 2, sharey=True)
        for ax, x, xlabel in ((left, N, "Parameters N"), (right, D, "Data D")):
            ax.axhline(0.0, color="0.5", lw=1)
            ax.plot(x, resid, "o", color="tab:blue")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, which="both")
        left.set_ylabel("log(loss / fit)")
        return _save(fig, out_path)


# ------------------------------------------------------------------------- tokenizer evaluation
def reconstruction_bins(true: np.ndarray, reco: np.ndarray, *, log: bool, n: int = 50) -> tuple[np.ndarray, bool]:
    """(edges, log x) of one original-vs-reconstructed histogram: log-spaced between the 0.1% and
    99.9% quantiles of the positive values when `log` and > 90% are positive (the few <= 0 fall
    outside), else linear between the 0.2% and 99.8% quantiles."""
    both = np.concatenate([true, reco])
    both = both[np.isfinite(both)]
    positive = both[both > 0]
    if log and positive.size > 0.9 * both.size:
        lo, hi = np.percentile(positive, [0.1, 99.9])
        return np.geomspace(max(lo, 1e-6), max(hi, lo * 1.01, 2e-6), n + 1), True
    lo, hi = np.percentile(both, [0.2, 99.8])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1), False


def _hist_with_ratio(fig, spec, true, reco, bins, log_x, xlabel, ylabel):
    """Counts of `true` (solid) and `reco` (dashed) on top, reco/true with Poisson errors below."""
    top = fig.add_subplot(spec[0])
    bottom = fig.add_subplot(spec[1], sharex=top)
    h_true, _ = np.histogram(true, bins)
    h_reco, _ = np.histogram(reco, bins)
    top.stairs(h_true, bins, label="original", color="black", linewidth=HIST_WIDTH)
    top.stairs(h_reco, bins, label="reconstructed", color=GEN_COLOR, linestyle="--", linewidth=HIST_WIDTH)
    top.set_ylabel(ylabel)
    top.legend(frameon=False, loc="upper left")  # the tails there are low in every panel
    top.tick_params(labelbottom=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(h_true > 0, h_reco / h_true, np.nan)
        # Poisson errors of both histograms (they share events, so this overestimates a little)
        error = ratio * np.sqrt(1.0 / np.maximum(h_reco, 1) + 1.0 / np.maximum(h_true, 1))
    centres = np.sqrt(bins[1:] * bins[:-1]) if log_x else 0.5 * (bins[1:] + bins[:-1])
    bottom.errorbar(centres, ratio, yerr=error, fmt="o", color=GEN_COLOR, markersize=3, elinewidth=1)
    bottom.axhline(1.0, color="black", linewidth=1)
    bottom.set_ylim(0.5, 1.5)
    bottom.set_ylabel("reco / orig")
    bottom.set_xlabel(xlabel)
    bottom.grid(alpha=0.3)
    if log_x:
        top.set_xscale("log")


def plot_reconstruction(
    panels: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool, str]], out_path, *, title: str,
    ylabel: str = "particles",
) -> Path:
    """Original vs reconstructed, one column per panel (true, reco, bin edges, log x, x label),
    counts on top and the ratio reco/orig below."""
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(6.5 * len(panels), 6.5)
        outer = fig.add_gridspec(1, len(panels), wspace=0.3)
        for j, (true, reco, bins, log_x, xlabel) in enumerate(panels):
            spec = outer[j].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
            _hist_with_ratio(fig, spec, true, reco, bins, log_x, xlabel, ylabel)
        fig.suptitle(title)
        return _save(fig, out_path)


def plot_residuals(panels: list[tuple[np.ndarray, str, float]], out_path) -> Path:
    """One histogram per panel (values, x label, reference line: 1 for a ratio, 0 for a
    difference) between the 1% and 99% quantiles, titled with its IQR and standard deviation."""
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(6 * len(panels), 5)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (values, xlabel, reference) in zip(axes, panels):
            values = values[np.isfinite(values)]
            lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            ax.hist(values, np.linspace(lo, hi, 60), histtype="step", color="tab:blue", linewidth=HIST_WIDTH)
            ax.set_xlabel(xlabel)
            q25, q75 = np.percentile(values, [25, 75]) if values.size else (0, 0)
            ax.set_title(f"IQR {q75 - q25:.3g}, std {values.std() if values.size else 0:.3g}")
            ax.axvline(reference, color="black", linewidth=1)
        axes[0].set_ylabel("entries")
        fig.tight_layout()
        return _save(fig, out_path)


def plot_code_usage(counts: np.ndarray, out_path, *, title: str) -> Path:
    """Particles assigned to each code, codes ranked by use (log-log): a flat curve is a well-used codebook."""
    ordered = np.sort(np.asarray(counts))[::-1]
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(8, 5.5)
        ax = fig.subplots()
        ax.plot(np.arange(1, len(ordered) + 1), np.maximum(ordered, 0.5), color="tab:blue")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("code rank")
        ax.set_ylabel("particles assigned")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        return _save(fig, out_path)


# ------------------------------------------------------------------------- data inspection
def plot_class_histograms(
    panels: dict[str, tuple[np.ndarray, np.ndarray, str]], class_names: list[str], bins: np.ndarray, out_path, *,
    xlabel: str, title: str, marker: tuple[float, str] | None = None,
) -> Path:
    """A panel per split ({panel name: (values, class index per value, panel title)}), a
    normalised step histogram per class, one legend beside the panels (so no curve hides behind
    it); `marker` (x, label) draws a dotted vertical line (e.g. the stored-particles limit)."""
    colors = [f"C{k % 10}" for k in range(len(class_names))]
    styles = ["-", "--", ":", "-."]  # more than ten classes: the colours repeat with another line style
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.5 * len(panels) + 2.5, 5.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (values, labels, panel_title) in zip(axes, panels.values()):
            for k, name in enumerate(class_names):
                selected = values[labels == k]
                if len(selected) == 0:
                    continue
                ax.hist(selected, bins=bins, weights=np.full(len(selected), 1.0 / len(selected)),
                        histtype="step", linewidth=HIST_WIDTH, color=colors[k], linestyle=styles[(k // 10) % 4],
                        label=name)
            if marker is not None and bins[0] < marker[0] < bins[-1]:
                ax.axvline(marker[0], color="0.4", linestyle=":", linewidth=1.2, label=marker[1])
            ax.set_title(panel_title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Fraction of jets per bin")
            ax.set_xlim(bins[0], bins[-1])
            ax.grid(alpha=0.25)
        handles = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="outside right center", frameon=False, title="class")
        fig.suptitle(title)
        return _save(fig, out_path)
