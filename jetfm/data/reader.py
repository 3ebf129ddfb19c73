"""Reading shard sets: a resumable, deterministic jet loader whose order ignores the process count.

How an epoch is laid out (all of it a pure function of (seed, epoch); see `data/plan.py`):

1. Every (shard, chunk) of the split is a *unit*; the unit list is permuted with rng(seed, epoch)
   and its jets laid end to end.
2. A fixed number S of virtual *streams* (data.streams) each take a contiguous jet range of that
   sequence; a global batch (data.batch_size x processes x accumulation jets) is one batch from
   every stream, stream s giving the same share of every global batch. Less than one global
   batch per epoch is dropped (training) or read as a smaller last batch (evaluation).
3. A stream reads its range in blocks of about shuffle_buffer / S jets and permutes each block
   with rng(seed, epoch, stream, block).
4. A process serves a contiguous block of S / processes streams: its part of a global batch is
   its streams' batches in stream order, cut into train.grad_accum_steps micro-batches. Any
   process count that divides S therefore trains on the same global batches, and the position
   is just (epoch, global batches done): resuming with another process count or worker count
   continues the exact sequence (the global batch must stay the same).

DataLoader workers split a process's streams among themselves; `JetLoader` puts the pieces of
each global batch back together, so the order does not depend on the number of workers either.

Reading never unpickles: tar entries are plain .npy, loaded with allow_pickle=False.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import JetBatch
from .batching import concat_and_cut, cut_pieces, make_batch, to_jet_batch
from .features import Preprocessing, particle_features
from .format import DataError, JetArrays, chunk_entries, decode_chunk
from .plan import EpochPlan, Piece, even_split, split_units
from .remote import open_store
from .shards import Manifest
from .subset import subset_units


# --------------------------------------------------------------------------- raw chunk access
class ShardIndex:
    """Where the chunks of one shard lie, and reading one chunk with one (range) read.

    The byte spans come from the shard's manifest record (`chunks`, written since spans were
    recorded: nothing is read) or, for older shard sets, from the tar headers (a header walk of a
    local file; one streamed pass over a remote one). A read fetches exactly one chunk's span.
    """

    def __init__(self, store, shard: dict | str):
        self.store = open_store(store)
        record = shard if isinstance(shard, dict) else {"path": shard}
        self.relpath = record["path"]
        self.path = self.store.where(self.relpath)
        spans = record.get("chunks")
        if spans is None:
            spans = self.store.chunk_spans(self.relpath)
        self.spans = [(int(offset), int(length)) for offset, length in spans]

    def __len__(self) -> int:
        return len(self.spans)

    def read_named(self, index: int) -> tuple[str, JetArrays]:
        """(where, chunk) of chunk `index`: `where` names the shard and the chunk's key for messages."""
        offset, length = self.spans[index]
        data = self.store.read_range(self.relpath, offset, length)
        key, entries = chunk_entries(data, f"{self.path}@{offset}")
        where = f"{self.path}:{key}"
        return where, decode_chunk(entries, where)

    def read(self, index: int) -> JetArrays:
        return self.read_named(index)[1]



def _check_chunk(jets: JetArrays, manifest: Manifest, where: str) -> None:
    """The chunk against its manifest: shapes, finite values, labels, and what a tokenized set
    promises (token ids of every particle, inside the vocabulary; reco columns)."""
    jets.check(where, len(manifest.particle_features), len(manifest.jet_features), len(manifest.classes))
    if manifest.reco_features is not None and jets.reco is not None and jets.reco.shape[1] != len(manifest.reco_features):
        raise DataError(f"{where}: reco has {jets.reco.shape[1]} columns, manifest names {manifest.reco_features}")
    tokens = manifest.tokens or {}
    if tokens and jets.tokens is None:
        raise DataError(f"{where}: chunk has no tokens.npy, but the manifest describes a tokenized set (tokenizer "
                        f"{tokens.get('tokenizer')}); an untokenized shard was mixed in — rerun `jetfm data tokenize`")
    if manifest.reco_features and jets.reco is None:
        raise DataError(f"{where}: chunk has no reco.npy, but the manifest names reco features "
                        f"{manifest.reco_features}; rerun `jetfm data tokenize --with-reco`")
    codebook = tokens.get("codebook_size")
    if codebook is not None and jets.tokens is not None and len(jets.tokens):
        low, high = int(jets.tokens.min()), int(jets.tokens.max())
        if low < 1 or high > int(codebook):
            raise DataError(f"{where}: token ids span [{low}, {high}], expected particle tokens in [1, {codebook}] "
                            f"(codebook {codebook} of the manifest's tokenizer); the entry is corrupt or from "
                            f"another tokenizer")


