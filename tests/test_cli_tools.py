"""The one CLI's data and checkpoint tools (``slm preprocess | convert | viz | plot``), ``slm --version``, the old
tools/*.py names as thin wrappers, the extras and the one-line error naming the missing one, and what the base
install runs without any extra.

"The same output as before": each subcommand's files are compared with those of the library functions the old
tools called (megatron_slm.data.preprocess.preprocess, analysis.heatmap.render_html, analysis.plots.k_sweep_report).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from megatron_slm.cli import main
from megatron_slm.errors import OPTIONAL, MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]
NEW_COMMANDS = [
    ["preprocess"],
    ["convert"],
    ["convert", "hf-to-megatron"],
    ["convert", "megatron-to-hf"],
    ["viz"],
    ["plot"],
]
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")


# ------------------------------------------------------------------------------------------------ version, --help


@pytest.mark.unit
def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"megatron_slm {importlib.metadata.version('megatron_slm')}\n"


def test_the_installed_slm_script_answers_version_and_help():
    slm = Path(sys.executable).with_name("slm")  # the console script pip installs next to the interpreter
    if not slm.exists():
        pytest.skip(f"no console script at {slm} (the package is not installed in this interpreter's environment)")
    version = subprocess.run([str(slm), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("megatron_slm "), version.stderr
    usage = subprocess.run([str(slm), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--version" in usage.stdout
    for command in ("preprocess", "convert", "viz", "plot"):
        assert f"    {command} " in usage.stdout, usage.stdout


@pytest.mark.unit
@pytest.mark.parametrize("command", NEW_COMMANDS, ids=" ".join)
def test_each_new_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith(f"usage: slm {' '.join(command)} "), out[:200]
    assert f"\nexample:\n  slm {' '.join(command)}" in out


@pytest.mark.unit
@pytest.mark.parametrize(
    "command, flags",
    [
        (  # the flags and defaults of tools/preprocess_data.py
            ["preprocess"],
            {
                "--input": [],
                "--output-prefix": None,
                "--tokenizer": None,
                "--eod-token": None,
                "--json-key": "text",
                "--split-lines": False,
                "--workers": 2,
                "--no-append-eod": True,
                "--force": False,
                "--log-every": 1.0,
                "--quiet": False,
            },
        ),
        (  # tools/convert_checkpoint.py
            ["convert", "hf-to-megatron"],
            {
                "--input": None,
                "--output": None,
                "--dtype": "fp32",
                "--verify": False,
                "--verify-seq-len": 64,
                "--force": False,
            },
        ),
        (
            ["convert", "megatron-to-hf"],
            {
                "--input": None,
                "--output": None,
                "--dtype": "auto",
                "--hf-config": None,
                "--tokenizer-model": None,
                "--force": False,
            },
        ),
        (  # tools/visualize_selection.py
            ["viz"],
            {
                "--dump": None,
                "--policy": None,
                "--reference": None,
                "--text": None,
                "--slm-select-ratio": 0.6,
                "--select-over": "document",
                "--seq-length": None,
                "--tokenizer": None,
                "--out": None,
                "--title": None,
                "--max-sequences": 4,
                "--max-tokens": 512,
                "--max-dumps": 8,
                "--vmax": None,
                "--ref-hard-loss": None,  # added since the old tool
                "--layout": "auto",
                "--png": None,
                "--png-dump": -1,
                "--png-sequences": 2,
                "--png-tokens": 256,
            },
        ),
        (  # tools/plot_runs.py
            ["plot"],
            {"--out": None, "--k-sweep": False, "--only": None, "--smooth": 5, "--prefix": ""},
        ),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else "",
)
def test_new_commands_keep_the_old_tools_flags_and_defaults(command, flags):
    from megatron_slm.cli import build_parser

    parser = build_parser()
    for word in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    found = {
        a.option_strings[0]: a.default for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"
    }
    assert found == flags


@pytest.mark.parametrize(
    "tool, command",
    [
        ("preprocess_data", "preprocess"),
        ("convert_checkpoint", "convert"),
        ("visualize_selection", "viz"),
        ("plot_runs", "plot"),
        ("score_reference", "score-reference"),
    ],
)
def test_the_old_tool_names_are_thin_wrappers(tool, command):
    """``python tools/X.py ARGS`` runs ``slm COMMAND ARGS``: the same --help, from the installed package."""
    script = ROOT / "tools" / f"{tool}.py"
    assert len(script.read_text().splitlines()) < 20
    old = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    new = subprocess.run(
        [sys.executable, "-m", "megatron_slm.cli", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    assert old.stdout == new.stdout


def test_no_sys_path_edits_in_the_repository():
    edit = re.compile(r"\bsys\." + r"path\s*(\.\s*(insert|append|extend)\b|\+?=)")
    offenders = []
    for top in ("megatron_slm", "tools", "tests", "benchmarks", "launch"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if edit.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------ same output


def _corpus(path: Path, n: int = 60) -> Path:
    words = "the model selects tokens whose excess loss is high integral sum prime x^2 + y^2".split()
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 9))}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_slm_preprocess_writes_what_the_library_writes(tmp_path, sp_model, capsys):
    from megatron_slm.data.preprocess import preprocess

    corpus = _corpus(tmp_path / "c.jsonl")
    argv = ["preprocess", str(corpus), "--tokenizer", str(sp_model), "--output-prefix", str(tmp_path / "cli")]
    assert main([*argv, "--workers", "1"]) == 0
    preprocess([corpus], tmp_path / "lib", sp_model, workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"cli{ext}").read_bytes() == (tmp_path / f"lib{ext}").read_bytes(), ext
    cli_meta, lib_meta = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("cli", "lib"))
    assert cli_meta["num_documents"] == lib_meta["num_documents"] == 60
    assert cli_meta["idx_sha256"] == lib_meta["idx_sha256"]
    # stderr is not a terminal here: no progress bar, only the summary line
    err = capsys.readouterr().err
    assert err.startswith("done: 60 documents") and err.count("\n") == 1, err
    assert main([*argv, "--quiet"]) == 2  # the output exists: one error line, no summary
    err = capsys.readouterr().err
    assert err.startswith("error: output ") and "--force" in err and err.count("\n") == 1, err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_preprocess_shows_a_progress_bar_on_a_terminal_only_on_rank_0(tmp_path, sp_model, monkeypatch):
    from megatron_slm.data.preprocess import preprocess

    corpus = _corpus(tmp_path / "c.jsonl")
    monkeypatch.delenv("RANK", raising=False)
    shown = _Terminal()
    preprocess([corpus], tmp_path / "a", sp_model, workers=1, quiet=False, stream=shown)
    assert "tokenizing" in shown.getvalue() and " docs" in shown.getvalue()  # tqdm's bar, then the summary
    assert shown.getvalue().rstrip().splitlines()[-1].startswith("done: 60 documents")
    monkeypatch.setenv("RANK", "1")
    hidden = _Terminal()
    preprocess([corpus], tmp_path / "b", sp_model, workers=1, quiet=False, stream=hidden)
    assert "tokenizing" not in hidden.getvalue() and hidden.getvalue().startswith("done: 60 documents")
    monkeypatch.delenv("RANK")
    quiet = _Terminal()
    preprocess([corpus], tmp_path / "c", sp_model, workers=1, quiet=True, stream=quiet)
    assert quiet.getvalue() == ""


def _dump(iteration: int, n_seq: int = 2, s: int = 24) -> dict:
    import torch

    g = torch.Generator().manual_seed(iteration)
    seqs = []
    for _ in range(n_seq):
        toks = torch.randint(2, 50, (s + 1,), generator=g)
        pol, ref = torch.rand(s, generator=g) * 5, torch.rand(s, generator=g) * 5
        seqs.append(
            {
                "tokens": toks[:-1],
                "labels": toks[1:],
                "loss_mask": torch.ones(s),
                "policy_loss": pol,
                "ref_loss": ref,
                "selected": (pol - ref) > 0,
            }
        )
    return {"iteration": iteration, "k": 0.5, "scope": "sequence", "tokenizer": None, "sequences": seqs}


def test_slm_viz_writes_the_page_the_library_renders(tmp_path, capsys):
    import torch

    from megatron_slm.analysis import heatmap

    dumps = tmp_path / "run" / "selection_dumps"
    dumps.mkdir(parents=True)
    for it in (10, 20):
        torch.save(_dump(it), dumps / f"iter_{it:07d}.pt")
    out = tmp_path / "out" / "page.html"
    assert main(["viz", "--dump", str(tmp_path / "run"), "--out", str(out), "--max-tokens", "16"]) == 0
    expected = heatmap.render_html(
        heatmap.load_dumps(tmp_path / "run"), title="SLM token selection during training", max_tokens=16
    )
    assert out.read_text(encoding="utf-8") == expected
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    # a source missing or both given: one error line, exit status 2
    assert main(["viz", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "error: give either --dump (source a) or --policy/--reference/--text/--tokenizer (source b)\n"
    )
    assert main(["viz", "--policy", "p", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: checkpoint mode needs --reference, --text, --tokenizer\n"


def _run_dir(path: Path, mode: str, k: float, eval_loss: float) -> Path:
    path.mkdir(parents=True)
    rows = [{"iteration": i, "split": "train", "loss_all": 5.0 - i / 10, "loss_selected": 5.0 - i / 10} for i in (1, 2)]
    rows.append({"iteration": 2, "split": "eval", "loss": eval_loss})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"loss_mode": mode, "k": k, "eval_loss": eval_loss, "iterations": 2}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@needs_matplotlib
def test_slm_plot_writes_the_k_sweep_the_library_writes(tmp_path, capsys):
    from megatron_slm.analysis import plots

    runs = [
        _run_dir(tmp_path / "slm_k04", "slm", 0.4, 4.2),
        _run_dir(tmp_path / "slm_k06", "slm", 0.6, 4.1),
        _run_dir(tmp_path / "clm", "clm", 1.0, 4.3),
    ]
    argv = ["plot", *map(str, runs[:2]), f"CLM={runs[2]}", "--out", str(tmp_path / "cli"), "--k-sweep"]
    assert main([*argv, "--only", "sweep"]) == 0
    captured = capsys.readouterr()
    rep = plots.k_sweep_report([*map(str, runs[:2]), f"CLM={runs[2]}"], tmp_path / "lib")
    for ext in ("csv", "md"):
        assert (tmp_path / "cli" / f"k_sweep.{ext}").read_text() == rep[ext].read_text(), ext
    assert (
        captured.out.startswith(rep["md"].read_text()) and f"wrote {tmp_path / 'cli' / 'k_sweep.png'}" in captured.out
    )
    assert main(["plot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ extras


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_optional_dependency_has_its_extra_and_test_installs_all():
    project = _project()
    extras = project["optional-dependencies"]
    for module, (package, extra) in OPTIONAL.items():
        assert any(re.match(rf"{re.escape(package)}\b", req) for req in extras[extra]), (module, extra)
    every = {extra for _, extra in OPTIONAL.values()}
    assert extras["all"] == [f"megatron_slm[{','.join(sorted(every, key=list(extras).index))}]"]
    assert "megatron_slm[all]" in extras["test"] and any(r.startswith("ruff==") for r in extras["test"])
    assert any(r.startswith("tqdm") for r in project["dependencies"])  # the progress bars: a base dependency


def test_conversion_dtype_names_are_the_converters():
    from megatron_slm.conversion import DTYPE_NAMES
    from megatron_slm.conversion.converters import DTYPES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_a_missing_optional_dependency_is_one_line_naming_its_extra(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError, as when not installed
    package, extra = OPTIONAL[module]
    with pytest.raises(MissingDependencyError) as exc:
        require(module, "this feature")
    assert str(exc.value) == f"this feature needs the '{package}' package: pip install 'megatron_slm[{extra}]'"


def test_a_transformers_directory_without_safetensors_names_the_hf_extra(tmp_path, monkeypatch):
    """--pretrained-checkpoint / --ref-load / slm convert read a transformers directory's weights with it."""
    from megatron_slm.model.hf import HFWeights

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(
        MissingDependencyError, match=r"needs the 'safetensors' package: pip install 'megatron_slm\[hf\]'"
    ):
        HFWeights(str(tmp_path))


