"""The public plugin API: the four component roles and the value types they exchange.

A plugin supplies component *classes* (see :mod:`musco_core.hookspecs`). Each class declares a ``name`` and a
``Params`` attrs class with its typed parameters; the core instantiates it with no arguments.

* :class:`Decomposer` turns a weight into a chain of factors (plain tensor math, no modules).
* :class:`RankSelector` chooses the ranks of a decomposition for one layer at one stage.
* :class:`LayerAdapter` reads a module type into a :class:`LayerSpec` and builds modules from factors.
* :class:`Scheduler` decides which layers are compressed at each compression step.

It imports nothing from the rest of musco-core but its errors, so a plugin (and every core module) can import it
without pulling in the engine; the arithmetic a value needs from the core (composing factors, pricing ranks) is
handed in as a function by the core.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import attrs
import torch
from torch import nn

from .errors import UnsupportedLayerError

#: Version of the plugin API below; plugins can require ``musco_core.PLUGIN_API_VERSION >= (3, 0)``.
#: 1.1 added calibration data: ``WeightSource.input_stats`` and ``Decomposer.needs_input_stats``.
#: 2.0: ``RankSelector.check_layer`` takes the ``range`` of stages still to run instead of their count; a whole-model
#: selector may be offered several decompositions per layer and answers with ``Allocation.decompositions``.
#: 2.1: a whole-model selector may ask for measured times (:meth:`RankSelector.measures_latency`): the core then
#: gives :meth:`LayerChoice.seconds` and ``ModelTotals.seconds_*``.
#: 2.2 added, additively, ``Decomposer.output_errors`` (the budget's data-aware damage).
#: 3.0: :meth:`RankSelector.allocate` gets a :class:`RankRounding` (``rounding``) instead of an int ``rank_multiple``
#: (``settings.rank_multiple: auto`` rounds ranks by device type); ``RankSelector.hardware_rounding`` and
#: ``WeightSource.stored_weight`` added.
#: 3.1 added, additively, :meth:`Decomposer.output_projections` and ``InputStats.output_moment``.
#: 3.2 added, additively, ``RankRounding.free_from``: under ``auto`` a whole-model selector's candidates from twice
#: the multiple up all round to it.
#: 3.3 added, additively, :meth:`RankSelector.times_optimized` (latency plans for the deployed form).
#: 3.4 added, additively, :meth:`RankSelector.counts_macs` (a target on MACs is refused without them, at once).
#: 3.5 added, additively, :meth:`RankSelector.shortfall`.
#: 3.6 added, additively, ``WeightSource.params``: the decomposition's ``Params`` of the run, so that the spectra a
#: selector prices (:meth:`Decomposer.rank_matrices`, :meth:`Decomposer.output_errors`) are of the fit delivered.
#: 3.7 added, additively, ``LayerChoice.tied_params``: weights of a forced tied layer that stay in the model.
#: 3.8 added, additively, :meth:`Decomposer.min_ranks` (a rank floor never above the dimension it limits).
PLUGIN_API_VERSION = (3, 8)


@attrs.frozen
class NoParams:
    """Parameter class of a component that takes no parameters."""


class Cost(NamedTuple):
    """What a layer (or its factor chain) costs: weights, and multiply-accumulates on the example input (None when
    no input shape is known)."""

    params: int
    macs: int | None = None

    def smaller_than(self, other: Cost) -> bool:
        """The one rule for "this makes the layer smaller": fewer weights, and fewer MACs wherever both are known."""
        return self.params < other.params and (self.macs is None or other.macs is None or self.macs < other.macs)


def round_ranks(ranks: Sequence[int], multiple: int, limits: Sequence[int] | None = None, *,
                max_growth: float | None = None, free_from: int | None = None) -> tuple[int, ...]:
    """The one rank-rounding rule: each rank up to a multiple of ``multiple`` (at least one multiple), then clamped
    to the layer's ``limits`` when given (and to 1). Rounding up never gives a layer less than the rank asked for.
    With ``max_growth``, a rank that rounding up would grow by more than that fraction of it stays as it is, unless
    it is at least ``free_from``."""
    def up(rank: int) -> int:
        rounded = max(multiple, -(-rank // multiple) * multiple)
        bounded = max_growth is not None and (free_from is None or rank < free_from)
        return rank if bounded and rounded - rank > max_growth * rank else rounded

    rounded = [up(rank) for rank in ranks]
    if limits is not None:
        rounded = [min(rank, limit) for rank, limit in zip(rounded, limits, strict=True)]
    return tuple(max(1, rank) for rank in rounded)


#: ``settings.rank_multiple: auto``: the multiple that runs fast on each device type. CPU: oneDNN and MKL work in
#: blocks of 8 and 16 floats; rounding a rank up to a multiple of 8 (by at most a quarter) made factor chains
#: 5-35% faster in ``channels_last`` (``benchmarks/rank_multiple.py``, docs/benchmarks.md). CUDA: tensor cores
#: want matrix dimensions in multiples of 8 (NVIDIA's performance guide). Other device types are not rounded.
HARDWARE_RANK_MULTIPLES = {"cpu": 8, "cuda": 8}
#: Under ``auto``, a rank is rounded up only where that grows it by at most this fraction: smaller ranks lose
#: more speed to the extra channels than the multiple gains them.
AUTO_MAX_GROWTH = 0.25


@attrs.frozen
class RankRounding:
    """How ranks are rounded before they are clamped to a layer: :func:`round_ranks` with these arguments."""

    multiple: int = 1
    max_growth: float | None = None
    free_from: int | None = None

    @classmethod
    def of(cls, rank_multiple: int | str, device: torch.device, hardware: bool = True,
           whole_model: bool = False) -> RankRounding:
        """The rounding ``settings.rank_multiple`` means for weights on ``device``: an int rounds every rank up to
        it; ``"auto"`` rounds ranks up to the device type's :data:`HARDWARE_RANK_MULTIPLES` where that grows them
        by at most :data:`AUTO_MAX_GROWTH`, unless ``hardware`` is False (ranks the user gave, e.g. ``manual``, or
        the largest within a rate, ``param_reduction``).

        ``whole_model``: the ranks are the candidates a whole-model selector prices and chooses among to meet its
        target, so under ``"auto"`` every one from twice the multiple up rounds up however far: a rank just above
        a multiple runs about as slowly as the next multiple while counting fewer FLOPs, and a budget that could
        choose it would buy FLOPs that save no time (docs/benchmarks.md, "Rank multiples"). Smaller ranks keep
        the bounded rule, so that budgets over small layers (tens of channels) still have ranks to land with."""
        if rank_multiple != "auto":
            return cls(int(rank_multiple))
        if not hardware:
            return cls()
        multiple = HARDWARE_RANK_MULTIPLES.get(torch.device(device).type, 1)
        return cls(multiple, AUTO_MAX_GROWTH, 2 * multiple if whole_model else None)

    def __call__(self, ranks: Sequence[int], limits: Sequence[int] | None = None) -> tuple[int, ...]:
        return round_ranks(ranks, self.multiple, limits, max_growth=self.max_growth, free_from=self.free_from)


@attrs.frozen(eq=False)
class InputStats:
    """Second moment ``E[x x^T]`` (uncentered, float64, ``F x F``) of a layer's input features over ``count`` rows.

    Features are ordered as the layer's ``weight.reshape(out, -1)`` columns: input channel, then kernel position
    (see :mod:`musco_core.calibration`, which collects them). ``cross_moment`` is ``E[x_ref x^T]`` when the layer's
    inputs ``x`` come from a model whose earlier layers were already compressed and ``x_ref`` are the inputs the
    layer had before (sequential calibration): a decomposition then fits ``W x_ref`` from ``x``, so it also
    corrects the error of the layers before it. None means ``x_ref = x``.

    ``output_moment`` (``out x out``), collected only for a decomposer whose :meth:`Decomposer.output_projections`
    asks for it, is ``E[g g^T]`` of the gradients ``g`` of the model's output, projected on random directions,
    with respect to the layer's output (the Gauss-Newton metric of the output at that layer): how much each
    direction of the layer's output moves the model's. None when not collected.
    """

    second_moment: torch.Tensor
    count: int
    cross_moment: torch.Tensor | None = None
    output_moment: torch.Tensor | None = None

    @property
    def n_features(self) -> int:
        return self.second_moment.shape[0]

    def group(self, g: int, groups: int) -> InputStats:
        """The statistics of group ``g``'s input features (the contiguous ``g``-th of ``groups`` blocks)."""
        if groups < 1 or self.n_features % groups or not 0 <= g < groups:
            raise ValueError(f"group {g} of {groups}: {self.n_features} features do not split into {groups} groups")

        def block(moment: torch.Tensor | None) -> torch.Tensor | None:
            """The ``g``-th of ``groups`` diagonal blocks of a moment (input or output features)."""
            if moment is None:
                return None
            size = moment.shape[0] // groups
            return moment[g * size:(g + 1) * size, g * size:(g + 1) * size]

        return InputStats(block(self.second_moment), self.count, block(self.cross_moment), block(self.output_moment))


