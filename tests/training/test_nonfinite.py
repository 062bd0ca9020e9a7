"""Divergence is never silent: a non-finite loss or gradient norm is agreed on all ranks, its update is skipped
(or the run stops), nothing non-finite is saved, the run exits non-zero and its summary is valid JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.data import tiny_text_dataset
from helpers.tiny_training import tiny_clm_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_text_dataset(tmp_path_factory.mktemp("data"))


def _train(data, save, *flags, nproc=1):
    from megatron_slm.parallel.distributed import free_port

    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    launcher = launcher if nproc > 1 else []
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "megatron_slm.cli",
        "train",
        *tiny_clm_flags(data),
        "--save",
        str(save),
        "--data-cache-path",
        str(save.parent / "cache"),
        *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _checkpoint_tensors(iteration_dir: Path, tmp: Path) -> dict:
    """Every tensor of a dist checkpoint, read by torch's own DCP reader (no process group, no megatron)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{iteration_dir.name}.pt"
    dcp_to_torch_save(str(iteration_dir), str(out))
    flat = {}

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            flat[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)

    walk("", torch.load(out, weights_only=False))
    return flat


def test_divergence_skips_updates_then_stops_with_nothing_non_finite_saved(data, tmp_path):
    save = tmp_path / "run"
    res = _train(
        data,
        save,
        "--lr",
        "1000",
        "--lr-warmup-iters",
        "0",
        "--train-iters",
        "12",
        "--save-interval",
        "1",
        "--keep-last",
        "2",
        "--max-nonfinite-skips",
        "2",
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("error:") == 1 and "non-finite loss or gradient norm" in res.stderr
    assert "Traceback" not in res.stderr
    summary = _strict_json((save / "summary.json").read_text())
    steps = summary["nonfinite_steps"]
    assert summary["stopped_by"] == "non-finite" and len(steps) == 2 and steps[1] == steps[0] + 1
    assert summary["iterations"] == steps[-1] < 12
    for line in (save / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    assert "update skipped" in res.stdout
    # the latest checkpoint (and every one kept) holds finite weights and optimizer state
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest < steps[-1]  # the stopping step itself was not saved
    kept = sorted(p for p in save.glob("iter_???????") if p.is_dir())
    assert kept and kept[-1].name == f"iter_{latest:07d}"
    for it_dir in kept:
        tensors = _checkpoint_tensors(it_dir, tmp_path)
        assert any("word_embeddings" in k for k in tensors)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"{it_dir.name} holds non-finite tensors: {bad[:3]}"


def test_stop_policy_stops_at_the_first_non_finite_step_on_every_rank(data, tmp_path):
    save = tmp_path / "run"
    res = _train(
        data,
        save,
        "--lr",
        "1000",
        "--lr-warmup-iters",
        "0",
        "--train-iters",
        "12",
        "--on-nonfinite",
        "stop",
        "--tensor-model-parallel-size",
        "1",
        "--pipeline-model-parallel-size",
        "2",
        nproc=2,
    )
    assert res.returncode != 0, res.stdout + res.stderr
    assert res.stderr.count("error:") == 1 and "non-finite" in res.stderr
    summary = _strict_json((save / "summary.json").read_text())
    assert summary["stopped_by"] == "non-finite" and len(summary["nonfinite_steps"]) == 1
    assert not (save / "latest_checkpointed_iteration.txt").exists()  # nothing saved: no save interval, no end


def test_a_finite_run_is_unchanged_by_the_veto(data, tmp_path):
    res = _train(data, tmp_path / "run", "--train-iters", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = _strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] is None and summary["nonfinite_steps"] == [] and summary["iterations"] == 3
