"""The training log (MetricsLogger): Megatron-LM-style throughput in the log line, metrics.jsonl, Weights &
Biases in offline mode (read back from the run's own ``.wandb`` transaction log), and the model FLOPs count.

Truths are written out by hand: the FLOPs of a tiny config as plain arithmetic, throughput as
tokens / step time / world size, and the values passed to ``step``/``eval`` for what W&B recorded."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from megatron_slm.config import Config, fill_model_shapes
from megatron_slm.errors import MissingDependencyError
from megatron_slm.log import METRICS_LOGGER
from megatron_slm.planning.flops import training_step_flops
from megatron_slm.training import metrics as metrics_mod
from megatron_slm.training.metrics import MetricsLogger


def _shape(model, layers, hidden, ffn, heads, groups, vocab=None):
    model.num_layers, model.hidden_size, model.ffn_hidden_size = layers, hidden, ffn
    model.num_attention_heads, model.num_query_groups = heads, groups
    if vocab is not None:
        model.vocab_size = vocab


def _tiny(loss_mode="slm", reference_mode="online", scope="micro_batch", ref_shape=True) -> Config:
    cfg = Config()
    _shape(cfg.model, 2, 64, 160, 4, 2, 1000)
    if ref_shape:  # a smaller reference; vocab is inherited from the policy
        _shape(cfg.reference.model, 1, 32, 64, 2, 1)
    cfg.slm.loss_mode, cfg.slm.reference_mode, cfg.slm.selection_scope = loss_mode, reference_mode, scope
    cfg.train.global_batch_size, cfg.train.seq_length = 4, 32
    return fill_model_shapes(cfg)  # as load_config does: the reference's unset fields are the policy's


def _mistral() -> Config:
    cfg = Config()
    _shape(cfg.model, 32, 4096, 14336, 32, 8, 32000)
    cfg.slm.loss_mode = "clm"
    cfg.train.global_batch_size, cfg.train.seq_length = 8, 4096
    return fill_model_shapes(cfg)


def _m(step: int, **over) -> dict:
    m = dict(
        loss_selected=2.0 + 0.1 * step,
        loss_all=3.0 + 0.1 * step,
        ref_loss=2.5,
        excess_selected=0.75,
        excess_unselected=-0.25,
        selected_fraction=0.6,
        num_selected=60,
        num_valid=100,
        grad_norm=1.5,
        lr=3e-4,
        step_time=0.25,
        update_ok=True,
        token_details=None,
    )
    m.update(over)
    return m


@pytest.fixture
def lines():
    """Records of the megatron_slm.metrics logger (it may not propagate to the root, so no caplog)."""
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(METRICS_LOGGER)
    handler, level = Grab(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------------
# FLOPs


# Per token, one forward of the tiny policy (L=2, H=64, F=160, 4 heads, 2 KV groups -> K/V width 32,
# V=1000 padded to 1024, s=32):
#   Q 2*64*64 + out 2*64*64 + K 2*64*32 + V 2*64*32 = 8192 + 8192 + 4096 + 4096 = 24576
#   scores 2*32*64 + values 2*32*64                   = 4096 + 4096               =  8192
#   SwiGLU 3 * 2*64*160                                                           = 61440
#   per layer 94208, x 2 layers = 188416; logits 2*64*1024 = 131072  ->  319488 per token
POLICY_FWD = 319488 * 4 * 32
# The reference (L=1, H=32, F=64, 2 heads, 1 KV group -> K/V width 16, vocab 1024):
#   Q 2*32*32 + out 2*32*32 + K 2*32*16 + V 2*32*16 = 2048 + 2048 + 1024 + 1024 = 6144
#   scores + values 2 * 2*32*32 = 4096; SwiGLU 3 * 2*32*64 = 12288; logits 2*32*1024 = 65536
#   -> 6144 + 4096 + 12288 + 65536 = 88064 per token
REF_FWD = 88064 * 4 * 32


@pytest.mark.unit
@pytest.mark.parametrize(
    "mode,ref_mode,scope,expected",
    [
        ("clm", "online", "micro_batch", 3 * POLICY_FWD),  # no reference in the CLM baseline
        ("slm", "online", "micro_batch", 3 * POLICY_FWD + REF_FWD),
        ("slm", "offline", "micro_batch", 3 * POLICY_FWD),  # precomputed scores: no reference pass
        ("slm", "online", "global_batch", 4 * POLICY_FWD + REF_FWD),  # + the policy's scoring pass
        ("slm", "offline", "global_batch", 4 * POLICY_FWD),
    ],
)
def test_flops_tiny_by_hand(mode, ref_mode, scope, expected):
    assert training_step_flops(_tiny(mode, ref_mode, scope)) == expected


@pytest.mark.unit
def test_flops_reference_inherits_policy_shape_and_vocab_padding():
    cfg = _tiny(ref_shape=False)  # reference fields unset: same shape as the policy
    assert training_step_flops(cfg) == 4 * POLICY_FWD
    cfg = _tiny("clm")
    cfg.model.vocab_size = 1100  # padded to 1152 (128) with TP 1, 1280 (256) with TP 2
    base = 3 * 4 * 32 * (188416 + 2 * 64 * 1152)
    assert training_step_flops(cfg) == base
    cfg.parallel.tensor_model_parallel_size = 2
    assert training_step_flops(cfg) == base + 3 * 4 * 32 * 2 * 64 * (1280 - 1152)


@pytest.mark.unit
def test_flops_mistral_7b_is_6nd_plus_attention():
    cfg = _mistral()
    tokens, s, layers, h = 8 * 4096, 4096, 32, 4096
    attention = 3 * layers * (2 * 2 * s * h) * tokens  # fwd+bwd of Q K^T and A V, full s
    reference = 6 * 7.24e9 * tokens + attention
    assert abs(training_step_flops(cfg) - reference) / reference < 0.02


# ------------------------------------------------------------------------------------------------
# The log line and metrics.jsonl


def _run(cfg, steps, lines):
    ml = MetricsLogger(cfg, is_logging_rank=True)
    ml.start(cfg.train.train_iters, 0)
    for i, m in enumerate(steps, 1):
        ml.step(i, m, tokens=cfg.train.global_batch_size * cfg.train.seq_length)
    ml.close()
    return lines[-1]


def _num(pattern, line):
    match = re.search(pattern, line)
    assert match, (pattern, line)
    return float(match.group(1).replace(",", ""))


@pytest.mark.unit
def test_log_line_throughput_mfu_memory(tmp_path, lines, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = _mistral()
    cfg.slm.loss_mode = "slm"
    cfg.train.peak_tflops = 100.0
    cfg.train.log_interval, cfg.train.train_iters = 2, 2
    cfg.checkpoint.save = str(tmp_path)
    line = _run(cfg, [_m(1, step_time=10.0), _m(2, step_time=10.0)], lines)

    tokens, flops = 8 * 4096, training_step_flops(cfg)
    assert _num(r"([\d,]+) tok/s/GPU", line) == pytest.approx(tokens / 10 / 8, abs=0.5)
    assert _num(r"tok/s/GPU \(([\d,]+) total\)", line) == pytest.approx(tokens / 10, abs=0.5)
    tflops = flops / 10 / 8 / 1e12
    assert _num(r"\| ([\d.]+) TFLOP/s/GPU", line) == pytest.approx(tflops, abs=0.05)
    assert _num(r"MFU ([\d.]+)%", line) == pytest.approx(100 * tflops / 100.0, abs=0.05)
    assert _num(r"mem ([\d.]+) GiB", line) > 0
    assert "| 10.000 s/step" in line and "excess sel/unsel +0.750/-0.250" in line
    assert "loss(sel) 2.1500" in line  # the mean of 2.1 and 2.2 over the log interval

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    r = rows[1]
    assert r["tokens_per_s"] == tokens / 10 and r["tokens_per_s_per_gpu"] == tokens / 10 / 8
    assert r["tflops_per_gpu"] == pytest.approx(tflops, rel=1e-12)
    assert r["mfu"] == pytest.approx(tflops / 100.0, rel=1e-12)
    assert r["peak_mem_gib"] > 0 and r["loss_selected"] == 2.2


@pytest.mark.unit
def test_log_line_no_peak_and_nothing_unselected(tmp_path, lines, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(metrics_mod, "device_peak_tflops", lambda: None)  # as on CPU or an unknown GPU
    cfg = _tiny()
    cfg.train.log_interval, cfg.train.train_iters = 1, 1
    cfg.checkpoint.save = str(tmp_path)
    line = _run(cfg, [_m(1, selected_fraction=1.0, excess_unselected=0.0, num_selected=100)], lines)
    assert "excess sel/unsel +0.750/n/a" in line and "+0.000" not in line
    assert "MFU n/a" in line
    assert _num(r"([\d,]+) tok/s/GPU", line) == 4 * 32 / 0.25  # world size 1
    tflops = training_step_flops(cfg) / 0.25 / 1e12
    assert _num(r"\| ([\d.e-]+) TFLOP/s/GPU", line) == pytest.approx(tflops, rel=2e-3)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert "mfu" not in row and row["tflops_per_gpu"] == pytest.approx(tflops, rel=1e-12)


@pytest.mark.unit
def test_clm_line_has_no_slm_fields_and_other_ranks_are_silent(tmp_path, lines, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _tiny("clm")
    cfg.train.log_interval, cfg.train.train_iters, cfg.train.peak_tflops = 1, 1, 1.0
    line = _run(cfg, [_m(1)], lines)
    assert "ref " not in line and "excess" not in line and "selected " not in line
    assert _num(r"([\d,]+) tok/s/GPU", line) == 4 * 32 / 0.25 / 2
    n = len(lines)
    quiet = MetricsLogger(cfg, is_logging_rank=False)
    quiet.start(1, 0)
    quiet.step(1, _m(1), tokens=128)
    quiet.eval(1, 1.0)
    quiet.close()
    assert len(lines) == n


@pytest.mark.unit
def test_peak_table(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert metrics_mod.device_peak_tflops() == peak


# ------------------------------------------------------------------------------------------------
# Weights & Biases (offline mode, read back from the run's .wandb transaction log)


def _wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a LevelDB-style log (7-byte header ':W&B' + magic + version,
    32 KiB blocks of chunks: crc32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, payload = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(payload)
            yield record


def _wandb_run(path: Path):
    run, history = None, {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    return run, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in [
        ("WANDB_MODE", "offline"),
        ("WANDB_SILENT", "true"),
        ("WANDB_CONFIG_DIR", tmp_path / "wbconfig"),
        ("WANDB_CACHE_DIR", tmp_path / "wbcache"),
        ("WANDB_DATA_DIR", tmp_path / "wbdata"),
    ]:
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run's dir comes from --wandb-save-dir / <save>/wandb
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def test_wandb_offline_logs_the_values_passed(tmp_path, lines, wandb_offline, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _tiny()
    cfg.train.wandb_project, cfg.train.wandb_exp_name = "slm-test", "tiny-k0.6"
    cfg.train.log_interval, cfg.train.train_iters = 2, 3
    cfg.checkpoint.save = str(tmp_path / "run")
    steps = [_m(1), _m(2, loss_selected=1.234, step_time=0.5), _m(3)]
    ml = MetricsLogger(cfg, is_logging_rank=True)
    ml.start(3, 0)
    for i, m in enumerate(steps, 1):
        ml.step(i, m, tokens=128)
    ml.eval(3, 2.75)
    ml.close()

    (path,) = (tmp_path / "run").glob("wandb/wandb/offline-run-*/run-*.wandb")  # the default dir: <save>/wandb
    run, history = _wandb_run(path)
    assert run.project == "slm-test" and run.display_name == "tiny-k0.6"
    assert run.run_id == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model"]["hidden_size"] == 64 and config["slm"]["selection_scope"] == "micro_batch"
    assert sorted(history) == [1, 2, 3]
    assert history[2]["train/loss_selected"] == 1.234
    assert history[2]["train/tokens_per_s"] == 128 / 0.5 and history[2]["train/tokens_per_s_per_gpu"] == 128 / 0.5 / 2
    assert history[2]["train/tflops_per_gpu"] == pytest.approx(training_step_flops(cfg) / 0.5 / 2 / 1e12, rel=1e-9)
    assert history[1]["train/loss_all"] == 3.1 and history[3]["train/grad_norm"] == 1.5
    assert history[3]["eval/loss"] == 2.75 and "eval/loss" not in history[2]

    # a resumed run (same --save) continues the same W&B run
    ml = MetricsLogger(cfg, is_logging_rank=True)
    ml.start(4, 3)
    ml.step(4, _m(4), tokens=128)
    ml.close()
    (second,) = set((tmp_path / "run").glob("wandb/wandb/offline-run-*/run-*.wandb")) - {path}
    resumed, history = _wandb_run(second)
    assert resumed.run_id == run.run_id and sorted(history) == [4]


def test_wandb_missing_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = _tiny()
    cfg.train.wandb_project = "p"
    with pytest.raises(
        MissingDependencyError, match=r"--wandb-project needs the 'wandb' package: pip install 'megatron_slm\[wandb\]'"
    ):
        MetricsLogger(cfg, is_logging_rank=True)
    MetricsLogger(cfg, is_logging_rank=False).close()  # other ranks never import it


def _ds(selected, valid, unselected_ref_sum):
    """Per-dataset counts of one step, as the trainer adds them (two blend datasets)."""
    out = {}
    for i, (s, v, r) in enumerate(zip(selected, valid, unselected_ref_sum)):
        out.update(
            {
                f"selected_tokens_ds{i}": s,
                f"valid_tokens_ds{i}": v,
                f"unselected_ref_loss_sum_ds{i}": r,
                f"unselected_tokens_ds{i}": v - s,
            }
        )
    return out


@pytest.mark.unit
def test_forgetting_is_visible_and_warned_once(tmp_path, lines):
    cfg = _tiny()
    cfg.data.data_path = ["0.5", "data/math", "0.5", "data/general"]
    cfg.train.log_interval, cfg.train.train_iters = 2, 4
    cfg.slm.slm_warn_selected_share = 0.2
    # general: 10 of 100 tokens selected per step; its 90 unselected tokens have reference loss 7.0 on average
    steps = [_m(i, **_ds([70, 10], [100, 100], [30 * 3.0, 90 * 7.0])) for i in range(1, 5)]
    _run(cfg, steps, lines)
    logged = [x for x in lines if "by dataset" in x]
    assert len(logged) == 2 and "by dataset selected/ref(unsel) 0.70/3.00 0.10/7.00" in logged[0]
    warnings = [x for x in lines if "--slm-warn-selected-share" in x]
    assert len(warnings) == 1  # once per dataset, not at every log line
    assert warnings[0].startswith("general: only 10.0% of its tokens") and "7.00" in warnings[0]
    assert "--slm-select-ratio-per-dataset" in warnings[0]


@pytest.mark.unit
def test_no_forgetting_warning_above_the_share_or_when_off(tmp_path, lines):
    cfg = _tiny()
    cfg.data.data_path = ["0.5", "data/math", "0.5", "data/general"]
    cfg.train.log_interval, cfg.train.train_iters = 1, 2
    steps = [_m(i, **_ds([70, 30], [100, 100], [90.0, 490.0])) for i in range(1, 3)]
    _run(cfg, steps, lines)
    cfg.slm.slm_warn_selected_share = 0.0
    _run(cfg, [_m(i, **_ds([70, 1], [100, 100], [90.0, 690.0])) for i in range(1, 3)], lines)
    assert not [x for x in lines if "--slm-warn-selected-share" in x]
