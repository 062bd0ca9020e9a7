"""Issue 19 case 14: a model whose weights are loaded next is built without any random draw (a 7B policy and
reference drew every full tensor on every rank at each start), with the same parameters and tensor-parallel
attributes, and a run from a pretrained checkpoint with a loaded reference ends up with exactly the loaded weights."""

from __future__ import annotations

from dist_helpers import run_distributed
from helpers.tiny_training import make_config


def _worker(tmp: str) -> dict:
    import torch

    from megatron_slm.checkpoint import save_model_weights
    from megatron_slm.model import build
    from megatron_slm.parallel import distributed

    cfg = make_config(2, 1)  # TP=2
    distributed.initialize(2, 1, seed=1)
    drawn = build.build_model(cfg.model, cfg.parallel, seed=5)
    blank = build.build_model(cfg.model, cfg.parallel, seed=5, initialize=False)
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride")
    out = {
        "same_params": [(n, p.shape, tuple(getattr(p, a, None) for a in attrs)) for n, p in drawn.named_parameters()]
        == [(n, p.shape, tuple(getattr(p, a, None) for a in attrs)) for n, p in blank.named_parameters()],
        "blank_values": sorted({float(v) for p in blank.parameters() for v in p.detach().unique()}),
    }
    policy_dir, ref_dir = f"{tmp}/policy", f"{tmp}/reference"
    save_model_weights(drawn, policy_dir, cfg.model)
    reference = build.build_model(cfg.reference.model, cfg.parallel, seed=6)
    save_model_weights(reference, ref_dir, cfg.reference.model)

    calls = []
    real = build.layout_invariant_init
    build.layout_invariant_init = lambda *a, **k: calls.append(1) or real(*a, **k)
    real_randn, real_normal = torch.randn, torch.Tensor.normal_
    draws = []
    torch.randn = lambda *a, **k: draws.append("randn") or real_randn(*a, **k)
    torch.Tensor.normal_ = lambda self, *a, **k: draws.append("normal_") or real_normal(self, *a, **k)
    try:
        from megatron_slm.training.trainer import Trainer

        cfg.checkpoint.pretrained_checkpoint, cfg.reference.load = policy_dir, ref_dir
        trainer = Trainer(cfg)
    finally:
        build.layout_invariant_init, torch.randn, torch.Tensor.normal_ = real, real_randn, real_normal
    out["init_calls"], out["draws"] = len(calls), len(draws)

    def same(a, b):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k].to(pa[k].dtype)) for k in pa)

    out["policy_loaded"] = same(drawn, trainer.policy_module)
    out["reference_loaded"] = same(reference, trainer.reference)
    return out


def test_loaded_models_are_built_without_a_random_draw(tmp_path):
    for out in run_distributed(_worker, 2, str(tmp_path), timeout=150):
        assert out["same_params"]  # names, shapes and TP attributes as an initialised build
        assert set(out["blank_values"]) <= {0.0, 1.0}  # zeros, and the norms' ones: nothing drawn
        assert out["init_calls"] == 0 and out["draws"] == 0
        assert out["policy_loaded"] and out["reference_loaded"]
