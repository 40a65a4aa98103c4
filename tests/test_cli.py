"""The `musco` command line: each command's output and exit code, and one-line errors without tracebacks."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from musco_core import FactorizedLayer
from musco_core.cli import main
from musco_core.io import load_compressed

FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(48, 64, 1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 40))

    STEPS = []

    def finetune(model, step):
        STEPS.append(step)

    def cnn_meta():
        with torch.device("meta"):
            return cnn()

    class Shifted(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Linear(8, 8))
            self.register_buffer("shift", torch.ones(8), persistent=False)

        def forward(self, x):
            return self[0](x) + self.shift

    def shifted_meta():
        with torch.device("meta"):
            return Shifted()

    def cnn_float64():
        return cnn().double()

    def cnn_bfloat16():
        return cnn().bfloat16()

    def noisy():
        print("building the model")  # research code often prints
        return cnn()

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("broken factory")

    class Unreached(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x).flatten(1))  # self[2] never runs

    def unreached():
        torch.manual_seed(0)
        return Unreached(nn.Conv2d(3, 32, 3, padding=1), nn.Linear(32 * 16 * 16, 64), nn.Linear(64, 64))

    class Tied(nn.Module):  # a language model whose head shares its embedding's matrix
        def __init__(self):
            super().__init__()
            self.embed, self.body, self.head = nn.Embedding(40, 16), nn.Linear(16, 16), nn.Linear(16, 40, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(torch.relu(self.body(self.embed(x))))

    def tied():
        torch.manual_seed(0)
        return Tied()
""")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_factories", None)
    yield tmp_path
    sys.modules.pop("cli_factories", None)


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("where", "args"), [
    ("musco_core.stats.ModelStats.from_model",
     ["config", "generate", "--model", "cli_factories:cnn", "--type", "vbmf"]),
    ("musco_core.cli.read_yaml", ["config", "validate", "{tmp}/schedule.yaml"]),
    ("musco_core.io.read_report", ["report", "{tmp}"]),
])
def test_ctrl_c_in_any_command_exits_130_as_compress_does(factories, monkeypatch, where, args):
    # these used to end in click's "Aborted!" with exit code 1
    (factories / "schedule.yaml").write_text("version: 1\n")
    monkeypatch.setattr(where, interrupted)
    result = run(*(arg.format(tmp=factories) for arg in args))
    assert (result.exit_code, result.output) == (130, "musco: error: interrupted; nothing partial was saved\n")


def test_generate_validate_compress_report(factories):
    schedule = factories / "schedule.yaml"
    result = run("config", "generate", "--model", "cli_factories:cnn", "--type", "param_reduction",
                 "--input-shape", "1,3,16,16")
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(result.output)
    assert document["version"] == 1 and document["layers"]["2"]["decomposition"] == "tucker2"
    document["settings"]["ft_every"] = 1
    schedule.write_text(yaml.safe_dump(document))

    result = run("config", "validate", schedule, "--model", "cli_factories:cnn")
    assert result.exit_code == 0 and "valid, 3 layer(s)" in result.output  # the classifier is the output layer

    out = factories / "out"
    result = run("compress", "--model", "cli_factories:cnn", "--config", schedule, "--input-shape", "1,3,16,16",
                 "--out", out, "--finetune", "cli_factories:finetune", "--quiet")
    assert result.exit_code == 0, result.output
    assert "parameters: 20,504 ->" in result.output
    import cli_factories
    assert cli_factories.STEPS == [1, 2, 3]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "musco.yaml", "report.json", "checkpoints",
                                               ".musco-core", ".musco-lock"}
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-0003"

    result = run("compress", "--model", "cli_factories:cnn", "--config", schedule, "--input-shape", "1,3,16,16",
                 "--out", out, "--resume", "--quiet")
    assert result.exit_code == 0, result.output  # a finished run resumes to the same saved result
    assert "parameters: 20,504 ->" in result.output and cli_factories.STEPS == [1, 2, 3]

    result = run("report", out)
    assert result.exit_code == 0 and "tucker2" in result.output and "MACs of compressible layers" in result.output
    result = run("report", out, "--json")
    assert result.exit_code == 0 and '"params_ratio"' in result.output


