"""README command 1 end to end at a few steps: ``slm demo`` builds the corpus, trains base, reference and the
five policies through torchrun, evaluates all seven and prints the table and the paired differences to SLM.

Checked against what the runs wrote, recomputed here: the reweighted CLM trained on the blend w_i f_i / sum w_j f_j
of the SLM run's own summary, the table's trained math share of SLM is w_m f_m / (w_m f_m + w_g f_g), every policy
started from the base, and the table's losses are ``slm evaluate``'s (eval.json) for each run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the module's demo fixture runs the whole demo (~140 s)

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            PY,
            "-m",
            "megatron_slm.cli",
            "demo",
            "--out",
            str(out),
            "--base-iters",
            "3",
            "--ref-iters",
            "2",
            "--train-iters",
            "2",
            "--eval-samples",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_prints_seven_rows_from_slm_evaluate(demo):
    out, stdout = demo
    table = stdout[stdout.index("SLM demo results") :]
    labels = [
        "base",
        "reference",
        "CLM",
        "SLM k=0.6",
        "random k% k=0.6",
        "CLM, reweighted blend",
        "SLM math + CLM general",
    ]
    lines = {label: next(line for line in table.splitlines() if line.startswith(label + " ")) for label in labels}
    rows = json.loads((out / "eval" / "eval.json").read_text())["results"]
    runs = {
        "base": out / "base",
        "reference": out / "reference",
        "CLM": out / "seed4321" / "clm",
        "SLM k=0.6": out / "seed4321" / "slm",
        "random k% k=0.6": out / "seed4321" / "random",
        "CLM, reweighted blend": out / "seed4321" / "clm_reweighted",
        "SLM math + CLM general": out / "seed4321" / "slm_math_clm_general",
    }
    for label, run in runs.items():
        got = {Path(r["dataset"]).name: r["loss"] for r in rows if Path(r["checkpoint"]) == run}
        assert set(got) == {"math_heldout", "general_heldout"}
        cells = lines[label][len(label) :].split()
        assert float(cells[0]) == pytest.approx(got["math_heldout"], abs=1e-4)
        assert float(cells[1]) == pytest.approx(got["general_heldout"], abs=1e-4)
    split = table[table.index("learnable   not learnable") :]
    base_row = next(r for r in rows if Path(r["checkpoint"]) == runs["base"] and "math" in r["dataset"])
    for label, run in runs.items():  # the second table: held-out math, learnable (base vs reference) and the rest
        row = next(r for r in rows if Path(r["checkpoint"]) == run and Path(r["dataset"]).name == "math_heldout")
        cells = next(line for line in split.splitlines() if line.startswith(label + " "))[len(label) :].split()
        assert float(cells[0]) == pytest.approx(row["learnable_loss"], abs=1e-4)
        assert float(cells[1]) == pytest.approx(row["not_learnable_loss"], abs=1e-4)
        assert row["learnable_tokens"] == base_row["learnable_tokens"]  # paired: one split for every model
    assert abs(base_row["learnable_tokens"] - 0.6 * base_row["tokens"]) <= 1


def test_demo_controls_follow_the_slm_run(demo):
    out, stdout = demo
    slm = json.loads((out / "seed4321" / "slm" / "summary.json").read_text())
    random = json.loads((out / "seed4321" / "random" / "summary.json").read_text())
    rew = json.loads((out / "seed4321" / "clm_reweighted" / "summary.json").read_text())
    w = [float(x) for x in slm["data_path"][0::2]]
    w = [x / sum(w) for x in w]
    f = slm["selected_fraction_by_dataset"]
    expected = [wi * fi / sum(a * b for a, b in zip(w, f)) for wi, fi in zip(w, f)]
    assert [float(x) for x in rew["data_path"][0::2]] == pytest.approx(expected, abs=1e-4)
    assert rew["data_path"][1::2] == slm["data_path"][1::2] and rew["loss_mode"] == "clm"
    assert random["data_path"] == slm["data_path"] and random["k"] == slm["k"] == 0.6
    share = w[0] * f[0] / (w[0] * f[0] + w[1] * f[1])
    slm_line = next(line for line in stdout.splitlines() if line.startswith("SLM k=0.6 "))
    assert f"{share:.1%}" in slm_line and f"{f[0]:.1%} / {f[1]:.1%}" in slm_line
    for name in ("clm", "slm", "random", "clm_reweighted"):  # every policy continues from the base
        state = json.loads((out / "seed4321" / name / "iter_0000002" / "trainer_state.json").read_text())
        assert state["config"]["checkpoint"]["pretrained_checkpoint"] == str(out / "base")
        assert state["config"]["train"]["seed"] == 4321


def test_demo_policy_exports_with_its_training_tokenizer(demo, tmp_path):
    """megatron-to-hf of a trained policy, no --tokenizer-model: the export takes the tokenizer the run trained with
    (its fingerprint checked), tokenizes like sentencepiece, and transformers' loss on the held-out windows equals
    the demo table's (slm evaluate)."""
    import sentencepiece as spm
    import torch
    from helpers.hf_losses import window_token_ce
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = demo
    hf = tmp_path / "slm_hf"
    proc = subprocess.run(
        [
            PY,
            "-m",
            "megatron_slm.cli",
            "convert",
            "megatron-to-hf",
            "--input",
            str(out / "seed4321" / "slm"),
            "--output",
            str(hf),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = json.loads((out / "data" / "text" / "math_heldout.jsonl").read_text().splitlines()[0])["text"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "data" / "tokenizer.model"))
    assert AutoTokenizer.from_pretrained(str(hf))(text, add_special_tokens=False)["input_ids"] == sp.encode(text)

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ce, valid = window_token_ce(model, str(out / "data" / "math_heldout"), 128, 3)  # the demo's --eval-samples 3
    rows = json.loads((out / "eval" / "eval.json").read_text())["results"]
    expected = next(
        r["loss"]
        for r in rows
        if Path(r["checkpoint"]) == out / "seed4321" / "slm" and Path(r["dataset"]).name == "math_heldout"
    )
    assert ce[valid].mean() == pytest.approx(expected, abs=1e-4)


def test_demo_per_dataset_policy_and_paired_differences(demo):
    """SLM on math + CLM on general selects all general tokens and k of the math ones; each paired difference to
    SLM printed is the difference of eval.json's losses, inside its printed interval."""
    out, stdout = demo
    mixed = json.loads((out / "seed4321" / "slm_math_clm_general" / "summary.json").read_text())
    f_math, f_general = mixed["selected_fraction_by_dataset"]
    assert f_general == 1.0 and abs(f_math - 0.6) < 0.02 and mixed["k_by_dataset"] == [0.6, 1.0]
    assert mixed["unselected_ref_loss_by_dataset"][1] is None  # nothing of general left out
    rows = json.loads((out / "eval" / "eval.json").read_text())["results"]
    loss = {(Path(r["checkpoint"]).name, Path(r["dataset"]).name): r["loss"] for r in rows}
    section = stdout[stdout.index("paired difference to SLM") :].splitlines()
    for label, name in (
        ("CLM", "clm"),
        ("random k% k=0.6", "random"),
        ("CLM, reweighted blend", "clm_reweighted"),
        ("SLM math + CLM general", "slm_math_clm_general"),
    ):
        line = next(x for x in section if x.startswith(label + " "))
        cells = line[len(label) :].replace("[", " ").replace("]", " ").replace(",", " ").replace("*", " ").split()
        for (diff, lo, hi), ds in zip((cells[0:3], cells[3:6]), ("math_heldout", "general_heldout")):
            want = loss[(name, ds)] - loss[("slm", ds)]
            assert float(diff) == pytest.approx(want, abs=1e-4)
            assert float(lo) - 1e-4 <= float(diff) <= float(hi) + 1e-4
