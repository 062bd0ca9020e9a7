"""Interleaved (virtual) pipeline: --num-layers-per-virtual-pipeline-stage.

- PP=2 x VP=2 (4 layers, one per chunk) trains like PP=2 without interleaving and like PP=1, and TP=2 x PP=2 x VP=2
  like PP=1: losses, gathered gradients and updated weights (fp32), SLM with the online reference (8 layers, 2 a
  chunk), whose pass runs interleaved too, and the global_batch scope's policy scoring pass. At PP=2 this catches
  gloo's batched-p2p trap (batch_p2p_comm=True: gradients off by ~4e-2, no error).
- Tied embeddings: the first chunk's embedding (first stage) and the last chunk's output layer (last stage).
- Checkpoints: a PP=2 x VP=2 training checkpoint resumes at PP=1 (weights equal); PP=2 weights load into VP chunks.
- config.validate's rules.
"""

import re

import pytest
from dist_helpers import run_distributed
from helpers.tiny_training import assert_close_dicts, make_config, my_micro_batches

from megatron_slm.config import validate
from megatron_slm.errors import ConfigError


def _cfg(tp, pp, vp_layers, tied=False):
    cfg = make_config(tp, pp, tied=tied, selection_scope="global_batch")  # policy scoring pass too
    cfg.reference.model.num_layers = 8  # deeper than the policy: 2 layers a chunk with the policy's 2 chunks a rank
    cfg.parallel.num_layers_per_virtual_pipeline_stage = vp_layers
    return cfg


def _worker(tp, pp, vp_layers, tied=False, save=None, load_weights=None, resume=None):
    """Two training steps; optionally save a training checkpoint after them (``save``), load weights saved at
    another layout into fresh chunks (``load_weights``), or resume a training checkpoint first (``resume``)."""
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm import checkpoint
    from megatron_slm.config import virtual_pipeline_size
    from megatron_slm.model.build import build_model_chunks
    from megatron_slm.training.trainer import Trainer

    cfg = _cfg(tp, pp, vp_layers, tied)
    trainer = Trainer(cfg)
    out = {
        "chunks": len(trainer.policy_chunks),
        "ref_chunks": len(trainer.reference) if isinstance(trainer.reference, list) else 1,
    }
    if resume is not None:
        trainer.load_checkpoint(resume)
        out["resumed_params"] = gather_full(trainer.policy_module)
    else:
        history = [trainer.train_step(my_micro_batches(0, 8, trainer.dp_rank, trainer.dp_size))]
        out["grads0"] = gather_full(trainer.policy_module, use_grad=True)
        history.append(trainer.train_step(my_micro_batches(1, 8, trainer.dp_rank, trainer.dp_size)))
        out["grads"] = gather_full(trainer.policy_module, use_grad=True)
        out["params"] = gather_full(trainer.policy_module)
        out["eval"] = trainer.evaluate(my_micro_batches(5, 8, trainer.dp_rank, trainer.dp_size))
        keys = ("loss_selected", "loss_all", "ref_loss", "excess_selected", "selected_fraction", "grad_norm")
        out["scalars"] = [{k: h[k] for k in keys if k in h} for h in history]  # (last stage only)
    if save is not None:
        trainer.save_checkpoint(save)
    if load_weights is not None:
        fresh = build_model_chunks(
            cfg.model, cfg.parallel, seed=123, vp_size=virtual_pipeline_size(cfg.parallel, cfg.model.num_layers)
        )
        checkpoint.load_model_weights(fresh if len(fresh) > 1 else fresh[0], load_weights)
        out["loaded_params"] = gather_full(fresh)
    return out if dist.get_rank() == dist.get_world_size() - 1 else None


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vp")
    return {
        "pp2": run_distributed(_worker, 2, 1, 2, None, save=tmp / "pp2")[-1],
        "vp": run_distributed(_worker, 2, 1, 2, 1, save=tmp / "vp", load_weights=tmp / "pp2" / "iter_0000002")[-1],
        "pp1": run_distributed(_worker, 1, 1, 1, None)[-1],
        "pp1_resumed": run_distributed(_worker, 1, 1, 1, None, resume=tmp / "vp")[-1],
        "tp2_vp": run_distributed(_worker, 4, 2, 2, 1)[-1],
    }


def _assert_same_training(a, b):
    for s, p in zip(a["scalars"], b["scalars"]):
        for k in s:
            assert p[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6), k
    assert b["eval"] == pytest.approx(a["eval"], rel=1e-5)
    for key in ("grads0", "grads", "params"):
        assert_close_dicts(a[key], b[key])


@pytest.mark.parametrize("other", ["pp1", "pp2"])
def test_interleaved_pp2_vp2_trains_like_pp1_and_pp2(results, other):
    vp = results["vp"]
    assert vp["chunks"] == 2 and vp["ref_chunks"] == 2  # the reference runs interleaved too
    _assert_same_training(results[other], vp)
    for key in ("grads0", "grads", "params"):  # fp32: reduction-order noise only
        assert _max_diff(results[other][key], vp[key]) < 1e-5, key


def test_interleaved_tp2_pp2_vp2_trains_like_pp1(results):
    _assert_same_training(results["pp1"], results["tp2_vp"])


def test_interleaved_checkpoint_loads_at_other_layouts(results):
    """A PP=2 x VP=2 training checkpoint resumes at PP=1 (model and optimizer state); PP=2 weights load into the
    chunks of PP=2 x VP=2."""
    assert _max_diff(results["vp"]["params"], results["pp1_resumed"]["resumed_params"]) == 0.0
    assert _max_diff(results["pp2"]["params"], results["vp"]["loaded_params"]) == 0.0


def test_tied_embeddings_interleaved_match_pp1():
    single = run_distributed(_worker, 1, 1, 1, None, True)[-1]
    vp = run_distributed(_worker, 2, 1, 2, 1, True)[-1]
    assert "output_layer.weight" not in vp["params"]
    _assert_same_training(single, vp)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pp=1), "needs a pipeline"),
        (dict(vp_layers=3), "not divisible by pipeline_model_parallel_size x num_layers_per_virtual_pipeline_stage"),
        (dict(vp_layers=2), "one chunk per rank"),
        (dict(gbs=6), "multiple of PP=2"),
        (
            dict(ref_layers=6),
            "reference model: num_layers=6 is not divisible by PP x the policy's chunks per rank = 2 x 2",
        ),
        (dict(deepspeed="ds_configs/test_zero1_fp32.json"), "--deepspeed has no interleaved pipeline"),
    ],
)
def test_validate_refuses_unsupported_interleaving(change, message):
    cfg = _cfg(1, change.get("pp", 2), change.get("vp_layers", 1))
    cfg.train.global_batch_size = change.get("gbs", 8)
    cfg.train.deepspeed = change.get("deepspeed")
    cfg.reference.model.num_layers = change.get("ref_layers", 8)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, world_size=change.get("pp", 2))
    validate(_cfg(1, 2, 1), world_size=2)  # the layout the tests train with is fine
