"""Model weights: a GPTModel's (or an interleaved pipeline's chunks') dist_checkpointing shards plus
``slm_model.json`` (the model config and the tokenizer fingerprints), saved and loaded at any TP/PP; also a
transformers Llama/Mistral directory as a source of weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatron_slm.checkpoint.agreement import rank
from megatron_slm.checkpoint.layout import LATEST, MODEL_META, read_json, resolve
from megatron_slm.checkpoint.sharded import load_sharded, save_sharded
from megatron_slm.errors import CheckpointError, DataError
from megatron_slm.log import get_logger

log = get_logger(__name__)


# The fields that decide what a checkpoint's weights compute (their shapes and the model's function):
# loading under other values is refused, or they are taken from the checkpoint (training/resolve.py).
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "rotary_base",
    "norm_epsilon",
    "untie_embeddings_and_output_weights",
    "sliding_window",
)


def model_meta_text(model_cfg, tokenizer_fingerprints=()) -> str:
    """slm_model.json: the model config and the fingerprints (sha256 of the file) of the tokenizer it reads."""
    return json.dumps(
        {"model": dataclasses.asdict(model_cfg), "tokenizer": {"fingerprints": sorted(set(tokenizer_fingerprints))}},
        indent=2,
    )


def model_sharded_state_dict(model) -> dict:
    """A GPTModel's sharded state dict; for the chunks of an interleaved pipeline (a list) the union of theirs.

    The chunks' dicts go under "model0", "model1", ... (as Megatron-LM): their local keys repeat, but the shards'
    keys are global (layer numbers of the whole model), so the files are those of any other layout."""
    if isinstance(model, (list, tuple)):
        if len(model) == 1:
            return model[0].sharded_state_dict()
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}
    return model.sharded_state_dict()


def load_model_state(model, state: dict) -> None:
    """``load_state_dict`` of a loaded ``model_sharded_state_dict`` (a GPTModel or a list of chunks)."""
    if isinstance(model, (list, tuple)) and len(model) > 1:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(state[f"model{i}"])
    else:
        (model[0] if isinstance(model, (list, tuple)) else model).load_state_dict(state)


def save_model_weights(model, directory: str, model_cfg, tokenizer_fingerprints=()) -> None:
    """``model``: a GPTModel or the list of this rank's chunks of an interleaved pipeline."""

    def write(tmp):
        if rank() == 0:
            (tmp / MODEL_META).write_text(model_meta_text(model_cfg, tokenizer_fingerprints))

    save_sharded(model_sharded_state_dict(model), Path(directory), write)


def read_model_meta(directory: str) -> dict:
    path = resolve(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' does not exist; check the path")
    if not (path / MODEL_META).is_file() or not (path / "metadata.json").is_file():
        hint = " (an interrupted save left it; delete it and save again)" if path.name.endswith(".tmp") else ""
        raise CheckpointError(f"'{path}' is not a complete megatron_slm checkpoint{hint}")
    return read_json(path / MODEL_META)


def _check_vocab(directory: str, vocab: int | None, expected_vocab: int | None) -> None:
    if expected_vocab is not None and vocab != expected_vocab:
        raise CheckpointError(
            f"checkpoint '{directory}' has vocab_size={vocab} but the run expects {expected_vocab}: the policy, the "
            "reference and the tokenizer must share one vocabulary"
        )


def load_model_weights(model, directory: str, expected_vocab: int | None = None) -> dict:
    """Load weights saved by ``save_model_weights`` or a training checkpoint (any TP/PP, interleaved or not) into
    ``model`` (a GPTModel or a list of chunks)."""
    meta = read_model_meta(directory)
    _check_vocab(directory, meta["model"].get("vocab_size"), expected_vocab)
    sharded = model_sharded_state_dict(model)
    loaded = load_sharded(sharded, resolve(directory), "model", meta)
    load_model_state(model, {k: v for k, v in loaded.items() if k in sharded})  # a training checkpoint has more
    return meta


def is_hf_dir(directory: str | Path) -> bool:
    """A transformers model directory (config.json, no megatron_slm metadata)."""
    p = Path(directory)
    return (p / "config.json").is_file() and not (p / MODEL_META).is_file() and not (p / LATEST).is_file()


def read_model_config(directory: str):
    """The ModelConfig a weights source was saved with: a megatron_slm checkpoint (its slm_model.json, or a
    training run's latest iteration) or a transformers Llama/Mistral directory (its config.json)."""
    from megatron_slm.config import ModelConfig
    from megatron_slm.model.presets import apply_preset

    if is_hf_dir(directory):
        from megatron_slm.model import hf

        return hf.hf_config_to_model_config(hf.read_hf_config(directory))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    m = ModelConfig(**{k: v for k, v in read_model_meta(directory).get("model", {}).items() if k in fields})
    apply_preset(m)
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    missing = [
        n
        for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
        if getattr(m, n) is None
    ]
    if missing:
        raise CheckpointError(f"checkpoint '{directory}': its {MODEL_META} lacks {', '.join(missing)}")
    return m


def architecture_differences(configured, saved) -> dict:
    """{field: (configured value, checkpoint value)} over ARCH_FIELDS (numbers compared as numbers)."""

    def same(a, b):
        return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))

    return {
        f: (getattr(configured, f), getattr(saved, f))
        for f in ARCH_FIELDS
        if not same(getattr(configured, f), getattr(saved, f))
    }


