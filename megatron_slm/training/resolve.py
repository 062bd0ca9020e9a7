"""Resolving a run, once: the draft config (flags, YAML) plus what the run's files say, into a frozen config.

``slm train``, ``slm check-config`` and ``slm score-reference`` all call ``resolve_run``; it is the only code that
fills in or changes config values after loading, in this order:

1. the resume source (``--load``, else a ``--save`` that holds a checkpoint) and its iteration;
2. the policy's architecture from the checkpoint it starts from (the resumed run, else
   ``--pretrained-checkpoint``) and the reference's from ``--ref-load``: fields the user set must agree;
3. the data: one tokenizer and vocabulary across datasets (``vocab_size`` taken from it when unset), each
   checkpoint's tokenizer against the data's, the split, the offline score sidecars, the DeepSpeed config;
4. the optimizer and LR-schedule settings of a resumed run, by the resume table (``RESUME_TABLE``): refused
   when they differ, unless ``--override-opt-param-scheduler`` (this run's values, applied to the optimizer
   and the schedule from the next step on) or ``--use-checkpoint-opt-param-scheduler`` (the checkpoint's values
   become this run's);
5. ``validate`` with the world size.

The result is a ``ResolvedRun`` whose ``config`` is frozen: later code reads it and never writes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_slm.config import (
    Config,
    TrainConfig,
    draft_copy,
    freeze,
    is_frozen,
    lr_decay_steps,
    reference_in_memory,
    uses_offline_scores,
    validate,
)
from megatron_slm.errors import CheckpointError, ConfigError
from megatron_slm.log import get_logger

log = get_logger(__name__)

# The resume table: every optimizer and LR-schedule setting a checkpoint records. On resume a value that differs
# from the checkpoint's is refused by default (naming it); --override-opt-param-scheduler runs this run's value
# from the next step on (the LR schedule and the optimizer's param groups: lr, betas, eps, weight decay), and
# --use-checkpoint-opt-param-scheduler takes the checkpoint's value into this run's config. The decay length
# compares as iterations: --lr-decay-iters when set, else --train-iters.
RESUME_TABLE = (
    # (config field of train:, flag)
    ("lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("lr_warmup_iters", "--lr-warmup-iters"),
    ("lr_decay_style", "--lr-decay-style"),
    ("lr_decay_iters", "--lr-decay-iters"),  # the effective decay length, see _decay_flag
    ("lr_wsd_decay_iters", "--lr-wsd-decay-iters"),
    ("lr_wsd_decay_style", "--lr-wsd-decay-style"),
    ("weight_decay", "--weight-decay"),
    ("adam_beta1", "--adam-beta1"),
    ("adam_beta2", "--adam-beta2"),
    ("adam_eps", "--adam-eps"),
    ("clip_grad", "--clip-grad"),
)


@dataclass(frozen=True)
class Resume:
    """Where a run resumes from and what the resume decided about the optimizer and schedule settings."""

    source: str  # the --load / --save directory as given
    path: Path  # the iteration directory that loads
    iteration: int
    flag: str  # --load or --save
    changed: dict  # flag -> (this run's value, the checkpoint's value), for the settings that differ
    decision: str  # "same", "override" (this run's values) or "checkpoint" (the checkpoint's values)


@dataclass(frozen=True)
class ResolvedRun:
    config: Config  # frozen
    data: Any = None  # the data's TokenInfo (None without --data-path)
    offline_scores: Any = None  # OfflineScores with --reference-mode offline
    resume: Resume | None = None

    @property
    def tokenizer_fingerprints(self) -> tuple:
        return (self.data.fingerprint,) if self.data is not None and self.data.fingerprint else ()


def resolve_run(
    draft: Config, world_size: int | None = None, require_data: bool = True, scoring: bool = False
) -> ResolvedRun:
    """The one resolution of a run (see the module docstring). ``draft`` is not changed.

    ``require_data=False`` (check-config, library use without data): the data checks run only when --data-path is
    given. ``scoring``: a ``slm score-reference`` run, which hosts the reference only (no policy, no resume)."""
    from megatron_slm.parallel.distributed import world_size as env_world_size

    if is_frozen(draft):
        raise ConfigError("this config is already resolved; resolve the draft it came from")
    cfg = draft_copy(draft)
    world_size = world_size or env_world_size()
    resume = None if scoring else _resume_source(cfg)
    if resume is not None:
        policy_source, policy_flag = resume.source, resume.flag
    else:
        policy_source = None if scoring else cfg.checkpoint.pretrained_checkpoint
        policy_flag = "--pretrained-checkpoint"
    hosts_reference = scoring or reference_in_memory(cfg)
    reference = cfg.reference.load if hosts_reference else None
    if scoring and not reference:
        raise ConfigError("scoring needs the reference weights: --ref-load CHECKPOINT_DIR")

    if policy_source:
        _adopt_architecture(cfg, ("model",), policy_source, f"the policy's checkpoint ({policy_flag} {policy_source})")
    if reference:
        _adopt_architecture(
            cfg, ("reference", "model"), reference, f"the reference checkpoint (--ref-load {reference})", "--ref-"
        )
    info, scores = _check_data(
        cfg,
        policy_source,
        policy_flag,
        reference,
        require_data,
        world_size,
        offline_scores=uses_offline_scores(cfg) and not scoring,
    )
    if resume is not None:
        _check_resume_format(cfg, resume)
        resume = _resolve_optimizer_settings(cfg, resume)
    validate(
        cfg,
        world_size=world_size,
        require_vocab=require_data or bool(cfg.data.data_path),
        check_reference=True if scoring else None,
    )
    freeze(cfg)
    return ResolvedRun(config=cfg, data=info, offline_scores=scores, resume=resume)


def _resume_source(cfg: Config) -> Resume | None:
    from megatron_slm import checkpoint

    ck = cfg.checkpoint
    source = checkpoint.resume_source(ck)
    if source is None:
        if ck.load:
            raise CheckpointError(
                f"--load {ck.load}: no training checkpoint there (no {checkpoint.LATEST}); check "
                "the path, or drop --load to start fresh"
            )
        return None
    path = checkpoint.resolve(source)
    state = checkpoint.read_trainer_state(path)
    return Resume(
        source=source,
        path=path,
        iteration=int(state["iteration"]),
        flag="--load" if ck.load else "--save",
        changed={},
        decision="same",
    )


def _adopt_architecture(cfg: Config, section: tuple, source: str, who: str, flag_prefix: str = "--") -> None:
    """The model config at ``section`` takes the architecture a checkpoint was saved with: fields the user set
    must equal it (else one error listing each field with both values), the others are taken from it."""
    from megatron_slm.checkpoint import ARCH_FIELDS, architecture_differences, read_model_config

    model = cfg.model if section == ("model",) else cfg.reference.model
    try:
        saved = read_model_config(source)
    except CheckpointError as exc:
        raise CheckpointError(f"{who}: {exc}") from None
    explicit = {f for f in ARCH_FIELDS + ("max_position_embeddings",) if cfg.is_explicit(section + (f,))}
    conflicts = {f: v for f, v in architecture_differences(model, saved).items() if f in explicit}
    if conflicts:
        raise ConfigError(
            f"{who} was saved with another architecture than configured: "
            + "; ".join(
                f"{flag_prefix}{f.replace('_', '-')} {mine} (config) vs {theirs} (checkpoint)"
                for f, (mine, theirs) in conflicts.items()
            )
            + "; drop those settings to take the checkpoint's values, or load a checkpoint of this architecture"
        )
    for f in ARCH_FIELDS + ("max_position_embeddings",):
        if f not in explicit and getattr(saved, f) is not None:
            setattr(model, f, getattr(saved, f))


def _check_data(
    cfg: Config, policy_source, policy_flag, reference, require_data: bool, world_size: int, offline_scores: bool
):
    """The tokenizer file, the DeepSpeed config, then the data (vocabulary, token ids, split), each checkpoint's
    tokenizer against the data's and the score sidecars. Fills ``vocab_size`` from the data when unset."""
    from megatron_slm.checkpoint.weights import check_tokenizer
    from megatron_slm.data.datasets import check_split, parse_blend, token_info

    fingerprint = None
    if cfg.data.tokenizer_model:
        from megatron_slm.data.tokenizer import load_tokenizer

        fingerprint = load_tokenizer(cfg.data.tokenizer_model).fingerprint
    if cfg.train.deepspeed:
        from megatron_slm.config import data_parallel_size
        from megatron_slm.training.deepspeed_backend import load_ds_config

        par = cfg.parallel
        load_ds_config(
            cfg.train.deepspeed,
            cfg,
            data_parallel_size(world_size, par.tensor_model_parallel_size, par.pipeline_model_parallel_size),
        )
    if not (require_data or cfg.data.data_path):
        return None, None
    info = token_info(
        [parse_blend(cfg.data.data_path), parse_blend(cfg.data.valid_data_path)], cfg.model.vocab_size, fingerprint
    )
    check_split(cfg.data, dataset_sizes(cfg))
    for m in (cfg.model, cfg.reference.model):
        if m.vocab_size is None:
            m.vocab_size = info.vocab_size
    for who, source in (
        (f"the policy's checkpoint ({policy_flag} {policy_source})", policy_source),
        (f"the reference checkpoint (--ref-load {reference})", reference),
    ):
        if source:
            check_tokenizer(source, who, info.fingerprint)
    scores = None
    if offline_scores:
        from megatron_slm.data.scores import OfflineScores

        scores = OfflineScores(parse_blend(cfg.data.data_path)[0], cfg.reference.scores_path, cfg)
    return info, scores


