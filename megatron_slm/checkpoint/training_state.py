"""Training checkpoints: a mapping of named stateful parts, saved together and atomically.

``<root>/iter_0000100/`` holds what the parts give, by where their state lives:

- ``ShardedPart`` (model chunks, optimizer): dist_checkpointing shards, any TP/PP layout loads any other;
- ``FilesPart`` (DeepSpeed's engine): files the part writes into the checkpoint directory itself;
- ``JSONPart`` (LR schedule, data position): ``trainer_state.json``, written by rank 0 and read by every rank;
- ``RankPart`` (RNG streams, token selection): ``rank_state/rankNNNNN.pt`` per rank, tensors and plain values
  only, loaded with ``weights_only=True`` (a file from elsewhere cannot run code).

plus ``slm_model.json`` (so every training checkpoint is a weights checkpoint too) and the run's resolved config
in ``trainer_state.json``. Loading goes in that order: sharded, files, JSON, per rank; a part loads after those it
depends on by being listed after them (the LR schedule after the optimizer it sets). The checkpoint code calls the
parts' methods only: it knows nothing of the trainer. ``<root>/latest_checkpointed_iteration.txt`` names the newest
complete iteration; older ones beyond ``keep_last`` are deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megatron_slm.checkpoint.agreement import agreed_failures, barrier, describe_failure, rank
from megatron_slm.checkpoint.files import write_atomic
from megatron_slm.checkpoint.layout import (
    LATEST,
    MODEL_META,
    TRAINER_STATE,
    iteration_dir,
    iteration_dirs,
    read_trainer_state,
    resolve,
)
from megatron_slm.checkpoint.sharded import load_sharded, refusal, refused, save_sharded
from megatron_slm.checkpoint.weights import model_meta_text, read_model_meta
from megatron_slm.errors import CheckpointError

RANK_STATE = "rank_state"


@runtime_checkable
class ShardedPart(Protocol):
    def sharded_state_dict(self, is_loading: bool) -> dict: ...

    def load_sharded_state_dict(self, loaded: dict) -> None: ...


@runtime_checkable
class FilesPart(Protocol):
    def save_files(self, directory: Path) -> None: ...

    def load_files(self, directory: Path) -> None: ...


class JSONPart(Protocol):
    """``state_dict()`` of JSON values, the same on every rank."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RankPart(JSONPart, Protocol):
    """A part whose state differs per rank (tensors allowed): marked by ``per_rank = True``."""

    per_rank: bool


def _kind(part) -> str:
    if isinstance(part, ShardedPart):
        return "sharded"
    if isinstance(part, FilesPart):
        return "files"
    return "rank" if getattr(part, "per_rank", False) else "json"


def _split(parts: dict) -> dict:
    kinds = {"sharded": {}, "files": {}, "json": {}, "rank": {}}
    for name, part in parts.items():
        kinds[_kind(part)][name] = part
    return kinds


def save_training_checkpoint(
    parts: dict,
    root: str,
    iteration: int,
    *,
    model_config,
    config: dict,
    tokenizer_fingerprints=(),
    keep_last: int = 2,
    async_save: bool = False,
):
    """Save every part as iteration ``iteration`` of the run at ``root`` (collective): atomic, then ``latest`` is
    replaced, then iterations beyond ``keep_last`` are deleted. ``model_config`` goes into slm_model.json, the
    resolved ``config`` (a dict) into trainer_state.json. Returns the iteration directory.

    ``async_save``: returns a ``sharded.AsyncSave`` as soon as the state is copied to host memory (the parts'
    JSON and per-rank state are taken then too); every rank calls its ``finish()`` at the same point, which
    commits, replaces ``latest``, prunes and returns the directory. A part that writes its own files (DeepSpeed)
    is saved synchronously: ``finish()`` then only returns the directory."""
    final = iteration_dir(root, iteration)
    kinds = _split(parts)

    def write(tmp: Path):
        for part in kinds["files"].values():
            part.save_files(tmp)
        rank_dir = tmp / RANK_STATE
        rank_dir.mkdir(exist_ok=True)
        torch.save({name: part.state_dict() for name, part in kinds["rank"].items()}, rank_dir / f"rank{rank():05d}.pt")
        if rank() == 0:
            (tmp / MODEL_META).write_text(model_meta_text(model_config, tokenizer_fingerprints))
            state = {
                "iteration": iteration,
                "parts": {n: p.state_dict() for n, p in kinds["json"].items()},
                "config": config,
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))

    sharded = {}
    for name, part in kinds["sharded"].items():
        sharded[name] = part.sharded_state_dict(is_loading=False)

    def prune():
        if rank() == 0:
            done = [p for p in iteration_dirs(root) if p != final]
            for old in done[: -(keep_last - 1)] if keep_last > 1 else (done if keep_last == 1 else []):
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    pending = save_sharded(
        sharded,
        final,
        write,
        on_commit=lambda: write_atomic(Path(root) / LATEST, str(iteration)),
        async_save=async_save and not kinds["files"],
        after_commit=prune,
    )
    if async_save:
        return pending if pending is not None else _Done(final)
    return final


