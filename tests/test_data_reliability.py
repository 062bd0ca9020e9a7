"""Bad data gets one clear error naming the fix, never a silently wrong run:

- offline score sidecars made under other data flags than the run's (seq_length, seed, split, blend, more
  samples than scored) or over more than one epoch are refused before training, each differing flag named
  with both values; flags that do not move the windows (micro_batch_size, a regrouped global batch, fewer
  steps, the same files under another path) are accepted, and those runs replay online SLM exactly;
- token ids outside the vocabulary in a ``.bin`` (size and index unchanged) are refused, with the cached
  id range keyed by the ``.bin``'s size and mtime;
- a JSONL line holding a lone UTF-16 surrogate is one PreprocessError / one ``error:`` line naming the
  file and line, and leaves no output behind.
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import run_distributed
from helpers.corpus import preprocess_cli, write_jsonl
from helpers.offline import make_cfg, make_dataset, reference_ckpt, run_scoring

from megatron_slm.data import datasets as data_mod
from megatron_slm.data.preprocess import PreprocessError, preprocess
from megatron_slm.errors import DataError

OFFLINE = dict(reference_mode="offline")


def _check(blend, **over):
    from megatron_slm.training.resolve import resolve_run

    over.setdefault("slm", OFFLINE)
    return resolve_run(make_cfg(blend, **over))


def _refused(blend, **over) -> str:
    with pytest.raises(DataError) as exc:
        _check(blend, **over)
    return str(exc.value)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 0.6/0.4 blend scored at seq_length 32 for 3 steps of 8 samples (seed 5, split 90,10,0)."""
    d = tmp_path_factory.mktemp("reliability")
    blend = ["0.6", make_dataset(d / "a", 1), "0.4", make_dataset(d / "b", 2, num_docs=30)]
    ref = str(d / "ref")
    run_distributed(reference_ckpt, 1, blend, ref)
    assert run_distributed(run_scoring, 1, blend, ref, 1, None, train=dict(seq_length=32)) == ["done"]
    return d, blend, ref


# ------------------------------------------------------------------------------------------------
# 1. Offline sidecars scored under other data flags


def test_sidecars_scored_at_another_seq_length_are_refused(scored):
    d, blend, ref = scored
    msg = _refused(blend)  # this run: seq_length 16
    assert msg.startswith(f"score sidecar '{blend[1]}_refscores' was computed under other data flags"), msg
    assert "seq_length: scored with 32, this run has 16" in msg, msg
    assert "rerun slm score-reference" in msg and "train with the scored ones: --seq-length 32" in msg, msg
    _check(blend, train=dict(seq_length=32))  # the scored flags are accepted


def test_every_differing_flag_is_named_with_both_values(scored):
    d, blend, ref = scored
    msg = _refused(
        ["0.5", blend[1], "0.5", blend[3]], train=dict(seq_length=32, seed=6, train_iters=4), data=dict(split="80,20,0")
    )
    for part in (
        "seed: scored with 5, this run has 6",
        f"data blend: scored with --data-path 0.6 {blend[1]} 0.4 {blend[3]}, this run has --data-path "
        f"0.5 {blend[1]} 0.5 {blend[3]}",
        "split: scored on the first 90% of each dataset's documents (--split 90,10,0), this run trains "
        "on the first 80% (--split 80,20,0)",
        "train_iters x global_batch_size: this run trains 4 x 8 = 32 samples but the scoring run scored 3 x 8 = 24",
        "--seed 5",
        "--split 90,10,0",
        "--train-iters 3",
    ):
        assert part in msg, (part, msg)
    assert "seq_length" not in msg, msg
    # a separate validation blend: training then uses every document, not the split's first 90%
    msg = _refused(blend, train=dict(seq_length=32), data=dict(valid_data_path=[blend[3]]))
    assert "this run trains on all documents (--valid-data-path set)" in msg, msg
    # one dataset of the blend alone
    msg = _refused([blend[1]], train=dict(seq_length=32))
    assert (
        f"data blend: scored with --data-path 0.6 {blend[1]} 0.4 {blend[3]}, this run has --data-path {blend[1]} "
        "(2 datasets, this run 1)" in msg
    ), msg


