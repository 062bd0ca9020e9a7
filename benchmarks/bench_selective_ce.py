"""Selective vocab-parallel cross-entropy vs megatron-core's ``vocab_parallel_cross_entropy``: time and memory.

Variants, each timed as forward + backward of the summed loss on a logits leaf ``[N, V/TP]``:

* ``slm``       -- ``vocab_parallel_token_loss`` (per-token CE + logsumexp for every token, no autograd) then
                   ``selective_cross_entropy`` with a k=0.6 mask (gradient only for selected tokens), ``.sum()``,
                   backward. The mask (top-k of random scores) is built outside the timed region.
* ``slm_k1``    -- the same with every token selected (k=1.0): the same work as a plain CE (CLM path).
* ``megatron``  -- ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy(logits, labels).sum()``,
                   backward. It modifies its input in place, so every repetition of every variant gets a
                   fresh clone of the logits (made outside the timed region).

With ``--hidden H`` (default 256; 0 skips) the output layer joins in, timed on a hidden-states leaf
``[N, H]`` and a weight shard ``[V/TP, H]``:

* ``head_megatron`` -- ``F.linear`` (the output layer's matmul) then megatron-core's CE, dense backward.
* ``head_slm``      -- what training runs: ``head_logits`` + ``vocab_parallel_token_loss`` +
                       ``selective_head_cross_entropy`` at k, whose backward runs both matmuls over the
                       selected rows only.

Each variant's ratios (``x base``) are against its own baseline: ``megatron`` for the logits-level variants,
``head_megatron`` for the head variants. On CUDA the tensors live on the GPU, timings are synchronised and
the peak is GPU memory above what was allocated before the call.

Memory kept for backward (primary measure): the bytes of the distinct storages packed by
``torch.autograd.graph.saved_tensors_hooks`` during the forward; a saved view counts its whole storage,
since that is what stays alive. Secondary: peak RSS increase of the process during one forward+backward
(Linux ``/proc/self/clear_refs`` resets VmHWM), which also sees the transient temporaries, and the minor page
faults of the rank (fresh large allocations are mmap'd and faulted in page by page on CPU).

Times are wall clock (max over TP ranks) and, as a cross-check insensitive to other users' load on a shared
machine, the CPU time of the process (one torch thread by default).

Targets: time within 1.1x of megatron-core; saved bytes <= (k + 0.05) of megatron-core's.

    .venv/bin/python -m benchmarks.bench_selective_ce                     # 4096 x 32000, TP=1, fp32 + bf16
    .venv/bin/python -m benchmarks.bench_selective_ce --tp 2               # 2 forked gloo ranks, shard 16000
    .venv/bin/python -m benchmarks.bench_selective_ce --tokens 8192 --vocab 128256
"""

from __future__ import annotations

import argparse
import resource
import time

from benchmarks._common import emit_json, interleaved, machine_info, median, mib, run_ranks, table, verdict

VARIANTS = ("megatron", "slm", "slm_k1")
TIME_TARGET, MEM_SLACK = 1.10, 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="N = micro-batch x sequence tokens")
    p.add_argument("--vocab", type=int, default=32000, help="full vocab V (each TP rank holds V/TP)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--slm-select-ratio", dest="k", type=float, default=0.6, help="k: fraction of the tokens selected")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the output-layer variants (0: skip)")
    return p.parse_args(argv)


