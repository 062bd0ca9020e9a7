"""Running a resolved training job: data, the trainer, the recorded config, the run summary.

``slm train`` (megatron_slm.cli) calls ``run_train`` on every rank with the run ``training/resolve.py`` resolved;
``slm check-config`` stops after that resolution, so both refuse the same inputs the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from megatron_slm.config import Config
from megatron_slm.errors import DivergenceError, SLMError
from megatron_slm.log import get_logger
from megatron_slm.loss.selection import per_dataset_ratios
from megatron_slm.training.metrics import DATASET_COUNT_KEYS, dataset_shares, finite_or_none
from megatron_slm.training.resolve import ResolvedRun, dataset_sizes, resolve_run

SUMMARY_FILE = "summary.json"  # <save>/summary.json: the whole run's statistics, written on every stop
CONFIG_FILE = "config.yaml"  # <save>/config.yaml: the resolved config; `slm train --config` it reproduces the run

log = get_logger(__name__)


def build_data(cfg: Config, info, dp_rank: int, dp_size: int, offline_scores=None):
    """Step -> this rank's micro-batches (with offline scores attached when configured), and eval batches."""
    from megatron_slm.data.batches import micro_batches
    from megatron_slm.data.datasets import build_datasets, dataset_config

    tr = cfg.train
    G, b = tr.global_batch_size, tr.micro_batch_size
    ds_cfg = dataset_config(cfg.data, tr.seq_length, tr.seed, info)
    sizes = dataset_sizes(cfg)
    train, valid, _ = build_datasets(ds_cfg, sizes)
    positions = build_datasets(ds_cfg, sizes, positions=True)[0] if offline_scores is not None else None

    def train_batches(step):
        mbs = micro_batches(train, step, G, b, dp_rank, dp_size)
        if positions is not None:
            offline_scores.attach(mbs, micro_batches(positions, step, G, b, dp_rank, dp_size))
        return mbs

    eval_batches = None
    if valid is not None and len(valid) >= G:
        n_eval = min(tr.eval_iters, len(valid) // G)

        def eval_batches():
            return [micro_batches(valid, i, G, b, dp_rank, dp_size) for i in range(n_eval)]

    return train_batches, eval_batches


def _run_history(cfg: Config, trainer, history: list[dict]) -> list[dict]:
    """Every step of the run so far, one row per iteration: from ``<save>/metrics.jsonl`` (so a resumed run's
    summary covers its earlier segments; a step repeated after a crash keeps its last row), else this process's
    in-memory history."""
    path = Path(cfg.checkpoint.save or "") / "metrics.jsonl"
    if not (cfg.checkpoint.save and path.is_file()):
        return history
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if row.get("split") == "train" and row.get("iteration", 0) <= trainer.iteration:
            rows[row["iteration"]] = {k: math.nan if v is None else v for k, v in row.items()}  # null was NaN
    return [rows[i] for i in sorted(rows)] or history


def summarize(cfg: Config, trainer, result: dict) -> dict | None:
    """The run's summary (last stage), over the whole run including earlier segments of a resumed one: final and
    second-half mean statistics, eval loss, selected share per blended dataset, non-finite steps."""
    history = _run_history(cfg, trainer, result["history"]) if trainer.is_last_stage else []
    if not history:
        return None
    keys = [
        k
        for k in history[-1]
        if isinstance(history[-1][k], (int, float))
        and k != "iteration"
        and not any(k.startswith(f"{key}_ds") for key in DATASET_COUNT_KEYS)
    ]
    tail = history[len(history) // 2 :] or history  # the second half: past warm-up
    selective = trainer.selective
    by_dataset = unselected_ref = None
    if selective and any("valid_tokens_ds0" in h for h in history):
        shares = dataset_shares(history)  # the log line's per-dataset figures, over the whole run (NaN -> null)
        by_dataset, unselected_ref = [s for s, _ in shares], [r for _, r in shares]
    return finite_or_none(
        {
            "loss_mode": cfg.slm.loss_mode,
            "selection_scope": cfg.slm.selection_scope if selective else None,
            "k": cfg.slm.slm_select_ratio if selective else 1.0,
            "iterations": trainer.iteration,
            "stopped_by": result.get("stopped_by"),
            "nonfinite_steps": result.get("nonfinite_steps", []),
            "eval_loss": result.get("eval_loss"),
            "final": {k: history[-1][k] for k in keys},
            "mean_second_half": {k: sum(h.get(k, math.nan) for h in tail) / len(tail) for k in keys},
            "data_path": cfg.data.data_path,
            "selected_fraction_by_dataset": by_dataset,
            "k_by_dataset": per_dataset_ratios(cfg.slm) if selective else None,
            # mean reference loss of the tokens SLM left out, per dataset: high where the reference is bad
            "unselected_ref_loss_by_dataset": unselected_ref,
            "parallel": {
                "tp": cfg.parallel.tensor_model_parallel_size,
                "pp": cfg.parallel.pipeline_model_parallel_size,
                "dp": trainer.dp_size,
            },
        }
    )


def write_resolved_config(cfg: Config) -> Path:
    """``<save>/config.yaml``: every leaf of the resolved config (rank 0, atomically)."""
    from megatron_slm.checkpoint import write_atomic

    path = Path(cfg.checkpoint.save) / CONFIG_FILE
    write_atomic(
        path,
        "# the resolved config of this run: `slm train --config` this file to rerun or resume it\n"
        + yaml.safe_dump(cfg.to_dict(), sort_keys=False),
    )
    return path


def _write_summary(cfg: Config, summary: dict) -> None:
    from megatron_slm.checkpoint import write_atomic

    write_atomic(Path(cfg.checkpoint.save) / SUMMARY_FILE, json.dumps(summary, indent=2))


def _summary_after_error(cfg: Config, trainer, exc: Exception) -> None:
    """The summary of a run an error stopped: ``stopped_by: "error"`` and the error, over the steps metrics.jsonl
    recorded. Written by the last rank alone (it holds the history; no collective after an error)."""
    import torch.distributed as dist

    if not cfg.checkpoint.save or dist.get_rank() != dist.get_world_size() - 1:
        return
    result = {"history": [], "stopped_by": "error", "nonfinite_steps": getattr(trainer, "nonfinite_steps", [])}
    summary = summarize(cfg, trainer, result)
    if summary is None:  # no step was recorded
        return
    summary["error"] = str(exc)
    try:
        _write_summary(cfg, summary)
    except OSError as write_error:  # e.g. the disk that stopped the run is still full: the error itself matters more
        log.warning(f"could not write {SUMMARY_FILE} ({write_error})")


def run_train(run: ResolvedRun | Config) -> dict:
    """Train one model (called on every rank): ``run`` resolved by ``resolve_run``, or a draft config resolved here.
    Returns the summary on every rank."""
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer, broadcast_from_last

    run = run if isinstance(run, ResolvedRun) else resolve_run(run)
    cfg = run.config
    trainer = Trainer(run)  # takes the --save lock
    if cfg.checkpoint.save and dist.get_rank() == 0:
        write_resolved_config(cfg)
    trainer.resume()
    train_batches, eval_batches = build_data(cfg, run.data, trainer.dp_rank, trainer.dp_size, run.offline_scores)
    try:
        result = trainer.train(train_batches, eval_batches)
    except SLMError as exc:  # a stop every rank agreed on (a save that failed, non-finite weights at a save)
        _summary_after_error(cfg, trainer, exc)
        raise
    summary = broadcast_from_last(summarize(cfg, trainer, result))
    if cfg.checkpoint.save and dist.get_rank() == 0 and summary is not None:  # a rerun with nothing to add keeps it
        _write_summary(cfg, summary)
    if result.get("stopped_by") == "non-finite":
        steps = result["nonfinite_steps"]
        raise DivergenceError(
            f"training stopped at iteration {trainer.iteration}: non-finite loss or gradient norm at step(s) "
            f"{', '.join(map(str, steps[-10:]))} (--on-nonfinite {cfg.train.on_nonfinite}, --max-nonfinite-skips "
            f"{cfg.train.max_nonfinite_skips}); nothing of it was saved, the latest checkpoint is unchanged. Lower "
            "--lr or check the data, then rerun to resume from the latest checkpoint"
        )
    return summary
