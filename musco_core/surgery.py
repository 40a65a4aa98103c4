"""Module surgery: the factorized layer container, replacing modules by name, ``standardize_model``, and what
makes a module unsafe to replace (computation of its own, hooks, an owner that reads its weights, aliases)."""
from __future__ import annotations

import copy
import itertools
import logging
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .components import Factor, FactorLayout, LayerAdapter, LayerSpec
from .factors import padding_per_axis
from .errors import ConfigError, one_line, short_repr

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)

#: Attributes the stock computation of a layer goes through. A subclass that defines one of them itself computes
#: something else than the stock class (TensorFlow-style padding in ``forward``, a scaled or masked weight), or
#: computes it from something else (a ``weight`` property).
COMPUTATION_ATTRIBUTES = ("forward", "_conv_forward", "__call__", "_call_impl", "_wrapped_call_impl",
                          "__getattr__", "__getattribute__", "weight", "bias")

#: Owners whose forward reads these children's weights directly instead of calling them: a factorized child has
#: no ``weight``, so replacing one breaks its owner.
OWNERS_READING_CHILD_WEIGHTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),  # F.multi_head_attention_forward(..., self.out_proj.weight, ...)
    nn.TransformerEncoderLayer: ("linear1", "linear2"),  # the eval fast path, torch._transformer_encoder_layer_fwd
}
if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13: F.linear_cross_entropy(input, self.linear.weight, ...)
    OWNERS_READING_CHILD_WEIGHTS[nn.LinearCrossEntropyLoss] = ("linear",)


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


def factor_layouts(model: nn.Module) -> dict[str, tuple[FactorLayout, ...]]:
    """The factor layouts of every factorized layer of ``model``, by name."""
    return {name: module.layouts for name, module in model.named_modules() if isinstance(module, FactorizedLayer)}


