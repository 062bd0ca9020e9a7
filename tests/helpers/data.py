"""Tiny real datasets for tests: random word text, a sentencepiece tokenizer trained on it, and indexed
datasets written by the project's own preprocessing tool."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = "the of a number integer matrix prime sum value function returns list given x y n".split()


def tiny_text_dataset(directory: Path, vocab: int = 128, seed: int = 0, lines: int = 300) -> Path:
    """Writes ``tok.model`` and the datasets ``train`` / ``valid`` under ``directory``; returns it."""
    import sentencepiece as spm

    from megatron_slm.data.preprocess import preprocess

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(8, 40))) for _ in range(lines)]
    cut = lines * 5 // 6
    (d / "train.txt").write_text("\n".join(text[:cut]))
    (d / "valid.txt").write_text("\n".join(text[cut:]))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(d / "tok"),
        vocab_size=vocab,
        model_type="bpe",
        eos_id=2,
        bos_id=1,
        unk_id=0,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    for name in ("train", "valid"):
        preprocess([d / f"{name}.txt"], d / name, d / "tok.model", workers=1, split_lines=True)
    return d
