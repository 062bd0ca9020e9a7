"""Rehearsal of the paper's path: corpus -> slm preprocess -> reference -> score-reference -> offline SLM -> evaluate.

Every stage is the real CLI, run as a subprocess as a user runs it (``.venv/bin/python -m megatron_slm.cli ...``,
one process: the CLI's single-process path, its default threads), timed by wall clock and by the CPU time of the
command's processes. Each stage's measured rate is then carried to the paper's scale, every assumption printed.

Corpus: parquet (row groups of 1,000 rows, as `datasets` and datatrove write them) of ``--tokens`` tokens (20M by
default) of real English-and-code text: the documents bench_preprocess.py builds (sympy and standard-library
docstrings joined into log-normal-length documents; its helpers, imported), tokenized with Mistral-7B v0.1's
sentencepiece model (32,000 pieces) when mistral-common is installed, else a BPE trained here. The last documents
(``--heldout-tokens``) go to a separate parquet file, the held-out set.

Stages (the model: ``--layers`` 2, ``--hidden`` 64, vocabulary 32,000, fp32; batch ``--gbs`` 8 x ``--seq`` 256):

    preprocess   slm preprocess corpus/owm.parquet --workers 2 (then the held-out file: its CPU time is the
                 command's fixed cost, taken off for the per-core rate)
    reference    slm train --loss-mode clm, ``--ref-iters`` steps from random init on the corpus
    score        slm score-reference --ref-load runs/ref --train-iters T: the reference's forward over T x 8 x 256
                 tokens (``--score-tokens``, ~1% of the corpus: all of it at vocabulary 32,000 takes hours on 2
                 cores), then the merge into the sidecar, which spans the whole corpus
    offline SLM  slm train --reference-mode offline, ``--train-iters`` steps (<= T: it reads scored samples only)
    evaluate     slm evaluate --load runs/ref runs/slm on the held-out data (no learnable split: this chain has
                 no base model apart from the reference)

Rates: tokens / wall seconds of the whole command (start-up included); the steady rate the command reports
itself (score-reference's step log; the trainers' metrics.jsonl step times, first 3 steps dropped); tokens per CPU
second of all its processes (less sensitive to other jobs on a shared machine); model GFLOP/s (megatron_slm's
FLOP count of the tiny model at the steady rate).

Extrapolation to TinyLlama-1.1B and Mistral-7B (the shipped launch configs and their layouts) on a 14B-token
corpus at 8/32/64 GPUs: the GPU stages use `slm plan`'s own model (megatron_slm/planning: ``make_plan`` step
times, ``make_scoring_plan`` as ``--scoring-tokens`` prints it: model FLOPs at an assumed MFU of an assumed peak);
preprocessing and the scoring merge run on CPUs and are carried at the rates measured here. The assumptions are
printed under the table.

    .venv/bin/python -m benchmarks.bench_corpus_path                   # ~10 min on 2 cores
    .venv/bin/python -m benchmarks.bench_corpus_path --tokens 2e6 --score-tokens 4e4 --ref-iters 5 --train-iters 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks._common import REPO, emit_json, machine_info, median, table
from benchmarks.bench_preprocess import make_documents, paragraphs, tokenizer_model, write_input

PY = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
CONFIGS = {
    "TinyLlama-1.1B": REPO / "launch/configs/tinyllama1b_owm_slm_k0.6.yaml",
    "Mistral-7B": REPO / "launch/configs/mistral7b_owm_slm_k0.7.yaml",
}
STEP_TOKENS = 1_048_576  # both configs: 2048 x 512 and 4096 x 256
REF_STEPS = 1430  # docs/recipe.md step 4: 3 epochs of 0.5B tokens of curated math
EVAL_CHECKPOINTS, EVAL_DATASETS, EVAL_SAMPLES = 6, 2, 2000  # docs/recipe.md step 8
SPLIT_TRAIN = 0.998  # the configs' --split 998,2,0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=2e7, help="corpus size in tokens (default: 2e7)")
    p.add_argument("--heldout-tokens", type=float, default=2e5, help="held-out set in tokens (default: 2e5)")
    p.add_argument("--workers", type=int, default=2, help="slm preprocess --workers (default: 2)")
    p.add_argument(
        "--score-tokens",
        type=float,
        default=5e5,
        help="tokens slm score-reference scores, a fraction of the corpus whose rate is extrapolated; 0: the "
        "whole training split (default: 5e5)",
    )
    p.add_argument("--ref-iters", type=int, default=30, help="steps of the reference's CLM training (default: 30)")
    p.add_argument("--train-iters", type=int, default=40, help="steps of the offline SLM run (default: 40)")
    p.add_argument("--eval-samples", type=int, default=100, help="slm evaluate --eval-samples (default: 100)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default: 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default: 64)")
    p.add_argument("--ffn", type=int, default=176, help="SwiGLU inner size (default: 176)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--groups", type=int, default=2, help="KV heads (GQA) (default: 2)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default: 256)")
    p.add_argument("--mbs", type=int, default=4, help="micro-batch size (default: 4)")
    p.add_argument("--gbs", type=int, default=8, help="global batch size (default: 8)")
    p.add_argument("--tokenizer", default=None, help="a sentencepiece .model (default: Mistral-7B v0.1's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus (default: 0)")
    # extrapolation
    p.add_argument("--corpus-tokens", type=float, default=14e9, help="corpus to extrapolate to (default: 14e9)")
    p.add_argument("--gpus", default="8,32,64", help="GPU counts to extrapolate to (default: 8,32,64)")
    p.add_argument("--assumed-mfu", type=float, default=0.40, help="MFU assumed on the GPUs (default: 0.40)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak TFLOP/s per GPU (default: 989, H100/H200 dense bf16)"
    )
    p.add_argument(
        "--cores-per-node", type=int, default=32, help="preprocessing workers per node of 8 GPUs (default: 32)"
    )
    p.add_argument(
        "--disk-bandwidth", type=float, default=1.0, help="GB/s of the scoring merge's disk, as slm plan (default: 1)"
    )
    p.add_argument("--dir", default=None, help="working directory, new or empty, kept (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (default: removed at the end)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Running the CLI


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return env


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def slm(name: str, args: list, work: Path, timeout: float = 1800) -> dict:
    """``slm ARGS`` (as ``python -m megatron_slm.cli``) in ``work``; its output in logs/NAME.log. Wall and CPU seconds."""
    cmd = [PY, "-m", "megatron_slm.cli", *args]
    log_path = work / "logs" / f"{name}.log"
    shown = " ".join(["slm", *args])
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown}", flush=True)
    c0, t0 = _cpu_children(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    out = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{name} exited {proc.returncode} ({shown}):\n{out[-4000:]}")
    print(f"           {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return {"command": shown, "wall_s": wall, "cpu_s": cpu, "log": out}


def steady_train_rate(run: Path, tokens_per_step: int, skip: int = 3) -> float:
    """tokens/s over the trainer's own step times (metrics.jsonl), the first ``skip`` steps dropped."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time"] for r in rows if r.get("split") == "train" and r.get("step_time")]
    times = times[skip:] if len(times) > skip + 2 else times
    return tokens_per_step / median(times) if times else float("nan")


