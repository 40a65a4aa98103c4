import pytest
import torch

from musco_core import Registry, make_plugin_manager


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _latency_cache(tmp_path, monkeypatch):
    """Latency budgets cache their timings in the test's own folder, never in the user's cache."""
    monkeypatch.setenv("MUSCO_LATENCY_CACHE", str(tmp_path / "latency-cache.json"))


@pytest.fixture(scope="session")
def registry():
    """The bundled components only, whatever else is installed (test_external_plugin checks entry points)."""
    return Registry.from_plugin_manager(make_plugin_manager(entry_points=False))
