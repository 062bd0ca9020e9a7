"""The training loop: megatron-core model, DDP, optimizer, LR schedule and pipeline schedule, plus SLM.

One step = [reference forward-only pass] -> [policy scoring pass, global_batch scope only] -> training pass
(1F1B when PP > 1) -> optimizer step. Runs under torchrun; every rank builds the same micro-batches for its
data-parallel slice; only the last pipeline stage sees logits, losses and selection.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_slm import checkpoint, lifecycle
from megatron_slm.config import (
    Config,
    bf16_enabled,
    lr_decay_steps,
    reference_bf16,
    reference_in_memory,
    virtual_pipeline_size,
)
from megatron_slm.data.batches import to_device
from megatron_slm.errors import DivergenceError
from megatron_slm.log import get_logger
from megatron_slm.loss.selection import build_selector
from megatron_slm.loss.slm_loss import STAT_KEYS, SLMLoss
from megatron_slm.model.build import build_model_chunks, recompute_settings
from megatron_slm.model.head import output_weight, unwrap
from megatron_slm.parallel import distributed
from megatron_slm.training import state
from megatron_slm.training.metrics import DATASET_COUNT_KEYS, MetricsLogger
from megatron_slm.training.passes import data_iterators, model_forward, score_pass
from megatron_slm.training.resolve import ResolvedRun, resolve_run

log = get_logger(__name__)


def build_reference(cfg: Config):
    """The frozen reference: same TP/PP layout (and virtual pipeline chunks), no grads, no optimizer, not in DDP,
    eval mode. A GPTModel, or with --num-layers-per-virtual-pipeline-stage the list of this rank's chunks."""
    dtype = torch.bfloat16 if reference_bf16(cfg) else torch.float32
    chunks = build_model_chunks(
        cfg.reference.model,
        cfg.parallel,
        seed=cfg.train.seed + 1,
        params_dtype=dtype,
        vp_size=virtual_pipeline_size(cfg.parallel, cfg.model.num_layers),  # the policy's
        initialize=not cfg.reference.load,
    )  # loaded weights: no random draw first
    ref = chunks[0] if len(chunks) == 1 else chunks
    for c in chunks:
        c.to(dtype)  # megatron's torch norms ignore params_dtype; casting everything as Float16Module would
    if cfg.reference.load:
        checkpoint.load_weights(ref, cfg.reference.load, cfg.reference.model, expected_vocab=cfg.model.vocab_size)
    for c in chunks:
        for p in c.parameters():
            p.requires_grad_(False)
        c.eval()
    return ref


