"""``optimize_for_inference``: the fastest plain-PyTorch form of a (compressed) model, for deployment.

Four rewrites, each exact up to float rounding, made only where the model's data flow shows that they are:

* **BatchNorm folding.** A BatchNorm in eval mode is an affine map per channel; when it reads the output of a
  convolution or Linear layer and nothing else reads that output, it is folded into that layer's weight and
  bias. The data flow is read from a ``torch.fx`` trace of the model and, with an example input, confirmed on a
  real pass over it (how often each module is called and by which, and in which calls each layer's output and
  parameters are read). Where the trace cannot show the data flow (the model cannot be traced, or the trace calls
  other modules than the pass), only pairs inside ``nn.Sequential`` containers fold, and only where a pass on an
  example input confirms them: without one, none. A BatchNorm after a factorized layer folds into its last factor.
  A fold whose weights would overflow the layer's dtype (float16) is left out.
* **Chain merging.** A factorized layer (or a plain ``nn.Sequential`` of convolutions, as ``standardize_model``
  leaves one) is a chain of linear layers with no non-linearity in between. Any run of consecutive factors
  whose product is one convolution (each spatial axis convolved by at most one of them, and no bias crossing a
  zero padding) can be replaced by that product. Only chains whose container the model calls whole are merged: as
  the trace shows it (a factorized layer, which stands for the one layer the model's code calls, also where it
  cannot), and as the pass confirms it. Each chain gets the split into products that runs fastest at the chain's
  input shape on this machine, measured; a factorization that is not measurably faster than its dense layer is
  merged back into it. Without an example input the split with the fewest MACs is taken.
* **Memory format.** With an example input, the whole model is timed in ``channels_last`` (as it is, and with its
  1x1 convolutions as matrix products) against the format it has, and is put in ``channels_last`` when that is
  measurably faster. A form that fails to run on the example input (``x.view`` of a ``channels_last`` tensor) is
  no candidate.
* **1x1 convolutions as matrix products.** In a ``channels_last`` model, each 1x1 convolution is timed at its
  input shape against the same arithmetic as one matrix product over the channels (:class:`PointwiseConv2d`),
  and replaced where that is measurably faster.

No rewrite touches a module that computes more than its torch class does (the rule of
:func:`~musco_core.surgery.why_not_replaceable`: a computation of its own, hooks, a parametrization), a container
with hooks, or a layer whose parameters another module shares (tied weights, also another Parameter over the same
memory, such as a view of it): folding or replacing the layer would cut it off from that holder. Folding gives the
layer new parameters rather than writing the old ones, which other Parameters can view. Merged layers are stock
torch layers, whatever subclass the factors are.

With an example input the result is checked: its outputs on that input must equal the eval-mode model's
(:data:`CHECK_TOLERANCE`); where they do not, it is made again without BatchNorm folding, then without any
rewrite, with a warning saying what was left out and why.

The arithmetic (composite weights, BatchNorm folding) is plain functions on tensors; what the data flow shows is
read in :mod:`musco_core.dataflow`; what it allows, the measured choices (a plan of rewrites by module path) and
the module surgery that makes them are kept apart.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from tqdm.auto import tqdm

from .dataflow import (BATCHNORMS, CONVS, LAYERS, Evidence, ObservedPass, Traced, gather_evidence,
                       holds_shared, is_stock, observe, shared_tensors, torch_class)
from .errors import ConfigError
from .factors import dense_weight, padding_per_axis
from .surgery import (FactorizedLayer, deep_copy, evaluating, global_hooks, module_paths, on_meta, replace_module,
                      standardize_model)
from .timing import (call_model, first_input, fixed_threads, fresh_copy, map_tensors, tensors_in, time_modules,
                     time_modules_at)
from .verify import output_difference, random_state_kept, seeded_output

log = logging.getLogger(__name__)

#: A factorized chain is kept only when its median time is below this share of the dense layer's; the
#: rest of the difference is within what a shared machine's noise produces between two medians.
MEASURABLY_FASTER = 0.97
#: Largest relative difference (norm of the difference over the norm, per output tensor) between the optimized
#: model's outputs on the example input and the eval-mode model's, both in float32 (float64 for a float64 model).
#: Float rounding gives about 4e-7 on a ResNet-50; a wrong data flow gives errors of order one.
CHECK_TOLERANCE = 1e-5
#: Chains longer than this are only compared as they are against fully merged (2^(n-1) splits otherwise).
_MAX_SPLIT_SEARCH = 6


def optimize_for_inference(model: nn.Module, example_input: Any = None, *, inplace: bool = False,
                           threads: int | None = None, progress: bool = True) -> nn.Module:
    """The fastest plain-PyTorch form of ``model`` for inference: BatchNorm folded, factor chains merged where
    that is faster, memory format chosen; outputs equal the eval-mode model's up to float rounding.

    The result is in eval mode and made of stock torch modules (factorized layers become ``nn.Sequential``
    chains or single layers) and :class:`PointwiseConv2d` (an ``nn.Conv2d`` with the same parameters), so it
    saves (``state_dict``), traces, exports and compiles like any model; a factorized layer with hooks of its own
    is left as it is. Its structure differs from the input's where layers were merged or BatchNorms folded (a
    folded BatchNorm becomes an ``nn.Identity`` that keeps its plain attributes, such as ``num_features``), so its
    state dict loads only into a model optimized to the same form (the same folds and chain splits), never into the
    original. Without an example input the form follows from the model's structure (and, for a fold into a
    float16 layer, whether its weights fit): the same architecture optimized without one, also built on the
    ``meta`` device, takes the state dict (``load_state_dict(..., assign=True)``). With one, splits and formats
    are timed on this machine and may come out otherwise in another call: keep the optimized model itself
    (``torch.export``), or save the compressed model and optimize it where it is deployed. A model or example
    input on the ``meta`` device is refused with an example input: there is nothing to time or check.

    Rewrites are made only where the data flow shows them exact (see the module documentation): a trace of the
    model and, with ``example_input``, a real pass over it. Without an example input the trace is all there is: a
    model that cannot be traced gets no BatchNorm folded, and a forward that branches on what its input is
    (``isinstance(x, torch.Tensor)`` is false for the trace's proxies) can show the trace another data flow than
    its real calls have; an example input settles that. Folding uses the BatchNorm running statistics, i.e. it
    reproduces the model in eval mode: a model passed in train mode is optimized as its eval-mode self. The input
    model is deep-copied first and left untouched, unless ``inplace=True``: then it is modified once the rewrites
    are chosen (a failure before leaves it as it was) and returned, unless it is itself replaced (a factorized
    layer, for one). The example input and torch's random state are left as they were, also for a model that
    changes its input in place or draws noise.

    ``example_input`` (called as ``model(x)``, ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping)
    is the input the model will be deployed on: each chain's candidate forms, the memory formats and, in
    ``channels_last``, each 1x1 convolution's two forms are timed at its shapes on this machine with ``threads``
    torch threads (default: the current setting), and the result's outputs on it are checked against the model's:
    where they differ (:data:`CHECK_TOLERANCE`), BatchNorm folding, then every rewrite, is left out, with a
    warning. Without it, chains are merged wherever that saves MACs, and the memory format is left as it is.
    """
    if example_input is not None:
        _check_values(model, example_input)
    if not inplace:
        model = deep_copy(model, "optimize_for_inference copies the model unless inplace=True",
                          "or pass inplace=True to optimize the model itself")
    with evaluating(model), random_state_kept(model):  # the model is called many times, and may draw noise
        plan = _plan(model, example_input, threads, progress)
    return _apply(model, plan)


def _check_values(model: nn.Module, example_input: Any) -> None:
    """One ConfigError where the model or the example input is on the meta device: shapes without values give
    nothing to time the candidate forms on, nor to check the result's outputs with (the check failed and was
    reported as the optimized model raising)."""
    problem = on_meta(model) or ("the example input is on the meta device"
                                 if any(t.is_meta for t in tensors_in(example_input)) else None)
    if problem:
        raise ConfigError(f"optimize_for_inference: {problem}: without values there is nothing to time the forms "
                          f"on or to check the result with; load the weights first, or pass example_input=None to "
                          f"choose from the model's structure alone (the fewest MACs)")


# --- The plan: rewrites chosen by path, made on the model or on a copy alike ----------------------------------

#: A split of a chain of n layers: the (start, stop) ranges of its runs, covering 0..n in order.
Split = tuple[tuple[int, int], ...]


@attrs.frozen
class _Plan:
    """The rewrites chosen for a model, by module path: (layer, BatchNorm) pairs to fold, chain containers with
    their splits, ``channels_last``, and the 1x1 convolutions to become :class:`PointwiseConv2d` (paths in the
    model as the earlier rewrites leave it)."""

    folds: tuple[tuple[str, str], ...] = ()
    splits: tuple[tuple[str, Split], ...] = ()
    channels_last: bool = False
    pointwise: tuple[str, ...] = ()


def _plan(model: nn.Module, example_input: Any, threads: int | None, progress: bool) -> _Plan:
    """The rewrites of ``model`` (in eval mode) that its data flow allows; with an example input, the measured
    choices among them, checked on it."""
    if hooks := global_hooks():  # no module passes is_stock while they are registered
        log.warning("optimize_for_inference: no rewrite made: hooks for every module are registered (%s); they run on "
                    "every module call, so folding or merging would change what they see and return: remove them "
                    "first", "; ".join(hooks))
        return _Plan()
    evidence = gather_evidence(model, example_input)
    folds = _folds(model, evidence)
    chains = _chains(model, evidence)
    plan = _Plan(folds, tuple((chain.paths[0], chain.fewest_macs()) for chain in chains))
    if example_input is None:
        return plan
    with fixed_threads(threads):
        channels_last = _channels_last_is_faster(_apply(copy.deepcopy(model), plan), example_input)
        splits = _fastest_splits(chains, channels_last, progress)
        plan = _Plan(folds, tuple((chain.paths[0], split) for chain, split in splits.items()), channels_last)
        if channels_last:
            pointwise = _fastest_pointwise(_apply(copy.deepcopy(model), plan), example_input, progress)
            plan = attrs.evolve(plan, pointwise=pointwise)
    return _checked(model, example_input, plan)


def _apply(model: nn.Module, plan: _Plan) -> nn.Module:
    """``model`` (modified) with the rewrites of ``plan``, in eval mode; returns the root (new where the root
    itself was a chain or a 1x1 convolution)."""
    paths = module_paths(model)
    for layer_path, batchnorm_path in plan.folds:
        batchnorm = model.get_submodule(batchnorm_path)
        fold_batchnorm(model.get_submodule(layer_path), batchnorm)
        _put(model, paths[id(batchnorm)], _folded_away(batchnorm))
    for path, split in plan.splits:
        container = model.get_submodule(path)
        model = _put(model, paths[id(container)], _build(list(container), split))
    if plan.channels_last:
        _to_channels_last(model)
    paths = module_paths(model)
    for path in plan.pointwise:
        conv = model.get_submodule(path)
        model = _put(model, paths[id(conv)], PointwiseConv2d.from_conv(conv))
    return standardize_model(model).eval()


def _put(model: nn.Module, paths: Sequence[str], new: nn.Module) -> nn.Module:
    """Puts ``new`` at each of ``paths`` (one module however many names hold it); returns the root, which is
    ``new`` itself where a path is the root's (``""``)."""
    for path in paths:
        if path:
            replace_module(model, path, new)
        else:
            model = new
    return model


