"""Convert between transformers Llama/Mistral directories and megatron_slm checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output CKPT [--dtype bf16] [--verify]
    python tools/convert_checkpoint.py megatron-to-hf --input CKPT --output HF_DIR [--dtype fp32|bf16]

``hf_to_megatron`` reads a transformers ``LlamaForCausalLM``/``MistralForCausalLM`` directory (config.json plus
safetensors or pytorch_model*.bin, sharded or not), maps its config to our ``ModelConfig`` and its weights to
megatron-core's GPTModel names, and writes a dist checkpoint with ``checkpoint.save_model_weights`` (converted
in one process at TP=1 PP=1; the checkpoint loads at any TP/PP, e.g. with ``--ref-load``). ``megatron_to_hf``
is the inverse: a checkpoint from any layout -> config.json + safetensors that ``AutoModelForCausalLM`` loads.

The mapping itself (configs, weight names, fused QKV/fc1 layouts, RoPE and sliding-window facts) lives in
megatron_slm/model/hf.py, shared with checkpoint.load_weights.

Every user-facing failure raises ``ConvertError`` (or the checkpoint's ``CheckpointError``); ``main`` prints
it as one ``error: ...`` line and returns 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from megatron_slm.config import ModelConfig
from megatron_slm.errors import CheckpointError, ConvertError, SLMError
from megatron_slm.log import get_logger, setup_logging
from megatron_slm.model.hf import (
    ARCHITECTURES,
    HFWeights,
    full_megatron_tensors,
    hf_config_to_model_config,
    hf_names_used,
    load_hf_weights_into,
    megatron_names,
    megatron_to_hf_tensors,
    model_config_to_hf_config,
    read_hf_config,
)

_log = get_logger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_SOURCE = "hf_source.json"  # sidecar in a converted checkpoint: the original HF config and the dtype written
MAX_SHARD_BYTES = 5 * 1024**3


# ----------------------------------------------------------------------------------------------
# Process group and outputs


@contextlib.contextmanager
def _single_process():
    """megatron-core's parallel state at TP=1 PP=1 in this process (created and torn down if needed)."""
    import torch.distributed as dist

    from megatron_slm.parallel import distributed

    owned = not dist.is_initialized()
    if not owned and dist.get_world_size() != 1:
        raise ConvertError("run the converter as a single process (not under torchrun with several ranks)")
    distributed.initialize(1, 1)
    try:
        yield
    finally:
        if owned:
            distributed.destroy()


def _check_output(out_dir: str, force: bool, input_dir: str) -> None:
    out = Path(out_dir)
    if out.resolve() == Path(input_dir).resolve():
        raise ConvertError("--output must differ from --input")
    if out.exists() and not force:
        if not out.is_dir() or any(out.iterdir()):
            raise ConvertError(f"output '{out_dir}' already exists; choose a new path or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output '{out_dir}' exists and is not a directory")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ConvertError(f"the parent of output '{out_dir}' does not exist")


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _build(m: ModelConfig):
    from megatron_slm.config import ParallelConfig
    from megatron_slm.model.build import build_model

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(0)
        model = build_model(m, ParallelConfig(1, 1), seed=0, params_dtype=torch.float32)
    model.eval()
    return model


