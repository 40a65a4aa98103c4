"""Per-layer model statistics: geometry, shapes, parameters and MACs of the layers musco-core can compress."""
from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .components import LayerSpec
from .errors import ConfigError, short_repr
from .surgery import FactorizedLayer, describe_module, owner_read_layers, unwrapped, why_not_recompressible
from .timing import call_model, first_input, tensors_in


#: Torch's convolution and linear layers (transposed and lazy ones included): one that no adapter handles is
#: listed in :attr:`ModelStats.excluded` with the reason, as a layer a user would expect compressed. Other modules
#: (norms, activations, embeddings, containers) are no layers to compress and are passed over.
LAYER_KINDS = (_ConvNd, nn.Linear, nn.Bilinear)
#: The names of torch's layer classes of :data:`LAYER_KINDS`: what a scripted layer's ``original_name`` is.
_LAYER_KIND_NAMES = frozenset(name for name, klass in vars(nn).items()
                              if isinstance(klass, type) and issubclass(klass, LAYER_KINDS))


@attrs.frozen
class LayerStats:
    """One compressible layer as seen on an example input (shapes include the batch)."""

    name: str
    type: type
    spec: LayerSpec
    #: The first call's shapes (a layer the forward calls more than once has more in :attr:`calls`).
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    #: Every call on the example input as ``(input shape, output shape, number of calls)``, one entry per pair of
    #: shapes, the first call's first: a module the forward calls more than once (shared by two blocks, run in a
    #: loop, applied at each level of a feature pyramid) costs its MACs at every call. Defaults to one call at
    #: :attr:`input_shape` and :attr:`output_shape`.
    calls: tuple[tuple[tuple[int, ...] | None, tuple[int, ...], int], ...] = attrs.field(kw_only=True)

    @calls.default
    def _one_call(self) -> tuple[tuple[tuple[int, ...] | None, tuple[int, ...], int], ...]:
        return () if self.output_shape is None else ((self.input_shape, self.output_shape, 1),)

    @property
    def params(self) -> int:
        return self.spec.n_weights + (self.spec.out_channels if self.spec.has_bias else 0)

    @property
    def input_calls(self) -> tuple[tuple[tuple[int, ...], int], ...] | None:
        """Each input shape the layer runs at with its number of calls, as :func:`~musco_core.factors.chain_cost`
        counts MACs; None when unknown."""
        if not self.calls or any(input_shape is None for input_shape, _, _ in self.calls):
            return None
        return tuple((input_shape, count) for input_shape, _, count in self.calls)

    @property
    def macs(self) -> int | None:
        """Multiply-accumulates on the example input, every call counted: every output value costs one weight row."""
        if not self.calls:
            return None
        channel_axis = -(self.spec.spatial_dims + 1)  # also where a conv's output is unbatched, (C, H, W)
        # the output's size without its channel axis: not its numel divided by the channel count, which may be 0
        positions = sum(count * math.prod(output_shape[:len(output_shape) + channel_axis])
                        * math.prod(output_shape[len(output_shape) + channel_axis + 1:])
                        for _, output_shape, count in self.calls)
        return positions * self.spec.n_weights


