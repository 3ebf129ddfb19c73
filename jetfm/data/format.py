"""The jet chunk: the unit stored in one WebDataset tar entry, and its validation.

A chunk holds ~1,000 jets as ragged particles (docs/DATA.md):

    part.npy     float32 (T, P)   raw particle features, jets concatenated, pT-descending
    offsets.npy  int64   (B + 1,) jet b owns particles offsets[b]:offsets[b+1]; offsets[0] = 0
    jet.npy      float32 (B, J)   raw jet features
    label.npy    int64   (B,)     class index into manifest["classes"]
    tokens.npy   int32   (T,)     optional: token id (code + 1) of every particle
    reco.npy     float32 (T, R)   optional: tokenizer-reconstructed particle features

Legend: B jets, T particles in the chunk, P/J/R feature counts named in the manifest.
Entries are plain .npy read with allow_pickle=False: reading a shard never runs code.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1

#: Particle features every shard stores first, in this order (GeV).
KINEMATIC_FEATURES = ("part_px", "part_py", "part_pz", "part_energy")
#: Optional per-particle identification features (JetClass names).
PID_FEATURES = (
    "part_charge",
    "part_isChargedHadron",
    "part_isNeutralHadron",
    "part_isPhoton",
    "part_isElectron",
    "part_isMuon",
)
#: Jet features every shard stores first, in this order.
JET_FEATURES = ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_mass", "jet_nparticles")

#: JetClass class names in the JetClass label order (ROOT branch label_X -> class X); the
#: converter and the generator's `jetclass` preset both label with it.
JETCLASS_CLASSES = ("QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl")
#: Top-tagging classes: background QCD, signal top (is_signal_new = 0 / 1), named as in JetClass.
TOPTAG_CLASSES = ("QCD", "Tbqq")

UNITS = {
    "part_px": "GeV", "part_py": "GeV", "part_pz": "GeV", "part_energy": "GeV",
    "jet_pt": "GeV", "jet_energy": "GeV", "jet_mass": "GeV", "jet_sdmass": "GeV",
    "jet_eta": "", "jet_phi": "rad", "part_charge": "e",
}

ENTRY_NAMES = ("part", "offsets", "jet", "label", "tokens", "reco")


class DataError(ValueError):
    """Bad input data: the message names the file (or chunk) and what was expected."""


@dataclass
class JetArrays:
    """A batch of ragged jets in the chunk layout (see module docstring for shapes)."""

    part: np.ndarray
    offsets: np.ndarray
    jet: np.ndarray
    label: np.ndarray
    tokens: np.ndarray | None = None
    reco: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_particles(self) -> int:
        return int(self.offsets[-1])

    @property
    def multiplicity(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def empty(cls, n_part_features: int, n_jet_features: int) -> "JetArrays":
        return cls(
            part=np.zeros((0, n_part_features), np.float32),
            offsets=np.zeros(1, np.int64),
            jet=np.zeros((0, n_jet_features), np.float32),
            label=np.zeros(0, np.int64),
        )

    def particle_index(self, jet_indices: np.ndarray) -> np.ndarray:
        """Particle rows of the given jets, in the given jet order."""
        starts = self.offsets[jet_indices]
        counts = self.offsets[jet_indices + 1] - starts
        if counts.sum() == 0:
            return np.zeros(0, np.int64)
        # ramp within each jet + start of that jet
        base = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return base + np.arange(counts.sum())

    def select(self, jet_indices: np.ndarray) -> "JetArrays":
        """Jets in the given order (a permutation, a subset, or repeats)."""
        jet_indices = np.asarray(jet_indices, dtype=np.int64)
        rows = self.particle_index(jet_indices)
        counts = self.offsets[jet_indices + 1] - self.offsets[jet_indices]
        return JetArrays(
            part=self.part[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            jet=self.jet[jet_indices],
            label=self.label[jet_indices],
            tokens=None if self.tokens is None else self.tokens[rows],
            reco=None if self.reco is None else self.reco[rows],
        )

    @staticmethod
    def concat(parts: list["JetArrays"]) -> "JetArrays":
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0] + [p.n_particles for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])

        def cat(name):
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                return None
            return np.concatenate(values)

        return JetArrays(
            part=np.concatenate([p.part for p in parts]),
            offsets=offsets.astype(np.int64),
            jet=np.concatenate([p.jet for p in parts]),
            label=np.concatenate([p.label for p in parts]),
            tokens=cat("tokens"),
            reco=cat("reco"),
        )

    # ---------------------------------------------------------------- validation
    def check(self, where: str, n_part_features: int, n_jet_features: int, n_classes: int) -> None:
        """Raise DataError naming `where` if the arrays break the chunk contract."""
        if self.part.ndim != 2 or self.part.shape[1] != n_part_features:
            raise DataError(f"{where}: part has shape {self.part.shape}, expected (T, {n_part_features})")
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise DataError(f"{where}: offsets must be 1-D and start at 0, got shape {self.offsets.shape}")
        if np.any(np.diff(self.offsets) < 0):
            raise DataError(f"{where}: offsets are not non-decreasing")
        if self.offsets[-1] != len(self.part):
            raise DataError(f"{where}: offsets end at {self.offsets[-1]} but part has {len(self.part)} rows")
        n = len(self)
        if self.jet.shape != (n, n_jet_features):
            raise DataError(f"{where}: jet has shape {self.jet.shape}, expected ({n}, {n_jet_features})")
        if self.label.shape != (n,):
            raise DataError(f"{where}: label has shape {self.label.shape}, expected ({n},)")
        if n and (self.label.min() < 0 or self.label.max() >= n_classes):
            raise DataError(f"{where}: labels outside [0, {n_classes}): min {self.label.min()}, max {self.label.max()}")
        for name in ("tokens", "reco"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.part):
                raise DataError(f"{where}: {name} has {len(value)} rows but part has {len(self.part)}")
        if not np.isfinite(self.part).all():
            raise DataError(f"{where}: part contains NaN or inf")
        if not np.isfinite(self.jet).all():
            raise DataError(f"{where}: jet contains NaN or inf")
        if self.reco is not None and not np.isfinite(self.reco).all():
            raise DataError(f"{where}: reco contains NaN or inf (expected the tokenizer's finite reconstruction); "
                            "the entry is corrupt — rerun `jetfm data tokenize --with-reco`")
        if n and self.multiplicity.min() == 0:
            raise DataError(f"{where}: jet {int(np.argmin(self.multiplicity))} has no particles")

    def bad_jet_reasons(self) -> dict[str, np.ndarray]:
        """Boolean masks (B,) of jets that break the contract, by reason."""
        mult = self.multiplicity
        jet_index = np.repeat(np.arange(len(self)), mult)
        bad_part = ~np.isfinite(self.part).all(axis=1)
        nonfinite = np.zeros(len(self), bool)
        nonfinite[jet_index[bad_part]] = True
        nonfinite |= ~np.isfinite(self.jet).all(axis=1)
        return {"empty": mult == 0, "nonfinite": nonfinite}

    def drop_bad(self) -> tuple["JetArrays", dict[str, int]]:
        """Remove empty and non-finite jets; return the clean jets and counts by reason."""
        reasons = self.bad_jet_reasons()
        bad = np.zeros(len(self), bool)
        counts = {}
        for name, mask in reasons.items():
            counts[name] = int((mask & ~bad).sum())
            bad |= mask
        if not bad.any():
            return self, {k: 0 for k in counts}
        return self.select(np.flatnonzero(~bad)), counts


# -------------------------------------------------------------------- (de)serialisation
def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_chunk(jets: JetArrays) -> dict[str, bytes]:
    """The tar entries of one chunk (without the WebDataset key)."""
    entries = {
        "part.npy": _npy_bytes(jets.part.astype(np.float32, copy=False)),
        "offsets.npy": _npy_bytes(jets.offsets.astype(np.int64, copy=False)),
        "jet.npy": _npy_bytes(jets.jet.astype(np.float32, copy=False)),
        "label.npy": _npy_bytes(jets.label.astype(np.int64, copy=False)),
    }
    if jets.tokens is not None:
        entries["tokens.npy"] = _npy_bytes(jets.tokens.astype(np.int32, copy=False))
    if jets.reco is not None:
        entries["reco.npy"] = _npy_bytes(jets.reco.astype(np.float32, copy=False))
    return entries


NPY_MAGIC = b"\x93NUMPY"


def load_npy(data: bytes, where: str) -> np.ndarray:
    # np.load calls anything without the .npy magic "pickled data": say what it is instead
    if not data.startswith(NPY_MAGIC):
        head = data[:8]
        raise DataError(f"{where}: not a .npy array (starts with {head!r}, expected the .npy magic "
                        f"{NPY_MAGIC!r}); the entry is corrupt or was not written by jetfm")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:  # pickled object arrays and malformed headers land here
        raise DataError(f"{where}: not a plain .npy array ({error})") from error
    except Exception as error:  # truncated payloads raise EOFError/OSError etc.
        raise DataError(f"{where}: unreadable .npy entry ({type(error).__name__}: {error})") from error


REQUIRED_ENTRIES = ("part", "offsets", "jet", "label")


def decode_chunk(entries: dict[str, bytes], where: str) -> JetArrays:
    """Inverse of encode_chunk. `entries` maps 'part.npy'... to bytes."""
    missing = [name for name in REQUIRED_ENTRIES if f"{name}.npy" not in entries]
    if missing:
        raise DataError(f"{where}: chunk lacks entries {missing}; expected part/offsets/jet/label .npy")
    unknown = [name for name in entries if not name.endswith(".npy")]
    if unknown:
        raise DataError(f"{where}: entries {unknown} are not .npy (pickle and other decoders are refused)")
    arrays = {name[:-4]: load_npy(data, f"{where}/{name}") for name, data in entries.items()}
    return JetArrays(**{name: arrays.get(name) for name in ENTRY_NAMES})


# --------------------------------------------------------------------------- chunks inside a tar
# A shard is a tar; a chunk is the run of tar members sharing one key (<key>.part.npy, ...),
# written back to back. Its *span* is [offset of its first header, end of its last payload
# rounded up to a 512-byte block): the bytes one range request fetches. Manifests record the
# spans (shard record `chunks`: [[offset, length], ...] in file order); `tar_chunk_spans`
# recovers them from the headers of a shard written before they were recorded.
def tar_chunk_spans(tar: tarfile.TarFile) -> list[tuple[str, int, int]]:
    """(key, offset, length) of every chunk of an open tar, in file order (payloads are not read
    in "r:" mode; a "r|" stream is read through once)."""
    spans: dict[str, list[int]] = {}
    for member in tar:
        if not member.isfile():
            continue
        key = member.name.rpartition("/")[2].partition(".")[0]
        end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        span = spans.setdefault(key, [member.offset, end])
        span[0], span[1] = min(span[0], member.offset), max(span[1], end)
    return [(key, start, end - start) for key, (start, end) in spans.items()]


def chunk_entries(data: bytes, where: str) -> tuple[str, dict[str, bytes]]:
    """The key and entries ('part.npy' -> bytes) of one chunk's span, read from its tar headers."""
    view = memoryview(data)
    entries, keys = {}, set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, entry = member.name.rpartition("/")[2].partition(".")
                if member.offset_data + member.size > len(data):
                    raise DataError(f"{where}/{entry}: entry runs past the chunk's recorded span; the shard is "
                                    "truncated or the manifest's byte offsets are stale")
                keys.add(key)
                entries[entry] = bytes(view[member.offset_data:member.offset_data + member.size])
    except (tarfile.TarError, EOFError) as error:
        raise DataError(f"{where}: not a tar chunk ({error}); the shard is corrupt or the manifest's byte offsets "
                        "are stale") from error
    if len(keys) != 1:
        raise DataError(f"{where}: span holds {len(keys)} chunk keys {sorted(keys)}, expected one; the manifest's "
                        "byte offsets are stale")
    return keys.pop(), entries


