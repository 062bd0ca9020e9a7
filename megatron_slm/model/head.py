"""The output layer as the loss sees it: GPTModel's final hidden states plus the output weight shard.

The SLM loss fuses the output layer with the cross-entropy (megatron_slm.loss.vocab_parallel_ce) so that its
backward only pays for selected tokens and no full logits are transposed, cast or kept. megatron-core's
GPTModel has no switch to return the final hidden states on the last stage, so ``deferred_head`` swaps the
output layer's forward for the duration of one call for a pass-through that still does the layer's TP input
mapping (copy to the TP region, or the sequence-parallel all-gather) in autograd.
"""

from __future__ import annotations

import contextlib

import torch


def unwrap(model):
    """The GPTModel inside DDP / Float16Module / a DeepSpeed engine (by type: an engine forwards attribute
    lookups to its module, so it looks like a GPTModel to ``hasattr``)."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel):
        model = model.module
    return model


def output_weight(model):
    """This rank's output-layer weight shard ``[V/TP, H]`` (the word embedding when tied and PP=1)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: megatron's TP all-reduce in backward works on
    ``grad.contiguous()`` in place, so a non-contiguous gradient (GPTModel transposes its output) would lose it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@contextlib.contextmanager
def deferred_head(model):
    """Within the block, calling ``model`` returns hidden states ``[b, s, H]`` on the last stage, not logits."""
    gpt = unwrap(model)
    layer = getattr(gpt, "output_layer", None) if gpt.post_process else None
    if layer is None:
        yield
        return
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    def to_tp_region(input_, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            out = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=layer.tp_group)
        else:
            out = copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)
        return _ContiguousGrad.apply(out), None

    layer.forward = to_tp_region  # instance attribute shadows the class's forward until deleted
    try:
        yield
    finally:
        del layer.forward
