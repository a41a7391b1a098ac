"""longctx: extend the context window of LLaMA-family models by fine-tuning (LongLoRA / LongQLoRA)."""

__version__ = "0.1.0"
