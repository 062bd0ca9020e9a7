"""Time the training loop blocks for a checkpoint: synchronous save vs ``--async-save``, side by side in one run.

One rank (forked, gloo) builds a real ``Trainer`` (CLM, fp32, Adam) at TinyLlama-1.1B's width (hidden 2048, ffn
5632, 32 heads / 4 KV groups, vocab 32000) with 3 layers by default: 0.26B parameters, whose weights, gradients
and Adam moments (~4.2 GB) plus the async save's host copy (~3.2 GB) fit in ~8 GB. The full 22 layers would need
~30 GB on CPU. After one step (so Adam's state exists), saves alternate (rotating order): ``sync`` (the whole
save: write, agreement, fsync, commit), ``async`` blocked (what ``save_checkpoint`` costs the loop: planning, the
copy to host memory, the small files) and ``async`` total (blocked + waiting for the background write and
commit). Each save goes to a fresh directory, removed afterwards.

    .venv/bin/python -m benchmarks.bench_async_save              # ~0.26B, a few minutes
    .venv/bin/python -m benchmarks.bench_async_save --layers 1   # quicker
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from benchmarks._common import add_model_args, emit_json, machine_info, median, rotated, run_ranks, table

VARIANTS = ("sync", "async")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, vocab=32000, seq=32, gbs=1)
    p.set_defaults(layers=3, hidden=2048, ffn=5632, heads=32, mbs=1)
    p.add_argument("--groups", type=int, default=4, help="KV heads (GQA)")
    p.add_argument("--reps", type=int, default=2, help="timed saves per variant")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    return p.parse_args(argv)


def _worker(a, base):
    import torch

    from megatron_slm import checkpoint
    from megatron_slm.config import load_config
    from megatron_slm.training.trainer import Trainer

    cfg = load_config(
        overrides=dict(
            model=dict(
                preset="tiny",
                vocab_size=a.vocab,
                num_layers=a.layers,
                hidden_size=a.hidden,
                ffn_hidden_size=a.ffn,
                num_attention_heads=a.heads,
                num_query_groups=a.groups,
            ),
            slm=dict(loss_mode="clm"),
            train=dict(
                micro_batch_size=a.mbs,
                global_batch_size=a.gbs,
                seq_length=a.seq,
                train_iters=10**6,
                lr=1e-4,
                min_lr=1e-5,
                lr_warmup_iters=0,
                log_interval=10**9,
                seed=7,
                bf16=False,
            ),
            checkpoint=dict(save=f"{base}/run", keep_last=1),
        )
    )
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, a.vocab, (a.mbs, a.seq + 1), generator=g)
    mbs = [
        dict(
            tokens=toks[:, :-1],
            labels=toks[:, 1:],
            loss_mask=torch.ones(a.mbs, a.seq),
            position_ids=torch.arange(a.seq).expand(a.mbs, a.seq),
        )
    ]
    trainer.train_step([{k: v.clone() for k, v in mb.items()} for mb in mbs])
    params = sum(p.numel() for c in trainer.policy_chunks for p in c.parameters())
    samples = {"sync": [], "async": [], "async_total": []}
    for rep in range(a.reps):
        for v in rotated(list(VARIANTS), rep):
            root = f"{base}/{v}{rep}"
            t0 = time.perf_counter()  # what Trainer.save_checkpoint runs, with either setting of --async-save
            out = checkpoint.save_training_checkpoint(
                trainer.checkpoint_parts(),
                root,
                trainer.iteration,
                model_config=trainer.cfg.model,
                config=trainer.cfg.to_dict(),
                keep_last=1,
                async_save=v == "async",
            )
            blocked = time.perf_counter() - t0
            if v == "async":
                out.finish()
            total = time.perf_counter() - t0
            samples[v].append(blocked)
            if v == "async":
                samples["async_total"].append(total)
            shutil.rmtree(root, ignore_errors=True)
    trainer.lock.release()
    return params, samples


def main(argv=None):
    a = parse_args(argv)
    base = tempfile.mkdtemp(prefix="bench_async_save_", dir=a.dir)
    try:
        params, s = run_ranks(_worker, 1, a, base, threads=2)[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    sync, blocked, total = median(s["sync"]), median(s["async"]), median(s["async_total"])
    print(f"model: {params / 1e9:.3f}B parameters (fp32, Adam), {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}")
    print(
        table(
            ["variant", "loop blocked (s)", "save done (s)", "blocked vs sync"],
            [
                ["sync", sync, sync, 1.0],
                ["async", blocked, total, blocked / sync],
            ],
        )
    )
    print(f"ratio: the loop blocks {sync / blocked:.1f}x less with --async-save ({blocked:.2f} s vs {sync:.2f} s)")
    emit_json(
        dict(
            bench="async_save",
            params=params,
            sync_s=sync,
            async_blocked_s=blocked,
            async_total_s=total,
            blocked_ratio=blocked / sync,
            samples=s,
            machine=machine_info(),
        )
    )


if __name__ == "__main__":
    main()
