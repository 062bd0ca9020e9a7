"""``slm compare``: the paired loss difference of two checkpoints of one ``slm evaluate`` run, with a block
bootstrap confidence interval, per dataset, within the learnable / not-learnable split, and per quarter.

Per-window losses. ``slm evaluate`` writes ``eval_windows.npz`` next to eval.json (``save_windows``; read back
with ``np.load(..., allow_pickle=False)``, no pickled objects). Row i of eval.json's "results" (one checkpoint on
one dataset) has, over its n evaluation windows in window order:

- ``row{i}_loss_sum`` float64 [n]: the summed token loss of each window's valid (non-EOD) labels;
- ``row{i}_tokens`` int64 [n]: the number of those labels;
- with ``--split-reference`` also ``row{i}_learnable_loss_sum`` / ``row{i}_learnable_tokens`` and
  ``row{i}_not_learnable_loss_sum`` / ``row{i}_not_learnable_tokens``: the same within each part of the split;

and per row ``checkpoint`` (the --load argument), ``path`` (the resolved directory), ``dataset`` (the prefix) and
``iteration`` (-1: unknown) as string / int arrays, ``format`` (1) and ``settings`` (eval.json's, as JSON). A row's
sums add up to its eval.json loss: loss = sum(loss_sum) / sum(tokens).

The difference. Checkpoints A and B were evaluated on the same windows, so each window gives a pair. Per dataset
(and part of the split, and quarter) the difference is the token-weighted mean loss of A minus that of B:
diff = sum_w sA_w / sum_w cA_w - sum_w sB_w / sum_w cB_w (negative: A has the lower loss). Its interval is a
percentile bootstrap over contiguous blocks of windows (``paired_bootstrap``: the exact draw is in its docstring)
that resamples the pairs, A and B together. Blocks, not single windows: consecutive windows come from the same
documents (documents are concatenated in file order and a long one spans many windows), so their losses are
correlated and an i.i.d. bootstrap over windows would give too narrow an interval. The default block of 16
windows is about n^(1/3) for the held-out sets this is used on (a few hundred to a few thousand windows, the
usual block-length rate), and 16 windows of 2048 tokens (32k tokens) span a typical long document. A difference is
*significant* when its interval excludes 0. Quarters: the windows cut into 4 contiguous parts [q n // 4,
(q + 1) n // 4), each with its own bootstrap, show whether a difference holds across the file or comes from one
part of it.

numpy only (no torch): a comparison re-runs in a second with other bootstrap settings, no forward pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from megatron_slm.errors import ConfigError, DataError

WINDOWS_FILE = "eval_windows.npz"
COMPARE_FILE = "compare.json"
FORMAT = 1
PARTS = ("learnable", "not_learnable")  # the split's parts, as in eval.json's column names
DEFAULT_BLOCK = 16
DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0


def _circular_block_sums(x: np.ndarray, length: int) -> np.ndarray:
    """[n]: sum of x[(s + t) % n] for t < length, for every start s (each block summed on its own, no prefix sums)."""
    ext = np.concatenate([x, x[: length - 1]])
    return np.lib.stride_tricks.sliding_window_view(ext, length).sum(axis=1)


def paired_bootstrap(
    sums_a,
    counts_a,
    sums_b,
    counts_b,
    block: int = DEFAULT_BLOCK,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """The paired difference of two token-weighted mean losses over the same n windows, with a percentile
    interval from a circular block bootstrap (Politis & Romano 1992) over windows.

    ``sums_a[w]`` / ``counts_a[w]``: the summed token loss and the token count of checkpoint A on window w (B
    likewise, the same windows in the same order). The statistic is the ratio-of-sums difference

        diff = sum(sums_a) / sum(counts_a) - sum(sums_b) / sum(counts_b).

    The resamples, exactly (an independent implementation that follows this matches to rounding):

        n = len(sums_a); b = min(block, n); m = ceil(n / b)
        rng = np.random.Generator(np.random.PCG64(seed))       # seeded once per call
        starts = rng.integers(0, n, size=(resamples, m))        # one call; block starts uniform in [0, n)
        resample r = windows (starts[r, j] + t) % n for j = 0..m-1, t = 0..b-1 in that order, the first n of them
                     (the last block is cut to n - (m - 1) b windows; a window drawn twice counts twice)
        stat[r] = the ratio-of-sums difference over resample r's windows, A and B on the same windows
        lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])   # numpy's default 'linear'

    Blocks wrap around the end (circular), so every window is equally likely to be drawn. A resample whose A or B
    token count is 0 has no statistic and is left out (``resamples_used`` says how many were kept; this happens
    only when almost all windows hold no token of a part of the split). ``significant``: the interval excludes 0.
    With b = n every resample is the whole set: the interval collapses to the difference (say so to the user:
    ``blocks`` is 1).

    Returns {diff, lo, hi, significant, loss_a, loss_b, tokens_a, tokens_b, windows, block, blocks, resamples,
    resamples_used, confidence, seed}; diff and the interval are NaN (and not significant) when A or B has no
    token at all.
    """
    arrays = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (sums_a, counts_a, sums_b, counts_b)]
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ConfigError(f"paired_bootstrap needs four arrays of one length (got {[a.shape[0] for a in arrays]})")
    if n < 1:
        raise ConfigError("paired_bootstrap needs at least one window")
    if int(block) < 1 or int(resamples) < 1:
        raise ConfigError(f"block size and resamples must be >= 1 (got {block}, {resamples})")
    if not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"confidence must be in (0, 1) (got {confidence})")
    sa, ca, sb, cb = arrays
    ta, tb = float(ca.sum()), float(cb.sum())
    loss_a = float(sa.sum()) / ta if ta else math.nan
    loss_b = float(sb.sum()) / tb if tb else math.nan
    b = min(int(block), n)
    m = -(-n // b)
    out = {
        "diff": loss_a - loss_b,
        "lo": math.nan,
        "hi": math.nan,
        "significant": False,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "tokens_a": int(round(ta)),
        "tokens_b": int(round(tb)),
        "windows": n,
        "block": b,
        "blocks": m,
        "resamples": int(resamples),
        "resamples_used": 0,
        "confidence": float(confidence),
        "seed": int(seed),
    }
    if not (ta and tb):
        return out
    rng = np.random.Generator(np.random.PCG64(seed))
    starts = rng.integers(0, n, size=(int(resamples), m))
    last = n - (m - 1) * b  # the length of the cut last block, 1..b

    def resampled(x: np.ndarray) -> np.ndarray:
        full, cut = _circular_block_sums(x, b), _circular_block_sums(x, last)
        return full[starts[:, : m - 1]].sum(axis=1) + cut[starts[:, m - 1]]

    ra, rca, rb, rcb = (resampled(x) for x in arrays)
    ok = (rca > 0) & (rcb > 0)
    stats = ra[ok] / rca[ok] - rb[ok] / rcb[ok]
    out["resamples_used"] = int(ok.sum())
    if stats.size:
        alpha = (1.0 - float(confidence)) / 2.0
        lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
        out.update(lo=float(lo), hi=float(hi), significant=bool(lo > 0.0 or hi < 0.0))
    return out


# ----------------------------------------------------------------------------------------------
# eval_windows.npz


def save_windows(rows: list[dict], path: str | Path, settings: dict | None = None) -> Path:
    """``eval_windows.npz`` at ``path`` from evaluate's rows (each with its "window_sums": name -> array [n]);
    the layout is in the module docstring."""
    arrays = {
        "format": np.array(FORMAT, dtype=np.int64),
        "checkpoint": np.array([str(r["checkpoint"]) for r in rows], dtype=str),
        "path": np.array([str(r.get("path", r["checkpoint"])) for r in rows], dtype=str),
        "dataset": np.array([str(r["dataset"]) for r in rows], dtype=str),
        "iteration": np.array([-1 if r.get("iteration") is None else int(r["iteration"]) for r in rows], np.int64),
        "settings": np.array(json.dumps(settings or {}), dtype=str),
    }
    for i, r in enumerate(rows):
        for name, values in r["window_sums"].items():
            dtype = np.int64 if name.endswith("tokens") else np.float64
            arrays[f"row{i}_{name}"] = np.asarray(values, dtype=dtype)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def load_windows(eval_dir: str | Path) -> list[dict]:
    """The rows of ``eval_dir``/eval_windows.npz: [{checkpoint, path, dataset, iteration, window_sums}], in
    eval.json's row order; settings under each row's "settings" (the same dict)."""
    f = Path(eval_dir) / WINDOWS_FILE
    if not f.is_file():
        raise DataError(
            f"'{f}' not found: run 'slm evaluate --out {eval_dir}' (it writes per-window losses there) and compare "
            "checkpoints of that run"
        )
    try:
        with np.load(f, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"'{f}' is not a readable eval_windows file ({exc})") from None
    if int(data.get("format", -1)) != FORMAT:
        raise DataError(f"'{f}' has format {data.get('format')}, this version reads format {FORMAT}")
    settings = json.loads(str(data["settings"]))
    rows = []
    for i, (ck, p, ds, it) in enumerate(zip(data["checkpoint"], data["path"], data["dataset"], data["iteration"])):
        prefix = f"row{i}_"
        sums = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
        rows.append(
            {
                "checkpoint": str(ck),
                "path": str(p),
                "dataset": str(ds),
                "iteration": None if int(it) < 0 else int(it),
                "window_sums": sums,
                "settings": settings,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# slm compare


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _rows_of(rows: list[dict], name: str) -> tuple[tuple[str, str], dict[str, dict]]:
    """((--load argument, resolved path), its rows by dataset) of checkpoint ``name``: its --load argument as
    given to evaluate, else the same directory; the first --load if it was given twice."""
    keys = list(dict.fromkeys((r["checkpoint"], r["path"]) for r in rows))
    hit = next((k for k in keys if k[0] == name), None)
    if hit is None:
        hit = next((k for k in keys if _same_file(name, k[0]) or _same_file(name, k[1])), None)
    if hit is None:
        listed = ", ".join(k[0] for k in keys)
        raise ConfigError(f"checkpoint '{name}' is not in this evaluation; it has: {listed}")
    out = {}
    for r in rows:
        if (r["checkpoint"], r["path"]) == hit:
            out.setdefault(r["dataset"], r)
    return hit, out


def _quarters(n: int) -> list[tuple[int, int]]:
    return [(q * n // 4, (q + 1) * n // 4) for q in range(4)]


def compare(
    rows: list[dict],
    a: str,
    b: str,
    block: int = DEFAULT_BLOCK,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """A - B on every dataset both were evaluated on (``rows``: ``load_windows``): per dataset the rows "all",
    "learnable" and "not_learnable" (when the evaluation had the split) and "quarter 1".."quarter 4" (over all
    tokens), each a ``paired_bootstrap`` result plus {dataset, part, first_window, last_window}. Every interval uses
    the same seed: the same windows are drawn for the parts of one dataset."""
    key_a, rows_a = _rows_of(rows, a)
    key_b, rows_b = _rows_of(rows, b)
    if key_a == key_b:
        raise ConfigError(f"'{a}' and '{b}' are the same checkpoint of this evaluation: compare two different ones")
    results = []
    for ds, ra in rows_a.items():
        rb = rows_b.get(ds)
        if rb is None:
            continue
        wa, wb = ra["window_sums"], rb["window_sums"]
        n = len(wa["tokens"])
        if len(wb["tokens"]) != n or not np.array_equal(wa["tokens"], wb["tokens"]):
            raise DataError(f"'{a}' and '{b}' were not evaluated on the same windows of '{ds}': not paired")

        jobs = [("all", "", 0, n)]
        jobs += [(part, f"{part}_", 0, n) for part in PARTS if f"{part}_loss_sum" in wa and f"{part}_loss_sum" in wb]
        jobs += [(f"quarter {q}", "", lo, hi) for q, (lo, hi) in enumerate(_quarters(n), 1) if hi > lo]
        for part, key, lo, hi in jobs:
            r = paired_bootstrap(
                wa[f"{key}loss_sum"][lo:hi],
                wa[f"{key}tokens"][lo:hi],
                wb[f"{key}loss_sum"][lo:hi],
                wb[f"{key}tokens"][lo:hi],
                block,
                resamples,
                seed,
                confidence,
            )
            results.append({"dataset": ds, "part": part, "first_window": lo, "last_window": hi - 1, **r})
    if not results:
        raise DataError(f"'{a}' and '{b}' share no dataset in this evaluation")
    return {
        "a": key_a[0],
        "b": key_b[0],
        "a_path": key_a[1],
        "b_path": key_b[1],
        "block_size": int(block),
        "resamples": int(resamples),
        "seed": int(seed),
        "confidence": float(confidence),
        "results": results,
    }


def notes(result: dict, min_blocks: int = 10) -> list[str]:
    """Warnings about intervals resting on few blocks (with fewer than ``min_blocks`` the percentiles of the
    resampled differences are coarse and the interval is too narrow)."""
    few = sorted({(r["dataset"], r["part"], r["blocks"]) for r in result["results"] if r["blocks"] < min_blocks})
    if not few:
        return []
    where = ", ".join(f"{Path(d).name} {p} ({b})" for d, p, b in few[:6]) + (" ..." if len(few) > 6 else "")
    return [
        f"note: fewer than {min_blocks} blocks of {result['block_size']} windows behind some intervals: {where}; "
        "they are unreliable: evaluate more windows or pass a smaller --bootstrap-block-size"
    ]


def format_table(result: dict) -> str:
    pct = f"{100 * result['confidence']:g}%"
    head = ("dataset", "part", "windows", "tokens", "loss(A)", "loss(B)", "A - B", f"{pct} interval", "significant")

    def num(x, fmt=".4f"):
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    body = [
        (
            Path(r["dataset"]).name,
            r["part"],
            str(r["windows"]),
            str(r["tokens_a"]),
            num(r["loss_a"]),
            num(r["loss_b"]),
            num(r["diff"], "+.4f"),
            f"[{num(r['lo'], '+.4f')}, {num(r['hi'], '+.4f')}]",
            "yes" if r["significant"] else "no",
        )
        for r in result["results"]
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    title = (
        f"A = {result['a']}\nB = {result['b']}\n"
        f"paired difference A - B of the mean token loss (negative: A is better), {pct} percentile bootstrap over "
        f"blocks of {result['block_size']} windows, {result['resamples']} resamples, seed {result['seed']}"
    )
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_compare(result: dict, out: str | Path, eval_dir: str | Path | None = None) -> Path:
    """``compare.json`` under ``out``: {settings, results}; NaN written as null."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in result.items() if k != "results"}
    if eval_dir is not None:
        settings["eval_dir"] = str(eval_dir)
    results = [{k: _jsonable(v) for k, v in r.items()} for r in result["results"]]
    path = d / COMPARE_FILE
    path.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return path
