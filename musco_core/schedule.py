"""Compression schedules: attrs classes, their YAML form, and the original plain-dict form.

A schedule file looks like::

    version: 1
    settings:
      ft_every: 3
      nglobal_compress_iters: 2
      algo_kwargs:
        cp4: {n_iter_max: 300}
    layers:
      layer2.1.conv2: {decomposition: tucker2, rank_selection: vbmf, vbmf_weakenen_factor: 0.9}
      layer3.1.conv2: {decomposition: tucker2, rank_selection: manual, manual_rank: [[32, 32], [16, 16]]}
      fc: null

The original ``model_compr_kwargs`` dict (``{layer name: {...} or None}``) is accepted wherever a schedule is.
Each layer's keys beyond ``decomposition``, ``rank_selection`` and ``curr_compr_iter`` are the typed
parameters (``Params``) of its rank selector, so plugins add keys without touching this module.
Bad input raises one :class:`~musco_core.errors.ConfigError` that lists every problem as
``origin: $.path: what was expected``.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import typing
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, NewType

import attrs
import cattrs
import yaml
from cattrs.cols import list_structure_factory
from cattrs.v import format_exception as cattrs_format_exception

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no advisory locks
    fcntl = None

from .components import LAYER_SCHEDULE_KEYS, NoParams
from .errors import ConfigError, finite_number, one_line, short_repr

SCHEMA_VERSION = 1

PositiveInt = NewType("PositiveInt", int)
NonNegativeInt = NewType("NonNegativeInt", int)
NonNegativeFloat = NewType("NonNegativeFloat", float)
UnitFraction = NewType("UnitFraction", float)
ReductionRate = NewType("ReductionRate", float)
#: A seed: every random generator of the run is seeded with it.
Seed = NewType("Seed", int)
#: How many times each layer is compressed (``nglobal_compress_iters``).
StageCount = NewType("StageCount", int)
#: A rank as written in a schedule: a positive int, or a list of 1 to 8 positive ints (Tucker2: ``[r_out, r_in]``).
Rank = NewType("Rank", tuple)
#: One :data:`Rank` per compression of a layer (at most :data:`MAX_COMPRESS_ITERS`).
RankList = NewType("RankList", list)
#: ``"auto"``, or a positive int of at most :data:`MAX_RANK_MULTIPLE`.
RankMultiple = NewType("RankMultiple", object)
#: A non-empty string (a key of a batch).
Key = NewType("Key", str)
#: A non-empty list of module names and ``re:`` patterns (see :func:`~musco_core.surgery.select_modules`), as a tuple.
ModuleSelectors = NewType("ModuleSelectors", tuple)


class ValueProblem(ValueError):
    """Raised by the strict structure hooks; its message is the expectation shown to the user."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float:
    if finite_number(value):
        return float(value)
    raise ValueProblem(f"expected a finite number, got {short_repr(value)}")


def _positive_int(value: Any, _type=None) -> int:
    if not _is_int(value) or value <= 0:
        raise ValueProblem(f"expected a positive int, got {short_repr(value)}")
    return value


def _non_negative_int(value: Any, _type=None) -> int:
    if not _is_int(value) or value < 0:
        raise ValueProblem(f"expected a non-negative int, got {short_repr(value)}")
    return value


#: Largest seed: seeds are int64 values (``torch.Generator.manual_seed`` takes up to 2**64 - 1 but a plugin may
#: hand the seed to numpy or store it as a signed 64-bit integer, so the signed range is the portable one).
MAX_SEED = 2**63 - 1
#: Most times a layer can be compressed (``nglobal_compress_iters``). Each stage that changes a layer lowers an
#: integer rank below 2**63 (no tensor dimension is larger), and MUSCO's stages shrink ranks geometrically, so no
#: layer's rank can halve more often than this; practical schedules use 2 to 10 stages. Planning is eager, so an
#: unbounded count (10**9) would plan itself out of memory. The whole-model bound (from the layers' ranks) is
#: checked where the model is known.
MAX_COMPRESS_ITERS = 64


def _seed(value: Any, _type=None) -> int:
    if _non_negative_int(value) > MAX_SEED:
        raise ValueProblem(f"expected a non-negative int below 2**63, got {short_repr(value)}")
    return value


def _stage_count(value: Any, _type=None) -> int:
    if _positive_int(value) > MAX_COMPRESS_ITERS:
        raise ValueProblem(f"expected a positive int of at most {MAX_COMPRESS_ITERS} (no layer's rank can halve "
                           f"more often), got {short_repr(value)}")
    return value


def _key(value: Any, _type=None) -> str:
    if not isinstance(value, str) or not value:
        raise ValueProblem(f"expected a non-empty string, got {short_repr(value)}")
    return value


def _module_selectors(value: Any, _type=None) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(entry, str) and entry for entry in value):
        raise ValueProblem(f"expected a non-empty list of module names and 're:' patterns, got {short_repr(value)}")
    return tuple(value)


