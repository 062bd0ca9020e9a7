"""The one CLI: ``slm train`` (under torchrun), ``slm demo`` (the CPU demo), ``slm check-config``.

    torchrun --nproc-per-node 4 -m megatron_slm.cli train --config cfg.yaml --tensor-model-parallel-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_slm.config import ConfigError, add_override_arguments, load_config, validate


def _user_errors():
    from megatron_slm.checkpoint import CheckpointError
    from megatron_slm.data.tokens import DataError

    return (ConfigError, CheckpointError, DataError)


def run_train(cfg) -> dict:
    """Train one model as configured (called on every rank). Returns the summary on every rank."""
    import torch.distributed as dist

    from megatron_slm.checkpoint import read_model_meta, save_model_weights
    from megatron_slm.data.tokens import DataError, TokenFile, TokenSamples, micro_batches
    from megatron_slm.training.trainer import Trainer, broadcast_from_last

    tr = cfg.train
    if not cfg.data.train_data:
        raise ConfigError("data.train_data is unset; point --train-data at a token file prefix (see README)")
    train_file = TokenFile(cfg.data.train_data)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = train_file.vocab_size
        if cfg.reference.model.vocab_size is None:
            cfg.reference.model.vocab_size = train_file.vocab_size
    for name, tf in (("train", train_file),) + ((("valid", TokenFile(cfg.data.valid_data)),) if cfg.data.valid_data else ()):
        if tf.vocab_size != cfg.model.vocab_size:
            raise DataError(
                f"{name} data '{tf.prefix}' was tokenized with vocab_size={tf.vocab_size} but the model has "
                f"vocab_size={cfg.model.vocab_size}; the tokenizer, policy and reference must share one vocabulary"
            )
    if cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "online" and cfg.reference.load:
        ref_meta = read_model_meta(cfg.reference.load)["model"]  # fail before any process group starts
        if ref_meta.get("vocab_size") != cfg.model.vocab_size:
            raise DataError(
                f"reference checkpoint '{cfg.reference.load}' has vocab_size={ref_meta.get('vocab_size')} but the "
                f"policy and its data have {cfg.model.vocab_size}; the reference must share the policy's tokenizer"
            )
    trainer = Trainer(cfg)
    dp_rank, dp_size = trainer.dp_rank, trainer.dp_size
    train = TokenSamples(train_file, tr.seq_length, seed=tr.seed)

    def train_batches(step):
        return micro_batches(train, step, tr.global_batch_size, tr.micro_batch_size, dp_rank, dp_size)

    eval_batches = None
    if cfg.data.valid_data:
        valid = TokenSamples(TokenFile(cfg.data.valid_data), tr.seq_length, seed=tr.seed + 1)
        n_eval = min(tr.eval_iters, max(len(valid) // tr.global_batch_size, 1))

        def eval_batches():
            return [micro_batches(valid, i, tr.global_batch_size, tr.micro_batch_size, dp_rank, dp_size) for i in range(n_eval)]

    result = trainer.train(train_batches, eval_batches)
    if cfg.checkpoint.save:
        save_model_weights(trainer.policy_module, str(Path(cfg.checkpoint.save) / "model"), cfg.model)
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
            "eval_loss": result.get("eval_loss"),
            "final": {k: history[-1][k] for k in keys},
            "mean_second_half": {k: sum(h[k] for h in tail) / len(tail) for k in keys},
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
    p_demo = sub.add_parser("demo", help="the CPU demo: reference, then SLM vs CLM at TP=2 x PP=2")
    from megatron_slm import demo

    demo.add_arguments(p_demo)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train_main(args)
        if args.command == "check-config":
            return _check_main(args)
        return demo.main(args)
    except _user_errors() as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
