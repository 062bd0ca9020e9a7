"""launch/slurm_train.sbatch end to end on this machine, under stand-in Slurm commands.

A stand-in `srun` starts the node command once per "node" (2 nodes on 127.0.0.1, one CPU process each:
world size 2 through torchrun's multi-node static rendezvous, gloo), each in its own session as slurmstepd
would, and forwards the signals it receives to each task's process group. A stand-in `scontrol` prints the
hosts and records `requeue` requests. The batch script itself runs under plain bash, as Slurm would run it.

- An uninterrupted job trains to the end, exits 0 and asks for no requeue.
- SIGUSR1 to the batch shell mid-run (what `--signal=B:USR1@N` does): the training checkpoints and stops,
  the script asks for a requeue and exits 0; the "requeued job" (the same script, run again) resumes and
  ends with exactly the uninterrupted run's final loss.
- The same for `score-reference` (the script's first argument): the scoring stops after a step, keeping its
  parts, the job requeues, and the requeued job resumes and writes exactly the sidecar of an uninterrupted
  scoring.
- shellcheck passes on every script in launch/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_slm.parallel.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "slurm_train.sbatch"
LAUNCH_SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
ITERS = 8
VOCAB = 128
JOB_ID = "4242"

FAKE_SRUN = """\
#!{python}
# Stand-in for srun inside an allocation: the command once per node (SLURM_NODEID/SLURM_PROCID set), each task
# in its own session; signals to srun go to every task's process group; --kill-on-bad-exit honoured.
import os, signal, subprocess, sys, time

args, nodes, kill_on_bad_exit = sys.argv[1:], int(os.environ.get("SLURM_NNODES", "1")), False
while args and args[0].startswith("-"):
    opt = args.pop(0)
    name, _, value = opt.partition("=")
    if name in ("-N", "--nodes", "-n", "--ntasks", "-c", "--cpus-per-task") and not value:
        value = args.pop(0)
    if name in ("-N", "--nodes"):
        nodes = int(value)
    elif name in ("-K", "--kill-on-bad-exit"):
        kill_on_bad_exit = value != "0"
log = open(os.path.join(os.environ["FAKE_SLURM_DIR"], "srun.log"), "a", buffering=1)
log.write(f"launch nodes={{nodes}} kill_on_bad_exit={{kill_on_bad_exit}} {{' '.join(args[:1])}}\\n")
tasks = [
    subprocess.Popen(args, start_new_session=True,
                     env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0",
                              SLURM_STEP_ID="0", SLURMD_NODENAME=f"node{{n}}"))
    for n in range(nodes)
]

def forward(signum, _frame):
    log.write(f"forward {{signal.Signals(signum).name}}\\n")
    for t in tasks:
        if t.poll() is None:
            try:
                os.killpg(t.pid, signum)
            except ProcessLookupError:
                pass

for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
codes = {{}}
while len(codes) < len(tasks):
    for i, t in enumerate(tasks):
        if i not in codes and t.poll() is not None:
            codes[i] = t.returncode if t.returncode >= 0 else 128 - t.returncode
            log.write(f"task {{i}} exited {{codes[i]}}\\n")
            if codes[i] and kill_on_bad_exit:
                for other in tasks:
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
    time.sleep(0.05)
sys.exit(max(codes.values()))
"""

FAKE_SCONTROL = """\
#!/bin/bash
# Stand-in for scontrol: the allocation's hosts (all loopback), and requeue requests recorded.
case "$1 ${2:-}" in
"show hostnames") for _ in $(seq "${SLURM_NNODES:-1}"); do echo 127.0.0.1; done ;;
"requeue "*) echo "requeue $2" >> "$FAKE_SLURM_DIR/requeue.log" ;;
*) echo "stand-in scontrol: unsupported: $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tokenized dataset, a tiny run config and the stand-in Slurm commands."""
    import sentencepiece as spm

    from megatron_slm.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("slurm")
    rng = np.random.default_rng(0)
    words = "the of a number integer matrix prime sum value function returns list given x y n".split()
    lines = [" ".join(rng.choice(words, size=rng.integers(8, 40))) for _ in range(200)]
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(d / "tok"),
        vocab_size=VOCAB,
        model_type="bpe",
        eos_id=2,
        bos_id=1,
        unk_id=0,
        pad_id=-1,
        num_threads=1,
    )
    preprocess([d / "corpus.txt"], d / "corpus", d / "tok.model", workers=1, split_lines=True)
    (d / "run.yaml").write_text(
        textwrap.dedent(f"""\
        model: {{preset: tiny, num_layers: 2, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4,
                 num_query_groups: 2}}
        slm: {{loss_mode: slm, slm_select_ratio: 0.6, selection_scope: micro_batch}}
        train: {{micro_batch_size: 2, global_batch_size: 4, seq_length: 16, train_iters: {ITERS}, lr: 1.0e-3,
                 min_lr: 1.0e-4, lr_warmup_iters: 2, log_interval: 1}}
        data: {{data_path: [{d / "corpus"}], split: "100,0,0"}}
        """)
    )
    bin_dir = d / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return d


