"""Saving and loading compressed models and run states, without pickle and without ever losing the user's files.

A saved model is a folder, its *output set*:

* ``model.safetensors``: every tensor of the state dict;
* ``musco.yaml``: the factorized structure (each layer's geometry, decomposition, ranks and factor layouts), the
  resolved schedule with the concrete ranks of every layer, and the versions of musco-core and of the plugins
  that supplied the components;
* ``report.json``: the compression report, when a Compressor is saved.

A run's states go to a checkpoint folder: ``step-NNNN/`` holds an output set and ``state.yaml`` (the
:class:`~musco_core.state.RunState`), and ``LATEST`` names the newest complete one.

Safety rules:

* Every folder musco-core creates carries a marker file (``.musco-core``) naming the run that wrote it, and every
  file of an output set carries the set's id. Only what musco-core wrote is ever deleted or replaced; a folder that
  holds another run's files (or files musco-core did not write) is refused unless ``overwrite=True``, and even then
  a file of the user's where musco-core writes its own is refused (:func:`check_claims`).
* An output set is replaced as a whole: the new set is written and synced in a staging folder, a journal records
  the commit, then the files are renamed into place. A reader checks that the weights and the manifest carry the
  same set id, so it never uses a mix; a save that fails (disk full) or is killed leaves the old set in place, and
  the next save or load finishes an interrupted commit and removes dead staging folders.
* A state folder is written under a staging name and renamed in whole; ``LATEST`` is replaced atomically after it
  (a run killed in between resumes from its newest complete state folder).

Loading reads YAML safely (bounded, see :func:`musco_core.schedule.read_yaml`) and tensors with safetensors; every
declared shape is checked against the safetensors header before anything is allocated; nothing named in a file is
imported or executed: component names are only looked up among the installed plugins.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
import torch
import yaml
from cattrs.gen import make_dict_structure_fn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ._version import __version__
from .components import Factor, FactorLayout, LayerSpec
from .errors import ConfigError, short_repr
from .registry import Registry, default_registry
from .report import CompressionReport
from .schedule import (MAX_JSON_BYTES, SCHEMA_VERSION, PositiveInt, ValueProblem, advisory_lock, fsync_dir,
                       make_converter, plain_data, read_text_bounded, read_yaml, validation_problems,
                       write_text_atomic)
from .state import RunState, StateCodec
from .surgery import (FactorizedLayer, build_on_meta, carry_training_state, clear_broken_ties, deep_copy,
                      factor_mismatch, module_paths, on_meta, replace_module, state_problem, unwrapped,
                      why_not_replaceable)

log = logging.getLogger(__name__)

MANIFEST = "musco.yaml"
WEIGHTS = "model.safetensors"
REPORT = "report.json"
STATE_FILE = "state.yaml"
LATEST_FILE = "LATEST"
MARKER = ".musco-core"
JOURNAL = ".musco-commit"
LOCK_FILE = ".musco-lock"
MANIFEST_FORMAT = 1
#: Metadata key of the weights file that ties it to its manifest.
SET_ID_KEY = "musco_set_id"
STEP_NAME = re.compile(r"step-[0-9]{4,9}(-[0-9a-f]{8})?")
#: The files of an output set; musco-core wrote such a file when it carries a set id.
SET_FILES = (WEIGHTS, MANIFEST, REPORT)
#: Everything musco-core writes inside a step or staging folder; anything else there is the user's.
OWN_FILES = (*SET_FILES, STATE_FILE, MARKER)
#: The temporary name :func:`~musco_core.schedule.write_text_atomic` writes a file under before renaming it, with
#: the pid of the process writing it and, since it is a new file each time, a random suffix (older versions wrote
#: none).
OWN_TEMPORARY = re.compile(r"\.(.+)\.tmp-([1-9][0-9]{0,9})(?:-[0-9a-f]{8})?")
#: The files musco-core writes with :func:`~musco_core.schedule.write_text_atomic` in an output or checkpoint folder.
ATOMIC_FILES = (MARKER, JOURNAL, LATEST_FILE)
#: The name of a staging folder (:func:`_new_staging`), with the pid of the process writing it.
STAGING_NAME = re.compile(r"\..+\.staging-([0-9]+)-[0-9a-f]{8}")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# -- markers: which folders musco-core wrote, and for which run --------------------------------------------------
def tied_value_conflicts(names: Iterable[Sequence[str]], values: Mapping[str, torch.Tensor], where: str
                         ) -> list[str]:
    """For each tensor the model holds under several ``names`` (a head tied to its embedding), a line for each of
    its names whose value in ``values`` differs from that of its first name there: the model holds one tensor, and
    loading would keep one of the values silently. Names ``values`` lacks are skipped; ``where`` names the file."""
    lines = []
    for group in names:
        held = [name for name in group if name in values]
        lines += [f"{held[0]!r} and {name!r} are one tensor in the model, different values in {where}"
                  for name in held[1:] if not torch.equal(values[held[0]], values[name])]
    return lines


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder musco-core wrote, or None (no marker, or one it cannot read: then not ours)."""
    path = folder / MARKER
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 4096:
            return None
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or data.get("created_by") != "musco-core" or not isinstance(data.get("kind"), str):
        return None
    return data


def written_here(marker: Mapping[str, Any]) -> bool:
    """Whether a marker was written on this host (one written before markers named their host counts as this
    host's): its pid means something only here, and on a folder several hosts share (NFS) another host's live
    writer would look dead to :func:`pid_alive`."""
    return marker.get("host", socket.gethostname()) == socket.gethostname()


def write_marker(folder: Path, kind: str, run_id: str | None) -> None:
    """Marks ``folder`` as musco-core's ``kind`` folder of the run ``run_id``, written by this process on this host
    (:func:`read_marker` reads it back; the pid and host let a later run tell a killed writer's folder)."""
    write_text_atomic(folder / MARKER, yaml.safe_dump({"created_by": "musco-core", "kind": kind, "run_id": run_id,
                                                       "pid": os.getpid(), "host": socket.gethostname()},
                                                      sort_keys=False))


