"""QLoRA fine-tuning of large language models as a declarative, cached DVC pipeline."""

__version__ = "0.1.0"
