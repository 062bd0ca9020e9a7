"""Assembling a run from its config: input checks, data, the trainer, the run summary.

``slm train`` (megatron_slm.cli) calls ``run_train`` on every rank; ``slm score-reference`` and
``slm check-config`` share ``check_inputs`` so all three refuse the same bad inputs the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_slm.config import Config, explicitly_set, reference_in_memory, uses_offline_scores
from megatron_slm.errors import CheckpointError, ConfigError, DataError, DivergenceError
from megatron_slm.log import get_logger

log = get_logger(__name__)


def adopt_architecture(cfg: Config, section: tuple, source: str, who: str, flag_prefix: str = "--") -> None:
    """The model config at ``section`` takes the architecture a checkpoint was saved with: fields the user set
    must equal it (else one error listing each field with both values), the others are taken from it."""
    from megatron_slm.checkpoint import ARCH_FIELDS, architecture_differences, read_model_config

    model = cfg.model if section == ("model",) else cfg.reference.model
    try:
        saved = read_model_config(source)
    except CheckpointError as exc:
        raise CheckpointError(f"{who}: {exc}") from None
    explicit = {path[-1] for path in explicitly_set(cfg) if path[:-1] == section}
    conflicts = {f: v for f, v in architecture_differences(model, saved).items() if f in explicit}
    if conflicts:
        raise ConfigError(
            f"{who} was saved with another architecture than configured: "
            + "; ".join(f"{flag_prefix}{f.replace('_', '-')} {mine} (config) vs {theirs} (checkpoint)"
                        for f, (mine, theirs) in conflicts.items())
            + "; drop those settings to take the checkpoint's values, or load a checkpoint of this architecture")
    for f in ARCH_FIELDS + ("max_position_embeddings",):
        if f not in explicit and getattr(saved, f) is not None:
            setattr(model, f, getattr(saved, f))


def check_tokenizer(source: str, who: str, data_fingerprint: str | None) -> None:
    """A checkpoint must have been trained with the tokenizer the data was made with (same vocabulary size is
    not the same tokenizer): refused when both fingerprints are known and differ."""
    from megatron_slm.checkpoint import tokenizer_fingerprints

    known = tokenizer_fingerprints(source)
    if not known or data_fingerprint is None:
        log.warning(f"{who} records no tokenizer fingerprint (or the data none): cannot verify it "
                    "belongs to the data's tokenizer")
        return
    if data_fingerprint not in known:
        raise DataError(
            f"{who} was trained with another tokenizer (sha256 {', '.join(sorted(k[:12] for k in known))}) "
            f"than the data was made with ({data_fingerprint[:12]}); its token losses would be about other tokens. "
            "Use a checkpoint of the data's tokenizer, or re-tokenize the data with the checkpoint's")


def check_inputs(cfg: Config, reference: str | None, offline_scores: bool, policy_source: str | None = None,
                 require_data: bool = True, world_size: int | None = None, policy_flag: str = "--load"):
    """Every check that needs only files, before any process group starts, in the order the run uses them:
    the architecture of the policy's checkpoint (``policy_source``: the run resumed, else the pretrained
    weights) and of ``reference`` (the reference checkpoint this run loads, or None) against the config, the
    data (vocabulary, token ids, tokenizer file), each checkpoint's tokenizer against the data's, and with
    ``offline_scores`` the score sidecars of ``data_path``, and the DeepSpeed config. Fills what the config
    leaves unset (architecture from the checkpoints, vocab_size from the data). ``require_data=False``
    (check-config) skips the data checks when no --data-path is given. Returns the data's TokenInfo (None
    without data) and the sidecars (or None)."""
    from megatron_slm.data.datasets import check_split, parse_blend, token_info

    if policy_source:
        adopt_architecture(cfg, ("model",), policy_source, f"the policy's checkpoint ({policy_flag} {policy_source})")
    if reference:
        adopt_architecture(cfg, ("reference", "model"), reference, f"the reference checkpoint (--ref-load {reference})",
                           "--ref-")
    fingerprint = None
    if cfg.data.tokenizer_model:
        from megatron_slm.data.tokenizer import load_tokenizer

        fingerprint = load_tokenizer(cfg.data.tokenizer_model).fingerprint
    if cfg.train.deepspeed:
        from megatron_slm.config import data_parallel_size
        from megatron_slm.training.deepspeed_backend import load_ds_config

        par = cfg.parallel
        dp = data_parallel_size(world_size or 1, par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
        load_ds_config(cfg.train.deepspeed, cfg, dp)
    if not (require_data or cfg.data.data_path):
        return None, None
    info = token_info([parse_blend(cfg.data.data_path), parse_blend(cfg.data.valid_data_path)],
                      cfg.model.vocab_size, fingerprint)
    check_split(cfg.data, dataset_sizes(cfg))
    for m in (cfg.model, cfg.reference.model):
        if m.vocab_size is None:
            m.vocab_size = info.vocab_size
    for who, source in ((f"the policy's checkpoint ({policy_flag} {policy_source})", policy_source),
                        (f"the reference checkpoint (--ref-load {reference})", reference)):
        if source:
            check_tokenizer(source, who, info.fingerprint)
    scores = None
    if offline_scores:
        from megatron_slm.data.scores import OfflineScores

        scores = OfflineScores(parse_blend(cfg.data.data_path)[0], cfg.reference.scores_path, cfg)
    return info, scores


def check_run_inputs(cfg: Config, require_data: bool = True, world_size: int | None = None):
    """``check_inputs`` for a training run as configured (``slm train`` and ``slm check-config``)."""
    from megatron_slm.checkpoint import resume_source
    from megatron_slm.parallel.distributed import world_size as env_world_size

    resumed = resume_source(cfg.checkpoint)
    policy_source = resumed or cfg.checkpoint.pretrained_checkpoint
    flag = ("--load" if cfg.checkpoint.load else "--save") if resumed else "--pretrained-checkpoint"
    return check_inputs(cfg, cfg.reference.load if reference_in_memory(cfg) else None, uses_offline_scores(cfg),
                        policy_source, require_data, world_size or env_world_size(), flag)


def dataset_sizes(cfg: Config) -> list[int]:
    """Samples requested from megatron-core per split: what training consumes (and scoring must match)."""
    G = cfg.train.global_batch_size
    return [cfg.train.train_iters * G, cfg.train.eval_iters * G, 0]


def build_data(cfg: Config, info, dp_rank: int, dp_size: int, offline_scores=None):
    """Step -> this rank's micro-batches (with offline scores attached when configured), and eval batches."""
    from megatron_slm.data.batches import micro_batches
    from megatron_slm.data.datasets import build_datasets, dataset_config

    tr = cfg.train
    G, b = tr.global_batch_size, tr.micro_batch_size
    ds_cfg = dataset_config(cfg.data, tr.seq_length, tr.seed, info)
    sizes = dataset_sizes(cfg)
    train, valid, _ = build_datasets(ds_cfg, sizes)
    positions = build_datasets(ds_cfg, sizes, positions=True)[0] if offline_scores is not None else None

    def train_batches(step):
        mbs = micro_batches(train, step, G, b, dp_rank, dp_size)
        if positions is not None:
            offline_scores.attach(mbs, micro_batches(positions, step, G, b, dp_rank, dp_size))
        return mbs

    eval_batches = None
    if valid is not None and len(valid) >= G:
        n_eval = min(tr.eval_iters, len(valid) // G)

        def eval_batches():
            return [micro_batches(valid, i, G, b, dp_rank, dp_size) for i in range(n_eval)]

    return train_batches, eval_batches


def _run_history(cfg: Config, trainer, history: list[dict]) -> list[dict]:
    """Every step of the run so far, one row per iteration: from ``<save>/metrics.jsonl`` (so a resumed run's
    summary covers its earlier segments; a step repeated after a crash keeps its last row), else this process's
    in-memory history."""
    path = Path(cfg.checkpoint.save or "") / "metrics.jsonl"
    if not (cfg.checkpoint.save and path.is_file()):
        return history
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if row.get("split") == "train" and row.get("iteration", 0) <= trainer.iteration:
            rows[row["iteration"]] = {k: math.nan if v is None else v for k, v in row.items()}  # null was NaN
    return [rows[i] for i in sorted(rows)] or history


def _finite_or_none(x):
    """JSON has no NaN/inf: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x


def summarize(cfg: Config, trainer, result: dict) -> dict | None:
    """The run's summary (last stage), over the whole run including earlier segments of a resumed one: final and
    second-half mean statistics, eval loss, selected share per blended dataset, non-finite steps."""
    history = _run_history(cfg, trainer, result["history"]) if trainer.is_last_stage else []
    if not history:
        return None
    keys = [k for k in history[-1] if isinstance(history[-1][k], (int, float)) and k != "iteration"
            and not k.startswith(("selected_tokens_ds", "valid_tokens_ds"))]
    tail = history[len(history) // 2:] or history  # the second half: past warm-up
    selective = trainer.selective
    by_dataset = None
    if selective and any("valid_tokens_ds0" in h for h in history):
        sel = [sum(h.get(f"selected_tokens_ds{i}", 0.0) for h in history) for i in range(trainer.num_datasets)]
        val = [sum(h.get(f"valid_tokens_ds{i}", 0.0) for h in history) for i in range(trainer.num_datasets)]
        by_dataset = [s / v if v else None for s, v in zip(sel, val)]
    return _finite_or_none({
        "loss_mode": cfg.slm.loss_mode,
        "selection_scope": cfg.slm.selection_scope if selective else None,
        "k": cfg.slm.slm_select_ratio if selective else 1.0,
        "iterations": trainer.iteration,
        "stopped_by": result.get("stopped_by"),
        "nonfinite_steps": result.get("nonfinite_steps", []),
        "eval_loss": result.get("eval_loss"),
        "final": {k: history[-1][k] for k in keys},
        "mean_second_half": {k: sum(h.get(k, math.nan) for h in tail) / len(tail) for k in keys},
        "data_path": cfg.data.data_path,
        "selected_fraction_by_dataset": by_dataset,
        "parallel": {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                     "dp": trainer.dp_size},
    })


def run_train(cfg: Config) -> dict:
    """Train one model as configured (called on every rank). Returns the summary on every rank."""
    import torch.distributed as dist

    from megatron_slm.training.trainer import Trainer, broadcast_from_last

    info, offline_scores = check_run_inputs(cfg)
    trainer = Trainer(cfg, tokenizer_fingerprints=[info.fingerprint])
    trainer.resume()
    train_batches, eval_batches = build_data(cfg, info, trainer.dp_rank, trainer.dp_size, offline_scores)
    result = trainer.train(train_batches, eval_batches)
    summary = broadcast_from_last(summarize(cfg, trainer, result))
    if cfg.checkpoint.save and dist.get_rank() == 0 and summary is not None:  # a rerun with nothing to add keeps it
        from megatron_slm.checkpoint import write_atomic

        write_atomic(Path(cfg.checkpoint.save) / "summary.json", json.dumps(summary, indent=2))
    if result.get("stopped_by") == "non-finite":
        steps = result["nonfinite_steps"]
        raise DivergenceError(
            f"training stopped at iteration {trainer.iteration}: non-finite loss or gradient norm at step(s) "
            f"{', '.join(map(str, steps[-10:]))} (--on-nonfinite {cfg.train.on_nonfinite}, --max-nonfinite-skips "
            f"{cfg.train.max_nonfinite_skips}); nothing of it was saved, the latest checkpoint is unchanged. Lower "
            "--lr or check the data, then rerun to resume from the latest checkpoint")
    return summary
