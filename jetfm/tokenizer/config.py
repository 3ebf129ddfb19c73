"""TokenizerConfig: the `tokenizer:` section of a jetfm config (docs/METHOD.md §2).

Defaults are the reference settings (hidden 128, 8 heads, 4+4 blocks, latent 8, 8192 codes,
β 0.9, VQ weight 10, dead-code replacement every 500 steps, particles shuffled within jets).
Where the reference is silent (MLP width, affine learning-rate multiplier, dead-code threshold,
collapse guard) the choice is jetfm's and the field docstring says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jetfm.choices import check_choices


@dataclass
class TokenizerConfig:
    hidden_dim: int = 128
    """Width of the encoder and decoder transformer blocks."""
    num_heads: int = 8
    """Attention heads per block; must divide hidden_dim."""
    encoder_blocks: int = 4
    """Bidirectional (pre-LayerNorm) transformer blocks of the encoder."""
    decoder_blocks: int = 4
    """Causal transformer blocks of the decoder: particle i is decoded from codes 0..i only."""
    mlp_ratio: int = 4
    """MLP hidden width = mlp_ratio × hidden_dim (GELU)."""
    latent_dim: int = 8
    """Dimension of the encoder output and of every codebook vector."""
    codebook_size: int = 8192
    """Number of codes K. Token ids: start 0, particle code+1, stop K+1 (vocabulary K+2)."""
    beta: float = 0.9
    """Commitment weight: vq_loss = ‖sg(z) − q‖² + beta · ‖z − sg(q)‖² (mean over particles)."""
    vq_weight: float = 10.0
    """loss = masked MSE reconstruction + vq_weight × vq_loss."""
    codebook_update: Literal["affine", "ema"] = "affine"
    """How codes learn. "affine": codebook = shift + scale ⊙ W with W (K, D) and the shared
    shift/scale (D) trained by gradient (Huh et al. 2023 affine re-parametrisation, the
    reference's choice). "ema": codes are exponential moving averages of their assigned encoder
    outputs (no gradient). Default "affine": equal to "ema" in the jetfm measurement (table in
    jetfm/tokenizer/codebook.py), it is the reference's method, and it needs no collective
    communication inside forward."""
    affine_lr: float = 2.0
    """Learning-rate multiplier of the shared affine shift/scale (0 freezes them at their
    data-dependent start: a plain learned codebook). Implemented as a parameter scale, so it
    holds for Adam(W)."""
    sync_nu: float = 0.0
    """Synchronised update (Huh et al.): the codebook also receives nu × the reconstruction
    gradient through the straight-through estimator. 0 = plain straight-through."""
    ema_decay: float = 0.99
    """Decay of the "ema" codebook update (ignored for "affine")."""
    codebook_init: Literal["sample", "gaussian", "kmeans"] = "sample"
    """How codes start, from the first training batch's encoder outputs z: "sample" (random
    z's; default: ≈4× the early perplexity of "gaussian"), "gaussian" (N(mean z, std z²)) or
    "kmeans" (k-means centres; seconds of CPU for 8192 codes)."""
    kmeans_iters: int = 10
    """Lloyd iterations of the k-means initialisation."""
    dead_code_every: int = 500
    """Replace dead codes every this many optimizer steps (0 disables replacement)."""
    dead_code_threshold: float = 1.0
    """A code is dead when it was assigned fewer than this many particles since the last
    replacement; it is re-seeded with a randomly chosen recent encoder output."""
    replacement_pool: int = 65536
    """Recent encoder outputs kept (ring buffer) to re-seed dead codes from."""
    min_utilisation: float = 0.01
    """Collapse guard: after utilisation_warmup steps, the fraction of codes used within a
    dead-code window must reach this, else a warning or an error (on_collapse)."""
    utilisation_warmup: int = 1000
    """Optimizer steps before the collapse guard is active."""
    on_collapse: Literal["warn", "raise"] = "warn"
    """"warn" (UserWarning) or "raise" (CodebookCollapseError) when utilisation is too low."""
    shuffle_particles: bool = True
    """Shuffle particles within each jet during training (reference). The encoder is
    permutation-equivariant (no positional encoding), so codes do not depend on the order;
    the causal decoder learns to decode in any order and is run in pT order at inference."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs."""
    attention: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention backend of the encoder/decoder blocks (models/attention.py): `auto` (flash on
    CUDA under bf16 when installed, jetfm's kernel on CPU, else SDPA), `sdpa` (any device) or
    `flash` (flash-attn, CUDA, under bf16 mixed precision). Exports load with auto by default."""
    checkpoint: str | None = None
    """Directory of a trained tokenizer (written by save_tokenizer), used by later stages
    (tokenize, pre-training with continuous/reco inputs, generation)."""

    def __post_init__(self):
        check_choices(self, "tokenizer")
        for name in ("hidden_dim", "num_heads", "encoder_blocks", "decoder_blocks", "mlp_ratio",
                     "latent_dim", "codebook_size", "kmeans_iters", "replacement_pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tokenizer.{name} must be a positive integer, got {value!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"tokenizer.hidden_dim {self.hidden_dim} is not divisible by tokenizer.num_heads {self.num_heads}"
            )
        if self.codebook_size < 2:
            raise ValueError(f"tokenizer.codebook_size must be at least 2, got {self.codebook_size}")
        if self.beta < 0 or self.vq_weight < 0 or self.affine_lr < 0 or self.sync_nu < 0:
            raise ValueError("tokenizer.beta, vq_weight, affine_lr and sync_nu must be non-negative")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"tokenizer.ema_decay must lie in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"tokenizer.dropout must lie in [0, 1), got {self.dropout}")
        if self.dead_code_every < 0 or self.utilisation_warmup < 0 or self.dead_code_threshold < 0:
            raise ValueError("tokenizer.dead_code_every, utilisation_warmup and dead_code_threshold must be >= 0")
        if not 0.0 <= self.min_utilisation <= 1.0:
            raise ValueError(f"tokenizer.min_utilisation must lie in [0, 1], got {self.min_utilisation}")
        if self.min_utilisation > 0 and self.dead_code_every == 0:
            raise ValueError(
                "tokenizer.min_utilisation > 0 needs tokenizer.dead_code_every > 0 (utilisation is measured per window)"
            )

    @property
    def vocab_size(self) -> int:
        """Token vocabulary: start 0, codes 1..K, stop K+1."""
        return self.codebook_size + 2