#: The memory format of a (batch of) conv weights of each rank that ``channels_last`` conversions give.
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def carry_training_state(old: nn.Module, new: nn.Module) -> None:
    """Gives the new layer the old one's mode, trainability and memory format: its weights are trainable when the
    old layer's were, and its bias when the old bias was (a frozen weight next to a trainable bias, bias-only
    fine-tuning, stays so); its conv weights are ``channels_last`` when the old layer's were (a model converted with
    ``model.to(memory_format=torch.channels_last)``)."""
    def is_bias(name: str) -> bool:
        return name.rpartition(".")[2] == "bias"

    def channels_last(tensor: torch.Tensor) -> bool:  # a 1x1 kernel is contiguous in both formats: it cannot tell
        return (tensor.dim() in CHANNELS_LAST and not tensor.is_contiguous()
                and tensor.is_contiguous(memory_format=CHANNELS_LAST[tensor.dim()]))

    new.train(old.training)
    trained = {kind: any(p.requires_grad for name, p in old.named_parameters() if is_bias(name) == kind)
               for kind in (False, True)}
    formats = {p.dim() for p in old.parameters() if channels_last(p)}
    for name, parameter in new.named_parameters():
        parameter.requires_grad_(trained[is_bias(name)])
        if parameter.dim() in formats:
            parameter.data = parameter.data.contiguous(memory_format=CHANNELS_LAST[parameter.dim()])


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module is reachable (a shared module has several)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def select_modules(model: nn.Module, entries: str | Sequence[str], what: str) -> list[str]:
    """The modules that ``entries`` name, in the model's order: exact module names, and ``re:`` patterns matched in
    full against module names (``re:encoder\\.layer\\.\\d+``). A name that is not a module or a pattern that matches
    none is a ConfigError starting with ``what`` (the setting's name)."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    names = [name for name, _ in model.named_modules() if name]
    chosen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"{what}: expected module names or 're:' patterns, got {short_repr(entry)}")
        if entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as exc:
                raise ConfigError(f"{what}: {short_repr(entry)} is not a regular expression: {exc}") from None
            matched = [name for name in names if pattern.fullmatch(name)]
            if not matched:
                raise ConfigError(f"{what}: pattern {short_repr(entry)} matches no module of {type(model).__name__}")
            chosen.update(matched)
        elif entry in names:
            chosen.add(entry)
        else:
            raise ConfigError(f"{what}: {short_repr(entry)} is not a module of {type(model).__name__}")
    return [name for name in names if name in chosen]


def _memory_span(tensor: torch.Tensor) -> tuple[tuple, int, int]:
    """Where a tensor's elements lie: its storage (device and address) and the bytes from its first element to past
    its last; a tensor without memory of its own (meta, empty) is a storage by itself."""
    storage = tensor.untyped_storage() if not tensor.is_meta and tensor.numel() else None
    if storage is None or not storage.nbytes():
        return (id(tensor),), 0, 1
    size = tensor.element_size()
    first = tensor.storage_offset() * size
    extent = 1 + sum((length - 1) * stride for length, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.device, storage.data_ptr()), first, first + extent * size


def memory_neighbours(tensors: Sequence[torch.Tensor]) -> list[set[int]]:
    """For each tensor, the indices of the *others* whose memory overlaps its own: the same tensor listed twice, or
    distinct tensors (two Parameters made from one tensor, overlapping views of it) over the same bytes, which an
    optimizer step on one changes in the other. Views of disjoint parts of one storage do not overlap."""
    by_storage: dict[tuple, list[tuple[int, int, int]]] = {}
    for index, tensor in enumerate(tensors):
        key, first, end = _memory_span(tensor)
        by_storage.setdefault(key, []).append((first, end, index))
    neighbours: list[set[int]] = [set() for _ in tensors]
    for spans in by_storage.values():
        active: list[tuple[int, int, int]] = []
        for first, end, index in sorted(spans):
            active = [span for span in active if span[1] > first]
            for _, _, other in active:
                neighbours[index].add(other)
                neighbours[other].add(index)
            active.append((first, end, index))
    return neighbours


def distinct_numel(tensors: Sequence[torch.Tensor]) -> int:
    """How many elements ``tensors`` hold, each memory counted once: the same tensor listed twice, or tensors over
    the same bytes (see :func:`memory_neighbours`), count their shared elements once, so a model whose layers share
    a weight (tied to one tensor, also as distinct Parameters) reports its true size. Tensors over one storage are
    counted in the element size of the first of them."""
    unique = list({id(tensor): tensor for tensor in tensors}.values())
    by_storage: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    for tensor in unique:
        key, first, end = _memory_span(tensor)
        by_storage.setdefault(key, []).append((first, end, tensor))
    total = 0
    for spans in by_storage.values():
        size = spans[0][2].element_size()
        if len(spans) == 1:
            total += spans[0][2].numel()
        elif all(end - first == tensor.numel() * tensor.element_size() for first, end, tensor in spans):
            covered, reach = 0, 0  # each tensor fills its span: the union of the spans
            for first, end, _ in sorted(spans, key=lambda span: span[:2]):
                covered, reach = covered + max(0, end - max(first, reach)), max(reach, end)
            total += covered // size
        else:  # a strided view with gaps: mark the bytes each tensor holds
            low = min(first for first, _, _ in spans)
            held = torch.zeros(max(end for _, end, _ in spans) - low, dtype=torch.bool)
            for first, _, tensor in spans:
                unit = tensor.element_size()
                held.as_strided((*tensor.shape, unit), (*(stride * unit for stride in tensor.stride()), 1),
                                first - low).fill_(True)
            total += int(held.sum()) // size
    return total


def tied_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """For each layer named, the parameters of *other* modules whose memory is one of its own's (see
    :func:`memory_neighbours`): the same tensor, or another Parameter over the same storage.

    A tied weight (a language model's output layer sharing the input embedding's matrix) stays in the model when
    the layer is factorized, so compressing that layer adds weights instead of removing them; and training no
    longer couples the two.
    """
    paths = module_paths(model)
    entries = list(model.named_parameters(remove_duplicate=False))
    neighbours = memory_neighbours([parameter for _, parameter in entries])
    tied = {}
    for name in names:
        own = tuple(f"{path}." for path in paths[id(model.get_submodule(name))])
        others = [entries[j][0] for i, (mine, _) in enumerate(entries) if mine.startswith(own)
                  for j in sorted(neighbours[i]) if not entries[j][0].startswith(own)]
        if others:
            tied[name] = list(dict.fromkeys(others))
    return tied


def held_elsewhere(model: nn.Module, module: nn.Module, others: Sequence[str]) -> int:
    """How many weights of ``module`` are the very parameters ``others`` of other modules (see
    :func:`tied_parameters`): they stay in the model, and in its parameter count, when ``module`` is replaced."""
    own, held = list(module.parameters()), [model.get_parameter(other) for other in others]
    shared = [parameter for parameter, neighbours in zip(own, memory_neighbours([*own, *held]))
              if any(index >= len(own) for index in neighbours)]
    return distinct_numel(shared)


def tied_by_config(model: nn.Module, layer: nn.Module) -> str | None:
    """The name (and class) of the transformers 4 model inside ``model`` whose output embeddings ``layer`` is,
    tied to its input embeddings by ``config.tie_word_embeddings`` alone, or None. Such a tie cannot be broken:
    with the flag left True, ``tie_weights()`` hangs the embedding's matrix on a factorized layer; and the flag
    cannot be cleared, since models read it in their forward too (T5 scales its decoder's output by
    ``d_model ** -0.5`` only while it is True). transformers 5 maps ties by name (see :func:`clear_broken_ties`)."""
    for path, module in model.named_modules():
        if callable(getattr(module, "get_expanded_tied_weights_keys", None)):  # transformers 5: ties are mapped
            continue
        config, output_embeddings = getattr(module, "config", None), getattr(module, "get_output_embeddings", None)
        if (getattr(config, "tie_word_embeddings", None) is True and callable(output_embeddings)
                and output_embeddings() is layer):
            return f"{path or 'the model'} ({type(module).__name__})"
    return None


def clear_broken_ties(model: nn.Module) -> None:
    """Stops each transformers 5 model inside ``model`` from tying a weight to a factorized layer (a tied layer, such
    as a language model's head, factorized with ``force: true``, which unties it). Left alone, the model's
    ``tie_weights()`` (also run by ``resize_token_embeddings``) hangs the embedding's matrix on the factorized layer
    as a stray ``weight``, and a save then drops the embedding as that tensor's duplicate.

    The ties that name a factorized layer leave the model's tie mappings (``_tied_weights_keys`` and the expanded
    ``all_tied_weights_keys``, an outer model's holding its inner ones') and ``config.tie_word_embeddings`` stays
    True: that flag also governs the model's other ties (BART's encoder and decoder embeddings are
    ``model.shared``), which a model built from the saved configuration would otherwise lack, so the saved weights,
    which hold such a tensor once, would not load into it, and models read it in their forward too (T5 scales its
    output by it). transformers 4 has no such mappings: a compression step keeps a layer it ties
    (:func:`tied_by_config`); one that ``load_compressed`` rebuilds factorized (saved under transformers 5) is
    left so, with a warning, its outputs unchanged."""
    for module in model.modules():
        if callable(getattr(module, "get_expanded_tied_weights_keys", None)):  # transformers 5: ties are mapped
            factorized = tuple(f"{path}." for path, child in module.named_modules(remove_duplicate=False)
                               if isinstance(child, FactorizedLayer))  # its weight, and a tied bias (BERT's MLM head)
            for attribute in ("_tied_weights_keys", "all_tied_weights_keys") if factorized else ():
                mapping = getattr(module, attribute, None) or {}
                kept = {key: value for key, value in mapping.items()
                        if not key.startswith(factorized) and not value.startswith(factorized)}
                if kept != mapping:
                    setattr(module, attribute, kept)
                    log.info("%s: %s left its %s: factorized, no longer tied", type(module).__name__,
                             ", ".join(sorted(set(mapping) - set(kept))), attribute)
    for name, layer in model.named_modules():
        if isinstance(layer, FactorizedLayer) and (owner := tied_by_config(model, layer)):
            log.warning("%s: factorized, but %s ties it to its input embeddings by config.tie_word_embeddings "
                        "(transformers 4): its tie_weights() would hang the embedding's matrix on it as a stray "
                        "weight", name, owner)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` at the dotted path ``name`` (not the root)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def standardize_model(model: nn.Module) -> nn.Module:
    """Turns every factorized layer into a plain ``nn.Sequential`` of stock torch modules, in place.

    State-dict keys do not change, so the result saves, loads and traces with stock PyTorch. Returns the
    model (a new ``nn.Sequential`` when the model itself is a factorized layer). A factorized layer with hooks of
    its own is left as it is: a new container would silently drop them.
    """
    if isinstance(model, FactorizedLayer) and not _hook_problems(model):
        return nn.Sequential(*model.children()).train(model.training)
    plain: dict[int, nn.Sequential] = {}  # a layer shared by two names stays shared
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, FactorizedLayer) and name and not _hook_problems(module):
            if id(module) not in plain:
                plain[id(module)] = nn.Sequential(*module.children()).train(module.training)
            replace_module(model, name, plain[id(module)])
    return model


def state_problem(model: nn.Module) -> str | None:
    """The first entry of the model's state dict that is not a plain tensor, said with its module, or None: a
    quantized module's (``quantize_dynamic``'s packed parameters, a quantized weight) or what a module's
    ``get_extra_state`` returns. A run fingerprints the model's state, and safetensors files hold plain tensors
    only."""
    modules = dict(model.named_modules())
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            continue
        owner = key.rpartition(".")[0]
        while owner not in modules:  # the root's name, "", is always there
            owner = owner.rpartition(".")[0]
        kind = "a quantized tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        if key.rpartition(".")[2] == "_extra_state":
            what, instead = "extra state", "remove its get_extra_state while compressing, or keep that state apart"
        else:
            what, instead = "quantized state", "compress the float model, then quantize it"
        return (f"{describe_module(owner, modules[owner])} holds {what}: its state entry {key!r} is {kind}, not a "
                f"plain tensor, which a run can neither fingerprint nor save in a safetensors file; {instead}")
    return None


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule``, ``nn.DataParallel`` and
    ``DistributedDataParallel`` wrappers (through nested ones), or the model itself. Compression steps and saves work
    on that module: its layer names are the schedule's, without the wrapper's prefix (``_orig_mod.``, ``module.``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile: no wrapper without it
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def on_meta(model: nn.Module) -> str | None:
    """``"Model has 2 parameter(s) or buffer(s) on the meta device ('0.weight', '0.bias')"``, or None when it has
    none: a model built under ``torch.device('meta')`` has shapes but no values until its weights are loaded."""
    meta = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
            if tensor.is_meta]
    if not meta:
        return None
    return (f"{type(model).__name__} has {len(meta)} parameter(s) or buffer(s) on the meta device "
            f"({', '.join(map(repr, meta[:3]))}{', ...' if len(meta) > 3 else ''})")


def describe_module(name: str, module: nn.Module) -> str:
    """``'name' (Type)``, or ``the model (Type)`` for the root."""
    return f"{name!r} ({type(module).__qualname__})" if name else f"the model ({type(module).__qualname__})"


def _hook_name(hook) -> str:
    return getattr(hook, "__qualname__", type(hook).__qualname__)


#: Forward pre-hooks that recompute a module's weight from other tensors before each call.
_REPARAMETRIZING_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def _pre_hook_problem(hook) -> str:
    """What a forward pre-hook does that a layer built in its place would not, and how to remove the torch ones
    that recompute the weight."""
    if isinstance(hook, prune.BasePruningMethod):
        return ("it is pruned (torch.nn.utils.prune recomputes its weight from weight_orig and weight_mask before "
                "each call); call torch.nn.utils.prune.remove on it first")
    if isinstance(hook, WeightNorm):
        return ("it has weight_norm (a pre-hook recomputes its weight from weight_g and weight_v); call "
                "torch.nn.utils.remove_weight_norm on it first")
    if isinstance(hook, SpectralNorm):
        return ("it has spectral_norm (a pre-hook rescales its weight); call torch.nn.utils.remove_spectral_norm on "
                "it first")
    return f"it has a forward pre-hook ({_hook_name(hook)})"


def _hook_problems(module: nn.Module) -> list[str]:
    """What the module's own hooks do that a layer built in its place would not."""
    problems = [_pre_hook_problem(hook) for hook in module._forward_pre_hooks.values()]
    kinds = (("forward hook", module._forward_hooks), ("backward hook", module._backward_hooks),
             ("backward pre-hook", module._backward_pre_hooks))
    problems += [f"it has a {kind} ({_hook_name(hook)})" for kind, hooks in kinds for hook in hooks.values()]
    return problems