def claim_folder(folder: str | os.PathLike, kind: str, run_id: str | None, *, overwrite: bool = False) -> Path:
    """Makes ``folder`` this run's ``kind`` folder (``output`` or ``checkpoints``), creating it if needed, once
    :func:`check_claims` allows it (see there)."""
    folder = Path(folder)
    check_claims([(folder, kind)], run_id, overwrite=overwrite)
    marker = read_marker(folder) if folder.is_dir() else None
    if folder.is_dir():
        _remove_dead_temporaries(folder)
    if marker is not None and marker["kind"] == kind and marker.get("run_id") == run_id:
        return folder
    if marker is not None:
        log.info("%s: now the %s folder of run %s (it was the %s folder of run %s)", folder, kind, run_id,
                 marker["kind"], marker.get("run_id"))
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, kind, run_id)
    fsync_dir(folder)
    fsync_dir(folder.parent)
    return folder


def check_claims(claims: Sequence[tuple[str | os.PathLike, str]], run_id: str | None, *,
                 overwrite: bool = False) -> None:
    """One ConfigError for every ``(folder, kind)`` the run ``run_id`` may not write into; nothing is written.

    A folder is free when it is missing or empty, this run's, or claimed by a run that saved nothing there
    (:func:`unused_run_folder`). A folder of another run, or one with files musco-core did not write, is refused
    unless ``overwrite``; one of another kind (a run's checkpoints or one of its states for an output) is refused even
    then: a new marker would orphan what is there, the run's last state. Even then musco-core never replaces a file
    it did not write: a file of the user's, or a symlink, where musco-core writes its own files is refused, all of
    them listed in one line.
    """
    problems, refused, in_the_way = [], [], []
    for folder, kind in claims:
        folder = Path(folder)
        if any(folder.is_relative_to(outer) for outer in refused):
            continue  # inside a folder refused already: one line says it
        problem = _claim_problem(folder, kind, run_id, overwrite)
        if problem:
            problems.append(problem)
            refused.append(folder)
        elif folder.is_dir():
            in_the_way += _in_the_way(folder, kind)
    if in_the_way:
        problems.append(f"{', '.join(in_the_way)}: in the way of the files musco-core writes, and not written by it; "
                        f"it never replaces what it did not write (not even with --overwrite): move them, or choose "
                        f"another folder")
    if problems:
        raise ConfigError("\n".join(problems))


def _claim_problem(folder: Path, kind: str, run_id: str | None, overwrite: bool) -> str | None:
    """Why the run ``run_id`` may not make ``folder`` its ``kind`` folder, or None."""
    if folder.is_symlink() and not folder.exists():
        return (f"{folder}: is a symlink to {os.readlink(folder)}, which does not exist; expected a folder for the "
                f"{kind}")
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{folder}: is a file; expected a folder for the {kind}"
    marker = read_marker(folder)
    if marker is not None and marker["kind"] == kind and marker.get("run_id") == run_id or unused_run_folder(folder):
        return None
    if marker is not None and marker["kind"] != kind:  # a new marker would orphan what is there (a run's last state)
        whose, theirs = ("this run", "its") if marker.get("run_id") == run_id else ("another musco-core run", "a run's")
        return (f"{folder}: holds the {marker['kind']} of {whose}, not {theirs} {kind}; choose another folder for "
                f"the {kind} (not even overwrite=True writes one kind over the other)")
    if overwrite:
        return None
    if marker is not None:
        return (f"{folder}: holds the {marker['kind']} of another musco-core run; resume that run, choose another "
                f"folder, or pass overwrite=True (--overwrite) to replace what that run wrote")
    if folder.is_symlink():  # empty or not: its target is not a folder the user named
        return (f"{folder}: is a symlink to {os.readlink(folder)}; choose another folder, or pass overwrite=True "
                f"(--overwrite) to write into the folder it points to (nothing of yours is replaced or deleted)")
    return (f"{folder}: is not empty and was not written by musco-core; choose another folder, or pass "
            f"overwrite=True (--overwrite) to write into it (nothing of yours is replaced or deleted)")


def _in_the_way(folder: Path, kind: str) -> list[str]:
    """The entries of ``folder`` where musco-core writes its own files in a ``kind`` folder that it did not write:
    the user's files, and symlinks (which it never writes through)."""
    marked = read_marker(folder) is not None
    found = []
    for name in (*SET_FILES, MARKER) if kind == "output" else (LATEST_FILE, MARKER):
        path = folder / name
        if path.is_symlink():
            found.append(f"{path} (a symlink)")
        elif path.exists() and not (_set_id_of(path) is not None if name in SET_FILES else marked):
            found.append(str(path))
    return found


def unused_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was claimed by a musco-core run that saved nothing in it, so a new run may take it over and
    resuming it starts the run over: it holds only musco-core's bookkeeping, that is the lock and the temporary files
    of dead processes (:func:`dead_temporary`), and, where it carries a marker, its marker, staging folders of dead
    processes and folders that hold nothing else themselves. A folder without a marker (or an empty one) is unused
    when it holds nothing but the lock and dead temporary files: a run killed before it wrote its marker."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    marked = read_marker(folder) is not None
    for child in folder.iterdir():
        if child.name == LOCK_FILE or dead_temporary(child) or marked and child.name == MARKER:
            continue
        if not marked or child.is_symlink() or not child.is_dir():
            return False
        marker = read_marker(child)
        if not (marker is not None and marker["kind"] == "staging" and written_here(marker)
                and not pid_alive(marker.get("pid")) or unused_run_folder(child)):
            return False
    return True


def dead_temporary(path: Path) -> bool:
    """Whether ``path`` is the temporary file of a marker, journal or LATEST that a killed process left: that exact
    name (:data:`OWN_TEMPORARY` of one of :data:`ATOMIC_FILES`), a regular file, and the pid in it no longer runs."""
    named = OWN_TEMPORARY.fullmatch(path.name)
    return (named is not None and named[1] in ATOMIC_FILES and path.is_file() and not path.is_symlink()
            and not pid_alive(int(named[2])))


def _remove_dead_temporaries(folder: Path) -> None:
    """Removes the temporary files killed processes left directly inside ``folder`` (:func:`dead_temporary`)."""
    for child in folder.iterdir():
        if dead_temporary(child):
            child.unlink(missing_ok=True)