def _non_negative_float(value: Any, _type=None) -> float:
    number = _number(value)
    if number < 0:
        raise ValueProblem(f"expected a non-negative number, got {short_repr(value)}")
    return number


def _unit_fraction(value: Any, _type=None) -> float:
    number = _number(value)
    if not 0.0 <= number <= 1.0:
        raise ValueProblem(f"expected a number in [0, 1], got {short_repr(value)}")
    return number


def _reduction_rate(value: Any, _type=None) -> float:
    number = _number(value)
    if not number > 1.0:
        raise ValueProblem(f"expected a number > 1 (a reduction factor: 2 means half), got {short_repr(value)}")
    return number


#: Largest rank a schedule may name (larger ones exceed every layer; they are refused before any arithmetic).
MAX_RANK = 2**31
#: Most ranks one compression of a layer takes: one per ranked mode, 1 for SVD and CP, 2 for Tucker2, the rest left
#: for plugin decompositions of more modes.
MAX_RANKS_PER_COMPRESSION = 8
#: Largest ``rank_multiple``.
MAX_RANK_MULTIPLE = 4096


def _rank(value: Any, _type=None) -> tuple[int, ...]:
    expected = f"expected a positive int or a list of 1 to {MAX_RANKS_PER_COMPRESSION} positive ints"
    ranks = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not 0 < len(ranks) <= MAX_RANKS_PER_COMPRESSION:
        raise ValueProblem(f"{expected}, got a list of {len(ranks)}: {short_repr(value)}")
    if not all(_is_int(rank) and rank > 0 for rank in ranks):
        raise ValueProblem(f"{expected}, got {short_repr(value)}")
    if max(ranks) > MAX_RANK:
        raise ValueProblem(f"expected ranks of at most 2**31, got {short_repr(value)}")
    return ranks


def _rank_multiple(value: Any, _type=None) -> int | str:
    if value == "auto":
        return value
    if not _is_int(value) or not 0 < value <= MAX_RANK_MULTIPLE:
        raise ValueProblem(f"expected 'auto' or a positive int of at most {MAX_RANK_MULTIPLE}, got "
                           f"{short_repr(value)}")
    return value


def _literal(value: Any, kind: Any) -> Any:
    """One of a ``Literal``'s choices, of the same type (``true`` is not ``1``)."""
    choices = typing.get_args(kind)
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueProblem(f"expected one of {', '.join(map(str, choices))}, got {short_repr(value)}")
    return value