def read_shard_chunks(directory, shard: dict, manifest: Manifest) -> Iterator[JetArrays]:
    """Every chunk of one shard (its manifest record) of the set at `directory` (a directory, URL
    or ShardStore), in file order, validated against the manifest."""
    index = ShardIndex(directory, shard)
    for i in range(len(index)):
        where, jets = index.read_named(i)
        _check_chunk(jets, manifest, where)
        yield jets


def verify_shards(directory, manifest: Manifest) -> None:
    """Check that every shard of the manifest exists and holds the chunk and jet counts it records
    (reads every chunk: the deep check of `jetfm data inspect`)."""
    store = open_store(directory)
    manifest.verify(store)
    for shards in manifest.splits.values():
        for shard in shards:
            n_jets = n_chunks = 0
            for jets in read_shard_chunks(store, shard, manifest):
                n_jets += len(jets)
                n_chunks += 1
            if (n_jets, n_chunks) != (shard["n_jets"], shard["n_chunks"]):
                raise DataError(
                    f"{store.where(shard['path'])}: holds {n_jets} jets in {n_chunks} chunks, manifest says "
                    f"{shard['n_jets']} jets in {shard['n_chunks']} chunks"
                )


def iterate_jets(directory, split: str) -> Iterator[JetArrays]:
    """Every chunk of a split in manifest order, unshuffled (for conversion, tokenizing, metrics);
    `directory` is a shard-set directory, a URL or a ShardStore."""
    store = open_store(directory)
    manifest = Manifest.load(store)
    for shard in manifest.shards(split):
        yield from read_shard_chunks(store, shard, manifest)


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


