"""Resume works from any step and after a kill at any moment, and no user work is lost: states and output sets are
complete or absent, and nothing musco-core did not write is deleted."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import resume_worker as worker
import torch
import yaml
from safetensors.torch import load_file

from musco_core import Compressor, ConfigError, ModelStats, MuscoError
from musco_core.io import (LATEST_FILE, MARKER, STATE_FILE, claim_folder, load_compressed, read_report,
                           save_compressed, unused_run_folder)
from musco_core.registry import default_registry

HERE = Path(__file__).parent


def comparable(history):
    return [attrs.evolve(result, seconds=0.0) for result in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run without interruption, and a copy of its checkpoint folder after every step."""
    root = tmp_path_factory.mktemp("whole")
    compressor = worker.start()
    copies = []
    while not compressor.done:
        compressor.compression_step()
        worker.fine_tune(compressor.compressed_model, compressor.curr_iter)
        compressor.save_state(root / "ckpt")
        copies.append(shutil.copytree(root / "ckpt", root / f"after-step-{compressor.curr_iter}"))
    return compressor, copies


def test_resume_from_every_step_ends_bitwise_like_the_uninterrupted_run(uninterrupted, tmp_path):
    whole, copies = uninterrupted
    expected = worker.final_weights(whole)
    assert whole.niters == len(copies) == 6
    assert any(result.rank_selection == "budget" and result.applied for result in whole.history)
    for saved in copies:  # the last one is the final state: nothing left to do
        folder = shutil.copytree(saved, tmp_path / saved.name)
        resumed = worker.resume(folder)
        assert resumed.curr_iter == int(folder.name.rsplit("-", 1)[1])
        worker.finish(resumed, folder)
        assert resumed.ranks == whole.ranks
        assert comparable(resumed.history) == comparable(whole.history)
        assert resumed.budgets == whole.budgets
        weights = worker.final_weights(resumed)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[key], expected[key]) for key in expected), folder.name


def test_an_allocation_spanning_a_step_boundary_is_saved_and_used(uninterrupted):
    whole, copies = uninterrupted
    state = yaml.safe_load((copies[1] / "step-0002" / STATE_FILE).read_text())
    first_pass = next(r for r in whole.history if r.name == "layer3.1.conv2")
    assert state["allocated"] == {"layer3.1.conv2": {"decomposition": "tucker2", "ranks": list(first_pass.ranks)}}


def run_worker(*args, **popen):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, err


def test_runs_killed_at_random_moments_resume_to_the_same_weights_and_ranks(tmp_path):
    reference = run_worker(tmp_path / "state-ref", tmp_path / "ref.safetensors", "--announce")
    assert reference.stdout.readline().strip() == "started"
    started = time.perf_counter()
    code, err = finished(reference)
    assert code == 0, err
    duration = time.perf_counter() - started
    expected = load_file(tmp_path / "ref.safetensors")
    ranks = json.loads((tmp_path / "ref.safetensors.json").read_text())
    rng = random.Random(20261201)
    killed = 0
    for trial in range(5):  # trial 0 dies right after saving step 2; the others at a random moment
        state, out = tmp_path / f"state-{trial}", tmp_path / f"out-{trial}.safetensors"
        process = run_worker(state, out, "--announce", *(["--kill-after", 2] if trial == 0 else []))
        assert process.stdout.readline().strip() == "started"
        if trial:
            time.sleep(rng.uniform(0.0, 0.9 * duration))
            process.send_signal(signal.SIGKILL)
        code, err = finished(process)
        assert code == -signal.SIGKILL or code == 0, err
        killed += code == -signal.SIGKILL
        if code == -signal.SIGKILL and not (state / LATEST_FILE).exists():
            assert not out.exists()
            continue  # killed before its first state: nothing to resume, the next trial covers the rest
        resumed = run_worker(state, out, "--resume")
        code, err = finished(resumed)
        assert code == 0, err
        weights = load_file(out)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[key], expected[key]) for key in expected), f"trial {trial}"
        assert json.loads(Path(f"{out}.json").read_text()) == ranks
        leftovers = [p.name for p in state.iterdir() if p.name.startswith(".") and p.name != ".musco-core"]
        assert leftovers == [], leftovers
    assert killed >= 3  # most kills land inside the run, not after it


# -- what resuming refuses -------------------------------------------------------------------------------------
@pytest.fixture
def saved(uninterrupted, tmp_path):
    """A private copy of the state after step 2."""
    return shutil.copytree(uninterrupted[1][1], tmp_path / "ckpt")


@pytest.mark.parametrize("latest", ["../elsewhere", "/tmp/step-0001", "step-0002/../step-0002", "", "step-2"])
def test_latest_may_only_name_a_step_folder_inside_the_checkpoint_folder(saved, latest):
    (saved / LATEST_FILE).write_text(latest + "\n")
    with pytest.raises(ConfigError, match=r"LATEST: names .*expected a step folder directly inside"):
        worker.resume(saved)


def test_a_latest_that_is_not_text_is_a_clear_error(saved):
    (saved / LATEST_FILE).write_bytes(b"\xff\xfe step")
    with pytest.raises(ConfigError, match="LATEST: not UTF-8 text"):
        worker.resume(saved)


def edit_state(folder, edit):
    path = folder / (folder / LATEST_FILE).read_text().strip() / STATE_FILE
    state = yaml.safe_load(path.read_text())
    edit(state)
    path.write_text(yaml.safe_dump(state, sort_keys=False))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(next_step=10 ** 9), r"\$\.next_step: expected at most 6"),
    # a format-4 or -5 state without its fingerprint used to resume any model of its parameter count, unchecked
    (lambda s: s.pop("model_fingerprint"), r"\$\.model_fingerprint: expected the hash of the model's weights the run "
                                           r"began with \(a string\), which a state of format 6 records, got nothing"),
    (lambda s: s.update(model_fingerprint=None), r"\$\.model_fingerprint: expected .* format 6 records, got null"),
    # a format-6 state without the inputs the run began with would resume on any calibration data, unchecked
    (lambda s: s.pop("inputs"), r"\$\.inputs: expected the inputs the run began with \(a mapping\), which a state of "
                                r"format 6 records, got nothing"),
    (lambda s: s.update(next_step=-1), r"\$\.next_step: expected a non-negative int"),
    (lambda s: s.update(next_step="2"), r"\$\.next_step: expected a non-negative int"),
    (lambda s: s.update(params_before=0), r"\$\.params_before: expected a positive int"),
    (lambda s: s.update(surprise=1), r"unknown keys \['surprise'\]|surprise"),
    (lambda s: s.pop("steps"), r"\$\.steps"),
    (lambda s: s["steps"][0].append("nope"), r"\$\.steps: the saved plan"),
    (lambda s: s.update(steps="abc"), r"\$\.steps: expected a list, got 'abc'"),
    (lambda s: s.update(history=None), r"\$\.history: expected a list, got None"),
    (lambda s: s.update(format=1), r"\$\.format: expected 2, 3, 4, 5 or 6"),
    (lambda s: s["history"][0].update(stage=-3), r"\$\.history\[0\]\.stage: expected a non-negative int"),
    (lambda s: s["history"][0].update(ranks=[0]), r"\$\.history\[0\]\.ranks"),
    (lambda s: s["history"].pop(), r"\$\.history: expected one result per layer of the 2 steps taken"),
    (lambda s: s["steps"].reverse(), r"\$\.steps: the saved plan"),
    (lambda s: s["allocated"].update(fc={"decomposition": "svd", "ranks": [3]}),
     r'\$\.allocated\["fc"\]: not a layer of a whole-model'),
    (lambda s: s["allocated"].update(fc=[3]), r'\$\.allocated\["fc"\]: expected a mapping of decomposition, ranks'),
    (lambda s: s["history"][0].update(ranks=[5, 5]), r"\$\.history\[0\]: tucker2 stage 0 ranks \(5, 5\)|"
                                                      r"the history says ranks"),
])
def test_a_damaged_state_is_one_clear_error_naming_the_file_and_field(saved, edit, message):
    edit_state(saved, edit)
    with pytest.raises(ConfigError, match=r"state\.yaml: (.|\n)*" + message):
        worker.resume(saved)