def _strict(kind: type):
    def structure(value: Any, _type=None):
        if kind is float:
            return _number(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueProblem(f"expected {kind.__name__}, got {short_repr(value)}")
        return value
    return structure


def make_converter() -> cattrs.Converter:
    """A cattrs converter that rejects unknown keys and never coerces (``"5"`` is not an int)."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    for kind in (int, float, str, bool):
        converter.register_structure_hook(kind, _strict(kind))
    converter.register_structure_hook(PositiveInt, _positive_int)
    converter.register_structure_hook(NonNegativeInt, _non_negative_int)
    converter.register_structure_hook(Seed, _seed)
    converter.register_structure_hook(StageCount, _stage_count)
    converter.register_structure_hook(NonNegativeFloat, _non_negative_float)
    converter.register_structure_hook(UnitFraction, _unit_fraction)
    converter.register_structure_hook(ReductionRate, _reduction_rate)
    converter.register_structure_hook(Rank, _rank)
    converter.register_structure_hook(RankMultiple, _rank_multiple)
    converter.register_structure_hook(Key, _key)
    converter.register_structure_hook(ModuleSelectors, _module_selectors)
    converter.register_structure_hook_func(lambda kind: typing.get_origin(kind) is Literal, _literal)

    def rank_list(value: Any, _type=None) -> list[tuple[int, ...]]:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_COMPRESS_ITERS:  # a tuple: the original's
            raise ValueProblem(f"expected a list of at most {MAX_COMPRESS_ITERS} ranks, one per compression, got "
                               f"{short_repr(value)}")
        return converter.structure(list(value), list[Rank])

    converter.register_structure_hook(RankList, rank_list)

    def strict_list(kind: Any) -> Callable[[Any, Any], list]:
        items = list_structure_factory(kind, converter)

        def structure(value: Any, _type=None) -> list:
            if not isinstance(value, list):  # a string or a mapping would be iterated into a list
                raise ValueProblem(f"expected a list, got {short_repr(value)}")
            return items(value, kind)

        return structure

    converter.register_structure_hook_factory(lambda kind: typing.get_origin(kind) is list, strict_list)
    return converter


def format_problem(exc: BaseException, type_) -> str:
    if isinstance(exc, ValueProblem):
        return str(exc)
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        accepted = sorted(field.name for field in attrs.fields(exc.cl))
        return (f"unknown keys {short_repr(sorted(exc.extra_fields, key=str))}; "
                + (f"expected {accepted}" if accepted else "it takes no settings"))
    classes = [kind for kind in (type_, *typing.get_args(type_)) if isinstance(kind, type) and attrs.has(kind)]
    if isinstance(exc, (AttributeError, TypeError)) and classes:  # not a mapping where fields were due
        return f"expected a mapping of {', '.join(field.name for field in attrs.fields(classes[0]))}"
    return cattrs_format_exception(exc, type_)


@attrs.frozen
class LayerSchedule:
    """How one layer is compressed: a decomposition, a rank selector with its parameters, and a stage counter.

    ``decomposition`` is one name, or several for a whole-model rank selector to choose among per layer (the
    schedule's ``auto`` stands for every decomposition the selector can price that needs no calibration data).
    """

    decomposition: str | tuple[str, ...]
    rank_selection: str
    rank_params: Any
    #: Stages the layer went through already, each counted whether it compressed the layer or kept it as it was (as
    #: the original musco-pytorch counted them): the stage number of its next compression (``manual_rank``'s index).
    curr_compr_iter: int = 0
    #: Apply the decomposition even when it would not make the layer smaller (e.g. to test full rank).
    force: bool = False

    @property
    def candidates(self) -> tuple[str, ...]:
        """The decompositions the layer may get: one, or several for a whole-model rank selector to choose from."""
        return (self.decomposition,) if isinstance(self.decomposition, str) else self.decomposition


@attrs.frozen
class CalibrationMask:
    """``settings.calibration_mask``: which calibration rows are padding, for which layers. Each calibration batch is
    a mapping whose ``key`` holds a ``(batch, tokens)`` mask, 1 for a real token and 0 for padding; the layers
    inside the modules ``layers`` names (module names, ``re:`` patterns) take ``(batch, tokens, features)`` inputs
    and are calibrated on the rows of real tokens only (see :class:`~musco_core.calibration.TokenMask`)."""

    #: The key of every calibration batch (a mapping) that holds the mask, e.g. ``attention_mask``.
    key: Key
    #: The modules whose layers the mask covers: module names (every layer inside counts) and ``re:`` patterns
    #: matched in full; one that names no module of the model is an error.
    layers: ModuleSelectors


@attrs.frozen
class RunSettings:
    """Settings of the whole run."""

    ft_every: PositiveInt = 1
    nglobal_compress_iters: StageCount = 1
    scheduler: str = "musco"
    seed: Seed = 0
    #: Ranks are rounded up to a multiple of this int (e.g. 8) for hardware efficiency, then clamped to the layer.
    #: ``auto``: to the multiple the weights' device type runs fast (8 on CPU and CUDA) where that grows a rank by at
    #: most a quarter and the layer still gets smaller, ranks the user gave (``manual``) and ``param_reduction``'s
    #: excepted, and every rank from 16 up that a whole-model selector (``budget``) may choose; 1 turns rounding off.
    rank_multiple: RankMultiple = "auto"
    #: How data-aware decompositions calibrate the layers of a step: ``sequential`` compresses them in forward order,
    #: each fitted on the inputs it gets with the layers ahead of it already compressed, to the outputs it had
    #: before (so it also corrects their error); ``independent`` fits each on the inputs the step began with.
    calibration: Literal["sequential", "independent"] = "sequential"
    #: Padding tokens left out of the calibration statistics of the layers it covers (a ``CalibrationMask``: the
    #: batches' ``key`` and the ``layers``); null counts every row.
    calibration_mask: CalibrationMask | None = None
    algo_kwargs: dict[str, Any] = attrs.field(factory=dict)

    def params_for(self, component: Any) -> Any:
        """A decomposition's or rank selector's run parameters: ``algo_kwargs[its name]``, or its defaults."""
        return self.algo_kwargs.get(component.name) or component.Params()


@attrs.frozen
class ModelSchedule:
    """A whole compression schedule: settings plus ``{layer name: LayerSchedule or None}``."""

    settings: RunSettings = attrs.field(factory=RunSettings)
    layers: dict[str, LayerSchedule | None] = attrs.field(factory=dict)
    version: int = SCHEMA_VERSION
    #: Where the schedule came from (a file name, ``model_compr_kwargs``), for error messages; not part of its value.
    origin: str = attrs.field(default="<schedule>", eq=False, repr=False, kw_only=True)

    def compressed_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer is not None]


#: Longest key quoted whole in a path; longer keys (a layer name of a megabyte) are cut with "...".
MAX_QUOTED_KEY = 80


def key_path(path: str, key: str) -> str:
    """``$.layers["layer2.1.conv2"]``: the cattrs-style path of a mapping entry."""
    shown = key if len(key) <= MAX_QUOTED_KEY else key[:MAX_QUOTED_KEY - 3] + "..."
    return f'{path}["{shown}"]'


_QUOTED_KEY = re.compile(r"\['((?:[^'\\]|\\.)*)'\]")


def validation_problems(exc: BaseException, path: str = "$") -> list[str]:
    """``path.to.field: what was expected`` lines for a failed structuring, mapping keys written as
    :func:`key_path` writes them."""
    if isinstance(exc, ValueProblem):
        return [f"{path}: {exc}"]
    problems = []
    for line in cattrs.transform_error(exc, path=path, format_exception=format_problem):
        message, _, where = line.rpartition(" @ ")
        problems.append(f"{_QUOTED_KEY.sub(lambda match: f'[{chr(34)}{match[1]}{chr(34)}]', where)}: {message}")
    return problems


#: Most problems listed in one ConfigError; a file with thousands of bad entries gets the first ones and a count.
MAX_LISTED_PROBLEMS = 50


def problems_error(problems: list[str]) -> ConfigError:
    """One ConfigError of one line per problem (each ``origin: $.path: ...``), at most :data:`MAX_LISTED_PROBLEMS`
    of them and a count of the rest."""
    lines = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more problems")
    return ConfigError("\n".join(lines))


#: The Compressor's keyword argument of each run setting it takes, where the names differ.
_KEYWORDS = {"algo_kwargs": "all_algo_kwargs"}
#: What to pass instead, for the Compressor's keyword arguments whose false values the original took for the
#: default (0 and None are taken for it here too).
_KEYWORD_HINTS = {"ft_every": "pass None or 0 to compress every layer in one step",
                  "nglobal_compress_iters": "pass 1, None or 0 to compress each layer once"}


def _keyword_problem(problem: str) -> str:
    """A problem of a setting given as the Compressor's keyword argument, named by that argument, as the user wrote
    it: ``$.settings.algo_kwargs["svd"].x: ...`` becomes ``Compressor(all_algo_kwargs=...): $["svd"].x: ...``."""
    setting = re.match(r"^\$\.settings\.(\w+): ", problem)
    hint = _KEYWORD_HINTS.get(setting[1]) if setting else None
    return re.sub(r"^\$\.settings\.(\w+)(: )?", lambda match: f"Compressor({_KEYWORDS.get(match[1], match[1])}=...): "
                  + ("" if match[2] else "$"), problem) + (f"; {hint}" if hint else "")


class ScheduleCodec:
    """Converts schedules to and from plain data, checking them against the registered components."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.converter = make_converter()

    # -- reading --------------------------------------------------------------------------------------------
    def structure(self, data: Any, origin: str = "<schedule>", *, settings: Mapping[str, Any] | None = None
                  ) -> ModelSchedule:
        """A schedule from a YAML document or an original ``model_compr_kwargs`` dict.

        ``settings`` supplies run settings for the plain-dict form (the Compressor's keyword arguments); their
        problems are named by the argument (``Compressor(ft_every=...): expected a positive int, got 0``).
        """
        schedule, problems = self.structure_partial(data, origin, settings=settings)
        if problems:
            raise problems_error(problems)
        return schedule

    def structure_partial(self, data: Any, origin: str = "<schedule>", *,
                          settings: Mapping[str, Any] | None = None) -> tuple[ModelSchedule, list[str]]:
        """The valid part of a schedule and every problem of the rest (``origin: $.path: ...`` lines), so that
        checks against a model can report their problems together with these. Invalid layers are left out;
        invalid settings are replaced by the defaults."""
        problems: list[str] = []
        arguments: list[str] = []  # problems of the settings given as keyword arguments, named by them
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: $: expected a mapping (a schedule or a {{layer: settings}} dict), "
                              f"got {type(data).__name__}")
        if "version" in data:
            unknown = sorted(set(data) - {"version", "settings", "layers"}, key=str)
            if unknown:
                problems.append(f"$: unknown keys {short_repr(unknown)}; expected version, settings, layers")
            version = data["version"]
            if not _is_int(version) or version < 1:
                problems.append(f"$.version: expected a positive int, got {short_repr(version)}")
            elif version > SCHEMA_VERSION:
                problems.append(f"$.version: schema version {version} is newer than this musco-core reads "
                                f"({SCHEMA_VERSION}); upgrade musco-core")
            # A missing or null section is the default; anything else that is not a mapping is a problem.
            raw_settings, raw_layers = data.get("settings"), data.get("layers")
            run_settings = self._structure_settings({} if raw_settings is None else raw_settings, problems)
            if raw_layers is None:
                raw_layers = {}
        elif _is_int(data.get("format")):  # no layer's settings are an int: an output's musco.yaml, report, state
            raise ConfigError(f"{origin}: $.format: a file musco-core writes (a manifest, report or run state), not "
                              f"a schedule; expected a schedule (version, settings, layers) or a {{layer: settings}} "
                              f"dict")
        else:
            raw_layers, given = data, []
            run_settings = self._structure_settings(settings or {}, given)
            arguments = [_keyword_problem(problem) for problem in given]
        layers = {}
        if not isinstance(raw_layers, Mapping):
            problems.append(f"$.layers: expected a mapping of layer names, got {type(raw_layers).__name__}")
        else:
            for name, raw in raw_layers.items():
                path = key_path("$.layers", str(name))
                if not isinstance(name, str):  # nn.Sequential's layers are named 0, 1, ...: YAML reads those as ints
                    quote = f"; quote it, '{name}'" if _is_int(name) else ""
                    problems.append(f"{path}: expected a layer name (a string), got {short_repr(name)}{quote}")
                    continue
                known = len(problems)
                layer = self._structure_layer(raw, path, problems)
                if len(problems) == known:
                    layers[name] = layer
        schedule = ModelSchedule(run_settings or RunSettings(), layers, origin=origin)
        return schedule, arguments + [f"{origin}: {problem}" for problem in problems]

    def _structure(self, value: Any, kind: type, path: str, problems: list[str]):
        try:
            return self.converter.structure(value, kind)
        except (cattrs.BaseValidationError, ValueProblem) as exc:
            problems.extend(validation_problems(exc, path))
            return None

    def _structure_settings(self, raw: Any, problems: list[str]) -> RunSettings | None:
        if not isinstance(raw, Mapping):
            problems.append(f"$.settings: expected a mapping, got {type(raw).__name__}")
            return None
        fields = dict(raw)
        algo = fields.pop("algo_kwargs", None)
        algo = {} if algo is None else algo  # null is the default, as for the other sections
        settings = self._structure(fields, RunSettings, "$.settings", problems)
        scheduler = fields.get("scheduler", RunSettings().scheduler)
        if isinstance(scheduler, str) and scheduler not in self.registry.schedulers.entries:
            problems.append(f"$.settings.scheduler: unknown scheduler {short_repr(scheduler)}; "
                            f"known: {', '.join(self.registry.schedulers.names())}")
        if not isinstance(algo, Mapping):
            problems.append(f"$.settings.algo_kwargs: expected a mapping of decomposition names, "
                            f"got {short_repr(algo)}")
            return None
        # Settings of decompositions, and of whole-model rank selectors (their parameters are run-wide).
        configurable = {name: entry.component for name, entry in self.registry.decompositions.entries.items()}
        configurable.update({name: entry.component for name, entry in self.registry.rank_selectors.entries.items()
                             if entry.component.scope == "model"})
        algo_params = {}
        for name, kwargs in algo.items():
            path = key_path("$.settings.algo_kwargs", str(name))
            if name not in configurable:
                problems.append(f"{path}: unknown decomposition or whole-model rank selector {short_repr(name)}; "
                                f"known: {', '.join(sorted(configurable))}")
                continue
            if kwargs is not None and not isinstance(kwargs, Mapping):
                problems.append(f"{path}: expected a mapping of {name} settings, got {short_repr(kwargs)}")
                continue
            algo_params[name] = self._structure(kwargs or {}, configurable[name].Params, path, problems)
        return attrs.evolve(settings, algo_kwargs=algo_params) if settings is not None else None

    def _structure_layer(self, raw: Any, path: str, problems: list[str]) -> LayerSchedule | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            problems.append(f"{path}: expected a mapping of layer settings or null, got {short_repr(raw)}")
            return None
        fields = {key: value for key, value in raw.items()}
        decomposition = fields.pop("decomposition", None)
        selection = fields.pop("rank_selection", None)
        valid = True
        if not (isinstance(selection, str) and selection in self.registry.rank_selectors.entries):
            problems.append(f"{path}.rank_selection: expected one of {', '.join(self.registry.rank_selectors.names())}, "
                            f"got {short_repr(selection)}{self.registry.failures_note()}")
            valid = False
        candidates = self._candidates(decomposition, selection if valid else None, path, problems)
        stage = fields.pop("curr_compr_iter", 0)
        if not _is_int(stage) or stage < 0:
            problems.append(f"{path}.curr_compr_iter: expected a non-negative int, got {short_repr(stage)}")
        elif stage > MAX_COMPRESS_ITERS:
            problems.append(f"{path}.curr_compr_iter: expected at most {MAX_COMPRESS_ITERS}, got {short_repr(stage)}")
        force = fields.pop("force", False)
        if not isinstance(force, bool):
            problems.append(f"{path}.force: expected true or false, got {short_repr(force)}")
        if not valid or not candidates:
            return None
        selector_class = self.registry.rank_selectors.entries[selection].component
        layer_params_class = selector_class.Params if selector_class.scope == "layer" else NoParams
        own = {field.name: field for field in attrs.fields(layer_params_class)}
        # Rank-selector keys set to null are placeholders from the original template config: "not set".
        selector_keys = {field.name for provided in self.registry.rank_selectors.entries.values()
                         if provided.component.scope == "layer" for field in attrs.fields(provided.component.Params)}
        fields = {key: value for key, value in fields.items() if not (value is None and key in selector_keys)}
        unknown = sorted(set(fields) - set(own), key=str)
        if unknown:
            where = (f"; whole-model selector {selection!r} takes its settings from "
                     f"$.settings.algo_kwargs.{selection}" if selector_class.scope == "model" else "")
            problems.append(f"{path}: unknown keys {short_repr(unknown)} for rank_selection {selection!r}; "
                            f"expected {sorted(own) + sorted(LAYER_SCHEDULE_KEYS)}"
                            + where)
            return None
        params = self._structure(fields, layer_params_class, path, problems)
        if len(candidates) > 1 and selector_class.scope != "model":
            problems.append(f"{path}.decomposition: several decompositions {list(candidates)} need a whole-model "
                            f"rank selector (budget) to choose among them; rank_selection {selection!r} takes one")
            return None
        selector = selector_class()
        for name in candidates:
            decomposer = self.registry.decompositions.get(name)
            reason = selector.unsupported_reason(decomposer)
            if reason:
                problems.append(f"{path}: rank_selection {selection!r} cannot be used with decomposition {name!r}: "
                                f"{reason}")
                return None
            problem = None if params is None else selector.check_params(params, decomposer)
            if problem:
                problems.append(f"{path}.{problem}")
                return None
        if params is None:
            return None
        return LayerSchedule(candidates[0] if len(candidates) == 1 else candidates, selection, params, stage, force)

    def _candidates(self, value: Any, selection: str | None, path: str, problems: list[str]) -> tuple[str, ...]:
        """The decompositions a layer's ``decomposition`` names: one, a list, or ``auto`` (every decomposition the
        rank selector can price that needs no calibration data)."""
        role = self.registry.decompositions
        if value == "auto":
            if selection is None:
                return ()
            selector = self.registry.rank_selectors.get(selection)
            return tuple(name for name in role.names() if selector.unsupported_reason(role.get(name)) is None
                         and not role.entries[name].component.needs_input_stats)
        names = [value] if isinstance(value, str) else value
        if (isinstance(names, list) and names and len(set(map(str, names))) == len(names)
                and all(isinstance(name, str) and name in role.entries for name in names)):
            return tuple(names)
        problems.append(f"{path}.decomposition: expected one of {', '.join(role.names())}, got {short_repr(value)} "
                        f"(or a list of them, or auto){self.registry.failures_note()}")
        return ()

    # -- writing --------------------------------------------------------------------------------------------
    def unstructure(self, schedule: ModelSchedule) -> dict[str, Any]:
        """Plain data for YAML: lists instead of tuples, null for uncompressed layers."""
        settings = schedule.settings
        return {
            "version": schedule.version,
            "settings": {
                "ft_every": settings.ft_every,
                "nglobal_compress_iters": settings.nglobal_compress_iters,
                "scheduler": settings.scheduler,
                "seed": settings.seed,
                "rank_multiple": settings.rank_multiple,
                "calibration": settings.calibration,
                **({} if settings.calibration_mask is None else
                   {"calibration_mask": {"key": settings.calibration_mask.key,
                                         "layers": list(settings.calibration_mask.layers)}}),
                "algo_kwargs": {name: self.unstructure_params(params) for name, params in settings.algo_kwargs.items()},
            },
            "layers": {name: self.unstructure_layer(layer) for name, layer in schedule.layers.items()},
        }

    @staticmethod
    def unstructure_layer(layer: LayerSchedule | None) -> dict[str, Any] | None:
        if layer is None:
            return None
        decomposition = layer.decomposition if isinstance(layer.decomposition, str) else list(layer.decomposition)
        return {"decomposition": decomposition, "rank_selection": layer.rank_selection,
                **ScheduleCodec.unstructure_params(layer.rank_params), "curr_compr_iter": layer.curr_compr_iter,
                **({"force": True} if layer.force else {})}

    @staticmethod
    def unstructure_params(params: Any) -> dict[str, Any]:
        """A component's parameters as plain YAML-friendly data."""
        return plain_data(attrs.asdict(params))


def plain_data(value: Any) -> Any:
    """Nested dicts, lists and tuples as dicts and lists only, which ``yaml.safe_dump`` writes."""
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return value


#: Largest YAML file read (schedules, manifests, states): 4 MiB holds a schedule of ~30,000 layers. Parsing is
#: pure Python above the C scanner (a few seconds and a few hundred MB per MiB), so larger files are refused unread.
MAX_YAML_BYTES = 4 * 2**20
#: Most values (mappings, lists and scalars) in a YAML document, counting each use of an alias in full. Bounds the
#: memory of a parse, and refuses "billion laughs" files whose nested aliases expand to billions of values.
MAX_YAML_VALUES = 1_000_000
#: Deepest nesting of a YAML document, aliases expanded (a schedule needs 6 levels, a manifest 7).
MAX_YAML_DEPTH = 100
#: Longest integer literal in YAML: an int64 has 19 digits. Longer ones are refused before Python converts them
#: (a sexagesimal ``1:2:3:...`` literal of a million parts takes minutes to convert).
MAX_YAML_INT_CHARS = 100
#: Largest JSON file read (``report.json``, through :func:`read_text_bounded`); JSON is parsed in C, so this
#: is larger than the YAML limit.
MAX_JSON_BYTES = 64 * 2**20


class _BoundedComposer(yaml.composer.Composer):
    """Composes YAML nodes while counting values and nesting, so nothing unbounded reaches the constructor."""

    def __init__(self) -> None:
        super().__init__()
        self._values = self._depth = self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        self._values += 1
        if self._values > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_VALUES:,} values", mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if self._aliases:
            _measure_expanded(node, 1, {}, set())
        return node


