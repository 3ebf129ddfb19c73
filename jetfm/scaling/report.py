"""The scaling study's analysis: run records -> fits -> study.md, fit.json and plots.

    records = load_records("runs/scaling")         # run directories' summary.json, or a JSON list
    result = write_report(records, "runs/scaling/fit", bootstrap=200)

A run record is a dict (fields below). `load_records` reads a JSON file (a list of records, or
{"runs": [...]}) or finds every `summary.json` under a directory (the trainer's run summary):

    name      run name                         size     ladder size name (optional)
    N         parameters w/o embeddings        N_total  all parameters (optional)
    D         training data seen, in the study's unit (particles by default; see docs/SCALING.md)
    unique    distinct data in the training subset, same unit (optional; with D: the repetition)
    epochs    passes over the subset (optional; unique = D / epochs when unique is absent)
    flops     cumulative training FLOPs (optional; 6 N D when absent, and the report says so)
    budget    the compute budget the run was planned at (optional; groups the IsoFLOP profiles)
    losses    final validation loss per objective: {"ntp": .., "mpm": ..} (a joint run has both)

From a run directory: `summary.json`'s `scaling` block (N, N_total, flops, particles_seen,
jets_seen, unique_particles, unique_jets, epochs, size, budget) when the trainer writes one; else
N from final/model.safetensors (tensor shapes read from its header: nothing is unpickled), jets
seen = steps x global_batch_jets, epochs from `epoch`. Losses: `val.ntp_loss` / `val.mpm_loss`,
or `val.loss` for a single-objective run (objective from final/config.yaml). Runs whose status
is not `completed` are skipped and listed.

Outputs in OUT: study.md, fit.json, and per objective O: O_loss_vs_compute.png (runs, their
frontier and the law's compute-optimal curve), O_isoflop.png (when some budget has >= 3
sizes), O_loss_vs_N.png, O_loss_vs_D.png (points with the fitted surface), O_residuals.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jetfm.metrics.plots import plot_law_curves, plot_law_residuals

from .fit import Law, bootstrap_law, fit_law, isoflop_analysis

OBJECTIVES = ("ntp", "mpm")
DATA_UNITS = ("particles", "jets")
OPTIONAL = ("size", "N_total", "unique", "epochs", "flops", "budget", "objective")


class RecordError(ValueError):
    """A run record that cannot be used: the message names the source and the field."""


# --------------------------------------------------------------------------- records
def check_record(raw: dict, where: str) -> dict:
    """A clean record (floats, losses dict) or RecordError naming `where` and the field."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a run record must be a JSON object, got {type(raw).__name__}")
    rec = {"name": str(raw.get("name") or "")}
    if not rec["name"]:
        raise RecordError(f"{where}: field 'name' is missing")
    for key in ("N", "D"):
        rec[key] = _positive(raw.get(key), f"{where}: field '{key}'")
    for key in ("N_total", "unique", "epochs", "flops", "budget"):
        if raw.get(key) is not None:
            rec[key] = _positive(raw[key], f"{where}: field '{key}'")
    for key in ("size", "objective"):
        if raw.get(key) is not None:
            rec[key] = str(raw[key])
    losses = raw.get("losses")
    if not isinstance(losses, dict) or not losses:
        raise RecordError(f"{where}: field 'losses' must map objectives ({', '.join(OBJECTIVES)}) to final validation losses")
    rec["losses"] = {}
    for obj, value in losses.items():
        if obj not in OBJECTIVES:
            raise RecordError(f"{where}: losses.{obj}: unknown objective, expected one of {OBJECTIVES}")
        rec["losses"][obj] = _positive(value, f"{where}: field 'losses.{obj}'")
    if "unique" not in rec and rec.get("epochs"):
        rec["unique"] = rec["D"] / rec["epochs"]
    return rec


