"""Shared helpers of the benchmark scripts: interleaved timing, medians, tables, the JSON line, forked ranks.

Every script measures its variants side by side in one run (repetitions interleaved in a rotating order,
medians over repetitions), so background load on a shared machine slows all variants alike and the ratios
stay meaningful even when the absolute times do not.

The scripts run as modules from the repository root (``.venv/bin/python -m benchmarks.bench_step_time``), which
puts the root on the import path: ``benchmarks`` and the tests' shared helpers (``tests.helpers``) import from
there, and megatron_slm from its (editable) install.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def rotated(variants: list, rep: int) -> list:
    """Repetition ``rep`` runs the variants starting at a different one each time (ABC, BCA, CAB, ...), so no
    variant always follows the same neighbour (cache state, allocator state, thermal/load drift)."""
    r = rep % len(variants)
    return variants[r:] + variants[:r]


def interleaved(variants: list, run, warmup: int, reps: int) -> dict:
    """``run(variant, step)`` for every variant: ``warmup`` untimed rounds, then ``reps`` rounds in ``rotated``
    order (steps warmup .. warmup + reps - 1); returns {variant: [what run returned, per rep]}."""
    for i in range(warmup):
        for v in variants:
            run(v, i)
    samples = {v: [] for v in variants}
    for r in range(reps):
        for v in rotated(variants, r):
            samples[v].append(run(v, warmup + r))
    return samples


def machine_info() -> dict:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
        "processor": platform.processor() or platform.machine(),
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3f}"
    return str(c)


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def emit_json(payload: dict) -> None:
    """The one machine-readable line every script ends with."""
    print("BENCH_JSON " + json.dumps(payload, sort_keys=True, default=_json_default), flush=True)


def _json_default(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def mib(nbytes: float) -> float:
    return nbytes / 2**20


class Timer:
    """Accumulates wall time of the calls of a wrapped function (per-phase timings)."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed(*a, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()  # CUDA work is asynchronous: count it in the phase that queued it
                self.total += time.perf_counter() - t0

        return timed

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


def run_ranks(fn, world: int, *args, threads: int = 1, timeout: float = 3600.0) -> list:
    """``fn(*args)`` on ``world`` forked gloo ranks (RANK/WORLD_SIZE/MASTER_* set); each rank's result, in order."""
    from tests.helpers.forked import run_forked

    return run_forked(fn, world, *args, threads=threads, timeout=timeout)


def add_model_args(p, *, vocab: int, seq: int, gbs: int, groups: bool = False) -> None:
    """The model-shape and batch flags the step benchmarks share (defaults: a 4-layer, hidden-256 Llama)."""
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--ffn", type=int, default=704, help="SwiGLU inner size")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    if groups:
        p.add_argument("--groups", type=int, default=4, help="KV heads (GQA)")
    p.add_argument("--vocab", type=int, default=vocab, help="vocabulary size")
    p.add_argument("--seq", type=int, default=seq, help="sequence length")
    p.add_argument("--mbs", type=int, default=2, help="micro-batch size")
    p.add_argument("--gbs", type=int, default=gbs, help="global batch size")
