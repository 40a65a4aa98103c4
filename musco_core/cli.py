"""The ``musco`` command: compress a model from a YAML schedule, generate and check schedules, show reports
and plugins. Every failure is one line on stderr and a non-zero exit code, never a traceback."""
from __future__ import annotations

import functools
import importlib
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from torch import nn

from .errors import MuscoError, short_repr
from .schedule import SCHEMA_VERSION, RunSettings, ScheduleCodec, read_yaml

log = logging.getLogger("musco_core")


class UsageProblem(click.ClickException):
    """A problem with the user's arguments or files: printed as ``musco: error: ...``, exit code 2."""

    exit_code = 2

    def format_message(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(f"musco: error: {self.format_message()}", err=True)


def _friendly(command):
    """Turns library and file errors into one line and exit code 2."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (MuscoError, OSError, ValueError, TypeError) as exc:
            raise UsageProblem(str(exc)) from None
    return run


def _import_callable(spec: str, option: str):
    """``package.module:name`` -> the object. Only for names the user typed on the command line."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageProblem(f"{option} {spec!r}: expected package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed to import: say so in one line
        raise UsageProblem(f"{option} {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise UsageProblem(f"{option} {spec!r}: {module_name} has no callable {attribute!r}")
    return target


def _load_model(spec: str, weights: Path | None) -> nn.Module:
    model = _import_callable(spec, "--model")()
    if not isinstance(model, nn.Module):
        raise UsageProblem(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            if weights.suffix == ".safetensors":
                state = load_file(str(weights))
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageProblem(f"--weights {weights}: refused, not a plain tensor state dict "
                               f"(read with weights_only=True, nothing in it was run): {reason}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageProblem(f"--weights {weights}: does not fit the model: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _input_shape(text: str | None) -> torch.Tensor | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageProblem(f"--input-shape {text!r}: expected comma-separated positive ints, e.g. 1,3,224,224") \
            from None
    if not shape or min(shape) < 1:
        raise UsageProblem(f"--input-shape {text!r}: expected comma-separated positive ints, e.g. 1,3,224,224")
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _calibration_batches(path: Path | None, batch_size: int) -> list[torch.Tensor] | None:
    """The one tensor of a safetensors file, split along its first axis into batches of ``batch_size``."""
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise UsageProblem(f"--calibration {path}: not a safetensors file: {exc}") from None
    if len(tensors) != 1:
        raise UsageProblem(f"--calibration {path}: expected one tensor of model inputs, found {len(tensors)} "
                           f"({', '.join(sorted(tensors)) or 'none'})")
    (inputs,) = tensors.values()
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise UsageProblem(f"--calibration {path}: the tensor of shape {tuple(inputs.shape)} holds no inputs")
    return list(inputs.split(batch_size))


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)


MODEL = click.option("--model", "model_spec", required=True, metavar="PKG.MODULE:FACTORY",
                     help="A callable that returns the uncompressed torch.nn.Module.")
WEIGHTS = click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                       help="Weights to load first: .safetensors, or a state dict read with "
                            "torch.load(weights_only=True).")
INPUT_SHAPE = click.option("--input-shape", metavar="N,C,H,W",
                           help="Shape of a random example input, for MAC counts and the no-growth check.")


@click.group()
@click.version_option(package_name="musco-core")
def main() -> None:
    """Multi-stage low-rank compression of PyTorch models."""


@main.command()
@MODEL
@WEIGHTS
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="YAML schedule.")
@INPUT_SHAPE
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for model.safetensors, musco.yaml, report.json and checkpoints/.")
@click.option("--finetune", "finetune_spec", metavar="PKG.MODULE:FUNCTION",
              help="Called as FUNCTION(model, step) after every compression step.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT from OUT/checkpoints.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in an OUT that holds another run's output (files musco-core did not write are "
                   "never deleted).")
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration inputs for data-aware decompositions (whitened_svd): a .safetensors file with one "
                   "tensor, split into batches along its first axis.")