@attrs.frozen
class LayerSpec:
    """Geometry of a layer, independent of its weights.

    Linear layers have an empty ``kernel_size``; convolutions carry one entry per spatial axis.
    ``padding`` is a tuple of ints or one of torch's strings (``"same"``, ``"valid"``).
    """

    adapter: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    has_bias: bool = False

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def is_pointwise(self) -> bool:
        """True for Linear layers and convolutions whose kernel is 1 on every axis."""
        return self.kernel_numel == 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def n_weights(self) -> int:
        return math.prod(self.weight_shape)

    def describe(self) -> str:
        kernel = "x".join(map(str, self.kernel_size)) or "dense"
        return f"{self.adapter} {self.in_channels}->{self.out_channels} kernel {kernel}, groups {self.groups}"


@attrs.frozen
class FactorLayout:
    """Shape of one layer in a factorized chain.

    The weight has conv layout ``(out, in // groups, *kernel)``, with one kernel entry per spatial axis of the
    original layer (size 1 on axes the factor does not convolve). ``axes`` lists the spatial axes whose stride,
    padding and dilation this factor applies; every axis of the original layer is owned by exactly one factor.
    ``bias`` marks the factor that carries the original layer's bias.
    """

    out_channels: int
    in_channels: int
    kernel_size: tuple[int, ...] = ()
    groups: int = 1
    axes: tuple[int, ...] = ()
    bias: bool = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def n_params(self) -> int:
        return math.prod(self.weight_shape)

    @classmethod
    def pointwise(cls, spec: LayerSpec, out_channels: int, in_channels: int, *, owns_geometry: bool = False,
                  bias: bool = False) -> FactorLayout:
        """A 1x1 (or dense) factor; ``owns_geometry`` gives it every axis (valid when no factor before it convolves)."""
        axes = tuple(range(spec.spatial_dims)) if owns_geometry else ()
        return cls(out_channels, in_channels, (1,) * spec.spatial_dims, 1, axes, bias)


