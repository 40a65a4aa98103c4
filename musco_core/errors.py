"""Exceptions raised by musco-core; every one of them derives from :class:`MuscoError`. With the helpers their
messages and checks share."""
from __future__ import annotations

import math
import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2
SHORT_REPR_LIMIT = 100


def short_repr(value: object) -> str:
    """A repr of ``value`` bounded in length and depth, for error messages that echo user input.

    A hostile file can hold a value whose full repr is gigabytes (nested YAML aliases); messages quote this instead.
    """
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int too long to print (over sys.get_int_max_str_digits() digits)
        text = f"<an int of about {int(value.bit_length() * 0.30103)} digits>" if isinstance(value, int) \
            else f"<a {type(value).__name__}>"
    return text if len(text) <= SHORT_REPR_LIMIT else text[:SHORT_REPR_LIMIT - 3] + "..."


def finite_number(value: object) -> bool:
    """Whether ``value`` is a finite int or float: what a numeric setting or argument must be (a bool is none)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


ONE_LINE_LIMIT = 300


def one_line(text: str, limit: int = ONE_LINE_LIMIT) -> str:
    """``text`` as one line of at most ``limit`` characters: line breaks become spaces, the rest is cut with "...".

    For messages that quote text from outside (a parser's complaint, an exception raised by user code).
    """
    head = text[:2 * limit]  # never split a huge text: only its start can be shown
    flat = " ".join(head.split())
    return flat if len(flat) <= limit and head == text else flat[:limit - 3] + "..."
