"""What a run refuses before it starts (or on resume), so that its numbers cannot be silently meaningless:
a checkpoint of another architecture or tokenizer, and a resumed run whose LR schedule flags changed.
Also: check-config runs the same checks as train; the heatmap tool's checkpoint mode refuses a tokenizer that is
not the checkpoints' (same vocabulary size), and a transformers directory of another vocabulary is refused as
a megatron_slm checkpoint is."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import tiny_text_dataset

from megatron_slm.config import load_config
from megatron_slm.errors import ConfigError, DataError
from megatron_slm.training.resolve import resolve_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    d = tiny_text_dataset(root / "data")
    other = tiny_text_dataset(root / "other", seed=1)  # another sentencepiece model of the same vocab size
    assert (d / "tok.model").read_bytes() != (other / "tok.model").read_bytes()

    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=False,
        )
    )
    for name, tok in (("hf", d / "tok.model"), ("hf_other_tok", other / "tok.model")):
        model.save_pretrained(str(root / name))
        shutil.copy(tok, root / name / "tokenizer.model")
    return root


def _cfg(root, **flags):
    over = {"data": {"data_path": [str(root / "data" / "train")]}, "train": {"seq_length": 16}}
    for section, values in flags.items():
        over.setdefault(section, {}).update(values)
    return load_config(overrides=over)


def test_architecture_fields_the_user_did_not_set_come_from_the_checkpoint(data):
    draft = _cfg(data, checkpoint={"pretrained_checkpoint": str(data / "hf")}, slm={"loss_mode": "clm"})
    cfg = resolve_run(draft).config
    assert draft.model.num_layers is None  # the draft is not changed: the resolved config is a new, frozen one
    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        cfg.model.num_layers = 3
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        2,
        32,
        64,
        4,
        2,
    )
    assert (m.rotary_base, m.norm_epsilon, m.vocab_size) == (100000.0, 1e-5, 128)
    # the reference, too, takes its checkpoint's shape rather than the policy's
    cfg = resolve_run(_cfg(data, model={"preset": "tiny"}, reference={"load": str(data / "hf")})).config
    assert cfg.reference.model.num_layers == 2 and cfg.reference.model.rotary_base == 100000.0
    assert cfg.model.num_layers == 4  # the policy keeps its preset


def test_a_conflicting_architecture_is_one_error_listing_each_field(data):
    cfg = _cfg(
        data,
        checkpoint={"pretrained_checkpoint": str(data / "hf")},
        slm={"loss_mode": "clm"},
        model={"rotary_base": 10000.0, "norm_epsilon": 1e-6, "num_layers": 2},
    )
    with pytest.raises(ConfigError) as exc:
        resolve_run(cfg)
    msg = str(exc.value)
    assert "--rotary-base 10000.0 (config) vs 100000.0 (checkpoint)" in msg
    assert "--norm-epsilon 1e-06 (config) vs 1e-05 (checkpoint)" in msg and "num-layers" not in msg
    cfg = _cfg(data, reference={"load": str(data / "hf"), "model": {"rotary_base": 10000.0}})
    with pytest.raises(ConfigError, match=r"reference checkpoint.*--ref-rotary-base 10000.0 \(config\) vs 100000.0"):
        resolve_run(cfg)


def test_a_checkpoint_of_another_tokenizer_is_refused_even_with_the_same_vocab_size(data):
    cfg = _cfg(data, reference={"load": str(data / "hf_other_tok")})
    with pytest.raises(DataError, match="was trained with another tokenizer"):
        resolve_run(cfg)
    cfg = _cfg(data, checkpoint={"pretrained_checkpoint": str(data / "hf_other_tok")}, slm={"loss_mode": "clm"})
    with pytest.raises(DataError, match="policy's checkpoint .*another tokenizer"):
        resolve_run(cfg)
    resolve_run(_cfg(data, model={"preset": "tiny"}, reference={"load": str(data / "hf")}))  # the data's own tokenizer


def test_the_heatmap_tool_refuses_a_tokenizer_that_is_not_the_checkpoints(data, tmp_path, capsys):
    from megatron_slm import cli

    # the reference records the tokenizer given, the policy another one: refused before any model is built
    rc = cli.main(
        [
            "viz",
            "--policy",
            str(data / "hf_other_tok"),
            "--reference",
            str(data / "hf"),
            "--tokenizer",
            str(data / "data" / "tok.model"),
            "--text",
            "the sum of a prime",
            "--out",
            str(tmp_path / "p.html"),
        ]
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: the policy checkpoint"), err
    assert "was trained with another tokenizer" in lines[0] and "--tokenizer" in lines[0]
    assert not (tmp_path / "p.html").exists()


def test_a_transformers_directory_of_another_vocabulary_is_refused_on_load(data):
    from megatron_slm.checkpoint import load_weights, read_model_config
    from megatron_slm.errors import CheckpointError

    # the tokenizer's vocabulary (64) against the directory's (128); refused before the model is used
    with pytest.raises(CheckpointError, match="has vocab_size=128 but the run expects 64"):
        load_weights(None, str(data / "hf"), read_model_config(str(data / "hf")), expected_vocab=64)


def _train(root, save, *flags):
    cmd = [
        sys.executable,
        "-m",
        "megatron_slm.cli",
        "train",
        "--preset",
        "tiny",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--ffn-hidden-size",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--seq-length",
        "16",
        "--loss-mode",
        "clm",
        "--data-path",
        str(root / "data" / "train"),
        "--split",
        "99,1,0",
        "--log-interval",
        "1",
        "--save",
        str(save),
        "--data-cache-path",
        str(root / "cache"),
        *flags,
    ]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def test_checkpoints_record_the_tokenizer_and_a_foreign_one_is_refused(data, tmp_path):
    res = _train(data, tmp_path / "run", "--train-iters", "1")
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "run" / "iter_0000001" / "slm_model.json").read_text())
    assert meta["tokenizer"]["fingerprints"] == [hashlib.sha256((data / "data" / "tok.model").read_bytes()).hexdigest()]
    # the same run's checkpoint as the reference of a run on data made with another tokenizer
    other = _cfg(data, reference={"load": str(tmp_path / "run")})
    other.data.data_path = [str(data / "other" / "train")]
    with pytest.raises(DataError, match="another tokenizer"):
        resolve_run(other)


@pytest.mark.slow
def test_resume_with_changed_schedule_flags_is_refused_or_applied_explicitly(data, tmp_path):
    save = tmp_path / "run"
    assert _train(data, save, "--train-iters", "2", "--lr", "1e-3").returncode == 0
    res = _train(data, save, "--train-iters", "4", "--lr", "2e-3")
    assert res.returncode == 2 and res.stderr.count("error:") == 1, res.stderr
    assert "--lr 0.002 (checkpoint: 0.001)" in res.stderr
    # a longer run whose LR schedule is the same (the decay covers the 10 warm-up steps either way) is no change
    assert "--train-iters" not in res.stderr
    assert "--override-opt-param-scheduler" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((save / "iter_0000002" / "trainer_state.json").read_text())["config"]["train"]["lr"] == 1e-3

    keep = tmp_path / "keep"
    shutil.copytree(save, keep)
    res = _train(data, keep, "--train-iters", "3", "--lr", "2e-3", "--use-checkpoint-opt-param-scheduler")
    assert res.returncode == 0, res.stderr
    state = json.loads((keep / "iter_0000003" / "trainer_state.json").read_text())
    assert state["config"]["train"]["lr"] == 1e-3 and state["parts"]["scheduler"]["max_lr"] == 1e-3  # what ran

    res = _train(data, save, "--train-iters", "4", "--lr", "2e-3", "--override-opt-param-scheduler")
    assert res.returncode == 0, res.stderr
    state = json.loads((save / "iter_0000004" / "trainer_state.json").read_text())
    assert state["config"]["train"]["lr"] == 2e-3 and state["parts"]["scheduler"]["max_lr"] == 2e-3
    # the summary covers the whole run, both segments
    summary = json.loads((save / "summary.json").read_text())
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3, 4]
    assert summary["iterations"] == 4
    assert summary["mean_second_half"]["loss_all"] == pytest.approx(
        (train_rows[2]["loss_all"] + train_rows[3]["loss_all"]) / 2
    )


def _check_config(argv, capsys):
    from megatron_slm.cli import main

    rc = main(["check-config", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    sorted(
        str(p.relative_to(REPO))
        for p in [*(REPO / "launch" / "configs").glob("*.yaml"), *(REPO / "megatron_slm" / "configs").glob("*.yaml")]
    ),
)
def test_check_config_agrees_with_train_on_every_shipped_config(config, data, tmp_path, capsys):
    flags = [
        "--config",
        str(REPO / config),
        "--data-path",
        str(data / "data" / "train"),
        "--seq-length",
        "16",
        "--data-cache-path",
        str(tmp_path / "cache"),
    ]
    rc, err = _check_config([*flags, "--world-size", "1"], capsys)
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_slm.cli",
            "train",
            *flags,
            "--save",
            str(tmp_path / "s"),
            "--train-iters",
            "0",
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    first_error = [line for line in err.splitlines() if line.startswith("error:")]
    train_error = [line for line in train.stderr.splitlines() if line.startswith("error:")]
    assert (rc == 0) == (train.returncode == 0), (err, train.stderr)
    assert first_error == train_error


def test_a_split_that_gets_no_documents_is_one_error_and_unused_splits_are_not_built(tmp_path):
    """megatron-core loops forever building a split without documents: 60 documents and --split 998,2,0 give the
    validation split none, which is refused by name; the default split's 0.1% test split (never asked for samples)
    is not built, so the same small dataset trains with --eval-iters 0 (in a subprocess, under a timeout)."""
    d = tiny_text_dataset(tmp_path / "small", lines=72)  # 60 training documents
    over = {"data": {"data_path": [str(d / "train")], "split": "998,2,0"}, "train": {"seq_length": 16}}
    with pytest.raises(
        DataError,
        match=r"has 60 documents: --split 998,2,0 gives its validation split none of them; "
        r".*--valid-data-path.*--eval-iters 0",
    ):
        resolve_run(load_config(overrides=over))
    script = (
        "import sys\n"
        "from megatron_slm.config import load_config\n"
        "from megatron_slm.training.resolve import resolve_run\n"
        "from megatron_slm.training.run import build_data\n"
        f"cfg = load_config(overrides={{'model': {{'preset': 'tiny'}}, 'data': {{'data_path': [{str(d / 'train')!r}]}}, "
        "'train': {'seq_length': 16, 'eval_iters': 0, 'train_iters': 3, 'global_batch_size': 4, 'micro_batch_size': 2}})\n"
        "info = resolve_run(cfg).data\n"
        "train, evals = build_data(cfg, info, 0, 1)\n"
        "print('tokens', tuple(train(2)[0]['tokens'].shape), 'eval', evals)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens (2, 16) eval None" in proc.stdout
