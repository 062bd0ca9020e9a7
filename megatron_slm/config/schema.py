"""The config tree: one dataclass per section, each leaf with its help text, default and choices.

A YAML file mirrors the tree (``model:``, ``reference:``, ``parallel:``, ``slm:``, ``train:``, ``data:``,
``checkpoint:``); every leaf is also a Megatron-style flag (``config/arguments.py``). A run's config is a draft
while it is loaded (``config/loading.py``) and resolved (``training/resolve.py``); then it is frozen: code that
runs the job reads it and never writes it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

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


class _Section:
    """A config node that can be frozen: after ``freeze`` every assignment raises (a resolved run is read-only)."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"the resolved config is read-only: cannot set {type(self).__name__}.{name} (resolve a new draft "
                "with megatron_slm.training.resolve instead)"
            )
        object.__setattr__(self, name, value)


def freeze(node) -> None:
    """Make ``node`` and every section under it read-only."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            freeze(value)
    object.__setattr__(node, "_frozen", True)


def is_frozen(node) -> bool:
    return bool(node.__dict__.get("_frozen"))


def draft_copy(cfg: Config) -> Config:
    """A writable deep copy of a config, frozen or not (what resolution starts from; the original is untouched)."""
    import copy

    new = copy.deepcopy(cfg)
    stack = [new]
    while stack:
        node = stack.pop()
        node.__dict__.pop("_frozen", None)
        stack += [
            getattr(node, f.name) for f in dataclasses.fields(node) if dataclasses.is_dataclass(getattr(node, f.name))
        ]
    return new


def _presets() -> tuple:
    from megatron_slm.model.presets import PRESETS

    return tuple(PRESETS)


@dataclass
class ModelConfig(_Section):
    """A Llama/Mistral-family decoder (RMSNorm, SwiGLU, RoPE, GQA). Unset shape fields come from ``preset``."""

    preset: str | None = _opt(None, "named model shape that fills the unset fields below", _presets())
    num_layers: int | None = _opt(None, "transformer layers")
    hidden_size: int | None = _opt(None, "hidden size")
    ffn_hidden_size: int | None = _opt(None, "SwiGLU inner size")
    num_attention_heads: int | None = _opt(None, "attention heads")
    num_query_groups: int | None = _opt(None, "GQA key/value heads (unset: num_attention_heads)")
    vocab_size: int | None = _opt(
        None, "the tokenizer's vocabulary (unset: read from the data's metadata); padded internally for TP"
    )
    max_position_embeddings: int | None = _opt(None, "longest sequence the model is built for")
    rotary_base: float | None = _opt(None, "RoPE theta (unset: preset, else 10000)")
    norm_epsilon: float | None = _opt(None, "RMSNorm epsilon (unset: preset, else 1e-5)")
    untie_embeddings_and_output_weights: bool | None = _opt(
        None, "separate output layer instead of the word embedding (unset: preset, else untied)"
    )
    sliding_window: int | None = _opt(None, "Mistral-style attention window in tokens (unset: full causal)")
    make_vocab_size_divisible_by: int = _opt(128, "pad the vocabulary to a multiple of this times TP")
    init_method_std: float = _opt(0.02, "std of the normal weight init")


@dataclass
class ReferenceConfig(_Section):
    """The frozen reference model that scores tokens (online) or its precomputed scores (offline)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # unset fields inherit the policy's
    load: str | None = _opt(
        None, "reference weights: a megatron_slm checkpoint (or training run) or a transformers directory"
    )
    dtype: str = _opt("auto", "reference weights' dtype (auto: bf16 on GPU, fp32 on CPU)", REFERENCE_DTYPES)
    scores_path: list | None = _opt(
        None, "offline mode: score sidecars in --data-path's order (unset: <prefix>_refscores)"
    )