def _checked(model: nn.Module, example_input: Any, plan: _Plan) -> _Plan:
    """The first of ``plan``, ``plan`` without BatchNorm folding, and no rewrite at all, with which the model's
    outputs on the example input stay those of ``model`` (every tensor of the output within
    :data:`CHECK_TOLERANCE`, compared in float32, or float64 for a model with float64 tensors, so that a
    half-precision model's rounding does not hide a wrong data flow); logs a warning for each plan dropped."""
    if plan == _Plan():
        return plan
    floating = {t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()}
    dtype = torch.float64 if torch.float64 in floating else torch.float32
    x = example_input if floating <= {dtype} else map_tensors(
        example_input, lambda t: t.to(dtype) if t.is_floating_point() else t)
    try:
        expected = _outputs(model if floating <= {dtype} else copy.deepcopy(model).to(dtype), x)
    except Exception as exc:  # noqa: BLE001 - what cannot be checked is not applied
        log.warning("optimize_for_inference: no rewrite applied: the model cannot be checked on the example input in "
                    "%s (%s: %s)", dtype, type(exc).__name__, exc)
        return _Plan()
    for candidate in dict.fromkeys([plan, attrs.evolve(plan, folds=())]):
        if candidate == _Plan():
            break
        try:
            problem = output_difference(expected, _outputs(_apply(copy.deepcopy(model).to(dtype), candidate), x),
                                            CHECK_TOLERANCE)
        except Exception as exc:  # noqa: BLE001 - a rewrite that breaks the model is one not to make
            problem = f"raises {type(exc).__name__}: {exc}"
        if problem is None:
            return candidate
        log.warning("optimize_for_inference: %s not applied: on the example input, the model so optimized %s",
                    "BatchNorm folding" if candidate.folds else
                    "chain merging, channels_last and 1x1 convolutions as matrix products", problem)
    return _Plan()


