"""Training data through megatron-core: indexed datasets -> GPTDataset -> BlendedMegatronDatasetBuilder.

Blending by weight, train/valid/test split, seeded shuffling, sequence packing and the loss mask at EOD are
megatron-core's. This module adds two things:

- one metadata check up front: every dataset of a blend must come from the same tokenizer, its
  vocabulary must be the model's (``<prefix>.json``, written by slm preprocess), and every token
  id in its ``.bin`` must lie inside that vocabulary (the id range is recorded in ``<prefix>.json`` for the
  ``.bin``'s size and mtime, and rescanned when either changes);
- a *positions twin*: the same GPTDataset built over a stand-in low-level dataset whose "tokens" are each
  token's global position in its ``.bin``. Given the same config and seed, megatron-core's own index
  building yields, for sample i, exactly where each of its tokens came from, through shuffling, packing
  and blending. Offline reference scores are looked up by those positions (megatron_slm.data.scores).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_slm.data.blend import parse_blend
from megatron_slm.errors import DataError


@dataclass
class TokenInfo:
    """What megatron-core's GPTDataset needs from a tokenizer; the data is already tokenized."""

    eod: int
    vocab_size: int
    fingerprint: str | None = None

    @property
    def unique_identifiers(self) -> dict:  # what megatron-core's index-cache hash records
        return {"class": "TokenInfo", "eod": self.eod, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, hex (the fingerprint of tokenizer files, dataset indexes and score sidecars)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_meta(prefix: str) -> dict:
    """``<prefix>.json`` of an indexed dataset, after checking its ``.bin``/``.idx`` exist."""
    p = Path(prefix)
    for suffix in (".bin", ".idx"):
        if not Path(str(p) + suffix).is_file():
            raise DataError(
                f"dataset '{prefix}': {p.name}{suffix} is missing; create it with slm preprocess "
                "(a data path is the prefix without .bin/.idx)"
            )
    meta_path = Path(str(p) + ".json")
    if not meta_path.is_file():
        raise DataError(
            f"dataset '{prefix}': {meta_path.name} (tokenizer metadata) is missing; rebuild it with slm preprocess"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"dataset '{prefix}': {meta_path.name} is not valid JSON ({exc}); rebuild it with slm preprocess"
        ) from None
    size = Path(f"{p}.bin").stat().st_size
    if "bin_bytes" in meta and size != meta["bin_bytes"]:
        raise DataError(
            f"dataset '{prefix}': {p.name}.bin has {size} bytes but was written with {meta['bin_bytes']}: it is "
            "truncated or corrupt; rebuild it with slm preprocess"
        )
    if "idx_sha256" in meta:
        if file_sha256(f"{p}.idx") != meta["idx_sha256"]:
            raise DataError(
                f"dataset '{prefix}': {p.name}.idx does not match its metadata (corrupt or replaced); rebuild it with slm preprocess"
            )
    return meta


SCAN_CHUNK = 1 << 24  # token ids read at a time when scanning a .bin (at most 64 MiB of int32 ids)


def scan_token_ids(prefix: str, vocab_size: int):
    """``(min id, max id, first)`` over the ids ``<prefix>.idx`` references in ``<prefix>.bin``, read in chunks
    (bounded memory); ``first`` is ``(position, id)`` of the first id outside [0, vocab_size), else None
    (then the scan stops there and min/max are partial)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix, mmap=True).index
    itemsize = np.dtype(index.dtype).itemsize
    end = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize if len(index) else 0
    size = Path(f"{prefix}.bin").stat().st_size
    if size < end:
        raise DataError(
            f"dataset '{prefix}': {Path(prefix).name}.bin has {size} bytes but its index needs {end}: it is "
            "truncated or corrupt; rebuild it with slm preprocess"
        )
    n = end // itemsize
    if n == 0:
        return 0, -1, None
    ids = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r", shape=(n,))
    lo, hi = None, None
    for start in range(0, n, SCAN_CHUNK):
        chunk = ids[start : start + SCAN_CHUNK]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        if cmin < 0 or cmax >= vocab_size:
            at = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            return cmin, cmax, (start + at, int(chunk[at]))
        lo, hi = cmin if lo is None else min(lo, cmin), cmax if hi is None else max(hi, cmax)
    return lo, hi, None


def check_token_ids(prefix: str, meta: dict, vocab_size: int) -> None:
    """Every token id of ``<prefix>.bin`` lies in [0, vocab_size) (an id past it trains silently with tensor
    parallelism and crashes without). Uses the range ``<prefix>.json`` records for the .bin's current size and
    mtime; otherwise scans the .bin once and records the range there (if the file is writable)."""
    bin_path = Path(f"{prefix}.bin")
    st = bin_path.stat()
    key = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    lo, hi = meta.get("min_token_id"), meta.get("max_token_id")
    if meta.get("token_ids_bin") == key and isinstance(lo, int) and isinstance(hi, int) and lo >= 0 and hi < vocab_size:
        return
    lo, hi, first = scan_token_ids(prefix, vocab_size)
    if first is not None:
        raise DataError(
            f"dataset '{prefix}': token id {first[1]} at position {first[0]} is outside the vocabulary "
            f"(vocab_size={vocab_size}); the .bin is corrupt or was tokenized with another tokenizer; rebuild it "
            "with slm preprocess"
        )
    meta.update(min_token_id=lo, max_token_id=hi, token_ids_bin=key)
    meta_path = Path(f"{prefix}.json")
    tmp = Path(f"{meta_path}.tmp-{os.getpid()}")
    try:  # atomic: ranks checking the same dataset at once each write the same content
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, meta_path)
    except OSError:  # read-only data: scan again next time
        tmp.unlink(missing_ok=True)


def token_info(blends, vocab_size: int | None, tokenizer_fingerprint: str | None = None) -> TokenInfo:
    """Check every dataset of every blend shares one tokenizer whose vocab matches the model."""
    metas = {prefix: read_meta(prefix) for blend in blends if blend for prefix in blend[0]}
    if not metas:
        raise DataError("no training data: set data.data_path (--data-path [weight] PREFIX ...)")
    fingerprints = {m.get("tokenizer_fingerprint") for m in metas.values()}
    vocabs = {m["vocab_size"] for m in metas.values()}
    eods = {m["eod_token_id"] for m in metas.values()}
    if len(fingerprints) > 1 or len(vocabs) > 1 or len(eods) > 1:
        detail = "; ".join(
            f"{p}: vocab {m['vocab_size']}, eod {m['eod_token_id']}, tokenizer {str(m.get('tokenizer_fingerprint'))[:12]}"
            for p, m in metas.items()
        )
        raise DataError(f"the datasets were tokenized with different tokenizers ({detail}); re-tokenize them with one")
    vocab, eod, fp = vocabs.pop(), eods.pop(), fingerprints.pop()
    if vocab_size is not None and vocab != vocab_size:
        raise DataError(
            f"the data was tokenized with vocab_size={vocab} but the model has vocab_size={vocab_size}; the "
            "tokenizer, policy and reference must share one vocabulary"
        )
    if tokenizer_fingerprint is not None and fp is not None and tokenizer_fingerprint != fp:
        raise DataError(
            "the data was tokenized with a different tokenizer file than data.tokenizer_model; re-tokenize it"
        )
    for prefix, meta in metas.items():
        check_token_ids(prefix, meta, vocab)
    return TokenInfo(eod=eod, vocab_size=vocab, fingerprint=fp)


SPLIT_NAMES = ("training", "validation", "test")


def check_split(data_cfg, num_samples: list[int]) -> None:
    """Every split with a share that is asked for samples (``num_samples``: train, validation, test), and the
    training split always, must get at least one document of every blended dataset: megatron-core cuts each dataset's documents by ``--split`` (its own rounding, used
    here) and loops forever computing the epochs of a split with no tokens. Nothing to check with
    --valid-data-path (no split of the training data)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if data_cfg.valid_data_path or not data_cfg.data_path:
        return
    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data_cfg.split))
    except (ValueError, AssertionError, ZeroDivisionError):
        raise DataError(f"--split {data_cfg.split!r} is not three non-negative shares like 969,30,1") from None
    fixes = {
        "training": "give the training split a larger share",
        "validation": "give the validation split a larger share, evaluate on --valid-data-path, or set --eval-iters 0",
    }
    for prefix in parse_blend(data_cfg.data_path)[0]:
        n = len(IndexedDataset(prefix, mmap=True).sequence_lengths)
        for name, bounds, wanted in zip(SPLIT_NAMES, matrix, num_samples):
            if bounds is None:  # a share of 0: not built (a validation share of 0 means no evaluation)
                empty = name == "training"
            else:
                empty = int(round(bounds[0] * n)) >= int(round(bounds[1] * n))
            if wanted and empty:
                raise DataError(
                    f"dataset '{prefix}' has {n} documents: --split {data_cfg.split} gives its {name} "
                    f"split none of them; {fixes.get(name, 'change --split')}"
                )


