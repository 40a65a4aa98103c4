"""The hostile cases: inputs a careless or hostile user gives musco-core, and what must come out.

Each case writes its inputs into a folder of its own (``prepare``, in the test process) and then runs in a
subprocess under an address-space limit (``act``, see ``runner.py``), so that a bomb that is not defused fails its
case instead of the machine. Kinds:

* ``raises``: a library call; ``expect`` is the exact class name of the exception it must raise.
* ``returns``: a library call whose JSON-able result ``check`` judges.
* ``cli``: ``act`` returns the arguments of one ``musco`` command, run in the inputs folder; ``expect`` is its
  exit code.

``mentions`` are substrings the message (or stderr) must contain; ``{inputs}`` stands for the inputs folder.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import user_code
from .yaml_bombs import alias_chain, billion_laughs, block_nesting, flow_nesting, json_nesting, merge_bomb

#: Soft file-size limit for the "disk full" case: the first write past it fails with EFBIG.
DISK_FULL_BYTES = 4096


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "raises", "returns" or "cli"
    prepare: Callable[[Path], None]
    act: Callable[[Path], Any]
    expect: Any = None
    mentions: tuple[str, ...] = ()
    #: Lines of the message (``raises``) or of stderr (``cli``); -1: not counted (PyYAML's own messages, a traceback).
    lines: int = 1
    #: Judges a ``returns`` result, or adds checks to a ``cli`` result (given the result and the case folder).
    check: Callable[[Any, Path], None] | None = None
    #: Wraps ``act`` in the subprocess (installing plugins, simulating a bug).
    around: Callable[[Path], contextlib.AbstractContextManager] | None = None
    #: Soft RLIMIT_FSIZE while ``act`` runs (a full disk).
    file_size_limit: int | None = None
    group: str = field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "group", "cli" if self.kind == "cli" else "library")


CASES: list[Case] = []


def case(*args: Any, **kwargs: Any) -> None:
    CASES.append(Case(*args, **kwargs))


def writes(name: str, content: str | bytes) -> Callable[[Path], None]:
    """A ``prepare`` that writes one file."""
    def prepare(inputs: Path) -> None:
        path = inputs / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return prepare


def sparse(name: str, size: int) -> Callable[[Path], None]:
    """A ``prepare`` that makes a file of ``size`` bytes without writing them (a sparse file)."""
    def prepare(inputs: Path) -> None:
        with open(inputs / name, "wb") as file:
            file.truncate(size)
    return prepare


def fifo(name: str) -> Callable[[Path], None]:
    def prepare(inputs: Path) -> None:
        os.mkfifo(inputs / name)
    return prepare


def link(name: str, target: str) -> Callable[[Path], None]:
    def prepare(inputs: Path) -> None:
        (inputs / name).symlink_to(target)
    return prepare


def each(*prepares: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(inputs: Path) -> None:
        for step in prepares:
            step(inputs)
    return prepare


def nothing(inputs: Path) -> None:
    """No inputs."""


# ---------------------------------------------------------------------------------------------------------------
# library: schedules read from files


def load(name: str = "schedule.yaml") -> Callable[[Path], Any]:
    def act(inputs: Path) -> Any:
        from musco_core import load_schedule

        return load_schedule(inputs / name)
    return act


def schedule_case(name: str, content_or_prepare: str | bytes | Callable[[Path], None], *mentions: str,
                  lines: int = 1, file: str = "schedule.yaml") -> None:
    prepare = content_or_prepare if callable(content_or_prepare) else writes(file, content_or_prepare)
    case(name, "raises", prepare, load(file), "ConfigError", (f"{{inputs}}/{file}: ", *mentions), lines)


LAUGHS = billion_laughs()
schedule_case("yaml-bomb-under-version", f"version: {LAUGHS}\n", "aliases expand it to more than")
schedule_case("yaml-bomb-under-manual-rank",
              f"version: 1\nlayers:\n  fc: {{decomposition: svd, rank_selection: manual, manual_rank: {LAUGHS}}}\n",
              "aliases expand it to more than")
schedule_case("yaml-bomb-under-decomposition",
              f"version: 1\nlayers:\n  fc: {{decomposition: {LAUGHS}, rank_selection: vbmf}}\n",
              "aliases expand it to more than")
schedule_case("yaml-bomb-under-algo-kwargs",
              f"version: 1\nsettings:\n  algo_kwargs:\n    cp4: {{n_iter_max: {LAUGHS}}}\n", "aliases expand it")
schedule_case("yaml-merge-key-bomb", merge_bomb(), "aliases expand it to more than")
schedule_case("yaml-recursive-alias", "version: 1\nlayers: &loop\n  fc: *loop\n", "recursive alias")
schedule_case("yaml-recursive-alias-in-list", "version: 1\nsettings: {seed: &s [*s]}\n", "recursive alias")
schedule_case("yaml-alias-chain-300-deep", alias_chain(300), "aliases nest it deeper than 100 levels")
schedule_case("yaml-flow-nesting-5000-deep", flow_nesting(5000), "not valid YAML", "depth")
schedule_case("yaml-flow-nesting-150-deep", flow_nesting(150), "nested deeper than 100 levels")
schedule_case("yaml-block-nesting-150-deep", block_nesting(150), "nested deeper than 100 levels")
schedule_case("yaml-41-MB-file", sparse("schedule.yaml", 41_000_000), "41,000,000 bytes, more than the")
schedule_case("yaml-just-over-the-size-limit", sparse("schedule.yaml", 4 * 2**20 + 1), "more than the 4,194,304")
schedule_case("yaml-fifo", fifo("schedule.yaml"), "not a regular file")
schedule_case("yaml-dev-zero-symlink", link("schedule.yaml", "/dev/zero"), "not a regular file")
schedule_case("yaml-directory", lambda inputs: (inputs / "schedule.yaml").mkdir(), "is a directory")
schedule_case("yaml-missing-file", nothing, "cannot read: No such file")
schedule_case("yaml-not-utf8", b"version: 1\nlayers: {\xff\xfe: null}\n", "not UTF-8")
schedule_case("yaml-nul-character", "version: 1\nlayers: {fc: \x00}\n", "not valid YAML")
schedule_case("yaml-two-documents", "version: 1\n---\nversion: 1\n", "single document")
schedule_case("yaml-python-tag", 'version: !!python/object/apply:os.system ["touch pwned"]\n', "constructor")
schedule_case("yaml-duplicate-layer", "version: 1\nlayers:\n  fc: null\n  fc: null\n", "duplicate key 'fc'")
schedule_case("yaml-huge-integer", f"version: 1\nsettings: {{seed: {'9' * 100_000}}}\n", "an integer of 100,000")
schedule_case("yaml-huge-sexagesimal-integer", "version: 1\nsettings: {seed: 1" + ":0" * 200_000 + "}\n",
              "an integer of 400,001")
schedule_case("yaml-impossible-date", "version: 1\nsettings: {seed: 2024-02-30}\n", "not valid YAML",
              "day is out of range")



def pure_python_load(inputs: Path) -> Any:
    """The same bounds hold when PyYAML has no libyaml and parses in Python."""
    import yaml

    from musco_core.schedule import PythonYamlEvents, bounded_loader

    return yaml.load((inputs / "schedule.yaml").read_text(), Loader=bounded_loader(PythonYamlEvents))  # noqa: S506


for _name, _text, _problem in [("bomb", f"version: {LAUGHS}\n", "aliases expand it to more than 1,000,000 values"),
                               ("flow-nesting-5000-deep", flow_nesting(5000), "nested deeper than 100 levels"),
                               ("block-nesting-150-deep", block_nesting(150), "nested deeper than 100 levels"),
                               ("alias-chain-300-deep", alias_chain(300), "aliases nest it deeper than 100 levels"),
                               ("recursive-alias", "layers: &loop {fc: *loop}\n", "recursive alias")]:
    case(f"yaml-pure-python-{_name}", "raises", writes("schedule.yaml", _text), pure_python_load, "ComposerError",
         (_problem,), lines=-1)

# wrong types and bounds, each named by its path
schedule_case("seed-2-to-the-64", f"version: 1\nsettings: {{seed: {2**64}}}\n", "$.settings.seed:", "below 2**63")
schedule_case("seed-2-to-the-63", f"version: 1\nsettings: {{seed: {2**63}}}\n", "$.settings.seed:", "below 2**63")
schedule_case("seed-negative", "version: 1\nsettings: {seed: -1}\n", "$.settings.seed: expected a non-negative int")
schedule_case("seed-a-string", "version: 1\nsettings: {seed: '42'}\n", "$.settings.seed:", "got '42'")
schedule_case("iters-a-billion", "version: 1\nsettings: {nglobal_compress_iters: 1000000000}\n",
              "$.settings.nglobal_compress_iters:", "at most 64")
schedule_case("iters-65", "version: 1\nsettings: {nglobal_compress_iters: 65}\n", "at most 64")
schedule_case("iters-true", "version: 1\nsettings: {nglobal_compress_iters: true}\n",
              "$.settings.nglobal_compress_iters: expected a positive int, got True")
schedule_case("ft-every-a-list", "version: 1\nsettings: {ft_every: [3]}\n", "$.settings.ft_every:")
schedule_case("version-a-bomb-free-list", "version: [1]\n", "$.version: expected a positive int")
schedule_case("settings-a-list", "version: 1\nsettings: [ft_every]\n", "$.settings: expected a mapping")
schedule_case("layers-a-string", "version: 1\nlayers: conv1\n", "$.layers: expected a mapping")
schedule_case("layer-a-number", "version: 1\nlayers: {fc: 3}\n", '$.layers["fc"]: expected a mapping')
schedule_case("decomposition-an-int", "version: 1\nlayers: {fc: {decomposition: 5, rank_selection: vbmf}}\n",
              '$.layers["fc"].decomposition: expected one of')
schedule_case("rank-a-nan", "version: 1\nlayers: {fc: {decomposition: svd, rank_selection: param_reduction, "
              "param_reduction_rate: .nan}}\n", '$.layers["fc"].param_reduction_rate: expected a finite number')
schedule_case("force-a-string", "version: 1\nlayers: {fc: {decomposition: svd, rank_selection: vbmf, "
              "force: 'yes'}}\n", '$.layers["fc"].force: expected true or false')
schedule_case("algo-kwargs-a-list", "version: 1\nsettings: {algo_kwargs: [cp4]}\n", "$.settings.algo_kwargs:")
schedule_case("unknown-top-level-keys-of-mixed-types", "version: 1\n5: x\nextra: y\n", "$: unknown keys [5, 'extra']")
schedule_case("layer-name-not-a-string", "version: 1\nlayers: {3: null}\n", "expected a layer name")

# values whose repr would be enormous: every echo must be short
schedule_case("scheduler-a-3-MB-string", f"version: 1\nsettings: {{scheduler: {'s' * 3_000_000}}}\n",
              "$.settings.scheduler: unknown scheduler 'sssss")
schedule_case("layer-name-of-a-megabyte", f"version: 1\nlayers:\n  ? {'n' * 1_000_000}\n  : 5\n",
              '$.layers["nnnnn', '..."]: expected a mapping')
schedule_case("manual-rank-of-300000-entries",
              "version: 1\nlayers: {fc: {decomposition: svd, rank_selection: manual, manual_rank: ["
              + ", ".join(["4"] * 300_000) + ", x]}}\n", '$.layers["fc"].manual_rank: expected a list of at most 64')
schedule_case("manual-rank-of-2-to-the-40", "version: 1\nlayers: {fc: {decomposition: svd, rank_selection: manual, "
              f"manual_rank: [{2**40}]}}}}\n", '$.layers["fc"].manual_rank[0]: expected ranks of at most 2**31')
schedule_case("rank-multiple-a-billion", "version: 1\nsettings: {rank_multiple: 1000000000}\n",
              "$.settings.rank_multiple: expected 'auto' or a positive int of at most 4096")
schedule_case("stage-a-million", "version: 1\nlayers: {fc: {decomposition: svd, rank_selection: vbmf, "
              "curr_compr_iter: 1000000}}\n", '$.layers["fc"].curr_compr_iter: expected at most 64')
schedule_case("decomposition-list-of-unknowns", "version: 1\nlayers: {fc: {decomposition: [svd, svd, nope], "
              "rank_selection: budget}}\n", '$.layers["fc"].decomposition: expected one of')
schedule_case("100000-unknown-settings-keys",
              "version: 1\nsettings: {" + ", ".join(f"k{i}: 1" for i in range(100_000)) + "}\n",
              "$.settings: unknown keys ['k0', 'k1', 'k10', 'k100', ...]")
schedule_case("5000-bad-layers", "version: 1\nlayers:\n" + "".join(
    f"  l{i}: {{decomposition: tucker9, rank_selection: vbmf}}\n" for i in range(5000)),
    "... and 4950 more problems", lines=51)


# ---------------------------------------------------------------------------------------------------------------
# library: keyword arguments, reports and manifests


def tiny_model():
    from torch import nn

    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def compressor_with(**kwargs: Any) -> Callable[[Path], Any]:
    def act(inputs: Path) -> Any:
        from musco_core import Compressor

        return Compressor(tiny_model(), model_compr_kwargs={
            "0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}, **kwargs)
    return act


case("compressor-seed-2-to-the-64", "raises", nothing, compressor_with(seed=2**64), "ConfigError",
     ("Compressor(seed=...): expected a non-negative int below 2**63",))
case("compressor-a-billion-iters", "raises", nothing, compressor_with(nglobal_compress_iters=10**9), "ConfigError",
     ("Compressor(nglobal_compress_iters=...):", "at most 64"))


def read_report(inputs: Path) -> Any:
    from musco_core.io import read_report as read

    return read(inputs)


def report_case(name: str, prepare: Callable[[Path], None], *mentions: str) -> None:
    case(name, "raises", prepare, read_report, "ConfigError", ("{inputs}/report.json: ", *mentions))


report_case("report-nested-100000-deep", writes("report.json", json_nesting(100_000)), "not a musco-core report")
report_case("report-65-MB", sparse("report.json", 65 * 2**20), "more than the 67,108,864")
report_case("report-fifo", fifo("report.json"), "not a regular file")
report_case("report-not-utf8", writes("report.json", b'{"format": "\xff"}'), "not UTF-8")
report_case("report-huge-integer", writes("report.json", '{"format": ' + "9" * 5000 + "}"), "not a musco-core report")
report_case("report-of-another-format", writes("report.json", '{"format": 99, "layers": []}'),
            "not a musco-core report")


def read_manifest(inputs: Path) -> Any:
    from musco_core.io import read_manifest as read

    return read(inputs)


case("manifest-yaml-bomb", "raises", writes("musco.yaml", f"format: 1\nlayers: {LAUGHS}\n"), read_manifest,
     "ConfigError", ("{inputs}/musco.yaml: ", "aliases expand it to more than"))
case("manifest-dev-zero", "raises", link("musco.yaml", "/dev/zero"), read_manifest, "ConfigError",
     ("{inputs}/musco.yaml: ", "not a regular file"))


# the limits are limits, not errors on good files
def accepted(name: str, text: str) -> None:
    def act(inputs: Path) -> Any:
        from musco_core import load_schedule

        settings = load_schedule(inputs / "schedule.yaml").settings
        return [settings.seed, settings.nglobal_compress_iters]

    case(name, "returns", writes("schedule.yaml", text), act, check=lambda value, _: _expect(value, [2**63 - 1, 64]))


def _expect(value: Any, expected: Any) -> None:
    assert value == expected, (value, expected)


accepted("largest-seed-and-iters-are-accepted", f"version: 1\nsettings: {{seed: {2**63 - 1}, "
                                                "nglobal_compress_iters: 64}\n")


# ---------------------------------------------------------------------------------------------------------------
# plugins: a clash is listed, a broken plugin is warned about once

def _distribution(inputs: Path, package: str, entry_point: str, source: str) -> None:
    (inputs / package).mkdir()
    (inputs / package / "__init__.py").write_text(source)
    info = inputs / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[musco]\n{entry_point} = {package}\n")


def clashing_plugin(inputs: Path) -> None:
    _distribution(inputs, "hostile_clash_plugin", "hostile_clash", user_code.CLASHING_PLUGIN)


def broken_plugin(inputs: Path) -> None:
    _distribution(inputs, "hostile_broken_plugin", "hostile_broken", user_code.BROKEN_PLUGIN)


@contextlib.contextmanager
def installed(inputs: Path) -> Iterator[None]:
    """The fake distributions in ``inputs`` installed for the duration (and the shared registry rebuilt)."""
    from musco_core.registry import forget_shared_registries

    sys.path.insert(0, str(inputs))
    importlib.invalidate_caches()
    forget_shared_registries()
    try:
        yield
    finally:
        sys.path.remove(str(inputs))
        for module in ("hostile_clash_plugin", "hostile_broken_plugin"):
            sys.modules.pop(module, None)
        importlib.invalidate_caches()
        forget_shared_registries()


def default_registry_act(inputs: Path) -> Any:
    from musco_core import default_registry

    return default_registry()


case("plugin-clash-refused-for-compression", "raises", clashing_plugin, default_registry_act,
     "DuplicateComponentError", ("decomposition 'svd' is registered twice", "musco_plugins.svd", "hostile_clash"),
     around=installed)


def warnings_of_three_registries(inputs: Path) -> Any:
    """How often the broken plugin is warned about while the registry is asked for three times and the plugins are
    listed twice."""
    from click.testing import CliRunner

    from musco_core import default_registry
    from musco_core.cli import main

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect()
    logging.getLogger("musco_core").addHandler(handler)
    try:
        registries = [default_registry() for _ in range(3)]
        listings = [CliRunner().invoke(main, ["plugins"]) for _ in range(2)]
    finally:
        logging.getLogger("musco_core").removeHandler(handler)
    return {"warnings": [m for m in messages if "hostile_broken" in m],
            "same_registry": all(r is registries[0] for r in registries),
            "listing_exit_codes": [r.exit_code for r in listings],
            "listing_stdout": listings[0].stdout}


def _warned_once(value: dict, _: Path) -> None:
    assert len(value["warnings"]) == 1, value["warnings"]
    assert "hostile_broken_plugin needs a missing dependency" in value["warnings"][0]
    assert value["same_registry"] and value["listing_exit_codes"] == [0, 0]
    assert "broken plugin 'hostile_broken' (hostile-broken-plugin)" in value["listing_stdout"]


case("broken-plugin-warned-once-per-process", "returns", broken_plugin, warnings_of_three_registries,
     check=_warned_once, around=installed)


# ---------------------------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit code 2, the option or file named


def cli_inputs(*extra: Callable[[Path], None]) -> Callable[[Path], None]:
    """The user's module (found in the current directory), a schedule, and ``extra``."""
    return each(writes("hostile_factories.py", user_code.FACTORIES), writes("schedule.yaml", user_code.SCHEDULE),
                *extra)


