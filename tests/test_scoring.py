"""``slm score-reference`` resumes exactly, stops cleanly and refuses what it cannot resume (issue 19, cases 1, 2, 7
and related; issue 20: stops).

Every case compares with the bytes (``.bin``, ``.idx``, ``.json``) of an uninterrupted 1-rank scoring:

- parts are keyed by global sample, so a run interrupted at one data-parallel size and resumed at another
  writes the same sidecars;
- a resume with other data flags (or another reference) is refused, naming each flag with both values;
- a second run on the same output is refused while the first holds it, and the first completes;
- a kill in the middle of the merge is repaired by a rerun (without --force);
- a run that would score a token twice (more than one epoch) is refused before any forward pass;
- a planted part is loaded with weights_only and refused without running its code;
- a stop signal reaching one rank, or --exit-duration-in-mins, ends every rank after the same step, without a
  merge, and records the stop for the launchers (scoring.run_state); a rerun resumes exactly;
- a stop signal during the merge waits for the merge to finish.
"""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import run_distributed
from helpers.offline import make_cfg, make_dataset, reference_ckpt, run_scoring

SUFFIXES = (".bin", ".idx", ".json")


def _outs(d, name):
    return [str(d / f"{name}_a"), str(d / f"{name}_b")]


def _bytes(outs):
    return {(i, s): Path(f"{o}{s}").read_bytes() for i, o in enumerate(outs) for s in SUFFIXES}


