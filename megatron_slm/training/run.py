"""Assembling a run from its config: input checks, data, the trainer, the run summary.

``slm train`` (megatron_slm.cli) calls ``run_train`` on every rank; ``slm score-reference`` and
``slm check-config`` share ``check_inputs`` so all three refuse the same bad inputs the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_slm.config import Config, reference_in_memory, uses_offline_scores
from megatron_slm.errors import DataError


def check_inputs(cfg: Config, reference: str | None, offline_scores: bool):
    """Every check that needs only files, before any process group starts; fills an unset vocab_size from
    the data. ``reference``: the reference checkpoint this run loads (or None); ``offline_scores``: validate
    the score sidecars of ``data_path``. Returns the data's TokenInfo and the sidecars (or None)."""
    from megatron_slm.checkpoint import weights_vocab
    from megatron_slm.data.datasets import parse_blend, token_info

    fingerprint = None
    if cfg.data.tokenizer_model:
        from megatron_slm.data.tokenizer import load_tokenizer

        fingerprint = load_tokenizer(cfg.data.tokenizer_model).fingerprint
    info = token_info([parse_blend(cfg.data.data_path), parse_blend(cfg.data.valid_data_path)],
                      cfg.model.vocab_size, fingerprint)
    for m in (cfg.model, cfg.reference.model):
        if m.vocab_size is None:
            m.vocab_size = info.vocab_size
    for who, source in (("reference", reference), ("pretrained", cfg.checkpoint.pretrained_checkpoint)):
        if source and weights_vocab(source) != cfg.model.vocab_size:
            raise DataError(
                f"{who} checkpoint '{source}' has vocab_size={weights_vocab(source)} but the policy and its "
                f"data have {cfg.model.vocab_size}; the policy, reference and tokenizer must share one vocabulary"
            )
    scores = None
    if offline_scores:
        from megatron_slm.data.scores import OfflineScores

        scores = OfflineScores(parse_blend(cfg.data.data_path)[0], cfg.reference.scores_path)
    return info, scores


def check_run_inputs(cfg: Config):
    """``check_inputs`` for a training run as configured."""
    return check_inputs(cfg, cfg.reference.load if reference_in_memory(cfg) else None, uses_offline_scores(cfg))


def dataset_sizes(cfg: Config) -> list[int]:
    """Samples requested from megatron-core per split: what training consumes (and scoring must match)."""
    G = cfg.train.global_batch_size
    return [cfg.train.train_iters * G, cfg.train.eval_iters * G, 0]


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


def summarize(cfg: Config, trainer, result: dict) -> dict | None:
    """The run's summary (last stage): final and second-half mean statistics, eval loss, selection by dataset."""
    history = result["history"]
    if not (trainer.is_last_stage and history):
        return None
    keys = [k for k in history[0] if isinstance(history[0][k], (int, float))]
    tail = history[len(history) // 2:] or history  # the second half: past warm-up
    selective = trainer.selective
    return {
        "loss_mode": cfg.slm.loss_mode,
        "selection_scope": cfg.slm.selection_scope if selective else None,
        "k": cfg.slm.slm_select_ratio if selective else 1.0,
        "iterations": trainer.iteration,
        "stopped_by": result.get("stopped_by"),
        "eval_loss": result.get("eval_loss"),
        "final": {k: history[-1][k] for k in keys},
        "mean_second_half": {k: sum(h[k] for h in tail) / len(tail) for k in keys},
        "data_path": cfg.data.data_path,
        "selected_fraction_by_dataset": trainer.selected_fraction_by_dataset(),
        "parallel": {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                     "dp": trainer.dp_size},
    }


def run_train(cfg: Config) -> dict:
    """Train one model as configured (called on every rank). Returns the summary on every rank."""
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer, broadcast_from_last

    info, offline_scores = check_run_inputs(cfg)
    trainer = Trainer(cfg)
    trainer.resume()
    train_batches, eval_batches = build_data(cfg, info, trainer.dp_rank, trainer.dp_size, offline_scores)
    result = trainer.train(train_batches, eval_batches)
    summary = broadcast_from_last(summarize(cfg, trainer, result))
    if cfg.checkpoint.save and dist.get_rank() == 0:
        (Path(cfg.checkpoint.save) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
