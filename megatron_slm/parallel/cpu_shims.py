"""Every workaround for megatron-core's CUDA assumptions, in one place; ``apply`` only without CUDA.

megatron-core 0.16 hard-codes ``device="cuda"`` in a handful of buffers (schedules, DDP buffers, p2p
shapes, optimizer scalars, the default causal mask), asserts ``torch.cuda.*Tensor`` types in the
optimizer/clip path and keeps its model-parallel RNG streams on the CUDA generator.  On a CPU-only torch
(tests, CI, the demo) we redirect those to the CPU.  Nothing of ``apply`` runs when CUDA is available.

``meta_stays_meta`` is the one shim for every machine: a scoped mode for building a model on the meta device
(``model.build.build_model(meta=True)``, used by ``slm plan``).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import warnings

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False

# Tensor factories whose ``device=`` megatron-core sets to "cuda" or to torch.cuda.current_device().
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
}
_TENSOR_CUDA = torch.Tensor.cuda  # the original method, before ``apply`` replaces it on a CPU-only torch


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # an int device is a CUDA ordinal
    return torch.device(device).type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device=cuda`` to CPU in tensor factories while megatron-core code runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Optimizer and grad-clip code accept only 'torch.cuda.*Tensor' type strings.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _MetaStaysMeta(TorchFunctionMode):
    """Returns a meta tensor's ``.cuda()`` as the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _TENSOR_CUDA and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def meta_stays_meta() -> TorchFunctionMode:
    """Context: a meta tensor's ``.cuda()`` leaves it on the meta device. megatron-core moves a tied output layer's
    copy (last stage, PP > 1) to CUDA before its all-reduce, which a meta build cannot do (there is nothing to
    copy, and maybe no GPU). A torch function mode rather than a patch of ``torch.Tensor.cuda``: it holds only in
    this thread, only inside the ``with``."""
    return _MetaStaysMeta()


def on_cpu(fn):
    """Decorator: run ``fn`` with CUDA tensor factories redirected to the CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpu():
            return fn(*args, **kwargs)

    return wrapper


class _CpuRNGStatesTracker:
    """CPU stand-in for megatron's CudaRNGStatesTracker: named RNG streams on the CPU generator.

    The CUDA tracker's state setter goes through torch.cuda._lazy_call, which on a CPU build queues
    silently and never runs, so forks would not be isolated."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self.states_ = {k: v.clone() for k, v in states.items()}

    def is_initialized(self):
        return bool(self.states_)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def apply() -> None:
    """Install the CPU workarounds. Idempotent; a no-op when CUDA is available."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    _APPLIED = True
    warnings.filterwarnings("ignore", message="Apex is not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")

    # megatron.core.jit picks torch.compile at import; fused paths are off on CPU and dynamo's import
    # costs seconds per process.
    import megatron.core.jit as mjit

    mjit.disable_jit_fuser()

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.Tensor.cuda = lambda self, *a, **k: self

    from megatron.core.tensor_parallel import random as mrandom

    tracker = _CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    # Activation recomputation (tensor_parallel.checkpoint) saves and restores the CUDA generator's state next
    # to the CPU one and the tracker's; without CUDA there is none (torch.cuda's getter raises), and the CPU
    # state plus the tracker above already hold every stream the recomputed forward draws from.
    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    from megatron.core.pipeline_parallel import schedules

    for name in (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
    ):
        setattr(schedules, name, on_cpu(getattr(schedules, name)))

    from megatron.core import optimizer as moptim
    from megatron.core.distributed import distributed_data_parallel as mddp
    from megatron.core.optimizer import optimizer as moptimizer

    moptim.get_megatron_optimizer = on_cpu(moptim.get_megatron_optimizer)
    for cls in (
        moptimizer.MegatronOptimizer,
        moptimizer.FP32Optimizer,
        moptimizer.MixedPrecisionOptimizer,
        moptimizer.ChainedOptimizer,
    ):
        for stage in ("step", "prepare_grads", "get_grad_norm", "step_with_ready_grads"):  # the trainer runs
            if stage in vars(cls):  # step()'s stages one by one (a non-finite step is vetoed before the update)
                setattr(cls, stage, on_cpu(vars(cls)[stage]))
    from megatron.core.optimizer import clip_grads

    clip_grads.clip_grad_by_total_norm_fp32 = on_cpu(clip_grads.clip_grad_by_total_norm_fp32)
    mddp.DistributedDataParallel.__init__ = on_cpu(mddp.DistributedDataParallel.__init__)

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.cache
    def causal_mask(sq, skv=None):
        skv = sq if skv is None else skv
        return torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=1 + skv - sq)

    def sliding_window_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    # dist_checkpointing's writer builds its result queue from a spawn-context Manager, which re-imports
    # __main__ in a new process (seconds per save; a hang for scripts without a __main__ guard). In a
    # synchronous save the queue is filled and read by this same process: an in-process queue suffices (a
    # multiprocessing queue's feeder thread races the immediate get_nowait under load).
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = functools.lru_cache(maxsize=None)(queue.Queue)

    for module in (tutils, fused_softmax):
        module.get_default_causal_mask = causal_mask
        module.get_sliding_window_causal_mask = sliding_window_mask


def apply_deepspeed() -> None:
    """DeepSpeed on CPU: skip its shared-memory all-reduce op, which it JIT-compiles (about a minute, with
    ninja and a C++ compiler) on every fresh machine; gloo's all-reduce serves the CPU runs. No-op on CUDA."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
