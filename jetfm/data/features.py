"""Particle features derived from stored four-momenta, and the named invertible preprocessing.

Shards store raw physics (px, py, pz, E); models see preprocessed features (docs/METHOD.md §1):

    part_pt     -> (signed_log(pt) - 1.8) * 1
    part_etarel -> eta_part - eta_jet, * 3
    part_phirel -> wrap(phi_part - phi_jet), * 3

The jet axis is the summed four-vector of the stored constituents, so a model's output
(pt, etarel, phirel) plus the jet axis inverts to physical four-momenta (massless particles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .physics import pt_eta_phi, wrap_phi

#: Features computable from (px, py, pz, E) and the jet axis.
DERIVED_FEATURES = (
    "part_pt", "part_eta", "part_phi", "part_etarel", "part_phirel", "part_ptrel",
    "part_erel", "part_deltaR", "part_mass",
)


def jet_axis(part_p4: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Summed constituent four-vector per jet: pt, eta, phi, energy (B,)."""
    n_jets = len(offsets) - 1
    if len(part_p4) == 0:
        zeros = np.zeros(n_jets)
        return {"pt": zeros, "eta": zeros, "phi": zeros, "energy": zeros}
    counts = np.diff(offsets)
    sums = np.zeros((n_jets, 4))
    nonempty = counts > 0
    # reduceat needs strictly valid start indices; empty jets keep zeros
    sums[nonempty] = np.add.reduceat(part_p4.astype(np.float64), offsets[:-1][nonempty], axis=0)
    pt, eta, phi = pt_eta_phi(sums[:, 0], sums[:, 1], sums[:, 2])
    return {"pt": pt, "eta": eta, "phi": phi, "energy": sums[:, 3]}


def particle_features(
    part: np.ndarray,
    offsets: np.ndarray,
    stored_names: list[str] | tuple[str, ...],
    wanted: list[str] | tuple[str, ...],
) -> np.ndarray:
    """Compute `wanted` features (T, len(wanted)) float32 from raw stored particles (T, P)."""
    index = {name: i for i, name in enumerate(stored_names)}
    out = np.empty((len(part), len(wanted)), np.float32)
    need_derived = any(name not in index for name in wanted)
    if need_derived:
        p4 = part[:, [index["part_px"], index["part_py"], index["part_pz"], index["part_energy"]]]
        axis = jet_axis(p4, offsets)
        counts = np.diff(offsets)
        pt, eta, phi = pt_eta_phi(p4[:, 0].astype(np.float64), p4[:, 1].astype(np.float64), p4[:, 2].astype(np.float64))
        jet_eta = np.repeat(axis["eta"], counts)
        jet_phi = np.repeat(axis["phi"], counts)
        derived = {
            "part_pt": lambda: pt,
            "part_eta": lambda: eta,
            "part_phi": lambda: phi,
            "part_etarel": lambda: eta - jet_eta,
            "part_phirel": lambda: wrap_phi(phi - jet_phi),
            "part_ptrel": lambda: pt / np.repeat(np.maximum(axis["pt"], 1e-12), counts),
            "part_erel": lambda: p4[:, 3] / np.repeat(np.maximum(axis["energy"], 1e-12), counts),
            "part_deltaR": lambda: np.hypot(eta - jet_eta, wrap_phi(phi - jet_phi)),
            "part_mass": lambda: np.sqrt(np.clip(p4[:, 3].astype(np.float64) ** 2 - (pt**2 + p4[:, 2].astype(np.float64) ** 2), 0, None)),
        }
    for j, name in enumerate(wanted):
        if name in index:
            out[:, j] = part[:, index[name]]
        elif name in DERIVED_FEATURES:
            out[:, j] = derived[name]()
        else:
            raise KeyError(
                f"particle feature {name!r} is neither stored ({list(stored_names)}) "
                f"nor derivable ({list(DERIVED_FEATURES)})"
            )
    return out


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def signed_log(x):
    """sign(x)·log1p(|x|), for numpy arrays and torch tensors alike."""
    xp = _array_module(x)
    return xp.sign(x) * xp.log1p(xp.abs(x))


def signed_exp(y):
    """The inverse of signed_log: sign(y)·expm1(|y|)."""
    xp = _array_module(y)
    return xp.sign(y) * xp.expm1(xp.abs(y))


def _array_module(x):
    if _is_torch(x):
        import torch

        return torch
    return np


def _log(x):
    return np.log(np.maximum(x, 1e-30)) if not _is_torch(x) else _array_module(x).log(x.clamp(min=1e-30))


def _exp(y):
    return _array_module(y).exp(y)


_FUNCTIONS = {
    "none": (lambda x: x, lambda y: y),
    "log": (_log, _exp),
    "signed_log": (signed_log, signed_exp),
}


