"""Config loading (YAML + Megatron-style overrides) and up-front validation with clear errors."""

import argparse

import pytest

from megatron_slm.config import add_override_arguments, load_config, validate
from megatron_slm.errors import ConfigError

pytestmark = pytest.mark.unit


def _cli(argv, config=None):
    p = argparse.ArgumentParser()
    add_override_arguments(p)
    return load_config(config, args=p.parse_args(argv))


def test_yaml_then_cli_overrides_and_presets(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: {preset: tiny, num_layers: 6, vocab_size: 512}\nslm: {slm_select_ratio: 0.7}\n")
    cfg = _cli(["--num-layers", "8", "--tensor-model-parallel-size", "2", "--ref-num-layers", "2"], str(y))
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 64  # CLI > YAML > preset
    assert cfg.slm.slm_select_ratio == 0.7 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.reference.model.num_layers == 2 and cfg.reference.model.hidden_size == 64  # inherits the rest
    validate(cfg, world_size=2)


def test_real_presets_resolve():
    cfg = load_config(overrides={"model": {"preset": "mistral-7b"}})
    assert (cfg.model.num_layers, cfg.model.num_query_groups, cfg.model.sliding_window) == (32, 8, 4096)
    validate(
        load_config(overrides={"model": {"preset": "tinyllama-1.1b"}, "parallel": {"tensor_model_parallel_size": 4}})
    )


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            {"parallel": {"tensor_model_parallel_size": 3}},
            None,
            "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3",
        ),
        (
            {"parallel": {"pipeline_model_parallel_size": 3}},
            None,
            "num_layers=4 is not divisible by pipeline_model_parallel_size=3",
        ),
        ({"slm": {"slm_select_ratio": 0.0}}, None, "outside (0, 1]"),
        ({"slm": {"slm_select_ratio": 1.2}}, None, "outside (0, 1]"),
        ({"slm": {"selection_scope": "batch"}}, None, "selection_scope='batch'"),
        ({"reference": {"model": {"vocab_size": 999}}}, None, "vocab mismatch"),
        ({"model": {"num_query_groups": 3}}, None, "not a multiple of num_query_groups=3"),
        ({"train": {"global_batch_size": 6}}, 4, "not divisible by micro_batch_size x data-parallel"),
        ({"parallel": {"tensor_model_parallel_size": 2}}, 3, "world size 3 is not divisible by TP x PP = 2 x 1"),
        (
            {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True}},
            None,
            "sequence_parallel needs TransformerEngine or Apex",
        ),
        ({"train": {"lr": float("nan")}}, None, "train.lr=nan is not a finite number (--lr)"),
        ({"slm": {"threshold_momentum": float("inf")}}, None, "slm.threshold_momentum=inf is not a finite number"),
    ],
)
def test_each_problem_gets_one_clear_error(overrides, world, message):
    base = {"model": {"preset": "tiny", "vocab_size": 512}}
    for k, v in overrides.items():
        base.setdefault(k, {}).update(v)
    cfg = load_config(overrides=base)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world)
    assert message in str(e.value)
    assert str(e.value).count(message) == 1  # reported once, not repeated for the reference


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train: {lerning_rate: 1.0}\n")
    with pytest.raises(ConfigError, match="unknown key 'train.lerning_rate'.*Valid keys"):
        load_config(str(y))
    with pytest.raises(ConfigError, match="--micro-batch-size: expected int"):
        _cli(["--micro-batch-size", "two"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_config(overrides={"model": {"preset": "gpt5"}})
