"""Exports that evaluate: ``megatron-to-hf`` writes the tokenizer, and the directory runs in lm-evaluation-harness.

The truths are independent of the exporter: sentencepiece's own ``encode`` for token ids, the megatron model's
logits (read from its checkpoint, TP=1 PP=1) for the transformers model and for lm-eval's log-likelihoods.

- The sentencepiece -> tokenizer.json builder encodes exactly as sentencepiece on several tokenizer kinds
  (the project's test and demo settings, Llama-style dummy prefix, user symbols under NFKC, unigram, the real
  Mistral-7B model when mistral-common is installed) over fixed and random texts.
- A tiny random Llama with the project's tiny sentencepiece tokenizer (tests/helpers/data.py) goes through
  hf-to-megatron (which keeps the tokenizer) and megatron-to-hf; a "trained policy" checkpoint (no HF source)
  exports with --tokenizer-model. AutoTokenizer / AutoModelForCausalLM load both offline; lm-eval runs a local
  JSONL multiple-choice task through its command line with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1.
- Refusals and warnings: a tokenizer other than the recorded one is one ``error:`` line (exit 2); no recorded
  fingerprint is a warning; no tokenizer at all exports the weights with a warning naming --tokenizer-model.
"""

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import run_distributed
from helpers.data import WORDS, tiny_text_dataset

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("lm_eval")

from megatron_slm import cli  # noqa: E402
from megatron_slm.conversion import converters  # noqa: E402
from megatron_slm.conversion.sentencepiece_json import sentencepiece_to_tokenizers  # noqa: E402
from megatron_slm.conversion.tokenizer_export import TOKENIZER_DIR, TOKENIZER_FILES  # noqa: E402
from megatron_slm.model import build  # noqa: E402,F401 - import megatron before forking ranks

VOCAB = 128  # tiny_text_dataset's sentencepiece vocabulary, and the model's

# Several lines: unicode (accents, CJK, emoji, full-width digits, a ligature), digits, runs of spaces, tabs,
# leading/trailing whitespace, empty lines.
TEXT = (
    "  the sum of a prime number  is 12345 + 0.678 = x\n"
    "café naïve 中文 🙂 ＡＢＣ １２３ ﬁ ½\n"
    "\tmatrix\t\tvalue   of the\u3000function\u00a0returns\n"
    "\n"
    "given x, y: n = 42;   list[0] -> integer \n"
)

LMEVAL_DOCS = [
    {"question": "the sum of a prime", "choices": ["number", "matrix", "list"], "answer": 0},
    {"question": "the value of the function", "choices": ["returns", "integer", "x"], "answer": 1},
    {"question": "a list of", "choices": ["the", "y", "n"], "answer": 2},
    {"question": "given x and y the", "choices": ["sum", "prime", "value"], "answer": 0},
]


# ----------------------------------------------------------------------------------------------
# The sentencepiece -> tokenizer.json builder, against sentencepiece itself

CORPUS = [" ".join(random.Random(i).choice(WORDS) for _ in range(8 + i % 30)) for i in range(300)] + [
    "x = 12 + 345; y = 6.78 é ü ß 中文",
    "The sum\tof 1 2 3 4 5 6 7 8 9 0",
    "line one\nline two\n\nend",
]

SP_KINDS = {  # name -> sentencepiece trainer options (vocab sizes fit the corpus)
    "test_default_nfkc": dict(model_type="bpe", vocab_size=128),  # tests/helpers/data.py
    "demo_identity_bytes": dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
    ),  # megatron_slm/data/demo_corpus.py
    "llama_style": dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
    ),
    "nfkc_user_symbols": dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["\n", "<|sep|>", "<|s", "12"],
    ),
    "unigram": dict(model_type="unigram", vocab_size=45),
}


