"""Core attention for megatron-core's local (non-TransformerEngine) layer spec, on torch's fused SDPA.

megatron-core's local ``DotProductAttention`` is unfused (baddbmm, masked softmax, bmm): it materialises and
keeps the ``[b, heads, s, s]`` probabilities for backward. Where TransformerEngine is missing (CPU, GPUs
without TE) ``torch.nn.functional.scaled_dot_product_attention`` does the same maths in a fused kernel
(flash attention on CPU and CUDA) and keeps only its output and logsumexp. Cases SDPA is not used for here
(explicit masks, dropout, softmax offsets, layer-number scaling) fall back to megatron-core's code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if (
            attention_mask is not None
            or mask_type != AttnMaskType.causal
            or attention_bias is not None
            or packed_seq_params is not None
            or self.softmax_offset is not None
            or self.config.apply_query_key_layer_scaling
            or query.shape[0] != key.shape[0]
            or (self.training and self.attention_dropout.p > 0)
        ):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        window, s = self.scale_mask_softmax.window_size, query.shape[0]
        mask = None
        if window is not None:  # megatron-core's (left, right) window: query i sees keys i-left .. i+right
            i = torch.arange(s, device=q.device)
            offset = i.unsqueeze(1) - i.unsqueeze(0)
            mask = (offset >= -window[1]) & (offset <= window[0])
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(s, query.shape[1], -1)
