"""Bytes of optimizer memory a rank holds, counted tensor by tensor (the distributed-optimizer test and benchmark)."""

from __future__ import annotations


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def optimizer_bytes(trainer) -> dict:
    """This rank's ``state`` (Adam's moments), ``master`` (fp32 master weights kept apart from the model's own
    weights: none for a plain fp32 run, whose optimizer updates the weights themselves) and ``grads`` (DDP's
    gradient buffers plus any separate gradient copy the optimizer holds), in bytes."""
    model, opt = trainer.model, trainer.optimizer
    weight_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grad_storages = {b.grad_data.untyped_storage().data_ptr() for b in model.buffers}
    state = master = extra_grads = 0
    seen = set()
    for sub in getattr(opt, "chained_optimizers", [opt]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if (p.data_ptr(), p.numel()) in seen:
                    continue
                seen.add((p.data_ptr(), p.numel()))
                if p.untyped_storage().data_ptr() not in weight_storages:
                    master += _nbytes(p)
                if p.grad is not None and p.grad.untyped_storage().data_ptr() not in grad_storages:
                    extra_grads += _nbytes(p.grad)
                state += sum(_nbytes(v) for k, v in inner.state[p].items() if k != "step")
    grads = sum(_nbytes(b.grad_data) for b in model.buffers) + extra_grads
    return {"state": state, "master": master, "grads": grads}
