"""Multi-process training steps (gloo, forked ranks) against single-process and plain-torch truths.

- TP=2, PP=2 and TP=2 x PP=2 give the losses, gathered gradients and updated weights of TP=1 PP=1.
- TP=1 PP=1 gradients equal plain autograd of sum(F.cross_entropy * selected) / num_selected, untied and tied
  embeddings (tied also at TP=2 x PP=2).
- The reference is bitwise unchanged, has no gradients, no optimizer state and no DDP buffer.
- Every selection scope equals a plain single-process implementation over gathered scores;
  masked tokens are never selected; k=1.0 equals CLM; global-batch selection is DP-invariant.
"""

import numpy as np
import pytest
import torch
from dist_helpers import run_distributed
from helpers.tiny_training import MBS, SEQ, VOCAB, assert_close_dicts, make_config, my_micro_batches, run_steps


def _scalars(history):
    keys = ("loss_selected", "loss_all", "ref_loss", "excess_selected", "selected_fraction", "grad_norm")
    return [{k: h[k] for k in keys if k in h} for h in history]


# ------------------------------------------------------------------------------------------------
# Layout equivalence


def _layout_worker(tp, pp, tied=False):
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(make_config(tp, pp, tied=tied))
    ref_before = [p.detach().clone() for p in trainer.reference.parameters()]
    manual = _manual_grads(trainer) if tp * pp == 1 else None
    history = run_steps(trainer, 1, 8)
    grads0 = gather_full(trainer.policy_module, use_grad=True)
    history += [trainer.train_step(my_micro_batches(1, 8, trainer.dp_rank, trainer.dp_size))]
    grads = gather_full(trainer.policy_module, use_grad=True)
    params = gather_full(trainer.policy_module)
    ref_ids = {id(p) for p in trainer.reference.parameters()}
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    ddp_ids = {id(p) for buf in trainer.model.buffers for p in buf.params}
    checks = dict(
        ref_unchanged=all(torch.equal(a, b) for a, b in zip(ref_before, trainer.reference.parameters())),
        ref_no_grad=all(not p.requires_grad and p.grad is None for p in trainer.reference.parameters()),
        ref_not_in_optimizer=not (ref_ids & opt_ids) and len(opt_ids) > 0,
        ref_not_in_ddp=not (ref_ids & ddp_ids),
        ref_no_optimizer_state=all(id(p) not in ref_ids for p in _optimizer_state_params(trainer.optimizer)),
    )
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    return dict(scalars=_scalars(history), grads0=grads0, grads=grads, params=params, checks=checks, manual=manual)


def _optimizer_state_params(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    return list(inner.state.keys())


def _manual_grads(trainer):
    """Plain autograd of the SLM loss for step 0 on one process: torch CE, python top-k, sum/num_selected."""
    import torch.nn.functional as F
    from helpers.spec import plain_top_k

    model, ref = trainer.policy_module, trainer.reference
    from megatron_slm.data.batches import to_device

    mbs = to_device(my_micro_batches(0, 8, 0, 1))
    params = [p for p in model.parameters()]
    losses, counts = [], 0
    for mb in mbs:
        logits = model(mb["tokens"], mb["position_ids"], attention_mask=None)[..., :VOCAB]
        with torch.no_grad():
            ref_logits = ref(mb["tokens"], mb["position_ids"], attention_mask=None)[..., :VOCAB]
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), mb["labels"].reshape(-1), reduction="none")
        ref_ce = F.cross_entropy(ref_logits.reshape(-1, VOCAB).float(), mb["labels"].reshape(-1), reduction="none")
        sel = torch.tensor(
            plain_top_k((ce.detach() - ref_ce).tolist(), (mb["loss_mask"] > 0).reshape(-1).tolist(), 0.6),
            device=ce.device,
        )
        losses.append((ce * sel).sum())
        counts += int(sel.sum())
    grads = torch.autograd.grad(sum(losses) / counts, params)
    from megatron_slm.model.build import global_param_name

    return {
        global_param_name(model, n): g[:VOCAB] if "embedding" in n or "output_layer" in n else g
        for (n, _), g in zip(model.named_parameters(), grads)
    }


