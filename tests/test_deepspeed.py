"""DeepSpeed ZeRO backend on CPU (gloo): same loss curve as megatron-core's optimizer; checkpoint resume."""

import os

import pytest
import torch
from dist_helpers import run_distributed
from helpers.tiny_training import make_config, my_micro_batches

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

STEPS = 3


def _trainer(tp, ds_config, scope="micro_batch", save=None):
    from megatron_slm.training.trainer import Trainer

    cfg = make_config(tp, 1, selection_scope=scope)
    cfg.train.deepspeed = ds_config
    cfg.train.train_iters = 4
    cfg.checkpoint.save = save
    return Trainer(cfg)


def _curves(tp, configs, scope):
    import torch.distributed as dist
    from helpers.gather import gather_full

    out = {}
    for name in configs:
        trainer = _trainer(tp, name, scope)
        hist = [trainer.train_step(my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size)) for s in range(STEPS)]
        out[name] = dict(
            loss=[h["loss_selected"] for h in hist],
            grad_norm=[h["grad_norm"] for h in hist],
            params=gather_full(trainer.policy_module),
        )
    return out if dist.get_rank() == dist.get_world_size() - 1 else None


def _close(a, b):
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-6)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_zero1_and_zero2_match_megatron_optimizer_dp2():
    res = run_distributed(
        _curves, 2, 1, [None, "ds_configs/test_zero1_fp32.json", "ds_configs/test_zero2_fp32.json"], "micro_batch"
    )[-1]
    for name in ("ds_configs/test_zero1_fp32.json", "ds_configs/test_zero2_fp32.json"):
        _close(res[None], res[name])


def test_zero1_with_tensor_parallel_and_sequence_scope():
    res = run_distributed(_curves, 2, 2, [None, "ds_configs/test_zero1_fp32.json"], "sequence")[-1]
    _close(res[None], res["ds_configs/test_zero1_fp32.json"])


def _resume(save, crash_after):
    import torch.distributed as dist

    trainer = _trainer(1, "ds_configs/test_zero2_fp32.json", save=save)
    trainer.resume()
    losses = []
    while trainer.iteration < 4:
        if trainer.iteration == crash_after:
            break
        losses.append(
            trainer.train_step(my_micro_batches(trainer.iteration, 8, trainer.dp_rank, trainer.dp_size))[
                "loss_selected"
            ]
        )
        if trainer.iteration == 2:
            trainer.save_checkpoint()
    return losses if dist.get_rank() == dist.get_world_size() - 1 else None


def test_deepspeed_checkpoint_resume_is_exact(tmp_path):
    straight = run_distributed(_resume, 2, None, None)[-1]
    first = run_distributed(_resume, 2, str(tmp_path), 3)[-1]
    second = run_distributed(_resume, 2, str(tmp_path), None)[-1]
    assert first[:2] + second == straight