# --------------------------------------------------------------------------- the dataset
class JetDataset(IterableDataset):
    """Yields (stream, global batch index, batch arrays) for this process's streams, one epoch.

    The process serves streams [rank·k, (rank+1)·k), k = streams / world_size; in a DataLoader
    worker w, every num_workers-th of them. Use through `JetLoader`, which assembles the global
    batch's part of this process, cuts it into micro-batches, and owns epochs and resume state.
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
        cache_dir: str | Path | None = None,
        cache_gb: float | None = None,
        streams: int = 8,
        accum: int = 1,
        subset_jets: int | None = None,
    ):
        super().__init__()
        self.store = open_store(directory, cache_dir=cache_dir, cache_gb=cache_gb)
        self.directory = self.store.root  # a Path, or the URL of a remote set
        self.manifest = Manifest.load(self.store)
        self.split = split
        self.preprocessing = preprocessing
        self.batch_size = batch_size  # jets per process per micro-batch (on average)
        self.max_particles = max_particles
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accum = accum
        self.streams = streams
        self.inputs = inputs
        self.drop_last = drop_last
        if streams < 1 or streams % world_size:
            raise ValueError(
                f"{world_size} processes cannot share data.streams={streams} evenly: the number of processes must "
                f"divide data.streams (set data.streams to a multiple of {world_size}, e.g. {world_size * 8}, for a "
                "new run, or run a number of processes that divides it)")
        self.global_batch = batch_size * world_size * accum
        self.units = subset_units(split_units(self.manifest, split), subset_jets,
                                  where=f"{self.directory}: split {split!r}")
        if not self.units:
            raise DataError(f"{self.directory}: split {split!r} holds no jets")
        self.block_pieces = max(1, math.ceil(shuffle_buffer / (streams * self.manifest.chunk_size))) if shuffle else 1
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
            try:
                particle_features(np.zeros((0, len(self.manifest.particle_features)), np.float32),
                                  np.zeros(1, np.int64), self.manifest.particle_features, [name])
            except KeyError as error:
                raise DataError(f"{self.directory}: data.features asks for {error.args[0]}; use data that "
                                "carries it or drop it from data.features") from None
        # set by JetLoader before each iteration
        self.num_workers = 1
        self.epoch = 0
        self.start_batch = 0
        self._indices: dict[int, ShardIndex] = {}
        self._plans: dict[int, EpochPlan] = {}

    # ------------------------------------------------------------------ the plan
    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            self._plans = {epoch: EpochPlan.build(self.units, self.seed, epoch, self.shuffle, self.streams,
                                                  self.global_batch, self.drop_last)}
        return self._plans[epoch]

    def my_streams(self) -> list[int]:
        """This process's contiguous block of streams."""
        k = self.streams // self.world_size
        return list(range(self.rank * k, (self.rank + 1) * k))

    def micro_sizes(self, batch: int, epoch: int | None = None) -> list[int]:
        """Jets of each of this process's micro-batches of global batch `batch` (empty ones left out)."""
        plan = self.plan(epoch)
        part = sum(plan.batch_size(s, batch) for s in self.my_streams())
        return [n for n in even_split(part, self.accum) if n > 0]

    def batches_in_epoch(self, rank: int | None = None) -> int:
        """Micro-batches this process yields in a full epoch (pure arithmetic)."""
        plan = self.plan()
        n = plan.full_batches * sum(1 for n in even_split(sum(plan.stream_batch[s] for s in self.my_streams()),
                                                          self.accum) if n > 0)
        return n + (len(self.micro_sizes(plan.full_batches)) if plan.n_batches > plan.full_batches else 0)

    def shortfall(self) -> str:
        """Why an epoch holds no batch, in the knobs that fix it."""
        n_jets = sum(u.n_jets for u in self.units)
        return (f"{self.directory}: split {self.split!r} holds {n_jets} jets, fewer than one global batch of "
                f"{self.global_batch} (data.batch_size {self.batch_size} x {self.world_size} process(es) x "
                f"{self.accum} accumulation); lower data.batch_size or train.grad_accum_steps")

    # ------------------------------------------------------------------ loading
    def _prefetch(self, pieces, stream: int) -> None:
        """Ask the store to fetch these pieces' chunks ahead (a remote store overlaps their transfer
        with the current block's decoding; a local one ignores it)."""
        shards = self.manifest.shards(self.split)
        ranges = []
        for piece in pieces:
            unit = self.units[piece.unit]
            record = shards[unit.shard]
            if record.get("chunks") is not None:
                offset, length = record["chunks"][unit.chunk]
                ranges.append((record["path"], int(offset), int(length)))
        self.store.prefetch(ranges, owner=stream)

    def _load_block(self, pieces: tuple[Piece, ...], stream: int, block: int):
        shards = self.manifest.shards(self.split)
        parts = []
        for piece in pieces:
            unit = self.units[piece.unit]
            index = self._indices.get(unit.shard)
            if index is None:
                index = self._indices[unit.shard] = ShardIndex(self.store, shards[unit.shard])
                if len(index) != shards[unit.shard]["n_chunks"]:
                    raise DataError(
                        f"{index.path}: holds {len(index)} chunks, manifest {self.store.where(Manifest.FILENAME)} "
                        f"says {shards[unit.shard]['n_chunks']}; the manifest disagrees with its shards"
                    )
            where, jets = index.read_named(unit.chunk)
            _check_chunk(jets, self.manifest, where)
            if len(jets) != unit.n_jets:
                raise DataError(f"{where}: holds {len(jets)} jets, manifest implies {unit.n_jets}")
            parts.append(jets if (piece.lo, piece.hi) == (0, len(jets)) else jets.select(np.arange(piece.lo, piece.hi)))
        jets = JetArrays.concat(parts)
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
            order = np.random.default_rng([self.seed, self.epoch, stream, block]).permutation(len(jets))
        else:
            order = np.arange(len(jets))
        return jets, x, reco, order

    def iterate_stream(self, stream: int, start_batch: int = 0):
        """(batch index, arrays or None when empty) of one stream from global batch `start_batch` on."""
        for j, pieces in self.iterate_pieces(stream, start_batch):
            yield j, (make_batch(pieces) if pieces else None)

    def iterate_pieces(self, stream: int, start_batch: int = 0):
        """(batch index, [(jets, x, reco, jet indices), ...]) of one stream from global batch
        `start_batch` on: O(1) to start, the position is arithmetic (jets before it = start_batch x
        the stream's batch size)."""
        plan = self.plan()
        pieces = plan.pieces[stream]
        blocks = [pieces[i : i + self.block_pieces] for i in range(0, len(pieces), self.block_pieces)]
        block_ends = np.cumsum([sum(p.hi - p.lo for p in b) for b in blocks]).tolist()
        skip = plan.stream_batch[stream] * min(start_batch, plan.full_batches)
        block = int(np.searchsorted(block_ends, skip, side="right"))
        offset = skip - (block_ends[block - 1] if block else 0)
        loaded = None
        for j in range(start_batch, plan.n_batches):
            want, batch = plan.batch_size(stream, j), []
            while want:
                if loaded is None or loaded[0] != block:
                    self._prefetch([*blocks[block], *(blocks[block + 1] if block + 1 < len(blocks) else ())], stream)
                    loaded = (block, *self._load_block(blocks[block], stream, block))
                _, jets, x, reco, order = loaded
                take = min(want, len(order) - offset)
                batch.append((jets, x, reco, order[offset : offset + take]))
                want -= take
                offset += take
                if offset == len(order):
                    block, offset = block + 1, 0
            yield j, batch

    def __iter__(self):
        """(stream, batch, arrays), batch-major, for this process's streams (a worker's share of them)."""
        streams = self.my_streams()
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
            streams = streams[info.id :: info.num_workers]
        iterators = [(s, self.iterate_stream(s, self.start_batch)) for s in streams]
        for _ in range(self.start_batch, self.plan().n_batches):
            for s, iterator in iterators:
                j, arrays = next(iterator)
                yield s, j, arrays