def dataset_sizes(cfg: Config) -> list[int]:
    """Samples requested from megatron-core per split: what training consumes (and scoring must match)."""
    G = cfg.train.global_batch_size
    return [cfg.train.train_iters * G, cfg.train.eval_iters * G, 0]


def _check_resume_format(cfg: Config, resume: Resume) -> None:
    """The optimizer state's format must be the one this run restores: megatron-core's distributed optimizer has
    its own (it resumes at any DP size, only with the setting it was written with), DeepSpeed its engine files."""
    from megatron_slm.checkpoint import recorded_config

    recorded = recorded_config(resume.path)
    saved_dopt = bool((recorded.get("parallel") or {}).get("use_distributed_optimizer", False))
    if saved_dopt != cfg.parallel.use_distributed_optimizer:
        how = "with" if saved_dopt else "without"
        raise CheckpointError(
            f"'{resume.path}' was written {how} --use-distributed-optimizer, whose optimizer state has another "
            f"format; resume {how} it (any DP size), or start a new run from its weights with --pretrained-checkpoint"
        )
    saved_ds = bool((recorded.get("train") or {}).get("deepspeed"))
    if saved_ds != bool(cfg.train.deepspeed):
        how = "with" if saved_ds else "without"
        raise CheckpointError(
            f"'{resume.path}' was written {how} --deepspeed, whose optimizer state has another format; resume {how} "
            "it, or start a new run from its weights with --pretrained-checkpoint"
        )


