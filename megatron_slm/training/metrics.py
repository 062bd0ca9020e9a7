"""The training log: one line per log interval (losses, selection, throughput as Megatron-LM reports it, ETA),
and on the logging rank a JSON-lines file (``<save>/metrics.jsonl``), TensorBoard and Weights & Biases scalars.

The line goes through the ``megatron_slm.metrics`` logger (``megatron_slm.log.METRICS_LOGGER``), which
``setup_logging`` lets speak on the global last rank only. Throughput, as in Megatron-LM: tokens/s per GPU
(= global tokens per step / step time / world size) and in total, model TFLOP/s per GPU
(``megatron_slm.planning.flops``: the policy's forward + backward, the online reference's forward, the
global-batch scoring pass), MFU against the GPU's bf16 dense peak (``--peak-tflops`` or a table of known
GPUs; ``n/a`` when unknown, e.g. on CPU), and peak memory (CUDA max allocated, else the process's peak RSS).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import string
import sys
import time
from pathlib import Path

from megatron_slm.errors import require
from megatron_slm.log import METRICS_LOGGER
from megatron_slm.parallel import distributed
from megatron_slm.planning.flops import training_step_flops

log = logging.getLogger(METRICS_LOGGER)

# Per-GPU peak bf16 dense TFLOP/s by a substring of torch.cuda.get_device_name(); the first match wins, so
# the more specific names come first.
PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16)
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)
GIB = 1024**3
WANDB_ID_FILE = "wandb_run_id"

# Per blended dataset and step (metrics "<key>_ds<i>"): selected and valid tokens, and the reference loss summed over
# the unselected tokens with their count (a high mean there: tokens SLM skips because the reference is bad at them).
DATASET_COUNT_KEYS = ("selected_tokens", "valid_tokens", "unselected_ref_loss_sum", "unselected_tokens")


def dataset_shares(window: list[dict]) -> list[tuple[float, float | None]]:
    """Per blended dataset over a window of steps: (selected share, mean reference loss of the unselected tokens)."""
    out, i = [], 0
    while any(f"valid_tokens_ds{i}" in w for w in window):

        def total(key, i=i):
            return sum(w.get(f"{key}_ds{i}") or 0.0 for w in window)

        valid, unselected = total("valid_tokens"), total("unselected_tokens")
        share = total("selected_tokens") / valid if valid else math.nan
        out.append((share, total("unselected_ref_loss_sum") / unselected if unselected else None))
        i += 1
    return out


def finite_or_none(x):
    """JSON has no NaN/inf: they become null (in dicts and lists too)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return x


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def device_peak_tflops() -> float | None:
    """The bf16 dense peak of this process's GPU from ``PEAK_TFLOPS``; None on CPU or an unknown GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # no driver, no torch: nothing known
        return None
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def peak_memory_gib() -> float:
    """CUDA max allocated memory of this process when on a GPU, else its peak resident set size."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / GIB
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB  # bytes on macOS, KiB on Linux


def _wandb_dir(cfg) -> str:
    if cfg.train.wandb_save_dir:
        return cfg.train.wandb_save_dir
    return str(Path(cfg.checkpoint.save) / "wandb") if cfg.checkpoint.save else "./wandb"


def _fmt_num(x: float) -> str:
    """One decimal (Megatron-LM's style), or three significant digits below 1 (tiny models on CPU)."""
    return f"{x:.1f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


