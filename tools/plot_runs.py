#!/usr/bin/env python
"""Plots of slm train runs (their --save directories): PNGs in --out.

  python tools/plot_runs.py slm=runs/slm clm=runs/clm --out plots/
      slm_vs_clm.png       held-out and training loss, SLM vs CLM
      selection_stats.png  selected fraction, excess loss of selected vs unselected tokens (SLM runs)
      excess_hist.png      excess-loss histograms per dump iteration (SLM runs with selection_dumps/)

  python tools/plot_runs.py runs/slm_k0.4 runs/slm_k0.6 runs/slm_k0.8 runs/clm --k-sweep --out plots/
      k_sweep.png, k_sweep.csv, k_sweep.md   held-out loss vs k (summary.json "k" and "eval_loss"), CLM as a line

A run is ``DIR`` or ``LABEL=DIR``. ``--only`` picks some of: curves, selection, excess, sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ("curves", "selection", "excess", "sweep")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="plot_runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", metavar="[LABEL=]DIR", help="run directories (metrics.jsonl / summary.json)")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--k-sweep", action="store_true", help="also write the k-sweep report (k_sweep.png/.csv/.md)")
    p.add_argument("--only", nargs="+", choices=KINDS, help="only these plots")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window of the training curves (logged steps)")
    p.add_argument("--prefix", default="", help="prefix of the output file names")
    args = p.parse_args(argv)

    from megatron_slm.analysis.plots import (
        k_sweep_report,
        load_run,
        parse_run_arg,
        plot_excess_histograms,
        plot_loss_curves,
        plot_selection_stats,
    )

    try:
        runs = [load_run(path, label) for label, path in map(parse_run_arg, args.runs)]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kinds = set(args.only or [k for k in KINDS if k != "sweep" or args.k_sweep])
    out = Path(args.out)
    written = []
    slm = [r for r in runs if r.loss_mode == "slm"]
    if "curves" in kinds:
        written.append(plot_loss_curves(runs, out / f"{args.prefix}slm_vs_clm.png", smooth_window=args.smooth))
    if "selection" in kinds:
        if slm:
            written.append(
                plot_selection_stats(slm, out / f"{args.prefix}selection_stats.png", smooth_window=args.smooth)
            )
        else:
            print("no SLM run: skipping selection_stats.png", file=sys.stderr)
    if "excess" in kinds:
        with_dumps = [r for r in slm if any((r.path / "selection_dumps").glob("iter_*.pt"))]
        for r in with_dumps:
            name = (
                f"{args.prefix}excess_hist.png"
                if len(with_dumps) == 1
                else f"{args.prefix}excess_hist_{r.path.name}.png"
            )
            written.append(plot_excess_histograms(r.path, out / name))
        if not with_dumps:
            print(
                "no selection_dumps/ in the SLM runs (train with --selection-dump-interval N): skipping excess_hist.png",
                file=sys.stderr,
            )
    if "sweep" in kinds:
        rep = k_sweep_report(runs, out, name=f"{args.prefix}k_sweep")
        written += [rep["png"], rep["csv"], rep["md"]]
        print(rep["md"].read_text(), end="")
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
