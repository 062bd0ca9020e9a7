"""--selection-strategy random: a seeded random k% of the valid tokens with top-k's count and scopes.

Single-process (DP=1) checks of every scope's random selector, then a 2-rank DP=2 training run.
"""

import pytest
import torch
from dist_helpers import run_distributed

from megatron_slm.config import SLMConfig
from megatron_slm.loss.selection import (
    GlobalBatchScope,
    MicroBatchScope,
    SequenceScope,
    ThresholdScope,
    build_selector,
    random_scores,
)
from megatron_slm.slm import num_selected

pytestmark = pytest.mark.unit

K, B, S = 0.6, 3, 40


def micro_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(loss_mask=(torch.rand(B, S, generator=g) > 0.2).float()) for _ in range(n)]


def excesses(mbs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(mb["loss_mask"].shape, generator=g) for mb in mbs]


def select(selector, mbs, ex=None):
    """One step: prepare, then the selector on every micro-batch."""
    ex = excesses(mbs) if ex is None else ex
    selector.prepare(mbs, lambda: pytest.fail("random selection needs no policy scoring pass"))
    return [selector(e, mb["loss_mask"] > 0, mb) for e, mb in zip(ex, mbs)]


def make(scope, strategy="random", seed=7):
    return build_selector(
        SLMConfig(slm_select_ratio=K, selection_scope=scope, selection_strategy=strategy, threshold_momentum=0.5),
        seed=seed,
    )


def test_random_sequence_scope_selects_the_top_k_count_per_sequence():
    mbs = micro_batches()
    rand, topk = select(make("sequence"), mbs), select(make("sequence", "topk"), mbs)
    for r, t, mb in zip(rand, topk, mbs):
        valid = mb["loss_mask"] > 0
        assert torch.equal(r.sum(-1), num_selected(valid.sum(-1), K))
        assert torch.equal(r.sum(-1), t.sum(-1))
        assert not (r & ~valid).any()


def test_random_micro_batch_scope_selects_round_k_of_each_micro_batch():
    mbs = micro_batches()
    for sel, mb in zip(select(make("micro_batch"), mbs), mbs):
        valid = mb["loss_mask"] > 0
        assert int(sel.sum()) == int(num_selected(valid.sum(), K)) == round(K * int(valid.sum()))
        assert not (sel & ~valid).any()


def test_random_global_batch_scope_needs_no_scoring_pass_and_selects_round_k_of_the_batch():
    mbs = micro_batches()
    sel = select(make("global_batch"), mbs)  # select() fails if prepare asks for the policy scores
    valid = sum(int((mb["loss_mask"] > 0).sum()) for mb in mbs)
    assert sum(int(s.sum()) for s in sel) == int(num_selected(valid, K))
    assert not any((s & ~(mb["loss_mask"] > 0)).any() for s, mb in zip(sel, mbs))
    assert isinstance(make("global_batch"), GlobalBatchScope)


def test_random_threshold_scope_selects_k_on_average():
    selector, picked, valid = make("threshold"), 0, 0
    assert isinstance(selector, ThresholdScope)
    for step in range(20):
        mbs = micro_batches(seed=step)
        for s, mb in zip(select(selector, mbs), mbs):
            assert not (s & ~(mb["loss_mask"] > 0)).any()
            picked, valid = picked + int(s.sum()), valid + int((mb["loss_mask"] > 0).sum())
    assert picked / valid == pytest.approx(K, abs=0.03)


@pytest.mark.parametrize("scope", ["sequence", "micro_batch", "global_batch", "threshold"])
def test_random_selection_is_independent_of_the_excess_loss(scope):
    mbs = micro_batches()
    ex = excesses(mbs)
    permuted = [
        e.flatten()[torch.randperm(e.numel(), generator=torch.Generator().manual_seed(3))].view_as(e) for e in ex
    ]
    a, b = select(make(scope), mbs, ex), select(make(scope), mbs, [-e for e in permuted])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    topk = make(scope, "topk")
    topk.prepare(mbs, lambda: None)  # global_batch topk off the last stage: no scores, no mask
    if scope != "global_batch":
        assert not all(torch.equal(x, topk(e, mb["loss_mask"] > 0, mb)) for x, e, mb in zip(a, ex, mbs))