def other_weights():
    model = worker.model()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    return model


def test_resuming_a_model_with_other_weights_than_the_run_began_with_is_refused(saved):
    with pytest.raises(ConfigError, match=r"step-0002/state.yaml: \$\.model_fingerprint: the model passed to resume "
                                          r"has other weights than the run began with"):
        Compressor.resume(other_weights(), saved, example_input=worker.EXAMPLE, calibration_data=worker.calibration(),
                          progress=False)


@pytest.mark.parametrize("fingerprinted", [True, False])
def test_a_parameter_count_the_model_does_not_have_is_refused(saved, fingerprinted):
    edit_state(saved, lambda s: (s.update(params_before=10 ** 40),
                                 None if fingerprinted else (s.pop("model_fingerprint"), s.update(format=3))))
    with pytest.raises(ConfigError, match=r"step-0002/state.yaml: \$\.params_before: the run began with "
                                          r"10,000,000,000,000,000,000,000,000,000,000,000,000,000 parameters, the model "
                                          r"passed to resume has [0-9,]+; resume with the same model"):
        Compressor.resume(worker.model(), saved, example_input=worker.EXAMPLE, calibration_data=worker.calibration(),
                          progress=False)


def test_a_state_written_before_the_fingerprint_resumes_unchecked(saved, caplog):
    edit_state(saved, lambda s: (s.pop("model_fingerprint"), s.update(format=3)))
    with caplog.at_level("INFO", logger="musco_core"):
        resumed = Compressor.resume(other_weights(), saved, example_input=worker.EXAMPLE,
                                    calibration_data=worker.calibration(), progress=False)
    assert resumed.curr_iter == 2
    assert "state.yaml: records no fingerprint of the model's weights (written before states did): cannot check" \
        in caplog.text
    # saved again, it has no fingerprint to record: format 3 again, which resumes as before
    again = resumed.save_state(saved)
    assert yaml.safe_load((again / STATE_FILE).read_text())["format"] == 3
    assert Compressor.resume(other_weights(), saved, example_input=worker.EXAMPLE,
                             calibration_data=worker.calibration(), progress=False).curr_iter == 2


@pytest.mark.parametrize("example, given", [(torch.zeros(1, 3, 16, 16), "example input float32 (1, 3, 16, 16)"),
                                            (None, "no example input")])
def test_resuming_on_another_example_input_is_refused(saved, example, given):
    with pytest.raises(ConfigError, match=r"step-0002/state.yaml: \$\.example_input: the run began with example input "
                                          r"float32 \(1, 3, 32, 32\), the resume was given " + given.replace("(", r"\(")
                                          .replace(")", r"\)") + r"; the report and the budget would count MACs on "
                                          r"both: resume with the same example input \(musco compress: the same "
                                          r"--input-shape\)$"):
        Compressor.resume(worker.model(), saved, example_input=example, calibration_data=worker.calibration(),
                          progress=False)


def test_a_state_written_before_the_example_input_resumes_unchecked(saved, caplog):
    edit_state(saved, lambda s: (s.pop("example_input"), s.update(format=4)))
    with caplog.at_level("INFO", logger="musco_core"):
        resumed = worker.resume(saved)
    assert resumed.curr_iter == 2
    assert "state.yaml: records no example input (written before states did): cannot check" in caplog.text


def test_resuming_with_other_inputs_is_one_error_naming_each_unless_allowed(saved, caplog):
    """A resume given other calibration data or fine-tuning than the run began with was accepted silently: the model
    then mixed steps made with both, and the report said nothing. Now one ConfigError names each changed input,
    unless the change is allowed: then the state and the report record it, with the step it applies from."""
    def resume(**kwargs):
        return Compressor.resume(worker.model(), saved, example_input=worker.EXAMPLE, progress=False, **kwargs)

    with pytest.raises(ConfigError) as refused:
        resume(evaluate=lambda model: 0.0, inputs={"finetune": "lr 1e-3"})
    # an input the run did not record counts as one it began without (finetune was accepted silently)
    assert str(refused.value) == (
        f'{saved}/step-0002/state.yaml: $.inputs["calibration_data"]: the run began with batches, the resume was given '
        f'none\n{saved}/step-0002/state.yaml: $.inputs["evaluate"]: the run began with none, the resume was given a '
        f'callable\n{saved}/step-0002/state.yaml: $.inputs["finetune"]: the run began with nothing, the resume was '
        f'given lr 1e-3; its 2 step(s) so far were made with the first: resume with the inputs the run began with, or allow '
        f'the change from step 3 on, recorded in the state and the report (musco compress --allow-changed-inputs; '
        f'Compressor.resume(..., allow_changed_inputs=True))')
    with caplog.at_level("WARNING", logger="musco_core"):
        resumed = resume(calibration_data=worker.calibration(), evaluate=lambda model: 0.0, allow_changed_inputs=True)
    change = "from step 3 of 6: evaluate changed from none to a callable"
    assert resumed.state.inputs_changed == (change,) and change in caplog.text
    assert resumed.report().inputs_changed == [change] and change in resumed.report().to_table()
    resumed.compression_step()
    again = resumed.save_state(saved)
    assert read_report(again).inputs_changed == [change]
    # the record now holds the inputs allowed: the same resume is no change, the first inputs are one
    assert resume(calibration_data=worker.calibration(), evaluate=lambda model: 0.0).state.inputs_changed == (change,)
    with pytest.raises(ConfigError, match=r'\$\.inputs\["evaluate"\]: the run began with a callable, the resume was '
                                          r'given none; its 3 step\(s\)'):
        resume(calibration_data=worker.calibration())


