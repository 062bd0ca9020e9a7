"""Defaults that depend on the machine a run starts on (a GPU or not): resolved once, into the frozen config."""

from __future__ import annotations

from megatron_slm.config.schema import Config, TrainConfig


def bf16_enabled(train: TrainConfig) -> bool:
    """--bf16 / --no-bf16 when given; unset: bf16 exactly when a GPU is present."""
    if train.bf16 is not None:
        return train.bf16
    import torch

    return torch.cuda.is_available()


def reference_bf16(cfg: Config) -> bool:
    """The reference's weights in bf16 (--ref-dtype; auto: on a GPU)."""
    if cfg.reference.dtype == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.reference.dtype == "bf16"


def has_fused_norm() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "apex"))