def cli_case(name: str, args: list[str], *mentions: str, prepare: Callable[[Path], None] | None = None,
             expect: int = 2, **kwargs: Any) -> None:
    case(name, "cli", prepare or cli_inputs(), lambda inputs: args, expect, mentions, **kwargs)


def compress(*extra: str, model: str = "hostile_factories:cnn") -> list[str]:
    """A quiet run with an example input, so that a step logs nothing (without one it warns that the swap check
    could not run) and stderr holds the error alone."""
    return ["compress", "--model", model, "--config", "schedule.yaml", "--out", "../out", "--quiet",
            "--input-shape", "1,3,8,8", *extra]


def generate(*extra: str, model: str = "hostile_factories:cnn") -> list[str]:
    return ["config", "generate", "--model", model, "--type", "vbmf", *extra]


def nothing_saved(result: dict, folder: Path) -> None:
    assert not (folder / "out" / "model.safetensors").exists()


cli_case("cli-input-shape-not-numbers", generate("--input-shape", "1,x"), "--input-shape '1,x': expected")
cli_case("cli-input-shape-zero", generate("--input-shape", "0,3,8,8"), "--input-shape '0,3,8,8': expected")
cli_case("cli-input-shape-120-GB", generate("--input-shape", "1,3,100000,100000"),
         "--input-shape '1,3,100000,100000': more than 134,217,728 elements")
