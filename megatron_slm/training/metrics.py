"""Step logging: one readable line per log interval with ETA, a JSON-lines file, and TensorBoard if installed."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Logs on one rank (the global last rank, which holds losses). Other ranks get a no-op logger."""

    def __init__(self, cfg, is_logging_rank: bool, stream=None):
        self.cfg, self.enabled = cfg, is_logging_rank
        self.stream = stream or sys.stdout
        self.interval = max(cfg.train.log_interval, 1)
        self.tb = None
        self.jsonl = None
        if self.enabled and cfg.checkpoint.save:
            Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(cfg.checkpoint.save) / "metrics.jsonl", "a")
        if self.enabled and cfg.train.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.train.tensorboard_dir)
            except ImportError:
                print("tensorboard is not installed; skipping TensorBoard scalars", file=self.stream)
        self.window: list[dict] = []

    def start(self, total_iters: int, start_iter: int) -> None:
        self.total, self.first, self.t0 = total_iters, start_iter, time.perf_counter()

    def step(self, iteration: int, m: dict, tokens: int) -> None:
        if not self.enabled:
            return
        m = dict(m, tokens_per_s=tokens / m["step_time"] if m.get("step_time") else float("nan"))
        self.window.append(m)
        self._write(iteration, {k: v for k, v in m.items() if isinstance(v, (int, float))}, "train")
        if iteration % self.interval and iteration != self.total:
            return
        avg = {k: sum(w[k] for w in self.window) / len(self.window) for k in m if isinstance(m[k], (int, float))}
        self.window = []
        done = iteration - self.first
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - iteration)
        mode = self.cfg.slm.loss_mode
        line = f"[{mode}] step {iteration:>5}/{self.total} | loss(sel) {avg['loss_selected']:.4f} | loss(all) {avg['loss_all']:.4f}"
        if mode == "slm":
            line += (
                f" | ref {avg['ref_loss']:.4f} | excess sel/unsel {avg['excess_selected']:+.3f}/{avg['excess_unselected']:+.3f}"
                f" | selected {avg['selected_fraction']:.3f}"
            )
        line += (
            f" | gnorm {avg['grad_norm']:.3f} | lr {avg['lr']:.2e} | {avg['tokens_per_s']:,.0f} tok/s"
            f" | {avg['step_time']:.3f} s/step | ETA {_fmt_time(eta)}"
        )
        print(line, file=self.stream, flush=True)

    def eval(self, iteration: int, loss: float | None) -> None:
        if not self.enabled or loss is None:
            return
        print(f"[{self.cfg.slm.loss_mode}] step {iteration:>5} | held-out loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f}",
              file=self.stream, flush=True)
        self._write(iteration, {"loss": loss}, "eval")

    def _write(self, iteration: int, values: dict, prefix: str) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"iteration": iteration, "split": prefix, **values}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
