"""Compression inside a 2-process gloo job (spawned here, as torchrun would): every rank holds the same model after
every step, the result is the single-process one, a distributed run resumes, and a rank that fails makes the whole
job fail cleanly, with no model changed and no rank left waiting."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file

from musco_core import MuscoError, distributed
from musco_core.distributed import assign
from musco_core.timing import fixed_threads

HERE = Path(__file__).parent
#: A hang fails the test instead of blocking the suite (the job itself times its collectives out after 30 s).
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(*args: str, world_size: int = 2, command: list[str] | None = None, cwd: Path = HERE
           ) -> list[subprocess.CompletedProcess]:
    """Runs distributed_worker.py with ``args`` (or ``command``) on ``world_size`` ranks, with the variables torchrun
    sets."""
    command = command or [sys.executable, str(HERE / "distributed_worker.py"), *args]
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    done = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def records(out: Path, world_size: int = 2) -> list[dict]:
    return [json.loads((out / f"rank-{rank}.json").read_text(encoding="utf-8")) for rank in range(world_size)]


def close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert (actual[key] - value).abs().max() / scale <= 1e-6, key


@pytest.fixture(scope="module")
def single():
    """The single-process run over all the data: its weights after every step, ranks and history."""
    torch.set_num_threads(1)
    compressor = worker.start()
    weights = []
    while not compressor.done:
        compressor.compression_step()
        worker.fine_tune(compressor.compressed_model, compressor.curr_iter)
        weights.append(worker.weights(compressor))
    return compressor, weights


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """A 2-rank run stopped after 2 steps, then resumed by a new 2-rank job to the end."""
    out = tmp_path_factory.mktemp("dist")
    first = launch("run", str(out), "--steps", "2")
    assert [p.returncode for p in first] == [0, 0], first[0].stderr[-2000:] + first[1].stderr[-2000:]
    stopped = records(out), {rank: load_file(out / f"rank-{rank}.safetensors") for rank in range(2)}
    second = launch("resume", str(out))
    assert [p.returncode for p in second] == [0, 0], second[0].stderr[-2000:] + second[1].stderr[-2000:]
    finished = records(out), {rank: load_file(out / f"rank-{rank}.safetensors") for rank in range(2)}
    return out, stopped, finished


def test_every_rank_holds_the_same_model_after_every_step(distributed_run, single):
    _, (stopped, _), (finished, _) = distributed_run
    compressor, _ = single
    for ranks in (stopped, finished):
        assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
        assert ranks[0]["history"] == ranks[1]["history"]
        assert ranks[0]["run_id"] == ranks[1]["run_id"]
    assert len(stopped[0]["fingerprints"]) == 3  # as loaded, and after each of the 2 steps
    assert len(finished[0]["fingerprints"]) == compressor.niters - 2 + 1


def test_the_distributed_run_is_the_single_process_run_over_all_shards(distributed_run, single):
    _, (stopped, stopped_weights), (finished, final_weights) = distributed_run
    compressor, weights = single
    expected_history = json.loads(json.dumps(worker.history(compressor)))
    assert stopped[0]["step"] == 2
    assert stopped[0]["history"] == expected_history[:len(stopped[0]["history"])]
    close(stopped_weights[0], weights[1])
    assert finished[0]["ranks"] == json.loads(json.dumps(compressor.ranks))
    assert [h["ranks"] for h in finished[0]["history"]] == [h["ranks"] for h in expected_history]
    for mine, theirs in zip(finished[0]["history"], expected_history):
        assert mine["decomposition"] == theirs["decomposition"] and mine["applied"] == theirs["applied"]
        error = theirs["relative_error"]
        assert mine["relative_error"] == (None if error is None else pytest.approx(error, rel=1e-6))
    close(final_weights[0], weights[-1])
    assert any(h["decomposition"] == "whitened_svd" and h["applied"] for h in expected_history)
    assert compressor.budgets  # the budget selector ran, with a sensitivity pass over both ranks' data


def test_output_moments_are_summed_over_the_ranks_shards(tmp_path):
    """Each rank draws the projections of its own shard from its own seed; the moments every rank gets are the
    row-weighted mean of the shards' moments, as one process computes them shard by shard with each rank's seed.
    Every rank drew from the same seed: two ranks given the same batch repeated one noise, and the sum was no
    better an estimate than one rank's."""
    assert distributed.rank_seed(5, 0) == 5 and distributed.rank_seed(5, 1) not in (5, distributed.rank_seed(6, 1))
    processes = launch("moments", str(tmp_path))
    assert [p.returncode for p in processes] == [0, 0], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    ranks = [load_file(tmp_path / f"moments-{rank}.safetensors") for rank in range(2)]
    with fixed_threads(1):  # as the ranks ran
        shards = [worker.output_moments(rank, 2) for rank in range(2)]
    batches = [len(worker.shard(worker.base.calibration(), rank, 2)) for rank in range(2)]  # rows per batch alike
    assert batches == [2, 1]
    for name in worker.MOMENT_LAYERS:
        expected = (batches[0] * shards[0][name] + batches[1] * shards[1][name]) / sum(batches)
        for moments in ranks:
            torch.testing.assert_close(moments[name], expected, rtol=1e-9, atol=1e-12)


