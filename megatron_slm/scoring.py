"""Offline reference scoring: run the frozen reference (TP/PP/DP, forward only) over the training samples
and write each dataset's per-token score sidecar (megatron_slm.data.scores).

It walks exactly the samples a training run with the same data flags consumes (same seed, split, blend,
seq_length, global batch, train_iters), so offline SLM then sees the scores online SLM would compute.

Resumable and exact at any data-parallel size: each DP rank writes the scores of its share of a step to
``<first output>.parts/samples{first:012d}-{stop:012d}.pt``, keyed by global sample, and a rerun scores only the
shares not yet covered by parts. ``.parts/scoring.json`` records the data flags that decide the windows (and the
reference): a rerun with other ones is refused. Rank 0 merges the parts into the sidecars (each written
atomically, so a merge killed half-way is simply done again by a rerun), then deletes ``.parts``. One run per
output at a time (``<output>.lock``, checkpoint.lock.SaveLock). A run whose samples would score a token twice
(more than one epoch of a dataset) is refused before any forward pass.

Stops like training (a Slurm preemption or time limit): on SIGUSR1/SIGTERM (lifecycle) or past
--exit-duration-in-mins the ranks agree after a step, keep their parts, record the stop (``.parts/stopped.json``,
what the launchers' requeue decision reads through ``run_state``) and exit 0 without merging; a rerun resumes. A
stop signal during the merge waits for it to finish, so a stop never leaves half-written sidecars.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_slm import lifecycle
from megatron_slm.config import SCORE_DTYPES, virtual_pipeline_size
from megatron_slm.errors import ConfigError, DataError, SLMError
from megatron_slm.log import get_logger, progress_bar

log = get_logger(__name__)

PARTS_FORMAT = "megatron_slm.score_parts.v2"
PARTS_MANIFEST = "scoring.json"
STOP_RECORD = "stopped.json"
PART_NAME = re.compile(r"samples(\d{12})-(\d{12})\.pt")


def output_prefixes(cfg) -> tuple[list[str], list[str]]:
    """The --data-path prefixes and the sidecar each is scored into (--ref-scores-path, else <prefix>_refscores)."""
    from megatron_slm.data.blend import parse_blend

    prefixes = parse_blend(cfg.data.data_path)[0] if cfg.data.data_path else []
    if cfg.reference.scores_path:
        outputs = list(cfg.reference.scores_path)
    else:
        from megatron_slm.data.scores import default_scores_prefix  # imports megatron-core: only when needed

        outputs = [default_scores_prefix(p) for p in prefixes]
    if len(outputs) != len(prefixes):
        raise ConfigError("reference.scores_path must name one sidecar per data_path prefix, in the same order")
    return prefixes, outputs


def run_state(cfg, since: float) -> str:
    """How the last score-reference run of ``cfg`` ended, for the launchers' requeue decision (training's
    counterpart: summary.json): "stopped" (by a stop signal or --exit-duration-in-mins after ``since``, an epoch
    time; its parts are kept for the next run), "finished" (every sidecar written after ``since`` and the parts
    merged away) or "unknown" (a failure, or nothing ran)."""
    outputs = output_prefixes(cfg)[1]
    if not outputs:
        return "unknown"
    parts = Path(f"{outputs[0]}.parts")

    def newer(path) -> bool:
        try:
            return os.path.getmtime(path) >= since
        except OSError:
            return False

    if newer(parts / STOP_RECORD):
        return "stopped"
    if not parts.exists() and all(newer(f"{out}.json") for out in outputs):
        return "finished"
    return "unknown"


def score_reference(cfg, dtype: str = "fp32", force: bool = False) -> list[str]:
    """Score every training sample with the reference; returns the sidecar prefixes written (none when a stop
    signal or --exit-duration-in-mins stopped it before the merge: rerun to resume)."""
    from megatron.core import parallel_state as ps

    from megatron_slm.checkpoint.lock import SaveLock
    from megatron_slm.data.batches import micro_batches, to_device
    from megatron_slm.data.datasets import build_datasets, dataset_config
    from megatron_slm.parallel import distributed
    from megatron_slm.training.passes import score_pass
    from megatron_slm.training.resolve import dataset_sizes, resolve_run
    from megatron_slm.training.trainer import build_reference

    if dtype not in SCORE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(SCORE_DTYPES)}")
    lifecycle.catch_stop_signals()  # SIGTERM/SIGUSR1: stop after a step (the CLI installs it before its imports)
    run = resolve_run(cfg, scoring=True)
    cfg, info = run.config, run.data
    prefixes, outputs = output_prefixes(cfg)
    tr, par = cfg.train, cfg.parallel
    distributed.initialize(
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        seed=tr.seed,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(par, cfg.model.num_layers),
    )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    ds_cfg = dataset_config(cfg.data, tr.seq_length, tr.seed, info)
    sizes = dataset_sizes(cfg)
    train = build_datasets(ds_cfg, sizes)[0]
    positions = build_datasets(ds_cfg, sizes, positions=True)[0]
    G, b = tr.global_batch_size, tr.micro_batch_size
    check_one_epoch(train, prefixes, cfg)  # every rank: the same indices give the same verdict

    locks = []  # one per output: a second run on any of them would merge or delete this run's work
    bar = None
    try:
        for out in dict.fromkeys(outputs):
            locks.append(SaveLock.acquire(out, lock=f"{out}.lock", flag="--ref-scores-path", recover=False))
        parts = Path(f"{outputs[0]}.parts")
        covered = _on_rank0(
            lambda: _open_parts(parts, cfg, outputs, dp_size, force),
            f"cannot prepare {parts}",
            "choose a writable --ref-scores-path",
        )
        reference = build_reference(cfg)
        writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        per_rank = G // dp_size
        starts = [s for s, _ in covered]
        todo = [
            step
            for step in range(tr.train_iters)
            if not _covered(covered, starts, step * G + dp_rank * per_rank, step * G + (dp_rank + 1) * per_rank)
        ]

        # After an uneven stop the DP ranks have different steps left, but every rank joins each round's stop
        # agreement (a collective): all run as many rounds as the rank with the most steps.
        rounds = int(distributed.max_over_ranks(len(todo)))
        t0, started, tokens, stopped = time.perf_counter(), time.monotonic(), 0, None
        # rank 0's steps: a bar on a terminal, else (a log file) the log line every --log-interval steps
        bar = progress_bar(total=len(todo), desc="[score] steps", unit="step")
        for i in range(rounds):
            if i < len(todo):
                step = todo[i]
                mbs = to_device(micro_batches(train, step, G, b, dp_rank, dp_size))
                scores = score_pass(reference, mbs, cfg.model.vocab_size)
                if writer:
                    pmbs = micro_batches(positions, step, G, b, dp_rank, dp_size)
                    part = {
                        "dataset_id": torch.cat(
                            [
                                p.get("dataset_id", torch.zeros(p["label_positions"].shape[0], dtype=torch.long))
                                for p in pmbs
                            ]
                        ),
                        "label_positions": torch.cat([p["label_positions"] for p in pmbs]),
                        "scores": torch.cat(scores).float().cpu(),
                    }
                    first = step * G + dp_rank * per_rank
                    path = parts / f"samples{first:012d}-{first + per_rank:012d}.pt"
                    torch.save(part, f"{path}.tmp")
                    Path(f"{path}.tmp").replace(path)
                tokens += G * tr.seq_length  # with the other DP ranks' shares: a global batch per step
                if not bar.disable:
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s", refresh=False)
                bar.update()
                if bar.disable and ((i + 1) % max(tr.log_interval, 1) == 0 or i + 1 == len(todo)):
                    elapsed = time.perf_counter() - t0
                    eta = (len(todo) - i - 1) * elapsed / (i + 1)
                    log.info(
                        f"[score] step {step + 1:>6}/{tr.train_iters} | {tokens / elapsed:,.0f} tokens/s | ETA {eta:,.0f} s"
                    )
            # after the step's part is saved: what a stop keeps is every step scored so far
            stopped = distributed.agreed_stop() or _over_time(tr.exit_duration_in_mins, started)
            if stopped:
                break
        bar.close()
        if stopped:
            total = tr.train_iters * G
            done = _on_rank0(
                lambda: _record_stop(parts, stopped, total),
                f"cannot record the stop in {parts}",
                "free space or fix permissions and rerun: the scored parts are kept",
            )
            log.info(
                f"[score] stopping on {stopped}: {done} of {total} samples are scored, kept in {parts}; resume "
                "by rerunning the same command (at any data-parallel size)"
            )
            lifecycle.acted_on()
            return []
        dist.barrier()
        # A stop signal from here on is only recorded (lifecycle): the merge runs to its end, so a stop never leaves
        # half-written sidecars (a kill can; a rerun then merges again, to the same bytes).
        merge_start = time.perf_counter()
        _on_rank0(
            lambda: _merge(parts, prefixes, outputs, dtype, tr.train_iters * G, cfg),
            "cannot write the score sidecars",
            f"free space or fix permissions and rerun: the scores in {parts} are kept and merged again",
        )
        log.info(f"[score] merged the parts into the sidecars in {time.perf_counter() - merge_start:.1f} s")
        if lifecycle.received():
            log.info(f"[score] {lifecycle.received()} came during the merge, which finished first: nothing to resume")
            lifecycle.acted_on()
    finally:
        if bar is not None:
            bar.close()
        for lock in reversed(locks):
            lock.release()
    elapsed = time.perf_counter() - t0
    log.info(
        f"[score] wrote {', '.join(outputs)} ({tokens:,} tokens scored in {elapsed:.1f} s, {tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
    )
    return outputs


def _over_time(limit_minutes: float | None, started: float) -> str | None:
    """--exit-duration-in-mins, as training reads it: past the limit on any rank stops every rank."""
    if limit_minutes is None:
        return None
    from megatron_slm.parallel import distributed

    return "exit-duration" if distributed.max_over_ranks((time.monotonic() - started) / 60.0 > limit_minutes) else None


def _record_stop(parts: Path, stopped: str, total: int) -> int:
    """(Rank 0, after the ranks agreed on the stop, so every part is saved.) Record the stop for run_state;
    returns the samples scored so far."""
    done = sum(b - a for a, b in _coalesce(_scan_parts(parts)))
    tmp = parts / f"{STOP_RECORD}.tmp"
    tmp.write_text(json.dumps({"stopped_by": stopped, "samples_scored": done, "samples": total}))
    tmp.replace(parts / STOP_RECORD)
    return done


def _on_rank0(fn, what: str, fix: str):
    """``fn()`` on global rank 0, its result shared with every rank; an SLMError (or OSError) there is raised as
    the same one DataError on every rank."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except SLMError as exc:
            error = str(exc)
        except OSError as exc:
            reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
            error = f"{what} ({reason}); {fix}"
    box = [(result, error)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error:
        raise DataError(error)
    return result


# ----------------------------------------------------------------------------------------------
# Parts: keyed by global sample, under the data flags that decide the windows


def _scan_parts(parts: Path) -> list[tuple[int, int, Path]]:
    """``(first sample, stop, path)`` of every finished part, sorted (``.tmp`` files are unfinished saves)."""
    found = []
    for path in parts.iterdir():
        m = PART_NAME.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(found)


def _coalesce(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, stop, *_ in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [(a, b) for a, b in out]


def _covered(intervals, starts, lo: int, hi: int) -> bool:
    """Whether samples [lo, hi) lie inside one of the disjoint sorted ``intervals`` (``starts``: their starts)."""
    i = bisect.bisect_right(starts, lo) - 1
    return i >= 0 and intervals[i][1] >= hi


def _open_parts(parts: Path, cfg, outputs, dp_size: int, force: bool) -> list[tuple[int, int]]:
    """(Rank 0, under the output locks.) Resume ``parts`` if it was written under this run's flags, or start it;
    returns the sample intervals already scored."""
    from megatron_slm.data.scores import scoring_flag_differences, scoring_flags

    shutil.rmtree(f"{parts}.deleting", ignore_errors=True)  # what a kill during the last cleanup left
    flags = scoring_flags(cfg)
    manifest = parts / PARTS_MANIFEST
    if parts.is_dir() and manifest.is_file():
        try:
            rec = json.loads(manifest.read_text())
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and rec.get("format") == PARTS_FORMAT and isinstance(rec.get("scoring"), dict)):
            raise DataError(
                f"{manifest} is not a score-reference parts record (corrupt); delete {parts} to score from scratch"
            )
        diffs = scoring_flag_differences(rec["scoring"], flags)
        if rec.get("reference_load") != cfg.reference.load:
            diffs.append(("--ref-load", str(rec.get("reference_load")), str(cfg.reference.load)))
        if diffs:
            raise DataError(
                f"{parts} holds the parts of an interrupted score-reference run (data-parallel size "
                f"{rec.get('data_parallel_size', '?')}) with other flags than this run's, so resuming would mix scores "
                f"of other windows: {'; '.join(f'{f}: the parts have {a}, this run has {b}' for f, a, b in diffs)}; "
                f"rerun with the parts' flags to resume, or delete {parts} to score from scratch"
            )
        covered = _coalesce(_scan_parts(parts))
        done = sum(b - a for a, b in covered)
        log.info(
            f"resuming: {done} of {cfg.train.train_iters * cfg.train.global_batch_size} samples already scored "
            f"in {parts} (at data-parallel size {rec.get('data_parallel_size', '?')}, now {dp_size})"
        )
        return covered  # an existing sidecar is this unfinished run's own (e.g. a merge killed half-way)
    if parts.is_dir() and any(parts.glob("*.pt")):
        raise DataError(
            f"{parts} holds parts of an older score-reference that did not record its data flags, so "
            f"they cannot be resumed safely; delete {parts} to score from scratch"
        )
    existing = [o for o in outputs if Path(f"{o}.json").exists()]
    if existing and not force:
        raise DataError(f"score sidecar {existing[0]} already exists; pass --force to overwrite it")
    parts.mkdir(parents=True, exist_ok=True)
    record = {
        "format": PARTS_FORMAT,
        "scoring": flags,
        "reference_load": cfg.reference.load,
        "data_parallel_size": dp_size,
    }  # the DP size is informative: parts resume at any
    tmp = parts / f"{PARTS_MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(manifest)
    return []


def _load_part(path: Path, rows: int) -> dict:
    """A part's tensors; weights_only: a planted file cannot run code when loaded."""
    fix = f"delete {path} and rerun: its samples are scored again"
    try:
        part = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(
            f"score part {path} cannot be read as tensors ({type(exc).__name__}): it was not written by "
            f"score-reference or is corrupt; {fix}"
        ) from None
    keys = ("dataset_id", "label_positions", "scores")
    if not (
        isinstance(part, dict)
        and all(isinstance(part.get(k), torch.Tensor) for k in keys)
        and part["dataset_id"].shape == (rows,)
        and part["label_positions"].shape == part["scores"].shape
        and part["scores"].shape[:1] == (rows,)
    ):
        raise DataError(f"score part {path} does not hold the scores of its {rows} samples (corrupt); {fix}")
    return part


def _merge(parts: Path, prefixes, outputs, dtype, num_samples: int, cfg) -> None:
    """Write the sidecars from the parts, then delete the parts. Idempotent: every sidecar is written whole
    from the parts (atomically), so a rerun after a kill in here gives the same bytes."""
    from megatron_slm.checkpoint import read_model_config
    from megatron_slm.data import scores

    found = _scan_parts(parts)
    flats, twice = [], [0] * len(prefixes)  # twice: tokens scored again, in another window (a later epoch)
    for prefix, out in zip(prefixes, outputs):
        n = scores.token_fingerprint(prefix)["num_tokens"]
        flat = np.lib.format.open_memmap(f"{out}.flat.npy", mode="w+", dtype=np.float32, shape=(n,))
        flat[:] = np.nan
        flats.append(flat)
    # A sample can be in two parts (a step half done at one DP size, redone whole at another): the first counts.
    taken = np.zeros(num_samples, dtype=bool)
    for start, stop, path in found:
        if stop > num_samples or start >= stop:
            raise DataError(
                f"score part {path} holds samples {start}..{stop - 1}, but this run scores "
                f"{num_samples}; delete it and rerun"
            )
        new = np.flatnonzero(~taken[start:stop])
        if not len(new):
            continue
        part = _load_part(path, stop - start)
        try:
            for row in new.tolist():
                d, pos, val = int(part["dataset_id"][row]), part["label_positions"][row], part["scores"][row]
                keep = pos >= 0  # -1: padding of the last sample
                idx = pos[keep].numpy()
                twice[d] += int(np.count_nonzero(~np.isnan(flats[d][idx])))
                flats[d][idx] = val[keep].numpy()
        except IndexError:
            raise DataError(
                f"score part {path} names datasets or token positions that this run's data lacks (corrupt); "
                f"delete {path} and rerun: its samples are scored again"
            ) from None
        taken[start:stop] = True
    if not taken.all():
        missing = np.flatnonzero(~taken)
        raise DataError(
            f"{parts} lacks the scores of {len(missing)} of {num_samples} samples (the first: sample "
            f"{missing[0]}): parts were removed during the run; rerun to score them"
        )
    manifest = {
        "reference": {"load": cfg.reference.load, "model": dataclasses.asdict(read_model_config(cfg.reference.load))},
        # the data flags that decide each scored token's window; training compares them (check_scoring_flags)
        "scoring": scores.scoring_flags(cfg),
    }
    for d, (prefix, out, flat) in enumerate(zip(prefixes, outputs, flats)):
        manifest_d = dict(manifest, num_scored=int(np.isfinite(flat).sum()), num_scored_more_than_once=twice[d])
        scores.write_sidecar(out, prefix, flat, dtype, manifest_d)
        del flat
        Path(f"{out}.flat.npy").unlink()
    flats.clear()
    # Only once every sidecar is in place; one rename, so a rerun never finds half-deleted parts.
    trash = Path(f"{parts}.deleting")
    parts.replace(trash)
    shutil.rmtree(trash)


# ----------------------------------------------------------------------------------------------
# One epoch at most: a sidecar holds one score per token


def tokens_scored_twice(ds, used: np.ndarray) -> int:
    """How many label tokens megatron-core's GPTDataset ``ds`` gives more than once (in several windows) over its
    samples ``used``: 0 unless its document index spans several epochs. Exact, from ds's own indices: unshuffled
    sample k is the stretch [sample_index[k], sample_index[k+1]] of the documents in document_index order."""
    if ds.shuffle_index is None:  # indices memory-mapped lazily
        ds._query_document_sample_shuffle_indices(0)
    doc_index = np.asarray(ds.document_index)
    if len(doc_index) <= len(ds.indices) or not len(used):  # one epoch: every document once
        return 0
    extra = int(ds.config.add_extra_token_to_sequence)
    cum = np.concatenate([[0], np.cumsum(np.asarray(ds.dataset.sequence_lengths)[doc_index], dtype=np.int64)])
    sample_index = np.asarray(ds.sample_index).astype(np.int64)
    ks = np.unique(np.asarray(ds.shuffle_index)[np.asarray(used)].astype(np.int64))
    # consecutive samples are adjacent: a run of them covers one stretch [lo, hi) of label tokens
    breaks = np.flatnonzero(np.diff(ks) != 1) + 1
    first, last = ks[np.r_[0, breaks]], ks[np.r_[breaks - 1, len(ks) - 1]]
    lo = cum[sample_index[first, 0]] + sample_index[first, 1] + 1  # labels: the inputs shifted by one
    hi = cum[sample_index[last + 1, 0]] + sample_index[last + 1, 1] + extra
    # ... cut at document boundaries into (document, [start, stop) offsets)
    p_lo = np.searchsorted(cum, lo, side="right") - 1
    p_hi = np.searchsorted(cum, hi - 1, side="right") - 1
    counts = p_hi - p_lo + 1
    run = np.repeat(np.arange(len(lo)), counts)
    pos = p_lo[run] + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    start = np.maximum(lo[run], cum[pos]) - cum[pos]
    stop = np.minimum(hi[run], cum[pos + 1]) - cum[pos]
    doc = doc_index[pos].astype(np.int64)
    keep = stop > start
    doc, start, stop = doc[keep], start[keep], stop[keep]
    order = np.lexsort((start, doc))
    doc, start, stop = doc[order], start[order], stop[order]
    # the same document at two positions (two epochs): overlap of each stretch with the earlier ones of its
    # document, which (sorted by start) reach up to their running maximum stop
    width = int(stop.max()) + 1
    reach = np.maximum.accumulate(doc * width + stop)
    reach = np.r_[-1, reach[:-1]] - doc * width  # negative: no earlier stretch of this document
    return int(np.clip(np.minimum(stop, reach) - start, 0, None).sum())


def check_one_epoch(train, prefixes, cfg) -> None:
    """Refuse scoring samples that give some token of a dataset more than once (more than one epoch of it): its
    sidecar keeps one score per token, and training refuses such sidecars (check_scoring_flags)."""
    T, G, L = cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.seq_length
    n = T * G
    if hasattr(train, "datasets"):  # a BlendedDataset: which component sample each of the n samples is
        if train.dataset_index is None:
            train[0]
        ids, sids = np.asarray(train.dataset_index[:n]), np.asarray(train.dataset_sample_index[:n])
        used = [(ds, sids[ids == d]) for d, ds in enumerate(train.datasets)]
    else:
        used = [(train, np.arange(n))]
    problems = []
    for prefix, (ds, sample_ids) in zip(prefixes, used):
        twice = tokens_scored_twice(ds, sample_ids)
        if twice:
            epoch_tokens = int(np.asarray(ds.dataset.sequence_lengths)[ds.indices].sum())
            per_epoch = (epoch_tokens - int(ds.config.add_extra_token_to_sequence)) // L
            problems.append(
                f"dataset '{prefix}' ({len(sample_ids)} of its samples, but its training split holds "
                f"{per_epoch}: {twice} tokens would be scored again, in another window)"
            )
    if problems:
        raise DataError(
            f"scoring {T} x {G} = {n} samples goes over more than one epoch of {' and of '.join(problems)}; a score "
            "sidecar keeps one score per token, so offline SLM could not replay online SLM: score (and train) fewer "
            "samples, lower --train-iters or --global-batch-size so that no dataset gives more than one epoch, or add "
            "data; or train with --reference-mode online"
        )
