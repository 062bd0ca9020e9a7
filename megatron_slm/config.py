"""One config tree for every run: dataclasses, a YAML file, and Megatron-style command-line overrides.

A YAML file mirrors the tree (``model:``, ``reference:``, ``parallel:``, ``slm:``, ``train:``, ``data:``,
``checkpoint:``). Every leaf can be overridden on the command line by its Megatron-style name, e.g.
``--tensor-model-parallel-size 2 --num-layers 4 --slm-select-ratio 0.7``; leaves under ``reference:`` take a
``ref-`` prefix (``--ref-num-layers 2``, ``--ref-load DIR``). ``validate`` reports every problem at once, each with its fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_slm.errors import ConfigError
from megatron_slm.log import LEVELS as LOG_LEVELS




# Choices of the enumerated fields (also the argparse ``choices``).
SELECTION_SCOPES = ("sequence", "micro_batch", "global_batch", "threshold")
SELECTION_STRATEGIES = ("topk", "random")  # random: the same count on random tokens (a control)
LOSS_MODES = ("slm", "clm")
REFERENCE_MODES = ("online", "offline")
REFERENCE_DTYPES = ("auto", "fp32", "bf16")
NONFINITE_POLICIES = ("skip", "stop")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine")
SCORE_DTYPES = ("fp32", "bf16")  # slm score-reference --dtype: how the sidecar stores the scores


def _opt(default, help: str, choices: tuple | None = None):
    """A config leaf: its default, help text and (optionally) its fixed set of values, for YAML and the CLI."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _presets() -> tuple:
    from megatron_slm.model.presets import PRESETS

    return tuple(PRESETS)


@dataclass
class ModelConfig:
    """A Llama/Mistral-family decoder (RMSNorm, SwiGLU, RoPE, GQA). Unset shape fields come from ``preset``."""

    preset: Optional[str] = _opt(None, "named model shape that fills the unset fields below", _presets())
    num_layers: Optional[int] = _opt(None, "transformer layers")
    hidden_size: Optional[int] = _opt(None, "hidden size")
    ffn_hidden_size: Optional[int] = _opt(None, "SwiGLU inner size")
    num_attention_heads: Optional[int] = _opt(None, "attention heads")
    num_query_groups: Optional[int] = _opt(None, "GQA key/value heads (unset: num_attention_heads)")
    vocab_size: Optional[int] = _opt(None, "the tokenizer's vocabulary (unset: read from the data's metadata); "
                                           "padded internally for TP")
    max_position_embeddings: Optional[int] = _opt(None, "longest sequence the model is built for")
    rotary_base: Optional[float] = _opt(None, "RoPE theta (unset: preset, else 10000)")
    norm_epsilon: Optional[float] = _opt(None, "RMSNorm epsilon (unset: preset, else 1e-5)")
    untie_embeddings_and_output_weights: Optional[bool] = _opt(
        None, "separate output layer instead of the word embedding (unset: preset, else untied)")
    sliding_window: Optional[int] = _opt(None, "Mistral-style attention window in tokens (unset: full causal)")
    make_vocab_size_divisible_by: int = _opt(128, "pad the vocabulary to a multiple of this times TP")
    init_method_std: float = _opt(0.02, "std of the normal weight init")


