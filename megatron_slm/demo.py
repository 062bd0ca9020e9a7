"""The CPU demo: train a tiny reference on clean math text, then continual-pretrain a tiny policy on a
math + general mix with SLM and with plain CLM (same data, same token budget), at TP=2 x PP=2 on 4 CPU
processes, and compare their held-out math loss.

Math text = sympy's docstrings; general text = the Python standard library's docstrings (present wherever
torch is installed). Everything runs through the real trainer (``slm train`` under torchrun).
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


def add_arguments(p) -> None:
    """The demo's flags; the SLM ones take their names, defaults and choices from the config tree."""
    from megatron_slm.config import SELECTION_SCOPES, SLMConfig

    slm = SLMConfig()
    p.add_argument("--out", default="demo_out", help="working directory (data, checkpoints, logs)")
    p.add_argument("--ref-iters", type=int, default=150, help="reference training steps on the clean math split")
    p.add_argument("--train-iters", type=int, default=150, help="policy steps (SLM and CLM each)")
    p.add_argument("--slm-select-ratio", type=float, default=slm.slm_select_ratio,
                   help="k: fraction of the tokens SLM trains on")
    p.add_argument("--selection-scope", default=slm.selection_scope, choices=SELECTION_SCOPES,
                   help="which tokens the top-k ranks together")
    p.add_argument("--nproc", type=int, default=4, help="processes (TP x PP x DP; the config's TP x PP = 4 divides it)")
    p.add_argument("--rebuild-data", action="store_true", help="rebuild the corpus even if present")


def _torchrun(out: Path, name: str, nproc: int, flags: list[str]) -> dict:
    from megatron_slm.parallel.distributed import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
        "-m", "megatron_slm.cli", "train", "--config", str(DEMO_CONFIG), "--save", str(out / name), *flags,
    ]
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run, not a resume of an earlier demo
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    print(f"\n=== {name}: {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo step '{name}' failed (exit {proc.returncode}); see the log above")
    summary = json.loads((out / name / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    return summary


def main(args) -> int:
    from megatron_slm.data.demo_corpus import build_demo_corpus

    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    if args.rebuild_data or not (data / "tokenizer.model").exists():
        print("=== building the demo corpus (sympy + stdlib docstrings) and a sentencepiece tokenizer", flush=True)
        info = build_demo_corpus(str(data))
        print(json.dumps(info, indent=2), flush=True)
    common = ["--valid-data-path", str(data / "math_heldout"), "--tokenizer-model", str(data / "tokenizer.model"),
              "--data-cache-path", str(out / "index_cache")]
    ref = _torchrun(out, "reference", args.nproc, common + [
        "--loss-mode", "clm", "--data-path", str(data / "math_ref_train"), "--train-iters", str(args.ref_iters),
    ])
    policy = common + [  # the policy's data: math and general text blended by weight
        "--data-path", "0.55", str(data / "math_train"), "0.45", str(data / "general"),
        "--train-iters", str(args.train_iters),
        "--seed", "4321",  # same init for both policies, different from the reference's
    ]
    slm = _torchrun(out, "slm", args.nproc, policy + [
        "--loss-mode", "slm", "--ref-load", str(out / "reference"),
        "--slm-select-ratio", str(args.slm_select_ratio), "--selection-scope", args.selection_scope,
    ])
    clm = _torchrun(out, "clm", args.nproc, policy + ["--loss-mode", "clm"])

    s, c = slm["mean_second_half"], clm["mean_second_half"]
    report = {
        "heldout_math_loss": {"reference": ref["eval_loss"], "slm": slm["eval_loss"], "clm": clm["eval_loss"]},
        "slm_selection": {
            "k": args.slm_select_ratio, "scope": args.selection_scope, "selected_fraction": s["selected_fraction"],
            "excess_loss_selected": s["excess_selected"], "excess_loss_unselected": s["excess_unselected"],
            "policy_loss_selected": s["loss_selected"], "policy_loss_all": s["loss_all"], "reference_loss_all": s["ref_loss"],
        },
        "step_time_s": {"slm_online_ref": s["step_time"], "clm": c["step_time"], "ratio": s["step_time"] / c["step_time"]},
        "parallel": slm["parallel"],
        "total_wall_s": time.perf_counter() - t0,
    }
    h = report["heldout_math_loss"]
    print("\n================ SLM demo results ================")
    print(f"layout: TP={report['parallel']['tp']} x PP={report['parallel']['pp']} x DP={report['parallel']['dp']}; "
          f"{args.train_iters} policy steps each on the same math+general mix")
    print(f"held-out math loss:  SLM {h['slm']:.4f}   CLM {h['clm']:.4f}   (reference {h['reference']:.4f})")
    print(f"SLM - CLM:           {h['slm'] - h['clm']:+.4f}")
    sel = report["slm_selection"]
    print(f"selection (k={sel['k']}, scope={sel['scope']}): selected fraction {sel['selected_fraction']:.3f}; "
          f"mean excess loss selected {sel['excess_loss_selected']:+.3f} vs unselected {sel['excess_loss_unselected']:+.3f}")
    by_ds = slm.get("selected_fraction_by_dataset")
    if by_ds:
        report["slm_selection"]["selected_fraction_math_vs_general"] = by_ds
        print(f"SLM selected {by_ds[0]:.1%} of math tokens vs {by_ds[1]:.1%} of general tokens "
              f"(the reference was tuned on math)")
    print(f"step time: SLM (online reference) {s['step_time']:.3f} s vs CLM {c['step_time']:.3f} s "
          f"= {report['step_time_s']['ratio']:.2f}x")
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'demo_report.json'}  (total {report['total_wall_s']:.0f} s)")
    return 0