@attrs.frozen
class ModelStats:
    """Statistics of every layer that a registered adapter can read, in model order."""

    layers: dict[str, LayerStats]
    #: FLOPs of the whole forward pass on the example input (every op, functional calls included), counted by
    #: ``torch.utils.flop_counter.FlopCounterMode``; None unless asked for with ``count_flops=True`` (counting slows
    #: the pass down). ``total_macs`` counts the compressible layers without it.
    total_flops: int | None = None
    #: Layers that must not be replaced, with why, in model order: of a type an adapter lists, a subclass or
    #: instance with a computation of its own, hooks, weights that their owner reads directly, or (with an
    #: example input) a layer the example input never reaches or gives an empty output; a layer of
    #: :data:`LAYER_KINDS` that no adapter handles (a ``ConvTranspose2d``), or that is TorchScript. Generated
    #: schedules leave them out; a schedule that names one is refused.
    excluded: dict[str, str] = attrs.field(factory=dict)
    #: The layers whose output the model returns on the example input, as it is or as a view of it (a classifier's
    #: logits, a language model's head), in model order; None when unknown (no example input, FlopCo statistics).
    output_layers: tuple[str, ...] | None = None
    #: The names of :attr:`layers` and :attr:`excluded` together, as made, in model order: how the two interleave (a
    #: generated schedule lists the layers it leaves out so, see :meth:`in_model_order`). Statistics made by hand
    #: default to their layers, then the excluded ones.
    order: tuple[str, ...] = attrs.field(kw_only=True)

    @order.default
    def _layers_then_excluded(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.layers, *self.excluded]))

    def in_model_order(self, names: Iterable[str]) -> list[str]:
        """``names`` sorted as :attr:`order` has them; those it lacks (statistics edited since) last, as given."""
        position = {name: index for index, name in enumerate(self.order)}
        return sorted(names, key=lambda name: position.get(name, len(position)))

    @property
    def ltypes(self) -> dict[str, dict[str, Any]]:
        """The FlopCo-style ``{name: {'type', 'kernel_size', 'groups'}}`` view the original API read."""
        return {name: {"type": s.type, "kernel_size": s.spec.kernel_size, "groups": s.spec.groups}
                for name, s in self.layers.items()}

    @property
    def total_macs(self) -> int | None:
        macs = [s.macs for s in self.layers.values()]
        return None if any(m is None for m in macs) else sum(macs)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.layers.values())

    @classmethod
    def from_model(cls, model: nn.Module, registry, example_input: Any = None, *,
                   count_flops: bool = False) -> ModelStats:
        """Reads every adaptable layer; with ``example_input`` also records shapes and MACs, and with
        ``count_flops=True`` the FLOPs of the whole forward pass (``total_flops``).

        ``example_input`` is called as ``model(x)``, ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping.

        A factorized layer counts as the layer it replaced (its original geometry), so statistics of a model
        that is part-way through a multi-stage run match those of the uncompressed model; one with hooks or
        parametrizations added since it was built is excluded (see :func:`~musco_core.surgery.why_not_recompressible`).
        The forward pass runs in eval mode under ``no_grad`` and restores every module's mode afterwards, so
        BatchNorm statistics and the model's own hooks are untouched. Layers that must not be replaced go to
        :attr:`excluded` with the reason, among them (with an example input) those whose forward did not run on
        it or gave an empty output (an empty batch), and those whose weights other code used outside their own call,
        and convolution and linear layers no adapter handles.

        A model wrapped by ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` is read as the
        module inside, whose layer names the Compressor's schedule and steps use (no ``_orig_mod.`` or
        ``module.`` prefix).
        """
        model = unwrapped(model)
        readable = {}
        excluded = owner_read_layers(model)
        factorized: list[str] = []
        for name, module in model.named_modules():
            if not name or name in excluded or any(name.startswith(prefix + ".") for prefix in factorized):
                continue
            if isinstance(module, FactorizedLayer):
                factorized.append(name)
                if (reason := why_not_recompressible(module)) is not None:
                    excluded[name] = reason
                else:
                    readable[name] = (module, module.spec)
            elif (match := registry.match(module)) is not None:
                if match.adapter is None:
                    excluded[name] = match.reason
                else:
                    readable[name] = (module, registry.adapters.get(match.adapter).read(module)[0])
            elif isinstance(module, LAYER_KINDS):
                excluded[name] = registry.unsupported_reason(module)
            elif isinstance(module, torch.jit.ScriptModule) and module.original_name in _LAYER_KIND_NAMES:
                excluded[name] = (f"it is a TorchScript {module.original_name} (torch.jit.script or trace): "
                                  f"compiled code, which no adapter reads; compress the Python module, then script "
                                  f"or trace it")
        shapes: dict[str, dict[tuple[tuple[int, ...], tuple[int, ...]], int]] = {}
        total_flops = output_layers = None
        if example_input is not None:
            shapes, total_flops, not_run, returned = _run_example(
                model, {name: m for name, (m, _) in readable.items()}, example_input, count_flops)
            excluded.update(not_run)
            for name, calls in shapes.items():
                if name in readable and all(0 in output for _, output in calls):  # an empty batch, say: 0 MACs
                    excluded[name] = (f"its output on the example input has no values (shape {next(iter(calls))[1]}): "
                                      f"it runs no multiply-accumulates there that a factorization could reduce, so "
                                      f"every step would keep it; give an example input with at least one item, or "
                                      f"leave it out")
            readable = {name: entry for name, entry in readable.items() if name not in excluded}
            output_layers = tuple(name for name in readable if name in returned)
        order = tuple(name for name, _ in model.named_modules() if name in readable or name in excluded)
        return cls({name: LayerStats(name, type(module), spec, *next(iter(shapes.get(name, {})), (None, None)),
                                     calls=tuple((*pair, count) for pair, count in shapes.get(name, {}).items()))
                    for name, (module, spec) in readable.items()}, total_flops,
                   {name: excluded[name] for name in order if name in excluded}, output_layers, order=order)

    @classmethod
    def from_flopco(cls, flopco: Any) -> ModelStats:
        """Converts a ``flopco.FlopCo`` object (the original's statistics) for its Conv2d and Linear layers; a layer
        its example input never reached (no shapes recorded) is excluded."""
        layers, excluded = {}, {}
        for name, info in flopco.ltypes.items():
            if not flopco.input_shapes.get(name) or not flopco.output_shapes.get(name):
                excluded[name] = ("FlopCo's example input never reaches it (no shapes recorded), so it cannot be "
                                  "checked; leave it out or give an example input that reaches it")
                continue
            calls: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
            for pair in zip(map(tuple, flopco.input_shapes[name]), map(tuple, flopco.output_shapes[name])):
                calls[pair] = calls.get(pair, 0) + 1  # FlopCo records every call
            input_shape, output_shape = next(iter(calls))
            if issubclass(info["type"], nn.Linear):
                spec = LayerSpec("linear", output_shape[-1], input_shape[-1])
            else:
                kernel = tuple(info["kernel_size"])
                spec = LayerSpec("conv", output_shape[1], input_shape[1], kernel, (1,) * len(kernel),
                                 (0,) * len(kernel), (1,) * len(kernel), info.get("groups", 1))
            layers[name] = LayerStats(name, info["type"], spec, input_shape, output_shape,
                                      calls=tuple((*pair, count) for pair, count in calls.items()))
        return cls(layers, excluded=excluded, order=tuple(flopco.ltypes))


class _LayerWatch(TorchDispatchMode):
    """Watches one forward pass: each layer's input and output shapes at each of its calls, and every op that uses a
    layer's parameters outside the layer's own call (an owner passing them to a fused op, or reading them).

    Module hooks are registered globally, not on the modules: torch's fused fast paths (``nn.TransformerEncoderLayer``
    in eval) are skipped when a module has hooks of its own, and those paths are where owners read their
    children's weights. A parameter used by the module it belongs to directly (a tied weight, e.g. an embedding
    sharing the output layer's matrix) is not a foreign use.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps __torch_dispatch__ in dynamo.disable by default, which imports torch._dynamo (seconds on a
        # cold start) on the first op; the watch never runs under torch.compile, so there is nothing to disable.
        return False

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.names = {id(module): name for name, module in model.named_modules()}
        self.layers = {id(module): name for name, module in layers.items()}
        self.layer_modules = {id(module): module for module in layers.values()}  # once each, also under two names
        self.users: dict[int, list[str]] = {}  # parameter id -> the layers holding it
        for name, module in layers.items():
            if not isinstance(module, FactorizedLayer):
                for parameter in module.parameters(recurse=False):
                    self.users.setdefault(id(parameter), []).append(name)
        self.shapes: dict[str, dict[tuple[tuple[int, ...], tuple[int, ...]], int]] = {}  # (input, output): calls
        self.called: set[str] = set()
        self.foreign: dict[str, str] = {}  # layer -> the module whose code used its parameters
        self.running: list[nn.Module] = []
        self.outputs: dict[str, list[weakref.ref]] = {}  # weak: a freed output never matches a returned tensor
        self.calls: list[tuple[str, tuple[int, ...]]] = []  # (layer, output shape) in the order the layers ran

    def __enter__(self) -> _LayerWatch:
        # A layer's call is recorded by a hook of its own, with its keyword arguments (``self.fc(input=x)``; torch's
        # global hooks with keyword arguments leave a flag behind when removed); the stack of running modules is
        # kept by a hook that also runs when a module raises, which torch calls without them.
        self.handles = [register_module_forward_pre_hook(self._enter_module),
                        register_module_forward_hook(self._leave_module, always_call=True),
                        *(module.register_forward_hook(self._record_call, with_kwargs=True)
                          for module in self.layer_modules.values())]
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            for handle in self.handles:
                handle.remove()

    def _enter_module(self, module: nn.Module, inputs: tuple) -> None:
        if id(module) in self.names:
            self.running.append(module)

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        name = self.layers.get(id(module))
        x = None if name is None else first_input(module, args, kwargs)
        if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor):
            calls, shapes = self.shapes.setdefault(name, {}), (tuple(x.shape), tuple(output.shape))
            calls[shapes] = calls.get(shapes, 0) + 1
            self.calls.append((name, tuple(output.shape)))
            self.outputs.setdefault(name, []).append(weakref.ref(_root(output)))

    def _leave_module(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if id(module) not in self.names:
            return
        self.running.pop()
        name = self.layers.get(id(module))
        if name is not None:
            self.called.add(name)

    def output_layers(self, result: Any) -> set[str]:
        """The layers whose output tensor the model returned (``result``), as it is or as a view of it.

        When there is none, a model that ends in an elementwise function (``log_softmax(fc(x))``) is caught by
        shape: the last layer to run is taken when its output is ``(batch, n)`` and a returned tensor has that shape.
        """
        returned = tensors_in(result)
        roots = {id(_root(t)) for t in returned}
        found = {name for name, refs in self.outputs.items()
                 if any((t := ref()) is not None and id(t) in roots for ref in refs)}
        if not found and self.calls:
            last, shape = self.calls[-1]
            if len(shape) == 2 and any(tuple(t.shape) == shape for t in returned):
                found = {last}
        return found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for leaf in tree_leaves((args, kwargs)):
            for name in self.users.get(id(leaf), ()):
                owner = self.running[-1] if self.running else None
                if owner is None or not any(p is leaf for p in owner.parameters(recurse=False)):
                    self.foreign.setdefault(name, "code outside the model's modules" if owner is None
                                            else describe_module(self.names[id(owner)], owner))
        return func(*args, **(kwargs or {}))

    def not_run(self) -> dict[str, str]:
        """Why each watched layer that did not run as a layer on the example input cannot be replaced."""
        reasons = {name: f"its weights are used outside its own call by {owner} (passed to an op directly), so "
                         f"a factorized layer, which has no single weight, would break that code"
                   for name, owner in self.foreign.items()}
        for name in self.layers.values():
            if name not in self.called and name not in reasons:
                reasons[name] = ("the example input never reaches it (its forward did not run), so it cannot be "
                                 "checked; leave it out or give an example input that reaches it")
        return reasons


#: :func:`describe_input` of no example input.
NO_EXAMPLE = "none"


def describe_input(example_input: Any) -> str:
    """The dtypes and shapes of an example input, which MAC counts depend on: ``float32 (1, 3, 8, 8)``, tuples and
    mappings of them, other values by a short repr; :data:`NO_EXAMPLE` for None. Unbounded, see callers."""
    if example_input is None:
        return NO_EXAMPLE
    if isinstance(example_input, torch.Tensor):
        return f"{str(example_input.dtype).removeprefix('torch.')} {tuple(example_input.shape)}"
    if isinstance(example_input, Mapping):
        return "{" + ", ".join(f"{key}: {describe_input(value)}" for key, value in example_input.items()) + "}"
    if isinstance(example_input, (tuple, list)):
        return "(" + ", ".join(describe_input(value) for value in example_input) + ")"
    return short_repr(example_input)


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken of (the tensor itself when it is no view)."""
    return tensor if tensor._base is None else tensor._base


