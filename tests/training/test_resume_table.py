"""The resume table (training/resolve.py RESUME_TABLE): every optimizer and LR-schedule setting, on resume, is
refused when changed (by name), or with --override-opt-param-scheduler runs this run's value, or with
--use-checkpoint-opt-param-scheduler the checkpoint's. Read back from what the next step uses: the optimizer's param
groups (lr, max_lr, min_lr, betas, eps, weight_decay), the LR schedule's settings and the clip the step applies.
The LR of the next step is checked against the schedule's formula written out here, not against megatron-core.

Also the three symptoms of issue 18: a changed --lr/--min-lr with --override-opt-param-scheduler ran the checkpoint's
schedule; a changed --adam-eps was ignored on resume; check-config accepted what train refused. And the resolved
<save>/config.yaml reruns the run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dist_helpers import run_distributed
from helpers.data import tiny_text_dataset
from helpers.tiny_training import make_config, my_micro_batches, tiny_clm_flags

from megatron_slm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = dict(
    lr=1e-2,
    min_lr=1e-3,
    lr_warmup_iters=1,
    lr_decay_style="cosine",
    lr_decay_iters=10,
    weight_decay=0.1,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_eps=1e-4,
    clip_grad=1.0,
)
WSD = dict(BASE, lr_decay_style="WSD", lr_wsd_decay_iters=4, lr_wsd_decay_style="exponential")
STEPS = 2  # trained and saved; the next step is step 3

# (train: field, the new value, the flag named in the refusal, the base it changes)
ROWS = [
    ("lr", 2e-2, "--lr", BASE),
    ("min_lr", 2e-3, "--min-lr", BASE),
    ("lr_warmup_iters", 0, "--lr-warmup-iters", BASE),
    ("lr_decay_style", "linear", "--lr-decay-style", BASE),
    ("lr_decay_iters", 20, "--lr-decay-iters", BASE),
    ("lr_wsd_decay_iters", 6, "--lr-wsd-decay-iters", WSD),
    ("lr_wsd_decay_style", "linear", "--lr-wsd-decay-style", WSD),
    ("weight_decay", 0.05, "--weight-decay", BASE),
    ("adam_beta1", 0.8, "--adam-beta1", BASE),
    ("adam_beta2", 0.9, "--adam-beta2", BASE),
    ("adam_eps", 1e-6, "--adam-eps", BASE),
    ("clip_grad", 0.5, "--clip-grad", BASE),
]


def expected_lr(s: dict, step: int) -> float:
    """megatron's schedule as documented (linear warm-up from 0, then the decay style down to min_lr over the decay
    iterations), written out independently; WSD only in its stable phase here."""
    lr, low, warm, decay = s["lr"], s["min_lr"], s["lr_warmup_iters"], s["lr_decay_iters"]
    if warm > 0 and step <= warm:
        return lr * step / warm
    if step > decay:
        return low
    ratio = (step - warm) / (decay - warm)
    if s["lr_decay_style"] == "cosine":
        return low + (lr - low) * 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if s["lr_decay_style"] == "linear":
        return low + (lr - low) * (1.0 - ratio)
    assert s["lr_decay_style"] == "WSD" and step <= decay - s["lr_wsd_decay_iters"], "stable phase only"
    return lr


def _cfg(train: dict, save=None, load=None, mode=None):
    cfg = make_config(1, 1, selection_scope="micro_batch")
    cfg.train.train_iters = 8
    for k, v in train.items():
        setattr(cfg.train, k, v)
    cfg.checkpoint.save, cfg.checkpoint.load = save, load
    if mode == "override":
        cfg.checkpoint.override_opt_param_scheduler = True
    elif mode == "checkpoint":
        cfg.checkpoint.use_checkpoint_opt_param_scheduler = True
    return cfg


def _read_back(trainer) -> dict:
    """What the next step runs with: the optimizer's param groups and the schedule's settings."""
    sch = trainer.scheduler
    decay_groups = [g for g in trainer.optimizer.param_groups if g.get("wd_mult", 1.0) > 0]
    g = trainer.optimizer.param_groups[0]
    return {
        "lr": g["lr"],
        "max_lr": g["max_lr"],
        "min_lr": g["min_lr"],
        "betas": tuple(g["betas"]),
        "eps": g["eps"],
        "weight_decay": decay_groups[0]["weight_decay"],
        "sched": (
            sch.max_lr,
            sch.min_lr,
            sch.lr_warmup_steps,
            sch.lr_decay_steps,
            sch.lr_decay_style,
            sch.wsd_decay_steps if sch.lr_decay_style == "WSD" else None,
            sch.lr_wsd_decay_style if sch.lr_decay_style == "WSD" else None,
        ),
        "clip_grad": trainer.cfg.train.clip_grad,
    }


def _expect(s: dict) -> dict:
    wsd = s["lr_decay_style"] == "WSD"
    return {
        "lr": expected_lr(s, STEPS),
        "max_lr": s["lr"],
        "min_lr": s["min_lr"],
        "betas": (s["adam_beta1"], s["adam_beta2"]),
        "eps": s["adam_eps"],
        "weight_decay": s["weight_decay"],
        "sched": (
            s["lr"],
            s["min_lr"],
            s["lr_warmup_iters"],
            s["lr_decay_iters"],
            s["lr_decay_style"],
            s["lr_wsd_decay_iters"] if wsd else None,
            s["lr_wsd_decay_style"] if wsd else None,
        ),
        "clip_grad": s["clip_grad"],
    }


def _resume_table_worker(root: str) -> dict:
    from megatron_slm.training.trainer import Trainer

    out = {}
    for name, base in (("base", BASE), ("wsd", WSD)):
        trainer = Trainer(_cfg(base, save=f"{root}/{name}"))
        for step in range(STEPS):
            trainer.train_step(my_micro_batches(step, 8, 0, 1))
        trainer.save_checkpoint()
        trainer.lock.release()
    for field, value, _flag, base in ROWS:
        load = f"{root}/{'wsd' if base is WSD else 'base'}"
        changed = dict(base, **{field: value})
        try:
            Trainer(_cfg(changed, load=load))
            out[(field, "refuse")] = None
        except ConfigError as exc:
            out[(field, "refuse")] = str(exc)
        for mode in ("override", "checkpoint"):
            trainer = Trainer(_cfg(changed, load=load, mode=mode))
            trainer.resume()
            out[(field, mode)] = (trainer.iteration, _read_back(trainer), trainer.run.resume.decision)
    return out


def test_each_row_of_the_resume_table_refuses_overrides_or_keeps_the_checkpoint(tmp_path):
    out = run_distributed(_resume_table_worker, 1, str(tmp_path), timeout=400)[0]
    for field, value, flag, base in ROWS:
        refusal = out[(field, "refuse")]
        assert refusal is not None and f"{flag} {value} (checkpoint: {base[field]})" in refusal, (field, refusal)
        assert "--override-opt-param-scheduler" in refusal and "--use-checkpoint-opt-param-scheduler" in refusal
        new = dict(base, **{field: value})
        for mode, settings in (("override", new), ("checkpoint", base)):
            iteration, got, decision = out[(field, mode)]
            want = _expect(settings)
            assert iteration == STEPS and decision == mode, (field, mode)
            for key in want:
                assert (
                    got[key] == pytest.approx(want[key], rel=1e-12)
                    if key in ("lr", "max_lr", "min_lr", "eps", "weight_decay", "clip_grad")
                    else got[key] == want[key]
                ), (field, mode, key, got[key], want[key])


def _symptom_worker(root: str) -> dict:
    """Issue 18's symptoms 1 and 2 in process: train 4 steps, resume with --override-opt-param-scheduler and a new
    --lr/--min-lr (and, separately, a new --adam-eps), and read the LR and eps of step 5."""
    from megatron_slm.training.trainer import Trainer

    base = dict(BASE, lr=1e-3, min_lr=1e-4, lr_decay_iters=8)
    trainer = Trainer(_cfg(base, save=f"{root}/run"))
    for step in range(4):
        trainer.train_step(my_micro_batches(step, 8, 0, 1))
    trainer.save_checkpoint()
    trainer.lock.release()
    out = {}
    new = dict(base, lr=1e-2, min_lr=1e-3)
    resumed = Trainer(_cfg(new, load=f"{root}/run", mode="override"))
    resumed.resume()
    out["lr_step5"] = resumed.optimizer.param_groups[0]["lr"]  # what the 5th step's update uses
    out["step5_finite"] = math.isfinite(resumed.train_step(my_micro_batches(4, 8, 0, 1))["loss_all"])
    out["groups"] = [(g["max_lr"], g["min_lr"]) for g in resumed.optimizer.param_groups]
    eps = Trainer(_cfg(dict(base, adam_eps=0.0), load=f"{root}/run", mode="override"))
    eps.resume()
    out["eps"] = [g["eps"] for g in eps.optimizer.param_groups]
    out["torch_adam_eps"] = (
        [g["eps"] for g in eps.optimizer.optimizer.param_groups] if hasattr(eps.optimizer, "optimizer") else out["eps"]
    )
    return out


def test_override_applies_the_new_lr_min_lr_and_adam_eps_at_the_next_step(tmp_path):
    out = run_distributed(_symptom_worker, 1, str(tmp_path), timeout=300)[0]
    new = dict(BASE, lr=1e-2, min_lr=1e-3, lr_decay_iters=8)
    # the LR the 5th step ran with is the new schedule's at step 4, not the checkpoint's (1e-3 peak)
    assert out["lr_step5"] == pytest.approx(expected_lr(new, 4), rel=1e-12)
    assert out["lr_step5"] > 1e-3  # above the old peak: the old schedule cannot produce it
    assert set(out["groups"]) == {(1e-2, 1e-3)}
    assert set(out["eps"]) == {0.0} and set(out["torch_adam_eps"]) == {0.0} and out["step5_finite"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_text_dataset(tmp_path_factory.mktemp("resume") / "data")


def _slm(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "megatron_slm.cli", *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_config_yaml_reruns_the_run_and_check_config_refuses_what_train_refuses(data, tmp_path):
    save = tmp_path / "run"
    flags = [
        *tiny_clm_flags(data),
        "--data-cache-path",
        str(tmp_path / "cache"),
        "--train-iters",
        "4",
        "--lr-warmup-iters",
        "1",
        "--exit-interval",
        "2",
    ]
    first = _slm("train", *flags, "--save", str(save))
    assert first.returncode == 0, first.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    recorded = yaml.safe_load((save / "config.yaml").read_text())
    assert recorded["model"]["vocab_size"] == 128 and recorded["model"]["num_layers"] == 2  # resolved values
    assert recorded["train"]["lr_warmup_iters"] == 1 and recorded["checkpoint"]["save"] == str(save)

    # issue 18, symptom 3: check-config refuses the changed LR exactly as train does (one error line, same text)
    check = _slm("check-config", "--config", str(save / "config.yaml"), "--lr", "5e-3")
    train = _slm("train", "--config", str(save / "config.yaml"), "--lr", "5e-3")
    errors = [[line for line in r.stderr.splitlines() if line.startswith("error:")] for r in (check, train)]
    assert check.returncode == train.returncode == 2 and len(errors[0]) == 1 and errors[0] == errors[1], errors
    assert "--lr 0.005 (checkpoint: 0.0003)" in errors[0][0]

    # the recorded config reruns the run: it resumes at 2 without a refusal and finishes; resolving it again
    # records the same config
    again = _slm("train", "--config", str(save / "config.yaml"))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "at iteration 2" in again.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert yaml.safe_load((save / "config.yaml").read_text()) == recorded
