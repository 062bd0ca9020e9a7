"""Run a function on N forked processes joined by gloo, as torchrun would, and collect their results.

Forking from the pytest process (megatron already imported) costs ~2 s a launch instead of ~10 s for a
fresh torchrun; tests/test_launch.py keeps one real torchrun smoke test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import traceback

from megatron_slm.parallel.distributed import free_port


def _child(rank, world_size, port, queue, fn, args, kwargs):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    import faulthandler

    import torch

    faulthandler.dump_traceback_later(170, exit=True)
    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensor data; the queue's own pickler would share it through a child's memory
        # that is gone once the child exits.
        result = pickle.dumps(fn(*args, **kwargs))
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_slm.parallel import distributed

            distributed.destroy()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` ranks; returns each rank's return value, rank order.

    Raises with the first failing rank's traceback, or on timeout.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, queue, fn, args, kwargs)) for r in range(world_size)]
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
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [pickle.loads(results[r]) for r in range(world_size)]
