"""The epoch plan: which jets every virtual stream reads, and in which order, for one epoch.

`EpochPlan` is a pure function of (seed, epoch), the split's units (chunks) and the global
batch: no ranks, no workers (the reader's module docstring describes the layout). It lives
apart from `data/reader.py` so the order can be read, tested and reused (subsets, sweeps)
without the loader's I/O and DataLoader machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shards import Manifest

@dataclass(frozen=True)
class Unit:
    shard: int
    chunk: int
    n_jets: int


@dataclass(frozen=True)
class Piece:
    """Jets [lo, hi) of unit `unit` (index into the split's units): what a stream reads of a chunk."""

    unit: int
    lo: int
    hi: int


def split_units(manifest: Manifest, split: str) -> list[Unit]:
    units = []
    for s, shard in enumerate(manifest.shards(split)):
        n_chunks, n_jets = shard["n_chunks"], shard["n_jets"]
        for c in range(n_chunks):
            size = manifest.chunk_size if c < n_chunks - 1 else n_jets - (n_chunks - 1) * manifest.chunk_size
            units.append(Unit(s, c, size))
    return units


def even_split(total: int, parts: int) -> list[int]:
    """`total` cut into `parts` sizes differing by at most one, the larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of a split for `streams` virtual streams: a pure function of (seed, epoch), no ranks.

    The epoch's units (chunks) are permuted (when shuffling) and their jets laid end to end; the
    global batch of `global_batch` jets takes `stream_batch[s]` of them from stream s (the sizes
    differ by at most one jet). Stream s reads the contiguous jet range that holds its share of
    every global batch, so the streams end together and less than one global batch is dropped
    (drop_last) or kept as a smaller last batch. A stream's range is read in blocks of
    `block_pieces` pieces whose jets are permuted with rng(seed, epoch, stream, block).
    """

    pieces: tuple[tuple[Piece, ...], ...]  # per stream, in reading order
    stream_batch: tuple[int, ...]  # jets of stream s in each full global batch
    last_batch: tuple[int, ...]  # jets of stream s in the partial last global batch (all 0: none)
    full_batches: int

    @property
    def n_batches(self) -> int:
        return self.full_batches + (sum(self.last_batch) > 0)

    def batch_size(self, stream: int, batch: int) -> int:
        return self.stream_batch[stream] if batch < self.full_batches else self.last_batch[stream]

    @classmethod
    def build(cls, units: list[Unit], seed: int, epoch: int, shuffle: bool, streams: int, global_batch: int,
              drop_last: bool) -> "EpochPlan":
        order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
        total = sum(u.n_jets for u in units)
        full = total // global_batch
        stream_batch = even_split(global_batch, streams)
        last = [0] * streams if drop_last else even_split(total - full * global_batch, streams)
        pieces, cursor = [], 0  # cursor: position in the epoch's jets laid end to end
        starts = np.concatenate([[0], np.cumsum([units[i].n_jets for i in order])])
        for s in range(streams):
            lo, hi = cursor, cursor + stream_batch[s] * full + last[s]
            cursor = hi
            mine = []
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            for k in range(max(first, 0), len(order)):
                if starts[k] >= hi:
                    break
                a, b = max(lo, starts[k]), min(hi, starts[k + 1])
                if b > a:
                    mine.append(Piece(int(order[k]), int(a - starts[k]), int(b - starts[k])))
            pieces.append(tuple(mine))
        return cls(tuple(pieces), tuple(stream_batch), tuple(last), full)
