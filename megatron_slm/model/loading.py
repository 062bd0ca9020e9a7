"""A saved model ready for forward passes: this rank's stage built (``model/build.py``) and its weights loaded from
a megatron_slm checkpoint or a transformers directory (``checkpoint.load_weights``), in eval mode.

One path for every reader of saved weights outside training: ``slm evaluate`` and ``slm dynamics`` (at the run's
TP/PP), the heatmap's checkpoint scoring and the converter (TP=1 PP=1 in one process).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_slm.config import ModelConfig, ParallelConfig


def build_eval_model(m: ModelConfig, parallel: ParallelConfig | None = None, seed: int = 0):
    """This rank's stage of ``m`` at ``parallel`` (default TP=1 PP=1), fp32, in eval mode, for weights the caller
    loads next (no random init). Leaves the caller's CPU RNG as it was."""
    from megatron_slm.model.build import build_model

    with torch.random.fork_rng(devices=[]):  # in case megatron-core's build draws from the global RNG
        torch.manual_seed(0)
        model = build_model(m, parallel or ParallelConfig(), seed=seed, params_dtype=torch.float32, initialize=False)
    model.eval()
    return model


def load_model(
    directory: str | Path,
    m: ModelConfig,
    parallel: ParallelConfig | None = None,
    seed: int = 0,
    expected_vocab: int | None = None,
):
    """``build_eval_model`` with the weights of ``directory`` (saved with model config ``m``, any TP/PP, or a
    transformers Llama/Mistral directory). ``expected_vocab`` (default ``m.vocab_size``): the vocabulary the
    weights must have (e.g. the tokenizer's)."""
    from megatron_slm.checkpoint import load_weights

    model = build_eval_model(m, parallel, seed)
    load_weights(model, str(directory), m, expected_vocab=m.vocab_size if expected_vocab is None else expected_vocab)
    return model
