"""Step time of SLM (online reference), SLM (offline scores) and plain CLM: same model, layout and batch.

All three variants are real ``megatron_slm.training.trainer.Trainer`` objects built in the same process
group (one process by default; ``--nproc 4 --tp 2 --pp 2`` forks gloo ranks): ``loss_mode=clm``;
``loss_mode=slm, reference_mode=online`` (a same-size frozen reference runs a forward-only pipeline pass
every step); ``loss_mode=slm, reference_mode=offline`` (the trainer reads ``mb["ref_loss"]``; the
micro-batches carry precomputed per-token reference losses exactly as ``OfflineScores.attach`` sets them,
so the sidecar read, which is data-loading work outside the step, is not timed).

After warm-up steps the variants take turns step by step (rotating order); the reported time of a variant
is the median of its steps. Per-phase times come from timing the trainer's own calls: reference/scoring
pass (``Trainer.prepare_selection``), optimizer (``Trainer._optimizer_step``: megatron-core's step in stages), and the training pass (the rest:
1F1B / no-pipelining forward-backward with the loss).

``--ref-dtype bf16`` runs the online reference in bf16 (the default on GPU), fp32 otherwise on CPU.

Targets (issue "Benchmarks and speed"): SLM_online / CLM <= 1.36 (the FLOP floor is 1.33 for a same-size
reference: its forward is 2N FLOPs/token against 6N for a training step); SLM_offline / CLM <= 1.03.

    .venv/bin/python -m benchmarks.bench_step_time                      # TP=1 PP=1, one process (~2 min)
    .venv/bin/python -m benchmarks.bench_step_time --nproc 4 --tp 2 --pp 2
    .venv/bin/python -m benchmarks.bench_step_time --ref-dtype bf16    # bf16 reference (AMX/avx512-bf16 CPUs, GPU)
    .venv/bin/python -m benchmarks.bench_step_time --layers 22 --hidden 2048 --ffn 5632 --heads 32 \
        --groups 4 --vocab 32000 --seq 2048 --mbs 1 --gbs 8             # TinyLlama-1.1B shape (GPU sized)
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import (
    Timer,
    add_model_args,
    emit_json,
    interleaved,
    machine_info,
    median,
    run_ranks,
    table,
    verdict,
)

VARIANTS = ("clm", "slm_online", "slm_offline")
TARGETS = {"slm_online": 1.36, "slm_offline": 1.03}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, vocab=8192, seq=256, gbs=8, groups=True)
    p.add_argument("--slm-select-ratio", dest="k", type=float, default=0.6, help="k: fraction of the tokens selected")
    p.add_argument(
        "--selection-scope",
        dest="scope",
        default="micro_batch",
        choices=("sequence", "micro_batch", "global_batch", "threshold"),
        help="selection scope",
    )
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="processes (TP x PP x DP); >1 forks gloo ranks")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant")
    p.add_argument("--reps", type=int, default=9, help="timed steps per variant (interleaved)")
    p.add_argument("--bf16", action="store_true", help="bf16 policy and reference (GPU runs)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak TFLOP/s for MFU (default on CUDA: 989 = H100/H200 bf16 dense)",
    )
    p.add_argument(
        "--ref-dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="online reference dtype (default: bf16 with --bf16, else fp32)",
    )
    return p.parse_args(argv)


def make_config(a, variant: str):
    from megatron_slm.config import load_config

    slm = dict(slm_select_ratio=a.k, selection_scope=a.scope)
    if variant == "clm":
        slm.update(loss_mode="clm")
    else:
        slm.update(loss_mode="slm", reference_mode="online" if variant == "slm_online" else "offline")
    return load_config(
        overrides=dict(
            model=dict(
                preset="tiny",
                vocab_size=a.vocab,
                num_layers=a.layers,
                hidden_size=a.hidden,
                ffn_hidden_size=a.ffn,
                num_attention_heads=a.heads,
                num_query_groups=a.groups,
                max_position_embeddings=max(1024, a.seq),
            ),
            reference=dict(dtype=a.ref_dtype or ("bf16" if a.bf16 else "fp32")),  # the policy's shape
            parallel=dict(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp),
            slm=slm,
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
                bf16=bool(a.bf16),
            ),
        )
    )


def train_flops_per_token(a) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward; the reference is not counted).

    Forward per layer: 2 x the matmul weights (QKV with GQA, output projection, SwiGLU's three) plus
    4 x seq x hidden for the attention scores and the weighted sum (full square, Megatron's convention);
    plus the output layer, 2 x hidden x vocab."""
    head_dim = a.hidden // a.heads
    linear = a.hidden * (a.hidden + 2 * a.groups * head_dim) + a.hidden * a.hidden + 3 * a.hidden * a.ffn
    forward = a.layers * (2 * linear + 4 * a.seq * a.hidden) + 2 * a.hidden * a.vocab
    return 3.0 * forward


