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




@dataclass
class ModelConfig:
    """A Llama/Mistral-family decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    preset: Optional[str] = None  # fills unset shape fields from megatron_slm.model.presets
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None  # GQA: number of KV heads; None = num_attention_heads
    vocab_size: Optional[int] = None  # the tokenizer's vocabulary; padded internally for TP
    max_position_embeddings: Optional[int] = None
    rotary_base: Optional[float] = None
    norm_epsilon: Optional[float] = None
    untie_embeddings_and_output_weights: Optional[bool] = None
    sliding_window: Optional[int] = None  # Mistral-style attention window (tokens); None = full causal
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02


@dataclass
class ReferenceConfig:
    """The frozen reference model that scores tokens (online) or its precomputed scores (offline)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # unset fields inherit the policy's
    load: Optional[str] = None  # checkpoint of the reference weights (trainer output directory)
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    scores_path: Optional[list] = None  # offline mode: score sidecars in data_path's order; default <prefix>_refscores


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class SLMConfig:
    """Selective Language Modeling (Rho-1): train only on the top-k% tokens by excess loss."""

    loss_mode: str = "slm"  # slm | clm (plain causal LM, no reference)
    slm_select_ratio: float = 0.6  # k: fraction of (unmasked) tokens that contribute to the loss
    selection_scope: str = "micro_batch"  # sequence | micro_batch | global_batch | threshold
    reference_mode: str = "online"  # online (co-located model) | offline (precomputed score sidecar)
    threshold_momentum: float = 0.9  # threshold scope: EMA weight of the previous quantile estimate


@dataclass
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seq_length: int = 128
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: Optional[bool] = None  # None = bf16 on GPU, fp32 on CPU
    log_interval: int = 10
    eval_interval: int = 0  # 0 = evaluate only at the end
    eval_iters: int = 4
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None  # Weights & Biases project; W&B logging is on when set
    wandb_exp_name: Optional[str] = None  # W&B run name
    wandb_save_dir: Optional[str] = None  # W&B's local directory (default: <save>/wandb)
    peak_tflops: Optional[float] = None  # per-GPU peak (bf16 dense) for MFU; default from the GPU's name
    deepspeed: Optional[str] = None  # a ds_configs/*.json: DeepSpeed ZeRO instead of megatron-core's optimizer (PP=1)
    selection_dump_interval: int = 0  # every N steps, save per-token selection details (needs checkpoint.save)
    selection_dump_sequences: int = 4  # how many sequences each dump keeps


@dataclass
class DataConfig:
    """megatron-core indexed datasets written by tools/preprocess_data.py (prefixes, without .bin/.idx)."""

    data_path: Optional[list] = None  # [weight] prefix [weight prefix ...], Megatron's --data-path blend
    valid_data_path: Optional[list] = None  # separate validation blend; default: a split of data_path
    split: str = "969,30,1"  # train,valid,test proportions of data_path when valid_data_path is unset
    data_cache_path: Optional[str] = None  # where megatron-core caches its sample indices
    tokenizer_model: Optional[str] = None  # optional: checked against the tokenizer the data was made with


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # training checkpoints go here (iter_NNNNNNN/); also where a run resumes from
    load: Optional[str] = None  # resume from here instead (must hold a checkpoint)
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2  # complete checkpoints kept under save
    pretrained_checkpoint: Optional[str] = None  # policy's initial weights (megatron_slm or transformers dir)


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


SELECTION_SCOPES = ("sequence", "micro_batch", "global_batch", "threshold")
LOSS_MODES = ("slm", "clm")
REFERENCE_MODES = ("online", "offline")


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


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--megatron-style-name`` option per leaf of the config tree."""
    group = parser.add_argument_group("config overrides (Megatron-style names)")
    cfg = Config()
    for path, _ in _leaf_paths(cfg):
        nargs = "+" if _leaf_type(cfg, path) is list else None
        group.add_argument(_flag_for(path), dest="cfg__" + "__".join(path), default=None, metavar="V", nargs=nargs)


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
    resolve(cfg)
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill model shapes from presets and the reference's unset fields from the policy."""
    from megatron_slm.model.presets import apply_preset

    apply_preset(cfg.model)
    ref = cfg.reference.model
    if ref.preset:
        apply_preset(ref)
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


