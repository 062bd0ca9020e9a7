"""End to end through the real launcher: torchrun, 4 processes, TP=2 x PP=2, the `slm` CLI and its data path.

Also: bad input gives one clear error line and exit code 2, with no traceback.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.data import tiny_text_dataset

from megatron_slm.parallel.distributed import free_port

VOCAB = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real text through the real preprocessing tool, with a sentencepiece tokenizer trained here."""
    return tiny_text_dataset(tmp_path_factory.mktemp("data"), vocab=VOCAB)


def _slm(args, nproc, timeout=240):
    launcher = (
        ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
        if nproc > 1
        else []
    )
    cmd = [
        sys.executable,
        *launcher,
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
        "--log-interval",
        "1",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_tp2_pp2_reference_then_slm(data, tmp_path):
    common = [
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "2",
        "--valid-data-path",
        str(data / "valid"),
        "--eval-iters",
        "1",
        "--tokenizer-model",
        str(data / "tok.model"),
    ]
    ref = _slm(
        common
        + [
            "--loss-mode",
            "clm",
            "--data-path",
            str(data / "train"),
            "--train-iters",
            "2",
            "--save",
            str(tmp_path / "ref"),
        ],
        nproc=4,
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    slm = _slm(
        common
        + [
            "--data-path",
            str(data / "train"),
            "--train-iters",
            "3",
            "--ref-load",
            str(tmp_path / "ref"),
            "--selection-scope",
            "global_batch",
            "--save",
            str(tmp_path / "slm"),
            "--selection-dump-interval",
            "2",
        ],
        nproc=4,
    )
    assert slm.returncode == 0, slm.stdout + slm.stderr
    assert "[slm] step     3/3" in slm.stdout and "held-out loss" in slm.stdout and "ETA" in slm.stdout
    summary = json.loads((tmp_path / "slm" / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["parallel"] == {"tp": 2, "pp": 2, "dp": 1}
    assert abs(summary["final"]["selected_fraction"] - 0.6) < 0.02
    assert summary["final"]["excess_selected"] > summary["final"]["excess_unselected"]
    assert np.isfinite(summary["eval_loss"])
    import torch

    dump = torch.load(tmp_path / "slm" / "selection_dumps" / "iter_0000002.pt")
    assert dump["iteration"] == 2 and dump["k"] == 0.6 and len(dump["sequences"]) == 4  # the whole global batch
    seq = dump["sequences"][0]
    assert torch.equal(seq["tokens"][1:], seq["labels"][:-1]) and not (seq["selected"] & (seq["loss_mask"] == 0)).any()
    assert torch.isfinite(seq["policy_loss"]).all() and torch.isfinite(seq["ref_loss"]).all()
    assert int(seq["selected"].sum()) > 0
    assert sorted(p.name for p in (tmp_path / "slm" / "selection_dumps").iterdir()) == ["iter_0000002.pt"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--tensor-model-parallel-size", "3"],
            "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3",
        ),
        (["--ref-load", "/nonexistent/ckpt"], "checkpoint directory '/nonexistent/ckpt' does not exist"),
        (["--vocab-size", "100"], "tokenized with vocab_size=128 but the model has vocab_size=100"),
        (["--reference-mode", "offline"], "no reference scores for dataset"),
        (["--tokenizer-model", "/nonexistent.model"], "nonexistent.model"),
        (["--ref-vocab-size", "256"], "vocab mismatch"),
    ],
)
def test_bad_input_gives_one_clear_error(data, args, message):
    res = _slm(["--data-path", str(data / "train"), "--train-iters", "1", *args], nproc=1, timeout=120)  # no torchrun
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("error:") == 1
