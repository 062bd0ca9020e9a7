"""Vocab-parallel cross-entropy for Selective Language Modeling (Rho-1).

Each tensor-parallel (TP) rank holds a vocab shard of the logits, ``[..., V/TP]``; rank ``r`` owns global
columns ``[r*V/TP, (r+1)*V/TP)``. Full-vocab logits are never gathered. The loss is split in two steps:

* :func:`vocab_parallel_token_loss` -- a no-grad per-token CE (and logsumexp) for *every* token, which SLM
  needs anyway to score tokens against the reference model;
* :class:`SelectedTokenCrossEntropy` -- attaches a gradient only to the selected tokens, saving just their
  logit rows, so activation memory kept for backward scales with the selected fraction.

Columns with global index ``>= vocab_size`` (vocab padding) are excluded from the softmax. Padding is a
suffix of the global vocab, so on each shard it is a (possibly empty or full) suffix of the local columns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _resolve_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None  # single process: no communication


def _shard_info(logits: torch.Tensor, vocab_size: int | None, tp_group):
    """Returns (group or None when TP=1, first global column of this shard, number of unpadded local columns)."""
    group = _resolve_group(tp_group)
    if group is not None and (not dist.is_initialized() or dist.get_world_size(group) == 1):
        group = None
    part = logits.shape[-1]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    start = rank * part
    if vocab_size is None:
        return group, start, part
    if not 0 < vocab_size <= part * world:
        raise ValueError(f"vocab_size {vocab_size} outside (0, {part * world}] for {world} shards of {part}")
    return group, start, min(max(vocab_size - start, 0), part)


@torch.no_grad()
def vocab_parallel_token_loss(logits, labels, vocab_size=None, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy over TP vocab shards, without autograd.

    Args:
        logits: ``[..., V/TP]`` local vocab shard (any float dtype; leading dims match ``labels``).
        labels: int64 global token ids, shape ``logits.shape[:-1]``. Ids outside ``[0, vocab_size)`` have
            no target logit anywhere (their "loss" is just the logsumexp); mask them out via the selection.
        vocab_size: true vocab size; global columns ``>= vocab_size`` are padding, excluded from the softmax.
            ``None``: no padding.
        tp_group: TP process group; ``None`` uses megatron's TP group when model parallel is initialised,
            else computes locally (TP=1).

    Returns:
        ``(token_loss, logsumexp)``, both fp32 with ``labels``' shape and identical on every TP rank.
        Communication: all-reduce MAX of the local max, then one SUM all-reduce of (target logit, sum-exp).
    """
    group, start, n_valid = _shard_info(logits, vocab_size, tp_group)
    x = logits.reshape(-1, logits.shape[-1])[:, :n_valid]
    lab = labels.reshape(-1)
    if n_valid > 0:
        local_max = x.amax(dim=-1).float()
    else:  # a shard holding only padding
        local_max = torch.full((x.shape[0],), float("-inf"), device=x.device)
    if group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    gmax = local_max

    # Target logit: only the owning rank contributes; others add 0.
    owned = (lab >= start) & (lab < start + n_valid)
    idx = torch.where(owned, lab - start, 0).unsqueeze(-1)
    target = x.gather(-1, idx).squeeze(-1).float() if n_valid > 0 else torch.zeros_like(gmax)
    target = torch.where(owned, target, 0.0)
    # One fp32 [N, V/TP] temporary (type promotion does the cast), exponentiated in place.
    sum_exp = (x - gmax.unsqueeze(-1)).exp_().sum(dim=-1)

    if group is not None:
        both = torch.stack([target, sum_exp])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        target, sum_exp = both[0], both[1]
    lse = gmax + sum_exp.log()
    return (lse - target).view(labels.shape), lse.view(labels.shape)


class SelectedTokenCrossEntropy(torch.autograd.Function):
    """Selected-token loss ``token_loss * selected`` whose gradient w.r.t. ``logits`` exists only for selected
    tokens. Only the selected logit rows ``[n_sel, V/TP]`` and small per-token vectors are saved for backward,
    so the memory it keeps scales with the selected fraction; backward needs no communication."""

    @staticmethod
    def forward(ctx, logits, labels, token_loss, logsumexp, selected, vocab_size, tp_group):
        """Args: ``logits`` local shard ``[..., V/TP]``; ``labels`` int64 global ids; ``token_loss``/``logsumexp``
        from :func:`vocab_parallel_token_loss`; ``selected`` bool mask, all with ``labels``' shape.
        Returns fp32 ``token_loss * selected``."""
        _, start, n_valid = _shard_info(logits, vocab_size, tp_group)
        part = logits.shape[-1]
        sel_idx = selected.reshape(-1).nonzero().squeeze(-1)
        # index_select copies: the full logits (or a view of them) are never saved.
        logits_sel = logits.reshape(-1, part).index_select(0, sel_idx)
        ctx.save_for_backward(logits_sel, sel_idx, labels.reshape(-1)[sel_idx], logsumexp.reshape(-1)[sel_idx])
        ctx.meta = (logits.shape, start, n_valid)
        return token_loss.float() * selected

    @staticmethod
    def backward(ctx, grad_output):
        """grad = (softmax_local - onehot_local) * grad_output on selected rows, 0 elsewhere and on padding."""
        logits_sel, sel_idx, lab_sel, lse_sel = ctx.saved_tensors
        shape, start, n_valid = ctx.meta
        part = shape[-1]
        g = grad_output.reshape(-1).index_select(0, sel_idx).float()
        grad_sel = (logits_sel[:, :n_valid] - lse_sel.unsqueeze(-1)).exp_().mul_(g.unsqueeze(-1))
        rows = ((lab_sel >= start) & (lab_sel < start + n_valid)).nonzero().squeeze(-1)
        grad_sel.index_put_((rows, lab_sel[rows] - start), -g[rows], accumulate=True)
        grad = torch.zeros(shape.numel() // part, part, dtype=logits_sel.dtype, device=logits_sel.device)
        grad[:, :n_valid].index_copy_(0, sel_idx, grad_sel.to(logits_sel.dtype))
        return grad.view(shape), None, None, None, None, None, None


def selective_cross_entropy(logits, labels, selected, vocab_size=None, tp_group=None, token_loss=None,
                            logsumexp=None) -> torch.Tensor:
    """Per-token vocab-parallel CE, zero (and gradient-free) where ``selected`` is False.

    ``token_loss``/``logsumexp`` may be passed if already computed (e.g. for SLM token scoring) to skip the
    forward communication; otherwise :func:`vocab_parallel_token_loss` computes them. Returns fp32 with
    ``labels``' shape, identical on every TP rank; the gradient flows to this rank's ``logits`` shard.
    """
    if token_loss is None or logsumexp is None:
        token_loss, logsumexp = vocab_parallel_token_loss(logits, labels, vocab_size, tp_group)
    return SelectedTokenCrossEntropy.apply(logits, labels, token_loss, logsumexp, selected.bool(), vocab_size,
                                           tp_group)
