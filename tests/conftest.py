import pytest
import torch

from musco_core import default_registry


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def registry():
    return default_registry()
