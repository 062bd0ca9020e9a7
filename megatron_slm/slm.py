"""Selective Language Modeling (Rho-1, arXiv 2404.07965) in one short module.

1. A frozen reference model scores every token: L_ref(x_i) (its cross-entropy on that token).
2. The policy being trained has its own token loss L_theta(x_i). The *excess loss*
       L_delta(x_i) = L_theta(x_i) - L_ref(x_i)
   is high on tokens the policy has not learned yet but that the reference (tuned on high-quality data)
   finds predictable: useful tokens. Noise tokens are hard for both and have low excess loss.
3. Only the top k% tokens by excess loss contribute to the loss, normalised by the number selected:
       L_SLM = sum_i I_k(x_i) * L_theta(x_i) / sum_i I_k(x_i)

This module is the single-process definition of steps 2-3. The parallel plumbing (vocab-parallel
cross-entropy, gathering scores over data-parallel ranks, pipeline schedules) lives in megatron_slm.loss and
megatron_slm.training and calls these functions; tests check it against them and against plain torch.
"""

from __future__ import annotations

import torch


def excess_loss(policy_token_loss: torch.Tensor, reference_token_loss: torch.Tensor) -> torch.Tensor:
    """L_theta - L_ref per token. Selection is a ranking, never a gradient path: the policy loss is detached."""
    return policy_token_loss.detach().float() - reference_token_loss.float()


def num_selected(num_valid: torch.Tensor | int, k: float) -> torch.Tensor:
    """How many of ``num_valid`` tokens the top-k% keeps: round(k * n), at least 1 if any are valid.

    Rounding half up keeps k=1.0 exact (all tokens) and avoids float ceil surprises (0.7 * 10 = 7.000...1).
    """
    n = torch.as_tensor(num_valid, dtype=torch.float64)
    return torch.clamp(torch.floor(n * k + 0.5), min=torch.clamp(n, max=1), max=n).long()


def top_k_mask(scores: torch.Tensor, valid: torch.Tensor, k: float, dim: int | None = None) -> torch.Tensor:
    """Exact top-k% of the ``valid`` entries of ``scores``: a bool mask of ``scores``' shape.

    ``dim=None`` ranks all entries together; ``dim=-1`` ranks each row on its own (per-sequence).
    Ties are broken by position, earlier first, so every rank and every run agrees. Invalid entries
    (EOD, padding: loss_mask == 0) are never selected.
    """
    valid = valid.bool()
    flat = dim is None
    x = scores.reshape(1, -1) if flat else scores.movedim(dim, -1)
    v = valid.reshape(1, -1) if flat else valid.movedim(dim, -1)
    keyed = torch.where(v, x.float(), torch.tensor(float("-inf"), device=x.device))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices  # stable: ties keep position order
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    mask = (rank < num_selected(v.sum(-1, keepdim=True), k).to(x.device)) & v
    return mask.reshape(scores.shape) if flat else mask.movedim(-1, dim)


def per_dataset_top_k_mask(
    scores: torch.Tensor, valid: torch.Tensor, dataset_ids: torch.Tensor, ks: list[float], dim: int | None = None
) -> torch.Tensor:
    """Per-dataset selection: the top ``ks[d]`` of the valid tokens of blend dataset ``d``, ranked among
    themselves, for every ``d`` together. ``dataset_ids`` gives each token's dataset (scores' shape). The loss
    is still normalised by all the tokens selected; ``ks[d] = 1.0`` trains on all of dataset ``d`` (plain CLM)."""
    valid = valid.bool()
    mask = torch.zeros_like(valid)
    for d, k in enumerate(ks):
        mask |= top_k_mask(scores, valid & (dataset_ids == d), k, dim=dim)
    return mask


class RunningThreshold:
    """Selection by a running estimate of the (1-k) quantile of the excess loss: no communication at all.

    Each micro-batch is selected with the threshold estimated from the previous ones (the first one uses its
    own quantile), then the estimate moves towards this micro-batch's quantile by an exponential moving average.
    Ranks keep their own estimate; the selected fraction is k on average, not exactly per batch.
    """

    def __init__(self, k: float, momentum: float = 0.9):
        self.k, self.momentum = k, momentum
        self.value: float | None = None

    def __call__(self, excess: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        valid = valid.bool()
        if not valid.any():
            return valid
        quantile = torch.quantile(excess[valid].float(), 1.0 - self.k).item() if self.k < 1.0 else float("-inf")
        threshold = quantile if self.value is None else self.value
        self.value = quantile if self.value is None else self.momentum * self.value + (1 - self.momentum) * quantile
        return (excess >= threshold) & valid

    def state_dict(self) -> dict:
        return {"k": self.k, "momentum": self.momentum, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def selective_loss(policy_token_loss: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """L_SLM: mean policy loss over the selected tokens (single-process reference definition)."""
    selected = selected.float()
    return (policy_token_loss * selected).sum() / selected.sum().clamp(min=1.0)