def _outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    return tensors_in(seeded_output(model, example_input))


# --- BatchNorm folding: arithmetic --------------------------------------------------------------------------

def batchnorm_affine(batchnorm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with ``batchnorm(x) == x * scale + shift`` in eval mode (float64)."""
    var = batchnorm.running_var.detach().double()
    scale = torch.rsqrt(var + batchnorm.eps)
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight.detach().double()
    shift = -batchnorm.running_mean.detach().double() * scale
    if batchnorm.bias is not None:
        shift = shift + batchnorm.bias.detach().double()
    return scale, shift


def folded_weights(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a layer followed by ``x * scale + shift`` per output channel (float64)."""
    weight = weight.detach().double() * scale.reshape(-1, *(1,) * (weight.dim() - 1))
    bias = shift if bias is None else bias.detach().double() * scale + shift
    return weight, bias


@torch.no_grad()
def fold_batchnorm(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear,
                   batchnorm: nn.modules.batchnorm._BatchNorm) -> None:
    """Folds ``batchnorm`` (eval mode, running statistics) into the layer that feeds it: the layer gets a new
    weight and bias (it gains a bias if it had none), since a write into the old ones would also reach any other
    Parameter over their memory (a view). The caller removes the BatchNorm."""
    weight, bias = folded_weights(layer.weight, layer.bias, *batchnorm_affine(batchnorm))
    old_weight, old_bias = layer.weight, layer.bias
    layer.weight = nn.Parameter(weight.to(old_weight), requires_grad=old_weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(old_weight), requires_grad=(old_weight if old_bias is None
                                                                   else old_bias).requires_grad)


def _folded_away(batchnorm: nn.Module) -> nn.Identity:
    """The ``nn.Identity`` that takes a folded BatchNorm's place, with the BatchNorm's plain attributes
    (``num_features``, ``eps``, ...), which the model's forward may read."""
    identity = nn.Identity()
    vars(identity).update({name: value for name, value in vars(batchnorm).items()
                           if not name.startswith("_") and name != "training"})
    return identity


# --- BatchNorm folding: which pairs -------------------------------------------------------------------------

def _is_foldable_batchnorm(module: nn.Module) -> bool:
    return (is_stock(module, BATCHNORMS) and module.track_running_stats and module.running_mean is not None
            and module.running_var is not None)


def _fits_dtype(like: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """True when ``tensors`` (None skipped) are finite in ``like``'s dtype (on the meta device: taken as true)."""
    return like.is_meta or all(bool(t.to(like.dtype).isfinite().all()) for t in tensors if t is not None)


def _fold_fits_dtype(layer: nn.Module, batchnorm: nn.Module) -> bool:
    """True when the folded weight and bias are finite in the layer's dtype: a float16 weight times a large
    BatchNorm scale can overflow where the model, which scales the layer's smaller output, does not (and the
    check, in float32, would not see it). Told from each output channel's largest weight, whose folded value is the
    channel's largest (rounding keeps the order), so the whole folded weight is made once, when it is applied."""
    weight = layer.weight.detach()
    largest = weight.abs().flatten(1).amax(1) if weight.numel() else weight.new_zeros(weight.shape[0])
    return _fits_dtype(layer.weight, *folded_weights(largest[:, None], layer.bias, *batchnorm_affine(batchnorm)))


def _channel_axis_fits(layer: nn.Module, batchnorm: nn.Module, shapes: dict[int, tuple]) -> bool:
    """True when the BatchNorm normalizes the layer's output channels.

    BatchNorm2d/3d take only batched 4-d/5-d input, whose channel axis is the conv's. BatchNorm1d normalizes
    axis 1, which is a Linear layer's features only on 2-d input and a Conv1d's channels only on batched input:
    that needs the output shape seen on the example input.
    """
    if layer.weight.shape[0] != batchnorm.num_features:
        return False
    expected_dims = {nn.BatchNorm2d: (nn.Conv2d, 4), nn.BatchNorm3d: (nn.Conv3d, 5)}
    for bn_type, (layer_type, _) in expected_dims.items():
        if isinstance(batchnorm, bn_type):
            return isinstance(layer, layer_type)
    output = shapes.get(id(layer), (None, None))[1]
    if isinstance(layer, nn.Linear):
        return output is not None and len(output) == 2
    return isinstance(layer, nn.Conv1d) and output is not None and len(output) == 3


def _folds(model: nn.Module, evidence: Evidence) -> tuple[tuple[str, str], ...]:
    """The (layer, BatchNorm) paths where the BatchNorm folds: it reads only that layer's output, each runs once,
    both are stock and hold no tensor another module shares, and the folded weights fit the layer's dtype. The
    pairs come from the traces (a pair in every one), else from ``nn.Sequential`` containers; the pass on the
    example input, where there is one, must confirm each."""
    observed = evidence.observed
    if evidence.traces is not None:
        first, *others = (_traced_pairs(trace) for trace in evidence.traces)
        candidates = [pair for pair in first if all(pair in other for other in others)]
    elif observed is not None:
        candidates = _sequential_pairs(model, observed)
    else:
        return ()
    paths, shared, shapes = module_paths(model), shared_tensors(model), evidence.shapes
    return tuple((paths[id(layer)][0], paths[id(batchnorm)][0]) for layer, batchnorm in candidates
                 if _is_foldable_batchnorm(batchnorm) and is_stock(layer, LAYERS)
                 and not holds_shared(layer, shared) and not holds_shared(batchnorm, shared)
                 and _channel_axis_fits(layer, batchnorm, shapes) and _fold_fits_dtype(layer, batchnorm)
                 and (observed is None or _pass_confirms_pair(observed, layer, batchnorm)))


def _traced_pairs(trace: Traced) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, BatchNorm) pairs where the trace calls each once, the BatchNorm on the layer's output alone, that
    output goes nowhere else, and no parameter of either is read directly."""
    calls: dict[int, int] = {}
    for module in trace.modules.values():
        calls[id(module)] = calls.get(id(module), 0) + 1
    pairs = []
    for node, batchnorm in trace.modules.items():
        source = first_input(batchnorm, node.args, node.kwargs) if len(node.args) + len(node.kwargs) == 1 else None
        if not isinstance(source, torch.fx.Node) or source not in trace.modules or len(source.users) != 1:
            continue
        layer = trace.modules[source]
        if calls[id(layer)] == calls[id(batchnorm)] == 1 and not {id(layer), id(batchnorm)} & trace.read_directly:
            pairs.append((layer, batchnorm))
    return pairs


def _last_layer(module: nn.Module) -> nn.Module:
    """The module that produces ``module``'s output when that is certain: itself, or the last layer of a
    stock ``nn.Sequential`` (a factorized layer included)."""
    while is_stock(module, (nn.Sequential,)) and len(module):
        module = module[-1]
    return module


def _sequential_pairs(model: nn.Module, observed: ObservedPass) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, BatchNorm) pairs of consecutive children of a stock ``nn.Sequential`` that the pass shows calling
    the BatchNorm, once: the container called whole, which passes the child's output to it."""
    pairs = []
    for container in model.modules():
        if not is_stock(container, (nn.Sequential,)):
            continue
        children = list(container)
        for before, batchnorm in zip(children, children[1:]):
            calls = observed.calls.get(id(batchnorm), [])
            if len(calls) == 1 and calls[0].parent is not None and calls[0].parent.module is container:
                pairs.append((_last_layer(before), batchnorm))
    return pairs


def _pass_confirms_pair(observed: ObservedPass, layer: nn.Module, batchnorm: nn.Module) -> bool:
    """True when the pass called each once, the BatchNorm on the layer's output, read that output in the
    BatchNorm's call alone and dropped it after, and read each one's tensors in its own call alone."""
    layer_calls, batchnorm_calls = observed.calls.get(id(layer), []), observed.calls.get(id(batchnorm), [])
    if len(layer_calls) != 1 or len(batchnorm_calls) != 1:
        return False
    (made,), (normalized,) = layer_calls, batchnorm_calls
    return (made in normalized.sources and made.readers <= {id(batchnorm)} and not made.output_kept()
            and observed.reads_only_own(layer) and observed.reads_only_own(batchnorm))


# --- Chain merging: arithmetic ------------------------------------------------------------------------------

@attrs.frozen
class Geometry:
    """The one layer a run of chained layers computes: its kernel, stride, padding, dilation, groups."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str
    groups: int


def _axis_padding(conv: nn.Module, axis: int) -> int | None:
    """Symmetric padding of ``conv`` on ``axis``; None for an asymmetric ``'same'`` (even kernel)."""
    before, after = padding_per_axis(conv.padding, conv.kernel_size, conv.dilation)[axis]
    return before if before == after else None


def merged_geometry(layers: Sequence[nn.Module]) -> Geometry | None:
    """The geometry of the single layer equal to ``layers`` applied in order, or None when there is none.

    Linear layers always merge. Convolutions merge when every spatial axis is convolved, strided or padded by
    at most one of them (the others are pointwise there), all the padding uses one mode, and no layer with a
    bias comes before a zero-padding one (the bias would reach the padded border, where the product has zeros).
    """
    groups = math.gcd(*(getattr(layer, "groups", 1) for layer in layers))
    if isinstance(layers[0], nn.Linear):
        return Geometry((), (), (), (), "zeros", 1)
    dims = len(layers[0].kernel_size)
    kernel, stride, dilation = [1] * dims, [1] * dims, [1] * dims
    padding: list[int | None] = [0] * dims
    owner: list[int | None] = [None] * dims
    modes: set[str] = set()
    biased_before = False
    for index, conv in enumerate(layers):
        pads = False
        for axis in range(dims):
            size, step, pad = conv.kernel_size[axis], conv.stride[axis], _axis_padding(conv, axis)
            if size == 1 and step == 1 and pad == 0:
                continue
            if owner[axis] is not None:
                return None
            owner[axis] = index
            kernel[axis], stride[axis], padding[axis] = size, step, pad
            dilation[axis] = conv.dilation[axis] if size > 1 else 1
            pads = pads or pad != 0
        if pads:
            modes.add(conv.padding_mode)
            if conv.padding_mode == "zeros" and biased_before:
                return None
        biased_before = biased_before or conv.bias is not None
    if len(modes) > 1:
        return None
    if any(pad is None for pad in padding):  # an asymmetric 'same': only its own layer may convolve
        owners = {o for o in owner if o is not None}
        if len(owners) != 1:
            return None
        return Geometry(tuple(kernel), tuple(stride), "same", tuple(dilation), modes.pop(), groups)
    return Geometry(tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), modes.pop() if modes else "zeros",
                    groups)


def merged_weights(layers: Sequence[nn.Module], geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (grouped, ``geometry.groups``) and bias of the single layer equal to ``layers`` (float64).

    The product is taken per kernel position, each layer's kernel broadcast along the axes it does not
    convolve; each bias is carried through the later layers as a constant map (sum of their kernels).
    """
    positions = math.prod(geometry.kernel_size)
    composite = bias = None  # composite: (positions, out, in)
    for layer in layers:
        weight = layer.weight.detach().double()
        if geometry.kernel_size:
            weight = dense_weight(weight, layer.groups)
        full = weight.expand(*weight.shape[:2], *geometry.kernel_size).reshape(*weight.shape[:2], positions)
        full = full.permute(2, 0, 1)
        if bias is not None:
            bias = weight.reshape(*weight.shape[:2], -1).sum(-1) @ bias
        if layer.bias is not None:
            layer_bias = layer.bias.detach().double()
            bias = layer_bias if bias is None else bias + layer_bias
        composite = full if composite is None else torch.bmm(full, composite)
    out_channels, in_channels = composite.shape[1:]
    dense = composite.permute(1, 2, 0).reshape(out_channels, in_channels, *geometry.kernel_size)
    out_size, in_size = out_channels // geometry.groups, in_channels // geometry.groups
    grouped = torch.cat([dense[g * out_size:(g + 1) * out_size, g * in_size:(g + 1) * in_size]
                         for g in range(geometry.groups)])
    return grouped, bias


def merge_layers(layers: Sequence[nn.Module], geometry: Geometry) -> nn.Module:
    """A new stock layer (``nn.Linear`` or ``nn.ConvNd``, whatever subclass the layers are) computing ``layers``
    in one, with their dtype and device; built without a random init (``skip_init``), so the caller's RNG is not
    drawn from."""
    weight, bias = merged_weights(layers, geometry)
    like = layers[0].weight
    options = {"bias": bias is not None, "device": like.device, "dtype": like.dtype}
    if isinstance(layers[0], nn.Linear):
        merged = skip_init(nn.Linear, weight.shape[1], weight.shape[0], **options)
    else:
        merged = skip_init(
            CONVS[len(geometry.kernel_size) - 1],
            weight.shape[1] * geometry.groups, weight.shape[0], geometry.kernel_size, stride=geometry.stride,
            padding=geometry.padding, dilation=geometry.dilation, groups=geometry.groups,
            padding_mode=geometry.padding_mode, **options)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if bias is not None:
            merged.bias.copy_(bias)
    return merged.train(layers[0].training)


def _build(layers: Sequence[nn.Module], split: Split) -> nn.Module:
    """``layers`` run as ``split``: one layer, or an ``nn.Sequential`` of layers (new ones where merged). A run
    whose merged weights are not finite in its dtype stays as it is: a float16 product can overflow where the
    chain, which scales smaller values one factor at a time, does not (and the check, in float32, would not see
    it)."""
    parts: list[nn.Module] = []
    for start, stop in split:
        run = layers[start:stop]
        merged = run[0] if len(run) == 1 else merge_layers(run, merged_geometry(run))
        parts += [merged] if _fits_dtype(merged.weight, merged.weight, merged.bias) else run
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts).eval()


