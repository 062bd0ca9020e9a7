"""slm plan (megatron_slm/planning/plan.py): exact parameter counts from meta-device builds, predicted state and
activation bytes against what real ranks hold after a training step, and the CLI (plan, check-config warning)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import yaml
from dist_helpers import run_distributed

from megatron_slm.cli import main
from megatron_slm.config import load_config
from megatron_slm.planning.plan import (
    make_plan,
    model_parameters,
    rank_parameters,
    stage_activations,
    unpadded_parameters,
)

MISTRAL_7B, TINYLLAMA_1B = 7_241_732_096, 1_100_048_384
MISTRAL_CONFIG = "launch/configs/mistral7b_owm_slm_k0.7.yaml"


def _model(**kw):
    return load_config(overrides=dict(model=kw)).model


# ------------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.unit
@pytest.mark.parametrize("preset,expected", [("mistral-7b", MISTRAL_7B), ("tinyllama-1.1b", TINYLLAMA_1B)])
def test_exact_parameter_totals(preset, expected):
    m = _model(preset=preset)
    assert model_parameters(m, 1, 1) == expected  # vocab 32000 is a multiple of 128: no padding at TP=1
    assert unpadded_parameters(m, 4, 2) == expected
    assert unpadded_parameters(m, 2, 2) == expected


@pytest.mark.unit
def test_rank_slices_sum_to_the_padded_model():
    m = _model(preset="mistral-7b")
    tp, pp = 4, 2
    ranks = {(t, p): rank_parameters(m, tp, pp, t, p) for t in range(tp) for p in range(pp)}
    padded = MISTRAL_7B + (32256 - 32000) * 4096 * 2  # vocab padded to a multiple of 128 x TP, embedding + output
    assert sum(r.unique(t) for (t, _), r in ranks.items()) == padded == model_parameters(m, tp, pp)
    assert len({ranks[t, p].held for t in range(tp) for p in [0]}) == 1  # TP ranks of a stage hold alike
    assert ranks[0, 0].held == 905_576_448 and ranks[0, 1].held == 905_580_544  # embedding vs final norm + output
    # Tied embeddings at PP > 1: the last stage's output layer copies the first stage's table (held, not unique).
    tied = _model(preset="tiny", vocab_size=512, num_layers=4, untie_embeddings_and_output_weights=False)
    slices = [rank_parameters(tied, 2, 2, t, p) for t in range(2) for p in range(2)]
    assert slices[1].stage_duplicate == 256 * 64 and slices[1].held > slices[1].unique(0)
    assert (
        sum(r.unique(t) for r, t in zip(slices, [0, 0, 1, 1]))
        == model_parameters(tied, 2, 2)
        == model_parameters(tied, 1, 1)
    )


# ------------------------------------------------------------------------------------------------
# State after a real step: weights + grads + optimizer state (+ master weights), per rank

SEQ = 32


def _state_config(tp, pp, distopt, bf16=False):
    # ~128M parameters: the state (16 bytes per parameter in fp32) dominates everything else on the rank.
    return load_config(
        overrides=dict(
            model=dict(
                preset="tiny",
                vocab_size=32000,
                num_layers=4,
                hidden_size=1024,
                ffn_hidden_size=4096,
                num_attention_heads=8,
                num_query_groups=4,
            ),
            reference=dict(
                model=dict(
                    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=2
                ),
                dtype="fp32",
            ),
            parallel=dict(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, use_distributed_optimizer=distopt
            ),
            slm=dict(slm_select_ratio=0.6, selection_scope="micro_batch"),
            train=dict(
                micro_batch_size=1,
                global_batch_size=2,
                seq_length=SEQ,
                train_iters=1,
                lr=1e-4,
                lr_warmup_iters=0,
                log_interval=1000,
                bf16=bf16,
            ),
        )
    )


def _batch(b, s, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, vocab, (b, s + 1), generator=g)
    return dict(
        tokens=toks[:, :-1], labels=toks[:, 1:], loss_mask=torch.ones(b, s), position_ids=torch.arange(s).expand(b, s)
    )


def _held_state(trainer) -> dict:
    """Bytes of the unique storages of the policy's parameters, DDP grad buffers, optimizer state and the
    optimizer's own parameters (fp32 master weights; views of the model's weights otherwise)."""
    seen, kinds = set(), {"weights": 0, "grads": 0, "optimizer": 0}

    def add(t, kind):
        if torch.is_tensor(t) and t.untyped_storage().nbytes():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                kinds[kind] += st.nbytes()

    for p in trainer.policy_module.parameters():
        add(p, "weights")
    for buf in list(trainer.model.buffers) + list(getattr(trainer.model, "expert_parallel_buffers", [])):
        add(buf.grad_data, "grads")
    for p in trainer.policy_module.parameters():
        add(getattr(p, "main_grad", None), "grads")
    opt = trainer.optimizer
    for sub in getattr(opt, "chained_optimizers", [opt]):
        inner = getattr(sub, "optimizer", sub)
        for state in inner.state.values():
            for v in state.values():
                add(v, "optimizer")
        for group in inner.param_groups:
            for p in group["params"]:
                add(p, "optimizer")  # master weights
    return kinds


# (TP, PP, distributed optimizer, bf16) on 2 ranks; bf16 holds fp32 master weights (sharded by the distributed one)
LAYOUTS = [(1, 1, False, True), (2, 1, False, False), (1, 2, False, False), (1, 1, True, True)]


def _state_worker():
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer

    out = {}
    for layout in LAYOUTS:
        try:
            trainer = Trainer(_state_config(*layout))
            mbs = [_batch(1, SEQ, 32000, 100 + trainer.dp_rank)]
            trainer.train_step(mbs)
            out[layout] = dict(pp_rank=trainer.ps.get_pipeline_model_parallel_rank(), held=_held_state(trainer))
        except Exception as exc:  # noqa: BLE001 - reported by the test of that layout
            out[layout] = dict(error=f"{type(exc).__name__}: {exc}")
        trainer = None
        gc.collect()
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def measured_state():
    return run_distributed(_state_worker, 2, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: str(x))
def test_state_bytes_match_the_plan(measured_state, layout):
    tp, pp, distopt, bf16 = layout
    ranks = [r[layout] for r in measured_state]
    if "error" in ranks[0] and distopt:
        pytest.skip(f"the distributed optimizer does not run here yet: {ranks[0]['error']}")
    assert "error" not in ranks[0], ranks[0]
    plan = make_plan(_state_config(*layout), 2, on_gpu=False)
    assert plan.policy_total >= 100e6
    for r in ranks:
        st = next(s for s in plan.stages if s.pp_rank == r["pp_rank"])
        predicted = dict(weights=st.weights, grads=st.grads, optimizer=st.optimizer(distopt))
        for key in predicted:  # each within 5%, and the sum
            assert abs(r["held"][key] - predicted[key]) <= 0.05 * predicted[key], (key, r, predicted)
        total = sum(r["held"].values())
        assert abs(total - sum(predicted.values())) <= 0.05 * total


# ------------------------------------------------------------------------------------------------
# Activations of one micro-batch (saved for backward), TP=1 PP=1

ACT_S, ACT_B = 256, 2


def _act_config(**train):
    return load_config(
        overrides=dict(
            model=dict(
                preset="tiny",
                vocab_size=8000,
                num_layers=3,
                hidden_size=512,
                ffn_hidden_size=1408,
                num_attention_heads=8,
                num_query_groups=2,
                sliding_window=train.pop("window", None),
            ),
            reference=dict(
                model=dict(
                    num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=2
                ),
                dtype="fp32",
            ),
            slm=dict(slm_select_ratio=0.6, selection_scope="micro_batch"),
            train=dict(micro_batch_size=ACT_B, global_batch_size=ACT_B, seq_length=ACT_S, bf16=False, **train),
        )
    )


ACT_VARIANTS = {
    "none": {},
    "window": dict(window=64),
    "selective": dict(recompute_granularity="selective"),
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block_2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


def _saved_bytes(trainer, mb) -> int:
    params = {p.untyped_storage().data_ptr() for p in trainer.policy_module.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    trainer.prepare_selection([mb])  # the reference's token losses: no-grad, not the policy's activations
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output, loss_fn = trainer._forward_step(iter([mb]), trainer.model)
        loss = loss_fn(output)[0]
    loss.backward()  # the saved tensors are used (and a recompute runs) as in training
    return sum(seen.values())


def _act_worker():
    from megatron_slm.training.trainer import Trainer

    out = {}
    for name, train in ACT_VARIANTS.items():
        trainer = Trainer(_act_config(**dict(train)))
        wired = getattr(trainer.policy_module.config, "recompute_granularity", None) == train.get(
            "recompute_granularity"
        )
        out[name] = _saved_bytes(trainer, _batch(ACT_B, ACT_S, 8000, 7)) if wired else None
        trainer = None
        gc.collect()
    return out


def test_activation_bytes_match_the_plan():
    measured = run_distributed(_act_worker, 1)[0]
    assert measured["none"] is not None
    report = {}
    for name, train in ACT_VARIANTS.items():
        if measured[name] is None:
            continue  # recompute not wired into the model build yet
        cfg = _act_config(**dict(train))
        st = stage_activations(cfg, 0, 1, 4)
        from megatron_slm.planning.plan import loss_head_bytes

        predicted = st.per_microbatch + loss_head_bytes(cfg, 4, on_gpu=False)["kept"]
        report[name] = (measured[name], predicted, measured[name] / predicted - 1)
    for _name, (_got, _predicted, err) in report.items():
        assert abs(err) <= 0.25, report
    # recompute must actually shrink what the plan says it shrinks
    if "full_uniform_1" in report:
        assert report["full_uniform_1"][0] < 0.5 * report["none"][0]


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.unit
@pytest.mark.parametrize("world_size", [8, 16, 32])
def test_cli_plan_shipped_mistral_config(world_size, capsys):
    assert main(["plan", "--config", MISTRAL_CONFIG, "--world-size", str(world_size)]) == 0
    out = capsys.readouterr().out
    assert f"FITS: TP=2 x PP=1 x DP={world_size // 2}, distributed optimizer" in out  # the shipped layout
    assert "7,241,732,096 unpadded" in out and "tokens/s per GPU" in out and "every rank" in out


@pytest.mark.unit
def test_check_config_warns_when_the_layout_does_not_fit(tmp_path, capsys):
    cfg = yaml.safe_load(open(MISTRAL_CONFIG))
    del cfg["reference"]["load"], cfg["checkpoint"]["pretrained_checkpoint"]  # placeholder paths, refused
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(cfg)))
    assert main(["check-config", "--config", str(path), "--world-size", "8"]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert main(["check-config", "--config", str(path), "--world-size", "8", "--gpu-memory", "8"]) == 0
    err = capsys.readouterr().err
    assert "warning: DOES NOT FIT: TP=2 x PP=1 x DP=4" in err
    assert main(["check-config", "--config", str(path), "--world-size", "12"]) == 2  # validate's error comes first
    assert "not divisible" in capsys.readouterr().err
