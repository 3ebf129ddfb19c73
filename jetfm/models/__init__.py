"""Models of the pre-training stage: attention kernels, backbone, pre-training heads.

`PretrainModel` / `build_pretrain_model` live in `jetfm.models.pretrain` (imported lazily here,
since `jetfm.objectives` builds on this package's attention and backbone modules).
"""

from .attention import AttentionBackend, KVCache, Packing, padded_sdpa, varlen_attention, varlen_attention_qkv
from .backbone import Backbone, Block, Stack
from .config import ModelConfig, ObjectiveConfig

__all__ = [
    "AttentionBackend", "KVCache", "Packing", "padded_sdpa", "varlen_attention", "varlen_attention_qkv",
    "Backbone", "Block", "Stack",
    "ModelConfig", "ObjectiveConfig",
    "PretrainModel", "build_pretrain_model",
]


def __getattr__(name):
    if name in ("PretrainModel", "build_pretrain_model"):
        from . import pretrain

        return getattr(pretrain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
