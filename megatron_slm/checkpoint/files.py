"""Durable file operations of checkpoints: atomic replace of a file, fsync of trees, the commit of a complete
``<dir>.tmp`` into place, and the clean-up of interrupted saves.

A re-saved iteration is swapped in atomically (Linux ``renameat2(RENAME_EXCHANGE)``); where the filesystem
lacks that, the old copy is renamed aside to ``<dir>.old`` first, readers fall back to it while the final name is
missing, and the next start restores it."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

from megatron_slm.log import get_logger

TMP, OLD = ".tmp", ".old"  # a checkpoint being written; the previous copy of a re-saved one (moved aside)

log = get_logger(__name__)


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _fsync(path: str | Path) -> None:
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory (their renames are durable anyway)
        if not (is_dir and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up, ``root`` itself last."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once and durably: temporary file, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = sibling(path, TMP)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


_RENAMEAT2 = []  # [libc.renameat2 or None], looked up once


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem (NFS, Lustre, ...) cannot, so that the caller falls back to two renames."""
    if not _RENAMEAT2:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            except (OSError, AttributeError):
                fn = None
        _RENAMEAT2.append(fn)
    fn = _RENAMEAT2[0]
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def recover_iteration(final: Path) -> None:
    """Finish what an interrupted re-save of ``final`` left (rank 0, under the save lock): restore ``final``
    from ``final.old`` if it is missing, else drop the old copy."""
    old = sibling(final, OLD)
    if not old.is_dir():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, final)
        _fsync(final.parent)
        log.warning(f"restored {final} from {old.name}: a re-save of it was interrupted")


def recover(root: str | Path) -> None:
    """Clean up after interrupted saves under a training root (rank 0, under the save lock): restore
    iterations moved aside (``iter_N.old``) whose final directory is missing, remove partial ``iter_N.tmp``."""
    root = Path(root)
    if not root.is_dir():
        return
    for old in sorted(root.glob(f"iter_???????{OLD}")):
        recover_iteration(old.with_suffix(""))
    for tmp in sorted(root.glob(f"iter_???????{TMP}")):
        shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final`` so that a complete ``final`` (or, for a moment, its ``.old``
    copy, which ``resolve`` and ``recover`` use) exists at every instant."""
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):  # tmp now holds the previous copy
        _fsync(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    else:
        old = sibling(final, OLD)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except Exception:
            os.rename(old, final)
            raise
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(final.parent)
