"""How often each selection scope makes the same select / not-select decision as the exact global-batch top-k.

On real text (the demo corpus: sympy docstrings = math, Python stdlib docstrings = general), with a small
reference trained on the clean math split and a policy trained briefly on the math + general blend
(both CLM, through ``megatron_slm.training.trainer.Trainer``), the per-token excess losses
``L_policy - L_ref`` of a global batch (default 64 sequences x 256 tokens, micro-batches of 4, DP=4
simulated in one process) are selected with k=0.6 by each scope and compared token by token with
``megatron_slm.slm.top_k_mask`` over the whole global batch:

* ``sequence``            top-k of each sequence on its own;
* ``micro_batch``         micro-batch i of all 4 DP ranks together (DP-gathered, the default scope);
* ``micro_batch_no_dp``   micro-batch i of one rank alone (what micro_batch would be at DP=1);
* ``threshold``           ``megatron_slm.slm.RunningThreshold`` per DP rank (EMA momentum 0.9), warmed on
                          ``--threshold-warm`` earlier global batches so the estimate is not a cold start;
* ``random``              a random k-subset of each sequence's valid tokens (the chance baseline,
                          expected agreement k^2 + (1-k)^2 = 0.52 at k=0.6).

Agreement = identical decisions / valid tokens, averaged over ``--batches`` global batches. Also: overlap =
|selected by scope AND by global| / |selected by global|, selected fraction, and the math share of the
selected tokens.

    .venv/bin/python -m benchmarks.bench_scope_agreement                      # builds a small corpus in a temp dir
    .venv/bin/python -m benchmarks.bench_scope_agreement --data demo_out/data --ref-iters 300 --policy-iters 150
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import emit_json, machine_info, table

SCOPES = ("sequence", "micro_batch", "micro_batch_no_dp", "threshold", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        help="a demo corpus directory (build_demo_corpus output); built there and kept if it has "
        "no corpus.json; default: built in a temporary directory",
    )
    p.add_argument("--max-math-chars", type=int, default=700_000, help="corpus cap when building")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer size when building")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gbs", type=int, default=64, help="sequences per global batch")
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--dp", type=int, default=4, help="simulated data-parallel ranks")
    p.add_argument("--slm-select-ratio", dest="k", type=float, default=0.6, help="k: fraction of the tokens selected")
    p.add_argument("--batches", type=int, default=4, help="global batches measured")
    p.add_argument("--threshold-warm", type=int, default=2, help="global batches the running threshold sees first")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--ref-iters", type=int, default=100, help="reference CLM steps on math_ref_train")
    p.add_argument("--policy-iters", type=int, default=30, help="policy CLM steps on the blend (0 = at init)")
    p.add_argument("--train-gbs", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


class Stream:
    """All documents of an indexed dataset back to back (each ends with EOD); windows of seq+1 tokens."""

    def __init__(self, prefix: Path):
        import numpy as np
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(str(prefix))
        self.tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)

    def windows(self, n: int, seq: int, gen):
        import torch

        starts = torch.randint(0, len(self.tokens) - seq - 1, (n,), generator=gen)
        return torch.stack([torch.from_numpy(self.tokens[s : s + seq + 1]) for s in starts.tolist()])


def micro_batches(seqs, domain, eod: int, mbs: int) -> list[dict]:
    import torch

    inputs, labels = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
    b, s = inputs.shape
    full = dict(
        tokens=inputs,
        labels=labels,
        loss_mask=(labels != eod).float(),
        position_ids=torch.arange(s).expand(b, s).contiguous(),
        domain=domain,
    )
    return [{k: v[i : i + mbs] for k, v in full.items()} for i in range(0, b, mbs)]


def blend_batch(streams, n, seq, gen, math_weight=0.55):
    """n sequences, each from math_train with probability math_weight, else general (domain 1 = math)."""
    import torch

    is_math = torch.rand(n, generator=gen) < math_weight
    math = streams["math_train"].windows(n, seq, gen)
    general = streams["general"].windows(n, seq, gen)
    return torch.where(is_math.unsqueeze(-1), math, general), is_math.long().unsqueeze(-1).expand(n, seq)


def make_trainer(a, vocab: int, seed: int, lr: float):
    from megatron_slm.config import load_config
    from megatron_slm.training.trainer import Trainer

    return Trainer(
        load_config(
            overrides=dict(
                model=dict(
                    preset="tiny",
                    vocab_size=vocab,
                    num_layers=a.layers,
                    hidden_size=a.hidden,
                    ffn_hidden_size=3 * a.hidden,
                    num_attention_heads=4,
                    num_query_groups=2,
                    max_position_embeddings=max(1024, a.seq),
                ),
                slm=dict(loss_mode="clm"),
                train=dict(
                    micro_batch_size=a.mbs,
                    global_batch_size=a.train_gbs,
                    seq_length=a.seq,
                    train_iters=10**6,
                    lr=lr,
                    min_lr=lr / 10,
                    lr_warmup_iters=5,
                    log_interval=10**9,
                    seed=seed,
                    weight_decay=0.1,
                ),
            )
        )
    )


def train(trainer, iters, batch_fn, eod, mbs) -> list[float]:
    losses = []
    for i in range(iters):
        seqs, dom = batch_fn(i)
        m = trainer.train_step(micro_batches(seqs, dom, eod, mbs))
        losses.append(m["loss_all"])
    return losses


def token_losses(trainer, mbs_list, vocab):
    import torch

    from megatron_slm.training.passes import score_pass

    return torch.cat(score_pass(trainer.policy_module, mbs_list, vocab))


def select_all(a, excess, valid, threshold_states):
    """{scope: bool mask [gbs, seq]} for one global batch; threshold_states carry over batches."""
    import torch

    from megatron_slm.slm import top_k_mask

    G, per = excess.shape[0], excess.shape[0] // a.dp
    n_mb = per // a.mbs
    out = {"global": top_k_mask(excess, valid, a.k), "sequence": top_k_mask(excess, valid, a.k, dim=-1)}
    rows = lambda r, i: slice(r * per + i * a.mbs, r * per + (i + 1) * a.mbs)  # noqa: E731
    mb, mb1, thr = (torch.zeros_like(valid) for _ in range(3))
    for i in range(n_mb):
        idx = torch.cat([torch.arange(G)[rows(r, i)] for r in range(a.dp)])  # micro-batch i of every rank
        mb[idx] = top_k_mask(excess[idx], valid[idx], a.k)
        for r in range(a.dp):  # each rank's micro-batches in the order it trains them
            sl = rows(r, i)
            mb1[sl] = top_k_mask(excess[sl], valid[sl], a.k)
            thr[sl] = threshold_states[r](excess[sl], valid[sl])
    out.update(micro_batch=mb, micro_batch_no_dp=mb1, threshold=thr)
    g = torch.Generator().manual_seed(int(excess.numel()))
    out["random"] = top_k_mask(torch.rand(excess.shape, generator=g), valid, a.k, dim=-1)
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    from megatron_slm.slm import RunningThreshold, excess_loss

    torch.set_num_threads(a.threads)
    info = machine_info()
    t_start = time.perf_counter()
    tmp = None
    if a.data:
        data = Path(a.data)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="slm_scope_bench_")
        data = Path(tmp.name)
    if not (data / "corpus.json").exists():
        from megatron_slm.data.demo_corpus import build_demo_corpus

        build_demo_corpus(data, vocab_size=a.vocab_size, max_math_chars=a.max_math_chars)
    import json

    corpus = json.loads((data / "corpus.json").read_text())
    vocab, eod = corpus["vocab_size"], corpus["eod_token_id"]
    streams = {n: Stream(data / n) for n in ("math_ref_train", "math_train", "general")}
    t_data = time.perf_counter() - t_start

    # Reference: CLM on the clean math split. Policy: CLM on the blend, other seed (or at init).
    ref = make_trainer(a, vocab, seed=1, lr=2e-3)
    g_ref = torch.Generator().manual_seed(11)
    ref_losses = train(
        ref,
        a.ref_iters,
        lambda i: (
            streams["math_ref_train"].windows(a.train_gbs, a.seq, g_ref),
            torch.ones(a.train_gbs, a.seq, dtype=torch.long),
        ),
        eod,
        a.mbs,
    )
    policy = make_trainer(a, vocab, seed=2, lr=2e-3)
    g_pol = torch.Generator().manual_seed(12)
    pol_losses = train(policy, a.policy_iters, lambda i: blend_batch(streams, a.train_gbs, a.seq, g_pol), eod, a.mbs)
    t_train = time.perf_counter() - t_start - t_data

    # Measured batches: fresh random windows of the policy's blend (other draws than its training batches; with
    # this small corpus they can overlap text it trained on, which only matters for the losses, not the scopes).
    g_eval = torch.Generator().manual_seed(99)
    thresholds = [RunningThreshold(a.k, a.momentum) for _ in range(a.dp)]
    stats = {s: {"agree": 0, "overlap": 0, "selected": 0, "math_selected": 0} for s in SCOPES + ("global",)}
    n_valid = n_global_sel = 0
    for b in range(a.threshold_warm + a.batches):
        seqs, dom = blend_batch(streams, a.gbs, a.seq, g_eval)
        mbs = micro_batches(seqs, dom, eod, a.mbs)
        excess = excess_loss(token_losses(policy, mbs, vocab), token_losses(ref, mbs, vocab))
        valid = torch.cat([mb["loss_mask"] for mb in mbs]) > 0
        masks = select_all(a, excess, valid, thresholds)
        if b < a.threshold_warm:
            continue
        glob = masks["global"]
        n_valid += int(valid.sum())
        n_global_sel += int(glob.sum())
        for s in SCOPES + ("global",):
            m = masks[s]
            assert not (m & ~valid).any(), f"{s} selected a masked token"
            stats[s]["agree"] += int(((m == glob) & valid).sum())
            stats[s]["overlap"] += int((m & glob).sum())
            stats[s]["selected"] += int(m.sum())
            stats[s]["math_selected"] += int((m & (dom == 1)).sum())

    results = {}
    for s in ("global",) + SCOPES:
        st = stats[s]
        results[s] = {
            "agreement": st["agree"] / n_valid,
            "overlap_with_global": st["overlap"] / max(n_global_sel, 1),
            "selected_fraction": st["selected"] / n_valid,
            "math_share_of_selected": st["math_selected"] / max(st["selected"], 1),
        }
    print(
        f"\nscope agreement with the exact global-batch top-k: k={a.k}, {a.batches} global batches of {a.gbs} x {a.seq} "
        f"tokens, micro-batches of {a.mbs}, DP={a.dp} simulated; reference {a.ref_iters} CLM steps on math "
        f"(loss {ref_losses[0]:.2f} -> {ref_losses[-1]:.2f}), policy {a.policy_iters} CLM steps on the blend"
        + (f" (loss {pol_losses[0]:.2f} -> {pol_losses[-1]:.2f})" if pol_losses else " (at init)")
    )
    rows = [
        [s, r["agreement"], r["overlap_with_global"], r["selected_fraction"], r["math_share_of_selected"]]
        for s, r in results.items()
    ]
    print(table(["scope", "agreement", "overlap", "selected frac", "math share of selected"], rows))
    print(
        f"chance agreement at k={a.k}: {a.k**2 + (1 - a.k) ** 2:.3f}; valid tokens compared: {n_valid}; "
        f"seconds: data {t_data:.0f}, training {t_train:.0f}, total {time.perf_counter() - t_start:.0f}"
    )
    payload = {
        "bench": "scope_agreement",
        "args": vars(a),
        "machine": info,
        "results": results,
        "valid_tokens": n_valid,
        "chance_agreement": a.k**2 + (1 - a.k) ** 2,
        "reference_clm_loss": [ref_losses[0], ref_losses[-1]] if ref_losses else None,
        "policy_clm_loss": [pol_losses[0], pol_losses[-1]] if pol_losses else None,
        "corpus": {k: corpus[k] for k in ("files", "vocab_size", "math_fraction_of_policy_data")},
        "seconds": {"data": t_data, "train": t_train, "total": time.perf_counter() - t_start},
    }
    from megatron_slm.parallel import distributed

    distributed.destroy()
    if tmp is not None:
        tmp.cleanup()
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
