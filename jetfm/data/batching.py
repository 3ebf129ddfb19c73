"""Batch assembly: pieces of decoded chunks packed into batch arrays, cut into micro-batches.

A batch travels as a dict of numpy arrays (packed particles `x`, `cu_seqlens`, labels, tokens,
reco) from the DataLoader workers to the loader, which regroups the streams' batches of a global
batch (`concat_and_cut`) and wraps each micro-batch as a `JetBatch` (`to_jet_batch`). Kept apart
from `data/reader.py`, which decides what is read and when; this decides only how it is packed.
"""

from __future__ import annotations

import numpy as np
import torch

from .batch import JetBatch


def make_batch(pieces) -> dict[str, np.ndarray | int | None]:
    """pieces: list of (jets, x, reco, jet_indices) from one or more blocks.

    Returns numpy arrays, not tensors: from a worker process they travel by value through the
    pipe, which for batch-sized arrays is far cheaper than torch's shared-memory files.
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
    return _packed(xs, counts, labels, jet_rows, tokens if len(tokens) == len(pieces) else None,
                   recos if len(recos) == len(pieces) else None)


def _packed(xs, counts, labels, jet_rows, tokens, recos) -> dict:
    counts = np.concatenate(counts)
    cu = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=cu[1:])
    return {
        "x": np.concatenate(xs),
        "cu_seqlens": cu,
        "max_seqlen": int(counts.max()) if len(counts) else 0,
        "labels": np.concatenate(labels),
        "jet": np.concatenate(jet_rows),
        "tokens": None if tokens is None else np.concatenate(tokens).astype(np.int64),
        "reco": None if recos is None else np.concatenate(recos),
    }


def cut_pieces(pieces: list, sizes: list[int]) -> list[list]:
    """Pieces (jets, x, reco, jet indices) laid end to end, cut into groups of `sizes` jets."""
    out, queue = [], list(pieces)
    for n in sizes:
        group = []
        while n:
            jets, x, reco, idx = queue.pop(0)
            if len(idx) > n:
                queue.insert(0, (jets, x, reco, idx[n:]))
                idx = idx[:n]
            group.append((jets, x, reco, idx))
            n -= len(idx)
        out.append(group)
    return out


def concat_and_cut(parts: list[dict], sizes: list[int]) -> list[dict]:
    """Stream batches laid end to end (stream order), cut into micro-batches of `sizes` jets."""
    counts = np.concatenate([np.diff(p["cu_seqlens"]) for p in parts])
    x = np.concatenate([p["x"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    jet = np.concatenate([p["jet"] for p in parts])
    tokens = np.concatenate([p["tokens"] for p in parts]) if all(p["tokens"] is not None for p in parts) else None
    reco = np.concatenate([p["reco"] for p in parts]) if all(p["reco"] is not None for p in parts) else None
    rows = np.concatenate([[0], np.cumsum(counts)])
    out, lo = [], 0
    for n in sizes:
        a, b = rows[lo], rows[lo + n]
        out.append(_packed([x[a:b]], [counts[lo : lo + n]], [labels[lo : lo + n]], [jet[lo : lo + n]],
                           None if tokens is None else [tokens[a:b]], None if reco is None else [reco[a:b]]))
        lo += n
    return out


def to_jet_batch(arrays: dict) -> JetBatch:
    """Wrap a batch of numpy arrays as tensors (zero-copy)."""
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return JetBatch(x=tensor(arrays["x"]), cu_seqlens=tensor(arrays["cu_seqlens"]), max_seqlen=arrays["max_seqlen"],
                    labels=tensor(arrays["labels"]), jet=tensor(arrays["jet"]), tokens=tensor(arrays["tokens"]),
                    reco=tensor(arrays["reco"]))