# --- Chain merging: which chains, and their splits ----------------------------------------------------------

def _splits(n: int) -> list[Split]:
    """Every split of n layers into consecutive runs (2^(n-1)); for long chains only unsplit and fully merged."""
    if n > _MAX_SPLIT_SEARCH:
        return [tuple((i, i + 1) for i in range(n)), ((0, n),)]
    result = []
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), n]
        result.append(tuple(zip(bounds, bounds[1:])))
    return result


def _chains(model: nn.Module, evidence: Evidence) -> list[_Chain]:
    """Every stock ``nn.Sequential`` (a factorized layer included) of two or more stock layers of one torch class
    that the model calls whole, as its traces show (or, where there are none, a factorized layer: it stands for
    the one layer the model's code calls) and the pass on the example input, where there is one, confirms. Its
    layers are reachable under one name, hold no tensor another module shares, and have real floating-point
    weights (:func:`merged_weights` multiplies in float64: a complex chain's imaginary parts would be dropped)."""
    paths, shared, shapes = module_paths(model), shared_tensors(model), evidence.shapes
    chains = []
    for container in model.modules():
        if not is_stock(container, (nn.Sequential,)) or len(container) < 2:
            continue
        layers = list(container)
        if (len({torch_class(layer, LAYERS) for layer in layers}) != 1
                or not all(is_stock(layer, LAYERS) and not holds_shared(layer, shared)
                           and layer.weight.is_floating_point() and len(paths[id(layer)]) == 1 for layer in layers)):
            continue
        if evidence.traces is not None:
            whole = all(_called_whole(trace, container) for trace in evidence.traces)
        else:
            whole = isinstance(container, FactorizedLayer)
        if whole and (evidence.observed is None or _pass_confirms_chain(evidence.observed, container)):
            chains.append(_Chain(paths[id(container)], layers, shapes.get(id(container), (None, None))[0],
                                 [shapes.get(id(layer), (None, None))[1] for layer in layers]))
    return chains