def pid_alive(pid: Any) -> bool:
    """Whether ``pid`` (as a marker or a temporary file's name holds it) is a process running on this host; an
    invalid pid is not. A process of another user counts as running."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a number no pid can be
        return False
    except PermissionError:
        return True
    return True


def _written_here(child: Path) -> bool:
    """Whether ``child`` of a step or staging folder is a file musco-core writes there (or the temporary file of
    one, left by a killed write)."""
    temporary = OWN_TEMPORARY.fullmatch(child.name)
    return (child.name in OWN_FILES or temporary is not None and temporary[1] in OWN_FILES) and (
        child.is_file() and not child.is_symlink())


def _remove_ours(folder: Path) -> None:
    """Removes a step or staging folder musco-core wrote: the files it writes there, its marker last, so that a
    removal cut short leaves it still marked (and removed by the next save) rather than an unmarked folder nobody
    may delete. Anything else in it is the user's: it is kept, and so is the folder, no longer marked."""
    kept = []
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if _written_here(child):
            child.unlink(missing_ok=True)
        else:
            kept.append(child.name)
    (folder / MARKER).unlink(missing_ok=True)
    if kept:
        log.info("%s: kept, it holds files musco-core did not write: %s", folder, ", ".join(sorted(kept)))
        return
    with contextlib.suppress(OSError):
        folder.rmdir()


def _remove_dead_staging(folder: Path) -> None:
    """Removes staging folders of dead musco-core processes directly inside ``folder``: by their name, which only
    :func:`_new_staging` gives and which holds the writer's pid, since a process killed right after creating one
    leaves it without its marker (and one killed just before its rename, marked as the state it was to become).
    One whose marker names another host is kept: that pid is not this host's. Only musco-core's own files go
    (:func:`_remove_ours`)."""
    for child in folder.iterdir():
        named = STAGING_NAME.fullmatch(child.name)
        if named is None or not child.is_dir() or child.is_symlink() or pid_alive(int(named[1])):
            continue
        marker = read_marker(child)
        if marker is None or marker["kind"] in ("staging", "state") and written_here(marker):
            _remove_ours(child)


# -- durable writes -------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def folder_lock(directory: Path, *, wait: bool = False) -> Iterator[bool]:
    """Holds an advisory lock on the folder itself (no file is added to it) while musco-core changes what it wrote
    there: a state saved and older states removed, an output set committed; and on a blockwise run's work folder
    while the run lives, so that no later run removes it (:mod:`musco_core.blockwise`). Yields False, holding
    nothing, where another process holds it (or, with ``wait``, waits for it): two processes saving states of one
    run into one folder at once would each remove the other's newest state, and a reader finishing a commit (its
    journal) while the writer does would fail the writer's save. Unguarded where folders cannot be locked (see
    :func:`~musco_core.schedule.advisory_lock`: NFS locks need a file open for writing)."""
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with advisory_lock(descriptor, wait=wait) as alone:
            yield alone
    finally:
        os.close(descriptor)


def _new_staging(parent: Path, prefix: str, run_id: str | None) -> Path:
    """Creates a marked staging folder; removed again if its marker cannot be written (a full disk)."""
    staging = parent / f".{prefix}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write_marker(staging, "staging", run_id)
    except BaseException:
        _remove_ours(staging)
        raise
    return staging


# -- the manifest ---------------------------------------------------------------------------------------------
@attrs.frozen
class LayerRecord:
    """How one layer was factorized, enough to rebuild its modules before the weights are loaded."""

    decomposition: str
    ranks: tuple[PositiveInt, ...]
    spec: LayerSpec
    factors: list[FactorLayout]


@attrs.frozen
class _Manifest:
    """The typed fields of ``musco.yaml``."""

    format: int
    musco_core_version: str
    components: dict[str, dict[str, str]]
    layers: dict[str, LayerRecord]
    schedule: dict
    set_id: str | None = None


def _spec_problem(spec: LayerSpec) -> str | None:
    dims = len(spec.kernel_size)
    if not spec.adapter:
        return "adapter: expected a name"
    if min(spec.out_channels, spec.in_channels, spec.groups) < 1:
        return "expected positive out_channels, in_channels and groups"
    if spec.out_channels % spec.groups or spec.in_channels % spec.groups:
        return f"groups {spec.groups} does not divide {spec.in_channels} -> {spec.out_channels} channels"
    if dims > 3 or len(spec.stride) != dims or len(spec.dilation) != dims:
        return "expected kernel_size, stride and dilation of one length (0 to 3 spatial axes)"
    if isinstance(spec.padding, str) and spec.padding not in ("same", "valid") or (
            not isinstance(spec.padding, str) and (len(spec.padding) != dims or min(spec.padding, default=0) < 0)):
        return f"padding: expected 'same', 'valid' or {dims} non-negative ints, got {short_repr(spec.padding)}"
    if min((*spec.kernel_size, *spec.stride, *spec.dilation), default=1) < 1:
        return "expected positive kernel sizes, strides and dilations"
    if spec.padding_mode not in PADDING_MODES:
        return f"padding_mode: expected one of {', '.join(PADDING_MODES)}, got {short_repr(spec.padding_mode)}"
    return None


def _record_problem(record: LayerRecord) -> str | None:
    """What makes the record's chain of factors not a valid factorization of its layer, or None."""
    spec = record.spec
    problem = _spec_problem(spec)
    if problem:
        return f"spec: {problem}"
    if not record.ranks or not record.factors:
        return "expected ranks and at least one factor"
    owners = []
    for index, layout in enumerate(record.factors):
        if min(layout.out_channels, layout.in_channels, layout.groups) < 1 or (
                layout.out_channels % layout.groups or layout.in_channels % layout.groups):
            return f"factors[{index}]: expected positive channels divisible by groups"
        if len(layout.kernel_size) != spec.spatial_dims or min(layout.kernel_size, default=1) < 1 or any(
                size not in (1, spec.kernel_size[axis]) for axis, size in enumerate(layout.kernel_size)):
            return f"factors[{index}].kernel_size: {list(layout.kernel_size)} does not fit the layer's kernel"
        if not set(layout.axes) <= set(range(spec.spatial_dims)):
            return f"factors[{index}].axes: {list(layout.axes)} are not axes of the layer"
        owners += layout.axes
    if sorted(owners) != list(range(spec.spatial_dims)):
        return "factors: every spatial axis must be owned by exactly one factor"
    chain = [spec.in_channels] + [value for layout in record.factors
                                  for value in (layout.in_channels, layout.out_channels)] + [spec.out_channels]
    if any(chain[i] != chain[i + 1] for i in range(0, len(chain), 2)):
        return "factors: the channels of consecutive factors do not connect the layer's input to its output"
    if sum(layout.bias for layout in record.factors) != spec.has_bias:
        return "factors: exactly one factor carries the bias when the layer has one, none otherwise"
    return None


