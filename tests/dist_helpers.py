"""Multi-rank tests fork gloo ranks from the pytest process (helpers/forked.py); one real torchrun
smoke test lives in tests/test_cli_torchrun.py."""

from __future__ import annotations

from helpers.forked import run_forked


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` ranks (one torch thread each); each rank's result, rank order."""
    return run_forked(fn, world_size, *args, timeout=timeout, watchdog_s=timeout - 10, **kwargs)
