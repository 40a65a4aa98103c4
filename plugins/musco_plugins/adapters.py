"""Layer adapters: reading Conv1d/2d/3d, Linear and Hugging Face Conv1D modules, and rebuilding them from factors."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from musco_core import hookimpl
from musco_core.components import Factor, FactorLayout, LayerAdapter, LayerSpec
from musco_core.errors import UnsupportedLayerError

_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _copy_into(module: nn.Module, factor: Factor) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(factor.weight.reshape(module.weight.shape))
        if factor.bias is not None:
            module.bias.copy_(factor.bias)
    return module


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, and subclasses that keep their computation (no ``forward``
    or ``_conv_forward`` of their own; see :meth:`musco_core.registry.Registry.match`)."""

    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def read(self, module: nn.Conv2d) -> tuple[LayerSpec, torch.Tensor, torch.Tensor | None]:
        spec = LayerSpec(
            adapter=self.name, out_channels=module.out_channels, in_channels=module.in_channels,
            kernel_size=tuple(module.kernel_size), stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
            has_bias=module.bias is not None)
        return spec, module.weight.detach(), _bias_of(module)

    def build(self, spec: LayerSpec, factors: Sequence[Factor], like: torch.Tensor) -> list[nn.Module]:
        conv = _CONV_BY_DIMS[spec.spatial_dims]
        modules = []
        for factor in factors:
            layout = factor.layout
            stride = tuple(spec.stride[a] if a in layout.axes else 1 for a in range(spec.spatial_dims))
            dilation = tuple(spec.dilation[a] if a in layout.axes else 1 for a in range(spec.spatial_dims))
            padding = self._padding(spec, layout)
            padded = isinstance(padding, str) and padding == "same" or (not isinstance(padding, str) and any(padding))
            module = skip_init(conv, layout.in_channels, layout.out_channels, layout.kernel_size, stride=stride,
                               padding=padding, dilation=dilation, groups=layout.groups, bias=factor.bias is not None,
                               padding_mode=spec.padding_mode if padded else "zeros",
                               device=like.device, dtype=like.dtype)
            modules.append(_copy_into(module, factor))
        return modules

    @staticmethod
    def _padding(spec: LayerSpec, layout: FactorLayout) -> tuple[int, ...] | str:
        axes = range(spec.spatial_dims)
        if not isinstance(spec.padding, str):
            return tuple(spec.padding[a] if a in layout.axes else 0 for a in axes)
        if spec.padding == "valid" or not layout.axes:
            return (0,) * spec.spatial_dims
        if set(layout.axes) == set(axes):
            return spec.padding
        # "same" split over factors: each factor pads its own axes symmetrically, which torch does only when
        # the total padding dilation * (kernel - 1) is even.
        padding = []
        for a in axes:
            total = spec.dilation[a] * (spec.kernel_size[a] - 1) if a in layout.axes else 0
            if total % 2:
                raise UnsupportedLayerError(f"padding='same' with an even kernel on axis {a} cannot be split "
                                            f"over factors; use tucker2 or cp3 for this layer")
            padding.append(total // 2)
        return tuple(padding)


class LinearAdapter(LayerAdapter):
    """``nn.Linear``, and subclasses that keep its computation (``NonDynamicallyQuantizableLinear``), on inputs of
    any rank. Hugging Face Falcon's ``FalconLinear`` is listed by name (transformers is not imported): its own
    forward, ``input @ weight.T (+ bias)``, is Linear's."""

    name = "linear"
    module_types = (nn.Linear, "transformers.models.falcon.modeling_falcon.FalconLinear")

    def read(self, module: nn.Linear) -> tuple[LayerSpec, torch.Tensor, torch.Tensor | None]:
        spec = LayerSpec(adapter=self.name, out_channels=module.out_features, in_channels=module.in_features,
                         has_bias=module.bias is not None)
        return spec, module.weight.detach(), _bias_of(module)

    def build(self, spec: LayerSpec, factors: Sequence[Factor], like: torch.Tensor) -> list[nn.Module]:
        """Stock ``nn.Linear`` factors, which cannot be grouped: a grouped layout is refused rather than reshaped."""
        grouped = next((index for index, f in enumerate(factors) if f.layout.groups != 1), None)
        if grouped is not None:
            raise UnsupportedLayerError(f"the {self.name} adapter builds ungrouped nn.Linear factors, factor {grouped} "
                                        f"has groups={factors[grouped].layout.groups}; use a decomposition without "
                                        f"grouped factors for this layer")
        return [_copy_into(skip_init(nn.Linear, f.layout.in_channels, f.layout.out_channels,
                                     bias=f.bias is not None, device=like.device, dtype=like.dtype), f)
                for f in factors]


class HFConv1DAdapter(LinearAdapter):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 and kin): a Linear layer whose weight is stored
    ``(in, out)``. It is named, not imported, so transformers is neither needed nor loaded to register it.

    The factors are built as stock ``nn.Linear`` layers, so a compressed model needs no transformers class.
    """

    name = "hf_conv1d"
    module_types = ("transformers.pytorch_utils.Conv1D",)

    def read(self, module: nn.Module) -> tuple[LayerSpec, torch.Tensor, torch.Tensor | None]:
        spec = LayerSpec(adapter=self.name, out_channels=module.nf, in_channels=module.nx,
                         has_bias=module.bias is not None)
        return spec, module.weight.detach().T, _bias_of(module)


@hookimpl
def musco_register_layer_adapters() -> list[type]:
    return [ConvAdapter, LinearAdapter, HFConv1DAdapter]
