"""Which samples each data-parallel rank trains on in each step."""

from __future__ import annotations

import torch


def micro_batches(
    samples, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[dict]:
    """The micro-batches data-parallel rank ``dp_rank`` processes in training step ``step`` (0-based).

    The global batch is ``samples[step*G : (step+1)*G]``; rank r takes the r-th of ``dp_size`` contiguous
    equal parts and splits it into micro-batches of ``micro_batch_size``; fields are stacked to [b, ...].
    Sample order within a global batch is therefore independent of DP size and micro-batch size.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must lie in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
    if step < 0 or micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"need step >= 0 and global_batch_size={global_batch_size} divisible by micro_batch_size x "
            f"data-parallel size = {micro_batch_size} x {dp_size}"
        )
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    batches = []
    for start in range(first, first + per_rank, micro_batch_size):
        items = [samples[i] for i in range(start, start + micro_batch_size)]
        batches.append({k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]})
    return batches


def to_device(mbs: list[dict], device: torch.device | None = None) -> list[dict]:
    """Moves every tensor of the micro-batches to ``device`` (default: this rank's, CUDA or CPU), in place:
    the same dicts, so fields added later (reference scores, selections) stay visible to the caller."""
    if device is None:
        from megatron_slm.parallel.distributed import device as rank_device

        device = rank_device()
    for mb in mbs:
        for k, v in mb.items():
            if isinstance(v, torch.Tensor) and v.device != device:
                mb[k] = v.to(device, non_blocking=True)
    return mbs
