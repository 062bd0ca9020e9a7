"""DeepSpeed ZeRO as the optimizer/data-parallel backend (``--deepspeed ds_configs/X.json``).

The policy GPTModel (megatron-core layers, TP via parallel_state) goes into ``deepspeed.initialize`` with
parallel_state as the ``mpu``, so ZeRO shards optimizer state (stage 1) and gradients (stage 2) over the
data-parallel group only. The frozen reference stays outside the engine. Pipeline parallelism stays with
megatron-core's schedules: with DeepSpeed, PP must be 1 (DeepSpeed's own pipeline engine needs a
different model structure).

Normalisation: the SLM loss is sum(selected token losses) / (selected tokens in the global batch). The
engine back-propagates each micro-batch as it comes, so the denominator must be known first: the selector's
``expected_count`` gives it from the loss masks alone (exact for every scope but ``threshold``, whose count
is the expected round(k * valid)). DeepSpeed averages gradients over DP, hence the factor DP in the loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_slm.config import bf16_enabled
from megatron_slm.errors import CheckpointError, ConfigError, require
from megatron_slm.model.head import output_weight


class MegatronMPU:
    """parallel_state under the names DeepSpeed asks for (``get_model_parallel_*`` are missing in 0.16)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def __getattr__(self, name):  # get_data_parallel_*, get_tensor_model_parallel_* ...
        return getattr(self.ps, name)


def load_ds_config(path: str, cfg, dp_size: int) -> dict:
    """The JSON config with batch sizes, precision and clipping filled in from (and checked against) ``cfg``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file; see ds_configs/ for examples")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({exc})") from None
    tr = cfg.train
    gas = tr.global_batch_size // (tr.micro_batch_size * dp_size)
    wanted = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": tr.global_batch_size,
        "gradient_clipping": tr.clip_grad,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(
                f'{path}: {key}={ds[key]} disagrees with the run ({value}); set it to "auto" or to {value}'
            )
        ds[key] = value
    ds["bf16"] = dict(ds.get("bf16", {}), enabled=bf16_enabled(tr))
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f"{path}: leave out 'optimizer' and 'scheduler'; the run's --lr, --min-lr, --weight-decay, --adam-* and "
            "warmup+cosine schedule are applied for both backends"
        )
    return ds


def _engine_globals() -> list:
    """The DeepSpeed classes its engine files hold besides what ``weights_only`` allows (found by saving ZeRO 0/1/2
    checkpoints, fp32 and bf16): plain state, nothing that runs code when built from a pickle."""
    require("deepspeed", "--deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_engine_files(path: Path) -> None:
    """Refuse an engine checkpoint holding anything but plain data, on every rank alike, before DeepSpeed reads it.

    DeepSpeed loads its files with ``torch.load(weights_only=False)`` (deepspeed/runtime/checkpoint_engine), which
    runs whatever code a pickle carries, and checkpoints are copied between people and clusters: so each ``.pt``
    file of the checkpoint is first unpickled here with ``weights_only=True`` and the allowlist above (its pickle
    only, not its tensor data), and DeepSpeed's own read then only sees verified files. A file that fails this
    check in any other way is not handed to DeepSpeed either (its unrestricted read might get further)."""
    import torch

    from megatron_slm.checkpoint.agreement import agreed_failures, describe_failure
    from megatron_slm.checkpoint.sharded import refusal, refused, safe_torch_load

    local = []
    with torch.serialization.safe_globals(_engine_globals()):
        for file in sorted(path.rglob("*.pt")):
            try:
                safe_torch_load(file)
            except Exception as exc:  # noqa: BLE001 - refused, or damaged
                why = refusal(exc)
                local.append(f"{file}\t{why}" if why else f"{file}\t\t{describe_failure(exc)}")
                break
    failures = agreed_failures(bool(local), local)
    if not failures:
        return
    file, why, *damage = failures[0].split("\t")
    if why:
        raise refused(
            file,
            why,
            "restore the checkpoint from a copy you trust, or point "
            "latest_checkpointed_iteration.txt at an earlier iteration",
        )
    raise CheckpointError(
        f"DeepSpeed checkpoint {path} is damaged or incomplete ({file}: {damage[0]}); restore it "
        "from a copy, or point latest_checkpointed_iteration.txt at an earlier iteration"
    )


class DeepSpeedBackend:
    """Owns the engine; ``train_step`` runs the training pass for one global batch (PP=1)."""

    def __init__(self, module, cfg, dp_size: int):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        deepspeed = require("deepspeed", "--deepspeed")

        from megatron_slm.parallel import cpu_shims

        cpu_shims.apply_deepspeed()

        self.cfg = cfg
        ds_config = load_ds_config(cfg.train.deepspeed, cfg, dp_size)
        tr = cfg.train
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() <= 1]  # norms, as megatron
        optimizer = torch.optim.AdamW(
            # wd_mult as megatron's param groups carry it: its LR/WD scheduler rescales weight_decay each step
            [
                {"params": decay, "weight_decay": tr.weight_decay, "wd_mult": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
            ],
            lr=tr.lr,
            betas=(tr.adam_beta1, tr.adam_beta2),
            eps=tr.adam_eps,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=ds_config,
            mpu=MegatronMPU(),
        )
        self.dp_size = dp_size

    def train_step(self, micro_batches: list[dict], loss_fn, forward, selector):
        """Forward/backward every micro-batch through the engine, then one optimizer step (PP=1, checked by
        config.validate)."""
        total = max(selector.expected_count(micro_batches), 1.0)
        outputs = []
        for mb in micro_batches:
            hidden = forward(self.engine, mb)
            loss_sum, _, info = loss_fn(mb, output_weight(self.engine), hidden)
            self.engine.backward(loss_sum * (self.dp_size / total), scale_wrt_gas=False)
            self.engine.step()  # applies the update only at the gradient-accumulation boundary
            outputs.append(info)
        grad_norm = self.engine.get_global_grad_norm()
        return outputs, grad_norm

    def save(self, root: str, tag: str, client_state: dict) -> None:
        """The engine's files into ``root/tag`` (every rank). megatron_slm.checkpoint passes the temporary
        ``iter_N.tmp`` and renames it once every rank's files (and its weights shards) are complete."""
        self.engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)

    def load(self, root: str, tag: str) -> dict:
        path = Path(root) / tag
        verify_engine_files(path)
        try:
            loaded, client_state = self.engine.load_checkpoint(root, tag=tag)
        except Exception as exc:  # noqa: BLE001 - truncated or missing engine files fail deep inside DeepSpeed
            msg = str(exc).strip().splitlines()
            raise CheckpointError(
                f"DeepSpeed checkpoint {path} is damaged or incomplete ({type(exc).__name__}: "
                f"{msg[0][:200] if msg else ''}); restore it from a copy, or point latest_checkpointed_iteration.txt "
                "at an earlier iteration"
            ) from exc
        if loaded is None:
            raise CheckpointError(f"DeepSpeed checkpoint {path} could not be loaded (missing or incomplete)")
        return client_state
