"""The model-size ladder of a scaling study: named sizes and their parameter counts.

    sizes = load_ladder("configs/scaling/ladder.yaml")            # {name: {model key: value}}
    rungs = build_ladder(sizes, cfg, vocab_size=514)                # cfg: a pre-training Config
    print(format_ladder(rungs))

A size is a set of `model:` overrides (dim, num_blocks, num_heads, head_blocks, and any other
model key) applied to the study's base config. Each rung's counts come from a real model built
with `build_pretrain_model` (its parameters counted one by one), and a closed formula of the
same architecture cross-checks them (`formula_parameters`: the two must agree exactly, or the
formula — and with it the FLOPs accounting — no longer describes the model).

N, the scaling variable, excludes embeddings and unembedding (Kaplan et al. 2020): the
continuous input projection or token embedding, the NTP start vector, conditioning
embeddings, MPM mask vectors, and the heads' vocabulary projections. Those grow with the
vocabulary and input width, not with the model's depth or width, and dominate tiny models
(a 512-code vocabulary projection at dim 32 outweighs a whole block). The heads' transformer
blocks do count: a joint model's N includes both heads.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from jetfm.models.config import ModelConfig, ObjectiveConfig

#: Parameters outside N (embeddings and unembedding), by name in a PretrainModel's state dict.
EMBEDDING_PATTERN = re.compile(
    r"^(backbone\.(input_proj|token_emb|cond_emb)\.|backbone\.start$|mpm\.mask_vectors\.|(ntp|mpm)\.head\.out\.)"
)
#: Model keys a ladder size may not set: they are not sizes (the base config owns them).
NOT_SIZE_KEYS = ("input_mode", "attention", "conditioning", "max_particles", "num_features", "dropout")


def count_parameters(named_numels) -> tuple[int, int]:
    """(N without embeddings and unembedding, N total) from (name, numel) pairs (a model's
    named_parameters() or a checkpoint's tensor shapes)."""
    body = total = 0
    for name, numel in named_numels:
        total += int(numel)
        if not EMBEDDING_PATTERN.match(name):
            body += int(numel)
    return body, total


def model_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """`count_parameters` of a built model (unique parameters, as the optimizer sees them)."""
    return count_parameters((name, p.numel()) for name, p in model.named_parameters())


def formula_parameters(model_cfg: ModelConfig, objective_cfg: ObjectiveConfig, *, vocab_size: int,
                       num_features: int | None, num_classes: int = 0) -> tuple[int, int]:
    """(N, N total) of the pre-training architecture in closed form (see jetfm/models, objectives.py)."""
    D = model_cfg.dim

    def block(hidden: int) -> int:  # LN, qkv, proj, LN, fc1, fc2 (all with biases)
        return 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (D * hidden + hidden) + (hidden * D + D)

    def stack(blocks: int, mlp_ratio: float) -> int:
        return blocks * block(int(round(mlp_ratio * D))) + 2 * D  # + final LayerNorm

    heads = int(objective_cfg.uses_ntp) + int(objective_cfg.uses_mpm)
    body = stack(model_cfg.num_blocks, model_cfg.mlp_ratio) + heads * stack(model_cfg.head_blocks, model_cfg.head_mlp_ratio)
    if model_cfg.input_mode == "continuous":
        embed = num_features * D + D + (D if objective_cfg.uses_ntp else 0)  # input projection (+ start vector)
    else:
        embed = vocab_size * D
    if model_cfg.conditioning == "multiplicity":
        embed += (model_cfg.max_particles + 1) * D
    elif model_cfg.conditioning == "class":
        embed += num_classes * D
    if objective_cfg.uses_mpm:
        embed += (objective_cfg.num_mask_vectors or model_cfg.max_particles) * D
    embed += heads * vocab_size * D  # vocabulary projections, no bias
    return body, body + embed


@dataclass(frozen=True)
class Rung:
    """One size of the ladder, counted on a real model."""

    name: str
    model: ModelConfig
    N: int
    """Parameters without embeddings and unembedding (the scaling variable)."""
    N_total: int
    N_formula: int
    N_total_formula: int

    @property
    def kaplan_N(self) -> int:
        """12 * blocks * dim^2 (Kaplan et al.'s estimate, backbone only): for orientation."""
        return 12 * self.model.num_blocks * self.model.dim ** 2

    def as_dict(self) -> dict:
        m = self.model
        return {"name": self.name, "dim": m.dim, "num_blocks": m.num_blocks, "num_heads": m.num_heads,
                "head_blocks": m.head_blocks, "N": self.N, "N_total": self.N_total}


def load_ladder(path: str | Path) -> dict[str, dict]:
    """{size name: model overrides} from a ladder YAML (`sizes: {name: {dim: .., ...}}`), checked:
    every key must be a model size key, every value valid for ModelConfig."""
    from jetfm.config import ConfigError
    from jetfm.config_io import load_yaml

    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or set(data) != {"sizes"} or not isinstance(data["sizes"], dict) or not data["sizes"]:
        raise ConfigError(f"{path}: expected one top-level key `sizes:` mapping size names to model settings, "
                          f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in NOT_SIZE_KEYS]
    sizes = {}
    for name, overrides in data["sizes"].items():
        if not isinstance(overrides, dict) or not overrides:
            raise ConfigError(f"{path}: sizes.{name} must map model keys ({', '.join(allowed)}) to values")
        for key in overrides:
            if key not in allowed:
                raise ConfigError(f"{path}: sizes.{name}.{key} is not a model size key; expected one of {allowed}")
        try:
            ModelConfig(**overrides)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{path}: sizes.{name}: {error}") from error
        sizes[str(name)] = dict(overrides)
    return sizes


def build_ladder(sizes: dict[str, dict], cfg, *, vocab_size: int, num_classes: int = 0) -> list[Rung]:
    """Rungs sorted by N: each size's overrides on cfg.model, built as a real PretrainModel
    (cfg: a pre-training Config or anything with .model, .objective, .data)."""
    from jetfm.models.pretrain import build_pretrain_model

    manifest = {"tokens": {"codebook_size": vocab_size - 2}, "classes": [str(i) for i in range(num_classes)]}
    num_features = cfg.model.num_features or len(getattr(cfg.data, "features", None) or {}) or None
    rungs = []
    for name, overrides in sizes.items():
        try:
            model_cfg = dataclasses.replace(cfg.model, **overrides)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ladder size {name!r} on the base config: {error}") from error
        size_cfg = SimpleNamespace(model=model_cfg, objective=cfg.objective, data=cfg.data)
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
            model = build_pretrain_model(size_cfg, manifest)
        N, N_total = model_parameters(model)
        N_f, N_total_f = formula_parameters(model_cfg, cfg.objective, vocab_size=vocab_size,
                                            num_features=num_features, num_classes=num_classes)
        rungs.append(Rung(name, model_cfg, N, N_total, N_f, N_total_f))
    rungs.sort(key=lambda r: r.N)
    for low, high in zip(rungs, rungs[1:]):
        if low.N == high.N:
            raise ValueError(f"ladder sizes {low.name!r} and {high.name!r} have the same N = {low.N:,}")
    return rungs


def format_ladder(rungs: list[Rung]) -> str:
    """A readable table of the ladder (what a study's --dry-run prints)."""
    head = f"{'size':<10} {'dim':>5} {'blocks':>6} {'heads':>5} {'head_blk':>8} {'N':>12} {'N_total':>12} {'formula ok':>10}"
    lines = [head, "-" * len(head)]
    for r in rungs:
        ok = "yes" if (r.N, r.N_total) == (r.N_formula, r.N_total_formula) else "NO"
        m = r.model
        lines.append(f"{r.name:<10} {m.dim:>5} {m.num_blocks:>6} {m.num_heads:>5} {m.head_blocks:>8} "
                     f"{r.N:>12,} {r.N_total:>12,} {ok:>10}")
    return "\n".join(lines)
