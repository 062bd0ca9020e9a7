"""The rules a config must satisfy (``validate`` reports every problem at once, each with its fix) and the
quantities derived from it: data-parallel size, padded vocabulary, LR decay steps, virtual pipeline size."""

from __future__ import annotations

import dataclasses
import math

from megatron_slm.config.device import has_fused_norm
from megatron_slm.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig, _flag_for, _get, _leaf_paths
from megatron_slm.errors import ConfigError


def _model_problems(
    m: ModelConfig, tp: int, pp: int, seq_length: int, who: str, flag: str, require_vocab: bool = True
) -> list[str]:
    problems = []
    required = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"]
    required += ["vocab_size"] if require_vocab else []
    missing = [n for n in required if getattr(m, n) is None]
    if missing:
        return [
            f"{who}: {', '.join(missing)} unset; set {flag}preset or {' '.join(flag + n.replace('_', '-') for n in missing)}"
        ]
    if m.num_query_groups is None:  # not resolved yet
        m = dataclasses.replace(m, num_query_groups=m.num_attention_heads)
    if m.num_attention_heads % tp:
        problems.append(
            f"{who}: num_attention_heads={m.num_attention_heads} is not divisible by "
            f"tensor_model_parallel_size={tp}; choose a TP size that divides it"
        )
    if m.num_query_groups % tp:
        problems.append(
            f"{who}: num_query_groups={m.num_query_groups} (KV heads) is not divisible by "
            f"tensor_model_parallel_size={tp}; choose a TP size that divides it"
        )
    if m.num_attention_heads % m.num_query_groups:
        problems.append(
            f"{who}: num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"num_query_groups={m.num_query_groups}"
        )
    if m.hidden_size % m.num_attention_heads:
        problems.append(
            f"{who}: hidden_size={m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}"
        )
    if m.ffn_hidden_size % tp:
        problems.append(f"{who}: ffn_hidden_size={m.ffn_hidden_size} is not divisible by TP={tp}")
    if m.num_layers % pp:
        problems.append(
            f"{who}: num_layers={m.num_layers} is not divisible by pipeline_model_parallel_size={pp}; "
            f"choose a PP size that divides it"
        )
    if m.max_position_embeddings is not None and seq_length > m.max_position_embeddings:
        problems.append(f"{who}: seq_length={seq_length} exceeds max_position_embeddings={m.max_position_embeddings}")
    return problems


def reference_in_memory(cfg: Config) -> bool:
    """Online SLM: the run hosts the reference model (offline SLM reads score sidecars; CLM has none)."""
    return cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "online"


def uses_offline_scores(cfg: Config) -> bool:
    return cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "offline"


