"""Compressing a model larger than memory, one block at a time (sequential onloading).

:func:`compress_blockwise` compresses every layer of a schedule once, the model's *blocks* (a partition the user
names: the decoder layers of a transformer, the stages of a network) one after the other. The model is given as
an architecture whose weights are on the ``meta`` device and a safetensors checkpoint; only one block's weights
are read at a time, compressed, written to a shard and dropped, and the shards become one output set at the end.

Data-aware decompositions are calibrated as in a one-step in-memory run: the first block's inputs on every
calibration batch are captured once (with the weights outside the blocks, such as embeddings, read for that pass
only) and carried from block to block on CPU or on disk. Under sequential calibration two streams travel: the
inputs each block gets from the compressed blocks before it, and those the uncompressed model gives it; each layer
is fitted on the first, paired with the second (its ``cross_moment``), exactly as
:func:`~musco_core.run.run_step` does when all the layers are in one step.

What is assumed of the blocks, as of a Hugging Face decoder stack: each block is called once per forward pass,
in the order the model defines them; its hidden state is its first positional argument (or the keyword argument
``hidden_states``), and the block's output (a tensor, or a tuple whose first item is the tensor) is the next
block's hidden state; every block gets the same other arguments (attention mask, position ids...) as the first.
Those are captured on the first block and replayed, so they must be tensors or plain values: a cache object would
be updated by each call (run Hugging Face models with ``use_cache=False``). All of it is checked on the first
calibration batch, in one pass through every block (each block's weights read for its call), before anything is
compressed: a model that breaks it is a ConfigError naming the blocks.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from . import io
from .calibration import (TokenMask, _calibration_pass, collect_input_stats, collect_sequential_stats, forward_order,
                          layer_dataflow, token_mask)
from .engine import LayerResult, compress_layer, layer_specs
from .errors import CompressionError, ConfigError, MuscoError, one_line, short_repr
from .registry import Registry, default_registry
from .report import CompressionReport
from .run import (_independent_run, check_calibration, checked_schedule, count_params, needs_input_stats,
                  output_projections, tied_note, untied_note, without_autocast)
from .schedule import MAX_JSON_BYTES, ModelSchedule, key_path, read_text_bounded, read_yaml
from .stats import parameters_kept
from .surgery import module_paths, replace_module, select_modules, tied_parameters
from .timing import call_model, map_tensors
from .verify import unfaithful_swaps

log = logging.getLogger(__name__)

#: Where activations are kept between blocks.
OFFLOAD_MODES = ("cpu", "disk")
#: safetensors' names of the dtypes it stores (those of this torch: the unsigned and fnuz ones are newer than 2.1).
SAFETENSORS_DTYPES = {getattr(torch, dtype): name for dtype, name in (
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("complex64", "C64"), ("uint16", "U16"), ("uint32", "U32"),
    ("uint64", "U64")) if hasattr(torch, dtype)}
#: The values a block's replayed arguments may hold (besides tensors and tuples, lists and dicts of them).
PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)


# -- naming the blocks ------------------------------------------------------------------------------------------
def resolve_blocks(model: nn.Module, blocks: str | Sequence[str]) -> list[str]:
    """The modules that ``blocks`` names, in the model's order: exact module names, and ``re:`` patterns matched
    in full against module names (``re:transformer\\.h\\.\\d+``). A name that is not a module, a pattern that
    matches none, the whole model, or blocks inside one another are a ConfigError."""
    ordered = select_modules(model, blocks, "blocks")
    for outer, inner in itertools.combinations(ordered, 2):
        if inner.startswith(outer + "."):
            raise ConfigError(f"blocks: {inner!r} is inside block {outer!r}; name blocks that do not nest")
    return ordered


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def _owner(name: str, blocks: Sequence[str]) -> str | None:
    return next((block for block in blocks if _inside(name, block)), None)


def _check_partition(model: nn.Module, blocks: Sequence[str], schedule: ModelSchedule) -> None:
    """A ConfigError unless every compressed layer lies in a block and every block holds its own weights."""
    problems = [f"{key_path('$.layers', name)}: not inside any block; blockwise compression compresses layers "
                f"inside the blocks {short_repr(list(blocks))}" for name in schedule.compressed_layers()
                if _owner(name, blocks) is None]
    for names in _tensor_names(model).values():
        owners = {_owner(name, blocks) for name in names}
        if len(owners) > 1:
            inside = next(name for name in names if _owner(name, blocks) is not None)
            outside = next(name for name in names if _owner(name, blocks) != _owner(inside, blocks))
            problems.append(f"blocks: {inside!r} is the same tensor as {outside!r}, outside its block; blockwise "
                            f"compression needs blocks that hold their own weights (name a block that holds both)")
    if problems:
        raise ConfigError("\n".join(problems))


def _blockwise_schedule(model: nn.Module, schedule: Any, registry: Registry) -> ModelSchedule:
    """The schedule (a YAML file's path, its data or a ModelSchedule) checked against the model and for one
    blockwise pass: each layer compressed once, by per-layer rank selectors."""
    if isinstance(schedule, (str, os.PathLike)):
        origin, data = str(schedule), read_yaml(schedule)
    else:
        origin, data = "schedule", schedule
    checked = checked_schedule(model, data, origin, registry)
    origin = checked.origin or origin
    problems = []
    if checked.settings.nglobal_compress_iters != 1:
        problems.append(f"{origin}: $.settings.nglobal_compress_iters: blockwise compression compresses each layer "
                        f"once, got {checked.settings.nglobal_compress_iters}; run multi-stage compression in memory")
    for name, layer in checked.layers.items():
        if layer is not None and registry.rank_selectors.get(layer.rank_selection).scope == "model":
            problems.append(f"{origin}: {key_path('$.layers', name)}: rank selector {layer.rank_selection!r} "
                            f"allocates ranks over the whole model, which blockwise compression never holds; use a "
                            f"per-layer rank selector")
    if problems:
        raise ConfigError("\n".join(problems))
    return checked


# -- reading weights lazily -------------------------------------------------------------------------------------
class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, a sharded checkpoint's index ``*.safetensors.index.json``,
    or a folder of ``*.safetensors`` files, or of the shards its one index names), read a few at a time; only the
    headers are read up front."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        indexes = sorted(path.glob(INDEX_PATTERN)) if path.is_dir() else [path] if path.match(INDEX_PATTERN) else []
        if len(indexes) > 1:
            raise ConfigError(f"checkpoint {path}: holds {len(indexes)} index files "
                              f"({', '.join(index.name for index in indexes)}); pass the one to read")
        weight_map = _weight_map(indexes[0]) if indexes else {}
        files = ([indexes[0].parent / name for name in sorted(set(weight_map.values()))] if indexes else
                 sorted(path.glob("*.safetensors")) if path.is_dir() else [path])
        if not files or not files[0].is_file():
            raise ConfigError(f"checkpoint {path}: expected a safetensors file, a folder of *.safetensors files or "
                              f"a sharded checkpoint's index")
        self.path = path  # as given: what its errors name
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with self._open(file) as handle:
                for key in handle.keys():
                    if key in self.files:
                        raise ConfigError(f"checkpoint {path}: tensor {short_repr(key)} is in both "
                                          f"{self.files[key].name} and {file.name}")
                    self.files[key] = file
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        for key, name in weight_map.items():
            if self.files.get(key) != indexes[0].parent / name:
                raise ConfigError(f"checkpoint {indexes[0]}: $.weight_map[{key!r}]: {name} holds no such tensor")

    @staticmethod
    @contextlib.contextmanager
    def _open(file: Path) -> Iterator[Any]:
        try:
            with safe_open(str(file), "pt") as handle:
                yield handle
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"checkpoint {file}: cannot read it as safetensors: {one_line(str(exc))} (musco-core "
                              f"never unpickles a .bin or .pt file: save it with safetensors)") from None

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, each file opened once and closed again (its pages leave the process)."""
        found = {}
        for file, group in itertools.groupby(sorted(keys, key=lambda k: (str(self.files[k]), k)),
                                             key=lambda k: self.files[k]):
            with self._open(file) as handle:
                for key in group:
                    found[key] = handle.get_tensor(key)
        return found


#: The name of a sharded safetensors checkpoint's index (Hugging Face's ``model.safetensors.index.json``).
INDEX_PATTERN = "*.safetensors.index.json"


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: ``{tensor: shard file name}``, the shards beside it."""
    try:
        data = json.loads(read_text_bounded(index, MAX_JSON_BYTES))
    except ValueError as exc:
        raise ConfigError(f"checkpoint {index}: is not JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(key, str) and isinstance(name, str) and name.endswith(".safetensors") and name == Path(name).name
            for key, name in weight_map.items()):
        raise ConfigError(f"checkpoint {index}: $.weight_map: expected {{tensor name: file name of a .safetensors "
                          f"shard beside the index}}")
    return weight_map


def _check_checkpoint(model: nn.Module, names: Mapping[int, list[str]], checkpoint: Checkpoint | None) -> None:
    """One ConfigError naming every tensor the model holds on the meta device that the checkpoint lacks or holds
    with another shape, and every tensor of the checkpoint the model has no place for (a checkpoint of another
    architecture, such as one with more blocks, would otherwise be read in part): checked from the headers before
    anything runs, as ``load_state_dict`` checks a whole state dict. A tensor the model holds under several names
    (a tied head) that the checkpoint holds under two of them with different values is one too: only one would be
    read."""
    tensors = dict(itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)))
    problems = []
    for tensor_names in names.values():
        if tensors[tensor_names[0]].is_meta:
            try:
                _checkpoint_key(tensors[tensor_names[0]], tensor_names, checkpoint)
            except ConfigError as exc:
                problems.append(str(exc))
                if checkpoint is None:
                    break  # one line says it
                continue
            stored = [name for name in tensor_names if name in checkpoint.files]
            values = checkpoint.read(stored) if len(stored) > 1 else {}
            problems += [f"checkpoint {checkpoint.path}: {line}"
                         for line in io.tied_value_conflicts([stored], values, "the checkpoint")]
    if checkpoint is not None:
        extra = sorted(set(checkpoint.files) - set(tensors))
        if extra:
            listed = ", ".join(map(repr, extra[:5])) + (", ..." if len(extra) > 5 else "")
            problems.append(f"checkpoint {checkpoint.path}: {len(extra)} tensor(s) that {type(model).__name__} has "
                            f"no parameter or buffer for: {listed}; expected the checkpoint of this architecture, "
                            f"keyed as its state_dict()")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ConfigError("\n".join(shown))


def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter and buffer of the model (a tied tensor has several)."""
    names: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    return names


@contextlib.contextmanager
def _onloaded(owners: Iterable[nn.Module], names: Mapping[int, list[str]], checkpoint: Checkpoint | None,
              device: torch.device) -> Iterator[None]:
    """Inside, every parameter and buffer held by ``owners`` (directly) is real and on ``device``: read from the
    checkpoint when it is on the meta device (under any of its ``names``), moved otherwise. The original tensors
    are put back on exit, so the weights read leave memory with the block."""
    slots = [(owner, attribute, tensor) for owner in owners for attribute, tensor in itertools.chain(
        owner.named_parameters(recurse=False, remove_duplicate=False),
        owner.named_buffers(recurse=False, remove_duplicate=False))]
    wanted: dict[int, str] = {}
    for _, _, tensor in slots:
        if tensor.is_meta and id(tensor) not in wanted:
            wanted[id(tensor)] = _checkpoint_key(tensor, names[id(tensor)], checkpoint)
    loaded = checkpoint.read(set(wanted.values())) if wanted else {}
    values: dict[int, torch.Tensor] = {}
    try:
        for owner, attribute, tensor in slots:
            if id(tensor) not in values:
                value = loaded[wanted[id(tensor)]] if tensor.is_meta else tensor
                value = value.to(device=device, dtype=tensor.dtype)
                values[id(tensor)] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                                      if isinstance(tensor, nn.Parameter) else value)
            setattr(owner, attribute, values[id(tensor)])
        yield
    finally:
        for owner, attribute, tensor in slots:
            setattr(owner, attribute, tensor)


