"""Activation recomputation, LR schedules and time limits (--recompute-*, --lr-decay-*, --exit-*).

- Full (uniform, block) and selective recomputation at TP=2 x PP=2 (SLM, online reference) give the losses and
  gathered gradients of the run without it, and really recompute: the core attention runs again in the backward
  exactly as often as each method says.
- The reference's forward-only pass saves no tensor for backward and its peak of live activation bytes does
  not grow with its depth (2 vs 8 layers), while the same forward with autograd does.
- The LR at every step of each --lr-decay-style equals a formula written here; WSD's window is checked on resume.
- --exit-duration-in-mins / --exit-interval checkpoint and exit 0 like a stop signal; the rerun ends with the
  losses of an uninterrupted run; a time limit hit on one rank stops every rank at the same iteration.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
from dist_helpers import run_distributed
from helpers.data import tiny_text_dataset
from helpers.tiny_training import VOCAB, make_config, my_micro_batches, tiny_clm_flags

from megatron_slm.config import validate
from megatron_slm.errors import ConfigError
from megatron_slm.training.trainer import Trainer

# ------------------------------------------------------------------------------------------------
# Activation recomputation

RECOMPUTE = {  # name -> train flags; TP=2 x PP=2, 4 layers: 2 per stage
    "none": {},
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}
STEPS, MICRO_BATCHES, LOCAL_LAYERS = 2, 4, 2
# core-attention calls of a rank's policy layers in STEPS steps: forward + the backward's recomputation
EXPECTED_CALLS = {"none": 1.0, "full_uniform": 2.0, "full_block": 1.5, "selective": 2.0}


def _recompute_worker():
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.model.attention import SDPAttention
    from megatron_slm.training.trainer import Trainer

    calls = {"n": 0}
    forward = SDPAttention.forward

    def counting(self, *args, **kwargs):
        calls["n"] += self.training  # the policy's training pass; the reference runs in eval mode
        return forward(self, *args, **kwargs)

    SDPAttention.forward = counting
    out = {}
    for name, flags in RECOMPUTE.items():
        cfg = make_config(2, 2)
        for k, v in flags.items():
            setattr(cfg.train, k, v)
        trainer = Trainer(cfg)
        calls["n"] = 0
        history, grads = [], []
        for step in range(STEPS):
            history.append(trainer.train_step(my_micro_batches(step, 8, trainer.dp_rank, trainer.dp_size)))
            grads.append(gather_full(trainer.policy_module, use_grad=True))
        out[name] = dict(
            calls=calls["n"],
            grads=grads,
            losses=[
                (h.get("loss_selected"), h.get("loss_all"), h.get("ref_loss"), h.get("grad_norm")) for h in history
            ],
            policy=trainer.policy_module.config.recompute_granularity,
            reference=trainer.reference.config.recompute_granularity,
        )
    return out if dist.get_rank() == dist.get_world_size() - 1 else {k: v["calls"] for k, v in out.items()}


@pytest.fixture(scope="module")
def recompute_results():
    return run_distributed(_recompute_worker, 4)


@pytest.mark.parametrize("name", ["full_uniform", "full_block", "selective"])
def test_recompute_gives_the_losses_and_gradients_of_no_recompute(recompute_results, name):
    base, run = recompute_results[-1]["none"], recompute_results[-1][name]
    assert run["policy"] == RECOMPUTE[name]["recompute_granularity"] and run["reference"] is None
    assert len(run["losses"]) == STEPS and all(x is not None and math.isfinite(x) for s in run["losses"] for x in s)
    loss_diff = max(abs(a - b) for s, t in zip(base["losses"], run["losses"]) for a, b in zip(s, t))
    grad_diff = max(float((a[k] - b[k]).abs().max()) for a, b in zip(base["grads"], run["grads"]) for k in a)
    print(f"{name}: max |loss diff| {loss_diff:.3g}, max |grad diff| {grad_diff:.3g}")
    for s, t in zip(base["losses"], run["losses"]):
        assert t == pytest.approx(s, rel=1e-6, abs=1e-6)
    for a, b in zip(base["grads"], run["grads"]):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")


def test_recompute_really_recomputes(recompute_results):
    """Every rank's core attention runs once per layer and micro-batch, plus once more in the backward for each
    recomputed layer: all layers (uniform, selective), the first of each stage's two (block, N=1)."""
    for rank, res in enumerate(recompute_results):
        counts = {k: (v["calls"] if isinstance(v, dict) else v) for k, v in res.items()}
        base = STEPS * MICRO_BATCHES * LOCAL_LAYERS
        assert counts == {k: int(base * f) for k, f in EXPECTED_CALLS.items()}, (rank, counts)


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages created under this mode and still alive, and their peak. Storages that
    existed before (weights, buffers) are not counted, also when an op returns a view of them."""

    def __init__(self, existing=()):
        super().__init__()
        self.old = {id(t.untyped_storage()) for t in existing}
        self.live, self.current, self.peak = set(), 0, 0

    def _freed(self, key, nbytes):
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()  # one Python object per storage while it lives
                key, nbytes = id(storage), storage.nbytes()
                if nbytes and key not in self.live and key not in self.old:
                    self.live.add(key)
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def _reference_memory_worker():
    from megatron_slm.parallel import distributed
    from megatron_slm.training.passes import score_pass
    from megatron_slm.training.trainer import build_reference

    distributed.initialize(1, 1)
    seq, mbs = 256, 2
    out = {}
    for layers in (2, 8):
        cfg = make_config()
        cfg.train.seq_length = seq
        ref_model = cfg.reference.model
        ref_model.num_layers, ref_model.hidden_size, ref_model.ffn_hidden_size = layers, 64, 256
        ref = build_reference(cfg)
        g = torch.Generator().manual_seed(0)
        batches = [
            dict(
                tokens=torch.randint(1, VOCAB, (mbs, seq), generator=g),
                labels=torch.randint(1, VOCAB, (mbs, seq), generator=g),
                position_ids=torch.arange(seq).expand(mbs, seq),
            )
            for _ in range(2)
        ]
        existing = list(ref.parameters()) + list(ref.buffers())
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            with _LiveBytes(existing) as pass_bytes:
                scores = score_pass(ref, batches, VOCAB)
            assert len(scores) == 2 and scores[0].shape == (mbs, seq)
            # control: the same forward with autograd keeps every layer's activations
            ref.train()
            for p in ref.parameters():
                p.requires_grad_(True)
            saved_before = len(saved)
            with _LiveBytes(existing) as grad_bytes:
                kept = [ref(b["tokens"], b["position_ids"], attention_mask=None) for b in batches]
            assert len(kept) == 2
        out[layers] = dict(
            peak=pass_bytes.peak,
            grad_peak=grad_bytes.peak,
            saved_in_pass=saved_before,
            saved_with_grad=len(saved) - saved_before,
            weights=sum(p.numel() * p.element_size() for p in ref.parameters()),
        )
    return out


def test_reference_pass_keeps_no_activations_and_its_memory_does_not_grow_with_depth():
    res = run_distributed(_reference_memory_worker, 1)[0]
    two, eight = res[2], res[8]
    print(
        f"reference pass: peak live activation bytes {two['peak']} (2 layers) vs {eight['peak']} (8 layers); "
        f"weights {two['weights']} vs {eight['weights']}; with autograd {two['grad_peak']} vs {eight['grad_peak']}"
    )
    assert two["saved_in_pass"] == 0 and eight["saved_in_pass"] == 0  # no_grad: nothing saved for backward
    assert two["saved_with_grad"] > 0  # the hook does see saved tensors when there are any
    assert eight["peak"] <= 1.05 * two["peak"]  # one layer's working set, whatever the depth
    assert eight["grad_peak"] > 3 * two["grad_peak"]  # the measurement sees depth when activations are kept


def _check(**train):
    cfg = make_config(1, 2)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    validate(cfg)


@pytest.mark.parametrize(
    "train, message",
    [
        (dict(recompute_granularity="full"), "needs both --recompute-method uniform|block and --recompute-num-layers"),
        (dict(recompute_granularity="full", recompute_method="block"), "needs both"),
        (dict(recompute_method="uniform", recompute_num_layers=1), "need --recompute-granularity full"),
        (dict(recompute_granularity="selective", recompute_num_layers=1), "apply to full only"),
        (dict(recompute_granularity="selective", recompute_method="block"), "apply to full only"),
        (
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
            r"between 1 and the layers per pipeline stage \(2\)",
        ),
        (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=0), "between 1 and"),
        (dict(lr_decay_style="WSD"), "needs --lr-wsd-decay-iters"),
        (
            dict(lr_decay_style="WSD", lr_wsd_decay_iters=11, lr_decay_iters=10, lr_warmup_iters=2),
            "between 1 and the decay",
        ),
        (dict(lr_wsd_decay_iters=3), "applies to --lr-decay-style WSD only"),
        (dict(lr_decay_iters=5, lr_warmup_iters=5), "--lr-decay-iters 5 must exceed --lr-warmup-iters 5"),
        (dict(exit_duration_in_mins=0.0), "--exit-duration-in-mins 0.0 must be > 0"),
        (dict(exit_interval=0), "--exit-interval 0 must be >= 1"),
    ],
)
def test_recompute_and_schedule_flags_are_checked_with_the_fix(train, message):
    with pytest.raises(ConfigError, match=message) as exc:
        _check(**train)
    assert str(exc.value).count("\n  - ") == 1  # one line


def test_megatron_core_refuses_what_validate_refuses_and_accepts_the_rest():
    from megatron.core.transformer.transformer_config import TransformerConfig

    def megatron(**rc):
        return TransformerConfig(
            num_layers=4,
            hidden_size=32,
            num_attention_heads=4,
            pipeline_model_parallel_size=2,
            pipeline_dtype=torch.float32,
            **rc,
        )

    for rc in (
        dict(recompute_granularity="full"),
        dict(recompute_granularity="full", recompute_method="uniform"),
        dict(recompute_granularity="selective", recompute_num_layers=1),
    ):
        with pytest.raises(ValueError):
            megatron(**rc)
        with pytest.raises(ConfigError):
            _check(**rc)
    for rc in RECOMPUTE.values():
        _check(**rc)
        assert megatron(**rc).recompute_granularity == rc.get("recompute_granularity")
    assert megatron(**RECOMPUTE["selective"]).recompute_modules == ["core_attn"]  # what selective recomputes


# ------------------------------------------------------------------------------------------------
# LR schedules


def formula_lr(step, lr, min_lr, warmup, decay, style, wsd=None, wsd_style=None):
    """Linear warm-up from 0, then the style's decay from lr to min_lr over steps warmup..decay, min_lr after."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    if step > decay:
        return min_lr
    x = (step - warmup) / (decay - warmup)  # 0 -> 1 over the decay
    if style == "linear":
        c = 1 - x
    elif style == "cosine":
        c = (1 + math.cos(math.pi * x)) / 2
    else:  # WSD: lr until the last `wsd` steps of the window, then anneal to min_lr
        start = decay - wsd
        if step <= start:
            c = 1.0
        else:
            y = (step - start) / wsd
            c = {"linear": 1 - y, "cosine": (1 + math.cos(math.pi * y)) / 2, "exponential": 2 * 0.5**y - 1}[wsd_style]
    return min_lr + c * (lr - min_lr)


