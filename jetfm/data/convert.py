"""Convert datasets users bring (JetClass ROOT, top-tagging HDF5) into jetfm shards.

    jetfm data convert jetclass 'JetClass/train_100M/*.root' --out data/jetclass --split train
    jetfm data convert jetclass 'JetClass/val_5M/*.root' --out data/jetclass --split val
    jetfm data convert toptag train.h5 --out data/toptag --split-fractions 0.8,0.1,0.1 --skip-bad

The output is the generator's format (docs/DATA.md): `DIR/{split}/shard-{k:06d}.tar`
of ~1,000-jet chunks plus `DIR/manifest.json`. Input is read in steps of `chunk_size` jets, so
memory stays bounded whatever the file size (the 1.2M-jet top-tagging train file is ~4 GB).

Per jet the converters store:
  JetClass  particles  part_px part_py part_pz part_energy [+ PID branches] [+ d0/dz branches]
            jet        jet_pt jet_eta jet_phi jet_energy (branches), jet_mass (from that
                       four-vector: JetClass has no jet_mass branch), jet_nparticles (branch)
                       [+ jet_sdmass jet_tau1..4]
            label      one-hot label_* branches -> index into JETCLASS_CLASSES
  top tag   particles  part_px part_py part_pz part_energy (columns PX_i PY_i PZ_i E_i, E == 0 is padding)
            jet        JET_FEATURES summed over all constituents, jet_nparticles before truncation
            label      is_signal_new -> TOPTAG_CLASSES
Particles are sorted by pT (descending) and truncated to `max_particles`.

Bad jets (NaN/inf, no particles, label not one-hot, particle branches of unequal length,
jet_nparticles disagreeing with the particles) raise DataError naming file and entry; with
`skip_bad` they are dropped and counted by reason in `manifest.skipped`.

A conversion is all-or-nothing: shards are published in the manifest when every input file
has been read; on an error in the data the shards this run wrote are removed and the directory
is as before. An *interrupted* conversion (SIGTERM, SIGINT, a killed job) keeps its finished
shards: `DIR/convert-progress.json` lists them with the command's settings, and rerunning the
same command continues — the input is read again (the split assignment and the shard boundaries
are a function of the whole stream), the finished shards are not rewritten, and the result is
the dataset an uninterrupted run writes. `--restart` discards the interrupted conversion instead.
Converting into a directory that already holds a compatible dataset appends to it (new shards
are numbered after the existing ones).

Files are read round-robin, `interleave` at a time in a seeded order, so that one shard mixes
jets of several input files (JetClass files hold one class each; a reader's shuffle buffer
then sees every class).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import messages
from ..artifacts.atomic import atomic_write_text
from .format import (
    JET_FEATURES,
    JETCLASS_CLASSES,
    KINEMATIC_FEATURES,
    PID_FEATURES,
    TOPTAG_CLASSES,
    DataError,
    JetArrays,
)
from .physics import jets_from_constituents
from .shards import Manifest, ShardRecord, ShardSetWriter, ShardWriter, creation_info

#: Optional JetClass impact-parameter branches, stored after the PID features when present.
IMPACT_FEATURES = ("part_d0val", "part_d0err", "part_dzval", "part_dzerr")
#: JetClass jet branches read into JET_FEATURES (jet_mass is computed, not read).
JETCLASS_JET_BRANCHES = ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_nparticles")
#: Optional JetClass jet branches appended after JET_FEATURES when present.
JETCLASS_EXTRA_JET = ("jet_sdmass", "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4")

#: Bad-jet reasons, in the order a jet is counted (each bad jet is counted once).
BAD_REASONS = {
    "shape": "particle arrays of unequal length",
    "nonfinite": "NaN or inf in a particle or jet feature",
    "empty": "jet has no particles",
    "label": "invalid label",
    "nparticles": "jet_nparticles disagrees with the number of particles",
}

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


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


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


# ----------------------------------------------------------------------------- top tagging
_TOPTAG_COLUMN = re.compile(r"^(E|PX|PY|PZ)_(\d+)$")


class TopTagFile:
    """One top-tagging pandas HDF5 file (key `table`), fixed or table format, read in row ranges.

    Fixed format is read with h5py straight from the block arrays (`{key}/block{i}_values`,
    column names in `{key}/block{i}_items`), so no row range is ever loaded beyond the step.

    Table format is read with h5py too, never through pandas/PyTables: PyTables unpickles five
    attributes of every table-format file (`non_index_axes`, `values_cols`, `info`, ...), and a
    pickle can run any code. The rows are the compound dataset `{key}/table` (fields `index`,
    `values_block_N` of shape (k,), and one scalar field per pandas data column); the names of a
    block's columns exist only as a pickled list in the dataset attribute `values_block_N_kind`,
    which `pickled_names` decodes opcode by opcode, accepting only a list of strings and refusing
    anything that would import or call. `allow_pickle=True` (`--allow-pickle`) goes through
    pandas `HDFStore.select` instead, for files the safe reader refuses and the user trusts.
    """

    kind = "toptag"

    def __init__(self, path: str, key: str = "table", allow_pickle: bool = False):
        import h5py

        self.path = path
        self.key = key
        try:
            self._h5 = h5py.File(path, "r")
        except Exception as error:
            raise DataError(f"{path}: not a readable HDF5 file ({type(error).__name__}: {error})") from error
        if key not in self._h5:
            raise DataError(
                f"{path}: no key {key!r} (found {sorted(self._h5.keys())}); expected a pandas HDF5 file "
                f"written with DataFrame.to_hdf(path, key={key!r})"
            )
        group = self._h5[key]
        pandas_type = _attr_str(group.attrs.get("pandas_type"))
        self._store = None
        if pandas_type == "frame":
            self.format = "fixed"
            self._blocks = []  # (dataset, transposed)
            self.columns = {}  # name -> (block index, column in block)
            n_blocks = int(group.attrs.get("nblocks", 0)) or sum(1 for k in group if re.fullmatch(r"block\d+_items", k))
            for b in range(n_blocks):
                items = [_attr_str(x) for x in group[f"block{b}_items"][()]]
                values = group[f"block{b}_values"]
                if values.ndim != 2:
                    raise DataError(f"{path}: {key}/block{b}_values has shape {values.shape}, expected 2-D")
                transposed = bool(values.attrs.get("transposed", True))
                self._blocks.append((values, transposed))
                for column, name in enumerate(items):
                    self.columns[name] = (b, column)
            first = self._blocks[0] if self._blocks else None
            self.n_entries = 0 if first is None else first[0].shape[0 if first[1] else 1]
        elif pandas_type == "frame_table" and allow_pickle:
            import pandas as pd

            self.format = "table-pandas"
            self._h5.close()
            self._store = pd.HDFStore(path, mode="r")
            try:
                self.n_entries = int(self._store.get_storer(key).nrows)
                self.columns = {name: None for name in self._store.select(key, start=0, stop=0).columns}
            except BaseException:
                self._store.close()
                raise
        elif pandas_type == "frame_table":
            self.format = "table"
            self._open_table(group)
        else:
            raise DataError(
                f"{path}: {key!r} is not a pandas DataFrame (pandas_type {pandas_type!r}); expected "
                f"DataFrame.to_hdf(path, key={key!r}) in fixed or table format"
            )

    def _open_table(self, group) -> None:
        """Column name -> (field, column or None) of a table-format frame, from plain attributes
        and pickled name lists decoded without unpickling."""
        where = f"{self.path}: {self.key}/table"
        table = group.get("table")
        if table is None or not hasattr(table, "dtype") or table.dtype.names is None:
            raise DataError(f"{where}: missing or not a compound dataset; expected a pandas table-format frame")
        self._table = table
        self.n_entries = int(table.shape[0])
        self.columns = {}
        for name in table.dtype.names:
            if name == "index":
                continue
            shape = table.dtype[name].shape
            if not shape:  # a data column: the field is named after it
                self.columns[name] = (name, None)
                continue
            attr = f"{name}_kind"
            names = pickled_names(table.attrs.get(attr), f"{where} attribute {attr!r}")
            if len(names) != shape[0]:
                raise DataError(f"{where}: attribute {attr!r} names {len(names)} columns, field {name!r} has {shape[0]}")
            for column, column_name in enumerate(names):
                self.columns[column_name] = (name, column)

    def schema(self) -> tuple[list[str], list[str]]:
        index = {}
        for name in self.columns:
            match = _TOPTAG_COLUMN.match(str(name))
            if match:
                index.setdefault(int(match.group(2)), set()).add(match.group(1))
        n = max(index) + 1 if index else 0
        missing = [f"{q}_{i}" for i in range(n) for q in ("E", "PX", "PY", "PZ") if q not in index.get(i, ())]
        if n == 0:
            missing = ["E_0", "PX_0", "PY_0", "PZ_0"]
        if "is_signal_new" not in self.columns:
            missing.append("is_signal_new")
        if missing:
            shown = missing[:12] + (["..."] if len(missing) > 12 else [])
            raise DataError(
                f"{self.path}: missing columns {shown}; expected the top-tagging layout: columns "
                f"E_i PX_i PY_i PZ_i for i < 200 (zero-padded) and the label is_signal_new"
            )
        self.n_slots = n
        return list(KINEMATIC_FEATURES), list(JET_FEATURES)

    def configure(self, particle_features: list[str], jet_features: list[str], max_particles: int) -> None:
        self.max_particles = max_particles
        n = self.n_slots
        # column groups in KINEMATIC_FEATURES order (px, py, pz, E), then the label
        self.wanted = [f"{q}_{i}" for q in ("PX", "PY", "PZ", "E") for i in range(n)] + ["is_signal_new"]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, 4 * n_slots + 1) float64 in `self.wanted` order."""
        if self.format == "table-pandas":
            frame = self._store.select(self.key, start=start, stop=stop)
            return frame[self.wanted].to_numpy(np.float64)
        if self.format == "table":
            rows = self._table[start:stop]
            out = np.empty((stop - start, len(self.wanted)), np.float64)
            by_field: dict[str, list[tuple[int, int | None]]] = {}
            for j, name in enumerate(self.wanted):
                field, column = self.columns[name]
                by_field.setdefault(field, []).append((j, column))
            for field, pairs in by_field.items():
                targets, sources = zip(*pairs)
                out[:, list(targets)] = rows[field][:, None] if sources[0] is None else rows[field][:, list(sources)]
            return out
        out = np.empty((stop - start, len(self.wanted)), np.float64)
        by_block: dict[int, list[tuple[int, int]]] = {}
        for j, name in enumerate(self.wanted):
            b, column = self.columns[name]
            by_block.setdefault(b, []).append((j, column))
        for b, pairs in by_block.items():
            values, transposed = self._blocks[b]
            rows = values[start:stop] if transposed else values[:, start:stop].T
            targets, sources = zip(*pairs)
            out[:, list(targets)] = rows[:, list(sources)]
        return out

    def blocks(self, step: int):
        for start in range(0, self.n_entries, step):
            stop = min(start + step, self.n_entries)
            try:
                values = self._read(start, stop)
            except Exception as error:
                hint = ""
                if self.format == "table" and "filter" in str(error):
                    hint = ("; the table uses a compression filter h5py lacks (pandas complib='blosc'?): re-save it "
                            "with complib='zlib', or pass --allow-pickle if you trust the file")
                raise DataError(
                    f"{self.path}: failed reading rows {start}-{stop} ({type(error).__name__}: {error}){hint}"
                ) from error
            yield self._block(values, start)

    def _block(self, values: np.ndarray, start: int) -> Block:
        n = self.n_slots
        px, py, pz, e = (values[:, k * n : (k + 1) * n] for k in range(4))
        label_raw = values[:, 4 * n]
        finite = np.isfinite(values).all(axis=1)
        valid = e != 0  # zero energy marks padding
        counts = valid.sum(axis=1).astype(np.int64)
        # row-major boolean indexing keeps each jet's particles together, in column order
        part = np.stack([px[valid], py[valid], pz[valid], e[valid]], axis=1).astype(np.float32)
        part, sorted_counts = sort_and_truncate(part, counts, 10**9)
        features = jets_from_constituents(part, _offsets(sorted_counts))  # all constituents
        jet = np.stack([features[name] for name in JET_FEATURES], axis=1)
        part, kept = sort_and_truncate(part, sorted_counts, self.max_particles)
        label_bad = ~np.isin(label_raw, (0.0, 1.0))
        jets = JetArrays(
            part=part,
            offsets=_offsets(kept),
            jet=jet.astype(np.float32),
            label=np.where(label_bad, 0, label_raw).astype(np.int64),
        )
        bad = {"nonfinite": ~finite, "empty": (counts == 0) & finite, "label": label_bad}

        def explain_label(i):
            return f"is_signal_new = {label_raw[i]:g}, expected 0 or 1"

        def explain_nonfinite(i):
            names = [self.wanted[j] for j in np.flatnonzero(~np.isfinite(values[i]))]
            return f"non-finite columns {names[:8]}"

        return Block(start, jets, bad, {"label": explain_label, "nonfinite": explain_nonfinite})

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        else:
            self._h5.close()


