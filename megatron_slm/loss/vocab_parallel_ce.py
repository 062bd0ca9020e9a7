"""Vocab-parallel cross-entropy for Selective Language Modeling (Rho-1).

Each tensor-parallel (TP) rank holds a vocab shard of the output layer, ``[V/TP, H]``, hence of the logits,
``[..., V/TP]``; rank ``r`` owns global columns ``[r*V/TP, (r+1)*V/TP)``. Full-vocab logits are never gathered.

* :func:`vocab_parallel_token_loss` -- no-grad per-token CE (and logsumexp) for *every* token from logits,
  which SLM needs anyway to rank tokens against the reference model.
* :func:`head_token_loss` -- the same from the final hidden states and the output weight, one block of rows
  at a time, so a forward-only pass (reference, scoring, eval) never holds the logits of a whole micro-batch.
* :func:`selective_head_cross_entropy` -- the training loss: output layer and CE fused, with a gradient only
  for the selected tokens. It keeps the selected logit rows (memory scales with k) and its backward runs the
  output layer's two matmuls over the selected rows only (FLOPs scale with k); no dense ``[N, V/TP]``
  gradient is ever built.

Columns with global index ``>= vocab_size`` (vocab padding) are excluded from the softmax. Padding is a
suffix of the global vocab, so on each shard it is a (possibly empty or full) suffix of the local columns.
Everything works on blocks of rows: the fp32 temporaries stay block-sized (cache resident on CPU) instead of
``[N, V/TP]``, which on CPU would be freshly mapped and page-faulted on every call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Working-set budget of one block: small on CPU (caches, no fresh mmap), large on GPU (few kernel launches).
_BLOCK_BYTES = {"cpu": 2 << 20, "cuda": 1 << 30}
_HEAD_BLOCK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}  # a matmul block wants more rows


def _block_rows(cols: int, device: torch.device, budget=_BLOCK_BYTES) -> int:
    return max(8, budget.get(device.type, budget["cuda"]) // (4 * max(cols, 1)))


def _resolve_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None  # single process: no communication


def _shard_info(part: int, vocab_size: int | None, tp_group):
    """(group or None when TP=1, first global column of this shard, number of unpadded local columns)."""
    group = _resolve_group(tp_group)
    if group is not None and (not dist.is_initialized() or dist.get_world_size(group) == 1):
        group = None
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    start = rank * part
    if vocab_size is None:
        return group, start, part
    if not 0 < vocab_size <= part * world:
        raise ValueError(f"vocab_size {vocab_size} outside (0, {part * world}] for {world} shards of {part}")
    return group, start, min(max(vocab_size - start, 0), part)


def _owned(labels, start, n_valid):
    return (labels >= start) & (labels < start + n_valid)


class _ShardStats:
    """Per-row local max, sum of exp against the local max, and target logit (0 where another shard owns it)."""

    def __init__(self, n: int, device):
        self.max = torch.full((n,), float("-inf"), device=device)
        self.sum_exp = torch.zeros(n, device=device)
        self.target = torch.zeros(n, device=device)

    def add_block(self, i: int, x: torch.Tensor, labels: torch.Tensor, start: int, n_valid: int) -> None:
        """Rows ``i:i+len(x)`` from their local logits ``x`` ``[r, V/TP]`` (padding columns included)."""
        if n_valid == 0:  # a shard holding only padding
            return
        x = x[:, :n_valid]
        j = i + x.shape[0]
        # One block-sized fp32 temporary; bf16 is converted once up front (bf16 reductions are slow on CPU).
        xf = x.float() if x.dtype != torch.float32 else None
        m = (x if xf is None else xf).amax(dim=-1)
        self.max[i:j] = m
        e = x - m.unsqueeze(-1) if xf is None else xf.sub_(m.unsqueeze(-1))
        self.sum_exp[i:j] = e.exp_().sum(dim=-1)
        owned = _owned(labels, start, n_valid)
        t = x.gather(-1, torch.where(owned, labels - start, 0).unsqueeze(-1)).squeeze(-1).float()
        self.target[i:j] = torch.where(owned, t, 0.0)

    def reduce(self, group) -> tuple[torch.Tensor, torch.Tensor]:
        """(token loss, logsumexp) over all shards: one MAX and one SUM all-reduce (none at TP=1)."""
        gmax, sum_exp, target = self.max, self.sum_exp, self.target
        if group is not None:
            gmax = self.max.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
            # online-softmax rescaling to the global max; a padding-only shard (local max -inf) adds 0
            sum_exp = torch.where(self.max > float("-inf"), sum_exp * (self.max - gmax).exp(), 0.0)
            both = torch.stack([target, sum_exp])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
            target, sum_exp = both[0], both[1]
        lse = gmax + sum_exp.log()
        return lse - target, lse


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
    """
    part = logits.shape[-1]
    group, start, n_valid = _shard_info(part, vocab_size, tp_group)
    x, lab = logits.reshape(-1, part), labels.reshape(-1)
    stats = _ShardStats(x.shape[0], x.device)
    rows = _block_rows(n_valid, x.device)
    for i in range(0, x.shape[0], rows):
        stats.add_block(i, x[i : i + rows], lab[i : i + rows], start, n_valid)
    loss, lse = stats.reduce(group)
    return loss.view(labels.shape), lse.view(labels.shape)


