"""Checkpoints through megatron-core dist_checkpointing: any TP/PP layout loads any other.

- ``files``: durable writes (atomic replace, fsync, commit of a complete ``.tmp``, recovery);
- ``agreement``: one outcome on every rank for a step that may fail on some;
- ``sharded``: dist_checkpointing save/load with those guarantees and up-front damage checks (and the async save:
  the shards written by a background thread, committed by ``AsyncSave.finish`` at a step boundary);
- ``layout``: where checkpoints lie (``iter_NNNNNNN``, ``latest``) and their JSON files;
- ``weights``: model weights and ``slm_model.json`` (also transformers directories as a source);
- ``training_state``: training checkpoints as a mapping of named stateful parts;
- ``lock``: one run per ``--save`` directory.
"""

from megatron_slm.checkpoint.files import recover, write_atomic
from megatron_slm.checkpoint.layout import (
    LATEST,
    MODEL_META,
    TRAINER_STATE,
    iteration_dir,
    iteration_dirs,
    iteration_of,
    latest_iteration,
    read_json,
    read_trainer_state,
    recorded_config,
    resolve,
    resume_source,
)
from megatron_slm.checkpoint.lock import SaveLock
from megatron_slm.checkpoint.training_state import load_training_checkpoint, save_training_checkpoint
from megatron_slm.checkpoint.weights import (
    ARCH_FIELDS,
    architecture_differences,
    is_hf_dir,
    load_model_state,
    load_model_weights,
    load_weights,
    model_sharded_state_dict,
    read_model_config,
    read_model_meta,
    save_model_weights,
    tokenizer_fingerprints,
    weights_vocab,
)

__all__ = [
    "recover",
    "write_atomic",
    "LATEST",
    "MODEL_META",
    "TRAINER_STATE",
    "iteration_dir",
    "iteration_dirs",
    "iteration_of",
    "latest_iteration",
    "read_json",
    "read_trainer_state",
    "resolve",
    "resume_source",
    "SaveLock",
    "load_training_checkpoint",
    "recorded_config",
    "save_training_checkpoint",
    "ARCH_FIELDS",
    "architecture_differences",
    "is_hf_dir",
    "load_model_state",
    "load_model_weights",
    "load_weights",
    "model_sharded_state_dict",
    "read_model_config",
    "read_model_meta",
    "save_model_weights",
    "tokenizer_fingerprints",
    "weights_vocab",
]