class MetricsLogger:
    """Logs on one rank (the global last rank, which holds losses). Other ranks get a no-op logger.

    The world size comes from torch.distributed (or ``WORLD_SIZE``), the MFU peak from ``cfg.train.peak_tflops``
    or the GPU's name; writers (metrics.jsonl, TensorBoard, W&B) exist on the logging rank only."""

    def __init__(self, cfg, is_logging_rank: bool):
        self.cfg, self.enabled = cfg, is_logging_rank
        self.interval = max(cfg.train.log_interval, 1)
        self.tb = self.jsonl = self.wandb = None
        self.window: list[dict] = []
        self.warned: set[int] = set()  # datasets already warned about (--slm-warn-selected-share)
        self.total, self.first, self.t0 = cfg.train.train_iters, 0, time.perf_counter()
        if not self.enabled:
            return
        self.world = distributed.world_size()
        self.peak = cfg.train.peak_tflops or device_peak_tflops()
        try:
            self.flops_per_token = training_step_flops(cfg, batch_size=1) / cfg.train.seq_length
        except (TypeError, AttributeError):  # a model shape left unset: no TFLOP/s
            self.flops_per_token = None
        if cfg.train.wandb_project:
            self.wandb = self._init_wandb(cfg)
        if cfg.checkpoint.save:
            Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(cfg.checkpoint.save) / "metrics.jsonl", "a")
        if cfg.train.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.train.tensorboard_dir)
            except ImportError:
                log.warning("tensorboard is not installed; skipping TensorBoard scalars")

    @staticmethod
    def _init_wandb(cfg):
        wandb = require("wandb", "--wandb-project")
        directory = Path(_wandb_dir(cfg))
        directory.mkdir(parents=True, exist_ok=True)
        run_id = None
        id_file = Path(cfg.checkpoint.save) / WANDB_ID_FILE if cfg.checkpoint.save else None
        if id_file is not None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            if id_file is not None:  # a resumed run (same --save) continues the same W&B run
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id + "\n")
        # WANDB_MODE (online, offline, disabled) and the other WANDB_* variables are read by wandb itself.
        return wandb.init(
            project=cfg.train.wandb_project,
            name=cfg.train.wandb_exp_name,
            dir=str(directory),
            config=cfg.to_dict(),
            resume="allow",
            id=run_id,
        )

    def start(self, total_iters: int, start_iter: int) -> None:
        self.total, self.first, self.t0 = total_iters, start_iter, time.perf_counter()

    def _throughput(self, tokens: float, seconds: float) -> dict:
        """Megatron-LM's throughput scalars for ``tokens`` (all ranks) processed in ``seconds``."""
        if not seconds or seconds <= 0:
            return {}
        out = {"tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / self.world}
        if self.flops_per_token is not None:
            out["tflops_per_gpu"] = self.flops_per_token * tokens / seconds / self.world / 1e12
            if self.peak:
                out["mfu"] = out["tflops_per_gpu"] / self.peak
        return out

    def step(self, iteration: int, m: dict, tokens: int) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        values.update(self._throughput(tokens, values.get("step_time") or 0.0), peak_mem_gib=peak_memory_gib())
        self.window.append(dict(values, tokens=tokens))
        self._write(iteration, values, "train")
        if iteration % self.interval and iteration != self.total:
            return
        window, self.window = self.window, []
        keys = [k for k in values if all(k in w for w in window)]
        avg = {k: sum(w[k] for w in window) / len(window) for k in keys}
        # throughput over the window: all its tokens over all its time (not a mean of per-step rates)
        seconds = sum(w.get("step_time", 0.0) for w in window)
        avg.update(self._throughput(sum(w["tokens"] for w in window), seconds))
        avg["peak_mem_gib"] = values["peak_mem_gib"]
        shares = dataset_shares(window)
        log.info(self._line(iteration, avg) + self._dataset_part(shares))
        self._warn_forgetting(shares, len(window))

    def _dataset_part(self, shares) -> str:
        if len(shares) < 2:
            return ""
        cells = [f"{s:.2f}/" + (f"{r:.2f}" if r is not None else "-") for s, r in shares]
        return " | by dataset selected/ref(unsel) " + " ".join(cells)

    def _warn_forgetting(self, shares, steps: int) -> None:
        """Once per dataset: its selected share over this logging window is under --slm-warn-selected-share."""
        floor = self.cfg.slm.slm_warn_selected_share
        if not floor or len(shares) < 2:
            return
        names = self.cfg.data.data_path and _blend_names(self.cfg.data.data_path)
        for i, (share, ref) in enumerate(shares):
            if i in self.warned or math.isnan(share) or share >= floor:
                continue
            self.warned.add(i)
            name = names[i] if names and i < len(names) else f"dataset {i}"
            log.warning(
                f"{name}: only {share:.1%} of its tokens were selected over the last {steps} step(s) (under "
                f"--slm-warn-selected-share {floor}); the reference's mean loss on the tokens left out is "
                + (f"{ref:.2f}" if ref is not None else "n/a")
                + ". SLM does not train on what the reference is bad at, so this data may be forgotten; give it "
                "its own k with --slm-select-ratio-per-dataset (1.0: plain CLM on it)"
            )

    def _line(self, iteration: int, avg: dict) -> str:
        done = iteration - self.first
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - iteration)
        nan = float("nan")
        mode = self.cfg.slm.loss_mode
        line = (
            f"[{mode}] step {iteration:>5}/{self.total} | loss(sel) {avg.get('loss_selected', nan):.4f}"
            f" | loss(all) {avg.get('loss_all', nan):.4f}"
        )
        if mode == "slm":
            frac = avg.get("selected_fraction", nan)
            unsel = avg.get("excess_unselected", nan)
            unsel_s = "n/a" if frac >= 1 or math.isnan(unsel) else f"{unsel:+.3f}"
            line += (
                f" | ref {avg.get('ref_loss', nan):.4f} | excess sel/unsel {avg.get('excess_selected', nan):+.3f}/{unsel_s}"
                f" | selected {frac:.3f}"
            )
        line += f" | gnorm {avg.get('grad_norm', nan):.3f} | lr {avg.get('lr', nan):.2e}"
        if "tokens_per_s" in avg:
            line += f" | {avg['tokens_per_s_per_gpu']:,.0f} tok/s/GPU ({avg['tokens_per_s']:,.0f} total)"
        if "tflops_per_gpu" in avg:
            line += f" | {_fmt_num(avg['tflops_per_gpu'])} TFLOP/s/GPU"
            line += f" | MFU {_fmt_num(100 * avg['mfu'])}%" if "mfu" in avg else " | MFU n/a"
        line += f" | mem {_fmt_num(avg['peak_mem_gib'])} GiB | {avg.get('step_time', nan):.3f} s/step | ETA {_fmt_time(eta)}"
        return line

    def eval(self, iteration: int, loss: float | None) -> None:
        if not self.enabled or loss is None:
            return
        log.info(
            f"[{self.cfg.slm.loss_mode}] step {iteration:>5} | held-out loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f}"
        )
        self._write(iteration, {"loss": loss}, "eval")

    def _write(self, iteration: int, values: dict, prefix: str) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"iteration": iteration, "split": prefix, **finite_or_none(values)}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, iteration)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            # finish() returns before wandb's service process has written the run's records to its .wandb file
            # (seen in offline mode: the file held only its header, filled in up to seconds later on a busy machine);
            # a job killed then (a Slurm step ending) would lose them. teardown() waits for the service to flush.
            wandb.teardown()
            self.wandb = None


def _blend_names(data_path) -> list[str]:
    from megatron_slm.data.blend import parse_blend

    return [Path(p).name for p in parse_blend(data_path)[0]]
