"""``slm evaluate``: mean token loss and perplexity of checkpoints on datasets, on a fixed set of samples.

The samples of a dataset do not depend on any seed: its documents (megatron-core IndexedDataset over
``<prefix>.bin/.idx``) concatenated in file order, cut into consecutive windows of seq_length + 1 tokens that
overlap by one token (window i covers tokens [i*S, i*S + S]; inputs are its first S tokens, labels its last S),
so every token after the first is predicted exactly once. As in training (GPTDataset, eod_mask_loss=True) a
label equal to the EOD token is masked. The first ``eval_samples`` windows are used (default: all). Every
checkpoint sees the same tokens, so losses compare pairwise. Data-parallel ranks split the windows into
contiguous parts; sums of loss and token counts are reduced over all ranks. As in training, every checkpoint
(the split's base and reference too) must record the tokenizer the data was made with (sha256 fingerprints).

Per-token losses (``window_token_losses``, also used by ``slm dynamics``): the loss of every label of the
windows, shape [windows, seq_length] in window order, with the loss mask, gathered to every rank or to rank 0
only. Each rank holds a float32 buffer of 4 bytes x windows x seq_length for it (1000 windows of 2048 tokens:
8 MB); evaluation sets are modest, training data never goes through this path.

Learnable vs not learnable (``--split-reference REF``). For each dataset, per valid (non-EOD) label x_i of its
windows: excess_i = L_base(x_i) - L_ref(x_i), base = ``--split-base`` (default: the first ``--load``). The top
Q = ``--split-ratio`` share of the valid tokens by excess, ranked over all of the dataset's evaluated tokens
together, round(Q x n) of them (``slm.num_selected``) with ties broken by position (earlier first,
``slm.top_k_mask``), are *learnable*: the tokens SLM with that reference would train on at the base's weights.
The other valid tokens are *not learnable*. The split is computed once per dataset and applied to every
checkpoint (paired): each row adds the mean loss and the token count of both parts.

Per-window sums. Each row also keeps, per window, its summed token loss (float64) and token count, and the same
within both parts of the split; ``write_outputs`` saves them as ``eval_windows.npz`` (layout: analysis/compare.py)
so that ``slm compare`` gives paired differences of two checkpoints with bootstrap intervals, no second forward
pass. A row's loss is the sum of its windows' loss sums over the sum of their token counts.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_slm.errors import CheckpointError, ConfigError, DataError, install_hint
from megatron_slm.log import progress_bar

SPLIT_FIELDS = ("learnable_loss", "learnable_tokens", "not_learnable_loss", "not_learnable_tokens")
DEFAULT_SPLIT_RATIO = 0.6  # the paper's k for its 1B models


def dataset_tokens(prefix: str) -> np.ndarray:
    """All token ids of an indexed dataset, its documents in file order (a memory map when contiguous)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    index = ds.index
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    itemsize = np.dtype(index.dtype).itemsize
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    expected = pointers[0] + np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
    if np.array_equal(pointers, expected):
        return np.memmap(
            f"{prefix}.bin", dtype=index.dtype, mode="r", offset=int(pointers[0]), shape=(int(lengths.sum()),)
        )
    return np.concatenate([ds[i] for i in range(len(ds))])


