"""The plugin contract, enforced before a factorized layer replaces a layer.

A decomposition's factor layout, its factor weights and the adapter that builds modules from them must give a
chain that computes what the layer computes, with fewer weights. First the adapter, on which every figure rests:
:func:`adapter_problem` checks that it rebuilds the layer as it read it into modules that compute what the layer
computes, on a random probe input of the layer's dtype and device (a ``read`` that misses the module's own
computation would otherwise give a chain, and a reported error, for another layer), and that it built the new
layer in the layer's dtype and device. Then three checks of the chain, cheapest first:

* :func:`layout_problem`: the layouts chain the layer's channels, every spatial axis is owned (its stride, padding
  and dilation applied) by exactly one factor, a factor convolves only an axis it owns and with the layer's kernel
  size there, and the layer's bias sits on the last factor.
* :func:`output_shape_problem`: the new layer gives exactly the layer's output shape on a probe input of the
  layer's input shape (batch 1; a small synthetic size when the input shape is unknown).
* :func:`full_rank_problem`: a decomposer that declares ``exact_at_max_rank`` reproduces, at its
  :meth:`~musco_core.components.Decomposer.max_ranks`, a miniature layer of the same geometry (kernel, stride,
  padding, dilation, padding mode, bias; a few channels, one group). The verdict is cached per decomposer,
  adapter, geometry and parameters for the process. Decompositions that are not exact at their largest rank by
  design (CP at the largest rank that does not grow the layer) do not declare it and are not checked.

:func:`check_factorized` runs them all and raises a :class:`~musco_core.errors.CompressionError` naming the layer
and the adapter, or the decomposition, with the plugins that registered them.

A layer that keeps the contract can still be used by its model in ways a replacement cannot honour: called through
a plain list the swap does not reach, its type or attributes read by its parent. :func:`unfaithful_swaps` runs the
whole model with a step's replacements swapped in and finds those layers before the step commits.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn

from .components import Decomposer, Factor, FactorLayout, InputStats, LayerAdapter, LayerSpec, WeightSource
from .errors import CompressionError, ConfigError, one_line
from .factors import layer_layout
from .surgery import FactorizedLayer, evaluating, swapped
from .timing import call_model, fresh_copy, tensors_in

log = logging.getLogger(__name__)

#: (in, out) channels of the miniature layer: small, and unequal so that a transposed factor shows.
MINIATURE_CHANNELS = (4, 6)
#: Largest relative output error of an exact chain on the miniature layer (float64 weights; a decomposer that
#: computes in float32 stays well below it).
FULL_RANK_TOLERANCE = 1e-5

#: Largest relative difference between the model's output with replacements swapped in and its output with each
#: replaced layer's output computed by its replacement: the same arithmetic, so only float reordering may differ.
SWAP_TOLERANCE = 1e-4

_full_rank_verdicts: dict[tuple, str | None] = {}


def check_factorized(name: str, original: nn.Module, new: FactorizedLayer, read: Sequence[Factor],
                     decomposer: Decomposer, registry, input_shape: Sequence[int] | None = None,
                     params: Any = None) -> None:
    """Raises CompressionError unless ``new`` keeps the contract as a replacement of ``original``.

    ``read`` is the layer as its adapter read it: one factor of the layer's own layout (its weight and bias), or
    the factors of a factorized layer. ``input_shape`` is the layer's input on the example input (batch included),
    None when unknown; ``params`` the decomposer's parameters of this run (its defaults when None).
    """
    spec = new.spec
    adapter = registry.adapters.get(spec.adapter)
    params = decomposer.Params() if params is None else params
    like = read[0].weight
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(_probe_shape(spec, input_shape), generator=generator, dtype=torch.float64).to(like)
    with torch.no_grad():
        expected = original(probe)
    problem = adapter_problem(adapter, spec, read, new, probe, expected)
    if problem is not None:
        raise CompressionError(f"layer {name!r}: {registry.adapters.describe(spec.adapter)} {problem}")
    problem = (layout_problem(spec, new.layouts) or output_shape_problem(new, probe, expected)
               or full_rank_problem(decomposer, adapter, spec, params))
    if problem is not None:
        made_by = registry.decompositions.entries[decomposer.name].source
        built_by = registry.adapters.entries[spec.adapter].source
        raise CompressionError(
            f"layer {name!r}: the {decomposer.name} chain (decomposition {decomposer.name!r} of plugin "
            f"{made_by.name!r} ({made_by.distribution}), built by layer adapter {spec.adapter!r} of plugin "
            f"{built_by.name!r}) {problem}")


def rounding_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference between two computations of one layer's output in ``dtype`` by other kernels
    (another order of summation): a few units of rounding of the dtype, and no less than float32 allows."""
    return max(SWAP_TOLERANCE, 4 * torch.finfo(dtype).eps)


