"""Process groups: torch.distributed (NCCL on CUDA, gloo on CPU) and megatron-core's parallel_state."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_slm import lifecycle
from megatron_slm.config import data_parallel_size
from megatron_slm.parallel import cpu_shims


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> None:
    """Initialise torch.distributed from the torchrun environment and megatron-core's model-parallel groups.

    ``virtual_pipeline_model_parallel_size``: model chunks per pipeline rank (the interleaved schedule), or None."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_shims.apply()
    if "RANK" not in os.environ:  # run without torchrun: a single process
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    data_parallel_size(dist.get_world_size(), tensor_model_parallel_size, pipeline_model_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the job: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks, the same on every rank (one all-reduce; every rank must call it)."""
    box = torch.tensor([float(value)], device=device())  # NCCL reduces device tensors only
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.item()


def agreed_stop() -> str | None:
    """The stop signal (lifecycle.received) any rank received, the same name on every rank: a signal may reach
    the ranks at different steps, so all act on the largest signal number seen by any. Every rank must call it."""
    name = lifecycle.received()
    number = int(max_over_ranks(signal.Signals[name].value if name else 0))
    return signal.Signals(number).name if number else None


def free_port() -> int:
    """A free TCP port on loopback, for a local rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