def _positive(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError(f"{what} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise RecordError(f"{what} must be a number > 0, got {value!r}")
    return number


def record_from_run(run_dir: Path, data_unit: str = "particles") -> dict:
    """A record from a trainer run directory (see the module doc for the fields read)."""
    from jetfm.config_io import load_yaml

    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    scaling = summary.get("scaling") or {}
    raw = {"name": summary.get("name") or run_dir.name, "size": scaling.get("size"), "budget": scaling.get("budget"),
           "N": scaling.get("N"), "N_total": scaling.get("N_total"), "flops": scaling.get("flops"),
           "epochs": scaling.get("epochs", summary.get("epoch")) or None}  # 0: no step taken, no epoch count
    if raw["N"] is None:
        weights = run_dir / "final" / "model.safetensors"
        if not weights.exists():
            raise RecordError(f"{path}: no scaling.N and no {weights} to count parameters from")
        raw["N"], raw["N_total"] = _count_checkpoint(weights)
    if data_unit == "particles":
        raw["D"] = scaling.get("particles_seen")
        raw["unique"] = scaling.get("unique_particles")
        if raw["D"] is None:
            raise RecordError(f"{path}: field 'scaling.particles_seen' is missing (fit in jets with --data-unit jets)")
    else:
        steps, batch = summary.get("steps"), summary.get("global_batch_jets")
        raw["D"] = scaling.get("jets_seen", steps * batch if steps and batch else None)
        raw["unique"] = scaling.get("unique_jets")
    config_path = run_dir / "final" / "config.yaml"
    objective = (load_yaml(config_path).get("objective") or {}).get("name", "joint") if config_path.exists() else None
    raw["objective"] = objective
    val = summary.get("val") or {}
    losses = {obj: val[f"{obj}_loss"] for obj in OBJECTIVES if val.get(f"{obj}_loss") is not None}
    if not losses and objective in OBJECTIVES and val.get("loss") is not None:
        losses = {objective: val["loss"]}
    if not losses:
        raise RecordError(f"{path}: no validation loss per objective (val.ntp_loss / val.mpm_loss"
                          f"{'' if objective in OBJECTIVES else ', or val.loss of a single-objective run'})")
    raw["losses"] = losses
    return check_record(raw, str(path))


def _count_checkpoint(weights: Path) -> tuple[int, int]:
    from safetensors import safe_open

    from .ladder import count_parameters

    with safe_open(str(weights), "np") as handle:
        return count_parameters((k, math.prod(handle.get_slice(k).get_shape())) for k in handle.keys())


def load_records(source, data_unit: str = "particles") -> tuple[list[dict], list[str]]:
    """(records, skipped runs with the reason) from a JSON file or a directory of runs."""
    if data_unit not in DATA_UNITS:
        raise ValueError(f"data unit must be one of {DATA_UNITS}, got {data_unit!r}")
    source = Path(source)
    if source.is_file():
        try:
            data = json.loads(source.read_text())
        except json.JSONDecodeError as error:
            raise RecordError(f"{source}: not valid JSON ({error})") from None
        runs = data.get("runs") if isinstance(data, dict) else data
        if not isinstance(runs, list):
            raise RecordError(f"{source}: expected a JSON list of run records or {{\"runs\": [...]}}")
        return [check_record(r, f"{source}: run {i}") for i, r in enumerate(runs)], []
    if not source.is_dir():
        raise RecordError(f"{source}: no such file or directory")
    records, skipped = [], []
    for path in sorted(source.rglob("summary.json")):
        if any(part in ("checkpoints", "final", "best") for part in path.relative_to(source).parts[:-1]):
            continue
        status = json.loads(path.read_text()).get("status")
        if status != "completed":
            skipped.append(f"{path.parent}: status {status!r}")
            continue
        records.append(record_from_run(path.parent, data_unit))
    if not records:
        raise RecordError(f"{source}: no completed run (summary.json) found" + (f"; skipped: {skipped}" if skipped else ""))
    return records, skipped


# --------------------------------------------------------------------------- analysis
def analyse(records: list[dict], *, objectives=None, bootstrap: int = 200, seed: int = 0, level: float = 0.95,
            data_unit: str = "particles") -> dict:
    """Per objective: the law with bootstrap intervals, the IsoFLOP analysis and the frontier (fit.json)."""
    out = {"data_unit": data_unit, "runs": records, "objectives": {},
           "flops_source": "analytic" if all("flops" in r for r in records) else "6ND where missing"}
    for obj in objectives or OBJECTIVES:
        runs = [r for r in records if obj in r["losses"]]
        if not runs:
            continue
        N, D, L, C = _arrays(runs, obj)
        unique = np.array([r.get("unique", r["D"]) for r in runs])
        res: dict = {"runs": len(runs), "notes": []}
        k = float(np.median(C / (N * D)))
        res["flops_per_ND"] = k
        res["max_repetition"] = float(np.max(D / unique - 1.0))
        if len(runs) >= 5:
            law = fit_law(N, D, L, unique=unique)
            res["law"] = law.as_dict()
            if bootstrap:
                res["bootstrap"] = bootstrap_law(N, D, L, unique=unique, resamples=bootstrap, seed=seed, law=law,
                                                 level=level).as_dict()
        else:
            res["notes"].append(f"{len(runs)} runs: the 5-parameter law needs at least 5")
        budgets = [r.get("budget") for r in runs]
        iso = isoflop_analysis(N, D, L, C, budget=None if None in budgets else budgets)
        res["isoflop"] = iso.as_dict()
        if iso.a is None:
            res["notes"].append("IsoFLOP exponents need >= 2 budgets with >= 3 sizes and an interior minimum")
        order = np.argsort(C)
        frontier, best = [], math.inf
        for i in order:
            if L[i] < best:
                best = L[i]
                frontier.append({"name": runs[i]["name"], "flops": float(C[i]), "loss": float(L[i])})
        res["frontier"] = frontier
        out["objectives"][obj] = res
    return out


def _arrays(runs, obj):
    N = np.array([r["N"] for r in runs])
    D = np.array([r["D"] for r in runs])
    L = np.array([r["losses"][obj] for r in runs])
    C = np.array([r.get("flops", 6.0 * r["N"] * r["D"]) for r in runs])
    return N, D, L, C


def _law(res: dict) -> Law | None:
    if "law" not in res:
        return None
    fields = {k: res["law"][k] for k in ("E", "A", "alpha", "B", "beta", "R_star", "objective", "num_points")}
    return Law(**fields)


# --------------------------------------------------------------------------- outputs
def write_report(records: list[dict], out_dir, *, skipped: list[str] | None = None, **analyse_kw) -> dict:
    """analyse() + study.md + fit.json + PNGs in out_dir; returns the analysis with the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = analyse(records, **analyse_kw)
    result["skipped"] = list(skipped or [])
    paths = []
    for obj, res in result["objectives"].items():
        paths += plot_objective(records, obj, res, out, result["data_unit"])
    result["plots"] = [p.name for p in paths]
    (out / "fit.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "study.md").write_text(study_markdown(result))
    return result


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def study_markdown(result: dict) -> str:
    unit = result["data_unit"]
    lines = ["# Scaling study", "",
             f"L(N, D) = E + A / N^alpha + B / D^beta, N = parameters without embeddings and unembedding, "
             f"D = training {unit} seen (D' with repetition); FLOPs: {result['flops_source']}.", "",
             "## Runs", "", f"| run | size | N | D ({unit}) | epochs | FLOPs | ntp loss | mpm loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(result["runs"], key=lambda r: (r["N"], r["D"])):
        losses = r["losses"]
        epochs = r["D"] / r["unique"] if "unique" in r else None
        lines.append(f"| {r['name']} | {r.get('size', '-')} | {r['N']:,.0f} | {r['D']:.3e} | "
                     f"{'-' if epochs is None else f'{epochs:.2f}'} | {r.get('flops', 6 * r['N'] * r['D']):.3e} | "
                     f"{losses.get('ntp', float('nan')):.4f} | {losses.get('mpm', float('nan')):.4f} |")
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    for obj, res in result["objectives"].items():
        lines += ["", f"## {obj.upper()} loss ({res['runs']} runs)", ""]
        if "law" in res:
            law, boot = res["law"], res.get("bootstrap")
            ci = (boot or {}).get("intervals", {})
            level = f"{100 * boot['level']:.0f}% interval ({boot['resamples']} bootstrap fits)" if boot else "interval"
            lines += [f"| parameter | fit | {level} |", "|---|---:|---|"]
            for name in ("E", "A", "alpha", "B", "beta", "a", "b") + (("R_star",) if law.get("R_star") else ()):
                interval = f"[{_fmt(ci[name][0])}, {_fmt(ci[name][1])}]" if name in ci else "-"
                lines.append(f"| {name} | {_fmt(law[name])} | {interval} |")
            lines += ["", f"Compute-optimal (C ∝ N D): N* ∝ C^{law['a']:.3f}, D* ∝ C^{law['b']:.3f}. "
                      f"The runs' own FLOPs average {res['flops_per_ND']:.3g} N D (the usual 6 N D leaves out "
                      "attention and the vocabulary projections)."]
            if law.get("R_star") and law["R_star"] > 10 * res["max_repetition"]:
                lines.append(f"- R* = {_fmt(law['R_star'])} is far beyond the largest repetition R = "
                             f"{res['max_repetition']:.3g}: these runs cannot tell repeated from fresh data.")
        iso = res["isoflop"]
        if iso["budgets"]:
            lines += ["", "| IsoFLOP budget C | N_opt | D_opt | loss at N_opt |", "|---:|---:|---:|---:|"]
            for b in iso["budgets"]:
                lines.append(f"| {b['C']:.3e} | {b['N_opt']:,.0f} | {b['D_opt']:.3e} | {b['loss_opt']:.4f} |")
            if iso["a"] is not None:
                lines += ["", f"IsoFLOP minima: N_opt ∝ C^{iso['a']:.3f}, D_opt ∝ C^{iso['b']:.3f}."]
        for note in res["notes"] + [f"budget C={s['C']:.3e}: {s['why']}" for s in iso["skipped"]]:
            lines.append(f"- {note}")
    plots = result.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _groups(values: np.ndarray) -> dict[float, np.ndarray]:
    """Runs grouped by a value equal to 2 significant digits in log (e.g. the same D)."""
    keys = np.round(np.log10(values), 2)
    return {float(10 ** k): keys == k for k in np.unique(keys)}


def plot_objective(records: list[dict], obj: str, res: dict, out: Path, data_unit: str = "particles") -> list[Path]:
    """The objective's PNGs: the numbers (points, the law's curves) are computed here, drawn by
    jetfm/metrics/plots.py."""
    runs = [r for r in records if obj in r["losses"]]
    N, D, L, C = _arrays(runs, obj)
    unique = np.array([r.get("unique", r["D"]) for r in runs])
    law = _law(res)
    label = f"{obj.upper()} validation loss"
    paths = []
    # loss vs compute: runs by size, the empirical frontier, the law's compute-optimal curve
    groups = [(f"N = {n:.2g}", C[sel], L[sel], None) for n, sel in _groups(N).items()]
    front = res["frontier"]
    extra = [("frontier", np.array([f["flops"] for f in front]), np.array([f["loss"] for f in front]), "step")]
    if law is not None:
        grid = np.geomspace(C.min(), C.max(), 100)
        n_opt, d_opt = law.optimal(grid, k=res["flops_per_ND"])
        extra.append(("law, compute-optimal", grid, law.predict(n_opt, d_opt), "--"))
    paths.append(plot_law_curves(groups, out / f"{obj}_loss_vs_compute.png", "Training compute [FLOPs]", label,
                                 extra=extra))
    # IsoFLOP profiles: a parabola in log N per budget, its minimum starred
    iso = res["isoflop"]
    if iso["budgets"]:
        groups, stars = [], []
        for b in iso["budgets"]:
            x = np.linspace(np.log(min(b["N"])), np.log(max(b["N"])), 100)
            groups.append((f"C = {b['C']:.2g}", np.array(b["N"]), np.array(b["loss"]), (np.exp(x), np.polyval(b["coeffs"], x))))
            stars.append((b["N_opt"], b["loss_opt"]))
        paths.append(plot_law_curves(groups, out / f"{obj}_isoflop.png", "Parameters N (no embeddings)", label, stars=stars))
    # loss vs N per D, loss vs D per N, with the fitted surface
    for x, by, xlabel, name in ((N, D, "Parameters N (no embeddings)", "N"), (D, N, f"Data D (training {data_unit} seen)", "D")):
        groups = []
        for value, sel in _groups(by).items():
            curve = None
            if law is not None:
                grid = np.geomspace(x.min(), x.max(), 100)
                if name == "N":  # the group's own unique data, for its repetition
                    u = np.median(unique[sel])
                    curve = (grid, law.predict(grid, np.full_like(grid, value), np.full_like(grid, u)))
                else:
                    curve = (grid, law.predict(np.full_like(grid, value), grid))
            groups.append((f"{'D' if name == 'N' else 'N'} = {value:.2g}", x[sel], L[sel], curve))
        paths.append(plot_law_curves(groups, out / f"{obj}_loss_vs_{name}.png", xlabel, label,
                                     legend_title="dashed: fitted law" if law is not None else None))
    if law is not None:
        paths.append(plot_law_residuals(N, D, np.log(L / law.predict(N, D, unique)), out / f"{obj}_residuals.png"))
    return paths
