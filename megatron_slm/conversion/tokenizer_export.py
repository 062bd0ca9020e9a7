"""The tokenizer an export writes next to the weights, so that ``AutoTokenizer`` (and lm-eval) load the export.

Where it comes from (``find_tokenizer``): ``--tokenizer-model`` (sentencepiece .model, tokenizer.json or a
transformers directory), else the copy ``hf_to_megatron`` kept in ``CKPT/hf_tokenizer/`` (``copy_tokenizer_files``),
else the HF directory the checkpoint was converted from, else the tokenizer a training run was configured with. Its
sha256 must be one the checkpoint records (``check_tokenizer_fingerprint``). ``write_tokenizer`` writes its files
(a sentencepiece model as a tokenizer.json that encodes exactly as sentencepiece does, without BOS/EOS, as the data
was tokenized: ``sentencepiece_json``), loads them back with AutoTokenizer and gives the model's config the
tokenizer's token ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_slm.config import ModelConfig
from megatron_slm.conversion.sentencepiece_json import sentencepiece_to_tokenizers
from megatron_slm.errors import ConvertError
from megatron_slm.log import get_logger

_log = get_logger(__name__)
TOKENIZER_DIR = "hf_tokenizer"  # in a converted checkpoint: the HF directory's tokenizer files, for the export back
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class TokenizerSource:
    """Where the export's tokenizer comes from. ``kind``: 'sentencepiece' (a .model file), 'json' (a
    tokenizer.json file) or 'hf_dir' (a transformers directory with tokenizer_config.json, copied as it is)."""

    def __init__(self, kind: str, path: Path, where: str):
        self.kind, self.path, self.where = kind, path, where

    def files(self) -> list[Path]:
        """The files whose sha256 identifies the tokenizer (as checkpoint.tokenizer_fingerprints takes them)."""
        if self.kind != "hf_dir":
            return [self.path]
        return [self.path / n for n in ("tokenizer.model", "tokenizer.json") if (self.path / n).is_file()]


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
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


def _tokenizer_source(p: Path, where: str) -> TokenizerSource:
    if p.is_dir():
        has = {n for n in TOKENIZER_FILES if (p / n).is_file()}
        if "tokenizer_config.json" in has and has & {"tokenizer.json", "tokenizer.model"}:
            return TokenizerSource("hf_dir", p, where)
        # No tokenizer_config.json: build one around the tokenizer file, as for a bare file.
        if "tokenizer.json" in has:
            return TokenizerSource("json", p / "tokenizer.json", where)
        if "tokenizer.model" in has:
            return TokenizerSource("sentencepiece", p / "tokenizer.model", where)
        raise ConvertError(
            f"{where} holds neither tokenizer.json nor tokenizer.model; give a sentencepiece .model, a "
            "tokenizer.json or a transformers directory holding one"
        )
    from megatron_slm.data.tokenizer import SENTENCEPIECE, load_tokenizer

    kind = load_tokenizer(p).kind  # TokenizerError (one line) for a file that is no tokenizer
    return TokenizerSource("sentencepiece" if kind == SENTENCEPIECE else "json", p, where)


def find_tokenizer(ckpt_path: Path, source: dict, tokenizer_model: str | None) -> TokenizerSource | None:
    """--tokenizer-model, else the tokenizer files hf_to_megatron kept, else (checkpoints converted before it kept
    them) the HF directory it was converted from, else the tokenizer file a training run was configured with,
    if still there."""
    if tokenizer_model:
        p = Path(tokenizer_model)
        if not p.exists():
            raise ConvertError(
                f"--tokenizer-model '{tokenizer_model}' does not exist; give a sentencepiece .model, a "
                "tokenizer.json or a transformers directory holding one"
            )
        return _tokenizer_source(p, f"--tokenizer-model '{tokenizer_model}'")
    if (ckpt_path / TOKENIZER_DIR).is_dir():
        return _tokenizer_source(ckpt_path / TOKENIZER_DIR, f"'{ckpt_path / TOKENIZER_DIR}' (kept by hf-to-megatron)")
    origin = Path(source["source"]) if isinstance(source.get("source"), str) else None
    if (
        origin is not None
        and origin.is_dir()
        and any((origin / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    ):
        return _tokenizer_source(origin, f"'{origin}' (the HF directory the checkpoint was converted from)")
    trained_with = _training_tokenizer(ckpt_path)
    if trained_with is not None:
        return _tokenizer_source(trained_with, f"'{trained_with}' (the --tokenizer-model the run trained with)")
    return None


def _training_tokenizer(ckpt_path: Path) -> Path | None:
    """The --tokenizer-model a training checkpoint's run was configured with, if that file is still there (its
    fingerprint is checked against the checkpoint's record afterwards)."""
    from megatron_slm.checkpoint import recorded_config
    from megatron_slm.errors import CheckpointError

    try:
        path = Path(recorded_config(ckpt_path)["data"]["tokenizer_model"])
    except (CheckpointError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


def check_tokenizer_fingerprint(tok: TokenizerSource, ckpt_dir: str) -> None:
    """The tokenizer must be the one the checkpoint was trained with (same vocabulary size is not the same
    tokenizer): one of its files' sha256 among those the checkpoint records; unverifiable -> a warning."""
    from megatron_slm.checkpoint import tokenizer_fingerprints
    from megatron_slm.data.datasets import file_sha256

    recorded = tokenizer_fingerprints(ckpt_dir)
    found = {file_sha256(f) for f in tok.files()}
    if not recorded:
        _log.warning(
            f"checkpoint '{ckpt_dir}' records no tokenizer fingerprint: cannot verify that the "
            f"tokenizer from {tok.where} is the one it was trained with; exporting it anyway"
        )
        return
    if not found & recorded:
        raise ConvertError(
            f"the tokenizer from {tok.where} (sha256 {', '.join(sorted(f[:12] for f in found))}) is not the one "
            f"checkpoint '{ckpt_dir}' was trained with (sha256 {', '.join(sorted(r[:12] for r in recorded))}); pass "
            "--tokenizer-model with the tokenizer file the checkpoint's data was preprocessed with"
        )


def write_tokenizer(tok: TokenizerSource, directory: Path, hf_cfg, m: ModelConfig, source_cfg: dict) -> None:
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
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": m.max_position_embeddings or 4096,
            "eos_token": inv[ours.eod],
            "bos_token": inv.get(ours.bos) if ours.bos is not None else None,
            "pad_token": inv.get(ours.pad) if ours.pad >= 0 else None,
        }
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
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
    hf_cfg.save_pretrained(str(directory))  # AutoTokenizer may read the model type from config.json
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unusable tokenizer files
        raise ConvertError(
            f"the tokenizer from {tok.where} does not load with transformers' AutoTokenizer "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); pass a tokenizer.json or "
            "a transformers directory with --tokenizer-model"
        ) from None
    if len(loaded) > m.vocab_size:
        raise ConvertError(
            f"the tokenizer from {tok.where} has {len(loaded)} tokens but the checkpoint's vocabulary "
            f"is {m.vocab_size}: it is not this model's tokenizer; pass the right one with --tokenizer-model"
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(loaded, key, None)
        if key == "unk_token_id" and value is None and getattr(hf_cfg, key, None) is None:
            continue
        stated = source_cfg.get(key)
        if stated is not None and stated != value:
            _log.warning(
                f"the source config says {key}={stated}, the exported tokenizer {value}; "
                "config.json and generation_config.json take the tokenizer's"
            )
        setattr(hf_cfg, key, value)


def _tokenizer_json_unk(data: bytes) -> str | None:
    model = json.loads(data).get("model") or {}
    if model.get("unk_token"):
        return model["unk_token"]
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        return model["vocab"][model["unk_id"]][0]
    return None