cli_case("cli-input-shape-beyond-int64", generate("--input-shape", "9" * 30), "more than 134,217,728 elements")
cli_case("cli-input-shape-100000-axes", generate("--input-shape", ",".join(["1"] * 100_000)),
         "--input-shape '1,1,1,", "100000 axes, more than 16")
cli_case("cli-input-shape-not-matching-the-model", generate("--input-shape", "1,5,8,8"),
         "--input-shape '1,5,8,8' does not fit --model 'hostile_factories:cnn': RuntimeError:")
cli_case("cli-model-factory-raises", generate(model="hostile_factories:raises"),
         "--model 'hostile_factories:raises' raised RuntimeError: the factory broke")
cli_case("cli-model-factory-calls-sys-exit", compress(model="hostile_factories:exits"),
         "--model 'hostile_factories:exits': called sys.exit(0)", check=nothing_saved)
cli_case("cli-model-factory-returns-no-module", generate(model="hostile_factories:not_a_model"),
         "returned int, not a torch.nn.Module")
cli_case("cli-model-module-fails-to-import", generate(model="hostile_broken_module:f"),
         "--model 'hostile_broken_module:f': cannot import hostile_broken_module: ImportError:",
         prepare=cli_inputs(writes("hostile_broken_module.py", user_code.BROKEN_IMPORT)))