def _manifest_converter() -> cattrs.Converter:
    converter = make_converter()
    converter.register_structure_hook(
        tuple[int, ...] | str, lambda value, _: value if isinstance(value, str) else
        converter.structure(value, tuple[int, ...]))
    base = make_dict_structure_fn(LayerRecord, converter, _cattrs_forbid_extra_keys=True)

    def record(value: Any, _type=None) -> LayerRecord:
        structured = base(value, LayerRecord)
        problem = _record_problem(structured)
        if problem:
            raise ValueProblem(problem)
        return structured

    converter.register_structure_hook(LayerRecord, record)
    return converter


def read_manifest(directory: str | os.PathLike) -> dict[str, LayerRecord]:
    """The factorized structure recorded in ``directory/musco.yaml``, checked field by field."""
    return _read_manifest(Path(directory))[0]


def _read_manifest(directory: Path) -> tuple[dict[str, LayerRecord], str | None]:
    path = directory / MANIFEST
    data = read_yaml(path, "a musco-core model manifest")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: not a musco-core model manifest of format {MANIFEST_FORMAT}")
    try:
        manifest = _manifest_converter().structure(data, _Manifest)
    except (cattrs.BaseValidationError, ValueProblem) as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in validation_problems(exc))) from None
    return manifest.layers, manifest.set_id


# -- writing output sets ----------------------------------------------------------------------------------------
def _factorized_layers(model: nn.Module) -> dict[str, FactorizedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FactorizedLayer)}


def check_saveable(model: nn.Module, registry: Registry, state: RunState | None = None) -> None:
    """One ConfigError, before anything is written, unless :func:`load_compressed` can rebuild the output set of
    ``model`` (and, with the run's ``state``, the layers the run compressed are the factorized layers it left).

    Every factorized layer must hold the factors its layouts describe (the modules its adapter builds from them,
    with their state-dict keys and shapes), and sit inside the model; with ``state``, the model must have each
    layer the run compressed factorized at the run's ranks: a layer ``standardize_model`` made plain is saved as
    the weights of a plain layer, which no manifest entry rebuilds.
    """
    layers = _factorized_layers(model)
    compressed = {} if state is None else {name: ranks for name, ranks in state.ranks.items() if ranks is not None}
    if not layers and (state is None or compressed):
        raise ConfigError("the model has no factorized layers to save (was standardize_model called already?); "
                          "save before standardize_model")
    problems = [problem] if (problem := state_problem(model)) is not None else []
    if "" in layers:
        problems.append("the model itself is a factorized layer, which load_compressed cannot rebuild: save a model "
                        "that holds it")
    modules = dict(model.named_modules())
    for name, ranks in compressed.items():
        module = modules.get(name)
        if not isinstance(module, FactorizedLayer):
            now = "no such layer" if module is None else f"a {type(module).__qualname__}"
            hint = " (was standardize_model called already?)" if type(module) is nn.Sequential else ""
            problems.append(f"layer {name!r}: the run compressed it to ranks {ranks}, the model has {now} there{hint}")
        elif module.ranks != ranks:
            problems.append(f"layer {name!r}: the run compressed it to ranks {ranks}, the model has it at ranks "
                            f"{module.ranks}")
    problems += [f"layer {name!r}: {reason}" for name, layer in layers.items() if name
                 if (reason := factor_mismatch(layer, registry.adapters.get(layer.spec.adapter))) is not None]
    if problems:
        raise ConfigError("cannot save a set that would not load back:\n" + "\n".join(problems))


def _provenance(registry: Registry, role: str, name: str) -> dict[str, str]:
    source = registry.source_of(role, name)
    if source is None:
        return {"plugin": "unknown", "distribution": "unknown", "version": "unknown"}
    return {"plugin": source.name, "distribution": source.distribution, "version": source.version}


def _write_set_files(folder: Path, model: nn.Module, registry: Registry, report: CompressionReport | None,
                     set_id: str) -> list[str]:
    """Writes the output set of ``model`` into ``folder`` (a fresh staging folder) and syncs it; the files' names."""
    layers = {name: LayerRecord(m.decomposition, m.ranks, m.spec, list(m.layouts))
              for name, m in _factorized_layers(model).items()}
    return _write_set(folder, layers, lambda path, metadata: save_model(model, str(path), metadata=metadata),
                      registry, report, set_id)


def _write_set(folder: Path, layers: Mapping[str, LayerRecord], write_weights: Callable[[Path, dict[str, str]], None],
               registry: Registry, report: CompressionReport | None, set_id: str) -> list[str]:
    """Writes an output set into ``folder`` (a fresh staging folder), its weights by ``write_weights(path,
    metadata)``, and syncs it; the files' names."""
    converter = _manifest_converter()
    records = {name: converter.unstructure(record) for name, record in layers.items()}
    components = {(role, name) for record in layers.values()
                  for role, name in (("decomposition", record.decomposition), ("layer adapter", record.spec.adapter))}
    manifest = {
        "format": MANIFEST_FORMAT,
        "musco_core_version": __version__,
        "set_id": set_id,
        "components": {f"{role}/{name}": _provenance(registry, role, name) for role, name in sorted(components)},
        "layers": plain_data(records),
        "schedule": {"version": SCHEMA_VERSION, "layers": {
            name: {"decomposition": record.decomposition, "rank_selection": "manual",
                   "manual_rank": [list(record.ranks)]}
            for name, record in layers.items()}},
    }
    try:
        write_weights(folder / WEIGHTS, {"musco_core_version": __version__, SET_ID_KEY: set_id})
    except SafetensorError as exc:  # an I/O failure (a full disk) inside safetensors: an OSError like any other
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code[1]) if code else errno.EIO, f"cannot write {folder / WEIGHTS}: {exc}") from None
    (folder / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None),
                                   encoding="utf-8")
    # safetensors creates its file 0600 whatever the umask: give it the manifest's mode (0666 less the umask, read
    # from a file rather than by os.umask, which would change it for every thread while it is read)
    os.chmod(folder / WEIGHTS, stat.S_IMODE((folder / MANIFEST).stat().st_mode))
    names = [WEIGHTS, MANIFEST]
    if report is not None:
        (folder / REPORT).write_text(json.dumps({**report.to_dict(), "set_id": set_id}, indent=2), encoding="utf-8")
        names.append(REPORT)
    for name in names:
        _fsync_file(folder / name)
    fsync_dir(folder)
    return names


