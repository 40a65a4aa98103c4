"""`musco compress` never loses work: it refuses folders of other runs, keeps what it did not write, locks its
output, and a failing fine-tuning, Ctrl-C or a finished run can all be continued with --resume."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from musco_core.cli import main
from musco_core.io import load_compressed, output_lock

HERE = Path(__file__).parent

HELPERS = textwrap.dedent("""
    import os
    import time
    import torch
    from torch import nn

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))

    def tune(model, step):
        generator = torch.Generator().manual_seed(step)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loss = model(torch.randn(4, 3, 8, 8, generator=generator)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def keep(model, step):
        pass

    def fails_at_3(model, step):  # once, as code the user then fixes: the same --finetune resumes the run
        if step == 3 and not os.path.exists("failed_at_3"):
            open("failed_at_3", "w").close()
            raise RuntimeError("CUDA out of memory")
        tune(model, step)

    def fails_verbosely(model, step):
        raise ValueError("Given groups=1, weight of size [16, 3, 3, 3], expected input[2, 5, 8, 8] to have 3 channels, "
                         "but got 5 channels instead; check the data loader of the fine-tuning set")

    def fails_at_1(model, step):
        if step == 1:
            raise RuntimeError("CUDA out of memory")
        tune(model, step)

    class Aliased(nn.Module):  # the second conv is also head_conv, a named handle on a layer inside a Sequential
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head_conv = self.features[2]
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.features(x))

    def trains_a_copy(model, step):
        import copy
        trained = copy.deepcopy(model)
        tune(trained, step)
        return trained

    def returns_the_model(model, step):
        tune(model, step)
        return torch.nn.Sequential(model)  # a wrapper of the model itself is fine

    def returns_a_loss(model, step):
        tune(model, step)
        return torch.nn.MSELoss()  # a module without parameters too

    def slow_from_2(model, step):  # until a first run is interrupted: the same --finetune resumes the run
        tune(model, step)
        if step >= 2 and not os.path.exists("slowed"):
            open("slowed", "w").close()
            time.sleep(60)
""")
SCHEDULE = {"version": 1, "settings": {"ft_every": 1, "nglobal_compress_iters": 2},
            "layers": {"2": {"decomposition": "tucker2", "rank_selection": "manual", "manual_rank": [[16, 8], [8, 8]]},
                       "6": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [8, 4]}}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "run_helpers.py").write_text(HELPERS)
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump(SCHEDULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("run_helpers", None)
    yield tmp_path
    sys.modules.pop("run_helpers", None)


def compress(out, *extra, finetune="run_helpers:tune", config="schedule.yaml", model="run_helpers:cnn"):
    args = ["compress", "--model", model, "--config", config, "--input-shape", "1,3,8,8", "--out",
            str(out), "--finetune", finetune, "--quiet", *extra]
    return CliRunner().invoke(main, args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_compressing_again_into_a_finished_run_refuses_and_changes_nothing(project):
    assert compress("out").exit_code == 0
    before = snapshot(project / "out")
    again = compress("out")
    assert again.exit_code == 2
    assert again.output.count("\n") == 1 and "holds the output of another musco-core run" in again.output
    assert "--overwrite" in again.output
    assert snapshot(project / "out") == before


def test_overwrite_starts_a_new_run_and_keeps_what_musco_core_did_not_write(project):
    assert compress("out").exit_code == 0
    (project / "out" / "notes.txt").write_text("mine")
    assert compress("out", "--overwrite").exit_code == 0
    assert (project / "out" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (project / "out" / "checkpoints").iterdir()) == [".musco-core", "LATEST",
                                                                                 "step-0004"]


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/step-0002"])
def test_overwrite_never_makes_another_runs_checkpoints_or_state_an_output(project, inside):
    """--overwrite replaces another run's output: --out pointed into a run's checkpoints once turned its last
    state into the new run's output (model.safetensors replaced under the old state.yaml), so it no longer resumed."""
    assert compress("out", finetune="run_helpers:fails_at_3").exit_code == 2
    before = snapshot(project / "out")
    refused = compress(f"out/{inside}", "--overwrite", config="schedule.yaml")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert "of another musco-core run, not a run's output" in refused.output, refused.output
    assert snapshot(project / "out") == before
    assert compress("out", "--resume", finetune="run_helpers:fails_at_3").exit_code == 0


def test_an_out_symlink_to_an_empty_folder_is_refused_as_a_symlink_not_as_a_full_folder(project):
    (project / "empty").mkdir()
    (project / "link").symlink_to("empty")
    refused = compress("link")
    assert refused.exit_code == 2 and "link: is a symlink to empty; choose another folder, or pass" in refused.output
    assert compress("link", "--overwrite").exit_code == 0 and (project / "empty" / "model.safetensors").is_file()


