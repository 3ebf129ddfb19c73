"""Nested training subsets for data-scaling studies: D1 ⊂ D2 ⊂ … of a split, without copying shards.

    units = subset_units(split_units(manifest, "train"), train_jets=20_000, where="data/shards")

How: the split's chunks are put in one fixed order — a permutation drawn from a constant seed,
independent of the run's seed, the process count and the number of workers — and a subset of N
jets is the shortest prefix of that order holding at least N jets. Prefixes of one order nest, so
every smaller subset lies inside every larger one; the same shard set gives the same subset on
every machine. The run's own shuffle (`data.reader`, seeded per run and epoch) then permutes
within the subset.

Why whole chunks, not a partial last chunk or a per-jet hash: the chunk is the reader's unit of
work (its resume position, its rank split and its integrity check are per chunk), so a chunk
subset leaves the reader untouched, costs nothing per jet, and reads no byte it does not train
on. The price is granularity: N is rounded up to whole chunks (≤ one chunk, ≈1,000 jets, over).
The exact count is what the run records and the scaling fit uses (`unique_jets`), so the
rounding moves a point along D, it never mislabels one. Generated shards are written in random
order and converted ones are shuffled across chunks at conversion, so a chunk prefix is a random
sample of jets, not a slice of one file.

Validation never goes through this: it always reads the whole held-out split.
"""

from __future__ import annotations

import numpy as np

from .format import DataError

#: The fixed seed of the subset order: not a knob, so that subsets of one shard set always nest.
SUBSET_ORDER_SEED = 20_260_101


def subset_order(n_units: int) -> np.ndarray:
    """The fixed order in which chunks join a growing subset (a permutation of range(n_units))."""
    return np.random.default_rng(SUBSET_ORDER_SEED).permutation(n_units)


def subset_units(units: list, train_jets: int | None, *, where: str) -> list:
    """The chunks (reader units with `.n_jets`) of the nested subset of at least `train_jets` jets,
    in their original order; all units when train_jets is None. `where` names the shard set in errors."""
    if train_jets is None:
        return units
    if train_jets < 1:
        raise DataError(f"{where}: data.train_jets must be >= 1, got {train_jets}")
    order = subset_order(len(units))
    cumulative = np.cumsum([units[i].n_jets for i in order])
    if not len(cumulative) or train_jets > cumulative[-1]:
        have = int(cumulative[-1]) if len(cumulative) else 0
        raise DataError(f"{where}: data.train_jets={train_jets} exceeds the {have} jets of the training split; "
                        "lower data.train_jets or generate more jets")
    k = int(np.searchsorted(cumulative, train_jets)) + 1  # shortest prefix holding >= train_jets
    return [units[i] for i in sorted(order[:k])]


def subset_jets(units: list) -> int:
    """Jets in a list of units: a subset's exact size (unique jets of the run)."""
    return int(sum(u.n_jets for u in units))