def test_compress_and_validate_read_the_schedule_from_stdin_with_config_dash(factories):
    # '-' was taken for a file: "musco: error: -: cannot read: No such file or directory"
    schedule = 'version: 1\nlayers: {"2": {decomposition: tucker2, rank_selection: manual, manual_rank: [[8, 8]]}}\n'
    result = CliRunner().invoke(main, ["config", "validate", "-"], input=schedule)
    assert (result.exit_code, result.output) == (0, "<stdin>: valid, 1 layer(s) compressed 1 time(s)\n")
    out = factories / "out"
    for resume in ([], ["--resume"]):
        result = CliRunner().invoke(main, ["compress", "--model", "cli_factories:cnn", "--config", "-", "--out",
                                           str(out), "--quiet", *resume], input=schedule)
        assert result.exit_code == 0 and "parameters: 20,504 ->" in result.output, result.output
    result = CliRunner().invoke(main, ["compress", "--model", "cli_factories:cnn", "--config", "-", "--out",
                                       str(out), "--quiet", "--resume"], input=schedule.replace("8, 8", "8, 4"))
    assert result.output.startswith("musco: error: --config <stdin>: is not the schedule the run in"), result.output
    result = CliRunner().invoke(main, ["config", "validate", "-"], input="version: 1\nversion: 1\n")
    assert result.output == "musco: error: <stdin>: not valid YAML: duplicate key 'version' at line 2, column 1\n"


def test_config_dash_is_refused_under_torchrun(factories, monkeypatch):
    monkeypatch.setattr("musco_core.distributed.launched_for_several", lambda: True)
    result = CliRunner().invoke(main, ["compress", "--model", "cli_factories:cnn", "--config", "-", "--out",
                                       str(factories / "out")], input="version: 1\n")
    assert result.output.startswith("musco: error: --config -: under torchrun every rank reads the schedule"), \
        result.output


def test_compress_with_weights_loads_them_first(factories):
    import cli_factories
    model = cli_factories.cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    weights = factories / "weights.pt"
    torch.save(model.state_dict(), weights)
    schedule = factories / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"version": 1, "layers": {
        "7": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [40], "force": True}}}))
    result = run("compress", "--model", "cli_factories:cnn", "--weights", weights, "--config", schedule,
                 "--out", factories / "out", "--quiet")
    assert result.exit_code == 0, result.output
    loaded = load_compressed(cli_factories.cnn(), factories / "out").eval()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_weights_load_into_a_model_the_factory_builds_on_meta(factories):
    """A copy into a meta tensor does nothing (torch only warns): the run stopped with 'has 8 parameter(s) or
    buffer(s) on the meta device'. The file's values now become the tensors, in the model's dtype."""
    import cli_factories
    model = cli_factories.cnn()
    save_file({key: 2 * value for key, value in model.state_dict().items()}, factories / "weights.safetensors")
    schedule = factories / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"version": 1, "layers": {
        "7": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [40], "force": True}}}))
    result = run("compress", "--model", "cli_factories:cnn_meta", "--weights", factories / "weights.safetensors",
                 "--config", schedule, "--input-shape", "1,3,8,8", "--out", factories / "out", "--quiet")
    assert result.exit_code == 0, result.output
    loaded = load_compressed(cli_factories.cnn(), factories / "out").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_buffer_on_meta_that_the_weights_do_not_hold_is_named(factories):
    save_file({"0.weight": torch.ones(8, 8), "0.bias": torch.zeros(8)}, factories / "weights.safetensors")
    (factories / "schedule.yaml").write_text("version: 1\n")
    result = run("compress", "--model", "cli_factories:shifted_meta", "--weights", factories / "weights.safetensors",
                 "--config", factories / "schedule.yaml", "--out", factories / "out")
    assert result.exit_code == 2 and "1 tensor on the meta device that the file does not hold" in result.output
    assert "'shift'" in result.output and not (factories / "out").exists()


