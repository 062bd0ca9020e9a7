"""megatron-core's distributed optimizer (--use-distributed-optimizer) and DDP's communication overlap
(--overlap-grad-reduce, --overlap-param-gather, --ddp-bucket-size), on forked gloo ranks.

- DP=2 and TP=2 x DP=2: losses, gradient norms and weights of the distributed optimizer equal the plain
  optimizer's over 3 steps, SLM (online reference, micro_batch scope) and CLM.
- Overlap on (bucketed grad reduce; and the param gather with the distributed optimizer, also at PP=2 x DP=2)
  equals overlap off.
- Per rank, Adam's state and the fp32 master weights are about 1/DP of the plain optimizer's (bytes counted).
- A vetoed non-finite step changes nothing and leaves the DP ranks' weights equal.
- A DP=2 checkpoint (with overlap on, several buckets) resumes bitwise after a crash at DP=2 and to ~1e-8 at DP=1
  (one bucket); the plain optimizer refuses it with the fix.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from dist_helpers import run_distributed
from helpers.tiny_training import make_config, my_micro_batches

from megatron_slm.config import load_config, validate
from megatron_slm.errors import ConfigError

STEPS = 3
BUCKET = 2000  # elements: several buckets even for the tiny model, so overlap really splits the reduction
PLAIN = {}
DOPT = dict(use_distributed_optimizer=True)
OVERLAP_GRAD = dict(overlap_grad_reduce=True, ddp_bucket_size=BUCKET)
DOPT_OVERLAP = dict(
    use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=BUCKET
)


def _config(tp=1, pp=1, parallel=None, **slm):
    cfg = make_config(tp, pp, **slm)
    for k, v in (parallel or {}).items():
        setattr(cfg.parallel, k, v)
    return cfg


def _synced(trainer):
    """With --overlap-param-gather the last update's all-gather waits for the next forward: finish it."""
    if trainer.model.ddp_config.overlap_param_gather:
        trainer.model.start_param_sync(force_sync=True)
    return trainer


def _train(cfg, steps=STEPS):
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(cfg)
    history = [trainer.train_step(my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size)) for s in range(steps)]
    scalars = [(h.get("loss_selected"), h.get("loss_all"), h["grad_norm"], h["update_ok"]) for h in history]
    return trainer, dict(scalars=scalars, params=gather_full(_synced(trainer).policy_module))


def _equality_worker(layouts):
    """Each (name, tp, pp, loss_mode, parallel flags) trained for STEPS steps in this one launch."""
    import torch.distributed as dist
    from helpers.memory import optimizer_bytes

    out = {}
    for name, tp, pp, loss_mode, parallel in layouts:
        trainer, res = _train(_config(tp, pp, parallel, loss_mode=loss_mode))
        res["memory"] = optimizer_bytes(trainer)
        res["dp_consistent"] = _replicas_equal(res["params"])
        out[name] = res
    return out if dist.get_rank() == dist.get_world_size() - 1 else {k: {"memory": v["memory"]} for k, v in out.items()}


