"""The registry: name -> component for each role, built from the plugin hooks."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
from torch import nn

from .components import LAYER_SCHEDULE_KEYS, Decomposer, LayerAdapter, RankSelector, Scheduler
from .errors import DuplicateComponentError, PluginError, UnknownComponentError, short_repr
from .plugins import MuscoPluginManager, PluginSource, disabled_from_env, make_plugin_manager
from .surgery import why_not_replaceable

log = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class AdapterMatch:
    """How the registry sees a module of a type some adapter lists: ``adapter`` names the adapter that reproduces
    it exactly, or ``reason`` says why none does (see :meth:`Registry.match`)."""

    adapter: str | None
    reason: str | None = None


@attrs.frozen
class Provided:
    """A registered component class and the plugin that supplied it."""

    role: str
    name: str
    component: type
    source: PluginSource


@attrs.frozen
class Clash:
    """A component that was not registered because one registered first claims its name or a module type it lists
    (see :meth:`Registry.from_plugin_manager`)."""

    rejected: Provided
    message: str


class Role(Generic[T]):
    """The components of one role, by name.

    ``required`` names the methods of ``base`` a component must implement (they raise NotImplementedError there),
    and ``contract`` returns what else is wrong with a component of this role, or None.
    """

    def __init__(self, title: str, base: type[T], hook: str, required: tuple[str, ...] = (),
                 contract: Callable[[type], str | None] | None = None) -> None:
        self.title, self.base, self.hook = title, base, hook
        self.required, self.contract = required, contract
        self.entries: dict[str, Provided] = {}

    def check(self, component: Any, source: PluginSource) -> None:
        """Raises PluginError unless ``component`` is a class of this role that declares a name and ``Params`` and
        keeps the role's contract."""
        if not (isinstance(component, type) and issubclass(component, self.base)):
            raise PluginError(f"plugin {source.name!r} returned {short_repr(component)} from {self.hook}, "
                              f"expected a subclass of {self.base.__qualname__}")
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {source.name!r}: {component.__qualname__} must declare a string `name`")
        params = component.Params
        if not (isinstance(params, type) and attrs.has(params)):
            raise PluginError(f"plugin {source.name!r}: {component.__qualname__}.Params must be an attrs class "
                              f"(decorate it with @attrs.frozen), got {short_repr(params)}")
        problem = self.contract(component) if self.contract is not None else None
        missing = [method for method in self.required if _inherited(component, self.base, method)]
        if problem is None and missing:
            problem = f"does not implement {', '.join(missing)} (required of a {self.base.__qualname__})"
        if problem is not None:
            raise PluginError(f"plugin {source.name!r}: {self.title} {component.__qualname__} ({name!r}) {problem}")

    def clash(self, name: str, source: PluginSource) -> str | None:
        """Why a component called ``name`` from ``source`` cannot be added: the name is taken; or None."""
        if name not in self.entries:
            return None
        other = self.entries[name].source
        return (f"{self.title} {short_repr(name)} is registered twice: by plugin {other.name!r} ({other.distribution})"
                f" and by plugin {source.name!r} ({source.distribution})")

    def describe(self, name: str) -> str:
        """The component called ``name`` with the plugin that supplied it, for errors about a broken contract."""
        return f"{self.title} {name!r} of plugin {self.entries[name].source.name!r}"

    def get(self, name: str) -> T:
        """A fresh instance of the component called ``name``."""
        try:
            return self.entries[name].component()
        except KeyError:
            known = ", ".join(sorted(self.entries)) or "none"
            raise UnknownComponentError(f"unknown {self.title} {short_repr(name)}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self.entries)


class Registry:
    """Every component the loaded plugins supplied, with lookups by name and by module type."""

    def __init__(self, manager: MuscoPluginManager) -> None:
        self.manager = manager
        self.decompositions: Role[Decomposer] = Role(
            "decomposition", Decomposer, "musco_register_decompositions",
            ("unsupported_reason", "layout", "max_ranks", "decompose"), _decomposer_problem)
        self.rank_selectors: Role[RankSelector] = Role(
            "rank selector", RankSelector, "musco_register_rank_selectors", contract=_selector_problem)
        self.adapters: Role[LayerAdapter] = Role(
            "layer adapter", LayerAdapter, "musco_register_layer_adapters", ("read", "build"), _adapter_problem)
        self.schedulers: Role[Scheduler] = Role("scheduler", Scheduler, "musco_register_schedulers", ("plan",))
        self._adapter_by_type: dict[type | str, str] = {}  # a class, or a class's "module.qualname"
        #: Components refused as clashes (only with ``from_plugin_manager(keep_clashes=True)``).
        self.clashes: list[Clash] = []

    @property
    def roles(self) -> tuple[Role, ...]:
        return (self.decompositions, self.rank_selectors, self.adapters, self.schedulers)

    def source_of(self, role: str, name: str) -> PluginSource | None:
        """The plugin that supplied the component ``name`` of ``role`` (a role's title), or None when none did."""
        entry = {r.title: r for r in self.roles}[role].entries.get(name)
        return None if entry is None else entry.source

    @classmethod
    def from_plugin_manager(cls, manager: MuscoPluginManager, *, strict: bool = False, keep_clashes: bool = False
                            ) -> Registry:
        """Calls each plugin's hooks one plugin at a time, so a failing plugin is skipped (or raised when strict).

        Two components of one role with the same name raise :class:`DuplicateComponentError` (which one would a
        schedule mean?), in any mode, as do a decomposition and a whole-model rank selector of one name (which one
        would ``settings.algo_kwargs`` set?) and two adapters listing one module type (which one would handle it?);
        with ``keep_clashes`` the first registered (plugins in loading order: bundled, in code, entry points) stays
        and the others are recorded in :attr:`clashes`, for listings that must show everything (``musco plugins``).
        """
        registry = cls(manager)
        clashes = registry.clashes if keep_clashes else None
        contributions: dict[str, list[tuple[Role, Any]]] = {name: [] for name in manager.sources}
        for role in registry.roles:
            for impl in getattr(manager.hook, role.hook).get_hookimpls():
                if impl.plugin_name in contributions:
                    contributions[impl.plugin_name].append((role, impl.function))
        for plugin_name, hooks in contributions.items():
            source = manager.sources[plugin_name]
            try:  # call and check every hook of the plugin before adding any of its components
                provided = [(role, component) for role, hook in hooks for component in _as_list(hook(), role)]
                for role, component in provided:
                    role.check(component, source)
            except (Exception, SystemExit) as exc:  # a broken plugin is reported and skipped, the others still load
                manager.report_failure(plugin_name, source.distribution, exc, strict=strict)
                continue
            for role, component in provided:
                registry.add(role, component, source, clashes)
        return registry

    def add(self, role: Role, component: type, source: PluginSource, clashes: list[Clash] | None = None) -> None:
        """Registers ``component`` unless it clashes with one registered before: its name is taken in its role,
        ``settings.algo_kwargs`` would key both it and a component of another role, or it is an adapter listing a
        module type another adapter lists. A clash raises DuplicateComponentError, or is recorded in ``clashes``
        when given; the first registration is kept."""
        name = component.name
        message = role.clash(name, source) or self._settings_clash(role, component, source) or (
            self._type_clash(component, source) if role is self.adapters else None)
        if message is not None:
            if clashes is None:
                raise DuplicateComponentError(message)
            clashes.append(Clash(Provided(role.title, name, component, source), message))
            return
        role.entries[name] = Provided(role.title, name, component, source)
        if role is self.adapters:
            self._adapter_by_type.update(dict.fromkeys(component.module_types, name))

    def _settings_clash(self, role: Role, component: type, source: PluginSource) -> str | None:
        """A decomposition and a whole-model rank selector of one name: ``settings.algo_kwargs[name]`` would set
        both (:meth:`musco_core.schedule.RunSettings.params_for`)."""
        whole_model = "whole-model rank selector"
        if role is self.decompositions:
            title, other_title, other = role.title, whole_model, self.rank_selectors.entries.get(component.name)
            other = other if other is not None and other.component.scope == "model" else None
        elif role is self.rank_selectors and component.scope == "model":
            title, other_title, other = whole_model, "decomposition", self.decompositions.entries.get(component.name)
        else:
            return None
        if other is None:
            return None
        return (f"{title} {component.name!r} of plugin {source.name!r} ({source.distribution}) has the name of "
                f"{other_title} {component.name!r} of plugin {other.source.name!r} ({other.source.distribution}): "
                f"settings.algo_kwargs.{component.name} would set both")

    def _type_clash(self, component: type, source: PluginSource) -> str | None:
        """An adapter listing a module type (as a class or by its dotted name) that another adapter lists."""
        claimed = {_dotted(key): name for key, name in self._adapter_by_type.items()}
        for module_type in component.module_types:
            other = claimed.get(_dotted(module_type))
            if other is not None:
                holder = self.adapters.entries[other].source
                return (f"layer adapter {component.name!r} of plugin {source.name!r} ({source.distribution}) lists "
                        f"{_dotted(module_type)}, which layer adapter {other!r} of plugin {holder.name!r} "
                        f"({holder.distribution}) lists already: which one would handle it?")
        return None

    def match(self, module: nn.Module, *, loading: bool = False) -> AdapterMatch | None:
        """The adapter of the closest type in the module's MRO, if it reproduces the module; None when no adapter
        lists a type of the module (a norm, an activation, a container).

        An adapter handles the classes its ``module_types`` lists exactly, and their subclasses that define none
        of the attributes the stock computation goes through (``forward``, ``_conv_forward``, the call machinery,
        ``weight``/``bias`` properties). Listing a subclass declares that the adapter reproduces it. A module
        with hooks, pruning, weight norm or parametrizations of its own is never handled: replacing it would
        drop them (see :func:`musco_core.surgery.why_not_replaceable`, and there ``loading``).
        """
        for klass in type(module).__mro__:
            for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
                if key in self._adapter_by_type:
                    name = self._adapter_by_type[key]
                    reason = why_not_replaceable(module, klass, loading=loading) or self._weight_problem(name, module)
                    if reason is not None:
                        reason = f"the {name} adapter rebuilds a stock {klass.__qualname__}, but {reason}"
                    return AdapterMatch(name if reason is None else None, reason)
        return None

    def _weight_problem(self, adapter: str, module: nn.Module) -> str | None:
        """What in the weight and bias the adapter reads keeps them from being factorized as the layer's, or None:
        a dtype other than a real floating point one (torch runs complex layers, whose imaginary part the
        decompositions would drop), or shapes other than those of the geometry the adapter reads from the module's
        attributes. Torch computes with the tensors alone, so a layer whose weight was replaced by one of another
        shape (channel pruning that slices weights but not ``in_features``) still runs, but its chain would be
        built, and its weights counted, for the geometry its attributes give."""
        spec, weight, bias = self.adapters.get(adapter).read(module)
        if spec.adapter != adapter:  # later stages, saving and loading take the adapter by this name
            return (f"its read() gives a LayerSpec of adapter {spec.adapter!r}: LayerSpec.adapter must be "
                    f"{adapter!r}, the name of the adapter that read it")
        for what, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and not tensor.is_floating_point():
                return f"its {what} is {tensor.dtype}: the decompositions factorize real floating-point weights"
        expected = {"weight": spec.weight_shape, "bias": (spec.out_channels,) if spec.has_bias else None}
        for what, tensor in (("weight", weight), ("bias", bias)):
            shape = None if tensor is None else tuple(tensor.shape)
            if shape != expected[what]:
                return (f"its {what} has shape {shape} where its attributes, a {spec.describe()}, give "
                        f"{expected[what]} (its weights were replaced after it was built): make its channel or "
                        f"feature counts, kernel size and groups describe its weights")
        return None

    def failures_note(self) -> str:
        """For an error about an unknown component name: the plugins that failed to load (whose components are
        missing, so the name may be right), as ``"; plugins that failed to load: ..."``, or ``""``."""
        failures = "; ".join(f"{failure.name!r} ({failure.distribution}): {failure.error}"
                             for failure in self.manager.failures)
        return f"; plugins that failed to load: {failures}" if failures else ""

    def adapter_for(self, module: nn.Module, *, loading: bool = False) -> LayerAdapter | None:
        """A fresh instance of the adapter that reproduces the module, or None (see :meth:`unsupported_reason`)."""
        match = self.match(module, loading=loading)
        return None if match is None or match.adapter is None else self.adapters.get(match.adapter)

    def unsupported_reason(self, module: nn.Module, *, loading: bool = False) -> str | None:
        """Why no adapter handles the module, or None when one does."""
        match = self.match(module, loading=loading)
        if match is None:
            return (f"no adapter handles {self._type_name(type(module))}; "
                    f"known adapters: {', '.join(self.adapters.names()) or 'none'}")
        return match.reason

    def _type_name(self, klass: type) -> str:
        """The class's name, with its module where the name alone reads like a type an adapter handles or an
        adapter's name (a dynamically quantized ``Linear`` is no ``nn.Linear``)."""
        handled = {(key if isinstance(key, str) else key.__qualname__).rpartition(".")[2].lower()
                   for key in self._adapter_by_type}
        if klass.__name__.lower() in handled | {name.lower() for name in self.adapters.names()}:
            return f"{klass.__module__}.{klass.__qualname__}"
        return klass.__qualname__

    def provided(self) -> list[Provided]:
        """Every registered component, role by role, for listings such as ``musco plugins``."""
        return [role.entries[name] for role in self.roles for name in role.names()]


def _inherited(component: type, base: type, method: str) -> bool:
    """Whether ``component`` leaves ``base``'s ``method`` as it is (or is no method)."""
    return not callable(getattr(component, method, None)) or getattr(component, method) is getattr(base, method)


def _dotted(module_type: type | str) -> str:
    """A module type as adapters may list it by name: ``module.qualname``."""
    return module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"


def _decomposer_problem(component: type) -> str | None:
    if component.name == "auto":
        return "is named 'auto', which a layer's `decomposition` key reads as every decomposition a selector can price"
    return None


def _selector_problem(component: type) -> str | None:
    """A scope that is neither ``layer`` nor ``model``, the scope's method left out, or a layer-scope selector's
    ``Params`` field that the layer's schedule keeps for the core (:data:`LAYER_SCHEDULE_KEYS`)."""
    scope = getattr(component, "scope", None)
    if scope not in ("layer", "model"):
        return f"has scope {short_repr(scope)}; expected 'layer' or 'model'"
    method = "select" if scope == "layer" else "allocate"
    if _inherited(component, RankSelector, method):
        return f"does not implement {method} (required of a {scope}-scope RankSelector)"
    reserved = sorted(field.name for field in attrs.fields(component.Params) if field.name in LAYER_SCHEDULE_KEYS)
    if scope == "layer" and reserved:
        return (f"has Params fields {reserved}: these keys of a layer's schedule are the core's "
                f"({', '.join(sorted(LAYER_SCHEDULE_KEYS))}); rename them")
    return None


def _adapter_problem(component: type) -> str | None:
    module_types = component.module_types
    if not (isinstance(module_types, tuple) and module_types and all(
            (isinstance(t, type) and issubclass(t, nn.Module)) or (isinstance(t, str) and _is_dotted_name(t))
            for t in module_types)):
        return (f"has module_types {short_repr(module_types)}; expected a non-empty tuple of nn.Module classes or "
                f"dotted class names ('package.module.Class'), e.g. (nn.Linear,)")
    return None


def _is_dotted_name(text: str) -> bool:
    parts = text.split(".")
    return len(parts) > 1 and all(part and not any(c.isspace() for c in part) for part in parts)


def _as_list(returned: Any, role: Role) -> list:
    if returned is None:
        return []
    if not isinstance(returned, (list, tuple)):
        raise PluginError(f"{role.hook} returned {short_repr(returned)}, expected a list of "
                          f"{role.base.__qualname__} classes")
    return list(returned)


_SHARED: dict[tuple[bool, frozenset[str]], Registry] = {}


def shared_registry(*, strict: bool = False) -> Registry:
    """The registry of the bundled plugins and every installed ``musco`` entry point, name clashes kept in
    :attr:`Registry.clashes`; built once per process for each ``strict`` and ``$MUSCO_DISABLE_PLUGINS``, so a
    broken plugin is imported, and warned about, once. Shared: build your own with
    :meth:`Registry.from_plugin_manager` to change it."""
    key = (strict, frozenset(disabled_from_env()))
    if key not in _SHARED:
        _SHARED[key] = Registry.from_plugin_manager(make_plugin_manager(strict=strict), strict=strict,
                                                    keep_clashes=True)
    return _SHARED[key]


def default_registry(*, strict: bool = False) -> Registry:
    """The shared registry (see :func:`shared_registry`) for compressing: a name clash between plugins raises
    :class:`DuplicateComponentError` naming both, since a schedule naming the component would be ambiguous."""
    registry = shared_registry(strict=strict)
    if registry.clashes:
        raise DuplicateComponentError("\n".join(clash.message for clash in registry.clashes))
    return registry


def forget_shared_registries() -> None:
    """Makes the next :func:`default_registry` call load the plugins again (after installing or removing one;
    tests)."""
    _SHARED.clear()
