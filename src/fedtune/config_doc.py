"""The settings tree as commented YAML (``fedtune config``): every key of a RunConfig with its
value, its help text, its allowed values and, where the value is not the default, the default.

The output is a valid config file: ``yaml.safe_load`` of it gives the config back.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import typing
from typing import Any, Optional

import yaml

from fedtune.config import RunConfig
from fedtune.errors import ConfigError

WIDTH = 100
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def sections(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every section's dotted name (``lora``, ``data.columns`` ...)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.append(prefix + f.name)
            out.extend(sections(hints[f.name], f"{prefix}{f.name}."))
    return out


def is_section(name: str) -> bool:
    return name in sections()


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").removesuffix("...").strip()


def _number(x: Any) -> str:
    if isinstance(x, int) and x >= 2**32 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return str(x)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _note(f: dataclasses.Field, value: Any) -> str:
    meta = f.metadata
    parts = [meta.get("help", "")]
    if meta.get("choices"):
        parts.append("one of: " + (meta.get("choice_text") or ", ".join(map(str, meta["choices"]))))
    bounds = [f"{word} {_number(meta[op])}" for op, word in _BOUNDS if op in meta]
    if bounds:
        parts.append(", ".join(bounds))
    default = _default(f)
    if not dataclasses.is_dataclass(default) and value != default:
        parts.append(f"default: {_scalar(default)}")
    return "; ".join(p for p in parts if p)


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                         break_long_words=False, break_on_hyphens=False) or []


def _lines(obj: Any, depth: int) -> list[str]:
    indent = "  " * depth
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _comment(f.metadata.get("help", ""), indent) + [f"{indent}{f.name}:"] + _lines(value, depth + 1)
        else:
            out += _comment(_note(f, value), indent) + [f"{indent}{f.name}: {_scalar(value)}"]
    return out


def render(cfg: RunConfig, section: Optional[str] = None) -> str:
    """``cfg`` (or one section of it, e.g. ``lora`` or ``data.columns``) as commented YAML."""
    node: Any = cfg
    if section:
        names = sections()
        if section not in names:
            hint = difflib.get_close_matches(section, names, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"no config section '{section}'{extra}; the sections are: {', '.join(n for n in names if '.' not in n)}")
        for part in section.split("."):
            node = getattr(node, part)
        parts = section.split(".")
        head = [f"{'  ' * i}{p}:" for i, p in enumerate(parts)]
        return "\n".join(head + _lines(node, len(parts))) + "\n"
    return "\n".join(_lines(node, 0)) + "\n"