def _checkpoint_key(tensor: torch.Tensor, names: Sequence[str], checkpoint: Checkpoint | None) -> str:
    """The checkpoint's name of a meta tensor (any of its ``names``), its shape checked."""
    if checkpoint is None:
        raise ConfigError(f"{names[0]!r} is on the meta device and no checkpoint was given to read it from")
    key = next((name for name in names if name in checkpoint.files), None)
    if key is None:
        raise ConfigError(f"checkpoint {checkpoint.path}: no tensor {names[0]!r} (a buffer that is not saved must be "
                          f"built on a real device, not on meta)")
    if checkpoint.shapes[key] != tuple(tensor.shape):
        raise ConfigError(f"checkpoint {checkpoint.files[key]}: {key!r} has shape {checkpoint.shapes[key]}, the "
                          f"model's {tuple(tensor.shape)}")
    return key


# -- carrying activations from block to block ------------------------------------------------------------------
class Activations(Sequence):
    """One tensor per calibration batch (a block's hidden-state inputs): in memory on CPU, or, with a ``folder``,
    one raw file each, memory-mapped when read."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._items: list[torch.Tensor | tuple[Path, torch.dtype, tuple[int, ...]]] = []
        if folder is not None:
            folder.mkdir(parents=True)

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        if self.folder is None:
            self._items.append(tensor)
            return
        path = self.folder / f"{len(self._items)}.bin"
        tensor.reshape(-1).view(torch.uint8).numpy().tofile(path)
        self._items.append((path, tensor.dtype, tuple(tensor.shape)))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if isinstance(item, torch.Tensor):
            return item
        path, dtype, shape = item
        numel = int(torch.Size(shape).numel())
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape)

    def release(self) -> None:
        self._items = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Batches(Sequence):
    """Calibration batches of a block runner: ``(hidden state, batch index)``."""

    def __init__(self, hidden: Activations) -> None:
        self.hidden = hidden

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.hidden[index], index


@attrs.frozen
class _Call:
    """How the first block was called on one batch, without its hidden state."""

    args: tuple
    kwargs: dict


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in tuples, lists and mappings) on ``device``."""
    return map_tensors(value, lambda tensor: tensor.to(device))


