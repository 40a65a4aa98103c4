"""musco-core: multi-stage low-rank compression of PyTorch networks, extensible through plugins."""
from .hookspecs import hookimpl  # noqa: I001 - plugins import the marker from here first

from .components import (PLUGIN_API_VERSION, Allocation, Decomposer, Factor, FactorLayout, LayerAdapter,
                         LayerChoice, LayerSpec, ModelTotals, NoParams, RankSelector, Scheduler, WeightSource)
from .blockwise import compress_blockwise
from .compressor import Compressor
from .config import generate_model_compr_kwargs, validate_model_compr_kwargs
from .engine import LayerResult
from .errors import (CompressionError, ConfigError, DuplicateComponentError, MuscoError, PluginError,
                     UnknownComponentError, UnsupportedLayerError)
from .inference import PointwiseConv2d, optimize_for_inference
from .plugins import make_plugin_manager
from .registry import Registry, default_registry
from .schedule import LayerSchedule, ModelSchedule, RunSettings, dump_schedule, load_schedule
from .stats import LayerStats, ModelStats
from .surgery import FactorizedLayer, standardize_model

from ._version import __version__

__all__ = [
    "PLUGIN_API_VERSION", "Allocation", "CompressionError", "Compressor", "ConfigError", "Decomposer",
    "DuplicateComponentError", "Factor", "FactorLayout", "FactorizedLayer", "LayerAdapter", "LayerChoice",
    "LayerResult", "LayerSchedule", "LayerSpec", "LayerStats", "ModelSchedule", "ModelStats", "ModelTotals",
    "MuscoError", "NoParams", "PluginError", "PointwiseConv2d", "RankSelector", "Registry", "RunSettings",
    "Scheduler", "UnknownComponentError", "UnsupportedLayerError", "WeightSource", "compress_blockwise",
    "default_registry", "dump_schedule", "generate_model_compr_kwargs", "hookimpl", "load_schedule",
    "make_plugin_manager", "optimize_for_inference", "standardize_model", "validate_model_compr_kwargs",
]
