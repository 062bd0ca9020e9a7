"""Where checkpoints lie: ``<root>/iter_NNNNNNN/`` per saved iteration, ``<root>/latest_checkpointed_iteration.txt``
naming the newest complete one, and the small JSON files each holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_slm.checkpoint.files import OLD, sibling
from megatron_slm.errors import CheckpointError

MODEL_META = "slm_model.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


_ITERATION = re.compile(r"iter_([0-9]{7,})")


def iteration_of(directory: str | Path) -> int | None:
    """The iteration of an ``iter_NNNNNNN`` checkpoint directory (or of its ``.old`` copy); None for any other."""
    name = Path(directory).name
    match = _ITERATION.fullmatch(name[: -len(OLD)] if name.endswith(OLD) else name)
    return int(match.group(1)) if match else None


def iteration_dirs(root: str | Path) -> list[Path]:
    """The complete iteration checkpoints directly under a training root (not ``.tmp``/``.old``), oldest first."""
    found = [(iteration_of(p), p) for p in Path(root).glob("iter_*") if _ITERATION.fullmatch(p.name) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_iteration(root: str | Path) -> int | None:
    """The newest complete training checkpoint under ``root``, or None if there is none."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not re.fullmatch(r"[0-9]+", text):  # ASCII digits only: str.isdigit() also accepts "²"
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; delete it or restore it")
    return int(text)


def resolve(directory: str | Path) -> Path:
    """A checkpoint directory, or a training root with a ``latest`` file -> its newest iteration.

    While a re-save of that iteration is between moving the old copy aside and renaming the new one in (only
    where the filesystem cannot swap directories atomically), the old copy ``iter_N.old`` is the answer."""
    path = Path(directory)
    it = latest_iteration(path) if path.is_dir() else None
    if it is None:
        return path
    final = iteration_dir(path, it)
    if final.is_dir():
        return final
    if sibling(final, OLD).is_dir():
        return sibling(final, OLD)
    found = [p.name for p in iteration_dirs(path)]
    raise CheckpointError(
        f"{path / LATEST} names iteration {it} but {final} is missing; restore it or point latest at an existing "
        f"iteration (found: {', '.join(found) or 'none'})"
    )


def resume_source(ck_cfg) -> str | None:
    """Where a training checkpoint to resume from lies (--load, else --save), if there is one."""
    source = ck_cfg.load or ck_cfg.save
    if source and (latest_iteration(source) is not None or (Path(source) / TRAINER_STATE).is_file()):
        return source
    return None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it or the checkpoint is damaged") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path} holds {type(value).__name__}, not a JSON object; restore it or the checkpoint is damaged"
        )
    return value


def read_trainer_state(directory: str | Path) -> dict:
    """``trainer_state.json`` of a training checkpoint (root or iteration directory)."""
    path = resolve(directory)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"'{path}' holds model weights only, not a training checkpoint; load it with --ref-load or start a new run"
        )
    return read_json(path / TRAINER_STATE)


def recorded_config(directory: str | Path) -> dict:
    """The resolved config a training checkpoint was saved with (its trainer_state.json)."""
    return read_trainer_state(directory).get("config") or {}
