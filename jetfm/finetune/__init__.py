"""Fine-tuning (docs/METHOD.md §5): a class-attention classifier on the (pre-trained) backbone.

    python jetfm/train.py --config configs/finetune_toptag.yaml finetune.pretrained=runs/joint/final
    jetfm evaluate classifier --checkpoint runs/finetune_toptag/best --data data/toptag-tokens
    jetfm sweep finetune --base configs/finetune_toptag.yaml ...      # the data-efficiency study

Modules: `config` (FinetuneConfig, the `finetune:` section), `model` (FinetuneModel, the stage's
`build_finetune_model`, checkpoint loading and export), `evaluate` (the stage's validation and
`jetfm evaluate classifier`). Only the config is imported here: jetfm.config imports it, and
the model imports jetfm.config.
"""

from .config import FinetuneConfig

__all__ = ["FinetuneConfig"]