@dataclass
class ReferenceConfig:
    """The frozen reference model that scores tokens (online) or its precomputed scores (offline)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # unset fields inherit the policy's
    load: Optional[str] = _opt(None, "reference weights: a megatron_slm checkpoint (or training run) or a "
                                     "transformers directory")
    dtype: str = _opt("auto", "reference weights' dtype (auto: bf16 on GPU, fp32 on CPU)", REFERENCE_DTYPES)
    scores_path: Optional[list] = _opt(None, "offline mode: score sidecars in --data-path's order "
                                             "(unset: <prefix>_refscores)")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _opt(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = _opt(1, "pipeline-parallel size")
    sequence_parallel: bool = _opt(False, "sequence parallelism (needs TransformerEngine or Apex)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _opt(
        None, "interleaved 1F1B: layers per virtual pipeline stage (each rank holds num_layers / (PP x this) "
              "model chunks); unset: one chunk per rank")
    use_distributed_optimizer: bool = _opt(
        False, "megatron-core's distributed optimizer: fp32 master weights and Adam state sharded over data parallel")
    overlap_grad_reduce: bool = _opt(False, "overlap the data-parallel gradient reduction with the backward pass")
    overlap_param_gather: bool = _opt(False, "overlap the parameter all-gather with the forward pass "
                                             "(with --use-distributed-optimizer)")
    ddp_bucket_size: Optional[int] = _opt(None, "elements per gradient bucket for the reduction (unset: "
                                                "megatron-core's default)")


@dataclass
class SLMConfig:
    """Selective Language Modeling (Rho-1): train only on the top-k% tokens by excess loss."""

    loss_mode: str = _opt("slm", "slm: selective loss against a reference; clm: plain causal LM", LOSS_MODES)
    slm_select_ratio: float = _opt(0.6, "k: fraction of the (unmasked) tokens that train (paper: 0.6 for 1B, "
                                        "0.7 for 7B)")
    selection_scope: str = _opt("micro_batch", "which tokens the top-k ranks together (README: selection "
                                               "scopes)", SELECTION_SCOPES)
    selection_strategy: str = _opt(
        "topk", "topk: the k% tokens of highest excess loss; random: a seeded random k% of the valid tokens, same "
                "count, scope and normalisation (a control for 'fewer tokens'); the reference still scores (online "
                "or offline) so the log shows the excess loss of what random picked", SELECTION_STRATEGIES)
    reference_mode: str = _opt("online", "online: co-located reference model; offline: precomputed score "
                                         "sidecars (slm score-reference)", REFERENCE_MODES)
    threshold_momentum: float = _opt(0.9, "threshold scope: EMA weight of the previous quantile estimate")


@dataclass
class TrainConfig:
    micro_batch_size: int = _opt(2, "sequences per micro-batch")
    global_batch_size: int = _opt(8, "sequences per optimizer step (all data-parallel ranks)")
    seq_length: int = _opt(128, "tokens per sequence")
    train_iters: int = _opt(100, "optimizer steps of the whole run")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr: float = _opt(3e-5, "learning rate at the end of the decay (--lr-decay-style)")
    lr_warmup_iters: int = _opt(10, "linear warm-up steps")
    lr_decay_style: str = _opt("cosine", "learning-rate decay after the warm-up", LR_DECAY_STYLES)
    lr_decay_iters: Optional[int] = _opt(None, "steps over which the LR decays to --min-lr (unset: --train-iters)")
    lr_wsd_decay_iters: Optional[int] = _opt(None, "WSD: the final steps of the decay window in which the LR "
                                                   "decays (before them it stays at --lr)")
    lr_wsd_decay_style: str = _opt("exponential", "WSD: the shape of its final decay", WSD_DECAY_STYLES)
    weight_decay: float = _opt(0.1, "AdamW weight decay (not on norms)")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.95, "Adam beta2")
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    clip_grad: float = _opt(1.0, "gradient-norm clipping (0: off)")
    on_nonfinite: str = _opt("skip", "a step whose loss or gradient norm is NaN/inf (agreed on all ranks): skip "
                                     "its update, or stop the run (exit non-zero, no checkpoint of that step); "
                                     "with --deepspeed always stop", NONFINITE_POLICIES)
    max_nonfinite_skips: int = _opt(5, "stop (exit non-zero) after this many consecutive skipped steps")
    seed: int = _opt(1234, "seed of the weight init, the data order and dropout")
    recompute_granularity: Optional[str] = _opt(
        None, "activation recomputation of the policy: full (whole layers) or selective (the attention core); "
              "unset: none", RECOMPUTE_GRANULARITIES)
    recompute_method: Optional[str] = _opt(
        None, "full recompute: uniform (every N layers a checkpoint) or block (the first N layers of each "
              "pipeline stage)", RECOMPUTE_METHODS)
    recompute_num_layers: Optional[int] = _opt(None, "full recompute: N of --recompute-method")
    exit_duration_in_mins: Optional[float] = _opt(
        None, "checkpoint and exit cleanly (exit 0) once the run has lasted this many minutes (a wall-clock "
              "budget, e.g. a Slurm time limit); rerun to resume")
    exit_interval: Optional[int] = _opt(None, "checkpoint and exit cleanly at the first iteration divisible by N")
    bf16: Optional[bool] = _opt(None, "bf16 compute with fp32 master weights (unset: on GPU yes, on CPU no)")
    log_interval: int = _opt(10, "steps between log lines")
    logging_level: str = _opt("info", "log level of the library's messages", LOG_LEVELS)
    eval_interval: int = _opt(0, "steps between held-out evaluations (0: only at the end)")
    eval_iters: int = _opt(4, "global batches per held-out evaluation")
    tensorboard_dir: Optional[str] = _opt(None, "write TensorBoard scalars here")
    wandb_project: Optional[str] = _opt(None, "Weights & Biases project; W&B logging is on when set")
    wandb_exp_name: Optional[str] = _opt(None, "W&B run name")
    wandb_save_dir: Optional[str] = _opt(None, "W&B's local directory (unset: <save>/wandb)")
    peak_tflops: Optional[float] = _opt(None, "per-GPU peak TFLOP/s for MFU (unset: from the GPU's name)")
    deepspeed: Optional[str] = _opt(None, "a ds_configs/*.json: DeepSpeed ZeRO instead of megatron-core's "
                                          "optimizer (PP=1)")
    selection_dump_interval: int = _opt(0, "every N steps save per-token selection details under "
                                           "<save>/selection_dumps (0: never)")
    selection_dump_sequences: int = _opt(4, "sequences each selection dump keeps")


@dataclass
class DataConfig:
    """megatron-core indexed datasets written by tools/preprocess_data.py (prefixes, without .bin/.idx)."""

    data_path: Optional[list] = _opt(None, "training data: [weight] prefix [weight prefix ...] (Megatron's blend)")
    valid_data_path: Optional[list] = _opt(None, "separate validation blend (unset: a split of --data-path)")
    split: str = _opt("969,30,1", "train,valid,test proportions of --data-path when --valid-data-path is unset")
    data_cache_path: Optional[str] = _opt(None, "where megatron-core caches its sample indices")
    tokenizer_model: Optional[str] = _opt(None, "tokenizer file, checked against the one the data was made with")


@dataclass
class CheckpointConfig:
    save: Optional[str] = _opt(None, "training checkpoints go here; a run with a checkpoint here resumes from it")
    load: Optional[str] = _opt(None, "resume from this training checkpoint instead of --save (must hold one)")
    save_interval: int = _opt(0, "steps between checkpoints (0: only at the end and on SIGTERM/SIGUSR1)")
    keep_last: int = _opt(2, "complete checkpoints kept under --save")
    override_opt_param_scheduler: bool = _opt(
        False, "on resume, run the LR/WD schedule of this run's flags (--lr, --min-lr, --lr-warmup-iters, "
               "--train-iters, --weight-decay) instead of refusing when they differ from the checkpoint's")
    use_checkpoint_opt_param_scheduler: bool = _opt(
        False, "on resume, keep the checkpoint's LR/WD schedule even if those flags differ")
    pretrained_checkpoint: Optional[str] = _opt(
        None, "the policy's initial weights (megatron_slm or transformers dir) when there is nothing to resume; "
              "optimizer and LR schedule start fresh")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slm: SLMConfig = field(default_factory=SLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading: YAML + overrides


def _leaf_paths(obj, prefix=()):
    """Yield (path, field) for every leaf of the dataclass tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_paths(value, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f


def _flag_for(path) -> str:
    name = path[-1].replace("_", "-")
    return f"--ref-{name}" if path[0] == "reference" else f"--{name}"


def _leaf_type(obj, path):
    hints = typing.get_type_hints(type(_get(obj, path[:-1])))
    tp = hints[path[-1]]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _get(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


def _set(obj, path, value):
    setattr(_get(obj, path[:-1]), path[-1], value)


def _coerce(value: Any, tp, where: str):
    if value is None:
        return None
    if tp is list:
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, str) and value.lower() in ("none", "null") and tp is not str:
            return None
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None


def _merge_dict(cfg, data: dict, prefix=(), source="config"):
    for key, value in data.items():
        path = prefix + (key,)
        try:
            current = _get(cfg, path)
        except AttributeError:
            raise ConfigError(
                f"{source}: unknown key '{'.'.join(path)}'. Valid keys under "
                f"'{'.'.join(prefix) or '<top>'}': "
                f"{', '.join(f.name for f in dataclasses.fields(_get(cfg, prefix)))}"
            ) from None
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{'.'.join(path)}' is a section; give it a mapping")
            _merge_dict(cfg, value, path, source)
        else:
            _set(cfg, path, _coerce(value, _leaf_type(cfg, path), f"{source}: {'.'.join(path)}"))
            explicitly_set(cfg).add(path)


def explicitly_set(cfg: Config) -> set:
    """Paths of the leaves the user set (YAML, overrides, flags, or through a model preset); the others hold
    defaults that a checkpoint's recorded values may replace (megatron_slm.training.run)."""
    return cfg.__dict__.setdefault("_explicit", set())


def _show_default(value) -> str:
    if value is None:
        return "unset"
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """One Megatron-style option per leaf of the config tree, its help, default and choices taken from the
    field's metadata. Booleans are flags (``--bf16`` / ``--no-bf16``). Values left unset keep the YAML's."""
    cfg = Config()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, f in _leaf_paths(cfg):
        section = ".".join(path[:-1])
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        tp = _leaf_type(cfg, path)
        meta = f.metadata
        text = meta.get("help", "").replace("%", "%%")
        default = _get(cfg, path)
        if path[:2] == ("reference", "model") and f.name != "preset":
            shown = " (default: the policy's)"
        elif default is None and "(unset:" in text:
            shown = ""  # the help says what unset means
        else:
            shown = f" (default: {_show_default(default)})"
        kwargs = dict(dest="cfg__" + "__".join(path), default=None, help=text + shown)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # coerced (and reported) by load_config, like YAML values
            is_path = path[-1].endswith(("load", "save", "dir", "path", "model", "checkpoint", "deepspeed"))
            kwargs["metavar"] = {int: "N", float: "X", list: "PATH"}.get(tp, "PATH" if is_path else "STR")
            if tp is list:
                kwargs["nargs"] = "+"
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
                del kwargs["metavar"]
        groups[section].add_argument(_flag_for(path), **kwargs)


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None, args=None) -> Config:
    """Build a Config from defaults <- YAML file <- ``overrides`` (nested dict) <- parsed CLI ``args``."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]} ({exc.problem_mark})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        _merge_dict(cfg, data, source=str(path))
    if overrides:
        _merge_dict(cfg, overrides, source="overrides")
    if args is not None:
        for key, value in vars(args).items():
            if key.startswith("cfg__") and value is not None:
                p = tuple(key[len("cfg__"):].split("__"))
                _set(cfg, p, _coerce(value, _leaf_type(cfg, p), _flag_for(p)))
                explicitly_set(cfg).add(p)
    resolve(cfg)
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill model shapes from presets and the reference's unset fields from the policy."""
    from megatron_slm.model.presets import PRESETS, apply_preset

    apply_preset(cfg.model)
    ref = cfg.reference.model
    if ref.preset:
        apply_preset(ref)
    for section, m in ((("model",), cfg.model), (("reference", "model"), ref)):
        if m.preset:  # a preset is the user's choice of shape: its fields count as set
            explicitly_set(cfg).update(section + (k,) for k in PRESETS[m.preset])
    for f in dataclasses.fields(ModelConfig):
        if f.name != "preset" and getattr(ref, f.name) is None:
            setattr(ref, f.name, getattr(cfg.model, f.name))
    if cfg.model.num_query_groups is None:
        cfg.model.num_query_groups = cfg.model.num_attention_heads
    if ref.num_query_groups is None:
        ref.num_query_groups = ref.num_attention_heads
    return cfg