def test_the_users_own_checkpoints_folder_is_refused_then_left_alone(project):
    mine = project / "out" / "checkpoints" / "step-0500"
    mine.mkdir(parents=True)
    (mine / "weights.pt").write_text("a week of training")
    refused = compress("out")
    assert refused.exit_code == 2 and "not empty and was not written by musco-core" in refused.output
    assert compress("out", "--overwrite").exit_code == 0
    assert (mine / "weights.pt").read_text() == "a week of training"


def same_weights(first: Path, second: Path) -> bool:
    expected, got = weights(first), weights(second)
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("again", [(), ("--resume",)])
def test_a_run_stopped_before_its_first_state_can_be_run_again_or_resumed(project, caplog, again):
    assert compress("whole").exit_code == 0
    failed = compress("out", finetune="run_helpers:fails_at_1")
    assert failed.exit_code == 2 and "no step was saved yet; run the command again to start over" in failed.output
    with caplog.at_level("INFO", logger="musco_core"):
        result = compress("out", *again)
    assert result.exit_code == 0, result.output
    assert same_weights(project / "whole", project / "out")
    started_over = "out: the run that began here was stopped before it saved a step; starting it from step 0"
    assert (started_over in caplog.text) == bool(again)


def test_overwrite_refuses_the_users_files_where_musco_core_writes_and_writes_nothing(project):
    mine = project / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    for name in ("model.safetensors", "musco.yaml", "report.json", "checkpoints/LATEST"):
        (mine / name).write_text(f"my own {name}")
    before = snapshot(mine)
    result = compress("mine", "--overwrite")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert ("mine/model.safetensors, mine/musco.yaml, mine/report.json, mine/checkpoints/LATEST: in the way of the "
            "files musco-core writes, and not written by it; it never replaces what it did not write") in result.output
    assert snapshot(mine) == before
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints", "model.safetensors", "musco.yaml", "report.json"]


@pytest.mark.parametrize("target", ["precious", "missing"])
def test_a_checkpoints_symlink_is_refused_even_with_overwrite(project, target):
    (project / "precious").mkdir()
    (project / "precious" / "LATEST").write_text("keep")
    (project / "out").mkdir()
    (project / "out" / "checkpoints").symlink_to(project / target)
    result = compress("out", "--overwrite")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "out/checkpoints is a symlink; musco-core keeps its states in a folder of its own" in result.output
    assert [p.name for p in (project / "out").iterdir()] == ["checkpoints"]
    assert [p.name for p in (project / "precious").iterdir()] == ["LATEST"]


def test_a_refused_run_creates_and_writes_nothing(project):
    (project / "mine").mkdir()
    (project / "mine" / "notes.txt").write_text("mine")
    refused = compress("mine")
    assert refused.exit_code == 2 and "not empty and was not written by musco-core" in refused.output
    assert [p.name for p in (project / "mine").iterdir()] == ["notes.txt"]
    mistyped = compress("typo/deep/out", "--resume")
    assert mistyped.exit_code == 2 and "--out typo/deep/out: no such folder; nothing to resume" in mistyped.output
    assert not (project / "typo").exists()


def test_a_run_copied_without_its_marker_resumes(project):
    assert compress("whole").exit_code == 0
    assert compress("out", finetune="run_helpers:fails_at_3").exit_code == 2
    shutil.copytree(project / "out" / "checkpoints", project / "moved" / "checkpoints")  # cp -r out/* moved/
    resumed = compress("moved", "--resume", finetune="run_helpers:fails_at_3")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(project / "whole", project / "moved")
    # marked as the run's folder again
    assert compress("moved", "--resume", finetune="run_helpers:fails_at_3").exit_code == 0


