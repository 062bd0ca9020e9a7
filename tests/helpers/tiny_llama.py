"""A tiny transformers Llama saved as a directory (``slm evaluate --load`` reads transformers directories): the
model of the evaluation tests, random weights from a seed."""

from __future__ import annotations

from pathlib import Path


def save_tiny_llama(directory: Path, vocab: int = 128, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, 64 positions, untied) with weights from ``seed``, saved
    with ``save_pretrained`` under ``directory``; returns it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(str(directory))
    return Path(directory)