class _Done:
    """A save that was synchronous after all, behind the AsyncSave interface."""

    def __init__(self, final: Path):
        self.final = final

    def done(self) -> bool:
        return True

    def finish(self) -> Path:
        return self.final


def load_training_checkpoint(parts: dict, directory: str | Path) -> int:
    """Restore every part from a training checkpoint (root or iteration directory); returns its iteration. A part
    the checkpoint lacks is one error."""
    path = resolve(directory)
    state = read_trainer_state(path)
    kinds = _split(parts)
    restored = {n: p for n, p in kinds["sharded"].items() if getattr(p, "restore", True)}  # else saved for export
    if restored:
        meta = read_model_meta(str(path))
        wanted = {name: part.sharded_state_dict(is_loading=True) for name, part in restored.items()}
        loaded = load_sharded(wanted, path, " and ".join(wanted), meta)
        for name, part in restored.items():
            part.load_sharded_state_dict(loaded[name])
    for part in kinds["files"].values():
        part.load_files(path)
    saved = state.get("parts") or {}
    rank_state = _load_rank_state(path) if kinds["rank"] else {}
    missing = [n for n in kinds["json"] if n not in saved] + [n for n in kinds["rank"] if n not in rank_state]
    if missing:
        raise CheckpointError(
            f"'{path}' has no {', '.join(missing)} state (written by another version of "
            "megatron_slm); start a new run from its weights with --pretrained-checkpoint"
        )
    for name, part in kinds["json"].items():
        part.load_state_dict(saved[name])
    for name, part in kinds["rank"].items():
        part.load_state_dict(rank_state[name])
    return int(state["iteration"])


def _load_rank_state(path: Path) -> dict:
    """This rank's per-rank state (rank 0's if it has none). Tensors and plain values only: ``weights_only`` refuses
    anything that would run code. A damaged file on any rank stops every rank with the same error."""
    own = path / RANK_STATE / f"rank{rank():05d}.pt"
    file = own if own.is_file() else path / RANK_STATE / "rank00000.pt"
    state, local = None, []
    try:
        state = torch.load(file, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError("not a megatron_slm rank state")
    except Exception as exc:  # noqa: BLE001 - truncated zip, a refused pickle, missing file ...
        why = refusal(exc)
        local = [
            str(
                refused(
                    file,
                    why,
                    f"restore the file from a copy you trust, or point {path.parent / LATEST} at an earlier iteration",
                )
            )
            if why
            else f"{file} is damaged, missing or not plain data ({describe_failure(exc)})"
        ]
    failures = agreed_failures(bool(local), local)
    refusals = [f for f in failures if f.startswith("refused to load")]
    if refusals:  # one rank's refusal says it all (the same error on every rank)
        raise CheckpointError(refusals[0])
    if failures:
        raise CheckpointError(
            f"checkpoint '{path}' is damaged: {'; '.join(failures)}; "
            f"restore the file from a copy, or point {path.parent / LATEST} at an earlier iteration"
        )
    return state
