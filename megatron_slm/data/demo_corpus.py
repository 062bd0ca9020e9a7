"""A small two-domain corpus for the CPU demo, built from text present wherever torch is installed.

MATH    = docstrings of the ``sympy`` package (a torch dependency), without its tests/benchmarks;
GENERAL = docstrings of the Python standard library, without tests, idlelib, lib2to3, site-packages, ...
Each docstring (``ast.get_docstring``, >= 80 characters, deduplicated) is one document. The math documents
are split by a seeded shuffle into

    math_ref_train  35%  the reference model's high-quality fine-tuning set
    math_train      50%  the policy's continual-pretraining math
    math_heldout    15%  evaluation only

The general documents are split by a seeded shuffle into ``general_heldout`` (10%, evaluation only) and
``general`` (the rest, trimmed to ~45/55 of math_train's tokens, so that the demo's blend
``0.55 math_train 0.45 general`` draws each document about once). A SentencePiece BPE tokenizer (byte
fallback, identity normalization, so decoding returns the exact text) is trained on the non-held-out
documents. Everything lands in ``out_dir``: tokenizer.model, ``text/<name>.jsonl``, the megatron-core indexed
datasets ``<name>.bin/.idx/.json`` made from them by ``preprocess`` (slm preprocess), and
corpus.json (the summary).

    python -m megatron_slm.data.demo_corpus --out data/demo
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import platform
import random
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np

from megatron_slm.data.preprocess import preprocess

MIN_DOC_CHARS = 80
DEFAULT_MAX_MATH_CHARS = 3_000_000  # all of sympy is ~4.8M characters, more math than the stdlib can balance
MATH_FRACTION = 0.55  # target share of math tokens in the policy's blend
MATH_SPLITS = (("math_ref_train", 0.35), ("math_train", 0.50), ("math_heldout", 0.15))
GENERAL_HELDOUT = 0.10  # share of the general documents kept for evaluation
TOKENIZER_SAMPLE_CHARS = 6_000_000
EOD_ID = 2  # the tokenizer's eos id
SYMPY_SKIP = {"tests", "testing", "benchmarks", "__pycache__"}
STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "tkinter",
    "ensurepip",
    "pydoc_data",
    "__pycache__",
}


def sympy_root() -> Path:
    spec = importlib.util.find_spec("sympy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sympy is not installed; pip install sympy (torch normally brings it)")
    return Path(next(iter(spec.submodule_search_locations)))


def docstrings(root: Path, skip: set, seed: int, max_chars: int | None = None, exclude=()) -> list:
    """Docstrings (module, class, function) of the .py files under ``root``, in a seeded order of the sorted
    file paths, until ``max_chars`` characters are collected; short and duplicate ones are dropped."""
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1]))
    random.Random(seed).shuffle(files)  # a capped build still samples the whole package
    seen, docs, total = set(exclude), [], 0
    for path in files:
        if max_chars is not None and total >= max_chars:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old docstrings
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
                    total += len(doc)
    return docs


def collect_documents(seed: int = 0, max_math_chars: int | None = None, max_general_chars: int | None = None) -> dict:
    """{"math": [...], "general": [...]} document texts, deterministic for the installed sympy/Python."""
    math = docstrings(sympy_root(), SYMPY_SKIP, seed, max_math_chars or DEFAULT_MAX_MATH_CHARS)
    general = docstrings(Path(sysconfig.get_paths()["stdlib"]), STDLIB_SKIP, seed, max_general_chars, exclude=math)
    return {"math": math, "general": general}


def train_tokenizer(texts: list, model_path: Path, vocab_size: int, seed: int):
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    sample, total = [], 0
    for text in texts:
        if total >= TOKENIZER_SAMPLE_CHARS:
            break
        sample.append(text)
        total += len(text)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with open(model_path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=f,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=EOD_ID,
            pad_id=-1,
            num_threads=2,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 20,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            allow_whitespace_only_pieces=True,
            minloglevel=2,
        )
    return spm.SentencePieceProcessor(model_file=str(model_path))


def build_demo_corpus(
    out_dir,
    vocab_size: int = 2048,
    seed: int = 0,
    max_math_chars: int | None = None,
    max_general_chars: int | None = None,
) -> dict:
    """Build the demo corpus into ``out_dir`` and return a summary (also written to corpus.json).

    ``max_math_chars`` defaults to DEFAULT_MAX_MATH_CHARS; ``max_general_chars`` to all of the stdlib (the
    general documents are then trimmed to ~(1 - MATH_FRACTION) of policy_train's tokens).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    docs = collect_documents(seed, max_math_chars, max_general_chars)
    math, general = docs["math"], docs["general"]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(math))
    cum = np.cumsum([frac for _, frac in MATH_SPLITS])
    bounds = [0] + [round(c * len(math)) for c in cum[:-1]] + [len(math)]
    split = {name: [math[i] for i in order[a:b]] for (name, _), a, b in zip(MATH_SPLITS, bounds[:-1], bounds[1:])}
    general_order = rng.permutation(len(general))
    n_heldout = round(GENERAL_HELDOUT * len(general))
    general_heldout = [general[i] for i in sorted(general_order[:n_heldout])]
    general = [general[i] for i in sorted(general_order[n_heldout:])]
    t1 = time.perf_counter()

    train_texts = split["math_ref_train"] + split["math_train"] + general
    train_texts = [train_texts[i] for i in rng.permutation(len(train_texts))]
    model_path = out / "tokenizer.model"
    sp = train_tokenizer(train_texts, model_path, vocab_size, seed)
    t2 = time.perf_counter()

    general_ids = sp.encode(general)
    budget = sum(map(len, sp.encode(split["math_train"]))) * (1 - MATH_FRACTION) / MATH_FRACTION
    kept, total = [], 0
    for doc in general_ids:
        if total >= budget:
            break
        kept.append(doc)
        total += len(doc)
    texts = dict(split, general=general[: len(kept)], general_heldout=general_heldout)  # encode keeps the order

    files = {}
    (out / "text").mkdir(parents=True, exist_ok=True)
    for name, documents in texts.items():
        jsonl = out / "text" / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
        meta = preprocess([jsonl], out / name, model_path, workers=2, force=True)
        files[name] = {"tokens": meta["num_tokens"], "documents": meta["num_documents"]}
    vocab = sp.get_piece_size()
    math_tokens = files["math_train"]["tokens"]
    summary = {
        "out_dir": str(out.resolve()),
        "tokenizer": str(model_path.resolve()),
        "vocab_size": vocab,
        "eod_token_id": EOD_ID,
        "seed": seed,
        "files": files,
        "math_fraction_of_policy_data": round(math_tokens / (math_tokens + files["general"]["tokens"]), 4),
        "general_documents_available": len(general),
        "sources": {"sympy": importlib.metadata.version("sympy"), "python": platform.python_version()},
        "seconds": {
            "extract": round(t1 - t0, 2),
            "tokenizer": round(t2 - t1, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-math-chars", type=int, default=None)
    parser.add_argument("--max-general-chars", type=int, default=None)
    args = parser.parse_args(argv)
    summary = build_demo_corpus(args.out, args.vocab_size, args.seed, args.max_math_chars, args.max_general_chars)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
