"""``slm plan``: per-GPU memory and speed of a run's layout, before launch, without a GPU.

**Parameters** are counted by building the real megatron-core ``GPTModel`` slice of a rank with the builder of
``slm train`` on the meta device (``model.build.build_model(meta=True)``: no memory, no init cost) under a
stand-in process group (torch's ``fake`` backend) on which megatron-core's ``parallel_state`` is initialised for
the layout, so each rank's TP shards, pipeline stage (embedding on the first, final norm + output layer on the
last, ``num_layers / PP`` layers each) and padded vocabulary are exactly what ``slm train`` builds. Policy and
reference are counted alike. Totals are reported as built (vocab padded to ``make_vocab_size_divisible_by x TP``)
and unpadded.

**State per rank** (``P`` = the rank's policy parameters, megatron-core's DDP and optimizer as the trainer sets
them up):

* policy weights: ``2 P`` in bf16 (``config.bf16_enabled``), else ``4 P``;
* gradients: ``4 P``, DDP's fp32 ``main_grad`` buffer (``grad_reduce_in_fp32=True``); not sharded by the
  distributed optimizer (it reduce-scatters into the full buffer);
* optimizer: Adam's two fp32 moments ``8 P`` plus, in bf16 mixed precision only, fp32 master weights ``4 P``
  (fp32 training updates the weights themselves). With megatron-core's distributed optimizer both are sharded
  over data parallel (``/ DP``: each DP rank owns a contiguous 1/DP range of the grad buffer); weights and
  gradients are not. Buffer padding (< 64 elements per parameter and ``lcm(DP, 128)`` per bucket with the
  distributed optimizer) is not counted;
* reference weights in their dtype (``config.reference_bf16``); no gradients, no optimizer state.

**Activations** of one micro-batch, per layer: Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models" (2022), section 4, redone for this project's Llama layer (RMSNorm, GQA with ``kv =
num_query_groups * head_dim``, RoPE, SwiGLU, no dropout, fused attention) as megatron-core's local layer spec
with the SDPA core (``model/attention.py``) saves tensors for backward, in bytes per token with ``e`` the element
size and ``t`` the TP size (``t`` divides the first term only with sequence parallelism)::

    6 h e                      two RMSNorms: input, normalised input, output (the next matmul's input)
    + (3 h + 3 kv + 5 f) e / t QKV output (V is a view that keeps it), Q and K after RoPE, attention output,
                               SwiGLU: fc1 output (2f), linear half + offset, SiLU output, their product
    + 4 a / t + 8              fp32 logsumexp of the fused attention, RMSNorm reciprocal RMS (2 x 4)

plus per layer and micro-batch ``4 s d e`` (RoPE cos/sin tables) and, with a sliding window, SDPA's explicit
mask ``s^2 e`` (TransformerEngine handles windows without a mask). Fused attention (SDPA flash/efficient,
TE/cuDNN) keeps no ``s^2`` probabilities, so Korthikanti's ``5 a s / h`` term is absent. Selective recompute
(megatron-core's ``core_attn``) drops only the logsumexp and the mask; full recompute keeps each checkpoint's
input ``h e / (t if SP)`` per layer (``uniform``: every N layers; ``block``: the first N layers of the stage,
the rest keep everything), plus one group's full activations while it is recomputed in the backward.
Per stage and micro-batch: the first keeps the token ids (8 bytes per token), stages other than the last keep
their output for the pipeline backward (``h e``), the last keeps the final norm's (``2 h e + 4``).

1F1B keeps the activations of ``min(PP - p, M)`` micro-batches on pipeline rank ``p`` (``M`` micro-batches per
DP rank), so the first stage holds ``min(PP, M)`` and the last one; interleaved (``m`` chunks per rank):
``(PP - p - 1) * 2 + (m - 1) * PP + 1`` chunk micro-batches of ``L / (PP m)`` layers each.

**Loss head** (last stage, ``vocab_parallel_ce.py``): kept for backward ``k s b (V/t + h) e`` (selected logit
and hidden rows; ``k`` the selected fraction, exact per micro-batch in the ``micro_batch`` scope, an average in
the others) plus 20 bytes per selected token of indices, labels and logsumexp; while the loss runs, the
micro-batch's no-grad logits ``s b V/t e`` and one fp32 block of them (at most the module's block budget).

**Forward-only passes** (the reference every step, the policy's scoring pass in the ``global_batch`` scope)
run before the training pass and keep no activations: their peak is one layer's working set (residual input
and normalised input ``2 h e``, SwiGLU ``5 f e / t``) or the head's block of logits, whichever is larger.

**Peak per rank** = weights + gradients + optimizer + reference + the step's micro-batches on the device (28
bytes per token, + 4 for reference scores on the last stage) + the largest of (training pass: activations in
flight, the recompute working set and the loss head; forward-only pass; optimizer step temporaries: torch's
foreach Adam allocates one fp32 tensor the size of the optimizer's parameters) + a runtime reserve (assumed
3 GiB: CUDA context, NCCL communicators, cuBLAS workspace, allocator fragmentation).

**Speed**: ``megatron_slm.planning.flops.training_step_flops`` (policy forward + backward, the online reference's
forward, the ``global_batch`` scoring pass) plus recomputation (hardware FLOPs: full = one more forward of the
layers, selective = the attention core's), at an assumed MFU of an assumed peak, stretched by the 1F1B bubble
``(PP - 1) / (M m)``. Tensor- and data-parallel communication are not modelled (they are part of what the MFU
assumes), so layouts of one size differ only by bubble and recomputation here; prefer the smallest TP x PP
that fits.

**Offline scoring** (``slm plan --scoring-tokens N``; ``megatron_slm/scoring.py`` and ``data/scores.py``): the
scoring run's ``--train-iters`` is the largest that scores at most the ``N`` tokens of the datasets, ``T =
floor(N / (G s))`` (global batch ``G``, sequence ``s``), so it scores ``T G`` samples of ``s`` tokens. Time: the
reference's forward only (``flops.reference_forward_flops``, 1/3 of its forward + backward) at the assumed MFU of
the assumed peak, stretched by the forward-only pipeline's bubble ``(PP - 1) / (M m)``. Memory per GPU: the
reference's weights, the step's micro-batches (+ their fp32 scores on the last stage), the forward-only working
set above and the runtime reserve. Disk, in bytes:

* sidecars: one per dataset, over every token of its token files (``N``), values ``4 N`` (fp32) or ``2 N``
  (bf16), plus a megatron-core ``.idx`` of ``34`` header bytes + ``4 + 8`` per sequence (length, pointer) + ``8``
  per document boundary (``D + 1`` of them); this project's preprocessing writes one sequence per document, so
  ``42 + 20 D`` per dataset (``D`` its documents; unknown: assumed one per ``ASSUMED_TOKENS_PER_DOCUMENT``);
* parts: each writer rank (TP rank 0 of the last stage of each DP rank) saves one part per step, ``T x DP`` in
  all, all on disk until the merge: ``G / DP`` samples of a dataset id (int64 for a single dataset, int16 from a
  blend), ``s`` int64 label positions and ``s`` fp32 scores (``--dtype`` applies to the sidecars only), inside
  torch.save's zip container (``PART_CONTAINER_BYTES``, measured);
* the merge (one process, rank 0) reads every part, fills one fp32 ``<output>.flat.npy`` memmap per dataset
  (``4 N`` + a 128-byte header, written once and read back once: no page cache assumed), writes the sidecars
  (values + ``.idx``) and reads the token and sidecar indices for their checksums (four index reads); its time is
  those bytes at an assumed disk bandwidth. Disk at its peak: the parts, the flat files and the sidecars together
  (the parts are deleted last). Opening the parts one by one and the per-sample Python loop are not modelled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field

from megatron_slm.config import (
    Config,
    ModelConfig,
    ParallelConfig,
    data_parallel_size,
    padded_vocab_size,
    reference_in_memory,
    validate,
)
from megatron_slm.errors import ConfigError

GiB = float(1 << 30)
DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_ASSUMED_MFU = 0.40
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
RUNTIME_RESERVE_GIB = 3.0  # assumed: CUDA context, NCCL buffers, cuBLAS workspace, allocator fragmentation
DATA_BYTES_PER_TOKEN = 28  # tokens, labels, position_ids (int64) and loss_mask (fp32) of every micro-batch of the step
# Offline scoring (slm score-reference; see the module docstring)
DEFAULT_DISK_GBPS = 1.0  # assumed read + write bandwidth of the disk holding the parts and the sidecars (the merge)
ASSUMED_TOKENS_PER_DOCUMENT = 1000  # for the sidecars' .idx when the document count is not given
PART_CONTAINER_BYTES = 2470  # torch.save's zip container around a part's 3 tensors: 2,429-2,509 measured (torch 2.13)
IDX_HEADER_BYTES = 34  # megatron-core .idx: magic 9, version 8, dtype code 1, sequence count 8, document count 8
NPY_HEADER_BYTES = 128  # the merge's <output>.flat.npy (numpy format 1.0, 1-D)


# ----------------------------------------------------------------------------------------------
# Parameters: the real model slices, built on the meta device


@dataclass(frozen=True)
class RankParams:
    """Parameters one rank allocates for one model (its TP shard of its pipeline stage)."""

    held: int  # all of them
    tp_sharded: int  # of which split over TP (every TP rank holds another slice)
    replicated: int  # of which every TP rank holds a copy (norms)
    stage_duplicate: int = 0  # of which copy another stage's (a tied output layer on the last stage, PP > 1)

    def unique(self, tp_rank: int = 0) -> int:
        """The parameters no other rank holds (replicated ones counted on TP rank 0): sums to the model."""
        return self.tp_sharded + (self.replicated if tp_rank == 0 else 0) - self.stage_duplicate


@contextlib.contextmanager
def _standin_layout(tp: int, pp: int, tp_rank: int, pp_rank: int):
    """megatron-core's parallel_state for one rank of a TP x PP layout (DP = 1: parameters do not depend on DP),
    on torch's ``fake`` process-group backend: groups exist, nothing communicates."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized() or ps.model_parallel_is_initialized():
        raise RuntimeError(
            "the plan builds its meta models under a stand-in process group; call it from a "
            "process without torch.distributed initialised (slm plan, slm check-config)"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=tp_rank + tp * pp_rank, world_size=tp * pp)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, create_gloo_process_groups=False
        )
        got = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        if got != (tp_rank, pp_rank):
            raise RuntimeError(f"stand-in layout: expected TP/PP rank {(tp_rank, pp_rank)}, got {got}")
        yield ps
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def _meta_model(m: ModelConfig, par: ParallelConfig):
    """This rank's GPTModel as ``slm train`` builds it (``model.build.build_model``), on the meta device."""
    from megatron_slm.model.build import build_model

    return build_model(m, par, seed=0, meta=True)