def dataset_config(data_cfg, seq_length: int, seed: int, info: TokenInfo) -> GPTDatasetConfig:
    train_blend = parse_blend(data_cfg.data_path)
    valid_blend = parse_blend(data_cfg.valid_data_path)
    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=info,
        path_to_cache=data_cfg.data_cache_path,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=True,
        create_attention_mask=False,
    )
    if valid_blend is not None:  # separate validation data: no split of the training blend
        return GPTDatasetConfig(blend_per_split=[train_blend, valid_blend, None], **common)
    return GPTDatasetConfig(blend=train_blend, split=data_cfg.split, **common)


def build_datasets(config, num_samples: list[int], positions: bool = False):
    """(train, valid, test) datasets of megatron-core; ``positions`` builds the positions twin instead."""
    cls = PositionsGPTDataset if positions else GPTDataset
    if config.split_matrix is not None:
        # megatron-core builds every split with a share, even one asked for no samples (our test split), and loops
        # forever on one without documents (a small dataset's 0.1%): such splits are not built
        config.split_matrix = [None if not n else b for b, n in zip(config.split_matrix, num_samples)]
    builder = BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, config)
    _build_node_local_caches(config, builder)
    return builder.build()


def _build_node_local_caches(config, builder) -> None:
    """Fill each node's own index cache once, when ``--data-cache-path`` is not shared between nodes.

    megatron-core builds the sample indices on global rank 0, writes them to the cache, and has every other rank
    read them: right for a cache on a shared file system, but the ranks of other nodes find nothing in a
    node-local one (local disk, /tmp) and fail. There, the first rank of each such node builds its node's copy
    first (megatron-core's single-process path, which builds and saves), and the node's other ranks read it. A
    node that sees rank 0's marker file shares rank 0's cache and builds nothing. Every rank must call this."""
    import torch.distributed as dist

    if not dist.is_initialized() or config.path_to_cache is None or dist.get_world_size() == 1:
        return
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    token = torch.randint(0, 2**62, (1,), dtype=torch.int64) if rank == 0 else torch.zeros(1, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        token = token.cuda()
    dist.broadcast(token, 0)  # the marker's name, new for each call: a stale marker cannot mislead
    cache = Path(config.path_to_cache)
    marker = cache / f".rank0-sees-this-{int(token.item()):x}"
    if rank == 0:
        cache.mkdir(parents=True, exist_ok=True)
        marker.touch()
    dist.barrier()
    if rank != 0 and local_rank == 0 and not marker.exists():  # this node's cache is its own
        cache.mkdir(parents=True, exist_ok=True)
        # megatron-core decides "build and save on a cache miss" by global rank 0 (GPTDataset: or no process
        # group); this node's first rank answers as rank 0 of no process group for a moment and does that work.
        real = dist.is_initialized, dist.get_rank
        dist.is_initialized, dist.get_rank = (lambda: False), (lambda group=None: 0)
        try:
            builder.build()
        finally:
            dist.is_initialized, dist.get_rank = real
    dist.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The positions twin


class _PositionsLowLevelDataset:
    """Stands in for an IndexedDataset: document i's "tokens" are its elements' global positions."""

    def __init__(self, indexed):
        self._indexed = indexed  # owns the .idx memory map that the arrays below view
        self.path_prefix = indexed.path_prefix
        self.sequence_lengths = indexed.sequence_lengths
        self.document_indices = indexed.document_indices
        self.starts = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)[:-1]])

    def __len__(self):
        return len(self.sequence_lengths)

    def get(self, idx, offset=0, length=None):
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self.starts[idx] + offset + np.arange(length, dtype=np.int64)


class PositionsGPTDataset(GPTDataset):
    """GPTDataset whose samples hold the global positions of their tokens instead of token ids."""

    @staticmethod
    def build_low_level_dataset(dataset_path, config):
        return _PositionsLowLevelDataset(GPTDataset.build_low_level_dataset(dataset_path, config))

    def __getitem__(self, idx):
        text, _ = self._query_document_sample_shuffle_indices(idx)
        # inputs' and labels' positions: the labels are the tokens whose losses are scored
        return {"positions": torch.from_numpy(text[:-1].copy()), "label_positions": torch.from_numpy(text[1:].copy())}
