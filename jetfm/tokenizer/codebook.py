"""The VQ codebook: nearest-code quantisation, codebook learning, dead-code replacement.

Legend: T particles (packed), K codes, D latent dimension.

Two ways for codes to learn (TokenizerConfig.codebook_update):

- "affine" (reference, default): codes = shift + scale ⊙ W. W (K, D) and the shared shift
  and scale (D) are trained by gradient through the codebook term ‖sg(z) − q‖². A code that
  is never chosen gets no gradient of its own, but the shared shift/scale move every code
  together towards the encoder outputs, which keeps far more codes within reach (Huh et al.
  2023, "Straightening out the straight-through estimator"). shift/scale start from the mean
  and std of the first training batch's encoder outputs, and their learning rate is
  multiplied by `affine_lr` (as a parameter scale, so it holds under Adam).
- "ema": each code is the exponential moving average of the encoder outputs assigned to it
  (sums and counts decay together, so an unused code keeps its position until replaced).

Measured (issue 3; Pythia top-tagging jets from `jetfm data generate --preset toptag`, 16k train
jets, trunk hidden 64 / 2+2 blocks, 8192 codes, latent 8, batch 100 jets, 500 steps, lr 1e-3,
dead-code replacement every 100 steps, one seed; evaluated on 2000 validation jets):

    update / init          recon MSE  utilisation  perplexity  pT ratio IQR  Δη std  jet-mass IQR
    affine / gaussian       0.0053      0.991         7298        0.086      0.028     0.054
    affine / sample         0.0049      0.984         7179        0.088      0.028     0.060
    ema / sample            0.0050      0.992         7372        0.082      0.028     0.051
    plain (lr 0) / gauss.   0.0051      0.992         7313        0.084      0.028     0.052

All four agree within single-seed noise: dead-code replacement, not the update rule, is what
keeps the 8192 codes in use (batch perplexity ≈130–600 before the first replacement at step
100, ≈3800 from step 250 on, for batches of ≈6,500 particles). "affine" is the
default because it is the reference's method, it is equal in quality here, and it learns by
gradient only — no extra all-reduce of K×D statistics in every forward (which "ema" needs) and
its state resumes with the optimizer. "sample" is the default init because it starts with ≈4×
the perplexity of "gaussian" (≈550 vs ≈130 at step 50), which matters with the reference's
500 steps before the first replacement.

Both share: the commitment term beta·‖z − sg(q)‖², dead-code replacement (codes used fewer
than `threshold` times since the last replacement are re-seeded with random recent encoder
outputs), the data-dependent initialisation, and the collapse statistics. Under
torch.distributed the usage counts and EMA statistics are summed over ranks and every
re-seeding is broadcast from rank 0, so all replicas keep identical codebooks (DDP only:
FSDP would shard W, which this module does not support).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CodebookCollapseError(RuntimeError):
    """Codebook utilisation fell below tokenizer.min_utilisation after warm-up."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


#: Rows per distance block: a (rows × K) block small enough to stay in cache while reduced.
_DISTANCE_BLOCK_ELEMENTS = 1 << 20
#: Codes per group in the two-level argmin (see _row_argmin).
_ARGMIN_GROUP = 128