def _measure_expanded(node, depth: int, sizes: dict[int, tuple[int, int]], open_nodes: set[int]) -> tuple[int, int]:
    """(values, levels) of ``node`` with every alias expanded; raises past the limits or on a recursive alias.

    Aliased nodes are measured once (``sizes``), so this takes time linear in the file however far aliases expand;
    the recursion stops at ``MAX_YAML_DEPTH``.
    """
    if isinstance(node, yaml.ScalarNode):
        size, height = 1, 1
    elif id(node) in sizes:
        size, height = sizes[id(node)]
    elif id(node) in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it (recursive alias)",
                                          node.start_mark)
    else:
        open_nodes.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        size, height = 1, 1
        for child in children:
            child_size, child_height = _measure_expanded(child, depth + 1, sizes, open_nodes)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_YAML_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand it to more than {MAX_YAML_VALUES:,} values", node.start_mark)
        open_nodes.discard(id(node))
        sizes[id(node)] = size, height
    if depth + height - 1 > MAX_YAML_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"aliases nest it deeper than {MAX_YAML_DEPTH} levels",
                                          node.start_mark)
    return size, height


class PythonYamlEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """The pure-Python YAML event source, for PyYAML builds without libyaml."""

    def __init__(self, stream) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


class _StrictConstructor(yaml.constructor.SafeConstructor):
    """Safe construction that rejects duplicate keys (instead of silently keeping the last one), all of the
    document's in one error, and overlong integers."""

    def __init__(self) -> None:
        super().__init__()
        self.duplicate_keys: list[tuple[yaml.Mark, Any]] = []

    def construct_document(self, node):
        data = super().construct_document(node)
        duplicates, self.duplicate_keys = self.duplicate_keys, []
        if duplicates:
            found = "; ".join(f"{short_repr(key)} at line {mark.line + 1}, column {mark.column + 1}"
                              for mark, key in sorted(duplicates, key=lambda entry: entry[0].index))
            count = len(duplicates)
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {found}" if count == 1 else f"{count} duplicate keys: {found}")
        return data

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are flattened by the base class
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found an unhashable key", key_node.start_mark) from None
            if key in seen:
                self.duplicate_keys.append((key_node.start_mark, key))
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_YAML_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value):,} characters (at most {MAX_YAML_INT_CHARS})",
                node.start_mark)
        return super().construct_yaml_int(node)