class Trainer:
    def __init__(self, run: ResolvedRun | Config):
        """``run``: a resolved run (training/resolve.py); a draft Config is resolved here first (without data:
        library and test use). The config is read, never written; the data's tokenizer is recorded in every
        checkpoint this run writes."""
        self.run = run if isinstance(run, ResolvedRun) else resolve_run(run, require_data=False)
        self.cfg = cfg = self.run.config
        par, tr = cfg.parallel, cfg.train
        self.vp_size = virtual_pipeline_size(par, cfg.model.num_layers)  # model chunks per rank (None: one)
        distributed.initialize(
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            seed=tr.seed,
            virtual_pipeline_model_parallel_size=self.vp_size,
        )
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.dtype = torch.bfloat16 if bf16_enabled(cfg.train) else torch.float32
        torch.manual_seed(tr.seed)

        # self.model_chunks: the DDP-wrapped chunks (one without interleaving); self.model: the one DDP module, or
        # with --num-layers-per-virtual-pipeline-stage the list of chunks (as Megatron-LM's ``model``).
        self.model, self.optimizer, self.scheduler = self._build_policy()
        self.model_chunks = self.model if isinstance(self.model, list) else [self.model]
        self.selector = build_selector(cfg.slm, seed=tr.seed)  # CLM: every valid token
        self.selective = self.selector.uses_reference  # SLM (the reference's scores rank the tokens)
        self.reference = build_reference(cfg) if reference_in_memory(cfg) else None
        self.loss = SLMLoss(self.selector, cfg.model.vocab_size)
        self.position = state.DataPosition(tr.global_batch_size)
        from megatron_slm.data.datasets import parse_blend

        blend = parse_blend(cfg.data.data_path)
        self.num_datasets = len(blend[0]) if blend else 1
        self.lock = checkpoint.SaveLock.acquire(cfg.checkpoint.save)  # one run per --save, and it is writable
        self.metrics = MetricsLogger(cfg, is_logging_rank=distributed.is_last_rank())

    @property
    def iteration(self) -> int:
        return self.position.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.position.iteration = value

    # -- setup ---------------------------------------------------------------------------------
    def _build_policy(self):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        cfg, tr = self.cfg, self.cfg.train
        if tr.deepspeed:  # DeepSpeed owns precision (bf16 master weights in fp32), DP and the optimizer
            from megatron_slm.training.deepspeed_backend import DeepSpeedBackend

            (module,) = self._initial_policy(torch.float32)  # validate refuses interleaving with DeepSpeed
            self.ds = DeepSpeedBackend(module, cfg, self.dp_size)
            return self.ds.engine, self.ds.optimizer, self._lr_schedule(self.ds.optimizer)
        self.ds = None
        modules = self._initial_policy(self.dtype)  # one TransformerConfig per chunk; the schedule reads model[0]'s
        if self.dtype == torch.bfloat16:
            modules = [Float16Module(m.config, m) for m in modules]
        par = cfg.parallel
        # --use-distributed-optimizer: gradients reduce-scatter over DP, each DP rank updates its 1/DP slice of the
        # fp32 master weights and Adam state, and the updated weights all-gather back (after the step, or with
        # --overlap-param-gather bucket by bucket in the next forward's pre-hooks, which DDP installs itself).
        # One DDP per model chunk; as Megatron-LM, chunks after the first get one bucket each (disable_bucketing).
        chunks = [
            DistributedDataParallel(
                config=m.config,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True,
                    overlap_grad_reduce=par.overlap_grad_reduce,
                    use_distributed_optimizer=par.use_distributed_optimizer,
                    overlap_param_gather=par.overlap_param_gather,
                    bucket_size=par.ddp_bucket_size,
                ),
                module=m,
                disable_bucketing=i > 0,
            )
            for i, m in enumerate(modules)
        ]

        def per_chunk(funcs):  # Megatron-LM's convention: a list with interleaving, the function itself without
            return funcs if len(funcs) > 1 else funcs[0]

        for m in modules:  # each chunk's config; the schedules read model[0]'s
            # gradients reduce once, after the last micro-batch
            m.config.no_sync_func = per_chunk([c.no_sync for c in chunks])
            if par.overlap_grad_reduce:  # as Megatron-LM (align_grad_reduce): the schedule launches each chunk's
                m.config.grad_sync_func = per_chunk([c.start_grad_sync for c in chunks])  # reduction at its last
            # config.param_sync_func stays unset, as in Megatron-LM without --align-param-gather: each chunk's forward
            # pre-hooks launch and wait on its buckets' all-gather (--overlap-param-gather).
            m.config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=tr.lr,
                min_lr=tr.min_lr,
                weight_decay=tr.weight_decay,
                adam_beta1=tr.adam_beta1,
                adam_beta2=tr.adam_beta2,
                adam_eps=tr.adam_eps,
                clip_grad=tr.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=par.use_distributed_optimizer,
            ),
            chunks,
        )
        return per_chunk(chunks), optimizer, self._lr_schedule(optimizer)

    def _initial_policy(self, dtype) -> list:
        """The policy's GPTModel chunks (one per virtual pipeline stage, else one); from --pretrained-checkpoint
        (megatron_slm or transformers dir) when not resuming.

        Loaded before DDP/optimizer wrapping so mixed-precision master weights start from it."""
        cfg = self.cfg
        pretrained = cfg.checkpoint.pretrained_checkpoint
        chunks = build_model_chunks(
            cfg.model,
            cfg.parallel,
            seed=cfg.train.seed,
            params_dtype=dtype,
            recompute=recompute_settings(cfg.train),  # the reference never recomputes
            vp_size=self.vp_size,
            # weights from a checkpoint (resume) or pretrained: no random draw first
            initialize=self.run.resume is None and not pretrained,
        )
        if pretrained and self.run.resume is None:
            checkpoint.load_weights(
                chunks[0] if len(chunks) == 1 else chunks, pretrained, cfg.model, expected_vocab=cfg.model.vocab_size
            )
            for c in chunks:
                c.to(dtype)
        return chunks

    def _lr_schedule(self, optimizer):
        """megatron-core's OptimizerParamScheduler, for either backend: linear warm-up from 0 to --lr, then
        --lr-decay-style down to --min-lr over --lr-decay-iters (else --train-iters), --min-lr after it. WSD holds
        --lr and anneals (--lr-wsd-decay-style) in the last --lr-wsd-decay-iters steps of that window.

        The resolved config decides its settings (resolve.py applied the resume table), so a loaded checkpoint gives
        it only its step count: override_opt_param_scheduler."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        tr = self.cfg.train
        return OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=tr.lr,
            min_lr=tr.min_lr,
            lr_warmup_steps=tr.lr_warmup_iters,
            lr_decay_steps=lr_decay_steps(tr),
            lr_decay_style=tr.lr_decay_style,
            start_wd=tr.weight_decay,
            end_wd=tr.weight_decay,
            wd_incr_steps=max(tr.train_iters, 1),
            wd_incr_style="constant",
            override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False,
            wsd_decay_steps=tr.lr_wsd_decay_iters,
            lr_wsd_decay_style=tr.lr_wsd_decay_style,
        )

    @property
    def policy_module(self):
        """The GPTModel inside DDP (and Float16Module, or the DeepSpeed engine); with an interleaved pipeline the
        list of this rank's GPTModel chunks (checkpoint, score_pass and helpers.gather take either)."""
        chunks = self.policy_chunks
        return chunks[0] if len(chunks) == 1 else chunks

    @property
    def policy_chunks(self) -> list:
        """This rank's GPTModel chunks, in virtual pipeline stage order (one without interleaving)."""
        return [unwrap(m) for m in (self.model if isinstance(self.model, list) else [self.model])]

    # -- one step ------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        # the loss runs on the last stage's last chunk only (its output layer; the tied embedding's copy there)
        weight = output_weight(model) if unwrap(model).post_process else None
        return model_forward(model, mb), functools.partial(self.loss, mb, weight)

    def prepare_selection(self, micro_batches: list[dict]) -> None:
        """Attach the reference's token losses (online SLM), then let the selector prepare (its scoring pass)."""
        vocab = self.cfg.model.vocab_size
        if self.reference is not None:
            ref_scores = score_pass(self.reference, micro_batches, vocab)
            if ref_scores is not None:
                for mb, s in zip(micro_batches, ref_scores):
                    mb["ref_loss"] = s
        self.selector.prepare(micro_batches, lambda: score_pass(self.policy_module, micro_batches, vocab))

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this DP rank's micro-batches. Returns reduced metrics (last stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        start = time.perf_counter()
        to_device(micro_batches)
        self.prepare_selection(micro_batches)
        if self.ds is not None:  # DeepSpeed applies its update inside the engine: a bad step is only detected
            outputs, grad_norm = self.ds.train_step(micro_batches, self.loss, model_forward, self.selector)
            return self._finish_step(outputs, micro_batches, self._agree_finite(outputs, grad_norm), grad_norm, start)
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        first = micro_batches[0]["tokens"]
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data_iterators(micro_batches, len(self.model_chunks)),
            model=self.model_chunks,
            num_microbatches=len(micro_batches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=False,
        )
        update_ok, grad_norm = self._optimizer_step(outputs)
        return self._finish_step(outputs, micro_batches, update_ok, grad_norm, start)

    def _agree_finite(self, outputs, grad_norm) -> bool:
        """One decision on every rank: this step's loss statistics (last stage) and gradient norm are finite."""
        bad = grad_norm is not None and not math.isfinite(float(grad_norm))
        if self.is_last_stage and outputs:
            bad = bad or not bool(torch.isfinite(torch.stack([o["stats"] for o in outputs])).all())
        flag = torch.tensor([float(bad)], device=distributed.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

    def _optimizer_step(self, outputs):
        """megatron-core's ``optimizer.step()`` in its stages, because step() would apply a non-finite update
        before the caller could veto it: ready the gradients, their norm, the agreed finite check, clip, update.

        With --use-distributed-optimizer the stages act on this DP rank's slice (the norm is reduced over all ranks,
        so the veto is the same everywhere) and step_with_ready_grads also all-gathers the updated weights (with
        --overlap-param-gather: in the next forward). A vetoed step updates no slice and gathers nothing: the
        weights stay the same on every rank (the next forward's gather, if any, re-gathers unchanged slices)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        found_inf = opt.prepare_grads()  # the fp16 loss scaler's own overflow check (False for bf16 / fp32)
        grad_norm = opt.get_grad_norm()
        if not self._agree_finite(outputs, grad_norm) or found_inf:
            return False, grad_norm
        if self.cfg.train.clip_grad > 0:
            for sub in getattr(opt, "chained_optimizers", [opt]):
                params = sub.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params,
                        self.cfg.train.clip_grad,
                        grad_norm,
                        sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        return opt.step_with_ready_grads(), grad_norm

    def _finish_step(self, outputs, micro_batches, update_ok, grad_norm, start) -> dict:
        if update_ok:  # as Megatron-LM: a skipped update does not advance the LR schedule; the data moves on
            self.scheduler.step(increment=1)
        self.iteration += 1
        metrics = self._reduce(outputs)
        if update_ok:  # tokens trained on, per blended dataset (summed over the run in the summary)
            counts = self._count_selection_by_dataset(outputs, micro_batches)
            if counts is not None:
                for i in range(self.num_datasets):
                    for key, value in zip(DATASET_COUNT_KEYS, counts[:, i].tolist()):
                        metrics[f"{key}_ds{i}"] = value
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
            step_time=time.perf_counter() - start,
            update_ok=bool(update_ok),
        )
        # Per-token details of each micro-batch (last stage): selection masks, policy and reference losses.
        metrics["token_details"] = (
            [{k: o[k] for k in ("selected", "token_loss", "ref_loss")} for o in outputs] if self.is_last_stage else None
        )
        return metrics

    def _count_selection_by_dataset(self, outputs, micro_batches) -> torch.Tensor | None:
        """DATASET_COUNT_KEYS x blended datasets in this step (last stage, summed over DP), or None: selected and
        valid tokens, and the reference loss summed over the unselected ones (what SLM leaves out, and why)."""
        if not (self.selective and self.is_last_stage and "dataset_id" in micro_batches[0]):
            return None
        counts = torch.zeros(
            len(DATASET_COUNT_KEYS), self.num_datasets, dtype=torch.float64, device=distributed.device()
        )
        for o, mb in zip(outputs, micro_batches):
            ids = mb["dataset_id"].long().to(counts.device)
            valid = mb["loss_mask"] > 0
            unselected = (valid & ~o["selected"].bool()).double()
            counts[0].index_add_(0, ids, o["selected"].sum(-1).double())
            counts[1].index_add_(0, ids, valid.sum(-1).double())
            if o.get("ref_loss") is not None:
                counts[2].index_add_(0, ids, (o["ref_loss"].double() * unselected).sum(-1))
            counts[3].index_add_(0, ids, unselected.sum(-1))
        dist.all_reduce(counts, group=self.ps.get_data_parallel_group())
        return counts.cpu()

    def _reduce(self, outputs) -> dict:
        """Sum loss statistics over micro-batches and data-parallel ranks (on the last stage)."""
        if not self.is_last_stage:
            return {}
        total = torch.stack([o["stats"] for o in outputs]).sum(0)
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        s = dict(zip(STAT_KEYS, total.tolist()))
        n_sel, n_valid = max(s["num_selected"], 1.0), max(s["num_valid"], 1.0)
        n_unsel = max(s["num_valid"] - s["num_selected"], 1.0)
        return {
            "loss_selected": s["selected_loss_sum"] / n_sel,
            "loss_all": s["all_loss_sum"] / n_valid,
            "ref_loss": s["ref_loss_sum"] / n_valid if self.selective else float("nan"),
            "excess_selected": s["excess_selected_sum"] / n_sel if self.selective else float("nan"),
            "excess_unselected": s["excess_unselected_sum"] / n_unsel if self.selective else float("nan"),
            "selected_fraction": s["num_selected"] / n_valid,
            "num_selected": s["num_selected"],
            "num_valid": s["num_valid"],
        }

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, micro_batches: list[dict]) -> float | None:
        """Mean policy CE over all valid tokens (plain LM loss), on every rank of the last stage."""
        scores = score_pass(self.policy_module, to_device(micro_batches), self.cfg.model.vocab_size)
        if scores is None:
            return None
        sums = torch.zeros(2, dtype=torch.float64, device=distributed.device())
        for s, mb in zip(scores, micro_batches):
            valid = (mb["loss_mask"] > 0).double()
            sums += torch.stack([(s.double() * valid).sum(), valid.sum()])
        dist.all_reduce(sums, group=self.ps.get_data_parallel_group())
        return (sums[0] / sums[1].clamp(min=1)).item()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict:
        """The run's stateful parts by name, in load order (checkpoint/training_state.py): the optimizer before the
        LR schedule, which recomputes the groups' LR from the restored step count."""
        ddp = self.model_chunks if self.ds is None else None
        modules = state.ModelPart(self.policy_chunks, ddp, restore=self.ds is None)
        parts = {"model": modules}
        if self.ds is not None:
            parts["engine"] = state.DeepSpeedEnginePart(self.ds, self.position, self.cfg.train)
        else:
            parts["optimizer"] = state.OptimizerPart(self.optimizer, modules, self.cfg.train)
        parts.update(
            scheduler=state.SchedulerPart(self.scheduler),
            data=self.position,
            rng=state.RNGPart(state.layout()),
            selector=state.SelectorPart(self.selector),
        )
        return parts

    def resume(self) -> bool:
        """Restore the checkpoint resolution chose (``--load``, else the latest under ``--save``), if any."""
        if self.run.resume is None:
            return False
        self.load_checkpoint(self.run.resume.path)
        log.info(f"resumed from {self.run.resume.path} at iteration {self.iteration}")
        return True

    def load_checkpoint(self, directory) -> int:
        """Restore a training checkpoint (a run's root or an iteration directory); returns its iteration."""
        return checkpoint.load_training_checkpoint(self.checkpoint_parts(), directory)

    def _params_finite(self) -> bool:
        bad = any(not bool(torch.isfinite(p).all()) for c in self.policy_chunks for p in c.parameters())
        flag = torch.tensor([float(bad)], device=distributed.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

    def save_checkpoint(self, root: str | None = None) -> None:
        """A training checkpoint of this iteration under ``root`` (default: --save; nothing without one). With
        --async-save it returns once the state is in host memory; a previous async save is finished first."""
        root = root or self.cfg.checkpoint.save
        if root and not self._params_finite():
            raise DivergenceError(
                f"the policy's weights hold NaN/inf at iteration {self.iteration}; refusing to save "
                "them (earlier checkpoints are kept)"
            )
        if root:
            self.finish_async_save()
            path = checkpoint.save_training_checkpoint(
                self.checkpoint_parts(),
                root,
                self.iteration,
                model_config=self.cfg.model,
                config=self.cfg.to_dict(),
                tokenizer_fingerprints=self.run.tokenizer_fingerprints,
                keep_last=self.cfg.checkpoint.keep_last,
                async_save=self.cfg.checkpoint.async_save,
            )
            if self.cfg.checkpoint.async_save:
                self._async_save = path
                log.info(f"writing checkpoint {path.final} in the background")
            else:
                log.info(f"saved checkpoint {path}")

    def finish_async_save(self) -> None:
        """Wait for the background write of the last --async-save checkpoint and commit it (every rank)."""
        pending, self._async_save = getattr(self, "_async_save", None), None
        if pending is not None:
            log.info(f"saved checkpoint {pending.finish()}")

    def _maybe_finish_async_save(self) -> None:
        """At a step boundary: commit the pending --async-save checkpoint once every rank's write has ended (as
        Megatron-LM's maybe_finalize_async_save; one small all-reduce per step while a write is pending)."""
        pending = getattr(self, "_async_save", None)
        if pending is None:
            return
        ended = torch.tensor([0.0 if pending.done() else 1.0], device=distributed.device())
        dist.all_reduce(ended, op=dist.ReduceOp.MAX)
        if ended.item() == 0:
            self.finish_async_save()

    def _exit_requested(self, started: float) -> str | None:
        """--exit-interval / --exit-duration-in-mins, acted on like a stop signal (checkpoint, clean exit); not at
        the last iteration, where the run ends anyway. The elapsed-time verdict is agreed on every rank (MAX), so
        all stop at the same iteration."""
        tr = self.cfg.train
        if self.iteration >= tr.train_iters:
            return None
        if tr.exit_interval and self.iteration % tr.exit_interval == 0:
            return "exit-interval"
        if tr.exit_duration_in_mins is not None:
            if distributed.max_over_ranks((time.monotonic() - started) / 60.0 > tr.exit_duration_in_mins):
                return "exit-duration"
        return None

    def _dump_selection(self, micro_batches, details) -> None:
        """Per-token (token, policy loss, reference loss, selected) of a few sequences, for the heatmaps.

        Written by the last stage's first TP/DP rank to <save>/selection_dumps/iter_NNNNNNN.pt."""
        tr = self.cfg.train
        if not (
            self.selective
            and details
            and tr.selection_dump_interval
            and self.cfg.checkpoint.save
            and self.iteration % tr.selection_dump_interval == 0
            and self.dp_rank == 0
            and self.ps.get_tensor_model_parallel_rank() == 0
        ):
            return
        rows = []
        for mb, d in zip(micro_batches, details):
            for r in range(mb["tokens"].shape[0]):
                if len(rows) < tr.selection_dump_sequences:
                    rows.append(
                        {
                            "tokens": mb["tokens"][r].cpu(),
                            "labels": mb["labels"][r].cpu(),
                            "loss_mask": mb["loss_mask"][r].cpu(),
                            "policy_loss": d["token_loss"][r].cpu(),
                            "ref_loss": d["ref_loss"][r].cpu(),
                            "selected": d["selected"][r].cpu(),
                        }
                    )
        out = Path(self.cfg.checkpoint.save) / "selection_dumps"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "iteration": self.iteration,
                "k": self.cfg.slm.slm_select_ratio,
                "scope": self.cfg.slm.selection_scope,
                "tokenizer": self.cfg.data.tokenizer_model,
                "sequences": rows,
            },
            out / f"iter_{self.iteration:07d}.pt",
        )

    # -- the loop ------------------------------------------------------------------------------
    def train(self, train_batches, eval_batches=None) -> dict:
        """``train_batches(step) -> micro-batches``; ``eval_batches() -> list of micro-batch lists``."""
        tr, ck = self.cfg.train, self.cfg.checkpoint
        history = []
        lifecycle.catch_stop_signals()  # SIGTERM/SIGUSR1: checkpoint and stop cleanly (the CLI installs it earlier)
        started = time.monotonic()  # --exit-duration-in-mins counts from here
        self.metrics.start(tr.train_iters, self.iteration)
        stopped, skipped_in_a_row = None, 0
        self.nonfinite_steps: list[int] = []
        while self.iteration < tr.train_iters:
            mbs = train_batches(self.iteration)
            m = self.train_step(mbs)
            self._dump_selection(mbs, m.pop("token_details", None))
            history.append(m)
            self.metrics.step(self.iteration, m, tokens=tr.global_batch_size * tr.seq_length)
            if not m["update_ok"]:
                self.nonfinite_steps.append(self.iteration)
                skipped_in_a_row += 1
                log.warning(
                    f"step {self.iteration}: non-finite loss or gradient norm (grad norm {m['grad_norm']}); "
                    f"update skipped, {skipped_in_a_row} in a row"
                )
                if tr.on_nonfinite == "stop" or self.ds is not None or skipped_in_a_row >= tr.max_nonfinite_skips:
                    stopped = "non-finite"
                    break
            else:
                skipped_in_a_row = 0
            if eval_batches is not None and tr.eval_interval and self.iteration % tr.eval_interval == 0:
                self.metrics.eval(self.iteration, self.evaluate_all(eval_batches()))
            self._maybe_finish_async_save()
            stopped = distributed.agreed_stop() or self._exit_requested(started)
            if stopped:
                break
            if ck.save_interval and self.iteration % ck.save_interval == 0 and self.iteration < tr.train_iters:
                self.save_checkpoint()
        result = {"history": history, "stopped_by": stopped, "nonfinite_steps": self.nonfinite_steps}
        if stopped == "non-finite":  # nothing of the diverged state is saved; earlier checkpoints stay
            self.finish_async_save()
            self.metrics.close()
            return result
        self.save_checkpoint()
        self.finish_async_save()  # the run ends (or stops on a signal) with its last checkpoint committed
        if stopped:
            log.info(f"stopping at iteration {self.iteration} on {stopped}; resume by rerunning the same command")
            lifecycle.acted_on()
        elif eval_batches is not None:
            result["eval_loss"] = self.evaluate_all(eval_batches())
            self.metrics.eval(self.iteration, result["eval_loss"])
        self.metrics.close()
        self.lock.release()
        return result

    def evaluate_all(self, batches: list[list[dict]]) -> float | None:
        losses = [self.evaluate(mbs) for mbs in batches]
        if losses and losses[0] is not None:
            return float(sum(losses) / len(losses))
        return None


def broadcast_from_last(obj):
    """Send a Python object from the global last rank (which holds losses) to every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]
