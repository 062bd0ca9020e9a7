"""Convert between transformers Llama/Mistral directories and megatron_slm checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output CKPT [--dtype bf16] [--verify]
    python tools/convert_checkpoint.py megatron-to-hf --input CKPT --output HF_DIR [--dtype fp32|bf16] \
        [--tokenizer-model TOKENIZER]

``hf_to_megatron`` reads a transformers ``LlamaForCausalLM``/``MistralForCausalLM`` directory (config.json plus
safetensors or pytorch_model*.bin, sharded or not), maps its config to our ``ModelConfig`` and its weights to
megatron-core's GPTModel names, and writes a dist checkpoint with ``checkpoint.save_model_weights`` (converted
in one process at TP=1 PP=1; the checkpoint loads at any TP/PP, e.g. with ``--ref-load``). ``megatron_to_hf``
is the inverse: a checkpoint from any layout -> config.json + safetensors that ``AutoModelForCausalLM`` loads.

Tokenizer: ``hf_to_megatron`` copies the HF directory's tokenizer files into ``CKPT/hf_tokenizer/``;
``megatron_to_hf`` writes a tokenizer next to the weights so that ``AutoTokenizer`` loads the export too:
``--tokenizer-model`` (sentencepiece .model, tokenizer.json or an HF directory), else that copy. Its sha256
must be one the checkpoint records (``checkpoint.tokenizer_fingerprints``). A sentencepiece model becomes a
tokenizer.json that encodes exactly as sentencepiece does, without BOS/EOS, as the data was tokenized
(megatron_slm/data/tokenizer.py); config.json and generation_config.json take the tokenizer's token ids.

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
TOKENIZER_DIR = "hf_tokenizer"  # in a converted checkpoint: the HF directory's tokenizer files, for the export back
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
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
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)  # like preprocess_data.py: ckpt/base needs no mkdir
    except OSError as exc:
        raise ConvertError(f"cannot create the folder of output '{out_dir}': {exc.strerror}") from None


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
        # The source directory may be gone by the time the checkpoint is exported back: keep its tokenizer.
        copied = _copy_tokenizer_files(Path(hf_dir), out / TOKENIZER_DIR)
        sidecar = {"hf_config": hf_cfg, "dtype": dtype, "source": str(Path(hf_dir).resolve()),
                   "tokenizer_files": copied}
        tmp = out / (HF_SOURCE + ".tmp")
        tmp.write_text(json.dumps(sidecar, indent=2))
        tmp.rename(out / HF_SOURCE)
        del model
        log(f"converted {ARCHITECTURES[hf_cfg['model_type']]} '{hf_dir}' -> megatron checkpoint '{out_dir}' "
            f"({m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, {dtype})")
        if not copied:
            log(f"note: '{hf_dir}' holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); megatron-to-hf "
                "will need --tokenizer-model to export a tokenizer")
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
                   tokenizer_model: str | None = None, log=_log.info) -> None:
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
    tokenizer = _find_tokenizer(path, source, tokenizer_model)
    if tokenizer is not None:  # before the (long) weight loading
        _check_tokenizer_fingerprint(tokenizer, ckpt_dir)
    out, tmp = Path(out_dir), Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp, hf_cfg, m, (source.get("hf_config") or {}))
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
        hf_cfg.save_pretrained(str(tmp))
        _generation_config(hf_cfg).save_pretrained(str(tmp))
        _write_safetensors(tensors, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    what = f", tokenizer from {tokenizer.where}" if tokenizer is not None else ""
    log(f"converted megatron checkpoint '{ckpt_dir}' -> {hf_cfg.architectures[0]} '{out_dir}' ({dtype}{what})")
    if tokenizer is None:
        _log.warning(f"no tokenizer written to '{out_dir}' (the checkpoint keeps none): AutoTokenizer and "
                     "lm-eval cannot load it. Export again with --tokenizer-model TOKENIZER (the sentencepiece .model "
                     "or tokenizer.json the training data was preprocessed with, or an HF directory holding it)")


def _generation_config(hf_cfg):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                            pad_token_id=hf_cfg.pad_token_id)


# ----------------------------------------------------------------------------------------------
# Tokenizer export


class _TokenizerSource:
    """Where the export's tokenizer comes from. ``kind``: 'sentencepiece' (a .model file), 'json' (a
    tokenizer.json file) or 'hf_dir' (a transformers directory with tokenizer_config.json, copied as it is)."""

    def __init__(self, kind: str, path: Path, where: str):
        self.kind, self.path, self.where = kind, path, where

    def files(self) -> list[Path]:
        """The files whose sha256 identifies the tokenizer (as checkpoint.tokenizer_fingerprints takes them)."""
        if self.kind != "hf_dir":
            return [self.path]
        return [self.path / n for n in ("tokenizer.model", "tokenizer.json") if (self.path / n).is_file()]


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the transformers tokenizer files of ``src`` into a new directory ``dst``; returns their names."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names or not any(n in names for n in ("tokenizer.json", "tokenizer.model")):
        return []
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for n in names:
        shutil.copyfile(src / n, tmp / n)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return names


def _tokenizer_source(p: Path, where: str) -> _TokenizerSource:
    if p.is_dir():
        has = {n for n in TOKENIZER_FILES if (p / n).is_file()}
        if "tokenizer_config.json" in has and has & {"tokenizer.json", "tokenizer.model"}:
            return _TokenizerSource("hf_dir", p, where)
        # No tokenizer_config.json: build one around the tokenizer file, as for a bare file.
        if "tokenizer.json" in has:
            return _TokenizerSource("json", p / "tokenizer.json", where)
        if "tokenizer.model" in has:
            return _TokenizerSource("sentencepiece", p / "tokenizer.model", where)
        raise ConvertError(f"{where} holds neither tokenizer.json nor tokenizer.model; give a sentencepiece .model, a "
                           "tokenizer.json or a transformers directory holding one")
    from megatron_slm.data.tokenizer import SENTENCEPIECE, load_tokenizer

    kind = load_tokenizer(p).kind  # TokenizerError (one line) for a file that is no tokenizer
    return _TokenizerSource("sentencepiece" if kind == SENTENCEPIECE else "json", p, where)


def _find_tokenizer(ckpt_path: Path, source: dict, tokenizer_model: str | None) -> _TokenizerSource | None:
    """--tokenizer-model, else the tokenizer files hf_to_megatron kept, else (checkpoints converted before it kept
    them) the HF directory it was converted from, else the tokenizer file a training run was configured with,
    if still there."""
    if tokenizer_model:
        p = Path(tokenizer_model)
        if not p.exists():
            raise ConvertError(f"--tokenizer-model '{tokenizer_model}' does not exist; give a sentencepiece .model, a "
                               "tokenizer.json or a transformers directory holding one")
        return _tokenizer_source(p, f"--tokenizer-model '{tokenizer_model}'")
    if (ckpt_path / TOKENIZER_DIR).is_dir():
        return _tokenizer_source(ckpt_path / TOKENIZER_DIR, f"'{ckpt_path / TOKENIZER_DIR}' (kept by hf-to-megatron)")
    origin = Path(source["source"]) if isinstance(source.get("source"), str) else None
    if origin is not None and origin.is_dir() and any((origin / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return _tokenizer_source(origin, f"'{origin}' (the HF directory the checkpoint was converted from)")
    trained_with = _training_tokenizer(ckpt_path)
    if trained_with is not None:
        return _tokenizer_source(trained_with, f"'{trained_with}' (the --tokenizer-model the run trained with)")
    return None


def _training_tokenizer(ckpt_path: Path) -> Path | None:
    """The --tokenizer-model a training checkpoint's run was configured with, if that file is still there (its
    fingerprint is checked against the checkpoint's record afterwards)."""
    try:
        state = json.loads((ckpt_path / "trainer_state.json").read_text())
        path = Path(state["config"]["data"]["tokenizer_model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


def _check_tokenizer_fingerprint(tok: _TokenizerSource, ckpt_dir: str) -> None:
    """The tokenizer must be the one the checkpoint was trained with (same vocabulary size is not the same
    tokenizer): one of its files' sha256 among those the checkpoint records; unverifiable -> a warning."""
    from megatron_slm.checkpoint import tokenizer_fingerprints
    from megatron_slm.data.datasets import file_sha256

    recorded = tokenizer_fingerprints(ckpt_dir)
    found = {file_sha256(f) for f in tok.files()}
    if not recorded:
        _log.warning(f"checkpoint '{ckpt_dir}' records no tokenizer fingerprint: cannot verify that the "
                     f"tokenizer from {tok.where} is the one it was trained with; exporting it anyway")
        return
    if not found & recorded:
        raise ConvertError(
            f"the tokenizer from {tok.where} (sha256 {', '.join(sorted(f[:12] for f in found))}) is not the one "
            f"checkpoint '{ckpt_dir}' was trained with (sha256 {', '.join(sorted(r[:12] for r in recorded))}); pass "
            "--tokenizer-model with the tokenizer file the checkpoint's data was preprocessed with")


def _write_tokenizer(tok: _TokenizerSource, directory: Path, hf_cfg, m: ModelConfig, source_cfg: dict) -> None:
    """Write the tokenizer files into ``directory``, load them with AutoTokenizer as a user would, and give
    ``hf_cfg`` the tokenizer's token ids (a differing id of the source config is reported and replaced)."""
    if tok.kind == "hf_dir":
        for n in TOKENIZER_FILES:
            if (tok.path / n).is_file():
                shutil.copyfile(tok.path / n, directory / n)
    else:
        from megatron_slm.data.tokenizer import load_tokenizer

        ours = load_tokenizer(tok.path)  # the ids the data was made with: eod (= eos), bos, pad
        inv = ours.inv_vocab
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": m.max_position_embeddings or 4096,
                  "eos_token": inv[ours.eod], "bos_token": inv.get(ours.bos) if ours.bos is not None else None,
                  "pad_token": inv.get(ours.pad) if ours.pad >= 0 else None}
        data = tok.path.read_bytes()
        if tok.kind == "sentencepiece":
            built, unk = sentencepiece_to_tokenizers(data, str(tok.path))
            built.save(str(directory / "tokenizer.json"))
            shutil.copyfile(tok.path, directory / "tokenizer.model")  # its sha256 is the data's fingerprint
            # The data holds no BOS/EOS inside documents (EOD between them): encode the same way by default.
            config.update(unk_token=unk, add_bos_token=False, add_eos_token=False)
        else:
            shutil.copyfile(tok.path, directory / "tokenizer.json")  # as is: its own post-processor stays
            config["unk_token"] = _tokenizer_json_unk(data)
        config = {k: v for k, v in config.items() if v is not None}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    hf_cfg.save_pretrained(str(directory))  # AutoTokenizer may read the model type from config.json
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unusable tokenizer files
        raise ConvertError(f"the tokenizer from {tok.where} does not load with transformers' AutoTokenizer "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); pass a tokenizer.json or "
                           "a transformers directory with --tokenizer-model") from None
    if len(loaded) > m.vocab_size:
        raise ConvertError(f"the tokenizer from {tok.where} has {len(loaded)} tokens but the checkpoint's vocabulary "
                           f"is {m.vocab_size}: it is not this model's tokenizer; pass the right one with --tokenizer-model")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(loaded, key, None)
        if key == "unk_token_id" and value is None and getattr(hf_cfg, key, None) is None:
            continue
        stated = source_cfg.get(key)
        if stated is not None and stated != value:
            _log.warning(f"the source config says {key}={stated}, the exported tokenizer {value}; "
                         "config.json and generation_config.json take the tokenizer's")
        setattr(hf_cfg, key, value)