def test_ctrl_c_while_saving_the_output_says_where_to_resume(project, monkeypatch):
    import musco_core.io

    assert compress("whole").exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(musco_core.io, "save_compressed", interrupted)
        result = compress("out")
    assert result.exit_code == 130, result.output
    assert result.output == ("musco: error: interrupted; nothing partial was saved: the last complete state is "
                             "out/checkpoints/step-0004; run the same command with --resume to continue\n")
    resumed = compress("out", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(project / "whole", project / "out")


def test_a_full_disk_says_where_to_resume(project, monkeypatch):
    """A disk that fills at step 3 after hours of steps: the one line said only "cannot write", not that step 2 is
    complete and --resume continues from it."""
    from musco_core.compressor import Compressor

    assert compress("whole").exit_code == 0
    save_state = Compressor.save_state

    def full_at_3(self, *args, **kwargs):
        if self.curr_iter == 3:
            raise OSError(28, os.strerror(28))
        return save_state(self, *args, **kwargs)

    monkeypatch.setattr(Compressor, "save_state", full_at_3)
    full = compress("out")
    assert full.exit_code == 2 and full.output == (
        "musco: error: --out out: cannot write: No space left on device; the last complete state is "
        "out/checkpoints/step-0002; run the same command with --resume to continue\n"), full.output
    monkeypatch.setattr(Compressor, "save_state", save_state)
    assert compress("out", "--resume").exit_code == 0
    assert same_weights(project / "whole", project / "out")


def test_data_aware_layers_without_calibration_name_the_option(project):
    """The library's "pass calibration_data" alone did not tell a command-line user which option gives it."""
    data_aware = {**SCHEDULE, "layers": {"6": {"decomposition": "whitened_svd", "rank_selection": "manual",
                                               "manual_rank": [8, 4]}}}
    (project / "data_aware.yaml").write_text(yaml.safe_dump(data_aware))
    result = compress("out", config="data_aware.yaml")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.endswith("(musco compress: --calibration FILE)\n"), result.output


def test_a_finetune_that_returns_a_trained_copy_is_refused_not_ignored(project):
    """The model a --finetune callable returns was ignored: one that trained a copy and returned it left the
    compressed model untrained, and the run saved it as if fine-tuned."""
    refused = compress("out", finetune="run_helpers:trains_a_copy")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert refused.output.startswith("musco: error: --finetune run_helpers:trains_a_copy returned a Sequential that "
                                     "holds none of the parameters of the model it was given, after step 1;"), \
        refused.output
    assert compress("whole").exit_code == 0
    assert compress("wrapped", finetune="run_helpers:returns_the_model").exit_code == 0
    assert same_weights(project / "whole", project / "wrapped")
    assert compress("loss", finetune="run_helpers:returns_a_loss").exit_code == 0


def test_resuming_an_overwrite_stopped_before_its_first_state_says_to_start_it_again(project):
    """--resume after an --overwrite run stopped before its first step said only "step-0004: not a state saved by
    the run of out/checkpoints": the state is the replaced run's, and the new run saved none."""
    assert compress("out").exit_code == 0
    stopped = compress("out", "--overwrite", finetune="run_helpers:fails_at_1")
    assert stopped.exit_code == 2 and "no step was saved yet; run the command again" in stopped.output
    refused = compress("out", "--resume")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert refused.output.startswith("musco: error: out/checkpoints/step-0004: a state of the run that out/checkpoints"
                                     " held before; the run begun there with overwrite=True saved no state yet: "
                                     "nothing to resume; run it again with overwrite=True (--overwrite)"), \
        refused.output
    assert compress("out", "--overwrite").exit_code == 0


def test_resume_without_a_checkpoints_folder_says_it_is_missing(project):
    assert compress("out").exit_code == 0
    shutil.rmtree(project / "out" / "checkpoints")  # deleted to save space
    result = compress("out", "--resume")
    assert result.exit_code == 2 and result.output == ("musco: error: out/checkpoints: no such folder; nothing to "
                                                       "resume\n"), result.output


def test_resume_from_the_final_state_saves_the_same_model_again(project):
    assert compress("out").exit_code == 0
    first = weights(project / "out")
    resumed = compress("out", "--resume")
    assert resumed.exit_code == 0, resumed.output
    again = weights(project / "out")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_resume_with_another_schedule_is_refused(project):
    assert compress("out").exit_code == 0
    other = {**SCHEDULE, "settings": {"ft_every": 2, "nglobal_compress_iters": 2}}
    (project / "other.yaml").write_text(yaml.safe_dump(other))
    result = compress("out", "--resume", config="other.yaml")
    assert result.exit_code == 2 and "is not the schedule the run in out began with" in result.output


def test_a_failing_finetune_leaves_the_last_state_to_resume_from(project):
    assert compress("whole").exit_code == 0
    failed = compress("out", finetune="run_helpers:fails_at_3")
    assert failed.exit_code == 2
    assert failed.output.count("\n") == 1 and "Traceback" not in failed.output
    assert "--finetune run_helpers:fails_at_3 failed after step 3: RuntimeError: CUDA out of memory;" in failed.output
    assert "step-0002; run the same command with --resume" in failed.output
    resumed = compress("out", "--resume", finetune="run_helpers:fails_at_3")
    assert resumed.exit_code == 0, resumed.output
    expected, got = weights(project / "whole"), weights(project / "out")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_finetune_error_is_quoted_whole_on_one_line(project):
    failed = compress("out", finetune="run_helpers:fails_verbosely")
    assert failed.exit_code == 2 and failed.output.count("\n") == 1, failed.output
    assert failed.output.startswith(
        "musco: error: --finetune run_helpers:fails_verbosely failed after step 1: ValueError: Given groups=1, weight of "
        "size [16, 3, 3, 3], expected input[2, 5, 8, 8] to have 3 channels, but got 5 channels instead; check the data "
        "loader of the fine-tuning set; no step was saved yet"), failed.output


def test_a_schedule_naming_a_layer_by_its_second_name_resumes(project):
    aliased = {**SCHEDULE, "layers": {"head_conv": SCHEDULE["layers"]["2"], "fc": SCHEDULE["layers"]["6"]}}
    (project / "aliased.yaml").write_text(yaml.safe_dump(aliased))
    run = functools.partial(compress, config="aliased.yaml", model="run_helpers:Aliased")
    assert run("whole").exit_code == 0
    assert run("out", finetune="run_helpers:fails_at_3").exit_code == 2
    resumed = run("out", "--resume", finetune="run_helpers:fails_at_3")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(project / "whole", project / "out")


def test_resume_without_the_weights_the_run_began_with_is_refused(project):
    import run_helpers

    with torch.no_grad():
        trained = {key: (value + 0.1).contiguous() for key, value in run_helpers.cnn().state_dict().items()}
    save_file(trained, project / "trained.safetensors")
    assert compress("whole", "--weights", "trained.safetensors").exit_code == 0
    assert compress("out", "--weights", "trained.safetensors", finetune="run_helpers:fails_at_3").exit_code == 2
    forgotten = compress("out", "--resume", finetune="run_helpers:fails_at_3")
    assert forgotten.exit_code == 2 and forgotten.output.count("\n") == 1, forgotten.output
    assert "has other weights than the run began with; resume with the same model and weights (musco compress: the " \
           "same --model and --weights" in forgotten.output
    resumed = compress("out", "--resume", "--weights", "trained.safetensors", finetune="run_helpers:fails_at_3")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(project / "whole", project / "out")


def test_resume_with_another_input_shape_or_none_is_refused(project):
    assert compress("whole").exit_code == 0
    assert compress("out", finetune="run_helpers:fails_at_3").exit_code == 2
    base = ["compress", "--model", "run_helpers:cnn", "--config", "schedule.yaml", "--out", "out", "--finetune",
            "run_helpers:fails_at_3", "--quiet", "--resume"]
    for shape, given in [(["--input-shape", "1,3,16,16"], "example input float32 (1, 3, 16, 16)"),
                         ([], "no example input")]:
        refused = CliRunner().invoke(main, base + shape)
        assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
        assert refused.output.startswith("musco: error: out/checkpoints/step-0002/state.yaml: $.example_input: the run "
                                         f"began with example input float32 (1, 3, 8, 8), the resume was given {given}; "
                                         ), refused.output
        assert refused.output.endswith("resume with the same example input (musco compress: the same --input-shape)\n")
    resumed = compress("out", "--resume", finetune="run_helpers:fails_at_3")
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(project / "whole", project / "out")
    assert json.loads((project / "out" / "report.json").read_text())["totals"] == \
        json.loads((project / "whole" / "report.json").read_text())["totals"]


def test_a_second_run_on_a_locked_output_gets_one_line(project):
    with output_lock(project / "out"):
        result = compress("out")
    assert result.exit_code == 2
    assert f"another musco-core process (pid {os.getpid()}) is writing here" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("make", ["user file", "symlink", "folder"])
def test_a_lock_file_of_the_users_is_refused_and_left_as_it_is(project, make):
    out, mine = project / "out", project / "notes.txt"
    out.mkdir()
    mine.write_text("my notes\n")
    lock = out / ".musco-lock"
    {"user file": lambda: lock.write_text("my notes\n"), "symlink": lambda: lock.symlink_to(mine),
     "folder": lock.mkdir}[make]()
    result = compress("out")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "out/.musco-lock: " in result.output and "never writes" in result.output
    assert mine.read_text() == "my notes\n"
    assert sorted(path.name for path in out.iterdir()) == [".musco-lock"]
    assert lock.is_symlink() == (make == "symlink") and lock.is_dir() == (make == "folder")
    if make == "user file":
        assert lock.read_text() == "my notes\n"


def test_a_lock_file_that_cannot_be_created_is_not_blamed_on_a_file_of_the_users(project, monkeypatch):
    """On a read-only disk the lock's error said "never writes through a symlink or over a file of yours: move it"
    though nothing was there to move."""
    import errno

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".musco-lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = compress("out")
    assert result.exit_code == 2 and result.output == (
        "musco: error: out/.musco-lock: cannot open or create musco-core's lock file: Read-only file system; choose "
        "another --out\n"), result.output


def test_a_lock_file_left_by_a_dead_run_is_taken_over(project):
    (project / "out").mkdir()
    (project / "out" / ".musco-lock").write_text("999999999")
    result = compress("out")
    assert result.exit_code == 0, result.output


def test_resuming_a_run_another_process_is_writing_is_refused_before_its_state_is_read(project):
    assert compress("out", finetune="run_helpers:fails_at_3").exit_code == 2
    latest = project / "out" / "checkpoints" / "LATEST"
    saved = latest.read_bytes()
    latest.write_text("step-9999")  # as a writer mid-commit may leave it for a moment
    with output_lock(project / "out"):
        result = compress("out", "--resume", finetune="run_helpers:fails_at_3")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"another musco-core process (pid {os.getpid()}) is writing here" in result.output
    latest.write_bytes(saved)
    assert compress("out", "--resume", finetune="run_helpers:fails_at_3").exit_code == 0


def test_ctrl_c_saves_nothing_partial_and_says_where_to_resume(project):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    musco = Path(sys.executable).parent / "musco"
    args = [str(musco), "compress", "--model", "run_helpers:cnn", "--config", "schedule.yaml", "--input-shape",
            "1,3,8,8", "--out", "out", "--finetune", "run_helpers:slow_from_2", "--quiet"]
    # a pytest started in the background (``&``) ignores SIGINT, and a child inherits that: restore the default
    process = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = project / "out" / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 120
    while not (latest.exists() and latest.read_text().strip() == "step-0001") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # inside step 2's fine-tuning
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted; nothing partial was saved" in lines[0], err
    assert "step-0001; run the same command with --resume" in lines[0]
    assert latest.read_text().strip() == "step-0001"
    assert not (project / "out" / "model.safetensors").exists()
    assert [p.name for p in (project / "out" / "checkpoints").iterdir() if ".staging-" in p.name] == []
    assert compress("out", "--resume", finetune="run_helpers:slow_from_2").exit_code == 0


BUDGET = {"version": 1, "settings": {"ft_every": 3},
          "layers": {name: {"decomposition": decomposition, "rank_selection": "budget"}
                     for name, decomposition in (("2", "tucker2"), ("6", "svd"), ("8", "svd"))}}


@pytest.mark.parametrize("target, budget", [
    ("flops:1.5", {"metric": "flops", "reduction": 1.5, "scope": "model", "form": "as_compressed"}),
    ("params:1.4:compressed", {"metric": "params", "reduction": 1.4, "scope": "compressed", "form": "as_compressed"}),
    ("latency:1.8", {"metric": "latency", "reduction": 1.8, "scope": "model", "form": "as_compressed"}),
    ("latency:1.8:optimized", {"metric": "latency", "reduction": 1.8, "scope": "model", "form": "optimized"})])
def test_a_target_on_the_command_line_replaces_the_schedules(project, target, budget):
    # the schedule's own target (another metric, scope and form) is replaced; its floor is kept
    schedule = {**BUDGET, "settings": {**BUDGET["settings"], "algo_kwargs": {"budget": {
        "reduction": 3.0, "metric": "latency", "scope": "compressed", "form": "optimized", "min_rank_fraction": 0.2}}}}
    (project / "budget.yaml").write_text(yaml.safe_dump(schedule))
    result = compress("out", "--target", target, config="budget.yaml")
    assert result.exit_code == 0, result.output
    assert f"budget pass 1/1: target {budget['reduction']:.3f}x {budget['metric']}" in result.output
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["budgets"][0]["target"] == budget["reduction"]
    assert (report["budgets"][0]["measured"] is not None) == (budget["metric"] == "latency")  # timed here
    state = yaml.safe_load((project / "out" / "checkpoints" / "step-0001" / "state.yaml").read_text())
    assert state["initial_schedule"]["settings"]["algo_kwargs"]["budget"] == {**budget, "min_rank_fraction": 0.2}


@pytest.mark.parametrize("target, message", [("flops", "expected METRIC:REDUCTION"), ("flops:two", "expected METRIC"),
                                             ("speed:2", "metric: expected one of"), ("flops:2:everything", "scope"),
                                             ("latency:2:model:compressed", "gives one twice"),
                                             ("flops:2:optimized", "needs metric: latency")])
def test_a_bad_target_is_one_line(project, target, message):
    (project / "budget.yaml").write_text(yaml.safe_dump(BUDGET))
    result = compress("out", "--target", target, config="budget.yaml")
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.parametrize("section", [{"settings": []}, {"settings": {"algo_kwargs": False}}, {"layers": []}])
def test_a_target_does_not_fill_a_section_that_is_not_a_mapping(project, section):
    """`settings: []` is refused as the schedule's error, as without --target, not replaced by the target's mapping."""
    (project / "budget.yaml").write_text(yaml.safe_dump({**BUDGET, **section}))
    result = compress("out", "--target", "flops:2", config="budget.yaml")
    assert result.exit_code != 0 and "expected a mapping" in result.output, result.output
    assert not (project / "out").exists()


@pytest.mark.parametrize("target, message", [
    ("flops:nan", "reduction: expected a finite number, got nan"),
    ("flops:inf", "reduction: expected a finite number, got inf"),
    ("flops:-2", "reduction: expected a number > 1"), ("flops:1", "reduction: expected a number > 1"),
    (":2", "metric: expected one of flops, params, latency"), ("FLOPS:2", "metric: expected one of flops, params"),
    ("flops:2:optimized", "form: optimized is the form in which the model is timed; it needs metric: latency")])
def test_a_bad_target_value_is_blamed_on_the_option(project, target, message):
    (project / "budget.yaml").write_text(yaml.safe_dump(BUDGET))
    result = compress("out", "--target", target, config="budget.yaml")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"musco: error: --target {target!r}: {message}"), result.output