def _load_checkpoint(model, ckpt_dir: str, m: ModelConfig) -> None:
    """checkpoint.load_model_weights, with torch DCP's read failures (a BaseException) as CheckpointError."""
    from megatron_slm.checkpoint import load_model_weights

    try:
        load_model_weights(model, ckpt_dir, expected_vocab=m.vocab_size)
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch.distributed.checkpoint's CheckpointException
        if type(exc).__name__ != "CheckpointException":
            raise
        causes = []
        for failure in (getattr(exc, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            causes.append(f"{type(inner).__name__}: {str(inner).splitlines()[0][:200]}" if str(inner) else type(inner).__name__)
        raise CheckpointError(
            f"checkpoint '{ckpt_dir}' could not be read ({'; '.join(causes) or 'unknown cause'}): a shard is "
            "truncated or damaged; restore or re-create it"
        ) from None


def _forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocab fp32 logits [b, s, V] of a TP=1 PP=1 megatron model."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    from megatron_slm.parallel.cpu_shims import on_cpu

    run = lambda: model(tokens, positions, attention_mask=None, labels=None)  # noqa: E731
    with torch.no_grad():
        logits = run() if torch.cuda.is_available() else on_cpu(run)()
    return logits[..., : model.true_vocab_size].float().cpu()


# ----------------------------------------------------------------------------------------------
# Public API


def hf_to_megatron(hf_dir: str, out_dir: str, dtype: str = "fp32", verify: bool = False, force: bool = False,
                   verify_seq_len: int = 64, log=_log.info):
    """Convert a transformers Llama/Mistral directory into a megatron_slm checkpoint at ``out_dir``.

    Returns the max abs logit difference against transformers when ``verify`` (else None).
    """
    from megatron_slm.checkpoint import save_model_weights, tokenizer_fingerprints

    torch_dtype = _dtype(dtype)
    hf_cfg = read_hf_config(hf_dir)
    _check_output(out_dir, force, hf_dir)
    hf = HFWeights(hf_dir)
    m = hf_config_to_model_config(hf_cfg)
    unused = sorted(k for k in set(hf.keys()) - hf_names_used(m)
                    if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight")
    if unused:
        raise ConvertError(f"the HF weights hold tensors this converter does not map: {', '.join(unused[:5])}")
    with _single_process():
        model = _build(m)
        load_hf_weights_into(model, hf, m)
        if torch_dtype != torch.float32:
            model.to(torch_dtype)
        out = Path(out_dir)
        if force and out.exists() and not out.is_dir():
            out.unlink()
        save_model_weights(model, str(out), m, tokenizer_fingerprints(hf_dir))  # its tokenizer files, if any
        sidecar = {"hf_config": hf_cfg, "dtype": dtype, "source": str(Path(hf_dir).resolve())}
        tmp = out / (HF_SOURCE + ".tmp")
        tmp.write_text(json.dumps(sidecar, indent=2))
        tmp.rename(out / HF_SOURCE)
        del model
        log(f"converted {ARCHITECTURES[hf_cfg['model_type']]} '{hf_dir}' -> megatron checkpoint '{out_dir}' "
            f"({m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, {dtype})")
        if verify:
            diff = verify_conversion(hf_dir, out_dir, seq_len=verify_seq_len)
            note = ""
            if hf_cfg.get("model_type") == "mistral" and hf_cfg.get("sliding_window") and \
                    verify_seq_len <= int(hf_cfg["sliding_window"]):
                note = " (sequence not longer than the sliding window: raise --verify-seq-len to test the window)"
            log(f"verify: max abs logit difference vs transformers = {diff:.3e} "
                f"({verify_seq_len} tokens x 2 sequences, fp32){note}")
            return diff
    return None


def megatron_to_hf(ckpt_dir: str, out_dir: str, dtype: str = "auto", force: bool = False, hf_config: str | None = None,
                   log=_log.info) -> None:
    """Convert a megatron_slm checkpoint (saved at any TP/PP) into a transformers directory at ``out_dir``.

    ``dtype``: fp32, bf16, or auto (the dtype the checkpoint was converted in, fp32 when unknown).
    ``hf_config``: a transformers config.json (or its directory) whose token ids and model type to keep, for
    checkpoints without the ``hf_source.json`` that ``hf_to_megatron`` leaves (e.g. a trained policy).
    """
    from megatron_slm import checkpoint

    path = Path(ckpt_dir)
    if not path.exists():
        raise ConvertError(f"input '{ckpt_dir}' does not exist")
    if (path / "config.json").is_file() and not (path / "slm_model.json").is_file():
        raise ConvertError(f"'{ckpt_dir}' is a transformers directory, not a megatron_slm checkpoint: use hf-to-megatron")
    m = checkpoint.read_model_config(ckpt_dir)
    path = checkpoint.resolve(ckpt_dir)  # a training root -> its latest iteration
    source = {}
    if (path / HF_SOURCE).is_file():
        try:
            source = json.loads((path / HF_SOURCE).read_text())
        except ValueError:
            source = {}
    if hf_config:
        cfg_path = Path(hf_config) / "config.json" if Path(hf_config).is_dir() else Path(hf_config)
        try:
            source["hf_config"] = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConvertError(f"--hf-config '{hf_config}' is not a readable config.json ({exc})") from None
    if dtype == "auto":
        dtype = source.get("dtype", "fp32") if source.get("dtype") in DTYPES else "fp32"
    torch_dtype = _dtype(dtype)
    _check_output(out_dir, force, ckpt_dir)
    try:
        from transformers import LlamaConfig  # noqa: F401
        from safetensors.torch import save_file  # noqa: F401
    except ImportError:
        raise ConvertError("megatron-to-hf needs transformers and safetensors: pip install transformers safetensors") from None
    hf_cfg = model_config_to_hf_config(m, source.get("hf_config"), torch_dtype)
    with _single_process():
        model = _build(m)
        _load_checkpoint(model, ckpt_dir, m)
        full = full_megatron_tensors(model)
        del model
    expected = set(megatron_names(m))
    if set(full) != expected:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' gave parameters {sorted(set(full) ^ expected)[:4]} unexpectedly")
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in megatron_to_hf_tensors(full, m).items()}
    del full
    out, tmp = Path(out_dir), Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_cfg.save_pretrained(str(tmp))
        _write_safetensors(tensors, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    log(f"converted megatron checkpoint '{ckpt_dir}' -> {hf_cfg.architectures[0]} '{out_dir}' ({dtype})")


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_hf_model(hf_dir: str):
    """transformers' own model for ``hf_dir`` in fp32 on the CPU (eval mode)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, local_files_only=True)
    return model.eval()


def verify_conversion(hf_dir: str, ckpt_dir: str, seq_len: int = 64, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference between transformers' fp32 logits and the converted checkpoint's (TP=1 PP=1, fp32)
    on the same random token ids."""
    from megatron_slm.checkpoint import read_model_config

    try:
        hf_model = load_hf_model(hf_dir)
    except ImportError:
        raise ConvertError("--verify needs transformers: pip install transformers") from None
    m = read_model_config(ckpt_dir)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, m.vocab_size, (batch, seq_len), generator=gen)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens).logits.float()
    del hf_model
    with _single_process():
        model = _build(m)
        _load_checkpoint(model, ckpt_dir, m)
        got = _forward(model, tokens)
    return (got - expected).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert transformers Llama/Mistral directories to megatron_slm checkpoints and back.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="transformers directory -> megatron_slm checkpoint (loads at any TP/PP)")
    a.add_argument("--input", required=True, help="transformers model directory (config.json + weights)")
    a.add_argument("--output", required=True, help="checkpoint directory to write (use with --ref-load / --load)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    a.add_argument("--verify", action="store_true", help="compare logits with transformers (fp32) after converting")
    a.add_argument("--verify-seq-len", type=int, default=64, help="tokens per sequence for --verify")
    a.add_argument("--force", action="store_true", help="replace an existing output")
    b = sub.add_parser("megatron-to-hf", help="megatron_slm checkpoint (any TP/PP) -> transformers directory")
    b.add_argument("--input", required=True, help="checkpoint directory written by save_model_weights")
    b.add_argument("--output", required=True, help="transformers directory to write")
    b.add_argument("--dtype", choices=sorted(DTYPES) + ["auto"], default="auto",
                   help="dtype of the written weights (auto: the dtype the checkpoint was converted in, else fp32)")
    b.add_argument("--hf-config", default=None, metavar="PATH",
                   help="config.json (or HF directory) whose token ids/model type to keep, for checkpoints that were "
                        "not written by hf-to-megatron")
    b.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("info")
    try:
        if args.command == "hf-to-megatron":
            if args.verify_seq_len < 1:
                raise ConvertError("--verify-seq-len must be >= 1")
            hf_to_megatron(args.input, args.output, dtype=args.dtype, verify=args.verify, force=args.force,
                           verify_seq_len=args.verify_seq_len)
        else:
            megatron_to_hf(args.input, args.output, dtype=args.dtype, force=args.force, hf_config=args.hf_config)
    except SLMError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
