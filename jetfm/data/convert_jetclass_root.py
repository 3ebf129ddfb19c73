"""The JetClass ROOT reader of `jetfm data convert jetclass`: `JetClassFile` (uproot, in steps).

Per jet it stores the particle branches part_px part_py part_pz part_energy [+ PID branches]
[+ d0/dz branches]; jet_pt jet_eta jet_phi jet_energy (branches), jet_mass (from that
four-vector: JetClass has no jet_mass branch), jet_nparticles [+ jet_sdmass jet_tau1..4]; and the
one-hot label_* branches as an index into JETCLASS_CLASSES. One file format per module; the
conversion loop that drives it lives in `convert.py`.
"""

from __future__ import annotations

import numpy as np

from .convert_input import Block, _offsets, sort_and_truncate
from .format import (
    JET_FEATURES,
    JETCLASS_CLASSES,
    KINEMATIC_FEATURES,
    PID_FEATURES,
    DataError,
    JetArrays,
)

#: Optional JetClass impact-parameter branches, stored after the PID features when present.
IMPACT_FEATURES = ("part_d0val", "part_d0err", "part_dzval", "part_dzerr")
#: JetClass jet branches read into JET_FEATURES (jet_mass is computed, not read).
JETCLASS_JET_BRANCHES = ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_nparticles")
#: Optional JetClass jet branches appended after JET_FEATURES when present.
JETCLASS_EXTRA_JET = ("jet_sdmass", "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4")


def _jagged(array) -> tuple[np.ndarray, np.ndarray]:
    """(values (T,), counts (B,) int64) of a jagged awkward array, without copying when possible."""
    import awkward as ak

    layout = ak.to_layout(array)
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(layout.content, ak.contents.NumpyArray):
        offsets = np.asarray(layout.offsets.data)
        return np.asarray(layout.content.data)[offsets[0] : offsets[-1]], np.diff(offsets).astype(np.int64)
    return ak.to_numpy(ak.flatten(array, axis=1)), np.asarray(ak.num(array, axis=1), np.int64)


