"""peso: fine-tune causal LMs with restart-based low-rank methods (PESO-LoRA-R/T and friends)."""

__version__ = "0.1.0"
