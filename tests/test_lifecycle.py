"""A training rank around its launcher: a stop signal during start-up is honoured (not fatal), and ranks exit
when torchrun is killed (torchrun starts each worker in its own session, so they would otherwise train on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.data import tiny_text_dataset
from helpers.tiny_training import tiny_clm_flags

from megatron_slm.parallel.distributed import free_port


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_text_dataset(tmp_path_factory.mktemp("data"))


def _cmd(data, save, launcher=()):
    return [
        sys.executable,
        *launcher,
        "-m",
        "megatron_slm.cli",
        "train",
        *tiny_clm_flags(data),
        "--train-iters",
        "100000",
        "--save",
        str(save),
        "--data-cache-path",
        str(save.parent / "cache"),
    ]


def test_sigusr1_during_start_up_checkpoints_after_the_first_step(data, tmp_path):
    proc = subprocess.Popen(
        _cmd(data, tmp_path / "run"),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # torch and megatron-core are still importing
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "stopping at iteration 1 on SIGUSR1" in out
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def _children(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(proc.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_exit_when_torchrun_is_killed(data, tmp_path):
    log = tmp_path / "log.txt"
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _cmd(data, tmp_path / "run", launcher),
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    workers = []
    try:
        end = time.monotonic() + 150
        while "step     2/" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        proc.kill()  # SIGKILL: torchrun cannot pass anything on
        proc.wait(10)
        end = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < end:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "ranks still training after their launcher was killed"
        assert "the launcher (pid" in log.read_text()
    finally:
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass
