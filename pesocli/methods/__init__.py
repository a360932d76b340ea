"""Training methods, listed explicitly (importing a module registers nothing).

Add a method: one file with a :class:`~pesocli.methods.base.Method` subclass, one line here.
"""

from __future__ import annotations

from pesocli.errors import ConfigError
from pesocli.methods.base import Method, MethodConfig, RestartContext, RestartRecord
from pesocli.methods.galore import GaLore
from pesocli.methods.lora import LoRA
from pesocli.methods.lora_one import LoRAOne
from pesocli.methods.lorsum import LorSum, LorSumScaled
from pesocli.methods.peso_r import PesoR
from pesocli.methods.peso_t import PesoT
from pesocli.methods.rac_lora import RacLoRA
from pesocli.methods.relora import ReLoRA

METHODS: dict[str, type[Method]] = {
    LoRA.name: LoRA,
    LoRAOne.name: LoRAOne,
    PesoR.name: PesoR,
    PesoT.name: PesoT,
    LorSum.name: LorSum,
    LorSumScaled.name: LorSumScaled,
    RacLoRA.name: RacLoRA,
    GaLore.name: GaLore,
    ReLoRA.name: ReLoRA,
}


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``; :class:`ConfigError` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def build_method(config: MethodConfig, name: str) -> Method:
    """Instantiate the method ``name`` with its (already validated) config."""
    return method_class(name)(config)


__all__ = ["METHODS", "Method", "MethodConfig", "RestartContext", "RestartRecord", "build_method",
           "method_class"]
