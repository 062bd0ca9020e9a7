"""Checkpoints are never silently wrong, and every failure is one clear error.

1. Re-saving an existing iteration: a crash at any step of the rename window leaves a loadable latest.
2. Rerunning a finished run keeps its summary.json (never ``null``), written atomically.
3. One run per --save: ``<save>/.lock``; a second writer gets one error line on every rank; stale locks.
4. DeepSpeed checkpoints are atomic (``iter_N.tmp`` renamed) and also weights checkpoints (--ref-load, export).
5. Power loss: the checkpoint's files and directories are fsynced before ``latest`` is replaced.
6. One CheckpointError naming the file and the fix for: a corrupt slm_model.json, a truncated rank state, a
   damaged or missing shard / .metadata, latest naming a missing iteration, an unwritable --save, disk full.
"""

import errno
import functools
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from dist_helpers import run_distributed
from helpers.offline import make_dataset
from helpers.tiny_training import make_config, my_micro_batches

import megatron_slm.training.trainer  # noqa: F401 - import megatron-core once, before forking ranks
from megatron_slm import checkpoint
from megatron_slm.checkpoint import LATEST, iteration_dir, read_model_meta, resolve
from megatron_slm.checkpoint import files as checkpoint_files
from megatron_slm.errors import CheckpointError

DS_CONFIG = "ds_configs/test_zero1_fp32.json"


class Crash(BaseException):
    """A simulated process death: no ``except Exception`` handler (rollback, agreement) sees it."""


def _cfg(save=None, steps=2, load=None, **ck):
    cfg = make_config(1, 1)
    cfg.train.train_iters = steps
    cfg.checkpoint.save = str(save) if save else None
    cfg.checkpoint.load = str(load) if load else None
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


def _batches(trainer):
    return lambda s: my_micro_batches(s, 8, trainer.dp_rank, trainer.dp_size)


def _params(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.policy_module.named_parameters()}


def _complete(path: Path) -> bool:
    return all(
        (path / f).is_file()
        for f in (
            "metadata.json",
            ".metadata",
            "common.pt",
            checkpoint.MODEL_META,
            checkpoint.TRAINER_STATE,
            "rank_state/rank00000.pt",
        )
    )


