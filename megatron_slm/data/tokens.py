"""Token files and fixed-length training samples.

A token file is a pair ``<prefix>.npy`` (a flat int32 token stream with the EOD id after every document)
and ``<prefix>.json`` (its metadata: EOD id, vocabulary size, tokenizer, counts and the .npy's sha256).
``TokenSamples`` cuts the stream into non-overlapping windows of ``seq_length + 1`` tokens (documents are
packed across EOD) in a seeded order; ``micro_batches`` hands each data-parallel rank its share of a step.
"""
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

REBUILD = "rebuild it with python -m megatron_slm.data.demo_corpus --out DIR"
_META_KEYS = ("eod_token_id", "vocab_size", "tokenizer", "num_tokens", "num_documents", "sha256")


class DataError(ValueError):
    """A token file is missing, corrupt or inconsistent with its metadata."""


def _prefix(path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npy", ".json") else path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_token_file(path_prefix, documents: Sequence[Sequence[int]], eod_id: int, vocab_size: int,
                     tokenizer: Optional[str] = None) -> dict:
    """Write ``<prefix>.npy`` (documents joined, EOD after each) and ``<prefix>.json``; return the metadata."""
    prefix = _prefix(path_prefix)
    if not 0 <= eod_id < vocab_size:
        raise DataError(f"{prefix}: eod_id {eod_id} is outside the vocabulary [0, {vocab_size})")
    parts = [np.asarray(doc, dtype=np.int64) for doc in documents]
    stream = np.concatenate([x for doc in parts for x in (doc, np.array([eod_id]))]) if parts else np.zeros(0)
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise DataError(f"{prefix}: token ids must lie in [0, {vocab_size}); got [{stream.min()}, {stream.max()}]")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    npy = prefix.with_suffix(".npy")
    np.save(npy, stream.astype(np.int32))
    meta = {"eod_token_id": int(eod_id), "vocab_size": int(vocab_size),
            "tokenizer": None if tokenizer is None else str(tokenizer),
            "num_tokens": int(stream.size), "num_documents": len(parts), "dtype": "int32", "sha256": _sha256(npy)}
    prefix.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class TokenFile:
    """A validated, memory-mapped token file. ``path_prefix`` may also name the .npy or .json file."""

    def __init__(self, path_prefix, verify: bool = True):
        self.prefix = prefix = _prefix(path_prefix)
        npy, js = prefix.with_suffix(".npy"), prefix.with_suffix(".json")
        for p in (npy, js):
            if not p.is_file():
                raise DataError(f"token file {p} does not exist; check the path or {REBUILD}")
        try:
            meta = json.loads(js.read_text())
            missing = [k for k in _META_KEYS if k not in meta]
        except (ValueError, TypeError) as e:
            raise DataError(f"metadata {js} is not valid JSON ({e}); {REBUILD}") from None
        if missing:
            raise DataError(f"metadata {js} lacks {', '.join(missing)}; {REBUILD}")
        if verify and _sha256(npy) != meta["sha256"]:
            raise DataError(f"{npy} does not match the sha256 in {js.name} (corrupt or modified); {REBUILD}")
        try:
            tokens = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{npy} is not a readable .npy array ({e}); {REBUILD}") from None
        if tokens.dtype != np.int32 or tokens.ndim != 1:
            raise DataError(f"{npy} holds {tokens.dtype} of shape {tokens.shape}, expected a 1-D int32 stream; "
                            f"{REBUILD}")
        if len(tokens) != meta["num_tokens"]:
            raise DataError(f"{npy} has {len(tokens)} tokens but {js.name} says {meta['num_tokens']}; {REBUILD}")
        self.eod_id, self.vocab_size = int(meta["eod_token_id"]), int(meta["vocab_size"])
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"{npy} has token ids in [{tokens.min()}, {tokens.max()}], outside the vocabulary "
                            f"[0, {self.vocab_size}) of {js.name}; {REBUILD}")
        self.tokens, self.meta = tokens, meta
        self.tokenizer, self.num_documents = meta["tokenizer"], int(meta["num_documents"])

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.prefix)!r}, tokens={len(self)}, documents={self.num_documents})"


class TokenSamples:
    """Fixed-length samples: window ``w`` is ``tokens[w*s : w*s + s + 1]``; windows are visited in a
    permutation seeded with ``seed + epoch``, so any index >= 0 is valid (it wraps into later epochs)."""

    def __init__(self, token_file: Union[TokenFile, str, Path], seq_length: int, seed: int = 0):
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        self.seq_length, self.seed, self.eod_id = int(seq_length), int(seed), self.file.eod_id
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.num_windows = (len(self.file) - 1) // self.seq_length
        if self.num_windows < 1:
            raise DataError(f"{self.file.prefix}.npy has {len(self.file)} tokens, too few for one sample of "
                            f"seq_length {self.seq_length} (needs {self.seq_length + 1}); use a larger token file")
        self._epoch, self._perm = None, None

    def __len__(self) -> int:
        return self.num_windows

    def __iter__(self):  # one epoch; __getitem__ alone would wrap forever
        return (self[i] for i in range(len(self)))

    def window(self, index: int) -> int:
        """The window (position in the token stream, in units of seq_length) that sample ``index`` uses."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, j = divmod(int(index), self.num_windows)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
        return int(self._perm[j])

    def __getitem__(self, index: int) -> dict:
        s = self.seq_length
        start = self.window(index) * s
        chunk = torch.from_numpy(np.array(self.file.tokens[start:start + s + 1], dtype=np.int64))
        tokens = chunk[:-1]
        return {"tokens": tokens, "labels": chunk[1:],
                # predicting the first token of a document from the previous document's EOD has no context
                "loss_mask": (tokens != self.eod_id).to(torch.float32),
                "position_ids": torch.arange(s, dtype=torch.int64)}


def micro_batches(samples, step: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> list:
    """The micro-batches data-parallel rank ``dp_rank`` processes in training step ``step`` (0-based).

    The global batch is ``samples[step*G : (step+1)*G]``; rank r takes the r-th of ``dp_size`` contiguous
    equal parts and splits it into micro-batches of ``micro_batch_size``; tensors are stacked to [b, s].
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must lie in [0, dp_size) with dp_size >= 1, got dp_rank={dp_rank}, "
                         f"dp_size={dp_size}")
    if step < 0 or micro_batch_size < 1 or global_batch_size < 1:
        raise ValueError(f"step must be >= 0 and batch sizes >= 1, got step={step}, "
                         f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by micro_batch_size * "
                         f"data_parallel_size = {micro_batch_size} * {dp_size}; change one of them")
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    batches = []
    for start in range(first, first + per_rank, micro_batch_size):
        items = [samples[i] for i in range(start, start + micro_batch_size)]
        batches.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return batches
