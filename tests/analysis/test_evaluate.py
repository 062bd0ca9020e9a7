"""``slm evaluate``: loss/perplexity of checkpoints on fixed windows of datasets.

- The reported mean loss of a transformers Llama dir and of its hf_to_megatron conversion equals transformers'
  own per-token cross-entropy over the same windows (built here from the IndexedDataset, EOD labels masked).
- Samples are independent of --seed, and paired (every checkpoint counts the same tokens per dataset).
- TP=2 (two processes under torchrun) reports the TP=1 numbers.
- Errors are one ``error:`` line; a checkpoint (also the split's reference) of another tokenizer than the data's
  is one, even with the same vocabulary size.
- The learnable / not-learnable split (--split-reference) equals a numpy argsort split of transformers' per-token
  losses of the base and the reference (one process and two data-parallel ranks).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import run_distributed
from helpers.data import tiny_text_dataset
from helpers.hf_losses import window_token_ce

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
SEQ, SAMPLES, MBS = 32, 5, 2


def _quiet(*_a, **_k):
    pass


def _convert(src, dst):
    from megatron_slm.conversion.converters import hf_to_megatron

    hf_to_megatron(src, dst, dtype="fp32", verify=False, log=_quiet)


def _slm(args, nproc=1, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if nproc == 1:
        cmd = [PY, "-m", "megatron_slm.cli", *args]
    else:
        cmd = [
            PY,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(_port()),
            "-m",
            "megatron_slm.cli",
            *args,
        ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))


def _port():
    from megatron_slm.parallel.distributed import free_port

    return free_port()


def _reference_losses(model, prefix):
    """transformers' CE over the first SAMPLES windows of SEQ+1 tokens (stride SEQ), EOD labels masked."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    toks = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])
    eod = json.loads(Path(prefix + ".json").read_text())["eod_token_id"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(SAMPLES):
            w = torch.from_numpy(toks[i * SEQ : i * SEQ + SEQ + 1])
            logits = model(input_ids=w[None, :-1]).logits[0].double()
            ce = torch.nn.functional.cross_entropy(logits, w[1:], reduction="none")
            mask = w[1:] != eod
            total += float(ce[mask].sum())
            count += int(mask.sum())
    return total / count, count


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = tiny_text_dataset(root / "data", vocab=128)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
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
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(root / "hf"))
    run_distributed(_convert, 1, str(root / "hf"), str(root / "ck"))
    prefixes = [str(data / "train"), str(data / "valid")]
    expected = {p: _reference_losses(model, p) for p in prefixes}
    return {"root": root, "prefixes": prefixes, "expected": expected}