def _finish_commit(directory: Path) -> None:
    """Completes a commit the journal in ``directory`` records (idempotent), then removes journal and staging."""
    journal = directory / JOURNAL
    try:
        entry = json.loads(journal.read_text(encoding="utf-8"))
        staging = directory / entry["staging"]
        files = [name for name in entry["files"] if name in (WEIGHTS, MANIFEST, REPORT)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{journal}: an interrupted save left a journal that cannot be read ({exc}); remove it "
                          f"and save again") from None
    marker = (read_marker(staging) if staging.parent == directory and staging.is_dir() and not staging.is_symlink()
              else None)  # a link is never ours: nothing is moved out of, or removed from, where it points
    if marker is not None and marker["kind"] == "staging":
        for name in files:
            if (staging / name).exists():
                os.replace(staging / name, directory / name)
        for name in SET_FILES:  # the previous set's file the new set has none of (a report), never the user's
            if name not in files and _set_id_of(directory / name) is not None:
                (directory / name).unlink()
        fsync_dir(directory)
        _remove_ours(staging)
    journal.unlink(missing_ok=True)


def _recover(directory: Path) -> None:
    """Finishes an interrupted commit of an output set and removes dead staging folders, in ``directory``."""
    if (directory / JOURNAL).exists():
        _finish_commit(directory)
    _remove_dead_staging(directory)


def _finish_pending(directory: Path) -> None:
    """Finishes a commit an interrupted save left in ``directory`` before it is read; one a live writer is finishing
    is waited for, not done twice."""
    if (directory / JOURNAL).exists():
        with folder_lock(directory, wait=True):
            if (directory / JOURNAL).exists():
                _finish_commit(directory)


def _commit_set(directory: Path, write: Callable[[Path], list[str]], run_id: str | None) -> None:
    """Writes a new output set with ``write(staging)`` and swaps it in as a whole (see the module docstring)."""
    with folder_lock(directory) as alone:
        if not alone:
            raise ConfigError(f"{directory}: another process is saving a model here; run one at a time, or save to "
                              f"another folder")
        _recover(directory)
        staging = _new_staging(directory, "set", run_id)
        try:
            files = write(staging)
            write_text_atomic(directory / JOURNAL, json.dumps({"staging": staging.name, "files": files}))
            fsync_dir(directory)
        except BaseException:
            _remove_ours(staging)
            raise
        _finish_commit(directory)


def _compressor_parts(model_or_compressor: Any
                      ) -> tuple[nn.Module, CompressionReport | None, RunState | None, Any]:
    """(model, report, run state, registry) of a Compressor (anything with ``compressed_model`` and ``state``) or of
    a model; the model taken out of a ``torch.compile`` or data-parallel wrapper (see
    :func:`~musco_core.surgery.unwrapped`)."""
    if isinstance(model_or_compressor, nn.Module):
        return unwrapped(model_or_compressor), None, None, None
    model = unwrapped(model_or_compressor.compressed_model)
    return model, model_or_compressor.report(), model_or_compressor.state, model_or_compressor.registry


def save_compressed(model_or_compressor: Any, directory: str | os.PathLike, registry: Registry | None = None, *,
                    overwrite: bool = False) -> Path:
    """Writes a compressed model (or a Compressor's model and report) to ``directory`` as one output set.

    Save before :func:`standardize_model`: the factorized layers carry the structure that loading rebuilds. What
    would not load back is refused before anything is written (:func:`check_saveable`). A model wrapped by
    ``torch.compile`` or a data-parallel wrapper is saved as the module inside. The set is replaced as a whole (see
    the module docstring). ``directory`` may already hold an output set of the same run (a Compressor's) or of a
    bare model (for a model); anything else is refused unless ``overwrite``.
    """
    model, report, state, own_registry = _compressor_parts(model_or_compressor)
    registry = registry or own_registry or default_registry()
    check_saveable(model, registry, state)
    run_id = None if state is None else state.run_id
    directory = claim_folder(directory, "output", run_id, overwrite=overwrite)
    set_id = uuid.uuid4().hex
    _commit_set(directory, lambda staging: _write_set_files(staging, model, registry, report, set_id), run_id)
    return directory


def save_output_set(directory: str | os.PathLike, layers: Mapping[str, LayerRecord],
                    write_weights: Callable[[Path, dict[str, str]], None], *, registry: Registry | None = None,
                    report: CompressionReport | None = None, run_id: str | None = None,
                    overwrite: bool = False) -> Path:
    """Writes an output set whose model is never whole in memory (:mod:`musco_core.blockwise`): the manifest
    records the factorized ``layers`` (``{name: LayerRecord}``), and ``write_weights(path, metadata)`` must write
    the whole state dict as a safetensors file at ``path`` with ``metadata`` in its header. The set is committed
    as a whole, like :func:`save_compressed`'s, and ``directory`` is claimed the same way, for the run ``run_id``.
    """
    registry = registry or default_registry()
    directory = claim_folder(directory, "output", run_id, overwrite=overwrite)
    set_id = uuid.uuid4().hex
    _commit_set(directory, lambda staging: _write_set(staging, layers, write_weights, registry, report, set_id),
                run_id)
    return directory


# -- loading output sets -----------------------------------------------------------------------------------------
def _set_id_of(path: Path) -> str | None:
    """The set id an output set's file carries, which tells that musco-core wrote it; None for any other file."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        if path.name == WEIGHTS:
            set_id = _header(path)[1].get(SET_ID_KEY)
        else:
            data = read_yaml(path) if path.name == MANIFEST else json.loads(read_text_bounded(path, MAX_JSON_BYTES))
            set_id = data.get("set_id") if isinstance(data, dict) else None
    except (ConfigError, ValueError, RecursionError):
        return None
    return set_id if isinstance(set_id, str) else None


def _header(weights: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, from its header alone (nothing is loaded)."""
    try:
        with safe_open(str(weights), "pt") as handle:
            return ({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()},
                    dict(handle.metadata() or {}))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{weights}: cannot read: {short_repr(str(exc))}") from None


def _not_ours(metadata: Mapping[str, str]) -> str:
    """What to add to the error of a weights file whose keys do not fit: where another tool wrote it (it carries
    no set id), the likeliest cause, transformers 5's ``save_pretrained``, which saves some models (ViT, Dinov2,
    Segformer, ...) under the keys of their original checkpoints instead of their modules' names."""
    if SET_ID_KEY in metadata:
        return ""
    return ("; the file was not written by musco-core: if transformers' save_pretrained wrote it, it may have "
            "renamed the keys to those of the model's original checkpoints, as transformers 5 does for some models; "
            "save with save_pretrained(folder, save_original_format=False)")