class _ScheduleOnly(Trainer):
    """A Trainer with only its LR schedule (built by Trainer._lr_schedule). What a resume does to the schedule's
    settings is tested in tests/training/test_resume_table.py."""

    def __init__(self, **train):  # super().__init__ would build models and process groups
        cfg = make_config()
        for k, v in dict(dict(train_iters=20, lr=1.0, min_lr=0.1, lr_warmup_iters=4), **train).items():
            setattr(cfg.train, k, v)
        validate(cfg)
        self.cfg, self.optimizer = cfg, SimpleNamespace(param_groups=[{}, {"wd_mult": 0.0}])
        self.scheduler = self._lr_schedule(self.optimizer)

    def lrs(self, steps):
        out = [self.optimizer.param_groups[0]["lr"]]
        for _ in range(steps):
            self.scheduler.step(increment=1)
            out.append(self.optimizer.param_groups[0]["lr"])
        return out


@pytest.mark.parametrize(
    "train",
    [
        dict(lr_decay_style="cosine"),
        dict(lr_decay_style="cosine", lr_decay_iters=12),
        dict(lr_decay_style="linear", lr_decay_iters=16),
        dict(lr_decay_style="constant"),
        dict(lr_decay_style="WSD", lr_wsd_decay_iters=6, lr_wsd_decay_style="exponential"),
        dict(lr_decay_style="WSD", lr_wsd_decay_iters=5, lr_wsd_decay_style="linear", lr_decay_iters=15),
        dict(lr_decay_style="WSD", lr_wsd_decay_iters=16, lr_wsd_decay_style="cosine"),
    ],
)
def test_lr_at_every_step_equals_the_formula(train):
    s = _ScheduleOnly(**train)
    decay = train.get("lr_decay_iters", 20)
    got = s.lrs(25)  # past the decay window: min_lr (constant: lr)
    want = [
        formula_lr(
            i,
            1.0,
            0.1,
            4,
            decay,
            train["lr_decay_style"],
            train.get("lr_wsd_decay_iters"),
            train.get("lr_wsd_decay_style"),
        )
        for i in range(26)
    ]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[4] == pytest.approx(1.0) and got[2] == pytest.approx(0.5)  # end and middle of the warm-up
    if train["lr_decay_style"] != "constant":
        assert got[decay] == pytest.approx(0.1) and got[decay + 3] == pytest.approx(0.1)
    if train["lr_decay_style"] == "WSD":  # stable phase at lr, then the anneal
        assert got[decay - train["lr_wsd_decay_iters"]] == pytest.approx(1.0) and got[decay - 1] < 1.0