def adapter_problem(adapter: LayerAdapter, spec: LayerSpec, read: Sequence[Factor], new: FactorizedLayer,
                    probe: torch.Tensor, expected: Any) -> str | None:
    """How ``adapter`` breaks its contract on a layer of ``spec`` that it read as ``read`` and whose output on
    ``probe`` is ``expected``, or None: ``new``, which it built, has weights of another dtype or device than the
    layer's, or the modules it builds for the layer as it read it compute something else than the layer."""
    like = read[0].weight
    for parameter_name, parameter in new.named_parameters():
        if (parameter.dtype, parameter.device) != (like.dtype, like.device):
            return (f"built the factors with parameter {parameter_name!r} of dtype {parameter.dtype} on "
                    f"{parameter.device}, the layer's weights are {like.dtype} on {like.device}: its build() must "
                    f"give its modules the dtype and device of its argument like")
    try:
        with torch.no_grad():
            got = nn.Sequential(*adapter.build(spec, read, like))(probe)
    except Exception as exc:  # a plugin's bug: reported as a broken contract, not raised from deep inside
        return f"fails to rebuild the layer from what it read: {type(exc).__name__}: {one_line(str(exc))}"
    difference = output_difference(expected, got, rounding_tolerance(like.dtype))
    if difference is not None:
        return (f"does not reproduce the layer: rebuilt from what it read, it {difference} on "
                f"a random probe input of shape {tuple(probe.shape)}; its read() must give the weights with which "
                f"its build() computes what the module computes (a subclass with a computation of its own needs "
                f"an adapter that reads it so)")
    return None


def layout_problem(spec: LayerSpec, layouts: Sequence[FactorLayout]) -> str | None:
    """What in a chain of factor layouts cannot compute a layer of geometry ``spec``, or None."""
    if not layouts:
        return "has no factors"
    channels = [spec.in_channels] + [layout.out_channels for layout in layouts]
    for index, layout in enumerate(layouts):
        if layout.in_channels != channels[index]:
            return f"has factor {index} taking {layout.in_channels} channels where {channels[index]} come in"
    if channels[-1] != spec.out_channels:
        return f"ends with {channels[-1]} channels, the layer has {spec.out_channels}"
    axes = range(spec.spatial_dims)
    for index, layout in enumerate(layouts):
        if len(layout.kernel_size) != spec.spatial_dims or not set(layout.axes) <= set(axes):
            return (f"has factor {index} with kernel {layout.kernel_size} and axes {layout.axes} for a layer with "
                    f"{spec.spatial_dims} spatial axes")
    for axis in axes:
        owners = [index for index, layout in enumerate(layouts) if axis in layout.axes]
        if len(owners) != 1:
            return (f"leaves spatial axis {axis} {'without an owner' if not owners else f'to factors {owners}'}: "
                    f"the axis' stride, padding and dilation must be applied by exactly one factor")
    for index, layout in enumerate(layouts):
        for axis, size in enumerate(layout.kernel_size):
            if size != 1 and axis not in layout.axes:
                return f"has factor {index} convolving spatial axis {axis}, which another factor owns"
            if size not in (1, spec.kernel_size[axis]):
                return (f"has factor {index} convolving spatial axis {axis} with kernel {size}, the layer's is "
                        f"{spec.kernel_size[axis]}")
    biased = [index for index, layout in enumerate(layouts) if layout.bias]
    if biased != ([len(layouts) - 1] if spec.has_bias else []):
        return ("drops the layer's bias" if not biased else
                f"puts the bias on factor(s) {biased}; the layer's bias belongs on the last factor only")
    return None


