"""Saving and loading megatron-core ``dist_checkpointing`` state (any TP/PP layout loads any other), durably.

A save writes ``<dir>.tmp``; the ranks agree that every write succeeded (else all raise one CheckpointError and
the partial ``.tmp`` is removed), the files and directories are fsynced, then it is renamed into place and only
then ``on_commit`` runs (e.g. replacing ``latest``): a half-written checkpoint is never taken as the latest, also
after a power loss (with ``async_save`` the same steps, the shards written by a background thread). A load first checks the files are complete, so damage is one clear error, not a hang, and
that every pickle in them is plain data (a checkpoint from elsewhere runs no code), else one CheckpointError."""

from __future__ import annotations

import io
import os
import pickle
import re
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
    kept = (
        f"{root / LATEST} still names iteration {it}, unchanged"
        if it is not None and (root / LATEST).is_file()
        else "nothing else was changed"
    )
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


def _commit_steps(tmp: Path, final: Path, on_commit) -> None:
    def publish():
        commit(tmp, final)
        if on_commit is not None:
            on_commit()

    # One process per node flushes every file (each node's page cache holds what its ranks wrote).
    _step((lambda: fsync_tree(tmp)) if int(os.environ.get("LOCAL_RANK", rank())) == 0 else None, final)
    _step(publish if rank() == 0 else None, final)


def save_sharded(
    sharded_state: dict, final: Path, write_files, on_commit=None, *, async_save: bool = False, after_commit=None
):
    """dist_checkpointing.save into ``final.tmp``, extra files via ``write_files(tmp)`` (every rank), agree,
    fsync, rename into place, then ``on_commit()`` (rank 0; e.g. replace ``latest``). One CheckpointError on
    every rank if any step fails anywhere; the partial ``.tmp`` is removed and nothing else changes.

    ``async_save``: returns an :class:`AsyncSave` once the shards are copied to host memory; its ``finish()``
    (every rank, at the same point) commits as above and then runs ``after_commit()``."""
    from megatron.core import dist_checkpointing

    tmp = sibling(final, TMP)
    request = None

    def prepare():
        recover_iteration(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write():
        nonlocal request
        if async_save:
            _host_copy(sharded_state)
            request = dist_checkpointing.save(sharded_state, str(tmp), async_sharded_save=True)
        else:
            dist_checkpointing.save(sharded_state, str(tmp))
        write_files(tmp)

    _step(prepare if rank() == 0 else None, final)
    _step(write, final)
    if async_save:
        return AsyncSave(request, final, on_commit, after_commit)
    _commit_steps(tmp, final, on_commit)
    if after_commit is not None:
        after_commit()
    return None


# ----------------------------------------------------------------------------------------------
# Async save (--async-save). The caller blocks for what needs the ranks together or the live tensors: planning
# (megatron-core's collectives), common.pt, the small files, and a copy of every shard to host memory; a
# background thread then writes the shards. The rest (gathering the write results into .metadata, agreement,
# fsync, commit, on_commit) is ``AsyncSave.finish``, which the training loop calls at a synchronization point in
# its own thread, as Megatron-LM's maybe_finalize_async_save: the background thread runs no collective, so
# nothing races the training's collectives on a process group, and no second group is needed. The thread writes
# with megatron-core's own per-bucket writer (fsync included) instead of its forking writer, which would fork
# from a thread while the training runs torch ops (OpenMP pools are not fork-safe); the same on CPU and CUDA.


def _host_copy(sharded_state: dict) -> None:
    """Replace every shard's tensor by a copy in host memory (a D2H copy on a GPU, a clone on the CPU), in
    place: the training may change the live tensors while the background thread writes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def visit(x):
        if isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, (ShardedTensor, ShardedTensorFactory)) and x.data is not None:
            x.data = x.data.detach().to("cpu", copy=True)

    visit(sharded_state)


def _write_buckets(request, buckets) -> None:
    """The background thread: write this rank's buckets as megatron-core's writer processes would, and hand
    the results (or the first exception) to the results queue its finalize step reads."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    transforms = request.async_fn.args[0]  # partial(write_preloaded_data_multiproc, transform_list, use_msc)
    results_queue = request.async_fn_args[2]
    results: dict | Exception = {}
    try:
        for i, bucket in enumerate(buckets):
            local, count = queue.Queue(), queue.Queue()
            count.put(i)
            FileSystemWriterAsync.write_preloaded_data(
                transforms,
                local_proc_idx=i,
                write_bucket=bucket,
                results_queue=local,
                count_queue=count,
                use_fsync=True,
            )
            idx, out = local.get_nowait()
            if isinstance(out, Exception):
                results = out
                break
            results[idx] = out
    except Exception as exc:  # noqa: BLE001 - reported by finish, on every rank
        results = exc
    results_queue.put(results)


class AsyncSave:
    """A save whose shards are being written in the background; ``finish()`` (collective) commits it."""

    def __init__(self, request, final: Path, on_commit, after_commit):
        import threading

        self.final, self._request, self._on_commit, self._after_commit = final, request, on_commit, after_commit
        buckets = request.preload_fn() if request.preload_fn else None  # host copies already: no copy here
        self._thread = None
        if request.async_fn is not None:
            self._thread = threading.Thread(
                target=_write_buckets, args=(request, buckets), daemon=True, name=f"async-save-{final.name}"
            )
            self._thread.start()

    def done(self) -> bool:
        """Whether this rank's background write has ended (local; ``finish`` after every rank's has)."""
        return self._thread is None or not self._thread.is_alive()

    def finish(self) -> Path:
        """Wait for this rank's write, then on every rank: .metadata, agreement, fsync, commit, ``on_commit``."""
        if self._thread is not None:
            self._thread.join()
        final, tmp = self.final, sibling(self.final, TMP)

        def finalize():
            for fn in self._request.finalize_fns:
                fn()

        _step(finalize, final)
        _commit_steps(tmp, final, self._on_commit)
        if self._after_commit is not None:
            self._after_commit()
        return final


# ----------------------------------------------------------------------------------------------
# Refusing pickles that would run code. Checkpoints are copied between people and clusters, and a pickle can
# call any function while it loads. torch DCP reads ``.metadata`` with plain ``pickle.load`` and its non-tensor
# items (megatron-core's ShardedObjects) with ``torch.load(weights_only=False)``, deep inside megatron-core's
# dist_checkpointing.load, where we cannot change how: so every load goes through ``check_complete`` here,
# which reads those files first with loaders that only build plain data, and the libraries' own (unsafe) reads
# then only see files verified here.

# What torch DCP's ``.metadata`` legitimately holds: its metadata dataclasses and enums, torch.Size, dtypes and
# layouts. Nothing here runs code when built from a pickle.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
        "LoadPlan",
        "ReadItem",
        "LoadItemType",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},  # a layout by name, from torch's own table
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that names a function or class outside the allowlist: loading it could run code."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import torch

        if name in _DCP_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafePickle(f"GLOBAL {module}.{name} is not allowed")