@torch.no_grad()
def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Local logits ``[N, V/TP]`` (in the weight's dtype) of hidden states ``[..., H]``, without autograd."""
    return F.linear(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight)


@torch.no_grad()
def head_token_loss(hidden, weight, labels, vocab_size=None, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vocab_parallel_token_loss` of ``hidden @ weight.T`` without holding more than a block of logits.

    ``hidden`` ``[..., H]`` (the final hidden states after the TP copy/gather), ``weight`` this rank's output
    layer shard ``[V/TP, H]``. For forward-only passes (reference scores, policy scoring, evaluation).
    """
    part = weight.shape[0]
    group, start, n_valid = _shard_info(part, vocab_size, tp_group)
    h, lab = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), labels.reshape(-1)
    stats = _ShardStats(h.shape[0], h.device)
    rows = _block_rows(part, h.device, _HEAD_BLOCK_BYTES)
    for i in range(0, h.shape[0], rows):
        stats.add_block(i, F.linear(h[i : i + rows], weight), lab[i : i + rows], start, n_valid)
    loss, lse = stats.reduce(group)
    return loss.view(labels.shape), lse.view(labels.shape)


def _softmax_grad_blocks(rows, labels, lse, g, start, n_valid):
    """d(loss)/d(logits) of the selected rows ``[n_sel, V/TP]`` on the real columns, ``(softmax - onehot) * g``,
    as fp32 blocks ``(i, j, grad of rows i:j)``: only one block-sized temporary exists at a time. Consumes
    ``rows`` (fp32 rows become their own gradient)."""
    step = _block_rows(n_valid, rows.device)
    for i in range(0, rows.shape[0], step):
        gi, lab = g[i : i + step], labels[i : i + step]
        # In place on fp32 rows (they are this function's own copy), else on one fp32 block temporary.
        p = rows[i : i + step, :n_valid].float().sub_(lse[i : i + step].unsqueeze(-1)).exp_().mul_(gi.unsqueeze(-1))
        own = _owned(lab, start, n_valid).nonzero().squeeze(-1)
        p.index_put_((own, lab[own] - start), -gi[own], accumulate=True)
        yield i, i + p.shape[0], p


class SelectedHeadCrossEntropy(torch.autograd.Function):
    """Output layer + CE with gradients (to hidden states and the weight shard) from selected tokens only.

    Forward takes the already computed no-grad logits and keeps their selected rows plus the selected hidden
    rows. Backward: the saved rows become d(loss)/d(logits) in place, then two matmuls over ``n_sel`` rows.
    The hidden-state gradient is this shard's partial sum; the TP all-reduce is the caller's TP region copy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, logits, labels, token_loss, logsumexp, selected, vocab_size, tp_group):
        part = weight.shape[0]
        _, start, n_valid = _shard_info(part, vocab_size, tp_group)
        sel_idx = selected.reshape(-1).nonzero().squeeze(-1)
        logits = logits.reshape(-1, part)
        # Every row selected (CLM, k=1): keep the logits themselves, no copy; backward overwrites them.
        logits_sel = logits if sel_idx.numel() == logits.shape[0] else logits.index_select(0, sel_idx)
        hidden_sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sel_idx).to(weight.dtype)
        ctx.save_for_backward(
            logits_sel, hidden_sel, weight, sel_idx, labels.reshape(-1)[sel_idx], logsumexp.reshape(-1)[sel_idx]
        )
        ctx.meta = (hidden.shape, hidden.dtype, start, n_valid)
        return token_loss.float() * selected

    @staticmethod
    def backward(ctx, grad_output):
        logits_sel, hidden_sel, weight, sel_idx, lab_sel, lse_sel = ctx.saved_tensors
        shape, dtype, start, n_valid = ctx.meta
        g = grad_output.reshape(-1).index_select(0, sel_idx).float()
        for i, j, p in _softmax_grad_blocks(logits_sel, lab_sel, lse_sel, g, start, n_valid):
            if p.data_ptr() != logits_sel[i:j].data_ptr():  # (fp32 rows were updated in place)
                logits_sel[i:j, :n_valid] = p  # the saved rows become their own gradient: no new [n_sel, V/TP]
        logits_sel[:, n_valid:] = 0
        grad_logits = logits_sel.to(weight.dtype)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros(shape.numel() // shape[-1], shape[-1], dtype=dtype, device=weight.device)
            grad_hidden.index_copy_(0, sel_idx, (grad_logits @ weight).to(dtype))
            grad_hidden = grad_hidden.view(shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_logits.t() @ hidden_sel
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def selective_head_cross_entropy(
    hidden, weight, labels, selected, vocab_size=None, tp_group=None, logits=None, token_loss=None, logsumexp=None
) -> torch.Tensor:
    """Per-token CE of ``hidden @ weight.T`` over TP vocab shards, zero and gradient-free where not selected.

    Args:
        hidden: ``[..., H]`` final hidden states (already copied/gathered into the TP region).
        weight: this rank's output-layer shard ``[V/TP, H]`` (a parameter: it receives its gradient).
        labels, selected: ``hidden.shape[:-1]``; int64 global ids and the bool selection mask.
        logits, token_loss, logsumexp: pass them when already computed (:func:`head_logits`,
            :func:`vocab_parallel_token_loss`), as the SLM loss does to rank tokens before selecting.
            ``logits`` are no-grad scratch that backward may overwrite.
    Returns fp32 with ``labels``' shape, identical on every TP rank.
    """
    if logits is None:
        logits = head_logits(hidden, weight)
    if token_loss is None or logsumexp is None:
        token_loss, logsumexp = vocab_parallel_token_loss(logits, labels, vocab_size, tp_group)
    return SelectedHeadCrossEntropy.apply(
        hidden, weight, logits, labels, token_loss, logsumexp, selected.bool(), vocab_size, tp_group
    )
