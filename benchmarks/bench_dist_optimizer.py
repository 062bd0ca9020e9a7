"""Per-rank optimizer memory of megatron-core's distributed optimizer vs the plain one, side by side in one run.

Both variants are real ``Trainer`` objects (CLM, same model and data) built in the same forked gloo ranks (DP=2 by
default; ``--tp`` adds tensor parallelism). After a few steps, each rank counts the bytes of the tensors it holds
(``tests/helpers/memory.py``): Adam's moments (``state``), fp32 master weights kept apart from the model's own
weights (``master``: none for fp32, where the optimizer updates the weights in place), and gradients (``grads``:
DDP's buffer, which stays whole on every rank, plus any separate copy). fp32 and bf16 (fp32 master weights) are
both measured. Steps of the two variants alternate (rotating order) for a step-time comparison; on 2 shared CPU
cores the times say little beyond "no large cost".

    .venv/bin/python -m benchmarks.bench_dist_optimizer              # DP=2, ~1 min
    .venv/bin/python -m benchmarks.bench_dist_optimizer --nproc 4    # DP=4
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import add_model_args, emit_json, machine_info, median, mib, rotated, run_ranks, table

VARIANTS = ("plain", "distributed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, vocab=8192, seq=128, gbs=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2, help="processes (TP x DP)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and dtype (after one warm-up)")
    return p.parse_args(argv)


def make_config(a, variant: str, bf16: bool):
    from megatron_slm.config import load_config

    return load_config(
        overrides=dict(
            model=dict(
                preset="tiny",
                vocab_size=a.vocab,
                num_layers=a.layers,
                hidden_size=a.hidden,
                ffn_hidden_size=a.ffn,
                num_attention_heads=a.heads,
                num_query_groups=a.heads,
            ),
            parallel=dict(tensor_model_parallel_size=a.tp, use_distributed_optimizer=variant == "distributed"),
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
                bf16=bf16,
            ),
        )
    )


def batch(a, step: int, dp_rank: int, dp_size: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(100 + step)
    toks = torch.randint(1, a.vocab, (a.gbs, a.seq + 1), generator=g)
    inputs = toks[:, :-1]
    b = dict(
        tokens=inputs,
        labels=toks[:, 1:].contiguous(),
        loss_mask=torch.ones(a.gbs, a.seq),
        position_ids=torch.arange(a.seq).expand(a.gbs, a.seq).contiguous(),
    )
    per = a.gbs // dp_size
    part = {k: v[dp_rank * per : (dp_rank + 1) * per] for k, v in b.items()}
    return [{k: v[i : i + a.mbs].clone() for k, v in part.items()} for i in range(0, per, a.mbs)]


def worker(a) -> dict:
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer
    from tests.helpers.memory import optimizer_bytes

    out = {}
    for bf16 in (False, True):
        trainers = {v: Trainer(make_config(a, v, bf16)) for v in VARIANTS}
        t0 = trainers["plain"]
        times = {v: [] for v in VARIANTS}
        losses = {v: [] for v in VARIANTS}
        for i in range(a.steps + 1):
            for v in rotated(list(VARIANTS), i):
                dist.barrier()
                start = time.perf_counter()
                m = trainers[v].train_step(batch(a, i, t0.dp_rank, t0.dp_size))
                if i:  # the first step allocates Adam's state
                    times[v].append(time.perf_counter() - start)
                losses[v].append(m.get("loss_all"))
        out["bf16" if bf16 else "fp32"] = {
            v: dict(optimizer_bytes(trainers[v]), step_s=median(times[v]), losses=losses[v]) for v in VARIANTS
        }
        out["params_local"] = sum(p.numel() for p in t0.policy_module.parameters())
        out["dp"] = t0.dp_size
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    info = machine_info()
    start = time.perf_counter()
    ranks = run_ranks(worker, a.nproc, a)
    dp = ranks[0]["dp"]
    rows, result = [], {}
    for dtype in ("fp32", "bf16"):
        per_rank = []
        for rank, r in enumerate(ranks):
            p, d = r[dtype]["plain"], r[dtype]["distributed"]
            opt_p, opt_d = p["state"] + p["master"], d["state"] + d["master"]
            all_p, all_d = opt_p + p["grads"], opt_d + d["grads"]
            bytes_only = {v: {k: r[dtype][v][k] for k in ("state", "master", "grads")} for v in VARIANTS}
            per_rank.append(dict(rank=rank, **bytes_only, opt_ratio=opt_d / opt_p, total_ratio=all_d / all_p))
            rows.append(
                [
                    dtype,
                    rank,
                    mib(p["state"]),
                    mib(d["state"]),
                    mib(p["master"]),
                    mib(d["master"]),
                    mib(p["grads"]),
                    mib(d["grads"]),
                    opt_d / opt_p,
                    all_d / all_p,
                ]
            )
        last = ranks[-1][dtype]
        result[dtype] = dict(
            per_rank=per_rank,
            opt_ratio=max(x["opt_ratio"] for x in per_rank),
            total_ratio=max(x["total_ratio"] for x in per_rank),
            step_s={v: last[v]["step_s"] for v in VARIANTS},
            max_loss_diff=max(abs(x - y) for x, y in zip(last["plain"]["losses"], last["distributed"]["losses"])),
        )
    print(
        f"\noptimizer memory per rank: DP={dp} TP={a.tp} layers={a.layers} hidden={a.hidden} vocab={a.vocab} "
        f"({ranks[0]['params_local'] / 1e6:.2f}M parameters per rank), MiB"
    )
    print(
        table(
            [
                "dtype",
                "rank",
                "state plain",
                "state dist",
                "master plain",
                "master dist",
                "grads plain",
                "grads dist",
                "(state+master) dist/plain",
                "(+grads) dist/plain",
            ],
            rows,
        )
    )
    for dtype in ("fp32", "bf16"):
        r = result[dtype]
        print(
            f"{dtype}: step time plain {r['step_s']['plain']:.3f} s, distributed {r['step_s']['distributed']:.3f} s; "
            f"max |loss difference| over {a.steps + 1} steps {r['max_loss_diff']:.2e}"
        )
    payload = dict(
        bench="dist_optimizer",
        args=vars(a),
        machine=info,
        dp=dp,
        result=result,
        wall_s=round(time.perf_counter() - start, 1),
    )
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
