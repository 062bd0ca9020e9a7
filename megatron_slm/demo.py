"""The CPU demo: the Rho-1 continual-pretraining recipe at toy scale, with SLM's two controls.

1. base       CLM from scratch on a general + math mix (stands in for a pretrained base such as TinyLlama);
2. reference  the base tuned with CLM on clean math (the paper's reference: base + high-quality data);
3. policies   four runs from the base (``--pretrained-checkpoint``), same steps, same data and order:
              CLM; SLM (top-k excess loss, k = 0.6, TP=2 x PP=2); random k% (the same number of tokens,
              picked at random: "selection" vs "fewer tokens"); CLM on the blend reweighted to the token mix
              SLM selected (``slm reweight``: selection vs domain filtering); SLM on math with CLM on general
              (``--slm-select-ratio-per-dataset k 1.0``: selection without forgetting the general text);
4. ``slm evaluate`` of all seven on all of held-out math and held-out general text (fixed windows, the same
   tokens for every model), one table, and each policy's paired difference to SLM with a 95% block-bootstrap
   interval (``slm compare``'s ``paired_bootstrap`` over the per-window losses evaluate saved).

Math text = sympy's docstrings; general text = the Python standard library's docstrings (present wherever
torch is installed). Everything runs through the real commands (``slm train`` under torchrun, ``slm
evaluate``). ``--seeds`` repeats the four policies with other data orders to measure seed noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo_tiny.yaml"
POLICY_BLEND = (("math_train", 0.55), ("general", 0.45))  # the continual-pretraining mix
BASE_BLEND = (("math_train", 0.25), ("general", 0.75))  # the base's mostly-general pretraining mix
POLICIES = ("clm", "slm", "random", "clm_reweighted", "slm_math_clm_general")
LABELS = {
    "base": "base",
    "reference": "reference",
    "clm": "CLM",
    "slm": "SLM",
    "random": "random k%",
    "clm_reweighted": "CLM, reweighted blend",
    "slm_math_clm_general": "SLM math + CLM general",
}


def add_arguments(p) -> None:
    """The demo's flags; the SLM ones take their names, defaults and choices from the config tree."""
    from megatron_slm.config import SELECTION_SCOPES, SLMConfig

    slm = SLMConfig()
    p.add_argument("--out", default="demo_out", help="working directory (data, checkpoints, logs)")
    p.add_argument(
        "--base-iters",
        type=int,
        default=150,
        help="steps of the base model (CLM from scratch on the general + math mix)",
    )
    p.add_argument("--ref-iters", type=int, default=150, help="steps tuning the base into the reference on clean math")
    p.add_argument("--train-iters", type=int, default=100, help="steps of each of the four policies")
    p.add_argument(
        "--slm-select-ratio",
        type=float,
        default=slm.slm_select_ratio,
        help="k: fraction of the tokens SLM (and the random control) trains on",
    )
    p.add_argument(
        "--selection-scope",
        default=slm.selection_scope,
        choices=SELECTION_SCOPES,
        help="which tokens the top-k ranks together",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[4321],
        metavar="SEED",
        help="data-order seeds of the policies; two or more also report the seed-to-seed spread",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        metavar="N",
        help="held-out windows of 128 tokens per dataset, the first N (default: 0, all: 1,333 of math and 395 of "
        "general; the first 256 overstate differences that vary along the file)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=4,
        help="processes per training run (TP x PP x DP; the config's TP x PP = 4 divides it)",
    )
    p.add_argument("--rebuild-data", action="store_true", help="rebuild the corpus even if present")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(cmd: list[str], name: str) -> None:
    print(f"\n=== {name}: {' '.join(cmd[3:] if cmd[1] == '-m' else cmd)}", flush=True)
    proc = subprocess.run(cmd, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"demo step '{name}' failed (exit {proc.returncode}); see the log above")


def _train(run_dir: Path, name: str, nproc: int, flags: list[str]) -> dict:
    from megatron_slm.parallel.distributed import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        "megatron_slm.cli",
        "train",
        "--config",
        str(DEMO_CONFIG),
        "--save",
        str(run_dir),
        *flags,
    ]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of an earlier demo
    start = time.perf_counter()
    _run(cmd, name)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    return summary