def test_a_state_written_before_the_inputs_resumes_unchecked_and_records_them(saved, caplog):
    edit_state(saved, lambda s: (s.pop("inputs"), s.pop("inputs_changed"), s.update(format=5)))
    with caplog.at_level("INFO", logger="musco_core"):
        resumed = worker.resume(saved)
    assert "records none of the run's inputs (written before states did): cannot check" in caplog.text
    assert resumed.state.inputs["calibration_data"].value == "batches"
    again = resumed.save_state(saved)
    assert yaml.safe_load((again / STATE_FILE).read_text())["format"] == 6
    with pytest.raises(ConfigError, match=r'\$\.inputs\["calibration_data"\]: the run began with batches, the '
                                          r'resume was given none'):
        Compressor.resume(worker.model(), saved, example_input=worker.EXAMPLE, progress=False)


def versioned_registry(distribution: str, version: str):
    """The bundled components and ``svd_v`` (svd under another name) from a plugin of this distribution and version."""
    from musco_core import hookimpl
    from musco_core.plugins import PluginSource, make_plugin_manager
    from musco_core.registry import Registry
    from musco_plugins.svd import SVD

    class VersionedSVD(SVD):
        name = "svd_v"

    class Plugin:
        @hookimpl
        def musco_register_decompositions(self):
            return [VersionedSVD]

    manager = make_plugin_manager(entry_points=False)
    manager.add_plugin(Plugin(), PluginSource("versioned", distribution, version), strict=True)
    return Registry.from_plugin_manager(manager)


@pytest.mark.parametrize("distribution, version", [("musco-versioned", "2.0"), ("musco-other", "1.0")])
def test_resuming_with_another_plugin_version_is_refused_unless_allowed(tmp_path, distribution, version):
    """A resume after the plugin that made the earlier steps changed version, or now comes from another
    distribution, finished silently, and musco.yaml credited the new one with every step. The state now records
    the distribution and version of each component the schedule uses, and a change is refused like any changed
    input, or allowed and recorded. A state without that record resumes unchecked and records it."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

    schedule = {"0": {"decomposition": "svd_v", "rank_selection": "manual", "manual_rank": [[8], [4]]}}
    compressor = Compressor(model(), model_compr_kwargs=schedule, nglobal_compress_iters=2, progress=False,
                            registry=versioned_registry("musco-versioned", "1.0"))
    compressor.compression_step()
    compressor.save_state(tmp_path)
    recorded = compressor.state.inputs
    assert recorded["decomposition/svd_v"].describe() == "musco-versioned 1.0 (plugin 'versioned')"
    assert {"rank selector/manual", "layer adapter/linear", "scheduler/musco"} <= set(recorded)
    later = versioned_registry(distribution, version)
    with pytest.raises(ConfigError) as refused:
        Compressor.resume(model(), tmp_path, registry=later, progress=False)
    assert str(refused.value).startswith(
        f'{tmp_path}/step-0001/state.yaml: $.inputs["decomposition/svd_v"]: the run began with musco-versioned 1.0 '
        f"(plugin 'versioned'), the resume was given {distribution} {version} (plugin 'versioned'); its 1 step(s) so "
        f"far were made with the first")
    resumed = Compressor.resume(model(), tmp_path, registry=later, progress=False, allow_changed_inputs=True)
    assert resumed.report().inputs_changed == [
        f"from step 2 of 2: decomposition/svd_v changed from musco-versioned 1.0 (plugin 'versioned') to "
        f"{distribution} {version} (plugin 'versioned')"]
    # a state written before components were recorded (its inputs without them) resumes unchecked, and records them
    edit_state(tmp_path, lambda s: s["inputs"].pop("decomposition/svd_v"))
    resumed = Compressor.resume(model(), tmp_path, registry=later, progress=False)
    assert resumed.state.inputs["decomposition/svd_v"].value == f"{distribution} {version}"
    assert resumed.report().inputs_changed == []


def test_a_run_without_an_example_input_resumes_without_one_and_counts_no_macs(tmp_path):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    schedule = {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]},
                "2": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [2]}}
    compressor = Compressor(model(), model_compr_kwargs=schedule, progress=False)
    compressor.compression_step()
    compressor.save_state(tmp_path)
    with pytest.raises(ConfigError, match=r"the run began with no example input, the resume was given example input "
                                          r"float32 \(1, 8\)"):
        Compressor.resume(model(), tmp_path, example_input=torch.zeros(1, 8), progress=False)
    resumed = Compressor.resume(model(), tmp_path, progress=False)
    resumed.compression_step()
    report = resumed.report()
    assert resumed.done and report.macs_before is None and report.macs_after is None
    assert [(row.macs_before, row.macs_after) for row in report.layers] == [(None, None), (None, None)]


def test_a_run_that_counted_macs_from_model_stats_resumes_with_them_and_not_without(tmp_path):
    # resumed without them, the run's MACs were lost: the report's totals went None and the next row had None
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))

    stats = ModelStats.from_model(model(), default_registry(), torch.randn(4, 32))
    schedule = {name: {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]} for name in "02"}
    compressor = Compressor(model(), stats, schedule, progress=False)
    compressor.compression_step()
    compressor.save_state(tmp_path)
    with pytest.raises(ConfigError, match=r"step-0001/state.yaml: \$\.history\[0\]\.macs_before: the run counted "
                                          r"layer '0' at 4096 MACs and the statistics of the resume at None: .* "
                                          r"resume with the model_stats \(or the example_input\) the run began with"):
        Compressor.resume(model(), tmp_path, progress=False)
    resumed = Compressor.resume(model(), tmp_path, model_stats=stats, progress=False)
    resumed.compression_step()
    compressor.compression_step()
    assert ([(row.macs_before, row.macs_after) for row in resumed.report().layers]
            == [(row.macs_before, row.macs_after) for row in compressor.report().layers] == [(4096, 1024)] * 2)
    assert (resumed.report().macs_before, resumed.report().macs_after) == (8192, 2048)


def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(16 * 8 * 8, 10))


CNN_INPUT = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def saved_with_layer_2_at(ranks, folder):
    """An earlier run's result: small_cnn with its layer '2' at tucker2 ``ranks``, saved to ``folder``."""
    first = Compressor(small_cnn(), model_compr_kwargs={"2": {"decomposition": "tucker2", "rank_selection": "manual",
                                                              "manual_rank": [ranks]}},
                       example_input=CNN_INPUT, progress=False)
    first.compression_step()
    save_compressed(first, folder)
    return folder


