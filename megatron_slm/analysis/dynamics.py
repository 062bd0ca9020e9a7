"""``slm dynamics``: how token losses move over training, in the four classes of Rho-1's Figure 2.

Tokens. The fixed evaluation windows of ``slm evaluate`` (megatron_slm/analysis/evaluate.py): one dataset's
documents in file order, windows of seq_length + 1 tokens, the first ``--eval-samples`` of them; labels equal to
EOD are left out. Every checkpoint of every run scores the same tokens.

Classes. A loss is high (H) when it is above the threshold t, low (L) otherwise (a loss equal to t is L). A
token's class is its level at the first checkpoint of its run, then at the last one: H->H, L->H, H->L or L->L.
A run's checkpoints are in training order.

Threshold. One absolute loss t (nats) for every run compared: ``--dynamics-threshold``, by default the median of
the per-token losses at the first checkpoint of every run, pooled over all runs. Why:

- absolute, not a per-checkpoint quantile: a quantile re-centres at every checkpoint and keeps the H share
  fixed whatever the model learns; against a fixed loss a token changes class only when its loss crosses it;
- shared by all runs: H means the same loss in the SLM run and in the CLM run, so their shares compare (a
  threshold per run would call different losses H in each);
- the median at the first checkpoint: it comes from the data (no number to choose per vocabulary or model
  size) and, for runs from one starting checkpoint (SLM vs CLM from the same base), splits the start into
  equal H and L halves, so H->L reads directly as the share of the hard tokens that became easy.

Give an explicit ``--dynamics-threshold`` to compare with an analysis of other runs.

Reference-hard tokens (``--dynamics-reference CKPT``, the SLM runs' reference; ``--dynamics-select-ratio k``): the
tokens SLM leaves out because the reference is bad at them. A token is reference-hard when the reference's loss on
it is high (above the threshold) and its excess loss at the first checkpoint of the first run (that loss minus the
reference's) is not in the top k of the valid tokens: SLM at k would not select it at the start. Per run and
checkpoint, ``reference_hard`` gives their mean loss: it falls under CLM, and rises under SLM when it forgets them.

Per run and checkpoint c, over the valid tokens:

- ``share``: each class's share of the tokens, classes by the first and last checkpoint (the same at every c);
- ``share_so_far``: the same with the classes by the first checkpoint and c: how the shares evolve (at the first
  checkpoint only H->H and L->L, at the last equal to ``share``);
- ``mean_loss``: each class's (first and last checkpoint) mean loss at c, the paper's curves; None when empty;
- ``tokens``: each class's token count.

Memory: rank 0 holds every checkpoint's per-token losses, 4 bytes x tokens x checkpoints of all runs.

This module's analysis is numpy only; ``measure`` (the forward passes) imports torch when called.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_slm.errors import CheckpointError, ConfigError, DataError, install_hint

CLASSES = ("H->H", "L->H", "H->L", "L->L")
THRESHOLD_DEFAULT_SOURCE = "median token loss at the first checkpoint, all runs pooled"


def token_classes(first: np.ndarray, last: np.ndarray, threshold: float) -> np.ndarray:
    """Index into CLASSES per token, from its loss at the first and at the last checkpoint (H: loss > t)."""
    high_first = np.asarray(first) > threshold
    high_last = np.asarray(last) > threshold
    return np.where(high_first, np.where(high_last, 0, 2), np.where(high_last, 1, 3))


def default_threshold(first_losses: Sequence[np.ndarray], mask: np.ndarray | None = None) -> float:
    """The median of the first checkpoints' losses of all runs pooled (valid tokens only)."""
    pooled = [np.asarray(x, dtype=np.float64) for x in first_losses]
    if mask is not None:
        pooled = [x[np.asarray(mask, dtype=bool)] for x in pooled]
    pooled = np.concatenate([x.ravel() for x in pooled]) if pooled else np.zeros(0)
    if pooled.size == 0:
        raise DataError("no valid tokens to take the threshold from: use a dataset with tokens other than EOD")
    return float(np.median(pooled))