@functools.lru_cache(maxsize=256)
def _rank_params_cached(model_key: tuple, tp: int, pp: int, tp_rank: int, pp_rank: int) -> RankParams:
    m = ModelConfig(**dict(model_key))
    # Sequence parallelism and interleaving change no parameter (and the torch norm refuses SP without TE).
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    with _standin_layout(tp, pp, tp_rank, pp_rank), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _meta_model(m, par)
        held = sharded = duplicate = 0
        for p in model.parameters():
            n = p.numel()
            held += n
            if getattr(p, "tensor_model_parallel", False):
                sharded += n
            if getattr(p, "shared_embedding", False) and not model.pre_process:
                duplicate += n
    return RankParams(held=held, tp_sharded=sharded, replicated=held - sharded, stage_duplicate=duplicate)


def rank_parameters(m: ModelConfig, tp: int, pp: int, tp_rank: int = 0, pp_rank: int = 0) -> RankParams:
    """The parameters of ``m`` that rank (tp_rank, pp_rank) of a TP x PP layout allocates (a meta-device build)."""
    key = tuple(sorted((f.name, getattr(m, f.name)) for f in dataclasses.fields(ModelConfig)))
    return _rank_params_cached(key, tp, pp, tp_rank, pp_rank)


def model_parameters(m: ModelConfig, tp: int, pp: int) -> int:
    """All parameters of ``m`` as built at TP x PP (vocabulary padded for TP), each counted once. TP ranks hold
    equal slices (the config checks divisibility) and middle stages equal layer counts, so the first, last and
    one middle stage at TP rank 0 determine the sum; tests check it against every rank."""
    first, last = rank_parameters(m, tp, pp, 0, 0), rank_parameters(m, tp, pp, 0, pp - 1)

    def stage_total(r: RankParams) -> int:
        return r.unique(0) + (tp - 1) * (r.tp_sharded - r.stage_duplicate)

    if pp == 1:
        return stage_total(first)
    middle = stage_total(rank_parameters(m, tp, pp, 0, 1)) if pp > 2 else 0
    return stage_total(first) + stage_total(last) + (pp - 2) * middle