def test_a_rank_with_an_empty_shard_takes_part_and_every_rank_ends_with_the_single_process_model(tmp_path):
    """One calibration batch for two ranks: the swap check on the first calibration batch (no example input),
    sequential calibration's layer order, a budget's data-aware damage and sensitivity pass (whose ``evaluate``
    returns None on the rank without data) and output weighting take every rank's part, whichever holds the batch
    (rank 1 used to skip the check and leave rank 0 waiting; rank 0 used to fail on its empty shard; a rank without
    evaluation data had no loss to give). With no batch anywhere, every rank raises the one ConfigError of a single
    process."""
    processes = launch("empty", str(tmp_path))
    assert [p.returncode for p in processes] == [0, 0], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    errors = [record.get("errors", {}) for record in records(tmp_path)]
    for case, (*_, holder, _) in worker.EMPTY_SHARD_CASES.items():
        if holder is None:
            with pytest.raises(MuscoError) as alone:
                worker.empty_shard_run(case)
            assert errors[0][case] == errors[1][case] == f"{type(alone.value).__name__}: {alone.value}"
            assert errors[0][case].startswith("ConfigError: calibration data is empty")
            continue
        ranks = [load_file(tmp_path / f"empty-{case}-{rank}.safetensors") for rank in range(2)]
        assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
        with fixed_threads(1):
            alone = worker.weights(worker.empty_shard_run(case))
        assert any(key.endswith(".1.weight") for key in alone)  # compressed: the factors of a layer
        close(ranks[0], alone)


def test_a_rank_that_fails_fails_every_rank_with_models_untouched(tmp_path):
    processes = launch("fail", str(tmp_path))
    assert [p.returncode for p in processes] == [3, 3], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    for record in records(tmp_path):
        calibration, decomposition, replicas = record["errors"]
        assert calibration.startswith("ConfigError: rank 1 of 2: input statistics: calibration:")
        assert "failed on batch" in calibration
        assert decomposition.startswith("CompressionError: rank 1 of 2: decomposition: layer '")
        assert "RuntimeError: decomposer crashed on" in decomposition
        assert "the model was left as before this step" in decomposition
        assert replicas.startswith("ConfigError: rank 1 of 2: checking the replicas: this rank's model differs")
        assert record["untouched"] and record["next_step"] == 1