def tokenizer_fingerprints(directory: str) -> set:
    """sha256 fingerprints of the tokenizer a weights source belongs to: those its slm_model.json records, or
    of the tokenizer files (tokenizer.model / tokenizer.json) in a transformers directory. Empty: unknown."""
    from megatron_slm.data.datasets import file_sha256

    if is_hf_dir(directory):
        return {
            file_sha256(Path(directory) / name)
            for name in ("tokenizer.model", "tokenizer.json")
            if (Path(directory) / name).is_file()
        }
    return set((read_model_meta(directory).get("tokenizer") or {}).get("fingerprints") or [])


def check_tokenizer(
    source: str,
    who: str,
    fingerprint: str | None,
    tokenizer_of: str = "the data's tokenizer",
    fix: str = "Use a checkpoint of the data's tokenizer, or re-tokenize the data with the checkpoint's",
) -> None:
    """A checkpoint must have been trained with the tokenizer of the tokens it computes losses on (same vocabulary
    size is not the same tokenizer): refused when both fingerprints are known and differ, else only a warning.
    ``fingerprint``: sha256 of that tokenizer's file, named ``tokenizer_of`` in the messages; ``fix``: what to do."""
    known = tokenizer_fingerprints(source)
    if not known or fingerprint is None:
        log.warning(
            f"{who} records no tokenizer fingerprint (or {tokenizer_of} has none): cannot verify that "
            "it was trained with that tokenizer"
        )
        return
    if fingerprint not in known:
        raise DataError(
            f"{who} was trained with another tokenizer (sha256 {', '.join(sorted(k[:12] for k in known))}) "
            f"than {tokenizer_of} ({fingerprint[:12]}); its token losses would be about other tokens. {fix}"
        )


def weights_vocab(directory: str) -> int | None:
    """The vocabulary size of a weights source: megatron_slm checkpoint or transformers directory."""
    return read_model_config(directory).vocab_size


def load_weights(model, directory: str, model_cfg, expected_vocab: int | None = None) -> None:
    """Weights from a megatron_slm checkpoint (any TP/PP) or straight from a transformers Llama/Mistral dir,
    into a model built from ``model_cfg``; refused when the checkpoint's architecture differs in any field."""
    saved = read_model_config(directory)
    diff = architecture_differences(model_cfg, saved)
    if diff:
        raise CheckpointError(
            f"'{directory}' was saved with another architecture than the model it is loaded into: "
            + "; ".join(f"{k} {b} (checkpoint) vs {a} (config)" for k, (a, b) in diff.items())
        )
    if not is_hf_dir(directory):
        load_model_weights(model, directory, expected_vocab)
        return
    _check_vocab(directory, saved.vocab_size, expected_vocab)  # load_model_weights checks its own
    from megatron_slm.model import hf

    with torch.no_grad():
        weights = hf.HFWeights(directory)
        for chunk in model if isinstance(model, (list, tuple)) else [model]:  # the chunks of an interleaved pipeline
            hf.load_hf_weights_into(chunk, weights, saved)
