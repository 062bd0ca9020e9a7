"""Saving and loading megatron-core ``dist_checkpointing`` state (any TP/PP layout loads any other), durably.

A save writes ``<dir>.tmp``; the ranks agree that every write succeeded (else all raise one CheckpointError and
the partial ``.tmp`` is removed), the files and directories are fsynced, then it is renamed into place and only
then ``on_commit`` runs (e.g. replacing ``latest``): a half-written checkpoint is never taken as the latest, also
after a power loss. A load first checks the files are complete, so damage is one clear error, not a hang."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

from megatron_slm.checkpoint.agreement import agreed_failures, barrier, describe_failure, local_failures, rank
from megatron_slm.checkpoint.files import TMP, commit, fsync_tree, recover_iteration, sibling
from megatron_slm.checkpoint.layout import LATEST, latest_iteration, read_json
from megatron_slm.errors import CheckpointError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _save_failed(final: Path, failures: list[str]) -> CheckpointError:
    root = final.parent
    try:
        free = f"{_human(shutil.disk_usage(root).free)} free in {root}"
    except OSError:
        free = f"free space in {root} unknown"
    try:
        it = latest_iteration(root)
    except CheckpointError:
        it = None
    kept = (f"{root / LATEST} still names iteration {it}, unchanged" if it is not None and (root / LATEST).is_file()
            else "nothing else was changed")
    return CheckpointError(
        f"could not write checkpoint {final} ({'; '.join(failures[:4])}{' ...' if len(failures) > 4 else ''}); {free}; "
        f"the partial {final.name}{TMP} was removed and {kept}; free disk space or choose another --save"
    )


def _step(fn, final: Path) -> None:
    """Run one step of a save on this rank (``fn`` may be None: nothing to do here), then agree with every rank;
    if any failed: remove the partial ``.tmp`` (rank 0) and raise the same CheckpointError on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    failed, local = False, []
    try:
        if fn is not None:
            fn()
    except (Exception, CheckpointException) as exc:
        failed, local = True, local_failures(exc)
    failures = agreed_failures(failed, local)
    if failures:
        if rank() == 0:
            shutil.rmtree(sibling(final, TMP), ignore_errors=True)
        barrier()
        raise _save_failed(final, failures)


def save_sharded(sharded_state: dict, final: Path, write_files, on_commit=None) -> None:
    """dist_checkpointing.save into ``final.tmp``, extra files via ``write_files(tmp)`` (every rank), agree,
    fsync, rename into place, then ``on_commit()`` (rank 0; e.g. replace ``latest``). One CheckpointError on
    every rank if any step fails anywhere; the partial ``.tmp`` is removed and nothing else changes."""
    from megatron.core import dist_checkpointing

    tmp = sibling(final, TMP)
    rank0 = rank() == 0

    def prepare():
        recover_iteration(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write():
        dist_checkpointing.save(sharded_state, str(tmp))
        write_files(tmp)

    def publish():
        commit(tmp, final)
        if on_commit is not None:
            on_commit()

    _step(prepare if rank0 else None, final)
    _step(write, final)
    # One process per node flushes every file (each node's page cache holds what its ranks wrote).
    _step((lambda: fsync_tree(tmp)) if int(os.environ.get("LOCAL_RANK", rank())) == 0 else None, final)
    _step(publish if rank0 else None, final)


_DAMAGE = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError)
_DAMAGE_TEXT = ("PytorchStreamReader", "unexpected EOF", "EOF", "truncated", "corrupt", "invalid load key", "unpickl")


def check_complete(path: Path) -> None:
    """Up front, before any rank reads a tensor: torch DCP's index (``.metadata``) and megatron-core's
    ``common.pt`` exist, and every shard the index names exists and is long enough."""
    def damaged(what):
        return CheckpointError(f"checkpoint '{path}' is damaged or incomplete: {what}; restore the files from a copy "
                               "or use another checkpoint (iteration)")

    if read_json(path / "metadata.json").get("sharded_backend") != "torch_dist":  # another dist_checkpointing backend: its own layout, its own errors
        return
    index = path / ".metadata"
    missing = [f.name for f in (index, path / "common.pt") if not f.is_file()]
    if missing:
        raise damaged(f"{' and '.join(missing)} missing")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(path)).read_metadata().storage_data
        need = {}
        for info in storage.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged index fails in many ways
        raise damaged(f"{index.name} cannot be read ({describe_failure(exc)})") from None
    bad = []
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            bad.append(f"shard {rel} is missing")
        elif f.stat().st_size < size:
            bad.append(f"shard {rel} is truncated ({f.stat().st_size} of at least {size} bytes)")
    if bad:
        raise damaged(", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


def _is_damage(exc: BaseException) -> bool:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return any(_is_damage(f[0] if isinstance(f, tuple) else f) for f in failures.values())
    while exc is not None:
        if isinstance(exc, _DAMAGE) or any(t.lower() in str(exc).lower() for t in _DAMAGE_TEXT):
            return True
        exc = exc.__cause__
    return False


def load_sharded(sharded_state: dict, path: Path, what: str, meta: dict) -> dict:
    from megatron.core import dist_checkpointing

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException (truncated shards)

    check_complete(path)
    try:
        return dist_checkpointing.load(sharded_state, str(path))
    except (Exception, CheckpointException) as exc:  # mismatches and damage surface deep inside
        if _is_damage(exc):
            raise CheckpointError(
                f"checkpoint '{path}' is damaged or incomplete ({describe_failure(exc)}); restore the files from a copy or "
                "use another checkpoint (iteration)"
            ) from exc
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this {what} ({describe_failure(exc)}); "
            f"its model config is {meta['model']}"
        ) from exc


