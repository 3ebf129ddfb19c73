"""jetfm: jet foundation models — data, tokenizer, pre-training, generation, fine-tuning."""

__version__ = "0.1.0"