cli_case("cli-model-module-exits-on-import", generate(model="hostile_exiting_module:f"),
         "cannot import hostile_exiting_module: SystemExit: 4",
         prepare=cli_inputs(writes("hostile_exiting_module.py", user_code.EXITS_ON_IMPORT)))
cli_case("cli-model-spec-without-colon", generate(model="hostile_factories"), "expected package.module:callable")
cli_case("cli-finetune-raises", compress("--finetune", "hostile_factories:finetune_raises"),
         "--finetune hostile_factories:finetune_raises failed after step 1: ValueError:", check=nothing_saved)
cli_case("cli-finetune-calls-sys-exit", compress("--finetune", "hostile_factories:finetune_exits"),
         "--finetune hostile_factories:finetune_exits called sys.exit(3) after step 1", check=nothing_saved)
cli_case("cli-disk-full-while-saving", compress(), "--out ../out: cannot write: File too large",
         check=nothing_saved, file_size_limit=DISK_FULL_BYTES)
cli_case("cli-weights-a-fifo", generate("--weights", "weights.pt"), "--weights weights.pt: not a regular file",
         prepare=cli_inputs(fifo("weights.pt")))
cli_case("cli-calibration-dev-zero", compress("--calibration", "calibration.safetensors"),
         "--calibration calibration.safetensors: not a regular file",
         prepare=cli_inputs(link("calibration.safetensors", "/dev/zero")))
