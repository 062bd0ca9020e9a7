"""Full (unsharded) parameters or gradients of a TP x PP megatron model, gathered for comparisons in tests."""

from __future__ import annotations

import torch

from megatron_slm.model.build import VOCAB_PARAMS, global_param_name


def unshard(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of ``megatron_slm.model.build.shard_of``: the full tensor from every TP rank's shard (in rank order)."""
    if not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    per_rank = [torch.split(s, s.shape[dim] // stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def gather_full(model, tensors: dict[str, torch.Tensor] | None = None, use_grad: bool = False) -> dict:
    """Full (unsharded) tensors of the whole model by global name, on every rank of DP rank 0's replica.

    ``use_grad`` gathers ``param.main_grad`` (megatron DDP) or ``param.grad`` instead of the weights.
    ``model``: a GPTModel or the list of this rank's chunks (interleaved pipeline).
    Communicates over the TP group and then the PP group.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for model, local_name, param in ((c, n, p) for c in chunks for n, p in c.named_parameters()):
        t = param
        if use_grad:
            t = getattr(param, "main_grad", None)
            t = param.grad if t is None else t
        t = t.detach().float().contiguous()
        shards = [torch.empty_like(t) for _ in range(tp_world)]
        dist.all_gather(shards, t, group=tp_group)
        name = global_param_name(model, local_name)
        full = unshard(shards, param)
        if name in VOCAB_PARAMS:
            full = full[: model.true_vocab_size]
        if name in local and use_grad:  # tied embedding: its grad is already all-reduced across stages
            continue
        local[name] = full
    out = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(out, local, group=pp_group)
    merged = {}
    for d in out:
        merged.update(d)
    return merged