def test_ranks_that_disagree_on_the_run_are_refused_before_any_work(tmp_path):
    """A schedule that only rank 1 refuses is refused on every rank by the Compressor. Rank 1 with another
    schedule, example input shape, plugins or no evaluate: refused on every rank when the step starts (another
    schedule used to mix rank 1's ranks into rank 0's model silently; another plan of steps left the ranks waiting
    in collectives that did not match until the timeout)."""
    processes = launch("disagree", str(tmp_path))
    assert [p.returncode for p in processes] == [0, 0], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    for record in records(tmp_path):
        assert record["errors"].keys() == worker.DISAGREEMENTS.keys()
        refused = record["errors"].pop("arguments")  # rank 0 used to fail on the dropped connection, exit 1
        assert refused.startswith("ConfigError: rank 1 of 2: checking the Compressor's arguments: model_compr_kwargs: ")
        assert "manual_rank[0]: [8] exceeds what svd can use" in refused
        for case, error in record["errors"].items():
            head = "ConfigError: rank 1 of 2: checking the replicas: this rank's "
            assert error.startswith(head) and case in error[len(head):error.index(" differ from rank 0's")], error


def test_a_rank_that_dies_mid_step_fails_the_others_with_one_clear_error(tmp_path):
    """Rank 1 is killed while decomposing: rank 0 raises a CompressionError saying another rank stopped (it used to
    raise gloo's RuntimeError, which the CLI reported as a bug in musco-core)."""
    processes = launch("killed", str(tmp_path))
    assert [p.returncode for p in processes] == [0, 9], processes[0].stderr[-2000:]
    error = json.loads((tmp_path / "rank-0.json").read_text(encoding="utf-8"))["error"]
    assert error.startswith("CompressionError: rank 0 of 2: all_reduce with the other ranks failed: another rank "
                            "stopped (killed, out of memory, or an error outside musco-core: see its log)"), error


def test_a_rank_resuming_with_other_weights_fails_every_rank(tmp_path):
    started = launch("run", str(tmp_path), "--steps", "1")
    assert [p.returncode for p in started] == [0, 0], started[0].stderr[-2000:] + started[1].stderr[-2000:]
    processes = launch("resume_other", str(tmp_path))
    assert [p.returncode for p in processes] == [3, 3], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    for record in records(tmp_path):
        assert record["error"].startswith("ConfigError: rank 1 of 2: resuming from ")
        assert "other weights than the run began with" in record["error"]


def test_ranks_whose_latency_timings_differ_follow_rank_0s_plan_and_measurement(tmp_path):
    done = launch("latency", str(tmp_path))
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    first, second = records(tmp_path)
    assert first["ranks"] == second["ranks"] and first["budgets"] == second["budgets"]
    assert any(ranks is not None for ranks in first["ranks"].values())
    assert first["budgets"][0]["measured"] is not None
    alone = worker.latency_run(rank=1)  # rank 1's clock in one process: it would have kept every layer
    assert all(ranks is None for ranks in alone.ranks.values())


def test_rewrap_without_a_process_group_gives_the_model_and_an_optimizer_over_its_parameters():
    from musco_core.distributed import rewrap

    model = torch.nn.Linear(3, 2)
    wrapped, optimizer = rewrap(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1))
    assert wrapped is model
    assert [p for group in optimizer.param_groups for p in group["params"]] == list(model.parameters())


def test_layers_are_split_across_ranks_by_cost_deterministically():
    owners = assign({"a": 10.0, "b": 6.0, "c": 5.0, "d": 0.0}, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert assign({"x": 1.0}, 3) == {"x": 0}


CLI_MODEL = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10))
"""
CLI_SCHEDULE = """
version: 1
settings: {ft_every: 1, nglobal_compress_iters: 2}
layers:
  "2": {decomposition: whitened_svd, rank_selection: param_reduction, param_reduction_rate: 2}
  "5": {decomposition: svd, rank_selection: param_reduction, param_reduction_rate: 2}