def _replicas_equal(params) -> bool:
    """Every DP replica holds the same weights (gather_full gave each rank its own replica's)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    flat = torch.cat([params[k].flatten() for k in sorted(params)])
    replicas = [torch.empty_like(flat) for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather(replicas, flat, group=ps.get_data_parallel_group())
    return all(torch.equal(replicas[0], r) for r in replicas)


def _assert_same_run(a, b, tol=1e-6):
    for sa, sb in zip(a["scalars"], b["scalars"]):
        assert sb[3] and sa[3]
        for x, y in zip(sa[:3], sb[:3]):
            assert y == pytest.approx(x, rel=tol, abs=tol)
    assert a["params"].keys() == b["params"].keys()
    worst = max(float((a["params"][k] - b["params"][k]).abs().max()) for k in a["params"])
    assert worst < tol, worst
    assert b["dp_consistent"]


DP2 = [
    ("slm_plain", 1, 1, "slm", PLAIN),
    ("slm_dopt", 1, 1, "slm", DOPT),
    ("slm_overlap_grad", 1, 1, "slm", OVERLAP_GRAD),
    ("slm_dopt_overlap", 1, 1, "slm", DOPT_OVERLAP),
    ("clm_plain", 1, 1, "clm", PLAIN),
    ("clm_dopt", 1, 1, "clm", DOPT),
]
TP2_DP2 = [
    ("slm_plain", 2, 1, "slm", PLAIN),
    ("slm_dopt", 2, 1, "slm", DOPT),
    ("clm_plain", 2, 1, "clm", PLAIN),
    ("clm_dopt", 2, 1, "clm", DOPT),
    ("pp2_plain", 1, 2, "slm", PLAIN),
    ("pp2_dopt_overlap", 1, 2, "slm", DOPT_OVERLAP),
]


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(_equality_worker, 2, DP2)


@pytest.fixture(scope="module")
def tp2_dp2():
    return run_distributed(_equality_worker, 4, TP2_DP2)[-1]


@pytest.mark.parametrize("mode", ["slm", "clm"])
def test_distributed_optimizer_equals_plain_at_dp2(dp2, mode):
    last = dp2[-1]
    assert last[f"{mode}_plain"]["scalars"][0][0] is not None
    _assert_same_run(last[f"{mode}_plain"], last[f"{mode}_dopt"])


@pytest.mark.parametrize("mode", ["slm", "clm"])
def test_distributed_optimizer_equals_plain_at_tp2_dp2(tp2_dp2, mode):
    _assert_same_run(tp2_dp2[f"{mode}_plain"], tp2_dp2[f"{mode}_dopt"])


def test_overlap_equals_no_overlap(dp2, tp2_dp2):
    last = dp2[-1]
    _assert_same_run(last["slm_plain"], last["slm_overlap_grad"])  # bucketed, asynchronous grad all-reduce
    _assert_same_run(last["slm_plain"], last["slm_dopt_overlap"])  # + reduce-scatter, param gather in the forward
    _assert_same_run(tp2_dp2["pp2_plain"], tp2_dp2["pp2_dopt_overlap"])  # PP=2: grad_sync_func, later stages


def test_optimizer_state_per_rank_is_about_one_over_dp(dp2):
    """fp32: Adam's moments only (the optimizer updates the weights in place in both); grads stay whole."""
    for rank in dp2:
        plain, dopt = rank["slm_plain"]["memory"], rank["slm_dopt"]["memory"]
        assert plain["master"] == 0 and dopt["master"] == 0
        assert 0.45 < dopt["state"] / plain["state"] < 0.55, (dopt, plain)
        assert dopt["grads"] >= plain["grads"]  # the grad buffer stays whole (padded to a DP multiple)
    assert sum(r["slm_dopt"]["memory"]["state"] for r in dp2) == pytest.approx(
        dp2[0]["slm_plain"]["memory"]["state"], rel=0.05
    )


def _bf16_memory_worker():
    from helpers.memory import optimizer_bytes

    out = {}
    for name, parallel in (("plain", PLAIN), ("dopt", DOPT)):
        cfg = _config(parallel=parallel)
        cfg.train.bf16, cfg.reference.dtype = True, "bf16"
        trainer, res = _train(cfg, steps=1)
        out[name] = dict(optimizer_bytes(trainer), loss=res["scalars"][0][1])
    return out


def test_bf16_master_weights_and_state_per_rank_are_about_one_over_dp():
    ranks = run_distributed(_bf16_memory_worker, 2)
    for r in ranks:
        plain, dopt = r["plain"], r["dopt"]
        assert plain["master"] > 0 and plain["state"] == 2 * plain["master"]  # fp32 copy, exp_avg, exp_avg_sq
        ratio = (dopt["state"] + dopt["master"]) / (plain["state"] + plain["master"])
        assert 0.45 < ratio < 0.55, (dopt, plain)
        assert dopt["loss"] == plain["loss"]  # the first step's loss: same weights, same forward


# ------------------------------------------------------------------------------------------------
# A vetoed non-finite step


def _veto_worker():
    """Step 1's gradients poisoned on DP rank 1 only: the agreed veto skips the update everywhere; the run then
    equals one that never saw step 1, and the DP replicas stay equal (no half-applied update, no stale gather)."""
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    results = []
    for poison in (True, False):
        trainer = Trainer(_config(parallel=DOPT_OVERLAP))
        real_step = trainer._optimizer_step

        def step(outputs, _t=trainer, _real=real_step):
            if _t.iteration == 1 and _t.dp_rank == 1:
                for buf in _t.model.buffers:
                    buf.grad_data.fill_(float("nan"))
            return _real(outputs)

        if poison:
            trainer._optimizer_step = step
        oks = []
        for s in (0, 1, 2) if poison else (0, 2):
            oks.append(trainer.train_step(my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size))["update_ok"])
        params = gather_full(_synced(trainer).policy_module)
        results.append(dict(oks=oks, params=params, consistent=_replicas_equal(params)))
    return results if dist.get_rank() == dist.get_world_size() - 1 else None


