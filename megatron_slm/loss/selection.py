"""Which tokens the top-k% runs over: one object per selection scope, with its data-parallel communication.

The paper says "top k% of tokens in a batch" without saying which batch. Each scope is one answer:

- ``sequence``: top-k% of each sequence on its own. No communication; every sequence trains on k of its tokens.
- ``micro_batch``: exact top-k% over micro-batch i of *every data-parallel rank* together. Costs one
  all-gather of [DP, b, s] fp32 scores per micro-batch (16 KiB for b=1, s=4096) on the last pipeline stage.
  The groups ranked together depend on the DP size: at DP=2 micro-batch i of rank 0 and of rank 1 are ranked
  together, at DP=1 each micro-batch alone.
- ``global_batch``: exact top-k% over the whole global batch (all micro-batches, all DP ranks). In 1F1B a
  micro-batch runs its backward before later ones run their forward, so the policy's token losses of the
  whole batch must exist first: ``prepare`` runs a forward-only scoring pass of the policy (+2N FLOPs/token,
  i.e. ~+33% of a 6N training step) before the training pass, then one all-gather of all scores over DP.
  Independent of DP and micro-batch size. Most faithful, most expensive.
- ``threshold``: a running (1-k) quantile estimate per rank (megatron_slm.slm.RunningThreshold). No
  communication and no extra pass; the selected fraction is k on average rather than exactly.

Strategies (``--selection-strategy``): a selector ranks *scores*. ``topk`` ranks the excess losses; ``random``
ranks seeded uniform random numbers drawn in ``prepare`` for every micro-batch of the step, from a generator seeded
by (train seed, the selector's step counter, DP rank, micro-batch index): the same scope, count and normalisation
as top-k on tokens chosen independently of the losses, so "selection" and "fewer tokens" can be told apart. The step
counter is in the selector's state_dict, so a resumed run continues the same sequence.

Per-dataset ratios (``--slm-select-ratio-per-dataset``, one k per ``--data-path`` dataset): every scope ranks the
tokens of each blend dataset among themselves and keeps its own k of them, in the same group of tokens the scope
ranks together (a sequence, micro-batch i over DP, the global batch; threshold: one running quantile per
dataset), then takes all of those together; the loss is normalised by all the tokens selected. k=1.0 on a
dataset trains on all of its tokens. The random strategy keeps the same per-dataset counts.

CLM (``--loss-mode clm``) is the selector that keeps every valid token. Ties are broken by global position
(DP rank, micro-batch, sequence, token), so results are deterministic. The trainer and the DeepSpeed
backend talk to a selector only through ``prepare``, ``__call__`` and ``expected_count``.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from megatron_slm.slm import RunningThreshold, num_selected, per_dataset_top_k_mask, top_k_mask


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


def _dp_rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _dp_sum(values: list[float]) -> torch.Tensor:
    """Element-wise sum over the DP group (float64, on the CPU afterwards)."""
    from megatron_slm.parallel.distributed import device

    t = torch.tensor(values, dtype=torch.float64, device=device())  # NCCL reduces device tensors only
    group = _dp_group()
    if group is not None and dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t.cpu()


def _valid_masks(micro_batches: list[dict]) -> list[torch.Tensor]:
    return [mb["loss_mask"] > 0 for mb in micro_batches]


def _token_dataset_ids(mb: dict, valid: torch.Tensor) -> torch.Tensor:
    """Each token's blend dataset, [b, s] like ``valid`` (micro-batches of unblended data carry none: 0)."""
    ids = mb.get("dataset_id")
    if ids is None:
        return torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    return ids.to(device=valid.device, dtype=torch.long).view(-1, *([1] * (valid.dim() - 1))).expand(valid.shape)


def _count_per_dataset(valid: torch.Tensor, ids: torch.Tensor, n: int) -> list[float]:
    """Valid tokens per dataset 0..n-1 (one count over the micro-batch, one device-to-host copy)."""
    return [float(c) for c in torch.bincount(ids[valid], minlength=n).tolist()]


STRATEGIES = ("topk", "random")


