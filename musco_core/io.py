"""Saving and loading compressed models without pickle.

A saved model is a directory:

* ``model.safetensors``: every tensor of the state dict;
* ``musco.yaml``: the factorized structure (each layer's geometry, decomposition, ranks and factor layouts), the
  resolved schedule with the concrete ranks of every layer, and the versions of musco-core and of the plugins
  that supplied the components;
* ``report.json``: the compression report, when a Compressor is saved.

Loading reads YAML safely and tensors with safetensors; nothing named in a file is imported or executed:
component names are only looked up among the installed plugins.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import attrs
import cattrs
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from ._version import __version__
from .components import Factor, FactorLayout, LayerSpec
from .errors import ConfigError, MuscoError
from .registry import Registry, default_registry
from .schedule import SCHEMA_VERSION, key_path, make_converter, plain_data, read_yaml, write_text_atomic
from .surgery import FactorizedLayer, module_paths, replace_module

MANIFEST = "musco.yaml"
WEIGHTS = "model.safetensors"
REPORT = "report.json"
MANIFEST_FORMAT = 1


@attrs.frozen
class LayerRecord:
    """How one layer was factorized, enough to rebuild its modules before the weights are loaded."""

    decomposition: str
    ranks: tuple[int, ...]
    spec: LayerSpec
    factors: list[FactorLayout]


def _converter() -> cattrs.Converter:
    converter = make_converter()
    converter.register_structure_hook(
        tuple[int, ...] | str, lambda value, _: value if isinstance(value, str) else
        converter.structure(value, tuple[int, ...]))
    return converter


def _factorized_layers(model: nn.Module) -> dict[str, FactorizedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FactorizedLayer)}


def save_compressed(model_or_compressor: Any, directory: str | os.PathLike, registry: Registry | None = None) -> Path:
    """Writes a compressed model (or a Compressor's model, schedule and report) to ``directory``.

    Save before :func:`standardize_model`: the factorized layers carry the structure that loading rebuilds.
    Each file is written atomically, so an interrupted save never leaves a half-written file.
    """
    from .compressor import Compressor

    compressor = model_or_compressor if isinstance(model_or_compressor, Compressor) else None
    model = compressor.compressed_model if compressor else model_or_compressor
    registry = registry or (compressor.registry if compressor else default_registry())
    layers = _factorized_layers(model)
    if not layers and compressor is None:
        raise MuscoError("the model has no factorized layers to save (was standardize_model called already?)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    converter = _converter()
    records = {name: converter.unstructure(LayerRecord(m.decomposition, m.ranks, m.spec, list(m.layouts)))
               for name, m in layers.items()}
    components = {(role, name) for m in layers.values()
                  for role, name in (("decomposition", m.decomposition), ("layer adapter", m.spec.adapter))}
    manifest = {
        "format": MANIFEST_FORMAT,
        "musco_core_version": __version__,
        "components": {f"{role}/{name}": _provenance(registry, role, name) for role, name in sorted(components)},
        "layers": plain_data(records),
        "schedule": {"version": SCHEMA_VERSION, "layers": {
            name: {"decomposition": m.decomposition, "rank_selection": "manual", "manual_rank": [list(m.ranks)]}
            for name, m in layers.items()}},
    }
    temporary = directory / f".{WEIGHTS}.tmp-{os.getpid()}"
    try:
        save_model(model, str(temporary), metadata={"musco_core_version": __version__})
        os.replace(temporary, directory / WEIGHTS)
    finally:
        temporary.unlink(missing_ok=True)
    write_text_atomic(directory / MANIFEST, yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None))
    if compressor is not None:
        write_text_atomic(directory / REPORT, compressor.report().to_json())
    return directory


def _provenance(registry: Registry, role: str, name: str) -> dict[str, str]:
    entries = {r.title: r for r in registry.roles}[role].entries
    if name not in entries:
        return {"plugin": "unknown", "distribution": "unknown", "version": "unknown"}
    source = entries[name].source
    return {"plugin": source.name, "distribution": source.distribution, "version": source.version}


def read_manifest(directory: str | os.PathLike) -> dict[str, LayerRecord]:
    """The factorized structure recorded in ``directory/musco.yaml``, checked field by field."""
    path = Path(directory) / MANIFEST
    data = read_yaml(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("layers"), dict):
        raise ConfigError(f"{path}: not a musco-core model manifest of format {MANIFEST_FORMAT}")
    converter, records, problems = _converter(), {}, []
    for name, raw in data["layers"].items():
        try:
            records[name] = converter.structure(raw, LayerRecord)
        except (cattrs.BaseValidationError, ValueError) as exc:
            where = key_path("$.layers", str(name))
            problems += [f"{path}: {line}" for line in cattrs.transform_error(exc, path=where)] \
                if isinstance(exc, cattrs.BaseValidationError) else [f"{path}: {where}: {exc}"]
    if problems:
        raise ConfigError("\n".join(problems))
    return records


def load_compressed(fresh_model: nn.Module, directory: str | os.PathLike, registry: Registry | None = None
                    ) -> nn.Module:
    """Rebuilds the factorized layers of a saved model on an uncompressed instance and loads its weights.

    Returns a new model; ``fresh_model`` is not modified, so a file that does not fit leaves nothing half-done.
    """
    registry = registry or default_registry()
    directory = Path(directory)
    records = read_manifest(directory)
    model = copy.deepcopy(fresh_model)
    paths = module_paths(model)
    modules = dict(model.named_modules())
    replacements = []
    for name, record in records.items():
        where = f"{directory / MANIFEST}: layer {name!r}"
        if name not in modules or not name:
            raise ConfigError(f"{where}: no layer of that name in {type(model).__name__}")
        module = modules[name]
        adapter = registry.adapter_for(module)
        if adapter is None or adapter.name != record.spec.adapter:
            raise ConfigError(f"{where}: the file has a {record.spec.adapter} layer, the model a "
                              f"{type(module).__name__}")
        spec, weight, _ = adapter.read(module)
        if spec != record.spec:
            raise ConfigError(f"{where}: the file has {record.spec.describe()}, the model {spec.describe()}")
        placeholders = [Factor(layout, torch.zeros(layout.weight_shape, dtype=weight.dtype, device=weight.device),
                               torch.zeros(layout.out_channels, dtype=weight.dtype, device=weight.device)
                               if layout.bias else None) for layout in record.factors]
        replacements.append((module, FactorizedLayer(spec, record.decomposition, record.ranks, record.factors,
                                                     adapter.build(spec, placeholders, weight))))
    for module, new in replacements:
        new.train(module.training)
        for path in paths[id(module)]:
            replace_module(model, path, new)
    weights = directory / WEIGHTS
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"{weights}: cannot load: {exc}") from None
    if missing or unexpected:
        raise ConfigError(f"{weights}: does not fit the rebuilt model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return model


def read_report(directory: str | os.PathLike):
    """The :class:`~musco_core.report.CompressionReport` saved in ``directory``."""
    from .report import CompressionReport

    path = Path(directory) / REPORT
    try:
        return CompressionReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a musco-core report: {exc}") from None
