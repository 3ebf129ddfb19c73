"""Generative evaluation (docs/METHOD.md §4): generated jets vs reference jets — `jetfm evaluate generative`.

    jetfm evaluate generative --generated gen/joint --reference data/toptag
    jetfm evaluate generative --generated gen/joint --reference data/toptag --reference-split test \
        --tokenizer runs/tokenizer/final --out gen/joint/evaluation --max-jets 20000

Two references, when a tokenizer is available (--tokenizer, else the one the generated
manifest names):

- `reference`: the reference jets as stored;
- `tokenized`: the reference jets encoded and decoded by the tokenizer (the fair comparison of
  the reference paper: a generative model of tokens can at best reproduce the tokenized data).

Frames. Generated jets live in the jet frame (jetfm.generate: particles at (η_rel, φ_rel) around
η = φ = 0, massless). Every sample not already in the jet frame (the manifest's source.frame) is
put there the same way — per-particle (pT, η_rel, φ_rel) relative to the summed constituents,
massless four-momenta around (0, 0), pT-sorted — so all samples are built alike. Then:

- particle level: part_ptrel, part_etarel, part_phirel relative to the summed constituents;
- jet level, from the constituents: jet_mass, jet_pt, jet_nparticles, jet_tau21, jet_tau32 (all
  unchanged by the move to the jet frame for massless particles: a rapidity shift and a φ
  rotation), and jet_eta, jet_phi, which in the jet frame measure the **offset of the summed
  constituents from the frame origin**: ≈0 for data by construction, for generated jets a test
  that the sampled η_rel/φ_rel are centred like the data's. The absolute jet η/φ of the data
  are not compared (generated jets have none). For these two only W1 is reported (KL = NaN, "–" in tables):
  the data's offsets are float noise (the φ offset is exactly 0 by the definition of the axis),
  and a KL in quantile bins of noise measures nothing.

Metrics per observable: KL(ref ‖ gen) in `n_bins` reference-quantile bins and the exact 1-D
Wasserstein-1 distance (jetfm.metrics); per comparison also KPD and FPD on the jet observables
(jet_mass, jet_pt, jet_nparticles, jet_tau21, jet_tau32). Classes: a class-conditioned sample
(manifest classes other than ["generated"]) is compared class by class with the reference jets
of the same class name, and as a whole against the reference jets of the classes it contains;
an unconditional sample against all reference jets.

Outputs in OUT (default GENERATED/evaluation): metrics.json (everything), metrics.md (tables),
plots/<reference|tokenized>/<all|class>/<observable>.png (histograms with ratio panels); the
tables are printed. Everything is logged to the MLflow run that trained the checkpoint (run
id and tracking URI from the generated manifest, else from the checkpoint's run records): metrics
`gen/<comparison>/<class>/<observable>/{kl,w1}` at the checkpoint's step, files as artifacts
under generative_eval/<name>. Without a run record, a new run in the checkpoint's experiment
tagged `jetfm.checkpoint` is made. A tracking failure is a warning, never an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .. import messages
from ..data.features import particle_features
from ..data.format import JetArrays
from ..data.reader import iterate_jets
from ..data.remote import location
from ..data.shards import Manifest
from ..artifacts.runs import find_run_record, log_to_run, open_run, recorded_step
from ..data.jetframe import GENERATED_SPLIT, RELATIVE_FEATURES, jet_frame_jets
from ..metrics import compare_samples, format_table, fpd, jet_observables, kpd, particle_observables, plot_distributions

PARTICLE_NAMES = ("part_ptrel", "part_etarel", "part_phirel")
JET_NAMES = ("jet_mass", "jet_pt", "jet_eta", "jet_phi", "jet_nparticles", "jet_tau21", "jet_tau32")
#: Frame offsets (module docstring): compared by W1 only.
FRAME_OFFSETS = ("jet_eta", "jet_phi")
#: Jet observables of the multivariate distances (frame offsets left out: ~constant for data).
KPD_NAMES = ("jet_mass", "jet_pt", "jet_nparticles", "jet_tau21", "jet_tau32")


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (missing split, no jets, ...)."""


