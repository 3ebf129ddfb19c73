"""Look at a shard set before training on it: a summary table and per-class histograms.

    jetfm data inspect data/toptag                      # prints the summary, writes data/toptag/inspect/
    jetfm data inspect data/jetclass --splits train val --out plots/jetclass --verify
    jetfm data inspect https://host/jetclass --verify   # a remote set (data/remote.py); OUT: ./inspect-jetclass

The summary (jets per class and split, multiplicity, feature ranges, skipped jets, creation
command) comes from the manifest alone. The histograms of jet mass, jet pT and number of
particles per class read a sample of at most `max_jets` jets per split, spread over all shards.
Everything printed is also written to OUT/summary.txt and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

from .. import messages
from .format import UNITS, DataError, JetArrays
from .remote import open_store
from .shards import SPLITS, Manifest

#: Histogrammed jet observables: (jet feature, file stem, axis label).
OBSERVABLES = (
    ("jet_mass", "jet_mass", r"Jet mass $m_\mathrm{jet}$ [GeV]"),
    ("jet_pt", "jet_pt", r"Jet $p_\mathrm{T}$ [GeV]"),
    ("jet_nparticles", "jet_nparticles", "Number of particles in the jet"),
)


# ----------------------------------------------------------------------------- reading a sample
def _read_chunks(store, shard: dict, manifest: Manifest):
    """Chunks of one shard in file order (imported here: the reader pulls in torch, a summary needs none)."""
    from .reader import read_shard_chunks

    return read_shard_chunks(store, shard, manifest)


def sample_split(directory, manifest: Manifest, split: str, max_jets: int) -> JetArrays:
    """Up to ~max_jets jets of a split: the first chunks of every shard, about equally many per shard."""
    shards = manifest.shards(split)
    if not shards:
        return JetArrays.empty(len(manifest.particle_features), len(manifest.jet_features))
    per_shard = max(1, math.ceil(max_jets / len(shards)))
    pieces = []
    for shard in shards:
        taken = 0
        for jets in _read_chunks(directory, shard, manifest):
            pieces.append(jets)
            taken += len(jets)
            if taken >= per_shard:
                break
    return JetArrays.concat(pieces) if pieces else JetArrays.empty(
        len(manifest.particle_features), len(manifest.jet_features)
    )


# ----------------------------------------------------------------------------- summary
def _ordered_splits(manifest: Manifest, splits) -> list[str]:
    if splits:
        unknown = [s for s in splits if s not in manifest.splits]
        if unknown:
            raise DataError(f"splits {unknown} not in the dataset; it has {sorted(manifest.splits)}")
        return list(splits)
    return [s for s in SPLITS if s in manifest.splits] + sorted(s for s in manifest.splits if s not in SPLITS)


def _number(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e5 or (abs(value) < 1e-3 and value != 0):
        return f"{value:.3g}"
    return f"{value:,.3f}".rstrip("0").rstrip(".") if not float(value).is_integer() else f"{int(value):,}"


def _unit(name: str) -> str:
    if name in UNITS:
        return UNITS[name]
    if name.endswith(("_pt", "_px", "_py", "_pz", "_energy", "_mass", "_sdmass")):
        return "GeV"
    return "rad" if name.endswith(("phi", "phirel")) else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(  # noqa: E731 - first column left, numbers right
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def summarise(directory, manifest: Manifest, splits: list[str]) -> tuple[dict, str]:
    """The manifest's facts as a dict and as readable text."""
    info = {
        "directory": str(directory),
        "source": {k: v for k, v in manifest.source.items() if k not in ("files", "conversions")},
        "n_files": len(manifest.source.get("files", [])),
        "classes": list(manifest.classes),
        "particle_features": list(manifest.particle_features),
        "jet_features": list(manifest.jet_features),
        "max_particles": manifest.max_particles,
        "splits": {},
        "skipped": dict(manifest.skipped),
        "created_by": dict(manifest.created_by),
        "commands": [c["created_by"]["command"] for c in manifest.source.get("conversions", []) if c.get("created_by")]
        or ([manifest.created_by["command"]] if manifest.created_by.get("command") else []),
    }
    for split in splits:
        stats = manifest.jet_statistics(split)
        n_jets = manifest.n_jets(split)
        n_particles = sum(s["n_particles"] for s in manifest.shards(split))
        mult = stats.get("jet_nparticles", {})
        info["splits"][split] = {
            "n_jets": n_jets,
            "n_shards": len(manifest.shards(split)),
            "class_counts": dict(zip(manifest.classes, manifest.class_counts(split))),
            "multiplicity": {"mean": mult.get("mean"), "min": mult.get("min"), "max": mult.get("max")},
            "stored_particles_per_jet": n_particles / n_jets if n_jets else None,
        }
    range_split = "train" if "train" in splits else (splits[0] if splits else None)
    info["ranges_split"] = range_split
    info["particle_ranges"] = manifest.particle_statistics(range_split) if range_split else {}
    info["jet_ranges"] = manifest.jet_statistics(range_split) if range_split else {}

    kind = manifest.source.get("kind", "?")
    lines = [
        f"Dataset {directory}",
        f"  source {kind}" + (f", {info['n_files']} input files" if info["n_files"] else "")
        + f"; at most {manifest.max_particles} particles per jet; {manifest.chunk_size} jets per chunk",
        f"  particle features: {' '.join(manifest.particle_features)}",
        f"  jet features:      {' '.join(manifest.jet_features)}",
        "",
        "Jets per class",
    ]
    rows = [[name] + [f"{info['splits'][s]['class_counts'][name]:,}" for s in splits] for name in manifest.classes]
    rows.append(["total"] + [f"{info['splits'][s]['n_jets']:,}" for s in splits])
    rows.append(["shards"] + [f"{info['splits'][s]['n_shards']:,}" for s in splits])
    lines += ["  " + r for r in _table(["class"] + splits, rows)]
    lines += ["", "Particles per jet (jet_nparticles before truncation; stored = after)"]
    rows = []
    for key in ("mean", "min", "max"):
        rows.append([key] + [_number(info["splits"][s]["multiplicity"][key]) for s in splits])
    rows.append(["stored mean"] + [_number(info["splits"][s]["stored_particles_per_jet"]) for s in splits])
    lines += ["  " + r for r in _table(["multiplicity"] + splits, rows)]
    if range_split:
        lines += ["", f"Feature ranges ({range_split} split, physical units)"]
        rows = []
        for name, entry in list(info["particle_ranges"].items()) + list(info["jet_ranges"].items()):
            unit = _unit(name)
            rows.append([name, unit] + [_number(entry[k]) for k in ("mean", "std", "min", "max")])
        lines += ["  " + r for r in _table(["feature", "unit", "mean", "std", "min", "max"], rows)]
    skipped = ", ".join(f"{reason} {count:,}" for reason, count in sorted(manifest.skipped.items()))
    lines += ["", f"Skipped bad jets: {skipped or 'none'}"]
    if info["commands"]:
        lines += ["Created by: " + info["commands"][0]] + ["            " + c for c in info["commands"][1:]]
    created = manifest.created_by
    if created:
        lines.append(f"  jetfm {created.get('jetfm_version', '?')}, {created.get('time', '?')}")
    return info, "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _bins(name: str, values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return np.linspace(0, 1, 2)
    if name == "jet_nparticles":
        lo, hi = int(finite.min()), int(finite.max())
        step = max(1, math.ceil((hi - lo + 1) / 100))
        return np.arange(lo, hi + step + 1, step) - 0.5
    lo, hi = np.quantile(finite, [0.002, 0.998])
    lo = 0.0 if name == "jet_mass" else lo
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi + 0.02 * (hi - lo), 61)


