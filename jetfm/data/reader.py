"""Reading shard sets: a resumable, rank- and worker-split, deterministic jet loader.

How an epoch is laid out (all of it a pure function of (seed, epoch), so every rank agrees):

1. Every (shard, chunk) of the split is a *unit*; the unit list is permuted with rng(seed, epoch).
2. Unit u goes to consumer u % (world_size * num_workers); consumer = rank * num_workers + worker.
3. A consumer reads its units in *blocks* of ceil(shuffle_buffer / chunk_size) chunks, permutes the
   jets of a block with rng(seed, epoch, consumer, block) and cuts batches from the jet stream.

A consumer's position is therefore just (block, offset): resuming loads one block and skips
`offset` jets — exact and O(1), unlike replaying a streaming shuffle buffer. Each batch carries
the position after it; `JetLoader` keeps the latest per worker and, on resume, rotates worker
ids so the DataLoader's round-robin continues with the worker that was next.

Reading never unpickles: tar entries are plain .npy, loaded with allow_pickle=False.
"""

from __future__ import annotations

import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import JetBatch
from .features import Preprocessing, particle_features
from .format import DataError, JetArrays, decode_chunk
from .shards import Manifest
from .subset import subset_units


# --------------------------------------------------------------------------- raw chunk access
class ShardIndex:
    """Byte offsets of the chunks in one tar, from its headers (payloads are not read)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        chunks: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(self.path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, entry = member.name.rpartition("/")[2].partition(".")
                    chunks.setdefault(key, {})[entry] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"{self.path}: not a readable tar ({error}); the shard is truncated or corrupt") from error
        self.keys = list(chunks)
        self.chunks = chunks
        self.size = self.path.stat().st_size

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int, handle) -> JetArrays:
        key = self.keys[index]
        where = f"{self.path}:{key}"
        entries = {}
        for entry, (offset, size) in self.chunks[key].items():
            if offset + size > self.size:
                raise DataError(f"{where}/{entry}: entry runs past the end of the file; the shard is truncated")
            handle.seek(offset)
            entries[entry] = handle.read(size)
        return decode_chunk(entries, where)


def _check_chunk(jets: JetArrays, manifest: Manifest, where: str) -> None:
    jets.check(where, len(manifest.particle_features), len(manifest.jet_features), len(manifest.classes))
    if manifest.reco_features is not None and jets.reco is not None and jets.reco.shape[1] != len(manifest.reco_features):
        raise DataError(f"{where}: reco has {jets.reco.shape[1]} columns, manifest names {manifest.reco_features}")


def read_shard_chunks(path: Path, manifest: Manifest) -> Iterator[JetArrays]:
    """Every chunk of one shard, in file order, validated against the manifest."""
    index = ShardIndex(path)
    with open(path, "rb") as handle:
        for i in range(len(index)):
            jets = index.read(i, handle)
            _check_chunk(jets, manifest, f"{path}:{index.keys[i]}")
            yield jets


def verify_shards(directory: Path, manifest: Manifest) -> None:
    """Check that every shard of the manifest exists and holds the chunk and jet counts it records
    (reads every chunk: the deep check of `jetfm data inspect`)."""
    directory = Path(directory)
    manifest.verify(directory)
    for shards in manifest.splits.values():
        for shard in shards:
            path = directory / shard["path"]
            n_jets = n_chunks = 0
            for jets in read_shard_chunks(path, manifest):
                n_jets += len(jets)
                n_chunks += 1
            if (n_jets, n_chunks) != (shard["n_jets"], shard["n_chunks"]):
                raise DataError(
                    f"{path}: holds {n_jets} jets in {n_chunks} chunks, manifest says "
                    f"{shard['n_jets']} jets in {shard['n_chunks']} chunks"
                )


def iterate_jets(directory: Path, split: str) -> Iterator[JetArrays]:
    """Every chunk of a split in manifest order, unshuffled (for conversion, tokenizing, metrics)."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    for shard in manifest.shards(split):
        yield from read_shard_chunks(directory / shard["path"], manifest)


