"""Plots of training runs (matplotlib, Agg backend): SLM vs CLM, selection statistics, k sweeps.

A *run directory* is a ``--save`` directory of ``slm train``: ``metrics.jsonl`` (one JSON object per line,
``split`` = ``train`` | ``eval``), ``summary.json`` (written at the end) and, with
``--selection-dump-interval``, ``selection_dumps/iter_*.pt``. Every function takes run directories (or
:class:`Run` objects), writes one PNG and returns its path.

- :func:`plot_loss_curves`      held-out loss (eval lines) and training loss of several runs (SLM vs CLM);
- :func:`plot_selection_stats`  selected fraction, mean excess loss of selected vs unselected tokens, and
                                policy vs reference loss over training (SLM runs);
- :func:`plot_excess_histograms` the excess-loss distribution of selected vs unselected tokens per dump;
- :func:`k_sweep_report`        held-out loss vs k over several SLM runs (CLM as a horizontal line), plus
                                ``k_sweep.csv`` and ``k_sweep.md``;
- :func:`plot_runs`             all of them for some run directories: ``slm plot``.

matplotlib is the ``viz`` extra: pip install 'megatron_slm[viz]'.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_slm.errors import require


@dataclass
class Run:
    path: Path
    label: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    summary: dict | None = None

    @property
    def loss_mode(self) -> str | None:
        if self.summary and self.summary.get("loss_mode"):
            return self.summary["loss_mode"]
        if any("excess_selected" in r or "selected_fraction" in r for r in self.train):
            return "slm"
        return "clm" if self.train else None

    @property
    def k(self) -> float | None:
        if self.summary and self.summary.get("k") is not None:
            return float(self.summary["k"])
        return None

    @property
    def eval_loss(self) -> float | None:
        if self.summary and self.summary.get("eval_loss") is not None:
            return float(self.summary["eval_loss"])
        return float(self.eval[-1]["loss"]) if self.eval else None


def _default_label(path: Path, summary: dict | None) -> str:
    name = path.name or str(path)
    if summary and summary.get("loss_mode") == "slm" and summary.get("k") is not None:
        return f"{name} (SLM k={summary['k']:g})"
    if summary and summary.get("loss_mode") == "clm":
        return f"{name} (CLM)"
    return name


def load_run(path, label: str | None = None) -> Run:
    """Read ``metrics.jsonl`` and ``summary.json`` of a run directory (either may be missing, not both).

    A resumed run appends to metrics.jsonl; a later line for the same (split, iteration) replaces the earlier one."""
    p = Path(path)
    metrics, summary_path = p / "metrics.jsonl", p / "summary.json"
    if not metrics.is_file() and not summary_path.is_file():
        raise FileNotFoundError(f"{p} holds neither metrics.jsonl nor summary.json; pass a run's --save directory")
    rows: dict[tuple[str, int], dict] = {}
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # the last line cut off by a kill: skip it
                    continue
                raise ValueError(f"{metrics}:{n} is not JSON") from None
            if "iteration" in r:
                rows[(r.get("split", "train"), int(r["iteration"]))] = r
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    ordered = sorted(rows.items(), key=lambda kv: kv[0][1])
    return Run(
        path=p,
        label=label or _default_label(p, summary),
        summary=summary,
        train=[r for (s, _), r in ordered if s == "train"],
        eval=[r for (s, _), r in ordered if s == "eval"],
    )


def parse_run_arg(arg: str) -> tuple[str | None, str]:
    """``LABEL=DIR`` or ``DIR`` (the label may hold ``=``: the first split whose DIR exists wins)."""
    if "=" in arg and not Path(arg).exists():
        cuts = [i for i, ch in enumerate(arg) if ch == "="]
        i = next((i for i in cuts if Path(arg[i + 1 :]).exists()), cuts[0])
        return arg[:i] or None, arg[i + 1 :]
    return None, arg


def _runs(runs) -> list[Run]:
    out = []
    for r in runs:
        if isinstance(r, Run):
            out.append(r)
        else:
            label, path = parse_run_arg(str(r))
            out.append(load_run(path, label))
    return out


def _plt():
    matplotlib = require("matplotlib", "plotting runs")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def smooth(ys: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the start uses what is there)."""
    if window <= 1:
        return list(ys)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _save(fig, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return out_path


def _color(i: int, run: Run) -> str:
    if run.loss_mode == "clm":
        return ["#555555", "#999999", "#222222"][i % 3]
    return ["#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d68910", "#17a589"][i % 6]


# ----------------------------------------------------------------------------------------------
# (i) SLM vs CLM


def plot_loss_curves(runs: Iterable, out_path, smooth_window: int = 5) -> Path:
    """Held-out loss (eval lines of metrics.jsonl) and training loss of each run.

    Training panel: ``loss_all`` (loss on every token, comparable across SLM and CLM) per run; SLM runs add
    ``loss_selected`` (what they optimise) dashed and their reference's ``ref_loss`` dotted. Curves are
    smoothed over ``smooth_window`` logged steps."""
    runs = _runs(runs)
    if not runs:
        raise ValueError("no runs to plot")
    plt = _plt()
    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4.3))
    any_eval = False
    for i, run in enumerate(runs):
        c = _color(i, run)
        xs, ys = _series(run.eval, "loss")
        if xs:
            any_eval = True
            ax_eval.plot(xs, ys, "o-", ms=3, color=c, label=run.label)
            ax_eval.annotate(
                f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8, color=c
            )
        xs, ys = _series(run.train, "loss_all")
        if xs:
            ax_train.plot(xs, smooth(ys, smooth_window), color=c, label=f"{run.label}: all tokens")
        if run.loss_mode == "slm":
            xs, ys = _series(run.train, "loss_selected")
            if xs:
                ax_train.plot(xs, smooth(ys, smooth_window), "--", color=c, label=f"{run.label}: selected tokens")
            xs, ys = _series(run.train, "ref_loss")
            if xs:
                ax_train.plot(xs, smooth(ys, smooth_window), ":", color=c, alpha=0.8, label=f"{run.label}: reference")
    ax_eval.set_title("held-out loss" if any_eval else "held-out loss (no eval lines in metrics.jsonl)")
    ax_eval.set_xlabel("iteration")
    ax_eval.set_ylabel("cross-entropy (nats/token)")
    ax_train.set_title(f"training loss (moving average of {smooth_window})" if smooth_window > 1 else "training loss")
    ax_train.set_xlabel("iteration")
    for ax in (ax_eval, ax_train):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("SLM vs CLM")
    fig.tight_layout()
    return _save(fig, out_path)


