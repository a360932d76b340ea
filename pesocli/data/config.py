"""The ``data`` section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pesocli.data.records import RECORD_FORMATS
from pesocli.data.templates import prompt_template_names

FORMATS = ("auto", *RECORD_FORMATS)


@dataclass(kw_only=True)
class DataConfig:
    """What to train on and how records become token sequences."""

    path: str | None = None
    """A JSONL file, a JSON file (a list of records) or a folder of ``*.jsonl``/``*.json`` files
    (read in sorted order). ``None`` is the shipped ``arith_train.jsonl``."""
    format: str = "auto"
    """``auto`` (detected from the first record), ``text`` (``{"text"}``), ``alpaca``
    (``{"instruction", "input"?, "output"}``), ``messages`` (``{"messages": [{"role", "content",
    "name"?}]}``, roles system/user/assistant/tool), ``sharegpt`` (``{"conversations": [{"from",
    "value"}]}``, from human/gpt/system) or ``prompt-completion`` (TRL's ``{"prompt", "completion"}``:
    two strings, or two lists of turns)."""
    template: str = "alpaca"
    """Prompt template for alpaca records: a name in ``templates/prompts`` or a path to a ``.json``."""
    max_length: int = 256
    """Examples longer than this many tokens are truncated (and counted); also the packing block size."""
    packing: bool = False
    """Concatenate whole examples into blocks of at most ``max_length`` tokens (fewer pad tokens)."""
    mask_prompt: bool = True
    """Train only on responses (alpaca), completions, or assistant turns with their end-of-turn marker
    (chat formats); prompts, user/system/tool turns get label -100."""
    val_split: float = 0.0
    """Fraction of the records held out (seeded) for the eval loss; 0 holds out nothing."""
    val_path: str | None = None
    """A separate eval file or folder (same formats); exclusive with ``val_split``."""
    limit: int | None = None
    """Use only the first ``limit`` records of ``path`` (before the val split); ``None`` uses all."""

    def validate(self) -> list[str]:
        """One message per bad field; empty when the section is valid."""
        errors = []
        if self.format not in FORMATS:
            errors.append(f"data.format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        names = prompt_template_names()
        is_file = self.template.endswith(".json") and Path(self.template).is_file()
        if self.template not in names and not is_file:
            errors.append(
                f"data.template must be one of {', '.join(names)} or a .json file (got {self.template!r})"
            )
        if self.max_length < 8:
            errors.append(f"data.max_length must be >= 8 (got {self.max_length})")
        if not 0.0 <= self.val_split < 1.0:
            errors.append(f"data.val_split must be in [0, 1) (got {self.val_split})")
        elif self.val_split > 0 and self.val_path is not None:
            errors.append("data.val_split must be 0 when data.val_path is set (they are exclusive)")
        if self.limit is not None and self.limit < 1:
            errors.append(f"data.limit must be >= 1 or unset (got {self.limit})")
        return errors
