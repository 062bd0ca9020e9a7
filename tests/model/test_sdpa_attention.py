"""SDPAttention (torch's fused SDPA) vs megatron-core's unfused DotProductAttention: same outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_distributed
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_slm.parallel import distributed

# (heads, kv groups, megatron window or None, dtype)
CASES = [
    (4, 4, None, torch.float32),
    (4, 2, None, torch.float32),
    (8, 2, (5, 0), torch.float32),
    (4, 2, None, torch.bfloat16),
]


def _compare(tp):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_slm.model.attention import SDPAttention

    distributed.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    out = []
    for heads, groups, window, dtype in CASES:
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=8 * heads,
            num_attention_heads=heads,
            num_query_groups=groups,
            attention_dropout=0.0,
            window_size=window,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            tensor_model_parallel_size=tp,
            masked_softmax_fusion=False,
        )
        s, b, d, hp, gp = 24, 2, 8, heads // tp, groups // tp
        g = torch.Generator().manual_seed(heads * 10 + groups)
        q0, k0, v0 = (torch.randn(s, b, n, d, generator=g).to(dtype) for n in (hp, gp, gp))
        grad_out = torch.randn(s, b, hp * d, generator=g).to(dtype)
        results = []
        for cls in (DotProductAttention, SDPAttention):
            attn = cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            y = attn(q, k, v, attention_mask=None)
            y.backward(grad_out)
            results.append([y.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()])
        out.append([(a - b).abs().max().item() / max(a.abs().max().item(), 1e-6) for a, b in zip(*results)])
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_matches_megatron_dot_product_attention(tp):
    for rank_result in run_distributed(_compare, tp, tp):
        for (_, _, _, dtype), errs in zip(CASES, rank_result):
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            assert max(errs) < tol, (dtype, errs)


def test_model_uses_sdpa_without_transformer_engine():
    from megatron_slm.model.build import _layer_spec

    spec = _layer_spec()
    assert spec.submodules.self_attention.submodules.core_attention.__name__ == "SDPAttention"
    assert F.scaled_dot_product_attention is not None
