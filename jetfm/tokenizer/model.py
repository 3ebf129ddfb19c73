"""VQ-VAE particle tokenizer: bidirectional transformer encoder → codebook → causal decoder.

    python jetfm/train.py --config configs/tokenizer.yaml        # trains it (stage: tokenizer)

Legend: B jets, N max multiplicity, T packed particles (sum of multiplicities), F features,
H hidden width, A heads, E head width (H / A), D latent width, K codes, L cache capacity.

- Encoder: per-particle linear embedding, `encoder_blocks` pre-LayerNorm blocks with full
  (bidirectional) attention within each jet, linear to D. No positional encoding, so a
  particle's code does not depend on the order of the particles in its jet.
- Codebook (codebook.py): nearest code, straight-through gradient, vq_loss.
- Decoder: linear from D, `decoder_blocks` **causal** blocks, linear to F: particle i is
  decoded from codes 0..i, so a generated jet can be decoded one particle at a time with a
  KV cache (`new_cache` / `decode_step`), equal to full decoding.
- Order: during training the particles are shuffled within each jet (reference,
  `shuffle_particles`), so the decoder learns to decode a particle from any subset of the
  others presented before it. At inference (`encode`, `decode`, `decode_step`) the order is
  the stored one — pT-descending — which is the order the backbone generates tokens in.
- Loss: MSE over real particles (packed, so no padding enters) + vq_weight × vq_loss.

Token ids (docs/DATA.md): start 0, particle code + 1 (1..K), stop K + 1.

Layout: tokens stay packed (T, H) through every Linear, LayerNorm and MLP; only attention pads
q/k/v, per group of ≤ ATTENTION_GROUP_JETS jets sorted by multiplicity (Layout), and runs
torch SDPA — `is_causal=True` in the decoder, a key-padding mask in the encoder. (The shared
packed attention module, jetfm/models/attention.py, may replace this later.)
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts.atomic import atomic_directory
from ..models.objectives import LossNorm, Ratio
from ..data.features import (
    DERIVED_FEATURES,
    FeatureTransform,
    Preprocessing,
    feature_spec,
    same_features,
)
from .codebook import Codebook, CodebookCollapseError, code_statistics, collapse_message, nearest_codes
from .config import TokenizerConfig

CHECKPOINT_FORMAT = "jetfm-tokenizer"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"


class TokenIdError(ValueError):
    """Token ids outside the range an operation accepts."""


class TokenizerMismatchError(ValueError):
    """A tokenizer's features/preprocessing differ from the data's or the config's."""