def variants(a) -> list[str]:
    return list(VARIANTS) + (["head_megatron", "head_slm"] if a.hidden else [])


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(a) -> dict | None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_slm.loss.vocab_parallel_ce import (
        head_logits,
        selective_head_cross_entropy,
        vocab_parallel_token_loss,
    )
    from megatron_slm.parallel import distributed
    from megatron_slm.slm import top_k_mask
    from tests.helpers.selective_ce import selective_cross_entropy

    torch.set_num_threads(a.threads)
    distributed.initialize(a.tp, 1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    part = a.vocab // a.tp
    g = torch.Generator().manual_seed(0)
    full = torch.randn(a.tokens, a.vocab, generator=g) * 2.0  # same full logits on every rank
    base32 = full[:, tp_rank * part : (tp_rank + 1) * part].contiguous()
    del full
    labels = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    valid = torch.ones(a.tokens, dtype=torch.bool)
    sel = {"slm": top_k_mask(torch.randn(a.tokens, generator=g), valid, a.k), "slm_k1": valid}
    dev = distributed.device()  # CUDA when there is a GPU
    cuda = dev.type == "cuda"
    base32, labels, valid = base32.to(dev), labels.to(dev), valid.to(dev)
    sel = {k: v.to(dev) for k, v in sel.items()}
    sel["head_slm"] = sel["slm"]
    names = variants(a)
    if a.hidden:
        hidden0 = torch.randn(a.tokens, a.hidden, generator=g).to(dev)
        weight0 = (torch.randn(a.vocab, a.hidden, generator=g) * a.hidden**-0.5)[
            tp_rank * part : (tp_rank + 1) * part
        ].to(dev)
    leaves = {}

    def run(variant, logits):
        if variant == "megatron":
            loss = vocab_parallel_cross_entropy(logits, labels).sum()
        elif variant == "head_megatron":
            h, w = leaves["head"]
            loss = vocab_parallel_cross_entropy(F.linear(h, w), labels).sum()
        elif variant == "head_slm":
            h, w = leaves["head"]
            z = head_logits(h, w)
            tl, lse = vocab_parallel_token_loss(z, labels, vocab_size=a.vocab)
            loss = selective_head_cross_entropy(
                h, w, labels, sel[variant], vocab_size=a.vocab, logits=z, token_loss=tl, logsumexp=lse
            ).sum()
            del z
        else:
            tl, lse = vocab_parallel_token_loss(logits, labels, vocab_size=a.vocab)
            loss = selective_cross_entropy(
                logits, labels, sel[variant], vocab_size=a.vocab, token_loss=tl, logsumexp=lse
            ).sum()
        return loss

    def saved_bytes(variant, base):
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            if not (variant.startswith("head_") and s.data_ptr() == leaves["head"][1].untyped_storage().data_ptr()):
                storages[s.data_ptr()] = s.nbytes()  # the weight is a parameter, kept anyway
            return t

        x = fresh_inputs(variant, base)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run(variant, x)
        loss.backward()
        return sum(storages.values())

    def fresh_inputs(variant, base):
        """A logits leaf; for the head variants also a (hidden, weight) pair of leaves in the logits' dtype."""
        if variant.startswith("head_"):
            leaves["head"] = (hidden0.to(base.dtype).requires_grad_(True), weight0.to(base.dtype).requires_grad_(True))
            return None
        return base.clone().requires_grad_(True)

    def one(variant, base):
        x = fresh_inputs(variant, base)
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
        have_peak = _reset_peak()
        rss0 = _rss_kib("VmRSS")
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        loss = run(variant, x)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        peak = (_rss_kib("VmHWM") - rss0) * 1024 if have_peak and rss0 is not None else float("nan")
        if cuda:  # the peak of GPU memory above what was allocated before the call
            peak = float(torch.cuda.max_memory_allocated() - mem0)
        t = torch.tensor([dt, cpu], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a TP step is as slow as its slowest rank
        del x, loss
        return float(t[0]), float(t[1]), float(peak), faults

    # Sanity: both give the same loss and gradient (k=1), so the comparison is like for like.
    x1, x2 = base32[:64].clone().requires_grad_(True), base32[:64].clone().requires_grad_(True)
    l1 = vocab_parallel_cross_entropy(x1, labels[:64])
    l1.sum().backward()
    tl, lse = vocab_parallel_token_loss(x2, labels[:64], vocab_size=a.vocab)
    selective_cross_entropy(
        x2, labels[:64], valid[:64], vocab_size=a.vocab, token_loss=tl, logsumexp=lse
    ).sum().backward()
    torch.testing.assert_close(tl, l1.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    if a.hidden:  # the fused head at k=1 gives the dense head's gradients
        grads = []
        for fused in (False, True):
            h, w = hidden0[:64].clone().requires_grad_(True), weight0.clone().requires_grad_(True)
            if fused:
                loss = selective_head_cross_entropy(h, w, labels[:64], valid[:64], vocab_size=a.vocab)
            else:
                loss = vocab_parallel_cross_entropy(F.linear(h, w), labels[:64])
            loss.sum().backward()
            grads.append((h.grad, w.grad))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-6)

    out = {}
    for dname in a.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        base = base32.to(dtype)
        mem = {v: saved_bytes(v, base) for v in names}
        samples = interleaved(names, lambda v, _step, base=base: one(v, base), a.warmup, a.reps)
        times, cpus, peaks, faults = ({v: [x[j] for x in samples[v]] for v in names} for j in range(4))
        out[dname] = {
            "times": times,
            "cpu": cpus,
            "peak_rss_bytes": peaks,
            "saved_bytes": mem,
            "faults": faults,
            "logits_bytes": base.numel() * base.element_size(),
        }
        del base
    return out if dist.get_rank() == 0 else None


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.vocab % a.tp:
        raise SystemExit("--vocab must be divisible by --tp")
    import torch

    torch.set_num_threads(a.threads)
    info = machine_info()
    t_start = time.perf_counter()
    if a.tp == 1:
        res = worker(a)
        from megatron_slm.parallel import distributed

        distributed.destroy()
    else:
        res = run_ranks(worker, a.tp, a, threads=a.threads)[0]

    print(
        f"\nselective CE: N={a.tokens} tokens x V={a.vocab} (shard {a.vocab // a.tp} per rank, TP={a.tp}), k={a.k}, "
        f"threads/proc={a.threads}, warmup={a.warmup} reps={a.reps} interleaved, medians"
    )
    results, targets, rows = {}, {}, []
    names = variants(a)
    for dname, r in res.items():
        med = {v: median(r["times"][v]) for v in names}
        cpu = {v: median(r["cpu"][v]) for v in names}
        base_of = {v: "head_megatron" if v.startswith("head_") else "megatron" for v in names}  # own baselines
        paired = {v: median([x / y for x, y in zip(r["times"][v], r["times"][base_of[v]])]) for v in names}
        peak = {v: median(r["peak_rss_bytes"][v]) for v in names}
        faults = {v: median(r["faults"][v]) for v in names}
        saved = r["saved_bytes"]
        for v in names:
            b = base_of[v]
            rows.append(
                [
                    dname,
                    v,
                    med[v] * 1e3,
                    med[v] / med[b],
                    paired[v],
                    cpu[v] / cpu[b],
                    mib(saved[v]),
                    saved[v] / saved[b],
                    mib(peak[v]),
                    faults[v] / 1e3,
                ]
            )
        t_ratio = med["slm"] / med["megatron"]
        m_ratio = saved["slm"] / saved["megatron"]
        targets[dname] = {
            "time_slm_over_megatron": {
                "value": t_ratio,
                "paired_value": paired["slm"],
                "cpu_time_value": cpu["slm"] / cpu["megatron"],
                "target_max": TIME_TARGET,
                "met": t_ratio <= TIME_TARGET,
            },
            "saved_bytes_slm_over_megatron": {
                "value": m_ratio,
                "target_max": a.k + MEM_SLACK,
                "met": m_ratio <= a.k + MEM_SLACK,
            },
        }
        if a.hidden:
            targets[dname]["time_head_slm_over_head_megatron"] = {
                "value": med["head_slm"] / med["head_megatron"],
                "cpu_time_value": cpu["head_slm"] / cpu["head_megatron"],
                "saved_bytes_value": saved["head_slm"] / saved["head_megatron"],
            }
        results[dname] = {
            "median_s": med,
            "median_cpu_s": cpu,
            "paired_ratio_over_megatron": paired,
            "minor_page_faults": faults,
            "saved_bytes": saved,
            "peak_rss_increase_bytes": peak,
            "logits_bytes_per_rank": r["logits_bytes"],
            "all_s": {v: [round(x, 5) for x in r["times"][v]] for v in names},
        }
    print(
        table(
            [
                "dtype",
                "variant",
                "fwd+bwd ms",
                "x base",
                "x base paired",
                "x base CPU",
                "saved MiB",
                "saved x base",
                "peak mem+ MiB",
                "page faults k",
            ],
            rows,
        )
    )
    for dname, t in targets.items():
        tt, mm = t["time_slm_over_megatron"], t["saved_bytes_slm_over_megatron"]
        print(
            f"[{dname}] target time slm/megatron <= {TIME_TARGET}: {tt['value']:.3f} (paired {tt['paired_value']:.3f},"
            f" CPU time {tt['cpu_time_value']:.3f}) -> {verdict(tt['met'])};  saved bytes slm/megatron <= "
            f"{a.k + MEM_SLACK:.2f}: {mm['value']:.3f} -> {verdict(mm['met'])}"
        )
        if "time_head_slm_over_head_megatron" in t:
            hh = t["time_head_slm_over_head_megatron"]
            print(
                f"[{dname}] with the output layer (H={a.hidden}): head_slm/head_megatron time {hh['value']:.3f} "
                f"(CPU time {hh['cpu_time_value']:.3f}), saved bytes {hh['saved_bytes_value']:.3f}"
            )
    payload = {
        "bench": "selective_ce",
        "args": vars(a),
        "machine": info,
        "results": results,
        "targets": targets,
        "wall_s": time.perf_counter() - t_start,
    }
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
