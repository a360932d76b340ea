"""Prompt templates for alpaca records (``templates/prompts/*.json``) and the fallback chat template."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from pesocli.errors import ConfigError
from pesocli.paths import templates_dir

# key -> the str.format fields it must use (exactly these)
_FIELDS = {
    "prompt": {"instruction"},
    "prompt_with_input": {"instruction", "input"},
    "response": {"output"},
}


@dataclass(frozen=True)
class PromptTemplate:
    """How an alpaca record becomes ``prompt`` (masked) + ``response`` (trained) text."""

    name: str
    prompt: str
    """Used when the record's ``input`` is empty; field ``{instruction}``."""
    prompt_with_input: str
    """Used when ``input`` is not empty; fields ``{instruction}`` and ``{input}``."""
    response: str
    """The trained part; field ``{output}``. EOS is appended by the encoder, not here."""
    description: str = ""

    def render_prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_with_input.format(instruction=instruction, input=input)
        return self.prompt.format(instruction=instruction)

    def render_response(self, output: str) -> str:
        return self.response.format(output=output)


def prompt_template_names() -> list[str]:
    """Names of the shipped prompt templates (file stems in ``templates/prompts``)."""
    return sorted(p.stem for p in (templates_dir() / "prompts").glob("*.json"))


def load_prompt_template(name: str) -> PromptTemplate:
    """Load a shipped template by name, or a template file by path; raises ``ConfigError``."""
    path = templates_dir() / "prompts" / f"{name}.json"
    if not path.is_file():
        path = Path(name)
        if not (name.endswith(".json") and path.is_file()):
            names = ", ".join(prompt_template_names())
            raise ConfigError(f"unknown prompt template {name!r} (choose one of {names} or a .json file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid JSON prompt template ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a prompt template must be a JSON object")
    for key, fields in _FIELDS.items():
        value = raw.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{path}: missing string key {key!r}")
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as e:
            raise ConfigError(f"{path}: {key}: {e} (write {{{{ and }}}} for literal braces)") from e
        if used != fields:
            want = ", ".join("{" + f + "}" for f in sorted(fields))
            raise ConfigError(f"{path}: {key} must use exactly the fields {want} (uses {sorted(used)})")
    return PromptTemplate(
        name=path.stem,
        prompt=raw["prompt"],
        prompt_with_input=raw["prompt_with_input"],
        response=raw["response"],
        description=str(raw.get("description", "")),
    )


def fallback_chat_template() -> str:
    """``templates/chat/simple.jinja``: used for tokenizers that have no chat template."""
    return (templates_dir() / "chat" / "simple.jinja").read_text(encoding="utf-8")
