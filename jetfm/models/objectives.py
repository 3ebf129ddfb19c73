"""Pre-training objectives on packed jets: next-token prediction (NTP) and masked-particle modelling (MPM).

Token ids (docs/DATA.md): start = 0, particle = code + 1, stop = codebook_size + 1 = vocab - 1.

NTP — causal pass over [start, p1 .. pn]; position i predicts the token of particle i + 1 and the
last position predicts stop. In the packed NTP layout jet j (particles cu[j] .. cu[j+1]-1) takes
rows cu[j] + j (start) and cu[j] + j + 1 + i (particle i), so sequence lengths are n + 1.

MPM — a random subset of each jet's particles is masked: exactly m(n) = floor(f*n + 0.5)
particles, clipped to [1, n - 1] for n >= 2 (at least one particle is predicted and at least one
is seen), nothing for n <= 1. Masked particles are removed from the backbone's input (the packed
batch is rebuilt without them), so they cannot influence anything the backbone computes. After
the backbone, learned mask vector k sits at the k-th highest-pT masked particle (packed order is
pT order), the MPM head attends bidirectionally over the whole jet, and logits are computed at
masked particles only. Repacking costs one host sync per step (the number of unmasked particles).

Legend: T particles, B jets, D model dim, V vocabulary, M masked particles, F features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from . import cpu_kernels
from .attention import AttentionBackend, Packing
from .backbone import Backbone, Stack


# --------------------------------------------------------------------------- masking
def masked_count(lengths: torch.Tensor, fraction: float) -> torch.Tensor:
    """Particles masked per jet: floor(fraction * n + 0.5) clipped to [1, n - 1]; 0 when n <= 1."""
    n = lengths.long()
    m = torch.floor(n.double() * fraction + 0.5).long().clamp(min=1)
    return torch.minimum(m, n - 1).clamp(min=0)


def mask_particles(packing: Packing, fraction: float, generator: torch.Generator | None = None, *,
                   seed: int | None = None, jet_offset: int = 0) -> torch.Tensor:
    """(T,) bool, True at masked particles: a uniformly random subset of m(n) particles per jet.

    `seed` draws each jet's subset from (seed, jet_offset + its index in the batch) alone, so a jet
    gets the same mask whichever micro-batch or process it is in (the trainer passes a per-step
    seed and the jet's position in the global batch). Without it, `generator` (on the batch's
    device) makes it reproducible; None draws from the global RNG.
    """
    device = packing.cu_seqlens.device
    if seed is not None:
        u_T = _uniform_hash(seed, packing.seq_index.long() + jet_offset, packing.position.long())
    else:
        u_T = torch.rand(packing.total, generator=generator, device=device, dtype=torch.float64)
    # Sorting by (jet, u) keeps jets contiguous and shuffles within each jet: the sorted slot's
    # position within its jet is a uniformly random rank of the particle placed there.
    order_T = torch.argsort(packing.seq_index.double() + u_T, stable=True)
    rank_T = torch.empty_like(packing.position).index_copy_(0, order_T, packing.position)
    m_B = masked_count(packing.lengths, fraction)
    return rank_T < m_B[packing.seq_index]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2**32; every
    product stays below 2**63, so nothing overflows."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_hash(seed: int, jet_T: torch.Tensor, position_T: torch.Tensor) -> torch.Tensor:
    """(T,) float64 in [0, 1): a counter-based draw per (seed, jet, position), independent of batching."""
    x = _mix32(torch.full_like(jet_T, seed & 0xFFFFFFFF) ^ _mix32(jet_T & 0xFFFFFFFF))
    x = _mix32(x ^ _mix32((position_T + 0x9E3779B9) & 0xFFFFFFFF))
    return x.double() / 2**32


def mask_ranks(packing: Packing, masked_T: torch.Tensor) -> torch.Tensor:
    """(T,) int64: for a masked particle, how many masked particles of its jet precede it in
    packed (pT-descending) order, i.e. k for the k-th highest-pT masked particle (0-based)."""
    m_T = masked_T.long()
    masked_upto = torch.cat([m_T.new_zeros(1), torch.cumsum(m_T, 0)])  # (T+1,) exclusive prefix counts
    before_jet_B = masked_upto.index_select(0, packing.cu_seqlens[:-1].long())
    return masked_upto[:-1] - before_jet_B[packing.seq_index]


# --------------------------------------------------------------------------- losses
class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy + number of top-1 hits over (M, V) logits in one log_softmax.

    Why not F.cross_entropy: its backward materialises a zero-filled (M, V) gradient for the NLL
    and runs a separate log_softmax backward over it (~4 passes over M x V floats plus a copy);
    here the backward is softmax - onehot computed in place on the saved log-probabilities
    (2 passes). The vocabulary projection is the largest tensor of a pre-training step.
    A sum, not a mean: the caller divides by the global number of predictions (`LossNorm`).
    """

    @staticmethod
    def forward(ctx, logits_MV: torch.Tensor, targets_M: torch.Tensor):
        logp_MV = torch.log_softmax(logits_MV.float(), dim=-1)
        target_logp_M = logp_MV.gather(1, targets_M[:, None]).squeeze(1)
        loss_sum = -target_logp_M.sum()
        correct = (target_logp_M >= logp_MV.amax(-1)).float().sum()  # ties count as hits
        ctx.save_for_backward(logp_MV, targets_M)
        ctx.logits_dtype = logits_MV.dtype
        ctx.used = False
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        if ctx.used:
            raise RuntimeError("cross_entropy_sum supports one backward pass (it reuses its buffer)")
        ctx.used = True
        logp_MV, targets_M = ctx.saved_tensors
        M = logp_MV.shape[0]
        grad_MV = logp_MV.exp_()  # softmax, in place
        grad_MV[torch.arange(M, device=grad_MV.device), targets_M] -= 1.0
        grad_MV.mul_(grad_loss)
        return grad_MV.to(ctx.logits_dtype), None