def test_random_selection_differs_between_steps_and_micro_batches_and_is_deterministic():
    mb = micro_batches(1)[0]
    same = [dict(loss_mask=mb["loss_mask"].clone()) for _ in range(3)]  # identical masks: only the index differs
    s1 = make("micro_batch")
    step0, step1 = select(s1, same), select(s1, same)
    assert not torch.equal(step0[0], step0[1]) and not torch.equal(step0[1], step0[2])
    assert not torch.equal(step0[0], step1[0])
    s2 = make("micro_batch")
    assert all(torch.equal(a, b) for a, b in zip(step0, select(s2, same)))
    assert all(torch.equal(a, b) for a, b in zip(step1, select(s2, same)))
    other_seed = select(make("micro_batch", seed=8), same)
    assert not torch.equal(step0[0], other_seed[0])
    assert torch.equal(random_scores(7, 1, 0, 2, (B, S)), random_scores(7, 1, 0, 2, (B, S)))
    assert not torch.equal(random_scores(7, 1, 0, 2, (B, S)), random_scores(7, 1, 1, 2, (B, S)))  # DP rank


@pytest.mark.parametrize("scope", ["sequence", "threshold"])
def test_selector_state_round_trip_continues_the_random_sequence(scope):
    steps = [micro_batches(seed=s) for s in range(4)]
    a = make(scope)
    ref = [select(a, mbs) for mbs in steps]
    b = make(scope)
    for mbs in steps[:2]:
        select(b, mbs)
    state = b.state_dict()
    assert state["step"] == 2
    c = make(scope)
    c.load_state_dict(state)
    for mbs, expected in zip(steps[2:], ref[2:]):
        assert all(torch.equal(x, y) for x, y in zip(select(c, mbs), expected))


def test_older_checkpoint_state_without_step_loads_as_step_zero():
    s = make("sequence")
    s.step = 5
    s.load_state_dict({})
    assert s.step == 0
    t = make("threshold")
    t.load_state_dict({"threshold": {"k": K, "momentum": 0.5, "value": 0.25}})
    assert t.step == 0 and t.threshold.value == 0.25


def test_topk_strategy_is_the_default_and_unknown_strategies_fail():
    assert SLMConfig().selection_strategy == "topk"
    assert make("micro_batch", "topk").strategy == "topk" and isinstance(make("micro_batch"), MicroBatchScope)
    assert isinstance(make("sequence"), SequenceScope)
    with pytest.raises(ValueError, match="selection strategy"):
        SequenceScope(K, strategy="bogus")


# ------------------------------------------------------------------------------------------------
# DP=2 training with random selection


def _random_dp_worker():
    from helpers.tiny_training import make_config, run_steps

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(make_config(1, 1, selection_scope="micro_batch", selection_strategy="random"))
    history = run_steps(trainer, 2, 8)
    return dict(
        dp_rank=trainer.dp_rank,
        step=trainer.selector.state_dict()["step"],
        fractions=[h["selected_fraction"] for h in history],
        losses=[h["loss_selected"] for h in history],
        excess=[h["excess_selected"] for h in history],
        selected=[[d["selected"] for d in h["token_details"]] for h in history],
    )


def test_random_strategy_trains_at_dp2_with_the_top_k_count():
    from helpers.tiny_training import my_micro_batches

    ranks = run_distributed(_random_dp_worker, 2)
    assert sorted(r["dp_rank"] for r in ranks) == [0, 1]
    last = ranks[-1]
    for step in range(2):
        per_rank = [my_micro_batches(step, 8, r, 2) for r in (0, 1)]
        valid = [[int((mb["loss_mask"] > 0).sum()) for mb in mbs] for mbs in per_rank]
        groups = [valid[0][i] + valid[1][i] for i in range(len(valid[0]))]  # micro-batch i of both DP ranks
        expected = sum(int(num_selected(n, 0.6)) for n in groups) / sum(groups)
        assert last["fractions"][step] == pytest.approx(expected, abs=1e-9)
        assert torch.isfinite(torch.tensor(last["losses"][step])) and last["excess"][step] is not None
        for r in ranks:
            for sel, mb in zip(r["selected"][step], my_micro_batches(step, 8, r["dp_rank"], 2)):
                assert not (sel.bool().cpu() & ~(mb["loss_mask"] > 0)).any()
    assert all(r["step"] == 2 for r in ranks)
    assert not torch.equal(ranks[0]["selected"][0][0], ranks[1]["selected"][0][0])  # DP ranks draw differently
    assert not torch.equal(last["selected"][0][0], last["selected"][1][0])  # and steps do