def plot_observables(samples: dict[str, JetArrays], manifest: Manifest, totals: dict[str, int], out_dir: Path,
                     title: str) -> list[str]:
    """One PNG per observable: a panel per split, a normalised step histogram per class."""
    from ..metrics.plots import plot_class_histograms

    paths = []
    for feature, stem, xlabel in OBSERVABLES:
        if feature not in manifest.jet_features:
            continue
        column = manifest.jet_features.index(feature)
        bins = _bins(feature, np.concatenate([s.jet[:, column] for s in samples.values()]))
        panels = {}
        for split, jets in samples.items():
            sampled = "" if len(jets) >= totals[split] else f", sample of {len(jets):,}"
            panels[split] = (jets.jet[:, column], jets.label, f"{split}: {totals[split]:,} jets{sampled}")
        marker = None
        if feature == "jet_nparticles":
            marker = (manifest.max_particles, f"stored up to {manifest.max_particles}")
        path = plot_class_histograms(panels, list(manifest.classes), bins, out_dir / f"{stem}.png", xlabel=xlabel,
                                     title=title, marker=marker)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- entry points
def inspect_dataset(directory, out_dir=None, splits=None, *, max_jets: int = 200_000, verify: bool = False,
                    plots: bool = True, echo: bool = True) -> dict:
    """Print and save a summary of the shard set in `directory`, plot per-class histograms.

    out_dir defaults to DIR/inspect. Returns the summary dict (also in OUT/summary.json) with
    "figures" (PNG paths) and "summary" (the printed text).
    """
    store = open_store(directory)
    directory = store.root  # a Path, or the URL of a remote set
    name = directory.name if isinstance(directory, Path) else directory.rpartition("/")[2]
    manifest = Manifest.load(store)
    if verify:
        from .reader import verify_shards

        verify_shards(store, manifest)
    splits = _ordered_splits(manifest, splits)
    if out_dir is None:
        remote_dir = Path("inspect-" + re.sub(r"[^\w.-]", "_", name))  # inspect-127.0.0.1_8000
        out_dir = directory / "inspect" if isinstance(directory, Path) else remote_dir
    out_dir = Path(out_dir)
    info, text = summarise(directory, manifest, splits)
    if verify:
        n_shards = sum(len(manifest.shards(s)) for s in manifest.splits)
        text += f"\nVerified: all {n_shards} shards present and holding the recorded chunks and jets"
    figures = []
    if plots and splits:
        samples = {split: sample_split(store, manifest, split, max_jets) for split in splits}
        totals = {split: manifest.n_jets(split) for split in splits}
        title = f"{name} ({manifest.source.get('kind', '?')})"
        figures = plot_observables(samples, manifest, totals, out_dir, title)
    info["figures"] = figures
    info["summary"] = text
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.txt").write_text(text + "\n")
    (out_dir / "summary.json").write_text(json.dumps(info, indent=1, default=str))
    if echo:
        messages.output(text)
        if figures:
            messages.output(f"\nFigures: {', '.join(figures)}")
    return info


def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `jetfm data inspect DIR`."""
    parser.add_argument("dir", help="dataset directory or URL (holds manifest.json): http(s)://, s3://, gs://, file://")
    parser.add_argument("--out", default=None,
                        help="where figures and summary go (default: DIR/inspect; ./inspect-NAME for a URL)")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to show (default: all)")
    parser.add_argument("--max-jets", type=int, default=200_000, help="jets per split read for the histograms")
    parser.add_argument("--no-plots", action="store_true", help="summary only")
    parser.add_argument("--verify", action="store_true",
                        help="also read every shard and check it against the manifest (slow for large sets)")
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    """Run a parsed `jetfm data inspect`; bad datasets raise DataError (the jetfm command prints it)."""
    inspect_dataset(args.dir, args.out, args.splits, max_jets=args.max_jets, verify=args.verify,
                    plots=not args.no_plots)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm data inspect", description=__doc__.split("\n\n")[0])
    add_inspect_arguments(parser)
    try:
        return run_inspect(parser.parse_args(argv))
    except DataError as error:
        messages.error(str(error))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
