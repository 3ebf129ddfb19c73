"""What both converters of `jetfm data convert` share about their input, below the readers.

`Block` (a step of converted entries, bad ones marked), `sort_and_truncate` (pT order, at most
`max_particles`), the split assignment (`SplitAssigner`, `parse_fractions`) and `expand_files`
(files and globs -> paths). Kept apart from `convert.py` (the command, the conversion loop, the
resumable writer) so that the format readers (`convert_jetclass_root`, `convert_toptag_hdf5`)
import these without importing the command, and `convert.py` stays one job.
"""

from __future__ import annotations

import glob
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from .format import DataError, JetArrays

SPLIT_NAMES = ("train", "val", "test")


# ----------------------------------------------------------------------------- blocks
@dataclass
class Block:
    """`n` consecutive input entries of one file, converted; bad ones are marked, not removed.

    `jets` has one row per entry (bad jets may hold garbage or no particles).
    `bad` maps reason -> (n,) bool; `detail(reason, i)` explains entry i for error messages.
    """

    start: int
    jets: JetArrays
    bad: dict[str, np.ndarray]
    details: dict[str, object] = field(default_factory=dict)

    def detail(self, reason: str, i: int) -> str:
        explain = self.details.get(reason)
        return explain(i) if explain else ""


def sort_and_truncate(part: np.ndarray, counts: np.ndarray, max_particles: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each jet's particles by pT (descending, stable) and keep the first `max_particles`.

    part: (T, P) with px, py in columns 0, 1; counts: (B,) particles per jet.
    Returns (part (T', P), counts (B,)).
    """
    n_total = len(part)
    if n_total == 0:
        return part, counts
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pt = np.hypot(part[:, 0], part[:, 1])
    # Skip the sort when already ordered (top-tagging files are; JetClass files are not).
    first = np.zeros(n_total, bool)
    first[offsets[:-1][counts > 0]] = True
    if np.any((pt[1:] > pt[:-1]) & ~first[1:]):
        import awkward as ak

        local = ak.argsort(ak.unflatten(-pt, counts), axis=1, stable=True)
        order = ak.to_numpy(ak.flatten(local)) + np.repeat(offsets[:-1], counts)
        part = part[order]
    if counts.max() > max_particles:
        rank = np.arange(n_total) - np.repeat(offsets[:-1], counts)
        part = part[rank < max_particles]
        counts = np.minimum(counts, max_particles)
    return part, counts


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# ----------------------------------------------------------------------------- splitting
class SplitAssigner:
    """Assigns every input entry to a split, deterministically.

    With fractions, entry k of a file goes to split searchsorted(cumsum(fractions), u_k), where
    u_k is the k-th draw of a generator seeded by (seed, file name): the same files and seed
    give the same splits whatever the chunking, file order or interleaving.
    """

    def __init__(self, split: str | None, fractions: tuple[float, ...] | None, seed: int):
        self.names = SPLIT_NAMES if fractions else (split,)
        self.edges = None if not fractions else np.cumsum(fractions)[:-1]
        self.seed = seed

    def stream(self, path: str):
        if self.edges is None:
            return None
        return np.random.default_rng([self.seed, zlib.crc32(os.path.basename(path).encode())])

    def assign(self, rng, n: int) -> np.ndarray:
        if rng is None:
            return np.zeros(n, np.int64)
        return np.searchsorted(self.edges, rng.random(n), side="right").astype(np.int64)


def parse_fractions(text: str | tuple | list | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    values = text.split(",") if isinstance(text, str) else list(text)
    try:
        fractions = tuple(float(v) for v in values)
    except ValueError as error:
        raise ValueError(f"split fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from error
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions {text!r}: expected three non-negative numbers (train,val,test) summing to 1"
        )
    return fractions


# ----------------------------------------------------------------------------- input files
def expand_files(patterns: list[str] | str) -> list[str]:
    """Absolute paths of the given files and globs, in order, without duplicates."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{pattern}: no files match this pattern")
        else:
            if not os.path.exists(pattern):
                raise DataError(f"{pattern}: no such file")
            matches = [pattern]
        for match in matches:
            if os.path.isdir(match):
                raise DataError(f"{match}: is a directory; give files or a glob like '{match}/*'")
            path = os.path.abspath(match)
            if path not in files:
                files.append(path)
    if not files:
        raise DataError("no input files given")
    return files