@attrs.frozen(eq=False)
class Factor:
    """A factor with its weights, as built into a module by a :class:`LayerAdapter`."""

    layout: FactorLayout
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@attrs.define(eq=False)
class WeightSource:
    """What a decomposer factorizes: a layer's dense weight, or the factors of an earlier stage.

    ``previous`` names the decomposition that produced ``factors`` when the layer was compressed before;
    a decomposer may re-compress its own factors directly (e.g. Tucker2 re-decomposes only its core) or fall
    back to :attr:`weight`, the dense weight rebuilt from the factors. ``dense`` is that weight, or a function
    that computes it when first asked (the core passes one, as rebuilding it costs time and memory).
    ``input_stats`` holds the second moment of the layer's input features on the calibration data (see
    :mod:`musco_core.calibration`), for a decomposer that sets ``needs_input_stats``; it is None otherwise.
    ``params`` are the decomposition's ``Params`` as the run decomposes with them, on the sources the core gives
    plugins, so that :meth:`Decomposer.rank_matrices` and :meth:`Decomposer.output_errors` describe the fit
    :meth:`Decomposer.decompose` delivers; None elsewhere (the decomposition's defaults apply).
    """

    spec: LayerSpec
    factors: list[Factor] | None = None
    previous: str | None = None
    _dense: torch.Tensor | Callable[[], torch.Tensor] | None = attrs.field(default=None, alias="dense")
    input_stats: InputStats | None = None
    params: Any = None

    @property
    def weight(self) -> torch.Tensor:
        if callable(self._dense):
            self._dense = self._dense()
        if self._dense is None:
            raise ValueError(f"a WeightSource of a {self.spec.describe()} was made without its dense weight")
        return self._dense

    @property
    def stored_weight(self) -> torch.Tensor:
        """A weight as the layer stores it now (its first factor once factorized), for its dtype and device, without
        rebuilding the dense weight."""
        return self.factors[0].weight if self.factors else self.weight

    def previous_weights(self, decomposition: str) -> list[torch.Tensor] | None:
        """The factor weights when the layer was last compressed by ``decomposition``, else None."""
        if self.previous != decomposition or not self.factors:
            return None
        return [f.weight for f in self.factors]