# --------------------------------------------------------------------------- samples
def load_jets(directory, split: str | None, max_jets: int | None = None) -> tuple[JetArrays, Manifest, str]:
    """The first `max_jets` jets of a split (default: the only split, or `generated`)."""
    directory = location(directory)  # a directory or a URL (data/remote.py)
    manifest = Manifest.load(directory)
    if split is None:
        split = GENERATED_SPLIT if GENERATED_SPLIT in manifest.splits else (
            next(iter(manifest.splits)) if len(manifest.splits) == 1 else "test")
    if split not in manifest.splits:
        raise EvaluationError(f"{directory}: no split {split!r}; it has {sorted(manifest.splits)}")
    chunks, seen = [], 0
    for chunk in iterate_jets(directory, split):
        if max_jets is not None and seen + len(chunk) > max_jets:
            chunk = chunk.select(np.arange(max_jets - seen))
        chunks.append(chunk)
        seen += len(chunk)
        if max_jets is not None and seen >= max_jets:
            break
    if not seen:
        raise EvaluationError(f"{directory}: split {split!r} holds no jets")
    return JetArrays.concat(chunks), manifest, split


def in_jet_frame(manifest: Manifest) -> bool:
    return str((manifest.source or {}).get("frame", "")).startswith("jet frame")


def to_jet_frame(jets: JetArrays, stored_features) -> JetArrays:
    """Stored jets -> the jet frame of generated jets (module docstring)."""
    rel = particle_features(jets.part, jets.offsets, stored_features, RELATIVE_FEATURES)
    frame, _ = jet_frame_jets(rel[:, 0], rel[:, 1], rel[:, 2], jets.offsets, jets.label)
    return frame


def tokenized_reference(jets: JetArrays, manifest: Manifest, tokenizer, *, batch_size: int = 500, device="cpu") -> JetArrays:
    """Reference jets encoded + decoded by the tokenizer (truncated to its max_particles), in the jet frame."""
    from ..tokenizer.tokenize import tokenize_jets

    truncated, tokens, reco = tokenize_jets(tokenizer, jets, manifest.particle_features, batch_size=batch_size,
                                            device=device, with_reco=True)
    names = list(tokenizer.feature_names)
    pt, etarel, phirel = (reco[:, names.index(n)] for n in RELATIVE_FEATURES)
    frame, _ = jet_frame_jets(pt, etarel, phirel, truncated.offsets, truncated.label, tokens)
    return frame


def observables(jets: JetArrays) -> tuple[dict, dict]:
    """(jet observables (B,), particle observables (T,)) of a jet-frame sample."""
    jet = jet_observables(jets)
    part = particle_observables(jets)
    return {name: jet[name] for name in JET_NAMES}, {name: part[name] for name in PARTICLE_NAMES}


def _select(obs: tuple[dict, dict], jets: JetArrays, labels: list[int] | None) -> tuple[dict, dict]:
    if labels is None:
        return obs
    keep_B = np.isin(jets.label, labels)
    keep_T = np.repeat(keep_B, jets.multiplicity)
    return {k: v[keep_B] for k, v in obs[0].items()}, {k: v[keep_T] for k, v in obs[1].items()}


# --------------------------------------------------------------------------- comparison
def compare(ref: tuple[dict, dict], gen: tuple[dict, dict], *, n_bins: int = 40, seed: int = 0) -> dict:
    """KL + W1 per observable, KPD and FPD on the jet observables."""
    rows = compare_samples({**ref[1], **ref[0]}, {**gen[1], **gen[0]}, list(PARTICLE_NAMES) + list(JET_NAMES),
                           n_bins=n_bins)
    for row in rows:
        if isinstance(row.get("w1_std"), float) and math.isnan(row["w1_std"]):
            row.pop("w1_std")
        if row["observable"] in FRAME_OFFSETS:
            row["kl"] = math.nan
    out = {"n_ref_jets": int(len(ref[0]["jet_pt"])), "n_gen_jets": int(len(gen[0]["jet_pt"])), "rows": rows}
    ref_matrix = np.stack([ref[0][n] for n in KPD_NAMES], 1)
    gen_matrix = np.stack([gen[0][n] for n in KPD_NAMES], 1)
    if min(len(ref_matrix), len(gen_matrix)) >= 2:
        out["kpd"], out["kpd_std"] = kpd(ref_matrix, gen_matrix, seed=seed)
        out["fpd"] = fpd(ref_matrix, gen_matrix)
    return out


