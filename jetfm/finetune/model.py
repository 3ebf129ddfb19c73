"""Fine-tuning model: the backbone, bidirectional and unmasked, + a class-attention head.

    model = build_finetune_model(cfg, manifest)   # the stage's builder (jetfm/stages.py)
    out = model(batch)                            # {"loss": cross-entropy per jet, "acc": Ratio (correct, jets)}
    probs_BC = model.logits(batch).softmax(-1)
    model, cfg, meta = load_classifier("runs/finetune_toptag/best")   # an exported classifier

The backbone runs bidirectionally over ALL particles of every jet: nothing is masked during
fine-tuning or evaluation (docs/METHOD.md §5; the reference's fine-tuning command masks 40% of the
particles by mistake). `FinetuneModel.MASK_FRACTION` states it and the tests check it.

Class-attention head (CaiT, ParT): a learned class token attends to [class token; particle
embeddings] in `head_blocks` blocks, where only the class token is updated; LayerNorm + Linear
give logits over manifest.classes.

Modes (finetune.mode): `scratch` (random init), `full` (from a pre-training checkpoint, every
weight trained; `backbone_lr_scale` gives the backbone its own lr via `param_groups`), `frozen`
(backbone weights fixed: requires_grad off, kept in eval mode, run without autograd).

A pre-training checkpoint (`out_dir/final` of stage pretrain: model.safetensors + config.yaml)
gives the backbone architecture: each backbone key of `model:` (BACKBONE_KEYS) that the
fine-tune config leaves at its default is taken from the checkpoint, one set to another value is
a ConfigError. The resolved architecture is written back into cfg.model, so the run's saved
config describes the model it trained. Its input features (continuous mode) or vocabulary
(token mode) must match the fine-tuning data. Only `backbone.*` weights are loaded; the NTP start
vector and the pre-training heads are dropped (an unused parameter would break DDP).

Legend: T particles (packed), B jets, N longest jet in the batch (+1 with the class token),
D backbone width, E head width, H heads, K head dim, C classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetfm import messages
from jetfm.artifacts.exports import (  # noqa: F401 - export_classifier: the stage's exporter, by its old name
    CLASSIFIER_FORMAT as FORMAT,
    checkpoint_vocab,
    export_classifier,
    read_classifier,
    read_pretrain,
)
from jetfm.config import Config, ConfigError
from jetfm.data.batch import JetBatch
from jetfm.data.features import same_features
from jetfm.data.format import DataError
from jetfm.models.attention import AttentionBackend, Packing, padded_sdpa
from jetfm.models.backbone import Backbone, init_weights
from jetfm.models.config import ModelConfig
from jetfm.models.objectives import LossNorm, Ratio, normalise

#: model: keys that define the backbone's weights (dropout and attention kernel may differ freely)
BACKBONE_KEYS = ("dim", "num_heads", "num_blocks", "mlp_ratio", "input_mode", "num_features", "conditioning",
                 "max_particles")


# --------------------------------------------------------------------------- head
class ClassAttentionBlock(nn.Module):
    """cls + drop(proj(attn(q = LN(cls), k/v = LN([cls; x])))), then cls + drop(MLP(LN(cls)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(round(mlp_ratio * dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, cls_B1E: torch.Tensor, x_BNE: torch.Tensor, keep_B11N: torch.Tensor) -> torch.Tensor:
        """keep_B11N: True at the class token and at real particles (N counts the class token)."""
        B, _, E = cls_B1E.shape
        H, K = self.num_heads, E // self.num_heads
        u_BNE = self.norm1(torch.cat([cls_B1E, x_BNE], dim=1))
        q_BH1K = self.q(u_BNE[:, :1]).view(B, 1, H, K).transpose(1, 2)
        k_BHNK, v_BHNK = self.kv(u_BNE).view(B, -1, 2, H, K).permute(2, 0, 3, 1, 4).unbind(0)
        a_BH1K = padded_sdpa(q_BH1K, k_BHNK, v_BHNK, causal=False, attn_mask=keep_B11N)
        cls_B1E = cls_B1E + self._drop(self.proj(a_BH1K.transpose(1, 2).reshape(B, 1, E)))
        return cls_B1E + self._drop(self.fc2(F.gelu(self.fc1(self.norm2(cls_B1E)))))


class ClassAttentionHead(nn.Module):
    """Packed particle features (T, D) -> class logits (B, C)."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, num_blocks: int, mlp_ratio: float, dropout: float,
                 num_classes: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, z_TD: torch.Tensor, packing: Packing) -> torch.Tensor:
        x_BNE = packing.pad(self.proj_in(z_TD))
        B, N = packing.num_seqs, packing.max_seqlen
        arange_N = torch.arange(N + 1, device=z_TD.device)
        keep_B11N = (arange_N[None, :] <= packing.lengths[:, None])[:, None, None, :]  # column 0: the class token
        cls_B1E = self.cls_token.to(x_BNE.dtype).expand(B, 1, -1)
        for block in self.blocks:
            cls_B1E = block(cls_B1E, x_BNE, keep_B11N)
        return self.out(self.norm(cls_B1E[:, 0]))


# --------------------------------------------------------------------------- model
class FinetuneModel(nn.Module):
    """Backbone (bidirectional, unmasked) + class-attention head; forward(batch) -> {"loss", "acc"}."""

    MASK_FRACTION = 0.0
    """Fraction of particles hidden from the backbone during fine-tuning and evaluation: none."""

    def __init__(self, cfg: Config, *, classes: list[str], vocab_size: int = 0, num_features: int | None = None,
                 meta: dict | None = None):
        super().__init__()
        m, ft = cfg.model, cfg.finetune
        if len(classes) < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, the data has {classes}")
        if m.input_mode == "token" and vocab_size < 3:
            raise ConfigError("input_mode=token needs the data's vocabulary (tokenized shards)")
        AttentionBackend(m.attention).assert_supported()
        self.run_config = cfg  # written beside the weights by export_classifier
        self.classes = list(classes)
        self.mode = ft.mode
        self.vocab_size = vocab_size
        self.backbone_lr_scale = ft.backbone_lr_scale
        self.selection = ft.selection
        self.meta = dict(meta or {})
        self.backbone = Backbone(m, vocab_size=vocab_size, num_features=num_features, start_vector=False)
        self.head = ClassAttentionHead(m.dim, ft.head_dim, ft.head_heads, ft.head_blocks, ft.head_mlp_ratio,
                                       ft.head_dropout, len(self.classes))
        init_weights(self)
        nn.init.normal_(self.head.cls_token, std=0.02)
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @property
    def frozen(self) -> bool:
        return self.mode == "frozen"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode (no dropout) whatever the trainer asks."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    # ------------------------------------------------------------------ forward
    def encode(self, batch: JetBatch) -> tuple[torch.Tensor, Packing]:
        """(T, D) backbone features of every particle: bidirectional, no particle masked."""
        if batch.max_seqlen > self.backbone.cfg.max_particles:
            raise ValueError(f"batch has jets of up to {batch.max_seqlen} particles > model.max_particles="
                             f"{self.backbone.cfg.max_particles}")
        tokens_T = None
        if self.backbone.input_mode == "token":
            tokens_T = batch.tokens
            if tokens_T is None:
                raise DataError("input_mode=token needs token ids in the batch (tokenized shards)")
            if tokens_T.numel():
                lo, hi = (int(v) for v in torch.aminmax(tokens_T))
                if lo < 1 or hi > self.vocab_size - 2:
                    raise DataError(f"particle token ids must lie in [1, {self.vocab_size - 2}] (vocabulary "
                                    f"{self.vocab_size}), got [{lo}, {hi}]: the data's tokenizer differs")
        packing = Packing(batch.cu_seqlens, batch.max_seqlen, batch.num_particles)
        # no gradient and no activations kept for a frozen backbone
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            h_TD = self.backbone.embed_particles(batch.x if tokens_T is None else None, tokens_T)
            cond_BD = self.backbone.condition(batch.seqlens, None)
            z_TD = self.backbone(h_TD, packing, causal=False, cond_BD=cond_BD)
        return z_TD, packing

    def logits(self, batch: JetBatch) -> torch.Tensor:
        """(B, C) class logits."""
        z_TD, packing = self.encode(batch)
        return self.head(z_TD, packing)

    def check_labels(self, labels_B: torch.Tensor) -> None:
        if labels_B.numel():
            lo, hi = (int(v) for v in torch.aminmax(labels_B))
            if lo < 0 or hi >= self.num_classes:
                raise DataError(f"labels outside the classifier's classes {self.classes} "
                                f"(indices 0..{self.num_classes - 1}): got labels in [{lo}, {hi}]")

    def loss_counts(self, batch: JetBatch) -> dict[str, torch.Tensor]:
        """Classified jets of `batch` (trainer hook): the loss is a mean over jets."""
        return {"jets": torch.full((), float(batch.num_jets), device=batch.labels.device)}

    def forward(self, batch: JetBatch, norm: LossNorm | None = None) -> dict:
        """Cross-entropy per jet (over the trainer's global jet count given `norm`, else over this
        batch's) and accuracy, both as `Ratio`s."""
        self.check_labels(batch.labels)
        logits_BC = self.logits(batch)
        loss_sum = F.cross_entropy(logits_BC.float(), batch.labels, reduction="sum")
        B = torch.full_like(loss_sum, batch.num_jets).detach()
        correct = (logits_BC.argmax(-1) == batch.labels).float().sum()
        return {"loss": normalise(norm, "jets", loss_sum, B), "acc": Ratio(correct.detach(), B)}

    # ------------------------------------------------------------------ trainer hooks
    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups (the trainer's decay rule): head at base_lr, backbone at base_lr × backbone_lr_scale."""
        from jetfm.models.optim import param_groups as decay_groups

        groups = [dict(g, lr=base_lr) for g in decay_groups(self.head, weight_decay)]
        if not self.frozen:
            groups += [dict(g, lr=base_lr * self.backbone_lr_scale) for g in decay_groups(self.backbone, weight_decay)]
        grouped = sum(len(g["params"]) for g in groups)
        trainable = sum(1 for p in self.parameters() if p.requires_grad)
        if grouped != trainable:
            raise RuntimeError(f"param_groups covers {grouped} of {trainable} trainable parameters")
        return groups

    def best_metric(self) -> tuple[str, str]:
        """(validation key, "max" | "min") that selects the exported out_dir/best."""
        return self.selection

    # ------------------------------------------------------------------ pre-trained weights
    def load_backbone(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Copy a pre-training state dict's `backbone.*` weights (start vector and heads dropped)."""
        prefix = "backbone."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k != prefix + "start"}
        mine = self.backbone.state_dict()
        missing = sorted(set(mine) - set(weights))
        unexpected = sorted(set(weights) - set(mine))
        wrong = sorted(k for k in set(mine) & set(weights) if mine[k].shape != weights[k].shape)
        if missing or unexpected or wrong:
            details = "; ".join(
                f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if keys
            )
            raise ConfigError(f"{where}: its backbone does not fit this model ({details})")
        self.backbone.load_state_dict(weights)


# --------------------------------------------------------------------------- checkpoints
def read_pretrained(path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config dict, state dict, directory) of a pre-training export (out_dir/final or out_dir)."""
    export = read_pretrain(path, where=f"finetune.pretrained={path}")
    return export.saved, export.state, export.directory


def resolve_backbone(model_cfg: ModelConfig, saved_model: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """(the backbone config to build, keys inherited): the checkpoint's BACKBONE_KEYS where the
    fine-tune config keeps the default; a non-default value that differs is a ConfigError."""
    defaults = ModelConfig()
    values, inherited, conflicts = asdict(model_cfg), [], []
    for key in BACKBONE_KEYS:
        theirs = saved_model.get(key, getattr(defaults, key))
        mine = values[key]
        if mine == theirs:
            continue
        if mine == getattr(defaults, key):
            values[key] = theirs
            inherited.append(key)
        else:
            conflicts.append(f"model.{key}={mine!r} (checkpoint: {theirs!r})")
    if conflicts:
        raise ConfigError(f"the fine-tune config disagrees with the backbone of {where}: {', '.join(conflicts)}; "
                          "drop these keys (the backbone comes from the checkpoint) or choose another checkpoint")
    try:
        return ModelConfig(**values), inherited
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from error


def _feature_spec(features: dict) -> dict:
    from jetfm.tokenizer.model import preprocessing_spec

    return preprocessing_spec(features)


def check_pretrained_inputs(cfg: Config, saved: dict, state: dict, manifest, where: str, data_where: str) -> None:
    """The checkpoint's inputs must be the fine-tuning data's: features (continuous) or vocabulary (token)."""
    saved_data = saved.get("data") or {}
    if cfg.model.input_mode == "continuous":
        theirs = saved_data.get("features") or {}
        if theirs and not same_features(theirs, cfg.data.features):
            raise ConfigError(
                f"input features differ:\n  pre-trained {where}: {_feature_spec(theirs)}\n"
                f"  fine-tuning data.features: {_feature_spec(cfg.data.features)}\n"
                "fine-tune with the features the backbone was pre-trained on"
            )
        if saved_data.get("inputs", "raw") != cfg.data.inputs:
            messages.info(f"note: {where} was pre-trained on data.inputs={saved_data.get('inputs', 'raw')}, "
                          f"fine-tuning uses data.inputs={cfg.data.inputs}")
        return
    tokens = getattr(manifest, "tokens", None)
    vocab = checkpoint_vocab(state)
    if not tokens or "codebook_size" not in tokens:
        raise DataError(f"{data_where}: the shards carry no token ids but the pre-trained backbone {where} reads "
                        "tokens (input_mode=token); tokenize them with its tokenizer (`jetfm data tokenize`)")
    if vocab != int(tokens["codebook_size"]) + 2:
        raise ConfigError(
            f"vocabulary differs: pre-trained {where} has {vocab} token ids "
            f"(codebook {None if vocab is None else vocab - 2}), fine-tuning data {data_where} has codebook "
            f"{tokens['codebook_size']} (vocabulary {int(tokens['codebook_size']) + 2}, tokenizer {tokens.get('tokenizer')})"
        )
    try:  # the same tokenizer? Only a note: a tokenizer may have moved
        from jetfm.data.shards import Manifest

        theirs = Manifest.load(saved_data["path"]).tokens or {}
        if theirs.get("tokenizer") and theirs.get("tokenizer") != tokens.get("tokenizer"):
            messages.info(f"note: {where} was pre-trained on tokens of {theirs['tokenizer']}, the fine-tuning data "
                          f"carries tokens of {tokens.get('tokenizer')}")
    except Exception:  # noqa: BLE001 - the pre-training data may live elsewhere
        pass


def check_class_counts(manifest, splits: list[str], data_where: str) -> None:
    """DataError if a split lacks a class (training or validating on it would be meaningless)."""
    for split in splits:
        counts = manifest.class_counts(split)
        empty = [name for name, n in zip(manifest.classes, counts) if n == 0]
        if empty:
            raise DataError(f"{data_where}: split {split!r} has no jets of class(es) {empty} "
                            f"(counts {dict(zip(manifest.classes, counts))})")


def build_finetune_model(cfg: Config, manifest) -> FinetuneModel:
    """The fine-tuning stage's model from the resolved config and the data manifest (see module doc)."""
    data_where = str(cfg.data.path)
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.train.eval_every else [])
    check_class_counts(manifest, splits, data_where)
    ft = cfg.finetune
    saved = state = None
    if ft.pretrained is not None:
        saved, state, directory = read_pretrained(ft.pretrained)
        where = str(directory)
        cfg.model, inherited = resolve_backbone(cfg.model, saved.get("model") or {}, where)
        if cfg.model.max_particles < cfg.data.max_particles:
            raise ConfigError(f"{where}: model.max_particles={cfg.model.max_particles} < data.max_particles="
                              f"{cfg.data.max_particles}; set data.max_particles={cfg.model.max_particles}")
        if cfg.model.conditioning == "class":
            raise ConfigError(f"{where} is conditioned on the class label (model.conditioning=class): it cannot classify")
        check_pretrained_inputs(cfg, saved, state, manifest, where, data_where)
    tokens = getattr(manifest, "tokens", None) or {}
    if cfg.model.input_mode == "token" and "codebook_size" not in tokens:
        raise DataError(f"{data_where}: input_mode=token needs tokenized shards (`jetfm data tokenize`)")
    vocab_size = int(tokens["codebook_size"]) + 2 if "codebook_size" in tokens else 0
    num_features = cfg.model.num_features or len(cfg.data.features)
    if cfg.model.input_mode == "continuous" and num_features != len(cfg.data.features):
        raise ConfigError(f"model.num_features={num_features} but data.features has {len(cfg.data.features)} entries")
    meta = {
        "format": FORMAT,
        "classes": list(manifest.classes),
        "vocab_size": vocab_size,
        "num_features": num_features,
        "input_mode": cfg.model.input_mode,
        "inputs": cfg.data.inputs,
        "features": _feature_spec(cfg.data.features),
        "tokenizer": tokens.get("tokenizer"),
        "mode": ft.mode,
        "pretrained": None if ft.pretrained is None else str(Path(ft.pretrained).resolve()),
        "pretrained_objective": None if saved is None else (saved.get("objective") or {}).get("name", "joint"),
        "train_data": data_where,
    }
    model = FinetuneModel(cfg, classes=list(manifest.classes), vocab_size=vocab_size, num_features=num_features,
                          meta=meta)
    if state is not None:
        model.load_backbone(state, str(directory))
    return model


def load_classifier(directory, *, device="cpu") -> tuple[FinetuneModel, Config, dict]:
    """(model in eval mode, its resolved Config, classifier.json) of an exported classifier
    (jetfm.artifacts.exports.export_classifier). The pre-training checkpoint is not needed."""
    cfg, state, meta = read_classifier(directory)
    with torch.random.fork_rng(devices=[]):  # building draws random init weights: leave the caller's RNG alone
        model = FinetuneModel(cfg, classes=meta["classes"], vocab_size=int(meta.get("vocab_size") or 0),
                              num_features=meta.get("num_features"), meta=meta)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, meta