@pytest.fixture(scope="module")
def layout_results():
    return {
        layout: run_distributed(_layout_worker, layout[0] * layout[1], *layout)[-1]
        for layout in [(1, 1), (2, 1), (1, 2), (2, 2)]
    }


@pytest.mark.parametrize("layout", [(2, 1), (1, 2), (2, 2)])
def test_parallel_layout_matches_single_process(layout_results, layout):
    single, par = layout_results[(1, 1)], layout_results[layout]
    for s, p in zip(single["scalars"], par["scalars"]):
        assert s.keys() == p.keys()
        for k in s:
            assert p[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6), k
    assert_close_dicts(single["grads0"], par["grads0"])
    assert_close_dicts(single["grads"], par["grads"])
    assert_close_dicts(single["params"], par["params"])


def test_single_process_gradient_equals_plain_autograd_of_the_slm_loss(layout_results):
    """Step 0's gradient recomputed with torch cross_entropy, a python top-k and sum / num_selected."""
    res = layout_results[(1, 1)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in res["manual"].values())).item()
    assert res["scalars"][0]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    clip = min(1.0, 1.0 / (norm + 1e-6))  # megatron clips the gradient in place to clip_grad=1.0
    assert_close_dicts({k: g * clip for k, g in res["manual"].items()}, res["grads0"])


