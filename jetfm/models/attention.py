"""The one module that owns every attention kernel in jetfm.

Backends (an enum, chosen in the model config, checked when the model is built):

- `AUTO`  — the default: on CUDA flash-attn when it is installed and the tensors are fp16/bf16,
  else SDPA; on CPU jetfm's C kernel on the packed layout (`cpu_kernels.py`: no padding, no
  buckets; 3-4x faster than SDPA here) when it builds, else SDPA. Resolved per call from the
  tensors' device and dtype, so one config runs on a laptop and on a GPU node.
- `SDPA`  — torch `scaled_dot_product_attention`, any device and dtype. Packed jets are
  scattered into a padded (B, H, N, D) layout for the kernel and gathered back; on CPU the jets
  are first grouped by length into a few buckets (see `Packing`) so that padding stays small,
  and the attention core runs in fp32 (CPU bf16 SDPA backward is several times slower).
- `FLASH` — flash-attn's `flash_attn_varlen_func` on the packed layout directly (CUDA,
  fp16/bf16), and `flash_attn_with_kvcache` for incremental decoding. Imported lazily.

Every call takes `causal: bool` as a required keyword: there is no default, so no caller can
get bidirectional attention by forgetting an argument (nor the reverse).

Legend: T packed tokens (sum of sequence lengths), B sequences, N max sequence length,
H heads, D head dim, L KV-cache capacity.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
import threading

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu_kernels


@functools.cache
def _flash_attn():
    """The flash_attn module, or None when it cannot be imported (detected once)."""
    try:
        import flash_attn  # noqa: PLC0415  (optional GPU extra)
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn


def flash_available() -> bool:
    return _flash_attn() is not None and torch.cuda.is_available()


class AttentionBackend(str, enum.Enum):
    AUTO = "auto"
    SDPA = "sdpa"
    FLASH = "flash"

    def resolve(self, device: torch.device | str, dtype: torch.dtype, head_dim: int | None = None) -> "AttentionBackend":
        """The kernel family a call on `device` with `dtype` runs: AUTO becomes FLASH on CUDA when
        flash-attn can take it, else SDPA (on CPU, SDPA's place is taken by jetfm's kernel where
        it builds: see `varlen_attention_qkv`); SDPA and FLASH stay themselves."""
        if self is not AttentionBackend.AUTO:
            return self
        head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)
        if (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_ok
                and flash_available()):
            return AttentionBackend.FLASH
        return AttentionBackend.SDPA

    def assert_supported(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                         *, head_dim: int | None = None) -> None:
        """Raise ValueError if this backend cannot run on `device` with `dtype` and `head_dim`.

        Called when the model is built (with its head_dim; device/dtype None = check what can be
        checked then: for flash, that flash-attn imports and CUDA exists) and again on every
        flash call with the real tensors' device and dtype (attribute checks only, no host sync).
        """
        if self is not AttentionBackend.FLASH:  # SDPA runs anywhere; AUTO picks what runs
            return
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            # flash-attn's kernels: head dims a multiple of 8, at most 256
            raise ValueError(f"attention backend 'flash' needs a head dim divisible by 8 and <= 256, got {head_dim}; use 'sdpa'")
        if _flash_attn() is None:
            raise ValueError("attention backend 'flash' needs the flash-attn package (pip install 'jetfm[gpu]'); use 'sdpa'")
        if not torch.cuda.is_available():
            raise ValueError("attention backend 'flash' needs a CUDA GPU; use 'sdpa' on this machine")
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"attention backend 'flash' runs on CUDA only, got tensors on {torch.device(device)}")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend 'flash' needs fp16/bf16 inputs, got {dtype}; train with bf16 mixed precision or use 'sdpa'"
            )


# --------------------------------------------------------------------------- packed layout
class Packing:
    """Bookkeeping for one set of packed sequences; built once per forward, shared by all layers.

    cu_seqlens (B+1,) int32 starting at 0; max_seqlen an upper bound of the lengths and total =
    T = cu_seqlens[-1], both Python ints (taken from shapes / known bounds: no host sync).

    SDPA needs a padded layout. Padding every jet to the batch's longest one wastes most of the
    attention work (multiplicities ~50 +- 20 padded to ~120), so on CPU the jets are sorted by
    length and split into `buckets` groups, each padded to its own longest jet and attended in
    its own SDPA call. buckets=None picks clamp(B // 8, 1, 8) on CPU, where reading the lengths
    is free, and 1 elsewhere (reading them would cost a host sync per forward).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, *, buckets: int | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.max_seqlen = int(max_seqlen)
        self.total = int(total)
        if buckets is None:
            buckets = min(max(self.num_seqs // 8, 1), 8) if self.cu_seqlens.device.type == "cpu" else 1
        self.buckets = max(1, min(int(buckets), self.num_seqs))

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """(B,) int64 sequence lengths."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @functools.cached_property
    def seq_index(self) -> torch.Tensor:
        """(T,) int64 sequence of every packed token."""
        arange_B = torch.arange(self.num_seqs, device=self.cu_seqlens.device)
        return torch.repeat_interleave(arange_B, self.lengths, output_size=self.total)

    @functools.cached_property
    def position(self) -> torch.Tensor:
        """(T,) int64 position of every packed token within its sequence."""
        arange_T = torch.arange(self.total, device=self.cu_seqlens.device)
        return arange_T - self.cu_seqlens[:-1].long()[self.seq_index]

    @functools.cached_property
    def flat_index(self) -> torch.Tensor:
        """(T,) int64 row of every packed token in the flattened (B*N) padded layout."""
        return self.seq_index * self.max_seqlen + self.position

    @functools.cached_property
    def key_mask(self) -> torch.Tensor:
        """(B, 1, 1, N) bool, True at real keys. Key 0 is always allowed, so that the padded query
        rows of an empty sequence are never fully masked (no NaN; their outputs are dropped)."""
        arange_N = torch.arange(self.max_seqlen, device=self.cu_seqlens.device)
        valid_BN = arange_N[None, :] < self.lengths[:, None]
        valid_BN[:, 0] = True
        return valid_BN[:, None, None, :]

    def pad(self, x_T: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, N, ...) with zeros at absent positions."""
        out = x_T.new_zeros((self.num_seqs * self.max_seqlen,) + tuple(x_T.shape[1:]))
        out = out.index_copy(0, self.flat_index, x_T)
        return out.view((self.num_seqs, self.max_seqlen) + tuple(x_T.shape[1:]))

    def unpad(self, x_BN: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (T, ...)."""
        return x_BN.reshape((-1,) + tuple(x_BN.shape[2:])).index_select(0, self.flat_index)

    def _length_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(jet order (B,), token order (T,), inverse (T,)): tokens reordered by `order` hold the
        jets sorted by length (stable), each jet's tokens in their own order."""
        jet_order = torch.argsort(self.lengths, stable=True)
        arange_B = torch.arange(self.num_seqs, device=jet_order.device)
        jet_rank = torch.empty_like(jet_order).index_copy_(0, jet_order, arange_B)
        order = torch.argsort(jet_rank[self.seq_index] * (self.max_seqlen + 1) + self.position)
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(self.total, device=order.device))
        return jet_order, order, inverse

    def length_sorted(self) -> tuple["Packing", torch.Tensor, torch.Tensor]:
        """(packing of the same jets sorted by length, order (T,), inverse (T,)). A stack that
        reorders its tokens once with `order` (and back with `inverse`) spares every layer's
        bucketed attention its own reordering (see `bucketing`)."""
        jet_order, order, inverse = self._length_order()
        cu = torch.zeros_like(self.cu_seqlens)
        cu[1:] = torch.cumsum(self.lengths[jet_order], 0)
        return Packing(cu, self.max_seqlen, self.total, buckets=self.buckets), order, inverse

    @functools.cached_property
    def bucketing(self) -> tuple[torch.Tensor | None, torch.Tensor | None, list["Packing"]] | None:
        """(order (T,), inverse (T,), [sub-packing per bucket]) or None for a single bucket:
        tokens reordered by `order` hold the jets sorted by length, bucket after bucket;
        order = inverse = None when the jets already are (no reordering needed)."""
        if self.buckets == 1:
            return None
        lengths = self.lengths
        if bool((lengths[1:] >= lengths[:-1]).all()):  # host read (CPU: free)
            order = inverse = None
            sorted_lengths = lengths.tolist()
        else:
            jet_order, order, inverse = self._length_order()
            sorted_lengths = lengths[jet_order].tolist()  # host read (CPU: free)
        per_bucket = -(-self.num_seqs // self.buckets)
        parts = []
        for b0 in range(0, self.num_seqs, per_bucket):
            chunk = sorted_lengths[b0:b0 + per_bucket]
            cu = list(itertools.accumulate(chunk, initial=0))
            cu_t = torch.tensor(cu, dtype=torch.int32, device=lengths.device)
            parts.append(Packing(cu_t, max(max(chunk), 1), cu[-1], buckets=1))
        return order, inverse, parts


def _sdpa_upcast(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # torch 2.13's CPU SDPA backward in bf16/fp16 is ~5-15x slower than in fp32 (measured at the
    # reference size); on CPU the attention core therefore runs in fp32 (autocast off around it,
    # else autocast would cast the inputs straight back to bf16).
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def _sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention in the inputs' own dtype, whatever autocast says."""
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def padded_sdpa(q_BHND: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor, *, causal: bool,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on an already padded (B, H, N, D) layout under jetfm's kernel policy (fp32 core on
    CPU); `attn_mask` bool, True = attend, combined with the causal mask when causal=True. For
    code that keeps its own padded layout (baselines, classifier heads)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    dtype = q_BHND.dtype
    compute = _sdpa_upcast(dtype, q_BHND.device)
    q, k, v = q_BHND.to(compute), k_BHND.to(compute), v_BHND.to(compute)
    if attn_mask is None:
        return _sdpa(q, k, v, is_causal=causal).to(dtype)
    if causal:
        N = q.shape[-2]
        attn_mask = attn_mask & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    return _sdpa(q, k, v, attn_mask=attn_mask).to(dtype)


def varlen_attention(
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    backend: AttentionBackend = AttentionBackend.SDPA,
    softmax_scale: float | None = None,
    packing: Packing | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence: softmax(q k^T * scale [+ causal mask]) v.

    q/k/v (T, H, D) packed; cu_seqlens (B+1,) int32; max_seqlen >= every length. `causal` is
    required: True lets token i see tokens <= i of its own sequence, False all of them.
    `packing` may carry precomputed indices for these cu_seqlens (shared across layers).
    Returns (T, H, D).
    """
    if AttentionBackend(backend).resolve(q_THD.device, q_THD.dtype, q_THD.shape[-1]) is AttentionBackend.FLASH:
        return _flash_varlen(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)
    return varlen_attention_qkv(
        torch.stack([q_THD, k_THD, v_THD], 1), cu_seqlens, max_seqlen,
        causal=causal, backend=backend, softmax_scale=softmax_scale, packing=packing,
    )


def varlen_attention_qkv(
    qkv_T3HD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    backend: AttentionBackend = AttentionBackend.SDPA,
    softmax_scale: float | None = None,
    packing: Packing | None = None,
) -> torch.Tensor:
    """`varlen_attention` on q/k/v stacked as (T, 3, H, D) — what a fused qkv projection gives;
    the SDPA path then pads one tensor instead of three. Returns (T, H, D)."""
    backend = AttentionBackend(backend)
    if backend.resolve(qkv_T3HD.device, qkv_T3HD.dtype, qkv_T3HD.shape[-1]) is AttentionBackend.FLASH:
        q_THD, k_THD, v_THD = qkv_T3HD.unbind(1)
        return _flash_varlen(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if backend is AttentionBackend.AUTO and cpu_kernels.supports(qkv_T3HD):
        return cpu_kernels.varlen_attention_cpu(qkv_T3HD, cu_seqlens, causal=causal, softmax_scale=softmax_scale)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv_T3HD.shape[-1])
    if packing is None:
        packing = Packing(cu_seqlens, max_seqlen, qkv_T3HD.shape[0])
    dtype = qkv_T3HD.dtype
    qkv_T3HD = qkv_T3HD.to(_sdpa_upcast(dtype, qkv_T3HD.device))
    if packing.bucketing is None:
        return _sdpa_padded(qkv_T3HD, packing, causal, scale).to(dtype)
    order, inverse, parts = packing.bucketing
    if order is not None:
        qkv_T3HD = qkv_T3HD.index_select(0, order)
    # torch.split (not slicing): its backward is one cat, slicing's one zero-filled full-size add per bucket
    chunks = torch.split(qkv_T3HD, [sub.total for sub in parts])
    out_THD = torch.cat([_sdpa_padded(chunk, sub, causal, scale) for chunk, sub in zip(chunks, parts)])
    return (out_THD if inverse is None else out_THD.index_select(0, inverse)).to(dtype)


def _flash_varlen(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, *, causal: bool, softmax_scale: float | None):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    AttentionBackend.FLASH.assert_supported(q_THD.device, q_THD.dtype)
    cu = cu_seqlens.to(torch.int32)
    return _flash_attn().flash_attn_varlen_func(
        q_THD, k_THD, v_THD, cu, cu, int(max_seqlen), int(max_seqlen),
        dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
    )


def _sdpa_padded(qkv_T3HD: torch.Tensor, packing: Packing, causal: bool, scale: float) -> torch.Tensor:
    q_BHND, k_BHND, v_BHND = (t.transpose(1, 2) for t in packing.pad(qkv_T3HD).unbind(2))
    if causal:
        # Right padding: a real query i only reaches keys <= i, which are all real, so the
        # causal mask alone is exact; padded query rows see real keys too (never fully masked).
        o_BHND = _sdpa(q_BHND, k_BHND, v_BHND, is_causal=True, scale=scale)
    else:
        o_BHND = _sdpa(q_BHND, k_BHND, v_BHND, attn_mask=packing.key_mask, scale=scale)
    return packing.unpad(o_BHND.transpose(1, 2))


# --------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys/values of a causal stack for incremental decoding, one new token per sequence a step.

    Per layer, k/v are exposed as (B, H, L, D) (`k(layer)`, `v(layer)`); `lengths` (B,) int32
    counts the tokens already cached per sequence. A step writes the new token's k/v of every
    layer at position `lengths`, attends to positions <= lengths, and `advance()` then moves
    all sequences on by one. Storage is (layers, B, L, H, D) for flash — the layout flash-attn's
    `flash_attn_with_kvcache` reads and appends to in place —, (layers, B, H, L, D) for SDPA on
    an accelerator, whose kernel then reads a contiguous prefix instead of copying a transposed
    view every step, and position-major (layers, L, B, H, D) on CPU when the compiled kernels
    below run (fp32, head dim a multiple of 16, a C++ compiler at hand): the filled prefix of a
    layer is then one contiguous block that the one-query kernels below stream through (in the
    per-(jet, head) layout each row's prefix is a separate 1-6 KB piece, and reading them ran at
    a third of the memory bandwidth), and a step's new k/v of a layer is one contiguous row.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        backend: AttentionBackend = AttentionBackend.SDPA,
    ):
        requested = AttentionBackend(backend)
        self.backend = requested.resolve(device or "cpu", dtype, head_dim)
        self.max_len = int(max_len)
        # position-major only where the compiled kernels below read it (backend auto: `sdpa` keeps
        # the torch path; CPU; fp32): SDPA would copy its permuted views
        self.position_major = (requested is AttentionBackend.AUTO and self.backend is AttentionBackend.SDPA
                               and torch.device(device or "cpu").type == "cpu"
                               and dtype == torch.float32 and head_dim % 16 == 0 and self._kernel() is not None)
        if self.backend is AttentionBackend.FLASH:
            shape = (num_layers, batch_size, self.max_len, num_heads, head_dim)
        elif self.position_major:
            shape = (num_layers, self.max_len, batch_size, num_heads, head_dim)
        else:
            shape = (num_layers, batch_size, num_heads, self.max_len, head_dim)
        # empty, not zeros: only the filled prefix is ever read, and zero-filling the buffers of a
        # generation batch (tens of MB) took ~2% of its time
        self._k = torch.empty(shape, device=device, dtype=dtype)
        self._v = torch.empty(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.seen = 0  # host-side max of lengths: all sequences advance together
        # values the models derive from their weights once per cache (a generation batch, over which
        # the weights stay fixed) instead of at every step: parameter lists, code vectors
        self.memo: dict = {}

    @property
    def num_layers(self) -> int:
        return self._k.shape[0]

    @property
    def batch_size(self) -> int:
        return self._k.shape[2 if self.position_major else 1]

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    def _bhld(self, store: torch.Tensor, layer: int) -> torch.Tensor:
        if self.backend is AttentionBackend.FLASH:
            return store[layer].transpose(1, 2)
        return store[layer].permute(1, 2, 0, 3) if self.position_major else store[layer]

    def k(self, layer: int) -> torch.Tensor:
        """(B, H, L, D) view of layer's cached keys."""
        return self._bhld(self._k, layer)

    def v(self, layer: int) -> torch.Tensor:
        """(B, H, L, D) view of layer's cached values."""
        return self._bhld(self._v, layer)

    def select(self, index_b: torch.Tensor) -> None:
        """Keep only the sequences `index_b` (b,) int64, in that order (drop finished jets)."""
        dim = 2 if self.position_major else 1
        self._k = self._k.index_select(dim, index_b)
        self._v = self._v.index_select(dim, index_b)
        self.lengths = self.lengths.index_select(0, index_b)

    def advance(self) -> None:
        """Call once per step, after every layer has attended."""
        if self.seen >= self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        self.lengths += 1
        self.seen += 1

    def attend(self, layer: int, q_BHD: torch.Tensor, k_BHD: torch.Tensor, v_BHD: torch.Tensor,
               softmax_scale: float | None = None) -> torch.Tensor:
        """Append one token's (B, H, D) k/v to `layer` and attend from its q to the cache. Returns (B, H, D)."""
        if self.seen >= self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_BHD.shape[-1])
        k_BHD, v_BHD = k_BHD.to(self.dtype), v_BHD.to(self.dtype)
        if self.backend is AttentionBackend.FLASH:
            self.backend.assert_supported(q_BHD.device, q_BHD.dtype)
            out_B1HD = _flash_attn().flash_attn_with_kvcache(
                q_BHD[:, None].to(self.dtype), self._k[layer], self._v[layer],
                k=k_BHD[:, None], v=v_BHD[:, None], cache_seqlens=self.lengths,
                softmax_scale=scale, causal=True,
            )
            return out_B1HD[:, 0].to(q_BHD.dtype)
        # all sequences sit at position `seen` (they advance together; select keeps that), so the
        # new token goes to one slice and the query sees the whole filled prefix: no mask needed
        pos = self.seen
        self.k(layer)[:, :, pos] = k_BHD
        self.v(layer)[:, :, pos] = v_BHD
        B, H, D = q_BHD.shape
        if self.position_major and q_BHD.dtype == torch.float32:
            kernel = self._kernel()
            k_LND = self._k[layer].view(self.max_len, B * H, D)
            v_LND = self._v[layer].view(self.max_len, B * H, D)
            p_nN = torch.softmax(kernel.scores(q_BHD.reshape(B * H, D), k_LND, pos + 1, scale), dim=0)
            return kernel.mix(p_nN, v_LND, pos + 1).view(B, H, D)
        k_BHLD = self.k(layer)[:, :, : pos + 1]
        v_BHLD = self.v(layer)[:, :, : pos + 1]
        compute = _sdpa_upcast(q_BHD.dtype, q_BHD.device)
        out_BH1D = _sdpa(q_BHD[:, :, None].to(compute), k_BHLD.to(compute), v_BHLD.to(compute), scale=scale)
        return out_BH1D[:, :, 0].to(q_BHD.dtype)

    # CPU fp32 kernels for one new token per sequence on the position-major cache (L, N = B*H, D),
    # head dim D a multiple of 16 (16-float vectors: one AVX-512 register, or two AVX2 ones).
    # `scores` and `mix` are the two halves of one-query attention around torch's softmax, each
    # streaming through the layer's filled prefix once, position by position. Why not SDPA: for a
    # single query its CPU kernel spends its time on per-head blocking (measured at the reference
    # size, 64 jets x 8 heads x 16, 14 cached layers: 0.66 ms a layer at 50 positions, 1.1 ms at
    # 85). `stack_step` runs whole pre-LayerNorm blocks (Block.step's mathematics) in C++ on its own
    # ops: LayerNorm, linear layers on weights packed once per cache with bias, GELU and residual
    # fused, and the one-query attention fused (scores, softmax, mix in one pass), writing each
    # layer's new k/v straight from the qkv output into the cache. Why: at a few dozen jets a step
    # the ATen ops' allocations, dispatch and GEMM packing cost as much as their arithmetic (a
    # Python block step issued ~25 ops; with ATen ops in C++ the block step still took 70% of a
    # generation step; on its own ops the step is ~1.5x faster). Same mathematics as the Python
    # block steps; rounding differs at the ulp level (own exp and erf: error < 2e-7).


    @staticmethod
    def _kernel():
        """The compiled generation kernels (`cpu_kernels.decode_extension`: one-query attention and
        whole-stack block steps), or None without a compiler: the CPU cache then runs SDPA and
        Python block steps (same mathematics, slower)."""
        return cpu_kernels.decode_extension()

    def can_step_blocks(self, x_BD: torch.Tensor, num_heads: int) -> bool:
        """Whether `step_blocks` (the compiled block step) can run this step: CPU position-major
        cache, fp32 input and cache, head dim a multiple of 16, the kernels built."""
        return (self.position_major and x_BD.device.type == "cpu" and x_BD.dtype == self.dtype == torch.float32
                and x_BD.shape[1] % num_heads == 0 and (x_BD.shape[1] // num_heads) % 16 == 0
                and self.seen < self.max_len and self._kernel() is not None)

    def pack_weight(self, weight_ND: torch.Tensor) -> torch.Tensor:
        """A linear layer's (out, in) weight in the layout of the compiled linear layers (panels of
        32 output columns, kernels/kv_decode.cpp `pack_weight`); out a multiple of 16, fp32. Packed
        once while the weight is unchanged (`derived_from`): pass the parameter itself."""
        return derived_from(weight_ND, "packed", lambda: self._kernel().pack_weight(weight_ND.detach().contiguous()))

    def step_blocks(self, x_BD: torch.Tensor, params: list[torch.Tensor], first_layer: int, num_heads: int,
                    eps: float) -> torch.Tensor:
        """Run eval-mode pre-LayerNorm blocks on one new token per sequence (B, D) -> (B, D) in
        C++ (`stack_step` above): 12 parameter tensors per block in Block's order, block i on
        cache layer first_layer + i, the linear weights packed (`pack_weight`). Block.step's
        mathematics on jetfm's own fused ops; check `can_step_blocks` first."""
        K = x_BD.shape[1] // num_heads
        return self._kernel().stack_step(x_BD.contiguous(), params, self._k, self._v, first_layer, self.seen,
                                         num_heads, eps, 1.0 / math.sqrt(K))


# values derived from a weight (a packed or padded copy for the compiled generation kernels),
# kept across KV caches (batches, shards, generate calls) while the weight is unchanged
_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {name: (state, value)}
_DERIVED_LOCK = threading.Lock()


def derived_from(weight: torch.Tensor, name: str, make):
    """`make()`, computed once per weight and `name` until the weight changes or is freed: changed
    in place (an optimizer step, load_state_dict: its version counter moves) or swapped (`.data =`,
    e.g. Module.to: its storage, dtype or shape differ). Why: packing the weights of a generation
    step (~20 MB at the reference size) took ~3% of a 100-particle batch, redone for every batch
    and shard although the weights stay fixed. Inference tensors (a model built under
    torch.inference_mode) keep no version counter, so for them `make()` runs on every call."""
    if weight.is_inference():
        return make()
    state = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.device)
    with _DERIVED_LOCK:
        entry = _DERIVED.get(weight, {}).get(name)
    if entry is not None and entry[0] == state:
        return entry[1]
    value = make()
    with _DERIVED_LOCK:
        _DERIVED.setdefault(weight, {})[name] = (state, value)
    return value


def reference_attention(q_THD, k_THD, v_THD, cu_seqlens, *, causal: bool, softmax_scale: float | None = None):
    """Plain per-sequence softmax(q k^T) v loop in float64: the ground truth the kernels are tested against."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_THD.shape[-1])
    out = torch.zeros(q_THD.shape, dtype=torch.float64, device=q_THD.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q, k, v = (t[start:end].double().transpose(0, 1) for t in (q_THD, k_THD, v_THD))  # (H, n, D)
        scores = q @ k.transpose(1, 2) * scale
        if causal:
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out.to(q_THD.dtype)