# ------------------------------------------------------------------------------------------------
# Extrapolation: slm plan's model


def plan_config(path: Path, world: int, extra: list):
    """The resolved config `slm plan --config PATH --world-size N EXTRA` plans (the CLI's own parser and loader)."""
    from megatron_slm.cli import build_parser
    from megatron_slm.config.loading import load_config

    args = build_parser().parse_args(["plan", "--config", str(path), "--world-size", str(world), *extra])
    return load_config(args.config, args=args)


def extrapolate(a, measured: dict) -> tuple[list, dict, list]:
    from megatron_slm.planning.flops import forward_flops_per_token
    from megatron_slm.planning.plan import make_plan, make_scoring_plan

    N = int(a.corpus_tokens)
    slm_steps = math.floor(SPLIT_TRAIN * N / STEP_TOKENS)
    per_core = measured["preprocess"]["per_core_tokens_per_s"]
    merge_rate = measured["score"].get("merge_corpus_tokens_per_s", float("nan"))
    rows, out = [], {}
    for model, path in CONFIGS.items():
        for gpus in [int(g) for g in a.gpus.split(",")]:
            nodes = max(1, gpus // 8)
            prep_h = N / (per_core * a.cores_per_node * nodes) / 3600
            ref = make_plan(
                plan_config(path, gpus, ["--loss-mode", "clm"]),
                gpus,
                assumed_mfu=a.assumed_mfu,
                peak_tflops=a.peak_tflops,
            )
            cfg_off = plan_config(path, gpus, ["--reference-mode", "offline"])
            off = make_plan(cfg_off, gpus, assumed_mfu=a.assumed_mfu, peak_tflops=a.peak_tflops)
            sc = make_scoring_plan(
                plan_config(path, gpus, []),
                gpus,
                N,
                assumed_mfu=a.assumed_mfu,
                peak_tflops=a.peak_tflops,
                disk_gbps=a.disk_bandwidth,
            )
            ref_h = ref.step_time * REF_STEPS / 3600
            score_h = sc.wall_seconds / 3600
            merge_plan_h = sc.merge_seconds("fp32") / 3600
            merge_meas_h = N / merge_rate / 3600 if merge_rate == merge_rate else float("nan")
            train_h = off.step_time * slm_steps / 3600
            s = cfg_off.train.seq_length
            eval_tokens = EVAL_CHECKPOINTS * EVAL_DATASETS * EVAL_SAMPLES * s
            eval_h = (
                forward_flops_per_token(cfg_off.model, s, cfg_off.parallel.tensor_model_parallel_size)
                * eval_tokens
                / (gpus * a.peak_tflops * 1e12 * a.assumed_mfu)
                / 3600
            )
            merge_h = max(merge_plan_h, merge_meas_h) if merge_meas_h == merge_meas_h else merge_plan_h
            total = prep_h + ref_h + score_h + merge_h + train_h + eval_h
            layout = f"TP={off.tp} PP={off.pp} DP={off.dp}"
            rows.append(
                [model, gpus, layout, prep_h, ref_h, score_h, merge_plan_h, merge_meas_h, train_h, eval_h, total]
            )
            out[f"{model}@{gpus}"] = {
                "layout": layout,
                "preprocess_h": prep_h,
                "reference_clm_h": ref_h,
                "score_forward_h": score_h,
                "score_gpu_hours": sc.gpu_hours,
                "merge_plan_h": merge_plan_h,
                "merge_measured_rate_h": merge_meas_h,
                "offline_slm_h": train_h,
                "offline_slm_step_s": off.step_time,
                "evaluate_h": eval_h,
                "total_h": total,
                "score_flops_per_token": sc.flops_per_token,
                "offline_step_flops": off.step_flops,
                "policy_params": off.policy_total,
            }
    headers = [
        "model",
        "GPUs",
        "layout",
        "preprocess h",
        "reference h",
        "score h",
        "merge h (plan)",
        "merge h (meas. >=)",
        "offline SLM h",
        "evaluate h",
        "total h",
    ]
    assumptions = [
        f"corpus {N:,} tokens; offline SLM = one epoch of the training split: floor({SPLIT_TRAIN} x {N:,} / "
        f"{STEP_TOKENS:,}) = {slm_steps:,} steps (docs/recipe.md); reference CLM = {REF_STEPS:,} steps of "
        f"{STEP_TOKENS:,} tokens (3 epochs of 0.5B curated tokens, recipe step 4)",
        f"GPU stages: slm plan's model (megatron_slm/planning): model FLOPs (2 per multiply-add, matmuls, full s x s "
        f"attention) at an assumed MFU {a.assumed_mfu} of an assumed {a.peak_tflops:g} TFLOP/s per GPU (H100/H200 "
        f"dense bf16); TP/DP communication inside the MFU; layouts of the shipped configs "
        f"(launch/configs/*.yaml), pipeline bubble included",
        "reference: make_plan(--loss-mode clm) step time (policy forward + backward = 3 x forward); "
        "offline SLM: make_plan(--reference-mode offline) (no reference pass); "
        f"score: make_scoring_plan(--scoring-tokens {N:.3g}) (the reference's forward only, 1/3 of forward + backward)",
        f"merge (one process on rank 0, whatever the GPUs; fp32): 'plan' = slm plan's bytes at an assumed "
        f"{a.disk_bandwidth:g} GB/s (its per-part and per-sample Python costs not modelled); 'meas. >=' = {N:,} "
        f"tokens at the corpus tokens per merge second measured here ({merge_rate:,.0f}/s): its flat file and "
        f"sidecar span the whole corpus, but its per-sample loop ran over the scored fraction only, so this "
        f"underestimates (nan: merge below the log's 0.1 s resolution); the total takes the larger",
        f"preprocess: one `slm preprocess --workers {a.cores_per_node}` per node of 8 GPUs (nodes = GPUs / 8) on "
        f"its shard of the corpus, every worker at the per-core rate measured here ({per_core:,.0f} tokens per "
        f"CPU second of all the command's processes, less the fixed cost of a tiny run; Mistral tokenizer, this "
        f"CPU); the main process's cap at many workers (bench_preprocess.py) not included",
        f"evaluate: {EVAL_CHECKPOINTS} checkpoints x {EVAL_DATASETS} held-out datasets x {EVAL_SAMPLES} windows of "
        f"the config's sequence (recipe step 8), forward FLOPs of the policy's shape at the same MFU",
        "not counted: conversion (slm convert), the 3 controls of recipe step 6 (each ~ the CLM/offline SLM time), "
        "checkpoint saves, job queueing and start-up, data loading stalls, failures and requeues",
    ]
    return rows, out, (headers, assumptions)


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    a = parse_args(argv)
    import sentencepiece as spm

    info = machine_info()
    if a.dir and Path(a.dir).exists() and any(Path(a.dir).iterdir()):
        raise SystemExit(f"--dir {a.dir}: not empty (a run there would resume its checkpoints); give a new one")
    work = Path(a.dir).resolve() if a.dir else Path(tempfile.mkdtemp(prefix="bench_corpus_path_"))
    work.mkdir(parents=True, exist_ok=True)
    for d in ("logs", "corpus", "data", "runs", "eval_out"):
        (work / d).mkdir(exist_ok=True)
    t_start = time.perf_counter()
    try:
        # 0. the corpus: parquet, real text
        t0 = time.perf_counter()
        paras = paragraphs(a.seed)
        model, model_name = tokenizer_model(a.tokenizer, paras, work, a.seed)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        chars_per_token = sum(map(len, paras[:300])) / sum(map(len, sp.encode(paras[:300])))
        docs = make_documents(paras, int((a.tokens + a.heldout_tokens) * chars_per_token), a.seed)
        # held-out: the last documents, disjoint from the corpus as documents (the paragraphs they join may recur)
        n_held = 0
        held_chars = 0
        while held_chars < a.heldout_tokens * chars_per_token and n_held < len(docs) - 1:
            n_held += 1
            held_chars += len(docs[-n_held])
        corpus = write_input(docs[:-n_held], work / "corpus" / "owm.parquet", "parquet")
        heldout = write_input(docs[-n_held:], work / "corpus" / "heldout.parquet", "parquet")
        build_s = time.perf_counter() - t0
        print(
            f"corpus: {len(docs) - n_held:,} documents, {sum(map(len, docs[:-n_held])) / 1e6:.1f}M characters, "
            f"parquet {corpus.stat().st_size / 2**20:.1f} MiB; held-out {n_held:,} documents; tokenizer: "
            f"{model_name}; built in {build_s:.0f} s",
            flush=True,
        )

        # 1. preprocess
        pre = slm(
            "preprocess",
            [
                "preprocess",
                str(corpus.relative_to(work)),
                "--output-prefix",
                "data/owm",
                "--tokenizer",
                str(model),
                "--workers",
                str(a.workers),
                "--quiet",
            ],
            work,
        )
        meta = json.loads((work / "data/owm.json").read_text())
        pre_held = slm(
            "preprocess-heldout",
            [
                "preprocess",
                str(heldout.relative_to(work)),
                "--output-prefix",
                "data/heldout",
                "--tokenizer",
                str(model),
                "--workers",
                str(a.workers),
                "--quiet",
            ],
            work,
        )
        held_meta = json.loads((work / "data/heldout.json").read_text())
        vocab = int(meta["vocab_size"])
        n_tokens = int(meta["num_tokens"])
        # per core: tokens per CPU second of all preprocess's processes, less the fixed cost (start-up, imports,
        # the pool) that the run over the small held-out file measures
        pre["per_core_tokens_per_s"] = (n_tokens - held_meta["num_tokens"]) / max(
            pre["cpu_s"] - pre_held["cpu_s"], 1e-9
        )
        pre["per_worker_tokens_per_s"] = (
            (n_tokens - held_meta["num_tokens"]) / max(pre["wall_s"] - pre_held["wall_s"], 1e-9) / a.workers
        )

        # the run config shared by every command (like the recipe's $CFG): the tiny model, fp32, the configs' split
        run_cfg = {
            "model": dict(
                num_layers=a.layers,
                hidden_size=a.hidden,
                ffn_hidden_size=a.ffn,
                num_attention_heads=a.heads,
                num_query_groups=a.groups,
                vocab_size=vocab,
                max_position_embeddings=a.seq,
                untie_embeddings_and_output_weights=True,
            ),
            "reference": {"dtype": "fp32"},
            "slm": {"slm_select_ratio": 0.6, "selection_scope": "micro_batch"},
            "train": dict(
                micro_batch_size=a.mbs,
                global_batch_size=a.gbs,
                seq_length=a.seq,
                lr=3e-3,
                min_lr=3e-4,
                lr_warmup_iters=3,
                bf16=False,
                log_interval=10,
                eval_interval=0,
                eval_iters=2,
            ),
            "data": {"split": "998,2,0"},
            "checkpoint": {"save_interval": 0},
        }
        (work / "run.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
        step_tokens = a.gbs * a.seq
        epoch_iters = math.floor(SPLIT_TRAIN * n_tokens / step_tokens)  # about; score-reference checks it exactly
        score_iters = (
            epoch_iters if a.score_tokens <= 0 else min(epoch_iters, max(1, round(a.score_tokens / step_tokens)))
        )
        train_iters = min(a.train_iters, score_iters)
        ref_iters = a.ref_iters

        from megatron_slm.config.loading import load_config
        from megatron_slm.planning.flops import forward_flops_per_token
        from megatron_slm.planning.plan import model_parameters

        tiny = load_config(str(work / "run.yaml"))
        params = model_parameters(tiny.model, 1, 1)
        fwd_flops = forward_flops_per_token(tiny.model, a.seq)

        # 2. the reference: CLM from random init, briefly
        ref = slm(
            "reference",
            [
                "train",
                "--config",
                "run.yaml",
                "--save",
                "runs/ref",
                "--loss-mode",
                "clm",
                "--data-path",
                "data/owm",
                "--train-iters",
                str(ref_iters),
            ],
            work,
        )
        ref["tokens"] = ref_iters * step_tokens
        ref["steady_tokens_per_s"] = steady_train_rate(work / "runs/ref", step_tokens)

        # 3. scores of (a fraction of) the corpus
        score = slm(
            "score",
            [
                "score-reference",
                "--config",
                "run.yaml",
                "--ref-load",
                "runs/ref",
                "--data-path",
                "data/owm",
                "--train-iters",
                str(score_iters),
            ],
            work,
        )
        score["tokens"] = score_iters * step_tokens
        steps = re.findall(r"\[score\] step\s+\d+/\d+ \| ([\d,]+) tokens/s", score["log"])
        done = re.findall(r"scored in ([\d.]+) s", score["log"])
        score["steady_tokens_per_s"] = float(steps[-1].replace(",", "")) if steps else float("nan")
        if done and steps:  # the merge: after the last step's log line (its rate covers every step)
            score["merge_s"] = float(done[-1]) - score["tokens"] / score["steady_tokens_per_s"]
            score["merge_corpus_tokens_per_s"] = (
                n_tokens / score["merge_s"] if score["merge_s"] >= 0.1 else float("nan")
            )
        sidecar = work / "data/owm_refscores.bin"
        score["sidecar_bytes"] = sidecar.stat().st_size if sidecar.exists() else None

        # 4. offline SLM
        train = slm(
            "offline-slm",
            [
                "train",
                "--config",
                "run.yaml",
                "--save",
                "runs/slm",
                "--reference-mode",
                "offline",
                "--data-path",
                "data/owm",
                "--train-iters",
                str(train_iters),
            ],
            work,
        )
        train["tokens"] = train_iters * step_tokens
        train["steady_tokens_per_s"] = steady_train_rate(work / "runs/slm", step_tokens)
        summary = json.loads((work / "runs/slm/summary.json").read_text())

        # 5. evaluate on the held-out data, split into learnable / not learnable by the reference
        windows = min(a.eval_samples, held_meta["num_tokens"] // (a.seq + 1))
        ev = slm(
            "evaluate",
            [
                "evaluate",
                "--config",
                "run.yaml",
                "--load",
                "runs/ref",
                "runs/slm",
                "--data-path",
                "data/heldout",
                "--eval-samples",
                str(windows),
                "--out",
                "eval_out",
            ],
            work,
        )
        eval_rows = json.loads((work / "eval_out/eval.json").read_text())["results"]
        ev["tokens"] = sum(r["tokens"] for r in eval_rows)

        # the measured table
        pre["tokens"] = n_tokens
        stages = {"preprocess": pre, "reference": ref, "score": score, "offline_slm": train, "evaluate": ev}
        flops_per_token = {"reference": 3 * fwd_flops, "score": fwd_flops, "offline_slm": 3 * fwd_flops}
        flops_per_token["evaluate"] = fwd_flops
        rows = []
        for name, st in stages.items():
            st["tokens_per_s"] = st["tokens"] / st["wall_s"]
            st["tokens_per_cpu_s"] = st["tokens"] / st["cpu_s"] if st["cpu_s"] > 0 else float("nan")
            f = flops_per_token.get(name)
            steady = st.get("steady_tokens_per_s", float("nan"))
            rows.append(
                [
                    name,
                    st["tokens"],
                    st["wall_s"],
                    st["cpu_s"],
                    st["tokens_per_s"],
                    steady,
                    st["tokens_per_cpu_s"],
                    f * (steady if steady == steady else st["tokens_per_s"]) / 1e9 if f else float("nan"),
                ]
            )
        total_s = time.perf_counter() - t_start
        print(
            f"\nmeasured on this machine (load average at start {info['loadavg_at_start']}); model: {a.layers} layers, "
            f"hidden {a.hidden}, FFN {a.ffn}, {a.heads} heads / {a.groups} KV, vocab {vocab:,}: {params / 1e6:.2f}M "
            f"parameters, {fwd_flops / 1e6:.2f} MFLOP per token forward at seq {a.seq}; batch {a.gbs} x {a.seq}, "
            f"fp32; corpus {n_tokens:,} tokens (EOD included) in {meta['num_documents']:,} documents, parquet:"
        )
        print(
            table(
                [
                    "stage",
                    "tokens",
                    "wall s",
                    "CPU s",
                    "tokens/s (wall)",
                    "tokens/s (steady)",
                    "tokens/CPU-s",
                    "model GFLOP/s",
                ],
                rows,
            )
        )
        print(
            f"preprocess: {a.workers} workers, {pre['per_worker_tokens_per_s']:,.0f} tokens/s per worker "
            f"(wall), {pre['per_core_tokens_per_s']:,.0f} per CPU second (both less the held-out run's fixed cost "
            f"{pre_held['wall_s']:.1f} s wall, {pre_held['cpu_s']:.1f} s CPU); "
            f"score: {score['tokens']:,} tokens = {score['tokens'] / n_tokens:.1%} of the corpus "
            f"({score_iters} steps; the whole training split, ~{epoch_iters} steps, would take "
            f"~{epoch_iters * step_tokens / score['tokens_per_s'] / 60:.0f} min at this rate), merge "
            f"{score.get('merge_s', float('nan')):.1f} s (+-0.1: flat file and sidecar over all {n_tokens:,} "
            f"tokens, {score_iters} parts); offline SLM: {train_iters} steps, final loss(sel) {summary['final']['loss_selected']:.3f}, "
            f"selected {summary['final']['selected_fraction']:.3f}; evaluate: 2 checkpoints x {windows} windows"
        )
        for r in eval_rows:
            print(f"  held-out loss of {r['checkpoint']}: {r['loss']:.4f} over {r['tokens']:,} tokens")
        print(f"whole rehearsal: {total_s:.0f} s (corpus build {build_s:.0f} s)")

        ext_rows, ext, (headers, assumptions) = extrapolate(a, {"preprocess": pre, "score": score})
        print(f"\nextrapolated to a {a.corpus_tokens:,.0f}-token corpus, hours per stage (wall clock of the job):")
        print(table(headers, ext_rows))
        print("assumptions:")
        for line in assumptions:
            print(f"  - {line}")

        emit_json(
            {
                "bench": "corpus_path",
                "stages": {k: {kk: vv for kk, vv in v.items() if kk != "log"} for k, v in stages.items()},
                "model": {
                    "layers": a.layers,
                    "hidden": a.hidden,
                    "ffn": a.ffn,
                    "heads": a.heads,
                    "groups": a.groups,
                    "vocab": vocab,
                    "params": params,
                    "forward_flops_per_token": fwd_flops,
                    "seq": a.seq,
                    "gbs": a.gbs,
                },
                "corpus": {
                    "tokens": n_tokens,
                    "documents": meta["num_documents"],
                    "heldout_tokens": held_meta["num_tokens"],
                    "format": "parquet",
                    "tokenizer": model_name,
                },
                "iters": {"reference": ref_iters, "score": score_iters, "offline_slm": train_iters},
                "extrapolation": ext,
                "assumptions": assumptions,
                "total_s": total_s,
                "machine": info,
            }
        )
    finally:
        if a.keep or a.dir:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
