"""Tokenizer quality on held-out jets: codebook use, reconstruction in physical units, plots.

    metrics = evaluate(model, loader, cfg, out_dir)   # the trainer logs them to MLflow

What is measured (docs/METHOD.md §2), with every particle encoded and decoded in stored pT order:

- codebook: `utilisation` (fraction of the K codes used on the held-out set), `perplexity`
  (exp of the entropy of the code histogram), `codes_used`.
- losses: `recon_loss` (MSE on preprocessed features), `vq_loss` (as in training).
- per feature, in physical units (Preprocessing inverted): multiplicative quantities
  (part_pt, part_energy, part_ptrel, part_erel) as the ratio reco/true —
  `<f>_ratio_mean`, `_median`, `_std`, `_iqr`, over particles above RATIO_FEATURES' floor
  (pT, E ≥ 1 GeV) —, all others as the difference reco − true
  (φ differences wrapped) — `<f>_delta_mean`, `_std`, `_iqr`.
- jets (if part_pt, part_etarel, part_phirel are features): massless four-vectors rebuilt
  with four_momenta_from_relative from the original and from the reconstructed features, the
  same particles on both sides, summed → `jet_mass_ratio_*` and `jet_pt_ratio_*` (reco/true).
  Comparing against the original features rebuilt the same way isolates the tokenizer from
  the massless approximation and from truncation.

PNGs written to out_dir: features.png (true vs reconstructed, ratio panels), resolution.png
(per-particle residuals), jet_mass.png (jet mass, ratio panel), codebook.png (code usage).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.features import four_momenta_from_relative
from ..data.physics import invariant_mass, segment_sum, wrap_phi
from ..metrics import plots
from ..models.objectives import Ratio
from .codebook import counts_statistics, nearest_codes
from .model import check_features_match, packing_for

#: Features compared as a ratio reco/true (positive, spanning decades); the rest as a difference.
#: The ratio statistics use particles whose true value is at least the floor: Pythia keeps
#: constituents down to 1e-12 GeV, whose ratios (any reco / ~0) would swamp mean and std.
RATIO_FEATURES = {"part_pt": 1.0, "part_energy": 1.0, "part_ptrel": 1e-3, "part_erel": 1e-3}
PHI_FEATURES = ("part_phirel", "part_phi")
#: Jet feature columns of JetBatch.jet (data/format.py JET_FEATURES order).
JET_ETA, JET_PHI = 1, 2

LABELS = {
    "part_pt": r"particle $p_T$ [GeV]",
    "part_etarel": r"particle $\eta - \eta_{jet}$",
    "part_phirel": r"particle $\phi - \phi_{jet}$",
    "part_ptrel": r"particle $p_T / p_{T,jet}$",
    "part_energy": "particle energy [GeV]",
    "part_erel": r"particle $E / E_{jet}$",
    "part_deltaR": r"particle $\Delta R$ to jet axis",
}


def _summary(values: np.ndarray, prefix: str, kind: str) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    out = {
        f"{prefix}_{kind}_mean": float(values.mean()),
        f"{prefix}_{kind}_std": float(values.std()),
        f"{prefix}_{kind}_iqr": float(q75 - q25),
    }
    if kind == "ratio":
        out[f"{prefix}_{kind}_median"] = float(q50)
    return out


def _residual(name: str, true: np.ndarray, reco: np.ndarray) -> tuple[np.ndarray, str]:
    """reco/true (NaN below the feature's floor) or reco − true (φ wrapped)."""
    if name in RATIO_FEATURES:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(true >= RATIO_FEATURES[name], reco / true, np.nan), "ratio"
    delta = reco - true
    return (wrap_phi(delta) if name in PHI_FEATURES else delta), "delta"


@torch.no_grad()
def evaluate(model, loader, cfg, out_dir, *, max_jets: int | None = None, plots: bool = True) -> dict[str, float]:
    """Run the tokenizer over `loader` (one pass, at most max_jets jets); metrics + PNGs in out_dir."""
    model = getattr(model, "module", model)
    features = getattr(getattr(cfg, "data", None), "features", None) if cfg is not None else None
    if features:
        check_features_match(model.preprocessing, features, "tokenizer", "config data.features")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = model.codebook_size
    counts = torch.zeros(K, dtype=torch.long, device=device)
    sums = {"recon": 0.0, "vq": 0.0, "particles": 0, "jets": 0}
    xs, recos, lengths, axes = [], [], [], []
    try:
        for batch in loader:
            if max_jets is not None and sums["jets"] >= max_jets:
                break
            batch = batch.to(device)
            layout = packing_for(batch.cu_seqlens, batch.x.shape[0], batch.max_seqlen)
            z = model.encode_latents(batch.x, layout)
            codes = nearest_codes(z, model.codebook.vectors())
            q = model.codebook.lookup(codes)
            reco = model.decode_latents(q, layout)
            n = batch.num_particles
            sums["recon"] += float(F.mse_loss(reco.float(), batch.x.float(), reduction="sum")) / max(model.n_features, 1)
            sums["vq"] += float(F.mse_loss(q, z, reduction="sum") * (1 + model.cfg.beta)) / model.cfg.latent_dim
            sums["particles"] += n
            sums["jets"] += batch.num_jets
            counts += torch.bincount(codes, minlength=K)
            xs.append(batch.x.float().cpu().numpy())
            recos.append(reco.float().cpu().numpy())
            lengths.append(batch.seqlens.cpu().numpy())
            jet = batch.jet.float().cpu().numpy()
            axes.append(jet[:, [JET_ETA, JET_PHI]] if jet.ndim == 2 and jet.shape[1] > JET_PHI else np.zeros((batch.num_jets, 2)))
    finally:
        model.train(was_training)
    if not sums["particles"]:
        raise ValueError("tokenizer evaluation: the loader yielded no particles")

    perplexity, utilisation = counts_statistics(counts)
    metrics = {
        # per particle over every process's batches: the trainer adds a Ratio's parts over processes
        "recon_loss": Ratio(sums["recon"], float(sums["particles"])),
        "vq_loss": Ratio(sums["vq"], float(sums["particles"])),
        "perplexity": float(perplexity),
        "utilisation": float(utilisation),
        "codes_used": float((counts > 0).sum()),
        "jets": float(sums["jets"]),
        "particles": float(sums["particles"]),
    }

    names = model.feature_names
    x_true = model.preprocessing.inverse(np.concatenate(xs))
    x_reco = model.preprocessing.inverse(np.concatenate(recos))
    residuals = {}
    for j, name in enumerate(names):
        residuals[name] = _residual(name, x_true[:, j], x_reco[:, j])
        metrics.update(_summary(residuals[name][0], name, residuals[name][1]))

    lengths = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    jets = None
    if all(n in names for n in ("part_pt", "part_etarel", "part_phirel")):
        axis = np.repeat(np.concatenate(axes), lengths, axis=0)
        jets = {}
        for side, values in (("true", x_true), ("reco", x_reco)):
            cols = [values[:, names.index(n)] for n in ("part_pt", "part_etarel", "part_phirel")]
            # a reconstructed pT can undershoot 0 (signed_log inverse): clip, massless rebuild
            p4 = four_momenta_from_relative(np.clip(cols[0], 0, None), cols[1], cols[2], axis[:, 0], axis[:, 1])
            total = segment_sum(p4, offsets)
            jets[side] = {"mass": invariant_mass(total[:, 3], total[:, 0], total[:, 1], total[:, 2]),
                          "pt": np.hypot(total[:, 0], total[:, 1])}
        for quantity in ("mass", "pt"):
            true, reco = jets["true"][quantity], jets["reco"][quantity]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(true > 0, reco / true, np.nan)
            metrics.update(_summary(ratio, f"jet_{quantity}", "ratio"))
            jets[f"{quantity}_ratio"] = ratio

    if plots and out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _plot_features(names, x_true, x_reco, out_dir / "features.png")
        _plot_residuals(residuals, jets, out_dir / "resolution.png")
        if jets is not None:
            _plot_jet_mass(jets, out_dir / "jet_mass.png")
        _plot_codebook(counts.cpu().numpy(), metrics, out_dir / "codebook.png")
    return metrics


# ---------------------------------------------------------------------- plots
def _plot_features(names, x_true, x_reco, path: Path) -> None:
    panels = []
    for j, name in enumerate(names):
        bins, log_x = plots.reconstruction_bins(x_true[:, j], x_reco[:, j], log=name in RATIO_FEATURES)
        panels.append((x_true[:, j], x_reco[:, j], bins, log_x, LABELS.get(name, name)))
    plots.plot_reconstruction(panels, path, title="VQ-VAE tokenizer: original vs reconstructed particles")


def _plot_residuals(residuals, jets, path: Path) -> None:
    panels = []
    entries = list(residuals.items()) + ([("jet_mass", (jets["mass_ratio"], "ratio"))] if jets is not None else [])
    for name, (values, kind) in entries:
        label = "jet mass" if name == "jet_mass" else LABELS.get(name, name).split("[")[0].strip()
        if name in RATIO_FEATURES:
            label += f" (≥ {RATIO_FEATURES[name]:g})"
        xlabel = f"{label}: {'reco / orig' if kind == 'ratio' else 'reco − orig'}"
        panels.append((values, xlabel, 1.0 if kind == "ratio" else 0.0))
    plots.plot_residuals(panels, path)


def _plot_jet_mass(jets, path: Path) -> None:
    true, reco = jets["true"]["mass"], jets["reco"]["mass"]
    hi = np.percentile(np.concatenate([true, reco]), 99.8)
    n_bins = int(np.clip(np.sqrt(len(true)) / 1.5, 15, 60))  # ≈ 20 jets per bin on average at least
    bins = np.linspace(0, max(hi, 1e-3), n_bins + 1)
    plots.plot_reconstruction([(true, reco, bins, False, "jet mass [GeV] (massless constituents)")], path,
                              title="jet mass: original vs tokenized-then-decoded", ylabel="jets")


def _plot_codebook(counts: np.ndarray, metrics: dict, path: Path) -> None:
    title = f"codebook: {int(metrics['codes_used'])} / {len(counts)} codes used, perplexity {metrics['perplexity']:.0f}"
    plots.plot_code_usage(counts, path, title=title)