def refusal(exc: BaseException) -> str | None:
    """Why a pickle was refused as possibly code (this module's unpickler or torch's ``weights_only``), as the
    rest of a sentence about the file ("... names posix.system, which is not plain data"); None for another
    failure (a damaged file)."""
    text = str(exc)
    if not (isinstance(exc, UnsafePickle) or (isinstance(exc, pickle.UnpicklingError) and "Weights only" in text)):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"names {found.group(1)}, which is not plain data"
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return f"is not plain data ({(detail.group(1) if detail else text.splitlines()[0]).strip()[:200]})"


def refused(file, why: str, fix: str) -> CheckpointError:
    """The one error for a refused file; ``why`` is :func:`refusal`'s sentence about it."""
    return CheckpointError(
        f"refused to load {file}: it {why}, and loading it could run code (a checkpoint may come "
        f"from anyone, so only plain data is loaded); {fix}"
    )


_FIX = "restore the file from a copy you trust or use another checkpoint (iteration)"


def safe_torch_load(file, map_location="meta"):
    """``torch.load(weights_only=True)``: tensors, containers, plain values and the classes allowlisted with
    torch (megatron-core registers its own on import). ``map_location="meta"`` (default) reads only the
    pickle, not the tensor data: a cheap check of a file a library loads afterwards."""
    import torch

    return torch.load(file, map_location=map_location, weights_only=True)


def _read_metadata(path: Path):
    """torch DCP's index, through the allowlist above (UnsafePickle otherwise)."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise ValueError(f"a {type(metadata).__name__}, not torch DCP metadata")
    return metadata


def _check_objects(path: Path, metadata) -> None:
    """Each non-tensor item DCP would ``torch.load(weights_only=False)`` (megatron-core's ShardedObjects, e.g.
    layers' ``_extra_state``), read as DCP reads it and loaded with ``weights_only=True``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    transforms = None
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        with open(path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            stream = io.BytesIO(f.read(info.length))
        if info.transform_descriptors:  # e.g. compressed: undone as DCP undoes it
            transforms = transforms or FileSystemReader(str(path)).transforms
            stream = io.BytesIO(transforms.transform_load_stream(None, info.transform_descriptors, stream).read())
        try:
            safe_torch_load(stream)
        except Exception as exc:  # noqa: BLE001 - refused or damaged: either way not loadable
            why = refusal(exc)
            if why is None:
                raise
            raise refused(path / info.relative_path, f"holds an item ({index.fqn}) that {why}", _FIX) from None


_DAMAGE = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError)
_DAMAGE_TEXT = ("PytorchStreamReader", "unexpected EOF", "EOF", "truncated", "corrupt", "invalid load key", "unpickl")


def check_complete(path: Path) -> None:
    """Up front, before any rank reads a tensor: torch DCP's index (``.metadata``) and megatron-core's
    ``common.pt`` exist, every shard the index names exists and is long enough, and every pickle megatron-core
    or torch will load (the index, ``common.pt``, the shards' non-tensor items) is plain data."""

    def damaged(what):
        return CheckpointError(
            f"checkpoint '{path}' is damaged or incomplete: {what}; restore the files from a copy "
            "or use another checkpoint (iteration)"
        )

    common = path / "common.pt"
    if common.is_file():  # megatron-core loads it for every backend (torch's default weights_only, unless overridden)
        try:
            safe_torch_load(common)
        except Exception as exc:  # noqa: BLE001
            why = refusal(exc)
            if why is not None:
                raise refused(common, why, _FIX) from None
            raise damaged(f"{common.name} cannot be read ({describe_failure(exc)})") from None
    if (
        read_json(path / "metadata.json").get("sharded_backend") != "torch_dist"
    ):  # another dist_checkpointing backend: its own layout, its own errors
        return
    index = path / ".metadata"
    missing = [f.name for f in (index, common) if not f.is_file()]
    if missing:
        raise damaged(f"{' and '.join(missing)} missing")
    try:
        metadata = _read_metadata(path)
        need = {}
        for info in metadata.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    except UnsafePickle as exc:
        raise refused(index, refusal(exc), _FIX) from None
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
    try:
        _check_objects(path, metadata)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged item
        raise damaged(f"a non-tensor item cannot be read ({describe_failure(exc)})") from None


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