def unpadded_parameters(m: ModelConfig, tp: int, pp: int) -> int:
    """``model_parameters`` less the vocabulary padding rows (what the checkpoint on the hub holds)."""
    pad = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp) - m.vocab_size
    tables = 2 if m.untie_embeddings_and_output_weights else 1
    return model_parameters(m, tp, pp) - pad * m.hidden_size * tables


# ----------------------------------------------------------------------------------------------
# Activations


def _dims(m: ModelConfig):
    h, a = m.hidden_size, m.num_attention_heads
    d = h // a
    return h, m.ffn_hidden_size, a, d, (m.num_query_groups or a) * d


def layer_activation_bytes(m: ModelConfig, s: int, b: int, tp: int, sp: bool, e: int) -> dict:
    """Bytes one transformer layer saves for backward for one micro-batch ``[s, b]`` (see the module docstring):
    ``total``; ``attention_core`` (what selective recompute drops); ``checkpoint`` (what full recompute keeps)."""
    h, f, a, d, kv = _dims(m)
    tokens = s * b
    rep = tp if sp else 1
    per_token = 6 * h * e / rep + (3 * h + 3 * kv + 5 * f) * e / tp + 8 / rep
    lse = tokens * 4 * a / tp
    mask = s * s * e if m.sliding_window else 0  # SDPAttention builds the window's mask whenever one is set
    core = lse + mask
    total = tokens * per_token + core + 4 * s * d * e
    return dict(total=total, attention_core=core, checkpoint=tokens * h * e / rep)


@dataclass
class StageActivations:
    per_microbatch: float  # bytes one micro-batch keeps on this stage, with the configured recompute
    in_flight: float  # micro-batches (or chunk micro-batches when interleaved) kept at the peak
    held: float  # per_microbatch x in_flight
    recompute_working_set: float  # one recomputed group's activations, during the backward
    by_recompute: dict  # per-micro-batch bytes with none / selective / full recompute (for comparison)


def stage_activations(
    cfg: Config,
    pp_rank: int,
    num_microbatches: int,
    e: int,
    recompute: str | None = None,
    method: str | None = None,
    num_layers: int | None = None,
) -> StageActivations:
    """Activations pipeline rank ``pp_rank`` holds for the policy's training pass (without the loss head)."""
    m, par, tr = cfg.model, cfg.parallel, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    sp = par.sequence_parallel and tp > 1
    s, b = tr.seq_length, tr.micro_batch_size
    chunks = (
        m.num_layers // (pp * par.num_layers_per_virtual_pipeline_stage)
        if par.num_layers_per_virtual_pipeline_stage
        else 1
    )
    layers = m.num_layers // (pp * chunks)  # per model chunk
    lay = layer_activation_bytes(m, s, b, tp, sp, e)
    first, last = pp_rank == 0, pp_rank == pp - 1
    extras = (s * b * 8 if first else 0) + (
        s * b * (2 * m.hidden_size * e / (tp if sp else 1) + 4)
        if last
        else s * b * m.hidden_size * e / (tp if sp else 1)
    )
    extras /= chunks  # the embedding / final norm / stage output belong to one chunk each

    def per_mb(kind, meth, n):
        if kind is None:
            return layers * lay["total"] + extras, 0.0
        if kind == "selective":
            return layers * (lay["total"] - lay["attention_core"]) + extras, 0.0
        n = n or 1
        if meth == "block":
            k = min(n, layers)
            return k * lay["checkpoint"] + (layers - k) * lay["total"] + extras, lay["total"]
        return math.ceil(layers / n) * lay["checkpoint"] + extras, min(n, layers) * lay["total"]

    kind = tr.recompute_granularity if recompute is None else (None if recompute == "none" else recompute)
    meth = tr.recompute_method if method is None else method
    n = tr.recompute_num_layers if num_layers is None else num_layers
    mb, working = per_mb(kind, meth, n)
    if chunks == 1:
        in_flight = min(pp - pp_rank, num_microbatches)
    else:
        in_flight = min((pp - pp_rank - 1) * 2 + (chunks - 1) * pp + 1, num_microbatches * chunks)
    by = {
        "none": per_mb(None, None, None)[0],
        "selective": per_mb("selective", None, None)[0],
        "full": per_mb("full", "uniform", 1)[0],
    }
    return StageActivations(
        per_microbatch=mb, in_flight=in_flight, held=mb * in_flight, recompute_working_set=working, by_recompute=by
    )


def loss_head_bytes(cfg: Config, e: int, on_gpu: bool) -> dict:
    """The fused selective output layer + CE on the last stage, one micro-batch: ``kept`` for backward and the
    ``transient`` logits while the loss runs (``vocab_parallel_ce.py``)."""
    from megatron_slm.loss.vocab_parallel_ce import _BLOCK_BYTES

    m, tr, tp = cfg.model, cfg.train, cfg.parallel.tensor_model_parallel_size
    tokens = tr.seq_length * tr.micro_batch_size
    part = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp) // tp
    k = cfg.slm.slm_select_ratio if cfg.slm.loss_mode == "slm" else 1.0
    kept = k * tokens * ((part + m.hidden_size) * e + 20)
    budget = _BLOCK_BYTES["cuda" if on_gpu else "cpu"]
    transient = tokens * part * e + min(tokens * part * 4, max(budget, 8 * 4 * part))
    return dict(kept=kept, transient=transient)