def _check_shapes(directory: Path, name: str, layer: nn.Module, aliases: list[str],
                  shapes: Mapping[str, tuple[int, ...]], renamed: Mapping[str, str], metadata: Mapping[str, str]
                  ) -> None:
    """A ConfigError unless the weights file holds every tensor of the factors ``layer`` holds, as the layer's
    adapter builds them from the record's layouts (the shapes :func:`check_saveable` checked when saving), with the
    same shape."""
    for key, tensor in layer.state_dict().items():
        index, _, kind = key.partition(".")
        keys = [renamed.get(stored, stored) for stored in (f"{alias}.{key}" for alias in aliases)]
        found = next((shapes[stored] for stored in keys if stored in shapes), None)
        if found != tuple(tensor.shape):
            held = (f"holds it with shape {found}" if found is not None
                    else f"holds no {keys[0]}{_not_ours(metadata)}")
            raise ConfigError(f"{directory / MANIFEST}: layer {name!r}: factor {index} declares a {kind} of shape "
                              f"{tuple(tensor.shape)}, {directory / WEIGHTS} {held}")


def load_compressed(fresh_model: nn.Module, directory: str | os.PathLike, registry: Registry | None = None
                    ) -> nn.Module:
    """Rebuilds the factorized layers of a saved model on an uncompressed instance and loads its weights. A layer the
    instance has factorized already (a run that began on a compressed model) is loaded as it is where the file has
    it so, and rebuilt as the file has it where the run compressed it again; one of another geometry is refused.

    Returns a new model; ``fresh_model`` is not modified, so a file that does not fit leaves nothing half-done.
    A wrapped ``fresh_model`` (``torch.compile``, ``DataParallel``) gives the module inside, as it was saved.
    Each rebuilt layer takes the fresh layer's mode, trainability and memory format, as the run gave them (a
    frozen layer's factors stay frozen). A ``fresh_model`` on the ``meta`` device is refused: loading copies the
    weights into its tensors, which hold no values there, so it would come back without them.
    """
    fresh_model = unwrapped(fresh_model)
    if meta := on_meta(fresh_model):
        raise ConfigError(f"{meta}, into which load_compressed cannot copy the weights of {directory}: give a model "
                          f"on a real device (model.to_empty(device='cpu'))")
    registry = registry or default_registry()
    directory = Path(directory)
    _finish_pending(directory)
    records, set_id = _read_manifest(directory)
    weights = directory / WEIGHTS
    shapes, metadata = _header(weights)
    if SET_ID_KEY in metadata and metadata[SET_ID_KEY] != set_id:  # weights another tool wrote carry no set id
        raise ConfigError(f"{weights}: is not the weights file of {directory / MANIFEST} (they come from different "
                          f"saves); save the model again")
    renamed = {key: value for key, value in metadata.items() if key in shapes or value in shapes}
    model = deep_copy(fresh_model, "load_compressed copies the fresh model it is given",
                      "give a model that can be copied")
    paths = module_paths(model)
    modules = dict(model.named_modules())
    replacements = []
    for name, record in records.items():
        where = f"{directory / MANIFEST}: layer {name!r}"
        if name not in modules or not name:
            raise ConfigError(f"{where}: no layer of that name in {type(model).__name__}")
        module = modules[name]
        if isinstance(module, FactorizedLayer):  # an earlier run's result, in a model that began compressed
            if (module.spec, module.decomposition, module.ranks, module.layouts) == (
                    record.spec, record.decomposition, tuple(record.ranks), tuple(record.factors)):
                _check_shapes(directory, name, module, paths[id(module)], shapes, renamed, metadata)
                continue  # the weights are loaded into it below
            # compressed again (a later state of the run): rebuilt as the file has it, if of the same geometry
            spec, weight = module.spec, next(module.parameters())
            adapter = registry.adapters.get(spec.adapter) if spec.adapter in registry.adapters.entries else None
            why = why_not_replaceable(module, FactorizedLayer, loading=True)
            if adapter is None or why is not None:  # a hook of its own would be dropped with it
                raise ConfigError(f"{where}: the model's factorized layer cannot be rebuilt as the file has it: "
                                  f"{why or f'no adapter {spec.adapter!r} is installed{registry.failures_note()}'}")
        else:
            if record.spec.adapter not in registry.adapters.entries:  # its plugin is missing, or failed to load
                raise ConfigError(f"{where}: the file has a {record.spec.adapter} layer, and no layer adapter "
                                  f"{record.spec.adapter!r} is installed{registry.failures_note()}")
            adapter = registry.adapter_for(module, loading=True)
            if adapter is None:
                raise ConfigError(f"{where}: the file has a {record.spec.adapter} layer, the model's "
                                  f"{type(module).__name__} cannot be rebuilt: "
                                  f"{registry.unsupported_reason(module, loading=True)}")
            if adapter.name != record.spec.adapter:
                raise ConfigError(f"{where}: the file has a {record.spec.adapter} layer, the model a "
                                  f"{type(module).__name__}")
            spec, weight, _ = adapter.read(module)
        if spec != record.spec:
            raise ConfigError(f"{where}: the file has {record.spec.describe()}, the model {spec.describe()}")
        _check_shapes(directory, name, nn.Sequential(*build_on_meta(adapter, spec, record.factors)),
                      paths[id(module)], shapes, renamed, metadata)
        placeholders = [Factor(layout, torch.zeros(layout.weight_shape, dtype=weight.dtype, device=weight.device),
                               torch.zeros(layout.out_channels, dtype=weight.dtype, device=weight.device)
                               if layout.bias else None) for layout in record.factors]
        replacements.append((module, FactorizedLayer(spec, record.decomposition, record.ranks, record.factors,
                                                     adapter.build(spec, placeholders, weight))))
    for module, new in replacements:
        carry_training_state(module, new)
        for path in paths[id(module)]:
            replace_module(model, path, new)
    clear_broken_ties(model)
    wrong = [f"{key} is {shapes[stored]} in the file, {tuple(tensor.shape)} in the model"
             for key, tensor in model.state_dict().items()
             if (stored := key if key in shapes else renamed.get(key)) in shapes
             and shapes[stored] != tuple(tensor.shape)]
    if wrong:
        more = f"; {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ConfigError(f"{weights}: does not fit the {type(model).__name__} given: {'; '.join(wrong[:3])}{more}; "
                          f"load into the architecture the model was saved from")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"{weights}: cannot load: {short_repr(str(exc))}") from None
    if missing or unexpected:
        raise ConfigError(f"{weights}: does not fit the rebuilt model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}{_not_ours(metadata)}")
    return model


