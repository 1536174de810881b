"""The YAML recipes that ship inside the package (``src/fedtune/recipes/``; in a clone,
``configs/`` links to the same folder).

Anything that takes a config accepts a recipe's name (``demo``, ``demo.yaml``) when no such
file exists: a real file always wins. The first line of a recipe's header comment is its
one-line description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fedtune.errors import ConfigError

RECIPES_DIR = Path(__file__).with_name("recipes")
SUFFIXES = (".yaml", ".yml")


def names() -> list[str]:
    """The bundled recipes' names, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def description(path: Path) -> str:
    """The first line of a recipe's header comment ('' when it has none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            return ""
        text = line.lstrip("#").strip()
        if text:
            return text
    return ""


def catalog() -> list[tuple[str, str]]:
    """(name, one-line description) for every bundled recipe."""
    return [(name, description(RECIPES_DIR / f"{name}.yaml")) for name in names()]


def _as_name(arg: str) -> Optional[str]:
    """The recipe name ``arg`` spells (``demo`` or ``demo.yaml``), or None for a path."""
    if "/" in arg or "\\" in arg:
        return None
    for suffix in SUFFIXES:
        if arg.endswith(suffix):
            return arg[: -len(suffix)]
    return arg


def recipe_path(name: str) -> Path:
    """The bundled recipe called ``name`` (with or without .yaml); ConfigError if there is none."""
    stem = _as_name(name)
    if stem is None or stem not in names():
        raise ConfigError(f"no bundled recipe '{name}'; the recipes are: {', '.join(names())}")
    return RECIPES_DIR / f"{stem}.yaml"


def resolve(config: str | Path) -> Path:
    """The file a CONFIG argument means: the file itself if it exists, else the bundled recipe
    it names; else ConfigError listing the recipes."""
    path = Path(config)
    if path.is_file():
        return path
    stem = _as_name(str(config))
    if stem is not None and stem in names():
        return RECIPES_DIR / f"{stem}.yaml"
    hint = ""
    if stem is None and Path(str(config)).stem in names():  # e.g. configs/demo.yaml outside a clone
        hint = f" (the bundled one is `{Path(str(config)).stem}`)"
    raise ConfigError(
        f"config file {config} not found and no bundled recipe has that name{hint}; "
        f"the recipes are: {', '.join(names())} (`fedtune recipes` describes them)"
    )


def copy(name: str, dest: str | Path | None = None) -> Path:
    """Write bundled recipe ``name`` to ``dest`` (a file, or a folder to put NAME.yaml in;
    default: ./NAME.yaml) to edit; refuses to overwrite. Returns the written path."""
    source = recipe_path(name)
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"{target} already exists; pick another destination or remove it first")
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent} is not a folder; create it first or pick another destination")
    try:
        with open(target, "x", encoding="utf-8") as f:  # "x": never replace a file that appeared meanwhile
            f.write(source.read_text(encoding="utf-8"))
    except FileExistsError:
        raise ConfigError(f"{target} already exists; pick another destination or remove it first") from None
    except OSError as e:
        raise ConfigError(f"cannot write {target} ({e.strerror or e}); pick another destination") from None
    return target
