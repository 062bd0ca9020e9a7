"""One training run per ``--save`` directory: ``<save>/.lock``.

Global rank 0 creates the lock (``O_CREAT | O_EXCL``) before the run writes anything there, holding the host,
pid and start time; it is removed when training ends (also on SIGTERM/SIGUSR1 stops) and at interpreter exit.
Rank 0 decides and broadcasts the decision, so a refused run raises the same ``CheckpointError`` on every rank
and the CLI prints one line. Creating the lock is also the writability probe of ``--save``.

A lock left by a crashed run: on the same host with its pid gone (or our own pid: an earlier run in this
process) it is taken over with a warning. The lock records the Slurm job id (``SLURM_JOB_ID``) when there is one: a
requeued job keeps its id but may land on any node, and Slurm runs one instance of a job at a time, so a lock of
the same job id from another host is taken over too. Any other lock from another host is refused with the way to
remove it.

``SaveLock.acquire(..., lock=, flag=, recover=False)`` applies the same to another output, e.g. one lock per
score sidecar of ``slm score-reference`` (``<sidecar>.lock``, beside and not inside any ``--save``).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from megatron_slm.errors import CheckpointError
from megatron_slm.log import get_logger

LOCK = ".lock"

log = get_logger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        if isinstance(holder, dict):
            return holder
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return {}


def _in_use(root: Path, holder: dict, path: Path, flag: str) -> CheckpointError:
    job = f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""
    return CheckpointError(
        f"{root} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{job} since "
        f"{holder.get('since', '?')} (another run writes there); use another {flag}, or delete {path} "
        "if that run is gone"
    )


def _take(root: Path, path: Path | None = None, flag: str = "--save") -> str:
    """Create the lock file ``path`` (default ``root/.lock``) of ``root`` (rank 0); returns its token. Raises
    CheckpointError when refused; ``flag`` is the option that names ``root`` (in the messages)."""
    path = root / LOCK if path is None else path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write to {flag} {root} ({_reason(exc)}); choose a writable directory") from None
    host, pid, job = socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID") or None
    token = uuid.uuid4().hex
    text = json.dumps(
        {"host": host, "pid": pid, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": token, "slurm_job_id": job}
    )
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            same_host = holder.get("host") == host and isinstance(holder.get("pid"), int)
            stale_here = same_host and (holder["pid"] == pid or not _pid_alive(holder["pid"]))
            requeued = job is not None and holder.get("slurm_job_id") == job and holder.get("host") != host
            if attempt == 0 and (stale_here or requeued):
                if requeued:
                    log.warning(
                        f"{path}: taking over the lock of Slurm job {job} from host {holder.get('host', '?')} "
                        f"(pid {holder.get('pid', '?')}, since {holder.get('since', '?')}): the job was "
                        "requeued and runs here now"
                    )
                elif holder["pid"] != pid:
                    log.warning(
                        f"{path}: taking over the lock of pid {holder['pid']} on {host} (since "
                        f"{holder.get('since', '?')}), which is no longer running"
                    )
                path.unlink(missing_ok=True)
                continue
            raise _in_use(root, holder, path, flag) from None
        except OSError as exc:
            raise CheckpointError(
                f"cannot write to {flag} {root} ({_reason(exc)}); choose a writable directory"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise CheckpointError(
                f"cannot write to {flag} {root} ({_reason(exc)}); choose a writable directory"
            ) from None
        return token
    raise _in_use(root, _read_holder(path), path, flag)


class SaveLock:
    """``SaveLock.acquire(save)`` on every rank (collective); ``release()`` on every rank (no-op but on rank 0)."""

    def __init__(self, path: Path | None = None, token: str | None = None):
        self.path, self.token = path, token

    @classmethod
    def acquire(cls, save: str | None, lock: str | None = None, flag: str = "--save", recover: bool = True) -> SaveLock:
        """Lock ``save`` with the file ``lock`` (default ``<save>/.lock``); ``flag`` names ``save`` in the
        messages; ``recover``: finish interrupted checkpoint saves in ``save`` (a ``--save`` directory)."""
        if not save:
            return cls()
        root = Path(save)
        path = root / LOCK if lock is None else Path(lock)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        decision = None
        if rank0:
            try:
                token = _take(root, path, flag)
                decision = ("ok", token)
            except CheckpointError as exc:
                decision = ("error", str(exc))
            if decision[0] == "ok" and recover:
                try:  # under the lock: finish what interrupted saves left behind
                    from megatron_slm.checkpoint.files import recover as finish_saves

                    finish_saves(root)
                except Exception as exc:  # noqa: BLE001
                    path.unlink(missing_ok=True)
                    decision = (
                        "error",
                        f"cannot clean up interrupted checkpoints in --save {root} "
                        f"({type(exc).__name__}: {exc}); choose a writable directory",
                    )
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        if decision[0] == "error":
            raise CheckpointError(decision[1])
        held = cls(path, decision[1]) if rank0 else cls()
        if rank0:
            atexit.register(held.release)
        return held

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        path, self.path = self.path, None
        if path is not None and _read_holder(path).get("token") == self.token:
            try:
                path.unlink()
            except OSError:
                pass