def _unreplayable(value: Any, where: str) -> str | None:
    """Where in ``value`` something other than tensors and plain values is, or None."""
    if isinstance(value, (torch.Tensor, *PLAIN_VALUES)):
        return None
    if isinstance(value, (tuple, list)):
        return next(filter(None, (_unreplayable(item, f"{where}[{i}]") for i, item in enumerate(value))), None)
    if isinstance(value, dict):
        return next(filter(None, (_unreplayable(item, f"{where}[{key!r}]") for key, item in value.items())), None)
    return f"{where} (a {type(value).__name__})"


def _hidden_output(output: Any, block: str) -> torch.Tensor:
    """The hidden state a block returns: its output, or the first item of a tuple or list."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"block {block!r} returned a {type(output).__name__}; expected the next block's hidden "
                          f"state: a tensor, or a tuple whose first item is one")
    return output


class BlockRunner(nn.Module):
    """One block mounted at its path in the model (so its layers keep their names), called as
    ``runner(hidden, index)`` with the other arguments of calibration batch ``index`` replayed."""

    def __init__(self, path: str, block: nn.Module, calls: Sequence[_Call], hidden_keyword: bool,
                 device: torch.device) -> None:
        super().__init__()
        *parents, last = path.split(".")
        parent: nn.Module = self
        for part in parents:
            parent.add_module(part, nn.Module())
            parent = parent.get_submodule(part)
        parent.add_module(last, block)
        self.path, self.calls, self.hidden_keyword, self.device = path, calls, hidden_keyword, device

    @property
    def block(self) -> nn.Module:
        return self.get_submodule(self.path)

    def forward(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        call = self.calls[index]
        hidden, args, kwargs = hidden.to(self.device), _to(call.args, self.device), _to(call.kwargs, self.device)
        output = (self.block(*args, hidden_states=hidden, **kwargs) if self.hidden_keyword
                  else self.block(hidden, *args, **kwargs))
        return _hidden_output(output, self.path)


class _Reached(Exception):
    """Ends a pass over the model at the first block."""


def _misuse(what: str, index: int, hint: str = "") -> ConfigError:
    """The error of blocks called otherwise than blockwise compression replays them."""
    return ConfigError(f"blocks: {what} on calibration batch {index}; blockwise compression needs each block run "
                       f"once per forward pass, in the order the model defines them, on the hidden state the block "
                       f"before returned and with the first block's other arguments{hint}")


def _hooked_pass(model: nn.Module, blocks: Sequence[str], batch: Any, index: int, before: Callable[..., None],
                 after: Callable[..., None] | None = None) -> None:
    """Runs the model on ``batch`` with ``before(name, args, kwargs)`` called as each block is entered (it may end
    the pass by raising _Reached) and ``after(name, output)`` as it returns. A failure of the model is a ConfigError
    naming the batch."""
    handles = []
    try:
        for name in blocks:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(
                lambda module, args, kwargs, name=name: before(name, args, kwargs), with_kwargs=True))
            if after is not None:
                handles.append(module.register_forward_hook(
                    lambda module, args, output, name=name: after(name, output)))
        call_model(model, batch)
    except _Reached:
        pass
    except MuscoError:
        raise
    except Exception as exc:
        raise ConfigError(f"calibration: the model failed on batch {index}: {type(exc).__name__}: "
                          f"{one_line(str(exc))}") from exc
    finally:
        for handle in handles:
            handle.remove()


def _first_call(model: nn.Module, blocks: Sequence[str], batch: Any, index: int) -> tuple[torch.Tensor, _Call, bool]:
    """How the model calls its first block on ``batch`` (:func:`_split_call`); the pass ends there."""
    seen: list[tuple[str, tuple, dict]] = []

    def before(name: str, args: tuple, kwargs: dict) -> None:
        seen.append((name, args, kwargs))
        raise _Reached

    _hooked_pass(model, blocks, batch, index, before)
    if not seen:
        raise ConfigError(f"calibration: batch {index} never reached block {blocks[0]!r}")
    name, args, kwargs = seen[0]
    if name != blocks[0]:
        raise _misuse(f"{name!r} ran before {blocks[0]!r}", index)
    return _split_call(args, kwargs, name)


def _checked_first_call(model: nn.Module, blocks: Sequence[str], batch: Any, index: int,
                        onload: Callable[[nn.Module], contextlib.AbstractContextManager], watch: _Watch
                        ) -> tuple[torch.Tensor, _Call, bool]:
    """How the model calls its first block on ``batch``, from a pass through the whole model (each block's weights
    read for its call with ``onload``, then dropped) that checks what blockwise compression assumes of the blocks:
    each runs once, in the model's order, on the hidden state the block before returned, with the first block's
    other arguments, given the same way. Anything else would calibrate blocks on inputs they never get: a
    ConfigError (:func:`_misuse`). ``watch.running`` names the block running (its weights read), for
    :func:`_watching`."""
    ran: list[str] = []
    first: list[tuple[torch.Tensor, _Call, bool]] = []  # the first block's call
    returned: list[torch.Tensor] = []  # the hidden state the latest block returned
    loaded: list[contextlib.AbstractContextManager] = []

    def before(name: str, args: tuple, kwargs: dict) -> None:
        if name in ran:
            raise _misuse(f"{name!r} ran twice", index)
        if name != blocks[len(ran)]:
            raise _misuse(f"{name!r} ran before {blocks[len(ran)]!r}", index)
        hidden, call, by_keyword = _split_call(args, kwargs, name)
        if first:
            _, first_call, first_keyword = first[0]
            if by_keyword != first_keyword:
                how = {True: "as hidden_states=", False: "positionally"}
                raise _misuse(f"{name!r} got its hidden state {how[by_keyword]}, {blocks[0]!r} "
                              f"{how[first_keyword]}", index)
            if not returned or not _same(hidden, returned[-1]):
                raise _misuse(f"{name!r} did not get the hidden state {ran[-1]!r} returned", index,
                              "; something changes it between them: name blocks that hold what runs there")
            where = (_difference(call.args, first_call.args, "positional arguments")
                     or _difference(call.kwargs, first_call.kwargs, "keyword arguments"))
            if where:
                raise _misuse(f"{name!r} is called with other {where} than {blocks[0]!r}", index)
        else:
            first.append((hidden, call, by_keyword))
        ran.append(name)
        returned.clear()
        watch.running = name
        context = onload(model.get_submodule(name))
        context.__enter__()
        loaded.append(context)

    def after(name: str, output: Any) -> None:
        loaded.pop().__exit__(None, None, None)
        watch.running = None
        returned[:] = [_hidden_output(output, name)]

    try:
        with parameters_kept(model, f"calibration batch {index}"):
            _hooked_pass(model, blocks, batch, index, before, after)
    finally:
        while loaded:
            loaded.pop().__exit__(None, None, None)
    if not ran:
        raise ConfigError(f"calibration: batch {index} never reached block {blocks[0]!r}")
    if len(ran) < len(blocks):
        raise _misuse(f"{blocks[len(ran)]!r} never ran", index)
    return first[0]


def _same(value: torch.Tensor, expected: torch.Tensor) -> bool:
    return value is expected or (value.shape == expected.shape and value.dtype == expected.dtype
                                 and value.device == expected.device and torch.equal(value, expected))


def _difference(value: Any, expected: Any, where: str) -> str | None:
    """Where ``value`` (a block's replayed arguments) differs from ``expected`` (the first block's), or None."""
    if isinstance(value, torch.Tensor) or isinstance(expected, torch.Tensor):
        both = isinstance(value, torch.Tensor) and isinstance(expected, torch.Tensor)
        return None if both and _same(value, expected) else where
    if isinstance(value, (tuple, list)) and isinstance(expected, (tuple, list)) and len(value) == len(expected):
        return next(filter(None, (_difference(item, other, f"{where}[{i}]")
                                  for i, (item, other) in enumerate(zip(value, expected)))), None)
    if isinstance(value, dict) and isinstance(expected, dict) and value.keys() == expected.keys():
        return next(filter(None, (_difference(value[key], expected[key], f"{where}[{key!r}]") for key in value)),
                    None)
    return None if type(value) is type(expected) and value == expected else where


@attrs.define
class _Watch:
    """The block running in the capture's pass, and the scheduled layers the model reads an attribute of (a weight,
    a buffer, a submodule) while their block is not running: ``{layer: attribute}``."""

    running: str | None = None
    read: dict[str, str] = attrs.field(factory=dict)


@contextlib.contextmanager
def _watching(model: nn.Module, layers: Sequence[str], blocks: Sequence[str]) -> Iterator[_Watch]:
    """Inside, a read of an attribute that ``nn.Module`` holds (parameters, buffers, submodules) of one of ``layers``
    outside its block's run is recorded in the yielded watch. The model uses such a layer outside its block (a head
    reading a block's weight): blockwise compression, which checks the replacements on the block alone, would
    replace a layer the model needs as it is; the in-memory path keeps it (:func:`~musco_core.verify.unfaithful_swaps`).
    Each layer's class is swapped for a subclass that records, and put back on exit."""
    watch = _Watch()
    classes = {}
    for name in layers:
        module = model.get_submodule(name)
        if id(module) in classes:
            continue
        base, block = type(module), _owner(name, blocks)

        def __getattr__(self, attribute, base=base, name=name, block=block):
            value = base.__getattr__(self, attribute)  # a missing attribute (hasattr) is missing after a swap too
            if watch.running != block:
                watch.read.setdefault(name, attribute)
            return value

        classes[id(module)] = (module, base)
        module.__class__ = type(base.__name__, (base,), {"__getattr__": __getattr__, "__module__": base.__module__,
                                                         "__qualname__": base.__qualname__})
    try:
        yield watch
    finally:
        for module, base in classes.values():
            module.__class__ = base