def _data_path(weights, prefixes) -> list[str]:
    """``--data-path W1 PREFIX1 W2 PREFIX2 ...`` as command-line arguments."""
    return ["--data-path", *[x for w, p in zip(weights, prefixes) for x in (f"{w:.4f}", str(p))]]


def _blend(data: Path, parts) -> list[str]:
    """``_data_path`` of a blend given as (dataset name under ``data``, weight) pairs."""
    return _data_path([w for _, w in parts], [data / name for name, _ in parts])


def _evaluate(out: Path, runs: dict[str, Path], datasets: list[Path], eval_samples: int | None, k: float) -> dict:
    """{(run name, dataset name): eval.json row} from ``slm evaluate`` over every run's final checkpoint, with the
    learnable / not-learnable split of the tokens by the base's excess loss over the reference."""
    names = list(runs)
    cmd = [
        sys.executable,
        "-m",
        "megatron_slm.cli",
        "evaluate",
        "--config",
        str(DEMO_CONFIG),
        "--tensor-model-parallel-size",
        "1",
        "--pipeline-model-parallel-size",
        "1",
        "--micro-batch-size",
        "16",
        "--load",
        *[str(runs[n]) for n in names],
        "--data-path",
        *map(str, datasets),
        "--out",
        str(out / "eval"),
        "--split-reference",
        str(runs["reference"]),
        "--split-base",
        str(runs["base"]),
        "--split-ratio",
        str(k),
    ]
    if eval_samples:
        cmd += ["--eval-samples", str(eval_samples)]
    env = dict(_env(), OMP_NUM_THREADS=str(max(1, os.cpu_count() or 1)))
    print(
        f"\n=== evaluate: slm evaluate --load {' '.join(names)} --data-path {' '.join(d.name for d in datasets)}",
        flush=True,
    )
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SystemExit("demo step 'evaluate' failed; see the log above")
    rows = json.loads((out / "eval" / "eval.json").read_text())["results"]
    by_path = {str(runs[n]): n for n in names}
    return {(by_path[r["checkpoint"]], Path(r["dataset"]).name): r for r in rows}


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), max(values) - min(values)


def main(args) -> int:
    from megatron_slm.analysis.controls import reweight
    from megatron_slm.data.demo_corpus import build_demo_corpus

    if min(args.base_iters, args.ref_iters, args.train_iters) < 1:
        raise SystemExit("error: --base-iters, --ref-iters and --train-iters must be >= 1")
    if not 0.0 < args.slm_select_ratio <= 1.0:
        raise SystemExit("error: --slm-select-ratio must be in (0, 1]")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("error: --seeds must be distinct")
    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    if args.rebuild_data or not (data / "general_heldout.idx").exists():
        print("=== building the demo corpus (sympy + stdlib docstrings) and a sentencepiece tokenizer", flush=True)
        print(json.dumps(build_demo_corpus(str(data)), indent=2), flush=True)
    common = ["--tokenizer-model", str(data / "tokenizer.model"), "--data-cache-path", str(out / "index_cache")]

    base = _train(
        out / "base",
        "base",
        args.nproc,
        common
        + ["--loss-mode", "clm", *_blend(data, BASE_BLEND), "--train-iters", str(args.base_iters), "--seed", "1234"],
    )
    ref = _train(
        out / "reference",
        "reference",
        args.nproc,
        common
        + [
            "--loss-mode",
            "clm",
            "--pretrained-checkpoint",
            str(out / "base"),
            "--data-path",
            str(data / "math_ref_train"),
            "--train-iters",
            str(args.ref_iters),
            "--seed",
            "1234",
        ],
    )
    runs = {"base": out / "base", "reference": out / "reference"}
    summaries = {"base": base, "reference": ref}
    slm_flags = [
        "--loss-mode",
        "slm",
        "--ref-load",
        str(out / "reference"),
        "--slm-select-ratio",
        str(args.slm_select_ratio),
        "--selection-scope",
        args.selection_scope,
    ]
    for seed in args.seeds:
        policy = common + [
            "--pretrained-checkpoint",
            str(out / "base"),
            "--train-iters",
            str(args.train_iters),
            "--seed",
            str(seed),
        ]
        mix = _blend(data, POLICY_BLEND)
        home = out / f"seed{seed}"
        summaries[("slm", seed)] = _train(home / "slm", f"SLM (seed {seed})", args.nproc, policy + mix + slm_flags)
        summaries[("random", seed)] = _train(
            home / "random",
            f"random k% (seed {seed})",
            args.nproc,
            policy + mix + slm_flags + ["--selection-strategy", "random"],
        )
        summaries[("clm", seed)] = _train(
            home / "clm", f"CLM (seed {seed})", args.nproc, policy + mix + ["--loss-mode", "clm"]
        )
        matched = reweight(str(home / "slm"))
        reweighted = _data_path(matched["matched"], matched["prefixes"])
        summaries[("clm_reweighted", seed)] = _train(
            home / "clm_reweighted",
            f"CLM on the reweighted blend (seed {seed})",
            args.nproc,
            policy + reweighted + ["--loss-mode", "clm"],
        )
        summaries[("matched", seed)] = matched
        summaries[("slm_math_clm_general", seed)] = _train(
            home / "slm_math_clm_general",
            f"SLM on math + CLM on general (seed {seed})",
            args.nproc,
            policy + mix + slm_flags + ["--slm-select-ratio-per-dataset", str(args.slm_select_ratio), "1.0"],
        )
        runs.update({f"{name}@{seed}": home / name for name in POLICIES})

    losses = _evaluate(
        out, runs, [data / "math_heldout", data / "general_heldout"], args.eval_samples, args.slm_select_ratio
    )
    report = _report(args, summaries, losses)
    report["paired_vs_slm"] = _paired_vs_slm(out, runs, args.seeds[0])
    report["total_wall_s"] = time.perf_counter() - t0
    _print_table(args, report)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'demo_report.json'}  (total {report['total_wall_s']:.0f} s)")
    return 0


