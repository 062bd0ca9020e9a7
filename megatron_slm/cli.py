"""The one CLI: ``slm train`` (under torchrun), ``slm demo`` (the CPU demo), ``slm check-config``.

    torchrun --nproc-per-node 4 -m megatron_slm.cli train --config cfg.yaml --tensor-model-parallel-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_slm.config import add_override_arguments, load_config, validate
from megatron_slm.errors import SLMError


def check_inputs(cfg):
    """Every check that needs only files, before any process group starts.

    Returns the data's TokenInfo and, for offline SLM, the validated score sidecars."""
    from megatron_slm.checkpoint import weights_vocab
    from megatron_slm.data.datasets import parse_blend, token_info
    from megatron_slm.errors import DataError

    fingerprint = None
    if cfg.data.tokenizer_model:
        from megatron_slm.data.tokenizer import load_tokenizer

        fingerprint = load_tokenizer(cfg.data.tokenizer_model).fingerprint
    info = token_info([parse_blend(cfg.data.data_path), parse_blend(cfg.data.valid_data_path)],
                      cfg.model.vocab_size, fingerprint)
    for m in (cfg.model, cfg.reference.model):
        if m.vocab_size is None:
            m.vocab_size = info.vocab_size
    online = cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "online"
    sources = [("reference", cfg.reference.load if online else None), ("pretrained", cfg.checkpoint.pretrained_checkpoint)]
    for who, source in sources:
        if source and weights_vocab(source) != cfg.model.vocab_size:
            raise DataError(
                f"{who} checkpoint '{source}' has vocab_size={weights_vocab(source)} but the policy and its "
                f"data have {cfg.model.vocab_size}; the policy, reference and tokenizer must share one vocabulary"
            )
    scores = None
    if cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "offline":
        from megatron_slm.data.scores import OfflineScores

        scores = OfflineScores(parse_blend(cfg.data.data_path)[0], cfg.reference.scores_path)
    return info, scores


def dataset_sizes(cfg) -> list[int]:
    """Samples requested from megatron-core per split: what training consumes (and scoring must match)."""
    G = cfg.train.global_batch_size
    return [cfg.train.train_iters * G, cfg.train.eval_iters * G, 0]


def build_data(cfg, info, dp_rank: int, dp_size: int, offline_scores=None):
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


def run_train(cfg) -> dict:
    """Train one model as configured (called on every rank). Returns the summary on every rank."""
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer, broadcast_from_last

    info, offline_scores = check_inputs(cfg)
    trainer = Trainer(cfg)
    trainer.resume()
    train_batches, eval_batches = build_data(cfg, info, trainer.dp_rank, trainer.dp_size, offline_scores)
    dp_size = trainer.dp_size
    result = trainer.train(train_batches, eval_batches)
    history = result["history"]
    summary = None
    if trainer.is_last_stage and history:
        keys = [k for k in history[0] if isinstance(history[0][k], (int, float))]
        tail = history[len(history) // 2:] or history  # the second half: past warm-up
        summary = {
            "loss_mode": cfg.slm.loss_mode,
            "selection_scope": cfg.slm.selection_scope if cfg.slm.loss_mode == "slm" else None,
            "k": cfg.slm.slm_select_ratio if cfg.slm.loss_mode == "slm" else 1.0,
            "iterations": trainer.iteration,
            "stopped_by": result.get("stopped_by"),
            "eval_loss": result.get("eval_loss"),
            "final": {k: history[-1][k] for k in keys},
            "mean_second_half": {k: sum(h[k] for h in tail) / len(tail) for k in keys},
            "data_path": cfg.data.data_path,
            "selected_fraction_by_dataset": trainer.selected_fraction_by_dataset(),
            "parallel": {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size, "dp": dp_size},
        }
    summary = broadcast_from_last(summary)
    if cfg.checkpoint.save and dist.get_rank() == 0:
        (Path(cfg.checkpoint.save) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train_main(args) -> int:
    from megatron_slm.parallel import distributed

    cfg = load_config(args.config, args=args)
    try:
        run_train(cfg)
    finally:
        distributed.destroy()
    return 0


def _check_main(args) -> int:
    cfg = load_config(args.config, args=args)
    validate(cfg, world_size=args.world_size)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="slm", description="Rho-1 Selective Language Modeling on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train (launch under torchrun)")
    p_train.add_argument("--config", help="YAML config file")
    add_override_arguments(p_train)
    p_check = sub.add_parser("check-config", help="validate a config and print it resolved")
    p_check.add_argument("--config")
    p_check.add_argument("--world-size", type=int, default=None)
    add_override_arguments(p_check)
    sub.add_parser("score-reference", help="offline reference scores (same as tools/score_reference.py)", add_help=False)
    p_demo = sub.add_parser("demo", help="the CPU demo: reference, then SLM vs CLM at TP=2 x PP=2")
    from megatron_slm import demo

    demo.add_arguments(p_demo)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score-reference"]:
        from megatron_slm.scoring import main as score_main

        return score_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train_main(args)
        if args.command == "check-config":
            return _check_main(args)
        return demo.main(args)
    except SLMError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
