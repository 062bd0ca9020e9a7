"""Llama/Mistral decoders on megatron-core's GPTModel, built for this rank's TP/PP slice.

The model code is megatron-core's; this module only maps our ModelConfig to a TransformerConfig, picks
the layer spec (TransformerEngine on GPU when importable, else the local spec with fused SDPA attention) and initialises
weights so that the same seed gives the same full model under any TP/PP layout.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F

from megatron_slm.config import ModelConfig, ParallelConfig, padded_vocab_size

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def recompute_settings(train) -> dict:
    """megatron-core's activation recomputation from --recompute-granularity/-method/-num-layers (a TrainConfig).

    For the policy only: the reference (and every forward-only pass) runs under no_grad and keeps no activations,
    so there is nothing to recompute. ``selective`` recomputes megatron-core's default module, "core_attn": the
    layer's core attention (here model/attention.py's SDPA) runs inside tensor_parallel.checkpoint and again in
    the backward; SDPA keeps only its output and logsumexp, so this saves little unless the unfused fallback runs."""
    if train is None or train.recompute_granularity is None:
        return {}
    return dict(
        recompute_granularity=train.recompute_granularity,
        recompute_method=train.recompute_method,
        recompute_num_layers=train.recompute_num_layers,
    )


def transformer_config(
    m: ModelConfig,
    par: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    recompute: dict | None = None,
    vp_size: int | None = None,
    initialize: bool = True,
):
    """``recompute``: ``recompute_settings(train)`` for the policy; None (no recomputation) for everything else.
    ``vp_size``: model chunks per pipeline rank of an interleaved pipeline (config.virtual_pipeline_size), or None.
    ``initialize=False``: the weights will be loaded; megatron-core's init fills zeros instead of drawing (it still
    sets each parameter's tensor-parallel attributes, which the optimizer and checkpoints read)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    no_draw = (
        {} if initialize else dict(init_method=torch.nn.init.zeros_, output_layer_init_method=torch.nn.init.zeros_)
    )
    return TransformerConfig(
        **(recompute or {}),
        **no_draw,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        activation_func=F.silu,
        gated_linear_unit=True,  # SwiGLU
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # sliding_window W as Mistral defines it (a token sees W tokens, itself included); megatron-core's
        # (w, 0) sees w + 1.
        window_size=(m.sliding_window - 1, 0) if m.sliding_window else None,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vp_size,
        # gloo (CPU): the interleaved schedule at PP=2 with batched p2p (batch_isend_irecv) runs without error but
        # gives wrong gradients (../shared/notes/megatron-core-on-cpu.md); separate isend/irecv are exact. CUDA/NCCL
        # keeps megatron-core's default (batched).
        batch_p2p_comm=on_gpu,
        sequence_parallel=par.sequence_parallel and par.tensor_model_parallel_size > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,  # sets TP attributes; layout_invariant_init then rewrites the values
        # Fused kernels exist only on GPU.
        bias_activation_fusion=False,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # The SLM loss is a sum over selected tokens; finalize_model_grads divides by their global count.
        calculate_per_token_loss=True,
    )


def _layer_spec(meta: bool = False):
    from megatron.core.models.gpt import gpt_layer_specs

    # TransformerEngine's layers allocate on the GPU themselves: a meta build takes the local spec, which holds
    # the same parameters.
    if torch.cuda.is_available() and not meta:
        try:
            import transformer_engine  # noqa: F401

            return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        except ImportError:
            pass
    from megatron_slm.model.attention import SDPAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model_chunks(
    m: ModelConfig,
    par: ParallelConfig,
    seed: int,
    params_dtype: torch.dtype = torch.float32,
    recompute: dict | None = None,
    vp_size: int | None = None,
    initialize: bool = True,
) -> list:
    """This rank's model chunks: ``vp_size`` GPTModels, one per virtual pipeline stage (the policy's
    config.virtual_pipeline_size, which parallel_state was initialised with; the reference uses the same), else a
    list of one. Chunk i of pipeline rank r holds global layers from (i x PP + r) x layers-per-chunk on."""
    if vp_size is None:
        return [build_model(m, par, seed, params_dtype, recompute, initialize=initialize)]
    return [
        build_model(m, par, seed, params_dtype, recompute, vp_stage=i, vp_size=vp_size, initialize=initialize)
        for i in range(vp_size)
    ]