def _keep_numpy(item):
    """DataLoader collate: pass numpy through (the default would convert in the worker)."""
    return item


def _worker_init(parent_pid: int, worker_id: int) -> None:
    """A worker dies with the training process: PR_SET_PDEATHSIG (Linux) delivers SIGKILL to the
    worker when its parent exits, however it exits (SIGKILL included); elsewhere, or if the parent
    is already gone, the worker leaves at once. SIGTERM/SIGINT sent to the whole process group (a
    pre-empted SLURM step, Ctrl-C) are the trainer's to handle: it checkpoints, then exits, and
    the workers go with it."""
    import ctypes
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # died between fork and prctl
        os._exit(1)


class JetLoader:
    """Epochs, DataLoader workers and the resume state of a JetDataset.

    `for batch in loader` runs the rest of the current epoch, then advances `loader.epoch`. Each
    global batch of the epoch becomes this process's micro-batches: its streams' batches laid end
    to end in stream order and cut into `accum` near-equal pieces, so any process count that
    divides the number of streams (with equal data.batch_size x processes x accumulation) sees
    the same global batches. The state is (epoch, global batches done): independent of the
    process count and of the workers; exact with any number of workers (they never draw from
    the global RNG: the DataLoader gets its own generator).
    """

    def __init__(self, dataset: JetDataset, num_workers: int = 0, drop_uneven: bool = False, prefetch_factor: int = 4):
        self.dataset = dataset
        self.num_workers = num_workers
        self.drop_uneven = drop_uneven  # kept for callers: every process yields the same count by construction
        self.prefetch_factor = prefetch_factor
        dataset.num_workers = max(1, num_workers)
        self.epoch = 0
        self._reset_epoch_state()

    def _reset_epoch_state(self):
        self.global_done = 0  # global batches fully consumed this epoch
        self.micro_done = 0  # micro-batches of the current global batch consumed
        self.batches_done = 0  # micro-batches consumed this epoch (for the epoch fraction)

    def batches_per_epoch(self) -> int:
        self.dataset.epoch = self.epoch
        return self.dataset.batches_in_epoch()

    def _global_batches(self, ds: JetDataset):
        """(global batch index, this process's micro-batches as arrays), from global_done on."""
        streams, first, n = ds.my_streams(), self.global_done, ds.plan().n_batches
        if self.num_workers == 0:  # pieces of every stream straight into the micro-batches: one copy
            iterators = [ds.iterate_pieces(s, first) for s in streams]
            for j in range(first, n):
                pieces = [p for it in iterators for p in next(it)[1]]
                yield j, [make_batch(group) for group in cut_pieces(pieces, ds.micro_sizes(j))]
            return
        # workers send each stream's batch (tagged); put every global batch's part together in stream order
        source = self._source(ds)
        pending: dict[int, dict[int, dict | None]] = {}
        try:
            for j in range(first, n):
                while len(pending.get(j, ())) < len(streams):
                    s, jj, arrays = next(source)
                    pending.setdefault(jj, {})[s] = arrays
                parts = [pending[j][s] for s in streams if pending[j][s] is not None]
                del pending[j]
                yield j, concat_and_cut(parts, ds.micro_sizes(j)) if parts else []
        finally:
            del source  # shuts the workers down

    def _source(self, ds: JetDataset):
        import os

        generator = torch.Generator().manual_seed(ds.seed)  # the DataLoader's seed draw leaves the global RNG alone
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_numpy,
                               prefetch_factor=self.prefetch_factor, persistent_workers=False, generator=generator,
                               worker_init_fn=functools.partial(_worker_init, os.getpid())))

    def __iter__(self) -> Iterator[JetBatch]:
        ds = self.dataset
        ds.epoch = self.epoch
        ds.start_batch = self.global_done
        for j, micro in self._global_batches(ds):
            if not micro:
                self.global_done = j + 1
            for arrays in micro[self.micro_done :]:
                # the position after this batch, set before handing it out (a checkpoint comes after a step)
                self.micro_done += 1
                self.batches_done += 1
                if self.micro_done == len(micro):
                    self.global_done, self.micro_done = j + 1, 0
                yield to_jet_batch(arrays)
        self.epoch += 1
        self._reset_epoch_state()

    def state_dict(self) -> dict:
        """The data position, the same on every process: a run resumes it with any process count."""
        ds = self.dataset
        return {
            "epoch": self.epoch,
            "global_batches_done": self.global_done,
            "micro_batches_done": self.micro_done,
            "micro_layout": [ds.world_size, ds.accum],  # what micro_batches_done counts in
            "seed": ds.seed,
            "streams": ds.streams,
            "global_batch": ds.global_batch,
            "split": ds.split,
        }

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        if "streams" not in state:
            raise ValueError("loader state was saved by an older jetfm (per-process data positions); resume it with "
                             "that version, or start a new run from its weights (train.init_from=CHECKPOINT)")
        for key, mine, knob in (("seed", ds.seed, "seed"), ("streams", ds.streams, "data.streams"),
                                ("split", ds.split, "data.train_split"),
                                ("global_batch", ds.global_batch,
                                 "the global batch, data.batch_size x processes x train.grad_accum_steps")):
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)!r} but this run has {mine!r} ({knob}); the "
                    "same data order cannot be continued: resume with the same value, or start a new run from "
                    "its weights (train.init_from=CHECKPOINT)")
        micro = int(state.get("micro_batches_done", 0))
        if micro and list(state.get("micro_layout", [])) != [ds.world_size, ds.accum]:
            raise ValueError("loader state was saved inside a global batch by another process count or accumulation; "
                             "it resumes only with the same ones")
        self.epoch = int(state["epoch"])
        self.global_done = int(state["global_batches_done"])
        self.micro_done = micro
        ds.epoch = self.epoch
        self.batches_done = sum(len(ds.micro_sizes(j)) for j in range(self.global_done)) + micro


def make_loader(data_cfg, split: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle: bool = True, drop_uneven: bool = False, require_tokens: bool = False,
                batch_size: int | None = None, accum: int = 1) -> JetLoader:
    """Build the loader a stage trains or evaluates on, from the config's `data` section.

    drop_uneven drops the epoch's partial last global batch (training); without it the last
    global batch is smaller (evaluation reads every jet).
    """
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
        cache_dir=getattr(data_cfg, "cache_dir", None),
        cache_gb=getattr(data_cfg, "cache_gb", None),
        streams=getattr(data_cfg, "streams", 8),
        accum=accum,
        subset_jets=getattr(data_cfg, "train_jets", None) if split == data_cfg.train_split else None,
    )
    return JetLoader(dataset, num_workers=data_cfg.num_workers, drop_uneven=drop_uneven)