@pytest.mark.parametrize("factory, dtype", [("cnn_float64", torch.float64), ("cnn_bfloat16", torch.bfloat16)])
def test_the_random_example_input_takes_the_models_dtype(factories, factory, dtype):
    schedule = factories / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"version": 1, "settings": {"rank_multiple": 1}, "layers": {
        "2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[16, 16]]}}}))
    result = run("compress", "--model", f"cli_factories:{factory}", "--config", schedule, "--input-shape",
                 "1,3,8,8", "--out", factories / "out", "--quiet")
    assert result.exit_code == 0, result.output
    import cli_factories
    loaded = load_compressed(getattr(cli_factories, factory)(), factories / "out")
    assert {p.dtype for p in loaded.parameters()} == {dtype} and isinstance(loaded[2], FactorizedLayer)


def test_plugins_lists_components_with_their_distribution():
    result = run("plugins")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["role", "name", "plugin", "distribution", "version"]
    assert any(line.split()[:4] == ["decomposition", "tucker2", "musco_plugins.tucker2", "musco-core"]
               for line in lines[1:])


@pytest.mark.parametrize("args,message", [
    (["config", "validate", "missing.yaml"], "missing.yaml: cannot read"),
    (["compress", "--model", "cli_factories:nothere", "--config", "s.yaml", "--out", "o"], "no callable 'nothere'"),
    (["compress", "--model", "no_such_module:f", "--config", "s.yaml", "--out", "o"], "cannot import no_such_module"),
    (["compress", "--model", "cli_factories", "--config", "s.yaml", "--out", "o"], "expected package.module:callable"),
    (["compress", "--model", "cli_factories:not_a_model", "--config", "s.yaml", "--out", "o"], "not a torch.nn.Module"),
    (["config", "generate", "--model", "cli_factories:cnn", "--type", "vbmf", "--input-shape", "1,x"],
     "--input-shape '1,x'"),
    (["report", "nowhere"], "report.json: cannot read"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(factories, args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("factory", "size"), [("cnn", "512 MiB of float32"), ("cnn_float64", "1024 MiB of float64"),
                                             ("cnn_bfloat16", "256 MiB of bfloat16")])
def test_the_input_size_limit_is_told_in_the_dtype_the_input_gets(factories, factory, size):
    # it said float32 whatever the model's dtype, which the example input takes
    result = run("config", "generate", "--model", f"cli_factories:{factory}", "--type", "vbmf",
                 "--input-shape", "1,4,65536,65536")
    assert result.exit_code == 2
    assert result.output == (f"musco: error: --input-shape '1,4,65536,65536': more than 134,217,728 elements "
                             f"(MAX_EXAMPLE_ELEMENTS, {size})\n")


@pytest.mark.parametrize("args", [[], ["config"]])
def test_a_group_without_a_command_prints_its_help(args):
    result = run(*args)
    assert result.exit_code == 2  # as click exits for a group without a command
    assert result.output.startswith(f"Usage: {' '.join(['musco', *args])} [OPTIONS] COMMAND [ARGS]...\n"), result.output
    assert "\nCommands:\n" in result.output
    unknown = run(*args, "nope")
    assert unknown.exit_code == 2 and unknown.output.count("\n") == 1
    assert unknown.output.startswith("musco: error: No such command 'nope'.")


@pytest.mark.parametrize("args, option", [
    (["compress", "--model", "cli_factories:cnn", "--config", "s.yaml", "--out", ""], "--out"),
    (["compress", "--model", "cli_factories:cnn", "--config", "", "--out", "o"], "--config"),
    (["compress", "--model", "cli_factories:cnn", "--config", "s.yaml", "--out", "o", "--weights", ""], "--weights"),
    (["config", "validate", ""], "SCHEDULE"), (["report", ""], "DIRECTORY")])
def test_an_empty_path_is_refused(factories, monkeypatch, args, option):
    monkeypatch.chdir(factories)
    (factories / "s.yaml").write_text("version: 1\nlayers: {}\n")
    before = sorted(factories.iterdir())
    result = run(*args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"musco: error: Invalid value for '{option}': an empty path; give a file or folder "
                                    f"name (. for the current directory)"), result.output
    assert sorted(factories.iterdir()) == before


def test_an_invalid_schedule_is_reported_with_its_path(factories):
    schedule = factories / "bad.yaml"
    schedule.write_text("version: 1\nlayers:\n  '2': {decomposition: tucker2, rank_selection: vbmf, "
                        "vbmf_weakenen_factor: 3}\n")
    result = run("config", "validate", schedule)
    assert result.exit_code == 2
    assert f'{schedule}: $.layers["2"].vbmf_weakenen_factor: expected a number in [0, 1], got 3' in result.output


@pytest.mark.parametrize("name, text", [
    ("musco.yaml", "format: 1\nmusco_core_version: 0.1.0\nlayers: {}\nschedule: {version: 1}\n"),
    ("report.json", '{"format": 2, "layers": [], "totals": {}}'),
    ("state.yaml", "format: 5\nrun_id: ab12\nnext_step: 2\n")])
def test_a_file_musco_core_wrote_given_as_a_schedule_is_one_line(factories, name, text):
    """An output's musco.yaml given as --config was read as an original {layer: settings} dict: a line per key,
    each blaming a "layer" named format, layers or set_id."""
    (factories / name).write_text(text)
    result = run("config", "validate", factories / name)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"{factories / name}: $.format: a file musco-core writes (a manifest, report or run state), not a " \
           f"schedule" in result.output


def test_an_original_config_written_by_yaml_dump_with_tuple_ranks_is_read(factories):
    """The original's tucker2 ranks are (r_out, r_in) tuples, which yaml.dump writes as !!python/tuple: such a file
    was refused as "not valid YAML"; the tag builds a plain tuple (nothing is imported or run)."""
    original = {"2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [(16, 8)],
                      "param_reduction_rate": None, "vbmf_weakenen_factor": None, "curr_compr_iter": 0},
                "4": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": ((8,),)}, "7": None}
    (factories / "dumped.yaml").write_text(yaml.dump(original))
    assert "!!python/tuple" in (factories / "dumped.yaml").read_text()
    result = run("config", "validate", factories / "dumped.yaml", "--model", "cli_factories:cnn")
    assert result.exit_code == 0 and "valid, 2 layer(s)" in result.output, result.output


def test_what_the_users_code_prints_stays_out_of_a_generated_schedule(factories):
    """`musco config generate ... > schedule.yaml` with a factory that prints wrote its line into the schedule,
    which then was not valid YAML."""
    result = run("config", "generate", "--model", "cli_factories:noisy", "--type", "param_reduction",
                 "--input-shape", "1,3,16,16")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["version"] == 1 and "building the model" in result.stderr


def test_the_installed_console_script_runs(factories):
    musco = Path(sys.executable).with_name("musco")
    env = {**os.environ, "PYTHONPATH": str(factories)}
    done = subprocess.run([str(musco), "config", "generate", "--model", "cli_factories:cnn", "--type", "template"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["layers"]["7"]["curr_compr_iter"] == 0


def test_the_console_script_finds_the_model_module_in_the_current_directory(tmp_path):
    (tmp_path / "local_models.py").write_text(FACTORIES)  # not on sys.path: found in the current directory
    musco = Path(sys.executable).with_name("musco")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(musco), "config", "generate", "--model", "local_models:cnn", "--type", "template"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["layers"]["0"]["curr_compr_iter"] == 0


def test_debug_shows_the_traceback_of_a_user_error(factories):
    plain = run("config", "generate", "--model", "cli_factories:broken", "--type", "vbmf")
    debug = run("--debug", "config", "generate", "--model", "cli_factories:broken", "--type", "vbmf")
    assert plain.exit_code == debug.exit_code == 2
    assert plain.stderr == "musco: error: --model 'cli_factories:broken' raised RuntimeError: broken factory\n"
    assert "Traceback (most recent call last)" in debug.stderr
    assert 'raise RuntimeError("broken factory")' in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()


def test_a_malicious_pickle_given_as_weights_is_refused_unexecuted(factories):
    marker = factories / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = factories / "evil.pt"
    torch.save({"0.weight": Exploit()}, evil)  # a state dict that would run code when unpickled
    schedule = factories / "schedule.yaml"
    schedule.write_text("version: 1\nlayers: {}\n")
    result = run("compress", "--model", "cli_factories:cnn", "--weights", evil, "--config", schedule,
                 "--out", factories / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "refused, not a plain tensor state dict" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.SAFETENSORS", "model.st", "weights"])
def test_safetensors_weights_are_told_by_their_header_not_their_name(factories, name):
    import cli_factories

    save_file({key: value + 1 for key, value in cli_factories.cnn().state_dict().items()}, factories / name)
    result = run("config", "generate", "--model", "cli_factories:cnn", "--type", "none", "--weights", factories / name)
    assert result.exit_code == 0, result.output


def test_a_refused_pickle_is_one_line_without_torchs_advice_to_load_it_unsafely(factories):
    import cli_factories

    torch.save({"0.weight": torch.nn.ReLU()}, factories / "module.pt")
    with (factories / "plain.pkl").open("wb") as file:  # protocol 4: torch warns that it was not written by torch.save
        pickle.dump(dict(cli_factories.cnn().state_dict()), file, protocol=4)
    refused = "refused, not a plain tensor state dict (read with weights_only=True, nothing in it was run)"
    for name, reason in [("module.pt", "Unsupported global: GLOBAL torch.nn.modules.activation.ReLU was not an "
                                       "allowed global by default"),
                         ("plain.pkl", "Unsupported operand 149")]:
        result = subprocess.run([sys.executable, "-m", "musco_core.cli", "config", "generate", "--model",
                                 "cli_factories:cnn", "--type", "none", "--weights", name], cwd=factories,
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr == f"musco: error: --weights {name}: {refused}: {reason}\n"


def weights_that_do_not_fit(folder):
    import cli_factories

    state = cli_factories.cnn().state_dict()
    shapes = {**state, "2.weight": torch.zeros(48, 32, 1, 1), "4.weight": torch.zeros(64, 48, 3, 3)}
    missing = {key: value for key, value in shapes.items() if key not in ("0.bias", "7.bias")}
    save_file({key: value.contiguous() for key, value in missing.items()}, folder / "missing.safetensors")
    save_file({**{key: value.contiguous() for key, value in state.items()}, "extra": torch.zeros(1)},
              folder / "extra.safetensors")
    torch.save(list(state.values()), folder / "list.pt")
    torch.save({**state, "epoch": 3}, folder / "checkpoint.pt")


@pytest.mark.parametrize("name, message", [
    ("missing.safetensors", "does not fit --model 'cli_factories:cnn': 2 shapes differ: '2.weight' is (48, 32, 1, 1) "
                            "in the file, (48, 32, 3, 3) in the model, '4.weight' is (64, 48, 3, 3) in the file, "
                            "(64, 48, 1, 1) in the model; 2 keys missing: '0.bias', '7.bias'"),
    ("extra.safetensors", "does not fit --model 'cli_factories:cnn': 1 unexpected key: 'extra'"),
    ("list.pt", "expected a state dict (a mapping of names to tensors), got list"),
    ("checkpoint.pt", "'epoch' holds int, not a tensor; expected a state dict (a mapping of names to tensors)"),
])
def test_weights_that_do_not_fit_name_the_keys_and_shapes(factories, name, message):
    weights_that_do_not_fit(factories)
    result = run("compress", "--model", "cli_factories:cnn", "--weights", factories / name, "--config", "s.yaml",
                 "--out", factories / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output == f"musco: error: --weights {factories / name}: {message}\n"


def test_weights_of_a_tied_tensor_load_from_one_key_but_not_from_two_values(factories):
    # save_pretrained and safetensors' save_model write a tied tensor once: 'head.weight' was reported missing,
    # so no Hugging Face checkpoint of a model with a tied head could be given as --weights
    import cli_factories
    from safetensors.torch import save_model

    trained = cli_factories.tied()
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.mul_(2)
    save_model(trained, factories / "once.safetensors")
    schedule = factories / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"version": 1, "layers": {
        "body": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8]}}}))
    result = run("compress", "--model", "cli_factories:tied", "--weights", factories / "once.safetensors",
                 "--config", schedule, "--out", factories / "out", "--quiet")
    assert result.exit_code == 0, result.output
    loaded = load_compressed(cli_factories.tied(), factories / "out")
    assert torch.equal(loaded.embed.weight, trained.embed.weight) and loaded.head.weight is loaded.embed.weight

    # two values for one tensor: loading would silently keep the last
    state = {key: value.detach().clone() for key, value in trained.state_dict().items()}
    state["head.weight"] += 1
    save_file(state, factories / "twice.safetensors")
    result = run("compress", "--model", "cli_factories:tied", "--weights", factories / "twice.safetensors",
                 "--config", schedule, "--out", factories / "out2")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.endswith(": 1 tied tensor differs: 'embed.weight' and 'head.weight' are one tensor in the "
                                  "model, different values in the file\n"), result.output


def test_a_long_list_of_keys_is_cut_with_a_count(factories):
    import cli_factories

    save_file({f"layer{i}.weight": torch.zeros(1) for i in range(9)}, factories / "other.safetensors")
    result = run("compress", "--model", "cli_factories:cnn", "--weights", factories / "other.safetensors",
                 "--config", "s.yaml", "--out", factories / "out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    keys = sorted(cli_factories.cnn().state_dict())
    assert (f"{len(keys)} keys missing: {', '.join(map(repr, keys[:3]))} and {len(keys) - 3} more; 9 unexpected keys: "
            f"'layer0.weight', 'layer1.weight', 'layer2.weight' and 6 more\n") in result.output


def test_a_generated_budget_schedule_meets_its_target_from_the_command_line(factories):
    result = run("config", "generate", "--model", "cli_factories:cnn", "--type", "budget", "--input-shape", "1,3,16,16")
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(result.output)
    assert document["settings"]["algo_kwargs"] == {"budget": {"reduction": 2.0, "metric": "flops", "scope": "model",
                                                                 "min_rank_fraction": 0.0625,
                                                                 "form": "as_compressed"}}
    assert {layer["rank_selection"] for layer in document["layers"].values() if layer} == {"budget"}
    document["settings"]["algo_kwargs"]["budget"]["reduction"] = 1.8
    document["settings"]["ft_every"] = 4
    document["settings"]["rank_multiple"] = 1  # the tiny model's ranks all open to the budget, to land within 2%
    schedule = factories / "budget.yaml"
    schedule.write_text(yaml.safe_dump(document))
    out = factories / "out"
    result = run("compress", "--model", "cli_factories:cnn", "--config", schedule, "--input-shape", "1,3,16,16",
                 "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "budget pass 1/1: target 1.800x flops, planned" in result.output
    report = yaml.safe_load((out / "report.json").read_text())
    assert 1.8 <= report["totals"]["macs_ratio"] <= 1.8 * 1.02


def test_a_generated_schedule_says_why_each_layer_it_leaves_out_is_left_out(factories):
    # the layers left out were a bare `null`, with no reason in the file, on stderr or in the report
    result = run("config", "generate", "--model", "cli_factories:cnn", "--type", "budget", "--input-shape", "1,3,16,16")
    assert result.exit_code == 0, result.output
    layers = result.output[result.output.index("layers:"):].splitlines()
    assert layers[1] == "  '0': {decomposition: tucker2, rank_selection: budget, curr_compr_iter: 0}"
    assert layers[2].startswith("  '2': {decomposition: tucker2") and "#" not in layers[2]
    assert layers[4].startswith("  '7': null  # left out: output layer (the model returns its output): truncating")
    assert yaml.safe_load(result.output)["layers"]["7"] is None
    result = run("config", "generate", "--model", "cli_factories:unreached", "--type", "vbmf",
                 "--input-shape", "1,3,16,16")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("""layers:
  '0': {decomposition: tucker2, rank_selection: vbmf, vbmf_weakenen_factor: 0.8, curr_compr_iter: 0}
  '1': null  # left out: output layer (the model returns its output): truncating a classifier's logits costs the \
most accuracy; name it in the schedule to compress it anyway
  # '2': left out: the example input never reaches it (its forward did not run), so it cannot be checked; leave it \
out or give an example input that reaches it
""")
    assert list(yaml.safe_load(result.output)["layers"]) == ["0", "1"]  # a layer that must not be replaced is unnamed