def _replay(data_path, ref, mode, train):
    from megatron_slm.training.resolve import resolve_run
    from megatron_slm.training.run import build_data
    from megatron_slm.training.trainer import Trainer

    cfg = make_cfg(data_path, reference=dict(load=ref), slm=dict(reference_mode=mode), train=train)
    run = resolve_run(cfg)
    trainer = Trainer(run)
    batches, _ = build_data(run.config, run.data, trainer.dp_rank, trainer.dp_size, run.offline_scores)
    out = []
    for step in range(cfg.train.train_iters):
        m = trainer.train_step(batches(step))
        out.append((m["ref_loss"], [t["selected"].tolist() for t in m["token_details"]]))
    return out


def test_flags_that_keep_the_windows_are_accepted_and_replay_online(scored, tmp_path):
    d, blend, ref = scored
    _check(blend, train=dict(seq_length=32, micro_batch_size=4))  # micro-batching never moves a sample
    _check(["6", blend[1], "4", blend[3]], train=dict(seq_length=32))  # the same normalized weights
    moved = []
    for name, p in zip("ab", blend[1::2]):  # the same token files under another path
        for suffix in (".bin", ".idx", ".json", "_refscores.bin", "_refscores.idx", "_refscores.json"):
            shutil.copy(f"{p}{suffix}", tmp_path / f"{name}{suffix}")
        moved.append(str(tmp_path / name))
    _check(["0.6", moved[0], "0.4", moved[1]], train=dict(seq_length=32))
    # fewer steps, or the same 24 samples in global batches of 4: the same windows, scored
    for train in (dict(seq_length=32, train_iters=2), dict(seq_length=32, global_batch_size=4, train_iters=6)):
        online = run_distributed(_replay, 1, blend, ref, "online", train)[0]
        offline = run_distributed(_replay, 1, blend, ref, "offline", train)[0]
        assert online == offline


def test_a_manifest_without_the_new_records_is_refused(scored, tmp_path):
    d, blend, ref = scored
    copies = []
    for name, p in zip("ab", blend[1::2]):
        for suffix in (".bin", ".idx", ".json", "_refscores.bin", "_refscores.idx", "_refscores.json"):
            shutil.copy(f"{p}{suffix}", tmp_path / f"{name}{suffix}")
        copies.append(str(tmp_path / name))
    old = {"data_path", "split", "seq_length", "seed", "global_batch_size", "train_iters"}  # what v1 recorded
    for c in copies:
        path = Path(f"{c}_refscores.json")
        meta = json.loads(path.read_text())
        meta["scoring"] = {k: v for k, v in meta["scoring"].items() if k in old}
        meta.pop("num_scored_more_than_once", None)
        path.write_text(json.dumps(meta))
    msg = _refused(["0.6", copies[0], "0.4", copies[1]], train=dict(seq_length=32))
    assert "the manifest does not record" in msg and "written before they were checked" in msg, msg
    assert "rerun slm score-reference" in msg, msg


def _score_past_one_epoch(data_path, ref, **over):
    """Score as an older score-reference did, past one epoch: its refusal at start (check_one_epoch) is only
    recorded, and the run goes on."""
    from megatron_slm import scoring

    real, refusal = scoring.check_one_epoch, []

    def recorded(*a):
        try:
            real(*a)
        except DataError as exc:
            refusal.append(str(exc))

    scoring.check_one_epoch = recorded
    return run_scoring(data_path, ref, 1, None, **over), refusal


def test_scores_of_tokens_seen_in_several_windows_are_refused(scored, tmp_path):
    d, blend, ref = scored
    outs = [str(tmp_path / "a_long"), str(tmp_path / "b_long")]
    over = dict(reference=dict(load=ref, scores_path=outs), train=dict(train_iters=30))  # ~3 epochs of 'a'
    [(res, refusal)] = run_distributed(_score_past_one_epoch, 1, blend, ref, **over)
    assert res == "done" and len(refusal) == 1
    meta = json.loads(Path(f"{outs[0]}.json").read_text())
    assert meta["num_scored_more_than_once"] > 0
    # score-reference now refuses this at start, predicting from the indices alone what the merge counted
    for prefix, out in zip(blend[1::2], outs):
        twice = json.loads(Path(f"{out}.json").read_text())["num_scored_more_than_once"]
        assert f"dataset '{prefix}' (" in refusal[0] and f": {twice} tokens would be scored again" in refusal[0], (
            twice,
            refusal[0],
        )
    with pytest.raises(DataError) as exc:
        _check(blend, **over)
    msg = str(exc.value)
    assert f"score sidecar '{outs[0]}' holds {meta['num_scored_more_than_once']} tokens" in msg, msg
    assert "more than one epoch" in msg and "--reference-mode online" in msg, msg