@dataclass
class ParallelConfig(_Section):
    tensor_model_parallel_size: int = _opt(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = _opt(1, "pipeline-parallel size")
    sequence_parallel: bool = _opt(False, "sequence parallelism (needs TransformerEngine or Apex)")
    num_layers_per_virtual_pipeline_stage: int | None = _opt(
        None,
        "interleaved 1F1B: layers per virtual pipeline stage (each rank holds num_layers / (PP x this) "
        "model chunks); unset: one chunk per rank",
    )
    use_distributed_optimizer: bool = _opt(
        False, "megatron-core's distributed optimizer: fp32 master weights and Adam state sharded over data parallel"
    )
    overlap_grad_reduce: bool = _opt(False, "overlap the data-parallel gradient reduction with the backward pass")
    overlap_param_gather: bool = _opt(
        False, "overlap the parameter all-gather with the forward pass (with --use-distributed-optimizer)"
    )
    ddp_bucket_size: int | None = _opt(
        None, "elements per gradient bucket for the reduction (unset: megatron-core's default)"
    )


@dataclass
class SLMConfig(_Section):
    """Selective Language Modeling (Rho-1): train only on the top-k% tokens by excess loss."""

    loss_mode: str = _opt("slm", "slm: selective loss against a reference; clm: plain causal LM", LOSS_MODES)
    slm_select_ratio: float = _opt(
        0.6, "k: fraction of the (unmasked) tokens that train (paper: 0.6 for 1B, 0.7 for 7B)"
    )
    slm_select_ratio_per_dataset: list | None = _opt(
        None,
        "one k per --data-path dataset, in its order (e.g. 0.6 1.0: top 60% of the first dataset's tokens, all of "
        "the second's); each dataset's tokens are ranked among themselves (unset: --slm-select-ratio for all)",
    )
    slm_warn_selected_share: float = _opt(
        0.2,
        "warn once when a blend dataset's selected share over a logging window falls under this (0: never). SLM "
        "skips the tokens the reference is bad at; a dataset trained on under 20% of its tokens (a third of "
        "the paper's k) is being left out and may be forgotten",
    )
    selection_scope: str = _opt(
        "micro_batch", "which tokens the top-k ranks together (docs/design.md: selection scopes)", SELECTION_SCOPES
    )
    selection_strategy: str = _opt(
        "topk",
        "topk: the k% tokens of highest excess loss; random: a seeded random k% of the valid tokens, same "
        "count, scope and normalisation (a control for 'fewer tokens'); the reference still scores (online "
        "or offline) so the log shows the excess loss of what random picked",
        SELECTION_STRATEGIES,
    )
    reference_mode: str = _opt(
        "online",
        "online: co-located reference model; offline: precomputed score sidecars (slm score-reference)",
        REFERENCE_MODES,
    )
    threshold_momentum: float = _opt(0.9, "threshold scope: EMA weight of the previous quantile estimate")


@dataclass
class TrainConfig(_Section):
    micro_batch_size: int = _opt(2, "sequences per micro-batch")
    global_batch_size: int = _opt(8, "sequences per optimizer step (all data-parallel ranks)")
    seq_length: int = _opt(128, "tokens per sequence")
    train_iters: int = _opt(100, "optimizer steps of the whole run")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr: float = _opt(3e-5, "learning rate at the end of the decay (--lr-decay-style)")
    lr_warmup_iters: int = _opt(10, "linear warm-up steps")
    lr_decay_style: str = _opt("cosine", "learning-rate decay after the warm-up", LR_DECAY_STYLES)
    lr_decay_iters: int | None = _opt(None, "steps over which the LR decays to --min-lr (unset: --train-iters)")
    lr_wsd_decay_iters: int | None = _opt(
        None, "WSD: the final steps of the decay window in which the LR decays (before them it stays at --lr)"
    )
    lr_wsd_decay_style: str = _opt("exponential", "WSD: the shape of its final decay", WSD_DECAY_STYLES)
    weight_decay: float = _opt(0.1, "AdamW weight decay (not on norms)")
    adam_beta1: float = _opt(0.9, "Adam beta1")
    adam_beta2: float = _opt(0.95, "Adam beta2")
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    clip_grad: float = _opt(1.0, "gradient-norm clipping (0: off)")
    on_nonfinite: str = _opt(
        "skip",
        "a step whose loss or gradient norm is NaN/inf (agreed on all ranks): skip "
        "its update, or stop the run (exit non-zero, no checkpoint of that step); "
        "with --deepspeed always stop",
        NONFINITE_POLICIES,
    )
    max_nonfinite_skips: int = _opt(5, "stop (exit non-zero) after this many consecutive skipped steps")
    seed: int = _opt(1234, "seed of the weight init, the data order and dropout")
    recompute_granularity: str | None = _opt(
        None,
        "activation recomputation of the policy: full (whole layers) or selective (the attention core); unset: none",
        RECOMPUTE_GRANULARITIES,
    )
    recompute_method: str | None = _opt(
        None,
        "full recompute: uniform (every N layers a checkpoint) or block (the first N layers of each pipeline stage)",
        RECOMPUTE_METHODS,
    )
    recompute_num_layers: int | None = _opt(None, "full recompute: N of --recompute-method")
    exit_duration_in_mins: float | None = _opt(
        None,
        "checkpoint and exit cleanly (exit 0) once the run has lasted this many minutes (a wall-clock "
        "budget, e.g. a Slurm time limit); rerun to resume",
    )
    exit_interval: int | None = _opt(None, "checkpoint and exit cleanly at the first iteration divisible by N")
    bf16: bool | None = _opt(None, "bf16 compute with fp32 master weights (unset: on GPU yes, on CPU no)")
    log_interval: int = _opt(10, "steps between log lines")
    logging_level: str = _opt("info", "log level of the library's messages", LOG_LEVELS)
    eval_interval: int = _opt(0, "steps between held-out evaluations (0: only at the end)")
    eval_iters: int = _opt(4, "global batches per held-out evaluation")
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    wandb_project: str | None = _opt(None, "Weights & Biases project; W&B logging is on when set")
    wandb_exp_name: str | None = _opt(None, "W&B run name")
    wandb_save_dir: str | None = _opt(None, "W&B's local directory (unset: <save>/wandb)")
    peak_tflops: float | None = _opt(None, "per-GPU peak TFLOP/s for MFU (unset: from the GPU's name)")
    deepspeed: str | None = _opt(
        None, "a ds_configs/*.json: DeepSpeed ZeRO instead of megatron-core's optimizer (PP=1)"
    )
    selection_dump_interval: int = _opt(
        0, "every N steps save per-token selection details under <save>/selection_dumps (0: never)"
    )
    selection_dump_sequences: int = _opt(4, "sequences each selection dump keeps")


@dataclass
class DataConfig(_Section):
    """megatron-core indexed datasets written by slm preprocess (prefixes, without .bin/.idx)."""

    data_path: list | None = _opt(None, "training data: [weight] prefix [weight prefix ...] (Megatron's blend)")
    valid_data_path: list | None = _opt(None, "separate validation blend (unset: a split of --data-path)")
    split: str = _opt("969,30,1", "train,valid,test proportions of --data-path when --valid-data-path is unset")
    data_cache_path: str | None = _opt(None, "where megatron-core caches its sample indices")
    tokenizer_model: str | None = _opt(None, "tokenizer file, checked against the one the data was made with")


@dataclass
class CheckpointConfig(_Section):
    save: str | None = _opt(None, "training checkpoints go here; a run with a checkpoint here resumes from it")
    load: str | None = _opt(None, "resume from this training checkpoint instead of --save (must hold one)")
    save_interval: int = _opt(0, "steps between checkpoints (0: only at the end and on SIGTERM/SIGUSR1)")
    keep_last: int = _opt(2, "complete checkpoints kept under --save")
    async_save: bool = _opt(
        False,
        "write checkpoints in the background: training waits only for the copy to host memory; "
        "latest_checkpointed_iteration.txt names one once it is complete and flushed",
    )
    override_opt_param_scheduler: bool = _opt(
        False,
        "on resume, run the LR/WD schedule of this run's flags (--lr, --min-lr, --lr-warmup-iters, "
        "--train-iters, --weight-decay) instead of refusing when they differ from the checkpoint's",
    )
    use_checkpoint_opt_param_scheduler: bool = _opt(
        False, "on resume, keep the checkpoint's LR/WD schedule even if those flags differ"
    )
    pretrained_checkpoint: str | None = _opt(
        None,
        "the policy's initial weights (megatron_slm or transformers dir) when there is nothing to resume; "
        "optimizer and LR schedule start fresh",
    )


@dataclass
class Config(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slm: SLMConfig = field(default_factory=SLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Dotted paths of the leaves the user set (YAML, overrides, flags, or a preset's shape); the others hold
    # defaults that resolution may replace with what a checkpoint or the data records. Not a config leaf.
    explicit: frozenset = field(default_factory=frozenset, metadata={"internal": True}, compare=False, repr=False)

    def to_dict(self) -> dict:
        """The config leaves as nested dicts (what YAML, JSON and checkpoints record); ``explicit`` is not one."""
        data = dataclasses.asdict(self)
        data.pop("explicit")
        return data

    def is_explicit(self, path: tuple) -> bool:
        """Whether the user set the leaf at ``path`` (e.g. ``("train", "lr")``)."""
        return ".".join(path) in self.explicit


# ----------------------------------------------------------------------------------------------
# Walking the tree


def _leaf_paths(obj, prefix=()):
    """Yield (path, field) for every leaf of the dataclass tree."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
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