def _over(ref, outs, **over):
    return dict(reference=dict(load=ref, scores_path=outs), **over)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A 0.6/0.4 blend, a reference, and its uninterrupted 1-rank scoring (3 steps of 8 samples): the truth."""
    d = tmp_path_factory.mktemp("scoring")
    blend = ["0.6", make_dataset(d / "a", 1), "0.4", make_dataset(d / "b", 2, num_docs=30)]
    ref = str(d / "ref")
    run_distributed(reference_ckpt, 1, blend, ref)
    outs = _outs(d, "clean")
    assert run_distributed(run_scoring, 1, blend, ref, 1, None, **_over(ref, outs)) == ["done"]
    return d, blend, ref, _bytes(outs)


def _score_killed_unevenly(data_path, ref, steps, **over):
    """Score; each rank is killed (as by SIGKILL) right after saving its ``steps[rank]``-th part. The ranks die
    at different steps, so none reaches a stop agreement after its last part (a dead rank would never join it)."""
    import torch.distributed as dist

    from megatron_slm.parallel import distributed

    saved = []

    def killed():
        saved.append(1)
        if len(saved) == steps[dist.get_rank()]:
            raise KeyboardInterrupt("killed")
        return None

    distributed.agreed_stop = killed
    return run_scoring(data_path, ref, 1, None, **over)


def test_a_resume_at_another_data_parallel_size_is_exact(clean, tmp_path):
    d, blend, ref, want = clean
    # DP=2 killed unevenly: rank 0 after 2 steps, rank 1 after 1 (step 1 is half scored); resumed at DP=1
    outs = _outs(tmp_path, "dp2to1")
    assert run_distributed(_score_killed_unevenly, 2, blend, ref, [2, 1], **_over(ref, outs)) == ["interrupted"] * 2
    assert len(list(Path(f"{outs[0]}.parts").glob("*.pt"))) == 3
    assert run_distributed(run_scoring, 1, blend, ref, 1, None, **_over(ref, outs)) == ["done"]
    assert _bytes(outs) == want
    assert not Path(f"{outs[0]}.parts").exists()
    # the same, resumed at DP=2: the ranks have different steps left (rank 0: one, rank 1: two), and the one with
    # fewer joins every round's stop agreement until the other is done
    outs = _outs(tmp_path, "dp2to2")
    assert run_distributed(_score_killed_unevenly, 2, blend, ref, [2, 1], **_over(ref, outs)) == ["interrupted"] * 2
    assert run_distributed(_score_stopped, 2, blend, ref, **_over(ref, outs)) == [("done", 1, None), ("done", 2, None)]
    assert _bytes(outs) == want
    # DP=1 preempted after 1 step, resumed at DP=2
    outs = _outs(tmp_path, "dp1to2")
    assert run_distributed(run_scoring, 1, blend, ref, 1, 1, **_over(ref, outs)) == ["interrupted"]
    assert run_distributed(run_scoring, 2, blend, ref, 1, None, **_over(ref, outs)) == ["done", "done"]
    assert _bytes(outs) == want


def test_a_resume_with_other_data_flags_is_refused_naming_each(clean, tmp_path):
    d, blend, ref, want = clean
    outs = _outs(tmp_path, "flags")
    assert run_distributed(run_scoring, 2, blend, ref, 1, 1, **_over(ref, outs)) == ["interrupted"] * 2
    parts = Path(f"{outs[0]}.parts")
    before = sorted(p.name for p in parts.iterdir())
    res = run_distributed(run_scoring, 2, blend, ref, 1, None, **_over(ref, outs, train=dict(seed=6, train_iters=4)))
    assert res[0] == res[1], res  # the same one error on every rank
    msg = res[0]
    assert msg.startswith(
        f"error: {parts} holds the parts of an interrupted score-reference run (data-parallel "
        "size 2) with other flags than this run's"
    ), msg
    for part in (
        "--seed: the parts have 5, this run has 6",
        "--train-iters: the parts have 3, this run has 4",
        f"rerun with the parts' flags to resume, or delete {parts} to score from scratch",
    ):
        assert part in msg, (part, msg)
    assert "--global-batch-size" not in msg and "--split" not in msg, msg
    other = ["0.5", blend[1], "0.5", blend[3]]
    msg = run_distributed(run_scoring, 1, other, ref, 1, None, **_over(ref, outs, data=dict(split="80,20,0")))[0]
    for part in (
        f"--data-path: the parts have 0.6 {blend[1]} 0.4 {blend[3]}, this run has 0.5 {blend[1]} 0.5 {blend[3]}",
        "--split: the parts have 90,10,0, this run has 80,20,0",
    ):
        assert part in msg, (part, msg)
    other_ref = shutil.copytree(ref, tmp_path / "other_ref")  # another reference's scores would mix in
    msg = run_distributed(run_scoring, 1, blend, str(other_ref), 1, None, **_over(str(other_ref), outs))[0]
    assert f"--ref-load: the parts have {ref}, this run has {other_ref}" in msg, msg
    assert sorted(p.name for p in parts.iterdir()) == before  # refused runs touch nothing
    assert run_distributed(run_scoring, 1, blend, ref, 1, None, **_over(ref, outs)) == ["done"]  # the parts' flags
    assert _bytes(outs) == want


def _score_paused(data_path, ref, ready, go, **over):
    """Score, pausing after the first step until ``go`` exists (``ready`` tells the test it is there)."""
    from megatron_slm.training import passes

    real = passes.score_pass

    def paused(*a, **k):
        out = real(*a, **k)
        if not Path(ready).exists():
            Path(ready).touch()
            deadline = time.time() + 120
            while not Path(go).exists() and time.time() < deadline:
                time.sleep(0.05)
        return out

    passes.score_pass = paused
    return run_scoring(data_path, ref, 1, None, **over)


def test_a_second_run_on_the_same_output_is_refused_and_the_first_completes(clean, tmp_path):
    d, blend, ref, want = clean
    outs = _outs(tmp_path, "twice")
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = []
    thread = threading.Thread(
        target=lambda: first.append(
            run_distributed(_score_paused, 1, blend, ref, str(ready), str(go), **_over(ref, outs))
        )
    )
    thread.start()
    try:
        deadline = time.time() + 150
        while not ready.exists() and thread.is_alive() and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the first run never reached its first step"
        res = run_distributed(run_scoring, 2, blend, ref, 1, None, **_over(ref, outs))
        assert res[0] == res[1], res
        assert (
            res[0].startswith(f"error: {outs[0]} is in use by pid ")
            and "(another run writes there); use "
            f"another --ref-scores-path, or delete {outs[0]}.lock if that run is gone"
            in res[0]
        ), res[0]
        # another output of the blend alone is locked too
        res = run_distributed(run_scoring, 1, [blend[3]], ref, 1, None, **_over(ref, [outs[1]]))
        assert res[0].startswith(f"error: {outs[1]} is in use by pid "), res[0]
    finally:
        go.touch()
        thread.join(timeout=170)
    assert first == [["done"]]
    assert _bytes(outs) == want
    assert not Path(f"{outs[0]}.lock").exists() and not Path(f"{outs[1]}.lock").exists()


def _score_killed_in_merge(data_path, ref, **over):
    """Score; the merge dies after writing the first sidecar (as a kill would)."""
    from megatron_slm.data import scores

    real, calls = scores.write_sidecar, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed in the merge")
        return real(*a, **k)

    scores.write_sidecar = dies
    return run_scoring(data_path, ref, 1, None, **over)


def test_a_kill_in_the_merge_is_repaired_by_a_rerun(clean, tmp_path):
    d, blend, ref, want = clean
    outs = _outs(tmp_path, "merge")
    assert run_distributed(_score_killed_in_merge, 1, blend, ref, **_over(ref, outs)) == ["interrupted"]
    assert Path(f"{outs[0]}.json").exists() and not Path(f"{outs[1]}.json").exists()
    assert Path(f"{outs[0]}.parts").is_dir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a kill -9 leaves its lock behind: a dead pid on this host
    Path(f"{outs[0]}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    # no --force: the existing first sidecar is this run's own, not another run's
    assert run_distributed(run_scoring, 1, blend, ref, 1, None, force=False, **_over(ref, outs)) == ["done"]
    assert _bytes(outs) == want
    assert not Path(f"{outs[0]}.parts").exists() and not Path(f"{outs[0]}.lock").exists()
    # a finished output without --force is still refused
    res = run_distributed(run_scoring, 1, blend, ref, 1, None, force=False, **_over(ref, outs))[0]
    assert res == f"error: score sidecar {outs[0]} already exists; pass --force to overwrite it", res


def _score_counting_forwards(data_path, ref, **over):
    from megatron_slm.training import passes

    real, calls = passes.score_pass, []
    passes.score_pass = lambda *a, **k: calls.append(1) or real(*a, **k)
    return run_scoring(data_path, ref, 1, None, **over), len(calls)


def test_more_than_one_epoch_is_refused_before_any_forward_pass(clean, tmp_path):
    d, blend, ref, want = clean
    outs = _outs(tmp_path, "epochs")
    res = run_distributed(_score_counting_forwards, 2, blend, ref, **_over(ref, outs, train=dict(train_iters=30)))
    assert res[0] == res[1], res
    msg, forwards = res[0]
    assert forwards == 0, msg
    assert msg.startswith(
        f"error: scoring 30 x 8 = 240 samples goes over more than one epoch of dataset '{blend[1]}'"
    ), msg
    assert (
        "a score sidecar keeps one score per token" in msg
        and "lower --train-iters or --global-batch-size" in msg
        and "or add data" in msg
    ), msg
    assert not list(tmp_path.iterdir()), "a refused run writes nothing"


def _score_planted(data_path, ref, **over):
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # torch.load's default no longer protects the loader
    return run_scoring(data_path, ref, 1, None, **over)


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it runs code: it creates the marker file
        return (open, (self.marker, "w"))


def test_a_planted_part_is_refused_without_running_its_code(clean, tmp_path):
    d, blend, ref, want = clean
    outs = _outs(tmp_path, "planted")
    assert run_distributed(run_scoring, 1, blend, ref, 1, 1, **_over(ref, outs)) == ["interrupted"]
    part = sorted(Path(f"{outs[0]}.parts").glob("*.pt"))[0]
    marker = tmp_path / "code_ran"
    torch.save({"scores": _Planted(str(marker))}, part)
    msg = run_distributed(_score_planted, 1, blend, ref, **_over(ref, outs))[0]
    assert not marker.exists(), "loading a part ran its code"
    assert msg.startswith(f"error: score part {part} cannot be read as tensors"), msg
    assert f"delete {part} and rerun: its samples are scored again" in msg, msg
    part.unlink()
    assert run_distributed(run_scoring, 1, blend, ref, 1, None, **_over(ref, outs)) == ["done"]
    assert _bytes(outs) == want


# ----------------------------------------------------------------------------------------------
# Stops (issue 20): a stop signal or --exit-duration-in-mins ends the run after a step, agreed on every rank


def _score_stopped(data_path, ref, signal_at=None, late_clock_after=None, **over):
    """Score; with ``signal_at`` = (rank, n) that rank sends itself SIGUSR1 during its n-th forward pass, with
    ``late_clock_after`` = n rank 0's clock jumps an hour after its n-th. Returns (result, forward passes,
    the stop signal left unhandled)."""
    import signal

    import torch.distributed as dist

    from megatron_slm import lifecycle
    from megatron_slm.training import passes

    real, calls, real_clock = passes.score_pass, [], time.monotonic

    def counted(*a, **k):
        calls.append(1)
        if signal_at == (dist.get_rank(), len(calls)):
            os.kill(os.getpid(), signal.SIGUSR1)  # recorded by the handler score_reference installed
        if late_clock_after == len(calls) and dist.get_rank() == 0:
            time.monotonic = lambda: real_clock() + 3600.0
        return real(*a, **k)

    passes.score_pass = counted
    return run_scoring(data_path, ref, 1, None, **over), len(calls), lifecycle.received()


def _stop_record(outs):
    return json.loads((Path(f"{outs[0]}.parts") / "stopped.json").read_text())


def test_a_stop_ends_every_rank_after_the_same_step_and_a_rerun_resumes_exactly(clean, tmp_path):
    from megatron_slm import scoring

    d, blend, ref, want = clean
    outs = _outs(tmp_path, "stopped")
    cfg = make_cfg(blend, **_over(ref, outs))
    since = time.time()
    # DP=2: only rank 1 gets the signal, in its second step; both ranks stop after that step, without merging
    res = run_distributed(_score_stopped, 2, blend, ref, signal_at=(1, 2), **_over(ref, outs))
    assert res == [("done", 2, None)] * 2, res
    assert not any(Path(f"{o}{s}").exists() for o in outs for s in SUFFIXES)
    assert _stop_record(outs) == {"stopped_by": "SIGUSR1", "samples_scored": 16, "samples": 24}
    assert scoring.run_state(cfg, since) == "stopped"
    assert scoring.run_state(cfg, time.time() + 60) == "unknown"  # a stop before this start does not count
    # resumed at DP=1 under --exit-duration-in-mins: rank 0's clock runs out after the first step left
    res = run_distributed(
        _score_stopped, 1, blend, ref, late_clock_after=1, **_over(ref, outs, train=dict(exit_duration_in_mins=30.0))
    )
    assert res == [("done", 1, None)], res
    assert _stop_record(outs) == {"stopped_by": "exit-duration", "samples_scored": 24, "samples": 24}
    assert not Path(f"{outs[0]}.json").exists()
    # everything is scored: the next run only merges
    assert run_distributed(_score_stopped, 2, blend, ref, **_over(ref, outs)) == [("done", 0, None)] * 2
    assert _bytes(outs) == want
    assert scoring.run_state(cfg, since) == "finished" and not Path(f"{outs[0]}.parts").exists()


def _score_signalled_in_merge(data_path, ref, **over):
    """Score; SIGUSR1 and SIGTERM arrive while the merge writes the first sidecar."""
    import signal

    from megatron_slm import lifecycle
    from megatron_slm.data import scores

    real = scores.write_sidecar

    def signalled(*a, **k):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    scores.write_sidecar = signalled
    return run_scoring(data_path, ref, 1, None, **over), lifecycle.received()


def test_a_stop_signal_during_the_merge_waits_for_it_to_finish(clean, tmp_path):
    from megatron_slm import scoring

    d, blend, ref, want = clean
    outs = _outs(tmp_path, "merge_signal")
    since = time.time()
    assert run_distributed(_score_signalled_in_merge, 1, blend, ref, **_over(ref, outs)) == [("done", None)]
    assert _bytes(outs) == want and not Path(f"{outs[0]}.parts").exists()
    assert scoring.run_state(make_cfg(blend, **_over(ref, outs)), since) == "finished"
