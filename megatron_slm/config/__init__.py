"""One config tree for every run (megatron-core style dataclasses), in modules with one job each:

- ``schema``: the sections and their leaves (help, default, choices), freezing;
- ``loading``: a draft from defaults, a YAML file, overrides and flags;
- ``arguments``: the Megatron-style flags generated from the tree;
- ``rules``: validation and derived quantities;
- ``device``: defaults that depend on the machine.

The files a run reads (checkpoints, data) are taken into account once, by ``megatron_slm/training/resolve.py``,
which returns the frozen config every later step reads.
"""

from megatron_slm.config.arguments import add_override_arguments
from megatron_slm.config.device import bf16_enabled, has_fused_norm, reference_bf16
from megatron_slm.config.loading import fill_model_shapes, load_config
from megatron_slm.config.rules import (
    data_parallel_size,
    lr_decay_steps,
    padded_vocab_size,
    reference_in_memory,
    uses_offline_scores,
    validate,
    virtual_pipeline_size,
)
from megatron_slm.config.schema import (
    LOSS_MODES,
    LR_DECAY_STYLES,
    NONFINITE_POLICIES,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    REFERENCE_DTYPES,
    REFERENCE_MODES,
    SCORE_DTYPES,
    SELECTION_SCOPES,
    SELECTION_STRATEGIES,
    WSD_DECAY_STYLES,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    ReferenceConfig,
    SLMConfig,
    TrainConfig,
    draft_copy,
    freeze,
    is_frozen,
)

__all__ = [
    "add_override_arguments",
    "bf16_enabled",
    "has_fused_norm",
    "reference_bf16",
    "fill_model_shapes",
    "load_config",
    "data_parallel_size",
    "lr_decay_steps",
    "padded_vocab_size",
    "reference_in_memory",
    "uses_offline_scores",
    "validate",
    "virtual_pipeline_size",
    "LOSS_MODES",
    "LR_DECAY_STYLES",
    "NONFINITE_POLICIES",
    "RECOMPUTE_GRANULARITIES",
    "RECOMPUTE_METHODS",
    "REFERENCE_DTYPES",
    "REFERENCE_MODES",
    "SCORE_DTYPES",
    "SELECTION_SCOPES",
    "SELECTION_STRATEGIES",
    "WSD_DECAY_STYLES",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "ReferenceConfig",
    "SLMConfig",
    "TrainConfig",
    "draft_copy",
    "freeze",
    "is_frozen",
]
