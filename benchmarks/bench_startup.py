"""Start-up cost of building a model whose weights are loaded next: random init then load (before) vs no draw.

A resumed run, a run from --pretrained-checkpoint and every run's reference (--ref-load) load all their weights
right after building the model. Before, the build drew the whole model anyway (megatron-core's init, then
``layout_invariant_init`` drawing each full, unsharded tensor on every rank); now ``build_model(initialize=False)``
draws nothing. Both variants are built side by side in the same forked gloo ranks (TP=2 by default, TinyLlama-1.1B's
shape), repetitions interleaved; the load that follows is the same in both and not timed.

    .venv/bin/python -m benchmarks.bench_startup                    # TinyLlama-1.1B shape, TP=2, ~2 min
    .venv/bin/python -m benchmarks.bench_startup --preset tiny      # seconds
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import emit_json, interleaved, machine_info, median, run_ranks, table

VARIANTS = ("init then load (before)", "no draw (after)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tinyllama-1.1b", help="model shape (default: tinyllama-1.1b)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size = processes (default: 2)")
    p.add_argument("--reps", type=int, default=2, help="timed builds per variant (default: 2)")
    return p.parse_args(argv)


def worker(a) -> dict:
    import gc

    import torch

    from megatron_slm.config import load_config
    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    cfg = load_config(
        overrides=dict(model=dict(preset=a.preset, vocab_size=32000), parallel=dict(tensor_model_parallel_size=a.tp))
    )
    distributed.initialize(a.tp, 1, seed=1)
    params = {}

    def build(variant, _step):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        model = build_model(cfg.model, cfg.parallel, seed=1, initialize=variant == VARIANTS[0])
        seconds = time.perf_counter() - t0
        params["local"] = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        return seconds

    return {"samples": interleaved(list(VARIANTS), build, warmup=1, reps=a.reps), "params": params["local"]}


def main(argv=None):
    a = parse_args(argv)
    results = run_ranks(worker, a.tp, a)
    slowest = {v: [max(r["samples"][v][i] for r in results) for i in range(a.reps)] for v in VARIANTS}
    med = {v: median(slowest[v]) for v in VARIANTS}
    rows = [[v, med[v], med[v] / med[VARIANTS[1]]] for v in VARIANTS]
    print(
        f"model build at start, {a.preset} at TP={a.tp} ({results[0]['params'] * a.tp / 1e9:.2f}B parameters), "
        f"slowest rank, median of {a.reps}:"
    )
    print(table(["variant", "seconds", "x no draw"], rows))
    print("a run pays it for the policy (resume or --pretrained-checkpoint) and again for the reference (--ref-load)")
    emit_json(
        {
            "bench": "startup",
            "preset": a.preset,
            "tp": a.tp,
            "seconds": med,
            "ratio": med[VARIANTS[0]] / med[VARIANTS[1]],
            "machine": machine_info(),
        }
    )


if __name__ == "__main__":
    main()