def format_comparison(title: str, result: dict) -> str:
    lines = [f"### {title}", "", f"{result['n_gen_jets']} generated vs {result['n_ref_jets']} reference jets", "",
             format_table([{**r, "w1_std": r.get("w1_std", math.nan)} for r in result["rows"]])]
    if "kpd" in result:
        lines += ["", f"KPD ({', '.join(KPD_NAMES)}): {result['kpd']:.4g} ± {result['kpd_std']:.2g}; "
                      f"FPD: {result['fpd']:.4g}"]
    return "\n".join(lines)


def flat_metrics(result: dict) -> dict[str, float]:
    """{gen/<comparison>/<class>/<observable>/{kl,w1}, gen/<comparison>/<class>/{kpd,fpd}: value}."""
    from ..tracking import sanitize_key

    out = {}
    for comparison, per_class in result["comparisons"].items():
        for cls, entry in per_class.items():
            prefix = f"gen/{comparison}/{cls}"
            for row in entry["rows"]:
                out[sanitize_key(f"{prefix}/{row['observable']}/kl")] = float(row["kl"])
                out[sanitize_key(f"{prefix}/{row['observable']}/w1")] = float(row["w1"])
            for key in ("kpd", "fpd"):
                if key in entry:
                    out[sanitize_key(f"{prefix}/{key}")] = float(entry[key])
    return {k: v for k, v in out.items() if math.isfinite(v)}


