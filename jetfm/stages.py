"""The trainer's only view of a model: one builder (and optionally one evaluator) per stage.

    model = build_model(cfg, manifest)   # nn.Module; forward(batch: JetBatch) -> {"loss": scalar, **metrics}
    evaluate = stage_evaluator(cfg)      # evaluate(model, loader, cfg, out_dir) -> {name: float} | None
    export = stage_exporter(cfg)         # export(model, directory): out_dir/final for the next stage

The contract (docs/CONTRACTS.md "Stages"): `forward(batch)` returns a dict with `"loss"` (a
scalar tensor, what is back-propagated) and any number of scalar metrics (tensors, floats, or
`Ratio(sum, count)`s, which are added over micro-batches and processes before dividing), logged
as `train/<name>`. Optional hooks the trainer looks for on the *unwrapped* module:

- `loss_counts(batch) -> {name: 0-dim tensor}`: predictions per loss term, known before the
  forward. The trainer then adds the counts of every micro-batch and process once per step and
  calls `forward(batch, norm=LossNorm(...))`; the loss divides each term's sum by
  `norm.denominators[name]`, so any split of the global batch gives the same gradient.

- `on_step_end(step) -> dict | None`, called on every rank after each optimizer step (step =
  optimizer steps done, from 1). A returned dict is logged; returning anything but None also
  says "I changed the weights": under DDP the trainer then broadcasts rank 0's parameters and
  buffers so the replicas cannot drift apart (e.g. dead-code replacement picking random codes).
- `no_weight_decay() -> set[str]`: extra parameter names kept out of weight decay.

`cfg.builder = "package.module:function"` replaces the stage's builder (experiments, tests).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from jetfm.config import StageName


@dataclass(frozen=True)
class Stage:
    builder: str
    """`module:function` building the model from (cfg, manifest)."""
    evaluator: str | None
    """`module:function` evaluating it on a loader (optional; mean validation loss otherwise)."""
    exporter: str | None = None
    """`module:function(model, directory)` writing the trained model for the next stage to
    out_dir/final (optional; else final/model.safetensors + final/config.yaml)."""


#: The code of each stage, keyed by the names of `jetfm.config.StageName` (the one list of them;
#: tests/test_config.py checks that every name has an entry here and nothing else does).
STAGES: dict[StageName, Stage] = {
    "tokenizer": Stage("jetfm.tokenizer.model:build_tokenizer_model", "jetfm.tokenizer.evaluate:evaluate",
                       "jetfm.artifacts.exports:export_tokenizer"),
    "pretrain": Stage("jetfm.models.pretrain:build_pretrain_model", None),
    "finetune": Stage("jetfm.finetune.model:build_finetune_model", "jetfm.finetune.evaluate:evaluate",
                      "jetfm.artifacts.exports:export_classifier"),
}


class StageError(RuntimeError):
    """A stage's code is missing or broke the contract."""


def resolve(path: str, what: str, *, optional: bool = False) -> Callable | None:
    """Import `package.module:function`; None if optional and the module or function is absent."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if optional and error.name and module_name.startswith(error.name):
            return None
        raise StageError(f"{what} {path!r}: cannot import {module_name} ({error})") from error
    function = getattr(module, attr, None)
    if function is None:
        if optional:
            return None
        raise StageError(f"{what} {path!r}: {module_name} has no {attr}")
    return function


def build_model(cfg, manifest) -> nn.Module:
    """The model of `cfg.stage` (or of `cfg.builder`), checked to be an nn.Module."""
    path = cfg.builder or STAGES[cfg.stage].builder
    builder = resolve(path, f"stage {cfg.stage} builder")
    model = builder(cfg, manifest)
    if not isinstance(model, nn.Module):
        raise StageError(f"{path} returned {type(model).__name__}, expected a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise StageError(f"{path} built a model without trainable parameters")
    return model


def stage_evaluator(cfg) -> Callable | None:
    """The stage's evaluate(model, loader, cfg, out_dir) (None: the trainer uses the mean loss).

    A custom `cfg.builder` brings its own: an `evaluate` function in the builder's module, if any.
    """
    if cfg.builder:
        return resolve(cfg.builder.split(":")[0] + ":evaluate", "evaluator", optional=True)
    path = STAGES[cfg.stage].evaluator
    return resolve(path, f"stage {cfg.stage} evaluator", optional=True) if path else None


def stage_exporter(cfg) -> Callable | None:
    """The stage's export(model, directory), or None (the trainer then writes safetensors + config)."""
    if cfg.builder:
        return resolve(cfg.builder.split(":")[0] + ":export", "exporter", optional=True)
    path = STAGES[cfg.stage].exporter
    return resolve(path, f"stage {cfg.stage} exporter", optional=True) if path else None


def requires_tokens(cfg) -> bool:
    """Whether the stage's batches must carry token ids (the reader then checks the manifest)."""
    if cfg.builder:
        return False  # a custom builder checks its own inputs
    if cfg.stage == "pretrain":
        return True  # targets are token ids whatever the input mode
    if cfg.stage == "finetune":
        return cfg.model.input_mode == "token"
    return False