# ----------------------------------------------------------------------------------------------
# Validation


def _model_problems(m: ModelConfig, tp: int, pp: int, seq_length: int, who: str, flag: str,
                    require_vocab: bool = True) -> list[str]:
    problems = []
    required = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"]
    required += ["vocab_size"] if require_vocab else []
    missing = [n for n in required if getattr(m, n) is None]
    if missing:
        return [f"{who}: {', '.join(missing)} unset; set {flag}preset or {' '.join(flag + n.replace('_', '-') for n in missing)}"]
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
        problems.append(
            f"{who}: seq_length={seq_length} exceeds max_position_embeddings={m.max_position_embeddings}"
        )
    return problems


def reference_in_memory(cfg: Config) -> bool:
    """Online SLM: the run hosts the reference model (offline SLM reads score sidecars; CLM has none)."""
    return cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "online"


def uses_offline_scores(cfg: Config) -> bool:
    return cfg.slm.loss_mode == "slm" and cfg.slm.reference_mode == "offline"


def validate(cfg: Config, world_size: Optional[int] = None, require_vocab: bool = True,
             check_reference: Optional[bool] = None) -> None:
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
    if par.sequence_parallel and tp > 1 and not _has_fused_norm():
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
    if not (0.0 <= slm.threshold_momentum < 1.0):
        problems.append(f"slm.threshold_momentum={slm.threshold_momentum} must be in [0, 1)")
    if reference_in_memory(cfg) if check_reference is None else check_reference:
        ref = cfg.reference.model
        policy_text = {p.split(": ", 1)[-1] for p in problems}
        problems += [  # a reference that inherits the policy's shape would repeat the policy's problems
            p for p in _model_problems(ref, tp, pp, tr.seq_length, "reference model", "--ref-", require_vocab)
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
        problems.append("--deepspeed runs with pipeline_model_parallel_size=1; for PP > 1 drop --deepspeed (megatron-core's optimizer)")
    problems += _virtual_pipeline_problems(cfg, world_size, check_reference)
    problems += _ddp_problems(par, tr)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _recompute_problems(tr: TrainConfig, num_layers: Optional[int], pp: int, per_virtual_stage: Optional[int]) -> list[str]:
    """megatron-core's TransformerConfig rules for activation recomputation (it raises ValueError or IndexError
    otherwise), one line each with the fix."""
    gran, method, n = tr.recompute_granularity, tr.recompute_method, tr.recompute_num_layers
    if gran is None:
        if method is not None or n is not None:
            return ["--recompute-method/--recompute-num-layers need --recompute-granularity full; add it or drop them"]
        return []
    if gran == "selective":
        if method is not None or n is not None:
            return ["--recompute-granularity selective recomputes the core attention of every layer; "
                    "--recompute-method/--recompute-num-layers apply to full only: drop them"]
        return []
    if gran != "full":
        return []  # reported with the choices
    if method is None or n is None:
        return ["--recompute-granularity full needs both --recompute-method uniform|block and "
                "--recompute-num-layers N (e.g. --recompute-method uniform --recompute-num-layers 1)"]
    per_stage = per_virtual_stage or (num_layers // pp if num_layers and num_layers % pp == 0 else None)
    if n < 1 or (per_stage and n > per_stage):
        return [f"--recompute-num-layers {n} must be between 1 and the layers per pipeline stage"
                f"{f' ({per_stage})' if per_stage else ''}"]
    if method == "uniform" and per_stage and per_stage % n:
        return [f"--recompute-method uniform checkpoints groups of --recompute-num-layers {n} layers, which must "
                f"divide the layers per pipeline stage ({per_stage}); use a divisor, or --recompute-method block"]
    return []


def virtual_pipeline_size(par: ParallelConfig, num_layers: int) -> Optional[int]:
    """Model chunks per pipeline rank with --num-layers-per-virtual-pipeline-stage (None: not interleaved)."""
    per = par.num_layers_per_virtual_pipeline_stage
    if per is None:
        return None
    return num_layers // (par.pipeline_model_parallel_size * per)


def _virtual_pipeline_problems(cfg: "Config", world_size: Optional[int], check_reference: Optional[bool]) -> list[str]:
    """The interleaved (virtual pipeline) schedule's rules in megatron-core 0.16, one line each with the fix."""
    par, tr = cfg.parallel, cfg.train
    per, pp = par.num_layers_per_virtual_pipeline_stage, max(par.pipeline_model_parallel_size, 1)
    if per is None:
        return []
    if per < 1:
        return [f"--num-layers-per-virtual-pipeline-stage {per} must be >= 1 (or unset it)"]
    problems = []
    if pp < 2:
        problems.append("--num-layers-per-virtual-pipeline-stage needs a pipeline: set --pipeline-model-parallel-size "
                        ">= 2 or drop it")
    layers = cfg.model.num_layers
    if layers and layers % (pp * per):
        problems.append(f"model: num_layers={layers} is not divisible by pipeline_model_parallel_size x "
                        f"num_layers_per_virtual_pipeline_stage = {pp} x {per}; change one of them")
    elif layers and pp >= 2 and layers // (pp * per) < 2:
        problems.append(f"model: {layers} layers at PP={pp} with {per} per virtual stage make one chunk per rank; "
                        "lower --num-layers-per-virtual-pipeline-stage or drop it")
    elif layers and (reference_in_memory(cfg) if check_reference is None else check_reference):
        # the reference runs interleaved too, with the policy's chunks per rank
        chunks, ref_layers = layers // (pp * per), cfg.reference.model.num_layers
        if ref_layers and ref_layers % (pp * chunks):
            problems.append(f"reference model: num_layers={ref_layers} is not divisible by PP x the policy's chunks per "
                            f"rank = {pp} x {chunks} (it runs interleaved with the same chunks); give the reference "
                            "a multiple of that many layers or change --num-layers-per-virtual-pipeline-stage")
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
                problems.append(f"the interleaved schedule needs the number of micro-batches (global_batch_size / "
                                f"(micro_batch_size x DP) = {m}) to be a multiple of PP={pp}; use a global_batch_size "
                                f"that is a multiple of {tr.micro_batch_size * dp * pp}")
    return problems


def lr_decay_steps(tr: TrainConfig) -> int:
    """The steps over which the LR decays: --lr-decay-iters, else --train-iters (at least warm-up + 1)."""
    if tr.lr_decay_iters is not None:
        return tr.lr_decay_iters
    return max(tr.train_iters, tr.lr_warmup_iters + 1)


def _schedule_and_exit_problems(tr: TrainConfig) -> list[str]:
    problems = []
    if tr.lr_decay_iters is not None and tr.lr_decay_iters <= max(tr.lr_warmup_iters, 0):
        problems.append(f"--lr-decay-iters {tr.lr_decay_iters} must exceed --lr-warmup-iters {tr.lr_warmup_iters} "
                        "(the decay runs after the warm-up); raise it or shorten the warm-up")
    if tr.lr_decay_style == "WSD":
        decay = lr_decay_steps(tr)
        if tr.lr_wsd_decay_iters is None:
            problems.append("--lr-decay-style WSD needs --lr-wsd-decay-iters N (the final steps of the decay window "
                            f"in which the LR anneals; at most {decay})")
        elif not 1 <= tr.lr_wsd_decay_iters <= decay:
            problems.append(f"--lr-wsd-decay-iters {tr.lr_wsd_decay_iters} must be between 1 and the decay iterations "
                            f"({decay}: --lr-decay-iters, else --train-iters)")
    elif tr.lr_wsd_decay_iters is not None:
        problems.append(f"--lr-wsd-decay-iters applies to --lr-decay-style WSD only (not {tr.lr_decay_style}); "
                        "drop it or use --lr-decay-style WSD")
    if tr.exit_duration_in_mins is not None and tr.exit_duration_in_mins <= 0:
        problems.append(f"--exit-duration-in-mins {tr.exit_duration_in_mins} must be > 0 (unset: no time limit)")
    if tr.exit_interval is not None and tr.exit_interval < 1:
        problems.append(f"--exit-interval {tr.exit_interval} must be >= 1 (unset: no exit interval)")
    return problems


def _ddp_problems(par: ParallelConfig, tr: TrainConfig) -> list[str]:
    """Distributed optimizer and communication overlap (megatron-core's DDP), one line each with the fix."""
    problems = []
    if tr.deepspeed and par.use_distributed_optimizer:
        problems.append("--use-distributed-optimizer is megatron-core's; with --deepspeed ZeRO (its config's "
                        "zero_optimization.stage) shards the optimizer: drop one of them")
    if tr.deepspeed and (par.overlap_grad_reduce or par.overlap_param_gather or par.ddp_bucket_size is not None):
        problems.append("--overlap-grad-reduce/--overlap-param-gather/--ddp-bucket-size configure megatron-core's DDP; "
                        "with --deepspeed set overlap_comm and the bucket sizes in its JSON config instead")
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        problems.append("--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: add "
                        "--use-distributed-optimizer or drop it")
    if par.ddp_bucket_size is not None and par.ddp_bucket_size < 1:
        problems.append(f"--ddp-bucket-size {par.ddp_bucket_size} must be >= 1 elements (unset: megatron-core's default)")
    elif par.ddp_bucket_size is not None and not par.overlap_grad_reduce and not tr.deepspeed:
        problems.append("--ddp-bucket-size splits the reduction into buckets only with --overlap-grad-reduce "
                        "(megatron-core reduces one whole buffer otherwise): add it or drop the size")
    return problems


def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """World size = TP x PP x DP: the data-parallel size, or the error that names the fix."""
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; launch a multiple of {tp * pp} processes"
        )
    return world_size // (tp * pp)


def bf16_enabled(train: TrainConfig) -> bool:
    """--bf16 / --no-bf16 when given; unset: bf16 exactly when a GPU is present."""
    if train.bf16 is not None:
        return train.bf16
    import torch

    return torch.cuda.is_available()


def reference_bf16(cfg: Config) -> bool:
    """The reference's weights in bf16 (--ref-dtype; auto: on a GPU)."""
    if cfg.reference.dtype == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.reference.dtype == "bf16"


def _has_fused_norm() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "apex"))


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab padded so each TP shard is equal and a multiple of ``divisible_by`` (as Megatron does)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