_StrictConstructor.add_constructor("tag:yaml.org,2002:int", _StrictConstructor.construct_yaml_int)
# The original musco-pytorch's configs were written with yaml.dump, which tags its tuple ranks (tucker2's (r_out,
# r_in)) !!python/tuple: a plain tuple of the sequence, nothing imported or run. No other python tag is read.
_StrictConstructor.add_constructor("tag:yaml.org,2002:python/tuple",
                                   lambda constructor, node: tuple(constructor.construct_sequence(node, deep=True)))


def bounded_loader(events: type) -> type:
    """A YAML loader class: ``events`` (libyaml's ``CParser`` or the pure-Python parser) below the bounded
    composer and the strict safe constructor, so the bounds hold whichever parser produces the events."""

    class BoundedLoader(_BoundedComposer, events, _StrictConstructor, yaml.resolver.Resolver):
        def __init__(self, stream) -> None:
            events.__init__(self, stream)
            _BoundedComposer.__init__(self)
            _StrictConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    return BoundedLoader


#: The loader of every YAML file musco-core reads; libyaml's parser when PyYAML has it (2-4x faster).
YAML_LOADER = bounded_loader(yaml.cyaml.CParser if yaml.__with_libyaml__ else PythonYamlEvents)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    """One line: what the parser found wrong and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return one_line("; ".join(part for part in (exc.context, exc.problem) if part)) + where
    return one_line(str(exc))


def _read_at_most(descriptor: int, limit: int) -> bytes:
    """The first ``limit`` bytes of an open file, fewer when it ends before."""
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(descriptor, min(limit - size, 2**20))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_text_bounded(path: str | os.PathLike, max_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; anything else is a ConfigError naming the file.

    The file is opened without blocking and checked before reading, so a FIFO, a device (``/dev/zero``) or a
    directory is refused at once, and a file over the limit is refused unread.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise ConfigError(f"{short_repr(str(path))}: cannot read: {exc}") from None
    try:
        kind = os.fstat(descriptor)
        if stat.S_ISDIR(kind.st_mode):
            raise ConfigError(f"{path}: cannot read: it is a directory, expected a file")
        if not stat.S_ISREG(kind.st_mode):
            raise ConfigError(f"{path}: cannot read: not a regular file (a pipe, socket or device)")
        if kind.st_size > max_bytes:
            raise ConfigError(f"{path}: cannot read: {kind.st_size:,} bytes, more than the {max_bytes:,} allowed")
        data = _read_at_most(descriptor, max_bytes + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
    return _decoded(data, path, max_bytes)


def _decoded(data: bytes, where: str | os.PathLike, max_bytes: int) -> str:
    """``data``, read as at most ``max_bytes + 1`` bytes from ``where``, as UTF-8 text; else a ConfigError."""
    if len(data) > max_bytes:
        raise ConfigError(f"{where}: cannot read: more than the {max_bytes:,} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


#: The name errors give the schedule ``musco compress --config -`` reads from stdin.
STDIN = "<stdin>"


def read_stdin_yaml(expected: str = "a schedule mapping") -> Any:
    """The YAML document piped to stdin, read and checked as :func:`read_yaml` reads a file, errors naming
    :data:`STDIN`. A terminal is refused: the read would wait for the user to type a schedule."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None or sys.stdin.isatty():
        raise ConfigError(f"{STDIN}: cannot read: stdin is {'a terminal' if stream else 'closed'}; pipe or redirect "
                          f"the schedule in (< schedule.yaml), or give its file")
    return _parse_yaml(_decoded(stream.read(MAX_YAML_BYTES + 1), STDIN, MAX_YAML_BYTES), STDIN, expected)


