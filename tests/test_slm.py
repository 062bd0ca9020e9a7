"""The SLM definition (megatron_slm.slm) against plain-Python implementations of the spec."""

import random

import numpy as np
import pytest
import torch
from helpers.spec import plain_top_k

from megatron_slm.slm import RunningThreshold, excess_loss, num_selected, selective_loss, top_k_mask

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("k", [0.1, 0.6, 0.7, 1.0])
def test_top_k_matches_plain_implementation_with_ties_and_masks(k):
    rng = random.Random(int(k * 100))
    for _ in range(20):
        n = rng.randint(1, 60)
        scores = [float(rng.choice([0.0, 0.5, 1.0, rng.random()])) for _ in range(n)]  # many ties
        valid = [rng.random() > 0.25 for _ in range(n)]
        got = top_k_mask(torch.tensor(scores), torch.tensor(valid), k).tolist()
        assert got == plain_top_k(scores, valid, k)


def test_top_k_per_row_equals_rows_done_one_by_one():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (5, 17), generator=g).float()
    valid = torch.rand(5, 17, generator=g) > 0.3
    got = top_k_mask(scores, valid, 0.6, dim=-1)
    for r in range(5):
        assert got[r].tolist() == plain_top_k(scores[r].tolist(), valid[r].tolist(), 0.6)


def test_masked_tokens_are_never_selected_even_with_the_highest_scores():
    scores = torch.tensor([100.0, 1.0, 50.0, 2.0])
    valid = torch.tensor([False, True, False, True])
    assert top_k_mask(scores, valid, 1.0).tolist() == [False, True, False, True]
    assert not top_k_mask(scores, torch.zeros(4, dtype=torch.bool), 0.5).any()


def test_num_selected_rounding_is_exact_for_k_one_and_float_noise():
    assert num_selected(10, 0.7).item() == 7  # 0.7 * 10 = 7.000000000000001
    assert num_selected(1000, 1.0).item() == 1000
    assert num_selected(3, 0.01).item() == 1
    assert num_selected(0, 0.6).item() == 0


def test_excess_loss_is_detached_and_selective_loss_normalises_by_selected_count():
    policy = torch.tensor([2.0, 3.0, 1.0], requires_grad=True)
    ref = torch.tensor([1.0, 1.0, 1.0])
    ex = excess_loss(policy, ref)
    assert not ex.requires_grad and ex.tolist() == [1.0, 2.0, 0.0]
    sel = top_k_mask(ex, torch.ones(3, dtype=torch.bool), 0.6)  # round(1.8) = 2 tokens
    loss = selective_loss(policy, sel)
    loss.backward()
    assert loss.item() == pytest.approx(2.5)
    assert policy.grad.tolist() == [0.5, 0.5, 0.0]


def test_running_threshold_tracks_the_quantile_of_a_stationary_stream():
    rng = np.random.default_rng(0)
    sel = RunningThreshold(k=0.7, momentum=0.9)
    fractions = []
    for _ in range(200):
        x = torch.from_numpy(rng.normal(size=512)).float()
        fractions.append(sel(x, torch.ones(512, dtype=torch.bool)).float().mean().item())
    assert abs(np.mean(fractions[20:]) - 0.7) < 0.02
    assert abs(sel.value - np.quantile(rng.normal(size=200000), 0.3)) < 0.05


def test_running_threshold_follows_its_definition():
    """First batch: its own (1-k) quantile; later: the EMA of earlier quantiles, updated after selecting."""
    sel = RunningThreshold(k=0.5, momentum=0.5)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0])
    ones = torch.ones(4, dtype=torch.bool)
    qa = float(np.quantile(a.numpy(), 0.5))
    assert sel(a, ones).tolist() == (a.numpy() >= qa).tolist()
    assert sel(b, ones).tolist() == (b.numpy() >= qa).tolist()  # selected with the old estimate
    assert sel.value == pytest.approx(0.5 * qa + 0.5 * float(np.quantile(b.numpy(), 0.5)))
