"""Logging for the library and its commands: one ``megatron_slm`` logger tree, rank-aware, and the one place
where known third-party noise is filtered.

Library modules log through ``get_logger(__name__)``; entry points call ``setup_logging`` once. As in
Megatron-LM, general messages come from rank 0 and the training log (``METRICS_LOGGER``: losses, selection,
throughput) from the global last rank, which holds the losses; ``all_ranks`` prints from every rank with a
``[rank N]`` prefix. Each line starts with the local time and the level: ``2026-12-04 07:01:02 INFO <message>``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LEVELS = ("debug", "info", "warning", "error")
METRICS_LOGGER = "megatron_slm.metrics"

# Messages every CPU or TE-less run would otherwise print on every rank, none of them actionable here.
_NOISE = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*torch.distributed._sharded_tensor will be deprecated.*",
    ".*TypedStorage is deprecated.*",
    ".*`torch.cuda.amp.custom_(fwd|bwd).*` is deprecated.*",
    ".*torch.distributed.checkpoint.*",
    ".*Detected mismatch between collected number of non-loss data.*",
    ".*the core_attn is from transformer_engine and may be the fused version.*",
)
_NOISY_LOGGERS = ("megatron.core", "torch.distributed.checkpoint", "DeepSpeed", "deepspeed")


def get_logger(name: str = "megatron_slm") -> logging.Logger:
    return logging.getLogger(name if name.startswith("megatron_slm") else f"megatron_slm.{name}")


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def filter_third_party_noise() -> None:
    """Silence the known, harmless warnings of megatron-core, torch and DeepSpeed (idempotent)."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch|deepspeed|transformers)\b.*")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers configures its own loggers on import; these are read then (no progress bars, errors only)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


LINE_FORMAT = "%(asctime)s %(levelname)s {rank}%(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def line_formatter(rank: int | None = None) -> logging.Formatter:
    """Each line: local time, level, ``[rank N]`` when every rank logs (``rank``), then the message, e.g.
    ``2026-12-04 07:01:02 INFO [rank 3] [slm] step     3/3 | ...``."""
    return logging.Formatter(LINE_FORMAT.format(rank="" if rank is None else f"[rank {rank}] "), DATE_FORMAT)


def setup_logging(level: str = "info", all_ranks: bool = False) -> logging.Logger:
    """Configure the ``megatron_slm`` logger: ``level`` on the logging rank (or every rank), errors elsewhere."""
    filter_third_party_noise()
    rank, world = _rank()
    logger = logging.getLogger("megatron_slm")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(line_formatter(rank if all_ranks and world > 1 else None))
    logger.addHandler(handler)
    logger.propagate = False
    wanted = getattr(logging, level.upper())
    logger.setLevel(wanted if all_ranks or rank == 0 else logging.ERROR)
    logging.getLogger(METRICS_LOGGER).setLevel(wanted if all_ranks or rank == world - 1 else logging.ERROR)
    return logger


def progress_bar(
    total: int | None = None, desc: str | None = None, unit: str = "it", file=None, quiet: bool = False, **kwargs
):
    """A tqdm progress bar for long work (preprocessing, offline scoring, evaluation), on ``file`` (stderr).

    Shown on global rank 0 only, and only when ``file`` is a terminal (and not ``quiet``): a log file or a pipe
    (Slurm, CI) gets no bar, and the command's log lines say the same there. ``bar.disable`` tells which; a
    disabled bar takes ``update`` calls at no cost."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    shown = not quiet and _rank()[0] == 0 and hasattr(file, "isatty") and file.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=file, disable=not shown, dynamic_ncols=True, **kwargs)