@pytest.mark.parametrize("target, needs", [("flops:2", "metric flops counts the layers' MACs"),
                                           ("latency:1.5", "metric latency times the model")])
def test_a_target_that_needs_an_example_input_is_blamed_on_the_option(project, target, needs):
    (project / "budget.yaml").write_text(yaml.safe_dump(BUDGET))
    base = ["compress", "--model", "run_helpers:cnn", "--config", "budget.yaml", "--out", "out", "--quiet"]
    result = CliRunner().invoke(main, [*base, "--target", target])
    assert result.exit_code == 2, result.output
    assert result.output == f"musco: error: --target {target!r}: needs --input-shape: {needs} on an example input of " \
                            f"that shape\n"
    assert CliRunner().invoke(main, [*base, "--target", "params:2"]).exit_code == 0


def test_a_target_needs_budget_layers(project):
    result = compress("out", "--target", "flops:2")
    assert result.exit_code == 2 and "no layer of schedule.yaml uses rank_selection: budget" in result.output


def output_error(project: Path, out: str, inputs: torch.Tensor) -> float:
    """The compressed model's relative squared output error against the uncompressed one on ``inputs``."""
    import run_helpers

    teacher = run_helpers.cnn().eval()
    student = load_compressed(run_helpers.cnn(), project / out).eval()
    with torch.no_grad():
        expected = teacher(inputs)
        return float((student(inputs) - expected).square().mean() / expected.square().mean())