def _tokenizer_json_unk(data: bytes) -> str | None:
    model = json.loads(data).get("model") or {}
    if model.get("unk_token"):
        return model["unk_token"]
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        return model["vocab"][model["unk_id"]][0]
    return None


# sentencepiece's ModelProto.SentencePiece.Type
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4
_SP_UNIGRAM, _SP_BPE = 1, 2


def sentencepiece_to_tokenizers(data: bytes, name: str = "sentencepiece model"):
    """A Hugging Face ``tokenizers.Tokenizer`` that encodes exactly as the sentencepiece model ``data`` does
    (``SentencePieceProcessor.encode``, no BOS/EOS); returns it and its unknown token.

    Mirrors sentencepiece's pipeline: the normalization rule (its precompiled charsmap), removal of extra
    whitespace, the dummy "▁" prefix, spaces as "▁", user-defined symbols as atomic pieces, then BPE (merge
    order = piece score) or unigram, with byte fallback and unknown-piece fusing as configured.

    Built here because transformers 5.24 has no converter that reproduces such a model: LlamaTokenizer drops the
    normalizer and dummy-prefix settings, and the generic SpmConverter fails on BPE models and has no byte
    fallback (it warns so)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        raise ConvertError(f"{name} is not a readable sentencepiece model") from None
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    unsupported = []
    if trainer.model_type not in (_SP_UNIGRAM, _SP_BPE):
        unsupported.append(f"model type {trainer.model_type} (only BPE and unigram)")
    if trainer.treat_whitespace_as_suffix:
        unsupported.append("treat_whitespace_as_suffix")
    if not norm.escape_whitespaces:
        unsupported.append("escape_whitespaces=false")
    if unsupported:
        raise ConvertError(f"sentencepiece model {name} uses {', '.join(unsupported)}, which the export does not "
                           "reproduce; pass an equivalent tokenizer.json with --tokenizer-model")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next((p.piece for p in pieces if p.type == _SP_UNKNOWN), None)
    user = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]
    if trainer.model_type == _SP_BPE:
        # sentencepiece merges the adjacent pair whose joined piece scores highest: every split of a normal
        # piece into two normal pieces is a merge, ranked by the joined piece's score.
        normal = {p.piece for p in pieces if p.type == _SP_NORMAL}
        ranked = []
        for p in pieces:
            if p.type != _SP_NORMAL:
                continue
            s = p.piece
            for i in range(1, len(s)):
                if s[:i] in normal and s[i:] in normal:
                    ranked.append((-p.score, vocab[s], vocab[s[:i]], s[:i], s[i:]))
        ranked.sort()
        model = BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback,
                    # a multi-character user symbol is one pre-token that no merge builds: take it whole
                    ignore_merges=any(len(u) > 1 for u in user))
    else:
        model = Unigram([(p.piece, p.score) for p in pieces], vocab.get(unk), trainer.byte_fallback)
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        charsmap = normalizers.Precompiled(norm.precompiled_charsmap)
        # sentencepiece matches user symbols before normalizing; one the charsmap would change (e.g. "\n" under
        # nmt_nfkc) crosses it as a private-use placeholder (plane 16, absent from real text).
        changed = [u for u in sorted(user, key=len, reverse=True) if charsmap.normalize_str(u) != u]
        hidden = {u: chr(0x10FFFD - i) for i, u in enumerate(changed)}
        steps += [normalizers.Replace(u, h) for u, h in hidden.items()] + [charsmap]
        steps += [normalizers.Replace(h, u) for u, h in hidden.items()]
    if norm.remove_extra_whitespaces:  # only " " (after the charsmap), as sentencepiece does
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:  # once per text (a pre-tokenizer's "first" skips texts starting with a space)
        steps.append(normalizers.Prepend("▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    splits = []
    if user:  # matched longest first, as sentencepiece's prefix matcher does, and never merged with neighbours
        alternatives = sorted(user, key=len, reverse=True)
        pattern = "|".join("".join(f"\\x{{{ord(c):x}}}" for c in u) for u in alternatives)
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    # Control pieces (<s>, </s>) and the unknown piece are special tokens, as in transformers' own tokenizers.
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (_SP_CONTROL, _SP_UNKNOWN)])
    return tok, unk


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
    b.add_argument("--tokenizer-model", default=None, metavar="PATH",
                   help="tokenizer to write next to the weights, so that AutoTokenizer and lm-eval load the output: a "
                        "sentencepiece .model, a tokenizer.json or an HF directory holding one; it must be the "
                        "tokenizer the checkpoint records (sha256). Default: the tokenizer files hf-to-megatron kept, "
                        "if any (else only the weights are written, with a warning)")
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
            megatron_to_hf(args.input, args.output, dtype=args.dtype, force=args.force, hf_config=args.hf_config,
                           tokenizer_model=args.tokenizer_model)
    except SLMError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
