"""Hook specifications: how a plugin adds components to musco-core.

A plugin is a module (or object) with functions marked ``@musco_core.hookimpl`` whose names are those below.
Each hook returns a list of component classes; every class declares a unique ``name`` within its role. A
marked function of another name (a misspelt hook) is refused as an error of its plugin.
Third-party packages expose such a module through the ``musco`` entry-point group::

    [project.entry-points.musco]
    my_plugin = "my_package.musco_plugin"
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "musco"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def musco_register_decompositions() -> list[type]:
    """Return :class:`~musco_core.components.Decomposer` subclasses (e.g. ``svd``, ``tucker2``)."""


@hookspec
def musco_register_rank_selectors() -> list[type]:
    """Return :class:`~musco_core.components.RankSelector` subclasses (e.g. ``vbmf``, ``manual``)."""


@hookspec
def musco_register_layer_adapters() -> list[type]:
    """Return :class:`~musco_core.components.LayerAdapter` subclasses, each naming the module types it handles."""


@hookspec
def musco_register_schedulers() -> list[type]:
    """Return :class:`~musco_core.components.Scheduler` subclasses (e.g. ``musco``)."""