cli_case("cli-validate-dev-zero", ["config", "validate", "zero.yaml"], "zero.yaml: cannot read: not a regular file",
         prepare=link("zero.yaml", "/dev/zero"))
cli_case("cli-validate-fifo", ["config", "validate", "pipe.yaml"], "pipe.yaml: cannot read: not a regular file",
         prepare=fifo("pipe.yaml"))
cli_case("cli-validate-yaml-bomb", ["config", "validate", "bomb.yaml"], "bomb.yaml: not valid YAML: aliases expand",
         prepare=writes("bomb.yaml", f"version: 1\nlayers:\n  fc: {{decomposition: {LAUGHS}}}\n"))
cli_case("cli-validate-seed-2-to-the-64", ["config", "validate", "seed.yaml"], "seed.yaml: $.settings.seed:",
         prepare=writes("seed.yaml", f"version: 1\nsettings: {{seed: {2**64}}}\n"))
cli_case("cli-report-nested-100000-deep", ["report", "."], "report.json: not a musco-core report",
         prepare=writes("report.json", json_nesting(100_000)))
cli_case("cli-report-65-MB", ["report", "."], "report.json: cannot read: 68,157,440 bytes",
         prepare=sparse("report.json", 65 * 2**20))
cli_case("cli-report-rows-of-the-wrong-kind", ["report", "."], "report.json: not a musco-core report",
         prepare=writes("report.json", '{"format": 1, "layers": [], "totals": {"params_before": "many", '
                                       '"params_after": [], "macs_before": null, "macs_after": null}}'))
