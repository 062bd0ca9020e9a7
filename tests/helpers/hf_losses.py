"""transformers' own per-token cross-entropy on the fixed evaluation windows, the truth ``slm evaluate``,
``slm dynamics`` and the demo are compared with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def window_token_ce(model, prefix: str, seq: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """CE (float64) per label of the first ``samples`` windows of seq + 1 tokens (stride seq) of the indexed
    dataset ``prefix``, its documents in file order, and the loss mask (labels other than EOD): [samples, seq]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    toks = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])
    eod = json.loads(Path(prefix + ".json").read_text())["eod_token_id"]
    w = torch.from_numpy(np.stack([toks[i * seq : i * seq + seq + 1] for i in range(samples)]))
    with torch.no_grad():
        logits = model(input_ids=w[:, :-1]).logits.double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="none")
    return ce.reshape(samples, seq).numpy(), (w[:, 1:] != eod).numpy()