def _called_whole(trace: Traced, container: nn.Module) -> bool:
    """True when the trace calls the container's layers, each only from the container's forward (the model calls
    it whole, never its layers on their own), and reads none of their parameters directly."""
    layers = {id(layer) for layer in container}
    nodes = [node for node, module in trace.modules.items() if id(module) in layers]
    return (bool(nodes) and all(trace.callers[node] is container for node in nodes)
            and not layers & trace.read_directly)


def _pass_confirms_chain(observed: ObservedPass, container: nn.Module) -> bool:
    """True when the pass called each layer of the container, only from the container's calls, and read each
    one's tensors in its own calls only."""
    for layer in container:
        calls = observed.calls.get(id(layer), [])
        if not calls or not all(call.parent is not None and call.parent.module is container for call in calls):
            return False
        if not observed.reads_only_own(layer):
            return False
    return True


@attrs.define(eq=False)
class _Chain:
    """A chain of layers where the model holds it (its container's paths), the output shape of each layer on
    the example input (None without one, or where the example input did not reach it)."""

    paths: list[str]
    layers: list[nn.Module]
    input_shape: tuple[int, ...] | None
    output_shapes: list[tuple[int, ...] | None]
    _geometries: dict[tuple[int, int], Geometry | None] = attrs.Factory(dict)

    def geometry(self, start: int, stop: int) -> Geometry | None:
        if (start, stop) not in self._geometries:
            self._geometries[start, stop] = merged_geometry(self.layers[start:stop])
        return self._geometries[start, stop]

    def valid_splits(self) -> list[Split]:
        return [split for split in _splits(len(self.layers))
                if all(self.geometry(start, stop) is not None for start, stop in split)]

    def macs(self, split: Split) -> float:
        """MACs of the chain run as ``split``: on the example input's shapes, else per input position."""
        total = 0.0
        for start, stop in split:
            first, last, geometry = self.layers[start], self.layers[stop - 1], self.geometry(start, stop)
            in_channels = first.weight.shape[1] * getattr(first, "groups", 1)
            weights = last.weight.shape[0] * in_channels // geometry.groups * math.prod(geometry.kernel_size)
            total += self._positions(stop - 1) * weights
        return total

    def _positions(self, index: int) -> float:
        output = self.output_shapes[index]
        if output is not None:
            return math.prod(output) / self.layers[index].weight.shape[0]
        strides = [s for layer in self.layers[:index + 1] for s in getattr(layer, "stride", ())]
        return 1.0 / math.prod(strides)

    def fewest_macs(self) -> Split:
        """The split with the fewest MACs; at equal MACs the one with fewer layers."""
        return min(self.valid_splits(), key=lambda split: (self.macs(split), len(split)))