# --------------------------------------------------------------------------- the evaluation
def evaluate_generative(
    generated_dir,
    reference_dir,
    *,
    tokenizer_dir=None,
    out_dir=None,
    reference_split: str = "test",
    generated_split: str | None = None,
    max_jets: int | None = None,
    n_bins: int = 40,
    plots: bool = True,
    per_class_plots: bool = True,
    tokenized_plots: bool = True,
    tracking: bool = True,
    tracking_uri: str | None = None,
    device: str = "cpu",
    batch_size: int = 500,
    verbose: bool = True,
) -> dict:
    """Compare generated jets with reference jets (module docstring); returns the result dict
    (also written to OUT/metrics.json): comparisons[reference|tokenized][all|class] = {rows:
    [{observable, n_ref, n_gen, kl, w1}], kpd, kpd_std, fpd, n_ref_jets, n_gen_jets}, plots, mlflow."""
    started = time.perf_counter()
    generated_dir, reference_dir = Path(generated_dir), location(reference_dir)  # the reference may be a URL
    out_dir = Path(out_dir) if out_dir is not None else generated_dir / "evaluation"
    say = messages.info if verbose else (lambda text: None)

    gen_jets, gen_manifest, gen_split = load_jets(generated_dir, generated_split, max_jets)
    ref_jets, ref_manifest, ref_split = load_jets(reference_dir, reference_split, max_jets)
    if not in_jet_frame(gen_manifest):
        gen_jets = to_jet_frame(gen_jets, gen_manifest.particle_features)
    samples = {"reference": ref_jets if in_jet_frame(ref_manifest) else to_jet_frame(ref_jets, ref_manifest.particle_features)}
    notes = []

    tokenizer_dir = tokenizer_dir or (gen_manifest.tokens or {}).get("tokenizer") or (gen_manifest.source or {}).get("tokenizer")
    if tokenizer_dir and Path(tokenizer_dir).exists():
        from ..tokenizer.model import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir, device=device)
        if all(n in tokenizer.feature_names for n in RELATIVE_FEATURES):
            samples["tokenized"] = tokenized_reference(ref_jets, ref_manifest, tokenizer, batch_size=batch_size, device=device)
        else:
            notes.append(f"tokenizer {tokenizer_dir} decodes {tokenizer.feature_names}, not {list(RELATIVE_FEATURES)}: "
                         "no tokenized reference")
    else:
        notes.append("no tokenizer available (--tokenizer): no tokenized reference" if not tokenizer_dir
                     else f"tokenizer {tokenizer_dir} not found: no tokenized reference")

    # class matching by name: (name, generated labels, reference labels)
    groups: list[tuple[str, list[int] | None, list[int] | None]] = []
    gen_classes = list(gen_manifest.classes)
    if gen_classes == ["generated"]:
        groups.append(("all", None, None))
    else:
        present = sorted(set(np.unique(gen_jets.label).tolist()))
        shared = [(gen_classes[i], i, ref_manifest.classes.index(gen_classes[i])) for i in present
                  if gen_classes[i] in ref_manifest.classes]
        if not shared:
            notes.append(f"generated classes {gen_classes} share no name with the reference's {ref_manifest.classes}: "
                         "compared as a whole")
            groups.append(("all", None, None))
        else:
            groups.append(("all", [g for _, g, _ in shared], [r for _, _, r in shared]))
            if len(shared) > 1:  # one class: "all" is that class already
                groups += [(name, [g], [r]) for name, g, r in shared]

    gen_obs = observables(gen_jets)
    result = {
        "generated": {"dir": str(generated_dir), "split": gen_split, "n_jets": len(gen_jets), "classes": gen_classes,
                      "source": gen_manifest.source},
        "reference": {"dir": str(reference_dir), "split": ref_split, "n_jets": len(ref_jets),
                      "classes": list(ref_manifest.classes)},
        "tokenizer": str(tokenizer_dir) if "tokenized" in samples else None,
        "n_bins": n_bins,
        "comparisons": {},
        "notes": notes,
        "plots": [],
    }
    text = []
    for comparison, ref_sample in samples.items():
        ref_obs = observables(ref_sample)
        result["comparisons"][comparison] = {}
        for name, gen_labels, ref_labels in groups:
            g = _select(gen_obs, gen_jets, gen_labels)
            r = _select(ref_obs, ref_sample, ref_labels)
            if len(g[0]["jet_pt"]) == 0 or len(r[0]["jet_pt"]) == 0:
                notes.append(f"{comparison}/{name}: no jets on one side, skipped")
                continue
            entry = compare(r, g, n_bins=n_bins)
            result["comparisons"][comparison][name] = entry
            label = "reference" if comparison == "reference" else "reference (tokenized)"
            text.append(format_comparison(f"generated vs {label} — {name}", entry))
            if plots and (name == "all" or per_class_plots) and (comparison == "reference" or tokenized_plots):
                annotations = {row["observable"]: (f"KL {row['kl']:.3g}, " if math.isfinite(row["kl"]) else "")
                               + f"W1 {row['w1']:.3g}" for row in entry["rows"]}
                paths = plot_distributions(
                    {**r[1], **r[0]}, {**g[1], **g[0]}, out_dir / "plots" / comparison / name,
                    labels=(label, "generated"), names=list(PARTICLE_NAMES) + list(JET_NAMES), annotations=annotations,
                )
                result["plots"] += [str(p) for p in paths]
    if not result["comparisons"].get("reference"):
        raise EvaluationError("nothing to compare: no class of the generated jets has reference jets")

    header = [f"# Generative evaluation: {generated_dir} ({gen_split}) vs {reference_dir} ({ref_split})", "",
              "Generated jets are in the jet frame; jet_eta/jet_phi are the offsets of the summed constituents from "
              "the frame origin, compared by W1 only (see jetfm/evaluation/generative.py). KL(ref‖gen) in "
              f"{n_bins} reference-quantile bins; W1 exact.", ""]
    markdown = "\n".join(header + ["\n\n".join(text)] + ([""] + [f"- note: {n}" for n in notes] if notes else [])) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    result["seconds"] = round(time.perf_counter() - started, 2)
    (out_dir / "metrics.md").write_text(markdown)
    result["mlflow"] = None
    write_json = lambda: (out_dir / "metrics.json").write_text(  # noqa: E731
        json.dumps(_finite_or_none(result), indent=1, default=_json_default, allow_nan=False) + "\n")
    write_json()  # before logging, so that the artifacts hold it
    if tracking:
        result["mlflow"] = _log_to_mlflow(result, out_dir, gen_manifest, generated_dir, tracking_uri=tracking_uri, say=say)
        write_json()
    if verbose:
        messages.output(markdown)
    return result


