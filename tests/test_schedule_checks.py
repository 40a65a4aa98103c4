"""A schedule is checked against the model once, with every problem of a file (its own and the model's) in one
ConfigError whose lines name the file; the number of compressions is bounded by what the layers allow."""
from __future__ import annotations

import sys
import textwrap

import pytest
import yaml
from click.testing import CliRunner
from torch import nn

from musco_core import Compressor, ConfigError
from musco_core.cli import main


def model():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32, 10))


SCHEDULE = {"version": 1, "settings": {"nglobal_compress_iters": 2}, "layers": {
    "2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[16, 8], "x"]},  # the file
    "5": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [12]},  # the model: 12 > 10, 1 rank
    "fc": {"decomposition": "svd", "rank_selection": "vbmf"},  # the model: no such layer
}}


def test_a_files_own_problems_and_the_models_come_together_naming_the_file(tmp_path, registry):
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(SCHEDULE))
    with pytest.raises(ConfigError) as caught:
        Compressor.from_yaml(model(), path, registry=registry)
    lines = str(caught.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert any('$.layers["2"].manual_rank[1]: expected a positive int' in line for line in lines)
    assert any('$.layers["5"]: manual_rank has 1 entries but the layer is compressed 2 times' in line
               for line in lines)
    assert any('$.layers["fc"]: no layer of that name in Sequential' in line for line in lines)
    assert len(lines) == 3


def test_a_dict_schedule_is_named_model_compr_kwargs(registry):
    with pytest.raises(ConfigError, match=r'^model_compr_kwargs: \$\.layers\["fc"\]: no layer of that name'):
        Compressor(model(), model_compr_kwargs={"fc": {"decomposition": "svd", "rank_selection": "vbmf"}},
                   registry=registry)


def test_config_validate_with_a_model_lists_both_kinds_of_problem(tmp_path, monkeypatch):
    (tmp_path / "schedule_models.py").write_text(textwrap.dedent("""
        from torch import nn
        def model():
            return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(32, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("schedule_models", None)
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(SCHEDULE))
    result = CliRunner().invoke(main, ["config", "validate", str(path), "--model", "schedule_models:model"])
    assert result.exit_code == 2
    assert result.output.count(str(path)) == 3 and "manual_rank[1]" in result.output and '"fc"' in result.output


@pytest.mark.parametrize("iterations", [5, 40])
def test_more_compressions_than_a_layers_rank_can_halve_are_refused(registry, iterations):
    schedule = {"version": 1, "settings": {"nglobal_compress_iters": iterations},
                "layers": {"5": {"decomposition": "svd", "rank_selection": "vbmf"}}}
    with pytest.raises(ConfigError, match=rf'\$\.layers\["5"\]: compressed {iterations} more time\(s\), but its '
                                          r"largest rank 10 can halve at most 4 times"):
        Compressor(model(), model_compr_kwargs=schedule, registry=registry)


def test_as_many_compressions_as_the_rank_allows_are_planned(registry):
    schedule = {"version": 1, "settings": {"nglobal_compress_iters": 4},
                "layers": {"5": {"decomposition": "svd", "rank_selection": "vbmf"}}}
    assert Compressor(model(), model_compr_kwargs=schedule, registry=registry).niters == 4
