"""megatron-core datasets, the positions twin, and offline reference scores.

- blending draws datasets in the configured proportions; every sample's tokens are the raw tokens at the
  positions its twin reports (so score lookups are aligned through shuffling, packing and blending);
- with an fp32 sidecar, offline SLM gives the same selection masks and loss curve as online SLM;
- scoring resumes after an interruption and gives the same sidecar;
- missing, truncated, misaligned and mismatched sidecars, and unscored tokens, are refused clearly.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import run_distributed
from helpers.offline import EOD, SEQ, make_cfg, make_dataset, reference_ckpt, run_scoring

from megatron_slm.errors import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline")
    a, b = make_dataset(d / "a", 1), make_dataset(d / "b", 2, num_docs=30)
    return d, ["0.6", a, "0.4", b]


# ------------------------------------------------------------------------------------------------
# Datasets and the positions twin (single process)


def _blend_worker(blend, cache):
    import torch.distributed as dist

    from megatron_slm.data.datasets import build_datasets, dataset_config
    from megatron_slm.training.resolve import resolve_run

    dist.init_process_group("gloo")  # megatron-core's blended index builder asks for a rank
    cfg = make_cfg(blend, train=dict(train_iters=100), data=dict(data_cache_path=cache))
    info = resolve_run(cfg).data
    ds_cfg = dataset_config(cfg.data, SEQ, 5, info)
    train = build_datasets(ds_cfg, [800, 8, 0])[0]
    twin = build_datasets(ds_cfg, [800, 8, 0], positions=True)[0]
    return [(train[i], twin[i]) for i in range(800)]


@pytest.mark.unit
def test_blend_proportions_and_positions_twin_alignment(data):
    d, blend = data
    pairs = run_distributed(_blend_worker, 1, blend, str(d / "cache1"))[0]
    raw = [np.memmap(f"{p}.bin", dtype=np.uint16, mode="r") for p in blend[1::2]]  # flat token streams
    ids = np.array([int(s["dataset_id"]) for s, _ in pairs])
    assert abs((ids == 0).mean() - 0.6) < 0.01 and abs((ids == 1).mean() - 0.4) < 0.01
    for s, p in pairs[::3]:
        assert int(p["dataset_id"]) == int(s["dataset_id"])
        stream = raw[int(s["dataset_id"])]
        assert np.array_equal(stream[p["positions"].numpy()], s["tokens"].numpy())
        assert np.array_equal(stream[p["label_positions"].numpy()], s["labels"].numpy())
        assert torch.equal(s["loss_mask"], (s["tokens"] != EOD).float())  # loss masked after EOD


@pytest.mark.unit
def test_data_errors_are_clear(data, tmp_path):
    from megatron_slm.training.resolve import resolve_run

    d, blend = data
    with pytest.raises(DataError, match="missing; create it with slm preprocess"):
        resolve_run(make_cfg([str(tmp_path / "nope")]))
    other = make_dataset(tmp_path / "other", 3, fingerprint="another-tokenizer")
    with pytest.raises(DataError, match="different tokenizers"):
        resolve_run(make_cfg([blend[1], other]))
    with pytest.raises(DataError, match="vocab_size=96 but the model has vocab_size=128"):
        resolve_run(make_cfg(blend, model=dict(vocab_size=128)))
    broken = make_dataset(tmp_path / "broken", 4)
    meta = json.loads(Path(f"{broken}.json").read_text())
    Path(f"{broken}.json").write_text(json.dumps(dict(meta, bin_bytes=Path(f"{broken}.bin").stat().st_size)))
    resolve_run(make_cfg([broken]))
    Path(f"{broken}.bin").write_bytes(Path(f"{broken}.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        resolve_run(make_cfg([broken]))


# ------------------------------------------------------------------------------------------------
# Offline == online; resume; refusals (multi-process)


def _train(data_path, ref, mode, slm=None):

    from megatron_slm.training.resolve import resolve_run
    from megatron_slm.training.run import build_data
    from megatron_slm.training.trainer import Trainer

    cfg = make_cfg(data_path, reference=dict(load=ref), slm=dict(reference_mode=mode, **(slm or {})))
    run = resolve_run(cfg)
    trainer = Trainer(run)
    batches, _ = build_data(run.config, run.data, trainer.dp_rank, trainer.dp_size, run.offline_scores)
    out = []
    for step in range(cfg.train.train_iters):
        mbs = batches(step)
        m = trainer.train_step(mbs)
        out.append(
            dict(
                ids=[mb["dataset_id"].clone() for mb in mbs],
                valid=[mb["loss_mask"] > 0 for mb in mbs],
                loss=m["loss_selected"],
                ref=m["ref_loss"],
                masks=[t["selected"] for t in m["token_details"]],
                refs=[t["ref_loss"] for t in m["token_details"]],
            )
        )
    return out


@pytest.fixture(scope="module")
def scored(data):
    d, blend = data
    ref = str(d / "ref")
    run_distributed(reference_ckpt, 1, blend, ref)
    assert run_distributed(run_scoring, 2, blend, ref, 2)[0] == "done"  # PP=2 scoring
    return d, blend, ref


def test_offline_training_replays_online_exactly(scored):
    d, blend, ref = scored
    online = run_distributed(_train, 2, blend, ref, "online")  # DP=2
    offline = run_distributed(_train, 2, blend, ref, "offline")
    for rank_on, rank_off in zip(online, offline):
        for a, b in zip(rank_on, rank_off):
            assert a["loss"] == b["loss"] and a["ref"] == b["ref"]
            for ma, mb, ra, rb in zip(a["masks"], b["masks"], a["refs"], b["refs"]):
                assert torch.equal(ma, mb)
                assert torch.equal(ra, rb)


def test_per_dataset_selection_offline_replays_online(scored):
    """k = 1.0 on the first dataset (CLM on it), 0.5 on the second, ranked over the global batch: the offline run
    selects exactly what the online one does, all of dataset 0's valid tokens and round(0.5 n) of dataset 1's."""
    d, blend, ref = scored
    per = dict(slm_select_ratio_per_dataset=["1.0", "0.5"], selection_scope="global_batch")
    online = run_distributed(_train, 2, blend, ref, "online", per)  # DP=2
    offline = run_distributed(_train, 2, blend, ref, "offline", per)
    for rank_on, rank_off in zip(online, offline):
        for a, b in zip(rank_on, rank_off):
            assert a["loss"] == b["loss"]
            assert all(torch.equal(ma, mb) for ma, mb in zip(a["masks"], b["masks"]))
    for step in range(len(online[0])):
        chosen, valid = [0, 0], [0, 0]
        for rank in online:
            for ids, v, mask in zip(rank[step]["ids"], rank[step]["valid"], rank[step]["masks"]):
                tok_ids = ids.view(-1, 1).expand_as(v)
                for ds in (0, 1):
                    chosen[ds] += int((mask.bool() & v & (tok_ids == ds)).sum())
                    valid[ds] += int((v & (tok_ids == ds)).sum())
        assert valid[0] > 0 and valid[1] > 0
        assert chosen[0] == valid[0] and chosen[1] == int(valid[1] * 0.5 + 0.5)


def test_scoring_resumes_after_interruption(scored, tmp_path):
    d, blend, ref = scored
    clean = {p: Path(f"{p}_refscores.bin").read_bytes() for p in blend[1::2]}
    outs = [str(tmp_path / "a_scores"), str(tmp_path / "b_scores")]
    res = run_distributed(run_scoring, 2, blend, ref, 1, 2, reference=dict(load=ref, scores_path=outs))  # DP=2
    assert res == ["interrupted", "interrupted"]
    assert len(list(Path(f"{outs[0]}.parts").glob("samples*.pt"))) == 4  # 2 steps x 2 DP ranks
    assert run_distributed(run_scoring, 2, blend, ref, 1, None, reference=dict(load=ref, scores_path=outs)) == [
        "done",
        "done",
    ]
    for p, o in zip(blend[1::2], outs):
        assert Path(f"{o}.bin").read_bytes() == clean[p]
        assert json.loads(Path(f"{o}.json").read_text())["num_scored"] > 0
    assert not Path(f"{outs[0]}.parts").exists()


def test_bad_sidecars_are_refused_before_training(scored, tmp_path):
    from megatron_slm.training.resolve import resolve_run

    d, blend, ref = scored
    work = tmp_path / "w"
    work.mkdir()
    copies = []
    for name, p in zip("ab", blend[1::2]):
        for suffix in (".bin", ".idx", ".json", "_refscores.bin", "_refscores.idx", "_refscores.json"):
            shutil.copy(f"{p}{suffix}", work / f"{name}{suffix}")
        copies.append(str(work / name))
    cfg = lambda: make_cfg(["0.6", copies[0], "0.4", copies[1]], slm=dict(reference_mode="offline"))  # noqa: E731
    resolve_run(cfg())  # the intact copy is accepted

    scores_bin = Path(f"{copies[0]}_refscores.bin")
    good = scores_bin.read_bytes()
    scores_bin.write_bytes(good[:-8])
    with pytest.raises(DataError, match="truncated or corrupt"):
        resolve_run(cfg())
    scores_bin.write_bytes(good)

    make_dataset(copies[1], seed=77, num_docs=30)  # the token files change under the sidecar
    with pytest.raises(DataError, match="computed for other token files"):
        resolve_run(cfg())
    Path(f"{copies[1]}_refscores.json").unlink()
    with pytest.raises(DataError, match="no reference scores for dataset"):
        resolve_run(cfg())
    with pytest.raises(DataError, match="one per data_path prefix"):
        resolve_run(
            make_cfg(
                ["0.6", copies[0], "0.4", copies[1]],
                slm=dict(reference_mode="offline"),
                reference=dict(scores_path=[f"{copies[0]}_refscores"]),
            )
        )


def _train_too_long(data_path, ref):
    try:
        _train_long(data_path, ref)
    except DataError as exc:
        return str(exc)
    return "no error"


def _train_long(data_path, ref):
    from megatron_slm.training.resolve import resolve_run
    from megatron_slm.training.run import build_data
    from megatron_slm.training.trainer import Trainer

    cfg = make_cfg(data_path, reference=dict(load=ref), slm=dict(reference_mode="offline"), train=dict(train_iters=40))
    run = resolve_run(cfg)
    trainer = Trainer(run)
    batches, _ = build_data(run.config, run.data, trainer.dp_rank, trainer.dp_size, run.offline_scores)
    for step in range(cfg.train.train_iters):
        trainer.train_step(batches(step))


def test_tokens_the_scoring_run_never_saw_are_refused(scored):
    d, blend, ref = scored
    msg = run_distributed(_train_too_long, 1, blend, ref)[0]
    assert "have no reference score" in msg and "rerun slm score-reference" in msg