class Decomposer:
    """A named factorization of a layer's weight into a chain of smaller layers.

    Decomposers see one group at a time: the core factorizes each group of a grouped convolution separately
    and joins the factors into grouped layers, so ``spec.groups`` is always 1 here.

    Subclasses set ``name``, ``rank_names`` (one name per rank; Tucker2 has two) and ``min_rank``, and implement
    :meth:`unsupported_reason`, :meth:`layout`, :meth:`max_ranks`, :meth:`decompose` and, to work with
    rank estimation from singular values (vbmf), :meth:`rank_matrices`. ``Params`` is an attrs class of
    algorithm settings (the schedule's ``algo_kwargs[name]``).
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    rank_names: ClassVar[tuple[str, ...]] = ("rank",)
    min_rank: ClassVar[int] = 2
    #: True for a data-aware decomposition: the core then collects the layer's input statistics from the
    #: calibration data (only for the layers such decompositions compress) and passes them as
    #: ``source.input_stats``; a schedule that uses it without calibration data is refused.
    needs_input_stats: ClassVar[bool] = False
    #: True when the chain at :meth:`max_ranks` reproduces the layer exactly (up to rounding): the core then checks
    #: that on a miniature layer of each geometry before swapping a chain in (see :mod:`musco_core.verify`).
    exact_at_max_rank: ClassVar[bool] = False

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        """Why this decomposition cannot factorize a layer of this geometry, or None when it can."""
        raise NotImplementedError

    def check(self, spec: LayerSpec) -> None:
        reason = self.unsupported_reason(spec)
        if reason is not None:
            raise UnsupportedLayerError(f"{self.name} cannot decompose a {spec.describe()}: {reason}")

    def output_projections(self, params: Any) -> int:
        """How many random projections of the model's output per calibration batch this data-aware decomposition,
        with these ``Params``, wants ``input_stats.output_moment`` estimated from; 0 (the default) when it does not
        use it. The core then runs one forward pass and that many backward passes of the model per batch."""
        return 0

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        """The chain of factors produced at these ranks, first layer first."""
        raise NotImplementedError

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        """The largest meaningful ranks for this layer as it is now; larger requested ranks are clamped."""
        raise NotImplementedError

    def min_ranks(self, source: WeightSource) -> tuple[int, ...]:
        """The smallest ranks of this layer, one per rank: ``min_rank``, or the rank's limit (:meth:`max_ranks`)
        where that is smaller: a floor above the dimension it limits left out layers that lower ranks shrink
        (tucker2's ``r_in`` of a 3-channel stem convolution is at most 3: a 3 -> 32 3x3 one keeps 481 of its 864
        weights at ranks (8, 3))."""
        return tuple(min(self.min_rank, limit) for limit in self.max_ranks(source))

    def rank_family(self, spec: LayerSpec, r: int) -> tuple[int, ...]:
        """A one-parameter family of ranks, growing with ``r``, used by budget-driven rank selection."""
        return (r,) * len(self.rank_names)

    def rank_matrices(self, source: WeightSource) -> list[torch.Tensor]:
        """One matrix per rank whose singular spectrum tells that rank (used by vbmf), of the fit :meth:`decompose`
        delivers with ``source.params``."""
        raise UnsupportedLayerError(f"{self.name} has no matrix unfoldings for spectrum-based rank selection")

    def output_errors(self, source: WeightSource) -> list[torch.Tensor] | None:
        """With ``source.input_stats``: per rank, ``tails[k]`` (float64, ``k = 0 ..``), the relative output error
        ``E ||(W - W_k) x||^2 / E ||W x||^2`` on those statistics of the decomposition with that rank at ``k``
        (the others kept whole); used by the ``budget`` selector as the damage of a rank when calibration data is
        given. None when the decomposition has no such estimate (the default): the budget then uses the spectra of
        :meth:`rank_matrices`."""
        return None

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        """The factor weights, in :meth:`layout` order and shapes, on the weight's device.

        ``params`` is an instance of ``Params``; ``seed`` seeds anything random, so results are reproducible.
        """
        raise NotImplementedError

    def count_params(self, spec: LayerSpec, ranks: tuple[int, ...]) -> int:
        """Weight count of the factorized layer (bias excluded, as for the original's rate formulas)."""
        return sum(f.n_params for f in self.layout(spec, ranks))


@attrs.frozen(eq=False)
class LayerChoice:
    """One layer offered to a whole-model rank selector at one pass, with the arithmetic to price its ranks.

    ``sources`` holds one weight source per group (decomposers see one group at a time); ``spec`` is the whole
    layer's geometry, ``current`` its chain of factors as it is now (one factor when not compressed yet) and
    ``input_shape`` its input on the example input (None when unknown). ``sensitivity`` is how much the model's
    loss grows per unit of the layer's relative squared weight error, from a sensitivity pass (1.0 without one).
    ``price`` is the core's cost arithmetic for this layer (see :meth:`cost`); ``measure`` its measured times (see
    :meth:`seconds`), given only to a selector that :meth:`~RankSelector.measures_latency`. ``output_layer``: the
    model returns the layer's output (see :func:`musco_core.config.output_layers`), so its ranks should stay at
    least its output count (see :func:`musco_core.config.rank_floor`). ``tied_params``: how many of its weights are
    tensors other modules hold too (tied weights, a layer with ``force: true``): they stay in the model when it is
    factorized, so the model's parameter count loses only the rest.
    """

    name: str
    decomposer: Decomposer
    spec: LayerSpec
    sources: tuple[WeightSource, ...]
    current: tuple[FactorLayout, ...]
    price: Callable[[tuple[int, ...] | None], Cost]
    input_shape: tuple[int, ...] | None = None
    sensitivity: float = 1.0
    measure: Callable[[Sequence[tuple[int, ...] | None]], list[float]] | None = None
    output_layer: bool = False
    tied_params: int = 0

    def seconds(self, ranks: Sequence[tuple[int, ...] | None]) -> list[float]:
        """Measured seconds of the layer at each of ``ranks`` (None: as it is now) on its input shape, on this
        machine (from the core's latency cache where measured before)."""
        if self.measure is None:
            raise ValueError(f"layer {self.name!r}: no measured times (the selector did not ask for them)")
        return self.measure(ranks)

    def cost(self, ranks: tuple[int, ...] | None = None) -> Cost:
        """The cost of the layer factorized at ``ranks``, or as it is now for None."""
        return self.price(ranks)

    def shrinks(self, ranks: tuple[int, ...]) -> bool:
        """Whether factorizing at ``ranks`` makes the layer smaller than it is now (what the engine requires)."""
        return self.cost(ranks).smaller_than(self.cost())


@attrs.frozen
class ModelTotals:
    """Counts of the whole model when the run began (a model compressed before it counts as it was then) and now,
    as the compression report counts them.

    ``params_*`` count every parameter of the model; ``macs_*`` the layers an adapter can read, on the example
    input (None without one). ``scheduled`` holds the same counts over the layers the schedule compresses only
    (their parameters and MACs), for targets scoped to them.
    """

    params_original: int
    params_now: int
    macs_original: int | None = None
    macs_now: int | None = None
    scheduled: ModelTotals | None = None
    #: Measured seconds of the whole model's forward pass on the example input when the run began (estimated
    #: from layer timings once the run compressed layers) and now; only for a selector that measures latency (the
    #: ``scheduled`` counts: the summed seconds of the scheduled layers).
    seconds_original: float | None = None
    seconds_now: float | None = None
    #: For a selector that measures latency: the measured speed-up of the whole model as it is now with the layers
    #: named replaced by their chains at ``(decomposition, ranks)`` (None: kept), timed in place, in alternation.
    speedup_of: Callable[[Mapping[str, tuple[str, tuple[int, ...]] | None]], float] | None = attrs.field(
        default=None, eq=False)


@attrs.frozen
class Allocation:
    """A whole-model rank selector's answer: ranks per layer (None keeps the layer as it is at this pass), and the
    reduction of the whole model it aims at after this pass next to the one these ranks give, by ``metric``.

    A layer offered with several candidate decompositions (one :class:`LayerChoice` each) also needs its choice in
    ``decompositions``; for a layer with one candidate it may be left out.
    """

    ranks: dict[str, tuple[int, ...] | None]
    metric: str
    target: float
    planned: float
    note: str | None = None
    decompositions: dict[str, str] = attrs.field(factory=dict)


#: The keys of a layer's schedule that the core reads itself: a layer-scope rank selector's ``Params`` fields, the
#: layer's other keys, cannot use them.
LAYER_SCHEDULE_KEYS = frozenset({"decomposition", "rank_selection", "curr_compr_iter", "force"})


class RankSelector:
    """Chooses the ranks of a decomposition for one layer at one stage, or, for a whole-model selector
    (``scope = "model"``), for all the layers that use it at once.

    ``Params`` is an attrs class whose fields are keys of a layer's schedule (e.g. ``vbmf_weakenen_factor``);
    a whole-model selector's ``Params`` are run settings instead, read from ``settings.algo_kwargs[name]``.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    #: ``"layer"``: :meth:`select` chooses each layer's ranks alone. ``"model"``: :meth:`allocate` chooses the
    #: ranks of every layer using this selector together, once per pass over the model.
    scope: ClassVar[str] = "layer"
    #: Whether ``settings.rank_multiple: auto`` may round this selector's ranks up to the hardware's multiple;
    #: False for ranks the user gave (``manual``) and ranks that are the largest within a rate the user gave
    #: (``param_reduction``), which rounding up would break; an explicit int ``rank_multiple`` still rounds them.
    hardware_rounding: ClassVar[bool] = True

    def unsupported_reason(self, decomposer: Decomposer) -> str | None:
        """Why this selector cannot choose ranks for that decomposition, or None when it can."""
        return None

    def measures_latency(self, params) -> bool:
        """Whether :meth:`allocate` with these run parameters needs measured times (:meth:`LayerChoice.seconds`,
        ``ModelTotals.seconds_*``). Timing takes time, so the core measures only when asked; the run then also
        measures the whole model's speed-up at the end of each step that compresses this selector's layers."""
        return False

    def times_optimized(self, params) -> bool:
        """Whether, for a selector that :meth:`measures_latency`, whole models are timed as
        :func:`~musco_core.optimize_for_inference` deploys them (BatchNorm folded, chains merged where that saves
        MACs, the faster memory format) instead of as the run leaves them."""
        return False

    def counts_macs(self, params) -> bool:
        """Whether :meth:`allocate` with these run parameters needs the MAC counts (``ModelTotals.macs_*``), which
        only an example input (or statistics with MACs) gives: the Compressor then refuses to start without them,
        instead of failing at the first step."""
        return False

    def check_params(self, params, decomposer: Decomposer) -> str | None:
        """What is wrong with these parameters for that decomposition (``"key: problem"``), or None."""
        return None

    def check_layer(self, params, decomposer: Decomposer, source: WeightSource, stages: range) -> str | None:
        """Why these parameters cannot serve the compressions ``stages`` (0-based, those still to run) of this layer
        as the run began (one group of it; a later stage clamps ranks above the layer's current ones), or None. A
        resumed run asks only about the stages it has left."""
        return None

    def select(self, decomposer: Decomposer, source: WeightSource, stage: int, params) -> tuple[int, ...]:
        """Ranks for compressing ``source`` for the ``stage``-th time (0-based)."""
        raise NotImplementedError

    def shortfall(self, decomposer: Decomposer, source: WeightSource, ranks: tuple[int, ...], params) -> str | None:
        """How ``ranks``, as :meth:`select` chose them for ``source``, miss what ``params`` ask (a rate no rank of
        the decomposition reaches), or None: the layer is still compressed, and this goes into its result's note."""
        return None

    def allocate(self, layers: Sequence[LayerChoice], totals: ModelTotals, pass_index: int, n_passes: int,
                 params, rounding: RankRounding = RankRounding()) -> Allocation:
        """Ranks for every layer of a pass together (whole-model selectors only). A layer whose schedule lists
        several decompositions appears once per candidate (same ``name``): choose one in ``Allocation.decompositions``.

        ``pass_index`` counts the passes from 0 to ``n_passes - 1``; ranks must be as ``rounding`` leaves them
        (``rounding(ranks, limits)`` is a fixed point), within each layer's :meth:`Decomposer.max_ranks`.
        """
        raise NotImplementedError


class LayerAdapter:
    """Reads modules of some types into a :class:`LayerSpec` and rebuilds them from factors.

    ``module_types`` holds classes, or dotted names (``"transformers.pytorch_utils.Conv1D"``) for classes of
    optional packages, so the plugin need not import them: a name matches a class by its module and qualname.
    The adapter handles the classes it lists, and their subclasses that define no computation of their own
    (no ``forward``, ``_conv_forward``, ``weight`` property, ...); listing a subclass declares it reproduced.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    module_types: ClassVar[tuple[type[nn.Module] | str, ...]] = ()

    def read(self, module: nn.Module) -> tuple[LayerSpec, torch.Tensor, torch.Tensor | None]:
        """The layer's geometry, weight (conv layout) and bias."""
        raise NotImplementedError

    def build(self, spec: LayerSpec, factors: Sequence[Factor], like: torch.Tensor) -> list[nn.Module]:
        """Modules for the factors, in order, with ``like``'s dtype and device."""
        raise NotImplementedError

    def read_factor(self, module: nn.Module, layout: FactorLayout) -> Factor:
        """The factor with ``layout`` back from a module this adapter built (used to re-compress)."""
        bias = getattr(module, "bias", None)
        return Factor(layout, module.weight.detach(), None if bias is None else bias.detach())


class Scheduler:
    """Decides which layers are compressed at each step; the user fine-tunes between steps.

    :meth:`plan` gets the run's :class:`musco_core.schedule.RunSettings`.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams

    def plan(self, layer_names: Sequence[str], settings, params) -> list[list[str]]:
        """The steps: each a list of layer names compressed together, in order."""
        raise NotImplementedError
