"""The training loop: megatron-core model, DDP, optimizer, LR schedule and pipeline schedule, plus SLM.

One step = [reference forward-only pass] -> [policy scoring pass, global_batch scope only] -> training pass
(1F1B when PP > 1) -> optimizer step. Runs under torchrun; every rank builds the same micro-batches for its
data-parallel slice; only the last pipeline stage sees logits, losses and selection.
"""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_slm import checkpoint
from megatron_slm.config import Config, bf16_enabled, reference_bf16, reference_in_memory, validate
from megatron_slm.data.batches import to_device
from megatron_slm.errors import CheckpointError
from megatron_slm.log import get_logger
from megatron_slm.loss.selection import build_selector
from megatron_slm.loss.slm_loss import STAT_KEYS, SLMLoss
from megatron_slm.model.build import build_model
from megatron_slm.model.head import output_weight, unwrap
from megatron_slm.parallel import distributed
from megatron_slm.training.metrics import MetricsLogger
from megatron_slm.training.passes import model_forward, score_pass


log = get_logger(__name__)


def build_reference(cfg: Config):
    """The frozen reference: same TP/PP layout, no grads, no optimizer, not in DDP, eval mode."""
    dtype = torch.bfloat16 if reference_bf16(cfg) else torch.float32
    ref = build_model(cfg.reference.model, cfg.parallel, seed=cfg.train.seed + 1, params_dtype=dtype)
    ref.to(dtype)  # megatron's torch norms ignore params_dtype; casting everything as Float16Module would
    if cfg.reference.load:
        checkpoint.load_weights(ref, cfg.reference.load, cfg.reference.model, expected_vocab=cfg.model.vocab_size)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref.eval()
    return ref


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        validate(cfg, world_size=distributed.world_size())
        par, tr = cfg.parallel, cfg.train
        distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=tr.seed)
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.dtype = torch.bfloat16 if bf16_enabled(cfg.train) else torch.float32
        torch.manual_seed(tr.seed)

        self.model, self.optimizer, self.scheduler = self._build_policy()
        self.selector = build_selector(cfg.slm)  # CLM: every valid token
        self.selective = self.selector.uses_reference  # SLM (the reference's scores rank the tokens)
        self.reference = build_reference(cfg) if reference_in_memory(cfg) else None
        self.loss = SLMLoss(self.selector, cfg.model.vocab_size)
        self.iteration = 0
        from megatron_slm.data.datasets import parse_blend

        blend = parse_blend(cfg.data.data_path)
        self.num_datasets = len(blend[0]) if blend else 1
        self.selection_by_dataset = torch.zeros(2, self.num_datasets, dtype=torch.float64)
        self.metrics = MetricsLogger(cfg, is_logging_rank=distributed.is_last_rank())

    # -- setup ---------------------------------------------------------------------------------
    def _build_policy(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        cfg, tr = self.cfg, self.cfg.train
        if tr.deepspeed:  # DeepSpeed owns precision (bf16 master weights in fp32), DP and the optimizer
            from megatron_slm.training.deepspeed_backend import DeepSpeedBackend

            module = self._initial_policy(torch.float32)
            self.ds = DeepSpeedBackend(module, cfg, self.dp_size)
            return self.ds.engine, self.ds.optimizer, self._lr_schedule(self.ds.optimizer)
        self.ds = None
        module = self._initial_policy(self.dtype)
        config = module.config
        if self.dtype == torch.bfloat16:
            module = Float16Module(config, module)
        model = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=module,
        )
        config.no_sync_func = model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
                adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps,
                clip_grad=tr.clip_grad, bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            ),
            [model],
        )
        return model, optimizer, self._lr_schedule(optimizer)

    def _initial_policy(self, dtype):
        """The policy GPTModel; from --pretrained-checkpoint (megatron_slm or transformers dir) when not resuming.

        Loaded before DDP/optimizer wrapping so mixed-precision master weights start from it."""
        cfg = self.cfg
        module = build_model(cfg.model, cfg.parallel, seed=cfg.train.seed, params_dtype=dtype)
        pretrained = cfg.checkpoint.pretrained_checkpoint
        if pretrained and self._resume_source() is None:
            checkpoint.load_weights(module, pretrained, cfg.model, expected_vocab=cfg.model.vocab_size)
            module.to(dtype)
        return module

    def _resume_source(self) -> str | None:
        """Where a training checkpoint to resume from lies (--load, else --save), if there is one."""
        ck = self.cfg.checkpoint
        source = ck.load or ck.save
        if source and (checkpoint.latest_iteration(source) is not None or (Path(source) / checkpoint.TRAINER_STATE).is_file()):
            return source
        return None

    def _lr_schedule(self, optimizer):
        """Linear warm-up then cosine decay to min_lr (megatron-core's scheduler, for either backend)."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        tr = self.cfg.train
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=tr.lr, min_lr=tr.min_lr,
            lr_warmup_steps=tr.lr_warmup_iters, lr_decay_steps=max(tr.train_iters, tr.lr_warmup_iters + 1),
            lr_decay_style="cosine", start_wd=tr.weight_decay, end_wd=tr.weight_decay,
            wd_incr_steps=max(tr.train_iters, 1), wd_incr_style="constant",
        )

    @property
    def policy_module(self):
        """The GPTModel inside DDP (and Float16Module, or the DeepSpeed engine)."""
        return unwrap(self.model)

    # -- one step ------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        weight = output_weight(model) if self.is_last_stage else None  # the loss runs on the last stage only
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
        if self.ds is not None:
            outputs, grad_norm = self.ds.train_step(micro_batches, self.loss, model_forward, self.selector)
            update_ok = True
            return self._finish_step(outputs, micro_batches, update_ok, grad_norm, start)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        first = micro_batches[0]["tokens"]
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=False,
        )
        update_ok, grad_norm, _ = self.optimizer.step()
        return self._finish_step(outputs, micro_batches, update_ok, grad_norm, start)

    def _finish_step(self, outputs, micro_batches, update_ok, grad_norm, start) -> dict:
        self.scheduler.step(increment=1)
        self.iteration += 1
        metrics = self._reduce(outputs)
        self._count_selection_by_dataset(outputs, micro_batches)
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"], step_time=time.perf_counter() - start,
            update_ok=bool(update_ok),
        )
        # Per-token details of each micro-batch (last stage): selection masks, policy and reference losses.
        metrics["token_details"] = [{k: o[k] for k in ("selected", "token_loss", "ref_loss")} for o in outputs] if self.is_last_stage else None
        return metrics

    def _count_selection_by_dataset(self, outputs, micro_batches) -> None:
        """Selected and valid tokens per blended dataset, accumulated over the run (last stage, all DP)."""
        if not (self.selective and self.is_last_stage and "dataset_id" in micro_batches[0]):
            return
        counts = torch.zeros(2, self.num_datasets, dtype=torch.float64, device=distributed.device())
        for o, mb in zip(outputs, micro_batches):
            ids = mb["dataset_id"].long()
            counts[0].index_add_(0, ids, o["selected"].sum(-1).double())
            counts[1].index_add_(0, ids, (mb["loss_mask"] > 0).sum(-1).double())
        dist.all_reduce(counts, group=self.ps.get_data_parallel_group())
        self.selection_by_dataset += counts.cpu()

    def selected_fraction_by_dataset(self) -> list[float] | None:
        if self.selection_by_dataset is None or not self.selection_by_dataset[1].sum():
            return None
        return (self.selection_by_dataset[0] / self.selection_by_dataset[1].clamp(min=1)).tolist()

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
    def resume(self) -> bool:
        """Load the latest checkpoint of ``checkpoint.load`` (required to exist) or ``checkpoint.save``."""
        ck = self.cfg.checkpoint
        source = self._resume_source()
        if source is None:
            if ck.load:
                raise CheckpointError(
                    f"--load {ck.load}: no training checkpoint there (no {checkpoint.LATEST}); check the path, or "
                    "drop --load to start fresh"
                )
            return False
        it = checkpoint.load_training_checkpoint(self, source)
        log.info(f"resumed from {checkpoint.resolve(source)} at iteration {it}")
        return True

    def save_checkpoint(self) -> None:
        if self.cfg.checkpoint.save:
            path = checkpoint.save_training_checkpoint(self, self.cfg.checkpoint.save, self.cfg.checkpoint.keep_last)
            log.info(f"saved checkpoint {path}")

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 (Slurm preemption, --signal=B:USR1@N) ask for a checkpoint and a clean stop."""
        self.stop_signal = None

        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _stop_requested(self) -> str | None:
        """The stop signal any rank received, agreed on every rank (a signal may reach them at different steps)."""
        number = torch.tensor([float(signal.Signals[self.stop_signal].value) if self.stop_signal else 0.0],
                              device=distributed.device())  # NCCL reduces device tensors only
        dist.all_reduce(number, op=dist.ReduceOp.MAX)
        return signal.Signals(int(number.item())).name if number.item() else None

    def _dump_selection(self, micro_batches, details) -> None:
        """Per-token (token, policy loss, reference loss, selected) of a few sequences, for the heatmaps.

        Written by the last stage's first TP/DP rank to <save>/selection_dumps/iter_NNNNNNN.pt."""
        tr = self.cfg.train
        if not (self.selective and details and tr.selection_dump_interval and self.cfg.checkpoint.save
                and self.iteration % tr.selection_dump_interval == 0
                and self.dp_rank == 0 and self.ps.get_tensor_model_parallel_rank() == 0):
            return
        rows = []
        for mb, d in zip(micro_batches, details):
            for r in range(mb["tokens"].shape[0]):
                if len(rows) < tr.selection_dump_sequences:
                    rows.append({
                        "tokens": mb["tokens"][r].cpu(), "labels": mb["labels"][r].cpu(),
                        "loss_mask": mb["loss_mask"][r].cpu(), "policy_loss": d["token_loss"][r].cpu(),
                        "ref_loss": d["ref_loss"][r].cpu(), "selected": d["selected"][r].cpu(),
                    })
        out = Path(self.cfg.checkpoint.save) / "selection_dumps"
        out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "iteration": self.iteration, "k": self.cfg.slm.slm_select_ratio, "scope": self.cfg.slm.selection_scope,
            "tokenizer": self.cfg.data.tokenizer_model, "sequences": rows,
        }, out / f"iter_{self.iteration:07d}.pt")

    # -- the loop ------------------------------------------------------------------------------
    def train(self, train_batches, eval_batches=None) -> dict:
        """``train_batches(step) -> micro-batches``; ``eval_batches() -> list of micro-batch lists``."""
        tr, ck = self.cfg.train, self.cfg.checkpoint
        history = []
        self._install_signal_handlers()
        self.metrics.start(tr.train_iters, self.iteration)
        stopped = None
        while self.iteration < tr.train_iters:
            mbs = train_batches(self.iteration)
            m = self.train_step(mbs)
            self._dump_selection(mbs, m.pop("token_details", None))
            history.append(m)
            self.metrics.step(self.iteration, m, tokens=tr.global_batch_size * tr.seq_length)
            if eval_batches is not None and tr.eval_interval and self.iteration % tr.eval_interval == 0:
                self.metrics.eval(self.iteration, self.evaluate_all(eval_batches()))
            stopped = self._stop_requested()
            if stopped:
                break
            if ck.save_interval and self.iteration % ck.save_interval == 0 and self.iteration < tr.train_iters:
                self.save_checkpoint()
        self.save_checkpoint()
        result = {"history": history, "stopped_by": stopped}
        if stopped:
            log.info(f"stopping at iteration {self.iteration} on {stopped}; resume by rerunning the same command")
        elif eval_batches is not None:
            result["eval_loss"] = self.evaluate_all(eval_batches())
            self.metrics.eval(self.iteration, result["eval_loss"])
        self.metrics.close()
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

