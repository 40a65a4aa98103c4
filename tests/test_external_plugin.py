"""The example third-party plugin in examples/musco-spatial-svd, installed with pip as a user would (make install
does it): found through the `musco` entry-point group, usable from YAML, listed by `musco plugins`."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from musco_core import Compressor, ConfigError, default_registry
from musco_core.cli import main


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=2,
                                                                           dilation=2),
                         nn.ReLU(), nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_the_package_is_installed_and_registered():
    assert importlib.metadata.version("musco-spatial-svd") == "0.1.0"
    registry = default_registry(strict=True)
    for role, name in ((registry.decompositions, "spatial_svd"), (registry.rank_selectors, "energy")):
        source = role.entries[name].source
        assert (source.distribution, source.version) == ("musco-spatial-svd", "0.1.0")


def write(tmp_path, layers):
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "settings": {"ft_every": 2}, "layers": layers}))
    return path


def test_a_yaml_schedule_naming_the_plugin_compresses_a_model(tmp_path):
    model, x = cnn().eval(), torch.randn(2, 3, 12, 12)
    path = write(tmp_path, {
        "2": {"decomposition": "spatial_svd", "rank_selection": "energy", "energy_threshold": 0.6},
        "0": {"decomposition": "spatial_svd", "rank_selection": "manual", "manual_rank": [4]}})
    compressor = Compressor.from_yaml(model, path, example_input=x)
    results = compressor.compression_step()
    assert all(r.applied for r in results)
    compressed = compressor.compressed_model
    assert [m.kernel_size for m in compressed[2]] == [(3, 1), (1, 3)]
    assert compressed(x).shape == model(x).shape
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in model.parameters())


def test_full_rank_spatial_svd_reproduces_the_layer(tmp_path):
    model, x = cnn().double().eval(), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    path = write(tmp_path, {"2": {"decomposition": "spatial_svd", "rank_selection": "manual",
                                  "manual_rank": [48], "force": True}})  # min(16 * 3, 32 * 3)
    compressor = Compressor.from_yaml(model, path)
    compressor.compression_step()
    torch.testing.assert_close(compressor.compressed_model(x), model(x), rtol=1e-9, atol=1e-9)


def test_musco_plugins_lists_the_plugin():
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0
    rows = [line.split() for line in result.output.splitlines()]
    assert ["decomposition", "spatial_svd", "spatial_svd", "musco-spatial-svd", "0.1.0"] in rows
    assert ["rank", "selector", "energy", "spatial_svd", "musco-spatial-svd", "0.1.0"] in rows


@pytest.mark.parametrize("layer,settings,message", [
    ("2", {"rank_selection": "energy", "energy_threshold": 1.5},
     r'\$\.layers\["2"\]\.energy_threshold: expected a number in \[0, 1\], got 1.5'),
    ("7", {"rank_selection": "manual", "manual_rank": [4]}, r'\$\.layers\["7"\].*spatial_svd needs a 2-d'),
    ("4", {"rank_selection": "manual", "manual_rank": [4]}, r'\$\.layers\["4"\].*spatial_svd needs a 2-d'),
])
def test_bad_plugin_settings_are_config_errors(tmp_path, layer, settings, message):
    path = write(tmp_path, {layer: {"decomposition": "spatial_svd", **settings}})
    with pytest.raises(ConfigError, match=message):
        Compressor.from_yaml(cnn(), path)