# ----------------------------------------------------------------------------------------------
# (ii) selection statistics over training


def plot_selection_stats(runs: Iterable, out_path, smooth_window: int = 5) -> Path:
    """Selected fraction, excess loss of selected vs unselected tokens, and policy vs reference loss (SLM runs)."""
    runs = [r for r in _runs(runs) if r.loss_mode == "slm"]
    if not runs:
        raise ValueError("no SLM run among the runs (selection statistics exist only with --loss-mode slm)")
    plt = _plt()
    fig, (ax_f, ax_x, ax_l) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, run in enumerate(runs):
        c = _color(i, run)
        xs, ys = _series(run.train, "selected_fraction")
        if xs:
            ax_f.plot(xs, ys, color=c, label=run.label)
        if run.k is not None:
            ax_f.axhline(run.k, color=c, ls=":", lw=1)
        for key, ls, name in (("excess_selected", "-", "selected"), ("excess_unselected", "--", "unselected")):
            xs, ys = _series(run.train, key)
            if xs:
                ax_x.plot(xs, smooth(ys, smooth_window), ls, color=c, label=f"{run.label}: {name}")
        for key, ls, name in (
            ("loss_all", "-", "policy, all tokens"),
            ("loss_selected", "--", "policy, selected"),
            ("ref_loss", ":", "reference, all tokens"),
        ):
            xs, ys = _series(run.train, key)
            if xs:
                ax_l.plot(xs, smooth(ys, smooth_window), ls, color=c, label=f"{run.label}: {name}")
        by_ds = (run.summary or {}).get("selected_fraction_by_dataset")
        if by_ds:
            names = _dataset_names((run.summary or {}).get("data_path"), len(by_ds))
            txt = ", ".join(f"{n} {100 * f:.0f}%" for n, f in zip(names, by_ds))
            ax_f.text(
                0.02,
                0.04 + 0.07 * i,
                f"{run.label}: selected by dataset {txt}",
                transform=ax_f.transAxes,
                fontsize=7,
                color=c,
            )
    ax_f.set_title("selected fraction (dotted: k)")
    ax_f.set_ylim(0, 1.02)
    ax_x.axhline(0, color="#999", lw=0.8)
    ax_x.set_title("mean excess loss (policy - reference)")
    ax_l.set_title("token loss")
    for ax in (ax_f, ax_x, ax_l):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("SLM selection over training")
    fig.tight_layout()
    return _save(fig, out_path)


