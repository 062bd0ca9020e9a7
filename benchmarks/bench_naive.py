"""Our SLM stack vs a naive single-device SLM: tokens/s and memory, same shapes, same data, same selection.

* ``ours``:  ``megatron_slm.training.trainer.Trainer`` at TP=1 PP=1 in one process, online reference of the
  policy's shape, ``micro_batch`` scope (at DP=1: exact top-k over each micro-batch), k=0.6.
* ``naive``: two ``transformers`` ``LlamaForCausalLM`` models (policy + frozen reference, same config, SDPA
  attention), full logits, ``F.cross_entropy(reduction='none')`` for both, ``torch.topk`` over the
  micro-batch's valid tokens, loss = mean over the selected tokens (divided by the number of
  micro-batches), gradient accumulation over the same micro-batches, grad-norm clipping at 1.0, AdamW.

``--ref-dtype bf16`` gives our reference bf16 weights (the naive one stays fp32); ``--bf16`` runs both in
bf16 compute: ours in megatron-core's mixed precision (bf16 weights, fp32 master copy) with a bf16 reference,
the naive one under ``torch.autocast(bf16)``.

Speed: the two take turns step by step after a warm-up (rotating order); tokens/s from median step times.

Memory, two measures (torch CPU allocations bypass tracemalloc, and the process RSS includes the import
footprint of each framework, so neither alone is fair):

1. Activation memory kept for backward of one micro-batch: bytes of the distinct non-parameter storages
   packed by ``torch.autograd.graph.saved_tensors_hooks`` during the policy's forward + loss. Deterministic
   and load-independent; this is the primary measure.
2. Peak RSS of a training run, each variant in its own fresh subprocess (Linux ``VmHWM``): the absolute
   peak (framework + both models + gradients + optimizer state + activations), the RSS after imports
   (framework footprint), and the transient peak of a step (VmHWM reset with ``/proc/self/clear_refs``
   after a warm-up step, minus the RSS before the step).

Targets: ours >= 1.5x the naive tokens/s, and lower memory.

    .venv/bin/python -m benchmarks.bench_naive                       # 4 layers, hidden 256, vocab 32000, seq 512
    .venv/bin/python -m benchmarks.bench_naive --ref-dtype bf16      # our reference in bf16 (AMX/avx512-bf16 CPUs)
    .venv/bin/python -m benchmarks.bench_naive --layers 8 --hidden 512 --ffn 1408 --heads 8 --mbs 4 --gbs 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks._common import REPO, add_model_args, emit_json, interleaved, machine_info, median, mib, table, verdict

SPEED_TARGET = 1.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, vocab=32000, seq=512, gbs=4)
    p.add_argument("--slm-select-ratio", dest="k", type=float, default=0.6, help="k: fraction of the tokens selected")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument(
        "--ref-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="our reference's dtype (the naive one stays fp32); bf16 is the default on GPU",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 compute for both: ours in megatron's bf16 mixed precision (fp32 master weights) with "
        "a bf16 reference, the naive one under torch.autocast(bf16) (fp32 weights)",
    )
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-child", choices=("ours", "naive"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def batch(a, step: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(500 + step)
    toks = torch.randint(3, a.vocab, (a.gbs, a.seq + 1), generator=g)
    toks[torch.rand(a.gbs, a.seq + 1, generator=g) < 0.02] = 2  # EOD: masked from the loss
    inputs = toks[:, :-1]
    full = dict(
        tokens=inputs,
        labels=toks[:, 1:].contiguous(),
        loss_mask=(inputs != 2).float(),
        position_ids=torch.arange(a.seq).expand(a.gbs, a.seq).contiguous(),
    )
    return [{k: v[i : i + a.mbs].clone() for k, v in full.items()} for i in range(0, a.gbs, a.mbs)]


# ----------------------------------------------------------------------------------------------
# The two implementations


class Ours:
    def __init__(self, a):
        from megatron_slm.config import load_config
        from megatron_slm.training.trainer import Trainer

        cfg = load_config(
            overrides=dict(
                model=dict(
                    preset="tiny",
                    vocab_size=a.vocab,
                    num_layers=a.layers,
                    hidden_size=a.hidden,
                    ffn_hidden_size=a.ffn,
                    num_attention_heads=a.heads,
                    num_query_groups=a.heads,
                    max_position_embeddings=max(1024, a.seq),
                ),
                reference=dict(dtype="bf16" if a.bf16 else a.ref_dtype),
                slm=dict(loss_mode="slm", reference_mode="online", slm_select_ratio=a.k, selection_scope="micro_batch"),
                train=dict(
                    micro_batch_size=a.mbs,
                    global_batch_size=a.gbs,
                    seq_length=a.seq,
                    train_iters=10**6,
                    lr=1e-4,
                    min_lr=1e-5,
                    lr_warmup_iters=0,
                    log_interval=10**9,
                    seed=3,
                    clip_grad=1.0,
                    weight_decay=0.1,
                    bf16=a.bf16,
                ),
            )
        )
        self.trainer = Trainer(cfg)
        from megatron_slm.config import padded_vocab_size

        self.vocab = padded_vocab_size(a.vocab, cfg.model.make_vocab_size_divisible_by, 1)  # logits' width

    def step(self, mbs):
        return self.trainer.train_step(mbs)

    def params(self):
        return list(self.trainer.policy_module.parameters()), list(self.trainer.reference.parameters())

    def saved_bytes(self, mb) -> int:
        from megatron_slm.model.head import output_weight
        from megatron_slm.training.passes import model_forward

        t = self.trainer
        t.prepare_selection([mb])  # reference scores (no autograd)
        with SavedBytes(self.params()[0], self.vocab) as sb:
            hidden = model_forward(t.model, mb)
            loss_sum, _, _ = t.loss(mb, output_weight(t.model), hidden)
        loss_sum.backward()
        t.model.zero_grad_buffer()
        return sb.total, sb.head


class Naive:
    def __init__(self, a):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=a.ffn,
            num_hidden_layers=a.layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.heads,
            max_position_embeddings=max(1024, a.seq),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            use_cache=False,
            attention_dropout=0.0,
        )
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(3)
        self.policy = LlamaForCausalLM(cfg).train()
        self.ref = LlamaForCausalLM(cfg).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        self.k, self.V, self.bf16 = a.k, a.vocab, a.bf16

    def micro_loss(self, mb, n_micro: int):
        import torch
        import torch.nn.functional as F

        labels = mb["labels"].reshape(-1)
        valid = mb["loss_mask"].reshape(-1) > 0
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)
        with torch.no_grad(), autocast:
            ref_logits = self.ref(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        ref_ce = F.cross_entropy(ref_logits.reshape(-1, self.V).float(), labels, reduction="none")
        with autocast:
            logits = self.policy(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        ce = F.cross_entropy(logits.reshape(-1, self.V).float(), labels, reduction="none")
        excess = torch.where(valid, ce.detach() - ref_ce, float("-inf"))
        n_sel = max(1, int(round(self.k * int(valid.sum()))))
        idx = torch.topk(excess, n_sel).indices
        return ce[idx].mean() / n_micro

    def step(self, mbs):
        import torch

        self.opt.zero_grad(set_to_none=True)
        for mb in mbs:
            self.micro_loss(mb, len(mbs)).backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()

    def params(self):
        return list(self.policy.parameters()), list(self.ref.parameters())

    def saved_bytes(self, mb) -> int:
        with SavedBytes(self.params()[0], self.V) as sb:
            loss = self.micro_loss(mb, 1)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return sb.total, sb.head


class SavedBytes:
    """Bytes of the distinct storages saved for backward inside the block, parameters excluded."""

    def __init__(self, params, vocab: int | None = None):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}  # data_ptr -> (bytes, is a vocab-wide tensor: the loss head's share)
        self.vocab = vocab

    def __enter__(self):
        import torch

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in self.param_ptrs:
                head = self.vocab is not None and t.dim() > 0 and t.shape[-1] == self.vocab
                self.storages[s.data_ptr()] = (s.nbytes(), head or self.storages.get(s.data_ptr(), (0, False))[1])
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(b for b, _ in self.storages.values())

    @property
    def head(self) -> int:
        """Saved bytes of vocab-wide tensors (logits rows, log-probabilities): the loss head's share."""
        return sum(b for b, h in self.storages.values() if h)


