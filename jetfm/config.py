"""The jetfm configuration: nested dataclasses, loaded from YAML plus `key.sub=value` overrides.

    cfg = load_config("configs/joint.yaml", ["optim.lr=3e-4", "train.max_steps=2000"])  # jetfm.config_io
    print(cfg.to_yaml())                      # the resolved config (what --dry-run prints)

This module holds what a config is: the dataclasses (the documented keys), their cross-checks,
and the typed conversion (`_convert`, `_build`, key suggestions) that checks every value, which
the dataclasses use themselves; reading files and overrides lives in jetfm/config_io.py.

Every section is a dataclass with a docstring under each field and cross-checks in
`__post_init__`. The top level (`Config`) owns data/optim/train/tracking; the stage sections
come from their parts: `tokenizer:` (jetfm/tokenizer/config.py), `model:` and `objective:`
(jetfm/models/config.py), `finetune:` (jetfm/finetune/config.py).

Loading is strict: an unknown or mistyped key, in the YAML file or in an override, is an error
that names the full dotted key and the closest valid one; every value is checked against the
field's type (`optim.lr=abc` -> "optim.lr: expected a float, got str 'abc'"). Override values
are parsed as YAML (`optim.betas=[0.9,0.99]`, `tracking.uri=null`); `1e-3` is a float here,
unlike in plain YAML 1.1.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jetfm.choices import check_choices, choice_error, is_choice
from jetfm.finetune.config import FinetuneConfig
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.tokenizer.config import TokenizerConfig

#: The stages a config trains: the one list of their names (jetfm/stages.py maps each to its code).
StageName = Literal["tokenizer", "pretrain", "finetune"]
STAGES: tuple[str, ...] = typing.get_args(StageName)


class ConfigError(ValueError):
    """A bad configuration: the message names the dotted key and what was expected."""


# --------------------------------------------------------------------------- sections
def reference_features() -> dict[str, dict]:
    """The reference model inputs of docs/METHOD.md §1 (`data.features` default)."""
    return {
        "part_pt": {"function": "signed_log", "subtract": 1.8, "multiply": 1.0},
        "part_etarel": {"function": "none", "subtract": 0.0, "multiply": 3.0},
        "part_phirel": {"function": "none", "subtract": 0.0, "multiply": 3.0},
    }


@dataclass
class DataConfig:
    path: str | None = None
    """Shard set (holds manifest.json), written by `jetfm data generate|convert|tokenize`: a
    directory, or a URL read chunk by chunk (http(s)://, s3://, gs://, file://; docs/DATA.md)."""

    cache_dir: str | None = None
    """For a URL data.path: keep fetched shards in this local directory for later epochs (None:
    read chunk by chunk, nothing kept)."""

    cache_gb: float = 50.0
    """Size limit of data.cache_dir in GB; least recently used shards are evicted first."""

    train_split: str = "train"
    """Split trained on."""

    train_jets: int | None = None
    """Train on a nested subset of at least this many jets of the training split (whole chunks,
    rounded up; jetfm/data/subset.py): subsets of one shard set nest, D1 ⊂ D2 ⊂ …, whatever the
    seed. None: the whole split. Validation always reads the whole val_split."""

    val_split: str = "val"
    """Split validated on (train.eval_every > 0)."""

    batch_size: int = 250
    """Jets per process per micro-step (on average). Global batch = batch_size × processes ×
    train.grad_accum_steps; the data order depends only on the global batch, so 1 process × 2b
    and 2 processes × b train on the same batches, and a run resumes on another process count
    when the global batch stays the same."""

    streams: int = 8
    """Virtual data streams: each reads its own contiguous range of the epoch's chunks, and a
    global batch is one batch from every stream. A process serves streams/processes of them, so
    the process count must divide it (e.g. 64 for up to 64 GPUs). Fixed for the life of a run."""

    max_particles: int = 128
    """Jets are truncated to their max_particles highest-pT particles when read."""

    shuffle_buffer: int = 10000
    """Jets shuffled together, over all streams: each stream permutes blocks of about
    shuffle_buffer / data.streams jets (rounded up to whole chunks of the shard set)."""

    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""

    features: dict[str, dict[str, Any]] = field(default_factory=reference_features)
    """Model inputs in order: name -> {function: none|log|signed_log, subtract, multiply};
    model value = (function(raw) - subtract) * multiply (docs/METHOD.md §1). A YAML `features:`
    mapping replaces the default set; missing entries of a feature take the transform defaults
    (function none, subtract 0, multiply 1)."""

    inputs: Literal["raw", "reco"] = "raw"
    """Continuous model inputs from the raw features (`raw`) or from the tokenizer-reconstructed
    `reco` entries of tokenized shards (`reco`, the paper's pseudo-continuous inputs)."""

    def __post_init__(self):
        check_choices(self, "data")
        for name in ("batch_size", "max_particles", "shuffle_buffer", "streams"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.cache_gb <= 0:
            raise ConfigError(f"data.cache_gb must be > 0, got {self.cache_gb}")
        if not self.features:
            raise ConfigError("data.features is empty: name at least one model input feature")
        if self.train_split == "":
            raise ConfigError("data.train_split is empty")
        if self.train_jets is not None and self.train_jets < 1:
            raise ConfigError(f"data.train_jets must be >= 1 (or null for the whole split), got {self.train_jets}")
        from jetfm.data.features import FeatureTransform

        normalised = {}
        for name, entry in self.features.items():
            transform = _convert(entry if entry is not None else {}, FeatureTransform, f"data.features.{name}")
            normalised[name] = dataclasses.asdict(transform)  # plain dicts: what the reader takes
        self.features = normalised


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    """Optimiser. AdamW with decoupled weight decay on Linear weights only (no decay on norms,
    biases, embeddings, codebooks or learned vectors; a model may list more names in
    `no_weight_decay()`)."""

    lr: float = 1e-3
    """Peak learning rate."""

    weight_decay: float = 1e-2
    """Decoupled weight decay of the decayed parameter group."""

    betas: tuple[float, float] = (0.95, 0.999)
    """Adam (beta1, beta2)."""

    eps: float = 1e-8
    """Adam epsilon."""

    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning rate after warm-up: constant (reference), cosine or linear decay to
    min_lr_ratio × lr at train.max_steps."""

    warmup_steps: int = 0
    """Linear warm-up from lr/warmup_steps to lr over this many optimizer steps."""

    min_lr_ratio: float = 0.0
    """Final lr / peak lr of the cosine and linear schedules."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still logged)."""

    def __post_init__(self):
        check_choices(self, "optim")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (each step = grad_accum_steps micro-batches per process)."""

    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision (weights and optimizer stay fp32). fp16 needs a GPU (loss scaling)."""

    log_every: int = 10
    """Log training metrics every this many steps (averaged over the interval)."""

    eval_every: int = 500
    """Validate every this many steps and at the end (0 = never)."""

    eval_batches: int = 20
    """Validation batches per process per evaluation (the same batches every time)."""

    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (0 = only at the end and on SIGTERM/SIGINT)."""

    keep_checkpoints: int = 3
    """Checkpoints kept on disk, newest first (0 = keep all)."""

    progress_bar: bool = True
    """Show a tqdm bar (rank 0) with loss and jets/s."""

    detect_anomaly: bool = False
    """torch.autograd anomaly detection (names the op that produced a NaN; slow, for debugging)."""

    nan_policy: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: `stop` (exit non-zero naming the step, no new
    checkpoint: the last good one stays) or `skip` (drop that update and go on; stop after
    max_bad_steps in a row). `skip` is not available with DeepSpeed, whose engine steps the
    optimizer inside backward."""

    max_bad_steps: int = 10
    """nan_policy=skip: consecutive skipped steps after which training stops anyway."""

    init_from: str | None = None
    """Start from saved weights: a checkpoint (checkpoints/step-N, checkpoints/ or a run
    directory) or a stage export (out_dir/final or best). Only the weights are taken: the
    optimizer, schedule, step count and data order start fresh (unlike --resume)."""

    def __post_init__(self):
        check_choices(self, "train")
        for name in ("max_steps", "grad_accum_steps", "log_every", "eval_batches", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (rank 0 only). Metrics also go to out_dir/metrics.jsonl either way."""

    uri: str | None = None
    """Tracking URI. None: $MLFLOW_TRACKING_URI if set, else sqlite:///<out_dir>/mlflow.db (no server)."""

    experiment: str = "jetfm"
    """MLflow experiment name."""

    run_name: str | None = None
    """MLflow run name (None: the config's `name`)."""

    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow run tags."""

    flush_every: int = 50
    """Send buffered metrics after this many logged steps ..."""

    flush_seconds: float = 30.0
    """... or after this many seconds, whichever comes first."""

    retry_seconds: float = 60.0
    """After a tracking outage, try the server again at most this often (metrics meanwhile go to
    out_dir/mlflow_spill.jsonl and are replayed when it answers)."""

    http_timeout: float = 10.0
    """Seconds per HTTP request to a tracking server (MLFLOW_HTTP_REQUEST_TIMEOUT wins if set)."""

    http_retries: int = 2
    """HTTP retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES wins if set). MLflow's own
    default (7, exponential back-off) would stall the tracker for minutes on an outage."""

    def __post_init__(self):
        if self.flush_every < 1:
            raise ConfigError(f"tracking.flush_every must be >= 1, got {self.flush_every}")
        if self.flush_seconds <= 0 or self.retry_seconds <= 0 or self.http_timeout <= 0:
            raise ConfigError("tracking.flush_seconds, retry_seconds and http_timeout must be > 0")
        if self.http_retries < 0:
            raise ConfigError(f"tracking.http_retries must be >= 0, got {self.http_retries}")
        if not self.experiment:
            raise ConfigError("tracking.experiment is empty")


@dataclass
class Config:
    stage: StageName = "pretrain"
    """What is trained: the VQ-VAE `tokenizer`, the `pretrain` backbone + heads, or a `finetune` classifier."""

    name: str = "jetfm"
    """Run name: the default output directory and MLflow run name."""

    seed: int = 0
    """Seed of model initialisation, data order and dropout (per rank: seed + rank after init)."""

    out_dir: str = "runs/{name}"
    """Output directory (checkpoints, metrics, summary, MLflow sqlite); `{name}` is replaced by `name`."""

    builder: str | None = None
    """`package.module:function` building the model (signature `(cfg, manifest) -> nn.Module`)
    instead of the stage's default (jetfm/stages.py); for experiments and tests."""

    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching and model input features."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """VQ-VAE tokenizer (stage tokenizer; later stages read its checkpoint)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone (stages pretrain and finetune)."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Pre-training objective: NTP, MPM or joint."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuned classifier (stage finetune): mode, pre-trained checkpoint, class-attention head."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and learning-rate schedule."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, precision, logging, validation and checkpoint cadence."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""

    def __post_init__(self):
        check_choices(self, "")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")
        if "{name}" in self.out_dir:
            self.out_dir = self.out_dir.replace("{name}", self.name)
        if self.builder is not None and not re.fullmatch(r"[\w.]+:\w+", self.builder):
            raise ConfigError(f"builder must look like 'package.module:function', got {self.builder!r}")
        if self.stage == "tokenizer" and self.data.inputs == "reco":
            raise ConfigError("stage tokenizer trains on raw features: data.inputs=reco needs a trained tokenizer first")
        if self.stage in ("pretrain", "finetune") and self.model.max_particles < self.data.max_particles:
            raise ConfigError(
                f"model.max_particles={self.model.max_particles} < data.max_particles={self.data.max_particles}: "
                "the model could not take the longest jets the loader yields"
            )
        if (
            self.stage in ("pretrain", "finetune")
            and self.model.input_mode == "continuous"
            and self.model.num_features is not None
            and self.model.num_features != len(self.data.features)
        ):
            raise ConfigError(
                f"model.num_features={self.model.num_features} but data.features has {len(self.data.features)} "
                f"entries ({list(self.data.features)}); set model.num_features=null to follow data.features"
            )
        if self.stage == "finetune":
            _check_finetune(self)
        if self.train.eval_every and not self.data.val_split:
            raise ConfigError("train.eval_every > 0 needs data.val_split (or set train.eval_every=0)")
        if self.optim.warmup_steps > self.train.max_steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} > train.max_steps={self.train.max_steps}"
            )
        if self.tracking.run_name is None:
            self.tracking.run_name = self.name

    # convenience -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return config_to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(config_to_dict(self), sort_keys=False, default_flow_style=False, width=100)


