"""Training checkpoints: exact resume after a crash, SIGUSR1, keep-last-N, atomicity, other layouts, errors."""

import json
import os
import shutil
import signal

import pytest
import torch
from dist_helpers import run_distributed
from helpers.tiny_training import make_config, my_micro_batches

from megatron_slm.checkpoint import LATEST, load_model_weights
from megatron_slm.errors import CheckpointError

STEPS = 6


def _cfg(tp, pp, save, **ck):
    cfg = make_config(tp, pp, selection_scope="threshold")  # threshold: selection state must survive too
    cfg.train.train_iters = STEPS
    cfg.checkpoint.save = str(save)
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


def _run(tp, pp, save, crash_after=None, signal_at=None, **ck):
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(_cfg(tp, pp, save, **ck))
    resumed = trainer.resume()
    losses, real_step = [], trainer.train_step

    def step(mbs):
        if crash_after is not None and trainer.iteration == crash_after:
            raise KeyboardInterrupt("simulated crash")
        if signal_at is not None and trainer.iteration == signal_at and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # only one rank gets it
        m = real_step(mbs)
        losses.append(m.get("loss_selected"))
        return m

    trainer.train_step = step
    try:
        result = trainer.train(lambda s: my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size))
    except KeyboardInterrupt:
        result = {"stopped_by": "crash"}
    params = gather_full(trainer.policy_module)
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    return dict(
        resumed=resumed,
        losses=losses,
        params=params,
        iteration=trainer.iteration,
        stopped_by=result.get("stopped_by"),
        threshold=trainer.selector.threshold.value,
    )


def test_exact_resume_after_a_crash_and_keep_last(tmp_path):
    straight = run_distributed(_run, 2, 2, 1, tmp_path / "a")[-1]
    first = run_distributed(_run, 2, 2, 1, tmp_path / "b", crash_after=5, save_interval=2)[-1]
    assert first["stopped_by"] == "crash" and len(first["losses"]) == 5
    assert (tmp_path / "b" / LATEST).read_text() == "4"  # the step-5 update was lost with the crash
    second = run_distributed(_run, 2, 2, 1, tmp_path / "b", save_interval=2)[-1]
    assert second["resumed"] and second["iteration"] == STEPS
    assert first["losses"][:4] + second["losses"] == straight["losses"]  # bitwise
    assert second["threshold"] == straight["threshold"]
    assert all(torch.equal(straight["params"][k], second["params"][k]) for k in straight["params"])
    kept = sorted(p.name for p in (tmp_path / "b").glob("iter_*"))
    assert kept == ["iter_0000004", "iter_0000006"]  # keep_last=2


def test_sigusr1_on_one_rank_checkpoints_and_stops_every_rank(tmp_path):
    res = run_distributed(_run, 2, 1, 2, tmp_path / "s", signal_at=2)[-1]  # PP=2: rank 0 is not the logger
    assert res["stopped_by"] == "SIGUSR1" and res["iteration"] == 3  # also on ranks the signal did not reach
    assert (tmp_path / "s" / LATEST).read_text() == "3"
    state = json.loads((tmp_path / "s" / "iter_0000003" / "trainer_state.json").read_text())
    assert state["iteration"] == 3 and state["parts"]["data"] == {"iteration": 3, "consumed_samples": 24}


def _load_weights(tp, pp, path):
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    cfg = _cfg(tp, pp, "unused")
    distributed.initialize(tp, pp)
    model = build_model(cfg.model, cfg.parallel, seed=123)  # other init: the load must overwrite it
    load_model_weights(model, path)
    full = gather_full(model)
    return full if dist.get_rank() == dist.get_world_size() - 1 else None


def test_checkpoint_loads_at_other_layouts_and_half_written_ones_are_ignored(tmp_path):
    saved = run_distributed(_run, 2, 2, 1, tmp_path / "c")[-1]
    for layout in [(1, 2), (1, 1)]:
        loaded = run_distributed(_load_weights, layout[0] * layout[1], *layout, str(tmp_path / "c"))[-1]
        assert all(torch.equal(saved["params"][k], loaded[k]) for k in saved["params"])
    # an interrupted save leaves iter_*.tmp; it is neither latest nor loaded
    shutil.copytree(tmp_path / "c" / "iter_0000006", tmp_path / "c" / "iter_0000008.tmp")
    (tmp_path / "c" / "iter_0000008.tmp" / "metadata.json").unlink()
    again = run_distributed(_run, 2, 2, 1, tmp_path / "c")[-1]
    assert again["resumed"] and again["iteration"] == STEPS and again["losses"] == []


def test_truncated_or_foreign_checkpoints_give_clear_errors(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="is not a complete megatron_slm checkpoint"):
        load_model_weights(None, str(foreign))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(None, str(tmp_path / "missing"))
    (foreign / LATEST).write_text("abc")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        load_model_weights(None, str(foreign))