cli_case("cli-missing-option", ["compress", "--model", "hostile_factories:cnn"],
         "Missing option", "musco compress --help")
cli_case("cli-unknown-command", ["squash"], "No such command 'squash'")
cli_case("cli-bad-choice", ["config", "generate", "--model", "hostile_factories:cnn", "--type", "svd"],
         "Invalid value for '--type'")


@contextlib.contextmanager
def musco_bug(inputs: Path) -> Iterator[None]:
    """A bug in musco-core, simulated: computing the model's statistics fails with a TypeError."""
    from musco_core import stats

    original = stats.ModelStats.from_model

    def broken(*args: Any, **kwargs: Any) -> Any:
        return None + 1

    stats.ModelStats.from_model = broken
    try:
        yield
    finally:
        stats.ModelStats.from_model = original


cli_case("cli-internal-bug-is-one-line", generate(), "musco: internal error: TypeError: unsupported operand",
         "run with --debug for the traceback", expect=1, around=musco_bug)


def _traceback_then_one_line(result: dict, folder: Path) -> None:
    assert "Traceback (most recent call last)" in result["stderr"], result["stderr"]
    assert result["stderr"].splitlines()[-1].startswith("musco: internal error: TypeError")


case("cli-debug-shows-the-traceback", "cli", cli_inputs(), lambda inputs: ["--debug", *generate()], 1,
     ("return None + 1",), lines=-1, check=_traceback_then_one_line, around=musco_bug)


