"""--async-save (issue 20, item 5): the loop blocks only for the copy to host memory, the write finishes in the
background with the same atomic commit, a kill during that write leaves the previous checkpoint intact and
loadable, and a resume from an async checkpoint is bitwise equal to one from a synchronous checkpoint."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from dist_helpers import run_distributed
from helpers.forked import _child
from helpers.tiny_training import make_config, my_micro_batches

import megatron_slm.training.trainer  # noqa: F401 - import megatron-core once, before forking ranks
from megatron_slm.checkpoint import LATEST
from megatron_slm.parallel.distributed import free_port

STEPS = 6
WRITE_S = 1.5  # the patched writer's extra time per bucket file (test 3)


def _cfg(save, async_save, **ck):
    cfg = make_config(2, 1, selection_scope="threshold")  # TP=2; threshold: selection state must survive too
    cfg.train.train_iters = STEPS
    cfg.checkpoint.save = str(save) if save else None
    cfg.checkpoint.async_save = async_save
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


def _patch_writer(hook):
    """Wrap megatron-core's per-bucket writer (what the background thread runs): ``hook(bucket)`` first."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    real = FileSystemWriterAsync.write_preloaded_data

    def write(transforms, *args, **kwargs):
        hook(kwargs["write_bucket"] if "write_bucket" in kwargs else args[1])
        return real(transforms, *args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(write)


def _run(save, async_save, slow=False, kill_at=None, **ck):
    """Train STEPS steps saving every 2; ``slow``: each bucket's write takes WRITE_S longer (timings returned);
    ``kill_at``: SIGKILL this rank partway through writing that iteration's first bucket file."""
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(_cfg(save, async_save, save_interval=2, **ck))
    trainer.resume()
    events = []  # (what, time)

    def hook(bucket):
        path = bucket[0]
        if kill_at is not None and f"iter_{kill_at:07d}" in path:
            with open(path, "wb") as f:  # part of the file, then gone mid-write
                f.write(b"\0" * 1000)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if slow:
            time.sleep(WRITE_S)
            events.append(("written", time.perf_counter()))

    _patch_writer(hook)
    real_step, real_save = trainer.train_step, trainer.save_checkpoint
    losses = []

    def step(mbs):
        events.append(("step", time.perf_counter()))
        m = real_step(mbs)
        losses.append(m.get("loss_selected"))
        return m

    def save_checkpoint(*a, **k):
        t = time.perf_counter()
        real_save(*a, **k)
        events.append(("saved", t, time.perf_counter() - t))

    trainer.train_step, trainer.save_checkpoint = step, save_checkpoint
    trainer.train(lambda s: my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size))
    params = gather_full(trainer.policy_module)
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    return dict(losses=losses, params=params, events=events)


def _resume(path):
    """A fresh run loaded from the iteration directory ``path``, trained to STEPS (no saving)."""
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(_cfg(None, False))
    start = trainer.load_checkpoint(path)
    result = trainer.train(lambda s: my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size))
    params = gather_full(trainer.policy_module)
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    return dict(start=start, losses=[h["loss_selected"] for h in result["history"]], params=params)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    return root, run_distributed(_run, 2, root, False)[-1]


def test_async_save_resumes_bitwise_like_a_sync_save_and_does_not_block_the_loop(tmp_path, sync_run):
    sync_root, sync = sync_run
    run = run_distributed(_run, 2, tmp_path, True, slow=True)[-1]
    assert run["losses"] == sync["losses"] and _equal(run["params"], sync["params"])  # training unchanged
    assert (tmp_path / LATEST).read_text() == str(STEPS)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000006"]  # keep_last=2

    # (3) the step after an in-loop save starts before its write ends; the loop blocked far less than the write
    events = run["events"]
    # (the save at 4 first waits for the write of 2's, and the final save waits for its own)
    first = next(i for i, e in enumerate(events) if e[0] == "saved")
    blocked = events[first][2]
    next_step = next(e[1] for e in events[first:] if e[0] == "step")
    write_end = next(e[1] for e in events[first:] if e[0] == "written")  # (its first bucket, even)
    assert next_step < write_end, "the next training step waited for the background write"
    assert blocked < WRITE_S / 3, f"save_checkpoint blocked {blocked:.2f}s for a {WRITE_S}s write"

    # (1) resuming from the async iteration-4 checkpoint equals resuming from the sync one, bitwise
    from_async = run_distributed(_resume, 2, str(tmp_path / "iter_0000004"))[-1]
    from_sync = run_distributed(_resume, 2, str(sync_root / "iter_0000004"))[-1]
    assert from_async["start"] == from_sync["start"] == 4
    assert from_async["losses"] == from_sync["losses"] == sync["losses"][4:]
    assert _equal(from_async["params"], from_sync["params"]) and _equal(from_async["params"], sync["params"])


def test_kill_during_background_write_keeps_previous_checkpoint(tmp_path, sync_run):
    _, sync = sync_run
    # both ranks are SIGKILLed while the background thread writes iteration 4 (iteration 2 was committed)
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_child, args=(r, 2, port, queue, _run, (tmp_path, True), {"kill_at": 4}, 1, 100))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert -signal.SIGKILL in [p.exitcode for p in procs]
    assert (tmp_path / LATEST).read_text() == "2"
    assert (tmp_path / "iter_0000002").is_dir() and not (tmp_path / "iter_0000004").exists()
    assert (tmp_path / "iter_0000004.tmp").is_dir()  # the partial write, never committed

    # the previous checkpoint loads, and a rerun resumes from it and ends where the uninterrupted run did
    from_2 = run_distributed(_resume, 2, str(tmp_path / "iter_0000002"))[-1]
    assert from_2["start"] == 2 and from_2["losses"] == sync["losses"][2:] and _equal(from_2["params"], sync["params"])
    rerun = run_distributed(_run, 2, tmp_path, True)[-1]  # resumes from latest (iteration 2) under --save
    assert rerun["losses"] == sync["losses"][2:] and _equal(rerun["params"], sync["params"])
    assert (tmp_path / LATEST).read_text() == str(STEPS) and not (tmp_path / "iter_0000004.tmp").exists()
