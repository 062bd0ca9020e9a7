"""``slm dynamics``: token classes H->H, L->H, H->L, L->L by loss at the first and last checkpoint.

- The classification on a hand-built case whose classes, shares and means are worked out by hand.
- End to end: two real 3-step runs (CLM, and SLM with the CLM run as reference) saving every step; ``slm
  dynamics`` on them (torchrun, two data-parallel ranks) equals the classification of per-token losses computed
  by transformers on the converted checkpoints (megatron-to-hf), over windows built here from the IndexedDataset;
  shares sum to 1; files written.
- CLI errors are one ``error:`` line; data of another tokenizer than the checkpoints' (same vocabulary size) is one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import run_distributed
from helpers.data import tiny_text_dataset
from helpers.hf_losses import window_token_ce

from megatron_slm.analysis.dynamics import CLASSES, classify, default_threshold, parse_run
from megatron_slm.cli import main
from megatron_slm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SEQ, SAMPLES = 16, 8


def test_classes_shares_and_means_by_hand():
    # t = 2.0; a loss equal to t is low. Token 5 is masked (its huge losses must not count anywhere).
    first = np.array([3.0, 3.0, 1.0, 1.0, 2.0, 5.0])
    mid = np.array([2.5, 1.5, 1.5, 3.0, 1.0, 0.0])
    last = np.array([3.0, 1.0, 3.0, 1.0, 2.5, 9.0])
    mask = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    # classes: t0 H->H, t1 H->L, t2 L->H, t3 L->L, t4 L->H (2.0 is not above t)
    res = classify([first, mid, last], 2.0, mask)
    assert res["tokens"] == 5 and res["threshold"] == 2.0
    assert [CLASSES[c] for c in res["classes"]] == ["H->H", "H->L", "L->H", "L->L", "L->H"]
    share = {"H->H": 0.2, "L->H": 0.4, "H->L": 0.2, "L->L": 0.2}
    so_far = [
        {"H->H": 0.4, "L->H": 0.0, "H->L": 0.0, "L->L": 0.6},  # first vs first: levels only
        {"H->H": 0.2, "L->H": 0.2, "H->L": 0.2, "L->L": 0.4},  # mid: t0 H, t1 L, t2 L, t3 H, t4 L
        share,
    ]
    means = [
        {"H->H": 3.0, "L->H": 1.5, "H->L": 3.0, "L->L": 1.0},
        {"H->H": 2.5, "L->H": 1.25, "H->L": 1.5, "L->L": 3.0},
        {"H->H": 3.0, "L->H": 2.75, "H->L": 1.0, "L->L": 1.0},
    ]
    for c, s, m in zip(res["checkpoints"], so_far, means):
        assert c["share"] == pytest.approx(share) and c["share_so_far"] == pytest.approx(s)
        assert c["mean_loss"] == pytest.approx(m)
        assert c["tokens"] == {"H->H": 1, "L->H": 2, "H->L": 1, "L->L": 1}
    # the same tokens as a [2, 3] window array (mask in window order)
    res2 = classify([first.reshape(2, 3), mid.reshape(2, 3), last.reshape(2, 3)], 2.0, mask.reshape(2, 3))
    assert res2["checkpoints"][1]["mean_loss"] == pytest.approx(means[1])
    # an empty class has no mean; everything low at both ends is L->L
    low = classify([np.array([0.5, 1.0]), np.array([1.5, 0.1])], 2.0)
    assert low["checkpoints"][0]["share"] == {"H->H": 0.0, "L->H": 0.0, "H->L": 0.0, "L->L": 1.0}
    assert low["checkpoints"][0]["mean_loss"]["H->H"] is None and low["checkpoints"][1]["mean_loss"]["L->L"] == 0.8
    with pytest.raises(ConfigError, match="two checkpoints"):
        classify([first], 2.0)


def test_reference_hard_tokens_by_hand():
    """Tokens the reference is bad at (loss > t) that SLM at k would not select at the start, and their losses."""
    from megatron_slm.analysis.dynamics import analyse

    mask = np.array([[1, 1, 1, 1, 1, 0]], dtype=bool)
    ref = np.array([[1.0, 6.0, 5.0, 1.0, 7.0, 9.0]])
    start = np.array([[4.0, 6.5, 5.0, 3.0, 4.0, 9.0]])  # excess 3.0, 0.5, 0.0, 2.0, -3.0 (token 5 masked)
    # k = 0.4 keeps round(2.0) = 2 of 5: tokens 0 and 3. Reference loss > t = 2.0: tokens 1, 2, 4 -> all three hard
    slm_end = np.array([[2.0, 7.0, 6.0, 1.5, 5.0, 0.0]])  # the hard tokens got worse: mean (7 + 6 + 5) / 3 = 6
    clm_end = np.array([[3.0, 5.0, 4.0, 2.0, 3.0, 0.0]])  # better: (5 + 4 + 3) / 3 = 4
    measured = {
        "runs": [
            {"name": "slm", "checkpoints": [("a", "a", 0), ("b", "b", 1)], "losses": [start, slm_end]},
            {"name": "clm", "checkpoints": [("a", "a", 0), ("c", "c", 1)], "losses": [start, clm_end]},
        ],
        "mask": mask,
        "reference_losses": ref,
        "dataset": "d",
        "windows": 1,
    }
    res = analyse(measured, threshold=2.0, select_ratio=0.4)
    assert res["reference_hard"] == {"tokens": 3, "select_ratio": 0.4, "reference_mean_loss": 6.0}
    slm, clm = res["runs"]
    assert [c["reference_hard_loss"] for c in slm["checkpoints"]] == pytest.approx([15.5 / 3, 6.0])
    assert [c["reference_hard_loss"] for c in clm["checkpoints"]] == pytest.approx([15.5 / 3, 4.0])
    # k = 0.8 keeps 4 of 5 (tokens 0, 3, 1, 2): only token 4 stays hard
    assert analyse(measured, threshold=2.0, select_ratio=0.8)["reference_hard"]["tokens"] == 1
    from megatron_slm.analysis.dynamics import format_table

    assert "ref-hard loss" in format_table(res) and "3 tokens the reference is bad at" in format_table(res)


def test_default_threshold_pools_the_first_checkpoints_of_all_runs():
    a, b = np.array([[1.0, 2.0, 100.0]]), np.array([[3.0, 4.0, 200.0]])
    assert default_threshold([a, b]) == 3.5  # median of 1, 2, 3, 4, 100, 200
    assert default_threshold([a, b], np.array([[True, True, False]])) == 2.5  # median of 1, 2, 3, 4


@pytest.mark.parametrize("spec", ["clm", "=a,b", "clm=", "clm=a,,b", "a,b=c,d"])
def test_bad_run_syntax_is_refused(spec):
    with pytest.raises(ConfigError, match="expected NAME=CKPT"):
        parse_run(spec)
    assert parse_run(" slm = x/iter_1 , x/iter_2") == ("slm", ["x/iter_1", "x/iter_2"])


# ----------------------------------------------------------------------------------------------
# End to end


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
        str(SEQ),
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
        "--train-iters",
        "3",
        "--save-interval",
        "1",
        "--keep-last",
        "3",
        "--lr",
        "2e-2",
        "--lr-warmup-iters",
        "0",
        "--init-method-std",
        "0.3",
        *flags,
    ]  # wide init: losses spread over nats
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _to_hf(pairs):
    from megatron_slm.conversion.converters import megatron_to_hf

    for src, dst in pairs:
        megatron_to_hf(src, dst, dtype="fp32", log=lambda *a, **k: None)


def _hf_token_losses(hf_dir, prefix):
    """transformers' CE per label of the first SAMPLES windows and the non-EOD mask: [SAMPLES, SEQ] each."""
    from megatron_slm.conversion.converters import load_hf_model

    return window_token_ce(load_hf_model(hf_dir), prefix, SEQ, SAMPLES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamics")
    tiny_text_dataset(root / "data", vocab=128)
    _train(root, root / "clm", "--loss-mode", "clm")
    _train(root, root / "slm", "--loss-mode", "slm", "--ref-load", str(root / "clm"))  # same init, same data order
    return root


def test_dynamics_of_two_runs_equals_transformers_losses_classified(runs, tmp_path):
    root, out = runs, tmp_path / "out"
    prefix = str(root / "data" / "valid")
    slm_cks = [str(root / "slm" / "iter_0000001"), str(root / "slm" / "iter_0000003")]
    from megatron_slm.parallel.distributed import free_port

    # under torchrun at DP=2 (4 + 4 windows, micro-batches of 3 and a remainder), losses reduced to rank 0;
    # torchrun's parser needs the long spelling of --run
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "megatron_slm.cli",
        "dynamics",
        "--run-checkpoints",
        f"clm={root / 'clm'}",
        "--run-checkpoints",
        "slm=" + ",".join(slm_cks),
        "--data-path",
        prefix,
        "--seq-length",
        str(SEQ),
        "--eval-samples",
        str(SAMPLES),
        "--micro-batch-size",
        "3",
        "--dynamics-reference",
        str(root / "clm" / "iter_0000003"),  # the CLM run's end stands in for a reference
        "--dynamics-select-ratio",
        "0.5",
        "--out",
        str(out),
    ]
    res = subprocess.run(
        cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, cwd=str(ROOT)
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "H->L share" in res.stdout and "threshold" in res.stdout
    got = json.loads((out / "dynamics.json").read_text())
    assert (out / "dynamics.png").stat().st_size > 1000
    assert len((out / "dynamics.csv").read_text().strip().splitlines()) == 1 + (3 + 2) * 4

    # the truth: each checkpoint converted to transformers, CE per token there
    clm_cks = [str(root / "clm" / f"iter_{i:07d}") for i in (1, 2, 3)]
    (tmp_path / "hf").mkdir()
    run_distributed(_to_hf, 1, [(c, str(tmp_path / "hf" / f"{i}")) for i, c in enumerate(clm_cks + slm_cks)])
    losses = [_hf_token_losses(str(tmp_path / "hf" / f"{i}"), prefix) for i in range(5)]
    mask = losses[0][1]
    clm_l, slm_l = [x[0] for x in losses[:3]], [x[0] for x in losses[3:]]
    t = float(np.median(np.concatenate([clm_l[0][mask], slm_l[0][mask]])))
    assert got["threshold"] == pytest.approx(t, abs=1e-5) and got["tokens"] == int(mask.sum())
    # no token within 1e-4 of t (other than the median itself) could change class between the two computations
    near = [np.sum((np.abs(x[mask] - t) < 1e-4) & (x[mask] != t)) for x in clm_l + slm_l]
    assert sum(near) == 0, near
    assert [r["name"] for r in got["runs"]] == ["clm", "slm"]
    for run, ls, cks in zip(got["runs"], (clm_l, slm_l), (clm_cks, slm_cks)):
        assert [c["path"] for c in run["checkpoints"]] == cks and [c["iteration"] for c in run["checkpoints"]] == [
            int(c[-7:]) for c in cks
        ]
        want = classify(ls, t, mask)
        assert run["tokens"] == want["tokens"] == int(mask.sum())
        for c, w in zip(run["checkpoints"], want["checkpoints"]):
            assert sum(c["share"].values()) == pytest.approx(1.0)
            assert sum(c["share_so_far"].values()) == pytest.approx(1.0)
            assert c["tokens"] == w["tokens"] and c["share_so_far"] == pytest.approx(w["share_so_far"], abs=1e-12)
            for k in CLASSES:
                assert (c["mean_loss"][k] is None) == (w["mean_loss"][k] is None)
                if w["mean_loss"][k] is not None:
                    assert c["mean_loss"][k] == pytest.approx(w["mean_loss"][k], abs=1e-4), (k, c, w)
    # reference-hard tokens from transformers' losses, in plain Python: reference loss above t, excess at the first
    # run's first checkpoint outside the top round(0.5 n) (ties by position)
    ref, first = clm_l[2], clm_l[0]
    valid = [i for i in range(mask.size) if mask.flat[i]]
    excess = sorted(valid, key=lambda i: (-(float(first.flat[i]) - float(ref.flat[i])), i))
    keep = int(len(valid) * 0.5 + 0.5)
    gaps = [float(first.flat[i] - ref.flat[i]) for i in excess[keep - 1 : keep + 1]]
    assert abs(gaps[0] - gaps[1]) > 1e-4 and not any(abs(float(ref.flat[i]) - t) < 1e-4 for i in valid)
    hard = [i for i in excess[keep:] if float(ref.flat[i]) > t]
    assert got["reference_hard"]["tokens"] == len(hard) > 0
    for run, ls in zip(got["runs"], (clm_l, slm_l)):
        for c, x in zip(run["checkpoints"], ls):
            assert c["reference_hard_loss"] == pytest.approx(sum(float(x.flat[i]) for i in hard) / len(hard), abs=1e-4)
    # the analysis is not degenerate: tokens moved in both directions, and all four classes are present
    assert all(v > 0 for v in got["runs"][0]["checkpoints"][-1]["tokens"].values()), got["runs"][0]


@pytest.mark.parametrize("case", ["syntax", "one", "missing"])
def test_errors_are_one_line(tmp_path, capsys, case):
    # refused before any checkpoint or dataset is read: empty directories stand in for them
    for d in ("clm/iter_0000001", "clm/iter_0000002", "slm/iter_0000001", "slm/iter_0000002"):
        (tmp_path / d).mkdir(parents=True)
    one = f"clm={tmp_path / 'clm' / 'iter_0000001'}"
    missing = f"clm={tmp_path / 'clm' / 'iter_0000001'},{tmp_path / 'nope'}"
    run = {"syntax": "clm", "one": one, "missing": missing}[case]
    argv = [
        "dynamics",
        "--run",
        run,
        "--run",
        f"slm={tmp_path / 'slm'}",
        "--data-path",
        str(tmp_path / "valid"),
        "--seq-length",
        str(SEQ),
        "--out",
        str(tmp_path / "never"),
    ]
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert out.out == "" and len(lines) == 1 and lines[0].startswith("error:"), out.err
    expected = {"syntax": "expected NAME=CKPT", "one": "at least two checkpoints", "missing": "does not exist"}
    assert expected[case] in lines[0]
    assert not (tmp_path / "never").exists()


def test_data_of_another_tokenizer_is_refused_even_with_the_same_vocab_size(runs, tmp_path, capsys):
    # the runs' checkpoints record the tokenizer of their data; this data is another sentencepiece model's
    other = tiny_text_dataset(tmp_path / "other", vocab=128, seed=1)
    argv = [
        "dynamics",
        "--run",
        f"clm={runs / 'clm'}",
        "--data-path",
        str(other / "valid"),
        "--seq-length",
        str(SEQ),
        "--out",
        str(tmp_path / "never"),
    ]
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert out.out == "" and len(lines) == 1 and lines[0].startswith("error:"), out.err
    assert "was trained with another tokenizer" in lines[0] and str(other / "valid") in lines[0]
    assert not (tmp_path / "never").exists()
