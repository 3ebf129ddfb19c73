"""A CPU pre-training step split over threads: the batch's jets in as many groups as torch has
threads, each group's forward and backward on a thread of its own with single-threaded ops, the
gradients added.

Why: at the reference size (dim 128, ~3,000 particles a batch) torch's ops split every matrix over
the cores and meet at the end of each op; on this project's 2-core machine the joint step ran 1.5x
faster on 2 threads than on 1, while two independent single-threaded halves of the batch run 1.9x
faster (one bf16 GEMM of the model's shape: 269 GFLOP/s on 2 threads, 2 x 158 as two 1-thread
processes). Batch 64, bf16, 2 threads, alternating in one process: 653 -> 533 ms a step (median of
14 pairs; docs/SPEED.md).

Same mathematics as one pass: every group's losses are divided by the whole batch's prediction
counts (the trainer's LossNorm, else the batch's own), MPM masks are drawn for the whole batch
before the split (or per jet from the trainer's seed, with the group's jet offset), and the
gradient of the summed loss is the sum of the groups' gradients. Rounding differs (sums in another
order), and dropout draws from one generator per group, seeded from torch's RNG: reproducible for a
seed, other random numbers than one pass.

The groups' gradients are formed inside the forward (`torch.autograd.grad` on each thread; a
single `backward()` call afterwards would run the whole backward on one thread) and handed to the
parameters by the returned loss's backward, scaled by its incoming gradient, so that
`loss.backward()`, gradient accumulation and DDP's hooks see an ordinary loss.

Where: CPU, `model.attention: auto` (the switch of every CPU fast path), torch threads >= 2, at
least MIN_JETS_PER_GROUP jets a group, parameters not sharded (FSDP's DTensors, DeepSpeed ZeRO-3).
Groups: one per thread, fewer where the batch is short of jets; each group's ops then get
threads // groups threads (measured on 2 cores only: 2 groups of 1 thread).
"""

from __future__ import annotations

import bisect
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from .backbone import dropout_generator
from .objectives import Ratio

MIN_JETS_PER_GROUP = 6
T, R = TypeVar("T"), TypeVar("R")


try:  # torch builds without distributed support have no DTensor (and no FSDP)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def _sharded(p: torch.Tensor) -> bool:
    """A parameter that FSDP (DTensor) or DeepSpeed ZeRO-3 (ds_id) shards: its module's hooks gather
    and scatter it around the forward and backward, which must not run on several threads."""
    return isinstance(p, DTensor) or hasattr(p, "ds_id")


def group_count(model: torch.nn.Module, num_jets: int, device: torch.device) -> int:
    """Groups for this batch: torch's thread count where the split applies (module docstring), else 1."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or num_jets < 2 * MIN_JETS_PER_GROUP:
        return 1
    if any(_sharded(p) for p in model.parameters()):
        return 1
    return min(threads, num_jets // MIN_JETS_PER_GROUP)


def group_bounds(cu_seqlens: list[int], groups: int) -> list[int]:
    """Jet indices [0, j1, ..., B] cutting the jets into `groups` contiguous groups of about equal
    particle counts (the work), each at least one jet."""
    B, total = len(cu_seqlens) - 1, cu_seqlens[-1]
    bounds = [0]
    for k in range(1, groups):
        j = bisect.bisect_left(cu_seqlens, round(k * total / groups))
        bounds.append(min(max(j, bounds[-1] + 1), B - (groups - k)))
    return bounds + [B]


class _GroupGradients(torch.autograd.Function):
    """The summed loss, whose backward hands the groups' summed gradients to the parameters."""

    @staticmethod
    def forward(ctx, loss, grads, *params):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return (None, None, *(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads))


def map_on_threads(fn: Callable[[T], R], items: list[T], *, op_threads: int, name: str) -> list[R]:
    """[fn(item) for item in items], each call on a thread of its own, in order. Torch's modes are
    per thread, so every call runs in the caller's grad and inference modes (CPU autocast is the
    caller's to pass on: it must not cover a backward); torch's ops get `op_threads` threads each
    meanwhile, restored afterwards. Used by the step split (run_groups) and by generation's shards
    (sampling._run_sharded)."""
    threads = torch.get_num_threads()
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def in_caller_modes(item: T) -> R:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    torch.set_num_threads(op_threads)
    try:
        with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix=name) as pool:
            return list(pool.map(in_caller_modes, items))
    finally:
        torch.set_num_threads(threads)


def run_groups(parts: list[Callable[[], dict]], params: list[torch.Tensor]) -> dict:
    """Run each `part()` (a group's forward: {"loss", metrics as Ratio}) on a thread of its own, its
    ops on threads // groups threads, with the caller's grad, inference and CPU autocast modes; gradients of each
    group's loss w.r.t. `params` taken on its thread. Returns the metrics added over the groups and
    the summed loss, differentiable w.r.t. `params` (its backward: the summed gradients)."""
    grad = torch.is_grad_enabled() and bool(params)
    autocast, autocast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    # one dropout generator per group, seeded from torch's RNG on this thread (a seed reproduces it)
    seeds = torch.randint(0, 2**62, (len(parts),), dtype=torch.int64).tolist()

    def work(i: int):
        with dropout_generator(torch.Generator().manual_seed(seeds[i])):
            with torch.autocast("cpu", enabled=autocast, dtype=autocast_dtype):
                out = parts[i]()
            grads = None
            if grad and out["loss"].requires_grad:  # backward outside autocast, as loss.backward()
                grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
        return out, grads

    results = map_on_threads(work, list(range(len(parts))), op_threads=max(1, torch.get_num_threads() // len(parts)),
                             name="jetfm-step")
    outs = [out for out, _ in results]
    combined = {}
    for key, value in outs[0].items():
        if isinstance(value, Ratio):
            combined[key] = Ratio(sum((o[key].total for o in outs[1:]), value.total),
                                  sum((o[key].count for o in outs[1:]), value.count))
    loss = outs[0]["loss"].detach()
    for out in outs[1:]:
        loss = loss + out["loss"].detach()
    group_grads = [g for _, g in results if g is not None]
    if group_grads:
        summed = []
        for per_param in zip(*group_grads):  # in group order: the same bits on every run
            total = None
            for g in per_param:
                if g is not None:
                    total = g if total is None else total + g
            summed.append(total)
        loss = _GroupGradients.apply(loss, tuple(summed), *params)
    combined["loss"] = loss
    return combined
