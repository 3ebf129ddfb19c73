"""The jet backbone: input embedding, jet-level conditioning, pre-LayerNorm transformer blocks.

No positional encoding (docs/METHOD.md §3): only the causal mask breaks permutation symmetry.
Sequences are packed (cu_seqlens); `causal` is chosen per call, so the same weights serve the
causal NTP pass, the bidirectional MPM pass and bidirectional fine-tuning. `step` runs one new
token per sequence against a KVCache (generation).

Legend: T packed tokens, B sequences (jets), D model dim, F continuous features, H heads,
K head dim.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .attention import AttentionBackend, KVCache, Packing, varlen_attention_qkv
from .config import ModelConfig


_dropout_rng = threading.local()


@contextlib.contextmanager
def dropout_generator(generator: torch.Generator | None):
    """Dropout masks drawn on this thread from `generator` instead of torch's global RNG, inside
    the block. Why: a step split over threads (models/thread_split.py) would otherwise draw from one
    shared generator in an order set by the scheduler, and a seed would no longer reproduce a run."""
    previous = getattr(_dropout_rng, "generator", None)
    _dropout_rng.generator = generator
    try:
        yield
    finally:
        _dropout_rng.generator = previous


def _generator() -> torch.Generator | None:
    return getattr(_dropout_rng, "generator", None)


class _ByteDropout(torch.autograd.Function):
    """Dropout whose mask comes from random 16-bit integers instead of `bernoulli_`.

    Why: on CPU `bernoulli_` draws one double per element; 64 random bits give four 16-bit
    draws, and the mask is kept as bool (1 byte/element) for the backward. Measured at the
    reference size (2 x 2,924 x 128): forward + backward 35% less CPU time than F.dropout, fp32
    and bf16. The drop probability is rounded to a multiple of 1/65536 and the kept values are
    scaled by the exact inverse of the keep probability, so E[output] = input as with F.dropout.
    """

    @staticmethod
    def forward(ctx, x, p: float):
        n = x.numel()
        words = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_(-2**63, None,  # all 64 bits
                                                                                      generator=_generator())
        bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        dropped = round(p * 65536)
        keep = bits >= -32768 + dropped
        ctx.scale = 65536.0 / (65536 - dropped)
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with the cheaper random-bits mask on CPU (CUDA's fused kernel is already fast)."""
    if not training or p == 0:
        return x
    if x.device.type == "cpu" and 0 < p < 1:
        return _ByteDropout.apply(x, p)
    return F.dropout(x, p, training)


def residual_dropout(x: torch.Tensor, y: torch.Tensor, p: float, training: bool, *, fused: bool) -> torch.Tensor:
    """x + dropout(y). `fused` (attention backend auto) on CPU: one C kernel each way, its mask
    hashed from a seed instead of stored (`cpu_kernels.dropout_add`); else torch ops."""
    if not training or p == 0:
        return x + y
    if (fused and 0 < p < 1 and x.dtype == torch.result_type(x, y)
            and cpu_kernels.dropout_add_supported(x, y)):
        return cpu_kernels.dropout_add(x, y, p, _generator())
    return x + dropout(y, p, training)


