"""VQ-VAE particle tokenizer (docs/METHOD.md §2): model, codebook, evaluation, `jetfm data tokenize`.

Token ids: start 0, particle = code + 1 (1..K), stop K + 1.
"""

from .codebook import Codebook, CodebookCollapseError
from .config import TokenizerConfig
from .model import (
    ParticleTokenizer,
    TokenIdError,
    TokenizerMismatchError,
    add_start_stop,
    build_tokenizer_model,
    check_features_match,
    check_manifest_tokens,
    check_token_ids,
    load_tokenizer,
    save_tokenizer,
    strip_start_stop,
)

__all__ = [
    "Codebook",
    "CodebookCollapseError",
    "ParticleTokenizer",
    "TokenIdError",
    "TokenizerConfig",
    "TokenizerMismatchError",
    "add_start_stop",
    "build_tokenizer_model",
    "check_features_match",
    "check_manifest_tokens",
    "check_token_ids",
    "load_tokenizer",
    "save_tokenizer",
    "strip_start_stop",
]