# ------------------------------------------------------------------------------------------------
# Time limits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_text_dataset(tmp_path_factory.mktemp("exit") / "data")


def _train(data, save, *flags):
    cmd = [
        sys.executable,
        "-m",
        "megatron_slm.cli",
        "train",
        *tiny_clm_flags(data),
        "--train-iters",
        "4",
        "--save",
        str(save),
        "--data-cache-path",
        str(data.parent / "cache"),
        *flags,
    ]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def _train_rows(save):
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {
        r["iteration"]: (r["loss_selected"], r["loss_all"], r["grad_norm"], r["lr"])
        for r in rows
        if r["split"] == "train"
    }


def _stopped(res, save, iteration, by):
    assert res.returncode == 0, res.stderr
    assert f"stopping at iteration {iteration} on {by}; resume by rerunning the same command" in res.stdout + res.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    summary = json.loads((save / "summary.json").read_text())
    assert summary["stopped_by"] == by and summary["iterations"] == iteration


@pytest.mark.slow
def test_exit_duration_and_exit_interval_checkpoint_exit_0_and_the_rerun_resumes_exactly(data, tmp_path):
    straight = tmp_path / "straight"
    assert _train(data, straight).returncode == 0
    save = tmp_path / "limited"
    _stopped(_train(data, save, "--exit-duration-in-mins", "0.0001"), save, 1, "exit-duration")
    _stopped(_train(data, save, "--exit-interval", "2"), save, 2, "exit-interval")  # resumed at 1, stops at 2
    res = _train(data, save)
    assert res.returncode == 0, res.stderr
    assert json.loads((save / "summary.json").read_text())["stopped_by"] is None
    assert _train_rows(save) == _train_rows(straight)  # iterations 1-4, bitwise (fp32 CPU)
    assert sorted(_train_rows(save)) == [1, 2, 3, 4]


def _clock_worker(save):
    import time

    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer

    cfg = make_config(1, 2)
    cfg.train.train_iters, cfg.train.exit_duration_in_mins, cfg.checkpoint.save = 6, 30.0, str(save)
    trainer = Trainer(cfg)
    real_step, real_clock = trainer.train_step, time.monotonic

    def step(mbs):
        if trainer.iteration == 1 and dist.get_rank() == 0:  # from step 2 on, rank 0's clock says an hour passed
            time.monotonic = lambda: real_clock() + 3600.0
        return real_step(mbs)

    trainer.train_step = step
    result = trainer.train(lambda s: my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size))
    return result["stopped_by"], trainer.iteration


def test_a_time_limit_reached_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    results = run_distributed(_clock_worker, 2, tmp_path / "run")
    assert results == [("exit-duration", 2), ("exit-duration", 2)]
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
