"""Texts of hostile YAML and JSON documents: small files that expand, nest or spill without bound."""
from __future__ import annotations


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A flow sequence of nested aliases: ~600 bytes that expand to ``width ** levels`` (387 million) strings."""
    anchors = ["&l0 [" + ", ".join(['"lol"'] * width) + "]"]
    anchors += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(anchors) + "]"


def merge_bomb(levels: int = 9, width: int = 9) -> str:
    """Mappings that merge the previous one ``width`` times (``<<: [*m, *m, ...]``): the merged key lists grow
    exponentially while the file stays small."""
    lines = ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(width)) + "}"]
    lines += [f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * width) + "]}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def alias_chain(length: int) -> str:
    """``a1: [*a0]``, ``a2: [*a1]``, ...: each alias nests one level deeper, ``length`` levels in all."""
    lines = ["a0: &a0 [leaf]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, length)]
    return "\n".join(lines) + "\n"


def flow_nesting(depth: int) -> str:
    return "version: " + "[" * depth + "]" * depth + "\n"


def block_nesting(depth: int) -> str:
    return "".join("  " * level + f"k{level}:\n" for level in range(depth)) + "  " * depth + "leaf\n"


def json_nesting(depth: int) -> str:
    return "[" * depth + "]" * depth
