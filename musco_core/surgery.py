"""Module surgery: the factorized layer container, replacing modules by name, and ``standardize_model``."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .components import FactorLayout, LayerSpec


class FactorizedLayer(nn.Sequential):
    """An ``nn.Sequential`` of the factors that replaced a layer, remembering how it was made.

    Its state_dict keys are those of the plain ``nn.Sequential`` that :func:`standardize_model` leaves
    (``layer.0.weight``, ``layer.1.weight``, ...).
    """

    def __init__(self, spec: LayerSpec, decomposition: str, ranks: tuple[int, ...],
                 layouts: Sequence[FactorLayout], modules: Sequence[nn.Module]):
        super().__init__(*modules)
        self.spec = spec
        self.decomposition = decomposition
        self.ranks = tuple(ranks)
        self.layouts = tuple(layouts)

    def extra_repr(self) -> str:
        return f"decomposition={self.decomposition!r}, ranks={self.ranks}"


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module is reachable (a shared module has several)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def tied_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """For each layer named, the parameters of *other* modules that are the same tensor as one of its own.

    A tied weight (a language model's output layer sharing the input embedding's matrix) stays in the model when
    the layer is factorized, so compressing that layer adds weights instead of removing them.
    """
    paths = module_paths(model)
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    tied = {}
    for name in names:
        module = model.get_submodule(name)
        own = tuple(f"{path}." for path in paths[id(module)])
        others = [other for parameter in module.parameters() for other in names_of[id(parameter)]
                  if not other.startswith(own)]
        if others:
            tied[name] = others
    return tied


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at the dotted path ``name`` (not the root)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def standardize_model(model: nn.Module) -> nn.Module:
    """Turns every factorized layer into a plain ``nn.Sequential`` of stock torch modules, in place.

    State-dict keys do not change, so the result saves, loads and traces with stock PyTorch. Returns the
    model (a new ``nn.Sequential`` when the model itself is a factorized layer).
    """
    if isinstance(model, FactorizedLayer):
        return nn.Sequential(*model.children())
    plain: dict[int, nn.Sequential] = {}  # a layer shared by two names stays shared
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, FactorizedLayer) and name:
            if id(module) not in plain:
                plain[id(module)] = nn.Sequential(*module.children()).train(module.training)
            replace_module(model, name, plain[id(module)])
    return model
