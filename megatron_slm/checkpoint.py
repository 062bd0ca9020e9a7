"""Checkpoints through megatron-core dist_checkpointing: any TP/PP layout loads any other.

Two kinds, one format:
- model weights (``save_model_weights``): dist_checkpointing shards + ``slm_model.json`` (the ModelConfig);
- training checkpoints (``save_training_checkpoint``): ``<root>/iter_0000100/`` with model *and* optimizer
  shards, ``trainer_state.json`` (iteration = data position, LR schedule, config) and ``rank_state/``
  (RNG streams and selection state per rank), plus ``slm_model.json`` so it is also a weights checkpoint.
  ``<root>/latest_checkpointed_iteration.txt`` names the newest complete one; older ones beyond
  ``keep_last`` are deleted.

Every checkpoint is written to ``<dir>.tmp`` and renamed when complete, and ``latest`` is replaced
atomically after that: a half-written checkpoint is never taken as the latest. With ``--deepspeed`` the
engine writes its own format into ``iter_NNNNNNN/`` (resume only; same layout) and ``latest`` is again
replaced only once it is complete. A directory that holds a
``latest`` file can be passed wherever a checkpoint is expected (``--load``, ``--ref-load``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_slm.errors import CheckpointError

MODEL_META = "slm_model.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest_checkpointed_iteration.txt"




def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The newest complete training checkpoint under ``root``, or None if there is none."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; delete it or restore it")
    return int(text)


def resolve(directory: str | Path) -> Path:
    """A checkpoint directory, or a training root with a ``latest`` file -> its newest iteration."""
    path = Path(directory)
    it = latest_iteration(path) if path.is_dir() else None
    return iteration_dir(path, it) if it is not None else path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(sharded_state: dict, final: Path, write_files) -> None:
    """dist_checkpointing.save into ``final.tmp``, extra files via ``write_files(tmp)``, then rename."""
    from megatron.core import dist_checkpointing

    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state, str(tmp))
    write_files(tmp)
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    _barrier()


def _model_meta_text(model_cfg) -> str:
    return json.dumps({"model": dataclasses.asdict(model_cfg)}, indent=2)


def save_model_weights(model, directory: str, model_cfg) -> None:
    def write(tmp):
        if _rank() == 0:
            (tmp / MODEL_META).write_text(_model_meta_text(model_cfg))

    _save(model.sharded_state_dict(), Path(directory), write)


def read_model_meta(directory: str) -> dict:
    path = resolve(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' does not exist; check the path (--load / --ref-load)")
    if not (path / MODEL_META).is_file() or not (path / "metadata.json").is_file():
        hint = " (an interrupted save left it; delete it and save again)" if path.name.endswith(".tmp") else ""
        raise CheckpointError(f"'{path}' is not a complete megatron_slm checkpoint{hint}")
    return json.loads((path / MODEL_META).read_text())


def _load(sharded_state: dict, path: Path, what: str, meta: dict) -> dict:
    from megatron.core import dist_checkpointing

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException (truncated shards)

    try:
        return dist_checkpointing.load(sharded_state, str(path))
    except (Exception, CheckpointException) as exc:  # mismatches and damage surface deep inside
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            f"its model config is {meta['model']}"
        ) from exc


def load_model_weights(model, directory: str, expected_vocab: int | None = None) -> dict:
    """Load weights saved by ``save_model_weights`` or a training checkpoint (any TP/PP) into ``model``."""
    meta = read_model_meta(directory)
    vocab = meta["model"].get("vocab_size")
    if expected_vocab is not None and vocab != expected_vocab:
        raise CheckpointError(
            f"checkpoint '{directory}' has vocab_size={vocab} but the run expects {expected_vocab}: the policy, the "
            "reference and the tokenizer must share one vocabulary"
        )
    sharded = model.sharded_state_dict()
    loaded = _load(sharded, resolve(directory), "model", meta)
    model.load_state_dict({k: v for k, v in loaded.items() if k in sharded})  # a training checkpoint has more
    return meta


def is_hf_dir(directory: str | Path) -> bool:
    """A transformers model directory (config.json, no megatron_slm metadata)."""
    p = Path(directory)
    return (p / "config.json").is_file() and not (p / MODEL_META).is_file() and not (p / LATEST).is_file()


def read_model_config(directory: str):
    """The ModelConfig a weights source was saved with: a megatron_slm checkpoint (its slm_model.json, or a
    training run's latest iteration) or a transformers Llama/Mistral directory (its config.json)."""
    from megatron_slm.config import ModelConfig
    from megatron_slm.model.presets import apply_preset

    if is_hf_dir(directory):
        from megatron_slm.model import hf

        return hf.hf_config_to_model_config(hf.read_hf_config(directory))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    m = ModelConfig(**{k: v for k, v in read_model_meta(directory).get("model", {}).items() if k in fields})
    apply_preset(m)
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    missing = [n for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
               if getattr(m, n) is None]
    if missing:
        raise CheckpointError(f"checkpoint '{directory}': its {MODEL_META} lacks {', '.join(missing)}")
    return m


def weights_vocab(directory: str) -> int | None:
    """The vocabulary size of a weights source: megatron_slm checkpoint or transformers directory."""
    return read_model_config(directory).vocab_size


def load_weights(model, directory: str, model_cfg, expected_vocab: int | None = None) -> None:
    """Weights from a megatron_slm checkpoint (any TP/PP) or straight from a transformers Llama/Mistral dir."""
    if not is_hf_dir(directory):
        load_model_weights(model, directory, expected_vocab)
        return
    from megatron_slm.model import hf

    hf_cfg = hf.hf_config_to_model_config(hf.read_hf_config(directory))
    shape = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size")
    diff = {k: (getattr(hf_cfg, k), getattr(model_cfg, k)) for k in shape if getattr(hf_cfg, k) != getattr(model_cfg, k)}
    if diff:
        raise CheckpointError(
            f"transformers model '{directory}' does not fit the configured model: "
            + ", ".join(f"{k} {a} (checkpoint) vs {b} (config)" for k, (a, b) in diff.items())
        )
    with torch.no_grad():
        hf.load_hf_weights_into(model, hf.HFWeights(directory), hf_cfg)


# ----------------------------------------------------------------------------------------------
# Training checkpoints


def _training_sharded_state(trainer, is_loading: bool) -> dict:
    # The GPTModel itself, not its DDP wrapper, so keys match weights-only checkpoints (no "module." prefix).
    model_sd = trainer.policy_module.sharded_state_dict()
    return {"model": model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def _layout(trainer) -> dict:
    ps = trainer.ps
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "world": dist.get_world_size()}


def _rank_state(trainer) -> dict:
    from megatron.core import tensor_parallel

    state = {
        "cpu_rng": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "selector": trainer.selector.state_dict() if trainer.selector else None,
        "layout": _layout(trainer),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def save_training_checkpoint(trainer, root: str, keep_last: int = 2) -> Path:
    """Model, optimizer, LR schedule, RNG, data position and selection state; atomic; keeps the last N."""
    final = iteration_dir(root, trainer.iteration)

    def write(tmp):
        rank_dir = tmp / "rank_state"
        rank_dir.mkdir(exist_ok=True)
        torch.save(_rank_state(trainer), rank_dir / f"rank{_rank():05d}.pt")
        if _rank() == 0:
            (tmp / MODEL_META).write_text(_model_meta_text(trainer.cfg.model))
            (tmp / TRAINER_STATE).write_text(json.dumps({
                "iteration": trainer.iteration,
                "consumed_samples": trainer.iteration * trainer.cfg.train.global_batch_size,
                "scheduler": trainer.scheduler.state_dict(),
                "config": trainer.cfg.to_dict(),
            }, indent=2))

    if getattr(trainer, "ds", None) is not None:  # DeepSpeed writes its own (ZeRO-partitioned) format
        trainer.ds.save(str(root), final.name, client_state={"iteration": trainer.iteration})
        write(final)
        _barrier()
    else:
        _save(_training_sharded_state(trainer, is_loading=False), final, write)
    if _rank() == 0:
        _write_atomic(Path(root) / LATEST, str(trainer.iteration))
        done = sorted(p for p in Path(root).glob("iter_???????") if p.is_dir())
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_training_checkpoint(trainer, directory: str) -> int:
    """Restore a training checkpoint (root or iteration dir) into ``trainer``; returns its iteration.

    Weights and optimizer state reshard to the current TP/PP; per-rank RNG and selection state are
    restored when the layout is unchanged (else the threshold of rank 0 is used and RNGs keep their seeds).
    """
    from megatron.core import tensor_parallel

    path = resolve(directory)
    if getattr(trainer, "ds", None) is not None:
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"'{path}' is not a complete DeepSpeed training checkpoint of megatron_slm")
        trainer.ds.load(str(path.parent), path.name)
    else:
        meta = read_model_meta(str(path))
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"'{path}' holds model weights only, not a training checkpoint; load it with --ref-load or start a new run")
        loaded = _load(_training_sharded_state(trainer, is_loading=True), path, "model and optimizer", meta)
        trainer.policy_module.load_state_dict(loaded["model"])
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    state = json.loads((path / TRAINER_STATE).read_text())
    trainer.iteration = state["iteration"]
    trainer.scheduler.load_state_dict(state["scheduler"])
    own = path / "rank_state" / f"rank{_rank():05d}.pt"
    rank_state = torch.load(own if own.is_file() else path / "rank_state" / "rank00000.pt", weights_only=False)
    if rank_state["layout"] == _layout(trainer):
        torch.set_rng_state(rank_state["cpu_rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rank_state["tracker"])
        if torch.cuda.is_available() and "cuda_rng" in rank_state:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
    if trainer.selector is not None and rank_state["selector"]:
        trainer.selector.load_state_dict(rank_state["selector"])
    return trainer.iteration