class Job:
    """One start of the batch script, as Slurm runs it: bash, cwd = submit dir, output appended to logs/."""

    def __init__(self, cluster: Path, name: str, restart_count: int = 0, args=(), **settings):
        """``args``: the script's arguments; ``settings``: environment variables to set, or to unset (None)."""
        self.dir = cluster / name
        self.dir.mkdir(exist_ok=True)
        (self.dir / "slurm").mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.log = self.dir / "logs" / f"slm-test-{JOB_ID}.out"
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_", "LOCAL_"))
        }
        env.update(
            PATH=f"{cluster / 'bin'}{os.pathsep}{os.environ['PATH']}",
            FAKE_SLURM_DIR=str(self.dir / "slurm"),
            SLURM_JOB_ID=JOB_ID,
            SLURM_JOB_NAME="slm-test",
            SLURM_NNODES="2",
            SLURM_JOB_NODELIST="node[0-1]",
            SLURM_SUBMIT_DIR=str(REPO),
            SLURM_CPUS_PER_TASK="1",
            SLURM_RESTART_COUNT=str(restart_count),
            CONFIG=str(cluster / "run.yaml"),
            SAVE_DIR=str(self.dir / "ckpt"),
            GPUS_PER_NODE="1",
            MASTER_PORT=str(free_port()),
            EXTRA_ARGS=f"--tokenizer-model {cluster / 'tok.model'}",
            PYTHON=sys.executable,
            PYTHONWARNINGS="ignore",
        )
        env.update(settings)
        env = {k: v for k, v in env.items() if v is not None}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                ["bash", str(SBATCH), *args],
                cwd=self.dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"job exited ({self.proc.returncode}) before '{needle}':\n{self.text()}"
            assert time.monotonic() < end, f"no '{needle}' within {timeout} s:\n{self.text()}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError(f"job still running after {timeout} s:\n{self.text()}") from None

    def summary(self) -> dict:
        return json.loads((self.dir / "ckpt" / "summary.json").read_text())

    def requeues(self) -> list[str]:
        path = self.dir / "slurm" / "requeue.log"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def workers_catching_usr1(self) -> int:
        """How many of this job's worker processes (the `slm` processes under torchrun) catch SIGUSR1 yet."""
        marker, bit, count = f"FAKE_SLURM_DIR={self.dir / 'slurm'}".encode(), 1 << (signal.SIGUSR1 - 1), 0
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                launcher = b"torch.distributed.run" in argv or any(a.endswith(b"torchrun_node.sh") for a in argv)
                if (
                    b"megatron_slm.cli" in argv
                    and not launcher
                    and marker in (proc / "environ").read_bytes().split(b"\0")
                ):
                    caught = next(
                        line for line in (proc / "status").read_text().splitlines() if line.startswith("SigCgt:")
                    )
                    count += bool(int(caught.split()[1], 16) & bit)
            except (OSError, StopIteration):
                pass
        return count

    def cleanup(self) -> None:
        """Kill whatever this job left running: every process that inherited its FAKE_SLURM_DIR (the script,
        srun, and the tasks, torchruns and workers in their own sessions)."""
        marker = f"FAKE_SLURM_DIR={self.dir / 'slurm'}".encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "environ").read_bytes().split(b"\0"):
                        os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(10)


def _clean_exit(out: str) -> bool:
    """No process raised and torchrun saw no worker fail. Left out: the traceback a torchrun agent may log when
    node 0's agent, which hosts the rendezvous store, exits while another is still leaving the exit barrier (a
    race inside torch's elastic agent; the agents' exit status stays 0)."""
    agent = "torch/distributed/elastic/agent/server/api.py:"
    return not any("Traceback" in line and agent not in line for line in out.splitlines()) and "exitcode" not in out