@contextlib.contextmanager
def parameters_kept(model: nn.Module, run: str) -> Iterator[None]:
    """One ConfigError when the model's forward, run by musco-core in the block (``run`` says on what), changed a
    parameter of it in place, as RWKV divides some of its weights on its first call in eval mode (and keeps the
    flag that says so out of its state dict): the changed values would be factorized and saved, and a freshly built
    model loading them would change them again. Found by the parameters' version counters; a lazy module's
    parameters, which its first call fills in, are not counted, nor inference tensors, which have no counter.
    Checked too when the run raises: a change is its likelier cause (RWKV also halves its hidden state between the
    blocks it rescaled, which blockwise compression's check of the blocks' inputs refuses), chained to it."""
    versions = {name: parameter._version for name, parameter in model.named_parameters()
                if not isinstance(parameter, nn.parameter.UninitializedParameter) and not parameter.is_inference()}
    try:
        yield
    except Exception as exc:
        _refuse_changed(model, versions, run, exc)
        raise
    _refuse_changed(model, versions, run, None)


def _refuse_changed(model: nn.Module, versions: Mapping[str, int], run: str, cause: Exception | None) -> None:
    """The ConfigError of :func:`parameters_kept` (raised from ``cause``) when a parameter's version changed."""
    changed = [name for name, parameter in model.named_parameters()
               if name in versions and parameter._version != versions[name]]
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"{type(model).__name__} changed its parameter{'s' if len(changed) > 1 else ''} {shown} "
                          f"in place when musco-core ran it on {run}: the weights compressed and saved would not "
                          f"be those a freshly built model starts from; keep the forward from changing them (for "
                          f"RWKV, set config.rescale_every = 0: it rescales to keep float16 from overflowing)"
                          ) from cause