def test_finetune_distill_trains_on_the_calibration_inputs_and_repeats_exactly(project):
    inputs = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    save_file({"inputs": inputs}, project / "calibration.safetensors")
    data = ("--calibration", "calibration.safetensors", "--calibration-batch-size", "8")
    assert compress("plain", *data, finetune="run_helpers:keep").exit_code == 0
    first = compress("distilled", *data, "--distill-steps", "30", "--distill-lr", "1e-3", finetune="distill")
    assert first.exit_code == 0, first.output
    assert compress("again", *data, "--distill-steps", "30", "--distill-lr", "1e-3", finetune="distill").exit_code == 0
    assert output_error(project, "distilled", inputs) < 0.5 * output_error(project, "plain", inputs)
    expected, got = weights(project / "distilled"), weights(project / "again")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("extra, finetune, message", [
    ((), "distill", "--finetune distill trains on the --calibration inputs: give --calibration FILE"),
    (("--distill-steps", "5"), "run_helpers:tune", "--distill-steps set(s) the built-in distillation: add "
                                                   "--finetune distill"),
    ((), "distil", "--finetune 'distil': expected package.module:callable or distill"),
    (("--distill-lr", "nan"), "distill", "Invalid value for '--distill-lr': expected a positive number, got nan"),
    (("--distill-lr", "inf"), "distill", "Invalid value for '--distill-lr': expected a positive number, got inf"),
    (("--distill-lr", "0"), "distill", "Invalid value for '--distill-lr': expected a positive number, got 0.0"),
    (("--distill-lr", "1e39"), "distill", "Invalid value for '--distill-lr': expected a positive number at most "
                                          "3.4e+37 (AdamW's first step"),
    (("--calibration-batch-size", "8"), "run_helpers:tune", "--calibration-batch-size splits the --calibration "
                                                            "inputs into batches: give --calibration FILE"),
])
def test_distillation_options_misused_are_one_line(project, extra, finetune, message):
    result = compress("out", *extra, finetune=finetune)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert not (project / "out").exists()


