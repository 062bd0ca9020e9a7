"""Model-weight checkpoints through megatron-core dist_checkpointing (any TP/PP can load any other).

A checkpoint directory holds dist_checkpointing's shards plus ``slm_model.json`` (the model config). It is
written to ``<dir>.tmp`` and renamed when complete, so a half-written checkpoint is never mistaken for one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch.distributed as dist

MODEL_META = "slm_model.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model; the message names the fix."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_model_weights(model, directory: str, model_cfg) -> None:
    from megatron.core import dist_checkpointing

    final, tmp = Path(directory), Path(str(directory) + ".tmp")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    _barrier()
    if _rank0():
        (tmp / MODEL_META).write_text(json.dumps({"model": dataclasses.asdict(model_cfg)}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    _barrier()


def read_model_meta(directory: str) -> dict:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' does not exist; check the path (--load / --ref-load)")
    if not (path / MODEL_META).is_file() or not (path / "metadata.json").is_file():
        hint = " (an interrupted save left it; delete it and save again)" if path.name.endswith(".tmp") else ""
        raise CheckpointError(f"'{directory}' is not a complete megatron_slm checkpoint{hint}")
    return json.loads((path / MODEL_META).read_text())


def load_model_weights(model, directory: str, expected_vocab: int | None = None) -> dict:
    """Load weights saved by ``save_model_weights`` (from any TP/PP layout) into ``model``."""
    from megatron.core import dist_checkpointing

    meta = read_model_meta(directory)
    vocab = meta["model"].get("vocab_size")
    if expected_vocab is not None and vocab != expected_vocab:
        raise CheckpointError(
            f"checkpoint '{directory}' has vocab_size={vocab} but the run expects {expected_vocab}: the policy, the "
            "reference and the tokenizer must share one vocabulary"
        )
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), directory)
        model.load_state_dict(state)
    except Exception as exc:  # shape mismatches surface deep inside dist_checkpointing
        raise CheckpointError(
            f"checkpoint '{directory}' does not fit this model ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            f"its model config is {meta['model']}"
        ) from exc
    return meta