def random_scores(seed: int, step: int, dp_rank: int, micro_batch: int, shape, device=None) -> torch.Tensor:
    """Uniform [0, 1) scores of one micro-batch, a pure function of (seed, step, DP rank, micro-batch index)."""
    key = hashlib.blake2b(f"{seed}:{step}:{dp_rank}:{micro_batch}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32).to(device)


class TokenSelector:
    """A selection rule, applied on the last pipeline stage to one micro-batch's scores ([b, s]).

    - ``prepare(micro_batches, policy_scores)`` runs before the training pass (``policy_scores()`` runs the
      policy's forward-only scoring pass and returns its per-token losses, or None off the last stage);
    - ``__call__(excess, valid, mb)`` returns the selected-token mask of that micro-batch;
    - ``expected_count(micro_batches)`` is the number of tokens the global batch will select, from the loss
      masks alone (a backend that back-propagates each micro-batch as it comes needs the denominator first).

    Subclasses rank ``self.scores(excess, mb)``: the excess losses (``topk``) or the random scores ``prepare``
    drew for that micro-batch (``random``), and implement ``_prepare`` for their own pre-pass.
    """

    uses_reference = True  # excess losses need the reference's token losses (random: logged, not ranked)
    _SCORES_KEY = "random_selection_scores"  # random strategy: the scores, parked on the micro-batch

    def __init__(self, k: float, strategy: str = "topk", seed: int | None = None, ks: list[float] | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown selection strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        self.k, self.strategy = k, strategy
        self.ks = [float(x) for x in ks] if ks is not None else None  # per blend dataset, or one k for all
        self.seed = int(torch.initial_seed() if seed is None else seed)  # the trainer seeds torch with train.seed
        self.step = 0  # prepare() calls so far: the random strategy's position in its sequence

    @property
    def random(self) -> bool:
        return self.strategy == "random"

    def prepare(self, micro_batches: list[dict], policy_scores) -> None:
        """Before the training pass, on every rank: draw this step's random scores, then the scope's own pass."""
        if self.random:
            dp_rank = _dp_rank(_dp_group())
            for i, mb in enumerate(micro_batches):
                mask = mb["loss_mask"]
                mb[self._SCORES_KEY] = random_scores(self.seed, self.step, dp_rank, i, mask.shape, mask.device)
        self._prepare(micro_batches, policy_scores)
        self.step += 1

    def _prepare(self, micro_batches: list[dict], policy_scores) -> None:
        pass

    def scores(self, excess: torch.Tensor | None, mb: dict) -> torch.Tensor:
        """What the scope ranks: the excess losses, or (random) this micro-batch's scores from ``prepare``."""
        if not self.random:
            return excess
        if self._SCORES_KEY not in mb:
            raise RuntimeError("random selection draws its scores in prepare() before the loss")
        return mb[self._SCORES_KEY]

    def __call__(self, excess: torch.Tensor | None, valid: torch.Tensor, mb: dict) -> torch.Tensor:
        raise NotImplementedError

    def _top_k(self, scores, valid, ids, dim=None) -> torch.Tensor:
        """The top-k% mask of one group of tokens: one k, or each dataset's own k among its tokens."""
        if self.ks is None:
            return top_k_mask(scores, valid, self.k, dim=dim)
        return per_dataset_top_k_mask(scores, valid, ids, self.ks, dim=dim)

    def _per_dataset_valid(self, micro_batches: list[dict]) -> list[list[float]]:
        """[micro-batch][dataset] valid-token counts of this rank."""
        return [
            _count_per_dataset(v, _token_dataset_ids(mb, v), len(self.ks))
            for v, mb in zip(_valid_masks(micro_batches), micro_batches)
        ]

    def expected_count(self, micro_batches: list[dict]) -> float:
        """Default: round(k x valid tokens of the global batch) per dataset (exact for global_batch, expected for
        threshold)."""
        if self.ks is not None:
            per_mb = self._per_dataset_valid(micro_batches)
            totals = _dp_sum([sum(row[d] for row in per_mb) for d in range(len(self.ks))])
            return float(sum(int(num_selected(totals[d], k)) for d, k in enumerate(self.ks)))
        total = _dp_sum([float(sum(int(v.sum()) for v in _valid_masks(micro_batches)))])
        return float(num_selected(total[0], self.k))

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))  # checkpoints before the step counter: 0


class AllTokens(TokenSelector):
    """Plain causal LM: every valid token trains; no reference."""

    uses_reference = False

    def __init__(self):
        super().__init__(1.0, seed=0)

    def __call__(self, excess, valid, mb):
        return valid.bool()

    def expected_count(self, micro_batches):
        return float(_dp_sum([float(sum(int(v.sum()) for v in _valid_masks(micro_batches)))])[0])


class SequenceScope(TokenSelector):
    def __call__(self, excess, valid, mb):
        return self._top_k(self.scores(excess, mb), valid.bool(), _token_dataset_ids(mb, valid), dim=-1)

    def expected_count(self, micro_batches):
        per_rank = 0
        for v, mb in zip(_valid_masks(micro_batches), micro_batches):
            if self.ks is None:
                per_rank += int(num_selected(v.sum(-1), self.k).sum())
            else:
                ids = _token_dataset_ids(mb, v)
                per_rank += sum(int(num_selected((v & (ids == d)).sum(-1), k).sum()) for d, k in enumerate(self.ks))
        return float(_dp_sum([float(per_rank)])[0])


