"""The ``musco`` command: compress a model from a YAML schedule, generate and check schedules, show reports
and plugins.

Every failure is one line on stderr, never a traceback: a bad argument, file or user callable gives
``musco: error: ...`` and exit code 2; a bug in musco-core gives ``musco: internal error: ...`` and exit code 1,
and ``musco --debug`` shows the traceback of either. ``--model`` and ``--finetune`` import and run the user's code,
from the current directory as ``python -m`` does.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import itertools
import logging
import math
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cattrs
import click
import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from .errors import ConfigError, MuscoError, one_line, short_repr
from .finetune import lr_problem
from .schedule import (SCHEMA_VERSION, STDIN, RunSettings, ScheduleCodec, ValueProblem, read_stdin_yaml, read_yaml,
                       validation_problems)

log = logging.getLogger("musco_core")

#: Largest random example input (``--input-shape``): 2**27 values, 512 MiB in float32 (it takes the model's dtype).
MAX_EXAMPLE_ELEMENTS = 2**27
#: Most axes of the example input (a video batch has 5).
MAX_EXAMPLE_AXES = 16
#: ``--finetune distill``: the built-in distillation; a user callable is always ``package.module:name``, with a colon.
DISTILL = "distill"
#: Defaults of ``--distill-steps`` and ``--distill-lr``: a few passes over a few hundred calibration inputs, at a
#: learning rate small enough not to undo a pretrained model (measured on MiniLM and an MNIST CNN, docs/experiments.md).
DISTILL_STEPS = 100
DISTILL_LR = 1e-4
#: Exit code of a bad argument, file or user callable (as click's own usage errors).
USAGE_EXIT_CODE = 2
#: Exit code of a bug in musco-core (as an uncaught Python exception).
INTERNAL_EXIT_CODE = 1


class UsageProblem(click.ClickException):
    """A problem with the user's arguments, files or code: printed as ``musco: error: ...``, exit code 2."""

    exit_code = USAGE_EXIT_CODE
    label = "error"

    def format_message(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(f"musco: {self.label}: {self.format_message()}", err=True)


class InternalProblem(UsageProblem):
    """A bug in musco-core: one line, exit code 1, and a pointer to ``--debug``."""

    exit_code = INTERNAL_EXIT_CODE
    label = "internal error"


def _exception_line(exc: BaseException) -> str:
    """``Type: first line of the message``, bounded (torch errors append pages of C++ frames)."""
    text = str(exc)
    first = text.splitlines()[0] if text.strip() else ""
    return one_line(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def _debug_requested() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


class MuscoGroup(click.Group):
    """A click group whose usage errors (a missing option, a bad choice, an unknown command) are one line too."""

    group_class = type  # subgroups (``musco config``) are MuscoGroups

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a group without a command: click prints its help (not an error to squash into one line)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise UsageProblem(one_line(exc.format_message()) + where) from None


def _friendly(command):
    """Turns every failure of a command into one line: exit code 2 for bad input (library errors, files, the
    user's code), 1 for a bug in musco-core, 130 for Ctrl-C (click's own ``Aborted!`` would exit 1). With
    ``musco --debug`` the traceback is printed first."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("") from None
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as exc:
            if _debug_requested() and exc.__cause__ is not None:
                traceback.print_exception(exc.__cause__, file=sys.stderr)
            raise
        except (MuscoError, OSError, SafetensorError) as exc:
            problem = UsageProblem(_library_message(exc))
            cause = exc
        except Exception as exc:  # noqa: BLE001 - anything else is a bug: one line, traceback with --debug
            problem = InternalProblem(f"{_exception_line(exc)} (a bug in musco-core; run with --debug for the "
                                      f"traceback)")
            cause = exc
        if _debug_requested():
            traceback.print_exception(cause, file=sys.stderr)
        raise problem from None
    return run


def _library_message(exc: BaseException) -> str:
    """The message of an error about the user's input: a MuscoError's own (one line per problem), else one line."""
    if isinstance(exc, MuscoError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return _exception_line(exc)


@contextlib.contextmanager
def _writing(option: str, target: Path, checkpoints: Path, overwrite: bool = False):
    """Reports a failed write (disk full, file too large, no permission) as one line naming the output and where
    the run can resume from (the states saved before stay complete)."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else _exception_line(exc)
        raise UsageProblem(f"{option} {target}: cannot write: {reason}; {_resume_hint(checkpoints, overwrite)}"
                           ) from exc


def _call_user_code(option: str, spec: str, function, *args):
    """``function(*args)``, where ``function`` is a callable the user named: whatever it raises, or a ``sys.exit``
    in it, becomes one line naming the option and the callable."""
    try:
        return function(*args)
    except SystemExit as exc:
        raise UsageProblem(f"{option} {short_repr(spec)}: called sys.exit({short_repr(exc.code)}) instead of "
                           f"returning") from exc
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise UsageProblem(f"{option} {short_repr(spec)} raised {_exception_line(exc)}") from exc


def _import_callable(spec: str, option: str):
    """``package.module:name`` -> the object. Only for names the user typed on the command line. The current
    directory is searched first, as ``python -m`` does."""
    module_name, _, attribute = spec.partition(":")
    shown = short_repr(spec)
    if not module_name or not attribute:
        alternative = f" or {DISTILL}" if option == "--finetune" else ""
        raise UsageProblem(f"{option} {shown}: expected package.module:callable{alternative}")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # noqa: BLE001 - the user's module failed to import (or exited): one line
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageProblem(f"{option} {shown}: cannot import {one_line(module_name, 100)}: "
                           f"{_exception_line(exc)}") from exc
    target = getattr(module, attribute, None)
    if not callable(target):
        raise UsageProblem(f"{option} {shown}: {one_line(module_name, 100)} has no callable "
                           f"{short_repr(attribute)}")
    return target


def _regular_file(option: str, path: Path) -> Path:
    """``path``, refused unless it is a regular file (a FIFO would block, a device never end)."""
    if not path.is_file():
        raise UsageProblem(f"{option} {path}: not a regular file")
    return path


def _load_model(spec: str, weights: Path | None) -> nn.Module:
    model = _call_user_code("--model", spec, _import_callable(spec, "--model"))
    if not isinstance(model, nn.Module):
        raise UsageProblem(f"--model {short_repr(spec)}: the factory returned {type(model).__name__}, not a "
                           f"torch.nn.Module")
    if weights is not None:
        from safetensors.torch import load_file

        _regular_file("--weights", weights)
        try:
            if weights.suffix.lower() == ".safetensors" or _looks_like_safetensors(weights):
                state = load_file(str(weights))
            else:
                with warnings.catch_warnings():  # the refusal is one line: no pickle-protocol warning before it
                    warnings.simplefilter("ignore")
                    state = torch.load(weights, map_location="cpu", weights_only=True)
        except SafetensorError as exc:
            raise UsageProblem(f"--weights {weights}: not a valid safetensors file: {_exception_line(exc)}") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise UsageProblem(f"--weights {weights}: refused, not a plain tensor state dict "
                               f"(read with weights_only=True, nothing in it was run): {_torch_load_reason(exc)}"
                               ) from None
        if not isinstance(state, Mapping):
            raise UsageProblem(f"--weights {weights}: expected a state dict (a mapping of names to tensors), got "
                               f"{type(state).__name__}")
        key, value = next(((key, value) for key, value in state.items() if not isinstance(value, torch.Tensor)),
                          (None, None))
        if key is not None:
            raise UsageProblem(f"--weights {weights}: {short_repr(key)} holds {type(value).__name__}, not a tensor; "
                               f"expected a state dict (a mapping of names to tensors)")
        misfit = _load_weights(model, state)
        if misfit:
            raise UsageProblem(f"--weights {weights}: does not fit --model {short_repr(spec)}: {misfit}")
    return model.eval()


def _looks_like_safetensors(path: Path) -> bool:
    """Whether the file begins as a safetensors file does, whatever its name: an 8-byte little-endian header length
    that fits the file, then the header's JSON object. torch.save's zip and pickle files never do."""
    with path.open("rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


#: Where torch.load's weights_only refusal states its reason, after its advice to load the file unsafely.
WEIGHTS_ONLY_REASON = "WeightsUnpickler error:"


def _torch_load_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line, without torch's advice to load it with
    weights_only=False or to allowlist its classes (both run what the file names)."""
    text = str(exc)
    if WEIGHTS_ONLY_REASON in text:
        reason = text.split(WEIGHTS_ONLY_REASON, 1)[1].split("Check the documentation", 1)[0]
        return one_line(" ".join(reason.split()).split(". Please use", 1)[0].rstrip("."))
    first = text.splitlines()[0] if text.strip() else ""
    return type(exc).__name__ if "weights_only" in first or not first else one_line(first)


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Loads ``state`` into the model; what does not fit (the shapes that differ, the keys missing and unexpected:
    the first few of each and how many), or None.

    A tensor the model holds under several keys (a language model's head tied to its embedding) is loaded from any
    of them: Hugging Face's ``save_pretrained`` and safetensors' ``save_model`` write it once. Two of its keys
    holding different values in the file do not fit: the model cannot hold both, and loading would keep one."""
    from .io import tied_value_conflicts

    expected = model.state_dict(keep_vars=True)
    differ = [key for key, value in state.items()
              if isinstance(expected.get(key), torch.Tensor) and value.shape != expected[key].shape]
    fitting = {key: value for key, value in state.items() if key not in differ}
    keys_of: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        keys_of.setdefault(id(tensor), []).append(key)
    tied = [keys for keys in keys_of.values() if len(keys) > 1]
    conflicts = tied_value_conflicts(tied, fitting, "the file")
    unfilled = _fill_meta(model, fitting)
    try:  # missing and unexpected as torch counts them (a module's load hooks may fill in or rename keys)
        loaded = model.load_state_dict(fitting, strict=False)
    except RuntimeError as exc:
        return _exception_line(exc)
    tied_in_file = {key for keys in tied if any(key in fitting for key in keys) for key in keys}
    missing = sorted(set(loaded.missing_keys) - set(differ) - tied_in_file)
    unfilled = [name for name in unfilled if name not in missing and name not in differ]
    problems = [_listed(len(differ), "shape differs", "shapes differ",
                        [f"{key!r} is {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
                         for key in differ]),
                _listed(len(conflicts), "tied tensor differs", "tied tensors differ", conflicts),
                _listed(len(missing), "key missing", "keys missing", map(repr, missing)),
                _listed(len(loaded.unexpected_keys), "unexpected key", "unexpected keys",
                        map(repr, sorted(loaded.unexpected_keys))),
                _listed(len(unfilled), "tensor on the meta device that the file does not hold (a buffer that is "
                        "not saved must be built on a real device)", "tensors on the meta device that the file does "
                        "not hold (buffers that are not saved must be built on a real device)", map(repr, unfilled))]
    return "; ".join(problem for problem in problems if problem) or None


def _fill_meta(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Gives each parameter and buffer that the factory built on the ``meta`` device its value from ``state``, as a
    new CPU tensor of its own dtype (what ``load_state_dict`` copies into a real tensor; a copy into a meta tensor
    does nothing), put in every module that holds it, so tied weights stay tied. Returns the names of those
    ``state`` holds no value for, which stay on meta."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for prefix, owner in model.named_modules(remove_duplicate=False):
        for attribute, tensor in itertools.chain(owner.named_parameters(recurse=False, remove_duplicate=False),
                                                 owner.named_buffers(recurse=False, remove_duplicate=False)):
            if tensor.is_meta:
                tensors[id(tensor)] = tensor
                holders.setdefault(id(tensor), []).append((owner, attribute))
                names.setdefault(id(tensor), []).append(f"{prefix}.{attribute}" if prefix else attribute)
    unfilled = []
    for key, tensor in tensors.items():
        value = next((state[name] for name in names[key] if name in state), None)
        if value is None:
            unfilled.append(names[key][0])
            continue
        value = value.to(dtype=tensor.dtype, copy=True)  # never a view of the file's tensors, which may share memory
        if isinstance(tensor, nn.Parameter):
            value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        for owner, attribute in holders[key]:
            setattr(owner, attribute, value)
    return unfilled


def _listed(count: int, one: str, many: str, items, shown: int = 3) -> str:
    """``"2 keys missing: 'a', 'b'"``: the first ``shown`` items and how many more; empty for none."""
    if not count:
        return ""
    items = list(items)
    more = f" and {count - shown} more" if count > shown else ""
    return f"{count} {one if count == 1 else many}: {', '.join(items[:shown])}{more}"


def _input_shape(text: str | None, model: nn.Module) -> torch.Tensor | None:
    """A seeded random example input of the shape ``N,C,H,W`` (any number of axes), bounded in size, drawn in
    float32 and given the dtype and device of the model's first floating-point parameter (float32 on CPU without
    one), so that a float64 or bfloat16 model runs on it."""
    if text is None:
        return None
    expected = f"--input-shape {short_repr(text)}: expected comma-separated positive ints, e.g. 1,3,224,224"
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageProblem(expected) from None
    if not shape or min(shape) < 1:
        raise UsageProblem(expected)
    if len(shape) > MAX_EXAMPLE_AXES:
        raise UsageProblem(f"--input-shape {short_repr(text)}: {len(shape)} axes, more than {MAX_EXAMPLE_AXES}")
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    if math.prod(min(size, MAX_EXAMPLE_ELEMENTS + 1) for size in shape) > MAX_EXAMPLE_ELEMENTS:
        dtype = torch.float32 if like is None else like.dtype  # the example input's, as the model's
        raise UsageProblem(f"--input-shape {short_repr(text)}: more than {MAX_EXAMPLE_ELEMENTS:,} elements "
                           f"(MAX_EXAMPLE_ELEMENTS, {MAX_EXAMPLE_ELEMENTS * dtype.itemsize // 2**20} MiB of "
                           f"{str(dtype).removeprefix('torch.')})")
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return example if like is None else example.to(dtype=like.dtype, device=like.device)


def _model_and_example(model_spec: str, weights: Path | None, input_shape: str | None
                       ) -> tuple[nn.Module, torch.Tensor | None]:
    """The user's model and example input, checked to fit each other by one forward pass (the user's code)."""
    model = _load_model(model_spec, weights)
    example = _input_shape(input_shape, model)
    if example is not None:
        def forward():
            with torch.no_grad():
                model(example)

        try:
            forward()
        except Exception as exc:  # noqa: BLE001 - the model's forward is the user's code
            raise UsageProblem(f"--input-shape {short_repr(input_shape)} does not fit --model "
                               f"{short_repr(model_spec)}: {_exception_line(exc)}") from exc
    return model, example


#: The --calibration inputs: tensor batches (a file of one tensor) or mappings of keyword inputs (several).
Batches = list[torch.Tensor] | list[dict[str, torch.Tensor]]


def _calibration_batches(path: Path | None, batch_size: int) -> Batches | None:
    """A safetensors file's tensors split along their first axis into batches of ``batch_size``: one tensor gives
    tensor batches (``model(batch)``); several give mappings ``{name: tensor[i:i + b]}`` (``model(**batch)``, a
    tokenizer's ``input_ids`` and ``attention_mask``), so they must agree on the number of inputs."""
    if path is None:
        return None
    from safetensors.torch import load_file

    _regular_file("--calibration", path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise UsageProblem(f"--calibration {path}: not a safetensors file: {_exception_line(exc)}") from None
    if not tensors:
        raise UsageProblem(f"--calibration {path}: expected tensors of model inputs, found none")
    if len(tensors) == 1:
        (inputs,) = tensors.values()
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise UsageProblem(f"--calibration {path}: the tensor of shape {tuple(inputs.shape)} holds no inputs")
        return list(inputs.split(batch_size))
    counts = {int(tensor.shape[0]) if tensor.dim() else None for tensor in tensors.values()}
    if len(counts) != 1 or None in counts:
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in sorted(tensors.items()))
        raise UsageProblem(f"--calibration {path}: its {len(tensors)} tensors are the model's keyword inputs, split "
                           f"along their first axis into batches, so they must have the same first dimension (the "
                           f"number of inputs); got {one_line(shapes, 300)}")
    if counts == {0}:
        raise UsageProblem(f"--calibration {path}: its {len(tensors)} tensors hold no inputs (first dimension 0)")
    parts = zip(*(tensor.split(batch_size) for tensor in tensors.values()))
    return [dict(zip(tensors, batch)) for batch in parts]


def _run_inputs(calibration_path: Path | None, batch_size: int, finetune_spec: str | None, distill_steps: int,
                distill_lr: float) -> dict[str, Any]:
    """What the run's state records of its inputs besides the schedule, model and example input (which it checks
    already), so that --resume refuses other ones: the calibration file's content hash and batch size, and the
    fine-tuning (a callable by its name: its code is not hashed)."""
    from .state import RunInput

    finetune = (f"distill, {distill_steps} steps at lr {distill_lr:g}" if finetune_spec == DISTILL else
                finetune_spec or "none")
    inputs = {"finetune": RunInput(finetune)}
    if calibration_path is not None:
        digest = hashlib.sha256()
        with calibration_path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        inputs["calibration_data"] = RunInput(f"sha256:{digest.hexdigest()[:16]} in batches of {batch_size}",
                                              f"--calibration {calibration_path}")
    return inputs


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)


def _learning_rate(context: click.Context, parameter: click.Parameter, value: float | None) -> float | None:
    """--distill-lr, refused at parse time unless distill would take it (a number it can step with)."""
    problem = None if value is None else lr_problem(value)
    if problem:
        raise click.BadParameter(problem.removeprefix("lr: "))
    return value


class NonEmptyPath(click.Path):
    """A path argument or option that refuses an empty value, which ``Path`` reads as the current directory: ``--out
    ""`` (an unset shell variable) would write there."""

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("an empty path; give a file or folder name (. for the current directory)", param, ctx)
        return super().convert(value, param, ctx)


MODEL = click.option("--model", "model_spec", required=True, metavar="PKG.MODULE:FACTORY",
                     help="A callable that returns the uncompressed torch.nn.Module.")
WEIGHTS = click.option("--weights", type=NonEmptyPath(exists=True, dir_okay=False, path_type=Path),
                       help="Weights to load first: a safetensors file (told by its header, whatever its name), "
                            "or a state dict read with torch.load(weights_only=True).")
INPUT_SHAPE = click.option("--input-shape", metavar="N,C,H,W",
                           help="Shape of a random example input, for MAC counts and the no-growth check; it "
                                "takes the dtype and device of the model's first floating-point parameter.")


@click.group(cls=MuscoGroup, name="musco")
@click.version_option(package_name="musco-core")
@click.option("--debug", is_flag=True, help="Print the traceback of an error before its one-line message.")
def main(debug) -> None:
    """Multi-stage low-rank compression of PyTorch models.

    --model and --finetune import and run your code (package.module:callable, found from the current
    directory first, as with python -m).
    """


@main.command()
@MODEL
@WEIGHTS
@click.option("--config", "config_path", required=True, type=NonEmptyPath(path_type=Path),
              help="YAML schedule; - reads it from stdin.")
@INPUT_SHAPE
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Directory for model.safetensors, musco.yaml, report.json and checkpoints/.")
@click.option("--finetune", "finetune_spec", metavar="distill|PKG.MODULE:FUNCTION",
              help="After every compression step: 'distill' trains the compressed model to reproduce the "
                   "uncompressed one's outputs on the --calibration inputs (no labels); PKG.MODULE:FUNCTION is "
                   "called as FUNCTION(model, step).")
@click.option("--distill-steps", type=click.IntRange(min=1), default=None,
              help=f"Optimizer steps of --finetune distill after each compression step, one calibration batch "
                   f"each  [default: {DISTILL_STEPS}]")
@click.option("--distill-lr", type=float, default=None, callback=_learning_rate,
              help=f"AdamW learning rate of --finetune distill  [default: {DISTILL_LR:g}]")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT from OUT/checkpoints.")
@click.option("--allow-changed-inputs", is_flag=True,
              help="With --resume: continue with another --calibration file or batch size, --finetune or --distill-* "
                   "than the run began with (refused otherwise); the report records the change and its step.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in an OUT that holds another run's output or other files (a file musco-core did "
                   "not write is never replaced or deleted).")
@click.option("--calibration", "calibration_path", type=NonEmptyPath(exists=True, dir_okay=False, path_type=Path),
              help="Calibration inputs for data-aware decompositions (whitened_svd) and --finetune distill: a "
                   ".safetensors file split into batches along the first axis: one tensor gives tensor batches, "
                   "model(batch); several (input_ids, attention_mask) give mapping batches, model(**batch), and "
                   "must have the same first dimension.")
@click.option("--calibration-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Inputs per calibration batch.")
@click.option("--target", "target", metavar="METRIC:REDUCTION[:SCOPE][:FORM]",
              help="The budget selector's target, replacing the schedule's: e.g. flops:2 (half the MACs), "
                   "params:1.43:compressed (30% fewer weights in the layers the schedule compresses), "
                   "latency:1.8 (1.8x faster, measured on this machine), latency:1.8:optimized (1.8x faster "
                   "once both are deployed through optimize_for_inference).")
@click.option("--quiet", is_flag=True, help="No progress bars or info logs.")
@_friendly
def compress(model_spec, weights, config_path, input_shape, out_dir, finetune_spec, distill_steps, distill_lr, resume,
             allow_changed_inputs, overwrite, calibration_path, calibration_batch_size, target, quiet) -> None:
    """Compress a model with a YAML schedule and save the result to OUT.

    The state is saved to OUT/checkpoints after every step (and its fine-tuning), so a killed or interrupted run
    continues when the same command is run again with --resume. OUT is locked while the run writes to it.
    Launched by torchrun, every rank computes (each on its share of the calibration batches, decomposing its share
    of the layers) and rank 0 writes OUT; --finetune then runs on every rank.
    """
    from . import distributed
    from .compressor import Compressor
    from .io import check_claims, claim_folder, output_lock, read_marker, save_compressed, unused_run_folder
    from .registry import default_registry
    from .run import checked_schedule

    if resume and overwrite:
        raise UsageProblem("--resume continues the run in OUT and --overwrite replaces it: give one of them")
    if allow_changed_inputs and not resume:
        raise UsageProblem("--allow-changed-inputs lets --resume continue a run with other inputs: add --resume")
    _check_distill_options(finetune_spec, distill_steps, distill_lr, calibration_path)
    if calibration_path is None and click.get_current_context().get_parameter_source(
            "calibration_batch_size") is not click.core.ParameterSource.DEFAULT:  # else silently without effect
        raise UsageProblem("--calibration-batch-size splits the --calibration inputs into batches: give "
                           "--calibration FILE")
    if str(config_path) == "-" and distributed.launched_for_several():  # only one process has the pipe
        raise UsageProblem("--config -: under torchrun every rank reads the schedule, and only one has stdin: give "
                           "the schedule's file")
    if finetune_spec == DISTILL and distributed.launched_for_several():  # before the group: a rank refusing
        # inside it would leave the others failing to connect to it (exit 1 instead of this error)
        raise UsageProblem("--finetune distill runs in one process; under torchrun, fine-tune with a "
                           "--finetune callable that wraps the model in DistributedDataParallel "
                           "(musco_core.distributed.rewrap) so the replicas stay equal")
    _setup_logging(quiet)
    with distributed.process_group_from_env() as group:  # launched by torchrun: every rank computes, rank 0 writes
        with _on_every_rank(group, "preparing the run"):  # each rank reads its own files
            finetune = (_import_callable(finetune_spec, "--finetune")
                        if finetune_spec and finetune_spec != DISTILL else None)
            model, example = _model_and_example(model_spec, weights, input_shape)
            calibration = _calibration_batches(calibration_path, calibration_batch_size)
            inputs = _run_inputs(calibration_path, calibration_batch_size, finetune_spec,
                                 distill_steps or DISTILL_STEPS, distill_lr or DISTILL_LR)
            if finetune_spec == DISTILL:
                _check_distill_inputs(model, calibration, calibration_path)
                finetune = _distiller(model, calibration, distill_steps or DISTILL_STEPS, distill_lr or DISTILL_LR,
                                      progress=not quiet)
            if group is not None and calibration is not None:  # each rank its share; the sums are all-reduced
                calibration = calibration[group.rank::group.world_size]
            registry = default_registry()
            config_path, document = _read_schedule(config_path)
            document = _with_target(document, target, config_path, registry, example is not None)
            checkpoints = out_dir / "checkpoints"
            if checkpoints.is_symlink():
                raise UsageProblem(f"--out {out_dir}: {checkpoints} is a symlink; musco-core keeps its states in a "
                                   f"folder of its own and never writes through a link: remove it, or choose another "
                                   f"--out")
            if resume and not out_dir.is_dir():
                raise UsageProblem(f"--out {out_dir}: no such folder; nothing to resume")
        with contextlib.ExitStack() as held:

            def lock_if_marked() -> bool:
                """Locks OUT when musco-core marked it, before its state is read: a writer may be committing there."""
                if read_marker(out_dir) is None:
                    return False
                held.enter_context(output_lock(out_dir))
                return True

            locked = resume and distributed.on_first_rank(group, f"--out {out_dir}", lock_if_marked)
            if resume and distributed.on_first_rank(group, f"--out {out_dir}", lambda: unused_run_folder(out_dir)):
                log.info("%s: the run that began here was stopped before it saved a step; starting it from step 0",
                         out_dir)
                resume = False
            if resume:
                compressor = Compressor.resume(model, checkpoints, example_input=example, progress=not quiet,
                                               calibration_data=calibration, registry=registry, inputs=inputs,
                                               allow_changed_inputs=allow_changed_inputs)
                codec = ScheduleCodec(registry)  # as a new run would begin with it: a layer under its canonical name
                with _on_every_rank(group, "the schedule to resume"):
                    begun = checked_schedule(model, document, config_path, registry)
                    if codec.unstructure(begun) != codec.unstructure(compressor.initial_schedule):
                        raise UsageProblem(f"--config {config_path}: is not the schedule the run in {out_dir} began "
                                           f"with (with --target, if one was given); resume with that schedule, or "
                                           f"start a new run with --overwrite")
            else:
                compressor = Compressor(model, model_compr_kwargs=checked_schedule(model, document, config_path,
                                                                                       registry),
                                            example_input=example, progress=not quiet,
                                            calibration_data=calibration, registry=registry, inputs=inputs)
            run_id = compressor.state.run_id
            # Resumed, OUT is the run's whose state its checkpoints hold: a marker lost in a copy (cp -r out/*) is
            # re-created, as --overwrite would (the checkpoints are the run's own already).
            adopt = resume and distributed.on_first_rank(group, f"--out {out_dir}",
                                                         lambda: read_marker(out_dir) is None)
            claims = [(out_dir, "output"), (checkpoints, "checkpoints")]
            distributed.on_first_rank(group, f"--out {out_dir}",  # before the lock creates OUT or writes into it
                                      lambda: check_claims(claims, run_id, overwrite=overwrite or adopt))

            def claim() -> None:
                if not locked:
                    held.enter_context(output_lock(out_dir))
                if adopt:
                    log.info("%s: re-creating its marker: its checkpoints hold the state of run %s", out_dir, run_id)
                for folder, kind in claims:
                    claim_folder(folder, kind, run_id, overwrite=overwrite or adopt)

            def save() -> None:
                with _writing("--out", out_dir, checkpoints, overwrite):
                    save_compressed(compressor, out_dir)

            distributed.on_first_rank(group, f"--out {out_dir}", claim)
            try:
                while not compressor.done:
                    compressor.compression_step()
                    if finetune is not None:
                        _call_finetune(finetune, finetune_spec, compressor, checkpoints, overwrite)
                    with _writing("--out", out_dir, checkpoints, overwrite):
                        compressor.save_state(checkpoints, overwrite=overwrite)
                distributed.on_first_rank(group, f"--out {out_dir}", save)
            except KeyboardInterrupt:
                raise Interrupted(_resume_hint(checkpoints, overwrite)) from None
        if group is None or group.first:
            click.echo(compressor.report().to_table())
            click.echo(f"\nsaved to {out_dir}")


@contextlib.contextmanager
def _on_every_rank(group, what: str):
    """The body's failure on any rank of a torchrun job raised on every rank, naming that rank and ``what``
    (:func:`musco_core.distributed.agreement`), a UsageProblem as a ConfigError: a rank refusing alone left the
    others failing on a dropped connection, reported as a bug in musco-core. The body must run no collective."""
    from . import distributed

    with distributed.agreement(group, what):
        try:
            yield
        except UsageProblem as exc:
            if group is None:
                raise
            raise ConfigError(exc.format_message()) from exc


#: The parts ``--target`` may add after METRIC:REDUCTION, by the budget key they set.
TARGET_OPTIONS = {"scope": ("model", "compressed"), "form": ("as_compressed", "optimized")}


def _read_schedule(path: Path) -> tuple[str, Any]:
    """The name errors give the schedule of ``--config path``, and its document: ``-`` is the one piped to stdin,
    ``<stdin>``."""
    return (STDIN, read_stdin_yaml()) if str(path) == "-" else (str(path), read_yaml(path))


def _with_target(document: Any, target: str | None, config_path: str, registry, has_example: bool) -> Any:
    """The schedule document with ``--target METRIC:REDUCTION[:SCOPE][:FORM]`` as the budget selector's target:
    its metric, reduction, scope and form replace the schedule's (an option left out takes its default); the
    budget's other settings (``min_rank_fraction``) stay as the schedule has them. The target's values, and the
    example input its metric needs (``has_example``: --input-shape given), are checked here, so that a bad one is
    blamed on --target, not on the schedule."""
    if target is None:
        return document
    parts = target.split(":")
    try:
        reduction = float(parts[1]) if len(parts) >= 2 else None
    except ValueError:
        reduction = None
    if reduction is None:
        raise UsageProblem(f"--target {target!r}: expected METRIC:REDUCTION[:SCOPE][:FORM], e.g. flops:2, "
                           f"params:1.43:compressed or latency:1.8:optimized")
    options: dict[str, str] = {}
    for part in parts[2:]:
        key = next((key for key, values in TARGET_OPTIONS.items() if part in values), None)
        if key is None or key in options:
            raise UsageProblem(f"--target {target!r}: {part!r} is not a scope ({', '.join(TARGET_OPTIONS['scope'])})"
                               f" or a form ({', '.join(TARGET_OPTIONS['form'])}), or gives one twice")
        options[key] = part
    budget = {"metric": parts[0], "reduction": reduction, **options}
    selector = registry.rank_selectors.entries.get("budget")
    try:
        params = None if selector is None else ScheduleCodec(registry).converter.structure(
            budget, selector.component.Params)
    except (cattrs.BaseValidationError, ValueProblem) as exc:
        raise UsageProblem("\n".join(f"--target {target!r}: {problem.removeprefix('$').lstrip('.: ')}"
                                      for problem in validation_problems(exc))) from None
    if params is not None and not has_example:
        component = selector.component()
        needs = ("counts the layers' MACs" if component.counts_macs(params) else
                 "times the model" if component.measures_latency(params) else None)
        if needs:
            raise UsageProblem(f"--target {target!r}: needs --input-shape: metric {parts[0]} {needs} on an example "
                               f"input of that shape")
    if not isinstance(document, dict) or "version" not in document:
        raise UsageProblem(f"--target: {config_path} must be a schedule with a version key to take a target")
    layers, settings = document.get("layers"), document.get("settings")
    algo_kwargs = settings.get("algo_kwargs") if isinstance(settings, dict) else None
    if not all(isinstance(section, (dict, type(None))) for section in (layers, settings, algo_kwargs)):
        return document  # `settings: []` is not an empty mapping to fill: the schedule's own check refuses it
    layers = layers or {}
    if not any(isinstance(layer, dict) and layer.get("rank_selection") == "budget" for layer in layers.values()):
        raise UsageProblem(f"--target sets the budget selector's target, but no layer of {config_path} uses "
                           f"rank_selection: budget")
    settings, algo_kwargs = dict(settings or {}), dict(algo_kwargs or {})
    kept = algo_kwargs.get("budget") if isinstance(algo_kwargs.get("budget"), dict) else {}
    kept = {key: value for key, value in kept.items() if key not in {"metric", "reduction", *TARGET_OPTIONS}}
    algo_kwargs["budget"] = {**kept, **budget}
    return {**document, "settings": {**settings, "algo_kwargs": algo_kwargs}}


def _check_distill_options(finetune_spec: str | None, steps: int | None, lr: float | None,
                           calibration_path: Path | None) -> None:
    """One line for a distillation option without ``--finetune distill``, or distillation without data."""
    if finetune_spec != DISTILL:
        given = [option for option, value in (("--distill-steps", steps), ("--distill-lr", lr)) if value is not None]
        if given:
            raise UsageProblem(f"{' and '.join(given)} set(s) the built-in distillation: add --finetune distill")
    elif calibration_path is None:
        raise UsageProblem("--finetune distill trains on the --calibration inputs: give --calibration FILE")


def _check_distill_inputs(model: nn.Module, batches: Batches, path: Path) -> None:
    """``--finetune distill``'s inputs checked before step 1, not after it: finite (integer ids and masks always
    are), and the model as loaded runs on the first batch to a finite output."""
    from .finetune import matched_output, run_model
    from .stats import describe_input

    tensors = [t for batch in batches for t in (batch.values() if isinstance(batch, Mapping) else (batch,))]
    bad = sum(int((~torch.isfinite(tensor)).sum()) for tensor in tensors)
    if bad:
        raise UsageProblem(f"--calibration {path}: {bad:,} of its {sum(t.numel() for t in tensors):,} values are not "
                           f"finite (NaN or inf); distillation needs finite model inputs")
    first = batches[0]
    try:
        with torch.no_grad():
            output = matched_output(run_model(model, first))
    except Exception as exc:  # noqa: BLE001 - the model's forward is the user's code
        raise UsageProblem(f"--calibration {path}: --model cannot run on its first batch "
                           f"({describe_input(first)}): "
                           f"{_exception_line(exc)}") from exc
    if not bool(torch.isfinite(output).all()):
        raise UsageProblem(f"--calibration {path}: the output of --model on its first batch is not finite; "
                           f"distillation needs finite outputs to reproduce")


def _distiller(teacher: nn.Module, batches: Batches, steps: int, lr: float, progress: bool):
    """``finetune(model, step)`` for ``--finetune distill``: :func:`~musco_core.finetune.distill` from the model as
    loaded. The student trains in eval mode (no dropout, BatchNorm statistics kept: a few hundred calibration inputs
    are too few to re-estimate them), so the run has no randomness and resuming repeats it exactly."""
    from .finetune import distill

    def finetune(student: nn.Module, step: int) -> None:
        distill(teacher, student, batches, steps, lr, train_mode=False, progress=progress)

    return finetune


def _resume_hint(checkpoints: Path, overwrite: bool = False) -> str:
    """Where an interrupted run can continue from: the state LATEST names, if any was saved. A run begun with
    ``--overwrite`` continues with --resume in its place (the two together are refused)."""
    from .io import latest_state

    try:
        step_dir, _ = latest_state(checkpoints)
    except MuscoError:
        return "no step was saved yet; run the command again to start over"
    instead = " instead of --overwrite" if overwrite else ""
    return f"the last complete state is {step_dir}; run the same command with --resume{instead} to continue"


def _call_finetune(finetune, spec: str, compressor, checkpoints: Path, overwrite: bool = False) -> None:
    """Runs the user's fine-tuning, which trains the model it is given in place; its failure is one line that says
    where the run can resume from. A returned module with parameters, none of them the model's (a trained copy), is
    refused: ignoring it would save the untrained model as if fine-tuned."""
    model = compressor.compressed_model
    try:
        returned = finetune(model, compressor.curr_iter)
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:  # the user's code ended the process: say so instead of exiting as if it succeeded
        raise UsageProblem(f"--finetune {spec} called sys.exit({short_repr(exc.code)}) after step "
                           f"{compressor.curr_iter}; {_resume_hint(checkpoints, overwrite)}") from exc
    except Exception as exc:  # the user's code: one line, and nothing of the step is saved
        if spec == DISTILL and not isinstance(exc, MuscoError):
            raise  # not the user's code: a bug in musco-core
        raise UsageProblem(f"--finetune {spec} failed after step {compressor.curr_iter}: {_exception_line(exc)}; "
                           f"{_resume_hint(checkpoints, overwrite)}") from exc
    held = {id(parameter) for parameter in model.parameters()}
    returned_ids = {id(parameter) for parameter in returned.parameters()} if isinstance(returned, nn.Module) else ()
    if returned_ids and held.isdisjoint(returned_ids):  # a loss module it returns, with no parameters, is fine
        raise UsageProblem(f"--finetune {spec} returned a {type(returned).__name__} that holds none of the parameters "
                           f"of the model it was given, after step {compressor.curr_iter}; train that model in place "
                           f"(what the function returns is not used); {_resume_hint(checkpoints, overwrite)}")


class Interrupted(UsageProblem):
    """Ctrl-C: nothing partial was saved; exit code 130 as shells expect."""

    exit_code = 130

    def format_message(self) -> str:
        return "interrupted; nothing partial was saved" + (f": {self.message}" if self.message else "")


@main.group(cls=MuscoGroup)
def config() -> None:
    """Generate and validate schedules."""


@config.command()
@MODEL
@WEIGHTS
@click.option("--type", "config_type", required=True,
              type=click.Choice(["vbmf", "param_reduction", "budget", "template", "none"]))
@INPUT_SHAPE
@_friendly
def generate(model_spec, weights, config_type, input_shape) -> None:
    """Print a default schedule for a model as YAML, with why each layer it leaves out is left out in a comment."""
    from .config import generate_model_compr_kwargs, generated_exclusions
    from .registry import default_registry
    from .stats import ModelStats

    registry = default_registry()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the schedule: what the user's code prints goes aside
        model, example = _model_and_example(model_spec, weights, input_shape)
        stats = ModelStats.from_model(model, registry, example)
    layers = generate_model_compr_kwargs(stats, config_type, registry=registry)
    settings = RunSettings()
    document = {"version": SCHEMA_VERSION,
                "settings": {"ft_every": settings.ft_every, "nglobal_compress_iters": settings.nglobal_compress_iters}}
    selector = registry.rank_selectors.entries.get(config_type)
    if selector is not None and selector.component.scope == "model":  # its target, to edit, in one place
        document["settings"]["algo_kwargs"] = {
            config_type: ScheduleCodec.unstructure_params(selector.component.Params())}
    reasons = generated_exclusions(stats, config_type, registry=registry)
    click.echo(yaml.safe_dump(document, sort_keys=False, default_flow_style=None)
               + _layers_yaml(layers, reasons, stats.in_model_order(dict.fromkeys([*layers, *reasons]))), nl=False)


def _layers_yaml(layers: dict[str, Any], reasons: dict[str, str], order: list[str]) -> str:
    """A schedule's ``layers:`` as YAML, in ``order``, with why each layer is left out as a comment: on the line of
    one set to null, or a line of its own for one the schedule does not name (it must not be replaced). YAML
    readers drop comments: they are for the person who edits the file."""
    lines = ["layers:" if layers else "layers: {}"]
    for name in order:
        why = f"left out: {' '.join(reasons[name].split())}" if name in reasons else None
        if name not in layers:
            lines.append(f"  # {yaml.safe_dump(name).splitlines()[0]}: {why}")
            continue
        value = layers[name]  # a layer's settings in flow style on its line, as the rest of the file has them
        entry = yaml.safe_dump({name: value}, sort_keys=False,
                               default_flow_style=None if isinstance(value, dict) else False).splitlines()
        if why is not None:
            entry[-1] += f"  # {why}"
        lines.extend(f"  {line}" for line in entry)
    return "\n".join(lines) + "\n"


@config.command()
@click.argument("schedule", type=NonEmptyPath(path_type=Path))
@click.option("--model", "model_spec", metavar="PKG.MODULE:FACTORY",
              help="Also check the layer names and kinds against this model.")
@_friendly
def validate(schedule, model_spec) -> None:
    """Check a YAML schedule (- reads it from stdin); exit code 0 when it is valid."""
    from .registry import default_registry
    from .run import checked_schedule

    registry = default_registry()
    schedule, document = _read_schedule(schedule)
    if model_spec:  # the file's own problems and the model's, reported together
        checked = checked_schedule(_load_model(model_spec, None), document, schedule, registry)
    else:
        checked = ScheduleCodec(registry).structure(document, schedule)
    click.echo(f"{schedule}: valid, {len(checked.compressed_layers())} layer(s) compressed "
               f"{checked.settings.nglobal_compress_iters} time(s)")


@main.command()
@click.argument("directory", type=NonEmptyPath(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly
def report(directory, as_json) -> None:
    """Show the report of a compressed model saved by `musco compress`."""
    from .io import REPORT, read_report

    stopped = _stopped_run(Path(directory))
    if stopped is not None:
        raise UsageProblem(stopped)
    saved = read_report(directory)
    try:
        text = saved.to_json() if as_json else saved.to_table()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # values of the wrong kind in the file
        raise UsageProblem(f"{Path(directory) / REPORT}: not a musco-core report: {_exception_line(exc)}") from exc
    click.echo(text)


def _stopped_run(directory: Path) -> str | None:
    """Why ``directory`` holds no report of its run, where ``musco compress`` began a run there that has not saved its
    final output (killed, or a failing --finetune), with the state to report or resume from; else None. A report
    there then is an earlier run's (one the new run replaces with --overwrite when it ends), not this run's."""
    from .io import MARKER, REPORT, STATE_FILE, latest_state, read_marker

    checkpoints = directory / "checkpoints"
    marker = read_marker(checkpoints) if checkpoints.is_dir() and not checkpoints.is_symlink() else None
    if marker is None or marker["kind"] != "checkpoints":
        return None
    report = directory / REPORT
    earlier = " (its report.json is an earlier run's)" if report.exists() else ""
    running = _writer(directory)
    try:
        step_dir, _ = latest_state(checkpoints)
    except MuscoError:  # a report written after the run claimed its checkpoints is its own (its states removed)
        if report.exists() and report.stat().st_mtime_ns > (checkpoints / MARKER).stat().st_mtime_ns:
            return None
        if running:
            return f"{directory}: the run there is still running ({running}) and saved no step yet{earlier}"
        return f"{directory}: the run begun there saved no step yet{earlier}: nothing to report; " \
               f"{_resume_hint(checkpoints)}"
    try:
        state = read_yaml(step_dir / STATE_FILE, "a musco-core run state")
    except MuscoError:
        return None  # damaged: --resume names the problem, and a report there is shown as it is
    taken, steps = (state.get("next_step"), state.get("steps")) if isinstance(state, Mapping) else (None, None)
    if not isinstance(taken, int) or not isinstance(steps, list) or taken >= len(steps):
        return None  # the run ended (its output is its final one), or a damaged state that --resume names
    if running:
        return (f"{directory}: the run there is still running ({running}): it saved step {taken} of {len(steps)} so "
                f"far{earlier}; `musco report {step_dir}` shows what it did up to that step")
    return (f"{directory}: the run there stopped after step {taken} of {len(steps)}, before it saved its final output"
            f"{earlier}; its last complete state is {step_dir}: `musco report {step_dir}` shows what it did so far, "
            f"and the same `musco compress` command with --resume continues it")


def _writer(directory: Path) -> str | None:
    """``pid N`` of the musco-core process that holds ``directory``'s lock (a run writing there now), else None;
    the lock file is only read, never created."""
    from .io import LOCK_FILE
    from .schedule import advisory_lock

    try:
        descriptor = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(descriptor, encoding="utf-8", errors="replace") as handle:
        with advisory_lock(descriptor) as alone:
            return None if alone else f"pid {handle.read(32).strip() or 'unknown'}"


CLASH_MARK = "<- name clash"


@main.command()
@click.option("--strict", is_flag=True, help="Fail when a plugin cannot be loaded.")
@_friendly
def plugins(strict) -> None:
    """List every registered component with the plugin and distribution that supplied it.

    Components whose name another plugin registered too are listed as well, marked, with a warning on stderr
    (compressing fails until one of the plugins is disabled through $MUSCO_DISABLE_PLUGINS).
    """
    from .plugins import DISABLE_ENV
    from .registry import shared_registry

    registry = shared_registry(strict=strict)
    clashing = {(clash.rejected.role, clash.rejected.name) for clash in registry.clashes}
    listed = registry.provided() + [clash.rejected for clash in registry.clashes]
    listed.sort(key=lambda p: ([role.title for role in registry.roles].index(p.role), p.name))
    rows: list[Any] = [("role", "name", "plugin", "distribution", "version")]
    rows += [(p.role, p.name, p.source.name, p.source.distribution, p.source.version,
              CLASH_MARK if (p.role, p.name) in clashing else "") for p in listed]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths + [0])).rstrip())
    for failure in registry.manager.failures:
        click.echo(f"broken plugin {failure.name!r} ({failure.distribution}): {one_line(failure.error)}")
    for clash in registry.clashes:
        click.echo(f"musco: warning: {clash.message}; compressing fails until one of them is disabled "
                   f"(${DISABLE_ENV}=plugin name)", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
