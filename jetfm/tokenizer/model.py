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

Layout: encoder and decoder are the backbone's `Stack` of blocks (models/backbone.py) on packed
jets, so attention goes through models/attention.py like everywhere else: flash-attn varlen on
GPU (`tokenizer.attention: flash`), SDPA with length buckets and an fp32 core on CPU; the
decoder's incremental decoding uses the same `KVCache` as generation. Export format v2; v1
exports (the tokenizer's own blocks, before it shared the stack) load through a key remap.
"""

from __future__ import annotations

import datetime
import json
import re
import warnings
from dataclasses import asdict
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
from ..models.attention import AttentionBackend, KVCache, Packing
from ..models.backbone import Stack
from .codebook import Codebook, CodebookCollapseError, code_statistics, collapse_message, nearest_codes
from .config import TokenizerConfig

CHECKPOINT_FORMAT = "jetfm-tokenizer"
#: 2: encoder/decoder are models.backbone.Stack (keys encoder.blocks.i.qkv, ...);
#: 1: the tokenizer's own blocks (encoder.i.attn.qkv, ...), read through V1_KEY_REMAP.
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
def packing_for(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None = None) -> Packing:
    """The shared attention bookkeeping (models/attention.py) for `total` packed particles.
    max_seqlen None reads the longest multiplicity from cu_seqlens: one host read, for the
    inference entry points; the training batch knows its bound."""
    if max_seqlen is None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        max_seqlen = int(lengths.max()) if lengths.numel() else 1
    return Packing(cu_seqlens, max(int(max_seqlen), 1), total)


def shuffle_within_jets(jet_index_T: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation (T,) that shuffles particles inside each jet and keeps jets in place."""
    noise = torch.rand(jet_index_T.numel(), generator=generator, dtype=torch.float64, device=jet_index_T.device)
    return torch.argsort(jet_index_T.double() + noise)


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
        self.backend = AttentionBackend(cfg.attention)
        self.backend.assert_supported(head_dim=H // cfg.num_heads)
        # the backbone's blocks (models/backbone.py): one attention stack in jetfm
        stack = lambda n: Stack(n, H, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, self.backend)  # noqa: E731
        self.embed = nn.Linear(n_features, H)
        self.encoder = stack(cfg.encoder_blocks)  # bidirectional, + final LayerNorm
        self.to_latent = nn.Linear(H, cfg.latent_dim)
        self.codebook = Codebook(
            cfg.codebook_size, cfg.latent_dim, update=cfg.codebook_update, beta=cfg.beta, affine_lr=cfg.affine_lr,
            sync_nu=cfg.sync_nu, ema_decay=cfg.ema_decay, init=cfg.codebook_init,
            kmeans_iters=cfg.kmeans_iters, pool_size=cfg.replacement_pool,
        )
        self.from_latent = nn.Linear(cfg.latent_dim, H)
        self.decoder = stack(cfg.decoder_blocks)  # causal, + final LayerNorm
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

    @staticmethod
    def _run(stack: Stack, h_TH: torch.Tensor, packing: Packing, *, causal: bool) -> torch.Tensor:
        """stack(h) with the jets sorted by length once for the whole stack when attention runs
        in length buckets (CPU), instead of a reordering in every layer."""
        if packing.bucketing is None or packing.bucketing[0] is None:
            return stack(h_TH, packing, causal=causal)
        sorted_packing, order_T, inverse_T = packing.length_sorted()
        return stack(h_TH.index_select(0, order_T), sorted_packing, causal=causal).index_select(0, inverse_T)

    def encode_latents(self, x_TF: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Encoder outputs z (T, D) before quantisation (`packing`: packing_for(cu_seqlens, T))."""
        return self.to_latent(self._run(self.encoder, self.embed(x_TF), packing, causal=False))

    def decode_latents(self, q_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Causal decoder: features (T, F) from (quantised) latents (T, D), in the given order."""
        return self.head(self._run(self.decoder, self.from_latent(q_TD), packing, causal=True))

    def loss_counts(self, batch) -> dict[str, torch.Tensor]:
        """Reconstructed particles of `batch` (trainer hook): the losses are means over particles."""
        return {"particles": torch.full((), float(batch.num_particles), device=batch.x.device)}

    def forward(self, batch, norm: LossNorm | None = None) -> dict:
        """Loss (recon + vq_weight x vq, each per particle: over the trainer's global particle count
        given `norm`, else over this batch's) and metrics (`Ratio`s for the two losses)."""
        x_TF = batch.x
        self._check_x(x_TF)
        packing = packing_for(batch.cu_seqlens, x_TF.shape[0], batch.max_seqlen)
        if self.training and self.cfg.shuffle_particles:
            x_TF = x_TF[shuffle_within_jets(packing.seq_index)]
        z_TD = self.encode_latents(x_TF, packing)
        zq_TD, codes_T, vq_loss = self.codebook(z_TD)
        recon_TF = self.decode_latents(zq_TD, packing)
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

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, x_TF: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        """Token ids (T,) int64 = nearest code + 1 of every particle (preprocessed features, stored order)."""
        self._check_x(x_TF)
        z_TD = self.encode_latents(x_TF, packing_for(cu_seqlens, x_TF.shape[0], max_seqlen))
        return nearest_codes(z_TD, self.codebook.vectors()) + 1

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        """Preprocessed features (T, F) from particle token ids 1..K (no start/stop), causally in the given order."""
        check_token_ids(token_ids, self.codebook_size, where="decode")
        packing = packing_for(cu_seqlens, token_ids.shape[0], max_seqlen)
        return self.decode_latents(self.codebook.lookup(token_ids.long() - 1), packing)

    def new_cache(self, batch_size: int, capacity: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty decoder KV cache (models/attention.py) for `batch_size` jets of up to `capacity`
        (default max_particles) particles; flash needs a bf16/fp16 cache (dtype)."""
        reference = self.head.weight
        return KVCache(
            self.cfg.decoder_blocks, batch_size, self.cfg.num_heads, self.cfg.hidden_dim // self.cfg.num_heads,
            capacity or self.max_particles, device=device or reference.device, dtype=dtype or reference.dtype,
            backend=self.backend,
        )

    @torch.no_grad()
    def decode_step(self, cache: KVCache, new_token_ids: torch.Tensor) -> torch.Tensor:
        """Decode the next particle (B, F) of every jet from its particle token id (B,), 1..K.

        Jets advance in lockstep (one cache position per call); a jet that has ended (stop
        token sampled) must be fed any valid id, e.g. 1, and its outputs ignored. Each call
        runs the decoder on B new particles only, attending to the cached keys/values.
        """
        if new_token_ids.ndim != 1 or new_token_ids.shape[0] != cache.batch_size:
            raise ValueError(f"decode_step: expected token ids of shape ({cache.batch_size},), got {tuple(new_token_ids.shape)}")
        check_token_ids(new_token_ids, self.codebook_size, where="decode_step")
        if cache.seen >= cache.max_len:
            raise ValueError(f"decode_step: the cache is full ({cache.max_len} particles); make a larger one with new_cache")
        # the effective code vectors (K, latent) once per cache, not at every step (an affine
        # codebook recomputes all K of them on each lookup; the weights are fixed over a cache's life)
        vectors_KL = cache.memo.get("code_vectors")
        if vectors_KL is None:
            vectors_KL = cache.memo["code_vectors"] = self.codebook.vectors()
        h_BH = self.decoder.step(self.from_latent(vectors_KL[new_token_ids.long() - 1]), cache)
        cache.advance()
        return self.head(h_BH)

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
    """tokenizer.json of a saved tokenizer, checked (any of READABLE_VERSIONS)."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer here; expected a directory written by save_tokenizer")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"this jetfm reads {CHECKPOINT_FORMAT!r} v{', v'.join(map(str, READABLE_VERSIONS))}"
        )
    return meta


#: format v1 parameter names -> v2 (regex, replacement), applied in order to every key.
V1_KEY_REMAP = (
    (r"^(encoder|decoder)\.(\d+)\.attn\.(qkv|proj)\.", r"\1.blocks.\2.\3."),
    (r"^(encoder|decoder)\.(\d+)\.mlp\.0\.", r"\1.blocks.\2.fc1."),
    (r"^(encoder|decoder)\.(\d+)\.mlp\.2\.", r"\1.blocks.\2.fc2."),
    (r"^(encoder|decoder)\.(\d+)\.(norm1|norm2)\.", r"\1.blocks.\2.\3."),
    (r"^(encoder|decoder)_norm\.", r"\1.norm."),
)


def upgrade_state_dict(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Parameter names of a format-`version` export as this jetfm names them (v1 -> v2 remap)."""
    if version == 1:
        renamed = {}
        for key, value in state.items():
            for pattern, replacement in V1_KEY_REMAP:
                key = re.sub(pattern, replacement, key)
            renamed[key] = value
        return renamed
    return state


def load_tokenizer(directory, *, device="cpu", features=None, where: str = "config data.features",
                   attention: str = "auto") -> ParticleTokenizer:
    """Load a saved tokenizer in eval mode (safetensors: no code runs). If `features` is given
    (a feature/preprocessing description), raise TokenizerMismatchError unless it matches.

    `attention` is the backend to run with, whatever the export was trained with (weights do not
    depend on it): auto by default, which never picks flash-attn for fp32 inference."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_description(directory)
    known = set(TokenizerConfig.__dataclass_fields__)
    unknown = set(meta["config"]) - known
    if unknown:
        raise ValueError(f"{directory / CONFIG_FILE}: unknown tokenizer config keys {sorted(unknown)}")
    cfg = TokenizerConfig(**{**meta["config"], "attention": attention})
    model = ParticleTokenizer(cfg, meta["preprocessing"], meta["max_particles"])
    state = load_file(str(directory / meta.get("weights", WEIGHTS_FILE)), device="cpu")
    model.load_state_dict(upgrade_state_dict(state, meta["format_version"]))
    if features is not None:
        check_features_match(model.preprocessing, features, f"tokenizer {directory}", where)
    return model.to(device).eval()