def test_vetoed_nonfinite_step_leaves_the_distributed_optimizer_consistent():
    poisoned, clean = run_distributed(_veto_worker, 2)[-1]
    assert poisoned["oks"] == [True, False, True] and clean["oks"] == [True, True]
    assert poisoned["consistent"] and clean["consistent"]
    assert all(torch.equal(poisoned["params"][k], clean["params"][k]) for k in clean["params"])


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _ckpt_run(save, parallel, crash_after=None, save_interval=None):
    """global_batch scope: the selection (and so the run) does not depend on the DP size."""
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    cfg = _config(parallel=parallel, selection_scope="global_batch")
    cfg.train.train_iters, cfg.checkpoint.save, cfg.checkpoint.save_interval = 4, str(save), save_interval
    trainer = Trainer(cfg)
    resumed = trainer.resume()
    losses, real_step = [], trainer.train_step

    def step(mbs):
        if crash_after is not None and trainer.iteration == crash_after:
            raise KeyboardInterrupt("simulated crash")
        m = real_step(mbs)
        losses.append(m.get("loss_selected"))
        return m

    trainer.train_step = step
    try:
        trainer.train(lambda s: my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size))
    except KeyboardInterrupt:
        pass
    params = gather_full(_synced(trainer).policy_module)
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    return dict(resumed=resumed, losses=losses, params=params, iteration=trainer.iteration)


def test_checkpoint_resumes_bitwise_at_dp2_and_at_dp1(tmp_path):
    straight = run_distributed(_ckpt_run, 2, tmp_path / "a", DOPT_OVERLAP)[-1]
    first = run_distributed(_ckpt_run, 2, tmp_path / "b", DOPT_OVERLAP, crash_after=3, save_interval=2)[-1]
    assert len(first["losses"]) == 3 and (tmp_path / "b" / "iter_0000002").is_dir()
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    same = run_distributed(_ckpt_run, 2, tmp_path / "b", DOPT_OVERLAP)[-1]  # kill and resume, same layout
    assert same["resumed"] and same["iteration"] == 4
    assert first["losses"][:2] + same["losses"] == straight["losses"]  # bitwise
    assert all(torch.equal(straight["params"][k], same["params"][k]) for k in straight["params"])
    # DP=1, another bucket layout (no overlap): the DP=2 shards of Adam's state and master weights reassemble
    other = run_distributed(_ckpt_run, 1, tmp_path / "c", DOPT)[-1]
    assert other["resumed"] and other["iteration"] == 4
    assert other["losses"] == pytest.approx(straight["losses"][2:], rel=1e-6, abs=1e-6)
    worst = max(float((straight["params"][k] - other["params"][k]).abs().max()) for k in straight["params"])
    assert worst < 1e-6, worst
    with pytest.raises(RuntimeError, match="was written with --use-distributed-optimizer"):  # its own format
        run_distributed(_ckpt_run, 1, tmp_path / "c", PLAIN)


# ------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(parallel=dict(overlap_param_gather=True)), "--overlap-param-gather overlaps the distributed optimizer"),
        (
            dict(parallel=dict(use_distributed_optimizer=True), train=dict(deepspeed="ds_configs/zero1.json")),
            "with --deepspeed ZeRO",
        ),
        (
            dict(parallel=dict(overlap_grad_reduce=True), train=dict(deepspeed="ds_configs/zero1.json")),
            "configure megatron-core's DDP",
        ),
        (dict(parallel=dict(ddp_bucket_size=1000)), "only with --overlap-grad-reduce"),
        (dict(parallel=dict(ddp_bucket_size=0, overlap_grad_reduce=True)), "must be >= 1"),
    ],
)
def test_invalid_combinations_are_refused_with_the_fix(overrides, message):
    cfg = load_config(overrides=dict(model=dict(preset="tiny", vocab_size=96), **overrides))
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=2)


def test_valid_combination_passes():
    cfg = load_config(overrides=dict(model=dict(preset="tiny", vocab_size=96), parallel=DOPT_OVERLAP))
    validate(cfg, world_size=2)