def _probe_shape(spec: LayerSpec, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """A batch-1 input for a layer: its own input shape when known, else the smallest sizes that give each axis
    an output of at least 3 positions (and room for reflect or circular padding)."""
    if spec.spatial_dims == 0:
        return 1, spec.in_channels
    if input_shape is not None and len(input_shape) >= spec.spatial_dims + 1:
        return 1, spec.in_channels, *input_shape[-spec.spatial_dims:]
    padding = (0,) * spec.spatial_dims if isinstance(spec.padding, str) else spec.padding
    return 1, spec.in_channels, *(d * (k - 1) + 2 * s + p + 1 for k, s, p, d in
                                  zip(spec.kernel_size, spec.stride, padding, spec.dilation, strict=True))


def output_shape_problem(new: FactorizedLayer, probe: torch.Tensor, expected: Any) -> str | None:
    """How ``new``'s output shape on ``probe`` differs from the layer's, whose output there is ``expected``, or
    None."""
    with torch.no_grad():
        try:
            got = tuple(new(probe).shape)
        except Exception as exc:  # a plugin's modules that do not even chain
            return f"fails on a probe input of shape {tuple(probe.shape)}: {type(exc).__name__}: {exc}"
    if got != tuple(expected.shape):
        return (f"gives output shape {got} on a probe input of shape {tuple(probe.shape)}, the layer "
                f"{tuple(expected.shape)}")
    return None


def full_rank_problem(decomposer: Decomposer, adapter: LayerAdapter, spec: LayerSpec, params: Any) -> str | None:
    """Why ``decomposer``'s chain at its max ranks does not reproduce a miniature layer of ``spec``'s geometry,
    or None (also for a decomposer that does not declare ``exact_at_max_rank``). Cached for the process."""
    if not decomposer.exact_at_max_rank:
        return None
    key = (type(decomposer), type(adapter), spec.adapter, spec.kernel_size, spec.stride, spec.padding,
           spec.dilation, spec.padding_mode, spec.has_bias, repr(params))
    if key not in _full_rank_verdicts:
        _full_rank_verdicts[key] = _full_rank_verdict(decomposer, adapter, spec, params)
    return _full_rank_verdicts[key]


def _full_rank_verdict(decomposer: Decomposer, adapter: LayerAdapter, spec: LayerSpec, params: Any) -> str | None:
    in_channels, out_channels = MINIATURE_CHANNELS
    mini = attrs.evolve(spec, in_channels=in_channels, out_channels=out_channels, groups=1)
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    weight = random(*mini.weight_shape)
    bias = random(out_channels) if mini.has_bias else None
    probe = random(*_probe_shape(mini, None))
    stats = None
    if decomposer.needs_input_stats:  # the second moment of random features, well conditioned
        features = random(4 * in_channels * mini.kernel_numel, in_channels * mini.kernel_numel)
        stats = InputStats(features.T @ features / features.shape[0], features.shape[0])
    ranks: tuple[int, ...] = ()
    try:
        source = WeightSource(mini, dense=weight.clone(), input_stats=stats)  # the reference, whatever it does
        ranks = tuple(decomposer.max_ranks(source))
        layouts = decomposer.layout(mini, ranks)
        with torch.no_grad():
            weights = decomposer.decompose(source, ranks, params, seed=0)
            factors = []
            for index, (layout, factor) in enumerate(zip(layouts, weights, strict=True)):
                if tuple(factor.shape) != layout.weight_shape:
                    raise ValueError(f"factor {index} has shape {tuple(factor.shape)}, its layout says "
                                     f"{layout.weight_shape}")
                factors.append(Factor(layout, factor.to(torch.float64), bias if layout.bias else None))
            reference = nn.Sequential(*adapter.build(mini, [Factor(layer_layout(mini)[0], weight, bias)], weight))
            expected = reference(probe)
            got = nn.Sequential(*adapter.build(mini, factors, weight))(probe)
    except Exception as exc:  # a plugin's bug: reported as a broken contract, not raised from deep inside
        return (f"fails at its max ranks {ranks} on a miniature {mini.describe()} of the layer's geometry: "
                f"{type(exc).__name__}: {exc}")
    if got.shape != expected.shape:
        return (f"gives output shape {tuple(got.shape)} at its max ranks {ranks} on a miniature {mini.describe()} "
                f"of the layer's geometry, the layer {tuple(expected.shape)}")
    error = float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))
    if not error <= FULL_RANK_TOLERANCE:
        return (f"declares exact_at_max_rank, but at its max ranks {ranks} on a miniature {mini.describe()} of the "
                f"layer's geometry its output differs from the layer's by relative error {error:.2e}")
    return None