def _row_argmin(d_RK: torch.Tensor) -> torch.Tensor:
    """argmin over the last dim, identical to d.argmin(1) (first minimum wins), faster on CPU.

    A plain argmin over 8192 columns is not vectorised on CPU (≈15× slower than amin), so the
    minimum is found per group of 128 codes with amin, then the first winning group is searched.
    """
    R, K = d_RK.shape
    if K % _ARGMIN_GROUP or K < 8 * _ARGMIN_GROUP or d_RK.device.type != "cpu":
        return d_RK.argmin(1)
    groups = d_RK.view(R, K // _ARGMIN_GROUP, _ARGMIN_GROUP)
    best_group = groups.amin(2).argmin(1)
    within = groups[torch.arange(R, device=d_RK.device), best_group].argmin(1)
    return best_group * _ARGMIN_GROUP + within


def _distance_operands(codes_KD: torch.Tensor) -> torch.Tensor:
    """(D + 1, K) matrix M with [z, 1] @ M = ‖c‖² − 2 z·c = ‖z − c‖² − ‖z‖² (same argmin)."""
    codes_KD = codes_KD.float()
    return torch.cat([-2.0 * codes_KD, (codes_KD * codes_KD).sum(1, keepdim=True)], 1).t().contiguous()


@torch.no_grad()
def nearest_codes(z_TD: torch.Tensor, codes_KD: torch.Tensor) -> torch.Tensor:
    """Index (T,) int64 of the nearest code (Euclidean) for every row, in memory-bounded blocks."""
    operands = _distance_operands(codes_KD)
    z_TD = z_TD.float()
    ones = torch.ones(z_TD.shape[0], 1, device=z_TD.device)
    z_aug = torch.cat([z_TD, ones], 1)
    rows = max(1, _DISTANCE_BLOCK_ELEMENTS // codes_KD.shape[0])
    out = torch.empty(z_TD.shape[0], dtype=torch.long, device=z_TD.device)
    for start in range(0, z_TD.shape[0], rows):
        out[start : start + rows] = _row_argmin(z_aug[start : start + rows] @ operands)
    return out


def code_statistics(codes_T: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, utilisation) of a set of code assignments, as 0-d float tensors.

    perplexity = exp(entropy of the code histogram); utilisation = fraction of codes used.
    """
    return counts_statistics(torch.bincount(codes_T.flatten(), minlength=codebook_size))


def counts_statistics(counts_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, utilisation) from per-code assignment counts (K,)."""
    counts = counts_K.float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


@torch.no_grad()
def kmeans(x_ND: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means; returns (k, D) centres. Empty clusters are re-seeded from random points."""
    n = x_ND.shape[0]
    index = torch.randint(n, (k,), generator=generator, device="cpu").to(x_ND.device)
    spread = x_ND.std(0, keepdim=True).clamp(min=1e-6)
    centres = x_ND[index] + 1e-3 * spread * torch.randn(k, x_ND.shape[1], generator=generator).to(x_ND)
    for _ in range(iters):
        assign = nearest_codes(x_ND, centres)
        counts = torch.bincount(assign, minlength=k).to(x_ND.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x_ND)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            reseed = torch.randint(n, (int(empty.sum()),), generator=generator).to(x_ND.device)
            centres[empty] = x_ND[reseed]
    return centres


class Codebook(nn.Module):
    """K codes of dimension D. forward(z_TD) -> (straight-through z_q (T, D), codes (T,), vq_loss)."""

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        update: str = "affine",
        beta: float = 0.9,
        affine_lr: float = 2.0,
        sync_nu: float = 0.0,
        ema_decay: float = 0.99,
        init: str = "sample",
        kmeans_iters: int = 10,
        pool_size: int = 65536,
    ):
        super().__init__()
        if update not in ("affine", "ema"):
            raise ValueError(f"codebook update {update!r} unknown; expected 'affine' or 'ema'")
        if init not in ("sample", "gaussian", "kmeans"):
            raise ValueError(f"codebook init {init!r} unknown; expected 'sample', 'gaussian' or 'kmeans'")
        self.size, self.dim, self.update = size, dim, update
        self.beta, self.sync_nu, self.ema_decay = beta, sync_nu, ema_decay
        self.init, self.kmeans_iters = init, kmeans_iters
        if update == "affine":
            self.weight = nn.Parameter(torch.randn(size, dim))
            # stored / affine_lr: Adam's step in (shift, log-scale) space is then affine_lr × lr
            self.affine_mult = affine_lr if affine_lr > 0 else 1.0
            self.shift = nn.Parameter(torch.zeros(dim), requires_grad=affine_lr > 0)
            self.log_scale = nn.Parameter(torch.zeros(dim), requires_grad=affine_lr > 0)
        else:
            self.register_buffer("ema_count", torch.ones(size))
            self.register_buffer("ema_sum", torch.randn(size, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # assignments per code since the last dead-code replacement (training only)
        self.register_buffer("usage", torch.zeros(size, dtype=torch.long))
        # ring buffer of recent encoder outputs to re-seed dead codes from: a plain attribute,
        # not a buffer, so it is neither checkpointed nor broadcast by DDP every step
        self.pool_size = pool_size
        self.pool: torch.Tensor | None = None
        self.pool_filled = 0
        self._pool_next = 0
        self._init_checked = False  # avoids a host sync on `initialised` every step

    # ------------------------------------------------------------------ codes
    def vectors(self) -> torch.Tensor:
        """The effective codebook (K, D)."""
        if self.update == "affine":
            shift = self.shift * self.affine_mult
            scale = torch.exp(self.log_scale * self.affine_mult)
            return shift + scale * self.weight
        return self.ema_sum / self.ema_count.clamp(min=1e-12)[:, None]

    def lookup(self, codes_T: torch.Tensor) -> torch.Tensor:
        """Code vectors (T, D) of code indices 0..K-1."""
        return self.vectors()[codes_T]

    @torch.no_grad()
    def set_codes(self, index: torch.Tensor, vectors_ND: torch.Tensor) -> None:
        """Overwrite the effective vectors of the given codes."""
        if self.update == "affine":
            shift = self.shift * self.affine_mult
            scale = torch.exp(self.log_scale * self.affine_mult)
            self.weight[index] = (vectors_ND - shift) / scale
        else:
            self.ema_count[index] = 1.0
            self.ema_sum[index] = vectors_ND

    # ------------------------------------------------------------------ forward
    def forward(self, z_TD: torch.Tensor):
        if self.training and not self._init_checked:
            if not bool(self.initialised):
                self.initialise(z_TD.detach())
            self._init_checked = True
        codes_KD = self.vectors()
        index_T = nearest_codes(z_TD.detach(), codes_KD.detach())
        q_TD = codes_KD[index_T]
        codebook_term = F.mse_loss(q_TD, z_TD.detach())
        commitment = F.mse_loss(z_TD, q_TD.detach())
        vq_loss = codebook_term + self.beta * commitment
        if self.training:
            self._record(z_TD.detach(), index_T)
        # straight-through: the decoder sees q, the encoder gets the decoder's gradient
        z_q = z_TD + (q_TD - z_TD).detach()
        if self.sync_nu > 0 and q_TD.requires_grad:
            z_q = z_q + self.sync_nu * (q_TD - q_TD.detach())
        return z_q, index_T, vq_loss

    @torch.no_grad()
    def _record(self, z_TD: torch.Tensor, index_T: torch.Tensor) -> None:
        counts = torch.bincount(index_T, minlength=self.size)
        self.usage += counts
        self._push_pool(z_TD)
        if self.update == "ema":
            sums = torch.zeros(self.size, self.dim, device=z_TD.device, dtype=torch.float32)
            sums.index_add_(0, index_T, z_TD.float())
            counts = counts.float()
            if _distributed():
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)

    @torch.no_grad()
    def _push_pool(self, z_TD: torch.Tensor) -> None:
        capacity = self.pool_size
        if self.pool is None or self.pool.device != z_TD.device:
            self.pool = torch.zeros(capacity, self.dim, device=z_TD.device)
            self.pool_filled = self._pool_next = 0
        if z_TD.shape[0] > capacity:
            z_TD = z_TD[torch.randperm(z_TD.shape[0], device=z_TD.device)[:capacity]]
        n = z_TD.shape[0]
        slots = (self._pool_next + torch.arange(n, device=z_TD.device)) % capacity
        self.pool[slots] = z_TD.to(self.pool.dtype)
        self._pool_next = (self._pool_next + n) % capacity
        self.pool_filled = min(capacity, self.pool_filled + n)

    # ------------------------------------------------------------------ init and replacement
    @torch.no_grad()
    def initialise(self, z_TD: torch.Tensor) -> None:
        """Data-dependent start from the first training batch's encoder outputs z (T, D).

        "sample": codes = randomly drawn z (+1% jitter); "gaussian": codes ~ N(mean z, std z²);
        "kmeans": Lloyd k-means centres of z. For "affine" the shared shift/scale start at the
        mean/std of z, so W starts standardised.
        """
        z_TD = z_TD.float()
        mean, std = z_TD.mean(0), z_TD.std(0).clamp(min=1e-4)
        if self.update == "affine":
            self.shift.copy_(mean / self.affine_mult)
            self.log_scale.copy_(torch.log(std) / self.affine_mult)
        every = torch.arange(self.size, device=z_TD.device)
        if self.init == "kmeans":
            self.set_codes(every, kmeans(z_TD, self.size, self.kmeans_iters))
        elif self.init == "gaussian":
            self.set_codes(every, mean + std * torch.randn(self.size, self.dim, device=z_TD.device))
        else:
            pick = torch.randint(z_TD.shape[0], (self.size,), device=z_TD.device)
            self.set_codes(every, z_TD[pick] + 1e-2 * std * torch.randn(self.size, self.dim, device=z_TD.device))
        self._broadcast_codebook()
        self.initialised.fill_(True)

    @torch.no_grad()
    def _broadcast_codebook(self) -> None:
        if not _distributed():
            return
        tensors = [self.weight, self.shift, self.log_scale] if self.update == "affine" else [self.ema_sum, self.ema_count]
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)

    @torch.no_grad()
    def replace_dead(self, threshold: float) -> tuple[int, float]:
        """Re-seed codes used fewer than `threshold` times since the last call; reset usage.

        Returns (number of codes re-seeded, fraction of codes used in the window).
        Needs recent encoder outputs (training forwards since construction or load).
        """
        usage = self.usage.clone()
        if _distributed():
            dist.all_reduce(usage)
        utilisation = float((usage > 0).float().mean())
        dead = torch.nonzero(usage.float() < threshold).flatten()
        n_dead = int(dead.numel()) if self.pool_filled else 0
        if n_dead:
            pool = self.pool[: self.pool_filled]
            pick = torch.randint(self.pool_filled, (n_dead,), device=pool.device)
            spread = pool.std(0).clamp(min=1e-6) if self.pool_filled > 1 else torch.ones_like(pool[0])
            # small jitter: two codes seeded from the same latent must not stay identical
            new = pool[pick] + 1e-2 * spread * torch.randn(n_dead, self.dim, device=pool.device)
            if _distributed():
                dist.broadcast(new, src=0)
            self.set_codes(dead, new)
        self.usage.zero_()
        return n_dead, utilisation

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, update={self.update!r}, beta={self.beta}"


def collapse_message(utilisation: float, size: int, window: int, floor: float) -> str:
    used = int(round(utilisation * size))
    return (
        f"tokenizer codebook collapse: only {used} of {size} codes ({100 * utilisation:.2f}%) were used in the "
        f"last {window} steps, below tokenizer.min_utilisation = {floor} ({math.ceil(floor * size)} codes). "
        "Try a smaller codebook_size, a lower dead_code_every, codebook_update=affine, or codebook_init=kmeans."
    )
