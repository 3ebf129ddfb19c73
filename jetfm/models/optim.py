"""What trains the models: AdamW parameter groups (which weights decay) and learning-rate schedules.

    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)

A model may bring its own groups (`param_groups(base_lr, weight_decay) -> list[dict]`, each with
its "lr", e.g. a classifier whose backbone learns slower) and extra names kept out of weight decay
(`no_weight_decay() -> set[str]`); docs/CONTRACTS.md "Stages". Both hooks are read here, on the
unwrapped module, before accelerate prepares it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from jetfm.config import OptimConfig

#: Modules whose `weight` is decayed; every other parameter (biases, norms, embeddings,
#: codebooks, learned start/mask vectors) is not.
DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on Linear/Conv weights only, minus model.no_weight_decay() names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            weight = (isinstance(module, DECAYED) and name == "weight") or (
                isinstance(module, nn.MultiheadAttention) and name.endswith("proj_weight"))
            (decay if weight and full_name not in skip else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """LambdaLR factor of the step count: linear warm-up, then constant / cosine / linear to min_lr_ratio."""
    warmup, kind, floor = optim.warmup_steps, optim.schedule, optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - floor) * progress

    return factor


def build_optimizer(model: nn.Module, optim: OptimConfig, max_steps: int):
    """AdamW over the model's groups (its own `param_groups`, else `param_groups` above) and its LambdaLR."""
    groups = (model.param_groups(optim.lr, optim.weight_decay) if hasattr(model, "param_groups")
              else param_groups(model, optim.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, max_steps))
    return optimizer, scheduler