"""


def test_musco_compress_launched_by_torchrun_writes_the_single_process_output(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from musco_core.cli import main

    (tmp_path / "cli_model.py").write_text(CLI_MODEL, encoding="utf-8")
    (tmp_path / "schedule.yaml").write_text(CLI_SCHEDULE, encoding="utf-8")
    save_file({"x": torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "calibration.safetensors"))
    args = ["compress", "--model", "cli_model:make", "--config", "schedule.yaml", "--calibration",
            "calibration.safetensors", "--calibration-batch-size", "4", "--input-shape", "1,3,8,8", "--quiet"]
    processes = launch(command=[sys.executable, "-m", "musco_core.cli", *args, "--out", "shared"], cwd=tmp_path)
    assert [p.returncode for p in processes] == [0, 0], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    assert "saved to shared" in processes[0].stdout and processes[1].stdout == ""  # rank 0 reports
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "--out", "alone"])
    assert result.exit_code == 0, result.output
    close(load_file(tmp_path / "shared" / "model.safetensors"), load_file(tmp_path / "alone" / "model.safetensors"))
    rows = [[{**row, "seconds": 0} for row in json.loads((tmp_path / out / "report.json").read_text())["layers"]]
            for out in ("shared", "alone")]
    assert rows[0] == rows[1]


def test_musco_compress_on_two_ranks_shards_keyword_batches_and_their_masks(tmp_path, monkeypatch):
    """A calibration file of input_ids and attention_mask gives mapping batches; each rank takes its share of them,
    each batch with its own mask, so a masked whitened_svd equals the single-process run."""
    from click.testing import CliRunner
    from safetensors.torch import save_file
    from test_calibration import TOKEN_FACTORIES, padded_file, token_schedule

    from musco_core.cli import main

    (tmp_path / "token_factories.py").write_text(TOKEN_FACTORIES, encoding="utf-8")
    (tmp_path / "schedule.json").write_text(json.dumps(token_schedule(masked=True)), encoding="utf-8")
    save_file(padded_file(), str(tmp_path / "tokens.safetensors"))
    args = ["compress", "--model", "token_factories:tokens", "--config", "schedule.json", "--calibration",
            "tokens.safetensors", "--calibration-batch-size", "2", "--quiet"]
    processes = launch(command=[sys.executable, "-m", "musco_core.cli", *args, "--out", "shared"], cwd=tmp_path)
    assert [p.returncode for p in processes] == [0, 0], processes[0].stderr[-2000:] + processes[1].stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, [*args, "--out", "alone"])
    sys.modules.pop("token_factories", None)
    assert result.exit_code == 0, result.output
    close(load_file(tmp_path / "shared" / "model.safetensors"), load_file(tmp_path / "alone" / "model.safetensors"))


def test_musco_compress_with_a_file_one_rank_cannot_read_fails_every_rank_in_one_line(tmp_path):
    """The model's file is missing on rank 1 alone: every rank exits 2 with rank 1's error (rank 0 used to fail on
    the dropped connection, exit 1, "a bug in musco-core"), and nothing is written."""
    from safetensors.torch import save_file

    (tmp_path / "cli_model.py").write_text(CLI_MODEL + """

def make_where_readable():
    import os
    if os.environ["RANK"] == "1":
        open("weights-rank-1.bin", "rb")
    return make()
