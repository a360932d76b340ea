"""The method interface (Algorithm 1 of the PESO paper as a strategy).

A method is the triple (parametrisation ``M_k``, ``UpdateSubspace``, ``Opt``) plus a schedule.
The trainer knows only this interface: it asks :meth:`Method.build_delta` for each adapted
layer's trainable module, asks :meth:`Method.restart_due` before every optimizer step, hands
:meth:`Method.restart` the full-gradient estimates when a restart is due, calls
:meth:`Method.before_step` between backward and ``optimizer.step()``, and multiplies
:meth:`Method.lr_multiplier` into its learning-rate schedule.

An update goes through :meth:`pesocli.engine.Engine.update`, which brackets gradient clipping with
two hooks, so the clip norm counts only the gradients the update uses and a hook that reads them
sees what AdamW sees:

    backward -> before_step (which gradients are used) -> clip -> before_update (read them) -> step

:meth:`Method.first_phase` splits a step in two: those parameters step first, then a second
forward + backward over the same micro-batches gives the others their gradients (PESO-LoRA-T,
Algorithm 6 line 15).

Orientation (the one convention inside peso, see ``pesocli/layers.py``): a layer's weight is
``(out, in)`` like ``nn.Linear``; the paper's ``A (m x r)`` is ``lora_B (out, r)`` and the
paper's ``B (r x n)`` is ``lora_A (r, in)``; ``Delta W = scale * lora_B @ lora_A``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from pesocli.fullgrad import GradientEstimate
    from pesocli.layers import AdaptedLinear, GradientProbe
    from pesocli.optim import PesoAdamW

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass(kw_only=True)
class MethodConfig:
    """Fields every method shares. Each method subclasses this with its own keyword-only fields."""

    rank: int = 8
    """Adapter rank ``r``."""
    alpha: float = 16.0
    """LoRA alpha; the adapter scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``)."""
    rslora: bool = False
    """Use rank-stabilised scaling ``alpha / sqrt(r)``."""
    dropout: float = 0.0
    """Dropout on the adapter input (as PEFT's ``lora_dropout``)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name patterns to adapt: a plain name matches the last component of a module's
    dotted name (``q_proj``); a pattern with a ``.`` or regex characters is a full-name regex."""
    anchor_mode: str = "lowrank"
    """How absorbed history ``W~ - W0`` is held: ``lowrank`` (stacked pair beside the base), ``dense``
    (an ``(out, in)`` matrix beside the base) or ``fold`` (added into the base weight, as Algorithm 2
    line 4 writes it: no anchor memory or FLOPs; FP32/BF16 bases only, each fold rounds ``W~`` to the
    base's dtype; exports take ``W0`` from the model again). Measured on SmolLM2-135M's trained anchors
    (``scripts/anchor_precision.py``): folding into FP32 is exact to 3e-5 of the anchor, into BF16 it
    loses most of it (restart-sized increments are below BF16's resolution of ``W0``): FP32 bases only."""
    anchor_rank_cap: int = 256
    """Re-compress a low-rank anchor (exactly, QR + small SVD) when its rank passes this."""
    anchor_keep_energy: float = 1.0
    """Below 1: after every absorb, truncate a low-rank anchor to the fewest components holding this
    fraction of its energy ``sum sigma^2`` (lossy; the dropped fraction goes to ``restarts.jsonl`` as
    ``anchor_dropped_energy``). 1.0 keeps everything (exact)."""
    anchor_max_rank: int | None = None
    """A hard cap on a low-rank anchor's rank: after every absorb it is truncated to its top
    ``anchor_max_rank`` components (lossy, dropped energy recorded like ``anchor_keep_energy``), so its
    cost per step stops growing with the number of restarts. ``None``: no cap beyond the exact one.
    Dense and folded anchors ignore it (they hold ``W~`` exactly)."""
    anchor_dtype: str = "fp32"
    """Storage dtype of a ``lowrank`` or ``dense`` anchor: ``fp32`` or ``bf16`` (half the memory; the
    anchor's products still run in the wider of the activations' and the adapter's dtype)."""

    def validate(self) -> list[str]:
        """Return one message per bad field (empty when valid)."""
        errors = []
        if self.rank < 1:
            errors.append(f"method.rank must be >= 1 (got {self.rank})")
        if self.alpha <= 0:
            errors.append(f"method.alpha must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"method.dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules:
            errors.append("method.target_modules must name at least one module")
        if self.anchor_mode not in ("lowrank", "dense", "fold"):
            errors.append(f"method.anchor_mode must be lowrank, dense or fold (got {self.anchor_mode!r})")
        if self.anchor_rank_cap < 1:
            errors.append(f"method.anchor_rank_cap must be >= 1 (got {self.anchor_rank_cap})")
        if not 0.0 < self.anchor_keep_energy <= 1.0:
            errors.append(f"method.anchor_keep_energy must be in (0, 1] (got {self.anchor_keep_energy})")
        if self.anchor_max_rank is not None and self.anchor_max_rank < 1:
            errors.append(f"method.anchor_max_rank must be >= 1 or None (got {self.anchor_max_rank})")
        if self.anchor_dtype not in ("fp32", "bf16"):
            errors.append(f"method.anchor_dtype must be fp32 or bf16 (got {self.anchor_dtype!r})")
        # anchor_max_rank is ignored by dense and folded anchors (they hold W~ exactly), so that a method
        # whose default caps its lowrank anchor (peso-r) still runs with anchor_mode fold or dense
        if self.anchor_keep_energy < 1.0 and self.anchor_mode != "lowrank":
            errors.append("method.anchor_keep_energy truncates a lowrank anchor only "
                          f"(method.anchor_mode is {self.anchor_mode})")
        if self.anchor_dtype != "fp32" and self.anchor_mode == "fold":
            errors.append("method.anchor_dtype does not apply to anchor_mode fold (the base holds W~)")
        return errors

    @property
    def scale(self) -> float:
        """The LoRA scale ``s`` (``alpha / r`` or ``alpha / sqrt(r)``)."""
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class RestartRecord:
    """One layer's outcome of one restart or subspace event (a line of ``restarts.jsonl``)."""

    step: int
    layer: str
    method: str
    kind: str = "restart"
    rank: int = 0
    top_singular_values: list[float] = field(default_factory=list)
    captured_energy: float | None = None
    """Energy of the top-r subspace relative to the (sketched) total ``||G||_F^2``."""
    principal_angle_deg: float | None = None
    """Largest principal angle (degrees) between the previous column subspace and the new one the
    restart explores (for peso-r: the top-r subspace of the full gradient)."""
    anchor_rank: int = 0
    anchor_dropped_energy: float | None = None
    """Fraction of the anchor's energy its lossy truncation dropped at this event
    (``method.anchor_keep_energy`` / ``anchor_max_rank``); ``None`` when the anchor is exact."""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RestartContext:
    """What :meth:`Method.restart` receives from the trainer."""

    step: int
    layers: dict[str, AdaptedLinear]
    optimizer: PesoAdamW
    gradients: dict[str, GradientEstimate] | None
    """Full-gradient estimates per layer (``None`` when the method needs none)."""


class Method(ABC):
    """One training method. Subclasses set ``name``, ``Config`` and implement the hooks."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_full_gradient: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.total_steps = 0
        self.steps_per_epoch = 0

    def setup(self, *, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before training with the run's length (for per-epoch schedules)."""
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch

    @abstractmethod
    def build_delta(self, out_features: int, in_features: int) -> nn.Module:
        """The trainable parametrisation of one layer: a module mapping ``x (..., in)`` to ``(..., out)``."""

    def restart_due(self, step: int) -> bool:
        """Whether a restart/subspace update happens before optimizer step ``step`` (0-based)."""
        return False

    def sketch_rank(self) -> int:
        """Rank of the full-gradient estimate a restart needs."""
        return self.config.rank

    def step_probe(self, name: str, layer: AdaptedLinear) -> GradientProbe | None:
        """A probe to attach to ``layer`` during every training backward (``None``: none).

        For methods that need products with the full gradient every step (LoRSum/OPLoRA); the
        probe sees ``(x, grad_out)`` of each micro-batch, exactly as a restart sketch does.
        """
        del name, layer
        return None

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        """Update subspaces (and anchors, and optimizer state) of every layer; return records."""
        return []

    def first_phase(self, layers: dict[str, AdaptedLinear], step: int) -> list[nn.Parameter] | None:
        """Parameters that step first at step ``step`` (0-based); ``None`` (the default): one update.

        A list splits the step: those parameters step on the step's gradients, then the trainer runs
        a second forward + backward over the same micro-batches (same loss normalisation, all-reduce,
        watchdog and clipping; the same dropout draws; no step probes or sketches) and steps every
        other parameter on its gradients. The second pass costs one more forward and backward.
        """
        del layers, step
        return None

    def before_step(self, layers: dict[str, AdaptedLinear], optimizer: PesoAdamW, step: int) -> None:  # noqa: B027
        """Before clipping: decide which gradients this update uses.

        ``.grad`` holds the step's gradients, summed over processes (on a two-phase step only the
        phase's parameters keep theirs). Set ``.grad = None`` where a parameter must not step, or use
        the gradients here (a method that writes its own update, then clears them): clipping and the
        optimizer see only what is left. Runs before every update (twice on a two-phase step).
        """

    def before_update(self, layers: dict[str, AdaptedLinear], optimizer: PesoAdamW, step: int) -> None:  # noqa: B027
        """After clipping, right before ``optimizer.step()``: ``.grad`` is exactly what AdamW uses."""

    def lr_multiplier(self, step: int) -> float:
        """Factor on the run's learning-rate schedule at optimizer step ``step`` (0-based); 1.0 by default.

        A pure function of ``step`` (and of what :meth:`setup` was told), so a resumed run gets the
        same learning rates; ``pesocli.train.lr.build_scheduler`` multiplies it in.
        """
        del step
        return 1.0

    def lora_factors(self, delta: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The delta as exact LoRA factors ``(lora_A (r, in), lora_B (out, r), scale)`` for export."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable method state (restart counters, schedule position)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