def _jet_nonfinite(part: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) True where any particle of the jet has a non-finite feature."""
    bad_rows = ~np.isfinite(part).all(axis=1)
    out = np.zeros(len(counts), bool)
    if bad_rows.any():
        out[np.repeat(np.arange(len(counts)), counts)[bad_rows]] = True
    return out


# ----------------------------------------------------------------------------- JetClass
class JetClassFile:
    """One JetClass ROOT file (TTree `tree`), read in steps with uproot."""

    kind = "jetclass"

    def __init__(self, path: str, tree: str = "tree"):
        import uproot

        self.path = path
        try:
            self._file = uproot.open(path)
        except Exception as error:  # uproot raises many types for non-ROOT input
            raise DataError(f"{path}: not a readable ROOT file ({type(error).__name__}: {error})") from error
        try:
            self.tree = self._file[tree]
        except Exception as error:
            keys = sorted({k.split(";")[0] for k in self._file.keys()})
            raise DataError(
                f"{path}: no TTree {tree!r} (found {keys}); expected the JetClass layout with TTree 'tree'"
            ) from error
        if not hasattr(self.tree, "iterate"):
            raise DataError(f"{path}: {tree!r} is a {type(self.tree).__name__}, expected a TTree")
        self.branches = set(self.tree.keys())
        self.n_entries = int(self.tree.num_entries)

    def schema(self) -> tuple[list[str], list[str]]:
        """Particle and jet feature names this file can provide (required ones are checked)."""
        required = list(KINEMATIC_FEATURES) + list(JETCLASS_JET_BRANCHES) + [f"label_{c}" for c in JETCLASS_CLASSES]
        missing = [name for name in required if name not in self.branches]
        if missing:
            raise DataError(
                f"{self.path}: missing branches {missing}; expected a JetClass TTree with particle branches "
                f"{list(KINEMATIC_FEATURES)}, jet branches {list(JETCLASS_JET_BRANCHES)} and one-hot "
                f"label branches {[f'label_{c}' for c in JETCLASS_CLASSES]}"
            )
        particle = list(KINEMATIC_FEATURES)
        particle += [n for n in PID_FEATURES + IMPACT_FEATURES if n in self.branches]
        jet = list(JET_FEATURES) + [n for n in JETCLASS_EXTRA_JET if n in self.branches]
        flat = list(JETCLASS_JET_BRANCHES) + jet[len(JET_FEATURES):] + [f"label_{c}" for c in JETCLASS_CLASSES]
        wrong = [f"{n} ({self._typename(n)})" for n in particle if not self._is(n, jagged=True)]
        wrong += [f"{n} ({self._typename(n)})" for n in flat if not self._is(n, jagged=False)]
        if wrong:
            raise DataError(
                f"{self.path}: branches of the wrong shape: {wrong}; expected part_* as one variable-length "
                f"number array per jet (float[] or vector<float>) and jet_*/label_* as one number per jet"
            )
        return particle, jet

    def _is(self, name: str, jagged: bool) -> bool:
        import uproot

        try:
            interpretation = self.tree[name].interpretation
        except Exception:  # uproot cannot interpret the branch at all
            return False
        if jagged:
            return isinstance(interpretation, uproot.AsJagged) and isinstance(interpretation.content, uproot.AsDtype)
        return isinstance(interpretation, uproot.AsDtype) and interpretation.inner_shape == ()

    def _typename(self, name: str) -> str:
        try:
            return str(self.tree[name].typename)
        except Exception:
            return "unknown type"

    def configure(self, particle_features: list[str], jet_features: list[str], max_particles: int) -> None:
        self.particle_features = particle_features
        self.jet_extra = [n for n in jet_features if n not in JET_FEATURES]
        self.max_particles = max_particles
        self.read_branches = (
            particle_features
            + list(JETCLASS_JET_BRANCHES)
            + self.jet_extra
            + [f"label_{c}" for c in JETCLASS_CLASSES]
        )

    def blocks(self, step: int):
        start = 0
        try:
            for arrays in self.tree.iterate(self.read_branches, step_size=step, library="ak"):
                block = self._block(arrays, start)
                start += len(block.jets)
                yield block
        except DataError:
            raise
        except Exception as error:  # decompression/interpretation failures inside uproot
            raise DataError(
                f"{self.path}: failed reading entries from {start} ({type(error).__name__}: {error})"
            ) from error

    def _block(self, arrays, start: int) -> Block:
        import awkward as ak

        n = len(arrays)
        names = self.particle_features
        flat = [_jagged(arrays[name]) for name in names]  # (values, counts) per branch
        counts = flat[0][1]
        shape_bad = np.zeros(n, bool)
        for _, other in flat[1:]:
            shape_bad |= other != counts
        if shape_bad.any():  # give those jets no particles so the rest stay aligned
            flat = [_jagged(arrays[name][~shape_bad]) for name in names]
            counts = np.zeros(n, np.int64)
            counts[~shape_bad] = flat[0][1]
        part = np.empty((int(counts.sum()), len(names)), np.float32)
        for j, (values, _) in enumerate(flat):
            part[:, j] = values

        def jet_branch(name):
            return np.asarray(ak.to_numpy(arrays[name]), np.float64)

        pt, eta, phi, energy, nparticles = (jet_branch(name) for name in JETCLASS_JET_BRANCHES)
        with np.errstate(invalid="ignore", over="ignore"):
            p = pt * np.cosh(eta)
            mass = np.sqrt(np.clip(energy * energy - p * p, 0.0, None))
        jet = np.stack([pt, eta, phi, energy, mass, nparticles] + [jet_branch(n) for n in self.jet_extra], axis=1)

        onehot = np.stack([jet_branch(f"label_{c}") for c in JETCLASS_CLASSES], axis=1)
        label_bad = ~(np.isin(onehot, (0.0, 1.0)).all(axis=1) & (onehot.sum(axis=1) == 1.0))
        label = np.argmax(onehot, axis=1).astype(np.int64)

        nonfinite = _jet_nonfinite(part, counts) | ~np.isfinite(jet).all(axis=1)
        raw_counts = counts
        part, counts = sort_and_truncate(part, counts, self.max_particles)
        jets = JetArrays(part=part, offsets=_offsets(counts), jet=jet.astype(np.float32), label=label)
        bad = {
            "shape": shape_bad,
            "nonfinite": nonfinite,
            "empty": (raw_counts == 0) & ~shape_bad,
            "label": label_bad,
            "nparticles": (nparticles != raw_counts) & ~shape_bad,
        }

        def explain_shape(i):
            lengths = {name: int(ak.num(arrays[name][i : i + 1], axis=1)[0]) for name in names}
            return f"particle branch lengths {lengths}"

        def explain_label(i):
            row = {f"label_{c}": float(v) for c, v in zip(JETCLASS_CLASSES, onehot[i]) if v != 0}
            return f"nonzero label branches {row or 'none'}; the label_* must be one-hot: one of them 1, the others 0"

        def explain_nparticles(i):
            return f"jet_nparticles = {nparticles[i]:g} but the particle branches hold {raw_counts[i]}"

        details = {"shape": explain_shape, "label": explain_label, "nparticles": explain_nparticles}
        return Block(start, jets, bad, details)

    def close(self) -> None:
        self._file.close()