def _saved_train_config(resume: Resume) -> TrainConfig:
    """The checkpoint's train: section (what its optimizer and schedule ran with)."""
    from megatron_slm.checkpoint import recorded_config

    saved = recorded_config(resume.path).get("train") or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def _setting(tr: TrainConfig, field: str):
    if field == "lr_decay_iters":
        return lr_decay_steps(tr)
    if field in ("lr_wsd_decay_iters", "lr_wsd_decay_style") and tr.lr_decay_style != "WSD":
        return None  # not used by the other decay styles
    return getattr(tr, field)


def _decay_flag(tr: TrainConfig) -> str:
    return "--lr-decay-iters" if tr.lr_decay_iters is not None else "--train-iters"


def _same(a, b) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))


def _resolve_optimizer_settings(cfg: Config, resume: Resume) -> Resume:
    """Apply the resume table to ``cfg.train`` (see RESUME_TABLE)."""
    tr, ck = cfg.train, cfg.checkpoint
    saved = _saved_train_config(resume)
    changed = {}
    for field, flag in RESUME_TABLE:
        now, then = _setting(tr, field), _setting(saved, field)
        if not _same(now, then):
            changed[_decay_flag(tr) if field == "lr_decay_iters" else flag] = (now, then)
    if not changed:
        return resume
    listed = ", ".join(f"{flag} {now} (checkpoint: {then})" for flag, (now, then) in changed.items())
    if ck.use_checkpoint_opt_param_scheduler:  # the checkpoint's values become this run's
        for field, _ in RESUME_TABLE:
            if field == "lr_decay_iters":
                if lr_decay_steps(tr) != lr_decay_steps(saved):
                    tr.lr_decay_iters = lr_decay_steps(saved)
            else:
                setattr(tr, field, getattr(saved, field))
        log.info(f"resume: keeping the checkpoint's optimizer and LR schedule settings ({listed})")
        return dataclasses.replace(resume, changed=changed, decision="checkpoint")
    if ck.override_opt_param_scheduler:
        log.info(
            f"resume: this run's optimizer and LR schedule settings replace the checkpoint's from the next step "
            f"on ({listed})"
        )
        return dataclasses.replace(resume, changed=changed, decision="override")
    raise ConfigError(
        f"resuming with optimizer or schedule settings that differ from the checkpoint's: {listed}. Pass "
        "--override-opt-param-scheduler to run this run's values from here on, or --use-checkpoint-opt-param-scheduler "
        "to keep the checkpoint's (or restore the flags)"
    )
