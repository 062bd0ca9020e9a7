"""Fused output layer + selective CE vs plain torch: F.linear on the full weight, F.cross_entropy, autograd.

Every rank builds the same hidden states and full (padded) output weight from a fixed seed and keeps its
vocab shard of the weight; the hidden states enter through megatron's TP region copy, as in the model.
Block sizes are shrunk so that every call runs over several row blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_distributed
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch.utils.flop_counter import FlopCounterMode

from megatron_slm.loss import vocab_parallel_ce as vpce
from megatron_slm.parallel import distributed

pytestmark = pytest.mark.unit

PADDED_VOCAB, HIDDEN = 64, 24
CASES = [  # (name, hidden shape [b, s], true vocab, weight dtype)
    ("pad50", (3, 19), 50, torch.float32),
    ("nopad", (2, 23), None, torch.float32),
    ("pad40", (3, 17), 40, torch.float32),  # at TP=4 the last shard is all padding
    ("bf16_pad50", (3, 19), 50, torch.bfloat16),
]


def _make(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    v = vocab or PADDED_VOCAB
    hidden = torch.randn(*shape, HIDDEN, generator=g)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=g) * 0.5
    weight[v:] = 5.0  # padding rows give huge logits: any leak into the softmax shows
    labels = torch.randint(0, v, shape, generator=g)
    labels.view(-1)[:2] = torch.tensor([v - 1, 0])
    mask = torch.rand(shape, generator=g) < 0.6
    weights = torch.rand(shape, generator=g) + 0.5
    return hidden, weight, labels, mask, weights


def _truth(hidden, weight, labels, vocab, scale):
    """CE per token and d(sum(ce * scale))/d(hidden, full weight) by plain autograd."""
    v = vocab or PADDED_VOCAB
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logits = F.linear(h.to(w.dtype), w)[..., :v].float()
    ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(labels.shape)
    (ce * scale).sum().backward()
    return ce.detach(), h.grad, w.grad


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _checks(tp):
    distributed.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    vpce._BLOCK_BYTES["cpu"] = vpce._HEAD_BLOCK_BYTES["cpu"] = 4  # 16-row blocks: several per call
    rank, part = ps.get_tensor_model_parallel_rank(), PADDED_VOCAB // tp
    rows = slice(rank * part, (rank + 1) * part)
    out = {}
    for i, (name, shape, vocab, dtype) in enumerate(CASES):
        hidden, weight, labels, mask, scale = _make(shape, vocab, seed=7 + i)
        if name == "nopad":
            mask = torch.ones_like(mask)  # every token selected: the no-copy path
        weight = weight.to(dtype)
        ce, h_grad, w_grad = _truth(hidden, weight, labels, vocab, scale * mask)

        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        loss = vpce.selective_head_cross_entropy(
            copy_to_tensor_model_parallel_region(h), w, labels, mask, vocab_size=vocab
        )
        (loss * scale).sum().backward()
        scored, _ = vpce.head_token_loss(hidden, weight[rows], labels, vocab_size=vocab)
        local_pad = max(0, min(part, (vocab or PADDED_VOCAB) - rank * part))
        out[name] = dict(
            loss_err=_err(loss, ce * mask),
            scored_err=_err(scored, ce),
            h_grad_err=_err(h.grad, h_grad),
            w_grad_err=_err(w.grad, w_grad[rows]),
            unsel_h_grad=h.grad[~mask].abs().max().item() if (~mask).any() else None,
            pad_w_grad=w.grad[local_pad:].abs().sum().item(),
            dtypes=(str(loss.dtype), str(h.grad.dtype), str(w.grad.dtype)),
            scale=max(h_grad.abs().max().item(), w_grad.abs().max().item()),
        )
    return out


@pytest.mark.parametrize("tp", [1, 2, 4], ids=["tp1", "tp2", "tp4"])
def test_matches_linear_plus_cross_entropy(tp):
    for rank, res in enumerate(run_distributed(_checks, tp, tp)):
        for name, _, _, dtype in CASES:
            r, where = res[name], f"{name} rank {rank}"
            tol = 3e-2 if dtype == torch.bfloat16 else 2e-5
            assert r["dtypes"] == ("torch.float32", "torch.float32", str(dtype)), where
            assert r["loss_err"] < tol and r["scored_err"] < tol, where
            assert r["h_grad_err"] < tol * r["scale"] and r["w_grad_err"] < tol * r["scale"], where
            assert r["unsel_h_grad"] in (0.0, None) and r["pad_w_grad"] == 0.0, where


def _head_costs(n=256, v=512, hidden=64, k=0.25):
    """Saved bytes and backward matmul FLOPs of the fused selective head vs the dense head (linear + CE)."""
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(n, hidden, generator=g), torch.randn(v, hidden, generator=g) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    sel = torch.zeros(n, dtype=torch.bool)
    sel[torch.randperm(n, generator=g)[: int(k * n)]] = True

    def run(fused):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if fused:
                loss = vpce.selective_head_cross_entropy(h, w, labels, sel).sum()
            else:
                loss = (F.cross_entropy(F.linear(h, w), labels, reduction="none") * sel).sum()
        nbytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != w.data_ptr())
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return nbytes, counter.get_total_flops(), h.grad, w.grad

    fused, dense = run(True), run(False)
    torch.testing.assert_close(fused[2], dense[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused[3], dense[3], rtol=1e-4, atol=1e-6)
    return dict(
        k=k,
        logits_bytes=n * v * 4,
        fused_saved=fused[0],
        dense_saved=dense[0],
        fused_flops=fused[1],
        dense_flops=dense[1],
        full_flops=4 * n * v * hidden,
    )


def test_backward_pays_for_selected_tokens_only():
    r = _head_costs()
    assert r["dense_flops"] == r["full_flops"], r  # the dense head's backward: two [n, v, h] matmuls
    assert r["fused_flops"] == pytest.approx(r["k"] * r["full_flops"], rel=0.01), r
    assert r["fused_saved"] <= r["k"] * r["logits_bytes"] * 1.2 + 4096, r
    assert r["dense_saved"] >= r["logits_bytes"], r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_cuda_matches_linear_plus_cross_entropy():
    """The same comparison on CUDA tensors, one process (TP=1, no process group)."""
    for i, (name, shape, vocab, dtype) in enumerate(CASES):
        hidden, weight, labels, mask, scale = (t.cuda() for t in _make(shape, vocab, seed=7 + i))
        weight = weight.to(dtype)
        ce, h_grad, w_grad = _truth(hidden, weight, labels, vocab, scale * mask)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = vpce.selective_head_cross_entropy(h, w, labels, mask, vocab_size=vocab)
        (loss * scale).sum().backward()
        scored, _ = vpce.head_token_loss(hidden, weight, labels, vocab_size=vocab)
        tol = 3e-2 if dtype == torch.bfloat16 else 2e-5
        ref = max(h_grad.abs().max().item(), w_grad.abs().max().item())
        assert _err(loss, ce * mask) < tol and _err(scored, ce) < tol, name
        assert _err(h.grad, h_grad) < tol * ref and _err(w.grad, w_grad) < tol * ref, name
