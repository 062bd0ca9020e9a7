"""The command line: every flag documented (help, default, choices), booleans as flags, fast --help,
enumerated options refused before any work starts."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

import pytest

from megatron_slm.cli import build_parser, main
from megatron_slm.config import Config, add_override_arguments, load_config
from megatron_slm.config.schema import _leaf_paths

pytestmark = pytest.mark.unit


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _commands(parser, path=()):
    """Every command as (its words, its parser): ``slm convert hf-to-megatron`` as (("convert", "hf-to-megatron"),
    parser), the commands holding subcommands (``slm convert``) included."""
    for name, sub in _subparsers(parser).items():
        yield (*path, name), sub
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            yield from _commands(sub, (*path, name))


def test_every_flag_of_every_command_has_help_and_a_default():
    for words, sub in _commands(build_parser()):
        name = " ".join(words)
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.metavar or action.dest
            assert action.help and len(action.help) > 5, f"slm {name} {flag} has no help"
            documented = "default" in action.help or "(unset:" in action.help
            formatter_shows = issubclass(sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
            assert documented or formatter_shows or action.default is False, f"slm {name} {flag}: default not shown"


def test_config_flags_have_their_fields_choices_and_boolean_pairs():
    train = _subparsers(build_parser())["train"]
    by_dest = {a.dest: a for a in train._actions}
    for path, f in _leaf_paths(Config()):
        action = by_dest["cfg__" + "__".join(path)]
        if f.metadata.get("choices"):
            assert tuple(action.choices) == tuple(f.metadata["choices"])
    assert "--no-bf16" in by_dest["cfg__train__bf16"].option_strings
    assert (
        "--untie-embeddings-and-output-weights"
        in by_dest["cfg__model__untie_embeddings_and_output_weights"].option_strings
    )
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


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--selection-scope", "batch"],
        ["train", "--loss-mode", "dpo"],
        ["score-reference", "--dtype", "fp8"],
        ["train", "--ref-dtype", "fp16"],
    ],
)
def test_enumerated_options_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom megatron_slm.cli import main\n"
        "for argv in ([], ['train'], ['check-config'], ['score-reference'], ['demo'], ['preprocess'], ['convert'],\n"
        "             ['convert', 'hf-to-megatron'], ['convert', 'megatron-to-hf'], ['viz'], ['plot']):\n"
        "    try:\n        main(argv + ['--help'])\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--slm-select-ratio" in res.stdout and "--wandb-project" in res.stdout
    assert "--output-prefix" in res.stdout and "--tokenizer-model" in res.stdout and "--k-sweep" in res.stdout


OPTIMIZER_FLAGS = {
    "--lr",
    "--min-lr",
    "--adam-beta1",
    "--adam-beta2",
    "--adam-eps",
    "--weight-decay",
    "--clip-grad",
    "--lr-warmup-iters",
    "--lr-decay-style",
    "--lr-decay-iters",
}


def _flags(sub) -> set:
    return {s for a in sub._actions for s in a.option_strings}


def _config_dests(sub) -> set:
    return {a.dest for a in sub._actions if a.dest.startswith("cfg__")}


@pytest.mark.parametrize("command", ["evaluate", "dynamics"])
def test_evaluate_and_dynamics_take_no_optimizer_flags(command):
    sub = _subparsers(build_parser())[command]
    flags = _flags(sub)
    assert not flags & OPTIMIZER_FLAGS, flags & OPTIMIZER_FLAGS
    assert not [f for f in flags if f.startswith(("--lr-", "--adam-"))], flags
    assert {"--tensor-model-parallel-size", "--seq-length", "--micro-batch-size", "--data-path"} <= flags
    text = sub.format_help()
    assert "--adam-beta1" not in text and "--weight-decay" not in text and "--lr " not in text


def test_commands_take_only_the_config_flags_they_read():
    subs = _subparsers(build_parser())
    every = {"cfg__" + "__".join(path) for path, _ in _leaf_paths(Config())}
    assert _config_dests(subs["train"]) == every and _config_dests(subs["check-config"]) == every
    for command in ("plan", "score-reference", "evaluate", "dynamics"):
        dests = _config_dests(subs[command])
        assert dests < every, command
        assert "cfg__train__lr" not in dests and "cfg__train__adam_beta1" not in dests, command
        assert "cfg__train__logging_level" in dests, command  # every command logs
    assert not any(d.startswith("cfg__checkpoint__") for d in _config_dests(subs["evaluate"]))
    assert "cfg__reference__load" in _config_dests(subs["score-reference"])
    assert "cfg__train__recompute_granularity" in _config_dests(subs["plan"])
    # the sections stay one argument group each, titled as before
    titles = [g.title for g in subs["evaluate"]._action_groups]
    assert "parallel (YAML section 'parallel:')" in titles and "data (YAML section 'data:')" in titles


def test_an_optimizer_flag_is_refused_by_evaluate(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--lr", "1e-3", "--load", "ck", "--data-path", "data/valid"])
    assert exc.value.code == 2 and "unrecognized arguments: --lr 1e-3" in capsys.readouterr().err


def test_evaluate_load_is_its_own_and_a_training_yaml_still_loads(tmp_path):
    """A training config (any section) is accepted by evaluate; its --load names the checkpoints to evaluate
    and leaves the YAML's checkpoint.load alone."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 0.001, seq_length: 64}\ncheckpoint: {load: runs/resume}\nslm: {loss_mode: clm}\n")
    args = build_parser().parse_args(
        ["evaluate", "--config", str(path), "--load", "a", "b", "--data-path", "d", "--seq-length", "32"]
    )
    assert args.eval_load == ["a", "b"]
    cfg = load_config(args.config, args=args)
    assert cfg.train.lr == 0.001 and cfg.train.seq_length == 32 and cfg.checkpoint.load == "runs/resume"
    assert cfg.slm.loss_mode == "clm" and cfg.data.data_path == ["d"]


def _example(sub) -> list[str]:
    """The example command at the end of a command's --help, as argv after the command name's start."""
    text = sub.format_help().rstrip()
    head, sep, example = text.rpartition("\nexample:\n")
    assert sep, f"{sub.prog}: --help ends with no example:\n{text[-300:]}"
    line = example.replace("\\\n", " ").strip()
    assert "\n" not in line, example  # nothing after the example
    assert line.startswith(("slm ", "torchrun ")), line
    argv = shlex.split(line)
    return argv[1:] if argv[0] == "slm" else argv[argv.index("megatron_slm.cli") + 1 :]


def test_every_command_help_ends_with_an_example_that_parses():
    parser = build_parser()
    for words, sub in _commands(parser):
        argv = _example(sub)
        assert tuple(argv[: len(words)]) == words, (words, argv)
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"slm {' '.join(words)}: its --help example does not parse: {argv}") from None


def test_a_selection_naming_no_leaf_is_an_error():
    for select in ({"train": ("lrr",)}, {"optimizer": "*"}):
        with pytest.raises(ValueError):
            add_override_arguments(argparse.ArgumentParser(), select)
    p = argparse.ArgumentParser()
    add_override_arguments(p, {"reference": ("model",), "data": "*"})
    dests = {a.dest for a in p._actions if a.dest.startswith("cfg__")}
    assert "cfg__reference__model__num_layers" in dests and "cfg__reference__load" not in dests
    assert "cfg__data__split" in dests and not any(d.startswith("cfg__train__") for d in dests)
