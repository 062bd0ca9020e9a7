"""slm preprocess (megatron_slm.data.preprocess) and megatron_slm.data.tokenizer.

The truths are computed without the code under test: token ids come from sentencepiece / tokenizers used
directly, the output is read back with megatron-core's IndexedDataset, hashes with hashlib.
"""

import hashlib
import importlib.util
import json
import os
import pickle
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from helpers.corpus import PREPROCESS, preprocess_cli, random_text, write_jsonl

from megatron_slm.data import preprocess as pp
from megatron_slm.data.preprocess import PreprocessError, preprocess
from megatron_slm.data.tokenizer import TokenizerError, load_tokenizer

pytestmark = pytest.mark.unit


def _documents(seed: int, n: int):
    rng = random.Random(seed)
    docs = [random_text(rng, rng.randint(3, 40)) for _ in range(n)]
    docs[1] = "two  spaces,   three   spaces\ttab\nnew line  "  # whitespace runs survive as-is
    return docs


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mistral_model():
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


MISTRAL = _mistral_model()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_sentencepiece_tokenizer_matches_raw_sentencepiece(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(sp_model)
    assert (tok.kind, tok.vocab_size, tok.eod, tok.bos) == ("sentencepiece", 300, sp.eos_id(), sp.bos_id())
    assert tok.pad == -1 and tok.eos == tok.eod  # no pad piece: -1 never occurs in data
    assert tok.fingerprint == _sha256(sp_model) and tok.path == str(sp_model)
    for text in _documents(3, 5):
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("prime café") == sp.encode("prime café") and clone.fingerprint == tok.fingerprint
    json.dumps(tok.unique_identifiers)  # megatron-core's dataset cache hash serializes this


@pytest.mark.skipif(MISTRAL is None, reason="mistral-common (tokenizer.model.v1) is not installed")
def test_mistral_tokenizer_known_ids():
    tok = load_tokenizer(MISTRAL)
    assert tok.encode("Hello world") == [22557, 1526]  # Mistral-7B v0.1: [1, 22557, 1526] with BOS
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (32000, 1, 2, -1)


def test_hf_tokenizer_matches_tokenizers_library(hf_json):
    from tokenizers import Tokenizer as HF

    ref = HF.from_file(str(hf_json))
    tok = load_tokenizer(hf_json)
    vocab = ref.get_vocab(with_added_tokens=True)
    assert tok.kind == "huggingface" and tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    assert (tok.eod, tok.bos, tok.pad) == (vocab["</s>"], vocab["<s>"], vocab["<pad>"])
    text = "the model selects tokens"
    assert tok.encode(text) == ref.encode(text).ids
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ref.encode(text).ids
    assert load_tokenizer(hf_json, eod_token="<s>").eod == vocab["<s>"]


def test_bogus_tokenizer_files_are_refused(tmp_path, hf_json):
    junk = tmp_path / "x.model"
    junk.write_bytes(random.Random(5).randbytes(2000))
    not_tok = tmp_path / "config.json"
    not_tok.write_text('{"hidden_size": 16}')
    not_json = tmp_path / "broken.json"
    not_json.write_text("{ nope")
    no_eod = tmp_path / "no_eod.json"
    cfg = json.loads(hf_json.read_text())
    cfg["added_tokens"] = [t for t in cfg["added_tokens"] if t["content"] != "</s>"]
    cfg["model"]["vocab"].pop("</s>")
    no_eod.write_text(json.dumps(cfg))
    for path in (junk, not_tok, not_json, tmp_path / "missing.model", tmp_path):
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(path)
        msg = str(e.value)
        assert str(path) in msg and "expected a sentencepiece .model or a Hugging Face tokenizer.json" in msg
        assert "\n" not in msg
    with pytest.raises(TokenizerError, match="none of the end-of-document tokens"):
        load_tokenizer(no_eod)


# ----------------------------------------------------------------------------------------------- preprocess
def test_output_equals_sentencepiece_run_directly(tmp_path, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    eos = sp.eos_id()
    docs = _documents(7, 12)
    write_jsonl(tmp_path / "a.jsonl", docs[:8] + [""] + docs[8:10])  # one empty document
    (tmp_path / "b.txt").write_text(docs[10] + "\n" + docs[11] + "\n", encoding="utf-8")  # one document
    prefix = tmp_path / "out" / "train"
    meta = preprocess([tmp_path / "a.jsonl", tmp_path / "b.txt"], prefix, sp_model, workers=2)

    expected = [sp.encode(t) + [eos] for t in docs[:10]] + [sp.encode(docs[10] + "\n" + docs[11] + "\n") + [eos]]
    got, ds = _read(prefix)
    assert got == expected
    assert ds.index.dtype == np.uint16
    on_disk = json.loads((tmp_path / "out" / "train.json").read_text())
    assert {k: on_disk[k] for k in meta if k != "seconds"} == {k: meta[k] for k in meta if k != "seconds"}
    assert on_disk["num_documents"] == 11 and on_disk["num_empty_skipped"] == 1
    assert on_disk["num_tokens"] == sum(map(len, expected))
    assert on_disk["eod_token_id"] == eos and on_disk["vocab_size"] == 300 and on_disk["dtype"] == "uint16"
    assert on_disk["tokenizer_fingerprint"] == _sha256(sp_model)
    assert on_disk["idx_sha256"] == _sha256(str(prefix) + ".idx")
    assert on_disk["bin_bytes"] == os.path.getsize(str(prefix) + ".bin") == 2 * on_disk["num_tokens"]
    assert sorted(os.listdir(tmp_path / "out")) == ["train.bin", "train.idx", "train.json"]

    # --split-lines: each non-empty line of a text file is a document
    (tmp_path / "c.txt").write_text(f"{docs[0]}\n\n{docs[2]}\r\n   \n{docs[3]}", encoding="utf-8")
    preprocess([tmp_path / "c.txt"], tmp_path / "lines", sp_model, workers=1, split_lines=True)
    assert _read(tmp_path / "lines")[0] == [sp.encode(t) + [eos] for t in (docs[0], docs[2], docs[3])]


@pytest.mark.skipif(MISTRAL is None, reason="mistral-common (tokenizer.model.v1) is not installed")
def test_output_equals_mistral_sentencepiece(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL))
    docs = _documents(11, 6) + ["Hello world", "π ≈ 3.14159, e^{iπ} + 1 = 0  (Euler)\n\n  indented"]
    write_jsonl(tmp_path / "m.jsonl", docs, key="content")
    preprocess([tmp_path / "m.jsonl"], tmp_path / "m", MISTRAL, json_key="content", workers=2)
    got, _ = _read(tmp_path / "m")
    assert got == [sp.encode(t) + [2] for t in docs]
    assert got[6] == [22557, 1526, 2]


def test_workers_1_and_2_are_byte_identical(tmp_path, sp_model, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_BYTES", 300)  # many small tasks, more than the in-flight window
    docs = _documents(13, 150)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "d" / "part1.jsonl", docs[:100])
    write_jsonl(tmp_path / "d" / "sub" / "part2.jsonl", docs[100:])
    (tmp_path / "d" / ".hidden.jsonl").write_text("not json\n")  # hidden files are not inputs
    for w in (1, 2):
        preprocess([tmp_path / "d"], tmp_path / f"w{w}", sp_model, workers=w)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert _read(tmp_path / "w2")[0] == [sp.encode(t) + [sp.eos_id()] for t in docs]
    # a glob names the same files
    meta = preprocess([str(tmp_path / "d" / "**" / "*.jsonl")], tmp_path / "g", sp_model, workers=2)
    assert meta["num_documents"] == 150
    assert (tmp_path / "g.bin").read_bytes() == (tmp_path / "w1.bin").read_bytes()


def test_hf_tokenizer_preprocess(tmp_path, hf_json):
    from tokenizers import Tokenizer as HF

    ref = HF.from_file(str(hf_json))
    eod = ref.token_to_id("</s>")
    docs = _documents(17, 9)
    write_jsonl(tmp_path / "h.jsonl", docs)
    meta = preprocess([tmp_path / "h.jsonl"], tmp_path / "h", hf_json, workers=2)
    assert _read(tmp_path / "h")[0] == [ref.encode(t).ids + [eod] for t in docs]
    assert meta["tokenizer_kind"] == "huggingface" and meta["eod_token_id"] == eod


def test_gpt_dataset_reads_the_output_with_this_tokenizer(tmp_path, sp_model):
    """megatron-core's GPTDataset takes the Tokenizer as config.tokenizer; with one document its samples are
    the consecutive (seq_length + 1)-windows of that document."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = random_text(random.Random(19), 60)
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    preprocess([tmp_path / "one.txt"], tmp_path / "one", sp_model, workers=1)
    _, ds = _read(tmp_path / "one")
    stream = sp.encode(text) + [sp.eos_id()]
    L = 8
    cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=L,
        blend=None,
        split="1,0,0",
        tokenizer=load_tokenizer(sp_model),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    gpt = GPTDataset(ds, str(tmp_path / "one"), np.arange(1, dtype=np.int32), None, Split.train, cfg)
    assert len(gpt) == (len(stream) - 1) // L
    windows = set()
    for i in range(len(gpt)):
        s = gpt[i]
        assert s["tokens"][1:].tolist() == s["labels"][:-1].tolist() and bool(s["loss_mask"].all())
        windows.add(tuple(s["tokens"].tolist() + s["labels"][-1:].tolist()))
    assert windows == {tuple(stream[k * L : k * L + L + 1]) for k in range(len(gpt))}


# ------------------------------------------------------------------------------------------------- refusals
def test_refusals(tmp_path, sp_model):
    write_jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PreprocessError, match=r"^empty input"):
        preprocess([tmp_path / "empty.jsonl", tmp_path / "empty.txt"], tmp_path / "e", sp_model)
    with pytest.raises(PreprocessError, match="no inputs"):
        preprocess([], tmp_path / "e", sp_model)
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "e", sp_model)
    assert not list(tmp_path.glob("e.*"))

    good = [json.dumps({"text": "the model"}) for _ in range(20)]
    cases = {
        "bad.jsonl": (good + ["{not json"], r"bad\.jsonl line 21 is not valid JSON"),
        "nokey.jsonl": (good[:3] + [json.dumps({"body": "x"})], r"nokey\.jsonl line 4 has no key 'text'"),
        "list.jsonl": (["[1, 2]"], r"list\.jsonl line 1 is a JSON list"),
    }
    for name, (lines, pattern) in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        for workers in (1, 2):
            with pytest.raises(PreprocessError, match=pattern):
                preprocess([tmp_path / name], tmp_path / "failed", sp_model, workers=workers)
    left = [f.name for f in tmp_path.iterdir() if f.name.startswith("failed")]
    assert not left, f"a failed run must leave no output or partial files: {left}"

    (tmp_path / "ok.txt").write_text("the model selects tokens")
    preprocess([tmp_path / "ok.txt"], tmp_path / "o", sp_model)
    first = (tmp_path / "o.bin").read_bytes()
    with pytest.raises(PreprocessError, match=r"o\.bin and .*o\.idx already exist; pass --force"):
        preprocess([tmp_path / "ok.txt"], tmp_path / "o", sp_model)
    (tmp_path / "ok.txt").write_text("integral sum prime")
    preprocess([tmp_path / "ok.txt"], tmp_path / "o", sp_model, force=True)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert (tmp_path / "o.bin").read_bytes() != first
    assert _read(tmp_path / "o")[0] == [sp.encode("integral sum prime") + [sp.eos_id()]]


def test_cli_refusals_exit_2_with_one_line(tmp_path, sp_model):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "the model"}) + "\n")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01not a model" * 50)
    (tmp_path / "out.bin").write_bytes(b"")
    (tmp_path / "out.idx").write_bytes(b"")
    cases = [
        (["a.jsonl", "--tokenizer", "junk.model", "--output-prefix", "x"], "junk.model"),
        (["--tokenizer", str(sp_model), "--output-prefix", "x"], "no inputs"),
        (["a.jsonl", "missing.txt", "--tokenizer", str(sp_model), "--output-prefix", "x"], "missing.txt"),
        (["a.jsonl", "--tokenizer", str(sp_model), "--output-prefix", "out"], "--force"),
    ]
    procs = [
        subprocess.Popen([*PREPROCESS, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args, _ in cases
    ]
    for p, (args, needle) in zip(procs, cases):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2, (args, err)
        assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
        assert needle in err, err
    assert not (tmp_path / "x.bin").exists()


def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path, sp_model, hf_json):
    # issue 19: `preprocess_data.py same.bin --output-prefix same --force` overwrote its own input
    (tmp_path / "same.bin").write_text("the model selects tokens\n")
    res = preprocess_cli("same.bin", "--tokenizer", sp_model, "--output-prefix", "same", "--force", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: output same.bin is the input same.bin") and "--force" in res.stderr
    assert (tmp_path / "same.bin").read_text() == "the model selects tokens\n"
    assert not (tmp_path / "same.idx").exists()
    # the same file through a symlinked folder, and the tokenizer file as an output
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(PreprocessError, match=r"same\.bin is the input .*same\.bin"):
        preprocess([tmp_path / "same.bin"], tmp_path / "alias" / "same", sp_model, force=True)
    tok = tmp_path / "tok.json"
    tok.write_bytes(hf_json.read_bytes())
    with pytest.raises(PreprocessError, match=r"tok\.json is the input .*tok\.json"):
        preprocess([tmp_path / "same.bin"], tmp_path / "tok", tok, force=True)
    assert tok.read_bytes() == hf_json.read_bytes()
    assert pp.path_overlap(tmp_path / "d" / "x", [tmp_path / "d"]) == ("lies inside", str(tmp_path / "d"))
    assert pp.path_overlap(tmp_path / "d", [tmp_path / "d" / "x"]) == ("contains", str(tmp_path / "d" / "x"))
    assert pp.path_overlap(tmp_path / "d2", [tmp_path / "d", None]) is None  # a shared name prefix is no overlap