# --- Measured choices ---------------------------------------------------------------------------------------

def _channels_last_is_faster(model: nn.Module, example_input: Any) -> bool:
    """True when the model has 2-d convolutions and runs measurably faster in channels_last, as it is or with
    every 1x1 convolution a matrix product (which only channels_last allows, and which can make it win: a
    compressed ResNet-50 at 2 threads ran 41.8 ms as it is, 41.6 ms in channels_last and 38.0 ms so)."""
    candidates = memory_format_candidates(model, example_input)
    if len(candidates) == 1:
        return False
    device = next(model.parameters()).device
    as_is, *in_channels_last = time_modules(candidates, example_input, warmup=1, min_rounds=3, min_seconds=1.0,
                                            device=device)
    log.info("optimize_for_inference: whole model %.3f ms as it is, %s in channels_last", 1e3 * as_is,
             " and ".join(f"{1e3 * t:.3f} ms" for t in in_channels_last))
    return min(in_channels_last) < MEASURABLY_FASTER * as_is


def _candidates(chain: _Chain) -> list[Split]:
    """The splits worth timing: unsplit, fully merged, and the three with the fewest MACs."""
    splits = sorted(chain.valid_splits(), key=lambda split: (chain.macs(split), len(split)))
    n = len(chain.layers)
    wanted = [*splits[:3], tuple((i, i + 1) for i in range(n)), ((0, n),)]
    return [split for split in dict.fromkeys(wanted) if split in splits]


