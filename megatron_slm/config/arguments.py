"""Megatron-style command-line flags generated from the config tree: one flag per leaf, its help, default and
choices from the field's metadata; leaves under ``reference:`` take a ``ref-`` prefix (``--ref-load``).

A command takes the flags of the leaves it reads: ``add_override_arguments(parser, select)`` with ``select``
mapping a YAML section to ``ALL`` (every leaf of it) or to the names of its leaves (a subsection, such as the
reference's ``model``, is one name: all of its leaves)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping

from megatron_slm.config.schema import Config, _flag_for, _get, _leaf_paths, _leaf_type

ALL = "*"  # in a selection: every leaf of the section
Selection = Mapping[str, str | Iterable[str]]


def _show_default(value) -> str:
    if value is None:
        return "unset"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _selected_paths(cfg: Config, select: Selection | None) -> list:
    """(path, field) of the leaves ``select`` names, in the config tree's order; a name that is no section or
    leaf raises ValueError (a typo in a command's table fails at once, not silently)."""
    paths = list(_leaf_paths(cfg))
    if select is None:
        return paths
    sections = {p[0] for p, _ in paths}
    wanted = {}
    for section, names in select.items():
        if section not in sections:
            raise ValueError(f"no config section '{section}' (sections: {', '.join(sorted(sections))})")
        names = ALL if names == ALL else tuple(names)
        known = {p[1] for p, _ in paths if p[0] == section}
        unknown = [] if names == ALL else [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"config section '{section}' has no leaf {', '.join(unknown)}")
        wanted[section] = names
    return [(p, f) for p, f in paths if p[0] in wanted and (wanted[p[0]] == ALL or p[1] in wanted[p[0]])]


def add_override_arguments(parser: argparse.ArgumentParser, select: Selection | None = None) -> None:
    """One Megatron-style option per leaf of the config tree (``select``: only the leaves it names, see the
    module docstring; None: all), its help, default and choices taken from the field's metadata, in one
    argument group per section. Booleans are flags (``--bf16`` / ``--no-bf16``). Values left unset keep the
    YAML's."""
    cfg = Config()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, f in _selected_paths(cfg, select):
        section = ".".join(path[:-1])
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        tp = _leaf_type(cfg, path)
        meta = f.metadata
        text = meta.get("help", "").replace("%", "%%")
        default = _get(cfg, path)
        if path[:2] == ("reference", "model") and f.name != "preset":
            shown = " (default: the policy's)"
        elif default is None and "(unset:" in text:
            shown = ""  # the help says what unset means
        else:
            shown = f" (default: {_show_default(default)})"
        kwargs = dict(dest="cfg__" + "__".join(path), default=None, help=text + shown)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # coerced (and reported) by load_config, like YAML values
            is_path = path[-1].endswith(("load", "save", "dir", "path", "model", "checkpoint", "deepspeed"))
            kwargs["metavar"] = {int: "N", float: "X", list: "PATH"}.get(tp, "PATH" if is_path else "STR")
            if path[-1].endswith("_per_dataset"):
                kwargs["metavar"] = "K"
            if tp is list:
                kwargs["nargs"] = "+"
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
                del kwargs["metavar"]
        groups[section].add_argument(_flag_for(path), **kwargs)