def _random_texts(n=400, seed=0):
    rng = random.Random(seed)
    alphabet = list("the sum of a prime x y 0123456789 +-*/=()[]{}<>|_.,;:!?'\"\\") + [
        " ",
        "  ",
        "\t",
        "\n",
        "\n\n",
        "\r\n",
        "é",
        "ü",
        "中",
        "🙂",
        "１",
        "ﬁ",
        "\u3000",
        "\u00a0",
        "\u200b",
        "▁",
        "<|sep|>",
        "<|s",
        "12",
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _mistral_model():
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


@pytest.mark.parametrize("kind", sorted(SP_KINDS) + ["mistral_7b_v1"])
def test_sentencepiece_builder_encodes_exactly_like_sentencepiece(kind, tmp_path):
    if kind == "mistral_7b_v1":
        path = _mistral_model()
        if path is None:
            pytest.skip("mistral-common (tokenizer.model.v1) is not installed; tools/setup.sh installs it")
        data = path.read_bytes()
    else:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_prefix=str(tmp_path / "m"),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
            **SP_KINDS[kind],
        )
        data = (tmp_path / "m.model").read_bytes()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    built, unk = sentencepiece_to_tokenizers(data, kind)
    assert unk == sp.id_to_piece(sp.unk_id())
    texts = [TEXT, "", " ", "\n", "\na", "  leading and trailing  ", "▁\n", *TEXT.splitlines(), *_random_texts()]
    bad = [t for t in texts if built.encode(t).ids != sp.encode(t)]
    assert not bad, (
        f"{kind}: {len(bad)} of {len(texts)} texts encode differently, e.g. {bad[0]!r}: "
        f"{sp.encode(bad[0])} (sentencepiece) vs {built.encode(bad[0]).ids}"
    )
    if sp.piece_to_id("<0x41>") != sp.unk_id():  # with byte fallback every text decodes back through the bytes
        assert built.decode(sp.encode(TEXT)) == sp.decode(sp.encode(TEXT))


# ----------------------------------------------------------------------------------------------
# Export and evaluate


def _main_captured(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["convert", *argv])
    return rc, out.getvalue(), err.getvalue()


def _megatron_logits(ckpt, sequences):
    """Full-vocab fp32 logits of the checkpoint (TP=1 PP=1) for each token list."""
    from megatron_slm.checkpoint import read_model_config
    from megatron_slm.model.loading import load_model

    m = read_model_config(ckpt)
    with converters.single_process():
        model = load_model(ckpt, m)
        return [converters.forward_logits(model, torch.tensor([s]))[0] for s in sequences]


def _pipeline(root, sequences):
    """One forked process: every conversion of this module, and the megatron logits they are checked against."""
    quiet = lambda *a, **k: None  # noqa: E731
    converters.hf_to_megatron(str(root / "hf"), str(root / "ck"), log=quiet)
    converters.megatron_to_hf(str(root / "ck"), str(root / "export"), log=quiet)  # the tokenizer hf-to-megatron kept
    # A trained policy's checkpoint: the data tokenizer's fingerprint, no HF source, no tokenizer files.
    shutil.copytree(root / "ck", root / "policy")
    shutil.rmtree(root / "policy" / TOKENIZER_DIR)
    (root / "policy" / converters.HF_SOURCE).unlink()
    # An older checkpoint that records no tokenizer.
    shutil.copytree(root / "policy", root / "unrecorded")
    meta = json.loads((root / "unrecorded" / "slm_model.json").read_text())
    meta["tokenizer"] = {"fingerprints": []}
    (root / "unrecorded" / "slm_model.json").write_text(json.dumps(meta))
    tok, other = str(root / "data" / "tok.model"), str(root / "other" / "tok.model")
    runs = {
        "policy_flag": [
            "--input",
            str(root / "policy"),
            "--output",
            str(root / "export_flag"),
            "--tokenizer-model",
            tok,
        ],
        "policy_hf_dir": [
            "--input",
            str(root / "policy"),
            "--output",
            str(root / "export_dir"),
            "--tokenizer-model",
            str(root / "export"),
        ],
        "mismatch": ["--input", str(root / "policy"), "--output", str(root / "bad"), "--tokenizer-model", other],
        "no_tokenizer": ["--input", str(root / "policy"), "--output", str(root / "weights_only")],
        "unrecorded_json": [
            "--input",
            str(root / "unrecorded"),
            "--output",
            str(root / "export_json"),
            "--tokenizer-model",
            str(root / "export" / "tokenizer.json"),
        ],
        "missing": [
            "--input",
            str(root / "policy"),
            "--output",
            str(root / "bad_missing"),
            "--tokenizer-model",
            str(root / "nope.model"),
        ],
        "not_a_tokenizer": [
            "--input",
            str(root / "policy"),
            "--output",
            str(root / "bad_json"),
            "--tokenizer-model",
            str(root / "hf" / "config.json"),
        ],
        "too_large": [
            "--input",
            str(root / "unrecorded"),
            "--output",
            str(root / "bad_vocab"),
            "--tokenizer-model",
            str(root / "big" / "tok.model"),
        ],
    }
    results = {k: _main_captured(["megatron-to-hf", *argv]) for k, argv in runs.items()}
    return results, _megatron_logits(str(root / "ck"), sequences)


