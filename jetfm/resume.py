"""Resuming a run: which config changes a resumed run may make, and the optimizer settings it takes.

`FIXED_ON_RESUME` names the keys that fix the model, objective or data order; `_check_config_changes`
refuses those and reports the rest; `_optimizer_settings` / `_apply_optimizer_settings` carry the
new config's lr, schedule and AdamW settings past the loaded checkpoint. Used by `setup` in
jetfm/train.py, kept apart so the training entry point stays short.
"""

from __future__ import annotations

from pathlib import Path

from jetfm.checkpoint import CheckpointError
from jetfm.config import Config, ConfigError
from jetfm.config_io import flatten, load_yaml


#: Keys a resumed run cannot change (prefix -> why): they define the model, what it learns, or the
#: data order. data.batch_size and train.grad_accum_steps may change when the global batch
#: (batch_size x processes x accumulation) does not; the loader's state checks that.
FIXED_ON_RESUME = {
    "stage": "the stage", "builder": "the model", "seed": "the data order", "model.": "the model",
    "objective.": "the objective", "tokenizer.": "the model", "finetune.mode": "the model",
    "finetune.pretrained": "the model", "finetune.head_": "the model", "data.path": "the data",
    "data.features": "the model inputs", "data.inputs": "the model inputs", "data.max_particles": "the model inputs",
    "data.train_split": "the data", "data.streams": "the data order", "data.shuffle_buffer": "the data order",
}


def _check_config_changes(checkpoint_dir: Path, cfg: Config) -> list[str]:
    """The keys that differ from the checkpoint's config, as "key (old -> new)": refused (ConfigError
    naming the key) when they fix the model, objective or data order; otherwise returned, to be
    reported: the loop reads cadences, step limits, clipping and tracking from the new config, and
    the optimizer takes the new lr, schedule and AdamW settings (_apply_optimizer_settings)."""
    try:
        saved = flatten(load_yaml(checkpoint_dir / "config.yaml"))
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{checkpoint_dir / 'config.yaml'}: unreadable ({error}); the changes since the "
                              "checkpoint cannot be checked") from error
    current = flatten(cfg.to_dict())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    for key in changed:
        why = next((w for prefix, w in FIXED_ON_RESUME.items() if key == prefix or key.startswith(prefix)), None)
        if why is not None:
            raise ConfigError(
                f"--resume: {key} differs from the checkpoint's ({saved.get(key)!r} -> {current.get(key)!r}), and it "
                f"fixes {why}, which a resumed run cannot change; resume with {key}={saved.get(key)!r}, or start a new "
                f"run from the checkpoint's weights with train.init_from={checkpoint_dir}")
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed]


_GROUP_SETTINGS = ("betas", "eps", "weight_decay")


def _optimizer_settings(optimizer, scheduler) -> dict:
    """The freshly built optimizer's per-group base lr and AdamW settings (from this run's config)."""
    inner = getattr(scheduler, "scheduler", scheduler)
    return {"base_lrs": list(inner.base_lrs),
            "groups": [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in optimizer.param_groups]}


def _apply_optimizer_settings(optimizer, scheduler, fresh: dict) -> None:
    """After loading a checkpoint: the config's lr, schedule and AdamW settings replace the saved ones
    (the saved scheduler state would keep the old base lr; its step count is kept), so a changed
    optim.lr, optim.schedule, optim.warmup_steps or train.max_steps reaches the optimizer."""
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = list(fresh["base_lrs"])
    step = inner.last_epoch
    lrs = [base * factor(step) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, settings, base, lr in zip(optimizer.param_groups, fresh["groups"], inner.base_lrs, lrs):
        group.update(settings, initial_lr=base, lr=lr)
    inner._last_lr = lrs
