"""A tiny policy/reference pair and its random global batches, shared by the multi-rank training tests:
every layout (TP, PP, DP, interleaved, distributed optimizer, DeepSpeed) trains this config on these batches."""

from __future__ import annotations

import torch

from megatron_slm.config import load_config

VOCAB, EOD, SEQ, MBS = 96, 0, 16, 2  # vocab 96 pads to 128: padded logits must be ignored


def make_config(tp=1, pp=1, gbs=8, tied=False, **slm):
    return load_config(
        overrides=dict(
            model=dict(
                preset="tiny",
                vocab_size=VOCAB,
                num_layers=4,
                hidden_size=32,
                ffn_hidden_size=64,
                num_attention_heads=4,
                num_query_groups=2,
                untie_embeddings_and_output_weights=not tied,
            ),
            reference=dict(model=dict(num_layers=2, hidden_size=48, ffn_hidden_size=96), dtype="fp32"),  # another shape
            parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
            slm=dict(dict(slm_select_ratio=0.6, selection_scope="micro_batch"), **slm),
            # adam_eps well above round-off: Adam's first step is lr * sign(g) for |g| << eps, which would turn
            # 1e-9 reduction-order noise in near-zero gradients into lr-sized weight differences between layouts.
            train=dict(
                micro_batch_size=MBS,
                global_batch_size=gbs,
                seq_length=SEQ,
                train_iters=10,
                lr=1e-2,
                lr_warmup_iters=0,
                log_interval=1000,
                seed=11,
                adam_eps=1e-4,
                clip_grad=1.0,
                bf16=False,
            ),
        )
    )


def global_batch(step, gbs):
    g = torch.Generator().manual_seed(1000 + step)
    toks = torch.randint(1, VOCAB, (gbs, SEQ + 1), generator=g)
    toks[torch.rand(gbs, SEQ + 1, generator=g) < 0.08] = EOD
    inputs = toks[:, :-1]
    return dict(
        tokens=inputs,
        labels=toks[:, 1:],
        loss_mask=(inputs != EOD).float(),
        position_ids=torch.arange(SEQ).expand(gbs, SEQ),
    )


def my_micro_batches(step, gbs, dp_rank, dp_size):
    b = global_batch(step, gbs)
    per = gbs // dp_size
    part = {k: v[dp_rank * per : (dp_rank + 1) * per] for k, v in b.items()}
    return [{k: v[i : i + MBS].clone() for k, v in part.items()} for i in range(0, per, MBS)]


def run_steps(trainer, steps, gbs):
    history = []
    for step in range(steps):
        m = trainer.train_step(my_micro_batches(step, gbs, trainer.dp_rank, trainer.dp_size))
        history.append(m)
    return history


def assert_close_dicts(a, b, rtol=1e-4):
    """fp32, different reduction orders: elementwise within 1e-4 of each tensor's largest entry."""
    assert a.keys() == b.keys()
    for k in a:
        atol = rtol * float(a[k].abs().max()) + 1e-8
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def tiny_clm_flags(data_dir) -> list[str]:
    """``slm train`` flags of a tiny CLM run on ``helpers.data.tiny_text_dataset``'s ``train`` (2 layers, hidden 32,
    4 sequences of 16 tokens per step, a log line every step); callers add --save, --train-iters and the rest."""
    flags = "--preset tiny --num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --micro-batch-size 2"
    flags += " --global-batch-size 4 --seq-length 16 --loss-mode clm --split 99,1,0 --log-interval 1"
    return flags.split() + ["--data-path", str(data_dir / "train")]