def _capture(model: nn.Module, blocks: Sequence[str], batches: Iterable[Any], device: torch.device,
             store: Activations, progress: bool, onload: Callable[[nn.Module], contextlib.AbstractContextManager],
             watch: _Watch, mask: TokenMask | None) -> tuple[list[_Call], bool, TokenMask | None]:
    """Runs the model on each calibration batch up to the first block (through every block on the first batch, to
    check how they are called: :func:`_checked_first_call`); stores the block's hidden-state input in ``store`` and
    returns its other arguments per batch (on CPU), whether the hidden state is a keyword, and ``mask`` carrying
    the batches' masks (which the hidden states do not hold)."""
    calls, keyword, masks = [], None, []
    with _calibration_pass(model):
        for index, batch in enumerate(_bar(batches, "capturing the first block's inputs", progress)):
            if mask is not None:
                masks.append(mask.of(batch, index).cpu())
            batch = _to(batch, device)
            hidden, call, by_keyword = (_checked_first_call(model, blocks, batch, index, onload, watch)
                                        if index == 0 else _first_call(model, blocks, batch, index))
            if keyword is not None and by_keyword != keyword:
                raise ConfigError(f"block {blocks[0]!r} got its hidden state positionally on some batches and as a "
                                  f"keyword on others")
            keyword = by_keyword
            store.append(hidden)
            calls.append(call)
    return calls, bool(keyword), None if mask is None else attrs.evolve(mask, carried=tuple(masks))