# ------------------------------------------------------------------------------------------------
# 2. Token ids outside the vocabulary


def _corrupt(prefix, dtype=np.uint16):
    """Every 50th id := 60000, in place: the .bin keeps its size, the .idx is untouched."""
    time.sleep(0.05)  # a later write gets a later mtime even on coarse file-system clocks
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r+")
    tokens[49::50] = 60000
    tokens.flush()
    del tokens


@pytest.mark.unit
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, monkeypatch):
    prefix = make_dataset(tmp_path / "c", 7)  # vocab 96, no recorded id range
    scans = []
    real_scan = data_mod.scan_token_ids
    monkeypatch.setattr(data_mod, "scan_token_ids", lambda *a: scans.append(a) or real_scan(*a))
    _check([prefix], slm=dict(loss_mode="clm"))
    meta = json.loads(Path(f"{prefix}.json").read_text())
    assert meta["max_token_id"] == 95 and len(scans) == 1  # computed once, cached
    _check([prefix], slm=dict(loss_mode="clm"))
    assert len(scans) == 1
    _corrupt(prefix)
    msg = _refused([prefix], slm=dict(loss_mode="clm"))
    assert msg == (
        f"dataset '{prefix}': token id 60000 at position 49 is outside the vocabulary (vocab_size=96); "
        "the .bin is corrupt or was tokenized with another tokenizer; rebuild it with "
        "slm preprocess"
    ), msg


@pytest.mark.unit
def test_preprocess_records_the_id_range_and_a_rewritten_bin_is_rescanned(tmp_path, sp_model, monkeypatch):
    write_jsonl(tmp_path / "t.jsonl", ["the model selects tokens whose excess loss is high"] * 30)
    meta = preprocess([tmp_path / "t.jsonl"], tmp_path / "t", sp_model)
    prefix = str(tmp_path / "t")
    st = os.stat(f"{prefix}.bin")
    ids = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r")
    assert (meta["min_token_id"], meta["max_token_id"]) == (int(ids.min()), int(ids.max()))
    assert meta["token_ids_bin"] == {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    del ids
    scans = []
    real_scan = data_mod.scan_token_ids
    monkeypatch.setattr(data_mod, "scan_token_ids", lambda *a: scans.append(a) or real_scan(*a))
    _check([prefix], slm=dict(loss_mode="clm"))
    assert not scans  # the range recorded at preprocessing time is trusted while the .bin is unchanged
    _corrupt(prefix)  # same size, .idx and its checksum unchanged
    msg = _refused([prefix], slm=dict(loss_mode="clm"))
    assert msg.startswith(
        f"dataset '{prefix}': token id 60000 at position 49 is outside the vocabulary (vocab_size=300)"
    ), msg


# ------------------------------------------------------------------------------------------------
# 3. A lone UTF-16 surrogate in a JSONL line


def test_lone_surrogate_is_one_error_naming_file_and_line(tmp_path, sp_model, hf_json):
    lines = [
        json.dumps({"text": "the model"}),
        json.dumps({"text": "selects tokens"}),
        json.dumps({"text": "a \ud800 b"}),
    ]
    (tmp_path / "sur.jsonl").write_text("\n".join(lines) + "\n")
    for tok in (sp_model, hf_json):
        for workers in (1, 2):
            with pytest.raises(PreprocessError) as exc:
                preprocess([tmp_path / "sur.jsonl"], tmp_path / "failed", tok, workers=workers)
            assert str(exc.value) == (
                f"{tmp_path / 'sur.jsonl'} line 3: the text holds a lone UTF-16 surrogate (\\ud800, character 2), "
                "which no tokenizer can encode; fix or drop that line"
            ), str(exc.value)
    left = [f.name for f in tmp_path.iterdir() if f.name.startswith("failed")]
    assert not left, f"a failed run must leave no output or partial files: {left}"
    p = preprocess_cli("sur.jsonl", "--tokenizer", sp_model, "--output-prefix", "x", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "sur.jsonl line 3: the text holds a lone UTF-16 surrogate" in p.stderr, p.stderr
    assert not list(tmp_path.glob("x*"))