def _dataset_names(data_path, n: int) -> list[str]:
    """Short names of a blend's datasets (``[weight] prefix ...``): the prefixes' base names, else ds0, ds1..."""
    prefixes = []
    for item in data_path or []:
        try:
            float(item)
        except (TypeError, ValueError):
            prefixes.append(Path(str(item)).name)
    return prefixes if len(prefixes) == n else [f"ds{j}" for j in range(n)]


# ----------------------------------------------------------------------------------------------
# (iii) excess-loss distributions from selection dumps


def _excess_split(dump: dict) -> tuple[list[float], list[float]]:
    import torch

    sel, uns = [], []
    for s in dump["sequences"]:
        valid = torch.as_tensor(s["loss_mask"]).reshape(-1) > 0
        chosen = torch.as_tensor(s["selected"]).reshape(-1).bool()
        e = (torch.as_tensor(s["policy_loss"]).float() - torch.as_tensor(s["ref_loss"]).float()).reshape(-1)
        sel += e[valid & chosen].tolist()
        uns += e[valid & ~chosen].tolist()
    return sel, uns


def plot_excess_histograms(dumps, out_path, max_panels: int = 6, bins: int = 40) -> Path:
    """Histograms of the excess loss of selected vs unselected tokens, one panel per dump iteration.

    ``dumps``: dump dicts, or anything :func:`megatron_slm.analysis.heatmap.load_dumps` takes (a run directory,
    its ``selection_dumps/``, files). At most ``max_panels`` dumps, spread evenly (first and last kept)."""
    from megatron_slm.analysis.heatmap import _even_subset, load_dumps

    if not (isinstance(dumps, list) and dumps and isinstance(dumps[0], dict)):
        dumps = load_dumps(dumps)
    if not dumps:
        raise ValueError("no selection dumps")
    dumps = [dumps[i] for i in _even_subset(len(dumps), max_panels)]
    plt = _plt()
    n = len(dumps)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.3 * nrow), squeeze=False)
    for ax, d in zip(axes.flat, dumps):
        sel, uns = _excess_split(d)
        both = sel + uns
        if both:
            lo, hi = min(both), max(both)
            if hi <= lo:
                hi = lo + 1e-3
            edges = [lo + (hi - lo) * j / bins for j in range(bins + 1)]
            ax.hist(uns, bins=edges, color="#2471a3", alpha=0.6, label=f"not selected ({len(uns)})")
            ax.hist(sel, bins=edges, color="#c0392b", alpha=0.6, label=f"selected ({len(sel)})")
            if sel and uns:
                ax.axvline(min(sel), color="#111", lw=0.8, ls="--")
        ax.axvline(0, color="#999", lw=0.8)
        ax.set_title(f"iteration {d.get('iteration')} (k={d.get('k')}, {d.get('scope')})", fontsize=9)
        ax.set_xlabel("excess loss (policy - reference)", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("excess-loss distribution of the dumped sequences (dashed: lowest selected)")
    fig.tight_layout()
    return _save(fig, out_path)


# ----------------------------------------------------------------------------------------------
# (iv) k sweep


def k_sweep_table(runs: Iterable) -> list[dict]:
    """One row per run: label, loss_mode, k, held-out loss, selected fraction, mean excess (sel / unsel)."""
    rows = []
    for run in _runs(runs):
        m = (run.summary or {}).get("mean_second_half") or {}
        rows.append(
            {
                "run": run.label,
                "path": str(run.path),
                "loss_mode": run.loss_mode,
                "k": run.k,
                "eval_loss": run.eval_loss,
                "selected_fraction": m.get("selected_fraction"),
                "excess_selected": m.get("excess_selected"),
                "excess_unselected": m.get("excess_unselected"),
                "iterations": (run.summary or {}).get("iterations"),
            }
        )
    rows.sort(key=lambda r: (r["loss_mode"] != "slm", r["k"] if r["k"] is not None else 2.0, r["run"]))
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else "nan"
    return str(v)


def k_sweep_report(runs: Iterable, out_dir, name: str = "k_sweep") -> dict:
    """Held-out loss vs k of the SLM runs, CLM runs as horizontal lines: ``<name>.png``, ``.csv``, ``.md``.

    k and held-out loss come from each run's summary.json (``k``, ``eval_loss``; the last eval line of
    metrics.jsonl when eval_loss is missing). Returns the paths written and the table rows."""
    rows = k_sweep_table(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = [
        "run",
        "loss_mode",
        "k",
        "eval_loss",
        "selected_fraction",
        "excess_selected",
        "excess_unselected",
        "iterations",
        "path",
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r[c]) for c in cols})
    (out_dir / f"{name}.csv").write_text(buf.getvalue())
    clm = [r for r in rows if r["loss_mode"] == "clm" and r["eval_loss"] is not None]
    best = min(
        (r for r in rows if r["loss_mode"] == "slm" and r["eval_loss"] is not None),
        key=lambda r: r["eval_loss"],
        default=None,
    )
    md = [
        "| run | mode | k | held-out loss | vs CLM | selected fraction | excess sel. | excess unsel. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{r['eval_loss'] - clm[0]['eval_loss']:+.4f}" if clm and r["eval_loss"] is not None else ""
        mark = " **best**" if r is best else ""
        md.append(
            f"| {r['run']}{mark} | {r['loss_mode']} | {_fmt(r['k'])} | {_fmt(r['eval_loss'])} | {delta} | "
            f"{_fmt(r['selected_fraction'])} | {_fmt(r['excess_selected'])} | {_fmt(r['excess_unselected'])} |"
        )
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    slm = [r for r in rows if r["loss_mode"] == "slm" and r["k"] is not None and r["eval_loss"] is not None]
    if slm:
        ax.plot([r["k"] for r in slm], [r["eval_loss"] for r in slm], "o-", color="#c0392b", label="SLM")
        for r in slm:
            ax.annotate(
                f"{r['eval_loss']:.3f}", (r["k"], r["eval_loss"]), textcoords="offset points", xytext=(4, 5), fontsize=8
            )
    for i, r in enumerate(clm):
        ax.axhline(
            r["eval_loss"],
            color=["#555", "#999", "#222"][i % 3],
            ls="--",
            label=f"CLM ({r['run']}): {r['eval_loss']:.3f}",
        )
    ax.set_xlabel("k (fraction of tokens trained on)")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss vs k")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = _save(fig, out_dir / f"{name}.png")
    return {"png": png, "csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md", "rows": rows}


PLOT_KINDS = ("curves", "selection", "excess", "sweep")


def plot_runs(
    runs: Iterable,
    out_dir,
    kinds: Iterable[str] | None = None,
    k_sweep: bool = False,
    smooth_window: int = 5,
    prefix: str = "",
) -> tuple[list[Path], list[str], str | None]:
    """``slm plot``: the plots of ``runs`` (:class:`Run` objects, or ``DIR`` / ``LABEL=DIR``) in ``out_dir``:

        <prefix>slm_vs_clm.png       held-out and training loss, SLM vs CLM                    (kind "curves")
        <prefix>selection_stats.png  selected fraction, excess loss of selected vs unselected   ("selection")
        <prefix>excess_hist.png      excess-loss histograms per dump (SLM runs with dumps)      ("excess")
        <prefix>k_sweep.png/.csv/.md held-out loss vs k, CLM as a line                          ("sweep")

    ``kinds``: some of PLOT_KINDS (default: all but "sweep", which ``k_sweep`` adds). Returns the files written,
    notes on the plots skipped, and the k sweep's markdown table (None without it). A run directory that is
    missing or unreadable raises FileNotFoundError / ValueError before anything is drawn."""
    loaded = _runs(runs)
    kinds = set(kinds or [k for k in PLOT_KINDS if k != "sweep" or k_sweep])
    out = Path(out_dir)
    written, notes, report = [], [], None
    slm = [r for r in loaded if r.loss_mode == "slm"]
    if "curves" in kinds:
        written.append(plot_loss_curves(loaded, out / f"{prefix}slm_vs_clm.png", smooth_window=smooth_window))
    if "selection" in kinds:
        if slm:
            written.append(plot_selection_stats(slm, out / f"{prefix}selection_stats.png", smooth_window=smooth_window))
        else:
            notes.append("no SLM run: skipping selection_stats.png")
    if "excess" in kinds:
        with_dumps = [r for r in slm if any((r.path / "selection_dumps").glob("iter_*.pt"))]
        for r in with_dumps:
            name = f"{prefix}excess_hist.png" if len(with_dumps) == 1 else f"{prefix}excess_hist_{r.path.name}.png"
            written.append(plot_excess_histograms(r.path, out / name))
        if not with_dumps:
            notes.append(
                "no selection_dumps/ in the SLM runs (train with --selection-dump-interval N): skipping excess_hist.png"
            )
    if "sweep" in kinds:
        rep = k_sweep_report(loaded, out, name=f"{prefix}k_sweep")
        written += [rep["png"], rep["csv"], rep["md"]]
        report = rep["md"].read_text()
    return written, notes, report
