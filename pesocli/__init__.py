"""peso: fine-tune causal LMs with restart-based low-rank methods (PESO-LoRA-R/T and friends)."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch an optional kernel from the Hugging Face hub at import
# and logs a warning when it cannot (always, offline); peso never needs that kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