# ---------------------------------------------------------------------- token ids
def check_token_ids(ids: torch.Tensor, codebook_size: int, *, allow_special: bool = False, where: str = "token ids") -> None:
    """Raise TokenIdError unless every id is a particle token 1..K (or 0..K+1 with allow_special)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TokenIdError(f"{where}: token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = (0, codebook_size + 1) if allow_special else (1, codebook_size)
    bad = (ids < low) | (ids > high)
    if bool(bad.any()):
        positions = torch.nonzero(bad.flatten()).flatten()[:5].tolist()
        values = ids.flatten()[positions].tolist()
        kind = "token ids" if allow_special else "particle token ids"
        raise TokenIdError(
            f"{where}: {int(bad.sum())} {kind} outside [{low}, {high}] (codebook_size {codebook_size}; "
            f"start 0, particle = code + 1, stop {codebook_size + 1}); first bad values {values} at positions {positions}"
        )


def add_start_stop(ids_T: torch.Tensor, cu_seqlens: torch.Tensor, codebook_size: int):
    """Wrap every jet's particle tokens as [0, ..., K+1]. Returns (ids (T + 2B,), cu_seqlens (B+1,))."""
    check_token_ids(ids_T, codebook_size, where="add_start_stop")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_jets = lengths.numel()
    new_cu = torch.zeros(n_jets + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    new_cu[1:] = torch.cumsum(lengths + 2, 0)
    out = torch.empty(ids_T.numel() + 2 * n_jets, dtype=ids_T.dtype, device=ids_T.device)
    out[new_cu[:-1].long()] = 0
    out[new_cu[1:].long() - 1] = codebook_size + 1
    jet_index = torch.repeat_interleave(torch.arange(n_jets, device=ids_T.device), lengths)
    # particle p of jet b moves right by 2b (earlier starts/stops) + 1 (its own start)
    body = torch.arange(ids_T.numel(), device=ids_T.device) + 2 * jet_index + 1
    out[body] = ids_T
    return out, new_cu


def strip_start_stop(ids: torch.Tensor, cu_seqlens: torch.Tensor, codebook_size: int):
    """Inverse of add_start_stop; raises TokenIdError if a jet is not [0, particles..., K+1]."""
    check_token_ids(ids, codebook_size, allow_special=True, where="strip_start_stop")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if bool((lengths < 2).any()):
        raise TokenIdError("strip_start_stop: every jet needs at least its start and stop token")
    starts, stops = cu_seqlens[:-1].long(), cu_seqlens[1:].long() - 1
    if bool((ids[starts] != 0).any()) or bool((ids[stops] != codebook_size + 1).any()):
        raise TokenIdError(f"strip_start_stop: every jet must begin with 0 (start) and end with {codebook_size + 1} (stop)")
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[starts] = False
    keep[stops] = False
    body = ids[keep]
    check_token_ids(body, codebook_size, where="strip_start_stop (between start and stop)")
    new_cu = torch.zeros_like(cu_seqlens)
    new_cu[1:] = torch.cumsum(lengths - 2, 0)
    return body, new_cu


# ---------------------------------------------------------------------- packing
#: Jets padded together in one attention call. Jets are sorted by multiplicity and cut into
#: groups of this many, so a group pads to its own longest jet: on Pythia jets (mean ≈ 65,
#: max 128 particles) this removes most of the attention work spent on padding.
ATTENTION_GROUP_JETS = 32


@dataclass
class Segment:
    """Whole jets occupying packed rows [start, stop), padded together to (n_jets, max_len)."""

    start: int
    stop: int
    jet_index: torch.Tensor  # (stop - start,) int64, local jet of every row
    position: torch.Tensor  # (stop - start,) int64, position within its jet
    num_jets: int
    max_len: int

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, start: int = 0, max_len: int | None = None) -> "Segment":
        device = lengths.device
        num_jets = lengths.numel()
        jet_index = torch.repeat_interleave(torch.arange(num_jets, device=device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(jet_index.numel(), device=device) - starts[jet_index]
        if max_len is None:
            max_len = int(lengths.max()) if num_jets else 0
        return cls(start, start + jet_index.numel(), jet_index, position, num_jets, max_len)

    def pad(self, values_T: torch.Tensor) -> torch.Tensor:
        """Packed (T, ...) rows of this segment -> (n_jets, max_len, ...), zeros at padding."""
        out = values_T.new_zeros((self.num_jets, self.max_len) + tuple(values_T.shape[1:]))
        out[self.jet_index, self.position] = values_T
        return out

    def unpad(self, values_BN: torch.Tensor) -> torch.Tensor:
        return values_BN[self.jet_index, self.position]

    def mask(self) -> torch.Tensor:
        """(n_jets, max_len) True at real particles."""
        mask = torch.zeros(self.num_jets, self.max_len, dtype=torch.bool, device=self.jet_index.device)
        mask[self.jet_index, self.position] = True
        return mask


class Layout(Segment):
    """Packed jets as given (pad/unpad/mask over the whole batch) plus the attention plan:
    `order` sorts rows so that jets run longest first, `segments` cut the sorted rows into
    groups of ATTENTION_GROUP_JETS jets, `inverse` undoes `order`."""

    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    segments: list[Segment] = ()

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                        group_jets: int | None = None) -> "Layout":
        group_jets = group_jets or ATTENTION_GROUP_JETS
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        whole = Segment.from_lengths(lengths, 0, max_seqlen)
        layout = cls(whole.start, whole.stop, whole.jet_index, whole.position, whole.num_jets, whole.max_len)
        if whole.num_jets <= group_jets:
            layout.segments = [whole]
            return layout
        order_jets = torch.argsort(lengths, descending=True, stable=True)
        sorted_lengths = lengths[order_jets]
        # rows of the sorted jets: each jet's original start + its position
        sorted_seg = Segment.from_lengths(sorted_lengths, 0, whole.max_len)
        layout.order = cu_seqlens[:-1].long()[order_jets][sorted_seg.jet_index] + sorted_seg.position
        layout.inverse = torch.empty_like(layout.order)
        layout.inverse[layout.order] = torch.arange(layout.order.numel(), device=layout.order.device)
        bounds = torch.cumsum(sorted_lengths, 0).tolist()
        maxima = sorted_lengths[::group_jets].tolist()  # longest jet of each group comes first
        layout.segments = []
        for g, first in enumerate(range(0, whole.num_jets, group_jets)):
            last = min(first + group_jets, whole.num_jets)
            start = bounds[first - 1] if first else 0
            layout.segments.append(Segment.from_lengths(sorted_lengths[first:last], start, maxima[g]))
        return layout

    def sort(self, values_T: torch.Tensor) -> torch.Tensor:
        return values_T if self.order is None else values_T[self.order]

    def unsort(self, values_T: torch.Tensor) -> torch.Tensor:
        return values_T if self.inverse is None else values_T[self.inverse]


def shuffle_within_jets(jet_index_T: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation (T,) that shuffles particles inside each jet and keeps jets in place."""
    noise = torch.rand(jet_index_T.numel(), generator=generator, dtype=torch.float64, device=jet_index_T.device)
    return torch.argsort(jet_index_T.double() + noise)


# ---------------------------------------------------------------------- blocks
class SelfAttention(nn.Module):
    """Multi-head self-attention within jets. Tokens stay packed (T, H); only q, k, v are
    padded to (B, A, N, E) for torch SDPA, so the projections never compute on padding."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_TH: torch.Tensor, layout: "Layout", *, causal: bool, masks=None) -> torch.Tensor:
        """x_TH in layout-sorted row order; masks: per segment (B, N) key masks (bidirectional only)."""
        T, H = x_TH.shape
        qkv_TX = self.qkv(x_TH)
        p = self.dropout if self.training else 0.0
        outputs = []
        for i, segment in enumerate(layout.segments):
            qkv_BNX = segment.pad(qkv_TX[segment.start : segment.stop])
            q, k, v = qkv_BNX.view(segment.num_jets, segment.max_len, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
            if causal:
                # padding sits after every real particle, so a real query never reaches it
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            else:
                if masks is None:
                    raise ValueError("bidirectional attention over padded jets needs key masks")
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[i][:, None, None, :], dropout_p=p)
            outputs.append(segment.unpad(y.transpose(1, 2)).reshape(-1, H))
        return self.proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))

    def step(self, x_BH: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: int) -> torch.Tensor:
        """One new particle per jet at `position`: store its key/value, attend to 0..position."""
        B, H = x_BH.shape
        q, k, v = self.qkv(x_BH).view(B, 3, self.heads, 1, H // self.heads).unbind(1)
        k_cache[:, :, position : position + 1] = k
        v_cache[:, :, position : position + 1] = v
        # the single query at `position` may see every cached position: no mask
        y = F.scaled_dot_product_attention(q, k_cache[:, :, : position + 1], v_cache[:, :, : position + 1])
        return self.proj(y.reshape(B, H))


class Block(nn.Module):
    """Pre-LayerNorm transformer block on packed tokens: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x_TH, layout: "Layout", *, causal: bool, masks=None):
        x_TH = x_TH + self.drop(self.attn(self.norm1(x_TH), layout, causal=causal, masks=masks))
        return x_TH + self.drop(self.mlp(self.norm2(x_TH)))

    def step(self, x_BH, k_cache, v_cache, position: int):
        x_BH = x_BH + self.attn.step(self.norm1(x_BH), k_cache, v_cache, position)
        return x_BH + self.mlp(self.norm2(x_BH))


@dataclass
class DecoderCache:
    """Keys/values of every decoder block for B jets decoded in lockstep, one particle per step."""

    keys: list[torch.Tensor]  # per block (B, A, L, E)
    values: list[torch.Tensor]
    length: int = 0  # particles decoded so far

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, index_b: torch.Tensor) -> None:
        """Keep only the jets `index_b` (b,) int64, in that order (drop finished jets)."""
        self.keys = [k.index_select(0, index_b) for k in self.keys]
        self.values = [v.index_select(0, index_b) for v in self.values]


# ---------------------------------------------------------------------- the model
class ParticleTokenizer(nn.Module):
    """VQ-VAE over packed jets. forward(JetBatch) -> dict(loss, recon_loss, vq_loss, perplexity, utilisation)."""

    def __init__(self, cfg: TokenizerConfig, features: dict | None = None, max_particles: int = 128):
        super().__init__()
        self.cfg = cfg
        self.preprocessing = Preprocessing({n: FeatureTransform(**t) for n, t in preprocessing_spec(features).items()})
        self.feature_names = self.preprocessing.names
        self.max_particles = max_particles
        n_features, H = len(self.feature_names), cfg.hidden_dim
        block = lambda: Block(H, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)  # noqa: E731
        self.embed = nn.Linear(n_features, H)
        self.encoder = nn.ModuleList(block() for _ in range(cfg.encoder_blocks))
        self.encoder_norm = nn.LayerNorm(H)
        self.to_latent = nn.Linear(H, cfg.latent_dim)
        self.codebook = Codebook(
            cfg.codebook_size, cfg.latent_dim, update=cfg.codebook_update, beta=cfg.beta, affine_lr=cfg.affine_lr,
            sync_nu=cfg.sync_nu, ema_decay=cfg.ema_decay, init=cfg.codebook_init,
            kmeans_iters=cfg.kmeans_iters, pool_size=cfg.replacement_pool,
        )
        self.from_latent = nn.Linear(cfg.latent_dim, H)
        self.decoder = nn.ModuleList(block() for _ in range(cfg.decoder_blocks))
        self.decoder_norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, n_features)
        self.window_utilisation = float("nan")  # fraction of codes used in the last dead-code window
        self.dead_codes_replaced = 0

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # ---------------------------------------------------------------- halves
    def _check_x(self, x_TF: torch.Tensor) -> None:
        if x_TF.ndim != 2 or x_TF.shape[1] != self.n_features:
            raise ValueError(
                f"tokenizer expects particle features (T, {self.n_features}) = {self.feature_names}, got {tuple(x_TF.shape)}"
            )

    def encode_latents(self, x_TF: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Encoder outputs z (T, D) before quantisation."""
        h_TH = self.embed(layout.sort(x_TF))
        masks = [segment.mask() for segment in layout.segments]
        for block in self.encoder:
            h_TH = block(h_TH, layout, causal=False, masks=masks)
        return layout.unsort(self.to_latent(self.encoder_norm(h_TH)))

    def decode_latents(self, q_TD: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Causal decoder: features (T, F) from (quantised) latents (T, D), in the given order."""
        h_TH = self.from_latent(layout.sort(q_TD))
        for block in self.decoder:
            h_TH = block(h_TH, layout, causal=True)
        return layout.unsort(self.head(self.decoder_norm(h_TH)))

    def loss_counts(self, batch) -> dict[str, torch.Tensor]:
        """Reconstructed particles of `batch` (trainer hook): the losses are means over particles."""
        return {"particles": torch.full((), float(batch.num_particles), device=batch.x.device)}

    def forward(self, batch, norm: LossNorm | None = None) -> dict:
        """Loss (recon + vq_weight x vq, each per particle: over the trainer's global particle count
        given `norm`, else over this batch's) and metrics (`Ratio`s for the two losses)."""
        x_TF = batch.x
        self._check_x(x_TF)
        layout = Layout.from_cu_seqlens(batch.cu_seqlens, batch.max_seqlen)
        if self.training and self.cfg.shuffle_particles:
            x_TF = x_TF[shuffle_within_jets(layout.jet_index)]
        z_TD = self.encode_latents(x_TF, layout)
        zq_TD, codes_T, vq_loss = self.codebook(z_TD)
        recon_TF = self.decode_latents(zq_TD, layout)
        # packed rows are exactly the real particles: this is the masked MSE
        recon_loss = F.mse_loss(recon_TF.float(), x_TF.float())
        perplexity, utilisation = code_statistics(codes_T, self.codebook_size)
        loss = recon_loss + self.cfg.vq_weight * vq_loss  # means over this batch's particles
        T = torch.full_like(recon_loss, x_TF.shape[0]).detach()
        return {
            "loss": loss if norm is None else loss * norm.scale("particles", T),
            "recon_loss": Ratio(recon_loss.detach() * T, T),
            "vq_loss": Ratio(vq_loss.detach() * T, T),
            "perplexity": perplexity,
            "utilisation": utilisation,
        }

    def on_step_end(self, step: int) -> dict[str, float] | None:
        """Dead-code replacement every dead_code_every optimizer steps, then the collapse guard."""
        every = self.cfg.dead_code_every
        if not every or step <= 0 or step % every:
            return None
        n_dead, utilisation = self.codebook.replace_dead(self.cfg.dead_code_threshold)
        self.window_utilisation, self.dead_codes_replaced = utilisation, n_dead
        floor = self.cfg.min_utilisation
        if floor > 0 and step >= self.cfg.utilisation_warmup and utilisation < floor:
            message = collapse_message(utilisation, self.codebook_size, every, floor)
            if self.cfg.on_collapse == "raise":
                raise CodebookCollapseError(message)
            warnings.warn(message, stacklevel=2)
        return {"window_utilisation": utilisation, "dead_codes_replaced": float(n_dead)}

    def no_weight_decay(self) -> set[str]:
        """Codebook parameters are never decayed (the trainer decays Linear weights only anyway)."""
        return {name for name, _ in self.named_parameters() if name.startswith("codebook.")}

    def export(self, directory) -> Path:
        """Save as a stand-alone tokenizer (tokenizer.checkpoint of later stages): save_tokenizer."""
        return save_tokenizer(self, directory)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, x_TF: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        """Token ids (T,) int64 = nearest code + 1 of every particle (preprocessed features, stored order)."""
        self._check_x(x_TF)
        layout = Layout.from_cu_seqlens(cu_seqlens, max_seqlen)
        z_TD = self.encode_latents(x_TF, layout)
        return nearest_codes(z_TD, self.codebook.vectors()) + 1

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        """Preprocessed features (T, F) from particle token ids 1..K (no start/stop), causally in the given order."""
        check_token_ids(token_ids, self.codebook_size, where="decode")
        layout = Layout.from_cu_seqlens(cu_seqlens, max_seqlen)
        return self.decode_latents(self.codebook.lookup(token_ids.long() - 1), layout)

    def new_cache(self, batch_size: int, capacity: int | None = None, device=None, dtype=None) -> DecoderCache:
        """An empty KV cache for `batch_size` jets of up to `capacity` (default max_particles) particles."""
        capacity = capacity or self.max_particles
        reference = self.head.weight
        device, dtype = device or reference.device, dtype or reference.dtype
        shape = (batch_size, self.cfg.num_heads, capacity, self.cfg.hidden_dim // self.cfg.num_heads)
        return DecoderCache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder],
        )

    @torch.no_grad()
    def decode_step(self, cache: DecoderCache, new_token_ids: torch.Tensor) -> torch.Tensor:
        """Decode the next particle (B, F) of every jet from its particle token id (B,), 1..K.

        Jets advance in lockstep (one cache position per call); a jet that has ended (stop
        token sampled) must be fed any valid id, e.g. 1, and its outputs ignored. Each call
        runs the decoder on B new particles only, attending to the cached keys/values.
        """
        if new_token_ids.ndim != 1 or new_token_ids.shape[0] != cache.batch_size:
            raise ValueError(f"decode_step: expected token ids of shape ({cache.batch_size},), got {tuple(new_token_ids.shape)}")
        check_token_ids(new_token_ids, self.codebook_size, where="decode_step")
        if cache.length >= cache.capacity:
            raise ValueError(f"decode_step: the cache is full ({cache.capacity} particles); make a larger one with new_cache")
        h_BH = self.from_latent(self.codebook.lookup(new_token_ids.long() - 1))
        for block, k_cache, v_cache in zip(self.decoder, cache.keys, cache.values):
            h_BH = block.step(h_BH, k_cache, v_cache, cache.length)
        cache.length += 1
        return self.head(self.decoder_norm(h_BH))

    # ---------------------------------------------------------------- description
    def description(self) -> dict:
        """What a checkpoint records besides the weights (tokenizer.json)."""
        from .. import __version__

        K = self.codebook_size
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": asdict(self.cfg),
            "features": self.feature_names,
            "preprocessing": preprocessing_spec(self.preprocessing.features),
            "max_particles": self.max_particles,
            "token_ids": {"start": 0, "particle": "code + 1", "stop": K + 1, "vocab_size": K + 2},
            "weights": WEIGHTS_FILE,
            "jetfm_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


# ---------------------------------------------------------------------- features
def preprocessing_spec(features) -> dict[str, dict]:
    """Normalise a feature description (config dict, FeatureTransform dict, Preprocessing or None)
    to {name: {"function", "subtract", "multiply"}} with plain floats (data.features.feature_spec)."""
    out = feature_spec(features)
    if not out:
        raise ValueError("tokenizer needs at least one particle feature")
    return out


def check_features_match(tokenizer_spec, other_spec, tokenizer_where: str, other_where: str) -> None:
    """Raise TokenizerMismatchError naming both sides unless names, order and transforms agree."""
    mine, theirs = preprocessing_spec(tokenizer_spec), preprocessing_spec(other_spec)
    if not same_features(mine, theirs):
        raise TokenizerMismatchError(
            f"tokenizer features/preprocessing do not match:\n  {tokenizer_where}: {mine}\n  {other_where}: {theirs}\n"
            "Use the data.features the tokenizer was trained with, or train/choose a matching tokenizer."
        )


def check_manifest_tokens(manifest, model: ParticleTokenizer, where: str, tokenizer_where: str = "tokenizer") -> None:
    """Raise unless shards carrying tokens were made by a tokenizer like `model`."""
    tokens = manifest.tokens
    if not tokens:
        raise TokenizerMismatchError(f"{where}: the shards carry no tokens (manifest 'tokens' is empty); run `jetfm data tokenize`")
    if int(tokens.get("codebook_size", -1)) != model.codebook_size:
        raise TokenizerMismatchError(
            f"codebook size differs: {where} has tokens of a {tokens.get('codebook_size')}-code tokenizer, "
            f"{tokenizer_where} has {model.codebook_size} codes"
        )
    check_features_match(model.preprocessing, tokens.get("preprocessing") or {}, tokenizer_where, f"{where} (manifest tokens)")


def build_tokenizer_model(cfg, manifest) -> ParticleTokenizer:
    """Stage builder (docs/CONTRACTS.md): a fresh tokenizer for cfg.tokenizer over cfg.data.features."""
    spec = preprocessing_spec(getattr(cfg.data, "features", None))
    stored = list(manifest.particle_features) if manifest is not None else None
    if stored is not None:
        missing = [n for n in spec if n not in stored and n not in DERIVED_FEATURES]
        if missing:
            raise ValueError(
                f"data.features {missing} are neither stored in the shards ({stored}) nor derivable ({list(DERIVED_FEATURES)})"
            )
    return ParticleTokenizer(cfg.tokenizer, spec, max_particles=int(getattr(cfg.data, "max_particles", 128)))


# ---------------------------------------------------------------------- save / load
def save_tokenizer(model: ParticleTokenizer, directory) -> Path:
    """Write DIR/tokenizer.json (config, features, preprocessing) and DIR/model.safetensors atomically."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # accept a DDP wrapper
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(model.description(), indent=1))
    return directory


def read_description(directory) -> dict:
    """tokenizer.json of a saved tokenizer, checked."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer here; expected a directory written by save_tokenizer")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"this jetfm reads {CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}"
        )
    return meta


def load_tokenizer(directory, *, device="cpu", features=None, where: str = "config data.features") -> ParticleTokenizer:
    """Load a saved tokenizer in eval mode (safetensors: no code runs). If `features` is given
    (a feature/preprocessing description), raise TokenizerMismatchError unless it matches."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_description(directory)
    known = set(TokenizerConfig.__dataclass_fields__)
    unknown = set(meta["config"]) - known
    if unknown:
        raise ValueError(f"{directory / CONFIG_FILE}: unknown tokenizer config keys {sorted(unknown)}")
    model = ParticleTokenizer(TokenizerConfig(**meta["config"]), meta["preprocessing"], meta["max_particles"])
    model.load_state_dict(load_file(str(directory / meta.get("weights", WEIGHTS_FILE)), device="cpu"))
    if features is not None:
        check_features_match(model.preprocessing, features, f"tokenizer {directory}", where)
    return model.to(device).eval()
