"""pytest setup for the documentation: every ``>>>`` example in ``docs/*.md`` runs as a doctest.

The root ``pyproject.toml`` adds ``docs`` to ``testpaths`` and ``--doctest-glob='*.md'`` to ``addopts``. Each
page is one test; it runs in a fresh temporary directory (examples write schedules and saved models into the
current directory), with ``torch.manual_seed(0)``, and with ``sys.path`` and ``sys.modules`` restored afterwards
(the command-line examples import a module they write).
"""
from __future__ import annotations

import sys

import pytest
import torch

# Sphinx's configuration, its extension and the build output are not tests.
collect_ignore = ["conf.py"]
collect_ignore_glob = ["_build/*", "_build", "_ext/*", "_ext"]


@pytest.fixture(autouse=True)
def _doc_example_sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUSCO_DISABLE_PLUGINS", "")  # nothing disabled; restored even if an example fails
    torch.manual_seed(0)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:
        module = sys.modules.get(name)
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