def _paired_vs_slm(out: Path, runs: dict, seed: int) -> dict:
    """{policy: {dataset: paired_bootstrap result}}: each policy's held-out loss minus SLM's (first seed), with a 95%
    interval over blocks of 16 windows (``slm compare``'s defaults), from the per-window losses evaluate saved."""
    from megatron_slm.analysis.compare import compare, load_windows

    rows = load_windows(str(out / "eval"))
    slm = str(runs[f"slm@{seed}"])
    result = {}
    for name in POLICIES:
        if name == "slm":
            continue
        res = compare(rows, str(runs[f"{name}@{seed}"]), slm)
        result[name] = {Path(r["dataset"]).name: r for r in res["results"] if r["part"] == "all"}
    return result


def _report(args, summaries: dict, losses: dict) -> dict:
    """Per model: held-out losses (mean and spread over seeds), trained token mix, selected shares."""
    w_math = dict(POLICY_BLEND)["math_train"] / sum(w for _, w in POLICY_BLEND)
    rows = {}

    def measured(runs: list[str]) -> dict:
        row = {}
        for key, ds, field in (
            ("math", "math_heldout", "loss"),
            ("general", "general_heldout", "loss"),
            ("math_learnable", "math_heldout", "learnable_loss"),
            ("math_not_learnable", "math_heldout", "not_learnable_loss"),
        ):
            values = [losses[(r, ds)][field] for r in runs]
            row[key], row[key + "_spread"] = _mean_spread(values)
            row[key + "_by_seed"] = values
        return row

    for name in ("base", "reference"):
        rows[name] = dict(measured([name]), trained_math_share=None, selected_math=None, selected_general=None)
    for name in POLICIES:
        row = measured([f"{name}@{s}" for s in args.seeds])
        if name in ("slm", "random", "slm_math_clm_general"):
            fr = [summaries[(name, s)]["selected_fraction_by_dataset"] for s in args.seeds]
            f_m, f_g = (sum(f[i] for f in fr) / len(fr) for i in (0, 1))
            row.update(
                selected_math=f_m,
                selected_general=f_g,
                trained_math_share=w_math * f_m / (w_math * f_m + (1 - w_math) * f_g),
            )
        elif name == "clm_reweighted":
            shares = [summaries[("matched", s)]["matched"][0] for s in args.seeds]
            row.update(selected_math=1.0, selected_general=1.0, trained_math_share=sum(shares) / len(shares))
        else:
            row.update(selected_math=1.0, selected_general=1.0, trained_math_share=w_math)
        rows[name] = row
    s0 = args.seeds[0]
    slm_t, clm_t = (
        summaries[("slm", s0)]["mean_second_half"]["step_time"],
        summaries[("clm", s0)]["mean_second_half"]["step_time"],
    )
    return {
        "heldout_loss": rows,
        "k": args.slm_select_ratio,
        "scope": args.selection_scope,
        "seeds": args.seeds,
        "iters": {"base": args.base_iters, "reference": args.ref_iters, "policy": args.train_iters},
        "parallel": summaries[("slm", s0)]["parallel"],
        "step_time_s": {"slm_online_ref": slm_t, "clm": clm_t, "ratio": slm_t / clm_t},
    }