def _lists_the_clash(result: dict, folder: Path) -> None:
    rows = [line.split() for line in result["stdout"].splitlines()]
    svd_rows = [row for row in rows if row[:2] == ["decomposition", "svd"]]
    assert [row[2] for row in svd_rows] == ["musco_plugins.svd", "hostile_clash"], svd_rows
    assert all(row[-3:] == ["<-", "name", "clash"] for row in svd_rows), svd_rows
    assert any(row[:2] == ["decomposition", "tucker2"] for row in rows)  # everything else still listed


case("cli-plugins-lists-a-clash", "cli", clashing_plugin, lambda inputs: ["plugins"], 0,
     ("musco: warning: decomposition 'svd' is registered twice", "hostile_clash", "MUSCO_DISABLE_PLUGINS"),
     check=_lists_the_clash, around=installed)
case("cli-compress-refuses-a-clash", "cli", each(cli_inputs(), clashing_plugin), lambda inputs: compress(), 2,
     ("decomposition 'svd' is registered twice", "hostile_clash"), check=nothing_saved, around=installed)
case("cli-plugins-strict-with-a-broken-plugin", "cli", broken_plugin, lambda inputs: ["plugins", "--strict"], 2,
     ("plugin 'hostile_broken' from hostile-broken-plugin failed: ImportError",), around=installed)

CASE_NAMES = [c.name for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES), "case names must be unique"