#: Pickle opcodes that build a list of strings (pandas' protocol-0 name lists and newer protocols);
#: any other opcode (GLOBAL, STACK_GLOBAL, REDUCE, INST, OBJ, BUILD, NEWOBJ, ...) is refused.
_NAME_LIST_OPS = {
    "PROTO", "FRAME", "MARK", "STOP", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
}


def pickled_names(value, where: str) -> list[str]:
    """The list of strings a pickle encodes, read from its opcodes without unpickling.

    pandas stores a table block's column names only as a pickled list; `pickle.loads` on a file
    from elsewhere could run anything, so this walks the opcode stream (`pickletools.genops`
    parses, it never executes) and accepts only what builds a flat list of strings.
    """
    import pickletools

    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if not isinstance(value, (bytes, np.bytes_)):
        raise DataError(f"{where}: missing or not a byte string; expected pandas' pickled list of column names")
    data = bytes(value)
    refuse = (f"{where}: is not a plain pickled list of column names; reading it would mean unpickling, which "
              f"can run code hidden in the file. Convert only files you trust with --allow-pickle "
              f"(reads through pandas/PyTables), or re-save the file with pandas format='fixed'")
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    result = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name not in _NAME_LIST_OPS:
                raise DataError(f"{refuse} (opcode {name})")
            if name == "MARK":
                marks.append(len(stack))
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "LIST":
                start = marks.pop()
                items = stack[start:]
                del stack[start:]
                stack.append(list(items))
            elif name == "APPEND":
                item = stack.pop()
                stack[-1].append(item)
            elif name == "APPENDS":
                start = marks.pop()
                items = stack[start:]
                del stack[start:]
                stack[-1].extend(items)
            elif name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                          "SHORT_BINSTRING"):
                stack.append(arg if isinstance(arg, str) else bytes(arg).decode("utf-8"))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "STOP":
                result = stack.pop() if len(stack) == 1 else None
    except DataError:
        raise
    except Exception as error:  # malformed opcode stream, list ops on a string, unknown memo key
        raise DataError(f"{refuse} ({type(error).__name__}: {error})") from error
    if not isinstance(result, list) or not all(isinstance(item, str) for item in result):
        raise DataError(refuse)
    return result