class MicroBatchScope(TokenSelector):
    def __call__(self, excess, valid, mb):
        group = _dp_group()
        all_scores = _all_gather(self.scores(excess, mb).float(), group)
        all_valid = _all_gather(valid.to(torch.uint8), group).bool()
        all_ids = _all_gather(_token_dataset_ids(mb, valid), group) if self.ks is not None else None
        return self._top_k(all_scores, all_valid, all_ids)[_dp_rank(group)]

    def expected_count(self, micro_batches):
        if self.ks is not None:  # micro-batch i's tokens of dataset d over DP ranks, each group its own top-k_d
            n = len(self.ks)
            per = _dp_sum([c for row in self._per_dataset_valid(micro_batches) for c in row]).view(-1, n)
            return float(sum(int(num_selected(per[:, d], k).sum()) for d, k in enumerate(self.ks)))
        per_mb = _dp_sum([float(v.sum()) for v in _valid_masks(micro_batches)])  # micro-batch i over DP ranks
        return float(num_selected(per_mb, self.k).sum())


class GlobalBatchScope(TokenSelector):
    _KEY = "global_batch_selection"  # this selector's mask, parked on the micro-batch between prepare and call

    def _prepare(self, micro_batches, policy_scores):
        from megatron_slm.slm import excess_loss

        if self.random:  # the scores exist already: no policy scoring pass (every stage ranks them, cheaply)
            ranked = torch.stack([mb[self._SCORES_KEY] for mb in micro_batches])
        else:
            scores = policy_scores()
            if scores is None:  # not the last pipeline stage
                return
            ranked = torch.stack([excess_loss(p, mb["ref_loss"]) for p, mb in zip(scores, micro_batches)])
        group = _dp_group()
        valid = torch.stack([v.to(torch.uint8) for v in _valid_masks(micro_batches)])
        ids = None
        if self.ks is not None:
            ids = _all_gather(
                torch.stack([_token_dataset_ids(mb, v) for mb, v in zip(micro_batches, _valid_masks(micro_batches))]),
                group,
            )
        masks = self._top_k(_all_gather(ranked, group), _all_gather(valid, group).bool(), ids)[_dp_rank(group)]
        for mb, mask in zip(micro_batches, masks.unbind(0)):
            mb[self._KEY] = mask

    def __call__(self, excess, valid, mb):
        if self._KEY not in mb:
            raise RuntimeError("global_batch selection runs prepare() (the policy scoring pass) before the loss")
        return mb[self._KEY] & valid.bool()


class ThresholdScope(TokenSelector):
    def __init__(self, k: float, momentum: float, strategy: str = "topk", seed: int | None = None, ks=None):
        super().__init__(k, strategy, seed, ks)
        self.threshold = RunningThreshold(k, momentum)
        self.thresholds = [RunningThreshold(kd, momentum) for kd in self.ks] if self.ks is not None else None

    def __call__(self, excess, valid, mb):
        scores = self.scores(excess, mb)  # random: the quantile of uniform scores
        if self.thresholds is None:
            return self.threshold(scores, valid)
        valid, ids = valid.bool(), _token_dataset_ids(mb, valid)
        mask = torch.zeros_like(valid)
        for d, threshold in enumerate(self.thresholds):  # each dataset its own running quantile
            in_d = valid & (ids == d)
            if in_d.any():
                mask |= threshold(scores, in_d)
        return mask

    def state_dict(self):
        state = {**super().state_dict(), "threshold": self.threshold.state_dict()}
        if self.thresholds is not None:
            state["thresholds"] = [t.state_dict() for t in self.thresholds]
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("threshold"):
            self.threshold.load_state_dict(state["threshold"])
        for t, saved in zip(self.thresholds or [], state.get("thresholds") or []):
            t.load_state_dict(saved)


def per_dataset_ratios(slm_cfg) -> list[float] | None:
    """``--slm-select-ratio-per-dataset`` as floats (one k per --data-path dataset), or None (one k for all)."""
    ks = getattr(slm_cfg, "slm_select_ratio_per_dataset", None)
    return [float(k) for k in ks] if ks else None


def build_selector(slm_cfg, seed: int | None = None) -> TokenSelector:
    """The selector for ``cfg.slm`` (loss mode, scope, k, strategy). ``seed``: the random strategy's (the train
    seed; unset: torch's initial seed, which the trainer sets to it before building the selector)."""
    if slm_cfg.loss_mode == "clm":
        return AllTokens()
    k, scope = slm_cfg.slm_select_ratio, slm_cfg.selection_scope
    kw = dict(strategy=getattr(slm_cfg, "selection_strategy", "topk"), seed=seed, ks=per_dataset_ratios(slm_cfg))
    if scope == "sequence":
        return SequenceScope(k, **kw)
    if scope == "micro_batch":
        return MicroBatchScope(k, **kw)
    if scope == "global_batch":
        return GlobalBatchScope(k, **kw)
    if scope == "threshold":
        return ThresholdScope(k, slm_cfg.threshold_momentum, **kw)
    raise ValueError(f"unknown selection scope {scope!r}")  # validate() reports it first