def _lmeval_sequences(sp):
    """lm-eval's requests of LMEVAL_DOCS as token ids: context + " " + choice, split after the context."""
    out = []
    for doc in LMEVAL_DOCS:
        ctx = sp.encode(doc["question"])
        for choice in doc["choices"]:
            whole = sp.encode(doc["question"] + " " + choice)
            assert whole[: len(ctx)] == ctx
            out.append((len(ctx), whole))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_lm_eval")
    data = tiny_text_dataset(root / "data", vocab=VOCAB)  # the project's tiny tokenizer and indexed data
    for name, options in (
        ("other", SP_KINDS["test_default_nfkc"]),  # another tokenizer, same vocabulary size
        ("big", SP_KINDS["demo_identity_bytes"]),
    ):  # more tokens than the model has
        (root / name).mkdir()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_prefix=str(root / name / "tok"),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
            **options,
        )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=128,
            initializer_range=0.2,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(str(root / "hf"))
    shutil.copyfile(data / "tok.model", root / "hf" / "tokenizer.model")  # an HF directory with its tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(data / "tok.model"))
    requests = _lmeval_sequences(sp)
    random_ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    results, logits = run_distributed(
        _pipeline, 1, root, [random_ids, sp.encode(TEXT)] + [w for _, w in requests], timeout=300
    )[0]
    return {
        "root": root,
        "sp": sp,
        "data": data,
        "runs": results,
        "random_ids": random_ids,
        "logits": logits[:2],
        "requests": requests,
        "request_logits": logits[2:],
    }


@pytest.mark.parametrize("export", ["export", "export_flag", "export_dir"])
def test_export_loads_offline_with_auto_classes(exported, export):
    """(a) AutoTokenizer encodes as sentencepiece; token ids agree everywhere; (b) AutoModel's logits are the
    megatron model's."""
    root, sp = exported["root"], exported["sp"]
    for name in ("policy_flag", "policy_hf_dir"):
        rc, _, err = exported["runs"][name]
        assert rc == 0, err
    d = root / export
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert tok(TEXT)["input_ids"] == sp.encode(TEXT)  # no BOS/EOS added: the data has none inside documents
    for line in TEXT.splitlines():
        assert tok(line)["input_ids"] == sp.encode(line), line
    assert tok.decode(sp.encode("the sum of a prime")) == "the sum of a prime"
    meta = json.loads((exported["data"] / "train.json").read_text())
    assert tok.eos_token_id == sp.eos_id() == meta["eod_token_id"]  # generation stops at the data's EOD
    assert tok.bos_token_id == sp.bos_id() and tok.unk_token_id == sp.unk_id() and tok.pad_token_id is None
    cfg = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        assert cfg[key] == gen[key] == getattr(tok, key), key
    assert cfg.get("pad_token_id") is None and gen.get("pad_token_id") is None
    # The data tokenizer's bytes travel along: re-importing the export keeps its fingerprint.
    assert hashlib.sha256((d / "tokenizer.model").read_bytes()).hexdigest() == meta["tokenizer_fingerprint"]
    assert (d / "tokenizer.json").read_bytes() == (root / "export" / "tokenizer.json").read_bytes()

    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        for ids, expected in zip([exported["random_ids"], sp.encode(TEXT)], exported["logits"]):
            got = model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
            assert expected.std() > 0.5  # large enough logits for a layout mistake to show
            assert (got - expected).abs().max().item() < 1e-4