def _split_call(args: tuple, kwargs: dict, block: str) -> tuple[torch.Tensor, _Call, bool]:
    """The hidden state of a block's call (first positional argument, or ``hidden_states``), the rest of the call
    on CPU, and whether the hidden state came as a keyword."""
    if args:
        hidden, rest, by_keyword = args[0], _Call(tuple(args[1:]), dict(kwargs)), False
    elif "hidden_states" in kwargs:
        rest = dict(kwargs)
        hidden, rest, by_keyword = rest.pop("hidden_states"), _Call((), rest), True
    else:
        raise ConfigError(f"block {block!r} was called without positional arguments or hidden_states=; expected "
                          f"its hidden state first")
    if not isinstance(hidden, torch.Tensor):
        raise ConfigError(f"block {block!r}: its first argument is a {type(hidden).__name__}; expected the hidden "
                          f"state, a tensor")
    problem = _unreplayable(rest.args, "positional arguments") or _unreplayable(rest.kwargs, "keyword arguments")
    if problem:
        raise ConfigError(f"block {block!r} is called with {problem}; only tensors and plain values can be replayed "
                          f"for every block (a cache object would be updated by each call: run the model without "
                          f"caches, e.g. use_cache=False for Hugging Face models)")
    return hidden, _Call(_to(rest.args, torch.device("cpu")), _to(rest.kwargs, torch.device("cpu"))), by_keyword


def _bar(items: Iterable[Any], what: str, progress: bool):
    return tqdm(items, desc=what, leave=False, file=sys.stderr, disable=not (progress and sys.stderr.isatty()))