@pytest.mark.parametrize("inputs, message", [
    (torch.randn(20, 3, 8, 8, dtype=torch.float64), "--model cannot run on its first batch (float64 (8, 3, 8, 8)): "
                                                    "RuntimeError: Input type (double) and bias type (float) should be "
                                                    "the same\n"),
    (torch.randn(20, 5, 8, 8), "--model cannot run on its first batch (float32 (8, 5, 8, 8)): RuntimeError: Given "
                               "groups=1, weight of size [16, 3, 3, 3], expected input[8, 5, 8, 8] to have 3 channels, "
                               "but got 5 channels instead\n"),
    (torch.randn(20, 3, 8, 8).index_fill_(0, torch.tensor([19]), float("nan")),
     "192 of its 3,840 values are not finite (NaN or inf); distillation needs finite model inputs\n")])
def test_distill_calibration_the_model_cannot_run_is_refused_before_step_1(project, inputs, message):
    save_file({"inputs": inputs}, project / "calibration.safetensors")
    result = compress("out", "--calibration", "calibration.safetensors", "--calibration-batch-size", "8",
                      "--distill-steps", "2", finetune="distill")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output == f"musco: error: --calibration calibration.safetensors: {message}"
    assert not (project / "out").exists()


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout)


@pytest.mark.parametrize("left", ["lock", "marker being written", "checkpoints marker being written"])
def test_a_run_killed_before_its_markers_starts_over_with_resume(project, left):
    """Killed after it locked OUT, before (or while) it wrote the markers: only the lock and the temporary file of a
    dead process are left, which is musco-core's bookkeeping: --resume starts the run over."""
    assert compress("whole").exit_code == 0
    out = project / "out"
    out.mkdir()
    (out / ".musco-lock").write_text("999999999")
    tmp = f"..musco-core.tmp-{dead_pid()}"
    if left == "marker being written":
        (out / tmp).write_text("created_by: musco-core\n")
    elif left == "checkpoints marker being written":
        (out / ".musco-core").write_text("created_by: musco-core\nkind: output\nrun_id: killed\npid: 999999999\n")
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / tmp).write_text("created_by: musco-core\n")
    result = compress("out", "--resume")
    assert result.exit_code == 0, result.output
    assert same_weights(project / "whole", out)
    assert [p for p in out.rglob("*") if ".tmp-" in p.name] == []