#: torch's registries of the hooks that run on every module, by the function that registers each kind.
_GLOBAL_HOOKS = (("register_module_forward_pre_hook", module_hooks._global_forward_pre_hooks),
                 ("register_module_forward_hook", module_hooks._global_forward_hooks),
                 ("register_module_full_backward_pre_hook", module_hooks._global_backward_pre_hooks),
                 ("register_module_full_backward_hook", module_hooks._global_backward_hooks))


def global_hooks() -> list[str]:
    """The hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` and kin),
    each named with the function that registered it: they run on every module call, so a rewrite that changes
    which modules run (a factor chain for a layer, a fold, a merge) changes what they see and do."""
    return [f"{_hook_name(hook)}, by torch.nn.modules.module.{register}"
            for register, hooks in _GLOBAL_HOOKS for hook in hooks.values()]


def _global_hook_problems() -> list[str]:
    """The hooks registered for every module, which would also run on each factor of a chain (a hook that scales
    every Linear's output would scale each Linear factor's, changing what the chain computes)."""
    return [f"a hook for every module is registered ({hook}), which would also run on each factor of its chain; "
            f"remove it while compressing" for hook in global_hooks()]


def _parameter_problems(module: nn.Module) -> list[str]:
    """What the module's weight and bias carry besides their values: hooks on the tensors themselves, and a link
    to whatever sets a weight or bias that is not a Parameter of the module's own (its owner, before each call)."""
    problems = [f"its {name} has a {kind} ({_hook_name(hook)})" for name, parameter in module._parameters.items()
                if parameter is not None
                for kind, hooks in (("gradient hook", parameter._backward_hooks),
                                    ("post-accumulate-grad hook", parameter._post_accumulate_grad_hooks))
                for hook in (hooks or {}).values()]
    reparametrized = parametrize.is_parametrized(module) or any(  # their own reason says where the weight comes from
        isinstance(hook, _REPARAMETRIZING_HOOKS) for hook in module._forward_pre_hooks.values())
    unowned = [] if reparametrized else [name for name in ("weight", "bias")
                                         if module._parameters.get(name) is None
                                         and getattr(module, name, None) is not None]
    problems += [f"its {name} is not a Parameter of its own (its owner may compute it and set it before each call, "
                 f"as weight drop and weight standardization do), so a layer built from its value of the moment "
                 f"would lose that link" for name in unowned]
    return problems


