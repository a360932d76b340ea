"""Trainer state on disk: safetensors for tensors, JSON for the rest, written atomically, verified on load.

Layout of a state folder (``final/`` or ``checkpoints/step-NNNNNN/``):
- ``adapters.safetensors``: each adapted layer's ``delta.state_dict()`` (parameters and buffers),
  ``<layer>.<key>`` (``lora_A (r, in)``, ``lora_B (out, r)``; ``U``, ``xi``, ``V`` for peso-t).
- ``anchors.safetensors``: ``<layer>.up (out, R)``, ``<layer>.down (R, in)`` (or ``<layer>.weight``, or
  ``<layer>.folded``: the base weight ``W~`` of a folded anchor);
  ``R`` is the saved anchor rank, which loading takes over.
- ``optimizer.safetensors``: every tensor of each parameter's optimizer state,
  ``<layer>.<param>.<key>`` (``exp_avg``, ``exp_avg_sq``, the 0-dim ``step``); absent before any state.
- ``rng.safetensors`` (checkpoints): ``torch`` (CPU generator) and ``cuda.<i>`` per visible GPU.
- ``state.json``: step, method name and JSON state, the resolved config, the LR scheduler, the
  non-tensor optimizer state per parameter (``optimizer_scalars``: ``step``, ``beta2_start``,
  ``beta2_window``, ``beta2_min``), layer shapes and anchor ranks, peso version; checkpoints add the
  data position, python/numpy RNG states and the loop's counters (see ``pesocli.train.resume``).
- ``manifest.json``: sha256 of every file above; :func:`verify_state` checks it before a resume.

Writes go to a temporary sibling folder, every file is fsynced, the folder is renamed into place
and its parent fsynced; a crash leaves either the old folder or the new one, never a mix. No pickle
anywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pesocli import __version__
from pesocli.errors import StorageError
from pesocli.hashing import sha256
from pesocli.layers import AdaptedLinear
from pesocli.optim import PesoAdamW

MANIFEST = "manifest.json"
STATE_JSON = "state.json"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """``ENOSPC``/``EDQUOT`` as an ``OSError``, or as safetensors reports it (``os error 28``)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def storage_error(exc: BaseException, what: Path | str) -> StorageError:
    """One-line :class:`StorageError` for a failed write of ``what``."""
    if is_disk_full(exc):
        return StorageError(f"disk full while writing {what}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    return StorageError(f"cannot write {what}: {reason}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file, fsync and rename (readers see the old or new text)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def collect_tensors(layers: dict[str, AdaptedLinear], optimizer: PesoAdamW | None):
    """``(adapters, anchors, optimizer tensors, optimizer scalars)``, keyed by layer name.

    Optimizer state is saved for every delta parameter that has one: its tensors (0-dim ``step``
    included) go to ``optimizer.safetensors``, everything else to ``optimizer_scalars`` (with a
    float copy of ``step`` for readers of the JSON).
    """
    adapters, anchors, moments, scalars = {}, {}, {}, {}
    for name, layer in layers.items():
        params = {id(p): pname for pname, p in layer.delta.named_parameters()}
        for key, tensor in layer.delta.state_dict(keep_vars=True).items():
            full = f"{name}.{key}"
            adapters[full] = tensor
            if optimizer is None or id(tensor) not in params or not optimizer.state.get(tensor):
                continue
            scalars[full] = {}
            for skey, value in optimizer.state[tensor].items():
                if isinstance(value, torch.Tensor):
                    moments[f"{full}.{skey}"] = value
                    if value.dim() == 0:
                        scalars[full][skey] = float(value)
                else:
                    scalars[full][skey] = value
        for suffix, tensor in layer.anchor.state_tensors().items():
            anchors[f"{name}.{suffix}"] = tensor
    return adapters, anchors, moments, scalars


def save_state(
    folder: Path,
    layers: dict[str, AdaptedLinear],
    optimizer: PesoAdamW | None,
    meta: dict[str, Any],
    *,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a state folder atomically: a temporary sibling, fsync, rename into ``folder``, fsync.

    ``extra_tensors`` maps more file names (``rng.safetensors``) to tensors. A failed write (disk
    full, ...) removes the temporary folder, leaves an existing ``folder`` as it was and raises
    :class:`StorageError`.
    """
    folder = Path(folder)
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        adapters, anchors, moments, scalars = collect_tensors(layers, optimizer)
        save_file(_cpu(adapters), tmp / "adapters.safetensors")
        save_file(_cpu(anchors), tmp / "anchors.safetensors")
        if moments:
            save_file(_cpu(moments), tmp / "optimizer.safetensors")
        for file_name, tensors in (extra_tensors or {}).items():
            save_file(_cpu(tensors), tmp / file_name)
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
        write_json(tmp / STATE_JSON, state)
        write_json(tmp / MANIFEST, {p.name: sha256(p) for p in sorted(tmp.iterdir())})
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        _replace_dir(tmp, folder)
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise storage_error(exc, folder) from exc
        raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_dir(new: Path, folder: Path) -> None:
    """Rename ``new`` to ``folder``; an existing ``folder`` is moved aside first and deleted after."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify_state(folder: Path) -> str | None:
    """What is wrong with a state folder (``None`` when every file matches ``manifest.json``)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"missing {MANIFEST}"
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST} ({exc})"
    if not isinstance(manifest, dict) or STATE_JSON not in manifest:
        return f"{MANIFEST} does not list {STATE_JSON}"
    for name, digest in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        try:
            actual = sha256(path)
        except OSError as exc:
            return f"unreadable {name} ({exc.strerror or exc})"
        if actual != digest:
            return f"{name} does not match its sha256 in {MANIFEST}"
    try:
        read_state_json(folder)
    except ValueError as exc:
        return f"unreadable {STATE_JSON} ({exc})"
    return None


def read_state_json(folder: Path) -> dict[str, Any]:
    """``state.json`` of a state folder."""
    return json.loads((Path(folder) / STATE_JSON).read_text())


def read_tensors(folder: Path, file_name: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file of a state folder (empty when the file is absent)."""
    path = Path(folder) / file_name
    return load_file(path) if path.is_file() else {}


@torch.no_grad()
def load_layer_tensors(folder: Path, layers: dict[str, AdaptedLinear], *, unfold: bool = False) -> None:
    """Load ``adapters.safetensors`` and ``anchors.safetensors`` of ``folder`` into ``layers``.

    ``layers`` must come from an :class:`~pesocli.engine.Engine` built with the run's method and
    config; deltas load through ``delta.load_state_dict`` (parameters keep their identity, so an
    optimizer built on them stays valid); anchors take the saved rank. A folded anchor
    (``anchor_mode: fold``) writes the saved ``W~`` into the base, or with ``unfold`` (exports and
    evaluation) becomes a dense FP32 anchor ``W~ - W0`` beside the untouched base. Raises ``KeyError``
    naming a missing tensor.
    """
    folder = Path(folder)
    adapters = load_file(folder / "adapters.safetensors")
    anchors = load_file(folder / "anchors.safetensors")
    for name, layer in layers.items():
        keys = list(layer.delta.state_dict())
        for key in keys:
            if f"{name}.{key}" not in adapters:
                raise KeyError(f"{name}.{key}")
        layer.delta.load_state_dict({key: adapters[f"{name}.{key}"] for key in keys})
        own = {
            suffix: anchors[f"{name}.{suffix}"]
            for suffix in ("up", "down", "weight", "folded")
            if f"{name}.{suffix}" in anchors
        }
        try:
            layer.anchor.load_state_tensors(own, unfold=unfold)
        except KeyError as exc:
            raise KeyError(f"{name}.{exc.args[0]}") from None


@torch.no_grad()
def load_optimizer_state(
    folder: Path, state: dict[str, Any], layers: dict[str, AdaptedLinear], optimizer: PesoAdamW
) -> None:
    """Restore every delta parameter's optimizer state exactly as :func:`save_state` wrote it.

    Tensors come from ``optimizer.safetensors`` (0-dim ones stay on the CPU, as the optimizer makes
    them; the rest go to the parameter's device), everything else from ``optimizer_scalars``.
    Parameters without saved state get none (as after a reset).
    """
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for tkey, tensor in read_tensors(folder, "optimizer.safetensors").items():
        key, _, skey = tkey.rpartition(".")  # state keys (exp_avg, step) hold no dot
        by_param.setdefault(key, {})[skey] = tensor
    scalars = state.get("optimizer_scalars", {})
    for name, layer in layers.items():
        for pname, param in layer.delta.named_parameters():
            key = f"{name}.{pname}"
            optimizer.state.pop(param, None)
            if key not in scalars:
                continue
            restored: dict[str, Any] = {
                skey: tensor if tensor.dim() == 0 else tensor.to(param.device)
                for skey, tensor in by_param.get(key, {}).items()
            }
            for skey, value in scalars[key].items():
                restored.setdefault(skey, value)
            optimizer.state[param] = restored
