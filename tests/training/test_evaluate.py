"""``slm evaluate``: loss/perplexity of checkpoints on fixed windows of datasets.

- The reported mean loss of a transformers Llama dir and of its hf_to_megatron conversion equals transformers'
  own per-token cross-entropy over the same windows (built here from the IndexedDataset, EOD labels masked).
- Samples are independent of --seed, and paired (every checkpoint counts the same tokens per dataset).
- TP=2 (two processes under torchrun) reports the TP=1 numbers.
- Errors are one ``error:`` line.
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

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
SEQ, SAMPLES, MBS = 32, 5, 2


def _quiet(*_a, **_k):
    pass


def _convert(src, dst):
    from megatron_slm import convert

    convert.hf_to_megatron(src, dst, dtype="fp32", verify=False, log=_quiet)


def _slm(args, nproc=1, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if nproc == 1:
        cmd = [PY, "-m", "megatron_slm.cli", *args]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_port()), "-m", "megatron_slm.cli", *args]
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
            w = torch.from_numpy(toks[i * SEQ: i * SEQ + SEQ + 1])
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
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(root / "hf"))
    run_distributed(_convert, 1, str(root / "hf"), str(root / "ck"))
    prefixes = [str(data / "train"), str(data / "valid")]
    expected = {p: _reference_losses(model, p) for p in prefixes}
    return {"root": root, "prefixes": prefixes, "expected": expected}


def _run(setup, out, extra=(), nproc=1, ckpts=None):
    root = setup["root"]
    ckpts = ckpts or [str(root / "hf"), str(root / "ck")]
    r = _slm(["evaluate", "--load", *ckpts, "--data-path", *setup["prefixes"], "--seq-length", str(SEQ),
              "--eval-samples", str(SAMPLES), "--micro-batch-size", str(MBS), "--out", str(out), *extra], nproc)
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
    rows = _run(setup, tmp_path / "tp2", ["--tensor-model-parallel-size", "2"], nproc=2, ckpts=[str(setup["root"] / "ck")])
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
