"""Particle- and jet-level observables for judging generated jets (docs/METHOD.md §4).

    jet_obs = jet_observables(jets)        # jets: JetArrays or (p4 (T, 4), offsets (B + 1,))
    part_obs = particle_observables(jets)

Particle level (T,): part_ptrel = pT / pT_jet, part_etarel, part_phirel, relative to the summed
constituent four-vector (the jet axis of docs/METHOD.md §1, via jetfm.data.features).
Jet level (B,): jet_pt, jet_eta, jet_phi, jet_mass (GeV), jet_nparticles, and N-subjettiness
jet_tau1..3 with the ratios jet_tau21 = tau2/tau1, jet_tau32 = tau3/tau2.

N-subjettiness (Thaler & Van Tilburg), beta = 1:

    tau_N = sum_k pT_k min_j dR(k, axis_j) / d0,   d0 = R0 * sum_k pT_k,   R0 = 0.8

Axes: exclusive kT axes — the jet reclustered with the kT algorithm (E-scheme recombination,
R = 1000 so no pseudojet is ever merged with the beam) until exactly N pseudojets remain; no
one-pass minimisation afterwards. This is FastJet's `exclusive_jets(N)` of
`JetDefinition(kt_algorithm, 1000, E_scheme)` and the `KT_Axes` of the Nsubjettiness contrib,
run through FastJet's multi-event interface (fastjet and awkward are dependencies of jetfm).
dR is measured in (rapidity, phi), FastJet's convention; for massless particles rapidity = eta.

Conventions: a jet with N or fewer particles has tau_N = 0 (every particle can be its own axis),
and a ratio whose denominator is 0 is defined as 0 (so 1-particle jets have tau21 = 0 and
2-particle jets tau32 = 0).

Legend: T particles, B jets, P padded particles per jet.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from jetfm.data.features import particle_features
from jetfm.data.format import KINEMATIC_FEATURES, JetArrays
from jetfm.data.physics import jets_from_constituents, wrap_phi

#: Radius parameter in the N-subjettiness normalisation d0 (anti-kT R = 0.8 jets).
R0 = 0.8
#: Radius of the kT reclustering: large enough that the beam distance never wins.
KT_RADIUS = 1000.0

JET_OBSERVABLES = (
    "jet_pt", "jet_eta", "jet_phi", "jet_mass", "jet_nparticles",
    "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau21", "jet_tau32",
)
PARTICLE_OBSERVABLES = ("part_ptrel", "part_etarel", "part_phirel")

#: Axis labels for plots (with units).
LABELS = {
    "jet_pt": r"Jet $p_\mathrm{T}$ [GeV]",
    "jet_eta": r"Jet $\eta$",
    "jet_phi": r"Jet $\phi$ [rad]",
    "jet_mass": r"Jet mass [GeV]",
    "jet_nparticles": "Number of particles",
    "jet_tau1": r"$\tau_1$",
    "jet_tau2": r"$\tau_2$",
    "jet_tau3": r"$\tau_3$",
    "jet_tau21": r"$\tau_{21} = \tau_2/\tau_1$",
    "jet_tau32": r"$\tau_{32} = \tau_3/\tau_2$",
    "part_ptrel": r"Particle $p_\mathrm{T}^\mathrm{rel} = p_\mathrm{T}/p_\mathrm{T}^\mathrm{jet}$",
    "part_etarel": r"Particle $\eta^\mathrm{rel}$",
    "part_phirel": r"Particle $\phi^\mathrm{rel}$ [rad]",
}


def four_momenta(jets) -> tuple[np.ndarray, np.ndarray]:
    """(p4 (T, 4) float64 px, py, pz, E; offsets (B + 1,) int64) from JetArrays or a (p4, offsets) pair."""
    if isinstance(jets, JetArrays):
        p4, offsets = jets.part[:, : len(KINEMATIC_FEATURES)], jets.offsets
    else:
        p4, offsets = jets
    p4 = np.asarray(p4, np.float64)
    offsets = np.asarray(offsets, np.int64)
    if p4.ndim != 2 or p4.shape[1] < 4:
        raise ValueError(f"four-momenta must be (T, >=4) with px, py, pz, E first; got shape {p4.shape}")
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(p4):
        raise ValueError(f"offsets must be 1-D, start at 0 and end at T={len(p4)}; got {offsets[:3]}...{offsets[-1:]}")
    return p4[:, :4], offsets


def particle_observables(jets) -> dict[str, np.ndarray]:
    """part_ptrel, part_etarel, part_phirel (T,) relative to the summed-constituent jet axis."""
    p4, offsets = four_momenta(jets)
    values = particle_features(p4, offsets, KINEMATIC_FEATURES, PARTICLE_OBSERVABLES)
    return {name: values[:, j].astype(np.float64) for j, name in enumerate(PARTICLE_OBSERVABLES)}


def jet_observables(jets) -> dict[str, np.ndarray]:
    """Jet kinematics of the summed constituents plus N-subjettiness (B,) — see module docstring."""
    p4, offsets = four_momenta(jets)
    summed = jets_from_constituents(p4, offsets)
    out = {name: summed[name] for name in ("jet_pt", "jet_eta", "jet_phi", "jet_mass", "jet_nparticles")}
    tau = nsubjettiness(p4, offsets, n_max=3)
    for n in (1, 2, 3):
        out[f"jet_tau{n}"] = tau[:, n - 1]
    out["jet_tau21"] = safe_ratio(tau[:, 1], tau[:, 0])
    out["jet_tau32"] = safe_ratio(tau[:, 2], tau[:, 1])
    return out


def collect_observables(chunks: Iterable, max_jets: int | None = None) -> tuple[dict, dict]:
    """Jet and particle observables over an iterable of JetArrays (e.g. reader.iterate_jets)."""
    jet_parts, part_parts, seen = [], [], 0
    for chunk in chunks:
        if max_jets is not None and seen + len(chunk) > max_jets:
            chunk = chunk.select(np.arange(max_jets - seen))
        jet_parts.append(jet_observables(chunk))
        part_parts.append(particle_observables(chunk))
        seen += len(chunk)
        if max_jets is not None and seen >= max_jets:
            break
    if not jet_parts:
        raise ValueError("collect_observables: no jets in the input")
    merge = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    return merge(jet_parts), merge(part_parts)


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, defined as 0 where the denominator is 0."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


# ------------------------------------------------------------------------- N-subjettiness
def rapidity_phi(p4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rapidity and azimuth of (..., 4) four-vectors, stable for massless and pT = 0 vectors.

    y = sign(pz) * log((E + |pz|) / mT) with mT^2 = max(E^2 - pz^2, pT^2): float rounding that
    makes a massless particle slightly tachyonic is read as massless, and pT = 0 gives a large
    finite rapidity instead of inf.
    """
    px, py, pz, e = (p4[..., i] for i in range(4))
    pt2 = px * px + py * py
    mt2 = np.maximum(np.maximum(e * e - pz * pz, pt2), 1e-300)
    e_eff = np.maximum(e, np.abs(pz))
    # the ratio is >= 1 for physical vectors; the clip only tames all-zero padding rows
    rap = np.sign(pz) * 0.5 * np.log(np.maximum((e_eff + np.abs(pz)) ** 2 / mt2, 1.0))
    return rap, np.arctan2(py, px)