def num_windows(n_tokens: int, seq_length: int) -> int:
    return max(0, (n_tokens - 1) // seq_length)


def window(tokens: np.ndarray, i: int, seq_length: int, eod: int) -> dict:
    """Sample ``i``: tokens/labels shifted by one, loss_mask 0 where the label is EOD (GPTDataset's eod_mask_loss)."""
    text = torch.from_numpy(np.asarray(tokens[i * seq_length : i * seq_length + seq_length + 1], dtype=np.int64))
    labels = text[1:].contiguous()
    return {
        "tokens": text[:-1].contiguous(),
        "labels": labels,
        "loss_mask": (labels != eod).float(),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
    }


def window_loss_mask(tokens: np.ndarray, n: int, seq_length: int, eod: int) -> np.ndarray:
    """The loss mask of windows 0..n-1 as one bool array [n, seq_length] (the labels are tokens 1..n*S)."""
    labels = np.asarray(tokens[1 : n * seq_length + 1], dtype=np.int64).reshape(n, seq_length)
    return labels != eod


@dataclass
class EvalData:
    """A dataset as evaluation uses it: its tokens, the number of windows and its EOD id."""

    prefix: str
    tokens: np.ndarray
    windows: int
    eod: int


def resolve_checkpoint(path: str | Path) -> tuple[Path, int | None]:
    """A CKPT argument -> (directory holding the weights, its training iteration if known): a run root -> its
    latest iteration (``checkpoint.resolve``), an ``iter_*`` directory -> its own."""
    from megatron_slm import checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is not a directory")
    resolved = checkpoint.resolve(p)
    if resolved != p:  # a run root: the iteration its latest file names (also while resolve answers iter_N.old)
        return resolved, checkpoint.latest_iteration(p)
    return resolved, checkpoint.iteration_of(resolved)


def check_settings(
    seq_length: int,
    micro_batch_size: int,
    eval_samples: int | None,
    data_paths: list[str],
    command: str = "slm evaluate",
) -> None:
    """The flag checks shared by ``slm evaluate`` and ``slm dynamics``, before anything is loaded."""
    if seq_length < 1 or micro_batch_size < 1:
        raise ConfigError(f"--seq-length and --micro-batch-size must be >= 1 (got {seq_length}, {micro_batch_size})")
    if eval_samples is not None and eval_samples < 1:
        raise ConfigError(f"--eval-samples must be >= 1 (got {eval_samples})")
    if not data_paths:
        raise ConfigError(f"{command} needs --data-path PREFIX [PREFIX ...]")
    bad = [p for p in data_paths if re.fullmatch(r"[0-9.eE+-]+", p)]
    if bad:
        raise ConfigError(
            f"--data-path of {command} takes dataset prefixes, not blend weights (got {bad[0]}); "
            "each dataset is reported separately"
        )


def load_datasets(
    data_paths: list[str], sources: list[Path], configs: list, seq_length: int, eval_samples: int | None
) -> list[EvalData]:
    """Each prefix's tokens and window count, refused when a checkpoint's tokenizer, vocabulary or length does not
    fit (``sources``: every checkpoint whose losses are computed, the split's base and reference included)."""
    from megatron_slm.checkpoint.weights import check_tokenizer
    from megatron_slm.data.datasets import read_meta

    datasets = []
    checked = set()  # (checkpoint, data fingerprint): one check (and warning) per pair, not per dataset
    for prefix in data_paths:
        meta = read_meta(prefix)
        for d, m in zip(sources, configs):
            if int(meta["vocab_size"]) != int(m.vocab_size):
                raise DataError(
                    f"dataset '{prefix}' has vocabulary {meta['vocab_size']} but checkpoint '{d}' has "
                    f"{m.vocab_size}: evaluate it with a checkpoint of the same tokenizer"
                )
            fingerprint = meta.get("tokenizer_fingerprint")
            if (d, fingerprint) not in checked:
                checked.add((d, fingerprint))
                check_tokenizer(
                    str(d),
                    f"checkpoint '{d}'",
                    fingerprint,
                    tokenizer_of=f"the tokenizer of dataset '{prefix}'",
                    fix="Evaluate it with a checkpoint of that tokenizer, or re-tokenize the data with "
                    "the checkpoint's (slm preprocess)",
                )
        tokens = dataset_tokens(prefix)
        n = num_windows(len(tokens), seq_length)
        if eval_samples is not None:
            n = min(n, eval_samples)
        if n == 0:
            raise DataError(
                f"dataset '{prefix}' has {len(tokens)} tokens: no window of --seq-length {seq_length} + 1 tokens"
            )
        datasets.append(EvalData(prefix, tokens, n, int(meta["eod_token_id"])))
    for d, m in zip(sources, configs):
        if m.max_position_embeddings is not None and seq_length > m.max_position_embeddings:
            raise ConfigError(
                f"--seq-length {seq_length} exceeds checkpoint '{d}' max_position_embeddings "
                f"{m.max_position_embeddings}"
            )
    return datasets


def _rank_windows(n: int) -> tuple[int, int]:
    """This data-parallel rank's contiguous part [lo, hi) of n windows."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size


def _contributes() -> bool:
    """One contribution per data-parallel replica: its last pipeline stage, tensor-parallel rank 0."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def _window_losses(model, windows: list[dict], vocab_size: int, micro_batch_size: int) -> list[tuple]:
    """[(per-token loss [b, s] fp32, loss_mask [b, s])] per micro-batch of ``windows``, in window order; empty
    except on the last pipeline stage."""
    from megatron_slm.data.batches import to_device
    from megatron_slm.training.passes import score_pass

    out = []
    full = len(windows) // micro_batch_size * micro_batch_size
    groups = []
    if full:
        groups.append((windows[:full], micro_batch_size))
    if full < len(windows):  # the remainder: one smaller micro-batch (the schedule needs equal shapes per pass)
        groups.append((windows[full:], len(windows) - full))
    for items, b in groups:
        mbs = [{k: torch.stack([w[k] for w in items[s : s + b]]) for k in items[0]} for s in range(0, len(items), b)]
        to_device(mbs)
        losses = score_pass(model, mbs, vocab_size)
        if losses is not None:
            out.extend((loss, mb["loss_mask"].to(loss.device)) for mb, loss in zip(mbs, losses))
    return out


def local_losses(model, data: EvalData, seq_length: int, vocab_size: int, micro_batch_size: int) -> list[tuple]:
    """This rank's windows of ``data`` through ``model``: ``_window_losses`` of windows [lo, hi)."""
    lo, hi = _rank_windows(data.windows)
    windows = [window(data.tokens, i, seq_length, data.eod) for i in range(lo, hi)]
    return _window_losses(model, windows, vocab_size, micro_batch_size) if windows else []


def _per_window_sums(pairs: list[tuple], selects: list) -> torch.Tensor:
    """[rows, 2 x len(selects)] float64: per window (row of ``pairs``' micro-batches, in order) the sum of its
    masked losses and its masked token count, for each of ``selects`` (None: the loss mask alone, else a bool
    [rows, s] that narrows it)."""
    sizes = [loss.shape[0] for loss, _ in pairs]
    cols = []
    for select in selects:
        parts = [None] * len(pairs) if select is None else torch.split(select, sizes)
        s_, c_ = [], []
        for (loss, mask), part in zip(pairs, parts):
            mask = mask.double()
            if part is not None:
                mask = mask * part.to(device=mask.device, dtype=mask.dtype)
            s_.append((loss.double() * mask).sum(dim=1))
            c_.append(mask.sum(dim=1))
        cols += [torch.cat(s_), torch.cat(c_)]
    return torch.stack(cols, dim=1)


def gather_losses(pairs: list[tuple], n: int, seq_length: int, dst: int | None = None) -> np.ndarray | None:
    """Every rank's ``local_losses`` as one float32 array [n, seq_length] in window order, on every rank
    (``dst`` None) or on rank ``dst`` only (None elsewhere). Each rank allocates the full array (4 bytes x n x S)."""
    import torch.distributed as dist

    from megatron_slm.parallel import distributed

    buf = torch.zeros(n, seq_length, dtype=torch.float32, device=distributed.device())
    if pairs and _contributes():
        lo, _ = _rank_windows(n)
        rows = torch.cat([loss.float() for loss, _ in pairs])
        buf[lo : lo + rows.shape[0]] = rows.to(buf.device)
    # every other rank adds zeros: the sum is each loss exactly
    if dst is None:
        dist.all_reduce(buf)
    else:
        dist.reduce(buf, dst=dst)
        if dist.get_rank() != dst:
            return None
    return buf.cpu().numpy()


def window_token_losses(
    model, data: EvalData, seq_length: int, vocab_size: int, micro_batch_size: int, dst: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(losses float32 [n, S], loss_mask bool [n, S]) of ``data``'s windows through ``model``, gathered to every
    rank (``dst`` None) or to rank ``dst`` (None on the others). Losses at masked (EOD) labels are computed but
    meaningless; use the mask. Collective: every rank calls it."""
    pairs = local_losses(model, data, seq_length, vocab_size, micro_batch_size)
    losses = gather_losses(pairs, data.windows, seq_length, dst)
    if losses is None:
        return None
    return losses, window_loss_mask(data.tokens, data.windows, seq_length, data.eod)


def learnable_mask(base: np.ndarray, reference: np.ndarray, valid: np.ndarray, ratio: float) -> np.ndarray:
    """The learnable tokens: top ``ratio`` of the valid ones by excess = base - reference, ranked together (the
    array's row-major order = dataset order breaks ties, earlier first). Same definition as SLM's selection."""
    from megatron_slm import slm

    excess = slm.excess_loss(torch.from_numpy(np.asarray(base)), torch.from_numpy(np.asarray(reference)))
    return slm.top_k_mask(excess, torch.from_numpy(np.asarray(valid)), ratio, dim=None).numpy()


def _check_split(split_reference, split_base, split_ratio) -> float:
    if split_reference is None:
        if split_base is not None or split_ratio is not None:
            raise ConfigError(
                "--split-base and --split-ratio apply only with --split-reference CKPT: add it, or drop them"
            )
        return DEFAULT_SPLIT_RATIO
    ratio = DEFAULT_SPLIT_RATIO if split_ratio is None else float(split_ratio)
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"--split-ratio must be in (0, 1] (got {ratio})")
    return ratio


def evaluate(
    cfg,
    checkpoints: list[str],
    data_paths: list[str],
    eval_samples: int | None = None,
    split_reference: str | None = None,
    split_base: str | None = None,
    split_ratio: float | None = None,
) -> list[dict]:
    """Rows {checkpoint, iteration, dataset, loss, perplexity, tokens, windows, learnable_loss, learnable_tokens,
    not_learnable_loss, not_learnable_tokens, window_sums} for every (checkpoint, dataset); the split fields are
    None without ``split_reference``. ``window_sums``: name -> numpy array [windows] in window order, "loss_sum"
    (float64) and "tokens" (int64), with the split also "learnable_loss_sum", "learnable_tokens",
    "not_learnable_loss_sum" and "not_learnable_tokens"."""
    import torch.distributed as dist

    from megatron_slm import checkpoint
    from megatron_slm.model.loading import load_model
    from megatron_slm.parallel import distributed

    tr, par = cfg.train, cfg.parallel
    seq = tr.seq_length
    check_settings(seq, tr.micro_batch_size, eval_samples, data_paths)
    ratio = _check_split(split_reference, split_base, split_ratio)

    sources = [resolve_checkpoint(c) for c in checkpoints]
    configs = [checkpoint.read_model_config(str(d)) for d, _ in sources]
    split = []  # (role, resolved dir, model config) of the base and the reference
    if split_reference is not None:
        base_arg = split_base if split_base is not None else checkpoints[0]
        for role, arg in (("base", base_arg), ("reference", split_reference)):
            d, _ = resolve_checkpoint(arg)
            split.append((role, d, checkpoint.read_model_config(str(d))))
        if split[0][1] == split[1][1]:
            raise ConfigError(
                f"--split-base and --split-reference are the same checkpoint ({split[0][1]}): the "
                "excess loss would be 0 everywhere; give the reference model as --split-reference"
            )
    datasets = load_datasets(
        data_paths,
        [d for d, _ in sources] + [d for _, d, _ in split],
        configs + [m for _, _, m in split],
        seq,
        eval_samples,
    )

    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=tr.seed)
    # a bar on rank 0's terminal: one step per model pass over a dataset (the split's two, then each other --load)
    passes = len(split) + sum(d not in {sd for _, sd, _ in split} for d, _ in sources)
    bar = progress_bar(total=passes * len(datasets), desc="evaluate", unit="pass")
    masks = [None] * len(datasets)  # per dataset: learnable tokens, bool [windows, S]
    cached = {}  # base/reference passes reused when the same checkpoint is also a --load
    if split:
        local = {}
        for _, d, m in split:
            model = load_model(d, m, cfg.parallel, seed=tr.seed)
            local[d] = [local_losses(model, ds, seq, m.vocab_size, tr.micro_batch_size) for ds in datasets]
            bar.update(len(datasets))
            del model
        (_, base, _), (_, ref, _) = split
        for i, ds in enumerate(datasets):
            base_l = gather_losses(local[base][i], ds.windows, seq)
            ref_l = gather_losses(local[ref][i], ds.windows, seq)
            masks[i] = learnable_mask(base_l, ref_l, window_loss_mask(ds.tokens, ds.windows, seq, ds.eod), ratio)
        loads = {d for d, _ in sources}
        cached = {d: v for d, v in local.items() if d in loads}
        del local

    rows = []
    for (d, it), m, arg in zip(sources, configs, checkpoints):
        model = None if d in cached else load_model(d, m, cfg.parallel, seed=tr.seed)
        for i, ds in enumerate(datasets):
            pairs = cached[d][i] if d in cached else local_losses(model, ds, seq, m.vocab_size, tr.micro_batch_size)
            bar.update(0 if d in cached else 1)
            # per window: (loss sum, tokens), then the same on the learnable and the not-learnable tokens
            lo, hi = _rank_windows(ds.windows)
            parts = [None]
            if masks[i] is not None:
                learn = torch.from_numpy(masks[i][lo:hi])
                parts += [learn, ~learn]
            per = torch.zeros(ds.windows, 2 * len(parts), dtype=torch.float64, device=distributed.device())
            if pairs and _contributes():  # one contribution per data-parallel replica
                per[lo:hi] = _per_window_sums(pairs, parts).to(per.device)
            dist.all_reduce(per)  # every other rank adds zeros: each window's sums exactly
            per = per.cpu().numpy()
            sums = per.sum(axis=0)
            window_sums = {}
            for name, col in zip(("", "learnable_", "not_learnable_"), range(0, per.shape[1], 2)):
                window_sums[f"{name}loss_sum"] = per[:, col].copy()
                window_sums[f"{name}tokens"] = np.rint(per[:, col + 1]).astype(np.int64)
            total, count = float(sums[0]), float(sums[1])
            loss = total / count if count else float("nan")
            row = {
                "checkpoint": arg,
                "path": str(d),
                "iteration": it,
                "dataset": ds.prefix,
                "loss": loss,
                "perplexity": math.exp(loss) if count and loss < 700 else float("inf"),
                "tokens": int(count),
                "windows": ds.windows,
                **dict.fromkeys(SPLIT_FIELDS),
                "window_sums": window_sums,  # -> eval_windows.npz (write_outputs), not eval.json
            }
            if masks[i] is not None:
                lt, lc, nt, nc = (float(x) for x in sums[2:6])
                row.update(
                    learnable_loss=lt / lc if lc else None,
                    learnable_tokens=int(lc),
                    not_learnable_loss=nt / nc if nc else None,
                    not_learnable_tokens=int(nc),
                )
            rows.append(row)
        del model
    bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("checkpoint", "dataset", "loss", "perplexity", "tokens")
    body = [
        (r["checkpoint"], r["dataset"], f"{r['loss']:.6f}", f"{r['perplexity']:.4f}", str(r["tokens"])) for r in rows
    ]
    if any(r.get("learnable_tokens") is not None for r in rows):

        def cell(x, fmt):
            return "" if x is None else format(x, fmt)

        head += ("loss(learnable)", "tokens(learnable)", "loss(not learnable)", "tokens(not learnable)")
        body = [
            b + tuple(cell(r[k], ".6f" if k.endswith("loss") else "d") for k in SPLIT_FIELDS)
            for b, r in zip(body, rows)
        ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_outputs(rows: list[dict], out: str, settings: dict) -> list[str]:
    """eval.json, eval.csv, eval_windows.npz (rows with their "window_sums") and (several iterations, matplotlib
    present) eval.png under ``out``; returns notes."""
    from megatron_slm.analysis.compare import WINDOWS_FILE, save_windows

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    plain = [{k: v for k, v in r.items() if k != "window_sums"} for r in rows]
    (d / "eval.json").write_text(json.dumps({"settings": settings, "results": plain}, indent=2) + "\n")
    if rows and all("window_sums" in r for r in rows):
        save_windows(rows, d / WINDOWS_FILE, settings)
    else:  # a stale file of an earlier run must not pair with these rows
        (d / WINDOWS_FILE).unlink(missing_ok=True)
    fields = ["checkpoint", "path", "iteration", "dataset", "loss", "perplexity", "tokens", "windows", *SPLIT_FIELDS]
    with open(d / "eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    notes = []
    its = {r["checkpoint"]: r["iteration"] for r in rows}
    if len(its) >= 2 and all(i is not None for i in its.values()):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            notes.append(f"note: matplotlib is not installed: no eval.png ({install_hint('matplotlib')})")
            return notes
        fig, ax = plt.subplots(figsize=(6, 4))
        for prefix in dict.fromkeys(r["dataset"] for r in rows):
            pts = sorted((r["iteration"], r["loss"]) for r in rows if r["dataset"] == prefix)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=Path(prefix).name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean token loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(d / "eval.png", dpi=120)
        plt.close(fig)
    return notes