def read_yaml(path: str | os.PathLike, expected: str = "a schedule mapping") -> Any:
    """A YAML document through safe, bounded loading; any failure is one ConfigError naming the file (an empty one
    says it ``expected`` the document the caller reads).

    Files over :data:`MAX_YAML_BYTES`, documents of more than :data:`MAX_YAML_VALUES` values or nested deeper
    than :data:`MAX_YAML_DEPTH` (aliases expanded), recursive aliases and duplicate keys are refused.
    """
    return _parse_yaml(read_text_bounded(path, MAX_YAML_BYTES), path, expected)


def _parse_yaml(text: str, path: str | os.PathLike, expected: str) -> Any:
    """The document of ``text``, read from ``path``, as :func:`read_yaml` loads it."""
    try:
        data = yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 - safe construction, bounded composition
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_describe_yaml_error(exc)}") from None
    except ValueError as exc:  # a scalar the constructor cannot convert, e.g. the date 2024-02-30
        raise ConfigError(f"{path}: not valid YAML: {one_line(str(exc))}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected {expected}")
    return data


def load_schedule(path: str | os.PathLike, registry=None) -> ModelSchedule:
    """Reads and checks a YAML schedule file."""
    from .registry import default_registry

    return ScheduleCodec(registry or default_registry()).structure(read_yaml(path), str(path))


