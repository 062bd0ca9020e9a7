"""The pipeline passes of one SLM step, all through megatron-core's stock schedules.

Design (docs/design.md, "Where the reference runs"): the frozen reference runs a forward-only pipeline pass over the global batch's
micro-batches *before* the training pass; its per-token losses stay on the last pipeline stage, attached to
the micro-batch they belong to, where the training pass's loss function reads them. The reference may differ
in depth and width from the policy (its own TransformerConfig sets the p2p shapes); TP/PP layout is shared.
"""

from __future__ import annotations

import torch

from megatron_slm.loss.vocab_parallel_ce import head_token_loss
from megatron_slm.model.head import deferred_head, output_weight


def data_iterators(micro_batches: list[dict], num_chunks: int):
    """The schedule's data_iterator: one iterator, or with an interleaved pipeline one per model chunk (each chunk
    reads every micro-batch in order)."""
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]


def model_forward(model, mb: dict) -> torch.Tensor:
    """Last stage: final hidden states [b, s, H], the loss applies the output layer. Causal mask built in."""
    with deferred_head(model):
        return model(mb["tokens"], mb["position_ids"], attention_mask=None, labels=None)


@torch.no_grad()
def token_losses(model, mb: dict, vocab_size: int) -> torch.Tensor:
    """Per-token CE [b, s] (fp32) of a forward pass on the last stage; ``mb`` needs tokens, position_ids, labels."""
    return head_token_loss(model_forward(model, mb), output_weight(model), mb["labels"], vocab_size=vocab_size)[0]


@torch.no_grad()
def score_pass(model, micro_batches: list[dict], vocab_size: int) -> list[torch.Tensor] | None:
    """Forward-only pass: per-token CE of ``model`` for each micro-batch ([b, s] fp32, on the last stage).

    Used for the reference model (every step of online SLM) and for the policy's scoring pass of the
    ``global_batch`` scope. ``model``: a GPTModel, or the list of this rank's chunks of an interleaved pipeline
    (then through the interleaved schedule). Returns None on stages other than the last.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        output = model_forward(model_chunk, mb)

        def collect(output_tensor, non_loss_data=True):
            return head_token_loss(output_tensor, output_weight(model_chunk), mb["labels"], vocab_size=vocab_size)[0]

        return output, collect

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    first = micro_batches[0]["tokens"]
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        scores = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data_iterators(micro_batches, len(chunks)),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)
    return list(scores) if parallel_state.is_pipeline_last_stage() else None
