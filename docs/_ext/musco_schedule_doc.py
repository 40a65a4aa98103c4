"""Sphinx directives that render the schedule reference from the attrs classes themselves, so it cannot drift.

``schedule-keys``
    One table (key / type / default / description) for the fields of one attrs class, e.g.
    ``musco_core.schedule.RunSettings``. Options: ``:omit:`` fields that are not YAML keys, ``:names:``
    ``field=role`` pairs for fields whose value names a registered component (the type column then lists the
    registered names).

``component-params``
    One table for the ``Params`` classes of every component of a role (``decompositions`` or
    ``rank_selectors``) in :func:`musco_core.default_registry`, with the distribution that supplied each component.

The description of a field is, in this order: its ``#:`` doc comment in the source; the class docstring when the
class has that one field; a line ``field: text`` (``schedule-keys``) or ``ParamsClass.field: text``
(``component-params``) in the directive's content (ignored once the source documents the field). A field of a
bundled class (``musco_core``, ``musco_plugins``) with no description, or a content line naming a field that does
not exist, is a warning, and so fails ``sphinx-build -W``: adding, renaming or removing a schedule key without
documenting it breaks the docs build instead of leaving a stale page. An installed third-party plugin's
undocumented field is shown with an empty description.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import types
import typing
from typing import Any, ClassVar

import attrs
from docutils import nodes
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

# Readable names for the constrained types of musco_core.schedule (singular, plural). An unknown NewType is shown
# by its name and base type, so a new one renders (less prettily) rather than breaking the build.
TYPE_WORDS: dict[str, tuple[str, str]] = {
    "PositiveInt": ("positive int", "positive ints"),
    "NonNegativeInt": ("int >= 0", "ints >= 0"),
    "NonNegativeFloat": ("number >= 0", "numbers >= 0"),
    "UnitFraction": ("number in [0, 1]", "numbers in [0, 1]"),
    "ReductionRate": ("number > 1", "numbers > 1"),
    "Seed": ("int in [0, 2**63)", "ints in [0, 2**63)"),
    "StageCount": ("int in [1, 64]", "ints in [1, 64]"),
    "Rank": ("rank (a positive int, or a list of 1 to 8 positive ints)",
             "ranks (each a positive int, or a list of 1 to 8 positive ints)"),
    "RankList": ("list of ranks, one per compression (each a positive int, or a list of 1 to 8 positive ints)",
                 "lists of ranks"),
    "RankMultiple": ("int in [1, 4096]", "ints in [1, 4096]"),
    "Key": ("non-empty string", "non-empty strings"),
    "ModuleSelectors": ("non-empty list of module names and re: patterns", "lists of module names and re: patterns"),
}
BUILTIN_WORDS: dict[Any, tuple[str, str]] = {
    int: ("int", "ints"),
    float: ("number", "numbers"),
    str: ("string", "strings"),
    bool: ("true or false", "true or false"),
    type(None): ("null", "null"),
    typing.Any: ("any value", "any values"),
}
BUNDLED_MODULES = ("musco_core", "musco_plugins")
ROLE_WORDS = {"decompositions": "decomposition", "rank_selectors": "rank selector", "schedulers": "scheduler",
              "adapters": "layer adapter"}


# -- text ------------------------------------------------------------------------------------------------------
def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, joined into one line."""
    text = inspect.cleandoc(doc or "")
    return " ".join(text.split("\n\n", 1)[0].split()) if text else ""


_INLINE = re.compile(r"``(?P<literal>.+?)``|:[\w:]+:`~?(?P<role>[^`]+)`|`(?P<default>[^`]+)`")


def inline(text: str) -> list[nodes.Node]:
    """Docstring text as inline nodes: ``code`` and :role:`target` become literals, the rest plain text."""
    result: list[nodes.Node] = []
    position = 0
    for match in _INLINE.finditer(text):
        if match.start() > position:
            result.append(nodes.Text(text[position:match.start()]))
        if match.group("literal") is not None:
            result.append(nodes.literal(text=match.group("literal")))
        elif match.group("role") is not None:
            target = match.group("role")
            result.append(nodes.literal(text=target.rsplit(".", 1)[-1] if "<" not in target else target))
        else:
            result.append(nodes.literal(text=match.group("default")))
        position = match.end()
    if position < len(text):
        result.append(nodes.Text(text[position:]))
    return result