def read_report(directory: str | os.PathLike) -> CompressionReport:
    """The :class:`~musco_core.report.CompressionReport` saved in ``directory``, checked to be the one of the set's
    manifest there (by their set id), so that it never describes other weights."""
    directory = Path(directory)
    _finish_pending(directory)
    path = directory / REPORT
    text = read_text_bounded(path, MAX_JSON_BYTES)
    try:
        data = json.loads(text)
        report = CompressionReport.from_dict(data)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not a musco-core report: {short_repr(str(exc))}") from None
    set_id = _read_manifest(directory)[1] if (directory / MANIFEST).exists() else None  # a report copied alone
    if set_id is not None and data.get("set_id") != set_id:
        raise ConfigError(f"{path}: is not the report of {directory / MANIFEST} (they come from different saves); "
                          f"save the model again")
    return report


# -- run states ------------------------------------------------------------------------------------------------
def save_state(model: nn.Module, state: RunState, directory: str | os.PathLike, *, registry: Registry,
               report: CompressionReport, overwrite: bool = False) -> Path:
    """Saves the model and the run state after a step as ``directory/step-NNNN`` and points ``LATEST`` at it.

    The step folder is written and synced under a staging name and renamed in whole, and LATEST is replaced
    atomically after it, so a run killed while saving resumes from the previous complete state. Then this run's
    older states are removed: only folders with this run's marker, never anything else in ``directory``. A state
    that would not load back is refused before anything is written (:func:`check_saveable`); a wrapped model is
    saved as the module inside (see :func:`save_compressed`).
    """
    model = unwrapped(model)
    check_saveable(model, registry, state)
    directory = claim_folder(directory, "checkpoints", state.run_id, overwrite=overwrite)
    with folder_lock(directory) as alone:
        if not alone:
            raise ConfigError(f"{directory}: another process is saving a state here (two processes continuing one "
                              f"run?); each of them would remove the other's newest state: run one at a time")
        _remove_dead_staging(directory)
        name = f"step-{state.next_step:04d}"
        if os.path.lexists(directory / name):  # saved again after the same step, or a name of the user's (a link)
            name = f"{name}-{uuid.uuid4().hex[:8]}"
        target = directory / name
        staging = _new_staging(directory, name, state.run_id)
        try:
            _write_set_files(staging, model, registry, report, uuid.uuid4().hex)
            write_text_atomic(staging / STATE_FILE, yaml.safe_dump(StateCodec(registry).unstructure(state),
                                                                   sort_keys=False, default_flow_style=None))
            write_marker(staging, "state", state.run_id)
            fsync_dir(staging)
            os.replace(staging, target)
        except BaseException:
            if staging.exists():
                _remove_ours(staging)
            raise
        fsync_dir(directory)
        write_text_atomic(directory / LATEST_FILE, name + "\n")
        fsync_dir(directory)
        _remove_older_states(directory, {target}, state.run_id, overwrite)
    return target


def _remove_older_states(directory: Path, keep: Collection[Path], run_id: str, overwrite: bool = False) -> None:
    """Removes the state folders of the run ``run_id`` (of any run with ``overwrite``) in ``directory`` but those in
    ``keep``: only folders of a step name (the only name a state is saved under) with musco-core's state marker,
    never anything else: a copy the user made of a state under another name (a backup) carries the marker too. One
    that cannot be removed (the user made it read-only) is left as it is, with a warning: the new state is saved."""
    for old in list(directory.iterdir()):
        marker = (read_marker(old) if old not in keep and STEP_NAME.fullmatch(old.name) and old.is_dir()
                  and not old.is_symlink() else None)
        if marker is not None and marker["kind"] == "state" and (overwrite or marker.get("run_id") == run_id):
            try:
                _remove_state(old)
            except OSError as exc:
                log.warning("%s: an older state, left as it is: cannot remove it (%s)", old, exc.strerror or exc)


def tidy_checkpoints(directory: str | os.PathLike) -> None:
    """Removes what a save killed before its end left in a checkpoint folder, once a resume has read its newest
    state: the run's older states (a save removes them after ``LATEST`` names the new one, so a final save killed
    in between left one for good) and staging folders of dead musco-core processes. A complete state newer than
    that one (saved meanwhile by another process resuming the folder) is kept, and nothing is removed while another
    process saves a state there. A folder that cannot be tidied (read-only, say) is left as it is, with a
    warning."""
    with folder_lock(Path(directory)) as alone:
        if not alone:
            log.info("%s: another process is saving a state here; its older states are left to it", directory)
            return
        step_dir, run_id = latest_state(directory)
        try:
            _remove_dead_staging(step_dir.parent)
            newer = {state for state in _complete_states(step_dir.parent, run_id) if _age(state) > _age(step_dir)}
            _remove_older_states(step_dir.parent, {step_dir, *newer}, run_id)
        except OSError as exc:
            log.warning("%s: could not remove the older states of the run: %s", directory, exc.strerror or exc)