""", encoding="utf-8")
    (tmp_path / "schedule.yaml").write_text(CLI_SCHEDULE, encoding="utf-8")
    save_file({"x": torch.randn(8, 3, 8, 8)}, str(tmp_path / "calibration.safetensors"))
    processes = launch(command=[sys.executable, "-m", "musco_core.cli", "compress", "--model",
                                "cli_model:make_where_readable", "--config", "schedule.yaml", "--calibration",
                                "calibration.safetensors", "--input-shape", "1,3,8,8", "--quiet", "--out", "out"],
                       cwd=tmp_path)
    for process in processes:
        assert process.returncode == 2, process.stderr[-2000:]
        assert process.stderr.startswith("musco: error: rank 1 of 2: preparing the run: "), process.stderr[-2000:]
        assert "weights-rank-1.bin" in process.stderr
    assert not (tmp_path / "out").exists()


def test_musco_compress_resumed_with_another_schedule_on_one_rank_fails_every_rank_in_one_line(tmp_path):
    """Rank 1 resumes with another --config: every rank exits 2 with rank 1's error (rank 0 used to go on alone
    and fail on the dropped connection, exit 1)."""
    (tmp_path / "cli_model.py").write_text(CLI_MODEL, encoding="utf-8")
    (tmp_path / "schedule.yaml").write_text(CLI_SCHEDULE.replace("whitened_svd", "tucker2"), encoding="utf-8")
    (tmp_path / "other.yaml").write_text(CLI_SCHEDULE.replace("whitened_svd", "cp3"), encoding="utf-8")
    run = ("import os, sys; from musco_core.cli import main; other = os.environ['RANK'] == '1' and '--resume' in "
           "sys.argv; main([a.replace('schedule.yaml', 'other.yaml') if other else a for a in sys.argv[1:]])")
    args = [sys.executable, "-c", run, "compress", "--model", "cli_model:make", "--config", "schedule.yaml",
            "--input-shape", "1,3,8,8", "--quiet", "--out", "out"]
    started = launch(command=args, cwd=tmp_path)
    assert [p.returncode for p in started] == [0, 0], started[0].stderr[-2000:] + started[1].stderr[-2000:]
    for process in launch(command=[*args, "--resume"], cwd=tmp_path):
        assert process.returncode == 2, process.stderr[-2000:]
        assert process.stderr.startswith("musco: error: rank 1 of 2: the schedule to resume: --config other.yaml: "
                                         "is not the schedule the run in out began with"), process.stderr[-2000:]


def test_the_distillation_refusal_comes_before_any_process_group(tmp_path, monkeypatch):
    """Refused inside the group, one rank's exit left another failing to connect to it (exit 1, a gloo error):
    with WORLD_SIZE=2 and no rendezvous address, the refusal must come without trying to make the group."""
    from click.testing import CliRunner

    from musco_core import distributed
    from musco_core.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched_for_several() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched_for_several() is True
    monkeypatch.setenv("RANK", "0")
    for variable in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "schedule.yaml").write_text(CLI_SCHEDULE, encoding="utf-8")
    (tmp_path / "calibration.safetensors").write_bytes(b"")
    result = CliRunner().invoke(main, ["compress", "--model", "cli_model:make", "--config",
                                       str(tmp_path / "schedule.yaml"), "--calibration",
                                       str(tmp_path / "calibration.safetensors"), "--finetune", "distill", "--quiet",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--finetune distill runs in one process" in result.output
    assert not (tmp_path / "out").exists()


def test_musco_compress_with_world_size_but_no_rendezvous_address_is_one_clear_error(tmp_path, monkeypatch):
    """WORLD_SIZE=2 without MASTER_ADDR (not launched by torchrun) was 'musco: internal error: ValueError: ... (a bug
    in musco-core)', exit 1."""
    from click.testing import CliRunner

    from musco_core.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for variable in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "schedule.yaml").write_text(CLI_SCHEDULE, encoding="utf-8")
    result = CliRunner().invoke(main, ["compress", "--model", "cli_model:make", "--config",
                                       str(tmp_path / "schedule.yaml"), "--quiet", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "WORLD_SIZE=2 asks for a torch.distributed job, but its gloo process group could not be initialized: " \
        in result.output and "MASTER_ADDR" in result.output
    assert not (tmp_path / "out").exists()


def test_musco_compress_refuses_distillation_under_torchrun(tmp_path):
    """``--finetune distill`` trains each rank on its own shard, which would leave replicas that differ."""
    from safetensors.torch import save_file

    (tmp_path / "cli_model.py").write_text(CLI_MODEL, encoding="utf-8")
    (tmp_path / "schedule.yaml").write_text(CLI_SCHEDULE, encoding="utf-8")
    save_file({"x": torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "calibration.safetensors"))
    processes = launch(command=[sys.executable, "-m", "musco_core.cli", "compress", "--model", "cli_model:make",
                                "--config", "schedule.yaml", "--calibration", "calibration.safetensors",
                                "--input-shape", "1,3,8,8", "--finetune", "distill", "--quiet", "--out", "out"],
                       cwd=tmp_path)
    for process in processes:
        assert process.returncode == 2, process.stderr[-2000:]
        assert "--finetune distill runs in one process" in process.stderr
    assert not (tmp_path / "out").exists()
