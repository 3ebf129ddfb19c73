"""FinetuneConfig: the `finetune:` section of a jetfm config (docs/METHOD.md §5).

    stage: finetune
    finetune: {mode: full, pretrained: runs/joint/final, backbone_lr_scale: 0.1}

The backbone of a fine-tuned classifier is the `model:` section; with `finetune.pretrained` it
comes from the checkpoint's own config (a fine-tune config that sets a backbone key to a
different value is an error, see jetfm/finetune/model.py). Checks that need the stage
(pretrained vs mode) live in `Config.__post_init__`, so that other stages keep the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jetfm.choices import check_choices

#: select_metric -> (key returned by jetfm.finetune.evaluate.evaluate, direction)
SELECT_METRICS = {"val_auc": ("auc", "max"), "val_acc": ("acc", "max"), "val_loss": ("loss", "min")}


@dataclass
class FinetuneConfig:
    mode: Literal["scratch", "full", "frozen"] = "scratch"
    """`scratch`: backbone and head from random weights (no `pretrained`); `full`: start from
    `pretrained` and train every weight; `frozen`: start from `pretrained`, train the head only
    (backbone weights fixed, requires_grad off, backbone kept in eval mode: no dropout)."""

    pretrained: str | None = None
    """A pre-training checkpoint: the trainer's `out_dir/final` of a `stage: pretrain` run
    (model.safetensors + config.yaml), any objective (ntp/mpm/joint), either input mode. Only
    its backbone is used; the NTP start vector and the pre-training heads are dropped."""

    backbone_lr_scale: float = 1.0
    """mode=full: backbone learning rate = backbone_lr_scale × optim.lr (the head keeps optim.lr);
    the same schedule scales both."""

    head_dim: int = 128
    """Width of the class-attention head (a Linear maps the backbone width to it if they differ)."""

    head_heads: int = 8
    """Attention heads of each class-attention block; must divide head_dim."""

    head_blocks: int = 2
    """Class-attention blocks: a learned class token attends to itself and the particle embeddings
    (CaiT / ParT style); only the class token is updated."""

    head_mlp_ratio: float = 4.0
    """MLP hidden width of a class-attention block = head_mlp_ratio × head_dim (GELU)."""

    head_dropout: float = 0.0
    """Dropout on the residual branches of the class-attention blocks (ParT uses none)."""

    select_metric: Literal["val_auc", "val_acc", "val_loss"] = "val_auc"
    """Validation metric that picks the best model, exported to out_dir/best next to
    out_dir/final (needs train.eval_every > 0). AUC is macro one-vs-rest for > 2 classes."""

    def __post_init__(self):
        check_choices(self, "finetune")
        if self.backbone_lr_scale <= 0:
            raise ValueError(f"finetune.backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")
        for name in ("head_dim", "head_heads", "head_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim % self.head_heads:
            raise ValueError(f"finetune.head_dim={self.head_dim} must be divisible by finetune.head_heads={self.head_heads}")
        if self.head_mlp_ratio <= 0:
            raise ValueError(f"finetune.head_mlp_ratio must be > 0, got {self.head_mlp_ratio}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"finetune.head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.pretrained == "":
            self.pretrained = None

    @property
    def selection(self) -> tuple[str, str]:
        """(evaluate() key, "max" | "min") of select_metric."""
        return SELECT_METRICS[self.select_metric]