def cross_entropy_sum(logits_MV: torch.Tensor, targets_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, correct_count) over M predictions: fp32 0-dim tensors, no mean inside (the caller
    normalises by the global count); correct_count carries no gradient. M = 0 gives zeros."""
    if logits_MV.shape[0] == 0:
        zero = logits_MV.float().sum() * 0.0
        return zero, zero.detach()
    return _CrossEntropySum.apply(logits_MV, targets_M)


def cross_entropy_and_accuracy(logits_MV: torch.Tensor, targets_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (computed in fp32) and top-1 accuracy (no gradient) of M predictions."""
    loss_sum, correct = cross_entropy_sum(logits_MV, targets_M)
    M = max(logits_MV.shape[0], 1)
    return loss_sum / M, correct / M


class Ratio(NamedTuple):
    """A metric as (sum, count) of one micro-batch: the trainer adds both over micro-batches and
    processes before dividing, so the logged value is per prediction, not per micro-batch."""

    total: torch.Tensor
    count: torch.Tensor

    @property
    def value(self) -> torch.Tensor | float:
        """The mean (0 when there is nothing to count)."""
        count = self.count.clamp(min=1) if torch.is_tensor(self.count) else max(self.count, 1)
        return self.total / count

    def __float__(self) -> float:
        return float(self.value)

    def item(self) -> float:  # reads like the scalar tensor a metric used to be
        return float(self.value)


@dataclass(frozen=True)
class LossNorm:
    """What the trainer tells a micro-batch's forward so that any split of a global batch gives the
    same gradient (stage hook `loss_counts`; docs/CONTRACTS.md "Stages").

    denominators: per objective, the global batch's prediction count (all micro-batches of the
    step, all processes) divided by (processes x micro-batches). The micro-batch's loss is
    sum / denominator: accelerate divides it by the micro-batch count and DDP/FSDP/DeepSpeed
    average over processes, which leaves sum over the global batch / global count.
    mask_seed, jet_offset: MPM masks drawn per jet from (mask_seed, jet_offset + jet index in the
    micro-batch), so a jet's mask does not depend on which micro-batch or process it lands in;
    mask_seed None draws from the global RNG (or the forward's generator).
    """

    denominators: dict[str, torch.Tensor | float]
    mask_seed: int | None = None
    jet_offset: int = 0

    def scale(self, name: str, local_count: torch.Tensor | float) -> torch.Tensor | float:
        """Multiplier turning a micro-batch *mean* over `local_count` predictions into its share of
        the global mean (for losses only available as means, e.g. F.mse_loss)."""
        return local_count / self.denominators[name]


