"""The conversions themselves.

``hf_to_megatron`` reads a transformers ``LlamaForCausalLM``/``MistralForCausalLM`` directory (config.json plus
safetensors or pytorch_model*.bin, sharded or not), maps its config to our ``ModelConfig`` and its weights to
megatron-core's GPTModel names, and writes a dist checkpoint with ``checkpoint.save_model_weights`` (converted
in one process at TP=1 PP=1; the checkpoint loads at any TP/PP, e.g. with ``--ref-load``). ``megatron_to_hf``
is the inverse: a checkpoint from any layout -> config.json + safetensors that ``AutoModelForCausalLM`` loads.

Tokenizer: ``hf_to_megatron`` copies the HF directory's tokenizer files into ``CKPT/hf_tokenizer/``;
``megatron_to_hf`` writes a tokenizer next to the weights so that ``AutoTokenizer`` loads the export too
(conversion/tokenizer_export.py); config.json and generation_config.json take the tokenizer's token ids.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from megatron_slm.checkpoint.files import OLD, TMP, sibling
from megatron_slm.conversion.safetensors_io import write_safetensors
from megatron_slm.conversion.tokenizer_export import (
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    check_tokenizer_fingerprint,
    copy_tokenizer_files,
    find_tokenizer,
    write_tokenizer,
)
from megatron_slm.data.preprocess import path_overlap
from megatron_slm.errors import CheckpointError, ConvertError, require
from megatron_slm.log import get_logger
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
from megatron_slm.model.loading import build_eval_model, load_model

_log = get_logger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # names: conversion.DTYPE_NAMES (a test checks)
HF_SOURCE = "hf_source.json"  # sidecar in a converted checkpoint: the original HF config and the dtype written


# ----------------------------------------------------------------------------------------------
# Process group and outputs


@contextlib.contextmanager
def single_process():
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


def _check_output(out_dir: str, force: bool, inputs: list) -> None:
    """``inputs``: every path the conversion reads (None: not given). An output that is, contains or lies inside
    one is refused even with --force: replacing it would delete that input (``--input RUN --output RUN/iter_N``)."""
    out = Path(out_dir)
    for path in (out, sibling(out, TMP), sibling(out, OLD)):  # the output and the scratch names its writes use
        hit = path_overlap(path, inputs)
        if hit:
            what = f"--output '{out_dir}'" if path == out else f"'{path}' (written while saving --output '{out_dir}')"
            raise ConvertError(
                f"{what} {hit[0]} the input '{hit[1]}': writing it would destroy that input (even "
                "with --force); choose an --output outside the inputs"
            )
    if out.exists() and not force:
        if not out.is_dir() or any(out.iterdir()):
            raise ConvertError(f"output '{out_dir}' already exists; choose a new path or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output '{out_dir}' exists and is not a directory")
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)  # like preprocess_data.py: ckpt/base needs no mkdir
    except OSError as exc:
        raise ConvertError(f"cannot create the folder of output '{out_dir}': {exc.strerror}") from None


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
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


def hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    dtype: str = "fp32",
    verify: bool = False,
    force: bool = False,
    verify_seq_len: int = 64,
    log=_log.info,
):
    """Convert a transformers Llama/Mistral directory into a megatron_slm checkpoint at ``out_dir``.

    Returns the max abs logit difference against transformers when ``verify`` (else None).
    """
    from megatron_slm.checkpoint import save_model_weights, tokenizer_fingerprints

    if verify_seq_len < 1:
        raise ConvertError("--verify-seq-len must be >= 1")
    torch_dtype = _dtype(dtype)
    if verify:  # before the conversion, not after it
        require("transformers", "--verify (transformers' own forward pass)")
    hf_cfg = read_hf_config(hf_dir)
    _check_output(out_dir, force, [hf_dir])
    hf = HFWeights(hf_dir)
    m = hf_config_to_model_config(hf_cfg)
    unused = sorted(
        k for k in set(hf.keys()) - hf_names_used(m) if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"
    )
    if unused:
        raise ConvertError(f"the HF weights hold tensors this converter does not map: {', '.join(unused[:5])}")
    with single_process():
        model = build_eval_model(m)
        load_hf_weights_into(model, hf, m)
        if torch_dtype != torch.float32:
            model.to(torch_dtype)
        out = Path(out_dir)
        if force and out.exists() and not out.is_dir():
            out.unlink()
        save_model_weights(model, str(out), m, tokenizer_fingerprints(hf_dir))  # its tokenizer files, if any
        # The source directory may be gone by the time the checkpoint is exported back: keep its tokenizer.
        copied = copy_tokenizer_files(Path(hf_dir), out / TOKENIZER_DIR)
        sidecar = {
            "hf_config": hf_cfg,
            "dtype": dtype,
            "source": str(Path(hf_dir).resolve()),
            "tokenizer_files": copied,
        }
        tmp = out / (HF_SOURCE + ".tmp")
        tmp.write_text(json.dumps(sidecar, indent=2))
        tmp.rename(out / HF_SOURCE)
        del model
        log(
            f"converted {ARCHITECTURES[hf_cfg['model_type']]} '{hf_dir}' -> megatron checkpoint '{out_dir}' "
            f"({m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, {dtype})"
        )
        if not copied:
            log(
                f"note: '{hf_dir}' holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); megatron-to-hf "
                "will need --tokenizer-model to export a tokenizer"
            )
        if verify:
            diff = verify_conversion(hf_dir, out_dir, seq_len=verify_seq_len)
            note = ""
            if (
                hf_cfg.get("model_type") == "mistral"
                and hf_cfg.get("sliding_window")
                and verify_seq_len <= int(hf_cfg["sliding_window"])
            ):
                note = " (sequence not longer than the sliding window: raise --verify-seq-len to test the window)"
            log(
                f"verify: max abs logit difference vs transformers = {diff:.3e} "
                f"({verify_seq_len} tokens x 2 sequences, fp32){note}"
            )
            return diff
    return None


def megatron_to_hf(
    ckpt_dir: str,
    out_dir: str,
    dtype: str = "auto",
    force: bool = False,
    hf_config: str | None = None,
    tokenizer_model: str | None = None,
    log=_log.info,
) -> None:
    """Convert a megatron_slm checkpoint (saved at any TP/PP) into a transformers directory at ``out_dir``.

    ``dtype``: fp32, bf16, or auto (the dtype the checkpoint was converted in, fp32 when unknown).
    ``hf_config``: a transformers config.json (or its directory) whose token ids and model type to keep, for
    checkpoints without the ``hf_source.json`` that ``hf_to_megatron`` leaves (e.g. a trained policy).
    ``tokenizer_model``: the tokenizer to write next to the weights (sentencepiece .model, tokenizer.json or a
    transformers directory); default: the tokenizer files ``hf_to_megatron`` kept. It must be the tokenizer the
    checkpoint records (sha256); without one, only the weights are written (with a warning).
    """
    from megatron_slm import checkpoint

    path = Path(ckpt_dir)
    if not path.exists():
        raise ConvertError(f"input '{ckpt_dir}' does not exist")
    if (path / "config.json").is_file() and not (path / "slm_model.json").is_file():
        raise ConvertError(
            f"'{ckpt_dir}' is a transformers directory, not a megatron_slm checkpoint: use hf-to-megatron"
        )
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
    for module in ("transformers", "safetensors", "tokenizers"):
        require(module, "megatron-to-hf")
    hf_cfg = model_config_to_hf_config(m, source.get("hf_config"), torch_dtype)
    tokenizer = find_tokenizer(path, source, tokenizer_model)
    # path: the iteration read; the tokenizer may be the HF directory the checkpoint was converted from
    _check_output(out_dir, force, [ckpt_dir, path, hf_config, tokenizer_model, tokenizer and tokenizer.path])
    if tokenizer is not None:  # before the (long) weight loading
        check_tokenizer_fingerprint(tokenizer, ckpt_dir)
    out = Path(out_dir)
    tmp = sibling(out, TMP)  # the name _check_output checked ("out/" + ".tmp" would lie inside out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, hf_cfg, m, (source.get("hf_config") or {}))
        with single_process():
            model = load_model(ckpt_dir, m)
            full = full_megatron_tensors(model)
            del model
        expected = set(megatron_names(m))
        if set(full) != expected:
            raise CheckpointError(
                f"checkpoint '{ckpt_dir}' gave parameters {sorted(set(full) ^ expected)[:4]} unexpectedly"
            )
        tensors = {k: v.to(torch_dtype).contiguous() for k, v in megatron_to_hf_tensors(full, m).items()}
        del full
        hf_cfg.save_pretrained(str(tmp))
        _generation_config(hf_cfg).save_pretrained(str(tmp))
        write_safetensors(tensors, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    what = f", tokenizer from {tokenizer.where}" if tokenizer is not None else ""
    log(f"converted megatron checkpoint '{ckpt_dir}' -> {hf_cfg.architectures[0]} '{out_dir}' ({dtype}{what})")
    if tokenizer is None:
        _log.warning(
            f"no tokenizer written to '{out_dir}' (the checkpoint keeps none): AutoTokenizer and "
            "lm-eval cannot load it. Export again with --tokenizer-model TOKENIZER (the sentencepiece .model "
            "or tokenizer.json the training data was preprocessed with, or an HF directory holding it)"
        )


def _generation_config(hf_cfg):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id, pad_token_id=hf_cfg.pad_token_id
    )


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

    require("transformers", "--verify (transformers' own forward pass)")
    hf_model = load_hf_model(hf_dir)
    m = read_model_config(ckpt_dir)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, m.vocab_size, (batch, seq_len), generator=gen)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens).logits.float()
    del hf_model
    with single_process():
        model = load_model(ckpt_dir, m)
        got = forward_logits(model, tokens)
    return (got - expected).abs().max().item()