def _attr_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    return str(value)


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


# ----------------------------------------------------------------------------- output
def _next_shard_index(manifest: Manifest | None, split: str) -> int:
    if manifest is None:
        return 0
    indices = [
        int(m.group(1))
        for shard in manifest.splits.get(split, [])
        if (m := re.search(r"shard-(\d+)\.tar$", shard["path"]))
    ]
    return max(indices, default=-1) + 1


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


# ----------------------------------------------------------------------------- resuming
class ConvertProgress:
    """`DIR/convert-progress.json`: the settings of a conversion under way and its finished shards.

    Written atomically after every finished shard and removed once the manifest lists them, so a
    conversion stopped any way at all leaves whole shards that this file vouches for.
    """

    FILENAME = "convert-progress.json"

    def __init__(self, directory: Path, plan: dict, shards: dict[str, dict] | None = None):
        self.path = Path(directory) / self.FILENAME
        self.plan = plan
        self.shards = dict(shards or {})  # relpath -> ShardRecord json

    @classmethod
    def load(cls, directory: Path) -> "ConvertProgress | None":
        path = Path(directory) / cls.FILENAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(directory, data["plan"], data["shards"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{path}: unreadable record of an interrupted conversion ({error}); "
                            f"pass --restart to discard it") from error

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"plan": self.plan, "shards": self.shards}, indent=1))

    def finished(self, record: ShardRecord) -> None:
        self.shards[record.path] = record.to_json()
        self.save()

    def discard(self) -> None:
        """Remove the interrupted conversion's shards (finished and partial) and this record."""
        root = self.path.parent
        for relpath in self.shards:
            (root / relpath).unlink(missing_ok=True)
        for split in self.plan.get("first_index", {}):
            for tmp in (root / split).glob("shard-*.tar.tmp"):
                tmp.unlink()
        self.path.unlink(missing_ok=True)


