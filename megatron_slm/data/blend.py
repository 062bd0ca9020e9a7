"""Megatron's blend list (``--data-path``), read without importing megatron-core or torch, so that the commands
that only read a run's files (``slm reweight``) stay pure Python."""

from __future__ import annotations

from megatron_slm.errors import DataError


def _weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(paths: list | None) -> tuple[list[str], list[float] | None] | None:
    """``[prefix, ...]`` or ``[weight, prefix, weight, prefix, ...]`` -> (prefixes, weights or None), the blend
    megatron-core's dataset config takes (the format of its ``get_blend_from_list``); None for no list. An even
    list whose every other item is a number is weighted; one where no such item is a number lists prefixes."""
    if not paths:
        return None
    items = [str(p) for p in paths]
    if len(items) % 2 == 0:
        weights = [_weight(w) for w in items[0::2]]
        if all(w is not None for w in weights):
            return [p.strip() for p in items[1::2]], weights
        if any(w is not None for w in weights):
            raise DataError(
                f"data path {paths!r} is not a list of prefixes or of 'weight prefix' pairs (some "
                "weights are not numbers)"
            )
    return [p.strip() for p in items], None
