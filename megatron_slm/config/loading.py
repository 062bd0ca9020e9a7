"""Building a draft config: built-in defaults <- a YAML file <- overrides <- command-line flags, model shapes
filled from presets, the reference's unset shape fields from the policy's. What needs files (a checkpoint's
architecture, the data's vocabulary, a resume) is resolved later, once: ``megatron_slm/training/resolve.py``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from megatron_slm.config.schema import Config, ModelConfig, _flag_for, _get, _leaf_type, _set
from megatron_slm.errors import ConfigError


def _coerce(value: Any, tp, where: str):
    if value is None:
        return None
    if tp is list:
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, str) and value.lower() in ("none", "null") and tp is not str:
            return None
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None


def _merge_dict(cfg, data: dict, prefix=(), source="config"):
    for key, value in data.items():
        path = prefix + (key,)
        try:
            current = _get(cfg, path)
        except AttributeError:
            raise ConfigError(
                f"{source}: unknown key '{'.'.join(path)}'. Valid keys under "
                f"'{'.'.join(prefix) or '<top>'}': "
                f"{', '.join(f.name for f in dataclasses.fields(_get(cfg, prefix)))}"
            ) from None
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{'.'.join(path)}' is a section; give it a mapping")
            _merge_dict(cfg, value, path, source)
        else:
            _set(cfg, path, _coerce(value, _leaf_type(cfg, path), f"{source}: {'.'.join(path)}"))
            _mark_explicit(cfg, path)


def _mark_explicit(cfg: Config, *paths: tuple) -> None:
    cfg.explicit = cfg.explicit | {".".join(p) for p in paths}


def load_config(path: str | None = None, overrides: dict | None = None, args=None) -> Config:
    """A draft Config from defaults <- YAML file <- ``overrides`` (nested dict) <- parsed CLI ``args``."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:  # safe_load: plain data only (a config from elsewhere with !!python/... tags runs no code)
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        _merge_dict(cfg, data, source=str(path))
    if overrides:
        _merge_dict(cfg, overrides, source="overrides")
    if args is not None:
        for key, value in vars(args).items():
            if key.startswith("cfg__") and value is not None:
                p = tuple(key[len("cfg__") :].split("__"))
                _set(cfg, p, _coerce(value, _leaf_type(cfg, p), _flag_for(p)))
                _mark_explicit(cfg, p)
    fill_model_shapes(cfg)
    return cfg


def fill_model_shapes(cfg: Config) -> Config:
    """Fill model shapes from presets and the reference's unset fields from the policy."""
    from megatron_slm.model.presets import PRESETS, apply_preset

    apply_preset(cfg.model)
    ref = cfg.reference.model
    if ref.preset:
        apply_preset(ref)
    for section, m in ((("model",), cfg.model), (("reference", "model"), ref)):
        if m.preset:  # a preset is the user's choice of shape: its fields count as set
            _mark_explicit(cfg, *(section + (k,) for k in PRESETS[m.preset]))
    for f in dataclasses.fields(ModelConfig):
        if f.name != "preset" and getattr(ref, f.name) is None:
            setattr(ref, f.name, getattr(cfg.model, f.name))
    if cfg.model.num_query_groups is None:
        cfg.model.num_query_groups = cfg.model.num_attention_heads
    if ref.num_query_groups is None:
        ref.num_query_groups = ref.num_attention_heads
    return cfg