@dataclass
class FeatureTransform:
    """y = (f(x) - subtract) * multiply, f in {none, log, signed_log}. Invertible by design.

    forward/inverse take numpy arrays or torch tensors (the loader runs them in numpy, generation
    in torch on the model's device): one implementation for both."""

    function: str = "none"
    """Elementwise function applied first: none, log or signed_log (sign(x)·log1p(|x|))."""
    subtract: float = 0.0
    """Constant subtracted after the function."""
    multiply: float = 1.0
    """Scale applied last; must be non-zero so the transform inverts."""

    def __post_init__(self):
        if self.function not in _FUNCTIONS:
            raise ValueError(f"transform function {self.function!r} unknown; expected one of {list(_FUNCTIONS)}")
        if self.multiply == 0:
            raise ValueError("transform multiply must be non-zero (the transform has to invert)")

    def forward(self, x):
        return (_FUNCTIONS[self.function][0](x) - self.subtract) * self.multiply

    def inverse(self, y):
        return _FUNCTIONS[self.function][1](y / self.multiply + self.subtract)

    def same_as(self, other: "FeatureTransform") -> bool:
        """The one definition of transform equality: same function, constants equal to float precision."""
        return self.function == other.function and all(
            math.isclose(float(getattr(self, k)), float(getattr(other, k)), rel_tol=1e-9, abs_tol=1e-12)
            for k in ("subtract", "multiply"))


def feature_spec(features) -> dict[str, dict]:
    """Normalise a feature description (config dict, {name: FeatureTransform}, Preprocessing or None
    = the reference features) to {name: {"function", "subtract", "multiply"}} with plain floats,
    validating every entry."""
    if features is None:
        features = reference_features()
    if isinstance(features, Preprocessing):
        features = features.features
    out = {}
    for name, transform in dict(features).items():
        if not isinstance(transform, FeatureTransform):
            transform = FeatureTransform(**dict(transform or {}))
        out[name] = {"function": transform.function, "subtract": float(transform.subtract),
                     "multiply": float(transform.multiply)}
    return out


def same_features(a, b) -> bool:
    """Whether two feature descriptions (anything feature_spec takes) name the same features, in
    the same order, with the same transforms."""
    a, b = feature_spec(a), feature_spec(b)
    return list(a) == list(b) and all(FeatureTransform(**a[n]).same_as(FeatureTransform(**b[n])) for n in a)


def reference_features() -> dict[str, FeatureTransform]:
    """The reference kinematic inputs of docs/METHOD.md §1."""
    return {
        "part_pt": FeatureTransform("signed_log", 1.8, 1.0),
        "part_etarel": FeatureTransform("none", 0.0, 3.0),
        "part_phirel": FeatureTransform("none", 0.0, 3.0),
    }


@dataclass
class Preprocessing:
    """Named per-feature transforms, in model input order."""

    features: dict[str, FeatureTransform] = field(default_factory=reference_features)

    @classmethod
    def from_config(cls, spec: dict) -> "Preprocessing":
        """spec: {name: {function, subtract, multiply}} as written in a YAML config."""
        features = {}
        for name, entry in spec.items():
            entry = dict(entry or {})
            unknown = set(entry) - {"function", "subtract", "multiply"}
            if unknown:
                raise ValueError(
                    f"data.features.{name}: unknown keys {sorted(unknown)}; expected function, subtract, multiply"
                )
            features[name] = FeatureTransform(**entry)
        return cls(features)

    @property
    def names(self) -> list[str]:
        return list(self.features)

    def forward(self, raw: np.ndarray) -> np.ndarray:
        """raw (T, F) physical features in `names` order -> model features (T, F) float32."""
        out = np.empty_like(raw, dtype=np.float32)
        for j, transform in enumerate(self.features.values()):
            out[:, j] = transform.forward(raw[:, j])
        return out

    def inverse(self, model: np.ndarray) -> np.ndarray:
        out = np.empty(model.shape, dtype=np.float64)
        for j, transform in enumerate(self.features.values()):
            out[..., j] = transform.inverse(np.asarray(model[..., j], np.float64))
        return out


def four_momenta_from_relative(
    pt: np.ndarray, etarel: np.ndarray, phirel: np.ndarray, jet_eta: np.ndarray, jet_phi: np.ndarray
) -> np.ndarray:
    """Massless (px, py, pz, E) (T, 4) from (pt, eta_rel, phi_rel) and a per-particle jet axis."""
    eta = etarel + jet_eta
    phi = wrap_phi(phirel + jet_phi)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    return np.stack([px, py, pz, pt * np.cosh(eta)], axis=-1)
