"""Calibration data: the input statistics of layers, for decompositions fitted to a layer's outputs.

A layer computes ``W x`` on the features ``x`` of its input (a Linear layer's input rows, a convolution's
unfolded patches). A data-aware decomposition needs the second moment ``E[x x^T]`` of those features over the
user's calibration batches: :func:`collect_input_stats` accumulates it with forward pre-hooks, keeping one
``F x F`` running sum per layer and never the activations. :func:`collect_output_moments` adds, for a
decomposition that asks, how much each direction of a layer's output moves the model's output. With a
:class:`TokenMask` (``settings.calibration_mask``), the padding tokens of the layers it covers are left out of both.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import attrs
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .components import InputStats, LayerSpec
from .dataflow import tracking_dependence
from .errors import ConfigError, MuscoError, UnsupportedLayerError, short_repr
from .factors import padding_per_axis
from .stats import parameters_kept
from .surgery import evaluating, replace_module, select_modules
from .timing import call_model, first_input, tensors_in

log = logging.getLogger(__name__)

#: Feature rows turned into float64 at once: bounds the transient copy to about 128 MiB per layer call.
CHUNK_ELEMENTS = 1 << 24


def forms_features(spec: LayerSpec) -> bool:
    """Whether input features of a layer of this geometry can be formed (Linear, 1-D or 2-D conv)."""
    return spec.spatial_dims <= 2


def check_geometry(spec: LayerSpec) -> None:
    """An UnsupportedLayerError unless input features of this geometry can be formed (:func:`forms_features`)."""
    if not forms_features(spec):
        raise UnsupportedLayerError(f"input features of a {spec.describe()}: only Linear layers and 1-D or 2-D "
                                    f"convolutions are supported (torch.nn.functional.unfold is 2-D)")


def input_features(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """The features ``(rows, F)`` a layer of geometry ``spec`` multiplies its weight with.

    For a Linear layer the rows of ``x`` (any rank, last axis the features); for a 1-D or 2-D convolution its
    unfolded patches after padding (``padding_mode`` honoured), channel-major as ``weight.reshape(out, -1)``
    orders them, so ``weight.reshape(out, -1) @ features.T`` is the convolution's output without bias.
    ``F = in_channels * kernel_numel``, all groups together.
    """
    check_geometry(spec)
    if spec.spatial_dims == 0:
        return x.reshape(-1, spec.in_channels)
    if x.dim() == spec.spatial_dims + 1:  # an unbatched input
        x = x.unsqueeze(0)
    pads = padding_per_axis(spec.padding, spec.kernel_size, spec.dilation)
    if any(before or after for before, after in pads):
        flat = [size for pair in reversed(pads) for size in pair]  # F.pad lists the last axis first
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x = F.pad(x, flat, mode=mode)
    kernel, dilation, stride = spec.kernel_size, spec.dilation, spec.stride
    if spec.spatial_dims == 1:  # a unit height axis turns it into a 2-D convolution
        x, kernel, dilation, stride = x.unsqueeze(-2), (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (batch, F, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@attrs.frozen
class TokenMask:
    """Which rows of the calibration data are padding, for the layers ``layers`` (module names).

    Every batch is a mapping whose ``key`` holds a ``(batch, tokens)`` tensor of 1 (a real token) and 0 (padding),
    as a tokenizer's ``attention_mask``. A layer in ``layers`` must take ``(batch, tokens, features)`` inputs (and
    give ``(batch, tokens, out)`` outputs) of that batch and token shape; only the rows of real tokens,
    ``x[mask.bool()]``, enter its statistics: the input and cross moments and the output moment. Padding
    otherwise biases the fit towards inputs the model's real tokens never see (a batch of sentences of 3 and 8
    tokens padded to 8 counts 16 rows for 11 real ones). Anything else is one ConfigError.
    """

    key: str
    layers: frozenset[str]
    #: The batches' masks in order (from :meth:`of`), where the batches do not hold them: the hidden states that
    #: :func:`~musco_core.blockwise.compress_blockwise` carries from block to block.
    carried: tuple[torch.Tensor, ...] | None = attrs.field(default=None, eq=False)

    def of(self, batch: Any, index: int) -> torch.Tensor:
        """The mask of ``batch`` (the ``index``-th) as a bool tensor, checked."""
        if self.carried is not None:
            return self.carried[index]
        where = f"calibration_mask: batch {index}"
        if not isinstance(batch, Mapping):
            raise ConfigError(f"{where} is a {type(batch).__name__}; the mask is read from its key {self.key!r}, "
                              f"so every batch must be a mapping (the model called as model(**batch))")
        if self.key not in batch:
            raise ConfigError(f"{where} has no key {self.key!r} (its keys: {short_repr(sorted(map(str, batch)))}); "
                              f"expected the (batch, tokens) mask of real tokens (1) and padding (0) there")
        mask = batch[self.key]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_complex():
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(f"{where}: {self.key!r} is {shape}; expected a (batch, tokens) tensor of 1 (a real "
                              f"token) and 0 (padding)")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ConfigError(f"{where}: {self.key!r} holds values other than 0 and 1; expected 1 for a real token "
                              f"and 0 for padding")
        return mask.bool()

    def check_layer(self, model: nn.Module, name: str, spec: LayerSpec) -> None:
        """A ConfigError unless the layer ``name`` it covers can take batch-first token inputs: not a convolution,
        nor inside or next to a module with ``batch_first=False`` (the attention of torch's Transformer layers, which
        run on (tokens, batch, features): the mask would pick the wrong rows where the two counts are equal)."""
        if spec.spatial_dims:
            raise ConfigError(f"calibration_mask: layer {name!r} is a {spec.describe()}, whose inputs have no token "
                              f"axis to mask; it covers layers of (batch, tokens, features) inputs: leave it out of "
                              f"calibration_mask.layers")
        parts = name.split(".")
        owners = [".".join(parts[:end]) for end in range(len(parts))]
        parent = owners[-1]
        siblings = [f"{parent}.{child}".lstrip(".") for child, _ in model.get_submodule(parent).named_children()]
        for other in owners + siblings:
            if getattr(model.get_submodule(other), "batch_first", True) is False:
                raise ConfigError(f"calibration_mask: layer {name!r} runs beside {other or type(model).__name__!r}, "
                                  f"which has batch_first=False: its inputs are (tokens, batch, features), not the "
                                  f"mask's (batch, tokens); leave it out of calibration_mask.layers")

    def check_shape(self, name: str, tensor: torch.Tensor, mask: torch.Tensor, index: int, what: str = "input"
                    ) -> None:
        """A ConfigError unless ``tensor`` (an input or output of layer ``name``) is ``(batch, tokens, features)``
        of the ``mask``'s batch and token shape."""
        if tensor.dim() != 3 or tensor.shape[:2] != mask.shape:
            raise ConfigError(f"calibration_mask: layer {name!r} got an {what} of shape {tuple(tensor.shape)} on "
                              f"batch {index}, where the mask {self.key!r} is {tuple(mask.shape)}; a masked layer "
                              f"needs (batch, tokens, features) {what}s of the mask's shape: leave it out of "
                              f"calibration_mask.layers")

    def rows(self, name: str, tensor: torch.Tensor, mask: torch.Tensor, index: int, what: str = "input"
             ) -> torch.Tensor:
        """The ``(real tokens, features)`` rows of a ``(batch, tokens, features)`` ``tensor`` of layer ``name``."""
        self.check_shape(name, tensor, mask, index, what)
        return tensor[mask.to(tensor.device)]


