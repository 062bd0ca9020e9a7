"""Which tokens the top-k% runs over: the selection scopes, with their data-parallel communication.

The paper says "top k% of tokens in a batch" without saying which batch. Each scope is one answer:

- ``sequence``: top-k% of each sequence on its own. No communication; every sequence trains on k of its tokens.
- ``micro_batch``: exact top-k% over the micro-batch of the *whole data-parallel group* (all DP ranks'
  micro-batch i together). Costs one all-gather of [DP, b, s] fp32 scores per micro-batch (16 KiB for
  b=1, s=4096) on the last pipeline stage; results do not depend on the DP size for a fixed global layout.
- ``global_batch``: exact top-k% over the whole global batch (all micro-batches, all DP ranks). In 1F1B a
  micro-batch runs its backward before later ones run their forward, so the policy's token losses of the
  whole batch must exist first: a forward-only scoring pass of the policy (+2N FLOPs/token, i.e. ~+33% of a
  6N training step) precedes the training pass, then one all-gather of all scores over DP. Most faithful,
  most expensive.
- ``threshold``: a running (1-k) quantile estimate per rank (megatron_slm.slm.RunningThreshold). No
  communication and no extra pass; the selected fraction is k on average rather than exactly.

Ties are broken by global position (DP rank, micro-batch, sequence, token), so results are deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_slm.slm import RunningThreshold, top_k_mask


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[DP, *t.shape], in DP-rank order."""
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if world == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def select_over_dp(excess: torch.Tensor, valid: torch.Tensor, k: float, group=None) -> torch.Tensor:
    """Exact top-k% of ``excess`` over this tensor on every rank of ``group`` together; returns this rank's part."""
    group = _dp_group() if group is None else group
    all_excess = _all_gather(excess.float(), group)
    all_valid = _all_gather(valid.to(torch.uint8), group).bool()
    mask = top_k_mask(all_excess, all_valid, k)
    rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
    return mask[rank]


class TokenSelector:
    """Applies the configured scope to one micro-batch's excess losses ([b, s]) on the last pipeline stage."""

    def __init__(self, scope: str, k: float, threshold_momentum: float = 0.9):
        self.scope, self.k = scope, k
        self.threshold = RunningThreshold(k, threshold_momentum) if scope == "threshold" else None

    def __call__(self, excess: torch.Tensor, valid: torch.Tensor, precomputed: torch.Tensor | None = None):
        valid = valid.bool()
        if self.scope == "sequence":
            return top_k_mask(excess, valid, self.k, dim=-1)
        if self.scope == "micro_batch":
            return select_over_dp(excess, valid, self.k)
        if self.scope == "threshold":
            return self.threshold(excess, valid)
        if self.scope == "global_batch":
            if precomputed is None:
                raise RuntimeError("global_batch selection needs the scoring pass's masks (select_global_batch)")
            return precomputed.bool() & valid
        raise ValueError(f"unknown selection scope {self.scope!r}")

    def state_dict(self) -> dict:
        return {"threshold": self.threshold.state_dict() if self.threshold else None}

    def load_state_dict(self, state: dict) -> None:
        if self.threshold is not None and state.get("threshold"):
            self.threshold.load_state_dict(state["threshold"])


def select_global_batch(excess: list[torch.Tensor], valid: list[torch.Tensor], k: float, group=None):
    """Exact top-k% over all micro-batches of all DP ranks; returns this rank's masks, one per micro-batch."""
    group = _dp_group() if group is None else group
    all_excess = _all_gather(torch.stack([e.float() for e in excess]), group)  # [DP, M, b, s]
    all_valid = _all_gather(torch.stack([v.to(torch.uint8) for v in valid]), group).bool()
    mask = top_k_mask(all_excess, all_valid, k)
    rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
    return list(mask[rank].unbind(0))