def _padding_problems(module: nn.Module) -> list[str]:
    """For a convolution with a non-zeros padding mode, a ``_reversed_padding_repeated_twice`` (what it pads with)
    other than the one torch's ``_ConvNd.__init__`` derives from ``padding``, which is all the adapter rebuilds
    from. Zero padding reads ``padding`` alone: segmentation code that sets a conv's padding and dilation after
    construction leaves the attribute stale, harmlessly."""
    if not isinstance(module, _ConvNd) or module.padding_mode == "zeros":
        return []
    expected = [pad for pair in reversed(padding_per_axis(module.padding, module.kernel_size, module.dilation))
                for pad in pair]
    actual = list(module._reversed_padding_repeated_twice)
    if actual == expected:
        return []
    return [f"its _reversed_padding_repeated_twice is {actual} where its padding {module.padding!r} gives "
            f"{expected}: it pads other than its padding says, which is all a rebuilt layer would know"]


def why_not_replaceable(module: nn.Module, base: type[nn.Module], *, loading: bool = False) -> str | None:
    """Why ``module`` may not compute what a stock ``base`` with its weights computes, or None when it does.

    ``base`` is a class in the module's MRO. The module's class and every class between it and ``base`` must
    define none of :data:`COMPUTATION_ATTRIBUTES`, the instance must not override a method, and the module must
    carry no parametrization and no hooks of its own: a layer built in its place would silently drop them. A
    forward or backward hook can change what the module computes or read its weight (a hook moved to the
    factorized layer would be given a module without ``weight``); pruning, weight_norm, spectral_norm and
    parametrizations recompute the weight from other tensors at each call, which factorizing the weight of the
    moment would freeze. Remove them, compress, and add them to the new layer where that makes sense. The same
    holds for hooks on the weight or bias tensors, and for a weight or bias that is not a Parameter of the module
    (its owner sets it before each call: the factors would be cut off from what it is computed from), and for
    a convolution whose instance pads other than its ``padding`` says. Nor may any module be replaced while hooks
    for every module are registered (``torch.nn.modules.module.register_module_forward_hook`` and kin): they would
    run on each factor of the chain as well; except ``loading`` a saved model, which rebuilds the chain that was
    compressed without them: they then run on it as they would had they been registered after the load.
    """
    problems = []
    if parametrize.is_parametrized(module):  # its generated class also defines the parametrized attributes
        names = list(module.parametrizations)
        problems.append(f"its {', '.join(names)} {'is' if len(names) == 1 else 'are'} parametrized "
                        f"(torch.nn.utils.parametrize); call torch.nn.utils.parametrize.remove_parametrizations "
                        f"on it first")
    else:
        mro = type(module).__mro__

        def named(klass: type) -> str:  # torch.ao.nn.qat's Linear is no nn.Linear: the full name tells them apart
            same = klass is not base and klass.__qualname__ == base.__qualname__
            return f"{klass.__module__}.{klass.__qualname__}" if same else klass.__qualname__

        defined = [f"{named(klass)}.{attribute}" for klass in mro[:mro.index(base)]
                   for attribute in COMPUTATION_ATTRIBUTES if attribute in vars(klass)]
        defined += [f"the instance's own {attribute}" for attribute in COMPUTATION_ATTRIBUTES
                    if attribute in vars(module) and callable(vars(module)[attribute])]
        if defined:
            problems.append(f"{named(type(module))} defines {', '.join(defined)}, so it may compute something "
                            f"else (list the class in an adapter's module_types if it computes exactly what "
                            f"{base.__qualname__} does)")
    problems += (_hook_problems(module) + ([] if loading else _global_hook_problems()) + _parameter_problems(module)
                 + _padding_problems(module))
    return "; ".join(problems) if problems else None