def _train_and_save(root, steps=2, **ck):
    """Train ``steps`` steps and save (at the end); returns the policy's parameters."""
    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(_cfg(root, steps, **ck))
    trainer.train(_batches(trainer))
    return _params(trainer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run at DP=2 (two rank_state files, two shards); tests damage copies of it."""
    root = tmp_path_factory.mktemp("trained") / "run"
    params = run_distributed(_train_and_save, 2, root)[0]
    return root, params


def _copy(trained, dst: Path) -> Path:
    shutil.copytree(trained[0], dst)
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "docs", 3, num_docs=60)


def _argv(data, save, *extra):
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
        "--num-attention-heads",
        "4",
        "--num-query-groups",
        "2",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--seq-length",
        "16",
        "--log-interval",
        "100",
        "--eval-iters",
        "1",
        "--data-path",
        data,
        "--split",
        "90,10,0",
        "--train-iters",
        "2",
        "--save",
        str(save),
        *extra,
    ]


def _cli(argv, summary_none=False):
    """``slm train`` in this rank; (exit status, stderr)."""
    import contextlib
    import io

    from megatron_slm import cli

    if summary_none:  # a run with nothing to summarise
        import megatron_slm.training.run as run

        run.summarize = lambda *a, **k: None
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------------------------
# 1. The rename window of a re-saved iteration


def _crash_window(root):
    from megatron_slm.training.trainer import Trainer

    real_rename, real_rmtree, real_replace = os.rename, shutil.rmtree, os.replace
    real_exchange = checkpoint_files._exchange
    trainer = Trainer(_cfg(root, 2, save_interval=0))
    trainer.train(_batches(trainer))  # iter_0000002, latest = 2
    final = iteration_dir(root, 2)
    out = {}

    def patch(rename=None, rmtree=None, replace=None, exchange=True):
        os.rename = rename or real_rename
        shutil.rmtree = rmtree or real_rmtree
        os.replace = replace or real_replace
        checkpoint_files._exchange = real_exchange if exchange else (lambda a, b: False)

    def crash_if(cond, real):
        def fn(*args, **kwargs):
            if cond(*[str(a) for a in args[:2]]):
                raise Crash()
            return real(*args, **kwargs)

        return fn

    scenarios = {
        # atomic swap: crash after the swap, before the previous copy (now in iter_N.tmp) is deleted
        "after_exchange": dict(
            rmtree=crash_if(
                lambda p, *_: p.endswith(".tmp") and final.exists() and (final / "new").exists(), real_rmtree
            )
        ),
        # two renames: crash after iter_N -> iter_N.old, before iter_N.tmp -> iter_N
        "after_old_aside": dict(exchange=False, rename=crash_if(lambda a, b: a == f"{final}.tmp", real_rename)),
        # two renames: crash after iter_N.tmp -> iter_N, before iter_N.old is deleted
        "before_old_deleted": dict(
            exchange=False, rmtree=crash_if(lambda p, *_: p.endswith(".old") and (final / "new").exists(), real_rmtree)
        ),
        # crash while replacing latest (a new iteration 3 is complete but not yet named)
        "before_latest": dict(replace=crash_if(lambda a, b: b.endswith(LATEST), real_replace)),
    }
    for name, how in scenarios.items():
        with torch.no_grad():  # the re-saved copy differs from the one on disk
            for p in trainer.policy_module.parameters():
                p.add_(0.25)
        expect_new = _params(trainer)
        trainer.iteration = 3 if name == "before_latest" else 2
        real_torch_save = torch.save
        if name != "before_latest":

            def mark(
                obj, f, *a, real_torch_save=real_torch_save, **k
            ):  # tag the new copy so the scenario can tell the two apart
                real_torch_save(obj, f, *a, **k)
                if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == "rank_state":
                    Path(f).parent.parent.joinpath("new").write_text("1")

            torch.save = mark
        patch(**how)
        crashed = False
        try:
            trainer.save_checkpoint()
        except Crash:
            crashed = True
        finally:
            patch()
            torch.save = real_torch_save
        trainer.iteration = 2
        seen = resolve(root)  # what any reader takes now, before a new run cleans up
        info = dict(crashed=crashed, resolved=seen.name, complete=_complete(seen), latest=(root / LATEST).read_text())
        resumed = Trainer(_cfg(root, 2))  # a rerun: takes the lock (same process), restores, resumes
        info["resumed_at"] = resumed.load_checkpoint(str(root))
        got = _params(resumed)
        info["new"] = all(torch.equal(got[k], expect_new[k]) for k in got)
        info["dirs"] = sorted(p.name for p in Path(root).iterdir() if p.name.startswith("iter_"))
        (iteration_dir(root, 2) / "new").unlink(missing_ok=True)
        shutil.rmtree(iteration_dir(root, 3), ignore_errors=True)
        out[name] = info
        trainer = resumed
    return out


def test_resave_crash_at_every_step_of_the_window_leaves_a_loadable_latest(tmp_path):
    res = run_distributed(_crash_window, 1, tmp_path / "run")[0]
    for name, info in res.items():
        assert info["crashed"], name
        assert info["complete"] and info["latest"] == "2" and info["resumed_at"] == 2, (name, info)
        leftover = ["iter_0000003"] if name == "before_latest" else []  # complete, never named: harmless
        assert info["dirs"] == ["iter_0000002"] + leftover, (name, info)  # leftovers cleaned up or restored
    assert res["after_exchange"]["resolved"] == "iter_0000002" and res["after_exchange"]["new"]
    assert res["after_old_aside"]["resolved"] == "iter_0000002.old" and not res["after_old_aside"]["new"]
    assert res["before_old_deleted"]["resolved"] == "iter_0000002" and res["before_old_deleted"]["new"]
    assert res["before_latest"]["resolved"] == "iter_0000002" and not res["before_latest"]["new"]


def test_two_rename_fallback_rolls_back_when_the_second_rename_fails(tmp_path):
    final, tmp = tmp_path / "iter_0000001", tmp_path / "iter_0000001.tmp"
    final.mkdir()
    (final / "x").write_text("old")
    tmp.mkdir()
    (tmp / "x").write_text("new")
    real_rename, real_exchange = os.rename, checkpoint_files._exchange

    def rename(a, b):
        if str(a).endswith(".tmp"):
            raise OSError(errno.EIO, "I/O error")
        return real_rename(a, b)

    os.rename = rename
    checkpoint_files._exchange = lambda a, b: False
    try:
        with pytest.raises(OSError):
            checkpoint_files.commit(tmp, final)
    finally:
        os.rename, checkpoint_files._exchange = real_rename, real_exchange
    assert (final / "x").read_text() == "old" and not (tmp_path / "iter_0000001.old").exists()
    checkpoint_files.commit(tmp, final)  # and for real: swapped in, nothing left over
    assert (final / "x").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001"]


# ----------------------------------------------------------------------------------------------
# 5. fsync before latest


def _record_fsync(root):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, *args, **kwargs):
        events.append(("replace", os.path.realpath(a), os.path.realpath(b)))
        return real_replace(a, b, *args, **kwargs)

    os.fsync, os.replace = fsync, replace
    try:
        _train_and_save(root, 1)
    finally:
        os.fsync, os.replace = real_fsync, real_replace
    return events


def test_files_and_directories_are_fsynced_before_latest_is_replaced(tmp_path):
    root = (tmp_path / "run").resolve()
    events = run_distributed(_record_fsync, 1, root)[0]
    final, tmp = iteration_dir(root, 1), root / "iter_0000001.tmp"
    latest_at = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / LATEST))
    before = [e[1] for e in events[:latest_at] if e[0] == "fsync"]
    files = [p.relative_to(final) for p in final.rglob("*")]
    assert files
    for rel in files:  # every file and subdirectory, under the name it had when it was written
        assert str(tmp / rel) in before or str(final / rel) in before, rel
    assert str(tmp) in before  # the iteration directory itself
    rename_done = max(i for i, p in enumerate(before) if p == str(root))  # the parent, after the rename
    assert rename_done > before.index(str(tmp))
    assert str(root / (LATEST + ".tmp")) in before  # latest's new content before it replaces the old
    assert any(e == ("fsync", str(root)) for e in events[latest_at + 1 :])  # and the rename of latest itself


# ----------------------------------------------------------------------------------------------
# 2 and 3. summary.json of a rerun; the save lock through the CLI


def test_rerun_of_a_finished_run_keeps_its_summary_and_releases_the_lock(data, tmp_path):
    save = tmp_path / "run"
    rc, err = run_distributed(_cli, 1, _argv(data, save))[0]
    assert rc == 0, err
    first = json.loads((save / "summary.json").read_text())
    assert first["iterations"] == 2 and not (save / ".lock").exists()  # released at the clean exit
    rc, err = run_distributed(_cli, 1, _argv(data, save))[0]  # rerun: nothing left to train
    assert rc == 0, err
    again = (save / "summary.json").read_text()
    assert json.loads(again) is not None and json.loads(again)["iterations"] == 2
    rc, err = run_distributed(_cli, 1, _argv(data, save), summary_none=True)[0]
    assert rc == 0, err
    assert (save / "summary.json").read_text() == again  # nothing to summarise: the summary is kept
    assert not (save / "summary.json.tmp").exists() and not (save / ".lock").exists()


def test_second_writer_gets_one_error_on_every_rank(data, tmp_path):
    save = tmp_path / "busy"
    save.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2025-01-01 00:00:00 UTC", "token": "x"}
    (save / ".lock").write_text(json.dumps(holder))  # held by this (live) pytest process
    res = run_distributed(_cli, 2, _argv(data, save))
    want = (
        f"error: {save} is in use by pid {os.getpid()} on host {holder['host']} since {holder['since']} (another "
        f"run writes there); use another --save, or delete {save}/.lock if that run is gone"
    )
    assert [rc for rc, _ in res] == [2, 2]
    assert _error_lines(res[0][1]) == [want] and _error_lines(res[1][1]) == []  # one line, from rank 0
    assert sorted(p.name for p in save.iterdir()) == [".lock"]  # nothing written; the lock is untouched
    assert json.loads((save / ".lock").read_text()) == holder


def test_save_lock_stale_takeover_other_host_and_release(tmp_path, caplog):
    from megatron_slm.checkpoint.lock import SaveLock

    save = tmp_path / "s"
    lock = SaveLock.acquire(str(save))
    held = json.loads((save / ".lock").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["since"]
    lock.release()
    assert not (save / ".lock").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (save / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    with caplog.at_level("WARNING", logger="megatron_slm"):
        lock = SaveLock.acquire(str(save))  # same host, pid gone: taken over with a log line
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert json.loads((save / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    (save / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(CheckpointError, match=f"is in use by pid 1 on host elsewhere since then .*delete {save}/.lock"):
        SaveLock.acquire(str(save))
    live = subprocess.Popen(["sleep", "30"])
    try:
        (save / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "since": "now"}))
        with pytest.raises(CheckpointError, match=f"in use by pid {live.pid}"):
            SaveLock.acquire(str(save))
    finally:
        live.kill()
        live.wait()
    assert SaveLock.acquire(None).release() is None  # no --save: nothing to lock


def test_a_requeued_slurm_job_takes_over_its_lock_from_another_host(tmp_path, caplog, monkeypatch):
    """Issue 19 case 12: Slurm requeues a job (same SLURM_JOB_ID) onto any node; its stale lock from the old node
    is taken over. A lock of another job, or without a job id, from another host is still refused."""
    from megatron_slm.checkpoint.lock import SaveLock

    save = tmp_path / "s"
    save.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (save / ".lock").write_text(json.dumps({"host": "node017", "pid": 1, "since": "then", "slurm_job_id": "4242"}))
    with caplog.at_level("WARNING", logger="megatron_slm"):
        lock = SaveLock.acquire(str(save))
    assert "taking over the lock of Slurm job 4242 from host node017" in caplog.text
    held = json.loads((save / ".lock").read_text())
    assert held["slurm_job_id"] == "4242" and held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    lock.release()
    for other in ({"slurm_job_id": "999"}, {}):
        (save / ".lock").write_text(json.dumps({"host": "node017", "pid": 1, "since": "then", **other}))
        with pytest.raises(CheckpointError, match="is in use by pid 1 on host node017"):
            SaveLock.acquire(str(save))
    monkeypatch.delenv("SLURM_JOB_ID")
    (save / ".lock").write_text(json.dumps({"host": "node017", "pid": 1, "since": "then", "slurm_job_id": "4242"}))
    with pytest.raises(CheckpointError, match=r"in use by pid 1 on host node017 \(Slurm job 4242\)"):
        SaveLock.acquire(str(save))  # not a Slurm job here: not the same job


def test_latest_with_a_non_ascii_digit_is_one_error(tmp_path):
    """Issue 19 case 8: str.isdigit() accepts "²", int() does not."""
    from megatron_slm.checkpoint import latest_iteration

    (tmp_path / LATEST).write_text("²")
    with pytest.raises(CheckpointError, match="holds '²', not an iteration number"):
        latest_iteration(tmp_path)


# ----------------------------------------------------------------------------------------------
# 6e. --save that cannot be written


def test_unwritable_save_is_one_error(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a directory")  # root ignores chmod; a file as parent stops it too
    save = blocker / "run"
    rc, err = run_distributed(_cli, 1, _argv(data, save))[0]
    assert rc == 2
    assert _error_lines(err) == [
        f"error: cannot write to --save {save} (Not a directory: {save}); choose a writable directory"
    ], err
    if os.geteuid() != 0:  # a read-only directory, where permissions apply
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        rc, err = run_distributed(_cli, 1, _argv(data, ro / "run"))[0]
        assert rc == 2 and "cannot write to --save" in err and "choose a writable directory" in err


# ----------------------------------------------------------------------------------------------
# 6a-d. Damaged checkpoints: one error on every rank


def _resume_error(root):
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer

    try:
        Trainer(_cfg(load=root)).resume()
    except CheckpointError as exc:
        return str(exc)
    finally:
        if dist.is_initialized():  # a damaged slm_model.json is refused by resolution, before any process group
            dist.barrier()
    return "no error"


def _load_error(path, **model):
    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    cfg = _cfg()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    distributed.initialize(1, 1)
    try:
        checkpoint.load_model_weights(build_model(cfg.model, cfg.parallel, seed=1), str(path))
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_corrupt_slm_model_json(trained, tmp_path):
    root = _copy(trained, tmp_path / "r")
    meta = iteration_dir(root, 2) / "slm_model.json"
    meta.write_text('{"model": {"num_layers": 4,')  # cut short
    with pytest.raises(CheckpointError, match=f"{meta} is not valid JSON .*; restore it or the checkpoint is damaged"):
        read_model_meta(str(root))
    with pytest.raises(CheckpointError, match="slm_model.json is not valid JSON"):
        checkpoint.read_model_config(str(root))  # what --ref-load reads first
    msgs = run_distributed(_resume_error, 2, root)
    assert msgs[0] == msgs[1] and f"{meta} is not valid JSON" in msgs[0]


def test_truncated_rank_state_stops_every_rank(trained, tmp_path):
    root = _copy(trained, tmp_path / "r")
    bad = iteration_dir(root, 2) / "rank_state" / "rank00001.pt"  # only rank 1 reads it
    bad.write_bytes(bad.read_bytes()[:200])
    msgs = run_distributed(_resume_error, 2, root)
    assert msgs[0] == msgs[1], msgs  # rank 0 (which prints) stops with rank 1's error
    assert f"{bad} is damaged" in msgs[0] and "restore the file from a copy" in msgs[0], msgs[0]


@pytest.mark.parametrize("damage", ["truncated_shard", "missing_shard", "missing_index", "corrupt_index"])
def test_damaged_or_missing_shards_are_damage_not_a_misfit(trained, tmp_path, damage):
    root = _copy(trained, tmp_path / "r")
    it = iteration_dir(root, 2)
    shard = sorted(it.glob("*.distcp"))[-1]
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "missing_index":
        (it / ".metadata").unlink()
    else:
        (it / ".metadata").write_bytes(b"\x80\x04garbage")
    named = {
        "truncated_shard": f"shard {shard.name} is truncated",
        "missing_shard": f"shard {shard.name} is missing",
        "missing_index": ".metadata missing",
        "corrupt_index": ".metadata cannot be read",
    }[damage]
    msgs = run_distributed(_resume_error, 2, root)
    assert msgs[0] == msgs[1], msgs
    for msg in msgs + [run_distributed(_load_error, 1, root)[0]]:  # resume and a weights load (--ref-load)
        assert f"checkpoint '{it}' is damaged or incomplete: " in msg and named in msg, msg
        assert "does not fit" not in msg


def test_real_shape_mismatch_still_says_does_not_fit(trained):
    msg = run_distributed(_load_error, 1, trained[0], hidden_size=48, ffn_hidden_size=96)[0]
    assert "does not fit this model" in msg and "damaged" not in msg, msg


def test_latest_naming_a_missing_iteration(trained, tmp_path):
    root = _copy(trained, tmp_path / "r")
    (root / LATEST).write_text("7")
    want = (
        f"{root}/{LATEST} names iteration 7 but {root}/iter_0000007 is missing; restore it or point latest at an "
        "existing iteration (found: iter_0000002)"
    )
    with pytest.raises(CheckpointError) as exc:
        read_model_meta(str(root))
    assert str(exc.value) == want
    msgs = run_distributed(_resume_error, 2, root)
    assert msgs == [want, want]


# ----------------------------------------------------------------------------------------------
# 6f. Disk full during a save


def _disk_full(root, where):
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer

    trainer = Trainer(_cfg(root, 4, save_interval=2))
    real_save = torch.save
    if dist.get_rank() == (1 if where == "rank_state" else 0):  # at DP=2, rank 0 writes every (replicated) shard

        def full(obj, f, *args, **kwargs):
            if trainer.iteration == 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *args, **kwargs)

        if where == "rank_state":
            torch.save = full
        else:  # inside dist_checkpointing's shard writer
            from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

            real_write = fa._write_item

            @functools.wraps(real_write)  # the writer inspects its signature
            def write_item(*args, **kwargs):
                if trainer.iteration == 4:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(*args, **kwargs)

            fa._write_item = write_item
    try:
        trainer.train(_batches(trainer))
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def _run_train_until_the_disk_is_full(data, save):
    """``run_train`` (what slm train runs) with a full disk at the checkpoint of iteration 4 on rank 1."""
    import torch.distributed as dist

    from megatron_slm.cli import build_parser
    from megatron_slm.config import load_config
    from megatron_slm.training.run import run_train

    cfg = load_config(
        args=build_parser().parse_args(
            _argv(data, save, "--train-iters", "4", "--save-interval", "2", "--loss-mode", "clm")
        )
    )
    real_save = torch.save

    def full(obj, f, *args, **kwargs):  # rank 1's rank_state file of iteration 4
        if "iter_0000004" in str(f) and dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = full
    try:
        run_train(cfg)
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_a_run_stopped_by_an_error_still_writes_its_summary(data, tmp_path):
    """Issue 19 case 11: summary.json is written on every stop, also one by an error (here a full disk)."""
    save = tmp_path / "run"
    msgs = run_distributed(_run_train_until_the_disk_is_full, 2, data, save, timeout=150)
    assert msgs[0] == msgs[1] and "could not write checkpoint" in msgs[0], msgs
    assert (save / LATEST).read_text() == "2"
    summary = json.loads((save / "summary.json").read_text())
    assert summary["stopped_by"] == "error" and summary["iterations"] == 4
    assert "could not write checkpoint" in summary["error"] and "No space left on device" in summary["error"]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert summary["final"]["loss_all"] == pytest.approx([r for r in rows if r["split"] == "train"][-1]["loss_all"])


@pytest.mark.parametrize("where", ["rank_state", "shards"])
def test_disk_full_during_a_save_stops_every_rank_and_keeps_latest(tmp_path, where):
    root = tmp_path / "run"
    msgs = run_distributed(_disk_full, 2, root, where, timeout=120)
    assert msgs[0] == msgs[1], msgs  # every rank stops with the same error (no hang)
    msg, rank = msgs[0], 1 if where == "rank_state" else 0
    assert msg.startswith(f"could not write checkpoint {root}/iter_0000004 (rank {rank}: No space left on device"), msg
    assert f"free in {root}" in msg and "iter_0000004.tmp was removed" in msg and "still names iteration 2" in msg
    assert "free disk space or choose another --save" in msg
    assert (root / LATEST).read_text() == "2"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000002"] and _complete(root / "iter_0000002")


# ----------------------------------------------------------------------------------------------
# 4. DeepSpeed checkpoints: atomic, and weights checkpoints


def _ds_train(root):
    import torch.distributed as dist
    from helpers.gather import gather_full

    from megatron_slm.training.trainer import Trainer

    renamed = []
    real_rename = os.rename
    os.rename = lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real_rename(a, b))[1]
    try:
        cfg = _cfg(root, 2)
        cfg.train.deepspeed = DS_CONFIG
        trainer = Trainer(cfg)
        trainer.train(_batches(trainer))
    finally:
        os.rename = real_rename
    full = gather_full(trainer.policy_module)
    return (full, renamed) if dist.get_rank() == 0 else None


def _ds_weights(root, out):
    from helpers.gather import gather_full

    from megatron_slm.conversion.converters import megatron_to_hf
    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    cfg = _cfg()
    distributed.initialize(1, 1)
    model = build_model(cfg.model, cfg.parallel, seed=123)
    checkpoint.load_model_weights(model, str(root))
    full = gather_full(model)
    megatron_to_hf(str(root), str(out), log=lambda *a, **k: None)
    return full


def test_deepspeed_checkpoint_is_atomic_and_a_weights_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = tmp_path / "ds"
    trained, renamed = run_distributed(_ds_train, 2, root, timeout=170)[0]
    assert ("iter_0000002.tmp", "iter_0000002") in renamed  # written aside, renamed when complete
    it = iteration_dir(root, 2)
    names = {p.name for p in it.iterdir()}
    assert {"slm_model.json", "trainer_state.json", "metadata.json", ".metadata", "rank_state"} <= names
    assert any(n.endswith("model_states.pt") for n in names) and any(n.endswith("optim_states.pt") for n in names)
    assert not list(root.glob("*.tmp")) and (root / LATEST).read_text() == "2"
    loaded = run_distributed(_ds_weights, 1, root, tmp_path / "hf")[0]  # at DP=1, as --ref-load would
    assert set(loaded) == set(trained) and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert (tmp_path / "hf" / "config.json").is_file() and list((tmp_path / "hf").glob("*.safetensors"))