def _print_table(args, report: dict) -> None:
    rows, many = report["heldout_loss"], len(args.seeds) > 1
    p = report["parallel"]

    def label(name: str) -> str:
        return LABELS[name] + (f" k={args.slm_select_ratio}" if name in ("slm", "random") else "")

    width = max(24, max(len(label(n)) for n in ("base", "reference") + POLICIES) + 2)

    def loss(name: str, key: str) -> str:  # a policy's mean over seeds, with its spread when there are several
        r = rows[name]
        return f"{r[key]:.4f} +-{r[key + '_spread']:.4f}" if many and name in POLICIES else f"{r[key]:.4f}"

    print("\n================ SLM demo results (tiny scale) ================")
    print(
        f"policies: {args.train_iters} steps each from the base, TP={p['tp']} x PP={p['pp']} x DP={p['dp']}; "
        f"k={args.slm_select_ratio}, scope={args.selection_scope}; seeds {' '.join(map(str, args.seeds))}"
    )
    print(
        "held-out loss = mean token cross-entropy (nats) on fixed held-out windows, the same tokens for every model"
        + ("; +-x = seed spread (max - min)" if many else "")
    )
    head = f"{'model':<{width}}{'math':>16}{'general':>16}{'math share trained':>20}{'selected math/general':>24}"
    print(head)
    print("-" * len(head))
    for name in ("base", "reference") + POLICIES:
        r = rows[name]
        share = "-" if r["trained_math_share"] is None else f"{r['trained_math_share']:.1%}"
        sel = "-" if r["selected_math"] is None else f"{r['selected_math']:.1%} / {r['selected_general']:.1%}"
        print(f"{label(name):<{width}}{loss(name, 'math'):>16}{loss(name, 'general'):>16}{share:>20}{sel:>24}")
    print(
        f"held-out math split by the base's excess loss over the reference (top {args.slm_select_ratio:.0%} = "
        "'learnable', what SLM would select at the start; rest = not learnable):"
    )
    print(f"{'model':<{width}}{'learnable':>16}{'not learnable':>16}")
    for name in ("base", "reference") + POLICIES:
        print(f"{label(name):<{width}}{loss(name, 'math_learnable'):>16}{loss(name, 'math_not_learnable'):>16}")
    slm = rows["slm"]
    for name in ("clm", "random", "clm_reweighted"):
        d = slm["math"] - rows[name]["math"]
        noise = max(slm["math_spread"], rows[name]["math_spread"])  # the larger of the two runs' seed spreads
        verdict = "" if not many else f"  ({'beyond' if abs(d) > noise else 'within'} the seed spread {noise:.4f})"
        print(f"SLM - {LABELS[name]:<22} held-out math {d:+.4f}{verdict}")
    paired = report.get("paired_vs_slm") or {}
    if paired:
        print(
            f"paired difference to SLM (policy - SLM, held-out loss, seed {args.seeds[0]}; 95% interval of a block "
            "bootstrap over windows, 16 per block; * = the interval excludes 0):"
        )
        print(f"{'model':<{width}}{'math':>30}{'general':>30}")
        for name, by_ds in paired.items():
            cells = []
            for ds in ("math_heldout", "general_heldout"):
                r = by_ds[ds]
                star = "*" if r["significant"] else " "
                cells.append(f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{star}")
            print(f"{label(name):<{width}}{cells[0]:>30}{cells[1]:>30}")
    t = report["step_time_s"]
    print(f"step time: SLM (online reference) {t['slm_online_ref']:.3f} s vs CLM {t['clm']:.3f} s = {t['ratio']:.2f}x")
    if not many:
        print("one seed: rerun with --seeds 4321 777 to see how much of a difference is data-order noise")