def why_not_recompressible(layer: FactorizedLayer) -> str | None:
    """Why re-compressing a factorized layer may change what it computes, or None when it may not.

    The layer is rebuilt from its factors' weights, so what was put on it or on a factor since it was built (a
    hook, pruning or a parametrization added during fine-tuning) would be dropped, as for a plain layer (see
    :func:`why_not_replaceable`).
    """
    if global_hooks := _global_hook_problems():  # not repeated for each factor below
        return f"re-compressing it builds a new chain, but {'; '.join(global_hooks)}"
    problems = _hook_problems(layer)
    problems += [f"the instance has its own {attribute}" for attribute in COMPUTATION_ATTRIBUTES
                 if callable(vars(layer).get(attribute))]
    for index, factor in enumerate(layer):
        if (reason := why_not_replaceable(factor, type(factor))) is not None:
            problems.append(f"its factor {index} ({type(factor).__qualname__}): {reason}")
    return f"re-compressing rebuilds it from its factors' weights, but {'; '.join(problems)}" if problems else None


def build_on_meta(adapter: LayerAdapter, spec: LayerSpec, layouts: Sequence[FactorLayout]) -> list[nn.Module]:
    """The modules ``adapter`` builds for ``layouts`` on the meta device: their state-dict keys and shapes, with
    no weights allocated (the layouts may come from a file not yet checked)."""
    meta = torch.empty(0, device="meta")
    placeholders = [Factor(layout, meta.new_empty(layout.weight_shape),
                           meta.new_empty(layout.out_channels) if layout.bias else None) for layout in layouts]
    return adapter.build(spec, placeholders, meta)