class Block(nn.Module):
    """x + drop(proj(attn(LN(x)))), then x + drop(MLP(LN(x))); GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, backend: AttentionBackend):
        super().__init__()
        self.num_heads = num_heads
        self.backend = AttentionBackend(backend)
        self.backend.assert_supported(head_dim=dim // num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(round(mlp_ratio * dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.dropout, self.training)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self._drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))

    def forward(self, x_TD: torch.Tensor, packing: Packing, *, causal: bool) -> torch.Tensor:
        T, D = x_TD.shape
        qkv_T3HK = self.qkv(self.norm1(x_TD)).view(T, 3, self.num_heads, D // self.num_heads)
        a_THK = varlen_attention_qkv(
            qkv_T3HK, packing.cu_seqlens, packing.max_seqlen, causal=causal, backend=self.backend, packing=packing
        )
        fused = self.backend is AttentionBackend.AUTO
        x_TD = residual_dropout(x_TD, self.proj(a_THK.reshape(T, D)), self.dropout, self.training, fused=fused)
        mlp_TD = self.fc2(F.gelu(self.fc1(self.norm2(x_TD))))
        return residual_dropout(x_TD, mlp_TD, self.dropout, self.training, fused=fused)

    def step(self, x_BD: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """One new token per sequence (causal by construction), attending to `cache` layer `layer`."""
        B, D = x_BD.shape
        q_BHK, k_BHK, v_BHK = self.qkv(self.norm1(x_BD)).view(B, 3, self.num_heads, D // self.num_heads).unbind(1)
        a_BHK = cache.attend(layer, q_BHK, k_BHK, v_BHK)
        x_BD = x_BD + self._drop(self.proj(a_BHK.reshape(B, D)))
        return x_BD + self._mlp(x_BD)


class Stack(nn.Module):
    """Blocks + final LayerNorm; `layer_offset` places its layers inside a shared KVCache."""

    def __init__(self, num_blocks: int, dim: int, num_heads: int, mlp_ratio: float, dropout: float,
                 backend: AttentionBackend, layer_offset: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout, backend) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.layer_offset = layer_offset

    def forward(self, x_TD: torch.Tensor, packing: Packing, *, causal: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(T, D) -> (T, D); with `rows`, only those rows of the output are normalized and returned."""
        for block in self.blocks:
            x_TD = block(x_TD, packing, causal=causal)
        return self.norm(x_TD if rows is None else x_TD.index_select(0, rows))

    def step(self, x_BD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence (B, D) through every block on `cache`, then the LayerNorm.
        In eval mode on CPU fp32 the blocks and the LayerNorm run in one compiled call
        (KVCache.step_blocks: same mathematics, ~25 Python-issued ops a block fewer); otherwise
        block by block."""
        if not self.training and len(self.blocks) and cache.can_step_blocks(x_BD, self.blocks[0].num_heads):
            params = cache.memo.get(("stack_params", id(self)))  # weights stay fixed over a cache's life
            if params is None:
                params = cache.memo[("stack_params", id(self))] = self._step_params(cache.pack_weight)
            if params:
                first = self.blocks[0]
                x_BD = cache.step_blocks(x_BD, params, self.layer_offset, first.num_heads, first.norm1.eps)
                return x_BD if len(params) % 12 == 2 else self.norm(x_BD)  # + 2: the final LayerNorm ran
        for i, block in enumerate(self.blocks):
            x_BD = block.step(x_BD, cache, self.layer_offset + i)
        return self.norm(x_BD)


    def _step_params(self, pack) -> list[torch.Tensor]:
        """The 12 tensors per block that KVCache.step_blocks takes, in Block's order, the linear
        weights packed by `pack` (KVCache.pack_weight: the compiled linear layers' layout), then the
        final LayerNorm's weight and bias where it has both and the blocks' eps; [] when the blocks
        cannot run there (a missing bias, non-fp32 weights, LayerNorm eps differing, an MLP width
        not a multiple of 16)."""
        params = [t for b in self.blocks for t in (b.norm1.weight, b.norm1.bias, b.qkv.weight, b.qkv.bias,
                                                     b.proj.weight, b.proj.bias, b.norm2.weight, b.norm2.bias,
                                                     b.fc1.weight, b.fc1.bias, b.fc2.weight, b.fc2.bias)]
        eps = self.blocks[0].norm1.eps
        if not (all(b.norm1.eps == b.norm2.eps == eps and b.fc1.out_features % 16 == 0 for b in self.blocks) and all(
                p is not None and p.dtype == torch.float32 for p in params)):
            return []
        final = (self.norm.weight, self.norm.bias)
        if self.norm.eps == eps and all(p is not None and p.dtype == torch.float32 for p in final):
            params += final
        return [pack(p) if p.ndim == 2 else p.detach().contiguous() for p in params]


class Backbone(nn.Module):
    """Embedding (continuous | token) + optional conditioning + `num_blocks` blocks + LayerNorm.

    Use: `backbone.encode(cu_seqlens, max_seqlen, causal=..., x_TF=... | tokens_T=...)`, or the parts:
    `backbone(backbone.embed_particles(...), packing, causal=..., cond_BD=backbone.condition(...))`.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, num_features: int | None = None, num_classes: int = 0,
                 start_vector: bool = True):
        """`start_vector=False` (continuous mode without NTP) leaves out the start vector, so that
        no parameter goes unused (DDP requires that all parameters get gradients)."""
        super().__init__()
        self.cfg = cfg
        self.backend = AttentionBackend(cfg.attention)
        self.input_mode = cfg.input_mode
        D = cfg.dim
        if cfg.input_mode == "continuous":
            if not num_features:
                raise ValueError("input_mode=continuous needs the number of input features")
            self.input_proj = nn.Linear(num_features, D)
            if start_vector:  # the NTP start vector ("token 0" of continuous mode)
                self.start = nn.Parameter(0.02 * torch.randn(D))
        else:
            self.token_emb = nn.Embedding(vocab_size, D)
        if cfg.conditioning == "multiplicity":
            self.cond_emb = nn.Embedding(cfg.max_particles + 1, D)
        elif cfg.conditioning == "class":
            if num_classes < 1:
                raise ValueError("conditioning=class needs the number of classes (manifest.classes)")
            self.cond_emb = nn.Embedding(num_classes, D)
        self.stack = Stack(cfg.num_blocks, D, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, self.backend)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_blocks

    def embed_particles(self, x_TF: torch.Tensor | None = None, tokens_T: torch.Tensor | None = None) -> torch.Tensor:
        """(T, D) input vectors: Linear(features) in continuous mode, Embedding(token ids) in token mode."""
        if self.input_mode == "continuous":
            if x_TF is None:
                raise ValueError("continuous input mode needs particle features")
            # the weights' dtype: DeepSpeed bf16 casts the model itself (no autocast), the batch stays fp32
            return self.input_proj(x_TF.to(self.input_proj.weight.dtype))
        if tokens_T is None:
            raise ValueError("token input mode needs token ids")
        return self.token_emb(tokens_T)

    def embed_start(self, num_seqs: int) -> torch.Tensor:
        """(B, D) start vectors: the trainable start vector, or the embedding of token id 0."""
        if self.input_mode == "continuous":
            if not hasattr(self, "start"):
                raise ValueError("this backbone was built without a start vector (start_vector=False)")
            return self.start.expand(num_seqs, -1)
        return self.token_emb.weight[0].expand(num_seqs, -1)

    def condition(self, multiplicity_B: torch.Tensor | None = None, labels_B: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, D) jet-level conditioning vector, or None without conditioning."""
        mode = self.cfg.conditioning
        if mode == "none":
            return None
        if mode == "multiplicity":
            if multiplicity_B is None:
                raise ValueError("conditioning=multiplicity needs the jets' multiplicities")
            return self.cond_emb(multiplicity_B.long().clamp(0, self.cfg.max_particles))
        if labels_B is None:
            raise ValueError("conditioning=class needs the jets' labels")
        return self.cond_emb(labels_B.long())

    def forward(self, h_TD: torch.Tensor, packing: Packing, *, causal: bool, cond_BD: torch.Tensor | None = None) -> torch.Tensor:
        """Packed embedded inputs (T, D) -> normalized features (T, D)."""
        if cond_BD is not None:
            h_TD = h_TD + cond_BD[packing.seq_index]
        return self.stack(h_TD, packing, causal=causal)

    def encode(
        self,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        causal: bool,
        x_TF: torch.Tensor | None = None,
        tokens_T: torch.Tensor | None = None,
        multiplicity_B: torch.Tensor | None = None,
        labels_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed particles -> (T, D) features in one call (embedding + conditioning + blocks), e.g.
        for fine-tuning: `backbone.encode(b.cu_seqlens, b.max_seqlen, causal=False, x_TF=b.x, multiplicity_B=b.seqlens)`."""
        h_TD = self.embed_particles(x_TF, tokens_T)
        packing = Packing(cu_seqlens, max_seqlen, h_TD.shape[0])
        return self(h_TD, packing, causal=causal, cond_BD=self.condition(multiplicity_B, labels_B))

    def step(self, h_BD: torch.Tensor, cache: KVCache, *, cond_BD: torch.Tensor | None = None) -> torch.Tensor:
        """One new embedded token per sequence (B, D) -> (B, D), causal, appending to `cache`."""
        if cond_BD is not None:
            h_BD = h_BD + cond_BD
        return self.stack.step(h_BD, cache)


def init_weights(module: nn.Module) -> None:
    """GPT-style init: N(0, 0.02) weights, zero biases; LayerNorm stays at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