def test_temporary_files_that_are_not_musco_cores_keep_the_folder_refused(project):
    """Only musco-core's exact temporary names with the pid of a dead process are its bookkeeping."""
    out = project / "out"
    out.mkdir()
    look_alikes = [f"..musco-core.tmp-{os.getpid()}", f".notes.txt.tmp-{dead_pid()}"]  # a live writer; not ours
    for name in look_alikes:
        (out / name).write_text("created_by: musco-core\n")
        for again in ((), ("--resume",)):
            assert compress("out", *again).exit_code == 2
        assert sorted(p.name for p in out.iterdir()) == [name]
        (out / name).unlink()


def test_a_run_killed_before_its_first_latest_resumes_from_its_state(project, monkeypatch):
    """Killed after the first state folder was renamed into place, before LATEST was written."""
    import musco_core.io as io

    assert compress("whole").exit_code == 0
    original = io.write_text_atomic

    def killed_at_latest(path, text):
        if path.name == "LATEST":
            raise KeyboardInterrupt
        original(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(io, "write_text_atomic", killed_at_latest)
        killed = compress("out")
    assert killed.exit_code == 130 and "the last complete state is out/checkpoints/step-0001" in killed.output
    assert sorted(p.name for p in (project / "out" / "checkpoints").iterdir()) == [".musco-core", "step-0001"]
    assert "holds the output of another musco-core run; resume that run" in compress("out").output
    result = compress("out", "--resume")
    assert result.exit_code == 0, result.output
    assert same_weights(project / "whole", project / "out")
    assert sorted(p.name for p in (project / "out" / "checkpoints").iterdir()) == [".musco-core", "LATEST",
                                                                                 "step-0004"]


def test_a_run_killed_between_latest_and_removing_the_old_state_resumes(project, monkeypatch):
    import musco_core.io as io

    assert compress("whole").exit_code == 0

    def killed(folder):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(io, "_remove_state", killed)
        assert compress("out").exit_code == 130
    checkpoints = project / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".musco-core", "LATEST", "step-0001", "step-0002"]
    result = compress("out", "--resume")
    assert result.exit_code == 0, result.output
    assert same_weights(project / "whole", project / "out")
    assert sorted(p.name for p in checkpoints.iterdir()) == [".musco-core", "LATEST", "step-0004"]


def test_report_on_a_stopped_run_names_the_state_to_report_or_resume_from(project):
    """`musco report OUT` of a run stopped before its final output said only "out/report.json: cannot read: No such
    file or directory"; and after an --overwrite run over a finished one stopped, it showed the earlier run's report
    as OUT's. Both now say where the run stopped and which state to report or resume from."""
    def report(folder):
        return CliRunner().invoke(main, ["report", folder])

    assert compress("out", finetune="run_helpers:fails_at_3").exit_code == 2
    stopped = report("out")
    assert stopped.exit_code == 2 and stopped.output == (
        "musco: error: out: the run there stopped after step 2 of 4, before it saved its final output; its last "
        "complete state is out/checkpoints/step-0002: `musco report out/checkpoints/step-0002` shows what it did so "
        "far, and the same `musco compress` command with --resume continues it\n"), stopped.output
    assert report("out/checkpoints/step-0002").exit_code == 0
    with output_lock(project / "out"):  # a run writing there now has not stopped
        running = report("out")
    assert running.exit_code == 2 and running.output == (
        f"musco: error: out: the run there is still running (pid {os.getpid()}): it saved step 2 of 4 so far; "
        f"`musco report out/checkpoints/step-0002` shows what it did up to that step\n"), running.output
    assert compress("out", "--resume", finetune="run_helpers:fails_at_3").exit_code == 0
    assert report("out").exit_code == 0
    shutil.copytree(project / "out", project / "finished")
    for state in (project / "finished" / "checkpoints").glob("step-*"):
        shutil.rmtree(state)  # the user removed the finished run's states: its report is still its own
    assert report("finished").exit_code == 0
    assert compress("out", "--overwrite", finetune="run_helpers:fails_at_1").exit_code == 2
    earlier = report("out")
    assert earlier.exit_code == 2 and "out: the run begun there saved no step yet (its report.json is an earlier " \
                                      "run's): nothing to report; no step was saved yet" in earlier.output
    with output_lock(project / "out"):
        assert report("out").output == (f"musco: error: out: the run there is still running (pid {os.getpid()}) and "
                                         f"saved no step yet (its report.json is an earlier run's)\n")
    (project / "failed_at_3").unlink()
    assert compress("out", "--overwrite", finetune="run_helpers:fails_at_3").exit_code == 2
    earlier = report("out")
    assert earlier.exit_code == 2 and "stopped after step 2 of 4, before it saved its final output (its report.json " \
                                      "is an earlier run's)" in earlier.output


