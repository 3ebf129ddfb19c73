"""The stage exports: one writer and one reader per stage, each with a format version.

    export_tokenizer(model, "runs/tok/final")          tokenizer.json + model.safetensors
    export_pretrain(model, cfg, "runs/joint/final")    model.safetensors + config.yaml
    export_classifier(model, "runs/ft/best")            model.safetensors + config.yaml + classifier.json
    load_tokenizer_export(dir)  read_pretrain(dir) / load_pretrain(dir)  read_classifier(dir)

Every export is published whole (jetfm.artifacts.atomic): a reader, or a run killed while
exporting, finds the previous export or none, never half of one. A pre-training export may be
named by its run directory (`run/` means `run/final`). Its weights file records
`format = jetfm`, the stage and `format_version`; exports written before versioning carry no
version and read as version 1. The tokenizer's file format belongs to jetfm.tokenizer.model
(save_tokenizer / load_tokenizer, which version it themselves); classifier.json records
`format = jetfm-classifier` and `format_version`.

Readers check what they are given and say what was expected (ExportError, a ConfigError).
Weights load with safetensors: an export never runs code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..config_io import config_from_dict, load_config, load_yaml
from .atomic import atomic_directory, atomic_write_text

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
SELECTION_FILE = "selection.json"
#: Version of the pre-training (and generic) export this jetfm writes and reads.
PRETRAIN_VERSION = 1
CLASSIFIER_FORMAT = "jetfm-classifier"
CLASSIFIER_META = "classifier.json"
CLASSIFIER_VERSION = 1


class ExportError(ConfigError):
    """An export is missing, of another stage or of a format this jetfm cannot read."""


# --------------------------------------------------------------------------- any stage
def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # a DDP wrapper
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def export_model(module: torch.nn.Module, cfg: Config, directory) -> Path:
    """model.safetensors + config.yaml (the run's resolved config), published atomically: the
    pre-training export, and the fallback of a stage without its own exporter."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(_weights(module), str(tmp / WEIGHTS_FILE),
                  metadata={"format": "jetfm", "stage": cfg.stage, "format_version": str(PRETRAIN_VERSION)})
        (tmp / CONFIG_FILE).write_text(cfg.to_yaml())
    return directory


export_pretrain = export_model


def export_stage(exporter, module: torch.nn.Module, cfg: Config, directory, note: dict | None = None) -> Path:
    """Run a stage's exporter (None: export_model) and write `note` as selection.json beside it,
    all published as one directory (the trainer's out_dir/final and out_dir/best)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        if exporter is None:
            export_model(module, cfg, tmp)
        else:
            exporter(module, tmp)
        if note is not None:
            (tmp / SELECTION_FILE).write_text(json.dumps(note, indent=1, default=str) + "\n")
    return directory


def weights_metadata(path) -> dict[str, str]:
    """The metadata a safetensors file carries (format, stage, format_version)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# --------------------------------------------------------------------------- pre-training
def resolve_export_dir(path, *, where: str | None = None) -> Path:
    """The directory holding model.safetensors + config.yaml: PATH itself, or PATH/final (a run dir).
    `where` names the path in errors (e.g. the option that gave it)."""
    path = Path(path)
    where = where or str(path)
    for candidate in (path, path / "final"):
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            return candidate
    if not path.exists():
        raise ExportError(f"{where}: no such directory; expected a pre-training run's out_dir/final")
    raise ExportError(
        f"{where}: not a pre-training export; expected a pre-training run's out_dir/final (model.safetensors + "
        f"config.yaml there or in {path / 'final'}, what `python jetfm/train.py` writes for stage pretrain)"
    )