def call_example(model: nn.Module, example_input: Any) -> Any:
    """``model`` on the example input (:func:`~musco_core.timing.call_model`); a ConfigError in one line when the
    model's forward raises or changes the model's parameters (see :func:`parameters_kept`)."""
    with parameters_kept(model, "the example input"):
        try:
            return call_model(model, example_input)
        except Exception as exc:  # the user's model or input: one clear line, the cause chained
            described, message = describe_input(example_input), str(exc).strip()
            first_line = message.splitlines()[0] if message else ""
            raise ConfigError(f"example input of {_bounded(described, 200)}: the model's forward raised "
                              f"{type(exc).__name__}: {_bounded(first_line, 300)}") from exc


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _run_example(model: nn.Module, modules: Mapping[str, nn.Module], example_input: Any, count_flops: bool):
    """One forward pass recording each layer's calls (input/output shapes: count), if asked the FLOPs of the whole pass, why each
    layer that did not run as a layer cannot be replaced, and the layers whose output the model returns."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with torch.no_grad(), counter, _LayerWatch(model, modules) as watch:
            result = call_example(model, example_input)
            returned = watch.output_layers(result)
    finally:
        for module, training in modes.items():
            module.training = training
    total_flops = counter.get_total_flops() if count_flops else None
    return watch.shapes, total_flops, watch.not_run(), returned


#: The geometry a FlopCo object tells of a layer (:meth:`ModelStats.from_flopco` leaves the rest at defaults).
_FLOPCO_GEOMETRY = ("out_channels", "in_channels", "kernel_size", "groups")
#: How many differing layers a refusal of statistics names.
_DIFFERENCES_SHOWN = 3


def as_model_stats(stats: Any, model: nn.Module | None, registry, example_input: Any = None) -> ModelStats:
    """Our statistics from whatever the user passed: ModelStats, a FlopCo object, or nothing.

    Statistics made elsewhere must describe the model when it is given: a ConfigError names the first layers they
    have that the model does not, or has with another geometry or (where both know it) other input and output
    shapes, since the report would state their MACs. Accepted ones get the exclusions (see
    :attr:`ModelStats.excluded`) of the model, found on the example input when there is one, so that statistics
    passed in never turn the run-time checks off.
    """
    if stats is None:
        return ModelStats.from_model(model, registry, example_input)
    if isinstance(stats, ModelStats):
        given, geometry = stats, tuple(field.name for field in attrs.fields(LayerSpec))
    elif hasattr(stats, "ltypes") and hasattr(stats, "input_shapes"):
        given, geometry = ModelStats.from_flopco(stats), _FLOPCO_GEOMETRY
    else:
        raise TypeError(f"model_stats must be a musco_core.ModelStats or a flopco.FlopCo object, "
                        f"got {type(stats).__name__}")
    if model is None:
        return given
    own = ModelStats.from_model(model, registry, example_input)
    differences = _differences(given, own, dict(model.named_modules()), geometry)
    if differences:
        more = len(differences) - _DIFFERENCES_SHOWN
        raise ConfigError("model_stats do not describe the model: "
                          + "; ".join(differences[:_DIFFERENCES_SHOWN]) + (f"; and {more} more" if more > 0 else "")
                          + "; pass the model's own statistics (ModelStats.from_model(model, registry, "
                            "example_input)), or none to have them computed")
    excluded = {**own.excluded, **given.excluded}
    order = own.in_model_order(given.in_model_order(dict.fromkeys([*given.layers, *excluded])))
    return attrs.evolve(given, excluded={name: excluded[name] for name in order if name in excluded},
                        order=tuple(order))


def _differences(given: ModelStats, own: ModelStats, modules: Mapping[str, nn.Module], geometry: tuple[str, ...]
                 ) -> list[str]:
    """How each layer of ``given`` differs from the model's ``own`` statistics: absent, or the ``geometry`` fields
    of its spec and its shapes (where both know them) that differ, one line per layer in ``given``'s order."""
    lines = []
    for name, theirs in given.layers.items():
        if name in own.excluded:
            continue  # the model's own statistics leave it out: it is never compressed
        ours = own.layers.get(name)
        if ours is None:
            lines.append(f"layer {name!r}: " + ("no such module in the model" if name not in modules else
                                                f"a {type(modules[name]).__qualname__} in the model, which no "
                                                f"adapter reads"))
            continue
        if "adapter" in geometry and theirs.spec.adapter != ours.spec.adapter:  # another kind: that says it all
            fields = [("adapter", theirs.spec.adapter, ours.spec.adapter)]
        else:
            fields = [(field, getattr(theirs.spec, field), getattr(ours.spec, field)) for field in geometry]
            fields += [(shape, getattr(theirs, shape), getattr(ours, shape))
                       for shape in ("input_shape", "output_shape", "calls")
                       if getattr(theirs, shape) and getattr(ours, shape)]  # where both know them
        changed = [f"{field} {value} where the model has {actual}"
                   for field, value, actual in fields if value != actual]
        if changed:
            lines.append(f"layer {name!r}: {', '.join(changed)}")
    return lines
