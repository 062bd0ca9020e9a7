"""Per-dataset selection (--slm-select-ratio-per-dataset) against a plain-Python oracle, at DP=1 and DP=2, for
every scope: each dataset's valid tokens are ranked among themselves inside the group the scope ranks together
and keep round(k_d x n) of them; the random strategy keeps the same per-dataset counts."""

import math
import random

import numpy as np
import pytest
import torch
from dist_helpers import run_distributed

pytestmark = pytest.mark.unit

KS = [0.5, 1.0, 0.25]  # dataset 1 trains on all its tokens (CLM on it)
N_MB, B, S = 3, 2, 10  # micro-batches per DP rank, sequences per micro-batch, tokens per sequence
SCOPES = ("sequence", "micro_batch", "global_batch", "threshold")


def _batches(dp_rank: int, step: int):
    """This rank's micro-batches: distinct random scores, random masks, a random dataset per sequence."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    mbs = []
    for _ in range(N_MB):
        mbs.append(
            {
                "loss_mask": (torch.rand(B, S, generator=g) > 0.2).float(),
                "dataset_id": torch.randint(0, len(KS), (B,), generator=g),
                "scores": torch.randn(B, S, generator=g),
                "ref_loss": torch.zeros(B, S),
            }
        )
    return mbs


def _worker(steps: int = 2):
    """Every (scope, strategy) on this rank: {(scope, strategy): [per step: masks, expected count, total]}."""
    from megatron_slm.parallel import distributed

    distributed.initialize(1, 1)
    return {(scope, strategy): _run(scope, strategy, steps) for scope in SCOPES for strategy in ("topk", "random")}


def _run(scope: str, strategy: str, steps: int):
    import torch.distributed as dist

    from megatron_slm.config import SLMConfig
    from megatron_slm.loss.selection import build_selector

    cfg = SLMConfig(selection_scope=scope, selection_strategy=strategy, slm_select_ratio_per_dataset=list(map(str, KS)))
    selector = build_selector(cfg, seed=7)
    out = []
    for step in range(steps):
        mbs = _batches(dist.get_rank(), step)
        expected = selector.expected_count(mbs)
        selector.prepare(mbs, lambda mbs=mbs: [mb["scores"] for mb in mbs])
        masks = [selector(mb["scores"], mb["loss_mask"] > 0, mb) & (mb["loss_mask"] > 0) for mb in mbs]
        total = torch.tensor([float(sum(int(m.sum()) for m in masks))], dtype=torch.float64)
        dist.all_reduce(total)
        out.append({"masks": [m.tolist() for m in masks], "expected": expected, "total": float(total)})
    return out


def _keep(n: int, k: float) -> int:
    return min(max(math.floor(n * k + 0.5), min(n, 1)), n)


def _oracle_top_k(tokens, ks):
    """tokens: [(position key, score, dataset)] of one group's valid tokens -> the set of selected keys."""
    chosen = set()
    for d, k in enumerate(ks):
        mine = sorted((t for t in tokens if t[2] == d), key=lambda t: (-t[1], t[0]))
        chosen |= {t[0] for t in mine[: _keep(len(mine), k)]}
    return chosen


def _tokens(dp, step):
    """Every valid token of a DP rank's step: (position key (dp, mb, seq, tok), score, dataset)."""
    out = []
    for i, mb in enumerate(_batches(dp, step)):
        for r in range(B):
            for c in range(S):
                if mb["loss_mask"][r, c] > 0:
                    out.append(((dp, i, r, c), float(mb["scores"][r, c]), int(mb["dataset_id"][r])))
    return out


def _oracle_threshold(dp, steps, momentum=0.9):
    """One running quantile per dataset (numpy's linear quantile), per rank, micro-batch by micro-batch."""
    value = [None] * len(KS)
    chosen = []
    for step in range(steps):
        sel = set()
        for i, mb in enumerate(_batches(dp, step)):
            for d, k in enumerate(KS):
                toks = [
                    ((dp, i, r, c), float(mb["scores"][r, c]))
                    for r in range(B)
                    for c in range(S)
                    if mb["loss_mask"][r, c] > 0 and int(mb["dataset_id"][r]) == d
                ]
                if not toks:
                    continue
                scores = np.array([t[1] for t in toks], dtype=np.float32)
                q = float(np.quantile(scores, 1.0 - k)) if k < 1.0 else -math.inf
                thr = q if value[d] is None else value[d]
                value[d] = q if value[d] is None else momentum * value[d] + (1 - momentum) * q
                sel |= {key for key, sc in toks if sc >= thr}
        chosen.append(sel)
    return chosen