def _remove_state(folder: Path) -> None:
    """Removes an older state folder. One that holds only musco-core's files is first renamed to a staging name of
    this process, so that a removal cut short leaves a dead staging folder, which the next save removes, and never
    an unmarked step folder; one that holds files of the user's is emptied of musco-core's files where it is."""
    if all(_written_here(child) for child in folder.iterdir()):
        renamed = folder.with_name(f".{folder.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(folder, renamed)
        folder = renamed
    _remove_ours(folder)


def _ours(folder: Path, kind: str, run_id: str | None) -> bool:
    """Whether ``folder`` carries musco-core's marker of ``kind`` for the run ``run_id``."""
    marker = read_marker(folder)
    return marker is not None and marker["kind"] == kind and marker.get("run_id") == run_id


def latest_state(directory: str | os.PathLike) -> tuple[Path, str]:
    """The newest complete state folder of a checkpoint folder and the run id, checked: ``LATEST`` must name a
    step folder directly inside it that this run wrote. Where ``LATEST`` is missing, names a step folder that is
    missing, or names an older state than one whose state file was written after ``LATEST`` (a run killed after it
    renamed a state into place, before it wrote ``LATEST``), the newest complete state of the run
    (:func:`_newest_state`)."""
    directory = Path(directory)
    marker = read_marker(directory) if directory.is_dir() else None
    if not directory.exists() and not directory.is_symlink():
        raise ConfigError(f"{directory}: no such folder; nothing to resume")
    if marker is None or marker["kind"] != "checkpoints" or not isinstance(marker.get("run_id"), str):
        raise ConfigError(f"{directory}: not a musco-core checkpoint folder (no {MARKER} marker); nothing to resume")
    latest = directory / LATEST_FILE
    if not latest.exists() and not latest.is_symlink():
        return _newest_state(directory, marker["run_id"], f"{latest}: missing"), marker["run_id"]
    try:
        if latest.is_symlink() or not latest.is_file() or latest.stat().st_size > 64:
            raise ConfigError(f"{latest}: expected a small file naming a step folder; nothing to resume")
        name = latest.read_bytes().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{latest}: cannot read: {exc.strerror or exc}; nothing to resume") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{latest}: not UTF-8 text; expected a step folder name such as step-0003") from None
    if not STEP_NAME.fullmatch(name):
        raise ConfigError(f"{latest}: names {short_repr(name)}; expected a step folder directly inside "
                          f"{directory}, such as step-0003")
    step_dir = directory / name
    if not step_dir.exists() and not step_dir.is_symlink():
        return _newest_state(directory, marker["run_id"], f"{latest}: names {name}, which is missing"), marker["run_id"]
    if step_dir.is_symlink() or not _ours(step_dir, "state", marker["run_id"]):
        if not step_dir.is_symlink() and (read_marker(step_dir) or {}).get("kind") == "state" and not \
                _complete_states(directory, marker["run_id"]):  # an overwrite stopped before its first state
            raise ConfigError(f"{step_dir}: a state of the run that {directory} held before; the run begun there "
                              f"with overwrite=True saved no state yet: nothing to resume; run it again with "
                              f"overwrite=True (--overwrite)")
        raise ConfigError(f"{step_dir}: not a state saved by the run of {directory}; nothing to resume")
    written = latest.stat().st_mtime_ns
    if (step_dir / STATE_FILE).is_file() and any(
            (state / STATE_FILE).stat().st_mtime_ns > written and _age(state) > _age(step_dir)
            for state in _complete_states(directory, marker["run_id"])):
        return _newest_state(directory, marker["run_id"], f"{latest}: names {name}, and a newer state was saved "
                                                          f"after it"), marker["run_id"]
    return step_dir, marker["run_id"]


def _newest_state(directory: Path, run_id: str, why: str) -> Path:
    """The newest complete state of the run ``run_id`` in ``directory``, for a ``LATEST`` that is missing (``why``).

    save_state writes a state's files and syncs them in its staging folder, then marks it as a state, then renames
    it to its step name: a complete state is a folder of a step name (not a symlink) with this run's state marker
    and the state file, weights and manifest (which an older state being removed may lack). The newest is the one
    of the highest step; of one step saved twice, the one whose state file was written last.
    """
    found = _complete_states(directory, run_id)
    if not found:
        raise ConfigError(f"{why}, and {directory} holds no complete state of its run; nothing to resume")
    newest = max(found, key=_age)
    log.info("%s; resuming from the newest complete state, %s", why, newest)
    return newest


def _complete_states(directory: Path, run_id: str) -> list[Path]:
    """The complete states of the run ``run_id`` in ``directory`` (see :func:`_newest_state`)."""
    return [child for child in directory.iterdir()
            if STEP_NAME.fullmatch(child.name) and not child.is_symlink() and _ours(child, "state", run_id)
            and all((child / name).is_file() for name in (STATE_FILE, WEIGHTS, MANIFEST))]


def _age(state: Path) -> tuple[int, int, str]:
    """Orders a run's complete states, oldest first: by step, then (one step saved twice) by when the state file was
    written."""
    return int(state.name.split("-")[1]), (state / STATE_FILE).stat().st_mtime_ns, state.name


def load_state(fresh_model: nn.Module, directory: str | os.PathLike, registry: Registry
               ) -> tuple[nn.Module, RunState, str]:
    """The model and the run state of the newest complete state in a checkpoint folder, and the state file's name
    for messages. The state's fields are checked on their own here; :func:`musco_core.run.check_resumable` checks
    them against the schedule and the model."""
    step_dir, run_id = latest_state(directory)
    origin = str(step_dir / STATE_FILE)
    state = StateCodec(registry).structure(read_yaml(step_dir / STATE_FILE, "a musco-core run state"), origin)
    if state.run_id != run_id:
        raise ConfigError(f"{origin}: $.run_id: belongs to another run than {directory}")
    return load_compressed(fresh_model, step_dir, registry), state, origin


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Holds an advisory lock on ``directory`` (created if needed) for one writer; a second gets a ConfigError
    naming the holder's pid. The lock is released when the holder exits, however it exits. The lock file holds
    nothing but a pid: a file of that name that holds anything else, or a symlink, is the user's and is refused,
    never followed or emptied."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if not path.is_symlink() and (path.is_file() or not path.exists()):  # nothing in the way: a read-only or
            # full disk, a permission (a file of the user's of that name is refused below, by what it holds)
            raise ConfigError(f"{path}: cannot open or create musco-core's lock file: {exc.strerror or exc}; choose "
                              f"another --out") from None
        raise ConfigError(f"{path}: {'is a symlink' if path.is_symlink() else exc.strerror or exc}; musco-core "
                          f"keeps its lock there and never writes through a symlink or over a file of yours: move it, "
                          f"or choose another --out") from None
    with os.fdopen(descriptor, "r+", encoding="utf-8", errors="replace") as handle:
        content = handle.read(33).strip() if stat.S_ISREG(os.fstat(descriptor).st_mode) else None
        if content is None or len(content) > 32 or content and not content.isdecimal():
            raise ConfigError(f"{path}: is not musco-core's lock file (which holds only a process id); musco-core "
                              f"never writes over a file of yours: move it, or choose another --out")
        with advisory_lock(handle.fileno()) as alone:  # unguarded where there are no advisory locks
            if not alone:
                handle.seek(0)
                holder = handle.read(32).strip() or "unknown"
                raise ConfigError(f"{directory}: another musco-core process (pid {holder}) is writing here; wait for "
                                  f"it to finish or choose another --out")
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield directory
