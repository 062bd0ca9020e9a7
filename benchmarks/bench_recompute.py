"""Step time and activation memory of the policy's activation recomputation: none vs selective vs full.

Three real ``Trainer`` objects (SLM with the online reference, same model, layout and batch as
``bench_step_time.py``) differing only in ``--recompute-granularity`` (full: ``--recompute-method uniform
--recompute-num-layers 1``). After warm-up they take turns step by step; medians are reported. Activation
memory is the bytes autograd saves for backward during one training step (unique storages, counted with
``torch.autograd.graph.saved_tensors_hooks``) divided by the micro-batches of the step.

    .venv/bin/python -m benchmarks.bench_recompute                 # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import time

from benchmarks._common import emit_json, interleaved, machine_info, median, mib, table
from benchmarks.bench_step_time import make_config, parse_args, synthetic_batch

VARIANTS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    import torch

    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def main(argv=None) -> dict:
    import torch

    from megatron_slm.parallel import distributed
    from megatron_slm.training.trainer import Trainer

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    trainers = {}
    for name, extra in VARIANTS.items():
        cfg = make_config(a, "slm_online")
        for k, v in extra.items():
            setattr(cfg.train, k, v)
        trainers[name] = Trainer(cfg)
    names = list(VARIANTS)

    def step(name, i):
        mbs = synthetic_batch(a, i, 0, 1)
        for mb in mbs:
            del mb["ref_loss"]
        t0 = time.perf_counter()
        nbytes, _ = saved_bytes(lambda: trainers[name].train_step(mbs))
        return time.perf_counter() - t0, nbytes / len(mbs)

    samples = interleaved(names, step, a.warmup, a.reps)
    distributed.destroy()
    med = {
        n: {"step_s": median([s[0] for s in samples[n]]), "saved_bytes_per_microbatch": samples[n][-1][1]}
        for n in names
    }
    base = med["none"]
    print(
        f"\nrecompute: layers={a.layers} hidden={a.hidden} ffn={a.ffn} seq={a.seq} mbs={a.mbs} gbs={a.gbs} | "
        f"SLM online reference, TP=1 PP=1 | warmup={a.warmup} reps={a.reps} interleaved, medians"
    )
    rows = [
        [
            n,
            m["step_s"],
            m["step_s"] / base["step_s"],
            mib(m["saved_bytes_per_microbatch"]),
            m["saved_bytes_per_microbatch"] / base["saved_bytes_per_microbatch"],
        ]
        for n, m in med.items()
    ]
    print(table(["recompute", "step s", "x none", "saved MiB/micro-batch", "x none"], rows))
    payload = {
        "bench": "recompute",
        "args": vars(a),
        "machine": machine_info(),
        "medians": med,
        "step_time_over_none": {n: med[n]["step_s"] / base["step_s"] for n in names},
        "saved_bytes_over_none": {
            n: med[n]["saved_bytes_per_microbatch"] / base["saved_bytes_per_microbatch"] for n in names
        },
        "wall_s": time.perf_counter() - start,
    }
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
