"""Building a plugin manager: the bundled plugins plus every installed ``musco`` entry point.

Entry points are loaded one by one, so one broken third-party plugin is reported and skipped while the rest
still load (``strict=True`` raises instead). Plugins listed in ``$MUSCO_DISABLE_PLUGINS`` (comma-separated
names) or in ``disabled`` are not loaded at all.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Iterable

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError, one_line

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "musco"
DISABLE_ENV = "MUSCO_DISABLE_PLUGINS"
BUNDLED_DISTRIBUTION = "musco-core"
BUNDLED_PLUGINS = (
    "musco_plugins.adapters",
    "musco_plugins.svd",
    "musco_plugins.whitened_svd",
    "musco_plugins.tucker2",
    "musco_plugins.cp",
    "musco_plugins.rank_selectors",
    "musco_plugins.budget",
    "musco_plugins.schedulers",
)


@attrs.frozen
class PluginSource:
    """Where a plugin came from: its registered name and the distribution that installed it."""

    name: str
    distribution: str
    version: str


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped, and why."""

    name: str
    distribution: str
    error: str


class MuscoPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and which ones failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, PluginSource] = {}
        self.failures: list[PluginFailure] = []

    def add_plugin(self, plugin: object, source: PluginSource, *, strict: bool) -> bool:
        """Registers one plugin; on failure records it (or raises when ``strict``) and returns False."""
        try:
            self.register(plugin, name=source.name)
            self._check_hook_names(plugin)
        except (Exception, SystemExit) as exc:  # a plugin's hooks are validated here: report, do not crash the host
            if self.get_plugin(source.name) is plugin:  # pluggy < 1.7 leaves a half-registered plugin
                self.unregister(plugin, name=source.name)
            self.report_failure(source.name, source.distribution, exc, strict=strict)
            return False
        self.sources[source.name] = source
        return True

    def _check_hook_names(self, plugin: object) -> None:
        """Raises PluginError for a hook implementation of ``plugin`` that no hook specification names (a misspelt
        hook would otherwise never be called), as pluggy's ``check_pending`` does, ``optionalhook`` ones excepted."""
        known = sorted(caller.name for caller in self.hook.__dict__.values()
                       if isinstance(caller, pluggy.HookCaller) and caller.has_spec())
        for caller in self.get_hookcallers(plugin) or ():
            if not caller.has_spec() and any(impl.plugin is plugin and not impl.optionalhook
                                             for impl in caller.get_hookimpls()):
                close = difflib.get_close_matches(caller.name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known hooks: {', '.join(known)}"
                raise PluginError(f"unknown hook {caller.name!r} ({hint})")

    def report_failure(self, name: str, distribution: str, exc: BaseException, *, strict: bool) -> None:
        message = one_line(f"{type(exc).__name__}: {exc}")
        if strict:
            raise PluginError(f"plugin {name!r} from {distribution} failed: {message}") from exc
        log.warning("skipping plugin %r from %s: %s", name, distribution, message)
        self.failures.append(PluginFailure(name, distribution, message))


def disabled_from_env() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def make_plugin_manager(*, entry_points: bool = True, strict: bool = False, disabled: Iterable[str] = (),
                        plugins: Iterable[tuple[str, object]] = ()) -> MuscoPluginManager:
    """A fresh plugin manager with the bundled plugins, installed entry points and ``plugins`` (name, object).

    ``disabled`` adds to the names in ``$MUSCO_DISABLE_PLUGINS``.
    """
    skip = disabled_from_env() | set(disabled)
    manager = MuscoPluginManager()
    bundled_version = _version(BUNDLED_DISTRIBUTION)
    for module_name in BUNDLED_PLUGINS:
        if module_name not in skip:
            manager.add_plugin(importlib.import_module(module_name),
                               PluginSource(module_name, BUNDLED_DISTRIBUTION, bundled_version), strict=True)
    for name, plugin in plugins:
        if name not in skip:
            manager.add_plugin(plugin, PluginSource(name, "<registered in code>", ""), strict=strict)
    if entry_points:
        _load_entry_points(manager, skip, strict=strict)
    return manager


def _load_entry_points(manager: MuscoPluginManager, skip: set[str], *, strict: bool) -> None:
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        distribution = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
        if entry_point.name in skip:
            log.info("plugin %r from %s disabled", entry_point.name, distribution)
            continue
        try:
            plugin = entry_point.load()
        except (Exception, SystemExit) as exc:  # a broken third-party import must not break the host
            manager.report_failure(entry_point.name, distribution, exc, strict=strict)
            continue
        version = dist.version if dist is not None else "unknown"
        manager.add_plugin(plugin, PluginSource(entry_point.name, distribution, version), strict=strict)
