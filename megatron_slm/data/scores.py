"""Offline reference scores: a per-token sidecar aligned with an indexed token dataset.

``<scores>.bin/.idx`` is itself a megatron-core indexed dataset with exactly the token dataset's sequence
and document structure: element j of sequence i is the reference's loss for predicting token j of
sequence i (NaN where the scoring run never saw that token as a label). ``<scores>.json`` ties it to the
token files (``.idx`` checksum, ``.bin`` size, tokenizer) and to the reference checkpoint.

Training looks scores up by global token position through the positions twin of its datasets
(megatron_slm.data.datasets.PositionsGPTDataset), so shuffling, packing and blending are handled by
megatron-core's own index code. Scores are computed in the windows of the scoring run's data config; the
manifest records that config (``scoring_flags``) and training refuses sidecars whose windows differ from
its own (``check_scoring_flags``): a run with the same data config reproduces online SLM exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_slm.data.datasets import file_sha256, parse_blend
from megatron_slm.errors import DataError

FORMAT = "megatron_slm.ref_scores.v1"
STORAGE = {"fp32": np.float32, "bf16": np.uint16}  # bf16 is stored as its raw 16 bits


def default_scores_prefix(token_prefix: str) -> str:
    return f"{token_prefix}_refscores"


def token_fingerprint(token_prefix: str) -> dict:
    """What a sidecar must agree with: the token dataset's index checksum and sizes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(token_prefix, mmap=True)
    return {
        "token_prefix": str(token_prefix),
        "token_idx_sha256": file_sha256(f"{token_prefix}.idx"),
        "token_bin_bytes": Path(f"{token_prefix}.bin").stat().st_size,
        "num_tokens": int(ds.sequence_lengths.sum()),
        "num_sequences": int(len(ds.sequence_lengths)),
    }


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp32":
        return values.astype(np.float32)
    return (
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
        .view(np.uint16)
    )


