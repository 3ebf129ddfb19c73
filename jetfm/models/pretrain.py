"""Pre-training model: backbone + NTP and/or MPM heads; the trainer's `build_pretrain_model`.

    model = build_pretrain_model(cfg, manifest)   # cfg.model, cfg.objective, cfg.data
    out = model(batch)                            # {"loss", "ntp_loss", "ntp_acc", "mpm_loss", "mpm_acc"}
    out = model(batch, norm=LossNorm(...))        # the trainer: losses over the global prediction count

Only the active objective's metrics are returned (ntp: ntp_*; mpm: mpm_*; joint: both), each a
`Ratio` (sum, count; `.value` is the mean).
Generation (KV cache): `cache = model.new_cache(B)`, then `model.ntp_logits_step(cache)` for the
start position and `model.ntp_logits_step(cache, x_BF=... | tokens_B=...)` for every next particle.
Fine-tuning reuses `model.backbone`.

Legend: T particles, B jets, F features, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from jetfm.data.batch import JetBatch

from .attention import AttentionBackend, KVCache, Packing
from .backbone import Backbone, init_weights
from .config import ModelConfig, ObjectiveConfig
from . import thread_split
from .objectives import (Head, LossNorm, MPMObjective, NTPObjective, Ratio, mask_particles, masked_count,
                         normalise)


class PretrainModel(nn.Module):
    #: split a CPU step's jets over torch's threads (models/thread_split.py) where it applies;
    #: False: one pass with multi-threaded ops (an instance may set it, e.g. for an A/B)
    thread_split: bool = True

    def __init__(
        self,
        model_cfg: ModelConfig,
        objective_cfg: ObjectiveConfig,
        *,
        vocab_size: int,
        num_features: int | None = None,
        num_classes: int = 0,
        inputs: str = "raw",
    ):
        super().__init__()
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (start, >= 1 particle token, stop), got {vocab_size}")
        if inputs not in ("raw", "reco"):
            raise ValueError(f"data.inputs must be 'raw' or 'reco', got {inputs!r}")
        self.model_cfg = model_cfg
        self.objective_cfg = objective_cfg
        self.vocab_size = vocab_size
        self.stop_id = vocab_size - 1
        self.inputs = inputs
        AttentionBackend(model_cfg.attention).assert_supported()
        m = model_cfg
        self.backbone = Backbone(m, vocab_size=vocab_size, num_features=num_features, num_classes=num_classes,
                                 start_vector=objective_cfg.uses_ntp)
        head_kwargs = dict(blocks=m.head_blocks, dim=m.dim, num_heads=m.num_heads, mlp_ratio=m.head_mlp_ratio,
                           dropout=m.dropout, backend=m.attention, vocab_size=vocab_size)
        self.ntp = self.mpm = None
        if objective_cfg.uses_ntp:
            # the NTP head's layers follow the backbone's in the generation KV cache
            self.ntp = NTPObjective(Head(**head_kwargs, layer_offset=m.num_blocks), self.stop_id)
        if objective_cfg.uses_mpm:
            num_mask_vectors = objective_cfg.num_mask_vectors or m.max_particles
            needed = int(masked_count(torch.tensor([m.max_particles]), objective_cfg.mask_fraction))
            if num_mask_vectors < needed:
                raise ValueError(
                    f"objective.num_mask_vectors={num_mask_vectors} < {needed} particles masked in a "
                    f"{m.max_particles}-particle jet at mask_fraction={objective_cfg.mask_fraction}"
                )
            self.mpm = MPMObjective(Head(**head_kwargs), num_mask_vectors=num_mask_vectors, dim=m.dim)
        init_weights(self)

    # ------------------------------------------------------------------ inputs
    def _check(self, batch: JetBatch) -> None:
        if batch.max_seqlen > self.model_cfg.max_particles:
            raise ValueError(f"batch has jets of up to {batch.max_seqlen} particles > model.max_particles={self.model_cfg.max_particles}")
        if batch.tokens is None:
            raise ValueError("pre-training needs token ids in the batch (shards written with the tokenizer's tokens)")
        if batch.tokens.numel():
            lo, hi = (int(v) for v in torch.aminmax(batch.tokens))  # one host sync per step
            if lo < 1 or hi > self.vocab_size - 2:
                raise ValueError(
                    f"tokenizer/vocabulary mismatch: particle token ids must lie in [1, {self.vocab_size - 2}] "
                    f"(vocab {self.vocab_size} from manifest codebook_size), got [{lo}, {hi}]"
                )

    def _inputs(self, batch: JetBatch) -> dict:
        """Backbone inputs of a batch: features (continuous mode) or token ids (token mode) + conditioning."""
        x_TF = None
        if self.model_cfg.input_mode == "continuous":
            x_TF = batch.reco if self.inputs == "reco" else batch.x
            if x_TF is None:
                raise ValueError("data.inputs=reco needs batch.reco (tokenizer-reconstructed features in the shards)")
        cond_BD = self.backbone.condition(batch.seqlens, batch.labels)
        return dict(x_TF=x_TF, tokens_T=batch.tokens, cond_BD=cond_BD)

    @staticmethod
    def packing(batch: JetBatch) -> Packing:
        return Packing(batch.cu_seqlens, batch.max_seqlen, batch.num_particles)

    # ------------------------------------------------------------------ training
    def loss_counts(self, batch: JetBatch) -> dict[str, torch.Tensor]:
        """Predictions per objective in `batch`, known before the forward (trainer hook): NTP every
        particle and each jet's stop, MPM the masked particles (a function of the multiplicities)."""
        counts: dict[str, torch.Tensor] = {}
        if self.ntp is not None:
            counts["ntp"] = torch.full((), float(batch.num_particles + batch.num_jets), device=batch.cu_seqlens.device)
        if self.mpm is not None:
            counts["mpm"] = masked_count(batch.seqlens, self.objective_cfg.mask_fraction).sum().float()
        return counts

    def forward(self, batch: JetBatch, generator: torch.Generator | None = None,
                norm: LossNorm | None = None) -> dict:
        """Loss and metrics of the configured objective.

        Each objective's summed loss is divided by its count: the global one from the trainer's
        `norm` (then any split of a global batch gives the same gradient), else this batch's (a
        mean); joint weights the normalised objectives. Metrics are `Ratio`s (sum, count) so the
        trainer can add them over micro-batches and processes. MPM masks come from `norm`'s
        per-jet seed, else from `generator` (None: the global RNG).

        On CPU with `model.attention: auto` and several torch threads, the jets are split into one
        group per thread, each group's forward and backward run on its own thread
        (models/thread_split.py: same losses and gradients up to rounding, same masks).
        """
        self._check(batch)
        groups = 1
        if self.thread_split and AttentionBackend(self.model_cfg.attention) is AttentionBackend.AUTO:
            groups = thread_split.group_count(self, batch.num_jets, batch.x.device)
        if groups > 1:
            return self._forward_groups(batch, groups, generator, norm)
        return self._forward_one(batch, generator, norm)

    def _forward_groups(self, batch: JetBatch, groups: int, generator: torch.Generator | None,
                        norm: LossNorm | None) -> dict:
        """forward over `groups` groups of jets on as many threads (thread_split.run_groups)."""
        if norm is None:  # the whole batch's counts: each group's share of the batch mean
            norm = LossNorm({name: count.clamp(min=1) for name, count in self.loss_counts(batch).items()})
        masked_T = None
        if self.mpm is not None and norm.mask_seed is None:  # the whole batch's draws, as in one pass
            masked_T = mask_particles(self.packing(batch), self.objective_cfg.mask_fraction, generator)
        cu = batch.cu_seqlens.tolist()
        bounds = thread_split.group_bounds(cu, groups)

        def part(first: int, stop: int):
            sub = batch.jets(first, stop)
            sub_norm = dataclasses.replace(norm, jet_offset=norm.jet_offset + first)
            sub_mask = None if masked_T is None else masked_T[cu[first]:cu[stop]]
            return lambda: self._forward_one(sub, None, sub_norm, sub_mask)

        params = [p for p in self.parameters() if p.requires_grad]
        return thread_split.run_groups([part(a, b) for a, b in zip(bounds[:-1], bounds[1:])], params)

    def _forward_one(self, batch: JetBatch, generator: torch.Generator | None, norm: LossNorm | None,
                     masked_T: torch.Tensor | None = None) -> dict:
        """forward in one pass; `masked_T` (T,) bool: the MPM mask, drawn by the caller."""
        packing = self.packing(batch)
        inputs = self._inputs(batch)
        out: dict = {}
        loss = 0.0
        joint = self.objective_cfg.name == "joint"
        if self.ntp is not None:
            loss_sum, correct = self.ntp(self.backbone, packing, **inputs)
            count = torch.full_like(loss_sum, self.ntp.count(packing)).detach()
            out["ntp_loss"], out["ntp_acc"] = Ratio(loss_sum.detach(), count), Ratio(correct, count)
            loss = loss + (self.objective_cfg.ntp_weight if joint else 1.0) * normalise(norm, "ntp", loss_sum, count)
        if self.mpm is not None:
            if masked_T is None and norm is not None and norm.mask_seed is not None:
                masked_T = mask_particles(packing, self.objective_cfg.mask_fraction, seed=norm.mask_seed,
                                          jet_offset=norm.jet_offset)
            elif masked_T is None:
                masked_T = mask_particles(packing, self.objective_cfg.mask_fraction, generator)
            loss_sum, correct = self.mpm(self.backbone, packing, masked_T, **inputs)
            count = masked_T.sum().to(loss_sum.dtype)
            out["mpm_loss"], out["mpm_acc"] = Ratio(loss_sum.detach(), count), Ratio(correct, count)
            loss = loss + (self.objective_cfg.mpm_weight if joint else 1.0) * normalise(norm, "mpm", loss_sum, count)
        out["loss"] = loss
        return out

    def ntp_logits(self, batch: JetBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """NTP logits ((T + B), V) over [start, p1..pn] per jet and their targets ((T + B),)."""
        if self.ntp is None:
            raise ValueError("this model has no NTP head (objective.name=mpm)")
        self._check(batch)
        packing = self.packing(batch)
        logits, particle_rows = self.ntp.logits(self.backbone, packing, **self._inputs(batch))
        return logits, self.ntp.targets(batch.tokens, particle_rows, logits.shape[0])

    def mpm_logits(self, batch: JetBatch, masked_T: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MPM logits at masked particles (M, V), their targets (M,), and the mask (T,) bool used."""
        if self.mpm is None:
            raise ValueError("this model has no MPM head (objective.name=ntp)")
        self._check(batch)
        packing = self.packing(batch)
        if masked_T is None:
            masked_T = mask_particles(packing, self.objective_cfg.mask_fraction, generator)
        logits, mask_idx = self.mpm.logits(self.backbone, packing, masked_T, **self._inputs(batch))
        return logits, batch.tokens.index_select(0, mask_idx), masked_T

    # ------------------------------------------------------------------ generation
    def new_cache(self, num_jets: int, *, max_len: int | None = None, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for the causal backbone + NTP head; max_len defaults to max_particles + 1.
        dtype defaults to the parameters' (sdpa) or bf16 (flash, which has no fp32 kernels)."""
        if self.ntp is None:
            raise ValueError("this model has no NTP head (objective.name=mpm)")
        ref = next(self.parameters())
        m = self.model_cfg
        if dtype is None:
            dtype = torch.bfloat16 if m.attention == "flash" else ref.dtype
        return KVCache(
            m.num_blocks + m.head_blocks, num_jets, m.num_heads, m.head_dim, max_len or m.max_particles + 1,
            device=device or ref.device, dtype=dtype, backend=m.attention,
        )

    def ntp_logits_step(
        self,
        cache: KVCache,
        *,
        x_BF: torch.Tensor | None = None,
        tokens_B: torch.Tensor | None = None,
        multiplicity_B: torch.Tensor | None = None,
        labels_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, V) after feeding one more position per jet and caching it.

        The first call (empty cache) feeds the start position and takes no particle input; later
        calls take the previous particle: features x_BF (continuous mode) or token ids tokens_B.
        Conditioning (multiplicity_B or labels_B) is needed on every call when configured.
        """
        return self.ntp.head.out(self.ntp_features_step(cache, x_BF=x_BF, tokens_B=tokens_B,
                                                        multiplicity_B=multiplicity_B, labels_B=labels_B))

    def ntp_features_step(
        self,
        cache: KVCache,
        *,
        x_BF: torch.Tensor | None = None,
        tokens_B: torch.Tensor | None = None,
        multiplicity_B: torch.Tensor | None = None,
        labels_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ntp_logits_step without the vocabulary projection: the NTP head's normalized output
        (B, D). For callers that project into a buffer of their own (sampling keeps one padded
        (B, V) logits buffer for the whole batch instead of a fresh 2 MB tensor every step)."""
        if self.ntp is None:
            raise ValueError("this model has no NTP head (objective.name=mpm)")
        B = cache.batch_size
        if cache.seen == 0:
            if x_BF is not None or tokens_B is not None:
                raise ValueError("the first step feeds the start position; pass no particle input")
            h_BD = self.backbone.embed_start(B)
        else:
            h_BD = self.backbone.embed_particles(x_BF, tokens_B)
        cond_BD = self.backbone.condition(multiplicity_B, labels_B)
        z_BD = self.backbone.step(h_BD, cache, cond_BD=cond_BD)
        z_BD = self.ntp.head.stack.step(z_BD, cache)
        cache.advance()
        return z_BD


def build_pretrain_model(cfg, manifest) -> PretrainModel:
    """The pre-training stage's model from the resolved config and the data manifest.

    Vocabulary = manifest.tokens["codebook_size"] + 2; continuous input width = model.num_features
    or len(data.features); classes (for class conditioning) = len(manifest.classes).
    """
    tokens = manifest.tokens if hasattr(manifest, "tokens") else manifest.get("tokens")
    if not tokens or "codebook_size" not in tokens:
        raise ValueError("the data manifest records no tokenizer (tokens.codebook_size): tokenize the shards first")
    classes = manifest.classes if hasattr(manifest, "classes") else manifest.get("classes", [])
    data = getattr(cfg, "data", None)
    num_features = cfg.model.num_features
    if num_features is None and cfg.model.input_mode == "continuous":
        features = getattr(data, "features", None)
        if not features:
            raise ValueError("input_mode=continuous needs model.num_features or data.features")
        num_features = len(features)
    return PretrainModel(
        cfg.model, cfg.objective,
        vocab_size=int(tokens["codebook_size"]) + 2,
        num_features=num_features,
        num_classes=len(classes or []),
        inputs=getattr(data, "inputs", "raw") or "raw",
    )
