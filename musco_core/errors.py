"""Exceptions raised by musco-core; every one of them derives from :class:`MuscoError`."""
from __future__ import annotations


class MuscoError(Exception):
    """Base class of every error musco-core raises on purpose."""


class ConfigError(MuscoError, ValueError):
    """A schedule (YAML file or dict) is malformed; the message names the file, the path and what was expected."""


class UnknownComponentError(MuscoError, LookupError):
    """A schedule names a decomposition, rank selector, scheduler or adapter that no plugin registered."""


class PluginError(MuscoError):
    """A plugin failed to load or registered something invalid."""


class DuplicateComponentError(PluginError):
    """Two plugins registered a component under the same name."""


class UnsupportedLayerError(MuscoError):
    """A decomposition cannot be applied to a layer of that geometry."""


class CompressionError(MuscoError):
    """Compressing a layer failed; the model was left as it was before the step."""