def normalise(norm: LossNorm | None, name: str, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """loss_sum over this micro-batch's `count` predictions -> the loss to back-propagate: divided by
    the trainer's global denominator, or (no norm: standalone use) by the local count (a mean)."""
    if norm is None:
        return loss_sum / count.clamp(min=1)
    return loss_sum / norm.denominators[name]


LOSS_CHUNK_ROWS = 1024
"""Rows per chunk of `linear_cross_entropy`. With torch ops for the softmax, 256 rows (a chunk's
logits in the core's cache) measured best; with the C softmax kernel and one reused logits buffer,
256-2048 rows lie within 10% of each other and 1024 is the fastest at the reference size (3,000
rows, bf16, forward + backward: 69-73 ms against 76-80 at 256): fewer chunks mean fewer fp32
additions of the weight gradient's bf16 partial products. The buffer is 1024 x V (33 MB in fp32
at V = 8194)."""


def _compute_dtype(hidden_MD: torch.Tensor, weight_VD: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would multiply in: autocast's, else the weights'."""
    device = hidden_MD.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight_VD.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` and its gradient, in row chunks, no (M, V) tensor.

    Why: the vocabulary projection is the largest tensor of a pre-training step (M x 8194 logits,
    ~96 MB per step at batch 64) and, unfused, it is written, read by log_softmax, written again,
    read by the backward and multiplied twice more. Here each chunk's logits are formed, turned into
    softmax - onehot in place while in cache, and multiplied straight into the gradients of the
    hidden rows and of the weight: the same three matmuls as the unfused path, one chunk-sized
    buffer. The gradients are formed in the forward (for d loss_sum = 1) and scaled by the
    incoming gradient in the backward, so nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden_MD, weight_VD, targets_M, compute_dtype, chunk_rows, grad_enabled, kernel):
        M = hidden_MD.shape[0]
        # grad mode is off inside forward: whether a backward can follow is decided by the caller
        # (under torch.no_grad, e.g. validation, the gradient products are skipped: a third of the work)
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[0]), (grad_enabled and ctx.needs_input_grad[1])
        needs_grad = need_h or need_w
        w_VD = weight_VD.to(compute_dtype)
        h_MD = hidden_MD.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden_MD.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden_MD.device)
        grad_h_MD = torch.empty_like(h_MD) if need_h else None
        grad_w_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if need_w else None
        # one logits buffer for every chunk (the kernel path, CPU only: linear_cross_entropy decides):
        # a fresh (rows, V) output per chunk costs page faults and a slower GEMM on CPU
        z_buffer = torch.empty((min(chunk_rows, M), w_VD.shape[0]), dtype=compute_dtype) if kernel else None
        with torch.autocast(hidden_MD.device.type, enabled=False):
            for r0 in range(0, M, chunk_rows):
                h_cD = h_MD[r0:r0 + chunk_rows]
                t_c = targets_M[r0:r0 + chunk_rows]
                if kernel:
                    # C kernel: loss, hits and softmax - onehot in place, three passes over the chunk
                    z_cV = torch.mm(h_cD, w_VD.t(), out=z_buffer[:h_cD.shape[0]])
                    chunk_loss, chunk_correct = cpu_kernels.softmax_cross_entropy_(z_cV, t_c, need_grad=needs_grad)
                    loss_sum += chunk_loss
                    correct += chunk_correct
                    if needs_grad:
                        _accumulate_grads(z_cV, w_VD, h_cD, grad_h_MD, grad_w_VD, r0, chunk_rows)
                    continue
                # same rounding as nn.Linear + .float(): logits in the compute dtype, softmax in fp32
                z_cV = torch.mm(h_cD, w_VD.t()).float()
                # log-softmax by hand so that the row max serves the accuracy too and the
                # exponentials are taken once: max, subtract, exp, sum, divide (all in place)
                max_c = z_cV.amax(-1)
                target_z_c = z_cV.gather(1, t_c[:, None]).squeeze(1)
                correct += (target_z_c >= max_c).sum()  # ties count as hits
                p_cV = z_cV.sub_(max_c[:, None]).exp_()
                sum_c = p_cV.sum(-1)
                loss_sum += (sum_c.log() + max_c - target_z_c).sum()
                if not needs_grad:
                    continue
                g_cV = p_cV.div_(sum_c[:, None])  # softmax
                g_cV[torch.arange(g_cV.shape[0], device=g_cV.device), t_c] -= 1.0
                _accumulate_grads(g_cV.to(compute_dtype), w_VD, h_cD, grad_h_MD, grad_w_VD, r0, chunk_rows)
        ctx.save_for_backward(grad_h_MD, grad_w_VD)
        ctx.dtypes = (hidden_MD.dtype, weight_VD.dtype)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_h_MD, grad_w_VD = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h_MD is None else (grad_h_MD * grad_loss.to(grad_h_MD.dtype)).to(h_dtype)
        grad_w = None if grad_w_VD is None else (grad_w_VD * grad_loss).to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None


def _accumulate_grads(g_cV, w_VD, h_cD, grad_h_MD, grad_w_VD, r0: int, chunk_rows: int) -> None:
    """A chunk's d loss / d logits `g_cV` multiplied into the hidden rows' and the weight's gradients."""
    if grad_h_MD is not None:
        torch.mm(g_cV, w_VD, out=grad_h_MD[r0:r0 + chunk_rows])
    if grad_w_VD is not None:
        if g_cV.dtype == grad_w_VD.dtype:
            # fp32: added inside the GEMM (the out= form, not addmm_, which FLOP counters do not see)
            torch.addmm(grad_w_VD, g_cV.t(), h_cD, out=grad_w_VD)
        else:  # bf16 products, accumulated in fp32 (torch's CPU GEMM has no mixed-dtype output)
            grad_w_VD += torch.mm(g_cV.t(), h_cD)


def linear_cross_entropy(hidden_MD: torch.Tensor, weight_VD: torch.Tensor, targets_M: torch.Tensor, *,
                         chunk_rows: int = LOSS_CHUNK_ROWS, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum fp32, correct_count int64) of the logits `hidden_MD @ weight_VD.T` against `targets_M`.

    Equal (to rounding) to `F.cross_entropy(F.linear(hidden, weight).float(), targets,
    reduction="sum")` and to the number of rows whose target has the highest logit (ties count
    as hits), with gradients for `hidden_MD` and `weight_VD`; the multiply runs in autocast's
    dtype when autocast is on (as `nn.Linear` would), the softmax and sums in fp32. Callers
    normalise (mean over rows, over particles, over ranks) themselves. `kernel` runs each chunk's
    softmax through jetfm's C kernel on CPU (`cpu_kernels.softmax_cross_entropy_`) when it is built.
    """
    if hidden_MD.shape[0] == 0:
        zero = (hidden_MD.sum() + weight_VD.sum()).float() * 0.0  # keeps both in the graph
        return zero, torch.zeros((), dtype=torch.int64, device=hidden_MD.device)
    kernel = kernel and hidden_MD.device.type == "cpu" and cpu_kernels.available()
    return _LinearCrossEntropy.apply(hidden_MD, weight_VD, targets_M, _compute_dtype(hidden_MD, weight_VD), chunk_rows,
                                     torch.is_grad_enabled(), kernel)



class Head(nn.Module):
    """A pre-training head: `blocks` transformer blocks + LayerNorm + Linear (no bias) to the vocabulary."""

    def __init__(self, *, blocks: int, dim: int, num_heads: int, mlp_ratio: float, dropout: float,
                 backend, vocab_size: int, layer_offset: int = 0):
        super().__init__()
        self.stack = Stack(blocks, dim, num_heads, mlp_ratio, dropout, backend, layer_offset=layer_offset)
        # No bias: on CPU a biased (M, V) projection costs a full extra pass to copy the bias in
        # (addmm) and another to reduce its gradient; the LayerNorm's bias already provides one.
        self.out = VocabProjection(dim, vocab_size, bias=False, kernel=AttentionBackend(backend) is AttentionBackend.AUTO)


class VocabProjection(nn.Linear):
    """The heads' vocabulary projection: logits, or with targets the fused loss sums.

    The loss goes through the module's call (not `out.weight` read from outside) so that
    wrappers that gather parameters in forward hooks (DeepSpeed ZeRO-3, FSDP) see it used.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, kernel: bool = False):
        """`kernel`: the loss's softmax through jetfm's C kernel on CPU (attention backend auto)."""
        super().__init__(in_features, out_features, bias=bias)
        self.kernel = kernel

    def forward(self, x_MD: torch.Tensor, targets_M: torch.Tensor | None = None):
        """(M, D) -> (M, V) logits; with `targets_M`: `linear_cross_entropy`'s (loss_sum, correct_count)."""
        if targets_M is None:
            return super().forward(x_MD)
        return linear_cross_entropy(x_MD, self.weight, targets_M, kernel=self.kernel)


# --------------------------------------------------------------------------- NTP
def ntp_layout(packing: Packing) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """Rows of the NTP sequences [start, p1..pn]: particle_rows (T,), start_rows (B,), and their Packing."""
    B = packing.num_seqs
    arange_B1 = torch.arange(B + 1, device=packing.cu_seqlens.device, dtype=torch.int32)
    cu_ntp = packing.cu_seqlens + arange_B1
    particle_rows = torch.arange(packing.total, device=arange_B1.device) + packing.seq_index + 1
    start_rows = cu_ntp[:-1].long()
    return particle_rows, start_rows, Packing(cu_ntp, packing.max_seqlen + 1, packing.total + B)


class NTPObjective(nn.Module):
    def __init__(self, head: Head, stop_id: int):
        super().__init__()
        self.head = head
        self.stop_id = stop_id

    def logits(self, backbone: Backbone, packing: Packing, *, x_TF=None, tokens_T=None, cond_BD=None):
        """Causal NTP logits for every position of [start, p1..pn]: ((T + B), V), plus the NTP rows."""
        z_ND, particle_rows = self.hidden(backbone, packing, x_TF=x_TF, tokens_T=tokens_T, cond_BD=cond_BD)
        return self.head.out(z_ND), particle_rows

    def hidden(self, backbone: Backbone, packing: Packing, *, x_TF=None, tokens_T=None, cond_BD=None):
        """The head's normalized features ((T + B), D) that `head.out` projects, plus the NTP rows."""
        particle_rows, start_rows, ntp_packing = ntp_layout(packing)
        h_TD = backbone.embed_particles(x_TF, tokens_T)
        h_start_BD = backbone.embed_start(packing.num_seqs).to(h_TD.dtype)
        h_ND = h_TD.new_zeros(ntp_packing.total, h_TD.shape[1])
        h_ND = h_ND.index_copy(0, particle_rows, h_TD).index_copy(0, start_rows, h_start_BD)
        z_ND = backbone(h_ND, ntp_packing, causal=True, cond_BD=cond_BD)
        return self.head.stack(z_ND, ntp_packing, causal=True), particle_rows

    def targets(self, tokens_T: torch.Tensor, particle_rows: torch.Tensor, total: int) -> torch.Tensor:
        """(T + B,) next-token targets: the row before each particle predicts it; jets end with stop."""
        targets = tokens_T.new_full((total,), self.stop_id)
        return targets.index_copy(0, particle_rows - 1, tokens_T)

    @staticmethod
    def count(packing: Packing) -> int:
        """Predictions of a batch: every particle and each jet's stop (T + B)."""
        return packing.total + packing.num_seqs

    def forward(self, backbone, packing, *, tokens_T, x_TF=None, cond_BD=None):
        """(loss_sum, correct_count) over the T + B next-token predictions (fused projection + loss)."""
        z_ND, particle_rows = self.hidden(backbone, packing, x_TF=x_TF, tokens_T=tokens_T, cond_BD=cond_BD)
        loss_sum, correct = self.head.out(z_ND, self.targets(tokens_T, particle_rows, z_ND.shape[0]))
        return loss_sum, correct.float()


# --------------------------------------------------------------------------- MPM
class MPMObjective(nn.Module):
    def __init__(self, head: Head, *, num_mask_vectors: int, dim: int):
        super().__init__()
        self.head = head
        self.mask_vectors = nn.Embedding(num_mask_vectors, dim)

    def logits(self, backbone: Backbone, packing: Packing, masked_T: torch.Tensor, *, x_TF=None, tokens_T=None, cond_BD=None):
        """MPM logits at masked particles only: (M, V), and the masked particles' packed indices (M,)."""
        z_MD, mask_idx = self.hidden(backbone, packing, masked_T, x_TF=x_TF, tokens_T=tokens_T, cond_BD=cond_BD)
        return self.head.out(z_MD), mask_idx

    def hidden(self, backbone: Backbone, packing: Packing, masked_T: torch.Tensor, *, x_TF=None, tokens_T=None, cond_BD=None):
        """The head's normalized features at masked particles (M, D), and their packed indices (M,)."""
        # backbone on the unmasked particles alone, repacked
        masked_upto = torch.cat([masked_T.new_zeros(1, dtype=torch.long), torch.cumsum(masked_T.long(), 0)])
        cu = packing.cu_seqlens.long()
        keep_B = packing.lengths - (masked_upto[cu[1:]] - masked_upto[cu[:-1]])
        num_keep, max_keep = torch.stack([keep_B.sum(), keep_B.max()]).tolist()  # the one host sync
        order_T = torch.argsort(masked_T.to(torch.uint8), stable=True)  # unmasked first, both in packed order
        keep_idx, mask_idx = order_T[:num_keep], order_T[num_keep:]
        cu_keep = torch.cat([packing.cu_seqlens.new_zeros(1), torch.cumsum(keep_B, 0).to(torch.int32)])
        keep_packing = Packing(cu_keep, max_keep, num_keep)
        h_KD = backbone.embed_particles(
            None if x_TF is None else x_TF.index_select(0, keep_idx),
            None if tokens_T is None else tokens_T.index_select(0, keep_idx),
        )
        z_KD = backbone(h_KD, keep_packing, causal=False, cond_BD=cond_BD)
        # mask vector k at the k-th (pT-ordered) masked particle of each jet
        rank_M = mask_ranks(packing, masked_T).index_select(0, mask_idx)
        rank_M = rank_M.clamp(max=self.mask_vectors.num_embeddings - 1)  # only for hand-made masks: the
        # model checks that num_mask_vectors covers mask_particles' count at max_particles
        z_TD = z_KD.new_zeros(packing.total, z_KD.shape[1]).index_copy(0, keep_idx, z_KD)
        z_TD = z_TD.index_copy(0, mask_idx, self.mask_vectors(rank_M).to(z_KD.dtype))
        return self.head.stack(z_TD, packing, causal=False, rows=mask_idx), mask_idx

    def forward(self, backbone, packing, masked_T, *, tokens_T, x_TF=None, cond_BD=None):
        """(loss_sum, correct_count) over the masked particles (fused projection + loss)."""
        z_MD, mask_idx = self.hidden(backbone, packing, masked_T, x_TF=x_TF, tokens_T=tokens_T, cond_BD=cond_BD)
        loss_sum, correct = self.head.out(z_MD, tokens_T.index_select(0, mask_idx))
        return loss_sum, correct.float()