@pytest.mark.parametrize("again", [{"0": [8, 2]}, {"2": [4, 4]}], ids=["other-layers", "its-factorized-layer-too"])
def test_a_run_begun_on_a_compressed_model_resumes_from_that_model(tmp_path, again):
    # its states held the earlier run's factorized layer, which no adapter could rebuild on the model it began with
    # ("the file has a conv layer, the model's FactorizedLayer cannot be rebuilt"); and once that layer was
    # compressed again, "layer '2': the file has it as tucker2 (4, 4), the model as tucker2 (8, 8)"
    first = saved_with_layer_2_at([8, 8], tmp_path / "first")
    schedule = {name: {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [ranks]}
                for name, ranks in again.items()}
    schedule["5"] = {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}
    whole = Compressor(load_compressed(small_cnn(), first), model_compr_kwargs=schedule, example_input=CNN_INPUT,
                       ft_every=1, progress=False)
    whole.compression_step()
    whole.save_state(tmp_path / "ckpt")
    resumed = Compressor.resume(load_compressed(small_cnn(), first), tmp_path / "ckpt", example_input=CNN_INPUT,
                                progress=False)
    assert resumed.compressed_model[2].ranks == whole.compressed_model[2].ranks
    for run in (whole, resumed):
        run.compression_step()
    assert resumed.done and resumed.ranks == whole.ranks
    assert torch.equal(resumed.compressed_model(CNN_INPUT), whole.compressed_model(CNN_INPUT))


def test_a_run_begun_on_a_compressed_model_resumes_from_no_other_and_keeps_its_hooks(tmp_path):
    first, other = (saved_with_layer_2_at(ranks, tmp_path / name) for ranks, name in (([8, 8], "first"),
                                                                                       ([4, 4], "other")))
    whole = Compressor(load_compressed(small_cnn(), first), example_input=CNN_INPUT, ft_every=1, progress=False,
                       model_compr_kwargs={"2": {"decomposition": "tucker2", "rank_selection": "manual",
                                                 "manual_rank": [[4, 4]]}})
    whole.compression_step()
    whole.save_state(tmp_path / "ckpt")
    # the state's layer '2' is rebuilt as the state has it: the model is not the one the run began with
    with pytest.raises(ConfigError, match=r"params_before: the run began with 11,546 parameters, the model passed to "
                                          r"resume has 10,986"):
        Compressor.resume(load_compressed(small_cnn(), other), tmp_path / "ckpt", example_input=CNN_INPUT,
                          progress=False)
    hooked = load_compressed(small_cnn(), first)
    hooked[2].register_forward_hook(lambda module, inputs, output: output * 2)  # rebuilt, it would be dropped
    with pytest.raises(ConfigError, match=r"layer '2': the model's factorized layer cannot be rebuilt as the file "
                                          r"has it: .*hook"):
        load_compressed(hooked, tmp_path / "ckpt" / "step-0001")


def test_an_empty_state_file_is_one_clear_error(saved):
    (saved / "step-0002" / STATE_FILE).write_text("")
    with pytest.raises(ConfigError, match=r"step-0002/state.yaml: the file is empty; expected a musco-core run state$"):
        worker.resume(saved)


def test_a_state_whose_model_does_not_match_its_history_is_refused(saved):
    step = saved / (saved / LATEST_FILE).read_text().strip()
    manifest = yaml.safe_load((step / "musco.yaml").read_text())
    del manifest["layers"]["layer1.0.conv1"]  # the saved model has it uncompressed, the history says compressed
    (step / "musco.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError):
        worker.resume(saved)


def test_resuming_checks_only_the_stages_still_to_come(uninterrupted, tmp_path):
    """The original bug: stage 0's ranks re-checked against the layer already shrunk by stage 0."""
    folder = shutil.copytree(uninterrupted[1][2], tmp_path / "ckpt")  # after step 3: cp4 and fc compressed once
    resumed = worker.resume(folder)
    assert resumed.schedule.layers["layer3.0.conv1"].curr_compr_iter == 1
    assert resumed.ranks["layer3.0.conv1"] == (24,)


@pytest.mark.parametrize("manual_rank", [[1, 1, 1]], ids=["more-stages-than-halvings"])
def test_resuming_checks_ranks_against_the_layer_as_the_run_began(tmp_path, manual_rank):
    """A later stage clamps ranks above the factorized layer's, with a note: the run checked them against the
    layer as it began, and a resume refused them against the layer shrunk by stage 0 (found by fuzzing). (Manual
    ranks above the last stage's, [1, 2], are refused when the schedule is loaded now: test_schedule.py.)"""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))

    x = torch.randn(1, 4, 5, 5)
    config = {"2": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": manual_rank}}
    whole = Compressor(build(), model_compr_kwargs=config, nglobal_compress_iters=len(manual_rank), example_input=x,
                       progress=False)
    whole.compression_step()
    whole.save_state(tmp_path)
    while not whole.done:
        whole.compression_step()
    resumed = Compressor.resume(build(), tmp_path, example_input=x, progress=False)
    while not resumed.done:
        resumed.compression_step()
    assert comparable(resumed.history) == comparable(whole.history)
    assert torch.equal(resumed.compressed_model(x), whole.compressed_model(x))


# -- never delete or overwrite what musco-core did not write -------------------------------------------------
def test_pruning_old_states_never_touches_folders_musco_core_did_not_write(tmp_path):
    compressor = worker.start()
    compressor.save_state(tmp_path / "ckpt")
    mine = tmp_path / "ckpt" / "step-0500"
    mine.mkdir()
    (mine / "weights.pt").write_text("the user's own checkpoint")
    for _ in range(2):
        compressor.compression_step()
        compressor.save_state(tmp_path / "ckpt")
    assert (mine / "weights.pt").read_text() == "the user's own checkpoint"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".musco-core", "LATEST", "step-0002",
                                                                     "step-0500"]


def test_pruning_old_states_keeps_the_users_copies_of_a_state(tmp_path):
    """A state the user copied next to it to keep it (cp -r step-0001 backup) carries musco-core's marker too; a state
    is only ever saved under a step name, so the copy under another name is the user's and stays as it is."""
    compressor = worker.start()
    compressor.compression_step()
    first = compressor.save_state(tmp_path / "ckpt")
    copies = [shutil.copytree(first, tmp_path / "ckpt" / name) for name in ("backup", "step-0001-good")]
    before = [output_snapshot(copy) for copy in copies]
    compressor.compression_step()
    compressor.save_state(tmp_path / "ckpt")
    assert [output_snapshot(copy) for copy in copies] == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".musco-core", "LATEST", "backup",
                                                                     "step-0001-good", "step-0002"]


def test_pruning_an_old_state_keeps_the_files_the_user_put_in_it(tmp_path, caplog):
    compressor = worker.start()
    compressor.compression_step()
    first = compressor.save_state(tmp_path / "ckpt")
    (first / "eval.txt").write_text("top-1 71.2%, three GPU-hours of evaluation")
    compressor.compression_step()
    with caplog.at_level("INFO", logger="musco_core"):
        compressor.save_state(tmp_path / "ckpt")
    assert sorted(p.name for p in first.iterdir()) == ["eval.txt"]  # musco-core's own files and marker are gone
    assert (first / "eval.txt").read_text() == "top-1 71.2%, three GPU-hours of evaluation"
    assert f"{first}: kept, it holds files musco-core did not write: eval.txt" in caplog.text