def nsubjettiness(p4: np.ndarray, offsets: np.ndarray, n_max: int = 3, *, r0: float = R0) -> np.ndarray:
    """tau_1..tau_{n_max} (B, n_max) with exclusive-kT axes and beta = 1 (module docstring)."""
    p4 = np.asarray(p4, np.float64)[:, :4]
    offsets = np.asarray(offsets, np.int64)
    counts = np.diff(offsets)
    n_jets = len(counts)
    tau = np.zeros((n_jets, n_max))
    if n_jets == 0 or len(p4) == 0:
        return tau
    axes = exclusive_kt_axes(p4, offsets, range(1, n_max + 1))

    pt = np.hypot(p4[:, 0], p4[:, 1])
    rap, phi = rapidity_phi(p4)
    jet_of = np.repeat(np.arange(n_jets), counts)
    d0 = r0 * np.bincount(jet_of, weights=pt, minlength=n_jets)
    for n in range(1, n_max + 1):
        has = counts > n  # jets with <= n particles keep tau_n = 0
        axes_BN4 = axes[n]
        ax_rap, ax_phi = rapidity_phi(axes_BN4)  # (B, n)
        sel = has[jet_of]
        jb = jet_of[sel]
        dr_TN = np.hypot(rap[sel, None] - ax_rap[jb], wrap_phi(phi[sel, None] - ax_phi[jb]))
        numerator = np.bincount(jb, weights=pt[sel] * dr_TN.min(axis=1), minlength=n_jets)
        tau[:, n - 1] = safe_ratio(numerator, d0) * has
    return tau