def checkpoint_vocab(state: dict[str, torch.Tensor]) -> int | None:
    """The vocabulary a pre-training state dict was built for (token embedding or a head's output)."""
    for key in ("backbone.token_emb.weight", "ntp.head.out.weight", "mpm.head.out.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


@dataclass
class PretrainExport:
    """What a pre-training export holds, read and checked (no model built)."""

    directory: Path
    saved: dict  # config.yaml as written (a plain dict)
    state: dict[str, torch.Tensor]  # the weights, on the CPU
    format_version: int

    @property
    def config(self) -> Config:
        return load_config(self.directory / CONFIG_FILE)

    @property
    def vocab_size(self) -> int | None:
        return checkpoint_vocab(self.state)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditioned backbone (0 otherwise)."""
        weight = self.state.get("backbone.cond_emb.weight")
        return int(weight.shape[0]) if weight is not None and (self.saved.get("model") or {}).get(
            "conditioning") == "class" else 0

    @property
    def num_features(self) -> int | None:
        """Continuous input features: model.num_features, else the number of data.features."""
        model = self.saved.get("model") or {}
        if model.get("num_features") is not None:
            return int(model["num_features"])
        if model.get("input_mode", "continuous") == "continuous":
            return len((self.saved.get("data") or {}).get("features") or {}) or None
        return None


def read_pretrain(path, *, where: str | None = None) -> PretrainExport:
    """Read a pre-training export (PATH or PATH/final) without building the model."""
    from safetensors.torch import load_file

    where = where or str(path)
    directory = resolve_export_dir(path, where=where)
    version = int(weights_metadata(directory / WEIGHTS_FILE).get("format_version", 1))
    if version > PRETRAIN_VERSION:
        raise ExportError(f"{where}: export format_version {version}; this jetfm reads up to {PRETRAIN_VERSION}")
    saved = load_yaml(directory / CONFIG_FILE)
    if saved.get("stage") != "pretrain":
        raise ExportError(f"{where}: a {saved.get('stage')!r} checkpoint, expected a pre-training (stage 'pretrain') "
                          "one, i.e. a pre-training run's out_dir/final")
    return PretrainExport(directory, saved, load_file(str(directory / WEIGHTS_FILE), device="cpu"), version)


def load_pretrain(path, *, device="cpu", attention: str | None = "auto"):
    """(cfg, PretrainModel in eval mode, export dir). attention: the kernel to run it with (auto by
    default: flash only for bf16 tensors on CUDA, so flash-trained weights load and run in fp32);
    None keeps the config's."""
    from ..models.pretrain import PretrainModel

    export = read_pretrain(path)
    cfg = export.config
    model_cfg = cfg.model if attention is None else dataclasses.replace(cfg.model, attention=attention)
    with torch.random.fork_rng(devices=[]):  # building draws init weights: leave the caller's RNG alone
        model = PretrainModel(model_cfg, cfg.objective, vocab_size=export.vocab_size, num_features=export.num_features,
                              num_classes=export.num_classes, inputs=cfg.data.inputs)
    missing, unexpected = model.load_state_dict(export.state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{export.directory}: weights do not fit the config's model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return cfg, model.to(device).eval(), export.directory


# --------------------------------------------------------------------------- tokenizer
def export_tokenizer(model, directory) -> Path:
    """The tokenizer stage's export (jetfm.tokenizer.model owns and versions its format)."""
    from ..tokenizer.model import save_tokenizer

    return save_tokenizer(model, directory)


def load_tokenizer_export(directory, **kwargs):
    """A saved tokenizer in eval mode (jetfm.tokenizer.model.load_tokenizer)."""
    from ..tokenizer.model import load_tokenizer

    return load_tokenizer(directory, **kwargs)


# --------------------------------------------------------------------------- classifier
def export_classifier(model, directory) -> Path:
    """DIR/model.safetensors, DIR/config.yaml (the run's resolved config) and DIR/classifier.json
    (classes, inputs, vocabulary, format version), published atomically: the fine-tuning stage's
    exporter (out_dir/final, out_dir/best). `model` is a FinetuneModel (or a wrapper of one)."""
    from safetensors.torch import save_file

    module = getattr(model, "module", model)
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(_weights(module), str(tmp / WEIGHTS_FILE), metadata={"format": CLASSIFIER_FORMAT})
        (tmp / CONFIG_FILE).write_text(module.run_config.to_yaml())
        meta = dict(module.meta, classes=module.classes, format=CLASSIFIER_FORMAT, format_version=CLASSIFIER_VERSION)
        (tmp / CLASSIFIER_META).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_classifier(directory) -> tuple[Config, dict[str, torch.Tensor], dict]:
    """(resolved Config, weights, classifier.json) of an exported classifier, checked."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, CLASSIFIER_META):
        if not (directory / name).is_file():
            raise ExportError(f"{directory}: no {name}; expected a fine-tuning run's out_dir/final or out_dir/best")
    meta = json.loads((directory / CLASSIFIER_META).read_text())
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ExportError(f"{directory / CLASSIFIER_META}: format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
    version = int(meta.get("format_version", 1))
    if version > CLASSIFIER_VERSION:
        raise ExportError(f"{directory / CLASSIFIER_META}: format_version {version}; this jetfm reads up to "
                          f"{CLASSIFIER_VERSION}")
    cfg = config_from_dict(load_yaml(directory / CONFIG_FILE))
    if cfg.stage != "finetune":
        raise ExportError(f"{directory}: a {cfg.stage!r} checkpoint, expected stage 'finetune'")
    return cfg, load_file(str(directory / WEIGHTS_FILE), device="cpu"), meta


def write_note(directory, note: dict) -> None:
    """selection.json beside an export (why this export was chosen), written atomically."""
    atomic_write_text(Path(directory) / SELECTION_FILE, json.dumps(note, indent=1, default=str) + "\n")