def classify(losses: Sequence[np.ndarray], threshold: float, mask: np.ndarray | None = None) -> dict:
    """The four classes of a run's tokens from its per-token losses at each checkpoint (training order).

    ``losses``: one array per checkpoint, all of one shape; ``mask``: the valid tokens (default: all). Returns
    {"threshold", "tokens" (valid count), "classes" (index into CLASSES per valid token, in array order),
    "checkpoints": [{"share", "share_so_far", "mean_loss", "tokens"} per checkpoint, each {class: value}]}.
    """
    if len(losses) < 2:
        raise ConfigError(f"token classes need losses at two checkpoints or more (got {len(losses)})")
    arrays = [np.asarray(x, dtype=np.float64) for x in losses]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise DataError(f"per-token losses of different shapes: {[a.shape for a in arrays]}")
    valid = np.ones(arrays[0].shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    values = [a[valid] for a in arrays]
    n = int(values[0].size)
    if n == 0:
        raise DataError("no valid tokens to classify: use a dataset with tokens other than EOD")
    classes = token_classes(values[0], values[-1], threshold)
    counts = np.bincount(classes, minlength=len(CLASSES))
    share = {c: float(counts[j] / n) for j, c in enumerate(CLASSES)}
    tokens = {c: int(counts[j]) for j, c in enumerate(CLASSES)}
    checkpoints = []
    for v in values:
        so_far = np.bincount(token_classes(values[0], v, threshold), minlength=len(CLASSES))
        checkpoints.append(
            {
                "share": dict(share),
                "share_so_far": {c: float(so_far[j] / n) for j, c in enumerate(CLASSES)},
                "mean_loss": {c: float(v[classes == j].mean()) if counts[j] else None for j, c in enumerate(CLASSES)},
                "tokens": dict(tokens),
            }
        )
    return {"threshold": float(threshold), "tokens": n, "classes": classes, "checkpoints": checkpoints}


# ----------------------------------------------------------------------------------------------
# Runs: NAME=CKPT,CKPT,... or NAME=RUN_DIR


def parse_run(spec: str) -> tuple[str, list[str]]:
    """``NAME=CKPT[,CKPT...]`` or ``NAME=DIR`` -> (name, the paths as given)."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    paths = [p.strip() for p in rest.split(",")]
    if not sep or not name or "," in name or not rest.strip() or not all(paths):
        raise ConfigError(
            f"--run '{spec}': expected NAME=CKPT,CKPT[,...] (checkpoints in training order) or "
            "NAME=RUN_DIR (all its iter_* checkpoints)"
        )
    return name, paths


def run_checkpoints(name: str, paths: list[str]) -> list[tuple[str, Path, int | None]]:
    """(argument, weights directory, iteration or None) of a run's checkpoints; a single directory holding
    ``iter_*`` checkpoints stands for all of them. Refuses fewer than two and iterations out of order."""
    from megatron_slm.analysis.evaluate import resolve_checkpoint
    from megatron_slm.checkpoint import iteration_dirs

    if len(paths) == 1:
        root = Path(paths[0])
        if not root.exists():
            raise CheckpointError(f"--run {name}: checkpoint '{paths[0]}' does not exist")
        if root.is_dir():
            found = iteration_dirs(root)
            if found:
                paths = [str(p) for p in found]
    if len(paths) < 2:
        raise ConfigError(
            f"--run {name}: needs at least two checkpoints, the first and the last of the span, but "
            f"has {len(paths)} ({paths[0]}): list them as {name}=CKPT,CKPT,... or give the run's "
            "directory holding iter_* checkpoints"
        )
    out = []
    for arg in paths:
        try:
            d, it = resolve_checkpoint(arg)
        except CheckpointError as exc:
            raise CheckpointError(f"--run {name}: {exc}") from None
        out.append((arg, d, it))
    known = [it for _, _, it in out if it is not None]
    if any(b <= a for a, b in zip(known, known[1:])):
        raise ConfigError(
            f"--run {name}: checkpoints must be in training order, first to last (iterations {known}); reorder them"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Measuring (torch) and analysing (numpy)


def measure(
    cfg,
    runs: list[tuple[str, list[str]]],
    data_paths: list[str],
    eval_samples: int | None = None,
    reference: str | None = None,
) -> dict | None:
    """Per-token losses of every run's checkpoints on the dataset's evaluation windows (``slm evaluate``'s
    windows and forward, any TP/PP/DP). Rank 0: {"runs": [{"name", "checkpoints": [(arg, dir, iteration)],
    "losses": [float32 [windows, S] per checkpoint]}], "mask": bool [windows, S], "dataset", "windows"}; None
    on the other ranks (collective: every rank calls it)."""
    import torch.distributed as dist

    from megatron_slm import checkpoint
    from megatron_slm.analysis import evaluate as ev
    from megatron_slm.model.loading import load_model
    from megatron_slm.parallel import distributed

    tr, par = cfg.train, cfg.parallel
    seq = tr.seq_length
    ev.check_settings(seq, tr.micro_batch_size, eval_samples, data_paths, command="slm dynamics")
    if len(data_paths) != 1:
        raise ConfigError(f"slm dynamics takes one --data-path PREFIX (got {len(data_paths)}): run it once per dataset")
    names = [name for name, _ in runs]
    if not names:
        raise ConfigError("slm dynamics needs --run NAME=CKPT,CKPT[,...] (one per run; e.g. an SLM and a CLM run)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--run names must differ (got {names})")
    resolved = [(name, run_checkpoints(name, paths)) for name, paths in runs]
    dirs = list(dict.fromkeys(d for _, cks in resolved for _, d, _ in cks))
    ref_dir = None
    if reference:
        try:
            ref_dir = ev.resolve_checkpoint(reference)[0]
        except CheckpointError as exc:
            raise CheckpointError(f"--dynamics-reference: {exc}") from None
        dirs = list(dict.fromkeys([*dirs, ref_dir]))
    configs = {d: checkpoint.read_model_config(str(d)) for d in dirs}
    (data,) = ev.load_datasets(data_paths, dirs, [configs[d] for d in dirs], seq, eval_samples)

    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=tr.seed)
    losses = {}  # one forward per checkpoint even when runs share one (e.g. their starting point)
    for d in dirs:
        model = load_model(d, configs[d], par, seed=tr.seed)
        got = ev.window_token_losses(model, data, seq, configs[d].vocab_size, tr.micro_batch_size, dst=0)
        del model
        if got is not None:
            losses[d] = got[0]
    if dist.get_rank() != 0:
        return None
    return {
        "runs": [
            {"name": name, "checkpoints": cks, "losses": [losses[d] for _, d, _ in cks]} for name, cks in resolved
        ],
        "mask": ev.window_loss_mask(data.tokens, data.windows, seq, data.eod),
        "reference_losses": losses[ref_dir] if ref_dir is not None else None,
        "dataset": data.prefix,
        "windows": data.windows,
    }


def reference_hard_mask(
    first: np.ndarray, reference: np.ndarray, mask: np.ndarray, threshold: float, k: float
) -> np.ndarray:
    """Valid tokens with reference loss > ``threshold`` whose excess loss (``first`` - ``reference``) is not among
    the top ``k`` of the valid tokens (round half up, ties by position as in training)."""
    excess = np.where(mask, first.astype(np.float64) - reference, -np.inf).ravel()
    n = int(mask.sum())
    keep = min(max(int(np.floor(n * k + 0.5)), min(n, 1)), n)
    order = np.argsort(-excess, kind="stable")  # stable: ties keep position order
    top = np.zeros(excess.shape, dtype=bool)
    top[order[:keep]] = True
    return mask & (reference > threshold) & ~top.reshape(mask.shape)


def analyse(measured: dict, threshold: float | None = None, select_ratio: float = 0.6) -> dict:
    """Classes per run from ``measure``'s losses; one threshold for all runs (``default_threshold`` when None)."""
    mask = measured["mask"]
    source = "--dynamics-threshold"
    if threshold is not None and not np.isfinite(threshold):
        raise ConfigError(f"--dynamics-threshold must be a finite loss (got {threshold})")
    if threshold is None:
        threshold = default_threshold([r["losses"][0] for r in measured["runs"]], mask)
        source = THRESHOLD_DEFAULT_SOURCE
    ref = measured.get("reference_losses")
    hard = None
    if ref is not None:
        if not 0.0 < select_ratio <= 1.0:
            raise ConfigError(f"--dynamics-select-ratio must be in (0, 1] (got {select_ratio})")
        hard = reference_hard_mask(measured["runs"][0]["losses"][0], ref, mask, threshold, select_ratio)
    runs = []
    for r in measured["runs"]:
        res = classify(r["losses"], threshold, mask)
        runs.append(
            {
                "name": r["name"],
                "tokens": res["tokens"],
                "checkpoints": [
                    {"checkpoint": arg, "path": str(d), "iteration": it, **stats}
                    for (arg, d, it), stats in zip(r["checkpoints"], res["checkpoints"])
                ],
            }
        )
        if hard is not None:
            n = int(hard.sum())
            for c, losses in zip(runs[-1]["checkpoints"], r["losses"]):
                c["reference_hard_loss"] = float(losses[hard].astype(np.float64).mean()) if n else None
    return {
        "threshold": float(threshold),
        "threshold_source": source,
        "classes": list(CLASSES),
        "dataset": measured["dataset"],
        "windows": measured["windows"],
        "tokens": int(np.sum(mask)),
        "reference_hard": None
        if hard is None
        else {
            "tokens": int(hard.sum()),
            "select_ratio": select_ratio,
            "reference_mean_loss": float(ref[hard].astype(np.float64).mean()) if hard.any() else None,
        },
        "runs": runs,
    }


def format_table(result: dict) -> str:
    """One line per (run, checkpoint): per class its share so far and its mean loss at that checkpoint."""
    hard = result.get("reference_hard")
    head = ["run", "checkpoint", "iteration"] + [f"{c} {x}" for c in CLASSES for x in ("share", "loss")]
    head += ["ref-hard loss"] if hard else []
    body = []
    for r in result["runs"]:
        for c in r["checkpoints"]:
            cells = [r["name"], c["checkpoint"], "" if c["iteration"] is None else str(c["iteration"])]
            for k in CLASSES:
                loss = c["mean_loss"][k]
                cells += [f"{c['share_so_far'][k]:.3f}", "-" if loss is None else f"{loss:.4f}"]
            if hard:
                loss = c.get("reference_hard_loss")
                cells.append("-" if loss is None else f"{loss:.4f}")
            body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    intro = (
        f"threshold {result['threshold']:.4f} ({result['threshold_source']}); {result['tokens']} tokens of "
        f"{result['dataset']}\nshare: class by the first checkpoint and this one (at the last: the final "
        "classes); loss: mean loss at this checkpoint of the final classes (first vs last)"
    )
    if hard:
        intro += (
            f"\nref-hard: the {hard['tokens']} tokens the reference is bad at (its loss above the threshold, mean "
            + ("-" if hard["reference_mean_loss"] is None else f"{hard['reference_mean_loss']:.4f}")
            + f") that SLM at k={hard['select_ratio']} would not select at the first checkpoint; their mean loss"
        )
    return "\n".join([intro, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_outputs(result: dict, out: str, settings: dict) -> list[str]:
    """dynamics.json, dynamics.csv and (matplotlib present) dynamics.png under ``out``; returns notes."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "dynamics.json").write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
    fields = ["run", "checkpoint", "path", "iteration", "class", "share", "share_so_far", "mean_loss", "tokens"]
    with open(d / "dynamics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in result["runs"]:
            for c in r["checkpoints"]:
                for k in CLASSES:
                    row = {
                        "run": r["name"],
                        "checkpoint": c["checkpoint"],
                        "path": c["path"],
                        "iteration": c["iteration"],
                        "class": k,
                        "share": c["share"][k],
                        "share_so_far": c["share_so_far"][k],
                        "mean_loss": c["mean_loss"][k],
                        "tokens": c["tokens"][k],
                    }
                    w.writerow({x: ("" if v is None else v) for x, v in row.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [f"note: matplotlib is not installed: no dynamics.png ({install_hint('matplotlib')})"]
    by_iteration = all(c["iteration"] is not None for r in result["runs"] for c in r["checkpoints"])
    fig, axes = plt.subplots(2, len(CLASSES), figsize=(4 * len(CLASSES), 6.5), sharex=True, squeeze=False)
    for r in result["runs"]:
        xs = [c["iteration"] if by_iteration else i for i, c in enumerate(r["checkpoints"])]
        for j, k in enumerate(CLASSES):
            final = r["checkpoints"][-1]["share"][k]
            axes[0][j].plot(xs, [c["share_so_far"][k] for c in r["checkpoints"]], marker="o", label=r["name"])
            loss = [np.nan if c["mean_loss"][k] is None else c["mean_loss"][k] for c in r["checkpoints"]]
            axes[1][j].plot(xs, loss, marker="o", label=f"{r['name']} ({final:.0%})")
    for j, k in enumerate(CLASSES):
        axes[0][j].set_title(k)
        axes[1][j].set_xlabel("iteration" if by_iteration else "checkpoint (training order)")
        for i in range(2):
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=8)
    axes[0][0].set_ylabel("share (class by first vs this checkpoint)")
    axes[1][0].set_ylabel("mean loss (class by first vs last)")
    fig.suptitle(f"token loss dynamics on {Path(result['dataset']).name}: H = loss > {result['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(d / "dynamics.png", dpi=110)
    plt.close(fig)
    return []
