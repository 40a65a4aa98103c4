"""Compression reports: what every step did to every layer, with model totals, as a table or as JSON."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from .engine import LayerResult
from .schedule import NonNegativeFloat, NonNegativeInt, PositiveInt

#: Version of the report's JSON form. 2 added the budgets' ``measured`` speed-up, 3 the run's ``inputs_changed``;
#: reports of format 1 and 2 still load.
REPORT_FORMAT = 3
READABLE_REPORT_FORMATS = (1, 2, 3)


def _ratio(before: int | None, after: int | None) -> float | None:
    return None if not before or not after else before / after


@attrs.frozen
class BudgetRecord:
    """What a whole-model rank selector planned for one pass: the whole model's reduction by ``metric`` it aimed
    at after the pass (``target``, cumulative over the passes) and the one its ranks give (``planned``); the
    scheduled layers' only where ``metric`` says so (the bundled budget's ``params (compressed layers)``).

    For ``metric: latency``, ``measured`` is the whole model's speed-up since the run began as measured on this
    machine: at the end of every step that compressed the selector's layers, the model with the step's replacements
    swapped in was timed in alternation against it with them swapped out (the first such step: against the model as
    the run began, the layers earlier steps factorized swapped back to dense ones), and the ratios multiplied over
    the steps (None for other metrics, and until the first such step ends).
    """

    selector: str
    pass_index: NonNegativeInt
    n_passes: PositiveInt
    metric: str
    target: NonNegativeFloat
    planned: NonNegativeFloat
    note: str | None = None
    measured: NonNegativeFloat | None = None

    def describe(self) -> str:
        line = (f"{self.selector} pass {self.pass_index + 1}/{self.n_passes}: target {self.target:.3f}x "
                f"{self.metric}, planned {self.planned:.3f}x")
        if self.measured is not None:
            line += f", measured {self.measured:.3f}x"
        return line + (f" ({self.note})" if self.note else "")


@attrs.frozen
class CompressionReport:
    """Every layer compression so far (one row per layer and stage) and the model's totals.

    ``params_*`` count every parameter of the model, each memory once (a weight tied between layers, also as
    distinct Parameters over one tensor, counts once); ``macs_*`` count the compressible layers on the example
    input, every call of a layer the forward calls more than once (None when no input shapes were known).
    """

    layers: list[LayerResult]
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    #: Plans of whole-model rank selectors, one per selector and pass; the totals say what was achieved.
    budgets: list[BudgetRecord] = attrs.field(factory=list)
    #: Layers left out of the run, with why: those that must not be replaced, and those a generated schedule left
    #: out (the output layer, layers that cannot shrink).
    left_out: dict[str, str] = attrs.field(factory=dict)
    #: Changes of the run's inputs (calibration data, fine-tuning) that a resume was allowed to make, with the step
    #: they apply from: the steps before were made with the inputs the run began with.
    inputs_changed: list[str] = attrs.field(factory=list)

    @property
    def params_ratio(self) -> float | None:
        return _ratio(self.params_before, self.params_after)

    @property
    def macs_ratio(self) -> float | None:
        return _ratio(self.macs_before, self.macs_after)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT,
                "layers": [attrs.asdict(r, value_serializer=lambda _i, _a, v: list(v) if isinstance(v, tuple) else v)
                           for r in self.layers],
                "totals": {"params_before": self.params_before, "params_after": self.params_after,
                           "params_ratio": self.params_ratio, "macs_before": self.macs_before,
                           "macs_after": self.macs_after, "macs_ratio": self.macs_ratio},
                "budgets": [attrs.asdict(record) for record in self.budgets],
                "left_out": dict(self.left_out),
                "inputs_changed": list(self.inputs_changed)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """The report back from :meth:`to_dict` output (e.g. a ``report.json`` read with ``json.load``)."""
        if not isinstance(data, dict) or data.get("format") not in READABLE_REPORT_FORMATS:
            raise ValueError(f"not a musco-core report of format {' or '.join(map(str, READABLE_REPORT_FORMATS))}")
        rows = [LayerResult(**{**row, "ranks": tuple(row["ranks"]) if row["ranks"] is not None else None})
                for row in data["layers"]]
        totals = data["totals"]
        return cls(rows, totals["params_before"], totals["params_after"], totals["macs_before"],
                   totals["macs_after"], [BudgetRecord(**record) for record in data.get("budgets", [])],
                   {str(name): str(reason) for name, reason in data.get("left_out", {}).items()},
                   [str(change) for change in data.get("inputs_changed", [])])

    def to_table(self) -> str:
        """A fixed-width text table, one row per layer and stage, then the totals."""
        header = ("stage", "layer", "decomposition", "ranks", "weights before", "after", "MACs before", "after",
                  "rel.err", "seconds", "note")
        rows = [header]
        for r in self.layers:
            rows.append((str(r.stage + 1), r.name, r.decomposition,
                         ",".join(map(str, r.ranks)) if r.applied and r.ranks else "kept",
                         f"{r.params_before:,}", f"{r.params_after:,}", _count(r.macs_before), _count(r.macs_after),
                         "-" if r.relative_error is None else f"{r.relative_error:.4f}", f"{r.seconds:.2f}",
                         r.note or ""))
        lines = _columns(rows)
        lines.append("")
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,}" + _times(self.params_ratio))
        if self.macs_before is not None:
            lines.append(f"MACs of compressible layers: {self.macs_before:,} -> {self.macs_after:,}"
                         + _times(self.macs_ratio))
        lines.extend(record.describe() for record in self.budgets)
        if self.left_out:
            lines.append(f"left out ({len(self.left_out)}):")
            lines.extend(f"  {name}: {reason}" for name, reason in self.left_out.items())
        if self.inputs_changed:
            lines.append("inputs changed during the run (allowed on resume):")
            lines.extend(f"  {change}" for change in self.inputs_changed)
        return "\n".join(lines)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _times(ratio: float | None) -> str:
    """The reduction in words: a model that grew (a forced layer whose weights stay tied) is larger, not "0.80x
    smaller"."""
    if ratio is None:
        return ""
    return f" ({ratio:.2f}x smaller)" if ratio >= 1 else f" ({1 / ratio:.2f}x larger)"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = {0, 4, 5, 6, 7, 8, 9}
    return ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]