def build(which, a):
    return Ours(a) if which == "ours" else Naive(a)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss_child(a) -> None:
    """One variant in a fresh process: RSS after imports, absolute peak, and the transient peak of a step."""
    import torch

    torch.set_num_threads(a.threads)
    if a.rss_child == "ours":
        import megatron.core  # noqa: F401

        import megatron_slm.training.trainer  # noqa: F401
    else:
        import transformers  # noqa: F401
    rss_imports = _status_kib("VmRSS")
    impl = build(a.rss_child, a)
    rss_built = _status_kib("VmRSS")
    impl.step(batch(a, 0))  # allocates gradients and optimizer state
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    impl.step(batch(a, 1))
    hwm_step = _status_kib("VmHWM")
    out = {
        "rss_after_imports": rss_imports * 1024,
        "rss_after_build": rss_built * 1024,
        "rss_before_step": rss_before * 1024,
        "step_peak_increase": (hwm_step - rss_before) * 1024,
        "peak_rss_step": hwm_step * 1024,
    }
    print("RSS_JSON " + json.dumps(out), flush=True)


FLAG_OF = {"k": "slm-select-ratio"}  # dests whose flag has another name (add_model_args)


def run_rss(a, which) -> dict:
    cmd = (
        [sys.executable, "-m", "benchmarks.bench_naive", "--rss-child", which]
        + [
            f"--{FLAG_OF.get(k, k.replace('_', '-'))}={getattr(a, k)}"
            for k in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "mbs", "gbs", "k", "threads", "ref_dtype")
        ]
        + (["--bf16"] if a.bf16 else [])
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(a.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set in this process by distributed.initialize; the child picks its own port
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RSS_JSON "):
            return json.loads(line[len("RSS_JSON ") :])
    raise RuntimeError(f"RSS subprocess for {which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if a.rss_child:
        rss_child(a)
        return None
    import torch

    torch.set_num_threads(a.threads)
    info = machine_info()
    t_start = time.perf_counter()
    impls = {w: build(w, a) for w in ("ours", "naive")}
    n_params = {w: sum(p.numel() for p in impls[w].params()[0]) for w in impls}
    saved, saved_head = {}, {}
    for w in impls:
        saved[w], saved_head[w] = impls[w].saved_bytes(batch(a, 0)[0])

    def timed(w, step):
        mbs = batch(a, step)
        c0, t0 = time.process_time(), time.perf_counter()
        impls[w].step(mbs)  # noqa: F821 - deleted only after the timing loop
        return time.perf_counter() - t0, time.process_time() - c0

    names = ["ours", "naive"]
    samples = interleaved(names, timed, a.warmup, a.reps)
    times = {w: [t for t, _ in samples[w]] for w in names}
    cpus = {w: [c for _, c in samples[w]] for w in names}
    del impls
    from megatron_slm.parallel import distributed

    distributed.destroy()
    rss = {} if a.no_rss else {w: run_rss(a, w) for w in names}

    tokens = a.gbs * a.seq
    med = {w: median(times[w]) for w in names}
    cpu = {w: median(cpus[w]) for w in names}
    tps = {w: tokens / med[w] for w in names}
    speedup = tps["ours"] / tps["naive"]
    paired = median([n / o for o, n in zip(times["ours"], times["naive"])])
    cpu_speedup = cpu["naive"] / cpu["ours"]
    print(
        f"\nours vs naive: layers={a.layers} hidden={a.hidden} ffn={a.ffn} heads={a.heads} vocab={a.vocab} seq={a.seq} "
        f"mbs={a.mbs} gbs={a.gbs} k={a.k} | {'bf16 compute (ours: megatron mixed precision, naive: autocast)' if a.bf16 else 'fp32, our reference ' + a.ref_dtype} | threads={a.threads} | warmup={a.warmup} reps={a.reps} interleaved, medians"
    )
    rows = []
    for w in names:
        r = rss.get(w, {})
        rows.append(
            [
                w,
                n_params[w] / 1e6,
                med[w],
                tps[w],
                cpu[w],
                mib(saved[w]),
                mib(saved_head[w]),
                mib(r.get("step_peak_increase", float("nan"))),
                mib(r.get("peak_rss_step", float("nan"))),
                mib(r.get("rss_after_imports", float("nan"))),
            ]
        )
    print(
        table(
            [
                "impl",
                "policy M params",
                "step s",
                "tokens/s",
                "CPU s",
                "saved/mb MiB",
                "loss head MiB",
                "step peak+ MiB",
                "peak RSS MiB",
                "RSS imports MiB",
            ],
            rows,
        )
    )
    mem_ratio = saved["ours"] / saved["naive"]
    mem_ok = mem_ratio < 1.0
    head_ratio = saved_head["ours"] / saved_head["naive"]
    targets = {
        "speedup": {
            "value": speedup,
            "paired_value": paired,
            "cpu_time_value": cpu_speedup,
            "target_min": SPEED_TARGET,
            "met": speedup >= SPEED_TARGET,
        },
        "saved_bytes_ours_over_naive": {"value": mem_ratio, "target_max": 1.0, "met": mem_ok},
        "saved_bytes_loss_head_ours_over_naive": {"value": head_ratio, "target_max": 1.0, "met": head_ratio < 1.0},
    }
    if rss:
        step_ratio = rss["ours"]["step_peak_increase"] / rss["naive"]["step_peak_increase"]
        abs_ratio = rss["ours"]["peak_rss_step"] / rss["naive"]["peak_rss_step"]
        net = [(rss[w]["peak_rss_step"] - rss[w]["rss_after_imports"]) for w in names]
        targets["step_peak_rss_increase_ours_over_naive"] = {
            "value": step_ratio,
            "target_max": 1.0,
            "met": step_ratio < 1.0,
        }
        targets["peak_rss_ours_over_naive"] = {"value": abs_ratio, "target_max": 1.0, "met": abs_ratio < 1.0}
        targets["peak_rss_minus_imports_ours_over_naive"] = {
            "value": net[0] / net[1],
            "target_max": 1.0,
            "met": net[0] < net[1],
        }
    print(
        f"target tokens/s ours/naive >= {SPEED_TARGET}: {speedup:.3f} (paired {paired:.3f}, CPU time {cpu_speedup:.3f})"
        f" -> {verdict(speedup >= SPEED_TARGET)}"
    )
    print(
        f"target lower memory: saved-for-backward per micro-batch ours/naive {mem_ratio:.3f} -> {verdict(mem_ok)} "
        f"(loss head only: {head_ratio:.3f}; the rest is the transformer body)"
    )
    for key in (
        "step_peak_rss_increase_ours_over_naive",
        "peak_rss_ours_over_naive",
        "peak_rss_minus_imports_ours_over_naive",
    ):
        if key in targets:
            print(f"  {key}: {targets[key]['value']:.3f} -> {verdict(targets[key]['met'])}")
    payload = {
        "bench": "naive",
        "args": vars(a),
        "machine": info,
        "median_step_s": med,
        "median_cpu_s": cpu,
        "tokens_per_s": tps,
        "saved_bytes_per_microbatch": saved,
        "saved_bytes_loss_head_per_microbatch": saved_head,
        "rss": rss,
        "policy_params": n_params,
        "targets": targets,
        "all_step_s": {w: [round(x, 4) for x in times[w]] for w in names},
        "wall_s": time.perf_counter() - t_start,
    }
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