@click.option("--calibration-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Inputs per calibration batch.")
@click.option("--target", "target", metavar="METRIC:REDUCTION[:SCOPE]",
              help="The budget selector's target, replacing the schedule's: e.g. flops:2 (half the MACs), "
                   "params:1.43:compressed (30% fewer weights in the layers the schedule compresses).")
@click.option("--quiet", is_flag=True, help="No progress bars or info logs.")
@_friendly
def compress(model_spec, weights, config_path, input_shape, out_dir, finetune_spec, resume, overwrite,
             calibration_path, calibration_batch_size, target, quiet) -> None:
    """Compress a model with a YAML schedule and save the result to OUT.

    The state is saved to OUT/checkpoints after every step (and its fine-tuning), so a killed or interrupted run
    continues when the same command is run again with --resume. OUT is locked while the run writes to it.
    """
    from .compressor import Compressor
    from .io import claim_folder, output_lock, save_compressed
    from .registry import default_registry
    from .run import checked_schedule

    if resume and overwrite:
        raise UsageProblem("--resume continues the run in OUT and --overwrite replaces it: give one of them")
    _setup_logging(quiet)
    finetune = _import_callable(finetune_spec, "--finetune") if finetune_spec else None
    model, example = _load_model(model_spec, weights), _input_shape(input_shape)
    calibration = _calibration_batches(calibration_path, calibration_batch_size)
    registry = default_registry()
    document = _with_target(read_yaml(config_path), target, config_path)
    checkpoints = out_dir / "checkpoints"
    with output_lock(out_dir):
        if resume:
            compressor = Compressor.resume(model, checkpoints, example_input=example, progress=not quiet,
                                           calibration_data=calibration, registry=registry)
            codec = ScheduleCodec(registry)
            if codec.unstructure(codec.structure(document, str(config_path))) != codec.unstructure(
                    compressor.initial_schedule):
                raise UsageProblem(f"--config {config_path}: is not the schedule the run in {out_dir} began with "
                                   f"(with --target, if one was given); resume with that schedule, or start a new "
                                   f"run with --overwrite")
        else:
            compressor = Compressor(model, model_compr_kwargs=checked_schedule(model, document, str(config_path),
                                                                               registry),
                                    example_input=example, progress=not quiet, calibration_data=calibration,
                                    registry=registry)
        run_id = compressor.state.run_id
        claim_folder(out_dir, "output", run_id, overwrite=overwrite)
        claim_folder(checkpoints, "checkpoints", run_id, overwrite=overwrite)
        try:
            while not compressor.done:
                compressor.compression_step()
                if finetune is not None:
                    _call_finetune(finetune, finetune_spec, compressor, checkpoints)
                compressor.save_state(checkpoints, overwrite=overwrite)
        except KeyboardInterrupt:
            raise Interrupted(_resume_hint(checkpoints)) from None
        save_compressed(compressor, out_dir)
    click.echo(compressor.report().to_table())
    click.echo(f"\nsaved to {out_dir}")


def _with_target(document: Any, target: str | None, config_path: Path) -> Any:
    """The schedule document with ``--target METRIC:REDUCTION[:SCOPE]`` as the budget selector's target."""
    if target is None:
        return document
    parts = target.split(":")
    try:
        reduction = float(parts[1]) if len(parts) in (2, 3) else None
    except ValueError:
        reduction = None
    if reduction is None:
        raise UsageProblem(f"--target {target!r}: expected METRIC:REDUCTION[:SCOPE], e.g. flops:2 or "
                           f"params:1.43:compressed")
    if not isinstance(document, dict) or "version" not in document:
        raise UsageProblem(f"--target: {config_path} must be a schedule with a version key to take a target")
    layers = document.get("layers") or {}
    if not any(isinstance(layer, dict) and layer.get("rank_selection") == "budget" for layer in layers.values()):
        raise UsageProblem(f"--target sets the budget selector's target, but no layer of {config_path} uses "
                           f"rank_selection: budget")
    budget = {"metric": parts[0], "reduction": reduction, **({"scope": parts[2]} if len(parts) == 3 else {})}
    settings = dict(document.get("settings") or {})
    settings["algo_kwargs"] = {**(settings.get("algo_kwargs") or {}), "budget": budget}
    return {**document, "settings": settings}


