"""docs/recipe.md step by step at tiny size on CPU; its commands and the README's 7B quick path, parsed.

Every step runs as a subprocess with the subcommand and flags docs/recipe.md shows for it; only the sizes differ
(and what a CPU needs). Stand-ins:

- TinyLlama-1.1B -> a transformers ``LlamaForCausalLM`` (2 layers, hidden 64, GQA 4/2 heads, untied, vocab 384)
  saved with a sentencepiece BPE tokenizer trained here (``tokenizer.model`` in the directory, as in the hub's
  TinyLlama and Mistral directories);
- the OWM-like corpus -> JSONL files (one ``{"text": ...}`` per line) of synthetic math (``owm``), general text
  (``general``), curated math for the reference (``math_curated``) and held-out math / general text;
- launch/configs/tinyllama1b_owm_slm_k0.6.yaml -> the same YAML with the preset's shape replaced by the stand-in's,
  the batch, sequence length and learning rate shrunk, bf16 off (CPU);
- sbatch launch/slurm_train.sbatch -> ``slm train`` with the same --config/--save/EXTRA_ARGS (the SLM run goes
  through launch/train_single_node.sh, the same environment interface, as 2 processes under torchrun).

Steps (docs/recipe.md's numbering), two at a time where they do not depend on each other (2 cores): 1 slm convert
hf-to-megatron --verify; 2 slm preprocess with the base's tokenizer; 3 slm plan of the real launch config,
check-config of the SLM run; 4 the reference = CLM from the base on the curated math; 5 slm score-reference; 6 SLM
(k = 0.6, offline scores), the random-k and CLM controls, slm reweight -> CLM on the printed blend; 7 slm convert
megatron-to-hf with --hf-config and --tokenizer-model; 8 slm evaluate of every checkpoint (and the export) on
held-out math and general text, split into learnable / not learnable tokens.

Asserted: every command exits 0 and its outputs exist; losses are finite; SLM and random select 60%; the
reweighted blend sums to 1 and is w_i f_i / sum_j w_j f_j of the SLM run; the export loads in transformers with a
tokenizer that encodes like the data's and evaluates to the SLM checkpoint's loss; the reference beats the base on
held-out math; evaluate has a row per checkpoint and dataset, paired (same tokens per dataset).

``test_recipe_commands_parse`` runs docs/recipe.md's bash blocks as written (TinyLlama's values, then Mistral-7B's
from the comments) with stand-ins for .venv/bin/{python,slm,torchrun} and sbatch that record their arguments, and
parses every command with the tool's own parser: each is an ``slm`` subcommand (directly, under torchrun or sbatch)
and takes the flags shown; the train, check-config, plan and score-reference commands (and the table's alternative
layouts) also pass the config validation at the shown world size, and the runs on the OWM data read at most one
epoch of the 14B-token corpus's training split (the recipe's "How many steps").
``test_readme_quick_path_commands_parse`` does the same for the README's "7B quick path" block.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
LAUNCH_CONFIG = ROOT / "launch/configs/tinyllama1b_owm_slm_k0.6.yaml"
VOCAB, SEQ, MBS, GBS = 384, 32, 2, 8
REF_ITERS, ITERS = 12, 10  # docs/recipe.md: 1430 and 13324
M = "tl"
BASE = "hf/TinyLlama-1.1B"
DATA = ["0.9", f"data/{M}/owm", "0.1", f"data/{M}/general"]
DATASETS = ("owm", "general", "math_curated", "math_heldout", "general_heldout")


# ------------------------------------------------------------------------------------------------
# Tiny stand-ins


def _documents(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def math_doc():
        a, b = (int(v) for v in rng.integers(2, 40, size=2))
        parts = [
            f"Let $x = {a}$ and $y = {b}$. Then $x + y = {a + b}$ and $xy = {a * b}$.",
            f"The derivative of $x^{a}$ is ${a} x^{{{a - 1}}}$.",
            f"If ${a} \\mid n$ and ${b} \\mid n$ then $\\operatorname{{lcm}}({a}, {b}) \\mid n$.",
            f"Solving ${a}x + {b} = 0$ gives $x = -{b}/{a}$.",
            "Proof. By induction on $n$, the sum of the first $n$ odd numbers is $n^2$.",
            f"Theorem. Every integer $n > 1$ has a prime factor; for $n = {a * b}$ take ${min(a, b)}$'s.",
        ]
        return " ".join(rng.choice(parts, size=int(rng.integers(2, 6))))

    words = "the city river market people walked morning news weather music garden friends story house road".split()

    def general_doc():
        return " ".join(rng.choice(words, size=int(rng.integers(10, 50)))).capitalize() + "."

    return {
        "owm": [math_doc() for _ in range(400)],
        "general": [general_doc() for _ in range(300)],
        "math_curated": [math_doc() for _ in range(300)],
        "math_heldout": [math_doc() for _ in range(40)],
        "general_heldout": [general_doc() for _ in range(40)],
    }


def _make_inputs(work: Path) -> dict:
    """corpus/<name>/part-0.jsonl, the base HF directory with its tokenizer, and the tiny run config."""
    import torch

    from megatron_slm.data.demo_corpus import train_tokenizer

    docs = _documents()
    for name, texts in docs.items():
        (work / "corpus" / name).mkdir(parents=True)
        (work / "corpus" / name / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    base = work / BASE
    train_tokenizer(docs["owm"] + docs["general"] + docs["math_curated"], base / "tokenizer.model", VOCAB, 0)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(base))

    run = yaml.safe_load(LAUNCH_CONFIG.read_text())
    assert run["model"] == {"preset": "tinyllama-1.1b"} and run["reference"]["model"] == {"preset": "tinyllama-1.1b"}
    # the preset's shape, shrunk to the stand-in's (the reference takes the policy's: same model)
    run["model"] = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        untie_embeddings_and_output_weights=True,
    )
    run["reference"]["model"] = {}
    run["reference"]["dtype"] = "auto"  # fp32 on CPU
    run["train"].update(
        micro_batch_size=MBS,
        global_batch_size=GBS,
        seq_length=SEQ,
        train_iters=ITERS,
        lr=2e-3,
        min_lr=2e-4,
        lr_warmup_iters=2,
        bf16=False,
        log_interval=5,
        eval_interval=0,
        eval_iters=2,
    )
    run["checkpoint"].update(save_interval=0)
    (work / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    return docs


# ------------------------------------------------------------------------------------------------
# Running docs/recipe.md's commands


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return env


def _start(name: str, args: list, work: Path, env: dict | None = None) -> tuple:
    """Start one command (a Python script/module unless it starts with bash); its output goes to logs/NAME.log."""
    cmd = args if args[0] == "bash" else [PY, *args]
    log = open(work / "logs" / f"{name}.log", "w")
    proc = subprocess.Popen(
        cmd, cwd=work, env=env or _env(), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group: _kill ends torchrun's workers too
    log.close()
    return name, proc, time.monotonic()


def _kill(job: tuple) -> None:
    try:
        os.killpg(job[1].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job[1].wait()


def _wait(job: tuple, work: Path, timeout: float = 300) -> str:
    name, proc, started = job
    try:
        proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(job)
        raise AssertionError(f"{name}: still running after {timeout} s\n{_log(work, name)}") from None
    out = _log(work, name)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out}"
    return out


def _log(work: Path, name: str) -> str:
    return (work / "logs" / f"{name}.log").read_text(errors="replace")


def _run(name: str, args: list, work: Path) -> str:
    return _wait(_start(name, args, work), work)


def _together(jobs: dict, work: Path, width: int = 2) -> dict:
    """Run {name: argv} at most ``width`` at a time (2 cores), the next as soon as one ends; {name: output}."""
    pending, running, outputs = list(jobs.items()), [], {}
    try:
        while pending or running:
            while pending and len(running) < width:
                running.append(_start(*pending.pop(0), work))
            done = [job for job in running if job[1].poll() is not None]
            if not done:
                assert all(time.monotonic() - job[2] < 300 for job in running), f"still running: {running}"
                time.sleep(0.05)
                continue
            for job in done:
                running.remove(job)
                outputs[job[0]] = _wait(job, work)
    finally:
        for job in running:
            _kill(job)
    return outputs


def _slm(*args) -> list:  # `.venv/bin/slm ARGS` in docs/recipe.md
    return ["-m", "megatron_slm.cli", *args]


def _train(save: str, extra: list) -> list:  # sbatch's `slm train --config $CONFIG --save $SAVE_DIR $EXTRA_ARGS`
    return _slm("train", "--config", "run.yaml", "--save", save, *extra)


def _summary(work: Path, run: str, mode: str, iters: int) -> dict:
    s = json.loads((work / run / "summary.json").read_text())
    assert s["loss_mode"] == mode and s["iterations"] == iters, s
    assert s["stopped_by"] is None and not s["nonfinite_steps"], s
    final = s["final"]
    assert all(math.isfinite(final[k]) for k in ("loss_selected", "loss_all", "grad_norm")), final
    assert math.isfinite(s["eval_loss"]), s
    assert (work / run / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    return s


# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    t0 = time.monotonic()
    work = tmp_path
    for d in ("logs", "ckpt", f"data/{M}", "runs", "hf_out", "eval_out"):
        (work / d).mkdir(parents=True, exist_ok=True)
    docs = _make_inputs(work)
    tok = f"{BASE}/tokenizer.model"
    fingerprint = hashlib.sha256((work / tok).read_bytes()).hexdigest()

    def lap(what):  # wall time so far and the CPU time of the commands so far (run with -s to see)
        import resource

        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"[{time.monotonic() - t0:5.1f} s, commands' CPU {cpu.ru_utime + cpu.ru_stime:5.1f} s] {what}")

    # 3 (slm plan of the real launch config) + 1 (convert the base) + 2 (tokenize with the base's tokenizer)
    jobs = {
        "plan": _slm("plan", "--config", str(LAUNCH_CONFIG), "--world-size", "8"),
        "convert": _slm("convert", "hf-to-megatron", "--input", BASE, "--output", f"ckpt/{M}-base", "--verify"),
    }
    for name in DATASETS:
        jobs[f"preprocess-{name}"] = _slm(
            "preprocess",
            f"corpus/{name}/",
            "--output-prefix",
            f"data/{M}/{name}",
            "--tokenizer",
            tok,
            "--workers",
            "1",
        )
    out = _together(jobs, work)
    lap("plan, convert, preprocess")
    assert "FITS: TP=1 x PP=1 x DP=8" in out["plan"], out["plan"]
    diff = [ln for ln in out["convert"].splitlines() if "max abs logit difference" in ln]
    assert diff and float(diff[0].split("=")[1].split()[0]) < 1e-4, out["convert"]
    assert (work / f"ckpt/{M}-base/slm_model.json").is_file()
    for name in DATASETS:
        meta = json.loads((work / f"data/{M}/{name}.json").read_text())
        assert meta["num_documents"] == len(docs[name]) and meta["vocab_size"] == VOCAB, meta
        assert meta["tokenizer_fingerprint"] == fingerprint and (work / f"data/{M}/{name}.bin").stat().st_size > 0

    # 4: the reference = the base continually trained with CLM on the curated math; alongside it control 1 of
    # step 6, CLM on the SLM runs' data (it needs no reference)
    ref_args = [
        "--loss-mode",
        "clm",
        "--pretrained-checkpoint",
        f"ckpt/{M}-base",
        "--data-path",
        f"data/{M}/math_curated",
        "--train-iters",
        str(REF_ITERS),
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
    ]
    run_args = ["--pretrained-checkpoint", f"ckpt/{M}-base", "--data-path", *DATA, "--train-iters", str(ITERS)]
    _together(
        {
            "reference": _train(f"runs/{M}-ref", ref_args),
            "clm": _train(f"runs/{M}-clm", run_args + ["--loss-mode", "clm"]),
        },
        work,
    )
    lap("reference, CLM control")
    _summary(work, f"runs/{M}-ref", "clm", REF_ITERS)
    _summary(work, f"runs/{M}-clm", "clm", ITERS)

    # 5: offline reference scores for the SLM runs' data (same config, data flags and --train-iters); alongside,
    # 3: check-config of the SLM run (world size 2 as below)
    _together(
        {
            "score-reference": _slm(
                "score-reference",
                "--config",
                "run.yaml",
                "--ref-load",
                f"runs/{M}-ref",
                "--data-path",
                *DATA,
                "--train-iters",
                str(ITERS),
            ),
            "check-config": _slm(
                "check-config",
                "--config",
                "run.yaml",
                "--world-size",
                "2",
                "--pretrained-checkpoint",
                f"ckpt/{M}-base",
                "--ref-load",
                f"runs/{M}-ref",
                "--data-path",
                *DATA,
            ),
        },
        work,
    )
    lap("score-reference, check-config")
    for name in ("owm", "general"):
        assert json.loads((work / f"data/{M}/{name}_refscores.json").read_text())
        assert (work / f"data/{M}/{name}_refscores.bin").stat().st_size > 0

    # 6: SLM at k = 0.6 from the base with the offline scores, through the single-node launcher (the sbatch
    # script's CONFIG / SAVE_DIR / EXTRA_ARGS interface) as 2 processes
    slm_ref = ["--reference-mode", "offline"]
    env = dict(
        _env(),
        CONFIG="run.yaml",
        SAVE_DIR=f"runs/{M}-slm",
        EXTRA_ARGS=" ".join(run_args + slm_ref),
        GPUS_PER_NODE="2",
        LOG_DIR=str(work / "logs/slm-launcher"),
        PYTHON=PY,
    )
    env.pop("OMP_NUM_THREADS")  # the launcher sets it (cores / processes)
    _wait(_start("slm", ["bash", str(ROOT / "launch/train_single_node.sh")], work, env), work)
    lap("SLM")
    slm = _summary(work, f"runs/{M}-slm", "slm", ITERS)
    assert slm["k"] == 0.6 and slm["parallel"]["dp"] == 2 and slm["data_path"] == DATA, slm
    assert abs(slm["final"]["selected_fraction"] - 0.6) < 0.02 and math.isfinite(slm["final"]["ref_loss"]), slm
    fractions = slm["selected_fraction_by_dataset"]
    assert len(fractions) == 2 and all(0 < f <= 1 for f in fractions), slm

    # slm reweight: the CLM blend with the SLM run's token mix (the recipe takes its first line with `sed -n 1p`)
    printed = _run("reweight", _slm("reweight", "--run", f"runs/{M}-slm"), work).splitlines()
    blend = printed[0].split()
    assert blend[0] == "--data-path" and blend[2::2] == DATA[1::2], printed
    weights = [float(w) for w in blend[1::2]]
    assert abs(sum(weights) - 1) < 1e-3, weights
    mixed = [float(w) * f for w, f in zip(DATA[0::2], fractions)]
    assert weights == pytest.approx([x / sum(mixed) for x in mixed], abs=1e-4)

    # controls 2 and 3 (random k, CLM on the printed blend); 7: the export of the SLM policy (weights + tokenizer)
    _together(
        {
            "random": _train(f"runs/{M}-random", run_args + slm_ref + ["--selection-strategy", "random"]),
            "clm-reweighted": _train(
                f"runs/{M}-clm-reweighted",
                [
                    "--pretrained-checkpoint",
                    f"ckpt/{M}-base",
                    "--train-iters",
                    str(ITERS),
                    "--loss-mode",
                    "clm",
                    *blend,
                ],
            ),
            "export": _slm(
                "convert",
                "megatron-to-hf",
                "--input",
                f"runs/{M}-slm",
                "--output",
                f"hf_out/{M}-slm",
                "--hf-config",
                BASE,
                "--tokenizer-model",
                BASE,
            ),
        },
        work,
    )
    lap("random, CLM reweighted, export")
    rnd = _summary(work, f"runs/{M}-random", "slm", ITERS)
    assert abs(rnd["final"]["selected_fraction"] - 0.6) < 0.02 and math.isfinite(rnd["final"]["ref_loss"]), rnd
    assert _summary(work, f"runs/{M}-clm-reweighted", "clm", ITERS)["data_path"] == blend[1:]

    hf_dir = work / f"hf_out/{M}-slm"
    base_cfg = json.loads((work / BASE / "config.json").read_text())
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2, cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (base_cfg["bos_token_id"], base_cfg["eos_token_id"])
    import sentencepiece as spm

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    text = docs["math_heldout"][0]
    sp = spm.SentencePieceProcessor(model_file=str(work / tok))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)

    # 8: loss/perplexity of every checkpoint (and the export) on held-out math and general text
    ckpts = [
        f"ckpt/{M}-base",
        f"runs/{M}-ref",
        f"runs/{M}-slm",
        f"runs/{M}-clm",
        f"runs/{M}-random",
        f"runs/{M}-clm-reweighted",
        f"hf_out/{M}-slm",
    ]
    heldout = [f"data/{M}/math_heldout", f"data/{M}/general_heldout"]
    _run(
        "evaluate",
        _slm(
            "evaluate",
            "--load",
            *ckpts,
            "--data-path",
            *heldout,
            "--seq-length",
            str(SEQ),
            "--eval-samples",
            "64",
            "--split-reference",
            f"runs/{M}-ref",
            "--split-ratio",
            "0.6",
            "--out",
            f"eval_out/{M}",
        ),
        work,
    )
    lap("evaluate")
    rows = json.loads((work / f"eval_out/{M}/eval.json").read_text())["results"]
    assert (work / f"eval_out/{M}/eval.csv").is_file()
    loss = {(r["checkpoint"], r["dataset"]): r for r in rows}
    assert sorted(loss) == sorted((c, d) for c in ckpts for d in heldout), sorted(loss)
    for d in heldout:
        assert len({loss[c, d]["tokens"] for c in ckpts}) == 1 and loss[ckpts[0], d]["tokens"] > 0  # paired
    assert all(math.isfinite(r["loss"]) and r["perplexity"] > 1 for r in rows), rows
    for r in rows:  # learnable = the top 60% of each dataset's tokens by L_base - L_ref, the same for every row
        assert (
            r["learnable_tokens"] == round(0.6 * r["tokens"])
            and r["not_learnable_tokens"] == r["tokens"] - r["learnable_tokens"]
        ), r
        assert math.isfinite(r["learnable_loss"]) and math.isfinite(r["not_learnable_loss"]), r
    math_set = heldout[0]
    assert loss[f"runs/{M}-ref", math_set]["loss"] < loss[f"ckpt/{M}-base", math_set]["loss"] - 0.05
    for d in heldout:  # the export is the SLM checkpoint
        assert abs(loss[f"hf_out/{M}-slm", d]["loss"] - loss[f"runs/{M}-slm", d]["loss"]) < 1e-4


# ------------------------------------------------------------------------------------------------
# docs/recipe.md's and the README's commands as written: every command exists and takes the flags shown

STUB = """#!/bin/bash
# Records its name and arguments (NUL-separated, one file per call); sbatch also its CONFIG/SAVE_DIR/EXTRA_ARGS.
f=$CALLS/$(printf '%03d' "$(find "$CALLS" -type f | wc -l)")
if [ "$(basename "$0")" = sbatch ]; then
    printf '%s\\0' sbatch "$CONFIG" "$SAVE_DIR" "$EXTRA_ARGS" "$@" > "$f"