def _check_finetune(cfg: "Config") -> None:
    """Cross-checks of stage finetune (the finetune section alone cannot see the stage)."""
    ft = cfg.finetune
    if ft.mode == "scratch" and ft.pretrained is not None:
        raise ConfigError(
            f"finetune.mode=scratch trains from random weights but finetune.pretrained={ft.pretrained!r} is set; "
            "use finetune.mode=full|frozen, or finetune.pretrained=null"
        )
    if ft.mode != "scratch" and ft.pretrained is None:
        raise ConfigError(
            f"finetune.mode={ft.mode} starts from a pre-trained backbone: set finetune.pretrained to a pre-training "
            "run's out_dir/final, or use finetune.mode=scratch"
        )
    if ft.mode != "full" and ft.backbone_lr_scale != 1.0:
        raise ConfigError(f"finetune.backbone_lr_scale={ft.backbone_lr_scale} has no effect with finetune.mode={ft.mode}")
    if cfg.model.conditioning == "class":
        raise ConfigError("model.conditioning=class feeds the label to the classifier; use none or multiplicity")


# --------------------------------------------------------------------------- typed conversion
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (descending into sections, not into free-form dicts)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, key + "."))
        else:
            keys.append(key)
    return keys


def _suggest(bad_key: str, siblings: list[str], prefix: str) -> str:
    """' (did you mean 'x.y'?)' — same leaf elsewhere first, then the closest sibling, then any key."""
    leaf = bad_key.rsplit(".", 1)[-1]
    everywhere = all_keys()
    same_leaf = [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf and k != bad_key]
    if same_leaf:
        return f"; did you mean '{same_leaf[0]}'?"
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    close = difflib.get_close_matches(bad_key, everywhere, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    if siblings:
        return f"; valid keys here: {', '.join(prefix + s for s in siblings)}"
    return ""


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML) checked against type `tp`, converted where lossless; ConfigError otherwise."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {_describe(value)}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null; expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if value is None:
        raise ConfigError(f"{key}: may not be null; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if is_choice(value, allowed):
            return value
        raise ConfigError(choice_error(key, allowed, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_describe(value)} (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path string, got {_describe(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise ConfigError(choice_error(key, tuple(m.value for m in tp), value))
    if origin is list or tp is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is dict or tp is dict:
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        out = {}
        for k, v in value.items():
            k = _convert(k, k_tp, f"{key} (a key)")
            out[k] = _convert(v, v_tp, f"{key}.{k}")
        return out
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    return value  # an annotation we cannot check (e.g. a Protocol): take it as is


def _build(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a mapping: unknown keys and mistyped values are errors."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'{_suggest(prefix + str(key), names, prefix)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key '{prefix}{f.name}' ({_type_name(hints[f.name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        message = str(error)
        section = prefix.rstrip(".")
        raise ConfigError(message if not section or section in message else f"{section}: {message}") from error


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg) -> dict:
    """Plain nested dict (lists, not tuples): YAML- and JSON-safe."""
    return _plain(cfg)