# -- the whole model -------------------------------------------------------------------------------------------

def unfaithful_swaps(model: nn.Module, swaps: Mapping[str, tuple[nn.Module, nn.Module]],
                     paths: Mapping[int, Sequence[str]], example_input: Any, input_name: str = "the example input"
                     ) -> dict[str, str]:
    """The layers of ``swaps`` (name: (layer, replacement)) that the model would not use as it uses the layer, with
    why; ``paths`` maps a module's id to where it sits in the model.

    The model runs on ``example_input`` (eval mode, no grad, the same random seed) once as it is with each layer's
    output computed by its replacement from the layer's own input, and once with the replacements swapped in. A
    model that uses its layers only by calling them gives the same output both times. It does not when it calls a
    layer through a reference the swap cannot reach, or reads the layer's type, attributes or weights: the
    replacement is then not used as the layer was, whatever it computes. When the step's replacements fail
    together, the layers to blame are found by halving the set. A model whose output differs between two calls on
    the same input (state it keeps, randomness not drawn from torch) cannot be checked for the last case, and is
    not; its kept state advances with the runs. The model is otherwise left as it was.

    A model that fails on ``example_input`` as it is, before any replacement (its dtype or device changed since the
    input was given), is one ConfigError naming the error and ``input_name``.
    """
    try:
        problem = _swap_problem(model, swaps, paths, example_input)
    except Exception:
        with evaluating(model):
            try:
                seeded_output(model, example_input)
            except Exception as exc:  # the user's model and input: one clear error, the cause chained
                raise ConfigError(f"the model as it is (before any replacement) fails on {input_name}: "
                                  f"{type(exc).__name__}: {one_line(str(exc))}; give an input it takes (of its dtype "
                                  f"and device, when it was converted or moved since)") from exc
        raise
    return {} if problem is None else _culprits(model, swaps, paths, example_input, problem)