def factor_mismatch(layer: FactorizedLayer, adapter: LayerAdapter) -> str | None:
    """How the factors of ``layer`` differ from the modules ``adapter`` builds from its layouts (their number, their
    state-dict keys and shapes), or None. Loading rebuilds a saved layer from its layouts and re-compressing costs it
    by them, so a factor narrowed by hand, pruned or parametrized since the layer was built must not be taken for
    what its layouts say."""
    built = build_on_meta(adapter, layer.spec, layer.layouts)
    if len(built) != len(layer):
        return f"it has {len(layer)} factors, its layouts {len(built)} (it was changed after it was built)"
    for index, (factor, expected) in enumerate(zip(layer, built)):
        have = {key: tuple(value.shape) for key, value in factor.state_dict().items()}
        want = {key: tuple(value.shape) for key, value in expected.state_dict().items()}
        if have == want:
            continue
        what = f"its factor {index} ({type(factor).__qualname__})"
        if (reason := why_not_replaceable(factor, type(factor))) is not None:
            return f"{what}: {reason}"
        key = next(key for key in (*want, *have) if have.get(key) != want.get(key))
        held = f"holds {key} of shape {have[key]}" if key in have else f"holds no {key}"
        wanted = f"its layout gives {key} of shape {want[key]}" if key in want else f"its layout gives no {key}"
        return (f"{what} {held} where {wanted}: it was changed after it was built, so its layouts and ranks no "
                f"longer describe it; put back factors of its layouts' shapes, or build a new FactorizedLayer with "
                f"layouts that fit")
    return None


