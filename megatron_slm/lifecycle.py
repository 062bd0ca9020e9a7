"""A training rank's life around its launcher: stop signals are recorded from the first moment, and the rank
exits when its launcher is gone.

- SIGTERM / SIGUSR1 ask for a checkpoint and a clean stop (Slurm preemption, ``--signal=B:USR1@N``). SIGUSR1's
  default action kills the process, so the handler is installed before torch and megatron-core are imported
  (seconds): a signal in that window is kept and honoured after the first step.
- torchrun starts each worker in a session of its own, so killing torchrun (or its process group) would leave
  the workers training with nobody to collect them. A daemon thread watches the parent and ends the rank when
  the parent changes (the launcher died and the rank was re-parented).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: str | None = None


def _record(signum, _frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def catch_stop_signals() -> None:
    """From now on SIGTERM and SIGUSR1 are recorded (``received``), not fatal. Idempotent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def received() -> str | None:
    """The name of the last stop signal this process received and nobody has acted on yet, if any."""
    return _received


def acted_on() -> None:
    """The stop was carried out (checkpoint written): a later run in this process starts without it."""
    global _received
    _received = None


def exit_with_launcher(poll_s: float = 1.0) -> bool:
    """Under torchrun, end this process (exit 1) when its launcher is gone. Returns whether it watches."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                sys.stderr.write(
                    f"error: the launcher (pid {parent}) is gone; rank {os.environ.get('RANK', '?')} exits\n"
                )
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    return True
