"""The layer order of jetfm: every import points down this list or stays within its layer.

    base -> data -> metrics -> config -> models -> runtime -> stages -> trainer -> commands

A module may import modules of its own layer and of the layers before it, never of a later
one, and no two modules may import each other, directly or around a loop; imports inside
functions count the same as those at the top of a file (deferring an import hides a cycle, it
does not remove it). `tests/test_layers.py` reads every module of jetfm with `ast` and fails,
naming file and line, on an import against this order or on a cycle; what still breaks the
order today is listed there, with the reason, until it is fixed.

Each entry names a module or a package; a package covers its submodules unless a longer entry
names one of them (`jetfm.models` is a model, `jetfm.models.config` is configuration). A new
module must be placed here before the test passes: the order is a decision, not a default.
This file imports nothing, so anything (docs, tools, tests) can read it.
"""

from __future__ import annotations

#: (layer, what it holds, modules and packages), lowest first.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("base", "imports nothing from jetfm: the version, this order, config choices, messages, atomic publishing",
     ("jetfm", "jetfm.layers", "jetfm.choices", "jetfm.messages", "jetfm.artifacts", "jetfm.artifacts.atomic")),
    ("data", "shard format, manifest and writer, reader, batches, features, physics",
     ("jetfm.data",)),
    ("metrics", "observables, distances, classification metrics, plots",
     ("jetfm.metrics",)),
    ("config", "the experiment config and the dataclasses of its sections",
     ("jetfm.config", "jetfm.config_io", "jetfm.models.config", "jetfm.tokenizer.config", "jetfm.finetune.config")),
    ("models", "modules, objectives, optimizer groups; the tokenizer and classifier models; stage exports",
     ("jetfm.models", "jetfm.tokenizer", "jetfm.finetune", "jetfm.artifacts.exports")),
    ("runtime", "what runs the models: accelerate and parallelism, checkpoints, MLflow tracking and run lookup",
     ("jetfm.distributed", "jetfm.tracking", "jetfm.checkpoint", "jetfm.rundir", "jetfm.artifacts.runs")),
    ("stages", "what a stage needs beyond its model: evaluation, tokenizing, sampling, estimates, scaling",
     ("jetfm.stages", "jetfm.tokenizer.evaluate", "jetfm.tokenizer.tokenize", "jetfm.finetune.evaluate",
      "jetfm.sampling", "jetfm.evaluation", "jetfm.estimate", "jetfm.scaling")),
    ("trainer", "the training loop",
     ("jetfm.train", "jetfm.train_metrics", "jetfm.resume", "jetfm.step_sync", "jetfm.validation")),
    ("commands", "what a user runs: the jetfm command and its subcommands (the data ones included)",
     ("jetfm.cli", "jetfm.demo", "jetfm.sweep", "jetfm.sweep_pretrain", "jetfm.generate", "jetfm.data.generate", "jetfm.data.convert",
      "jetfm.data.inspect", "jetfm.scaling.__main__")),
)

LAYER_NAMES: tuple[str, ...] = tuple(name for name, _, _ in LAYERS)


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (the longest entry that names it or a package above it)."""
    best, best_len = None, -1
    for name, _, entries in LAYERS:
        for entry in entries:
            # the root package names only itself: a module nobody placed must not fall into "base"
            covers = module == entry or (entry != "jetfm" and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = name, len(entry)
    return best
