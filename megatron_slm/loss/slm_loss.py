"""The training pass's loss function: selective (SLM) or plain (CLM) token loss on the last pipeline stage.

It receives the final hidden states and applies the output layer itself (fused with the cross-entropy), so the
output layer's backward runs over the selected tokens only.

Returns megatron-core's per-token-loss triple (sum of selected token losses, number selected, stats): with
TransformerConfig.calculate_per_token_loss, finalize_model_grads all-reduces the count over data-parallel
ranks and divides the gradients by it, which is exactly the paper's 1/(N*k%) normalisation over the
global batch.
"""

from __future__ import annotations

import torch

from megatron_slm.loss.selection import TokenSelector
from megatron_slm.loss.vocab_parallel_ce import head_logits, selective_head_cross_entropy, vocab_parallel_token_loss
from megatron_slm.slm import excess_loss

# Order of the summed statistics a loss call returns; the trainer reduces them over micro-batches and DP.
STAT_KEYS = (
    "selected_loss_sum",
    "num_selected",
    "all_loss_sum",
    "num_valid",
    "ref_loss_sum",
    "excess_selected_sum",
    "excess_unselected_sum",
)


class SLMLoss:
    """Token losses of one micro-batch, the selector's choice, and the fused selective output layer + CE."""

    def __init__(self, selector: TokenSelector, vocab_size: int):
        self.selector, self.vocab_size = selector, vocab_size

    def __call__(self, mb: dict, weight: torch.Tensor, hidden: torch.Tensor):
        """``weight``: this rank's output-layer shard [V/TP, H]; ``hidden``: final hidden states [b, s, H]."""
        labels, valid = mb["labels"], mb["loss_mask"] > 0
        logits = head_logits(hidden, weight)  # no grad; the selected rows are kept for backward
        token_loss, lse = vocab_parallel_token_loss(logits, labels, vocab_size=self.vocab_size)
        ref = mb["ref_loss"] if self.selector.uses_reference else None
        excess = excess_loss(token_loss, ref) if ref is not None else None
        selected = self.selector(excess, valid, mb) & valid
        per_token = selective_head_cross_entropy(
            hidden,
            weight,
            labels,
            selected,
            vocab_size=self.vocab_size,
            logits=logits,
            token_loss=token_loss,
            logsumexp=lse,
        )
        del logits
        num_selected = selected.sum()
        with torch.no_grad():
            valid_f, selected_f = valid.double(), selected.double()
            zero = torch.zeros((), dtype=torch.float64, device=token_loss.device)
            stats = [
                (token_loss.double() * selected_f).sum(),
                num_selected.double(),
                (token_loss.double() * valid_f).sum(),
                valid_f.sum(),
                (ref.double() * valid_f).sum() if ref is not None else zero,
                (excess.double() * selected_f).sum() if excess is not None else zero,
                (excess.double() * (valid_f - selected_f)).sum() if excess is not None else zero,
            ]
        details = {"selected": selected.detach(), "token_loss": token_loss, "ref_loss": ref}
        return per_token.sum(), num_selected.int(), {"stats": torch.stack(stats), **details}
