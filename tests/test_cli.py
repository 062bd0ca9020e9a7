"""The command line: every flag documented (help, default, choices), booleans as flags, fast --help,
enumerated options refused before any work starts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from megatron_slm.cli import build_parser, main
from megatron_slm.config import Config, _leaf_paths


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_of_every_command_has_help_and_a_default():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            assert action.help and len(action.help) > 5, f"slm {name} {flag} has no help"
            documented = "default" in action.help or "(unset:" in action.help
            formatter_shows = sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter
            assert documented or formatter_shows or action.default is False, f"slm {name} {flag}: default not shown"


def test_config_flags_have_their_fields_choices_and_boolean_pairs():
    train = _subparsers(build_parser())["train"]
    by_dest = {a.dest: a for a in train._actions}
    for path, f in _leaf_paths(Config()):
        action = by_dest["cfg__" + "__".join(path)]
        if f.metadata.get("choices"):
            assert tuple(action.choices) == tuple(f.metadata["choices"])
    assert "--no-bf16" in by_dest["cfg__train__bf16"].option_strings
    assert "--untie-embeddings-and-output-weights" in by_dest["cfg__model__untie_embeddings_and_output_weights"].option_strings
    assert "--sequence-parallel" in by_dest["cfg__parallel__sequence_parallel"].option_strings
    text = train.format_help()
    assert "(default: micro_batch)" in text and "{sequence,micro_batch,global_batch,threshold}" in text


def test_boolean_flags_set_the_config(capsys):
    assert main(["check-config", "--preset", "tiny", "--bf16", "--no-untie-embeddings-and-output-weights"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["bf16"] is True and cfg["model"]["untie_embeddings_and_output_weights"] is False
    assert main(["check-config", "--preset", "tiny", "--no-bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["bf16"] is False


def test_check_config_reports_problems_as_one_error(capsys):
    assert main(["check-config", "--preset", "tiny", "--tensor-model-parallel-size", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "not divisible by tensor_model_parallel_size=3" in err


@pytest.mark.parametrize("argv", [["demo", "--selection-scope", "batch"], ["train", "--loss-mode", "dpo"],
                                  ["score-reference", "--dtype", "fp8"], ["train", "--ref-dtype", "fp16"]])
def test_enumerated_options_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom megatron_slm.cli import main\n"
            "for argv in ([], ['train'], ['check-config'], ['score-reference'], ['demo']):\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--slm-select-ratio" in res.stdout and "--wandb-project" in res.stdout
