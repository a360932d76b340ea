"""Trainer state on disk: safetensors for tensors, JSON for the rest, written atomically.

Layout of a state folder (``final/`` or ``checkpoints/step-NNNNNN/``):
- ``adapters.safetensors``: each adapted layer's trainable tensors, ``<layer>.<param>``
  (``lora_A (r, in)``, ``lora_B (out, r)``; ``U``, ``xi``, ``V`` for peso-t).
- ``anchors.safetensors``: ``<layer>.up (out, R)``, ``<layer>.down (R, in)`` (or ``<layer>.weight``).
- ``optimizer.safetensors``: ``<layer>.<param>.exp_avg`` / ``.exp_avg_sq`` (absent before any step).
- ``state.json``: step, method name and state, per-tensor optimizer scalars, shapes, peso version.
- ``manifest.json``: sha256 of every file above.
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pesocli import __version__
from pesocli.layers import AdaptedLinear
from pesocli.optim import PesoAdamW


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def collect_tensors(layers: dict[str, AdaptedLinear], optimizer: PesoAdamW | None):
    """The three tensor dicts and the optimizer's per-tensor scalars, keyed by layer name."""
    adapters, anchors, moments, scalars = {}, {}, {}, {}
    for name, layer in layers.items():
        for pname, param in layer.delta.named_parameters():
            key = f"{name}.{pname}"
            adapters[key] = param
            if optimizer is not None and param in optimizer.state and optimizer.state[param]:
                state = optimizer.state[param]
                moments[f"{key}.exp_avg"] = state["exp_avg"]
                moments[f"{key}.exp_avg_sq"] = state["exp_avg_sq"]
                scalars[key] = {
                    k: (float(v) if isinstance(v, torch.Tensor) else v)
                    for k, v in state.items()
                    if k not in ("exp_avg", "exp_avg_sq")
                }
        if layer.anchor.mode == "dense":
            anchors[f"{name}.weight"] = layer.anchor.weight
        else:
            anchors[f"{name}.up"] = layer.anchor.up
            anchors[f"{name}.down"] = layer.anchor.down
    return adapters, anchors, moments, scalars


def save_state(
    folder: Path, layers: dict[str, AdaptedLinear], optimizer: PesoAdamW | None, meta: dict[str, Any]
) -> Path:
    """Write a state folder atomically: a temporary sibling, fsync, then rename into ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        adapters, anchors, moments, scalars = collect_tensors(layers, optimizer)
        save_file(_contiguous(adapters), tmp / "adapters.safetensors")
        save_file(_contiguous(anchors), tmp / "anchors.safetensors")
        if moments:
            save_file(_contiguous(moments), tmp / "optimizer.safetensors")
        state = dict(meta)
        state["peso_version"] = __version__
        state["optimizer_scalars"] = scalars
        state["layers"] = {
            name: {
                "out": layer.out_features,
                "in": layer.in_features,
                "anchor_rank": layer.anchor.rank,
                "anchor_mode": layer.anchor.mode,
            }
            for name, layer in layers.items()
        }
        write_json(tmp / "state.json", state)
        manifest = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        write_json(tmp / "manifest.json", manifest)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_state_json(folder: Path) -> dict[str, Any]:
    """``state.json`` of a state folder."""
    return json.loads((Path(folder) / "state.json").read_text())


@torch.no_grad()
def load_layer_tensors(folder: Path, layers: dict[str, AdaptedLinear]) -> None:
    """Load ``adapters.safetensors`` and ``anchors.safetensors`` of ``folder`` into ``layers``.

    ``layers`` must come from an :class:`~pesocli.engine.Engine` built with the run's method and
    config; anchors take the saved rank. Raises ``KeyError`` naming a missing tensor.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    adapters = load_file(folder / "adapters.safetensors")
    anchors = load_file(folder / "anchors.safetensors")
    for name, layer in layers.items():
        for pname, param in layer.delta.named_parameters():
            param.copy_(adapters[f"{name}.{pname}"])
        anchor = layer.anchor
        if anchor.mode == "dense":
            anchor.weight.copy_(anchors[f"{name}.weight"])
            anchor.is_zero = not bool(anchor.weight.abs().sum() > 0)
        else:
            device = anchor.up.device
            anchor.up = anchors[f"{name}.up"].to(device, anchor.up.dtype)
            anchor.down = anchors[f"{name}.down"].to(device, anchor.down.dtype)
            anchor.is_zero = anchor.rank == 0