def _finite_or_none(value):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------- MLflow
def _log_to_mlflow(result: dict, out_dir: Path, manifest: Manifest, generated_dir: Path, *,
                   tracking_uri: str | None, say) -> dict | None:
    """Log metrics + files to the checkpoint's MLflow run (or a new run pointing at it). Never raises."""
    source = manifest.source or {}
    checkpoint = source.get("checkpoint")
    run = source.get("mlflow") or (find_run_record(checkpoint) if checkpoint else None)
    if tracking_uri and (run is None or run.get("uri") != tracking_uri):
        run = {"uri": tracking_uri, "run_id": None}  # another server: a new run there
    if run is None and checkpoint:
        run = _default_tracking(checkpoint)
    if run is None:
        say("no MLflow run to log to (no checkpoint run record; tracking off in its config): skipped")
        return None
    try:
        tags = {"jetfm.kind": "generative_eval", "jetfm.checkpoint": str(checkpoint), "jetfm.generated": str(generated_dir)}
        run_id, new_run = open_run(run["uri"], run.get("run_id"), experiment=source.get("experiment") or "jetfm",
                                   run_name=f"{source.get('name') or 'jetfm'}-generative-eval", tags=tags)
        step = recorded_step(run) if not new_run else 0
        name = generated_dir.resolve().name
        n_metrics = log_to_run(run["uri"], run_id, flat_metrics(result), step=step,
                               tags={f"jetfm.generative_eval.{name}": str(out_dir.resolve())},
                               artifacts=[(out_dir, f"generative_eval/{name}")], terminate=new_run)
        say(f"logged {n_metrics} metrics and {out_dir} to MLflow run {run_id} at {run['uri']}"
            + (" (new run)" if new_run else ""))
        return {"uri": run["uri"], "run_id": run_id, "new_run": new_run, "step": step}
    except Exception as error:  # noqa: BLE001 - tracking never fails an evaluation
        text = f"MLflow logging failed ({type(error).__name__}: {str(error)[:300]}); results are in {out_dir}"
        messages.warn(text) if say is messages.info else say(text)  # a warning when verbose, else quiet
        return {"uri": run.get("uri"), "error": f"{type(error).__name__}: {str(error)[:300]}"}


def _default_tracking(checkpoint) -> dict | None:
    """{"uri", "run_id": None} from the checkpoint's config when it names no run (tracking on only)."""
    try:
        from ..config_io import load_config
        from ..tracking import default_uri

        cfg = load_config(Path(checkpoint) / "config.yaml")
    except Exception:  # noqa: BLE001
        return None
    if not cfg.tracking.enabled:
        return None
    local = Path(checkpoint).parent / "mlflow.db"
    uri = f"sqlite:///{local.resolve()}" if local.exists() and not cfg.tracking.uri else default_uri(cfg)
    return {"uri": uri, "run_id": None}


# --------------------------------------------------------------------------- command line
def add_generative_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generated", required=True, metavar="DIR", help="generated shard set (`jetfm generate --out`)")
    parser.add_argument("--reference", required=True, metavar="DIR", help="reference shard set, directory or URL (e.g. the training data)")
    parser.add_argument("--reference-split", default="test", help="split of the reference (default test)")
    parser.add_argument("--generated-split", default=None, help="split of the generated set (default: generated)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer for the tokenized reference (default: the generated manifest's)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default GENERATED/evaluation)")
    parser.add_argument("--max-jets", type=int, default=None, metavar="N", help="at most N jets of each sample")
    parser.add_argument("--bins", type=int, default=40, help="reference-quantile bins of the KL (default 40)")
    parser.add_argument("--no-plots", action="store_true", help="metrics only")
    parser.add_argument("--no-class-plots", action="store_true", help="plots for all jets only, not per class")
    parser.add_argument("--no-tokenized-plots", action="store_true",
                        help="plots against the stored reference only (the tokenized comparison keeps its numbers)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the checkpoint run's)")
    parser.add_argument("--device", default="cpu", help="device of the tokenizer (default cpu)")


def run_generative(args) -> int:
    from ..data.format import DataError
    from ..tokenizer.model import TokenizerMismatchError

    try:
        evaluate_generative(
            args.generated, args.reference, tokenizer_dir=args.tokenizer, out_dir=args.out,
            reference_split=args.reference_split, generated_split=args.generated_split, max_jets=args.max_jets,
            n_bins=args.bins, plots=not args.no_plots, per_class_plots=not args.no_class_plots,
            tokenized_plots=not args.no_tokenized_plots,
            tracking=not args.no_tracking, tracking_uri=args.tracking_uri, device=args.device,
        )
    except (EvaluationError, DataError, TokenizerMismatchError, FileNotFoundError) as error:
        messages.error(str(error))
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm evaluate generative", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generative_arguments(parser)
    return run_generative(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