def forward_only_bytes(m: ModelConfig, cfg: Config, e: int, last: bool, on_gpu: bool) -> float:
    """Peak working set of a no-grad pipeline pass of ``m`` over one micro-batch on one stage."""
    from megatron_slm.loss.vocab_parallel_ce import _HEAD_BLOCK_BYTES

    par, tr = cfg.parallel, cfg.train
    tp = par.tensor_model_parallel_size
    sp = par.sequence_parallel and tp > 1
    tokens = tr.seq_length * tr.micro_batch_size
    h, f, *_ = _dims(m)
    layer = tokens * (2 * h * e / (tp if sp else 1) + 5 * f * e / tp) + 2 * tokens * h * e  # + stage in/out
    if not last:
        return layer
    part = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp) // tp
    rows = min(tokens, max(8, _HEAD_BLOCK_BYTES["cuda" if on_gpu else "cpu"] // (4 * part)))
    return max(layer, tokens * h * e + rows * part * (e + 4) + tokens * 12)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class StagePlan:
    """One pipeline rank (first or last stage; TP ranks of a stage are alike). Bytes unless said otherwise."""

    name: str
    pp_rank: int
    policy_params: int
    reference_params: int
    weights: float
    grads: float
    adam: float  # Adam moments, full (without the distributed optimizer)
    master: float  # fp32 master weights, full (bf16 only)
    adam_distributed: float  # with the distributed optimizer (/ DP)
    master_distributed: float
    reference_weights: float
    data: float
    activations: StageActivations
    loss_head: dict
    forward_only: float
    reserve: float

    def optimizer(self, distributed: bool) -> float:
        return self.adam_distributed + self.master_distributed if distributed else self.adam + self.master

    def optimizer_step_transient(self, distributed: bool) -> float:
        return (self.adam_distributed if distributed else self.adam) / 2  # one fp32 tensor per optimizer parameter

    def training_pass(self) -> float:
        a = self.activations
        return a.held + a.recompute_working_set + self.loss_head.get("kept", 0) + self.loss_head.get("transient", 0)

    def static(self, distributed: bool) -> float:
        return self.weights + self.grads + self.optimizer(distributed) + self.reference_weights + self.data

    def peak_part(self, distributed: bool) -> tuple[str, float]:
        """The largest transient phase: (name, bytes)."""
        return max(
            [
                ("training pass", self.training_pass()),
                ("forward-only pass", self.forward_only),
                ("optimizer step", self.optimizer_step_transient(distributed)),
            ],
            key=lambda x: x[1],
        )

    def total(self, distributed: bool) -> float:
        return self.static(distributed) + self.peak_part(distributed)[1] + self.reserve


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    virtual_chunks: int
    sequence_parallel: bool
    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    global_batch_size: int
    bf16: bool
    reference_bf16: bool | None  # None: no reference in memory
    distributed_optimizer: bool
    recompute: str
    policy_total: int
    policy_total_unpadded: int
    reference_total: int
    reference_total_unpadded: int
    padded_vocab: int
    stages: list[StagePlan]
    gpu_memory: float
    assumed_mfu: float
    peak_tflops: float
    step_flops: float
    recompute_flops: float
    bubble: float
    step_time: float
    tokens_per_s_per_gpu: float
    model_cfg: ModelConfig
    notes: list[str] = field(default_factory=list)

    def worst(self, distributed: bool | None = None) -> StagePlan:
        d = self.distributed_optimizer if distributed is None else distributed
        return max(self.stages, key=lambda st: st.total(d))

    def total(self, distributed: bool | None = None) -> float:
        d = self.distributed_optimizer if distributed is None else distributed
        return self.worst(d).total(d)

    def fits(self, distributed: bool | None = None) -> bool:
        return self.total(distributed) <= self.gpu_memory

    def headroom(self, distributed: bool | None = None) -> float:
        return self.gpu_memory - self.total(distributed)

    @property
    def layout(self) -> str:
        text = f"TP={self.tp} x PP={self.pp} x DP={self.dp}"
        if self.virtual_chunks > 1:
            text += f" (VP {self.virtual_chunks} chunks)"
        return text + (" +SP" if self.sequence_parallel else "")

    def fit_line(self, distributed: bool | None = None) -> str:
        d = self.distributed_optimizer if distributed is None else distributed
        st = self.worst(d)
        verdict = "FITS" if self.fits(d) else "DOES NOT FIT"
        head = self.headroom(d)
        room = f"{head / GiB:.1f} GiB headroom" if head >= 0 else f"{-head / GiB:.1f} GiB over"
        return (
            f"{verdict}: {self.layout}{', distributed optimizer' if d else ''}, recompute {self.recompute}: "
            f"{st.total(d) / GiB:.1f} GiB of {self.gpu_memory / GiB:.0f} GiB on the most loaded rank "
            f"({st.name}), {room}"
        )


def _recompute_label(tr) -> str:
    if tr.recompute_granularity is None:
        return "none"
    if tr.recompute_granularity == "selective":
        return "selective"
    return f"full ({tr.recompute_method or 'uniform'}, {tr.recompute_num_layers or 1})"


def make_plan(
    cfg: Config,
    world_size: int,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    assumed_mfu: float = DEFAULT_ASSUMED_MFU,
    peak_tflops: float | None = DEFAULT_PEAK_TFLOPS,
    on_gpu: bool = True,
) -> Plan:
    """The memory and speed plan of ``cfg`` on ``world_size`` GPUs (see the module docstring).

    ``on_gpu``: the target machine; unset ``--bf16`` and ``--ref-dtype auto`` resolve as they would there
    (bf16 on a GPU), and the loss head's block budgets are the device's."""
    from megatron_slm.planning.flops import forward_flops_per_token, training_step_flops

    validate(cfg, world_size=world_size)
    m, ref_m, par, tr = cfg.model, cfg.reference.model, cfg.parallel, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = data_parallel_size(world_size, tp, pp)
    M = tr.global_batch_size // (tr.micro_batch_size * dp)
    notes = []
    bf16 = tr.bf16 if tr.bf16 is not None else on_gpu
    if tr.bf16 is None:
        notes.append(f"--bf16 unset: planned as on {'a GPU (bf16)' if on_gpu else 'the CPU (fp32)'}")
    has_ref = reference_in_memory(cfg)
    ref_bf16 = (on_gpu if cfg.reference.dtype == "auto" else cfg.reference.dtype == "bf16") if has_ref else None
    e, e_ref = (2 if bf16 else 4), (2 if ref_bf16 else 4)
    chunks = (
        m.num_layers // (pp * par.num_layers_per_virtual_pipeline_stage)
        if par.num_layers_per_virtual_pipeline_stage
        else 1
    )
    reserve = RUNTIME_RESERVE_GIB * GiB if on_gpu else 0.0
    tokens = tr.seq_length * tr.micro_batch_size

    stages = []
    for name, p in [("every rank", 0)] if pp == 1 else [("first stage", 0), ("last stage", pp - 1)]:
        pol = rank_parameters(m, tp, pp, 0, p)
        ref = rank_parameters(ref_m, tp, pp, 0, p) if has_ref else RankParams(0, 0, 0)
        P, last = pol.held, p == pp - 1
        fwd = forward_only_bytes(ref_m, cfg, e_ref, last, on_gpu) if has_ref else 0.0
        if cfg.slm.loss_mode == "slm" and cfg.slm.selection_scope == "global_batch":
            fwd = max(fwd, forward_only_bytes(m, cfg, e, last, on_gpu))
        stages.append(
            StagePlan(
                name=f"{name}, PP rank {p}" if pp > 1 else name,
                pp_rank=p,
                policy_params=P,
                reference_params=ref.held,
                weights=P * e,
                grads=P * 4.0,
                adam=P * 8.0,
                master=P * 4.0 if bf16 else 0.0,
                adam_distributed=P * 8.0 / dp,
                master_distributed=(P * 4.0 / dp) if bf16 else 0.0,
                reference_weights=ref.held * e_ref,
                data=M * tokens * (DATA_BYTES_PER_TOKEN + (4 if last and cfg.slm.loss_mode == "slm" else 0)),
                activations=stage_activations(cfg, p, M, e),
                loss_head=loss_head_bytes(cfg, e, on_gpu) if last else {},
                forward_only=fwd,
                reserve=reserve,
            )
        )

    flops = training_step_flops(cfg)
    rec = 0.0
    all_tokens = tr.global_batch_size * tr.seq_length
    if tr.recompute_granularity == "full":
        logits = 2 * m.hidden_size * padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
        rec = (forward_flops_per_token(m, tr.seq_length, tp) - logits) * all_tokens
    elif tr.recompute_granularity == "selective":
        rec = m.num_layers * 4 * tr.seq_length * m.hidden_size * all_tokens
    bubble = (pp - 1) / (M * chunks)
    peak = peak_tflops or DEFAULT_PEAK_TFLOPS
    step_time = (flops + rec) / (world_size * peak * 1e12 * assumed_mfu) * (1 + bubble)
    if m.sliding_window:
        notes.append(
            "sliding window: counted SDPA's explicit s x s mask per layer (the local spec); "
            "TransformerEngine's attention needs none"
        )
    if cfg.slm.loss_mode == "slm" and cfg.slm.selection_scope != "micro_batch":
        notes.append(
            f"loss head: k = {cfg.slm.slm_select_ratio} of a micro-batch's tokens assumed selected "
            f"(exact only in the micro_batch scope)"
        )
    return Plan(
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        virtual_chunks=chunks,
        sequence_parallel=par.sequence_parallel and tp > 1,
        num_microbatches=M,
        micro_batch_size=tr.micro_batch_size,
        seq_length=tr.seq_length,
        global_batch_size=tr.global_batch_size,
        bf16=bf16,
        reference_bf16=ref_bf16,
        distributed_optimizer=par.use_distributed_optimizer,
        recompute=_recompute_label(tr),
        policy_total=model_parameters(m, tp, pp),
        policy_total_unpadded=unpadded_parameters(m, tp, pp),
        reference_total=model_parameters(ref_m, tp, pp) if has_ref else 0,
        reference_total_unpadded=unpadded_parameters(ref_m, tp, pp) if has_ref else 0,
        padded_vocab=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp),
        stages=stages,
        gpu_memory=gpu_memory_gib * GiB,
        assumed_mfu=assumed_mfu,
        peak_tflops=peak,
        step_flops=flops,
        recompute_flops=rec,
        bubble=bubble,
        step_time=step_time,
        tokens_per_s_per_gpu=all_tokens / step_time / world_size,
        model_cfg=m,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------
# Offline scoring: slm score-reference


@dataclass
class ScoringStage:
    """Memory of one pipeline rank of the scoring run (bytes)."""

    name: str
    reference_params: int
    weights: float
    data: float  # the step's micro-batches (+ their fp32 scores on the last stage)
    forward_only: float
    reserve: float

    @property
    def total(self) -> float:
        return self.weights + self.data + self.forward_only + self.reserve


@dataclass
class ScoringPlan:
    """``slm score-reference`` over ``corpus_tokens`` tokens (see the module docstring). Bytes unless said
    otherwise; ``sidecar_*``, ``merge_*``, ``disk_peak`` and ``merge_seconds`` are per sidecar dtype."""

    world_size: int
    tp: int
    pp: int
    dp: int
    corpus_tokens: int
    documents: int
    documents_assumed: bool
    datasets: int
    seq_length: int
    global_batch_size: int
    num_microbatches: int
    train_iters: int
    samples: int
    scored_tokens: int
    flops_per_token: float
    flops: float
    reference_bf16: bool
    assumed_mfu: float
    peak_tflops: float
    bubble: float
    step_time: float
    wall_seconds: float
    gpu_hours: float
    stages: list[ScoringStage]
    gpu_memory: float
    sidecar_values: dict  # {"fp32": 4 N, "bf16": 2 N}
    sidecar_index: int
    num_parts: int
    samples_per_part: int
    dataset_id_bytes: int
    part_bytes: int  # one part file
    parts_bytes: int  # all of them: the parts directory just before the merge
    flat_bytes: int  # the merge's fp32 memmaps
    merge_read: dict
    merge_write: dict
    disk_bandwidth: float  # bytes/s
    model_cfg: ModelConfig

    def sidecar_bytes(self, dtype: str) -> int:
        return self.sidecar_values[dtype] + self.sidecar_index

    def merge_seconds(self, dtype: str) -> float:
        return (self.merge_read[dtype] + self.merge_write[dtype]) / self.disk_bandwidth

    def disk_peak(self, dtype: str) -> int:
        return self.parts_bytes + self.flat_bytes + self.sidecar_bytes(dtype)

    def total_memory(self) -> float:
        return max(st.total for st in self.stages)


def make_scoring_plan(
    cfg: Config,
    world_size: int,
    tokens: int,
    documents: int | None = None,
    datasets: int = 1,
    assumed_mfu: float = DEFAULT_ASSUMED_MFU,
    peak_tflops: float | None = DEFAULT_PEAK_TFLOPS,
    disk_gbps: float = DEFAULT_DISK_GBPS,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    on_gpu: bool = True,
) -> ScoringPlan:
    """The plan of ``slm score-reference`` of ``cfg`` on ``world_size`` GPUs over datasets of ``tokens`` tokens
    (``documents`` documents, ``datasets`` of them): time, memory per GPU, sidecar, part and merge bytes (see the
    module docstring)."""
    from megatron_slm.planning.flops import forward_flops_per_token, reference_forward_flops

    if tokens < 1 or datasets < 1 or (documents is not None and documents < 1) or disk_gbps <= 0:
        raise ConfigError(
            f"scoring plan: tokens, datasets, documents and the disk bandwidth must be positive (got "
            f"{tokens}, {datasets}, {documents}, {disk_gbps})"
        )
    validate(cfg, world_size=world_size, check_reference=True)
    ref_m, par, tr = cfg.reference.model, cfg.parallel, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = data_parallel_size(world_size, tp, pp)
    G, s, b = tr.global_batch_size, tr.seq_length, tr.micro_batch_size
    M = G // (b * dp)
    chunks = (
        cfg.model.num_layers // (pp * par.num_layers_per_virtual_pipeline_stage)
        if par.num_layers_per_virtual_pipeline_stage
        else 1
    )
    iters = tokens // (G * s)
    if iters < 1:
        raise ConfigError(f"scoring plan: {tokens:,} tokens hold no global batch of {G} x {s} tokens")
    samples = iters * G
    scored = samples * s

    # time: the reference's forward over every scored token, stretched by the forward-only pipeline's bubble
    per_token = forward_flops_per_token(ref_m, s, tp)
    flops = reference_forward_flops(cfg, scored)
    peak = peak_tflops or DEFAULT_PEAK_TFLOPS
    bubble = (pp - 1) / (M * chunks)
    step_time = per_token * G * s / (world_size * peak * 1e12 * assumed_mfu) * (1 + bubble)
    wall = step_time * iters

    # memory per GPU
    ref_bf16 = on_gpu if cfg.reference.dtype == "auto" else cfg.reference.dtype == "bf16"
    e_ref = 2 if ref_bf16 else 4
    reserve = RUNTIME_RESERVE_GIB * GiB if on_gpu else 0.0
    stages = []
    for name, p in [("every rank", 0)] if pp == 1 else [("first stage", 0), ("last stage", pp - 1)]:
        last = p == pp - 1
        ref = rank_parameters(ref_m, tp, pp, 0, p)
        stages.append(
            ScoringStage(
                name=f"{name}, PP rank {p}" if pp > 1 else name,
                reference_params=ref.held,
                weights=ref.held * e_ref,
                data=M * b * s * (DATA_BYTES_PER_TOKEN + (4 if last else 0)),
                forward_only=forward_only_bytes(ref_m, cfg, e_ref, last, on_gpu),
                reserve=reserve,
            )
        )

    # disk
    docs = documents if documents is not None else max(1, round(tokens / ASSUMED_TOKENS_PER_DOCUMENT))
    index = datasets * (IDX_HEADER_BYTES + 8) + 20 * docs  # per dataset 34 + 12 S + 8 (D + 1), S = D
    values = {"fp32": 4 * tokens, "bf16": 2 * tokens}
    per_part = G // dp
    id_bytes = 8 if datasets == 1 else 2  # torch.long zeros without a blend; BlendedDataset's int16 dataset_index
    part = per_part * (id_bytes + s * (8 + 4)) + PART_CONTAINER_BYTES
    num_parts = iters * dp
    parts_bytes = num_parts * part
    flat = 4 * tokens + NPY_HEADER_BYTES * datasets
    read = {d: parts_bytes + flat + 4 * index for d in values}
    write = {d: flat + values[d] + index for d in values}
    return ScoringPlan(
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        corpus_tokens=tokens,
        documents=docs,
        documents_assumed=documents is None,
        datasets=datasets,
        seq_length=s,
        global_batch_size=G,
        num_microbatches=M,
        train_iters=iters,
        samples=samples,
        scored_tokens=scored,
        flops_per_token=per_token,
        flops=flops,
        reference_bf16=ref_bf16,
        assumed_mfu=assumed_mfu,
        peak_tflops=peak,
        bubble=bubble,
        step_time=step_time,
        wall_seconds=wall,
        gpu_hours=wall * world_size / 3600,
        stages=stages,
        gpu_memory=gpu_memory_gib * GiB,
        sidecar_values=values,
        sidecar_index=index,
        num_parts=num_parts,
        samples_per_part=per_part,
        dataset_id_bytes=id_bytes,
        part_bytes=part,
        parts_bytes=parts_bytes,
        flat_bytes=flat,
        merge_read=read,
        merge_write=write,
        disk_bandwidth=disk_gbps * 1e9,
        model_cfg=ref_m,
    )


# ----------------------------------------------------------------------------------------------
# Output


def _g(x: float) -> str:
    return f"{x / GiB:.2f}"


def _shape(m: ModelConfig) -> str:
    return (
        f"{m.num_layers} layers, hidden {m.hidden_size}, FFN {m.ffn_hidden_size}, {m.num_attention_heads} heads / "
        f"{m.num_query_groups} KV groups, vocab {m.vocab_size}"
        f"{', tied' if not m.untie_embeddings_and_output_weights else ''}"
    )


def summary_row(plan: Plan) -> dict:
    """One line of the table in docs/plan.md: the most loaded rank with the configured optimizer and recompute."""
    d = plan.distributed_optimizer
    st = plan.worst(d)
    return {
        "layout": plan.layout
        + (" distopt" if d else "")
        + (f" recompute {plan.recompute}" if plan.recompute != "none" else ""),
        "params/rank policy+ref": f"{st.policy_params / 1e6:,.0f}M + {st.reference_params / 1e6:,.0f}M",
        "weights": f"{st.weights / GiB:.1f} + {st.reference_weights / GiB:.1f}",
        "grads": f"{st.grads / GiB:.1f}",
        "optimizer (+master)": f"{st.optimizer(d) / GiB:.1f}",
        "activations": f"{st.training_pass() / GiB:.1f}",
        "total GiB": f"{st.total(d) / GiB:.1f}",
        "fits?": ("yes" if plan.fits(d) else "NO") + f" ({plan.headroom(d) / GiB:+.0f})",
        "est. tokens/s/GPU": f"{plan.tokens_per_s_per_gpu:,.0f}",
    }


def format_plan(plan: Plan) -> str:
    d = plan.distributed_optimizer
    pdt = "bf16" if plan.bf16 else "fp32"
    lines = [
        f"slm plan: {plan.world_size} GPUs x {plan.gpu_memory / GiB:.0f} GiB, {plan.layout}",
        f"  policy:    {_shape(plan.model_cfg)}; {plan.policy_total:,} parameters as built (vocab padded to "
        f"{plan.padded_vocab}), {plan.policy_total_unpadded:,} unpadded",
    ]
    if plan.reference_bf16 is not None:
        lines.append(
            f"  reference: {plan.reference_total:,} parameters as built, {plan.reference_total_unpadded:,} "
            f"unpadded, {'bf16' if plan.reference_bf16 else 'fp32'}, forward only"
        )
    else:
        lines.append("  reference: none in memory (CLM or offline scores)")
    lines += [
        f"  batch: micro-batch {plan.micro_batch_size} x seq {plan.seq_length}, global batch {plan.global_batch_size}"
        f" -> {plan.num_microbatches} micro-batches per DP rank per step",
        f"  precision: policy {pdt} weights, fp32 grads (DDP main_grad), fp32 Adam moments"
        f"{' + fp32 master weights' if plan.bf16 else ''}; recompute {plan.recompute}; distributed optimizer "
        f"{'on' if d else 'off'}",
        "",
    ]
    cols = [st.name for st in plan.stages]
    width = max(16, *(len(c) for c in cols))
    rows = []

    def row(label, values):
        rows.append(f"  {label:<52}" + "".join(f"{v:>{width + 2}}" for v in values))

    row("GiB per GPU", cols)
    row("policy parameters on the rank", [f"{st.policy_params:,}" for st in plan.stages])
    row("reference parameters on the rank", [f"{st.reference_params:,}" for st in plan.stages])
    row(f"policy weights ({pdt})", [_g(st.weights) for st in plan.stages])
    row("gradients (fp32 main_grad buffer)", [_g(st.grads) for st in plan.stages])
    row(
        "Adam moments (fp32)" + (f", / DP={plan.dp} distributed" if d else ""),
        [_g(st.adam_distributed if d else st.adam) for st in plan.stages],
    )
    if plan.bf16:
        row(
            "fp32 master weights" + (f", / DP={plan.dp} distributed" if d else ""),
            [_g(st.master_distributed if d else st.master) for st in plan.stages],
        )
    if plan.reference_bf16 is not None:
        row(
            f"reference weights ({'bf16' if plan.reference_bf16 else 'fp32'})",
            [_g(st.reference_weights) for st in plan.stages],
        )
    row("step's micro-batches on the device", [_g(st.data) for st in plan.stages])
    row("activations per micro-batch", [_g(st.activations.per_microbatch) for st in plan.stages])
    row("  x micro-batches in flight (1F1B)", [f"{st.activations.in_flight:g}" for st in plan.stages])
    row("  + recompute working set", [_g(st.activations.recompute_working_set) for st in plan.stages])
    row(
        "  + loss head (kept rows + logits while it runs)",
        [_g(sum(st.loss_head.values())) if st.loss_head else "-" for st in plan.stages],
    )
    row("= training pass", [_g(st.training_pass()) for st in plan.stages])
    row("forward-only pass working set (reference)", [_g(st.forward_only) for st in plan.stages])
    row("optimizer step temporaries (torch foreach Adam)", [_g(st.optimizer_step_transient(d)) for st in plan.stages])
    row("largest of the three", [st.peak_part(d)[0] for st in plan.stages])
    if plan.stages[0].reserve:
        row("runtime reserve (assumed)", [_g(st.reserve) for st in plan.stages])
    row("TOTAL", [_g(st.total(d)) for st in plan.stages])
    row(f"  with{'out' if d else ''} the distributed optimizer", [_g(st.total(not d)) for st in plan.stages])
    lines += rows + [""]
    lines.append(
        "activations per micro-batch by recompute (most loaded stage): "
        + ", ".join(f"{k} {_g(v)} GiB" for k, v in plan.worst().activations.by_recompute.items())
    )
    lines.append(plan.fit_line())
    other = plan.fit_line(not d)
    lines.append(
        f"  ({'without' if d else 'with'} the distributed optimizer: {other.split(':', 1)[0]}, "
        f"{plan.total(not d) / GiB:.1f} GiB)"
    )
    if not plan.fits():
        hints = []
        if not d and plan.dp > 1:
            hints.append(f"--use-distributed-optimizer ({plan.total(True) / GiB:.1f} GiB)")
        if plan.recompute == "none":
            st = plan.worst()
            saved = st.activations.held - st.activations.by_recompute["full"] * st.activations.in_flight
            hints.append(
                f"--recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "
                f"(about {saved / GiB:.1f} GiB less)"
            )
        hints.append("a larger TP or PP, or a smaller micro-batch")
        lines.append("  try: " + "; ".join(hints))
    lines += [
        "",
        f"speed (assumed MFU {plan.assumed_mfu:.2f} of an assumed {plan.peak_tflops:g} TFLOP/s bf16 peak per GPU"
        f"{', H100/H200' if plan.peak_tflops == DEFAULT_PEAK_TFLOPS else ''}; TP/DP communication not modelled):",
        f"  model FLOPs per step {plan.step_flops:.3g} (policy fwd+bwd, reference fwd), recompute "
        f"+{plan.recompute_flops:.3g}, 1F1B bubble {plan.bubble:.1%}",
        f"  est. step time {plan.step_time:.2f} s, {plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
        f"{plan.tokens_per_s_per_gpu * plan.world_size:,.0f} tokens/s in total",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def format_scoring_plan(sp: ScoringPlan) -> str:
    """The scoring section of ``slm plan``: every number with the assumption it rests on."""
    G, s = sp.global_batch_size, sp.seq_length
    rdt = "bf16" if sp.reference_bf16 else "fp32"
    docs = (
        f"{sp.documents:,} documents assumed: one per {ASSUMED_TOKENS_PER_DOCUMENT:,} tokens, --scoring-documents"
        if sp.documents_assumed
        else f"{sp.documents:,} documents"
    )
    ids = "int64: one dataset" if sp.datasets == 1 else "int16: a blend"
    worst = max(sp.stages, key=lambda st: st.total)
    fits = "FITS" if worst.total <= sp.gpu_memory else "DOES NOT FIT"
    lines = [
        f"offline scoring (slm score-reference) of {sp.corpus_tokens:,} tokens ({sp.datasets} dataset"
        f"{'s' if sp.datasets > 1 else ''}) on {sp.world_size} GPUs, TP={sp.tp} x PP={sp.pp} x DP={sp.dp}:",
        f"  --train-iters {sp.train_iters:,} = floor({sp.corpus_tokens:,} / ({G} x {s})): {sp.samples:,} samples, "
        f"{sp.scored_tokens:,} tokens scored",
        "    (score-reference refuses more than one epoch of a dataset's training split: lower it if --split "
        "leaves fewer)",
        f"  reference: {_shape(sp.model_cfg)}, {rdt}",
        f"  forward only: {sp.flops_per_token:,.0f} FLOPs per token (1/3 of fwd+bwd, seq {s}), {sp.flops:.3g} in all",
        f"  time: {_hours(sp.wall_seconds)} on {sp.world_size} GPUs = {sp.gpu_hours:,.1f} GPU-hours "
        f"({sp.step_time:.3f} s per step, pipeline bubble {sp.bubble:.1%})",
        f"    at an assumed MFU {sp.assumed_mfu:.2f} of an assumed {sp.peak_tflops:g} TFLOP/s per GPU",
        f"  memory per GPU ({worst.name}): {_g(worst.total)} GiB, {fits} in {sp.gpu_memory / GiB:.0f} GiB: "
        f"reference weights {_g(worst.weights)}",
        f"    + the step's {sp.num_microbatches} micro-batches {_g(worst.data)} + forward-only working set "
        f"{_g(worst.forward_only)}" + (f" + reserve (assumed) {_g(worst.reserve)}" if worst.reserve else ""),
        f"  sidecars over all {sp.corpus_tokens:,} tokens: fp32 {_gb(sp.sidecar_bytes('fp32'))}, bf16 "
        f"{_gb(sp.sidecar_bytes('bf16'))} (values 4 / 2 bytes per token + .idx {_gb(sp.sidecar_index)}:",
        f"    20 bytes per document + 42 per dataset; {docs})",
        f"  parts before the merge (<output>.parts/, fp32 whatever --dtype): {_gb(sp.parts_bytes)}, written at "
        f"{sp.parts_bytes / sp.wall_seconds / 1e6:,.1f} MB/s on average:",
        f"    {sp.num_parts:,} files ({sp.train_iters:,} steps x {sp.dp} DP ranks) of {sp.part_bytes:,} B: "
        f"~{PART_CONTAINER_BYTES:,} B torch.save container + {sp.samples_per_part} samples x",
        f"    ({sp.dataset_id_bytes} B dataset id ({ids}) + {s} x (8 B int64 position + 4 B fp32 score))",
        f"  merge (rank 0, one process; fp32 flat file {_gb(sp.flat_bytes)}) at an assumed "
        f"{sp.disk_bandwidth / 1e9:g} GB/s (--scoring-disk-bandwidth), no page cache:",
    ]
    for d in ("fp32", "bf16"):
        lines.append(
            f"    --dtype {d}: reads {_gb(sp.merge_read[d])} (parts, flat file, indices), writes "
            f"{_gb(sp.merge_write[d])} (flat file, sidecars): {_hours(sp.merge_seconds(d))}"
        )
    lines.append(
        "    disk at the merge's peak (parts + flat file + sidecars): "
        + ", ".join(f"{_gb(sp.disk_peak(d))} ({d})" for d in ("fp32", "bf16"))
    )
    lines.append(f"  not modelled: opening the {sp.num_parts:,} part files, the merge's per-sample Python loop")
    return "\n".join(lines)
