"""Random text for the preprocessing tests, written as JSONL, and ``slm preprocess`` run as a command."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

PREPROCESS = [sys.executable, "-m", "megatron_slm.cli", "preprocess"]  # `slm preprocess` in a fresh interpreter
WORDS = (
    "the model selects tokens whose excess loss is high; a reference model scores every token of "
    "the corpus and only the top fraction enters the training loss. Rho one uses math text: "
    "integral sum prime 12 345 6789 x^2 + y^2 = z^2, café naïve über — “quotes” 数学"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path: Path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


def preprocess_cli(*args, cwd):
    """``slm preprocess ARGS`` in a fresh interpreter; the CompletedProcess (text output)."""
    return subprocess.run([*PREPROCESS, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)