else
    printf '%s\\0' "$(basename "$0")" "$@" > "$f"
fi
if [ "$(basename "$0")" = slm ] && [ "$1" = reweight ]; then
    echo "--data-path 0.9500 data/x/owm 0.0500 data/x/general"
    echo "CLM with these weights ..."
fi
"""

# The recipe's "How many steps": a 14B-token OWM corpus, of which the configs' --split 998,2,0 trains on 99.8%; a
# run on it (and its scoring) reads at most one epoch of that training split.
OWM_TOKENS, TRAIN_SHARE = 14_000_000_000, 0.998


def _recipe_script(mistral: bool) -> str:
    """The bash blocks of docs/recipe.md, in order; with ``mistral`` the first block's variables take the values its
    comments give for Mistral-7B."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs/recipe.md").read_text(), flags=re.S)
    assert len(blocks) >= 8, len(blocks)
    if mistral:
        lines = []
        for line in blocks[0].splitlines():
            code, _, comment = line.partition("#")
            alternative = comment.strip()
            lines.append(alternative if re.match(r"^[A-Z_]+=", alternative) else line)
        blocks[0] = "\n".join(lines) + "\n"
    return "set -euo pipefail\n" + "".join(blocks)


def _readme_quick_path() -> str:
    """The bash block of the README's "7B quick path" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## 7B quick path\n")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, len(blocks)
    return "set -euo pipefail\n" + blocks[0]


def _run_recorded(script: str, tmp_path: Path) -> list:
    """Run ``script`` with stand-ins for .venv/bin/{python,slm,torchrun} and sbatch; [(name, args)] of each call."""
    calls = tmp_path / "calls"
    calls.mkdir()
    for stub in (".venv/bin/python", ".venv/bin/slm", ".venv/bin/torchrun", "bin/sbatch"):
        (tmp_path / stub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stub).write_text(STUB)
        (tmp_path / stub).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "SAVE_DIR", "EXTRA_ARGS")}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls))
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    recorded = []
    for f in sorted(calls.iterdir()):
        name, *args = f.read_bytes().decode().split("\0")[:-1]
        recorded.append((name, args))
    assert recorded, "no command ran"
    return recorded


def _parse(parser, args):
    try:
        return parser.parse_args(args)
    except SystemExit:
        raise AssertionError(f"the documented command does not parse: {args}") from None


def _check_commands(recorded: list, world: int) -> list:
    """Parse every recorded command with slm's own parser (sbatch and torchrun as the commands they launch), validate
    the config of train / check-config / plan / score-reference at ``world`` GPUs, and check that the runs on the OWM
    data read at most one epoch of its training split. Returns a label per command, e.g. "slm train clm"."""
    from megatron_slm.cli import build_parser as slm_parser
    from megatron_slm.config import load_config, validate

    seen = []
    for name, args in recorded:
        if name == "sbatch":  # launch/common.sh: --config $CONFIG --save $SAVE_DIR $EXTRA_ARGS (split) "$@"
            config, save, extra, *sbatch_args = args
            assert sbatch_args[-1] == "launch/slurm_train.sbatch" and (ROOT / sbatch_args[-1]).is_file(), args
            assert sbatch_args[:-1] == ["--nodes", str(world // 8)], args
            name, args = "slm", ["train", "--config", config, "--save", save, *extra.split()]
        if name == "torchrun":
            assert args[:4] == ["--nproc-per-node", "8", "-m", "megatron_slm.cli"], args
            name, args = "slm", args[4:]
        assert name == "slm", f"the docs show `slm ...` forms only, not {name} {args}"
        ns = _parse(slm_parser(), args)
        label = [ns.command]
        if ns.command == "train":
            label += [ns.cfg__slm__loss_mode, ns.cfg__slm__selection_strategy]
        if ns.command == "convert":
            label.append(ns.direction)
        seen.append(" ".join(["slm"] + [x for x in label if x]))
        if ns.command in ("train", "check-config", "plan", "score-reference"):
            assert (ROOT / ns.config).is_file(), ns.config
            ns.config = str(ROOT / ns.config)
            cfg = load_config(ns.config, args=ns)
            validate(cfg, world_size=world)  # values, layout, batch sizes
            if ns.command in ("train", "score-reference") and any("/owm" in p for p in cfg.data.data_path or []):
                tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.train.seq_length
                assert tokens <= TRAIN_SHARE * OWM_TOKENS, (args, tokens)
    return seen


@pytest.mark.parametrize("model", ["tinyllama", "mistral"])
def test_recipe_commands_parse(tmp_path, model):
    world = 32 if model == "mistral" else 8
    seen = _check_commands(_run_recorded(_recipe_script(model == "mistral"), tmp_path), world)
    assert sorted(seen) == sorted(
        ["slm convert hf-to-megatron"]
        + ["slm preprocess"] * 5
        + [
            "slm plan",
            "slm check-config",
            "slm train clm",
            "slm plan",
            "slm score-reference",
            "slm train",
            "slm train clm",
            "slm train random",
            "slm reweight",
            "slm train clm",
            "slm evaluate",
        ]
        + ["slm convert megatron-to-hf"] * 5
    ), seen

    # the alternative layouts of the table's "other layouts" row, on the model's config
    from megatron_slm.cli import build_parser as slm_parser
    from megatron_slm.config import load_config, validate

    rows = [ln for ln in (ROOT / "docs/recipe.md").read_text().splitlines() if ln.startswith("| other layouts |")]
    assert len(rows) == 1, rows
    cell = rows[0].split("|")[2 if model == "tinyllama" else 3]
    cfg_path = str(
        ROOT
        / "launch/configs"
        / ("mistral7b_owm_slm_k0.7.yaml" if model == "mistral" else "tinyllama1b_owm_slm_k0.6.yaml")
    )
    layouts = [c for c in re.findall(r"`([^`]*)`", cell) if c.startswith("--")]
    assert layouts, cell
    for flags in layouts:
        ns = _parse(slm_parser(), ["train", "--config", cfg_path, *flags.split()])
        validate(load_config(ns.config, args=ns), world_size=world)


def test_readme_quick_path_commands_parse(tmp_path):
    seen = _check_commands(_run_recorded(_readme_quick_path(), tmp_path), world=32)
    assert sorted(seen) == sorted(
        ["slm convert hf-to-megatron"]
        + ["slm preprocess"] * 3
        + ["slm plan", "slm train clm", "slm check-config", "slm train", "slm evaluate"]
    ), seen
    # the same number of steps as the recipe's SLM runs
    iters = re.search(r"^ITERS=(\d+)", (ROOT / "docs/recipe.md").read_text(), flags=re.M)
    assert iters and f"--train-iters {iters.group(1)}" in _readme_quick_path(), "README and recipe disagree on ITERS"