def _run(setup, out, extra=(), nproc=1, ckpts=None):
    root = setup["root"]
    ckpts = ckpts or [str(root / "hf"), str(root / "ck")]
    r = _slm(
        [
            "evaluate",
            "--load",
            *ckpts,
            "--data-path",
            *setup["prefixes"],
            "--seq-length",
            str(SEQ),
            "--eval-samples",
            str(SAMPLES),
            "--micro-batch-size",
            str(MBS),
            "--out",
            str(out),
            *extra,
        ],
        nproc,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((Path(out) / "eval.json").read_text())["results"]


def test_matches_transformers_seed_free_and_paired(setup, tmp_path):
    rows = _run(setup, tmp_path / "a", ["--seed", "1"])
    assert len(rows) == 4 and (tmp_path / "a/eval.csv").is_file()
    for r in rows:
        loss, count = setup["expected"][r["dataset"]]
        assert abs(r["loss"] - loss) < 1e-5, (r, loss)
        assert r["tokens"] == count and r["windows"] == SAMPLES
        assert abs(r["perplexity"] - np.exp(r["loss"])) < 1e-6 * r["perplexity"]
    other = _run(setup, tmp_path / "b", ["--seed", "777"])
    assert [(r["loss"], r["tokens"]) for r in other] == [(r["loss"], r["tokens"]) for r in rows]
    setup["tp1"] = rows


def test_tp2_equals_tp1(setup, tmp_path):
    rows = _run(
        setup, tmp_path / "tp2", ["--tensor-model-parallel-size", "2"], nproc=2, ckpts=[str(setup["root"] / "ck")]
    )
    for r in rows:
        loss, count = setup["expected"][r["dataset"]]
        assert abs(r["loss"] - loss) < 1e-5 and r["tokens"] == count


def test_iterations_of_a_run_are_plotted(setup, tmp_path):
    run = tmp_path / "run"
    for it in (50, 150):
        shutil.copytree(setup["root"] / "ck", run / f"iter_{it:07d}")
    (run / "latest_checkpointed_iteration.txt").write_text("150")
    rows = _run(setup, tmp_path / "out", ckpts=[str(run / "iter_0000050"), str(run)])  # a run root: its latest
    assert [r["iteration"] for r in rows] == [50, 50, 150, 150]
    assert (tmp_path / "out/eval.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["missing", "vocab", "nowindow"])
def test_errors_are_one_line(setup, tmp_path, case):
    root, prefixes = setup["root"], setup["prefixes"]
    args = ["evaluate", "--load", str(root / "ck"), "--data-path", prefixes[1], "--out", str(tmp_path)]
    if case == "missing":
        args[2] = str(root / "nope")
    elif case == "vocab":
        other = tiny_text_dataset(tmp_path / "d64", vocab=64, lines=40)
        args[4] = str(other / "valid")
    else:
        args += ["--seq-length", "1000000"]  # longer than the dataset
    r = _slm(args)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr


@pytest.fixture(scope="module")
def tokenizers(setup):
    """Datasets of a second sentencepiece tokenizer of the same vocabulary size (another seed), and copies of the
    transformers model that record (tokenizer.model) the tokenizer of setup's data and the other one."""
    root = setup["root"]
    other = tiny_text_dataset(root / "other", vocab=128, seed=1)
    for name, tok in (("hf_own_tok", root / "data" / "tok.model"), ("hf_other_tok", other / "tok.model")):
        shutil.copytree(root / "hf", root / name)
        shutil.copy(tok, root / name / "tokenizer.model")
    return {"other_valid": str(other / "valid"), "own": str(root / "hf_own_tok"), "other": str(root / "hf_other_tok")}


@pytest.mark.parametrize("case", ["data", "split_reference"])
def test_a_checkpoint_of_another_tokenizer_is_refused_even_with_the_same_vocab_size(setup, tokenizers, capsys, case):
    from megatron_slm.analysis.evaluate import load_datasets
    from megatron_slm.checkpoint import read_model_config
    from megatron_slm.cli import main

    t = tokenizers
    if case == "data":  # the checkpoint records the tokenizer of setup's data, the data is the other one's
        argv, foreign = ["--load", t["own"], "--data-path", t["other_valid"]], t["own"]
    else:  # the data's own checkpoint, but a split reference of the other tokenizer
        argv = ["--load", t["own"], "--data-path", setup["prefixes"][1], "--split-reference", t["other"]]
        foreign = t["other"]
    assert main(["evaluate", *argv, "--seq-length", str(SEQ)]) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert out.out == "" and len(lines) == 1 and lines[0].startswith("error:"), out.err
    assert f"checkpoint '{foreign}' was trained with another tokenizer" in lines[0]
    # the data's own tokenizer passes the same check
    (data,) = load_datasets(setup["prefixes"][1:], [Path(t["own"])], [read_model_config(t["own"])], SEQ, SAMPLES)
    assert data.windows == SAMPLES


# ----------------------------------------------------------------------------------------------
# Learnable vs not learnable (--split-reference): the truth is transformers' per-token CE of the base and the
# reference, split here with numpy's argsort (top round(Q n) valid tokens by excess, ties by position).


def _token_ce(model, prefix):
    """transformers' CE per label of the first SAMPLES windows [SAMPLES, SEQ] (float64) and the non-EOD mask."""
    return window_token_ce(model, prefix, SEQ, SAMPLES)


def _numpy_split(base, ref, mask, q):
    """(learnable bool [SAMPLES, SEQ], excess gap at the cut) by a stable argsort of the valid tokens."""
    excess = (base - ref)[mask]  # valid tokens in dataset order
    n = excess.size
    k = min(n, max(1, int(np.floor(q * n + 0.5))))
    order = np.argsort(-excess, kind="stable")  # stable: equal excess keeps the earlier token first
    flat = np.zeros(n, dtype=bool)
    flat[order[:k]] = True
    learn = np.zeros_like(mask)
    learn[mask] = flat
    ranked = excess[order]
    return learn, (ranked[k - 1] - ranked[k]) if k < n else np.inf


@pytest.fixture(scope="module")
def split(setup):
    from megatron_slm.conversion.converters import load_hf_model

    root = setup["root"]
    torch.manual_seed(1)  # a second tiny Llama of the same vocabulary: the reference
    cfg = transformers.LlamaConfig.from_pretrained(str(root / "hf"))
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(str(root / "ref"))
    base = load_hf_model(str(root / "hf"))
    ce = {p: {"base": _token_ce(base, p), "ref": _token_ce(ref, p)} for p in setup["prefixes"]}
    return {"ref": str(root / "ref"), "ce": ce}


def _check_split_rows(rows, split, q, models):
    """Every row's learnable / not-learnable mean and count against the numpy split of transformers' CE."""
    assert rows
    for r in rows:
        ce = split["ce"][r["dataset"]]
        (base, mask), (ref, _) = ce["base"], ce["ref"]
        learn, gap = _numpy_split(base, ref, mask, q)
        assert gap > 1e-4, gap  # fp32 (megatron) vs fp64 (here) cannot reorder the cut
        mine = ce[models[r["checkpoint"]]][0]
        rest = mask & ~learn
        assert r["learnable_tokens"] == int(learn.sum()) == int(np.floor(q * mask.sum() + 0.5))
        assert r["not_learnable_tokens"] == int(rest.sum()) and r["tokens"] == int(mask.sum())
        assert abs(r["learnable_loss"] - mine[learn].mean()) < 1e-5, (r, mine[learn].mean())
        assert abs(r["not_learnable_loss"] - mine[rest].mean()) < 1e-5, (r, mine[rest].mean())


def test_learnable_split_matches_numpy_on_transformers_losses(setup, split, tmp_path):
    ck = str(setup["root"] / "ck")
    rows = _run(
        setup, tmp_path / "s", ["--split-reference", split["ref"], "--split-ratio", "0.3"], ckpts=[ck, split["ref"]]
    )  # base: the first --load (the converted model)
    assert len(rows) == 4
    _check_split_rows(rows, split, 0.3, {ck: "base", split["ref"]: "ref"})
    # the reference's own loss is lower on the tokens chosen for a high base-minus-reference excess
    assert all(r["learnable_loss"] < r["not_learnable_loss"] for r in rows if r["checkpoint"] == split["ref"])
    settings = json.loads((tmp_path / "s/eval.json").read_text())["settings"]
    assert settings["split_reference"] == split["ref"] and settings["split_base"] == ck
    assert settings["split_ratio"] == 0.3
    header = (tmp_path / "s/eval.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["learnable_loss", "learnable_tokens", "not_learnable_loss", "not_learnable_tokens"]


def test_learnable_split_over_two_data_parallel_ranks(setup, split, tmp_path):
    # DP=2: 5 windows split 2 + 3, the per-token losses gathered; the base given as the transformers directory
    ck = str(setup["root"] / "ck")
    rows = _run(
        setup,
        tmp_path / "dp2",
        ["--split-reference", split["ref"], "--split-base", str(setup["root"] / "hf")],
        nproc=2,
        ckpts=[ck],
    )
    _check_split_rows(rows, split, 0.6, {ck: "base"})  # the default ratio


def test_rows_without_a_split_leave_its_columns_empty(tmp_path):
    from megatron_slm.analysis.evaluate import format_table, write_outputs

    row = {
        "checkpoint": "a",
        "path": "a",
        "iteration": None,
        "dataset": "d",
        "loss": 1.5,
        "perplexity": 4.48,
        "tokens": 10,
        "windows": 1,
        "learnable_loss": None,
        "learnable_tokens": None,
        "not_learnable_loss": None,
        "not_learnable_tokens": None,
    }
    write_outputs([row], str(tmp_path), {})
    lines = (tmp_path / "eval.csv").read_text().splitlines()
    assert lines[1] == "a,a,,d,1.5,4.48,10,1,,,," and "learnable" not in format_table([row])
    split_row = dict(row, learnable_loss=1.25, learnable_tokens=6, not_learnable_loss=1.875, not_learnable_tokens=4)
    assert format_table([split_row]).splitlines()[-1].split()[-4:] == ["1.250000", "6", "1.875000", "4"]


@pytest.mark.parametrize("case", ["ratio", "without", "missing", "same"])
def test_split_errors_are_one_line(setup, capsys, case):
    from megatron_slm.cli import main

    ck = str(setup["root"] / "ck")
    extra = {
        "ratio": ["--split-reference", str(setup["root"] / "hf"), "--split-ratio", "1.5"],
        "without": ["--split-ratio", "0.5"],
        "missing": ["--split-reference", str(setup["root"] / "nope")],
        "same": ["--split-reference", ck],
    }[case]
    assert main(["evaluate", "--load", ck, "--data-path", setup["prefixes"][1], *extra]) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert out.out == "" and len(lines) == 1 and lines[0].startswith("error:"), out.err
    assert {
        "ratio": "(0, 1]",
        "without": "only with --split-reference",
        "missing": "does not exist",
        "same": "same checkpoint",
    }[case] in lines[0]