def test_an_old_state_that_cannot_be_removed_is_kept_with_a_warning_and_the_save_succeeds(tmp_path, monkeypatch,
                                                                                          caplog):
    """An old state the user made read-only cannot be renamed (rename(2) of a folder without write permission is
    EACCES; simulated, as the tests may run as root): the new state and LATEST are written, so the save succeeds and
    the old state stays, with a warning, rather than a PermissionError for a save that was made."""
    compressor = worker.start()
    compressor.compression_step()
    first = compressor.save_state(tmp_path / "ckpt")
    before = output_snapshot(first)
    rename = os.rename

    def protected(source, target):
        if Path(source) == first:
            raise PermissionError(13, "Permission denied", str(source))
        rename(source, target)

    monkeypatch.setattr(os, "rename", protected)
    compressor.compression_step()
    with caplog.at_level("WARNING", logger="musco_core"):
        assert compressor.save_state(tmp_path / "ckpt").name == "step-0002"
    assert f"{first}: an older state, left as it is: cannot remove it (Permission denied)" in caplog.text
    assert output_snapshot(first) == before and worker.resume(tmp_path / "ckpt").curr_iter == 2


def test_a_dangling_symlink_named_like_the_next_state_is_kept_and_the_state_saved_beside_it(tmp_path):
    """ckpt/step-0001 a symlink of the user's to a folder since moved away: the state was renamed over it and every
    save failed with NotADirectoryError; a taken name, a link too, gets a suffix."""
    compressor = worker.start()
    folder = tmp_path / "ckpt"
    compressor.save_state(folder)
    (folder / "step-0001").symlink_to(tmp_path / "moved-away")
    compressor.compression_step()
    assert compressor.save_state(folder).name.startswith("step-0001-")
    assert os.readlink(folder / "step-0001") == str(tmp_path / "moved-away")
    assert worker.resume(folder).curr_iter == 1


def test_a_new_run_refuses_another_runs_checkpoint_folder_unless_overwrite(uninterrupted, tmp_path):
    folder = shutil.copytree(uninterrupted[1][1], tmp_path / "ckpt")
    before = sorted(p.name for p in folder.iterdir())
    fresh = worker.start()
    with pytest.raises(ConfigError, match="holds the checkpoints of another musco-core run"):
        fresh.save_state(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    fresh.save_state(folder, overwrite=True)
    assert (folder / LATEST_FILE).read_text().strip() == "step-0000"
    assert worker.resume(folder).state.run_id == fresh.state.run_id


def test_a_runs_checkpoint_folder_is_never_made_its_output_folder_nor_the_reverse(tmp_path):
    """save_compressed into the run's own checkpoint folder was refused as 'the checkpoints of another musco-core
    run; resume that run', and with overwrite=True re-marked it as an output folder: its states no longer resumed."""
    compressor = worker.start()
    compressor.compression_step()
    compressor.save_state(tmp_path / "ckpt")
    save_compressed(compressor, tmp_path / "out")
    before = {name: output_snapshot(tmp_path / name) for name in ("ckpt", "out")}
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"ckpt: holds the checkpoints of this run, not its output; choose "
                                              r"another folder for the output"):
            save_compressed(compressor, tmp_path / "ckpt", overwrite=overwrite)
        with pytest.raises(ConfigError, match=r"out: holds the output of this run, not its checkpoints"):
            compressor.save_state(tmp_path / "out", overwrite=overwrite)
    assert {name: output_snapshot(tmp_path / name) for name in ("ckpt", "out")} == before
    assert worker.resume(tmp_path / "ckpt").curr_iter == 1


