"""A file from elsewhere runs no code when loaded (issue 19, case 6): each kind of file the product loads gets a
pickle payload planted in it, the product's own load path reads it, and the payload never runs: exit 2, one
``error:`` line, no traceback."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.data import tiny_text_dataset
from helpers.forked import run_forked

import megatron_slm.training.trainer  # noqa: F401 - import megatron-core once, before forking ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[2]
DS_CONFIG = str(REPO / "ds_configs" / "test_zero1_fp32.json")


class Payload:
    """Unpickled, it creates the directory ``marker`` (it could run anything else instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _argv(root, save, *extra):
    return [
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
        "16",
        "--loss-mode",
        "clm",
        "--data-path",
        str(root / "data" / "train"),
        "--split",
        "99,1,0",
        "--log-interval",
        "100",
        "--eval-iters",
        "0",
        "--data-cache-path",
        str(root / "cache"),
        "--save",
        str(save),
        *extra,
    ]


def _cli(argv):
    """``slm train ...`` in a forked rank (megatron-core already imported): (exit status, stderr)."""
    from megatron_slm import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _fork_cli(argv):
    return run_forked(_cli, 1, argv, timeout=120)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Data, and a 1-step run saved by each backend (megatron-core's optimizer, DeepSpeed ZeRO-1)."""
    root = tmp_path_factory.mktemp("hostile")
    tiny_text_dataset(root / "data", lines=120)
    for name, extra in (("run", ()), ("ds", ("--deepspeed", DS_CONFIG))):
        rc, err = _fork_cli(_argv(root, root / name, "--train-iters", "1", *extra))
        assert rc == 0, err
    return root


def _refused(rc, err, marker, *named):
    assert not Path(marker).exists(), "the payload ran"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "refused to load" in lines[0] and "could run code" in lines[0] and "posix.mkdir" in lines[0], lines[0]
    assert all(n in lines[0] for n in named), lines[0]


def _resave(file, marker):
    """``file`` (a torch.save dict) with the payload added under a new key."""
    state = torch.load(file, weights_only=False)
    state["x"] = Payload(marker)
    torch.save(state, file)


def test_the_payload_runs_when_unpickled_plainly(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "m")))
    assert (tmp_path / "m").is_dir()  # so its absence below means that nothing ran it


def test_resume_refuses_a_planted_dcp_index_in_a_real_process(runs, tmp_path):
    """torch DCP's ``.metadata``, which torch reads with plain pickle.load: checked first with an allowlist."""
    save, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(runs / "run", save)
    index = save / "iter_0000001" / ".metadata"
    with open(index, "rb") as f:
        metadata = pickle.load(f)  # our own file, just written: the test may read it any way
    metadata.planner_data = Payload(marker)  # a real index with one extra object
    index.write_bytes(pickle.dumps(metadata))
    res = subprocess.run(
        [sys.executable, "-m", "megatron_slm.cli", *_argv(runs, save, "--train-iters", "2")],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _refused(res.returncode, res.stderr, marker, str(index))


def _plant_common(it, marker):
    _resave(it / "common.pt", marker)
    return it / "common.pt"


def _plant_rank_state(it, marker):
    _resave(it / "rank_state" / "rank00000.pt", marker)
    return it / "rank_state" / "rank00000.pt"


@pytest.mark.parametrize("plant", [_plant_common, _plant_rank_state], ids=["common.pt", "rank_state"])
def test_resume_refuses_a_planted_checkpoint_file(runs, tmp_path, plant):
    save, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(runs / "run", save)
    file = plant(save / "iter_0000001", marker)
    _refused(*_fork_cli(_argv(runs, save, "--train-iters", "2")), marker, str(file))


def test_ref_load_refuses_a_planted_sharded_object(runs, tmp_path):
    """A non-tensor item inside a ``.distcp`` shard (megatron-core's ShardedObject, e.g. a layer's _extra_state),
    which torch DCP loads with weights_only=False: repointed at a payload appended to its shard."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ref, marker = tmp_path / "ref", tmp_path / "marker"
    shutil.copytree(runs / "run", ref)
    it = ref / "iter_0000001"
    with open(it / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index = next(
        i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    info = metadata.storage_data[index]
    shard = it / info.relative_path
    buf = io.BytesIO()
    torch.save([Payload(marker)], buf)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    info.offset, info.length = offset, len(buf.getvalue())
    (it / ".metadata").write_bytes(pickle.dumps(metadata))
    argv = _argv(runs, tmp_path / "new", "--train-iters", "1", "--ref-load", str(ref))
    argv[argv.index("clm")] = "slm"
    _refused(*_fork_cli(argv), marker, str(shard), index.fqn)


def test_ref_load_refuses_a_planted_transformers_bin(runs, tmp_path):
    """A transformers directory's pytorch_model.bin (read with weights_only=True)."""
    import transformers

    hf, marker = tmp_path / "hf", tmp_path / "marker"
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    model.config.save_pretrained(str(hf))
    shutil.copy(runs / "data" / "tok.model", hf / "tokenizer.model")
    torch.save({**model.state_dict(), "x": Payload(marker)}, hf / "pytorch_model.bin")
    argv = _argv(runs, tmp_path / "new", "--train-iters", "1", "--ref-load", str(hf))
    argv[argv.index("clm")] = "slm"
    _refused(*_fork_cli(argv), marker, str(hf / "pytorch_model.bin"))


def test_deepspeed_resume_refuses_a_planted_engine_file(runs, tmp_path):
    """DeepSpeed reads its engine files with weights_only=False: each is checked first."""
    save, marker = tmp_path / "ds", tmp_path / "marker"
    shutil.copytree(runs / "ds", save)
    file = save / "iter_0000001" / "mp_rank_00_model_states.pt"
    _resave(file, marker)
    _refused(*_fork_cli(_argv(runs, save, "--train-iters", "2", "--deepspeed", DS_CONFIG)), marker, str(file))


def test_heatmap_tool_refuses_a_planted_selection_dump(tmp_path, capsys):
    from megatron_slm import cli

    dumps, marker = tmp_path / "run" / "selection_dumps", tmp_path / "marker"
    dumps.mkdir(parents=True)
    torch.save({"iteration": 1, "sequences": [], "x": Payload(marker)}, dumps / "iter_0000001.pt")
    rc = cli.main(["viz", "--dump", str(tmp_path / "run"), "--out", str(tmp_path / "page.html")])
    _refused(rc, capsys.readouterr().err, marker, str(dumps / "iter_0000001.pt"))


def test_a_config_with_python_tags_is_refused(tmp_path, capsys):
    from megatron_slm import cli

    marker = tmp_path / "marker"
    config = tmp_path / "run.yaml"
    config.write_text(f"train:\n  seed: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    rc = cli.main(["check-config", "--config", str(config)])
    err = capsys.readouterr().err
    assert not marker.exists() and rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()], err
    assert "python/object/apply:os.mkdir" in err and "line 2" in err, err