def truncation_rows(offsets: np.ndarray, max_particles: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows and new offsets keeping the first (highest-pT) max_particles of every jet; None if all fit."""
    counts = np.diff(offsets)
    if counts.size == 0 or counts.max() <= max_particles:
        return None
    keep = np.minimum(counts, max_particles)
    rows = np.repeat(offsets[:-1] - np.concatenate([[0], np.cumsum(keep)[:-1]]), keep) + np.arange(keep.sum())
    return rows, np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)


def truncate(jets: JetArrays, max_particles: int) -> JetArrays:
    """Keep the first (highest-pT) max_particles particles of every jet."""
    cut = truncation_rows(jets.offsets, max_particles)
    if cut is None:
        return jets
    rows, offsets = cut
    return JetArrays(
        part=jets.part[rows],
        offsets=offsets,
        jet=jets.jet,
        label=jets.label,
        tokens=None if jets.tokens is None else jets.tokens[rows],
        reco=None if jets.reco is None else jets.reco[rows],
    )


# --------------------------------------------------------------------------- the epoch plan
@dataclass(frozen=True)
class Unit:
    shard: int
    chunk: int
    n_jets: int


def split_units(manifest: Manifest, split: str) -> list[Unit]:
    units = []
    for s, shard in enumerate(manifest.shards(split)):
        n_chunks, n_jets = shard["n_chunks"], shard["n_jets"]
        for c in range(n_chunks):
            size = manifest.chunk_size if c < n_chunks - 1 else n_jets - (n_chunks - 1) * manifest.chunk_size
            units.append(Unit(s, c, size))
    return units


def consumer_units(units: list[Unit], seed: int, epoch: int, shuffle: bool, consumer: int, n_consumers: int) -> list[Unit]:
    order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
    return [units[i] for i in order[consumer::n_consumers]]


class JetDataset(IterableDataset):
    """Yields (batch arrays, (logical_worker, block, offset)) for one epoch of one rank.

    Use through `JetLoader`, which owns epochs, workers and resume state.
    """

    def __init__(
        self,
        directory: str | Path,
        split: str,
        preprocessing: Preprocessing,
        batch_size: int,
        *,
        max_particles: int = 128,
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        inputs: str = "raw",
        drop_last: bool = False,
        require_tokens: bool = False,
        subset_jets: int | None = None,
    ):
        super().__init__()
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.split = split
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.max_particles = max_particles
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.inputs = inputs
        self.drop_last = drop_last
        self.units = subset_units(split_units(self.manifest, split), subset_jets, where=f"{self.directory}: split {split!r}")
        if not self.units:
            raise DataError(f"{self.directory}: split {split!r} holds no jets")
        self.block_chunks = max(1, math.ceil(shuffle_buffer / self.manifest.chunk_size)) if shuffle else 1
        if inputs not in ("raw", "reco"):
            raise ValueError(f"data.inputs must be 'raw' or 'reco', got {inputs!r}")
        if inputs == "reco" and not self.manifest.reco_features:
            raise DataError(f"{self.directory}: data.inputs=reco but the shards carry no reco features (run `jetfm data tokenize --with-reco`), or set data.inputs=raw to use the stored features")
        if inputs == "reco":
            missing = [n for n in preprocessing.names if n not in self.manifest.reco_features]
            if missing:
                raise DataError(f"{self.directory}: reco features {self.manifest.reco_features} lack {missing}")
        if require_tokens and not self.manifest.tokens:
            raise DataError(f"{self.directory}: shards carry no token ids; run `jetfm data tokenize` first")
        for name in preprocessing.names:  # fail at construction, not in a worker
            particle_features(np.zeros((0, len(self.manifest.particle_features)), np.float32), np.zeros(1, np.int64),
                              self.manifest.particle_features, [name])
        # set by JetLoader before each iteration
        self.num_workers = 1
        self.epoch = 0
        self.rotation = 0
        self.start_positions: dict[int, tuple[int, int]] = {}
        self._indices: dict[int, ShardIndex] = {}

    # ------------------------------------------------------------------ per-consumer plan
    def consumer(self, logical_worker: int) -> int:
        return self.rank * self.num_workers + logical_worker

    def plan(self, logical_worker: int, epoch: int | None = None) -> list[list[Unit]]:
        epoch = self.epoch if epoch is None else epoch
        units = consumer_units(
            self.units, self.seed, epoch, self.shuffle, self.consumer(logical_worker), self.world_size * self.num_workers
        )
        return [units[i : i + self.block_chunks] for i in range(0, len(units), self.block_chunks)]

    def batches_in_epoch(self, rank: int) -> int:
        """Batches rank `rank` yields in a full epoch (identical on every rank: pure arithmetic)."""
        total = 0
        for w in range(self.num_workers):
            units = consumer_units(self.units, self.seed, self.epoch, self.shuffle, rank * self.num_workers + w,
                                   self.world_size * self.num_workers)
            n = sum(u.n_jets for u in units)
            total += n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return total

    def shortfall(self) -> str:
        """Why a rank gets no batch in an epoch, in the knobs that fix it.

        Chunks are the unit of work: with fewer chunks than consumers (processes x workers) some
        consumer reads nothing, and a smaller batch cannot help.
        """
        consumers = self.world_size * self.num_workers
        split = f"{self.directory}: split {self.split!r}"
        if len(self.units) < consumers:
            return (f"{split} holds {len(self.units)} chunk(s) (shards x chunks per shard) for {self.world_size} "
                    f"process(es) x {self.num_workers} loader worker(s): every consumer needs at least one; "
                    "regenerate with more shards (`jetfm data generate --jets-per-shard N`), a smaller "
                    "`--chunk-size`, or run fewer processes / data.num_workers")
        return (f"{split} holds fewer jets than one batch per process ({self.batch_size} x {self.world_size}); "
                "lower data.batch_size")

    # ------------------------------------------------------------------ loading
    def _load_block(self, units: list[Unit], logical_worker: int, block: int):
        shards = self.manifest.shards(self.split)
        pieces = []
        for unit in units:
            path = self.directory / shards[unit.shard]["path"]
            index = self._indices.get(unit.shard)
            if index is None:
                index = self._indices[unit.shard] = ShardIndex(path)
                if len(index) != shards[unit.shard]["n_chunks"]:
                    raise DataError(
                        f"{path}: holds {len(index)} chunks, manifest {self.directory / Manifest.FILENAME} "
                        f"says {shards[unit.shard]['n_chunks']}; the manifest disagrees with its shards"
                    )
            with open(path, "rb") as handle:
                jets = index.read(unit.chunk, handle)
            where = f"{path}:{index.keys[unit.chunk]}"
            _check_chunk(jets, self.manifest, where)
            if len(jets) != unit.n_jets:
                raise DataError(f"{where}: holds {len(jets)} jets, manifest implies {unit.n_jets}")
            pieces.append(jets)
        jets = JetArrays.concat(pieces)
        # model features for the whole block at once (vectorised), gathered per batch later;
        # computed before truncation so the jet axis is the sum of all stored constituents
        raw = particle_features(jets.part, jets.offsets, self.manifest.particle_features, self.preprocessing.names)
        cut = truncation_rows(jets.offsets, self.max_particles)
        if cut is not None:
            raw = raw[cut[0]]
            jets = truncate(jets, self.max_particles)
        x = self.preprocessing.forward(raw)
        reco = None
        if jets.reco is not None:
            columns = [self.manifest.reco_features.index(n) for n in self.preprocessing.names if n in self.manifest.reco_features]
            if len(columns) == len(self.preprocessing.names):
                reco = self.preprocessing.forward(jets.reco[:, columns])
        if self.inputs == "reco":
            x = reco
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, self.consumer(logical_worker), block]).permutation(len(jets))
        else:
            order = np.arange(len(jets))
        return jets, x, reco, order

    def _make_batch(self, pieces) -> dict[str, np.ndarray | int | None]:
        """pieces: list of (jets, x, reco, jet_indices) from one or two blocks.

        Returns numpy arrays, not tensors: from a worker process they travel by value through
        the pipe, which for batch-sized arrays is far cheaper than torch's shared-memory files.
        """
        xs, recos, tokens, counts, jet_rows, labels = [], [], [], [], [], []
        for jets, x, reco, idx in pieces:
            rows = jets.particle_index(idx)
            xs.append(x[rows])
            if reco is not None:
                recos.append(reco[rows])
            if jets.tokens is not None:
                tokens.append(jets.tokens[rows])
            counts.append(jets.offsets[idx + 1] - jets.offsets[idx])
            jet_rows.append(jets.jet[idx])
            labels.append(jets.label[idx])
        counts = np.concatenate(counts)
        cu = np.zeros(len(counts) + 1, np.int32)
        np.cumsum(counts, out=cu[1:])
        return {
            "x": np.concatenate(xs),
            "cu_seqlens": cu,
            "max_seqlen": int(counts.max()) if len(counts) else 0,
            "labels": np.concatenate(labels),
            "jet": np.concatenate(jet_rows),
            "tokens": np.concatenate(tokens).astype(np.int64) if len(tokens) == len(pieces) else None,
            "reco": np.concatenate(recos) if len(recos) == len(pieces) else None,
        }

    def iterate_consumer(self, logical_worker: int):
        blocks = self.plan(logical_worker)
        block, offset = self.start_positions.get(logical_worker, (0, 0))
        pending = []  # (jets, x, reco, indices) pieces of the batch being assembled
        pending_jets = 0
        while block < len(blocks):
            jets, x, reco, order = self._load_block(blocks[block], logical_worker, block)
            while offset < len(order):
                take = min(self.batch_size - pending_jets, len(order) - offset)
                pending.append((jets, x, reco, order[offset : offset + take]))
                pending_jets += take
                offset += take
                if pending_jets == self.batch_size:
                    position = (block, offset) if offset < len(order) else (block + 1, 0)
                    yield self._make_batch(pending), (logical_worker, *position)
                    pending, pending_jets = [], 0
            block, offset = block + 1, 0
        if pending_jets and not self.drop_last:
            yield self._make_batch(pending), (logical_worker, len(blocks), 0)

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            for w in range(self.num_workers):  # num_workers == 1 in the main process
                yield from self.iterate_consumer(w)
            return
        torch.set_num_threads(1)
        yield from self.iterate_consumer((info.id + self.rotation) % self.num_workers)


def _keep_numpy(item):
    """DataLoader collate: pass numpy through (the default would convert in the worker)."""
    return item


def to_jet_batch(arrays: dict) -> JetBatch:
    """Wrap a batch of numpy arrays as tensors (zero-copy)."""
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return JetBatch(x=tensor(arrays["x"]), cu_seqlens=tensor(arrays["cu_seqlens"]), max_seqlen=arrays["max_seqlen"],
                    labels=tensor(arrays["labels"]), jet=tensor(arrays["jet"]), tokens=tensor(arrays["tokens"]),
                    reco=tensor(arrays["reco"]))


class JetLoader:
    """Epochs, DataLoader workers and the resume state of a JetDataset.

    `for batch in loader` runs the rest of the current epoch, then advances `loader.epoch`.
    With `drop_uneven`, every rank stops after the same number of batches (the minimum over
    ranks), so DDP ranks never wait on each other at the end of an epoch.
    """

    def __init__(self, dataset: JetDataset, num_workers: int = 0, drop_uneven: bool = False, prefetch_factor: int = 4):
        self.dataset = dataset
        self.num_workers = num_workers
        self.drop_uneven = drop_uneven
        self.prefetch_factor = prefetch_factor
        dataset.num_workers = max(1, num_workers)
        self.epoch = 0
        self._reset_epoch_state()

    def _reset_epoch_state(self):
        self.positions: dict[int, tuple[int, int]] = {}
        self.next_worker = 0
        self.batches_done = 0

    def batches_per_epoch(self) -> int:
        self.dataset.epoch = self.epoch
        if self.drop_uneven:
            return min(self.dataset.batches_in_epoch(r) for r in range(self.dataset.world_size))
        return self.dataset.batches_in_epoch(self.dataset.rank)

    def __iter__(self) -> Iterator[JetBatch]:
        ds = self.dataset
        ds.epoch = self.epoch
        ds.rotation = self.next_worker
        ds.start_positions = dict(self.positions)
        cap = self.batches_per_epoch() if self.drop_uneven else None
        if self.num_workers > 0:
            source = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_numpy,
                                prefetch_factor=self.prefetch_factor, persistent_workers=False)
        else:
            source = ds
        if cap is None or self.batches_done < cap:
            for arrays, (worker, block, offset) in source:
                self.positions[worker] = (block, offset)
                self.next_worker = (worker + 1) % ds.num_workers
                self.batches_done += 1
                yield to_jet_batch(arrays)
                if cap is not None and self.batches_done >= cap:
                    break
        self.epoch += 1
        self._reset_epoch_state()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "next_worker": self.next_worker,
            "batches_done": self.batches_done,
            "seed": self.dataset.seed,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "split": self.dataset.split,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.dataset.seed), ("world_size", self.dataset.world_size),
                          ("num_workers", self.num_workers), ("split", self.dataset.split)):
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)!r} but this run has {key}={mine!r}; "
                    "the same data order cannot be continued (start a new run, or resume with the same setting)"
                )
        self.epoch = int(state["epoch"])
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.next_worker = int(state["next_worker"])
        self.batches_done = int(state["batches_done"])


def make_loader(data_cfg, split: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle: bool = True, drop_uneven: bool = False, require_tokens: bool = False,
                batch_size: int | None = None) -> JetLoader:
    """Build the loader a stage trains or evaluates on, from the config's `data` section."""
    preprocessing = Preprocessing.from_config(data_cfg.features) if isinstance(data_cfg.features, dict) else data_cfg.features
    dataset = JetDataset(
        data_cfg.path,
        split,
        preprocessing,
        batch_size or data_cfg.batch_size,
        max_particles=data_cfg.max_particles,
        shuffle=shuffle,
        shuffle_buffer=data_cfg.shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        inputs=getattr(data_cfg, "inputs", "raw"),
        drop_last=drop_uneven,
        require_tokens=require_tokens,
        subset_jets=getattr(data_cfg, "train_jets", None) if split == data_cfg.train_split else None,
    )
    return JetLoader(dataset, num_workers=data_cfg.num_workers, drop_uneven=drop_uneven)
