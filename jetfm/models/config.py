"""Config sections of the pre-training stage: the model (`model:`) and the objective (`objective:`).

Reference defaults are the published example settings (docs/METHOD.md §3). The vocabulary is NOT a
model setting: it comes from the data manifest (`manifest.tokens["codebook_size"]`), with
start = 0, particle = code + 1, stop = codebook_size + 1, vocab = codebook_size + 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jetfm.choices import check_choices


@dataclass
class ModelConfig:
    dim: int = 128
    """Width of the residual stream (backbone and heads)."""

    num_heads: int = 8
    """Attention heads per block; `dim` must be divisible by it."""

    num_blocks: int = 8
    """Pre-LayerNorm transformer blocks in the backbone."""

    mlp_ratio: float = 4.0
    """Backbone MLP hidden width = mlp_ratio * dim (GELU)."""

    dropout: float = 0.1
    """Dropout on the residual branches (attention output and MLP output). Never applied to logits."""

    input_mode: Literal["continuous", "token"] = "continuous"
    """`continuous`: Linear projection of per-particle features (raw or tokenizer-reconstructed,
    see `data.inputs`) with a trainable start vector; `token`: embedding table over token ids."""

    num_features: int | None = None
    """Width F of the continuous input; None = number of entries in `data.features`."""

    head_blocks: int = 2
    """Transformer blocks in each pre-training head (NTP, MPM)."""

    head_mlp_ratio: float = 2.0
    """Head MLP hidden width = head_mlp_ratio * dim."""

    attention: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention kernel: `auto` (flash-attn on CUDA when installed and under bf16/fp16, else
    torch SDPA; on CPU jetfm's compiled kernel for packed jets, else SDPA), `sdpa` (torch SDPA,
    any device: the portable reference path) or `flash` (flash-attn varlen, CUDA, fp16/bf16
    only). The weights do not depend on it. An unsupported combination raises when the model is built. The values are
    those of `jetfm.models.attention.AttentionBackend` (a test keeps the two equal)."""

    conditioning: Literal["none", "multiplicity", "class"] = "none"
    """Jet-level conditioning added to every position of the backbone input: `none`,
    `multiplicity` (embedding of the number of particles n) or `class` (embedding of the label)."""

    max_particles: int = 128
    """Largest multiplicity the model accepts; the NTP sequence is at most max_particles + 1 long
    (start + particles), which is also the generation length limit and the KV-cache size."""

    def __post_init__(self):
        check_choices(self, "model")
        for name in ("dim", "num_heads", "num_blocks", "head_blocks", "max_particles"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0 or self.head_mlp_ratio <= 0:
            raise ValueError("model.mlp_ratio and model.head_mlp_ratio must be > 0")
        if self.num_features is not None and self.num_features < 1:
            raise ValueError(f"model.num_features must be >= 1 or null, got {self.num_features}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class ObjectiveConfig:
    name: Literal["ntp", "mpm", "joint"] = "joint"
    """Pre-training objective: `ntp` (next-token prediction, causal), `mpm` (masked-particle
    modelling, bidirectional) or `joint` (both; loss = ntp_weight * L_ntp + mpm_weight * L_mpm)."""

    mask_fraction: float = 0.4
    """MPM: fraction of each jet's particles that is masked: exactly floor(mask_fraction * n + 0.5)
    particles, clipped to [1, n - 1] for n >= 2; single-particle jets mask nothing."""

    ntp_weight: float = 1.0
    """Weight of the NTP cross-entropy in the joint loss (ignored unless name == joint)."""

    mpm_weight: float = 1.0
    """Weight of the MPM cross-entropy in the joint loss (ignored unless name == joint)."""

    num_mask_vectors: int | None = None
    """Learned MPM mask vectors (mask vector k goes to the k-th highest-pT masked particle);
    None = model.max_particles (always enough)."""

    def __post_init__(self):
        check_choices(self, "objective")
        if not 0.0 < self.mask_fraction < 1.0:
            raise ValueError(f"objective.mask_fraction must be in (0, 1), got {self.mask_fraction}")
        if self.ntp_weight < 0 or self.mpm_weight < 0:
            raise ValueError("objective.ntp_weight and objective.mpm_weight must be >= 0")
        if self.name == "joint" and self.ntp_weight == 0 and self.mpm_weight == 0:
            raise ValueError("objective.name=joint needs ntp_weight > 0 or mpm_weight > 0")
        if self.num_mask_vectors is not None and self.num_mask_vectors < 1:
            raise ValueError(f"objective.num_mask_vectors must be >= 1 or null, got {self.num_mask_vectors}")

    @property
    def uses_ntp(self) -> bool:
        return self.name in ("ntp", "joint")

    @property
    def uses_mpm(self) -> bool:
        return self.name in ("mpm", "joint")