def synthetic_batch(a, step: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This DP rank's micro-batches of a random global batch (with some EOD-masked tokens) plus the
    per-token reference losses an offline score sidecar would supply."""
    import torch

    g = torch.Generator().manual_seed(100 + step)
    toks = torch.randint(3, a.vocab, (a.gbs, a.seq + 1), generator=g)
    toks[torch.rand(a.gbs, a.seq + 1, generator=g) < 0.02] = 2  # EOD
    inputs = toks[:, :-1]
    batch = dict(
        tokens=inputs,
        labels=toks[:, 1:].contiguous(),
        loss_mask=(inputs != 2).float(),
        position_ids=torch.arange(a.seq).expand(a.gbs, a.seq).contiguous(),
        ref_loss=torch.rand(a.gbs, a.seq, generator=g) * 8.0,
    )
    per = a.gbs // dp_size
    part = {k: v[dp_rank * per : (dp_rank + 1) * per] for k, v in batch.items()}
    return [{k: v[i : i + a.mbs].clone() for k, v in part.items()} for i in range(0, per, a.mbs)]


def worker(a) -> dict | None:
    import torch
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer

    torch.set_num_threads(a.threads)
    trainers, timers = {}, {}
    for v in VARIANTS:
        t = Trainer(make_config(a, v))
        prep, opt = Timer(), Timer()
        t.prepare_selection = prep.wrap(t.prepare_selection)
        t._optimizer_step = opt.wrap(t._optimizer_step)  # the trainer runs megatron-core's step in stages
        trainers[v], timers[v] = t, (prep, opt)
    any_t = trainers["clm"]
    dp_rank, dp_size = any_t.dp_rank, any_t.dp_size
    n_params = sum(p.numel() for p in any_t.policy_module.parameters())

    from megatron_slm.parallel.distributed import device

    dev = device()

    def step(v, i):
        mbs = synthetic_batch(a, i, dp_rank, dp_size)
        if v != "slm_offline":
            for mb in mbs:
                del mb["ref_loss"]
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        trainers[v].train_step(mbs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are asynchronous: count them in its time
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        prep, opt = timers[v][0].take(), timers[v][1].take()
        # The step of the slowest rank is the step time, its phases from the same rank; CPU time summed over
        # ranks (gloo waits block rather than spin, so it is the work done, whatever the load from others).
        x = torch.tensor([total, prep, opt, cpu], dtype=torch.float64, device=dev)  # NCCL: on the GPU
        gathered = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x)
        slowest = max(gathered, key=lambda y: float(y[0])).tolist()
        slowest[3] = float(sum(float(y[3]) for y in gathered))  # CPU time: all ranks' work together
        return slowest

    names = list(VARIANTS)
    samples = interleaved(names, step, a.warmup, a.reps)
    n_params_all = torch.tensor([float(n_params)], device=dev)
    dist.all_reduce(n_params_all)  # over-counts DP replicas; divided below
    if dist.get_rank() != 0:
        return None
    return {"samples": samples, "params_per_replica": n_params_all.item() / dp_size, "dp": dp_size}


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.nproc % (a.tp * a.pp):
        raise SystemExit(f"--nproc {a.nproc} is not a multiple of TP x PP = {a.tp * a.pp}")
    import torch

    torch.set_num_threads(a.threads)
    info = machine_info()
    t_start = time.perf_counter()
    if a.nproc == 1:
        res = worker(a)
        from megatron_slm.parallel import distributed

        distributed.destroy()
    else:
        res = run_ranks(worker, a.nproc, a, threads=a.threads)[0]

    names = list(VARIANTS)
    med = {}
    for v in names:
        s = res["samples"][v]
        total, prep, opt = (median([x[j] for x in s]) for j in range(3))
        med[v] = {
            "step_s": total,
            "ref_or_scoring_pass_s": prep,
            "optimizer_s": opt,
            "training_pass_s": median([x[0] - x[1] - x[2] for x in s]),
            "cpu_s": median([x[3] for x in s]),
            "all_step_s": [round(x[0], 5) for x in s],
        }
    clm = med["clm"]["step_s"]
    tokens = a.gbs * a.seq
    ratios = {v: med[v]["step_s"] / clm for v in names}
    # Ratio of medians can be noisy; the median of per-repetition ratios pairs steps taken close in time.
    paired = {v: median([x[0] / c[0] for x, c in zip(res["samples"][v], res["samples"]["clm"])]) for v in names}
    # CPU time (1 thread per process; summed over ranks): insensitive to time spent descheduled by other users'
    # load. With several processes on 2 cores the ranks also wait for each other, which wall time includes.
    cpu_ratios = {v: med[v]["cpu_s"] / med["clm"]["cpu_s"] for v in names}

    print(
        f"\nstep time: layers={a.layers} hidden={a.hidden} ffn={a.ffn} heads={a.heads}/{a.groups} vocab={a.vocab} "
        f"seq={a.seq} mbs={a.mbs} gbs={a.gbs} k={a.k} scope={a.scope} | TP={a.tp} PP={a.pp} DP={res['dp']} "
        f"nproc={a.nproc} threads/proc={a.threads} | {res['params_per_replica'] / 1e6:.2f}M params/replica | "
        f"warmup={a.warmup} reps={a.reps} interleaved, medians"
    )
    rows = []
    for v in names:
        m = med[v]
        rows.append(
            [
                v,
                m["step_s"],
                m["ref_or_scoring_pass_s"],
                m["training_pass_s"],
                m["optimizer_s"],
                tokens / m["step_s"],
                ratios[v],
                paired[v],
                m["cpu_s"],
                cpu_ratios[v],
            ]
        )
    print(
        table(
            [
                "variant",
                "step s",
                "ref pass s",
                "train pass s",
                "optim s",
                "tokens/s",
                "x CLM",
                "x CLM paired",
                "CPU s",
                "x CLM CPU",
            ],
            rows,
        )
    )
    targets = {}
    for v, limit in TARGETS.items():
        ok = ratios[v] <= limit
        targets[f"{v}_over_clm"] = {
            "value": ratios[v],
            "paired_value": paired[v],
            "cpu_time_value": cpu_ratios[v],
            "target_max": limit,
            "met": ok,
        }
        print(
            f"target {v}/CLM <= {limit:.2f}: {ratios[v]:.3f} wall (paired {paired[v]:.3f}, CPU time "
            f"{cpu_ratios[v]:.3f}) -> {verdict(ok)}"
        )
    peak = a.peak_tflops or (989.0 if torch.cuda.is_available() else None)
    flops = train_flops_per_token(a) * tokens
    mfu = {}
    for v in names:
        tflops = flops / med[v]["step_s"] / 1e12 / a.nproc  # per device
        mfu[v] = {"model_tflops_per_device": tflops, "mfu": tflops / peak if peak else None}
    print(
        "model TFLOP/s per device (6N + attention per token, the reference not counted): "
        + ", ".join(
            f"{v} {m['model_tflops_per_device']:.3g}" + (f" (MFU {m['mfu']:.1%} of {peak:g})" if peak else "")
            for v, m in mfu.items()
        )
    )
    print(f"SLM online tokens/s = {1 / ratios['slm_online']:.3f} x CLM's")
    ref_share = med["slm_online"]["ref_or_scoring_pass_s"] / med["clm"]["step_s"]
    print(f"reference pass = {ref_share:.3f} of a CLM step (FLOP model for a same-size reference: 2N/6N = 0.333)")
    payload = {
        "bench": "step_time",
        "args": vars(a),
        "machine": info,
        "medians": med,
        "ratios_over_clm": ratios,
        "paired_ratios_over_clm": paired,
        "cpu_time_ratios_over_clm": cpu_ratios,
        "targets": targets,
        "mfu": mfu,
        "peak_tflops": peak,
        "train_flops_per_token": train_flops_per_token(a),
        "reference_pass_over_clm_step": ref_share,
        "tokens_per_step": tokens,
        "params_per_replica": res["params_per_replica"],
        "dp": res["dp"],
        "wall_s": time.perf_counter() - t_start,
    }
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
