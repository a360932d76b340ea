"""Training data: read and validate records, tokenize with prompt masking, batch deterministically.

``build_datasets(cfg.data, tokenizer, seed)`` gives a :class:`DataBundle`; the trainer draws
``batches(bundle.train, batch_size, seed, epoch, pad_token_id=bundle.pad_token_id)``. Labels are
aligned with ``input_ids`` (-100 = not trained); the loss shifts them, as Hugging Face models do.
"""

from pesocli.data.batching import batches, collate, epoch_order, num_batches
from pesocli.data.build import DataBundle, DataStats, build_datasets
from pesocli.data.chat import CHAT_FORMATS, Conversation, chat_tokens, conversation, render_chat
from pesocli.data.config import FORMATS, DataConfig
from pesocli.data.encode import IGNORE, Encoder, Example, pack, truncate
from pesocli.data.records import Record, detect_format, load_records
from pesocli.data.render import example_preview, render_example
from pesocli.data.templates import PromptTemplate, load_prompt_template, prompt_template_names

__all__ = [
    "CHAT_FORMATS",
    "FORMATS",
    "IGNORE",
    "DataBundle",
    "DataConfig",
    "DataStats",
    "Conversation",
    "Encoder",
    "Example",
    "PromptTemplate",
    "Record",
    "batches",
    "build_datasets",
    "chat_tokens",
    "collate",
    "conversation",
    "detect_format",
    "epoch_order",
    "example_preview",
    "load_prompt_template",
    "load_records",
    "num_batches",
    "pack",
    "prompt_template_names",
    "render_chat",
    "render_example",
    "truncate",
]
