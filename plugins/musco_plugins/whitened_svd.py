"""Activation-aware (whitened) SVD, fitted to a layer's outputs on calibration data (SVD-LLM / ASVD).

With ``C = E[x x^T]`` the second moment of the layer's input features ``x`` and ``S`` a square root of it, the
SVD of ``W S`` truncated at rank ``r`` gives ``W' = U_r Sigma_r V_r^T S^-1``, the rank-``r`` weight with the
least output error ``E ||(W - W') x||^2`` on those inputs (plain SVD minimises ``||W - W'||``, which treats every
input direction alike).

The chain is ``in -> r`` then ``r -> out`` (1x1, with the bias). For a Linear layer or a 1x1 convolution the
first factor is pointwise; for a k x k convolution it is a k x k convolution carrying the stride, padding and
dilation (a data-aware "channel SVD"). Re-compression rebuilds the dense weight and truncates again with the
statistics of the layer's inputs at that stage.

Under sequential calibration (the default, see ``settings.calibration``) the statistics also hold the cross
moment ``E[x_ref x^T]`` of the inputs the layer had before the step (``x_ref``) and those it gets with the layers
ahead of it compressed (``x``); the fit then reproduces ``W x_ref`` from ``x``: it truncates the least-squares map
``W C_x C^-1`` instead of ``W``, which refits the second factor in closed form and corrects the error of the
layers ahead. Its ridge holds the map to ``W`` (not to zero) in the input directions the calibration data does
not excite, so that at full rank the layer is reproduced on any input where there was no upstream error.

With ``output_weighting: true`` (in ``algo_kwargs.whitened_svd``) the error is also weighted on the output side:
the core collects ``G = E[g g^T]`` of the gradients of the model's output (projected on random directions) with
respect to the layer's output, and the fit minimises ``E ||R^T (W - W') x||^2`` with ``G = R R^T``, a
Kronecker-factored (K-FAC) second-order estimate of how much the truncation moves the model's output, instead of
the layer's. The output directions the rest of the model ignores are then the ones given up.
"""
from __future__ import annotations

import attrs
import torch

from musco_core import hookimpl
from musco_core.components import Decomposer, FactorLayout, LayerSpec, WeightSource
from musco_core.errors import ConfigError
from musco_core.schedule import NonNegativeFloat, PositiveInt

from . import factorize


#: Ridge of the output moment, relative to its mean diagonal: the moment is a random-projection estimate, and on
#: MiniLM ridges of 0.01 to 1 gave the same embedding cosines within 0.002.
OUTPUT_DAMPING = 0.1


@attrs.frozen
class WhitenedSVDParams:
    """Settings of ``whitened_svd`` (``algo_kwargs.whitened_svd``)."""

    #: Ridge added to the input second moment, relative to its mean diagonal, before its Cholesky factor; under
    #: sequential calibration it also holds the refit to the layer's weights where the calibration data is thin
    #: (0.1 measured best or near it on MiniLM, EfficientNet-Lite0 and a small MLP: docs/data_aware.md).
    damping: NonNegativeFloat = 0.1
    #: Weigh the fit by how much the layer's output directions move the model's output (one more forward pass
    #: and ``output_projections`` backward passes of the model per calibration batch and step).
    output_weighting: bool = False
    #: Random projections of the model's output per calibration batch that the output weighting is estimated from.
    output_projections: PositiveInt = 8


def _damping(source: WeightSource) -> float:
    """The ridge :meth:`WhitenedSVD.decompose` fits with: the run's (``source.params``), else the default."""
    return (source.params or WhitenedSVDParams()).damping


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


class WhitenedSVD(Decomposer):
    name = "whitened_svd"
    Params = WhitenedSVDParams
    min_rank = 2
    needs_input_stats = True
    exact_at_max_rank = True

    def unsupported_reason(self, spec: LayerSpec) -> str | None:
        if spec.spatial_dims > 2:
            return "whitened_svd needs a Linear layer or a 1-D or 2-D convolution (its calibration unfolds inputs)"
        return None

    def layout(self, spec: LayerSpec, ranks: tuple[int, ...]) -> list[FactorLayout]:
        (rank,) = ranks
        return [FactorLayout(rank, spec.in_channels, spec.kernel_size, axes=tuple(range(spec.spatial_dims))),
                FactorLayout.pointwise(spec, spec.out_channels, rank, bias=spec.has_bias)]

    def max_ranks(self, source: WeightSource) -> tuple[int, ...]:
        previous = source.previous_weights(self.name)
        if previous:
            return (previous[0].shape[0],)
        return (min(source.spec.out_channels, source.spec.in_channels * source.spec.kernel_numel),)

    def output_projections(self, params: WhitenedSVDParams) -> int:
        return params.output_projections if params.output_weighting else 0

    def _second_moment(self, source: WeightSource) -> torch.Tensor:
        if source.input_stats is None:
            raise ConfigError(f"{self.name} fits the layer to its inputs and needs their statistics: pass "
                              f"calibration_data (an iterable of input batches) to the Compressor, or input_stats "
                              f"to compress_layer")
        return source.input_stats.second_moment

    def rank_matrices(self, source: WeightSource) -> list[torch.Tensor]:
        """The whitened target (``W S``, see :func:`factorize.whitened_target`, times ``R^T`` with an output moment)
        of the weight, once factorized of the dense weight the factors compose (as :meth:`decompose` fits it, and with
        the shape the first pass saw). ``S`` has the ridge ``source.params.damping``, as :meth:`decompose` fits with:
        the spectrum is that of the fit delivered."""
        second_moment = self._second_moment(source)
        root = factorize.whitening_factor(second_moment, _damping(source))
        stats = source.input_stats
        output_root = (None if stats.output_moment is None else
                       factorize.whitening_factor(stats.output_moment, OUTPUT_DAMPING))
        return [factorize.output_weighted(factorize.whitened_target(_matrix(source.weight), root, stats.cross_moment,
                                                                    second_moment), output_root)]

    def output_errors(self, source: WeightSource) -> list[torch.Tensor] | None:
        """Exact, on the input statistics (undamped) of the fit :meth:`decompose` delivers at each rank (once
        factorized, of the dense product it truncates again); weighted by the output moment where there is one.
        Statistics with a cross moment (sequential calibration) are refused (see
        :func:`factorize.whitened_output_error`)."""
        if source.input_stats is None:
            return None
        stats = source.input_stats
        return [factorize.whitened_output_error(_matrix(source.weight), stats.second_moment,
                                                _damping(source),
                                                cross_moment=stats.cross_moment, output_moment=stats.output_moment,
                                                output_damping=OUTPUT_DAMPING)]

    def decompose(self, source: WeightSource, ranks: tuple[int, ...], params, seed: int = 0) -> list[torch.Tensor]:
        (rank,) = ranks
        weight, second_moment = source.weight, self._second_moment(source)
        stats = source.input_stats
        left, right = factorize.whitened_truncated_svd(_matrix(weight), second_moment, rank,
                                                       damping=params.damping, cross_moment=stats.cross_moment,
                                                       output_moment=stats.output_moment,
                                                       output_damping=OUTPUT_DAMPING)
        spec = source.spec
        return [right.reshape(right.shape[0], spec.in_channels, *spec.kernel_size),
                left.reshape(*left.shape, *(1,) * spec.spatial_dims)]


@hookimpl
def musco_register_decompositions() -> list[type]:
    return [WhitenedSVD]