def build_model(
    m: ModelConfig,
    par: ParallelConfig,
    seed: int,
    params_dtype: torch.dtype = torch.float32,
    recompute: dict | None = None,
    vp_stage: int | None = None,
    vp_size: int | None = None,
    meta: bool = False,
    initialize: bool = True,
):
    """This rank's stage of the decoder, weights initialised from ``seed`` independently of TP/PP.

    ``recompute``: activation recomputation (``recompute_settings``), the policy's only. ``vp_stage``: which
    model chunk (virtual pipeline stage) to build when the pipeline is interleaved (``build_model_chunks``).
    ``meta``: the same model on the meta device, shapes only (no memory, no weights, no init, never on a GPU):
    what ``slm plan`` counts (planning/plan.py). ``initialize=False``: the caller loads every weight next (a
    checkpoint, a transformers directory): no random draw at all, the weights hold zeros until then. Drawing the
    full tensors of a 7B policy and reference on every rank is minutes of each start and requeue."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if (vp_size is None) != (vp_stage is None):
        raise ValueError("an interleaved pipeline builds one model per chunk: use build_model_chunks")
    config = transformer_config(m, par, params_dtype, recompute, vp_size, initialize=initialize and not meta)
    if meta:
        config.use_cpu_initialization = True  # allocate with torch.empty() on the default (meta) device, not a GPU
    with _on_meta() if meta else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=_layer_spec(meta),
            vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, par.tensor_model_parallel_size),
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            parallel_output=True,  # the loss works on each rank's vocab shard
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(m.rotary_base),
        )
    model.true_vocab_size = m.vocab_size
    if meta:
        return model
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if initialize:
        layout_invariant_init(model, m, seed)
    return model


@contextlib.contextmanager
def _on_meta():
    """New tensors on the meta device, and megatron-core's one ``.cuda()`` of a meta tensor a no-op (cpu_shims)."""
    from megatron_slm.parallel.cpu_shims import meta_stays_meta

    with torch.device("meta"), meta_stays_meta():
        yield


# ----------------------------------------------------------------------------------------------
# Global names and TP shards of parameters


def global_param_name(model, local_name: str) -> str:
    """``decoder.layers.{i}.x`` on a pipeline stage -> the layer's index in the whole model."""
    parts = local_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    name = ".".join(parts)
    if name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        name = "embedding.word_embeddings.weight"
    return name


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of ``full`` for ``param`` (megatron's partition_dim/partition_stride)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank, world = _tp()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunk = param.shape[dim] // stride
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp()[1]
    return shape


@torch.no_grad()
def layout_invariant_init(model, m: ModelConfig, seed: int) -> None:
    """Initialise every parameter from (seed, global name): identical full weights under any TP/PP.

    Megatron's own init draws from per-rank generators, so different layouts get different models; tests
    and TP/PP-changing runs need one model. Llama-style: N(0, std), output projections std/sqrt(2L), norms 1.
    """
    out_std = m.init_method_std / math.sqrt(2.0 * m.num_layers)
    for local_name, param in model.named_parameters():
        name = global_param_name(model, local_name)
        shape = full_shape(param)
        if "norm" in name.rsplit(".", 2)[-2] or name.endswith("layer_norm_weight"):
            full = torch.ones(shape)
        else:
            std = out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else m.init_method_std
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            if name in VOCAB_PARAMS:  # padding rows depend on TP: draw the true rows, zero the rest
                full = torch.zeros(shape)
                full[: m.vocab_size] = torch.randn([m.vocab_size] + shape[1:], generator=gen) * std
            else:
                full = torch.randn(shape, generator=gen) * std
        param.copy_(shard_of(full, param).to(param.dtype))
