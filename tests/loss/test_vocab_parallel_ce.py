"""Vocab-parallel selective cross-entropy vs torch.nn.functional.cross_entropy on the gathered full logits.

Every rank builds the same full (padded) logits from a fixed seed, takes its own vocab shard, and compares
the code under test with an independent full-vocab autograd truth. One distributed launch per TP size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_distributed
from helpers.selective_ce import selective_cross_entropy
from megatron.core import parallel_state as ps  # imported here so forked ranks inherit it (saves seconds)
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_slm.loss.vocab_parallel_ce import vocab_parallel_token_loss
from megatron_slm.parallel import distributed

pytestmark = pytest.mark.unit

PADDED_VOCAB = 64
# (name, labels shape, true vocab or None for unpadded, logits dtype)
CASES = [
    ("sb_pad50", (8, 3), 50, torch.float32),
    ("bs_nopad", (3, 8), None, torch.float32),
    ("pad40", (8, 3), 40, torch.float32),  # at TP=4 the last shard is all padding
    ("bf16_pad50", (8, 3), 50, torch.bfloat16),
]


def _make(shape, vocab, seed):
    """Full padded logits (padding set to huge values so any leak into the softmax shows), labels, mask, weights."""
    g = torch.Generator().manual_seed(seed)
    true_v = vocab or PADDED_VOCAB
    full = torch.randn(*shape, PADDED_VOCAB, generator=g) * 3
    full[..., true_v:] = 50.0
    labels = torch.randint(0, true_v, shape, generator=g)
    labels.view(-1)[:2] = torch.tensor([true_v - 1, 0])  # first and last valid column
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[:2] = torch.tensor([True, False])
    weights = torch.rand(shape, generator=g) + 0.5
    return full, labels, mask, weights


def _truth(full, labels, vocab, weights):
    """Per-token CE, logsumexp and d(sum(ce * weights))/d(full padded logits), all from plain torch."""
    v = vocab or PADDED_VOCAB
    leaf = full.detach().float().requires_grad_()
    ce = F.cross_entropy(leaf[..., :v].reshape(-1, v), labels.reshape(-1), reduction="none").view(labels.shape)
    (ce * weights).sum().backward()
    return ce.detach(), torch.logsumexp(full[..., :v].float(), dim=-1), leaf.grad


def _maxerr(a, b):
    return (a.float() - b.float()).abs().max().item()


def _dist_checks(tp):
    distributed.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    rank, part = ps.get_tensor_model_parallel_rank(), PADDED_VOCAB // tp
    cols = slice(rank * part, (rank + 1) * part)
    out = {}
    for i, (name, shape, vocab, dtype) in enumerate(CASES):
        full32, labels, mask, weights = _make(shape, vocab, seed=100 + i)
        full = full32.to(dtype)
        shard = full[..., cols].clone()
        ce, lse, tgrad = _truth(full, labels, vocab, weights * mask)  # truth on the same (maybe bf16) values
        _, _, tgrad_all = _truth(full, labels, vocab, torch.ones(shape))
        ce32 = _truth(full32, labels, vocab, weights)[0]  # truth on the unrounded fp32 logits

        loss, lse_got = vocab_parallel_token_loss(shard, labels, vocab_size=vocab)
        x = shard.clone().requires_grad_()
        sel_loss = selective_cross_entropy(x, labels, mask, vocab_size=vocab)
        (sel_loss * weights).sum().backward()
        x_all = shard.clone().requires_grad_()
        all_loss = selective_cross_entropy(
            x_all,
            labels,
            torch.ones(shape, dtype=torch.bool),
            vocab_size=vocab,
            tp_group=ps.get_tensor_model_parallel_group(),
        )
        all_loss.sum().backward()
        x_pre = shard.clone().requires_grad_()
        pre = selective_cross_entropy(x_pre, labels, mask, vocab, token_loss=loss, logsumexp=lse_got)
        (pre * weights).sum().backward()

        local_pad = max(0, min(part, (vocab or PADDED_VOCAB) - rank * part))
        out[name] = dict(
            dtypes=(str(loss.dtype), str(lse_got.dtype), str(sel_loss.dtype), str(x.grad.dtype)),
            shape_ok=loss.shape == labels.shape and sel_loss.shape == labels.shape and x.grad.shape == shard.shape,
            loss_err=_maxerr(loss, ce),
            loss32_err=_maxerr(loss, ce32),
            lse_err=_maxerr(lse_got, lse),
            sel_fwd_err=_maxerr(sel_loss, ce * mask),
            grad_err=_maxerr(x.grad, tgrad[..., cols]),
            unsel_grad=x.grad[~mask].abs().max().item(),
            pad_grad=x.grad[..., local_pad:].abs().sum().item(),
            all_fwd_err=_maxerr(all_loss, ce),
            all_grad_err=_maxerr(x_all.grad, tgrad_all[..., cols]),
            pre_grad_err=_maxerr(x_pre.grad, x.grad),
            loss=loss.tolist(),
            sel_loss=sel_loss.tolist(),
        )
    return out


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (4, 4), (4, 2)], ids=["tp1", "tp2", "tp4", "tp2dp2"])
def test_matches_full_vocab_cross_entropy(world, tp):
    results = run_distributed(_dist_checks, world, tp)
    for name, _, _, dtype in CASES:
        bf16 = dtype == torch.bfloat16
        tol = 2e-2 if bf16 else 1e-5
        for rank, res in enumerate(results):
            r = res[name]
            where = f"{name} rank {rank}"
            assert r["dtypes"] == ("torch.float32",) * 3 + (str(dtype),), where
            assert r["shape_ok"], where
            assert r["loss_err"] < (1e-4 if bf16 else 1e-5), where  # vs truth on the same (rounded) logits
            assert r["loss32_err"] < (0.2 if bf16 else 1e-5), where
            assert r["lse_err"] < (1e-4 if bf16 else 1e-5), where
            assert r["sel_fwd_err"] < (1e-4 if bf16 else 1e-5), where
            assert r["all_fwd_err"] < (1e-4 if bf16 else 1e-5), where
            assert r["grad_err"] < tol and r["all_grad_err"] < tol, where
            assert r["unsel_grad"] == 0.0 and r["pad_grad"] == 0.0, where
            assert r["pre_grad_err"] == 0.0, where
            # Identical losses on every TP rank (also across data-parallel replicas here: same inputs).
            assert r["loss"] == results[0][name]["loss"] and r["sel_loss"] == results[0][name]["sel_loss"], where


def _memory_check():
    distributed.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    g = torch.Generator().manual_seed(0)
    s, b, v = 16, 4, 256
    logits = torch.randn(s, b, v, generator=g).requires_grad_()
    labels = torch.randint(0, v, (s, b), generator=g)
    n = s * b
    sel = torch.zeros(n, dtype=torch.bool)
    sel[torch.randperm(n, generator=g)[: round(0.3 * n)]] = True
    sel = sel.view(s, b)

    def measure(fn, inp):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(inp)
        shares = any(t.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr() for t in saved)
        return out, sum(t.numel() * t.element_size() for t in saved), shares

    loss, ours, ours_shares = measure(lambda x: selective_cross_entropy(x, labels, sel), logits)
    loss.sum().backward()  # the saved rows suffice for backward
    meg_in = logits.detach().clone().requires_grad_().clone()  # megatron edits fp32 logits in place
    _, megatron, _ = measure(lambda x: vocab_parallel_cross_entropy(x, labels), meg_in)
    return dict(
        full=logits.numel() * logits.element_size(),
        n=n,
        ours=ours,
        shares=ours_shares,
        megatron=megatron,
        grad_rows=(logits.grad.abs().sum(-1) > 0).sum().item(),
        n_sel=sel.sum().item(),
    )


def test_saved_memory_scales_with_selection():
    r = run_distributed(_memory_check, 1)[0]
    assert 0 < r["ours"] <= 0.3 * r["full"] + 24 * r["n"], r
    assert not r["shares"], "full logits (or a view of them) saved for backward"
    assert r["megatron"] >= r["full"], r
    assert r["grad_rows"] == r["n_sel"], r


def test_single_process_no_parallel_state():
    """tp_group=None without megatron parallel state: plain TP=1, leading dims [b, s, extra]."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 3, 40, generator=g)
    labels = torch.randint(0, 33, (2, 5, 3), generator=g)
    sel = torch.rand(2, 5, 3, generator=g) < 0.5
    ref = logits[..., :33].clone().requires_grad_()
    ce = F.cross_entropy(ref.reshape(-1, 33), labels.reshape(-1), reduction="none").view(labels.shape)
    (ce * sel).sum().backward()
    x = logits.clone().requires_grad_()
    loss = selective_cross_entropy(x, labels, sel, vocab_size=33)
    loss.sum().backward()
    torch.testing.assert_close(loss, ce.detach() * sel, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad[..., :33], ref.grad, rtol=0, atol=1e-6)
    assert (x.grad[..., 33:] == 0).all()
    x.grad = None  # nothing selected: zero loss, zero gradient
    selective_cross_entropy(x, labels, torch.zeros_like(sel), vocab_size=33).sum().backward()
    assert (x.grad == 0).all()
    with pytest.raises(ValueError):
        vocab_parallel_token_loss(logits, labels, vocab_size=41)
