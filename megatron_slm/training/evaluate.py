"""``slm evaluate``: mean token loss and perplexity of checkpoints on datasets, on a fixed set of samples.

The samples of a dataset do not depend on any seed: its documents (megatron-core IndexedDataset over
``<prefix>.bin/.idx``) concatenated in file order, cut into consecutive windows of seq_length + 1 tokens that
overlap by one token (window i covers tokens [i*S, i*S + S]; inputs are its first S tokens, labels its last S),
so every token after the first is predicted exactly once. As in training (GPTDataset, eod_mask_loss=True) a
label equal to the EOD token is masked. The first ``eval_samples`` windows are used (default: all). Every
checkpoint sees the same tokens, so losses compare pairwise. Data-parallel ranks split the windows into
contiguous parts; sums of loss and token counts are reduced over all ranks.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from megatron_slm.errors import CheckpointError, ConfigError, DataError


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
        return np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r", offset=int(pointers[0]),
                         shape=(int(lengths.sum()),))
    return np.concatenate([ds[i] for i in range(len(ds))])


def num_windows(n_tokens: int, seq_length: int) -> int:
    return max(0, (n_tokens - 1) // seq_length)


def window(tokens: np.ndarray, i: int, seq_length: int, eod: int) -> dict:
    """Sample ``i``: tokens/labels shifted by one, loss_mask 0 where the label is EOD (GPTDataset's eod_mask_loss)."""
    text = torch.from_numpy(np.asarray(tokens[i * seq_length: i * seq_length + seq_length + 1], dtype=np.int64))
    labels = text[1:].contiguous()
    return {"tokens": text[:-1].contiguous(), "labels": labels,
            "loss_mask": (labels != eod).float(), "position_ids": torch.arange(seq_length, dtype=torch.long)}


def _iteration_of(path: Path) -> int | None:
    m = re.fullmatch(r"iter_(\d+)(\.old)?", path.name)
    return int(m.group(1)) if m else None


def resolve_checkpoint(path: str) -> tuple[Path, int | None]:
    """A CKPT argument -> (directory holding the weights, its training iteration if known)."""
    from megatron_slm import checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is not a directory")
    resolved = checkpoint.resolve(p)
    return resolved, _iteration_of(resolved)


def _forward_sums(model, windows: list[dict], vocab_size: int, micro_batch_size: int) -> tuple[float, float]:
    """(sum of masked per-token losses, masked tokens) of this rank's windows; zeros except on the last stage."""
    from megatron_slm.data.batches import to_device
    from megatron_slm.training.passes import score_pass

    total, count = 0.0, 0.0
    full = len(windows) // micro_batch_size * micro_batch_size
    groups = []
    if full:
        groups.append((windows[:full], micro_batch_size))
    if full < len(windows):  # the remainder: one smaller micro-batch (the schedule needs equal shapes per pass)
        groups.append((windows[full:], len(windows) - full))
    for items, b in groups:
        mbs = [{k: torch.stack([w[k] for w in items[s: s + b]]) for k in items[0]} for s in range(0, len(items), b)]
        to_device(mbs)
        losses = score_pass(model, mbs, vocab_size)
        if losses is not None:
            for mb, loss in zip(mbs, losses):
                mask = mb["loss_mask"].to(loss.device)
                total += float((loss.double() * mask.double()).sum())
                count += float(mask.sum())
    return total, count


def evaluate(cfg, checkpoints: list[str], data_paths: list[str], eval_samples: int | None = None) -> list[dict]:
    """Rows {checkpoint, iteration, dataset, loss, perplexity, tokens, windows} for every (checkpoint, dataset)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_slm import checkpoint
    from megatron_slm.data.datasets import read_meta
    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    tr, par = cfg.train, cfg.parallel
    seq = tr.seq_length
    if seq < 1 or tr.micro_batch_size < 1:
        raise ConfigError(f"--seq-length and --micro-batch-size must be >= 1 (got {seq}, {tr.micro_batch_size})")
    if eval_samples is not None and eval_samples < 1:
        raise ConfigError(f"--eval-samples must be >= 1 (got {eval_samples})")
    if not data_paths:
        raise ConfigError("slm evaluate needs --data-path PREFIX [PREFIX ...]")
    bad = [p for p in data_paths if re.fullmatch(r"[0-9.eE+-]+", p)]
    if bad:
        raise ConfigError(f"--data-path of slm evaluate takes dataset prefixes, not blend weights (got {bad[0]}); "
                          "each dataset is reported separately")

    sources = [resolve_checkpoint(c) for c in checkpoints]
    configs = [checkpoint.read_model_config(str(d)) for d, _ in sources]
    datasets = []
    for prefix in data_paths:
        meta = read_meta(prefix)
        for (d, _), m in zip(sources, configs):
            if int(meta["vocab_size"]) != int(m.vocab_size):
                raise DataError(f"dataset '{prefix}' has vocabulary {meta['vocab_size']} but checkpoint '{d}' has "
                                f"{m.vocab_size}: evaluate it with a checkpoint of the same tokenizer")
        tokens = dataset_tokens(prefix)
        n = num_windows(len(tokens), seq)
        if eval_samples is not None:
            n = min(n, eval_samples)
        if n == 0:
            raise DataError(f"dataset '{prefix}' has {len(tokens)} tokens: no window of --seq-length {seq} + 1 tokens")
        datasets.append((prefix, tokens, n, int(meta["eod_token_id"])))
    for (d, _), m in zip(sources, configs):
        if m.max_position_embeddings is not None and seq > m.max_position_embeddings:
            raise ConfigError(f"--seq-length {seq} exceeds checkpoint '{d}' max_position_embeddings "
                              f"{m.max_position_embeddings}")

    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=tr.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows = []
    for (d, it), m, arg in zip(sources, configs, checkpoints):
        model = build_model(m, par, seed=tr.seed)
        checkpoint.load_weights(model, str(d), m, expected_vocab=m.vocab_size)
        model.eval()
        for prefix, tokens, n, eod in datasets:
            lo, hi = n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size
            windows = [window(tokens, i, seq, eod) for i in range(lo, hi)]
            total, count = _forward_sums(model, windows, m.vocab_size, tr.micro_batch_size) if windows else (0.0, 0.0)
            if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
                total, count = 0.0, 0.0  # one contribution per data-parallel replica
            sums = torch.tensor([total, count], dtype=torch.float64, device=distributed.device())
            dist.all_reduce(sums)
            total, count = float(sums[0]), float(sums[1])
            loss = total / count if count else float("nan")
            rows.append({"checkpoint": arg, "path": str(d), "iteration": it, "dataset": prefix, "loss": loss,
                         "perplexity": math.exp(loss) if count and loss < 700 else float("inf"),
                         "tokens": int(count), "windows": n})
        del model
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("checkpoint", "dataset", "loss", "perplexity", "tokens")
    body = [(r["checkpoint"], r["dataset"], f"{r['loss']:.6f}", f"{r['perplexity']:.4f}", str(r["tokens"])) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_outputs(rows: list[dict], out: str, settings: dict) -> list[str]:
    """eval.json, eval.csv and (several iterations, matplotlib present) eval.png under ``out``; returns notes."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    fields = ["checkpoint", "path", "iteration", "dataset", "loss", "perplexity", "tokens", "windows"]
    with open(d / "eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    notes = []
    its = {r["checkpoint"]: r["iteration"] for r in rows}
    if len(its) >= 2 and all(i is not None for i in its.values()):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            notes.append("note: matplotlib is not installed: no eval.png (pip install matplotlib)")
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