def _oracle(scope, dp_size, steps=2):
    """Selected keys per step (all ranks together)."""
    if scope == "threshold":
        per_rank = [_oracle_threshold(dp, steps) for dp in range(dp_size)]
        return [set().union(*(r[step] for r in per_rank)) for step in range(steps)]
    chosen = []
    for step in range(steps):
        toks = [t for dp in range(dp_size) for t in _tokens(dp, step)]
        if scope == "global_batch":
            groups = [toks]
        elif scope == "micro_batch":  # micro-batch i of every DP rank together
            groups = [[t for t in toks if t[0][1] == i] for i in range(N_MB)]
        else:  # each sequence alone
            keys = {(t[0][0], t[0][1], t[0][2]) for t in toks}
            groups = [[t for t in toks if t[0][:3] == key] for key in keys]
        chosen.append(set().union(*(_oracle_top_k(g, KS) for g in groups)))
    return chosen


def _selected_keys(results):
    """Per step, the keys the ranks selected (results in DP-rank order)."""
    steps = []
    for step in range(len(results[0])):
        keys = set()
        for dp, res in enumerate(results):
            for i, m in enumerate(res[step]["masks"]):
                keys |= {(dp, i, r, c) for r in range(B) for c in range(S) if m[r][c]}
        steps.append(keys)
    return steps


@pytest.fixture(scope="module")
def runs():
    """(scope, strategy, dp) -> each rank's results; DP=2 runs fork two gloo ranks."""
    out = {}
    for dp in (1, 2):
        ranks = run_distributed(_worker, dp)
        for key in ranks[0]:
            out[(*key, dp)] = [r[key] for r in ranks]
    return out


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("scope", SCOPES)
def test_top_k_per_dataset_equals_the_oracle(runs, scope, dp):
    got = _selected_keys(runs[scope, "topk", dp])
    assert got == _oracle(scope, dp)
    if scope != "threshold":  # the denominator known before the pass equals what was selected
        for step in runs[scope, "topk", dp][0]:
            assert step["expected"] == step["total"]


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("scope", ["sequence", "micro_batch", "global_batch"])
def test_random_keeps_the_same_per_dataset_counts(runs, scope, dp):
    rand, top = _selected_keys(runs[scope, "random", dp]), _oracle(scope, dp)
    for step in range(2):
        toks = {t[0]: t[2] for d in range(dp) for t in _tokens(d, step)}
        assert rand[step] <= set(toks)  # only valid tokens

        def per_group_and_dataset(keys, toks=toks):
            group = {"sequence": lambda k: k[:3], "micro_batch": lambda k: k[1], "global_batch": lambda k: 0}[scope]
            counts = {}
            for key in keys:
                counts[group(key), toks[key]] = counts.get((group(key), toks[key]), 0) + 1
            return counts

        assert per_group_and_dataset(rand[step]) == per_group_and_dataset(top[step])
        assert rand[step] != top[step]  # and not the top-k's tokens


def test_a_ratio_per_dataset_must_match_the_blend():
    from megatron_slm.config import load_config
    from megatron_slm.config.rules import validate
    from megatron_slm.errors import ConfigError

    cfg = load_config(
        None,
        overrides={
            "data": {"data_path": ["0.5", "a", "0.5", "b"]},
            "slm": {"slm_select_ratio_per_dataset": ["0.6", "1.0", "0.5"]},
        },
    )
    with pytest.raises(ConfigError, match="3 value.*2 dataset"):
        validate(cfg, world_size=1, require_vocab=False)
    cfg = load_config(None, overrides={"slm": {"slm_select_ratio_per_dataset": ["0.6", "1.5"]}})
    with pytest.raises(ConfigError, match="outside"):
        validate(cfg, world_size=1, require_vocab=False)


def test_oracle_sanity():
    """The oracle itself: k=1.0 keeps a dataset whole, and round half up."""
    rng = random.Random(0)
    toks = [((0, 0, 0, i), rng.random(), i % 2) for i in range(9)]
    chosen = _oracle_top_k(toks, [1.0, 0.5])
    assert {t[0] for t in toks if t[2] == 0} <= chosen
    assert len([t for t in toks if t[2] == 1 and t[0] in chosen]) == _keep(4, 0.5) == 2
