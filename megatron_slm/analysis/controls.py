"""Controls for an SLM run: the blend weights under which plain CLM sees the same token mix (``slm reweight``).

SLM trains on dataset i's tokens in proportion w_i * f_i (w_i: the run's normalised blend weight, f_i: the share of
dataset i's valid tokens it selected). A CLM run with blend weights

    w'_i = w_i f_i / sum_j w_j f_j

trains on the same mix of datasets, so comparing SLM with it separates token selection from domain reweighting.
Pure Python: it only reads the run's summary.json (megatron_slm.training.run.summarize).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_slm.data.blend import parse_blend
from megatron_slm.errors import ConfigError


def blend_of(data_path: list) -> tuple[list[float], list[str]]:
    """Megatron's blend list (``[prefix]`` or ``[w, prefix, w, prefix, ...]``) -> (normalised weights, prefixes)."""
    items = [str(x) for x in data_path or []]
    prefixes, weights = parse_blend(items) or ([], None)
    if len(prefixes) == 1 and weights is None:
        return [1.0], prefixes
    if weights is None:  # several prefixes without weights, or no list: no blend to reweight
        raise ConfigError(f"data_path {items!r} is not a prefix or a list of 'weight prefix' pairs")
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ConfigError(f"data_path {items!r} has negative or all-zero weights")
    return [w / total for w in weights], prefixes


def matched_weights(weights: list[float], fractions: list[float]) -> list[float]:
    """w'_i = w_i f_i / sum_j w_j f_j: the CLM blend that sees the SLM run's selected token mix."""
    if len(weights) != len(fractions):
        raise ConfigError(f"{len(weights)} blend weights but {len(fractions)} selected fractions")
    mixed = [w * f for w, f in zip(weights, fractions)]
    total = sum(mixed)
    if total <= 0:
        raise ConfigError("the run selected no tokens of any dataset: nothing to reweight")
    return [m / total for m in mixed]


def reweight(run_dir: str) -> dict:
    """From ``run_dir/summary.json``: the original and matched weights, the prefixes and the selected fractions."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"no summary.json in '{run_dir}': give the --save directory of a finished SLM run")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc})") from None
    fractions = summary.get("selected_fraction_by_dataset")
    if summary.get("loss_mode") == "clm" or not fractions:
        raise ConfigError(f"'{path}' is a CLM run (no selected fractions per dataset): reweight an SLM run")
    weights, prefixes = blend_of(summary.get("data_path"))
    if len(prefixes) < 2:
        raise ConfigError(
            f"'{path}' trained on a single dataset ({prefixes[0] if prefixes else 'none'}): nothing to reweight"
        )
    if any(f is None for f in fractions):
        raise ConfigError(f"'{path}' has datasets without valid tokens (selected fractions {fractions})")
    return dict(
        prefixes=prefixes,
        weights=weights,
        fractions=[float(f) for f in fractions],
        matched=matched_weights(weights, [float(f) for f in fractions]),
    )


def format_data_path(prefixes: list[str], weights: list[float], digits: int = 4) -> str:
    """``--data-path W1 PREFIX1 W2 PREFIX2 ...`` with the weights rounded to ``digits`` decimals."""
    return "--data-path " + " ".join(f"{w:.{digits}f} {p}" for w, p in zip(weights, prefixes))


def explain(result: dict) -> str:
    """One line: where the weights come from."""
    parts = ", ".join(
        f"{Path(p).name} w={w:.3g} f={f:.3g}"
        for p, w, f in zip(result["prefixes"], result["weights"], result["fractions"])
    )
    return (
        f"CLM with these weights trains on the SLM run's selected token mix (w'_i = w_i f_i / sum_j w_j f_j; {parts})"
    )
