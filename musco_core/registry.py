"""The registry: name -> component for each role, built from the plugin hooks."""
from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

import attrs
from torch import nn

from .components import Decomposer, LayerAdapter, RankSelector, Scheduler
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
    """A component that was not registered because another plugin had registered its name first."""

    rejected: Provided
    message: str


class Role(Generic[T]):
    """The components of one role, by name."""

    def __init__(self, title: str, base: type[T], hook: str) -> None:
        self.title, self.base, self.hook = title, base, hook
        self.entries: dict[str, Provided] = {}

    def check(self, component: Any, source: PluginSource) -> None:
        """Raises PluginError unless ``component`` is a class of this role that declares a name."""
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

    def add(self, component: type, source: PluginSource, clashes: list[Clash] | None = None) -> None:
        """Registers ``component``; a name taken already raises, or is recorded in ``clashes`` when given (the first
        registration is kept)."""
        name = component.name
        if name in self.entries:
            other = self.entries[name].source
            error = DuplicateComponentError(
                f"{self.title} {short_repr(name)} is registered twice: by plugin {other.name!r} ({other.distribution})"
                f" and by plugin {source.name!r} ({source.distribution})")
            if clashes is None:
                raise error
            clashes.append(Clash(Provided(self.title, name, component, source), str(error)))
            return
        self.entries[name] = Provided(self.title, name, component, source)

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
        self.decompositions: Role[Decomposer] = Role("decomposition", Decomposer, "musco_register_decompositions")
        self.rank_selectors: Role[RankSelector] = Role("rank selector", RankSelector, "musco_register_rank_selectors")
        self.adapters: Role[LayerAdapter] = Role("layer adapter", LayerAdapter, "musco_register_layer_adapters")
        self.schedulers: Role[Scheduler] = Role("scheduler", Scheduler, "musco_register_schedulers")
        self._adapter_by_type: dict[type | str, str] = {}  # a class, or a class's "module.qualname"
        #: Components refused because their name was taken (only with ``from_plugin_manager(keep_clashes=True)``).
        self.clashes: list[Clash] = []

    @property
    def roles(self) -> tuple[Role, ...]:
        return (self.decompositions, self.rank_selectors, self.adapters, self.schedulers)

    @classmethod
    def from_plugin_manager(cls, manager: MuscoPluginManager, *, strict: bool = False, keep_clashes: bool = False
                            ) -> Registry:
        """Calls each plugin's hooks one plugin at a time, so a failing plugin is skipped (or raised when strict).

        Two components of one role with the same name raise :class:`DuplicateComponentError` (which one would a
        schedule mean?), in any mode; with ``keep_clashes`` the first stays registered and the others are recorded
        in :attr:`clashes`, for listings that must show everything (``musco plugins``).
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
            except Exception as exc:  # a broken plugin is reported and skipped, the others still load
                manager.report_failure(plugin_name, source.distribution, exc, strict=strict)
                continue
            for role, component in provided:
                role.add(component, source, clashes)
        for name, provided in registry.adapters.entries.items():
            for module_type in provided.component.module_types:
                registry._adapter_by_type.setdefault(module_type, name)
        return registry

    def match(self, module: nn.Module) -> AdapterMatch | None:
        """The adapter of the closest type in the module's MRO, if it reproduces the module; None when no adapter
        lists a type of the module (a norm, an activation, a container).

        An adapter handles the classes its ``module_types`` lists exactly, and their subclasses that define none
        of the attributes the stock computation goes through (``forward``, ``_conv_forward``, the call machinery,
        ``weight``/``bias`` properties). Listing a subclass declares that the adapter reproduces it. A module
        with hooks, pruning, weight norm or parametrizations of its own is never handled: replacing it would
        drop them (see :func:`musco_core.surgery.why_not_replaceable`).
        """
        for klass in type(module).__mro__:
            for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
                if key in self._adapter_by_type:
                    name = self._adapter_by_type[key]
                    reason = why_not_replaceable(module, klass)
                    if reason is not None:
                        reason = f"the {name} adapter rebuilds a stock {klass.__qualname__}, but {reason}"
                    return AdapterMatch(name if reason is None else None, reason)
        return None

    def adapter_for(self, module: nn.Module) -> LayerAdapter | None:
        """A fresh instance of the adapter that reproduces the module, or None (see :meth:`unsupported_reason`)."""
        match = self.match(module)
        return None if match is None or match.adapter is None else self.adapters.get(match.adapter)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why no adapter handles the module, or None when one does."""
        match = self.match(module)
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
