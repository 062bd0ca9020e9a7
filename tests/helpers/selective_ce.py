"""Selective cross-entropy on given logits: the gradient of ``selective_head_cross_entropy`` w.r.t. the
logits, without the output layer. Only the tests (tests/loss/test_vocab_parallel_ce.py) and
benchmarks/bench_selective_ce.py use it; training fuses the output layer into the loss
(megatron_slm.loss.vocab_parallel_ce.selective_head_cross_entropy).
"""

from __future__ import annotations

import torch

from megatron_slm.loss.vocab_parallel_ce import _shard_info, _softmax_grad_blocks, vocab_parallel_token_loss


class SelectedTokenCrossEntropy(torch.autograd.Function):
    """``token_loss * selected`` whose gradient w.r.t. ``logits`` exists only for selected tokens. Saves only
    the selected logit rows ``[n_sel, V/TP]`` and small per-token vectors; backward needs no communication."""

    @staticmethod
    def forward(ctx, logits, labels, token_loss, logsumexp, selected, vocab_size, tp_group):
        part = logits.shape[-1]
        _, start, n_valid = _shard_info(part, vocab_size, tp_group)
        sel_idx = selected.reshape(-1).nonzero().squeeze(-1)
        # index_select copies: the full logits (or a view of them) are never saved.
        logits_sel = logits.reshape(-1, part).index_select(0, sel_idx)
        ctx.save_for_backward(logits_sel, sel_idx, labels.reshape(-1)[sel_idx], logsumexp.reshape(-1)[sel_idx])
        ctx.meta = (logits.shape, start, n_valid)
        return token_loss.float() * selected

    @staticmethod
    def backward(ctx, grad_output):
        logits_sel, sel_idx, lab_sel, lse_sel = ctx.saved_tensors
        shape, start, n_valid = ctx.meta
        g = grad_output.reshape(-1).index_select(0, sel_idx).float()
        grad = torch.zeros(shape.numel() // shape[-1], shape[-1], dtype=logits_sel.dtype, device=logits_sel.device)
        for i, j, p in _softmax_grad_blocks(logits_sel, lab_sel, lse_sel, g, start, n_valid):
            grad[:, :n_valid].index_copy_(0, sel_idx[i:j], p.to(grad.dtype))  # padding columns stay 0
        return grad.view(shape), None, None, None, None, None, None


def selective_cross_entropy(
    logits, labels, selected, vocab_size=None, tp_group=None, token_loss=None, logsumexp=None
) -> torch.Tensor:
    """Per-token vocab-parallel CE on ``logits`` ``[..., V/TP]``, zero (and gradient-free) where ``selected``
    is False. Returns fp32 with ``labels``' shape; the gradient flows to this rank's ``logits`` shard.

    ``token_loss``/``logsumexp`` may be passed if already computed (e.g. for SLM token scoring)."""
    if token_loss is None or logsumexp is None:
        token_loss, logsumexp = vocab_parallel_token_loss(logits, labels, vocab_size, tp_group)
    return SelectedTokenCrossEntropy.apply(logits, labels, token_loss, logsumexp, selected.bool(), vocab_size, tp_group)