def dump_schedule(schedule: ModelSchedule | Mapping[str, Any], path: str | os.PathLike, registry=None) -> None:
    """Writes a schedule as YAML, atomically (a temporary file renamed over the target). A schedule document or an
    original ``{layer: settings}`` dict (its settings the defaults) is checked first, as the Compressor checks it,
    so that only a schedule that loads is written. A ``path`` that is a symlink stays one (the file it points to is
    replaced), and a file replaced keeps its mode."""
    from .registry import default_registry

    codec = ScheduleCodec(registry or default_registry())
    if not isinstance(schedule, ModelSchedule):
        schedule = codec.structure(schedule, "schedule")
    data = codec.unstructure(schedule)
    target = Path(os.path.realpath(path))
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else None
    write_text_atomic(target, yaml.safe_dump(data, sort_keys=False, default_flow_style=None), mode)
    fsync_dir(target.parent)


@contextlib.contextmanager
def advisory_lock(descriptor: int, *, wait: bool = False) -> typing.Iterator[bool]:
    """Holds an exclusive advisory lock (``flock``) on the open file or folder ``descriptor`` inside, released on
    exit however it exits. Yields True while held; False, holding nothing, where another process holds it (with
    ``wait``, waits for it instead); and True, unguarded, where there are no advisory locks: not POSIX (no
    ``fcntl``), or a file system that has none (NFS without a lock manager fails ``flock`` with ENOLCK), where
    refusing to work would be worse than working without a guard."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield True
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        yield False
        return
    except OSError:
        yield True
        return
    try:
        yield True
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    """Syncs the folder ``path``, so that a rename inside it survives a power loss."""
    with contextlib.suppress(OSError):  # not every platform can open a folder
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Writes ``text`` to ``path`` so that a crash, or a power loss, leaves either the old file or the new one, never
    half of one: the temporary file is synced before it is renamed over ``path`` (a caller that needs the rename
    itself to survive a power loss syncs the folder after, with :func:`fsync_dir`). The temporary file is a new one
    of a name no other holds (the pid and a random suffix): an entry of that name already there (a file of the
    user's, a symlink) is never written through, truncated or removed. ``mode``: the file's mode (None: that of a
    new file under the umask)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            if mode is not None:
                os.chmod(temporary, mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