def test_tied_embeddings_match_single_process_and_plain_autograd():
    """Tied input/output embeddings: the fused head's weight gradient joins the embedding's (PP=1) or is
    all-reduced with the first stage's copy (PP=2); both equal plain autograd of the SLM loss."""
    single, par = (run_distributed(_layout_worker, tp * pp, tp, pp, True)[-1] for tp, pp in [(1, 1), (2, 2)])
    assert "output_layer.weight" not in single["grads0"] and "embedding.word_embeddings.weight" in single["grads0"]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in single["manual"].values())).item()
    clip = min(1.0, 1.0 / (norm + 1e-6))
    assert_close_dicts({k: g * clip for k, g in single["manual"].items()}, single["grads0"])
    for s, p in zip(single["scalars"], par["scalars"]):
        for k in s:
            assert p[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6), k
    assert_close_dicts(single["grads"], par["grads"])
    assert_close_dicts(single["params"], par["params"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_cuda_training_step_equals_plain_autograd():
    """The CUDA/NCCL path (one rank, in this process): step 0's gradient equals plain autograd, the reference
    stays frozen. Run it alone (-k cuda): later tests fork ranks, which a CUDA-initialised process cannot."""
    from megatron_slm.parallel import distributed

    try:
        res = _layout_worker(1, 1)
    finally:
        distributed.destroy()
    assert all(res["checks"].values()), res["checks"]
    manual = {k: g.cpu() for k, g in res["manual"].items()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in manual.values())).item()
    assert res["scalars"][0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    clip = min(1.0, 1.0 / (norm + 1e-6))
    assert_close_dicts({k: g * clip for k, g in manual.items()}, {k: g.cpu() for k, g in res["grads0"].items()})


def test_reference_is_frozen_and_holds_no_optimizer_state(layout_results):
    for layout, res in layout_results.items():
        assert all(res["checks"].values()), (layout, res["checks"])


# ------------------------------------------------------------------------------------------------
# Selection scopes at PP=2 x DP=2 against plain implementations; k=1.0 against CLM

SCOPES = ("sequence", "micro_batch", "global_batch", "threshold")


def _scopes_worker():
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    out = {}
    for scope in SCOPES:
        trainer = Trainer(make_config(1, 2, selection_scope=scope, threshold_momentum=0.5))
        out[scope] = [h["token_details"] for h in run_steps(trainer, 2, 8)]
    for name, kw in (("k1", dict(slm_select_ratio=1.0)), ("clm", dict(loss_mode="clm"))):
        trainer = Trainer(make_config(1, 2, **kw))
        history = run_steps(trainer, 2, 8)
        out[name] = dict(losses=[h.get("loss_selected") for h in history], params=gather_full(trainer.policy_module))
    out["dp_rank"], out["last_stage"] = trainer.dp_rank, trainer.is_last_stage
    return out


@pytest.fixture(scope="module")
def scope_results():
    ranks = run_distributed(_scopes_worker, 4)
    last = {r["dp_rank"]: r for r in ranks if r["last_stage"]}
    assert sorted(last) == [0, 1]
    return last


def _gathered(scope_results, scope):
    """[step][dp_rank][micro_batch] -> (excess list, valid list, selected list), flattened row-major."""
    steps = []
    for step in range(2):
        per_rank = []
        for r in (0, 1):
            mbs = my_micro_batches(step, 8, r, 2)
            per_rank.append(
                [
                    (
                        (d["token_loss"] - d["ref_loss"]).flatten().tolist(),
                        (mb["loss_mask"] > 0).flatten().tolist(),
                        d["selected"].flatten().tolist(),
                    )
                    for d, mb in zip(scope_results[r][scope][step], mbs)
                ]
            )
        steps.append(per_rank)
    return steps


def _cat(parts):
    return [sum((p[j] for p in parts), []) for j in range(3)]


@pytest.mark.parametrize("scope", SCOPES)
def test_selection_scope_matches_plain_implementation(scope_results, scope):
    from helpers.spec import plain_top_k

    k = 0.6
    thresholds = {0: None, 1: None}
    for per_rank in _gathered(scope_results, scope):
        n_mb = len(per_rank[0])
        for r in (0, 1):
            for _excess, valid, selected in per_rank[r]:
                assert not any(s and not v for s, v in zip(selected, valid)), "a masked token was selected"
        if scope == "sequence":
            for r in (0, 1):
                for excess, valid, selected in per_rank[r]:
                    for row in range(MBS):
                        cut = slice(row * SEQ, (row + 1) * SEQ)
                        assert selected[cut] == plain_top_k(excess[cut], valid[cut], k)
        elif scope == "micro_batch":  # micro-batch i of every DP rank together, in rank order
            for i in range(n_mb):
                excess, valid, selected = _cat([per_rank[0][i], per_rank[1][i]])
                assert selected == plain_top_k(excess, valid, k)
        elif scope == "global_batch":  # everything, ordered by DP rank then micro-batch
            excess, valid, selected = _cat([mb for r in (0, 1) for mb in per_rank[r]])
            assert selected == plain_top_k(excess, valid, k)
        else:  # threshold: each rank's own running estimate, EMA momentum 0.5
            for r in (0, 1):
                for excess, valid, selected in per_rank[r]:
                    q = float(np.quantile(np.array([e for e, v in zip(excess, valid) if v], dtype=np.float32), 1 - k))
                    thr = q if thresholds[r] is None else thresholds[r]
                    thresholds[r] = q if thresholds[r] is None else 0.5 * thresholds[r] + 0.5 * q
                    assert selected == [v and e >= thr for e, v in zip(excess, valid)]


def test_k_one_reproduces_clm_exactly(scope_results):
    for r in (0, 1):
        k1, clm = scope_results[r]["k1"], scope_results[r]["clm"]
        assert k1["losses"] == clm["losses"]
        assert k1["params"].keys() == clm["params"].keys()
        assert all(torch.equal(k1["params"][n], clm["params"][n]) for n in clm["params"])


# ------------------------------------------------------------------------------------------------
# bf16: megatron's Float16Module + mixed-precision optimizer (fp32 master weights) and a bf16 reference


def _bf16_worker(bf16):
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer

    cfg = make_config(2, 1)
    cfg.train.bf16, cfg.reference.dtype = bf16, "bf16" if bf16 else "fp32"
    trainer = Trainer(cfg)
    history = run_steps(trainer, 2, 8)
    dtypes = {p.dtype for p in trainer.policy_module.parameters()} | {p.dtype for p in trainer.reference.parameters()}
    master = {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]}
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    return dict(losses=[h["loss_all"] for h in history], dtypes=dtypes, master=master)


def test_bf16_training_tracks_fp32():
    fp32 = run_distributed(_bf16_worker, 2, False)[-1]
    bf16 = run_distributed(_bf16_worker, 2, True)[-1]
    assert bf16["dtypes"] == {torch.bfloat16} and bf16["master"] == {torch.float32}
    assert fp32["dtypes"] == {torch.float32}
    for a, b in zip(fp32["losses"], bf16["losses"]):
        assert b == pytest.approx(a, rel=1e-2) and b != a
