"""JetBatch: what the reader hands to every model — jets packed without padding.

Legend: B jets, T = sum of multiplicities (particles in the batch), N = max multiplicity,
F model features, J jet features.

Packed is the native layout (no compute on padding); `padded()` gives (B, N, F) + mask for
code that wants it. Within each jet, particles are sorted by pT, descending.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class JetBatch:
    x: torch.Tensor  # (T, F) float32 preprocessed particle features
    cu_seqlens: torch.Tensor  # (B + 1,) int32, cumulative multiplicities, starts at 0
    max_seqlen: int  # N
    labels: torch.Tensor  # (B,) int64 class index
    jet: torch.Tensor  # (B, J) float32 raw jet features (manifest["jet_features"] order)
    tokens: torch.Tensor | None = None  # (T,) int64 token ids (code + 1), when shards carry them
    reco: torch.Tensor | None = None  # (T, F) float32 preprocessed tokenizer-reconstructed features

    @property
    def num_jets(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_particles(self) -> int:
        return self.x.shape[0]

    @property
    def seqlens(self) -> torch.Tensor:
        """(B,) multiplicities."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device, non_blocking: bool = False) -> "JetBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return JetBatch(**moved)

    def jets(self, first: int, stop: int) -> "JetBatch":
        """Jets first..stop-1 as a batch of their own (views of the packed tensors, no copy);
        `max_seqlen` stays this batch's (an upper bound is all the models need)."""
        if not 0 <= first < stop <= self.num_jets:
            raise ValueError(f"JetBatch.jets: need 0 <= first < stop <= {self.num_jets}, got {first}, {stop}")
        t0, t1 = (int(v) for v in self.cu_seqlens[[first, stop]])
        return JetBatch(
            x=self.x[t0:t1], cu_seqlens=self.cu_seqlens[first:stop + 1] - t0, max_seqlen=self.max_seqlen,
            labels=self.labels[first:stop], jet=self.jet[first:stop],
            tokens=None if self.tokens is None else self.tokens[t0:t1],
            reco=None if self.reco is None else self.reco[t0:t1],
        )

    def pin_memory(self) -> "JetBatch":
        return JetBatch(
            **{f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)}
        )

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(jet index, position within jet) of every packed particle, each (T,) int64."""
        lengths = self.seqlens.long()
        jet_index = torch.repeat_interleave(torch.arange(self.num_jets, device=lengths.device), lengths)
        position = torch.arange(self.num_particles, device=lengths.device) - self.cu_seqlens[:-1].long()[jet_index]
        return jet_index, position

    def pad(self, values_T: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Scatter a packed (T, ...) tensor into (B, N, ...), filling absent particles."""
        jet_index, position = self.positions()
        out = values_T.new_full((self.num_jets, self.max_seqlen) + tuple(values_T.shape[1:]), fill)
        out[jet_index, position] = values_T
        return out

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BNF, mask_BN) with mask True at real particles."""
        jet_index, position = self.positions()
        mask = torch.zeros(self.num_jets, self.max_seqlen, dtype=torch.bool, device=self.x.device)
        mask[jet_index, position] = True
        return self.pad(self.x), mask