def from_storage(raw: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "fp32":
        return torch.from_numpy(np.asarray(raw, dtype=np.float32))
    return torch.from_numpy(np.asarray(raw, dtype=np.uint16).view(np.int16).copy()).view(torch.bfloat16).float()


def write_sidecar(scores_prefix: str, token_prefix: str, flat_values: np.ndarray, dtype: str, manifest: dict) -> None:
    """Write ``flat_values`` (one per token of ``token_prefix``, in file order) with its structure; atomic."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    tokens = IndexedDataset(token_prefix, mmap=True)
    tmp = f"{scores_prefix}.tmp"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=STORAGE[dtype])
    lengths, doc_starts = tokens.sequence_lengths, set(int(d) for d in tokens.document_indices[1:])
    start = 0
    for i, n in enumerate(lengths):
        builder.add_item(torch.from_numpy(to_storage(flat_values[start : start + n], dtype)))
        start += int(n)
        if i + 1 in doc_starts:
            builder.end_document()
    builder.finalize(f"{tmp}.idx")
    meta = dict(
        manifest,
        format=FORMAT,
        dtype=dtype,
        **token_fingerprint(token_prefix),
        scores_idx_sha256=file_sha256(f"{tmp}.idx"),
    )
    Path(f"{tmp}.json").write_text(json.dumps(meta, indent=2))
    # The manifest goes first and comes back last: a reader (or a kill) in between finds no sidecar, never a
    # new .bin under an old manifest.
    Path(f"{scores_prefix}.json").unlink(missing_ok=True)
    for suffix in (".bin", ".idx", ".json"):
        Path(f"{tmp}{suffix}").replace(f"{scores_prefix}{suffix}")


# ----------------------------------------------------------------------------------------------
# The data flags that decide in which window each token was scored

# What a manifest's "scoring" record must hold for training to compare it (older manifests lack some).
COMPARED = (
    "seq_length",
    "seed",
    "blend",
    "train_fraction",
    "split",
    "data_path",
    "num_samples",
    "train_iters",
    "global_batch_size",
)


def _train_fraction(data_cfg) -> float:
    """The share of each dataset's documents (from the front) that the training split uses."""
    if data_cfg.valid_data_path:  # a separate validation blend: training uses every document
        return 1.0
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    return float(parse_and_normalize_split(data_cfg.split)[0])


def scoring_flags(cfg, train_iters: int | None = None, fingerprints: list[dict] | None = None) -> dict:
    """A run's data flags as a scoring manifest records them (``fingerprints``: token_fingerprint of each
    data_path prefix, if already computed).

    Training sample i is the window that megatron-core's GPTDataset / BlendedDataset index code cuts for it,
    from: seq_length, seed, the blend (each dataset's token files and normalized weight), the share of the
    documents the training split holds (all of them with valid_data_path) and the number of training
    samples requested, train_iters x global_batch_size (it sets each dataset's number of epochs and so its
    shuffle). micro_batch_size, the parallel layout, eval_iters and the dataset paths move no training
    sample (megatron_slm.data.batches); the paths are recorded but compared by the files' content."""

    train_iters = cfg.train.train_iters if train_iters is None else train_iters
    prefixes, weights = parse_blend(cfg.data.data_path)
    fingerprints = fingerprints or [token_fingerprint(p) for p in prefixes]
    norm = [None] * len(prefixes) if weights is None else [float(w) / float(sum(weights)) for w in weights]
    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - informative only
        mcore = None
    return {
        "data_path": [str(x) for x in cfg.data.data_path],
        "split": cfg.data.split,
        "valid_data_path": [str(x) for x in cfg.data.valid_data_path] if cfg.data.valid_data_path else None,
        "seq_length": cfg.train.seq_length,
        "seed": cfg.train.seed,
        "global_batch_size": cfg.train.global_batch_size,
        "train_iters": train_iters,
        "num_samples": train_iters * cfg.train.global_batch_size,
        "train_fraction": _train_fraction(cfg.data),
        "blend": [
            {"weight": w, "token_idx_sha256": fp["token_idx_sha256"], "token_bin_bytes": fp["token_bin_bytes"]}
            for w, fp in zip(norm, fingerprints)
        ],
        "megatron_core_version": mcore,
    }


# What a resumed scoring run must share exactly with the parts it resumes: each decides some sample's window
# (train_iters too: with global_batch_size it sets each dataset's epochs, and so its shuffle).
RESUME_FLAGS = (
    ("data_path", "--data-path"),
    ("valid_data_path", "--valid-data-path"),
    ("split", "--split"),
    ("seq_length", "--seq-length"),
    ("seed", "--seed"),
    ("global_batch_size", "--global-batch-size"),
    ("train_iters", "--train-iters"),
    ("megatron_core_version", "megatron-core version"),
)


def scoring_flag_differences(recorded: dict, run: dict) -> list[tuple[str, str, str]]:
    """``(flag, recorded value, run value)`` for each flag of RESUME_FLAGS on which two scoring_flags records
    differ, and for the blend's token files (by content) when the paths agree."""
    fmt = lambda v: " ".join(map(str, v)) if isinstance(v, list) else "none" if v is None else str(v)  # noqa: E731
    out = [
        (flag, fmt(recorded.get(key)), fmt(run.get(key)))
        for key, flag in RESUME_FLAGS
        if recorded.get(key) != run.get(key)
    ]
    if recorded.get("data_path") == run.get("data_path"):
        why = _blend_difference(recorded.get("blend") or [], run["blend"])
        if why:
            out.append(("--data-path", fmt(recorded["data_path"]), f"{fmt(run['data_path'])}, but {why}"))
    return out


def _blend_difference(scored: list, run: list) -> str | None:
    if len(scored) != len(run):
        return f"{len(scored)} datasets, this run {len(run)}"
    ws, wr = [b["weight"] for b in scored], [b["weight"] for b in run]
    if any((a is None) != (b is None) or (a is not None and abs(a - b) > 1e-9) for a, b in zip(ws, wr)):
        fmt = lambda w: "/".join("size-proportional" if x is None else f"{x:.4g}" for x in w)  # noqa: E731
        return f"normalized weights {fmt(ws)}, this run {fmt(wr)}"
    for i, (a, b) in enumerate(zip(scored, run)):
        if (a["token_idx_sha256"], a["token_bin_bytes"]) != (b["token_idx_sha256"], b["token_bin_bytes"]):
            return f"dataset {i + 1} of the blend is other token files"
    return None


def _split_words(rec: dict, long: bool) -> str:
    if rec.get("valid_data_path"):
        return "all documents (--valid-data-path set)"
    share = f"the first {rec['train_fraction'] * 100:g}%"
    return (
        f"{share} of each dataset's documents (--split {rec['split']})" if long else f"{share} (--split {rec['split']})"
    )


def check_scoring_flags(sidecar: ScoreSidecar, run: dict) -> None:
    """Refuse a sidecar whose scores were computed in other windows than this run's (``run``: scoring_flags
    of the run), naming each differing flag with both values, or one that scored a token more than once."""
    rec = sidecar.meta.get("scoring") or {}
    problems, hints = [], []
    missing = [k for k in COMPARED if k not in rec]
    if "num_scored_more_than_once" not in sidecar.meta:
        missing.append("num_scored_more_than_once")
    if missing:
        problems.append(f"the manifest does not record {', '.join(missing)} (it was written before they were checked)")
    for flag in ("seq_length", "seed"):
        if flag in rec and rec[flag] != run[flag]:
            problems.append(f"{flag}: scored with {rec[flag]}, this run has {run[flag]}")
            hints.append(f"--{flag.replace('_', '-')} {rec[flag]}")
    if "blend" in rec and "data_path" in rec:
        why = _blend_difference(rec["blend"], run["blend"])
        if why:
            problems.append(
                f"data blend: scored with --data-path {' '.join(rec['data_path'])}, this run has "
                f"--data-path {' '.join(run['data_path'])} ({why})"
            )
            hints.append(f"--data-path {' '.join(rec['data_path'])}")
    if "train_fraction" in rec and "split" in rec and abs(rec["train_fraction"] - run["train_fraction"]) > 1e-9:
        problems.append(f"split: scored on {_split_words(rec, True)}, this run trains on {_split_words(run, False)}")
        hints.append(
            f"--valid-data-path {' '.join(rec['valid_data_path'])}"
            if rec.get("valid_data_path")
            else f"--split {rec['split']}" + (" without --valid-data-path" if run["valid_data_path"] else "")
        )
    if (
        all(k in rec for k in ("num_samples", "train_iters", "global_batch_size"))
        and run["num_samples"] > rec["num_samples"]
    ):
        G = run["global_batch_size"]
        problems.append(
            f"train_iters x global_batch_size: this run trains {run['train_iters']} x {G} = {run['num_samples']} "
            f"samples but the scoring run scored {rec['train_iters']} x {rec['global_batch_size']} = "
            f"{rec['num_samples']}, so the tokens of the later samples have no reference score"
        )
        hints.append(
            f"--train-iters {rec['num_samples'] // G} (or fewer)"
            if rec["num_samples"] >= G
            else f"--train-iters {rec['train_iters']} --global-batch-size {rec['global_batch_size']}"
        )
    if problems:
        fix = "rerun slm score-reference with this run's data flags"
        if hints:
            fix += f", or train with the scored ones: {' '.join(hints)}"
        raise DataError(
            f"score sidecar '{sidecar.prefix}' was computed under other data flags than this run's, so its "
            f"scores belong to other context windows or miss tokens: {'; '.join(problems)}; {fix}"
        )
    twice = sidecar.meta["num_scored_more_than_once"]
    if twice:
        raise DataError(
            f"score sidecar '{sidecar.prefix}' holds {twice} tokens that the scoring run scored more than once, each "
            f"time in another window: its {rec['train_iters']} x {rec['global_batch_size']} samples cover more than one "
            f"epoch of '{sidecar.token_prefix}', and a sidecar keeps one score per token, so offline SLM would differ "
            "from online SLM; train with --reference-mode online, or score and train fewer samples (--train-iters) "
            "than one epoch of each dataset"
        )


class ScoreSidecar:
    """Reads one dataset's sidecar after checking that it belongs to exactly these token files."""

    def __init__(self, token_prefix: str, scores_prefix: str | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = scores_prefix or default_scores_prefix(token_prefix)
        fix = f"score it with: torchrun ... -m megatron_slm.cli score-reference --data-path {token_prefix} --ref-load REF_CKPT"
        meta_path = Path(f"{self.prefix}.json")
        if not meta_path.is_file():
            raise DataError(f"no reference scores for dataset '{token_prefix}' (missing {meta_path}); {fix}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"score manifest {meta_path} is corrupt; {fix}") from None
        if self.meta.get("format") != FORMAT or self.meta.get("dtype") not in STORAGE:
            raise DataError(f"{meta_path} is not a {FORMAT} manifest; {fix}")
        for suffix in (".bin", ".idx"):
            if not Path(f"{self.prefix}{suffix}").is_file():
                raise DataError(f"score sidecar {self.prefix}{suffix} is missing; {fix}")
        current = token_fingerprint(token_prefix)
        if (
            current["token_idx_sha256"] != self.meta["token_idx_sha256"]
            or current["token_bin_bytes"] != self.meta["token_bin_bytes"]
        ):
            raise DataError(
                f"score sidecar '{self.prefix}' was computed for other token files than '{token_prefix}' "
                f"(index checksum or size differs: the dataset was rebuilt or the wrong sidecar is named); {fix}"
            )
        itemsize = np.dtype(STORAGE[self.meta["dtype"]]).itemsize
        expected = current["num_tokens"] * itemsize
        actual = Path(f"{self.prefix}.bin").stat().st_size
        if actual != expected:
            raise DataError(
                f"score sidecar {self.prefix}.bin has {actual} bytes, expected {expected} "
                f"({current['num_tokens']} tokens x {itemsize}): it is truncated or corrupt; {fix}"
            )
        if file_sha256(f"{self.prefix}.idx") != self.meta.get("scores_idx_sha256"):
            raise DataError(f"score sidecar {self.prefix}.idx does not match its manifest (corrupt); {fix}")
        scores = IndexedDataset(self.prefix, mmap=True)
        token_ds = IndexedDataset(token_prefix, mmap=True)
        if not (
            np.array_equal(scores.sequence_lengths, token_ds.sequence_lengths)
            and np.array_equal(scores.document_indices, token_ds.document_indices)
        ):
            raise DataError(
                f"score sidecar '{self.prefix}' is not aligned with '{token_prefix}' (document structure differs); {fix}"
            )
        self.values = np.memmap(f"{self.prefix}.bin", dtype=STORAGE[self.meta["dtype"]], mode="r")
        self.token_prefix = token_prefix
        self.token_fp = current

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """fp32 scores at global token positions (any shape); -1 (padding) gives NaN."""
        pos = positions.numpy().astype(np.int64)
        out = from_storage(self.values[np.clip(pos, 0, None)], self.meta["dtype"]).reshape(pos.shape)
        out[torch.from_numpy(pos < 0)] = float("nan")
        return out


class OfflineScores:
    """Reference token losses for samples of a (blended) dataset, from each component's sidecar."""

    def __init__(self, token_prefixes: list[str], scores_prefixes: list[str] | None = None, cfg=None):
        """``cfg``: the training run's config; its data flags must be the ones the sidecars were scored with
        (check_scoring_flags). Without it only the sidecars' own files are checked."""
        if scores_prefixes and len(scores_prefixes) != len(token_prefixes):
            raise DataError(
                f"reference.scores_path names {len(scores_prefixes)} sidecars for {len(token_prefixes)} datasets; "
                "give one per data_path prefix, in the same order"
            )
        self.sidecars = [
            ScoreSidecar(p, scores_prefixes[i] if scores_prefixes else None) for i, p in enumerate(token_prefixes)
        ]
        if cfg is not None:
            run = scoring_flags(cfg, fingerprints=[s.token_fp for s in self.sidecars])
            for sidecar in self.sidecars:
                check_scoring_flags(sidecar, run)

    def attach(self, token_mbs: list[dict], position_mbs: list[dict]) -> None:
        """Set ``mb['ref_loss']`` [b, s] for each micro-batch; refuses unscored tokens that train."""
        for mb, pmb in zip(token_mbs, position_mbs):
            ids = pmb.get("dataset_id", torch.zeros(pmb["label_positions"].shape[0], dtype=torch.long))
            ref = torch.empty(pmb["label_positions"].shape, dtype=torch.float32)
            for row, (d, pos) in enumerate(zip(ids.tolist(), pmb["label_positions"])):
                ref[row] = self.sidecars[d].lookup(pos)
            missing = torch.isnan(ref) & (mb["loss_mask"] > 0)
            if missing.any():
                d = int(ids[missing.nonzero()[0, 0]])
                raise DataError(
                    f"{int(missing.sum())} training tokens have no reference score in '{self.sidecars[d].prefix}': it was "
                    "scored with another data config (seq_length, seed, split, blend) or fewer samples than this run "
                    "uses; rerun slm score-reference with this run's data flags"
                )
            mb["ref_loss"] = torch.nan_to_num(ref, nan=0.0)
