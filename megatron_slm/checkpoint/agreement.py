"""Cross-rank agreement: a step that may fail on some ranks ends the same way on every rank, with every rank's
reason in one line (``rank R: what``)."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def describe_failure(exc: BaseException) -> str:
    """One line for an exception, unwrapping torch DCP's CheckpointException (per-rank failures)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        return "; ".join(dict.fromkeys(describe_failure(e) for e in inner))
    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror}: {cause.filename}" if cause.filename else cause.strerror
    text = str(exc).strip().splitlines()
    oserror = re.search(r"\[Errno \d+\] (.+)", text[0]) if text else None  # one that crossed a process boundary
    if oserror:
        return oserror.group(1).replace("'", "")[:200]
    return f"{type(exc).__name__}: {text[0].split('. ')[0][:200]}" if text else type(exc).__name__


def local_failures(exc: BaseException) -> list[str]:
    """ "rank R: what" lines for an exception raised on this rank. torch DCP's CheckpointException carries the
    failures of every rank (on the coordinator; elsewhere it is empty: another rank reports them)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        return [
            f"rank {r}: {describe_failure(f[0] if isinstance(f, tuple) else f)}" for r, f in sorted(failures.items())
        ]
    return [f"rank {rank()}: {describe_failure(exc)}"]


def agreed_failures(failed: bool, failures: list[str]) -> list[str]:
    """Every rank calls this after a step that may have failed on some ranks (``failed``; ``failures``: this
    rank's "rank R: ..." lines). Returns every rank's lines, the same list on every rank; empty when all
    succeeded."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_slm.parallel.distributed import device

        flag = torch.tensor([1.0 if failed else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return []
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, failures)
        failures = [line for lines in gathered for line in lines]
    elif not failed:
        return []
    return list(dict.fromkeys(failures)) or ["a rank failed without a reason"]