# -- types and defaults ----------------------------------------------------------------------------------------
def describe_type(tp: Any, plural: bool = False) -> str:
    """A type annotation in words, e.g. ``dict[str, LayerSchedule | None]`` -> ``mapping string -> ...``."""
    index = 1 if plural else 0
    if tp in BUILTIN_WORDS:
        return BUILTIN_WORDS[tp][index]
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # a typing.NewType
        name = tp.__name__
        return TYPE_WORDS[name][index] if name in TYPE_WORDS else f"{name} ({describe_type(supertype, plural)})"
    if attrs.has(tp):
        return f"{tp.__name__} mapping" + ("s" if plural else "")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        words = " or ".join(describe_type(a, plural) for a in others)
        return f"{words} or null" if len(others) < len(args) else words
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        item = args[0] if args else typing.Any
        return ("lists" if plural else "list") + f" of {describe_type(item, plural=True)}"
    if origin is dict or tp is dict:
        key, value = args if args else (typing.Any, typing.Any)
        return ("mappings" if plural else "mapping") + f" {describe_type(key)} -> {describe_type(value)}"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """A default value as it is written in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if attrs.has(type(value)):
        return "(all defaults)"
    if isinstance(value, (list, tuple)) and not value:
        return "[]"
    if isinstance(value, dict) and not value:
        return "{}"
    return repr(value)


def format_default(field: attrs.Attribute) -> str | None:
    """The field's default in YAML form, or None when the key is required."""
    default = field.default
    if default is attrs.NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return format_value(default.factory())
    return format_value(default)


# -- descriptions ----------------------------------------------------------------------------------------------
@functools.cache
def _attr_docs(module: str) -> dict[tuple[str, str], list[str]]:
    try:
        return ModuleAnalyzer.for_module(module).find_attr_docs()
    except Exception:  # noqa: BLE001 - a module without source (e.g. compiled) simply has no #: comments
        return {}


def source_docs(cls: type) -> dict[str, str]:
    """Field descriptions found in the source: ``#:`` comments, or the class docstring of a one-field class."""
    fields = attrs.fields(cls)
    docs = {}
    for field in fields:
        lines = _attr_docs(cls.__module__).get((cls.__qualname__, field.name))
        if lines:
            docs[field.name] = " ".join(" ".join(lines).split())
    if len(fields) == 1 and fields[0].name not in docs and first_paragraph(cls.__doc__):
        docs[fields[0].name] = first_paragraph(cls.__doc__)
    return docs


def is_bundled(cls: type) -> bool:
    return cls.__module__.split(".")[0] in BUNDLED_MODULES


def parse_supplements(lines: list[str]) -> dict[str, str]:
    """``key: text`` lines of a directive's content; indented lines continue the previous entry."""
    entries: dict[str, str] = {}
    key = None
    for line in lines:
        if not line.strip():
            continue
        if line[:1].isspace() and key is not None:
            entries[key] += " " + line.strip()
            continue
        key, separator, text = line.partition(":")
        key = key.strip()
        if not separator or not key:
            raise ValueError(f"expected 'key: description', got {line!r}")
        entries[key] = text.strip()
    return entries


# -- tables ----------------------------------------------------------------------------------------------------
def _entry(cell: Any) -> nodes.entry:
    entry = nodes.entry()
    if cell is None or cell == "":
        return entry
    paragraph = nodes.paragraph()
    paragraph += inline(cell) if isinstance(cell, str) else cell
    entry += paragraph
    return entry


def build_table(header: list[str], rows: list[list[Any]], widths: list[int], classes: list[str]) -> nodes.table:
    table = nodes.table(classes=["musco-keys", *classes])
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head_row = nodes.row()
    for title in header:
        head_row += _entry(title)
    head += head_row
    body = nodes.tbody()
    group += body
    for cells in rows:
        row = nodes.row()
        for cell in cells:
            row += _entry(cell)
        body += row
    return table


def literal(text: str) -> list[nodes.Node]:
    return [nodes.literal(text=text)]


def default_cell(field: attrs.Attribute) -> list[nodes.Node]:
    value = format_default(field)
    return [nodes.emphasis(text="required")] if value is None else literal(value)


def field_rows(cls: type, supplements: dict[str, str], used: set[str], prefix: str, omit: set[str],
               names: dict[str, list[str]], warn) -> list[list[Any]]:
    """One row per field of ``cls``: key, type, default, description."""
    hints = typing.get_type_hints(cls)
    docs = source_docs(cls)
    rows = []
    for field in attrs.fields(cls):
        if field.name in omit:
            continue
        key = f"{prefix}{field.name}"
        used.add(key)
        description = docs.get(field.name) or supplements.get(key)
        if not description:
            if is_bundled(cls):
                warn(f"{cls.__module__}.{cls.__qualname__}.{field.name} has no description: add a '#:' comment "
                     f"above the field or a line '{key}: ...' to this directive")
            description = ""
        if field.name in names:
            type_cell: Any = [nodes.Text("name of a registered component: ")]
            for i, name in enumerate(names[field.name]):
                type_cell += [nodes.Text(", ")] if i else []
                type_cell.append(nodes.literal(text=name))
        else:
            type_cell = describe_type(hints.get(field.name, typing.Any))
        rows.append([literal(field.name), type_cell, default_cell(field), description])
    return rows


