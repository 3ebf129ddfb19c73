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

import torch
import torch.nn as nn

from .attention import Packing
from .backbone import Backbone, Stack


# --------------------------------------------------------------------------- masking
def masked_count(lengths: torch.Tensor, fraction: float) -> torch.Tensor:
    """Particles masked per jet: floor(fraction * n + 0.5) clipped to [1, n - 1]; 0 when n <= 1."""
    n = lengths.long()
    m = torch.floor(n.double() * fraction + 0.5).long().clamp(min=1)
    return torch.minimum(m, n - 1).clamp(min=0)


def mask_particles(packing: Packing, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(T,) bool, True at masked particles: a uniformly random subset of m(n) particles per jet.

    `generator` (on the batch's device) makes it reproducible; None draws from the global RNG,
    which the trainer seeds and checkpoints.
    """
    device = packing.cu_seqlens.device
    u_T = torch.rand(packing.total, generator=generator, device=device, dtype=torch.float64)
    # Sorting by (jet, u) keeps jets contiguous and shuffles within each jet: the sorted slot's
    # position within its jet is a uniformly random rank of the particle placed there.
    order_T = torch.argsort(packing.seq_index.double() + u_T)
    rank_T = torch.empty_like(packing.position).index_copy_(0, order_T, packing.position)
    m_B = masked_count(packing.lengths, fraction)
    return rank_T < m_B[packing.seq_index]


def mask_ranks(packing: Packing, masked_T: torch.Tensor) -> torch.Tensor:
    """(T,) int64: for a masked particle, how many masked particles of its jet precede it in
    packed (pT-descending) order, i.e. k for the k-th highest-pT masked particle (0-based)."""
    m_T = masked_T.long()
    masked_upto = torch.cat([m_T.new_zeros(1), torch.cumsum(m_T, 0)])  # (T+1,) exclusive prefix counts
    before_jet_B = masked_upto.index_select(0, packing.cu_seqlens[:-1].long())
    return masked_upto[:-1] - before_jet_B[packing.seq_index]


# --------------------------------------------------------------------------- losses
class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy + top-1 accuracy over (M, V) logits in one log_softmax.

    Why not F.cross_entropy: its backward materialises a zero-filled (M, V) gradient for the NLL
    and runs a separate log_softmax backward over it (~4 passes over M x V floats plus a copy);
    here the backward is softmax - onehot computed in place on the saved log-probabilities
    (2 passes). The vocabulary projection is the largest tensor of a pre-training step.
    """

    @staticmethod
    def forward(ctx, logits_MV: torch.Tensor, targets_M: torch.Tensor):
        logp_MV = torch.log_softmax(logits_MV.float(), dim=-1)
        target_logp_M = logp_MV.gather(1, targets_M[:, None]).squeeze(1)
        loss = -target_logp_M.mean()
        acc = (target_logp_M >= logp_MV.amax(-1)).float().mean()  # ties count as hits
        ctx.save_for_backward(logp_MV, targets_M)
        ctx.logits_dtype = logits_MV.dtype
        ctx.used = False
        ctx.mark_non_differentiable(acc)
        return loss, acc

    @staticmethod
    def backward(ctx, grad_loss, grad_acc):
        if ctx.used:
            raise RuntimeError("cross_entropy_and_accuracy supports one backward pass (it reuses its buffer)")
        ctx.used = True
        logp_MV, targets_M = ctx.saved_tensors
        M = logp_MV.shape[0]
        grad_MV = logp_MV.exp_()  # softmax, in place
        grad_MV[torch.arange(M, device=grad_MV.device), targets_M] -= 1.0
        grad_MV.mul_(grad_loss / M)
        return grad_MV.to(ctx.logits_dtype), None


def cross_entropy_and_accuracy(logits_MV: torch.Tensor, targets_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (computed in fp32) and top-1 accuracy (no gradient) of M predictions."""
    if logits_MV.shape[0] == 0:
        zero = logits_MV.sum() * 0.0
        return zero, zero.detach()
    return _CrossEntropy.apply(logits_MV, targets_M)


LOSS_CHUNK_ROWS = 256
"""Rows per chunk of `linear_cross_entropy`: a chunk's (rows, V) logits stay in the core's cache
while its log-softmax and gradient are formed (256 rows measured best at the reference size
on a Zen 4 CPU: 20% (fp32) and 37% (bf16) less CPU time than unfused; 64 or 1024 rows gain less)."""


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
    def forward(ctx, hidden_MD, weight_VD, targets_M, compute_dtype, chunk_rows):
        M = hidden_MD.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w_VD = weight_VD.to(compute_dtype)
        h_MD = hidden_MD.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden_MD.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden_MD.device)
        grad_h_MD = torch.empty_like(h_MD) if ctx.needs_input_grad[0] else None
        grad_w_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden_MD.device.type, enabled=False):
            for r0 in range(0, M, chunk_rows):
                h_cD = h_MD[r0:r0 + chunk_rows]
                t_c = targets_M[r0:r0 + chunk_rows]
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
                g_cV = g_cV.to(compute_dtype)
                if grad_h_MD is not None:
                    torch.mm(g_cV, w_VD, out=grad_h_MD[r0:r0 + chunk_rows])
                if grad_w_VD is not None:
                    grad_w_VD += torch.mm(g_cV.t(), h_cD)
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
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(hidden_MD: torch.Tensor, weight_VD: torch.Tensor, targets_M: torch.Tensor, *,
                         chunk_rows: int = LOSS_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum fp32, correct_count int64) of the logits `hidden_MD @ weight_VD.T` against `targets_M`.

    Equal (to rounding) to `F.cross_entropy(F.linear(hidden, weight).float(), targets,
    reduction="sum")` and to the number of rows whose target has the highest logit (ties count
    as hits), with gradients for `hidden_MD` and `weight_VD`; the multiply runs in autocast's
    dtype when autocast is on (as `nn.Linear` would), the softmax and sums in fp32. Callers
    normalise (mean over rows, over particles, over ranks) themselves.
    """
    if hidden_MD.shape[0] == 0:
        zero = (hidden_MD.sum() + weight_VD.sum()).float() * 0.0  # keeps both in the graph
        return zero, torch.zeros((), dtype=torch.int64, device=hidden_MD.device)
    return _LinearCrossEntropy.apply(hidden_MD, weight_VD, targets_M, _compute_dtype(hidden_MD, weight_VD), chunk_rows)


def _mean_loss_and_accuracy(out: nn.Module, hidden_MD, targets_M):
    """Mean cross-entropy and top-1 accuracy from the fused projection's sums."""
    loss_sum, correct = out(hidden_MD, targets_M)
    rows = max(hidden_MD.shape[0], 1)
    return loss_sum / rows, correct.float() / rows


class Head(nn.Module):
    """A pre-training head: `blocks` transformer blocks + LayerNorm + Linear (no bias) to the vocabulary."""

    def __init__(self, *, blocks: int, dim: int, num_heads: int, mlp_ratio: float, dropout: float,
                 backend, vocab_size: int, layer_offset: int = 0):
        super().__init__()
        self.stack = Stack(blocks, dim, num_heads, mlp_ratio, dropout, backend, layer_offset=layer_offset)
        # No bias: on CPU a biased (M, V) projection costs a full extra pass to copy the bias in
        # (addmm) and another to reduce its gradient; the LayerNorm's bias already provides one.
        self.out = VocabProjection(dim, vocab_size, bias=False)


class VocabProjection(nn.Linear):
    """The heads' vocabulary projection: logits, or with targets the fused loss sums.

    The loss goes through the module's call (not `out.weight` read from outside) so that
    wrappers that gather parameters in forward hooks (DeepSpeed ZeRO-3, FSDP) see it used.
    """

    def forward(self, x_MD: torch.Tensor, targets_M: torch.Tensor | None = None):
        """(M, D) -> (M, V) logits; with `targets_M`: `linear_cross_entropy`'s (loss_sum, correct_count)."""
        if targets_M is None:
            return super().forward(x_MD)
        return linear_cross_entropy(x_MD, self.weight, targets_M)


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

    def forward(self, backbone, packing, *, tokens_T, x_TF=None, cond_BD=None):
        z_ND, particle_rows = self.hidden(backbone, packing, x_TF=x_TF, tokens_T=tokens_T, cond_BD=cond_BD)
        targets_N = self.targets(tokens_T, particle_rows, z_ND.shape[0])
        return _mean_loss_and_accuracy(self.head.out, z_ND, targets_N)


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
        z_MD, mask_idx = self.hidden(backbone, packing, masked_T, x_TF=x_TF, tokens_T=tokens_T, cond_BD=cond_BD)
        return _mean_loss_and_accuracy(self.head.out, z_MD, tokens_T.index_select(0, mask_idx))
