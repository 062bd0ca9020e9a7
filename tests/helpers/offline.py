"""Random indexed datasets, the small config the offline-score tests train and score with, a tiny reference
checkpoint and one scoring run (tests/test_offline_scores.py, test_scoring.py, test_data_reliability.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_slm.config import load_config

VOCAB, EOD, SEQ = 96, 0, 16


def make_dataset(prefix, seed, num_docs=40, fingerprint="test-tokenizer"):
    """An indexed dataset of random documents (EOD-terminated), written with megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(num_docs):
        doc = np.append(rng.integers(1, VOCAB, size=rng.integers(5, 40)), EOD)
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    Path(f"{prefix}.json").write_text(
        json.dumps({"vocab_size": VOCAB, "eod_token_id": EOD, "tokenizer_fingerprint": fingerprint})
    )
    return str(prefix)


def make_cfg(data_path, **over):
    cfg = dict(
        model=dict(
            preset="tiny", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2
        ),
        parallel=dict(pipeline_model_parallel_size=1),
        slm=dict(slm_select_ratio=0.6, selection_scope="micro_batch"),
        train=dict(
            micro_batch_size=2,
            global_batch_size=8,
            seq_length=SEQ,
            train_iters=3,
            eval_iters=1,
            lr=5e-3,
            lr_warmup_iters=0,
            log_interval=100,
            seed=5,
        ),
        data=dict(data_path=data_path, split="90,10,0"),
    )
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return load_config(overrides=cfg)


def reference_ckpt(data_path, out):
    """Trains a CLM reference for 2 steps on ``data_path`` and saves its weights to ``out`` (run in a rank)."""
    from megatron_slm.checkpoint import save_model_weights
    from megatron_slm.training.resolve import resolve_run
    from megatron_slm.training.run import build_data
    from megatron_slm.training.trainer import Trainer

    cfg = make_cfg(data_path, slm=dict(loss_mode="clm"), train=dict(train_iters=2, seed=99))
    run = resolve_run(cfg)
    trainer = Trainer(run)
    batches, _ = build_data(run.config, run.data, trainer.dp_rank, trainer.dp_size)
    trainer.train(batches)
    save_model_weights(trainer.policy_module, out, run.config.model)


def run_scoring(data_path, ref, pp, fail_after=None, force=True, **over):
    """ "done", "interrupted" (the simulated crash) or "error: <message>" (an SLMError, as the CLI prints it).
    ``fail_after``: crash after that many scored steps; a list gives each rank its own count."""
    import torch.distributed as dist

    from megatron_slm import scoring
    from megatron_slm.errors import SLMError
    from megatron_slm.training import passes

    if fail_after is not None:  # simulate a crash after `fail_after` scored steps
        real, calls = passes.score_pass, []

        def flaky(*a, **k):
            calls.append(1)
            limit = fail_after[dist.get_rank()] if isinstance(fail_after, (list, tuple)) else fail_after
            if len(calls) > limit:
                raise KeyboardInterrupt("simulated preemption")
            return real(*a, **k)

        passes.score_pass = flaky
    over = dict(dict(reference=dict(load=ref)), **over)
    cfg = make_cfg(data_path, parallel=dict(pipeline_model_parallel_size=pp), **over)
    try:
        scoring.score_reference(cfg, force=force)
    except KeyboardInterrupt:
        return "interrupted"
    except SLMError as exc:
        return f"error: {exc}"
    return "done"
