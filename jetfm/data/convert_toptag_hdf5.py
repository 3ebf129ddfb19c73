"""The top-tagging HDF5 reader of `jetfm data convert toptag`: `TopTagFile` and `pickled_names`.

pandas HDF5 in fixed format (h5py, block arrays), in table format through the pickle-free reader
(h5py, column names decoded from the pickle opcodes without unpickling), and the `--allow-pickle`
path through pandas for trusted files. Per jet it stores part_px part_py part_pz part_energy
(columns PX_i PY_i PZ_i E_i, E == 0 is padding), JET_FEATURES summed over all constituents, and
is_signal_new as an index into TOPTAG_CLASSES. The conversion loop that drives it lives in
`convert.py`.
"""

from __future__ import annotations

import re

import numpy as np

from .convert_input import Block, _offsets, sort_and_truncate
from .format import JET_FEATURES, KINEMATIC_FEATURES, DataError, JetArrays
from .physics import jets_from_constituents

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
