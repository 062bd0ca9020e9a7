"""slm reweight: the CLM blend weights that reproduce an SLM run's selected token mix."""

import json
import subprocess
import sys

import pytest

from megatron_slm.analysis.controls import matched_weights, reweight
from megatron_slm.cli import main


def write_summary(tmp_path, data_path, fractions, loss_mode="slm"):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "summary.json").write_text(
        json.dumps(dict(loss_mode=loss_mode, data_path=data_path, selected_fraction_by_dataset=fractions, k=0.6))
    )
    return run


def test_weights_reproduce_the_selected_token_mix(tmp_path):
    # unnormalised blend 1.1 : 0.9 : 2.0 -> w = 0.275, 0.225, 0.5
    run = write_summary(tmp_path, ["1.1", "d/a", "0.9", "d/b", "2.0", "d/c"], [0.8, 0.3, 0.6])
    res = reweight(str(run))
    w, f, m = res["weights"], res["fractions"], res["matched"]
    assert w == pytest.approx([0.275, 0.225, 0.5]) and res["prefixes"] == ["d/a", "d/b", "d/c"]
    assert sum(m) == pytest.approx(1.0)
    total = 0.275 * 0.8 + 0.225 * 0.3 + 0.5 * 0.6
    assert m == pytest.approx([0.275 * 0.8 / total, 0.225 * 0.3 / total, 0.5 * 0.6 / total])
    for i in range(3):
        for j in range(3):
            assert m[i] / m[j] == pytest.approx((w[i] * f[i]) / (w[j] * f[j]))
    # a CLM run with w' sees dataset i's tokens in the same shares as the SLM run trains on them
    slm_tokens = [wi * fi for wi, fi in zip(w, f)]
    assert m == pytest.approx([t / sum(slm_tokens) for t in slm_tokens])
    assert matched_weights([0.5, 0.5], [0.6, 0.6]) == pytest.approx([0.5, 0.5])  # equal fractions: unchanged


def test_printed_data_path_parses_back(tmp_path, capsys):
    from megatron_slm.data.datasets import parse_blend

    run = write_summary(tmp_path, ["0.55", "demo_out/data/math_train", "0.45", "demo_out/data/general"], [0.75, 0.4])
    assert main(["reweight", "--run", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("--data-path ")
    prefixes, weights = parse_blend(lines[0].split()[1:])
    assert prefixes == ["demo_out/data/math_train", "demo_out/data/general"]
    total = 0.55 * 0.75 + 0.45 * 0.4
    assert weights[0] / sum(weights) == pytest.approx(0.55 * 0.75 / total, abs=1e-4)
    assert lines[0].split()[1] == f"{0.55 * 0.75 / total:.4f}"
    assert main(["reweight", "--run", str(run), "--digits", "2"]) == 0
    assert capsys.readouterr().out.split()[1] == f"{0.55 * 0.75 / total:.2f}"


@pytest.mark.parametrize("case", ["missing", "clm", "single", "no_fractions"])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, case):
    if case == "missing":
        run = tmp_path / "nothing"
    elif case == "clm":
        run = write_summary(tmp_path, ["0.5", "a", "0.5", "b"], None, loss_mode="clm")
    elif case == "single":
        run = write_summary(tmp_path, ["a"], [0.6])
    else:
        run = write_summary(tmp_path, ["0.5", "a", "0.5", "b"], None)
    assert main(["reweight", "--run", str(run)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err


def test_reweight_imports_no_torch(tmp_path):
    run = write_summary(tmp_path, ["0.5", "a", "0.5", "b"], [0.5, 0.25])
    code = (
        "import sys; from megatron_slm.cli import main; rc = main(['reweight', '--run', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("--data-path 0.6667 a 0.3333 b")


def test_reweight_piped_into_a_reader_that_stops_early_is_quiet(tmp_path):
    run = write_summary(tmp_path, ["0.5", "a", "0.5", "b"], [0.5, 0.25])
    # `true` exits without reading: the pipe is closed long before the command writes (as with `| head -n 1`)
    cmd = f"{sys.executable} -m megatron_slm.cli reweight --run {run} | true; echo rc=${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "rc=0"