def test_resume_with_other_inputs_is_one_error_naming_each_unless_allowed(project):
    """--resume with another --calibration file (or batch size) and --finetune was accepted silently: the model mixed
    steps made with both, and the report said nothing. Now it is one error naming each changed input, old and new,
    and nothing is written; --allow-changed-inputs continues, and the report records the changes and their step."""
    for name, seed in (("a", 1), ("b", 2)):
        save_file({"inputs": torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))},
                  project / f"{name}.safetensors")
    assert compress("out", "--calibration", "a.safetensors", finetune="run_helpers:fails_at_3").exit_code == 2
    before = snapshot(project / "out")
    changed = ("--calibration", "b.safetensors", "--calibration-batch-size", "8")
    refused = compress("out", "--resume", *changed)
    assert refused.exit_code == 2 and refused.output.count("\n") == 2, refused.output
    a_hash, b_hash = (hashlib.sha256((project / f"{name}.safetensors").read_bytes()).hexdigest()[:16]
                      for name in "ab")
    state = "out/checkpoints/step-0002/state.yaml"
    assert refused.output == (
        f'musco: error: {state}: $.inputs["calibration_data"]: the run began with sha256:{a_hash} in batches of 32 '
        f'(--calibration a.safetensors), the resume was given sha256:{b_hash} in batches of 8 (--calibration '
        f'b.safetensors)\n{state}: $.inputs["finetune"]: the run began with run_helpers:fails_at_3, the resume was '
        f'given run_helpers:tune; its 2 step(s) so far were made with the first: resume with the inputs the run began '
        f'with, or allow the change from step 3 on, recorded in the state and the report (musco compress '
        f'--allow-changed-inputs; Compressor.resume(..., allow_changed_inputs=True))\n')
    assert snapshot(project / "out") == before
    not_resuming = compress("new", "--allow-changed-inputs")
    assert not_resuming.exit_code == 2 and "--allow-changed-inputs lets --resume continue a run with other inputs: " \
                                           "add --resume" in not_resuming.output
    shutil.copy(project / "a.safetensors", project / "moved.safetensors")  # the same data elsewhere: no change
    shutil.copytree(project / "out", project / "same")
    same = compress("same", "--resume", "--calibration", "moved.safetensors", finetune="run_helpers:fails_at_3")
    assert same.exit_code == 0, same.output
    assert json.loads((project / "same" / "report.json").read_text())["inputs_changed"] == []
    allowed = compress("out", "--resume", "--allow-changed-inputs", *changed)
    assert allowed.exit_code == 0, allowed.output
    changes = [f"from step 3 of 4: calibration_data changed from sha256:{a_hash} in batches of 32 (--calibration "
               f"a.safetensors) to sha256:{b_hash} in batches of 8 (--calibration b.safetensors)",
               "from step 3 of 4: finetune changed from run_helpers:fails_at_3 to run_helpers:tune"]
    assert json.loads((project / "out" / "report.json").read_text())["inputs_changed"] == changes
    shown = CliRunner().invoke(main, ["report", "out"])
    assert "inputs changed during the run (allowed on resume):\n  from step 3 of 4: calibration_data changed" in \
        shown.output


def test_a_failed_overwrite_run_says_to_resume_instead_of_overwriting(project):
    """A run begun with --overwrite that failed said "run the same command with --resume", which is refused
    ("--resume ... and --overwrite ...: give one of them"); it now says to give --resume instead."""
    assert compress("out").exit_code == 0
    failed = compress("out", "--overwrite", finetune="run_helpers:fails_at_3")
    assert failed.exit_code == 2 and failed.output.endswith(
        "the last complete state is out/checkpoints/step-0002; run the same command with --resume instead of "
        "--overwrite to continue\n"), failed.output
    assert compress("out", "--resume", finetune="run_helpers:fails_at_3").exit_code == 0
