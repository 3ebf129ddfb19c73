"""Four-vector helpers shared by the generator, the converters, the reader and the metrics.

All functions are vectorised numpy over particles; energies and momenta in GeV.
Angles follow the collider convention: eta = pseudorapidity, phi in (-pi, pi].
"""

from __future__ import annotations

import numpy as np


def wrap_phi(phi: np.ndarray) -> np.ndarray:
    """Wrap angles into (-pi, pi]."""
    wrapped = np.remainder(phi + np.pi, 2 * np.pi) - np.pi
    # remainder maps +pi to -pi; the convention is (-pi, pi]
    return np.where(wrapped <= -np.pi, wrapped + 2 * np.pi, wrapped)


def pt_eta_phi(px: np.ndarray, py: np.ndarray, pz: np.ndarray):
    """Transverse momentum, pseudorapidity and azimuth of massless-or-not vectors.

    A vector along the beam (pt = 0) gets eta = +-inf-safe large value instead of NaN.
    """
    pt = np.hypot(px, py)
    # arcsinh(pz/pt) is the stable form of -log(tan(theta/2))
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(np.where(pt > 0, pz / np.where(pt > 0, pt, 1.0), 0.0))
    eta = np.where(pt > 0, eta, np.sign(pz) * 1e3)
    phi = np.arctan2(py, px)
    return pt, eta, phi


def invariant_mass(e: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
    """Mass from a four-vector; tiny negative m^2 from rounding is clipped to 0."""
    m2 = e * e - px * px - py * py - pz * pz
    return np.sqrt(np.clip(m2, 0.0, None))


def segment_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum a concatenated per-particle array per jet. offsets has length n_jets + 1."""
    n_jets = len(offsets) - 1
    counts = np.diff(offsets)
    out = np.zeros((n_jets,) + values.shape[1:], dtype=np.float64)
    if len(values):
        jet_index = np.repeat(np.arange(n_jets), counts)
        np.add.at(out, jet_index, values)
    return out


def jets_from_constituents(p4: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Jet four-vectors as the sum of constituents (the jet axis of docs/METHOD.md §1).

    p4: (T, 4) columns (px, py, pz, E); offsets: (B + 1,). Returns per-jet arrays of length B.
    """
    total = segment_sum(p4.astype(np.float64), offsets)
    px, py, pz, e = total.T
    pt, eta, phi = pt_eta_phi(px, py, pz)
    return {
        "jet_pt": pt,
        "jet_eta": eta,
        "jet_phi": phi,
        "jet_energy": e,
        "jet_mass": invariant_mass(e, px, py, pz),
        "jet_nparticles": np.diff(offsets).astype(np.float64),
    }


def delta_r(eta1, phi1, eta2, phi2):
    return np.hypot(eta1 - eta2, wrap_phi(phi1 - phi2))