def token_mask(model: nn.Module, setting: Any) -> TokenMask | None:
    """The :class:`TokenMask` of a :class:`~musco_core.schedule.CalibrationMask` setting on ``model`` (None for
    None): it covers the modules its ``layers`` name and every module inside them."""
    if setting is None:
        return None
    chosen = select_modules(model, setting.layers, "calibration_mask.layers")
    return TokenMask(setting.key, frozenset(name for name, _ in model.named_modules()
                                            if any(name == top or name.startswith(top + ".") for top in chosen)))


class InputStatsAccumulator:
    """Running float64 sums over the features of one layer's inputs: ``x^T x``, and with reference inputs
    ``x_ref^T x`` (sequential calibration). All it keeps is ``F x F`` sums and a row count."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.total: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.count = 0

    def _chunks(self, x: torch.Tensor):
        """``x`` split along its first axis so each chunk's float64 features hold about :data:`CHUNK_ELEMENTS`."""
        n_features = self.spec.in_channels * self.spec.kernel_numel
        # a conv item gives at most about one row per input position (fewer with stride)
        if self.spec.spatial_dims == 0:
            outer, rows_per_item = x.reshape(-1, self.spec.in_channels), 1
        else:
            outer = x if x.dim() == self.spec.spatial_dims + 2 else x.unsqueeze(0)
            rows_per_item = math.prod(outer.shape[2:])
        return outer.split(max(1, CHUNK_ELEMENTS // (n_features * max(1, rows_per_item))))

    def update(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Adds the features of one input ``x`` of the layer (and of the input ``reference`` the layer had at the
        same place before the layers ahead of it were compressed)."""
        pairs = zip(self._chunks(x), self._chunks(reference) if reference is not None else repeat(None))
        for chunk, reference_chunk in pairs:
            features = input_features(self.spec, chunk).to(torch.float64)
            if self.total is None:
                self.total = features.new_zeros(features.shape[1], features.shape[1])
            self.total.addmm_(features.T, features)
            if reference_chunk is not None:
                if self.cross is None:
                    self.cross = torch.zeros_like(self.total)
                self.cross.addmm_(input_features(self.spec, reference_chunk).to(torch.float64).T, features)
            self.count += features.shape[0]

    def result(self) -> InputStats:
        if self.total is None or self.count == 0:
            raise ValueError("no input was seen")
        # in place: an F x F float64 sum can be hundreds of MiB; the accumulator is done with it
        return InputStats(self.total.div_(self.count), self.count,
                          None if self.cross is None else self.cross.div_(self.count))


def check_reiterable(batches: Any, what: str = "calibration data") -> None:
    """A ConfigError unless ``batches`` can be iterated again (a list or DataLoader, not an iterator).

    Told by type alone: iterating a DataLoader would draw its seed from the caller's random state (and start its
    workers)."""
    if not isinstance(batches, Iterable) or isinstance(batches, (torch.Tensor, str, bytes, Mapping)):
        raise ConfigError(f"{what}: expected an iterable of input batches (a list or a DataLoader), "
                          f"got {type(batches).__name__}")
    if isinstance(batches, Iterator):
        raise ConfigError(f"{what}: got an iterator ({type(batches).__name__}), which is used up after one pass; "
                          f"pass a list or a DataLoader, which can be iterated at every compression step")


def _modules(model: nn.Module, layers: Mapping[str, LayerSpec], mask: TokenMask | None = None
             ) -> dict[str, nn.Module]:
    modules = {}
    for name, spec in layers.items():
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"calibration: no layer {name!r} in {type(model).__name__}") from None
        try:
            check_geometry(spec)
        except UnsupportedLayerError as exc:
            raise UnsupportedLayerError(f"calibration: layer {name!r}: {exc}") from None
        if mask is not None and name in mask.layers:
            mask.check_layer(model, name, spec)
    return modules


class _Recorded(Exception):
    """Ends a forward pass once the layers it was run for have seen their input."""


@contextlib.contextmanager
def _calibration_pass(model: nn.Module):
    """Eval mode and no_grad for the passes inside, every module's training flag restored afterwards."""
    with evaluating(model), torch.no_grad():
        yield


@contextlib.contextmanager
def _model_failure(stage: str, index: int):
    """An error of the user's batch or model (not one of ours) as one ConfigError naming the batch, cause chained."""
    try:
        yield
    except MuscoError:
        raise
    except Exception as exc:
        raise ConfigError(f"{stage}: the model failed on batch {index}: {type(exc).__name__}: {exc}") from exc


def _inputs(model: nn.Module, modules: Mapping[str, nn.Module], batch: Any, index: int, *,
            once: Collection[str] = (), mask: TokenMask | None = None) -> dict[str, list[torch.Tensor]]:
    """The inputs each module receives when the model runs on ``batch`` (one per call, in order), the modules in the
    order they first ran (a module that did not run is missing); with a ``mask``, those of the modules it covers as
    the rows of real tokens only.

    A module in ``once`` has its first call recorded only; when all are, the pass ends once each has run, so the
    rest of the model does not run.
    """
    seen: dict[str, list[torch.Tensor]] = {}  # in the order of the modules' first calls
    stops = set(modules) <= set(once)
    real = mask.of(batch, index) if mask is not None else None

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in once and name in seen:
                return
            x = first_input(module, args, kwargs)
            if not isinstance(x, torch.Tensor):
                raise ConfigError(f"calibration: layer {name!r} was called without an input tensor, as its first "
                                  f"argument or as the keyword of its forward's first parameter")
            if real is not None and name in mask.layers:
                seen.setdefault(name, []).append(mask.rows(name, x.detach(), real, index))  # a copy already
            else:
                seen.setdefault(name, []).append(x.detach().clone())  # the model may change it in place later
            if stops and len(seen) == len(modules):
                raise _Recorded
        return record

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, module in modules.items()]
    try:
        with _model_failure("calibration", index), parameters_kept(model, f"calibration batch {index}"):
            try:
                call_model(model, batch)
            except _Recorded:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _bar(batches: Iterable[Any], what: str, progress: bool):
    return tqdm(batches, desc=what, unit="batch", leave=False, file=sys.stderr,
                disable=not (progress and sys.stderr.isatty()))


def _empty(what: str, names: Iterable[str]) -> ConfigError:
    return ConfigError(f"calibration data is empty: no batch to collect the {what} of {', '.join(map(repr, names))}")


def _results(accumulators: Mapping[str, InputStatsAccumulator], n_batches: int, mask: TokenMask | None = None
             ) -> dict[str, InputStats]:
    if n_batches == 0:
        raise _empty("input statistics", accumulators)
    silent = [name for name, acc in accumulators.items() if acc.count == 0]
    if silent:
        masked = " or calibration_mask left them no real token" if mask and set(silent) & mask.layers else ""
        raise ConfigError(f"calibration: layer(s) {', '.join(map(repr, silent))} never ran on the {n_batches} "
                          f"calibration batch(es){masked}; check that the batches reach them")
    stats = {name: acc.result() for name, acc in accumulators.items()}
    broken = [name for name, s in stats.items() if not torch.isfinite(s.second_moment).all()
              or s.cross_moment is not None and not torch.isfinite(s.cross_moment).all()]
    if broken:
        raise ConfigError(f"calibration: the inputs of layer(s) {', '.join(map(repr, broken))} contain NaN or Inf")
    return stats


def collect_input_stats(model: nn.Module, layers: Mapping[str, LayerSpec], batches: Iterable[Any], *,
                        progress: bool = True, group: distributed.Group | None = None,
                        mask: TokenMask | None = None) -> dict[str, InputStats]:
    """The input statistics of the named layers over ``batches``, from one pass of ``model`` over them (those
    ``mask`` covers over their real tokens only).

    A batch is called as ``model(batch)``, ``model(*batch)`` for a tuple or list, ``model(**batch)`` for a
    mapping. The pass runs in eval mode under ``no_grad``; every module's training flag is restored and the
    hooks are removed afterwards, also on error. Memory is one ``F x F`` float64 sum per layer, on its device.
    With a distributed ``group`` each rank passes its own shard of the batches and the sums are added up over the
    ranks before they are normalized: every rank gets the statistics of all the shards.
    """
    check_reiterable(batches)
    modules = _modules(model, layers, mask)
    accumulators = {name: InputStatsAccumulator(spec) for name, spec in layers.items()}
    n_batches = 0
    with distributed.agreement(group, "input statistics"), _calibration_pass(model):
        for batch in _bar(batches, "calibration", progress):
            for name, inputs in _inputs(model, modules, batch, n_batches, mask=mask).items():
                for x in inputs:
                    accumulators[name].update(x)
            n_batches += 1
    n_batches = distributed.sum_moments(group, accumulators, n_batches)
    stats = _results(accumulators, n_batches, mask)
    log.info("calibration: input statistics of %d layer(s) from %d batch(es)", len(stats), n_batches)
    return stats


def forward_order(model: nn.Module, names: Iterable[str], batches: Iterable[Any]) -> list[str]:
    """The named layers in the order the model first runs them on the first calibration batch (layers it does not
    run there come last, in the given order)."""
    names = list(names)
    return _traced_pass(model, names, _first_batch(names, batches), tracked=False)[0]


def layer_dataflow(model: nn.Module, names: Iterable[str], batches: Iterable[Any]
                   ) -> tuple[list[str], dict[str, list[str]]]:
    """:func:`forward_order`, and for each named layer, over passes on every calibration batch, the named layers
    whose outputs or weights its inputs may have been computed from (:class:`~musco_core.dataflow.Dependence`, which
    errs towards more): a forward may take another path on another batch (a branch on the input's values or shape),
    and the statistics are taken on all of them. A layer the model did not run, or every layer of a model the
    tracking cannot run through, has no entry. JSON data (a distributed job sends it)."""
    names = list(names)
    order, sources = None, {}
    for index, batch in enumerate(batches):
        # around both tries: a forward that changed its weights in the first may not change them again in the second
        with parameters_kept(model, f"calibration batch {index}"):
            try:
                batch_order, found = _traced_pass(model, names, batch, tracked=True, index=index)
            except Exception as exc:  # noqa: BLE001 - the model's own failure is raised by a pass without tracking
                if order is None:
                    order = _traced_pass(model, names, batch, tracked=False)[0]
                log.info("calibration: the data flow between the layers cannot be tracked on batch %d (%s: %s): each "
                         "is calibrated on its own passes", index, type(exc).__name__, exc)
                return order, {}
        order = batch_order if order is None else order
        for name, more in found.items():
            sources[name] = sorted(set(sources.get(name, ())) | set(more))
    if order is None:
        raise _empty("input statistics", names)
    return order, sources


def _first_batch(names: Sequence[str], batches: Iterable[Any]) -> Any:
    try:
        return next(iter(batches))
    except StopIteration:
        raise _empty("input statistics", names) from None


def _traced_pass(model: nn.Module, names: Sequence[str], batch: Any, *, tracked: bool, index: int = 0
                ) -> tuple[list[str], dict[str, list[str]]]:
    """The named layers in the order ``batch`` (the ``index``-th) runs them and, ``tracked``, the layers each one's
    inputs may depend on there (see :func:`layer_dataflow`)."""
    modules = {name: model.get_submodule(name) for name in names}
    sources: dict[str, set[str]] = {}

    def hook(name: str):
        def look(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = first_input(module, args, kwargs)
            sources.setdefault(name, set()).update(tracker.of(x) if isinstance(x, torch.Tensor) else names)
        return look

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, module in modules.items()] if tracked else []
    try:
        with _calibration_pass(model), (tracking_dependence({name: [module] for name, module in modules.items()})
                                        if tracked else contextlib.nullcontext()) as tracker:
            order = list(_inputs(model, modules, batch, index))
    finally:
        for handle in handles:
            handle.remove()
    order = sorted(names, key=lambda name: order.index(name) if name in order else len(order))
    return order, {name: sorted(found) for name, found in sources.items()}


def collect_sequential_stats(model: nn.Module, layers: Mapping[str, LayerSpec], replacements: Mapping[str, nn.Module],
                             batches: Iterable[Any], *, progress: bool = True,
                             reference_batches: Iterable[Any] | None = None,
                             group: distributed.Group | None = None, mask: TokenMask | None = None
                             ) -> dict[str, InputStats]:
    """The statistics of each named layer's inputs in the model with ``replacements`` (``{path: module}``) swapped
    in, paired with its inputs in the model as it is (the reference), over ``batches``: ``second_moment`` of the
    first, ``cross_moment`` of both (see :class:`~musco_core.components.InputStats`).

    Each batch is drawn once and runs through both models (so the pairs match under a shuffling DataLoader or
    random augmentation), up to the layers only when each runs once per pass; with no replacement (and no
    ``reference_batches``) the inputs are the reference's, from one pass. The layers are calibrated together, as
    each would be alone: the caller names layers whose inputs do not depend on one another's replacement
    (:func:`layer_dataflow`). The model is as it was afterwards, also on error; memory is two ``F x F`` float64
    sums per layer and one batch's inputs of the layers. ``reference_batches``, one per batch, are what the
    reference pass runs on instead (the inputs a block of the model had before the blocks ahead of it were
    compressed, see :mod:`musco_core.blockwise`). With a distributed ``group`` the sums are added up over the
    ranks' shards, as in :func:`collect_input_stats`; a ``mask`` keeps the real tokens' rows of both inputs, as
    there.
    """
    check_reiterable(batches)
    if reference_batches is None:  # each batch drawn once: a shuffling or augmenting loader pairs the same items
        pairs = ((batch, batch) for batch in batches)
    else:
        check_reiterable(reference_batches, "reference batches")
        pairs = zip(batches, reference_batches, strict=True)
    modules = _modules(model, layers, mask)
    originals = {path: model.get_submodule(path) for path in replacements}
    accumulators = {name: InputStatsAccumulator(spec) for name, spec in layers.items()}
    described = ", ".join(map(repr, layers))
    n_batches, once = 0, set()
    with distributed.agreement(group, f"input statistics of {described}"), _calibration_pass(model):
        for batch, reference_batch in _bar(pairs, f"calibration of {', '.join(layers)}", progress):
            reference = _inputs(model, modules, reference_batch, n_batches, once=once, mask=mask)
            actual = reference  # nothing swapped in: the inputs are the reference's
            if replacements or reference_batches is not None:
                try:
                    for path, module in replacements.items():
                        replace_module(model, path, module)
                    actual = _inputs(model, modules, batch, n_batches, once=once, mask=mask)
                finally:
                    for path, module in originals.items():
                        replace_module(model, path, module)
            for name, accumulator in accumulators.items():
                xs, x_refs = actual.get(name, []), reference.get(name, [])
                if len(xs) != len(x_refs):
                    raise ConfigError(f"calibration: layer {name!r} ran {len(x_refs)} time(s) on batch {n_batches} "
                                      f"before compressing the layers ahead of it and {len(xs)} after")
                for x, x_ref in zip(xs, x_refs):
                    accumulator.update(x, x_ref)
            # from the second batch on, a layer that ran once has its first call recorded only, and a pass stops
            # once all ran, where each did: a layer called more often may be called a different number of times
            # per batch (a cell looped over its length)
            once = {name for name in layers if len(reference.get(name, ())) == 1} if n_batches == 0 else once
            n_batches += 1
    n_batches = distributed.sum_moments(group, accumulators, n_batches)
    return _results(accumulators, n_batches, mask)


# --- output statistics: how much a layer's output directions move the model's output ----------------------------

def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output that depend on parameters."""
    return [tensor for tensor in tensors_in(output) if tensor.is_floating_point() and tensor.requires_grad]


def _output_rows(spec: LayerSpec, gradient: torch.Tensor) -> torch.Tensor:
    """A layer's output gradient as float64 rows of its ``out_channels`` (one row per token or position)."""
    if spec.spatial_dims:
        gradient = gradient.movedim(1 if gradient.dim() == spec.spatial_dims + 2 else 0, -1)
    return gradient.reshape(-1, spec.out_channels).to(torch.float64)


@contextlib.contextmanager
def _gradient_pass(model: nn.Module, modules: Mapping[str, nn.Module]):
    """Eval mode with gradients on, the named layers' parameters (a factorized layer's factors too) requiring grad
    so their outputs are in the graph; training flags and ``requires_grad`` restored afterwards. No parameter's
    ``.grad`` is written."""
    weights = {id(p): p for module in modules.values() for p in module.parameters()}
    flags = {key: weight.requires_grad for key, weight in weights.items()}
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
        with evaluating(model), torch.enable_grad():
            yield
    finally:
        for key, weight in weights.items():
            weight.requires_grad_(flags[key])


def collect_output_moments(model: nn.Module, layers: Mapping[str, LayerSpec], batches: Iterable[Any], *,
                           projections: int = 1, seed: int = 0, progress: bool = True,
                           group: distributed.Group | None = None, mask: TokenMask | None = None
                           ) -> dict[str, torch.Tensor]:
    """``E[g g^T]`` (``out x out``, float64, per row of the layer's output) of each named layer, where ``g`` is the
    gradient with respect to the layer's output of the model's output projected on a random direction.

    Per batch, one forward pass and ``projections`` backward passes: each time every floating-point tensor of the
    output is multiplied by Gaussian noise drawn from ``seed`` and summed, so that in expectation
    ``E[g g^T] = E[J^T J]`` with ``J`` the Jacobian of the model's output with respect to the layer's: the
    Gauss-Newton metric of a squared error on the output, which a decomposition can weigh the layer's output
    error with. The estimate needs many more projections in all (batch items times ``projections``) than the
    output has dimensions per item. The model runs on with a copy of each layer's output, so an in-place operation
    after the layer (``ReLU(inplace=True)``) leaves the output the gradient is taken at as the layer gave it. Runs in
    eval mode; memory is one ``out x out`` float64 sum per layer plus one batch's backward pass (with that copy).
    With a distributed ``group`` the sums are added up over the ranks, as in :func:`collect_input_stats`; each rank
    draws its noise from its own seed (:func:`~musco_core.distributed.rank_seed`, ``seed`` on rank 0). A layer
    ``mask`` covers counts the rows of its real tokens only.
    """
    if projections < 1:
        raise ValueError(f"projections must be a positive int, got {projections!r}")
    check_reiterable(batches)
    modules = _modules(model, layers, mask)
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    rows = dict.fromkeys(layers, 0)
    generator = torch.Generator().manual_seed(distributed.rank_seed(seed, group.rank if group is not None else 0))
    n_batches = 0
    with distributed.agreement(group, "output statistics"), _gradient_pass(model, modules):
        for batch in _bar(batches, "output statistics", progress):
            outputs: list[tuple[str, torch.Tensor]] = []
            real = mask.of(batch, n_batches) if mask is not None else None

            def hook(name: str):
                def record(module: nn.Module, inputs: tuple, output: Any) -> Any:
                    if isinstance(output, torch.Tensor) and output.requires_grad:
                        if real is not None and name in mask.layers:
                            mask.check_shape(name, output, real, n_batches, "output")  # before the backward pass
                        outputs.append((name, output))
                        return output.clone()  # what follows gets a copy: an in-place op (ReLU) cannot overwrite it
                    return None
                return record

            handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
            try:
                with (_model_failure("output statistics", n_batches),
                      parameters_kept(model, f"calibration batch {n_batches}")):
                    tensors = _output_tensors(call_model(model, batch))
            finally:
                for handle in handles:
                    handle.remove()
            if not tensors:
                raise ConfigError(f"output statistics: the model's output on batch {n_batches} holds no "
                                  f"floating-point tensor that depends on its weights")
            for draw in range(projections):  # each draw added up at once: one draw's gradients held at a time
                projected = sum((tensor * torch.randn(tensor.shape, generator=generator, dtype=torch.float32
                                                      ).to(tensor)).sum() for tensor in tensors)
                with _model_failure("output statistics", n_batches):
                    gradients = torch.autograd.grad(projected, [output for _, output in outputs], allow_unused=True,
                                                    retain_graph=draw < projections - 1)
                for (name, _), gradient in zip(outputs, gradients):
                    if gradient is None:
                        continue
                    gradient = gradient.detach()
                    if real is not None and name in mask.layers:
                        gradient = mask.rows(name, gradient, real, n_batches, "output")
                    g = _output_rows(layers[name], gradient)
                    sums[name] = g.T @ g if sums[name] is None else sums[name].addmm_(g.T, g)
                    rows[name] += g.shape[0]
            n_batches += 1
    names = list(layers)
    counts = distributed.sum_counts(group, [n_batches] + [rows[name] for name in names])
    if group is not None:
        for name in names:
            size = layers[name].out_channels
            total = sums[name] if sums[name] is not None else torch.zeros(size, size, dtype=torch.float64)
            sums[name] = distributed.sum_tensor(group, total)
    if counts[0] == 0:
        raise _empty("output statistics", names)
    silent = [name for name, count in zip(names, counts[1:]) if count == 0]
    if silent:
        raise ConfigError(f"output statistics: the model's output does not depend on layer(s) "
                          f"{', '.join(map(repr, silent))} on the {counts[0]} calibration batch(es) (never run, or "
                          f"their output is not used)")
    moments = {name: sums[name].div_(count) for name, count in zip(names, counts[1:])}
    broken = [name for name, moment in moments.items() if not torch.isfinite(moment).all()]
    if broken:
        raise ConfigError(f"output statistics: the gradients at layer(s) {', '.join(map(repr, broken))} contain NaN "
                          f"or Inf")
    log.info("calibration: output statistics of %d layer(s) from %d batch(es)", len(moments), counts[0])
    return moments
