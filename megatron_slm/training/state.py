"""The stateful parts of a training run, as the checkpoint sees them (megatron_slm/checkpoint/training_state.py).

Each part saves and restores one thing: the policy's model chunks, the optimizer, the LR schedule, the data
position, the RNG streams and the token selector (or, with --deepspeed, the engine's own files). The trainer hands
``{name: part}`` to the checkpoint code, which calls only these methods.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_slm.checkpoint import load_model_state, model_sharded_state_dict
from megatron_slm.errors import CheckpointError


class DataPosition:
    """Where the run is: its iteration (optimizer steps taken) is also its position in the data."""

    def __init__(self, global_batch_size: int):
        self.iteration = 0
        self.global_batch_size = global_batch_size

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.iteration * self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])


class ModelPart:
    """The policy's GPTModel chunks (the modules inside DDP), as dist_checkpointing shards; the keys are those of a
    weights checkpoint. ``restore=False``: saved for use as weights, not loaded (DeepSpeed restores its engine)."""

    def __init__(self, chunks: list, ddp_chunks: list | None = None, restore: bool = True):
        self.chunks, self.ddp_chunks, self.restore = chunks, ddp_chunks or [], restore

    @property
    def module(self):
        return self.chunks[0] if len(self.chunks) == 1 else self.chunks

    def sharded_state_dict(self, is_loading: bool) -> dict:
        from megatron_slm.parallel import dist_optimizer

        for chunk in self.ddp_chunks:  # --overlap-param-gather: the weights saved are the updated ones
            if dist_optimizer.uses_distributed_optimizer(chunk):
                dist_optimizer.finish_param_gather(chunk)
        return model_sharded_state_dict(self.module)

    def load_sharded_state_dict(self, loaded: dict) -> None:
        if self.restore:
            load_model_state(self.module, loaded)


def apply_optimizer_settings(param_groups, train_cfg) -> None:
    """The run's resolved optimizer settings into the optimizer's param groups. A loaded optimizer state carries the
    values it was saved with (megatron-core's LR schedule reads max_lr/min_lr from the groups, torch's Adam its betas
    and eps); the resolved config decides them (training/resolve.py), so they are set after every load. Weight
    decay is set by the LR schedule at each step."""
    for group in param_groups:
        if "max_lr" in group:
            group["max_lr"] = train_cfg.lr
        if "min_lr" in group:
            group["min_lr"] = train_cfg.min_lr
        if "betas" in group:
            group["betas"] = (train_cfg.adam_beta1, train_cfg.adam_beta2)
        if "eps" in group:
            group["eps"] = train_cfg.adam_eps


class OptimizerPart:
    """megatron-core's optimizer (plain or distributed) as dist_checkpointing shards, keyed by the model's shards."""

    def __init__(self, optimizer, model: ModelPart, train_cfg):
        self.optimizer, self.model, self.train_cfg = optimizer, model, train_cfg

    def sharded_state_dict(self, is_loading: bool) -> dict:
        from megatron_slm.parallel import dist_optimizer

        model_sd = self.model.sharded_state_dict(is_loading)
        first = self.model.ddp_chunks[0]
        if dist_optimizer.uses_distributed_optimizer(first):  # its format and gaps: parallel/dist_optimizer.py
            return dist_optimizer.sharded_state_dict(first, self.optimizer, model_sd, is_loading)
        return self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)

    def load_sharded_state_dict(self, loaded: dict) -> None:
        self.optimizer.load_state_dict(loaded)
        apply_optimizer_settings(self.optimizer.param_groups, self.train_cfg)


class SchedulerPart:
    """megatron-core's OptimizerParamScheduler. It is built from the resolved config with
    ``override_opt_param_scheduler`` (the config decides the schedule's settings, resolve.py compared them), so a
    load restores the step count and recomputes the LR and weight decay of every param group from it."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class RNGPart:
    """This rank's RNG streams (CPU, CUDA, megatron-core's tensor-parallel tracker), restored when the layout is the
    one they were saved at; at another layout the ranks keep their seeded streams."""

    per_rank = True

    def __init__(self, layout: dict):
        self.layout = layout

    def state_dict(self) -> dict:
        from megatron.core import tensor_parallel

        state = {
            "cpu": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "layout": self.layout,
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        from megatron.core import tensor_parallel

        if state.get("layout") != self.layout:
            return
        torch.set_rng_state(state["cpu"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])


class SelectorPart:
    """The token selector's state (random strategy's step, threshold scope's running quantile), per rank."""

    per_rank = True

    def __init__(self, selector):
        self.selector = selector

    def state_dict(self) -> dict:
        return self.selector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state)


class DeepSpeedEnginePart:
    """DeepSpeed's engine files (ZeRO-partitioned optimizer state, its own weights) for an exact resume."""

    def __init__(self, ds, position: DataPosition, train_cfg):
        self.ds, self.position, self.train_cfg = ds, position, train_cfg

    def save_files(self, directory: Path) -> None:
        self.ds.save(str(directory.parent), directory.name, client_state={"iteration": self.position.iteration})

    def load_files(self, directory: Path) -> None:
        if not any(directory.glob("*optim_states.pt")) and not any(directory.glob("*model_states.pt")):
            raise CheckpointError(
                f"'{directory}' is not a DeepSpeed training checkpoint of megatron_slm (no engine "
                "files); resume it without --deepspeed, or start from its weights with "
                "--pretrained-checkpoint"
            )
        self.ds.load(str(directory.parent), directory.name)
        apply_optimizer_settings(self.ds.optimizer.param_groups, self.train_cfg)


def layout() -> dict:
    """This run's TP, PP and world size (what per-rank state belongs to)."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "world": dist.get_world_size(),
    }