class _FinishedShard:
    """Stands in for a ShardWriter of a shard an interrupted run already wrote: takes its jets
    (so the following shards start where they did), writes nothing, returns the stored record."""

    def __init__(self, root: Path, relpath: str, record: dict):
        self.path = Path(root) / relpath
        self.relpath = relpath
        self.record = record
        self.n_jets = 0
        if not self.path.exists():
            raise DataError(f"{self.path}: listed as finished in {Path(root) / ConvertProgress.FILENAME} but missing; "
                            f"pass --restart to convert from scratch")

    def write(self, jets: JetArrays) -> None:
        self.n_jets += len(jets)

    def close(self) -> ShardRecord:
        if self.n_jets != self.record["n_jets"]:
            raise DataError(f"{self.path}: the interrupted conversion wrote {self.record['n_jets']} jets here, this "
                            f"run routes {self.n_jets}; the input files changed — pass --restart")
        return ShardRecord(**self.record)

    def abort(self) -> None:
        pass


class _ResumableShardSetWriter(ShardSetWriter):
    """A ShardSetWriter that skips shards `journal` lists and records each one it finishes."""

    def __init__(self, *args, journal: ConvertProgress, **kwargs):
        super().__init__(*args, **kwargs)
        self.journal = journal

    def _open_shard(self, relpath: str) -> ShardWriter | _FinishedShard:
        if relpath in self.journal.shards:
            return _FinishedShard(self.root, relpath, self.journal.shards[relpath])
        return super()._open_shard(relpath)

    def _close_shard(self) -> None:
        super()._close_shard()
        self.journal.finished(self.records[-1])

    def interrupt(self) -> None:
        """Drop only the shard being written: the finished ones stay for a rerun."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# ----------------------------------------------------------------------------- driver
def _convert(
    kind: str,
    opener,
    classes: tuple[str, ...],
    files,
    out_dir,
    *,
    split: str | None,
    split_fractions,
    max_particles: int,
    chunk_size: int,
    jets_per_shard: int,
    skip_bad: bool,
    seed: int,
    progress: bool,
    interleave: int,
    source_extra: dict,
    restart: bool = False,
) -> Manifest:
    fractions = parse_fractions(split_fractions)
    if fractions is not None and split not in (None, "train"):
        raise ValueError(f"give either split ({split!r}) or split_fractions ({split_fractions!r}), not both")
    if fractions is None:
        split = split or "train"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
            raise ValueError(f"split name {split!r}: use letters, digits, '_', '-' or '.'")
    if max_particles < 1 or chunk_size < 1 or jets_per_shard < 1 or interleave < 1:
        raise ValueError("max_particles, chunk_size, jets_per_shard and interleave must be positive")
    paths = expand_files(files)
    out_dir = Path(out_dir)

    # Open every file first: a missing branch or column fails before anything is written.
    sources = []
    try:
        schemas = []
        checking = paths if not progress or len(paths) < 20 else _progress_files(paths)
        for path in checking:
            source = opener(path)
            sources.append(source)
            schemas.append(source.schema())
        total = sum(source.n_entries for source in sources)
        particle_features = [n for n in schemas[0][0] if all(n in s[0] for s in schemas)]
        jet_features = [n for n in schemas[0][1] if all(n in s[1] for s in schemas)]
        dropped = sorted({n for s in schemas for n in s[0] + s[1]} - set(particle_features + jet_features))
        if dropped:
            messages.warn(f"{dropped} are missing in some input files; not stored")
        for source in sources:
            source.configure(particle_features, jet_features, max_particles)
    finally:
        for source in sources:
            source.close()

    settings = {
        "split": split if fractions is None else None,
        "split_fractions": list(fractions) if fractions else None,
        "seed": seed,
        "skip_bad": skip_bad,
    }
    manifest = Manifest(
        source={"kind": kind, "files": paths, **source_extra, "conversions": []},
        particle_features=particle_features,
        jet_features=jet_features,
        classes=list(classes),
        max_particles=max_particles,
        chunk_size=chunk_size,
    )
    journal = ConvertProgress.load(out_dir)
    if journal is not None and restart:
        messages.info(f"{out_dir}: discarding the interrupted conversion's {len(journal.shards)} finished shard(s)")
        journal.discard()
        journal = None
    existing = None
    if (out_dir / Manifest.FILENAME).exists():
        existing = Manifest.load(out_dir)
        where = f"{out_dir / Manifest.FILENAME}"
        if existing.source.get("kind") != kind:
            raise DataError(f"{where}: holds {existing.source.get('kind')!r} jets; cannot append {kind!r} jets")
        existing.compatible_with(manifest, where)
        if existing.max_particles != max_particles:
            raise DataError(f"{where}: max_particles {existing.max_particles}, this conversion uses {max_particles}")
        again = sorted(set(paths) & set(existing.source.get("files", [])))
        if again and journal is not None and set(journal.plan["files"]) <= set(existing.source.get("files", [])):
            journal.path.unlink()  # stopped after publishing the manifest: that conversion is complete
            journal = None
        if again:
            raise DataError(f"{where}: already holds jets converted from {again}; convert into a fresh --out")
        if existing.chunk_size != chunk_size:
            messages.info(f"note: appending with the existing chunk size {existing.chunk_size}, not {chunk_size}")
        manifest = existing
        manifest.source["files"] = list(manifest.source.get("files", [])) + paths
        manifest.source.setdefault("conversions", [])
    elif journal is None and any(out_dir.glob("*/shard-*.tar")):
        raise DataError(f"{out_dir}: holds shards but no {Manifest.FILENAME} (nor a {ConvertProgress.FILENAME} of "
                        f"an interrupted conversion to continue); convert into an empty directory")

    assigner = SplitAssigner(split, fractions, seed)
    plan = {
        "kind": kind,
        "files": paths,
        **settings,
        **source_extra,
        "max_particles": max_particles,
        "chunk_size": manifest.chunk_size,
        "jets_per_shard": jets_per_shard,
        "interleave": interleave,
        "first_index": {name: _next_shard_index(existing, name) for name in assigner.names},
    }
    if journal is None:
        journal = ConvertProgress(out_dir, plan)
        out_dir.mkdir(parents=True, exist_ok=True)
        journal.save()
    elif journal.plan != plan:
        differ = sorted(k for k in set(plan) | set(journal.plan) if plan.get(k) != journal.plan.get(k))
        raise DataError(
            f"{journal.path}: an interrupted conversion is under way in {out_dir} with other settings "
            f"(differing: {differ}); rerun its command to continue it, or pass --restart to discard "
            f"its {len(journal.shards)} finished shard(s)"
        )
    else:
        for name in assigner.names:  # the shard that was being written when it stopped
            for tmp in (out_dir / name).glob("shard-*.tar.tmp"):
                tmp.unlink()
        if journal.shards and progress:
            messages.info(f"continuing the interrupted conversion in {out_dir}: {len(journal.shards)} finished "
                          f"shard(s) are kept, the input is read again to find where it stopped")
    outputs = [
        _ResumableShardSetWriter(out_dir, name, manifest, jets_per_shard=jets_per_shard,
                                 first_index=plan["first_index"][name], journal=journal)
        for name in assigner.names
    ]
    # Seeded file order, then round-robin over a window of `interleave` open files.
    order = np.random.default_rng(seed).permutation(len(paths)) if interleave > 1 else np.arange(len(paths))
    pending = [paths[i] for i in order]
    skipped = {reason: 0 for reason in BAD_REASONS}
    n_read = n_written = 0
    bar = _progress_bar(progress, kind, total)
    started = time.perf_counter()
    active: list[tuple] = []  # (source, block iterator, split rng)
    try:
        while pending or active:
            while pending and len(active) < interleave:
                source = opener(pending.pop(0))
                source.schema()
                source.configure(particle_features, jet_features, max_particles)
                active.append((source, source.blocks(chunk_size), assigner.stream(source.path)))
            for slot in list(active):
                source, blocks, rng = slot
                block = next(blocks, None)
                if block is None:
                    source.close()
                    active.remove(slot)
                    continue
                assignment = assigner.assign(rng, len(block.jets))
                n_good = _emit(block, source.path, kind, assignment, outputs, skipped, skip_bad)
                n_read += len(block.jets)
                n_written += n_good
                bar.update(len(block.jets))
                if n_read > n_written:
                    bar.set_postfix(skipped=n_read - n_written, refresh=False)
        for output in outputs:
            output.finish()
    except (KeyboardInterrupt, SystemExit):  # stopped, not failed: keep the finished shards
        for source, _, _ in active:
            source.close()
        for output in outputs:
            output.interrupt()
        bar.close()
        raise
    except BaseException:
        for source, _, _ in active:
            source.close()
        for output in outputs:
            output.abort()
        journal.path.unlink(missing_ok=True)
        bar.close()
        raise
    bar.close()
    elapsed = time.perf_counter() - started

    for output in outputs:
        for record in output.records:
            manifest.add_shard(output.split, record)
    manifest.add_skipped({k: v for k, v in skipped.items() if v})
    manifest.created_by = creation_info()
    manifest.source["conversions"].append(
        {
            "files": paths,
            **settings,
            "n_read": n_read,
            "n_jets": n_written,
            "skipped": {k: v for k, v in skipped.items() if v},
            "shards": [r.path for o in outputs for r in o.records],
            "created_by": manifest.created_by,
        }
    )
    manifest.save(out_dir)
    journal.path.unlink(missing_ok=True)
    rate = n_read / max(elapsed, 1e-9)
    if progress:
        n_shards = sum(len(o.records) for o in outputs)
        messages.info(
            f"converted {n_written:,} jets ({n_read - n_written:,} skipped) from {len(paths)} {kind} files "
            f"into {n_shards} shards in {out_dir} ({rate:,.0f} jets/s)"
        )
    return manifest


def _emit(block: Block, path: str, kind: str, assignment: np.ndarray, outputs, skipped: dict, skip_bad: bool) -> int:
    """Validate one block, drop or refuse bad jets, write the rest to their splits. Returns jets written."""
    n = len(block.jets)
    reasons = [(r, block.bad[r]) for r in BAD_REASONS if r in block.bad and block.bad[r].any()]
    bad = np.zeros(n, bool)
    for _, mask in reasons:
        bad |= mask
    if bad.any() and not skip_bad:
        i = int(np.argmax(bad))  # the first bad entry, under its first reason
        reason = next(r for r, mask in reasons if mask[i])
        what = "row" if kind == "toptag" else "entry"
        detail = block.detail(reason, i)
        raise DataError(
            f"{path}: {what} {block.start + i}: {BAD_REASONS[reason]}"
            + (f" ({detail})" if detail else "")
            + "; fix the input or pass --skip-bad to drop such jets (they are counted in the manifest)"
        )
    counted = np.zeros(n, bool)
    for reason, mask in reasons:  # each bad jet counted once, under its first reason
        skipped[reason] += int((mask & ~counted).sum())
        counted |= mask
    if len(outputs) == 1:
        jets = block.jets if not bad.any() else block.jets.select(np.flatnonzero(~bad))
        outputs[0].write(jets)
        return len(jets)
    written = 0
    for k, output in enumerate(outputs):
        index = np.flatnonzero((assignment == k) & ~bad)
        if len(index):
            output.write(block.jets.select(index))
            written += len(index)
    return written


def _progress_files(paths: list[str]):
    from tqdm import tqdm

    return tqdm(paths, desc="check inputs", unit=" files")


def _progress_bar(enabled: bool, kind: str, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"convert {kind}", unit=" jets", unit_scale=True, disable=not enabled, smoothing=0.1
    )


# ----------------------------------------------------------------------------- public API
def convert_jetclass(
    files: list[str] | str,
    out_dir,
    *,
    split: str | None = "train",
    split_fractions=None,
    max_particles: int = 128,
    chunk_size: int = 1000,
    jets_per_shard: int = 100_000,
    skip_bad: bool = False,
    seed: int = 0,
    progress: bool = True,
    interleave: int = 16,
    tree: str = "tree",
    restart: bool = False,
) -> Manifest:
    """Convert JetClass ROOT files (paths or globs) into shards under `out_dir`; returns the manifest.

    `split` puts every jet into that split; `split_fractions` (train, val, test), e.g. "0.8,0.1,0.1",
    spreads jets over the three splits, seeded by `seed`. See the module docstring for the features.
    An interrupted conversion into `out_dir` is continued when the settings match; `restart=True`
    discards it first.
    """
    return _convert(
        "jetclass",
        lambda path: JetClassFile(path, tree),
        JETCLASS_CLASSES,
        files,
        out_dir,
        split=split,
        split_fractions=split_fractions,
        max_particles=max_particles,
        chunk_size=chunk_size,
        jets_per_shard=jets_per_shard,
        skip_bad=skip_bad,
        seed=seed,
        progress=progress,
        interleave=interleave,
        source_extra={"tree": tree},
        restart=restart,
    )


def convert_toptag(
    files: list[str] | str,
    out_dir,
    *,
    split: str | None = "train",
    split_fractions=None,
    max_particles: int = 128,
    chunk_size: int = 1000,
    jets_per_shard: int = 100_000,
    skip_bad: bool = False,
    seed: int = 0,
    progress: bool = True,
    interleave: int = 16,
    key: str = "table",
    allow_pickle: bool = False,
    restart: bool = False,
) -> Manifest:
    """Convert top-tagging pandas HDF5 files (fixed or table format) into shards; see convert_jetclass.

    `allow_pickle` reads table-format files through pandas/PyTables, which unpickles attributes of
    the file (runs code a hostile file carries): only for trusted files the safe reader refuses.
    """
    return _convert(
        "toptag",
        lambda path: TopTagFile(path, key, allow_pickle),
        TOPTAG_CLASSES,
        files,
        out_dir,
        split=split,
        split_fractions=split_fractions,
        max_particles=max_particles,
        chunk_size=chunk_size,
        jets_per_shard=jets_per_shard,
        skip_bad=skip_bad,
        seed=seed,
        progress=progress,
        interleave=interleave,
        source_extra={"key": key},
        restart=restart,
    )


CONVERTERS = {"jetclass": convert_jetclass, "toptag": convert_toptag}


# ----------------------------------------------------------------------------- command line
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `jetfm data convert {jetclass,toptag} FILES... --out DIR`."""
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="input layout: JetClass ROOT or top-tagging HDF5")
    parser.add_argument("files", nargs="+", help="input files or quoted globs ('JetClass/train/*.root')")
    parser.add_argument("--out", required=True, help="output dataset directory (appended to if it holds a dataset)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", default=None, help="put every jet into this split (default: train)")
    where.add_argument(
        "--split-fractions", default=None, metavar="TRAIN,VAL,TEST",
        help="spread jets over train/val/test with these fractions, e.g. 0.8,0.1,0.1 (seeded)",
    )
    parser.add_argument("--max-particles", type=int, default=128, help="keep the hardest N particles per jet")
    parser.add_argument("--chunk-size", type=int, default=1000, help="jets per tar entry (chunk)")
    parser.add_argument("--jets-per-shard", type=int, default=100_000, help="jets per shard file")
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop bad jets (counted in the manifest) instead of failing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment and the file order")
    parser.add_argument("--interleave", type=int, default=16,
                        help="files read round-robin at a time (1: one after another)")
    parser.add_argument("--tree", default="tree", help="JetClass: TTree name")
    parser.add_argument("--key", default="table", help="top tagging: pandas HDF5 key")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="top tagging: read table-format files through pandas/PyTables, which unpickles "
                             "attributes of the file and so runs any code it carries; only for trusted files "
                             "that the safe reader refuses")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--restart", action="store_true",
                        help="discard an interrupted conversion in --out instead of continuing it")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `jetfm data convert`; returns 0, or 2 on inconsistent arguments. Bad input raises DataError."""
    extra = {"tree": args.tree} if args.kind == "jetclass" else {"key": args.key, "allow_pickle": args.allow_pickle}
    try:
        CONVERTERS[args.kind](
            args.files,
            args.out,
            split=None if args.split_fractions else (args.split or "train"),
            split_fractions=args.split_fractions,
            max_particles=args.max_particles,
            chunk_size=args.chunk_size,
            jets_per_shard=args.jets_per_shard,
            skip_bad=args.skip_bad,
            seed=args.seed,
            progress=not args.no_progress,
            interleave=args.interleave,
            restart=args.restart,
            **extra,
        )
    except KeyboardInterrupt:
        messages.info(f"interrupted; finished shards are kept — rerun the same command to continue {args.out}")
        return 130
    except DataError:
        raise  # the jetfm command prints it and exits with 2
    except ValueError as error:  # inconsistent arguments
        messages.error(str(error))
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm data convert", description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    try:
        return run_convert(parser.parse_args(argv))
    except DataError as error:
        messages.error(str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