def _fastest_splits(chains: Sequence[_Chain], channels_last: bool, progress: bool) -> dict[_Chain, Split]:
    """For each chain the split that runs fastest at its input shape; the dense layer unless a factorized
    split is measurably faster. Chains the example input did not reach keep the fewest-MACs split."""
    chosen = {}
    for chain in tqdm(chains, desc="optimize_for_inference: timing layers", disable=not progress):
        candidates = _candidates(chain)
        if chain.input_shape is None or len(candidates) == 1:
            chosen[chain] = chain.fewest_macs()
            continue
        like = chain.layers[0].weight
        forms = copy.deepcopy([_build(chain.layers, split) for split in candidates])  # timing may change layouts
        times = time_modules_at(forms, chain.input_shape, dtype=like.dtype, device=like.device,
                                channels_last=channels_last, warmup=1, min_rounds=3, max_rounds=30, min_seconds=0.1)
        best = min(range(len(candidates)), key=times.__getitem__)
        dense = ((0, len(chain.layers)),)
        if dense in candidates and times[best] > MEASURABLY_FASTER * times[candidates.index(dense)]:
            best = candidates.index(dense)
        log.debug("optimize_for_inference: %s: %s -> %s", chain.paths[0],
                  ", ".join(f"{split} {1e6 * t:.0f} us" for split, t in zip(candidates, times)), candidates[best])
        chosen[chain] = candidates[best]
    return chosen