def _padded(p4, offsets, jets, p_pad):
    counts = offsets[jets + 1] - offsets[jets]
    mom = np.zeros((len(jets), p_pad, 4))
    alive = np.arange(p_pad)[None, :] < counts[:, None]
    rows = np.repeat(offsets[jets], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    mom[alive] = p4[rows]
    return mom, alive


def exclusive_kt_axes(p4: np.ndarray, offsets: np.ndarray, ns: Iterable[int]) -> dict[int, np.ndarray]:
    """Exclusive-kT axes {N: (B, N, 4)} from FastJet's multi-event (awkward) interface.

    One clustering of the jets with more than max(ns) particles serves every N. FastJet raises
    when asked for more exclusive jets than particles, so the few jets with N < n <= max(ns)
    particles are clustered apart, and the rows of jets with <= N particles are their particles,
    zero padded.
    """
    import warnings

    import awkward as ak
    import fastjet

    try:  # FastJet's banner (a citation request) would land in the middle of evaluation reports
        import fastjet._swig

        fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)
    except (ImportError, AttributeError):
        pass
    ns = sorted(set(int(n) for n in ns))
    if ns[0] < 1:
        raise ValueError(f"numbers of axes must be >= 1, got {ns}")
    counts = np.diff(offsets)
    n_jets = len(counts)
    definition = fastjet.JetDefinition(fastjet.kt_algorithm, KT_RADIUS, fastjet.E_scheme)

    def cluster(jets):
        mom, alive = _padded(p4, offsets, jets, max(int(counts[jets].max()), 1))
        flat = mom[alive]
        fields = {"px": flat[:, 0], "py": flat[:, 1], "pz": flat[:, 2], "E": flat[:, 3]}
        return fastjet.ClusterSequence(ak.unflatten(ak.zip(fields), counts[jets]), definition)

    def axes_of(sequence, n, n_events):
        jets = sequence.exclusive_jets(n_jets=n)
        xyzt = np.stack([ak.to_numpy(ak.flatten(jets[c])) for c in ("px", "py", "pz", "E")], axis=-1)
        return xyzt.reshape(n_events, n, 4)

    out = {}
    main = np.flatnonzero(counts > ns[-1])
    with warnings.catch_warnings():
        # fastjet's python layer warns about exclusive jets for every algorithm, kT included
        warnings.simplefilter("ignore", UserWarning)
        main_sequence = cluster(main) if len(main) else None
        for n in ns:
            out[n] = np.zeros((n_jets, n, 4))
            small = np.flatnonzero(counts <= n)
            out[n][small] = _padded(p4, offsets, small, n)[0]
            if main_sequence is not None:
                out[n][main] = axes_of(main_sequence, n, len(main))
            extra = np.flatnonzero((counts > n) & (counts <= ns[-1]))
            if len(extra):
                out[n][extra] = axes_of(cluster(extra), n, len(extra))
    return out
