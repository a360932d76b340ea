"""Exports that vLLM serves, proven equal to the trained model (``peso export``, ``peso merge``).

One job per module:

- :mod:`~pesocli.export.convert`: every layer as exact PEFT LoRA factors (scales folded into
  ``lora_B``), anchor + adapter stacking, merged weights, PEFT key names and ``adapter_config.json``.
- :mod:`~pesocli.export.compress`: one allowed vLLM rank (zero padding, or truncated SVD with
  the relative Frobenius error of each layer).
- :mod:`~pesocli.export.model_folder`: a Hugging Face model folder (sharded safetensors + index,
  config without ``quantization_config``, tokenizer + chat template, generation config's EOS).
- :mod:`~pesocli.export.check`: the vLLM rules checker behind ``peso export --check``.
- :mod:`~pesocli.export.verify`: reload from disk and compare logits.
- :mod:`~pesocli.export.manifest`, :mod:`~pesocli.export.readme`: ``peso_export.json`` (hashes)
  and ``README.md`` / ``serve.sh`` from ``templates/export/``.
- :mod:`~pesocli.export.atomic`: temporary folder, then rename.
- :mod:`~pesocli.export.formats`: the formats themselves (:func:`export_run`, :func:`merge_run`).

Library use (what ``peso train`` can call at the end of a run)::

    from pesocli.runs import load_run
    from pesocli.export import export_run, ExportOptions
    result = export_run(load_run("runs/x"), "anchored", "runs/x/export", ExportOptions(), say=print)
"""

from pesocli.export.check import check_path
from pesocli.export.formats import FORMATS, ExportOptions, ExportResult, export_run, merge_run

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "check_path", "export_run", "merge_run"]
