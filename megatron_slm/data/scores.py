"""Offline reference scores: a per-token sidecar aligned with an indexed token dataset.

``<scores>.bin/.idx`` is itself a megatron-core indexed dataset with exactly the token dataset's sequence
and document structure: element j of sequence i is the reference's loss for predicting token j of
sequence i (NaN where the scoring run never saw that token as a label). ``<scores>.json`` ties it to the
token files (``.idx`` checksum, ``.bin`` size, tokenizer) and to the reference checkpoint.

Training looks scores up by global token position through the positions twin of its datasets
(megatron_slm.data.datasets.PositionsGPTDataset), so shuffling, packing and blending are handled by
megatron-core's own index code. Scores are computed in the windows of the scoring run's data config; a
run with the same data config (seq_length, seed, split, blend) reproduces online SLM exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from megatron_slm.errors import DataError

FORMAT = "megatron_slm.ref_scores.v1"
STORAGE = {"fp32": np.float32, "bf16": np.uint16}  # bf16 is stored as its raw 16 bits


def default_scores_prefix(token_prefix: str) -> str:
    return f"{token_prefix}_refscores"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


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
        builder.add_item(torch.from_numpy(to_storage(flat_values[start:start + n], dtype)))
        start += int(n)
        if i + 1 in doc_starts:
            builder.end_document()
    builder.finalize(f"{tmp}.idx")
    for suffix in (".bin", ".idx"):
        Path(f"{tmp}{suffix}").replace(f"{scores_prefix}{suffix}")
    meta = dict(manifest, format=FORMAT, dtype=dtype, **token_fingerprint(token_prefix),
                scores_idx_sha256=file_sha256(f"{scores_prefix}.idx"))
    Path(f"{scores_prefix}.json").write_text(json.dumps(meta, indent=2))


class ScoreSidecar:
    """Reads one dataset's sidecar after checking that it belongs to exactly these token files."""

    def __init__(self, token_prefix: str, scores_prefix: str | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = scores_prefix or default_scores_prefix(token_prefix)
        fix = f"score it with: torchrun ... tools/score_reference.py --data-path {token_prefix} --ref-load REF_CKPT"
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
        if current["token_idx_sha256"] != self.meta["token_idx_sha256"] or current["token_bin_bytes"] != self.meta["token_bin_bytes"]:
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
        if not (np.array_equal(scores.sequence_lengths, token_ds.sequence_lengths)
                and np.array_equal(scores.document_indices, token_ds.document_indices)):
            raise DataError(f"score sidecar '{self.prefix}' is not aligned with '{token_prefix}' (document structure differs); {fix}")
        self.values = np.memmap(f"{self.prefix}.bin", dtype=STORAGE[self.meta["dtype"]], mode="r")
        self.token_prefix = token_prefix

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """fp32 scores at global token positions (any shape); -1 (padding) gives NaN."""
        pos = positions.numpy().astype(np.int64)
        out = from_storage(self.values[np.clip(pos, 0, None)], self.meta["dtype"]).reshape(pos.shape)
        out[torch.from_numpy(pos < 0)] = float("nan")
        return out


class OfflineScores:
    """Reference token losses for samples of a (blended) dataset, from each component's sidecar."""

    def __init__(self, token_prefixes: list[str], scores_prefixes: list[str] | None = None):
        if scores_prefixes and len(scores_prefixes) != len(token_prefixes):
            raise DataError(
                f"reference.scores_path names {len(scores_prefixes)} sidecars for {len(token_prefixes)} datasets; "
                "give one per data_path prefix, in the same order"
            )
        self.sidecars = [ScoreSidecar(p, scores_prefixes[i] if scores_prefixes else None) for i, p in enumerate(token_prefixes)]

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
                    "uses; rerun tools/score_reference.py with this run's data flags"
                )
            mb["ref_loss"] = torch.nan_to_num(ref, nan=0.0)