def _model_problems(m: ModelConfig, tp: int, pp: int, seq_length: int, who: str, flag: str) -> list[str]:
    problems = []
    required = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"]
    missing = [n for n in required if getattr(m, n) is None]
    if missing:
        return [f"{who}: {', '.join(missing)} unset; set {flag}preset or {' '.join(flag + n.replace('_', '-') for n in missing)}"]
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


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Raise ConfigError listing every problem in ``cfg`` (and with ``world_size``, the layout)."""
    problems = []
    par, slm, tr = cfg.parallel, cfg.slm, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        problems.append("tensor/pipeline_model_parallel_size must be >= 1")
        tp, pp = max(tp, 1), max(pp, 1)
    problems += _model_problems(cfg.model, tp, pp, tr.seq_length, "model", "--")
    if par.sequence_parallel and tp > 1 and not _has_fused_norm():
        problems.append(
            "sequence_parallel needs TransformerEngine or Apex (megatron-core's torch norm refuses it); "
            "install one on the GPU machine or drop --sequence-parallel"
        )
    if slm.loss_mode not in LOSS_MODES:
        problems.append(f"slm.loss_mode={slm.loss_mode!r}; use one of {LOSS_MODES}")
    if not (0.0 < slm.slm_select_ratio <= 1.0):
        problems.append(
            f"slm.slm_select_ratio (k) = {slm.slm_select_ratio} is outside (0, 1]; the paper uses 0.6 (1B) / 0.7 (7B)"
        )
    if slm.selection_scope not in SELECTION_SCOPES:
        problems.append(f"slm.selection_scope={slm.selection_scope!r}; use one of {SELECTION_SCOPES}")
    if slm.reference_mode not in REFERENCE_MODES:
        problems.append(f"slm.reference_mode={slm.reference_mode!r}; use one of {REFERENCE_MODES}")
    if not (0.0 <= slm.threshold_momentum < 1.0):
        problems.append(f"slm.threshold_momentum={slm.threshold_momentum} must be in [0, 1)")
    if slm.loss_mode == "slm" and slm.reference_mode == "online":
        ref = cfg.reference.model
        policy_text = {p.split(": ", 1)[-1] for p in problems}
        problems += [  # a reference that inherits the policy's shape would repeat the policy's problems
            p for p in _model_problems(ref, tp, pp, tr.seq_length, "reference model", "--ref-")
            if p.split(": ", 1)[-1] not in policy_text
        ]
        if ref.vocab_size != cfg.model.vocab_size:
            problems.append(
                f"vocab mismatch: policy vocab_size={cfg.model.vocab_size}, reference vocab_size={ref.vocab_size}; "
                "the reference must share the policy's tokenizer"
            )
    if cfg.reference.dtype not in ("auto", "fp32", "bf16"):
        problems.append(f"reference.dtype={cfg.reference.dtype!r}; use auto, fp32 or bf16")
    if tr.micro_batch_size < 1 or tr.global_batch_size < 1 or tr.seq_length < 2:
        problems.append("micro_batch_size and global_batch_size must be >= 1 and seq_length >= 2")
    if tr.train_iters < 0:
        problems.append("train_iters must be >= 0")
    if tr.lr_warmup_iters < 0 or tr.lr < 0 or tr.min_lr < 0 or tr.min_lr > tr.lr:
        problems.append(f"need lr >= min_lr >= 0 and lr_warmup_iters >= 0 (lr={tr.lr}, min_lr={tr.min_lr})")
    if world_size is not None:
        if world_size % (tp * pp):
            problems.append(
                f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; launch a multiple of {tp * pp} processes"
            )
        else:
            dp = world_size // (tp * pp)
            if tr.global_batch_size % (tr.micro_batch_size * dp):
                problems.append(
                    f"global_batch_size={tr.global_batch_size} is not divisible by micro_batch_size x data-parallel "
                    f"size = {tr.micro_batch_size} x {dp}; use a multiple of {tr.micro_batch_size * dp}"
                )
    if tr.deepspeed and pp != 1:
        problems.append("--deepspeed runs with pipeline_model_parallel_size=1; for PP > 1 drop --deepspeed (megatron-core's optimizer)")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _has_fused_norm() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "apex"))


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab padded so each TP shard is equal and a multiple of ``divisible_by`` (as Megatron does)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