def test_slm_plot_without_matplotlib_names_the_viz_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = _run_dir(tmp_path / "clm", "clm", 1.0, 4.3)
    assert main(["plot", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "error: plotting runs needs the 'matplotlib' package: pip install 'megatron_slm[viz]'\n"
    )


BASE_INSTALL = """
import importlib, pkgutil, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: import raises ImportError
import megatron_slm
for info in pkgutil.walk_packages(megatron_slm.__path__, "megatron_slm."):
    importlib.import_module(info.name)
from megatron_slm.cli import main
assert main(["check-config", "--preset", "tiny"]) == 0
assert main(["plan", "--config", {launch_config!r}, "--world-size", "8"]) == 0
assert main(["preprocess", {corpus!r}, "--tokenizer", {tokenizer!r}, "--output-prefix", {prefix!r}, "--quiet"]) == 0
print("BASE INSTALL OK")
"""


def test_the_base_install_needs_no_extra(tmp_path, sp_model):
    """What `pip install .` documents (config, plan, sentencepiece data) runs with every extra's package missing,
    and every module imports without them."""
    corpus = _corpus(tmp_path / "c.jsonl")
    code = BASE_INSTALL.format(
        blocked=sorted(OPTIONAL),
        launch_config=str(ROOT / "launch/configs/tinyllama1b_owm_slm_k0.6.yaml"),
        corpus=str(corpus),
        tokenizer=str(sp_model),
        prefix=str(tmp_path / "data"),
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0 and "BASE INSTALL OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    assert (tmp_path / "data.idx").is_file()