# -- writing safetensors files one tensor at a time -------------------------------------------------------------
@attrs.frozen
class TensorEntry:
    """One tensor of a safetensors file being written: its name, dtype and shape, and where it is read from when
    it is written (``source``: a tensor, or a safetensors file holding it as ``source_key``)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: torch.Tensor | Path
    source_key: str | None = None

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> None:
    """Writes a safetensors file holding ``entries`` (in that order) and ``metadata``, reading each tensor only
    when it is written: memory holds one tensor at a time (safetensors' own writers take the whole state dict).
    A file source is opened once for its consecutive entries."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise MuscoError(f"{entry.key!r}: safetensors cannot store dtype {entry.dtype}")
        header[entry.key] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for source, group in itertools.groupby(entries, key=lambda e: e.source if isinstance(e.source, Path)
                                               else None):
            with safe_open(str(source), "pt") if source is not None else contextlib.nullcontext() as handle:
                for entry in group:
                    tensor = handle.get_tensor(entry.source_key) if source is not None else entry.source
                    tensor = tensor.detach().to(device="cpu", dtype=entry.dtype).contiguous()
                    if tuple(tensor.shape) != entry.shape:
                        raise MuscoError(f"{entry.key!r}: the source holds shape {tuple(tensor.shape)}, expected "
                                         f"{entry.shape}")
                    out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def unique_entries(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict (with ``keep_vars=True``) without its duplicates: each tensor that several keys name (a tied
    weight) under the first of them in sorted order, and ``{dropped key: kept key}``, as safetensors' ``save_model``
    and ``load_model`` name them."""
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault(id(tensor), []).append(key)
    kept, aliases = {}, {}
    for keys in groups.values():
        first, *others = sorted(keys)
        kept[first] = state[first]
        aliases.update(dict.fromkeys(others, first))
    return kept, aliases


def _write_shard(path: Path, block: nn.Module, prefix: str) -> tuple[list[TensorEntry], dict[str, str]]:
    """Writes a compressed block's state dict (keys under ``prefix``) to ``path``; the entries to copy into the
    output set from it, and the aliases of its tied tensors."""
    kept, aliases = unique_entries(block.state_dict(prefix=prefix, keep_vars=True))
    written = [TensorEntry(key, tensor.dtype, tuple(tensor.shape), tensor) for key, tensor in sorted(kept.items())]
    write_safetensors(path, written, aliases)
    return [attrs.evolve(entry, source=path, source_key=entry.key) for entry in written], aliases


def _rest_entries(model: nn.Module, blocks: Sequence[str], names: Mapping[int, list[str]],
                  checkpoint: Checkpoint | None) -> tuple[list[TensorEntry], dict[str, str]]:
    """The state dict entries of the model outside the blocks, as the checkpoint (or the model) holds them."""
    state = {key: tensor for key, tensor in model.state_dict(keep_vars=True).items() if _owner(key, blocks) is None}
    kept, aliases = unique_entries(state)
    entries = []
    for key, tensor in sorted(kept.items()):
        if tensor.is_meta:
            source_key = _checkpoint_key(tensor, names.get(id(tensor), [key]), checkpoint)
            entries.append(TensorEntry(key, tensor.dtype, tuple(tensor.shape), checkpoint.files[source_key],
                                       source_key))
        else:
            entries.append(TensorEntry(key, tensor.dtype, tuple(tensor.shape), tensor))
    return entries, aliases


# -- the work folder --------------------------------------------------------------------------------------------
#: The name a run's work folder (shards and offloaded activations) starts with, and the kind its marker names.
WORK_PREFIX = ".musco-blockwise-"
WORK_KIND = "blockwise-work"
#: What a run writes in its work folder: its shards and its folders of offloaded activations (of raw files).
_SHARD = re.compile(r"block-[0-9]{5}\.safetensors")
_ACTIVATIONS = re.compile(r"activations-[0-9]+")
_ACTIVATION = re.compile(r"[0-9]+\.bin")


def _remove_stale_work(parent: Path) -> None:
    """Removes the work folders in ``parent`` that killed runs left (a run removes its own as it ends, however it
    fails, but not when it is killed), which can hold as much as the compressed model: only those marked as one
    (:data:`WORK_KIND`) by a process of this host that no longer runs and whose lock is free, and in them only what
    a run writes there (anything else is kept, with the folder). Each removal is logged."""
    if not parent.is_dir():
        return
    for folder in sorted(parent.glob(WORK_PREFIX + "*")):
        marker = io.read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
        if (marker is None or marker["kind"] != WORK_KIND or "host" not in marker or not io.written_here(marker)
                or io.pid_alive(marker.get("pid"))):
            continue
        with io.folder_lock(folder) as alone:
            if alone:
                _remove_work(folder, marker.get("pid"))


def _remove_work(folder: Path, pid: Any) -> None:
    """Removes a dead run's work folder (:func:`_remove_stale_work`), its marker last; logs what went."""
    removed, size, kept = 0, 0, []
    for child in folder.iterdir():
        if child.name == io.MARKER:
            continue
        if child.is_symlink():
            files = None
        elif _SHARD.fullmatch(child.name) and child.is_file() or io.dead_temporary(child):
            files = [child]
        elif _ACTIVATIONS.fullmatch(child.name) and child.is_dir():
            files = list(child.iterdir())
            if not all(_ACTIVATION.fullmatch(f.name) and f.is_file() and not f.is_symlink() for f in files):
                files = None
        else:
            files = None
        if files is None:
            kept.append(child.name)
            continue
        for file in files:
            size += file.stat().st_size
            file.unlink()
        removed += len(files)
        if child.is_dir():
            child.rmdir()
    if kept:
        log.warning("%s: work folder of a killed blockwise run (pid %s): removed %d file(s) of %.1f MiB; kept the "
                    "folder, it holds files musco-core did not write: %s", folder, pid, removed, size / 2**20,
                    ", ".join(sorted(kept)))
        return
    (folder / io.MARKER).unlink()
    folder.rmdir()
    log.info("%s: removed the work folder of a killed blockwise run (pid %s): %d file(s), %.1f MiB", folder, pid,
             removed, size / 2**20)


# -- the blockwise pass -----------------------------------------------------------------------------------------
@attrs.define
class _Streams:
    """The calibration inputs of the current block: ``actual`` (from the compressed blocks before it) and
    ``reference`` (from the uncompressed model); one object while no layer before the block was replaced."""

    actual: Activations
    reference: Activations

    @property
    def diverged(self) -> bool:
        return self.actual is not self.reference


@attrs.define
class _Run:
    """What the blockwise pass carries from block to block."""

    schedule: ModelSchedule
    registry: Registry
    device: torch.device
    work: Path
    offload: str
    progress: bool
    tied: Mapping[str, list[str]]
    streams: _Streams | None = None
    calls: list[_Call] = attrs.field(factory=list)
    hidden_keyword: bool = False
    results: list[LayerResult] = attrs.field(factory=list)
    records: dict[str, io.LayerRecord] = attrs.field(factory=dict)
    params_change: int = 0
    entries: list[TensorEntry] = attrs.field(factory=list)
    aliases: dict[str, str] = attrs.field(factory=dict)
    generation: int = 0
    read_outside: dict[str, str] = attrs.field(factory=dict)
    #: ``settings.calibration_mask`` with the calibration batches' masks (:func:`_capture`).
    mask: TokenMask | None = None

    @property
    def sequential(self) -> bool:
        return self.schedule.settings.calibration == "sequential"

    def new_activations(self) -> Activations:
        self.generation += 1
        return Activations(self.work / f"activations-{self.generation}" if self.offload == "disk" else None)


def _layer_stats(run: _Run, runner: BlockRunner, layers: Sequence[str], replacements: Mapping[str, nn.Module],
                 sources: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The calibration statistics of layers of the runner's block, as a one-step sequential (or independent)
    in-memory run collects them: a run of layers whose inputs do not depend on one another's
    (:func:`~musco_core.run._independent_run`) together, the first alone where plain statistics are due."""
    streams = run.streams
    if not run.sequential or not streams.diverged and not replacements:
        return collect_input_stats(runner, layer_specs(runner, layers[:1], run.registry),
                                   _Batches(streams.reference), progress=run.progress, mask=run.mask)
    specs = layer_specs(runner, layers, run.registry)
    upstream = set().union(*(sources.get(name, replacements) for name in layers))
    paths = module_paths(runner)
    swaps = {path: new for old, new in replacements.items() if old in upstream
             for path in paths[id(runner.get_submodule(old))]}
    return collect_sequential_stats(runner, specs, swaps, _Batches(streams.actual), progress=run.progress,
                                    reference_batches=_Batches(streams.reference) if streams.diverged else None,
                                    mask=run.mask)


def _compress_block(run: _Run, runner: BlockRunner, names: Sequence[str]) -> dict[str, nn.Module]:
    """Compresses the schedule's layers ``names`` of the runner's block in forward order; the new layers."""
    needing = set(needs_input_stats(runner, run.schedule, run.registry, names))
    sources: dict[str, list[str]] = {}
    if run.streams is not None and len(names) > 1:
        reference = _Batches(run.streams.reference)
        names, sources = (layer_dataflow(runner, names, reference) if run.sequential else
                          (forward_order(runner, names, reference), {}))
    replacements: dict[str, nn.Module] = {}
    results: dict[str, LayerResult] = {}
    calibrated: dict[str, Any] = {}  # statistics collected with an earlier layer's, until the layer comes
    for name in names:
        layer = run.schedule.layers[name]
        module = runner.get_submodule(name)
        stats = None
        if name in needing:
            if name not in calibrated:
                if run.sequential:  # a replacement the block cannot take is kept before it is swapped in to calibrate
                    _keep_unfaithful(run, runner, replacements, results)
                layers = _independent_run(names, names.index(name), needing, sources) if run.sequential else [name]
                calibrated.update(_layer_stats(run, runner, layers, replacements, sources))
            stats = calibrated.pop(name)
        chosen = {"keep_note": tied_note(run.tied[name])} if name in run.tied and not layer.force else {}
        try:
            new, results[name] = compress_layer(module, name, layer, run.schedule.settings, run.registry, None,
                                                input_stats=stats, **chosen)
        except Exception as exc:  # a plugin's bug too: nothing is written, the model is as it was
            reason = str(exc) if isinstance(exc, MuscoError) else f"{type(exc).__name__}: {exc}"
            raise CompressionError(f"layer {name!r}: {reason}; nothing was written") from exc
        if new is not None:
            replacements[name] = new
    _keep_unfaithful(run, runner, replacements, results)
    for name in replacements.keys() & run.tied.keys():  # forced: its row notes the tie, as the in-memory run's
        note = untied_note(runner, runner.get_submodule(name), replacements[name], run.tied[name])
        results[name] = attrs.evolve(results[name], note="; ".join(filter(None, [results[name].note, note])))
    run.results += results.values()
    for name, new in replacements.items():
        run.records[name] = io.LayerRecord(new.decomposition, new.ranks, new.spec, list(new.layouts))
    before = count_params(runner)  # the block's, counted as the model counts them: a weight still tied stays
    with _swapped(runner, replacements):
        run.params_change += count_params(runner) - before
    return replacements


def _keep_unfaithful(run: _Run, runner: BlockRunner, replacements: dict[str, nn.Module],
                     results: dict[str, LayerResult]) -> None:
    """Keeps as they are (taken out of ``replacements``, the reason in ``results``) the layers the model reads
    outside their block (:func:`_watching`) and those whose replacement the runner's block does not use as it uses
    the layer (:func:`~musco_core.verify.unfaithful_swaps`), run on its first calibration input; without
    calibration data there is no input, and no check."""
    if run.streams is None or not replacements:
        return
    swaps = {name: (runner.get_submodule(name), new) for name, new in replacements.items()}
    unfaithful = {name: run.read_outside[name] for name in replacements if name in run.read_outside}
    for name in unfaithful:
        del swaps[name]
    if swaps:
        unfaithful |= unfaithful_swaps(runner, swaps, module_paths(runner), _Batches(run.streams.actual)[0])
    for name, why in unfaithful.items():
        log.warning("layer %r: kept as is: %s", name, why)
        results[name] = results[name].kept(why)
        del replacements[name]


@contextlib.contextmanager
def _swapped(runner: BlockRunner, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside, the new layers are in the runner's block (under every name of the layer they replace)."""
    paths = module_paths(runner)
    originals = {path: runner.get_submodule(name) for name in replacements for path in
                 paths[id(runner.get_submodule(name))]}
    by_path = {path: replacements[name] for name in replacements
               for path in paths[id(runner.get_submodule(name))]}
    try:
        for path, new in by_path.items():
            replace_module(runner, path, new)
        yield
    finally:
        for path, old in originals.items():
            replace_module(runner, path, old)


def _outputs(run: _Run, runner: BlockRunner, inputs: Activations) -> Activations:
    """The runner's block applied to each of ``inputs`` (with each batch's other arguments)."""
    produced = run.new_activations()
    with _calibration_pass(runner):
        for batch in _Batches(inputs):
            produced.append(runner(*batch))
    return produced


def _propagate(run: _Run, runner: BlockRunner, replacements: Mapping[str, nn.Module]) -> None:
    """Replaces the streams by the block's outputs: the original block's on the reference inputs and, under
    sequential calibration, the compressed block's on the actual inputs (one stream while both are the same)."""
    streams = run.streams
    reference = _outputs(run, runner, streams.reference)
    if run.sequential and (streams.diverged or replacements):
        with _swapped(runner, replacements):
            actual = _outputs(run, runner, streams.actual)
    else:
        actual = reference
    _release(streams)
    run.streams = _Streams(actual, reference)


def _release(streams: _Streams) -> None:
    streams.actual.release()
    if streams.diverged:
        streams.reference.release()


@without_autocast
def compress_blockwise(model: nn.Module, schedule: Any, blocks: str | Sequence[str], output: str | os.PathLike, *,
                       checkpoint: str | os.PathLike | None = None, calibration_data: Any = None,
                       registry: Registry | None = None, offload: str = "cpu",
                       work_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                       progress: bool = True, overwrite: bool = False) -> CompressionReport:
    """Compresses every layer of ``schedule`` once, one block of the model at a time, and writes the result to
    ``output`` as an output set (:func:`musco_core.io.load_compressed` loads it on a fresh model).

    ``model`` is the architecture; its parameters and buffers on the ``meta`` device are read from ``checkpoint``
    (a safetensors file, or a folder of them, keyed as ``model.state_dict()``), those on a real device are used
    as they are. ``blocks`` names the partition: module names and ``re:`` patterns (see :func:`resolve_blocks`);
    every compressed layer must lie in a block, and no block may share a tensor with anything outside it.
    ``schedule`` is a YAML file's path, its data or a ModelSchedule, compressing each layer once
    (``nglobal_compress_iters: 1``) with per-layer rank selectors. ``calibration_data`` (required by data-aware
    decompositions) is a list or DataLoader of input batches of the whole model, as for the ``Compressor``; the
    blocks' inputs are kept in memory on CPU (``offload="cpu"``) or in files under ``work_dir`` (``"disk"``),
    where the compressed blocks' shards also go (default: next to ``output``; removed at the end).
    ``device`` is where the blocks are computed. On the first calibration batch the whole model runs once, each
    block's weights read in turn, to check that the blocks are called as they are replayed (see the module's
    documentation); anything else is a ConfigError before anything is compressed. Each block is run with its
    replacements swapped in on its input from the first batch (:func:`~musco_core.verify.unfaithful_swaps`): a
    layer the block uses other than by calling it is kept as it is, and so is one whose weights (or other module
    attributes) the model reads outside its block in that first pass. Without ``calibration_data`` there is no
    block input, and no such check.

    Under ``calibration: sequential`` (the default) the result is that of a one-step in-memory run
    (``ft_every`` at least the number of layers) with the same schedule and data, to float rounding; the report
    counts parameters only (there is no example pass, so no MACs). ``model`` is not modified (but by its own
    forward, which is refused for it: :func:`~musco_core.stats.parameters_kept`), and ``output``
    gets the new set as a whole or, on any failure, nothing. A caller's ``torch.autocast`` is off inside, as in
    :func:`~musco_core.run.run_step`.
    """
    registry = registry or default_registry()
    if offload not in OFFLOAD_MODES:
        raise ConfigError(f"offload: expected one of {', '.join(OFFLOAD_MODES)}, got {short_repr(offload)}")
    if work_dir is not None and not Path(work_dir).is_dir():
        raise ConfigError(f"work_dir {work_dir}: {'is not a folder' if Path(work_dir).exists() else 'does not exist'}; "
                          f"expected the folder where the shards and activations go")
    device = torch.device(device)
    block_names = resolve_blocks(model, blocks)
    checked = _blockwise_schedule(model, schedule, registry)
    _check_partition(model, block_names, checked)
    layers = checked.compressed_layers()
    weighted = list(output_projections(model, checked, registry, layers))
    if weighted:
        raise ConfigError(f"compress_blockwise: layer(s) {', '.join(map(repr, weighted[:5]))} weigh their fit by the "
                          f"model's output (output_weighting), which needs a backward pass through the whole model; "
                          f"blockwise compression holds one block at a time: use the Compressor or turn it off")
    calibration = check_calibration(model, checked, registry, layers, calibration_data)
    if calibration is not None and not needs_input_stats(model, checked, registry, layers):
        first = next(iter(calibration), None)  # no statistics: one batch, each block's input for its check
        if first is None:
            raise ConfigError("calibration data is empty: no batch to check the blocks' replacements on; pass at "
                              "least one batch, or none")
        calibration = [first]
    source = Checkpoint(checkpoint) if checkpoint is not None else None
    _check_checkpoint(model, _tensor_names(model), source)
    output = Path(output)
    run_id = uuid.uuid4().hex  # each call is a run of its own: the output of another is refused without overwrite
    io.check_claims([(output, "output")], run_id, overwrite=overwrite)  # before the lock writes into a refused folder
    with io.output_lock(output):
        io.claim_folder(output, "output", run_id, overwrite=overwrite)
        parent = Path(work_dir or output.parent)
        _remove_stale_work(parent)
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent))
        try:
            io.write_marker(work, WORK_KIND, run_id)
            with io.folder_lock(work):  # held while the run lives: a later run never removes a live run's folder
                run = _Run(checked, registry, device, work, offload, progress, tied_parameters(model, layers))
                report, write_weights = _blockwise(model, block_names, calibration, source, run)
                io.save_output_set(output, run.records, write_weights, registry=registry, report=report,
                                   run_id=run_id, overwrite=overwrite)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("blockwise compression: %d of %d layers compressed, %d -> %d weights, written to %s",
             sum(r.applied for r in report.layers), len(layers), report.params_before, report.params_after, output)
    return report


def _blockwise(model: nn.Module, blocks: Sequence[str], calibration: Any, checkpoint: Checkpoint | None, run: _Run
               ) -> tuple[CompressionReport, Callable[[Path, dict[str, str]], None]]:
    """The blockwise pass: the report (the factorized layers go to ``run.records``) and the writer of the output
    set's weights, which copies the shards and the tensors outside the blocks into one file."""
    names = _tensor_names(model)
    params_before = count_params(model)
    if calibration is not None:
        first = run.new_activations()
        outside = [module for name, module in model.named_modules() if _owner(name, blocks) is None]
        with _onloaded(outside, names, checkpoint, run.device), \
                _watching(model, run.schedule.compressed_layers(), blocks) as watch:
            run.calls, run.hidden_keyword, run.mask = _capture(
                model, blocks, calibration, run.device, first, run.progress,
                lambda block: _onloaded(list(block.modules()), names, checkpoint, run.device), watch,
                token_mask(model, run.schedule.settings.calibration_mask))
        run.read_outside = {name: f"the model reads its {attribute!r} outside its block {_owner(name, blocks)!r}: it "
                                  f"uses the layer other than by calling it" for name, attribute in watch.read.items()}
        run.streams = _Streams(first, first)
    layers = run.schedule.compressed_layers()
    for index, path in enumerate(_bar(blocks, "blockwise compression", run.progress)):
        block = model.get_submodule(path)
        with _onloaded(list(block.modules()), names, checkpoint, run.device):
            runner = BlockRunner(path, block, run.calls, run.hidden_keyword, run.device)
            replacements = _compress_block(run, runner, [name for name in layers if _inside(name, path)])
            with _swapped(runner, replacements):
                entries, aliases = _write_shard(run.work / f"block-{index:05d}.safetensors", runner.block,
                                                path + ".")
            run.entries += entries
            run.aliases.update(aliases)
            if run.streams is not None and index + 1 < len(blocks):
                _propagate(run, runner, replacements)
        log.info("block %r: %d layer(s) compressed", path, len(replacements))
    if run.streams is not None:
        _release(run.streams)
    rest, rest_aliases = _rest_entries(model, blocks, names, checkpoint)
    entries, aliases = rest + run.entries, {**rest_aliases, **run.aliases}
    order = {name: i for i, name in enumerate(layers)}
    report = CompressionReport(sorted(run.results, key=lambda result: order[result.name]), params_before,
                               params_before + run.params_change)

    def write_weights(path: Path, metadata: dict[str, str]) -> None:
        write_safetensors(path, entries, {**metadata, **aliases})

    return report, write_weights