def validate(
    cfg: Config, world_size: int | None = None, require_vocab: bool = True, check_reference: bool | None = None
) -> None:
    """Raise ConfigError listing every problem in ``cfg`` (and with ``world_size``, the layout).

    ``require_vocab=False``: the vocabulary is still to be read from the data (check-config without data).
    ``check_reference``: check the reference model's shape (default: when the run hosts it)."""
    problems = []
    par, slm, tr = cfg.parallel, cfg.slm, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        problems.append("tensor/pipeline_model_parallel_size must be >= 1")
        tp, pp = max(tp, 1), max(pp, 1)
    problems += _model_problems(cfg.model, tp, pp, tr.seq_length, "model", "--", require_vocab)
    if par.sequence_parallel and tp > 1 and not has_fused_norm():
        problems.append(
            "sequence_parallel needs TransformerEngine or Apex (megatron-core's torch norm refuses it); "
            "install one on the GPU machine or drop --sequence-parallel"
        )
    for path, f in _leaf_paths(cfg):
        choices, value = f.metadata.get("choices"), _get(cfg, path)
        if choices and value is not None and value not in choices:
            problems.append(f"{'.'.join(path)}={value!r}; use one of {', '.join(choices)} ({_flag_for(path)})")
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{'.'.join(path)}={value} is not a finite number ({_flag_for(path)})")
    if not (0.0 < slm.slm_select_ratio <= 1.0):
        problems.append(
            f"slm.slm_select_ratio (k) = {slm.slm_select_ratio} is outside (0, 1]; the paper uses 0.6 (1B) / 0.7 (7B)"
        )
    problems += _per_dataset_problems(cfg)
    if not (0.0 <= slm.slm_warn_selected_share <= 1.0):
        problems.append(f"slm.slm_warn_selected_share={slm.slm_warn_selected_share} must be in [0, 1] (0: never warn)")
    if not (0.0 <= slm.threshold_momentum < 1.0):
        problems.append(f"slm.threshold_momentum={slm.threshold_momentum} must be in [0, 1)")
    if reference_in_memory(cfg) if check_reference is None else check_reference:
        ref = cfg.reference.model
        policy_text = {p.split(": ", 1)[-1] for p in problems}
        problems += [  # a reference that inherits the policy's shape would repeat the policy's problems
            p
            for p in _model_problems(ref, tp, pp, tr.seq_length, "reference model", "--ref-", require_vocab)
            if p.split(": ", 1)[-1] not in policy_text
        ]
        if ref.vocab_size != cfg.model.vocab_size:
            problems.append(
                f"vocab mismatch: policy vocab_size={cfg.model.vocab_size}, reference vocab_size={ref.vocab_size}; "
                "the reference must share the policy's tokenizer"
            )
    if tr.micro_batch_size < 1 or tr.global_batch_size < 1 or tr.seq_length < 2:
        problems.append("micro_batch_size and global_batch_size must be >= 1 and seq_length >= 2")
    if tr.train_iters < 0:
        problems.append("train_iters must be >= 0")
    if tr.max_nonfinite_skips < 0:
        problems.append("max_nonfinite_skips must be >= 0")
    if cfg.checkpoint.override_opt_param_scheduler and cfg.checkpoint.use_checkpoint_opt_param_scheduler:
        problems.append("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    if tr.lr_warmup_iters < 0 or tr.lr < 0 or tr.min_lr < 0 or tr.min_lr > tr.lr:
        problems.append(f"need lr >= min_lr >= 0 and lr_warmup_iters >= 0 (lr={tr.lr}, min_lr={tr.min_lr})")
    problems += _recompute_problems(tr, cfg.model.num_layers, pp, par.num_layers_per_virtual_pipeline_stage)
    problems += _schedule_and_exit_problems(tr)
    if world_size is not None:
        try:
            dp = data_parallel_size(world_size, tp, pp)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            if tr.global_batch_size % (tr.micro_batch_size * dp):
                problems.append(
                    f"global_batch_size={tr.global_batch_size} is not divisible by micro_batch_size x data-parallel "
                    f"size = {tr.micro_batch_size} x {dp}; use a multiple of {tr.micro_batch_size * dp}"
                )
    if tr.deepspeed and pp != 1:
        problems.append(
            "--deepspeed runs with pipeline_model_parallel_size=1; for PP > 1 drop --deepspeed (megatron-core's optimizer)"
        )
    problems += _virtual_pipeline_problems(cfg, world_size, check_reference)
    problems += _ddp_problems(par, tr)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _recompute_problems(tr: TrainConfig, num_layers: int | None, pp: int, per_virtual_stage: int | None) -> list[str]:
    """megatron-core's TransformerConfig rules for activation recomputation (it raises ValueError or IndexError
    otherwise), one line each with the fix."""
    gran, method, n = tr.recompute_granularity, tr.recompute_method, tr.recompute_num_layers
    if gran is None:
        if method is not None or n is not None:
            return ["--recompute-method/--recompute-num-layers need --recompute-granularity full; add it or drop them"]
        return []
    if gran == "selective":
        if method is not None or n is not None:
            return [
                "--recompute-granularity selective recomputes the core attention of every layer; "
                "--recompute-method/--recompute-num-layers apply to full only: drop them"
            ]
        return []
    if gran != "full":
        return []  # reported with the choices
    if method is None or n is None:
        return [
            "--recompute-granularity full needs both --recompute-method uniform|block and "
            "--recompute-num-layers N (e.g. --recompute-method uniform --recompute-num-layers 1)"
        ]
    per_stage = per_virtual_stage or (num_layers // pp if num_layers and num_layers % pp == 0 else None)
    if n < 1 or (per_stage and n > per_stage):
        return [
            f"--recompute-num-layers {n} must be between 1 and the layers per pipeline stage"
            f"{f' ({per_stage})' if per_stage else ''}"
        ]
    if method == "uniform" and per_stage and per_stage % n:
        return [
            f"--recompute-method uniform checkpoints groups of --recompute-num-layers {n} layers, which must "
            f"divide the layers per pipeline stage ({per_stage}); use a divisor, or --recompute-method block"
        ]
    return []


def virtual_pipeline_size(par: ParallelConfig, num_layers: int) -> int | None:
    """Model chunks per pipeline rank with --num-layers-per-virtual-pipeline-stage (None: not interleaved)."""
    per = par.num_layers_per_virtual_pipeline_stage
    if per is None:
        return None
    return num_layers // (par.pipeline_model_parallel_size * per)


def _virtual_pipeline_problems(cfg: Config, world_size: int | None, check_reference: bool | None) -> list[str]:
    """The interleaved (virtual pipeline) schedule's rules in megatron-core 0.16, one line each with the fix."""
    par, tr = cfg.parallel, cfg.train
    per, pp = par.num_layers_per_virtual_pipeline_stage, max(par.pipeline_model_parallel_size, 1)
    if per is None:
        return []
    if per < 1:
        return [f"--num-layers-per-virtual-pipeline-stage {per} must be >= 1 (or unset it)"]
    problems = []
    if pp < 2:
        problems.append(
            "--num-layers-per-virtual-pipeline-stage needs a pipeline: set --pipeline-model-parallel-size "
            ">= 2 or drop it"
        )
    layers = cfg.model.num_layers
    if layers and layers % (pp * per):
        problems.append(
            f"model: num_layers={layers} is not divisible by pipeline_model_parallel_size x "
            f"num_layers_per_virtual_pipeline_stage = {pp} x {per}; change one of them"
        )
    elif layers and pp >= 2 and layers // (pp * per) < 2:
        problems.append(
            f"model: {layers} layers at PP={pp} with {per} per virtual stage make one chunk per rank; "
            "lower --num-layers-per-virtual-pipeline-stage or drop it"
        )
    elif layers and (reference_in_memory(cfg) if check_reference is None else check_reference):
        # the reference runs interleaved too, with the policy's chunks per rank
        chunks, ref_layers = layers // (pp * per), cfg.reference.model.num_layers
        if ref_layers and ref_layers % (pp * chunks):
            problems.append(
                f"reference model: num_layers={ref_layers} is not divisible by PP x the policy's chunks per "
                f"rank = {pp} x {chunks} (it runs interleaved with the same chunks); give the reference "
                "a multiple of that many layers or change --num-layers-per-virtual-pipeline-stage"
            )
    if tr.deepspeed:
        problems.append("--deepspeed has no interleaved pipeline: drop --num-layers-per-virtual-pipeline-stage")
    if world_size is not None and pp >= 2:
        try:
            dp = data_parallel_size(world_size, max(par.tensor_model_parallel_size, 1), pp)
        except ConfigError:
            dp = None  # reported by validate
        if dp and tr.micro_batch_size >= 1 and tr.global_batch_size % (tr.micro_batch_size * dp) == 0:
            m = tr.global_batch_size // (tr.micro_batch_size * dp)
            if m % pp:
                problems.append(
                    f"the interleaved schedule needs the number of micro-batches (global_batch_size / "
                    f"(micro_batch_size x DP) = {m}) to be a multiple of PP={pp}; use a global_batch_size "
                    f"that is a multiple of {tr.micro_batch_size * dp * pp}"
                )
    return problems


def lr_decay_steps(tr: TrainConfig) -> int:
    """The steps over which the LR decays: --lr-decay-iters, else --train-iters (at least warm-up + 1)."""
    if tr.lr_decay_iters is not None:
        return tr.lr_decay_iters
    return max(tr.train_iters, tr.lr_warmup_iters + 1)


def _schedule_and_exit_problems(tr: TrainConfig) -> list[str]:
    problems = []
    if tr.lr_decay_iters is not None and tr.lr_decay_iters <= max(tr.lr_warmup_iters, 0):
        problems.append(
            f"--lr-decay-iters {tr.lr_decay_iters} must exceed --lr-warmup-iters {tr.lr_warmup_iters} "
            "(the decay runs after the warm-up); raise it or shorten the warm-up"
        )
    if tr.lr_decay_style == "WSD":
        decay = lr_decay_steps(tr)
        if tr.lr_wsd_decay_iters is None:
            problems.append(
                "--lr-decay-style WSD needs --lr-wsd-decay-iters N (the final steps of the decay window "
                f"in which the LR anneals; at most {decay})"
            )
        elif not 1 <= tr.lr_wsd_decay_iters <= decay:
            problems.append(
                f"--lr-wsd-decay-iters {tr.lr_wsd_decay_iters} must be between 1 and the decay iterations "
                f"({decay}: --lr-decay-iters, else --train-iters)"
            )
    elif tr.lr_wsd_decay_iters is not None:
        problems.append(
            f"--lr-wsd-decay-iters applies to --lr-decay-style WSD only (not {tr.lr_decay_style}); "
            "drop it or use --lr-decay-style WSD"
        )
    if tr.exit_duration_in_mins is not None and tr.exit_duration_in_mins <= 0:
        problems.append(f"--exit-duration-in-mins {tr.exit_duration_in_mins} must be > 0 (unset: no time limit)")
    if tr.exit_interval is not None and tr.exit_interval < 1:
        problems.append(f"--exit-interval {tr.exit_interval} must be >= 1 (unset: no exit interval)")
    return problems


def _ddp_problems(par: ParallelConfig, tr: TrainConfig) -> list[str]:
    """Distributed optimizer and communication overlap (megatron-core's DDP), one line each with the fix."""
    problems = []
    if tr.deepspeed and par.use_distributed_optimizer:
        problems.append(
            "--use-distributed-optimizer is megatron-core's; with --deepspeed ZeRO (its config's "
            "zero_optimization.stage) shards the optimizer: drop one of them"
        )
    if tr.deepspeed and (par.overlap_grad_reduce or par.overlap_param_gather or par.ddp_bucket_size is not None):
        problems.append(
            "--overlap-grad-reduce/--overlap-param-gather/--ddp-bucket-size configure megatron-core's DDP; "
            "with --deepspeed set overlap_comm and the bucket sizes in its JSON config instead"
        )
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        problems.append(
            "--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: add "
            "--use-distributed-optimizer or drop it"
        )
    if par.ddp_bucket_size is not None and par.ddp_bucket_size < 1:
        problems.append(
            f"--ddp-bucket-size {par.ddp_bucket_size} must be >= 1 elements (unset: megatron-core's default)"
        )
    elif par.ddp_bucket_size is not None and not par.overlap_grad_reduce and not tr.deepspeed:
        problems.append(
            "--ddp-bucket-size splits the reduction into buckets only with --overlap-grad-reduce "
            "(megatron-core reduces one whole buffer otherwise): add it or drop the size"
        )
    return problems


def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """World size = TP x PP x DP: the data-parallel size, or the error that names the fix."""
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; launch a multiple of {tp * pp} processes"
        )
    return world_size // (tp * pp)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab padded so each TP shard is equal and a multiple of ``divisible_by`` (as Megatron does)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _per_dataset_problems(cfg) -> list[str]:
    """--slm-select-ratio-per-dataset: one k in (0, 1] per --data-path dataset."""
    ks = cfg.slm.slm_select_ratio_per_dataset
    if not ks:
        return []
    flag = "--slm-select-ratio-per-dataset"
    problems = []
    values = []
    for k in ks:
        try:
            values.append(float(k))
        except ValueError:
            problems.append(f"{flag}: {k!r} is not a number; give one k in (0, 1] per --data-path dataset")
    problems += [f"{flag}: k={k} is outside (0, 1]" for k in values if not (0.0 < k <= 1.0)]
    if cfg.slm.loss_mode != "slm":
        problems.append(f"{flag} selects tokens: it needs --loss-mode slm")
    if cfg.data.data_path:
        from megatron_slm.data.blend import parse_blend

        prefixes = parse_blend(cfg.data.data_path)[0]
        if len(prefixes) != len(ks):
            problems.append(
                f"{flag} has {len(ks)} value(s) but --data-path has {len(prefixes)} dataset(s) "
                f"({', '.join(prefixes)}); give one k per dataset, in the same order"
            )
    return problems