class _Base(SphinxDirective):
    has_content = True
    required_arguments = 1

    def warn(self, message: str) -> None:
        logger.warning(f"{self.name}: {message}", location=self.get_location(), type="musco", subtype="schedule")

    def supplements(self) -> dict[str, str]:
        try:
            return parse_supplements(list(self.content))
        except ValueError as exc:
            self.warn(str(exc))
            return {}

    def check_unused(self, supplements: dict[str, str], used: set[str]) -> None:
        for key in sorted(set(supplements) - used):
            self.warn(f"the description for {key!r} names no field (was it renamed or removed?)")

    @staticmethod
    def registry():
        from musco_core import default_registry

        return default_registry()


class ScheduleKeys(_Base):
    """``.. schedule-keys:: package.module.AttrsClass``: a table of the class's fields as schedule keys."""

    option_spec: ClassVar[dict] = {"omit": lambda text: [part.strip() for part in text.split(",") if part.strip()],
                   "names": lambda text: dict(part.split("=", 1) for part in text.split())}

    def run(self) -> list[nodes.Node]:
        module_name, _, class_name = self.arguments[0].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        self.env.note_dependency(inspect.getsourcefile(cls) or "")
        field_names = {field.name for field in attrs.fields(cls)}
        omit = set(self.options.get("omit", []))
        roles = self.options.get("names", {})
        for name in sorted((omit | set(roles)) - field_names):
            self.warn(f"{cls.__qualname__} has no field {name!r}")
        registry = self.registry() if roles else None
        names = {field: getattr(registry, role).names() for field, role in roles.items()}
        supplements = self.supplements()
        used = set(omit)
        rows = field_rows(cls, supplements, used, "", omit, names, self.warn)
        for key in sorted(omit & set(supplements)):  # an omitted field may still be described, as a note row
            rows.append([[nodes.emphasis(text="(other keys)")], "", "", supplements[key]])
        self.check_unused(supplements, used)
        return [build_table(["key", "type", "default", "description"], rows, [18, 22, 10, 50], ["schedule-keys"])]


class ComponentParams(_Base):
    """``.. component-params:: decompositions``: every registered component's ``Params`` fields."""

    def run(self) -> list[nodes.Node]:
        role_attr = self.arguments[0]
        if role_attr not in ROLE_WORDS:
            self.warn(f"unknown role {role_attr!r}; expected one of {', '.join(ROLE_WORDS)}")
            return []
        role = getattr(self.registry(), role_attr)
        supplements = self.supplements()
        used: set[str] = set()
        rows: list[list[Any]] = []
        for name in role.names():
            provided = role.entries[name]
            params = provided.component.Params
            self.env.note_dependency(inspect.getsourcefile(provided.component) or "")
            component_cell = literal(name) + [nodes.Text(f" ({provided.source.distribution})")]
            if getattr(provided.component, "scope", "layer") == "model":  # run-wide: under settings.algo_kwargs
                component_cell += [nodes.Text(", whole-model: keys of "),
                                   *literal(f"settings.algo_kwargs.{name}")]
            fields = attrs.fields(params)
            if not fields:
                rows.append([component_cell, "", "", "", "no parameters"])
                continue
            for i, row in enumerate(field_rows(params, supplements, used, f"{params.__qualname__}.", set(), {},
                                               self.warn)):
                rows.append([component_cell if i == 0 else None, *row])
        self.check_unused(supplements, used)
        return [build_table([ROLE_WORDS[role_attr], "key", "type", "default", "description"], rows,
                            [16, 18, 18, 8, 40], ["component-params"])]


def strip_doctest_endings(app, doctree) -> None:
    """Drops the blank line that ends each ``pycon`` block in the pages.

    pytest's doctest parser would read a closing code fence right after an example's output as part of the
    expected output, so every doctest block in the Markdown pages ends with a blank line; it is not shown.
    """
    for node in doctree.findall(nodes.literal_block):
        if node.get("language") == "pycon" and node.rawsource.endswith("\n"):
            text = node.rawsource.rstrip("\n")
            node.rawsource = text
            node[:] = [nodes.Text(text)]


def setup(app):
    app.add_directive("schedule-keys", ScheduleKeys)
    app.add_directive("component-params", ComponentParams)
    app.connect("doctree-read", strip_doctest_endings)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
