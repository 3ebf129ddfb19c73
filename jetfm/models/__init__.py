"""Models and what trains them: attention kernels, backbone, pre-training objectives and model,
optimizer parameter groups and learning-rate schedules.

Everything here imports only `jetfm.data` and the config dataclasses (the layer order is in
`jetfm/layers.py`): objectives build on the backbone, the pre-training model on the objectives.
"""

from .attention import AttentionBackend, KVCache, Packing, padded_sdpa, varlen_attention, varlen_attention_qkv
from .backbone import Backbone, Block, Stack
from .config import ModelConfig, ObjectiveConfig
from .pretrain import PretrainModel, build_pretrain_model

__all__ = [
    "AttentionBackend", "KVCache", "Packing", "padded_sdpa", "varlen_attention", "varlen_attention_qkv",
    "Backbone", "Block", "Stack",
    "ModelConfig", "ObjectiveConfig",
    "PretrainModel", "build_pretrain_model",
]
