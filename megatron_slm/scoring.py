"""Offline reference scoring: run the frozen reference (TP/PP/DP, forward only) over the training samples
and write each dataset's per-token score sidecar (megatron_slm.data.scores).

It walks exactly the samples a training run with the same data flags consumes (same seed, split, blend,
seq_length, global batch, train_iters), so offline SLM then sees the scores online SLM would compute.
Each step's scores go to a part file per data-parallel rank; a rerun resumes after the last step that
every rank finished; rank 0 merges the parts into the sidecars at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_slm.config import SCORE_DTYPES, virtual_pipeline_size
from megatron_slm.errors import ConfigError, DataError
from megatron_slm.log import get_logger

log = get_logger(__name__)


def score_reference(cfg, dtype: str = "fp32", force: bool = False) -> list[str]:
    """Score every training sample with the reference; returns the sidecar prefixes written."""
    from megatron.core import parallel_state as ps

    from megatron_slm.data.batches import micro_batches, to_device
    from megatron_slm.data.datasets import build_datasets, dataset_config, parse_blend
    from megatron_slm.data.scores import default_scores_prefix
    from megatron_slm.parallel import distributed
    from megatron_slm.training.passes import score_pass
    from megatron_slm.training.resolve import dataset_sizes, resolve_run
    from megatron_slm.training.trainer import build_reference

    if dtype not in SCORE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(SCORE_DTYPES)}")
    run = resolve_run(cfg, scoring=True)
    cfg, info = run.config, run.data
    prefixes = parse_blend(cfg.data.data_path)[0] if cfg.data.data_path else []
    outputs = cfg.reference.scores_path or [default_scores_prefix(p) for p in prefixes]
    if len(outputs) != len(prefixes):
        raise ConfigError("reference.scores_path must name one sidecar per data_path prefix, in the same order")
    existing = [o for o in outputs if Path(f"{o}.json").exists()]
    if existing and not force:
        raise DataError(f"score sidecar {existing[0]} already exists; pass --force to overwrite it")
    tr, par = cfg.train, cfg.parallel
    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=tr.seed,
                           virtual_pipeline_model_parallel_size=virtual_pipeline_size(par, cfg.model.num_layers))
    reference = build_reference(cfg)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    ds_cfg = dataset_config(cfg.data, tr.seq_length, tr.seed, info)
    sizes = dataset_sizes(cfg)
    train = build_datasets(ds_cfg, sizes)[0]
    positions = build_datasets(ds_cfg, sizes, positions=True)[0]
    G, b = tr.global_batch_size, tr.micro_batch_size

    parts = Path(f"{outputs[0]}.parts")
    if dist.get_rank() == 0:
        parts.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    done = 0
    while (parts / f"step{done:08d}-dp{dp_rank}.pt").exists():
        done += 1
    start = torch.tensor(done, device=distributed.device())  # NCCL reduces device tensors only
    dist.all_reduce(start, op=dist.ReduceOp.MIN)
    start = int(start)
    if start:
        log.info(f"resuming after {start} scored steps found in {parts}")

    t0, tokens = time.perf_counter(), 0
    for step in range(start, tr.train_iters):
        mbs = to_device(micro_batches(train, step, G, b, dp_rank, dp_size))
        scores = score_pass(reference, mbs, cfg.model.vocab_size)
        if writer:
            pmbs = micro_batches(positions, step, G, b, dp_rank, dp_size)
            part = {
                "dataset_id": torch.cat([p.get("dataset_id", torch.zeros(p["label_positions"].shape[0], dtype=torch.long)) for p in pmbs]),
                "label_positions": torch.cat([p["label_positions"] for p in pmbs]),
                "scores": torch.cat(scores).float().cpu(),
            }
            path = parts / f"step{step:08d}-dp{dp_rank}.pt"
            torch.save(part, f"{path}.tmp")
            Path(f"{path}.tmp").replace(path)
        tokens += G * tr.seq_length
        if (step + 1) % max(tr.log_interval, 1) == 0 or step + 1 == tr.train_iters:
            rate = tokens / (time.perf_counter() - t0)
            eta = (tr.train_iters - step - 1) * G * tr.seq_length / max(rate, 1e-9)
            log.info(f"[score] step {step + 1:>6}/{tr.train_iters} | {rate:,.0f} tokens/s | ETA {eta:,.0f} s")
    dist.barrier()
    if dist.get_rank() == 0:
        _merge(parts, prefixes, outputs, dtype, dp_size, tr.train_iters, cfg)
        shutil.rmtree(parts)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    log.info(f"[score] wrote {', '.join(outputs)} ({tokens:,} tokens scored in {elapsed:.1f} s, {tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    return outputs


def _merge(parts: Path, prefixes, outputs, dtype, dp_size, steps, cfg) -> None:
    from megatron_slm.checkpoint import read_model_config
    from megatron_slm.data.scores import scoring_flags, token_fingerprint, write_sidecar

    flats, twice = [], [0] * len(prefixes)  # twice: tokens scored again, in another window (a later epoch)
    for prefix, out in zip(prefixes, outputs):
        n = token_fingerprint(prefix)["num_tokens"]
        flat = np.lib.format.open_memmap(f"{out}.flat.npy", mode="w+", dtype=np.float32, shape=(n,))
        flat[:] = np.nan
        flats.append(flat)
    for step in range(steps):
        for dp in range(dp_size):
            part = torch.load(parts / f"step{step:08d}-dp{dp}.pt")
            for d, pos, val in zip(part["dataset_id"].tolist(), part["label_positions"], part["scores"]):
                keep = pos >= 0  # -1: padding of the last sample
                idx = pos[keep].numpy()
                twice[d] += int(np.count_nonzero(~np.isnan(flats[d][idx])))
                flats[d][idx] = val[keep].numpy()
    manifest = {
        "reference": {"load": cfg.reference.load, "model": dataclasses.asdict(read_model_config(cfg.reference.load))},
        # the data flags that decide each scored token's window; training compares them (check_scoring_flags)
        "scoring": scoring_flags(cfg, train_iters=steps),
    }
    for d, (prefix, out, flat) in enumerate(zip(prefixes, outputs, flats)):
        manifest_d = dict(manifest, num_scored=int(np.isfinite(flat).sum()), num_scored_more_than_once=twice[d])
        write_sidecar(out, prefix, flat, dtype, manifest_d)
        del flat
        Path(f"{out}.flat.npy").unlink()