def _resume_hint(checkpoints: Path) -> str:
    """Where an interrupted run can continue from: the state LATEST names, if any was saved."""
    from .io import latest_state

    try:
        step_dir, _ = latest_state(checkpoints)
    except MuscoError:
        return "no step was saved yet; run the command again to start over"
    return f"the last complete state is {step_dir}; run the same command with --resume to continue"


def _call_finetune(finetune, spec: str, compressor, checkpoints: Path) -> None:
    """Runs the user's fine-tuning; its failure is one line that says where the run can resume from."""
    try:
        finetune(compressor.compressed_model, compressor.curr_iter)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # the user's code: one line, and nothing of the step is saved
        raise UsageProblem(f"--finetune {spec} failed after step {compressor.curr_iter}: {type(exc).__name__}: "
                           f"{short_repr(str(exc))}; {_resume_hint(checkpoints)}") from None


class Interrupted(UsageProblem):
    """Ctrl-C: nothing partial was saved; exit code 130 as shells expect."""

    exit_code = 130

    def format_message(self) -> str:
        return f"interrupted; nothing partial was saved: {self.message}"


@main.group()
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
    """Print a default schedule for a model as YAML."""
    from .config import generate_model_compr_kwargs
    from .registry import default_registry
    from .stats import ModelStats

    registry = default_registry()
    stats = ModelStats.from_model(_load_model(model_spec, weights), registry, _input_shape(input_shape))
    layers = generate_model_compr_kwargs(stats, config_type, registry=registry)
    settings = RunSettings()
    document = {"version": SCHEMA_VERSION,
                "settings": {"ft_every": settings.ft_every, "nglobal_compress_iters": settings.nglobal_compress_iters},
                "layers": layers}
    selector = registry.rank_selectors.entries.get(config_type)
    if selector is not None and selector.component.scope == "model":  # its target, to edit, in one place
        document["settings"]["algo_kwargs"] = {
            config_type: ScheduleCodec.unstructure_params(selector.component.Params())}
    click.echo(yaml.safe_dump(document, sort_keys=False, default_flow_style=None), nl=False)


@config.command()
@click.argument("schedule", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", metavar="PKG.MODULE:FACTORY",
              help="Also check the layer names and kinds against this model.")
@_friendly
def validate(schedule, model_spec) -> None:
    """Check a YAML schedule; exit code 0 when it is valid."""
    from .registry import default_registry
    from .run import checked_schedule

    registry = default_registry()
    if model_spec:  # the file's own problems and the model's, reported together
        checked = checked_schedule(_load_model(model_spec, None), read_yaml(schedule), str(schedule), registry)
    else:
        checked = ScheduleCodec(registry).structure(read_yaml(schedule), str(schedule))
    click.echo(f"{schedule}: valid, {len(checked.compressed_layers())} layer(s) compressed "
               f"{checked.settings.nglobal_compress_iters} time(s)")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly
def report(directory, as_json) -> None:
    """Show the report of a compressed model saved by `musco compress`."""
    from .io import read_report

    saved = read_report(directory)
    click.echo(saved.to_json() if as_json else saved.to_table())


@main.command()
@click.option("--strict", is_flag=True, help="Fail when a plugin cannot be loaded.")
@_friendly
def plugins(strict) -> None:
    """List every registered component with the plugin and distribution that supplied it."""
    from .registry import default_registry

    registry = default_registry(strict=strict)
    rows: list[Any] = [("role", "name", "plugin", "distribution", "version")]
    rows += [(p.role, p.name, p.source.name, p.source.distribution, p.source.version) for p in registry.provided()]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for failure in registry.manager.failures:
        click.echo(f"broken plugin {failure.name!r} ({failure.distribution}): {failure.error}")


if __name__ == "__main__":  # pragma: no cover
    main()
