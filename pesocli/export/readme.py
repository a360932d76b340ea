"""The export's ``README.md`` and ``serve.sh``, rendered from ``templates/export/`` with absolute paths.

``$name`` placeholders (:class:`string.Template`); every value is computed here, so the
templates hold only prose and layout.
"""

from __future__ import annotations

import json
import shlex
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pesocli.paths import templates_dir


@dataclass
class ServeSpec:
    """What ``vllm serve`` needs for one export: the model, and the LoRA adapter if there is one."""

    model: str
    """Absolute model folder, or a Hugging Face id."""
    dtype: str
    """vLLM's ``--dtype`` (``bfloat16``, ``float16``, ``float32``)."""
    lora_name: str | None = None
    lora_path: Path | None = None
    max_lora_rank: int | None = None

    def command(self) -> str:
        """The exact ``vllm serve ...`` command line (shell-quoted)."""
        parts = ["vllm", "serve", self.model, "--dtype", self.dtype]
        if self.lora_path is not None:
            if "=" in str(self.lora_path):  # name=path cannot hold a '='; the JSON form can
                module = json.dumps({"name": self.lora_name, "path": str(self.lora_path)})
            else:
                module = f"{self.lora_name}={self.lora_path}"
            parts += ["--enable-lora", "--lora-modules", module, "--max-lora-rank", str(self.max_lora_rank)]
        return " ".join(shlex.quote(p) for p in parts)

    def python(self) -> str:
        """A ``vllm.LLM`` snippet (with ``LoRARequest`` when there is an adapter)."""
        lines = ["from vllm import LLM, SamplingParams"]
        if self.lora_path is not None:
            lines += [
                "from vllm.lora.request import LoRARequest",
                "",
                f"llm = LLM(model={self.model!r}, dtype={self.dtype!r}, enable_lora=True, "
                f"max_lora_rank={self.max_lora_rank})",
                f"lora = LoRARequest({self.lora_name!r}, 1, {str(self.lora_path)!r})",
                "params = SamplingParams(temperature=0.0, max_tokens=64)",
                'outputs = llm.generate(["Hello"], params, lora_request=lora)',
            ]
        else:
            lines += [
                "",
                f"llm = LLM(model={self.model!r}, dtype={self.dtype!r})",
                "params = SamplingParams(temperature=0.0, max_tokens=64)",
                'outputs = llm.generate(["Hello"], params)',
            ]
        lines.append("print(outputs[0].outputs[0].text)")
        return "\n".join(lines)


def render(name: str, values: dict[str, Any]) -> str:
    """``templates/export/<name>`` with ``values`` substituted (every placeholder must be given)."""
    text = (templates_dir() / "export" / name).read_text(encoding="utf-8")
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def write_readme(root: Path, final_root: Path, serve: ServeSpec, values: dict[str, Any]) -> None:
    """``README.md`` and an executable ``serve.sh`` in ``root`` (paths written as ``final_root``'s)."""
    common = {"root": final_root, "serve_command": serve.command(), **values}
    (root / "README.md").write_text(render("README.md.tmpl", {**common, "python_snippet": serve.python()}))
    script = root / "serve.sh"
    script.write_text(render("serve.sh.tmpl", common))
    script.chmod(0o755)