def _culprits(model: nn.Module, swaps: Mapping[str, tuple[nn.Module, nn.Module]],
              paths: Mapping[int, Sequence[str]], example_input: Any, problem: str) -> dict[str, str]:
    """The layers of ``swaps``, which fail together with ``problem``, to keep so that the others pass together,
    found by halving (a few passes per culprit however many layers the step has); layers that fail only together
    are all kept."""
    if len(swaps) == 1:
        return dict.fromkeys(swaps, problem)
    names = list(swaps)
    found: dict[str, str] = {}
    for part in (names[:len(names) // 2], names[len(names) // 2:]):
        half = {name: swaps[name] for name in part}
        if (why := _swap_problem(model, half, paths, example_input)) is not None:
            found.update(_culprits(model, half, paths, example_input, why))
    rest = {name: swap for name, swap in swaps.items() if name not in found}
    if rest and (together := _swap_problem(model, rest, paths, example_input)) is not None:
        found.update(dict.fromkeys(rest, f"{together} (with the step's other replacements swapped in)"))
    return found


def _swap_problem(model: nn.Module, swaps: Mapping[str, tuple[nn.Module, nn.Module]],
                  paths: Mapping[int, Sequence[str]], example_input: Any) -> str | None:
    """Why the model does not use ``swaps``' replacements as it uses the layers, or None when it does."""
    replacement_of = {id(layer): new for layer, new in swaps.values()}
    news = [new for _, new in swaps.values()]

    def replaced_output(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return replacement_of[id(layer)](*args, **kwargs)

    stale_calls: Counter[int] = Counter()

    def count_stale_call(layer: nn.Module, args: tuple) -> None:
        stale_calls[id(layer)] += 1

    with torch.no_grad(), evaluating(model, *news):
        handles = [layer.register_forward_hook(replaced_output, with_kwargs=True) for layer, _ in swaps.values()]
        try:
            expected = seeded_output(model, example_input)
        finally:
            for handle in handles:
                handle.remove()
        handles = [layer.register_forward_pre_hook(count_stale_call) for layer, _ in swaps.values()]
        try:
            with swapped(model, {path: new for layer, new in swaps.values() for path in paths[id(layer)]}):
                got = seeded_output(model, example_input)
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the model relies on more than the layer's output
            return (f"the model fails with the replacement swapped in ({type(exc).__name__}: {exc}): it uses the "
                    f"layer other than by calling it (reads its attributes or weights)")
        finally:
            for handle in handles:
                handle.remove()
    if stale_calls:
        return ("the model still calls the original layer after the swap, through a reference the swap cannot "
                "reach (a plain list, dict or attribute outside the module tree)")
    difference = output_difference(expected, got, SWAP_TOLERANCE)
    if difference is not None:
        with evaluating(model):
            again = output_difference(seeded_output(model, example_input), seeded_output(model, example_input),
                                      SWAP_TOLERANCE)
        if again is not None:
            log.info("the whole-model check of the step's replacements cannot tell: two calls of the model on the "
                     "same input differ (%s; state kept across calls, or randomness not drawn from torch)", again)
            return None
        return (f"with the replacement swapped in, the model {difference}, although the replacement computes "
                f"the same from the same input: the model depends on the layer's type or attributes, not only on "
                f"its output")
    return None


@contextmanager
def random_state_kept(model: nn.Module) -> Iterator[list[int]]:
    """Runs the block with torch's random generators of the CPU and of the model's CUDA devices (their indices
    given) put back as they were after it: calls of a model that draws randomness leave the caller's alone."""
    cuda = sorted({t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers())
                   if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield cuda


def seeded_output(model: nn.Module, example_input: Any) -> Any:
    """The model's output on a copy of ``example_input`` (a model may change its input in place), without grad and
    with torch's random generators of the model's devices seeded, the caller's random state restored after: two
    calls give the same output unless the model keeps state across calls or draws randomness elsewhere."""
    with torch.no_grad(), random_state_kept(model) as cuda:
        torch.default_generator.manual_seed(0)
        for device in cuda:
            torch.cuda.default_generators[device].manual_seed(0)
        return call_model(model, fresh_copy(example_input))


def output_difference(expected: Any, got: Any, tolerance: float) -> str | None:
    """How a model's output ``got`` differs from ``expected`` beyond float rounding (the tensors in them, in
    order: their number, shapes, dtypes, NaN and infinities, and values within ``tolerance`` relative), or None."""
    expected_tensors, got_tensors = tensors_in(expected), tensors_in(got)
    if len(expected_tensors) != len(got_tensors):
        return f"gives {len(got_tensors)} output tensors instead of {len(expected_tensors)}"
    for index, (a, b) in enumerate(zip(expected_tensors, got_tensors)):
        where = f"output tensor {index}" if len(expected_tensors) > 1 else "the output"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"gives {where} as {b.dtype} {tuple(b.shape)} instead of {a.dtype} {tuple(a.shape)}"
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return f"gives other values in {where}"
            continue
        a, b = a.detach().to(torch.complex128 if a.is_complex() else torch.float64), b.detach().to(
            torch.complex128 if b.is_complex() else torch.float64)
        infinite = torch.isinf(a) | torch.isinf(b)
        if not torch.equal(torch.isnan(a), torch.isnan(b)) or not torch.equal(a[infinite], b[infinite]):
            return f"gives NaN or infinities elsewhere in {where}"
        finite = torch.isfinite(a) & torch.isfinite(b)
        scale = torch.linalg.vector_norm(a[finite]).clamp_min(torch.finfo(torch.float64).tiny)
        relative = float(torch.linalg.vector_norm(a[finite] - b[finite]) / scale)
        if relative > tolerance:
            return f"changes {where} by {relative:.3g} (relative)"
    return None
