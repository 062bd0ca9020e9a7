"""PROPOSAL, timed by ``bench_selective_ce.py --proposal``; not used by the package.

A row-chunked form of ``megatron_slm.loss.vocab_parallel_ce`` with the same API, results and communication:

* ``token_loss_chunked``: max, exp and sum of each block of rows happen on a small fp32 temporary (about
  ``CHUNK_BYTES``, cache resident) instead of one fp32 ``[N, V/TP]`` temporary (500 MiB at 4096 x 32000).
  With TP > 1 each block's sum-exp is taken against the *local* row max and rescaled by
  ``exp(local_max - global_max)`` after the MAX all-reduce (the online-softmax identity), so it is still one
  MAX and one SUM all-reduce. At TP = 1 the arithmetic is exactly the current one (bitwise equal results).
* ``SelectedTokenCrossEntropyChunked.backward``: the softmax rows of the selected tokens are rebuilt block by
  block and copied into the zero gradient, instead of materialising ``[n_sel, V/TP]`` fp32 first.

Saved tensors are unchanged (selected logit rows in the logits' dtype + small vectors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_slm.loss.vocab_parallel_ce import _shard_info

CHUNK_BYTES = 1 << 22  # 4 MiB of fp32 per block


def _block_rows(cols: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(cols, 1)))


@torch.no_grad()
def token_loss_chunked(logits, labels, vocab_size=None, tp_group=None):
    group, start, n_valid = _shard_info(logits, vocab_size, tp_group)
    x = logits.reshape(-1, logits.shape[-1])[:, :n_valid]
    lab = labels.reshape(-1)
    n = x.shape[0]
    local_max = torch.full((n,), float("-inf"), device=x.device)
    sum_exp = torch.zeros(n, device=x.device)
    if n_valid > 0:
        r = _block_rows(n_valid)
        for i in range(0, n, r):
            m = x[i:i + r].amax(dim=-1).float()
            local_max[i:i + r] = m
            sum_exp[i:i + r] = (x[i:i + r] - m.unsqueeze(-1)).exp_().sum(dim=-1)
    owned = (lab >= start) & (lab < start + n_valid)
    idx = torch.where(owned, lab - start, 0).unsqueeze(-1)
    target = x.gather(-1, idx).squeeze(-1).float() if n_valid > 0 else torch.zeros(n, device=x.device)
    target = torch.where(owned, target, 0.0)
    gmax = local_max
    if group is not None:
        gmax = local_max.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        # rescale to the global max; a shard of padding only (local max -inf) contributes 0
        sum_exp = torch.where(local_max > float("-inf"), sum_exp * (local_max - gmax).exp(), 0.0)
        both = torch.stack([target, sum_exp])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        target, sum_exp = both[0], both[1]
    lse = gmax + sum_exp.log()
    return (lse - target).view(labels.shape), lse.view(labels.shape)


class SelectedTokenCrossEntropyChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, token_loss, logsumexp, selected, vocab_size, tp_group):
        _, start, n_valid = _shard_info(logits, vocab_size, tp_group)
        part = logits.shape[-1]
        sel_idx = selected.reshape(-1).nonzero().squeeze(-1)
        logits_sel = logits.reshape(-1, part).index_select(0, sel_idx)
        ctx.save_for_backward(logits_sel, sel_idx, labels.reshape(-1)[sel_idx], logsumexp.reshape(-1)[sel_idx])
        ctx.meta = (logits.shape, start, n_valid)
        return token_loss.float() * selected

    @staticmethod
    def backward(ctx, grad_output):
        logits_sel, sel_idx, lab_sel, lse_sel = ctx.saved_tensors
        shape, start, n_valid = ctx.meta
        part = shape[-1]
        g = grad_output.reshape(-1).index_select(0, sel_idx).float()
        grad = torch.zeros(shape.numel() // part, part, dtype=logits_sel.dtype, device=logits_sel.device)
        r = _block_rows(n_valid)
        for i in range(0, sel_idx.numel(), r):
            gi, lab = g[i:i + r], lab_sel[i:i + r]
            block = (logits_sel[i:i + r, :n_valid] - lse_sel[i:i + r].unsqueeze(-1)).exp_().mul_(gi.unsqueeze(-1))
            rows = ((lab >= start) & (lab < start + n_valid)).nonzero().squeeze(-1)
            block.index_put_((rows, lab[rows] - start), -gi[rows], accumulate=True)
            grad[:, :n_valid].index_copy_(0, sel_idx[i:i + r], block.to(grad.dtype))
        return grad.view(shape), None, None, None, None, None, None


def selective_cross_entropy_chunked(logits, labels, selected, vocab_size=None, tp_group=None, token_loss=None,
                                    logsumexp=None):
    if token_loss is None or logsumexp is None:
        token_loss, logsumexp = token_loss_chunked(logits, labels, vocab_size, tp_group)
    return SelectedTokenCrossEntropyChunked.apply(logits, labels, token_loss, logsumexp, selected.bool(),
                                                  vocab_size, tp_group)