def test_lm_eval_runs_offline_on_local_task(exported, tmp_path):
    """(c) lm-eval's command line on the export with a local JSONL task: a finite metric, and its per-choice
    log-likelihoods are the megatron model's log-probabilities of sentencepiece's tokens."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LMEVAL_DOCS))
    (tasks / "slm_local_mc.yaml").write_text(
        "task: slm_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    export, out = exported["root"] / "export", tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={export},dtype=float32",
            "--tasks",
            "slm_local_mc",
            "--include_path",
            str(tasks),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]).read_text())
    acc = results["results"]["slm_local_mc"]["acc,none"]
    assert math.isfinite(acc) and 0 <= acc <= 1
    samples = [
        json.loads(line)
        for f in glob.glob(str(out / "**" / "samples_slm_local_mc_*.jsonl"), recursive=True)
        for line in Path(f).read_text().splitlines()
    ]
    assert len(samples) == len(LMEVAL_DOCS)
    got = [float(r[0][0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
    expected = []
    for (n_ctx, whole), logits in zip(exported["requests"], exported["request_logits"]):
        logp = torch.log_softmax(logits.double(), dim=-1)
        expected.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    assert len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3, (got, expected)


def _one_error_line(rc, err):
    return rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_tokenizer_fingerprint_mismatch_is_one_error_line(exported):
    root = exported["root"]
    rc, _, err = exported["runs"]["mismatch"]
    assert _one_error_line(rc, err), err
    recorded = json.loads((exported["data"] / "train.json").read_text())["tokenizer_fingerprint"]
    other = hashlib.sha256((root / "other" / "tok.model").read_bytes()).hexdigest()
    assert recorded[:12] in err and other[:12] in err and "--tokenizer-model" in err, err
    assert not (root / "bad").exists() and not (root / "bad.tmp").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(exported):
    root = exported["root"]
    rc, _, err = exported["runs"]["too_large"]
    assert _one_error_line(rc, err) and "400 tokens" in err and f"vocabulary is {VOCAB}" in err, err
    assert not (root / "bad_vocab").exists() and not (root / "bad_vocab.tmp").exists()


def test_unusable_tokenizer_paths_are_one_error_line(exported):
    root = exported["root"]
    for name, needle in (("missing", "does not exist"), ("not_a_tokenizer", "not a Hugging Face tokenizer")):
        rc, _, err = exported["runs"][name]
        assert _one_error_line(rc, err) and needle in err, (name, err)
    assert not any((root / n).exists() for n in ("bad_missing", "bad_missing.tmp", "bad_json", "bad_json.tmp"))


def test_unrecorded_fingerprint_exports_with_a_warning(exported):
    root, sp = exported["root"], exported["sp"]
    rc, out, err = exported["runs"]["unrecorded_json"]
    assert rc == 0, err
    assert "records no tokenizer fingerprint" in out
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "export_json"), local_files_only=True)
    assert tok(TEXT)["input_ids"] == sp.encode(TEXT) and tok.eos_token_id == sp.eos_id()


def test_export_without_tokenizer_writes_weights_and_says_how_to_add_it(exported):
    root = exported["root"]
    rc, out, err = exported["runs"]["no_tokenizer"]
    assert rc == 0, err
    assert "no tokenizer written" in out and "--tokenizer-model" in out, out
    d = root / "weights_only"
    assert not any((d / n).exists() for n in TOKENIZER_FILES)
    transformers.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)


def test_cli_help_names_the_tokenizer_flag():
    convert = cli.build_parser()._subparsers._group_actions[0].choices["convert"]
    text = convert._subparsers._group_actions[0].choices["megatron-to-hf"].format_help()
    assert "--tokenizer-model PATH" in text and "sentencepiece .model" in text