# --- 1x1 convolutions as matrix products ------------------------------------------------------------------------

class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution (stride 1, one group, no padding) that computes a ``channels_last`` input as one
    matrix product over the channels (``F.linear`` on its NHWC view); other inputs go through the convolution,
    and so does an ONNX export (a ``Conv`` node, which ONNX Runtime lays out itself).

    Same parameters and state dict as the ``nn.Conv2d`` it replaces. ``optimize_for_inference`` uses it where it
    times faster: with 2 threads at batch 1, oneDNN ran some of ResNet-50's 1x1 convolutions at 7 x 7 and
    14 x 14 in ``channels_last`` up to 2.5x slower than the matrix product (and slower than with 1 thread).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv2d:
        """A ``PointwiseConv2d`` sharing ``conv``'s weight and bias."""
        pointwise = cls(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None, device="meta")
        pointwise.weight, pointwise.bias = conv.weight, conv.bias
        return pointwise.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and not torch.onnx.is_in_onnx_export()):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


def _is_pointwise(module: nn.Module, shared: set[int]) -> bool:
    """A stock 1x1 ``nn.Conv2d`` that a :class:`PointwiseConv2d` reproduces, holding no tensor another module
    shares."""
    return (is_stock(module, (nn.Conv2d,)) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), "valid", "same")
            and not holds_shared(module, shared))


def _to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-d parameters and buffers in ``channels_last``, in place (``Module.to`` refuses a model
    that also has 5-d ones, such as a Conv3d's weight)."""
    return model._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


def memory_format_candidates(model: nn.Module, example_input: Any) -> list[nn.Module]:
    """``model`` itself, and for a model with 2-d convolutions the copies in ``channels_last`` that run on
    ``example_input``: as it is, and with every 1x1 convolution a matrix product (:func:`pointwise_products`).
    What the memory-format choice times; a copy that fails to run (``x.view`` of a ``channels_last`` tensor)
    is left out."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return [model]
    channels_last = _to_channels_last(copy.deepcopy(model))
    forms = [channels_last, pointwise_products(copy.deepcopy(channels_last))]
    return [model, *(form for form in forms if _runs(form, example_input))]


def _runs(model: nn.Module, example_input: Any) -> bool:
    try:
        with torch.no_grad():
            call_model(model, fresh_copy(example_input))
    except Exception as exc:  # noqa: BLE001 - a form that does not run is no candidate, whatever the reason
        log.debug("optimize_for_inference: a channels_last form does not run on the example input (%s: %s)",
                  type(exc).__name__, exc)
        return False
    return True


def pointwise_products(model: nn.Module) -> nn.Module:
    """``model`` (modified) with every 1x1 convolution a :class:`PointwiseConv2d`; returns the root (new if it was
    such a convolution). For timing what :func:`optimize_for_inference` can reach without timing each geometry."""
    paths, shared = module_paths(model), shared_tensors(model)
    for module in list(model.modules()):
        if _is_pointwise(module, shared):
            model = _put(model, paths[id(module)], PointwiseConv2d.from_conv(module))
    return model


def _fastest_pointwise(model: nn.Module, example_input: Any, progress: bool) -> tuple[str, ...]:
    """The paths of the 1x1 convolutions of ``model`` (in channels_last) that run measurably faster as
    :class:`PointwiseConv2d` at their input shapes, each distinct geometry timed once."""
    shapes = observe(model, example_input).shapes
    paths, shared = module_paths(model), shared_tensors(model)
    by_geometry: dict[tuple, list[nn.Conv2d]] = {}
    for module in model.modules():
        input_shape = shapes.get(id(module), (None, None))[0]
        if _is_pointwise(module, shared) and input_shape is not None and len(input_shape) == 4:
            key = (input_shape, tuple(module.weight.shape), module.bias is not None, module.weight.dtype,
                   module.weight.device)
            by_geometry.setdefault(key, []).append(module)
    chosen = []
    for (input_shape, _, _, dtype, device), convs in tqdm(
            by_geometry.items(), desc="optimize_for_inference: timing 1x1 convolutions", disable=not progress):
        conv = convs[0]
        times = time_modules_at([conv, PointwiseConv2d.from_conv(conv)], input_shape, dtype=dtype, device=device,
                                channels_last=True, warmup=1, min_rounds=3, max_rounds=30, min_seconds=0.1)
        log.debug("optimize_for_inference: 1x1 convolution %s at %s: %.0f us, as a matrix product %.0f us",
                  tuple(conv.weight.shape), input_shape, 1e6 * times[0], 1e6 * times[1])
        if times[1] < MEASURABLY_FASTER * times[0]:
            chosen += [paths[id(same)][0] for same in convs]
    return tuple(chosen)
