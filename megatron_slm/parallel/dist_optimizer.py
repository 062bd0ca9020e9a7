"""Checkpoints of megatron-core's distributed optimizer (--use-distributed-optimizer) through dist_checkpointing.

Format: megatron-core's "fully_reshardable". At save the DP ranks all-gather their slices of the fp32 master weights
and Adam moments, and DP rank 0 writes them in each parameter's own shape and key, as the plain optimizer does; at
load every rank reads its parameters' whole tensors and keeps its slice. A checkpoint so resumes at any DP size, any
TP/PP layout and any bucket layout (--overlap-grad-reduce, --ddp-bucket-size). The cost: during a save or a load
each rank holds its TP/PP shard's whole fp32 optimizer state (12 bytes a parameter) in host memory for a moment.
The alternatives in megatron-core 0.16: "fully_sharded_model_space" (no gather) is refused by its own
dist_checkpointing (flattened ranges are no longer supported); "dp_reshardable" ties a checkpoint to its TP/PP
layout and bucket layout.

Three gaps of megatron-core 0.16.1 are closed here (none is CPU-specific):
- fully_reshardable with several gradient buckets (--overlap-grad-reduce with a bucket size below the model's size):
  the gathered state is laid out bucket after bucket without the padding at each bucket's end, but is cut into
  parameters by their offsets in the padded buffer, so every parameter after the first padded bucket end gets
  another parameter's state. The offsets are shifted to the unpadded layout while the state dict is built.
- with torch's Adam (megatron-core's optimizer without TransformerEngine/Apex; the step lives in each parameter's
  state, not in the param groups) state_dict() fails on an optimizer that has not stepped yet (a fresh one about
  to load, or one whose first update was vetoed): such a state gets zero moments and step 0, where Adam starts;
- and loading copies every entry of that state from the checkpoint, where the step is not (KeyError 'step'), after
  handing one step tensor to every parameter (which torch's Adam then increments once per parameter each step):
  each parameter keeps its own copy of the step load_state_dict set.
"""

from __future__ import annotations

import contextlib

import torch

METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def uses_distributed_optimizer(model) -> bool:
    return bool(getattr(getattr(model, "ddp_config", None), "use_distributed_optimizer", False))


def finish_param_gather(model) -> None:
    """With --overlap-param-gather the updated weights all-gather only in the next forward's pre-hooks: finish the
    gather now, so whoever reads the weights (a save) sees the updated ones on every DP rank."""
    if getattr(getattr(model, "ddp_config", None), "overlap_param_gather", False):
        model.start_param_sync(force_sync=True)


def sharded_state_dict(model, optimizer, model_sharded_state_dict: dict, is_loading: bool) -> dict:
    """The distributed optimizer's dist_checkpointing state (``model`` is the DDP-wrapped policy)."""
    _ensure_torch_adam_state(optimizer)
    with _unpadded_param_offsets(optimizer):
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=METADATA)


def _distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


@contextlib.contextmanager
def _unpadded_param_offsets(optimizer):
    """Each buffer's param_index_map in the layout of the gathered state: buckets back to back, unpadded."""
    saved = []
    try:
        for opt in _distributed_optimizers(optimizer):
            for buffer in getattr(opt, "buffers", []):
                shifts, unpadded_start = [], 0
                for bucket_id, (start, _end) in enumerate(buffer.bucket_indices):
                    shifts.append(start - unpadded_start)
                    unpadded_start += buffer.buckets[bucket_id].numel_unpadded
                saved.append((buffer, buffer.param_index_map))
                buffer.param_index_map = {
                    p: (s - shifts[b], e - shifts[b], b) for p, (s, e, b) in buffer.param_index_map.items()
                }
        yield
    finally:
        for buffer, index_map in saved:
            buffer.param_index_map = index_map


def _ensure_torch_adam_state(optimizer) -> None:
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:  # fused Adam keeps the step in its param groups
        return
    _patch_state_copy(distrib_optimizer.DistributedOptimizer)
    for opt in _distributed_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups if inner is not None else ():
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=torch.tensor(0.0)
                    )


def _patch_state_copy(cls) -> None:
    if getattr(cls._set_main_param_and_optimizer_states, "_keeps_step", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                state["step"] = state["step"].detach().clone()  # this parameter's own step tensor
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    set_states._keeps_step = True
    cls._set_main_param_and_optimizer_states = set_states