def owner_read_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose owner's forward reads their weights directly (known from the owner's type, see
    :data:`OWNERS_READING_CHILD_WEIGHTS`), by canonical name, with why they cannot be replaced."""
    reasons: dict[int, str] = {}
    for name, owner in model.named_modules():
        for owner_type, children in OWNERS_READING_CHILD_WEIGHTS.items():
            if isinstance(owner, owner_type):
                for child in children:
                    if isinstance(owner._modules.get(child), nn.Module):
                        reasons.setdefault(id(owner._modules[child]),
                                           f"its owner {describe_module(name, owner)} reads its weight directly "
                                           f"instead of calling it, so a factorized layer would break the owner")
    return {name: reasons[id(module)] for name, module in model.named_modules() if id(module) in reasons}


def layer_aliases(model: nn.Module) -> dict[str, str]:
    """Every name under which a module of ``model`` is reachable, mapped to its canonical name: the one
    ``model.named_modules()`` gives it (the first in that order; a module shared by two parents has two names)."""
    canonical: dict[int, str] = {}
    return {name: canonical.setdefault(id(module), name)
            for name, module in model.named_modules(remove_duplicate=False)}


def by_canonical_name(entries: Mapping[str, T], model: nn.Module) -> tuple[dict[str, T], list[tuple[str, str]]]:
    """``entries`` keyed by layer name, re-keyed by canonical name in the same order (see :func:`layer_aliases`),
    and the pairs of keys that name one module (the first key of such a pair is kept). Keys that name no module
    are kept as they are."""
    aliases = layer_aliases(model)
    canonical: dict[str, T] = {}
    first_key: dict[str, str] = {}
    clashes = []
    for key, value in entries.items():
        name = aliases.get(key, key)
        if name in first_key:
            clashes.append((first_key[name], key))
            continue
        if name != key:
            log.info("layer %r is the module also named %r: using that name", key, name)
        first_key[name] = key
        canonical[name] = value
    return canonical, clashes


@contextmanager
def swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """The model with the modules at these paths replaced, put back afterwards (also on error)."""
    originals = {path: model.get_submodule(path) for path in replacements}
    try:
        for path, new in replacements.items():
            replace_module(model, path, new)
        yield model
    finally:
        for path, module in originals.items():
            replace_module(model, path, module)


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The modules in eval mode (timing must not update BatchNorm statistics), each one's own mode put back after."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def deep_copy(model: M, who: str, instead: str) -> M:
    """A deep copy of ``model``, or one ConfigError saying why it cannot be copied and what to do: ``who`` says who
    copies it and when, ``instead`` the way around the copy."""
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:  # the user's model: one clear line, the cause chained
        computed = [(name, module, attribute) for name, module in model.named_modules()
                    for attribute, value in {**vars(module), **module._buffers}.items()
                    if isinstance(value, torch.Tensor) and not value.is_leaf]
        holders = {name: module for name, module, _ in computed}
        causes = [f"{describe_module(name, module)}: {_pre_hook_problem(hook)}" for name, module in holders.items()
                  for hook in module._forward_pre_hooks.values() if isinstance(hook, _REPARAMETRIZING_HOOKS)]
        cause = "; ".join(causes) or ("a forward pre-hook computes it before each call, as the hook-based "
                                      "torch.nn.utils.weight_norm and torch.nn.utils.prune do: remove it")
        names = [f"{name}.{attribute}" if name else attribute for name, _, attribute in computed]
        why = (f"{', '.join(map(repr, names[:3]))} {'is a tensor' if len(names) == 1 else 'are tensors'} computed "
               f"from other tensors (not a leaf), which torch cannot deep-copy; {cause}" if computed
               else f"copy.deepcopy raised {type(exc).__name__}: {one_line(str(exc))}")
        raise ConfigError(f"{type(model).__name__} cannot be deep-copied ({who}): {why}; {instead}") from exc
    _share_storage_alike(model, copied)
    return copied


def _share_storage_alike(model: nn.Module, copied: nn.Module) -> None:
    """Gives the copy's parameters and buffers the storage sharing of the model's: ``copy.deepcopy`` clones each
    Parameter's data on its own, so two Parameters over one tensor's memory (tied in training: a step on one
    changes the other) came out independent, and the copy no longer looked tied to :func:`tied_parameters`."""
    def tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]

    entries, copies = tensors(model), dict(tensors(copied))
    storages: dict[tuple, torch.UntypedStorage] = {}
    for (name, tensor), others in zip(entries, memory_neighbours([tensor for _, tensor in entries])):
        if name not in copies or all(entries[j][1] is tensor for j in others):
            continue  # shares no memory with another tensor (deepcopy keeps one tensor held twice as one)
        key = _memory_span(tensor)[0]
        if key not in storages:  # cloned once per storage, however many tensors lie over it
            storages[key] = tensor.untyped_storage().clone()
        storage = storages[key]
        with torch.no_grad():
            copies[name].set_(storage, tensor.storage_offset(), tensor.shape, tensor.stride())