@pytest.fixture
def jobs():
    started = []
    yield lambda *a, **k: started.append(Job(*a, **k)) or started[-1]
    for job in started:
        job.cleanup()


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, jobs):
    straight = jobs(cluster, "straight")  # runs alongside the first start of the preempted job
    first = jobs(cluster, "preempted")
    first.wait_for(f"step {1:>5}/{ITERS}", timeout=150)
    os.kill(first.proc.pid, signal.SIGUSR1)  # the batch shell only, as --signal=B:USR1@N does
    assert first.finish() == 0, first.text()
    out = first.text()
    assert first.requeues() == [f"requeue {JOB_ID}"], out
    assert "resume by rerunning the same command" in out and "requeueing job" in out
    assert _clean_exit(out), out  # every process exited 0
    stopped = first.summary()
    assert stopped["stopped_by"] == "SIGUSR1" and 1 <= stopped["iterations"] < ITERS, (stopped, out)
    latest = int((first.dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert latest == stopped["iterations"]
    assert "forward SIGUSR1" in (first.dir / "slurm" / "srun.log").read_text()

    assert straight.finish() == 0, straight.text()
    s = straight.summary()
    assert s["iterations"] == ITERS and s["stopped_by"] is None and s["parallel"]["dp"] == 2, s
    assert straight.requeues() == [], straight.text()
    assert f"step {ITERS:>5}/{ITERS}" in straight.text()

    requeued = jobs(cluster, "preempted", restart_count=1)  # the same job id, command and log file
    assert requeued.finish() == 0, requeued.text()
    out = requeued.text()
    assert f"at iteration {stopped['iterations']}" in out and f"step {ITERS:>5}/{ITERS}" in out, out
    resumed = requeued.summary()
    assert resumed["iterations"] == ITERS and resumed["stopped_by"] is None
    assert requeued.requeues() == [f"requeue {JOB_ID}"]  # no new request
    # bitwise-exact resume on CPU: the same final step as the uninterrupted job
    assert resumed["final"]["loss_selected"] == s["final"]["loss_selected"]
    assert resumed["final"]["loss_all"] == s["final"]["loss_all"]
    assert (first.dir / "logs" / f"slm-test-{JOB_ID}" / "launch.txt").is_file()


def test_single_node_launcher_and_input_errors(tmp_path):
    """train_single_node.sh builds the torchrun command (of slm train, or score-reference) from the environment (a
    stand-in Python records it);
    both launchers refuse missing inputs with one clear line."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    stub.chmod(0o755)
    (tmp_path / "run.yaml").write_text("train: {train_iters: 1}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_", "LOG_DIR"))}
    env.update(
        PYTHON=str(stub),
        STUB_OUT=str(tmp_path / "argv"),
        CONFIG="run.yaml",
        SAVE_DIR="runs/x",
        EXTRA_ARGS="--lr 1e-4  --train-iters 5",
        GPUS_PER_NODE="2",
    )
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "train_single_node.sh"), "--data-path", "my data"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    log_dir = argv[argv.index("--log-dir") + 1]
    assert log_dir.startswith(str(tmp_path / "logs" / "single-node-")) and log_dir.endswith("/node0")
    assert argv == [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--standalone",
        "--log-dir",
        log_dir,
        "--tee",
        "3",
        "-m",
        "megatron_slm.cli",
        "train",
        "--config",
        str(tmp_path / "run.yaml"),
        "--save",
        str(tmp_path / "runs" / "x"),
        "--lr",
        "1e-4",
        "--train-iters",
        "5",
        "--data-path",
        "my data",
    ]
    assert (Path(log_dir).parent / "launch.txt").is_file()
    # score-reference as the first argument: that command, with the other flags, and no --save
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "train_single_node.sh"), "score-reference", "--dtype", "bf16"],
        cwd=tmp_path,
        env=dict(env, SAVE_DIR=""),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv[argv.index("megatron_slm.cli") + 1 :] == [
        "score-reference",
        "--config",
        str(tmp_path / "run.yaml"),
        "--lr",
        "1e-4",
        "--train-iters",
        "5",
        "--dtype",
        "bf16",
    ]
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "train_single_node.sh"), "score-reference"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "SAVE_DIR is for slm train" in res.stderr, res.stderr

    res = subprocess.run(
        ["bash", str(REPO / "launch" / "train_single_node.sh")],
        cwd=tmp_path,
        env=dict(env, CONFIG="missing.yaml"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "CONFIG=missing.yaml does not exist" in res.stderr, res.stderr
    res = subprocess.run(
        ["bash", str(SBATCH)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(env, SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(REPO), SAVE_DIR=""),
    )
    assert res.returncode == 2 and "set SAVE_DIR" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "name, world_sizes, k, seq",
    [
        ("mistral7b_owm_slm_k0.7.yaml", (8, 16, 32, 64), 0.7, 4096),
        ("tinyllama1b_owm_slm_k0.6.yaml", (8, 16, 32), 0.6, 2048),
    ],
)
def test_example_configs_validate(name, world_sizes, k, seq):
    from megatron_slm.config import load_config, validate

    cfg = load_config(str(REPO / "launch" / "configs" / name))
    for world in world_sizes:
        validate(cfg, world_size=world)
    assert cfg.slm.loss_mode == "slm" and cfg.slm.slm_select_ratio == k and cfg.train.seq_length == seq
    assert cfg.train.global_batch_size * seq == 2**20  # ~1M tokens per step
    assert cfg.train.bf16 and cfg.reference.load and cfg.reference.model.vocab_size == cfg.model.vocab_size


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install -y shellcheck)"
)
def test_shellcheck_launch_scripts():
    assert {p.name for p in LAUNCH_SCRIPTS} >= {"slurm_train.sbatch", "train_single_node.sh", "torchrun_node.sh"}
    res = subprocess.run(
        ["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in LAUNCH_SCRIPTS]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _reference(config, tokenizer, out):
    """Reference weights of the run's model shape (untrained: any weights score)."""
    from megatron_slm.checkpoint import save_model_weights
    from megatron_slm.config import load_config
    from megatron_slm.training.resolve import resolve_run
    from megatron_slm.training.trainer import Trainer

    cfg = load_config(config, overrides=dict(slm=dict(loss_mode="clm"), data=dict(tokenizer_model=tokenizer)))
    trainer = Trainer(resolve_run(cfg))
    save_model_weights(trainer.policy_module, out, trainer.cfg.model)


def _score_cli(argv):
    from megatron_slm import cli

    return cli.main(argv)


@pytest.mark.slow
def test_preempted_scoring_job_requeues_and_resumes_exactly(cluster, jobs):
    from dist_helpers import run_distributed

    ref = cluster / "ref"
    if not ref.exists():
        run_distributed(_reference, 1, str(cluster / "run.yaml"), str(cluster / "tok.model"), str(ref))
    flags = f"--tokenizer-model {cluster / 'tok.model'} --ref-load {ref}"
    out = cluster / "scoring" / "corpus_scores"
    first = jobs(
        cluster, "scoring", args=["score-reference", "--ref-scores-path", str(out)], SAVE_DIR=None, EXTRA_ARGS=flags
    )
    # The stop signal comes once both workers catch it (their handler is installed before their imports), so
    # it is honoured after the first step: deterministic, where tiny steps would outrun a signal sent later.
    end = time.monotonic() + 120
    while first.workers_catching_usr1() < 2:
        assert first.proc.poll() is None, f"job exited ({first.proc.returncode}):\n{first.text()}"
        assert time.monotonic() < end, f"no workers catching SIGUSR1 within 120 s:\n{first.text()}"
        time.sleep(0.05)
    os.kill(first.proc.pid, signal.SIGUSR1)  # the batch shell only, as --signal=B:USR1@N does
    straight = cluster / "straight_scores" / "corpus_scores"  # uninterrupted, one process, meanwhile
    assert run_distributed(
        _score_cli,
        1,
        ["score-reference", "--config", str(cluster / "run.yaml"), *flags.split(), "--ref-scores-path", str(straight)],
    ) == [0]
    assert first.finish() == 0, first.text()
    out_text = first.text()
    assert first.requeues() == [f"requeue {JOB_ID}"], out_text
    assert "stopping on SIGUSR1" in out_text and "resume by rerunning the same command" in out_text, out_text
    assert "(run state: stopped)" in out_text and "it resumes from the score parts it kept" in out_text, out_text
    assert _clean_exit(out_text), out_text
    stop = json.loads((Path(f"{out}.parts") / "stopped.json").read_text())
    assert stop["stopped_by"] == "SIGUSR1" and 4 <= stop["samples_scored"] < stop["samples"] == 4 * ITERS, stop
    assert not Path(f"{out}.json").exists()

    requeued = jobs(
        cluster,
        "scoring",
        restart_count=1,
        args=["score-reference", "--ref-scores-path", str(out)],
        SAVE_DIR=None,
        EXTRA_ARGS=flags,
    )
    assert requeued.finish() == 0, requeued.text()
    out_text = requeued.text()
    assert f"resuming: {stop['samples_scored']} of {4 * ITERS} samples already scored" in out_text, out_text
    assert "(run state: finished)" in out_text, out_text
    assert requeued.requeues() == [f"requeue {JOB_ID}"]  # no new request
    assert not Path(f"{out}.parts").exists()
    for suffix in (".bin", ".idx", ".json"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{straight}{suffix}").read_bytes(), suffix
