"""Fixtures shared by several test modules. Plain helpers live in tests/helpers/ and tests/dist_helpers.py."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from helpers.corpus import random_text


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A tiny sentencepiece BPE model (vocab 300) trained here on a few KB of text."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [random_text(rng, 12) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=300,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def hf_json(tmp_path_factory) -> Path:
    """A small BPE tokenizer.json with a </s> special token, built with the tokenizers library."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = random.Random(1)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([random_text(rng, 12) for _ in range(200)], trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path
