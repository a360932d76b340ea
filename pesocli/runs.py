"""Load a finished (or checkpointed) run back into memory: the model exactly as it was trained.

``load_run(run_dir)`` rebuilds the backbone from the run's saved config, injects the method's
adapters with an :class:`~pesocli.engine.Engine`, and loads the adapters and anchors of
``final/`` (or of ``checkpoints/step-NNNNNN/`` with ``checkpoint=N``). Export, merge, eval and
resume all start here::

    run = load_run("runs/peso-r-20260101-120000")
    logits = run.model(input_ids).logits      # the trained model, in eval mode
    run.engine.layers                         # {module name: AdaptedLinear}

Every problem a user can cause (empty folder, no ``final/``, unknown step) is a
:class:`~pesocli.errors.PesoError` with one line saying what exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.errors import MissingRunError, PesoError

if TYPE_CHECKING:
    from pesocli.config import RunConfig
    from pesocli.engine import Engine

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoadedRun:
    """A run's trained model in memory, plus where it came from."""

    run_dir: Path
    """The run folder (absolute)."""
    state_dir: Path
    """The state folder that was loaded: ``final/`` or ``checkpoints/step-NNNNNN/`` (absolute)."""
    step: int
    """Optimizer steps behind this state (``state.json`` ``step``)."""
    checkpoint: int | None
    """The step asked for with ``checkpoint=``; ``None`` for ``final/``."""
    cfg: RunConfig
    """The run's resolved config, as saved in ``state.json``."""
    state: dict[str, Any]
    """``state.json`` of the state folder (method state, per-layer shapes, peso version)."""
    model: Any
    """The ``transformers`` causal LM with :class:`~pesocli.layers.AdaptedLinear` layers, in eval mode."""
    tokenizer: Any
    """The run's tokenizer (pad token set)."""
    engine: Engine
    """Holds the method and the adapted layers (``engine.layers``, ``engine.method``)."""

    @property
    def method_name(self) -> str:
        return self.cfg.method_name


def checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Step checkpoints of a run folder, ``{step: folder}`` in step order (empty when none)."""
    folder = Path(run_dir) / "checkpoints"
    found = {}
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "state.json").is_file():
                found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def state_folder(run_dir: str | Path, checkpoint: int | None = None) -> Path:
    """The state folder to load: ``final/``, or the checkpoint of step ``checkpoint``.

    Raises :class:`MissingRunError` (exit 2) for a missing or empty run folder, a run without
    ``final/`` (listing its checkpoints) and an unknown step (listing the available ones).
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise MissingRunError(f"run folder {run_dir} does not exist")
    if not any(run_dir.iterdir()):
        raise MissingRunError(f"run folder {run_dir} is empty (no config.yaml, final/ or checkpoints/)")
    steps = checkpoints(run_dir)
    available = ", ".join(str(s) for s in steps) or "none"
    if checkpoint is None:
        final = run_dir / "final"
        if not (final / "state.json").is_file():
            raise MissingRunError(
                f"{run_dir} has no final/ state (training did not finish?); "
                f"checkpoints: {available} (pass --checkpoint STEP)"
            )
        return final
    if checkpoint not in steps:
        raise MissingRunError(f"{run_dir} has no checkpoint at step {checkpoint}; checkpoints: {available}")
    return steps[checkpoint]


def load_run(
    run_dir: str | Path, checkpoint: int | None = None, device: str = "cpu", quant: str | None = None
) -> LoadedRun:
    """Rebuild the trained model of ``run_dir`` (``final/``, or step ``checkpoint``) on ``device``.

    The backbone comes from the run's saved ``model`` config (``tiny``, a folder or a cached id),
    in the run's ``model.dtype`` resolved for ``device`` and quantised as the run was (bitsandbytes
    ``nf4``/``fp4``/``int8``). ``quant`` overrides that: ``quant="none"`` puts the trained anchors
    and adapters on the original full-precision weights instead (``cfg.model.quant`` then says
    ``none``). Raises :class:`PesoError` (one line) when the folder, state or backbone is not there.
    """
    import torch

    from pesocli.config import config_from_dict
    from pesocli.engine import Engine
    from pesocli.methods import build_method
    from pesocli.models import load_model_and_tokenizer
    from pesocli.train.state import load_layer_tensors, read_state_json

    state_dir = state_folder(run_dir, checkpoint).resolve()
    try:
        state = read_state_json(state_dir)
    except (OSError, ValueError) as exc:
        raise PesoError(f"cannot read {state_dir / 'state.json'}: {exc}") from exc
    raw_config = state.get("config")
    if not isinstance(raw_config, dict):
        raise PesoError(f"{state_dir / 'state.json'} has no saved config (written by an older peso?)")
    cfg = config_from_dict(raw_config, source=str(state_dir / "state.json"))
    if quant is not None:
        cfg.model.quant = quant

    model, tokenizer = load_model_and_tokenizer(cfg.model, torch.device(device))
    method = build_method(cfg.method, cfg.method_name)
    method.load_state_dict(state.get("method_state", {}))
    engine = Engine(model, method, cfg.fullgrad)
    saved = set(state.get("layers", {}))
    if saved and saved != set(engine.layers):
        extra = sorted(saved ^ set(engine.layers))[:3]
        raise PesoError(
            f"the backbone {cfg.model.name!r} does not match the run's adapted layers "
            f"(differ: {', '.join(extra)}); was the model folder changed?"
        )
    try:
        load_layer_tensors(state_dir, engine.layers, unfold=True)  # a folded anchor: W0 + dense anchor
    except KeyError as exc:
        raise PesoError(f"{state_dir} lacks tensor {exc.args[0]!r}: the state folder is incomplete") from exc
    except (OSError, RuntimeError) as exc:
        raise PesoError(f"cannot load the tensors of {state_dir}: {exc}") from exc
    model.eval()
    return LoadedRun(
        run_dir=Path(run_dir).expanduser().resolve(),
        state_dir=state_dir,
        step=int(state.get("step", 0)),
        checkpoint=checkpoint,
        cfg=cfg,
        state=state,
        model=model,
        tokenizer=tokenizer,
        engine=engine,
    )