@dataclass
class FeatureStats:
    """Streaming count/sum/sum of squares/min/max per named feature (manifest statistics)."""

    names: list[str]
    count: np.ndarray = field(default=None)
    total: np.ndarray = field(default=None)
    total_sq: np.ndarray = field(default=None)
    minimum: np.ndarray = field(default=None)
    maximum: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.names)
        if self.count is None:
            self.count = np.zeros(n)
            self.total = np.zeros(n)
            self.total_sq = np.zeros(n)
            self.minimum = np.full(n, np.inf)
            self.maximum = np.full(n, -np.inf)

    def update(self, values: np.ndarray) -> None:
        """values: (N, len(names))."""
        if len(values) == 0:
            return
        values = values.astype(np.float64)
        self.count += len(values)
        self.total += values.sum(0)
        self.total_sq += (values * values).sum(0)
        self.minimum = np.minimum(self.minimum, values.min(0))
        self.maximum = np.maximum(self.maximum, values.max(0))

    def merge(self, other: "FeatureStats") -> None:
        assert self.names == other.names, (self.names, other.names)
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)

    def to_json(self) -> dict:
        out = {}
        for i, name in enumerate(self.names):
            n = max(self.count[i], 1)
            mean = self.total[i] / n
            var = max(self.total_sq[i] / n - mean * mean, 0.0)
            out[name] = {
                "count": int(self.count[i]),
                "sum": float(self.total[i]),
                "sum_sq": float(self.total_sq[i]),
                "mean": float(mean),
                "std": float(np.sqrt(var)),
                "min": float(self.minimum[i]) if self.count[i] else None,
                "max": float(self.maximum[i]) if self.count[i] else None,
            }
        return out

    @classmethod
    def from_json(cls, data: dict) -> "FeatureStats":
        names = list(data)
        stats = cls(names)
        for i, name in enumerate(names):
            entry = data[name]
            stats.count[i] = entry["count"]
            stats.total[i] = entry["sum"]
            stats.total_sq[i] = entry["sum_sq"]
            stats.minimum[i] = np.inf if entry["min"] is None else entry["min"]
            stats.maximum[i] = -np.inf if entry["max"] is None else entry["max"]
        return stats