def test_a_folder_with_foreign_files_is_refused_and_kept(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    compressor = worker.start()
    with pytest.raises(ConfigError, match="not empty and was not written by musco-core"):
        compressor.save_state(folder)
    with pytest.raises(ConfigError, match="not empty and was not written by musco-core"):
        save_compressed(compressor, folder)
    compressor.save_state(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_folder_claimed_by_a_run_that_saved_nothing_is_taken_over(finished_run, tmp_path):
    """A run killed before its first state leaves only markers (and maybe a dead staging folder): nothing to keep."""
    folders = ((tmp_path / "out", "output"), (tmp_path / "out" / "checkpoints", "checkpoints"))
    for folder, kind in folders:
        claim_folder(folder, kind, "killed-before-its-first-state")
    staging = tmp_path / "out" / "checkpoints" / ".step-0001.staging-1-0"
    staging.mkdir()
    (staging / ".musco-core").write_text("created_by: musco-core\nkind: staging\nrun_id: x\npid: 999999999\n")
    assert unused_run_folder(tmp_path / "out")
    for folder, kind in folders:
        claim_folder(folder, kind, finished_run.state.run_id)
    finished_run.save_state(tmp_path / "out" / "checkpoints")
    save_compressed(finished_run, tmp_path / "out")
    assert worker.resume(tmp_path / "out" / "checkpoints").state.run_id == finished_run.state.run_id
    assert not unused_run_folder(tmp_path / "out")


@pytest.mark.parametrize("kind, names", [("output", ["model.safetensors", "musco.yaml", "report.json"]),
                                         ("checkpoints", ["LATEST"])])
def test_overwrite_never_replaces_a_file_musco_core_did_not_write(finished_run, tmp_path, kind, names):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(f"my own {name}")
    before = output_snapshot(folder)
    save = save_compressed if kind == "output" else type(finished_run).save_state
    with pytest.raises(ConfigError) as caught:
        save(finished_run, folder, overwrite=True)
    assert str(caught.value) == (f"{', '.join(str(folder / name) for name in names)}: in the way of the files "
                                 f"musco-core writes, and not written by it; it never replaces what it did not write "
                                 f"(not even with --overwrite): move them, or choose another folder")
    assert output_snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == names


def test_overwrite_never_writes_through_a_symlink(finished_run, tmp_path):
    (tmp_path / "elsewhere.safetensors").write_text("the user's")
    out = save_compressed(finished_run, tmp_path / "out")
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ConfigError, match=r"out/model.safetensors \(a symlink\): in the way"):
        save_compressed(finished_run, out, overwrite=True)
    assert (tmp_path / "elsewhere.safetensors").read_text() == "the user's"


def test_a_dangling_symlink_as_the_folder_is_one_clear_error(finished_run, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"out: is a symlink to .*gone, which does not exist; expected a folder for "
                                          r"the output"):
        save_compressed(finished_run, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("dies_after", [
    "save_model",  # the weights of the new state are written
    "write_marker",  # the staging folder is marked as the state it is about to become, not yet renamed
])
def test_a_killed_save_leaves_a_staging_folder_that_the_next_save_removes(tmp_path, dies_after):
    """The save is killed inside a new state's staging folder; only musco-core's own leftovers go."""
    script = (
        "import os, signal, sys\n"
        "import resume_worker as w\n"
        "import musco_core.io as io\n"
        "c = w.start()\n"
        "c.compression_step()\n"
        "c.save_state(sys.argv[1])\n"
        "c.compression_step()\n"
        f"original = io.{dies_after}\n"
        "def dying(*args, **kwargs):\n"
        "    original(*args, **kwargs)\n"
        "    if args[1:2] != ('staging',):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"io.{dies_after} = dying\n"
        "c.save_state(sys.argv[1])\n")
    folder = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    staging = [p for p in folder.iterdir() if ".staging-" in p.name]
    assert len(staging) == 1 and (staging[0] / "model.safetensors").exists()
    foreign = folder / ".step-0002.tmp-4242"  # looks like a leftover, but musco-core did not mark it
    foreign.mkdir()
    assert (folder / LATEST_FILE).read_text().strip() == "step-0001"
    resumed = worker.resume(folder)
    resumed.compression_step()
    resumed.save_state(folder)
    assert not staging[0].exists()
    assert foreign.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".musco-core", ".step-0002.tmp-4242", "LATEST", "step-0002"]


def test_a_final_save_killed_before_it_removed_the_previous_state_is_tidied_by_the_resume(tmp_path):
    """Killed after LATEST named the final state, before the older one was removed: no save comes after it, so that
    state stayed for good; the resume, which reads the final state, removes it (the user's files stay)."""
    script = (
        "import os, signal, sys, torch\n"
        "import musco_core.io as io\n"
        "from musco_core import Compressor\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))\n"
        "layers = {n: {'decomposition': 'svd', 'rank_selection': 'manual', 'manual_rank': [4]} for n in '02'}\n"
        "c = Compressor(model, model_compr_kwargs=layers, progress=False)\n"
        "c.compression_step()\n"
        "c.save_state(sys.argv[1])\n"
        "c.compression_step()\n"
        "io._remove_state = lambda folder: os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.save_state(sys.argv[1])\n")
    folder = tmp_path / "ckpt"
    process = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    (folder / "notes.txt").write_text("the user's")
    assert (folder / LATEST_FILE).read_text().strip() == "step-0002" and (folder / "step-0001").exists()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    assert Compressor.resume(model, folder, progress=False).done
    assert sorted(p.name for p in folder.iterdir()) == [".musco-core", "LATEST", "notes.txt", "step-0002"]
    assert Compressor.resume(model, folder, progress=False).done


def test_a_save_killed_before_latest_named_its_state_resumes_from_that_state_and_keeps_it(tmp_path, monkeypatch):
    """Killed after step-0002 was renamed into place, before LATEST (still naming step-0001) named it: the resume
    continues from step-0002, the newest complete state, and its tidying removes step-0001, never step-0002."""
    import musco_core.io as io

    compressor = worker.start()
    folder = tmp_path / "ckpt"
    compressor.compression_step()
    compressor.save_state(folder)
    compressor.compression_step()
    written = io.write_text_atomic

    def killed(path, text):
        if path.name == LATEST_FILE:
            raise KeyboardInterrupt
        written(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(io, "write_text_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            compressor.save_state(folder)
    assert (folder / LATEST_FILE).read_text().strip() == "step-0001" and (folder / "step-0002").is_dir()
    assert worker.resume(folder).curr_iter == 2
    assert sorted(p.name for p in folder.iterdir()) == [".musco-core", "LATEST", "step-0002"]


def test_resuming_an_older_state_latest_names_keeps_the_newer_ones(tmp_path):
    """LATEST pointed back at an older state after the newer one was saved (a user going back a step): the resume
    continues from the state LATEST names, and its tidying never removes the newer state."""
    compressor = worker.start()
    folder = tmp_path / "ckpt"
    compressor.compression_step()
    first = compressor.save_state(folder)
    kept = shutil.copytree(first, tmp_path / "kept")
    compressor.compression_step()
    second = compressor.save_state(folder)
    before = output_snapshot(second)
    shutil.copytree(kept, first)
    (folder / LATEST_FILE).write_text("step-0001\n")
    assert worker.resume(folder).curr_iter == 1
    assert output_snapshot(second) == before


def test_two_processes_saving_states_into_one_folder_at_once_never_leave_it_without_one(tmp_path, monkeypatch):
    """Two processes continue one run from one folder (the API takes no lock) and save the same step at once: each
    would remove the other's new state, leaving LATEST naming a missing folder and no state at all. The second save
    is refused while the first holds the folder, and the first's state stays."""
    import musco_core.io as io

    compressor = worker.start()
    folder = tmp_path / "ckpt"
    compressor.compression_step()
    compressor.save_state(folder)
    first, second = worker.resume(folder), worker.resume(folder)
    first.compression_step()
    second.compression_step()
    remove, refused = io._remove_older_states, []

    def meanwhile(*args, **kwargs):  # the second process saves as the first begins to remove its older states
        with pytest.raises(ConfigError, match="ckpt: another process is saving a state here") as caught:
            second.save_state(folder)
        refused.append(caught.value)
        remove(*args, **kwargs)

    monkeypatch.setattr(io, "_remove_older_states", meanwhile)
    kept = first.save_state(folder)
    monkeypatch.setattr(io, "_remove_older_states", remove)
    assert refused and sorted(p.name for p in folder.iterdir()) == [".musco-core", "LATEST", kept.name]
    assert worker.resume(folder).curr_iter == 2


def test_states_are_saved_where_folders_cannot_be_locked(tmp_path, monkeypatch):
    """NFS emulates flock with locks that need a file open for writing, which a folder never is (EBADF): the states
    are saved unguarded there, not refused."""
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    compressor = worker.start()
    compressor.save_state(tmp_path / "ckpt")
    compressor.compression_step()
    assert compressor.save_state(tmp_path / "ckpt").name == "step-0001"
    assert worker.resume(tmp_path / "ckpt").curr_iter == 1


def test_a_staging_folder_killed_before_its_marker_is_removed_by_the_next_save(tmp_path):
    """mkdir, then the marker: a process killed in between leaves a staging folder without one, known by its name
    (which holds the dead writer's pid); only musco-core's files in it go."""
    compressor = worker.start()
    compressor.compression_step()
    compressor.save_state(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    unmarked, users = tmp_path / f".step-0002.staging-{dead}-0123abcd", tmp_path / f".mine.staging-{dead}-0123abcd"
    for folder in (unmarked, users):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        (folder / f"..musco-core.tmp-{dead}").write_text("created_by: musco-core\n")
    (users / "notes.txt").write_text("the user's")
    compressor.compression_step()
    compressor.save_state(tmp_path)
    assert not unmarked.exists()
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]



def test_a_staging_folder_another_host_marked_is_kept_whatever_its_pid(tmp_path):
    """On a checkpoint folder several hosts share (NFS), another host's live writer has a pid this host may not run:
    its staging folder was removed as a dead process's."""
    compressor = worker.start()
    compressor.compression_step()
    compressor.save_state(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    elsewhere, here = (tmp_path / f".step-0002.staging-{dead}-0123abc{tag}" for tag in "de")
    for folder, host in ((elsewhere, "another-host"), (here, socket.gethostname())):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        (folder / MARKER).write_text(yaml.safe_dump({"created_by": "musco-core", "kind": "staging", "run_id": None,
                                                     "pid": int(dead), "host": host}))
    compressor.compression_step()
    compressor.save_state(tmp_path)
    assert not here.exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([MARKER, "model.safetensors"])

# -- output sets are replaced as a whole ------------------------------------------------------------------------
def output_snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def finished_run(uninterrupted):
    """A compressor of its own, at the end of the run (resumed from the final state)."""
    return worker.resume(uninterrupted[1][-1])


def test_a_failing_save_over_an_output_set_leaves_the_old_set_loadable(finished_run, tmp_path, monkeypatch):
    out = save_compressed(finished_run, tmp_path / "out")
    before = output_snapshot(out)
    reference = load_compressed(worker.model(), out)
    original = Path.write_text

    def full_disk(self, *args, **kwargs):  # the manifest is written after the weights: the disk fills there
        if self.name == "musco.yaml":
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    worker.fine_tune(finished_run.compressed_model, 99)  # other weights than the saved ones
    with pytest.raises(OSError, match="No space left"):
        save_compressed(finished_run, out)
    monkeypatch.undo()
    assert output_snapshot(out) == before
    assert [p.name for p in out.iterdir() if ".staging-" in p.name] == []
    loaded = load_compressed(worker.model(), out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


def test_a_file_size_limit_during_a_save_leaves_the_old_set_loadable(tmp_path):
    """A real limit (RLIMIT_FSIZE, as a full disk): the new weights do not fit, the old set stays intact."""
    script = (
        "import resource, signal, sys, torch\n"
        "from torch import nn\n"
        "from musco_core import Compressor\n"
        "from musco_core.io import save_compressed\n"
        "def save(width, limit=None):\n"
        "    torch.manual_seed(width)\n"
        "    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))\n"
        "    c = Compressor(model, model_compr_kwargs={'0': {'decomposition': 'svd', 'rank_selection': 'manual',\n"
        "                   'manual_rank': [width // 4]}}, progress=False)\n"
        "    c.compression_step()\n"
        "    if limit:\n"
        "        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
        "    save_compressed(c, sys.argv[1], overwrite=True)\n"
        "save(32)\n"
        "try:\n"
        "    save(512, limit=200_000)\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n")
    out = tmp_path / "out"
    process = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "refused 27"  # EFBIG
    torch.manual_seed(32)
    from torch import nn
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    loaded = load_compressed(fresh, out)
    assert loaded[0].ranks == (8,)
    assert [p.name for p in out.iterdir() if ".staging-" in p.name] == []


def test_an_interrupted_commit_is_finished_by_the_next_reader(finished_run, tmp_path, monkeypatch):
    """Stopped between the renames of a commit: a reader finishes it from the journal and gets the new set."""
    import musco_core.io as io

    out = save_compressed(finished_run, tmp_path / "out")
    worker.fine_tune(finished_run.compressed_model, 99)
    original, renamed = os.replace, []

    def stopping_replace(source, target):
        if Path(target).parent == out and Path(target).name in (io.WEIGHTS, io.MANIFEST, io.REPORT):
            if renamed:
                raise KeyboardInterrupt  # the process stops after the first file of the set was renamed in
            renamed.append(target)
        return original(source, target)

    monkeypatch.setattr(os, "replace", stopping_replace)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(finished_run, out)
    monkeypatch.undo()
    assert (out / io.JOURNAL).exists()
    loaded = load_compressed(worker.model(), out)  # finishes the commit: weights and manifest match again
    assert not (out / io.JOURNAL).exists()
    assert [p.name for p in out.iterdir() if ".staging-" in p.name] == []
    expected = finished_run.compressed_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_a_reader_during_a_commit_waits_for_the_writer_to_finish_it(finished_run, tmp_path, monkeypatch):
    """Another process loads the output while a save commits its set: it finished the commit from the journal itself,
    and the writer, reading its journal again, failed a save that was made ('an interrupted save left a journal that
    cannot be read ... remove it'). The reader now waits for the writer, then reads the new set."""
    import musco_core.io as io

    out = save_compressed(finished_run, tmp_path / "out")
    worker.fine_tune(finished_run.compressed_model, 99)
    reading = tmp_path / "reading"
    script = ("import sys, time, pathlib, torch, resume_worker as w\n"
              "from musco_core.io import load_compressed\n"
              "out, reading = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
              "while not (out / '.musco-commit').exists(): time.sleep(0.001)\n"
              "reading.write_text('')\n"
              "loaded = load_compressed(w.model(), out)\n"
              "torch.save(loaded.state_dict(), sys.argv[3])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    reader = subprocess.Popen([sys.executable, "-c", script, str(out), str(reading), str(tmp_path / "read.pt")],
                              env=env)
    finish = io._finish_commit

    def while_the_reader_reads(directory):
        deadline = time.monotonic() + 120
        while not reading.exists() and reader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the reader is on the journal now
        finish(directory)

    monkeypatch.setattr(io, "_finish_commit", while_the_reader_reads)
    save_compressed(finished_run, out)
    assert reader.wait(timeout=300) == 0
    read = torch.load(tmp_path / "read.pt")
    expected = finished_run.compressed_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in read.items())


def test_a_save_while_another_process_commits_into_the_folder_is_one_error(finished_run, tmp_path):
    import musco_core.io as io

    out = save_compressed(finished_run, tmp_path / "out")
    before = output_snapshot(out)
    with io.folder_lock(out) as alone:  # held as another process's save holds it
        assert alone
        with pytest.raises(ConfigError, match=r"out: another process is saving a model here; run one at a time"):
            save_compressed(finished_run, out)
    assert output_snapshot(out) == before and [p.name for p in out.iterdir() if ".staging-" in p.name] == []


def test_a_journal_naming_a_symlink_never_moves_or_removes_files_where_it_points(finished_run, tmp_path):
    """The staging folder a killed commit's journal names is now a link to a folder of the user's (with a marker
    copied into it): finishing the commit moved the user's files out of it and removed the rest."""
    import musco_core.io as io

    out = save_compressed(finished_run, tmp_path / "out")
    before_out = output_snapshot(out)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "model.safetensors").write_bytes(b"the user's weights")
    (users / ".musco-core").write_text("created_by: musco-core\nkind: staging\nrun_id: null\npid: 1\n")
    before = output_snapshot(users)
    (out / ".set.staging-999999-0123abcd").symlink_to(users)
    (out / io.JOURNAL).write_text(json.dumps({"staging": ".set.staging-999999-0123abcd",
                                              "files": ["model.safetensors"]}))
    load_compressed(worker.model(), out)
    assert output_snapshot(users) == before and output_snapshot(out) == before_out
    assert (out / ".set.staging-999999-0123abcd").is_symlink()


def test_weights_and_manifest_of_different_saves_are_refused(finished_run, tmp_path):
    first = save_compressed(finished_run, tmp_path / "first")
    second = save_compressed(finished_run, tmp_path / "second")
    shutil.copy(first / "model.safetensors", second / "model.safetensors")
    with pytest.raises(ConfigError, match="different saves"):
        load_compressed(worker.model(), second)


def test_replacing_a_set_removes_the_old_sets_files_the_new_one_lacks(finished_run, tmp_path):
    out = save_compressed(finished_run, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    save_compressed(finished_run.compressed_model, out, overwrite=True)  # a bare model's set has no report
    assert sorted(p.name for p in out.iterdir()) == [".musco-core", "model.safetensors", "musco.yaml", "notes.txt"]
    with pytest.raises(ConfigError, match="report.json: cannot read"):
        read_report(out)


def test_a_report_of_another_save_is_refused(finished_run, tmp_path):
    first = save_compressed(finished_run, tmp_path / "first")
    second = save_compressed(finished_run, tmp_path / "second")
    shutil.copy(first / "report.json", second / "report.json")
    with pytest.raises(ConfigError, match=r"second/report.json: is not the report of .*second/musco.yaml \(they come "
                                          r"from different saves\)"):
        read_report(second)


def test_the_step_function_leaves_model_and_state_untouched_on_failure():
    from musco_core.run import run_step

    compressor = worker.start()
    compressor.compression_step()
    state = compressor.state
    assert "layer2.0.downsample.0" in state.steps[1]  # whitened_svd: the step collects calibration statistics
    before = {key: value.clone() for key, value in compressor.compressed_model.state_dict().items()}
    broken = attrs.evolve(compressor.context, calibration_data=[torch.zeros(2, 7, 32, 32)])  # the model fails on it
    with pytest.raises(MuscoError, match="calibration: the model failed on batch 0"):
        run_step(compressor.compressed_model, state, broken)
    assert compressor.state is state and state.next_step == 1 and len(state.history) == 3
    after = compressor.compressed_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- a killed save leaves nothing that blocks or stays ------------------------------------------------------------
def dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout)


@pytest.mark.parametrize("latest", [None, "step-0007"])
def test_a_missing_latest_resumes_from_the_newest_complete_state(saved, latest):
    """Killed after a state was renamed into place, before LATEST named it: the newest complete state of the run is
    found by its name, marker and files; a state being removed (its files gone, its marker last) is not complete."""
    (saved / LATEST_FILE).unlink()
    if latest:
        (saved / LATEST_FILE).write_text(latest + "\n")
    (saved / "step-0001").mkdir()
    shutil.copy(saved / "step-0002" / ".musco-core", saved / "step-0001")
    removing = saved / "step-0003"
    removing.mkdir()
    shutil.copy(saved / "step-0002" / ".musco-core", removing)
    shutil.copy(saved / "step-0002" / "model.safetensors", removing)
    assert worker.resume(saved).curr_iter == 2


def test_a_missing_latest_without_a_complete_state_is_one_clear_error(saved):
    (saved / LATEST_FILE).unlink()
    (saved / "step-0002" / STATE_FILE).unlink()
    with pytest.raises(ConfigError, match=r"ckpt/LATEST: missing, and .*ckpt holds no complete state of its run; "
                                          r"nothing to resume$"):
        worker.resume(saved)


def test_a_failing_staging_marker_leaves_no_staging_folder(tmp_path, monkeypatch):
    import musco_core.io as io

    compressor = worker.start()
    compressor.save_state(tmp_path / "ckpt")
    save_compressed(compressor, tmp_path / "out")
    original = io.write_marker

    def full_disk(folder, kind, run_id):
        if kind == "staging":
            raise OSError(28, "No space left on device")
        original(folder, kind, run_id)

    monkeypatch.setattr(io, "write_marker", full_disk)
    for save in (lambda: compressor.save_state(tmp_path / "ckpt"), lambda: save_compressed(compressor, tmp_path / "out")):
        with pytest.raises(OSError, match="No space left"):
            save()
    assert [p.name for folder in ("ckpt", "out") for p in (tmp_path / folder).iterdir() if ".staging-" in p.name] == []


def test_the_next_save_removes_temporary_files_of_dead_processes_only(tmp_path):
    compressor = worker.start()
    folder = tmp_path / "ckpt"
    compressor.save_state(folder)
    dead = dead_pid()
    left = [folder / f".LATEST.tmp-{dead}", folder / f"..musco-core.tmp-{dead}",
            folder / f".LATEST.tmp-{dead}-0123abcd"]
    kept = [folder / ".LATEST.tmp-1", folder / f".notes.txt.tmp-{dead}", folder / f".LATEST.tmp-0{dead}"]  # pid 1 runs
    for path in left + kept:
        path.write_text("step-0000\n")
    compressor.save_state(folder)
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in kept)


def test_removing_an_old_state_cut_short_leaves_nothing_behind(tmp_path, monkeypatch):
    """Killed while an old state was removed: it was renamed to a staging name of the (dead) process first, so the
    next save removes what is left of it, and no empty step folder stays."""
    compressor = worker.start()
    folder = tmp_path / "ckpt"
    compressor.save_state(folder)
    compressor.compression_step()
    dead = dead_pid()

    def killed(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "getpid", lambda: dead)  # the save's process, killed in it
        patch.setattr(Path, "rmdir", killed)
        with pytest.raises(KeyboardInterrupt):
            compressor.save_state(folder)
    assert not (folder / "step-0000").exists()
    compressor.compression_step()
    compressor.save_state(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".musco-core", "LATEST", "step-0002"]


def test_write_text_atomic_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    """A power loss after the rename must not leave an empty LATEST, journal or marker."""
    from musco_core.schedule import write_text_atomic

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", os.stat(src).st_ino)),
                                                         replace(src, dst))[1])
    write_text_atomic(tmp_path / LATEST_FILE, "step-0001\n")
    inode = (tmp_path / LATEST_FILE).stat().st_ino
    assert events == [("fsync", inode), ("replace", inode)]
    assert (tmp_path / LATEST_FILE).read_text() == "step-0001\n"


def test_write_text_atomic_never_writes_through_or_removes_what_holds_its_temporary_name(tmp_path):
    """A symlink to a file of the user's, or a file of the user's, named as write_text_atomic once named its
    temporary file (.NAME.tmp-PID): the write goes to a new file of its own, and both are left as they are."""
    from musco_core.schedule import write_text_atomic

    thesis = tmp_path / "thesis.txt"
    thesis.write_text("my thesis")
    (tmp_path / f".LATEST.tmp-{os.getpid()}").symlink_to(thesis)
    (tmp_path / f".schedule.yaml.tmp-{os.getpid()}").write_text("my notes")
    write_text_atomic(tmp_path / LATEST_FILE, "step-0001\n")
    write_text_atomic(tmp_path / "schedule.yaml", "version: 1\n")
    assert thesis.read_text() == "my thesis" and not (tmp_path / LATEST_FILE).is_symlink()
    assert (tmp_path / f".schedule.yaml.tmp-{os.getpid()}").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f".LATEST.tmp-{os.getpid()}", f".schedule.yaml.tmp-{os.getpid()}", LATEST_FILE, "schedule.yaml", "thesis.txt"])
