"""Run a function on N forked local processes joined by gloo, as torchrun would, and collect their results.

Forking from a process that has already imported megatron-core costs ~2 s a launch instead of ~10 s for a
fresh torchrun; the tests and the benchmarks launch their multi-rank cases this way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import traceback

from megatron_slm.parallel.distributed import free_port


def _child(rank, world_size, port, queue, fn, args, kwargs, threads, watchdog_s):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import faulthandler

    import torch

    if watchdog_s:  # a hung rank dumps its stack and exits instead of blocking the parent
        faulthandler.dump_traceback_later(watchdog_s, exit=True)
    torch.set_num_threads(threads)
    try:
        # Plain pickle copies tensor data; the queue's own pickler would share it through a child's memory
        # that is gone once the child exits.
        queue.put((rank, "ok", pickle.dumps(fn(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_slm.parallel import distributed

            distributed.destroy()
        except Exception:  # noqa: BLE001
            pass


def run_forked(
    fn, world_size: int, *args, threads: int = 1, timeout: float = 180.0, watchdog_s: float | None = None, **kwargs
) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` forked ranks; returns each rank's return value, in rank order.

    Raises with the first failing rank's traceback, or when no result arrives within ``timeout`` seconds.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, queue, fn, args, kwargs, threads, watchdog_s))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    except queue_mod.Empty:
        raise RuntimeError(f"distributed run timed out after {timeout}s; finished ranks: {sorted(results)}") from None
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [pickle.loads(results[r]) for r in range(world_size)]
