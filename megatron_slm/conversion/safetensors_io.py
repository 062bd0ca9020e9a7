"""Weights as safetensors files the way transformers writes them: one ``model.safetensors``, or shards of at
most ``max_shard_bytes`` with a ``model.safetensors.index.json`` weight map."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_SHARD_BYTES = 5 * 1024**3


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
