"""The transformers <-> megatron-core mapping of Llama/Mistral: configs, weight names and tensor layouts.

Used by the converter (megatron_slm/conversion/) and by checkpoint.load_weights, which loads a transformers
directory straight into a model at any TP/PP.

Layout facts (checked numerically against transformers, see tests/conversion/test_convert_checkpoint.py):
- RoPE: transformers' Llama/Mistral and megatron-core (rotary_interleaved=False) both rotate halves
  (``cat(-x2, x1)``) with the same inverse frequencies, so q/k rows are copied without any permutation
  (Meta's original checkpoints need one; HF-format ones already have it applied).
- Fused QKV: megatron's ``linear_qkv`` is [ng, (np/ng + 2) * hn, h]: for each KV group its q heads, then k,
  then v. Fused fc1 is [gate; up].
- Sliding window: transformers' Mistral lets query i see keys j with i - W < j <= i (W tokens), megatron's
  ``window_size=(w, 0)`` lets it see i - w <= j <= i (w + 1 tokens). ModelConfig.sliding_window holds W
  (Mistral's meaning) and model/build.py passes w = W - 1, so the value is copied unchanged.

Every failure raises ``ConvertError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_slm.config import ModelConfig
from megatron_slm.errors import ConvertError, require

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


# ----------------------------------------------------------------------------------------------
# Configs


def read_hf_config(hf_dir: str) -> dict:
    """config.json of a transformers Llama/Mistral directory, after checking it is one."""
    path = Path(hf_dir)
    if not path.exists():
        raise ConvertError(f"input '{hf_dir}' does not exist")
    if not path.is_dir():
        raise ConvertError(f"input '{hf_dir}' is not a directory; give a transformers model directory")
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "slm_model.json").is_file() or (path / "metadata.json").is_file():
            hint = " (it looks like a megatron_slm checkpoint: use megatron-to-hf)"
        raise ConvertError(f"'{hf_dir}' has no config.json; it is not a transformers model directory{hint}")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (ValueError, OSError) as exc:
        raise ConvertError(f"'{hf_dir}/config.json' is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"'{hf_dir}/config.json' does not hold a config object")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in ARCHITECTURES:
        raise ConvertError(
            f"'{hf_dir}' holds a {model_type or 'model without model_type'} model "
            f"({', '.join(archs) or 'no architectures listed'}); only Llama and Mistral "
            f"({', '.join(ARCHITECTURES.values())}) convert"
        )
    bad = [a for a in archs if a not in ARCHITECTURES.values()]
    if bad:
        raise ConvertError(
            f"'{hf_dir}' is a {', '.join(bad)}; only causal LMs {', '.join(ARCHITECTURES.values())} convert"
        )
    return cfg


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for p in (params, scaling):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ConvertError(
                f"RoPE scaling type {rope_type!r} is not supported (megatron_slm builds plain RoPE); "
                "only models without rope scaling convert"
            )
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def hf_config_to_model_config(cfg: dict) -> ModelConfig:
    """transformers Llama/Mistral config.json -> ModelConfig (rejects what megatron_slm cannot build)."""
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        ffn = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvertError(f"config.json lacks a usable {exc} field") from None
    groups = int(cfg.get("num_key_value_heads") or heads)
    problems = []
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act={cfg.get('hidden_act')!r} (only SwiGLU/silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (megatron_slm builds bias-free linears)")
    if hidden % heads or heads % groups:
        problems.append(f"hidden_size={hidden}, heads={heads}, kv heads={groups} do not divide")
    elif cfg.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim={cfg.get('head_dim')} != hidden_size / num_attention_heads = {hidden // heads}")
    theta = _rope_theta(cfg)
    if theta != int(theta):
        problems.append(f"rope_theta={theta} is not an integer (megatron_slm passes rotary_base as an int)")
    if problems:
        raise ConvertError("unsupported model: " + "; ".join(problems))
    window = cfg.get("sliding_window") if cfg.get("model_type") == "mistral" else None
    if cfg.get("model_type") == "mistral" and cfg.get("use_sliding_window") is False:
        window = None
    sliding = None
    if window:
        # transformers' window W (keys j with i - W < j <= i) is megatron's window_size=(W - 1, 0).
        sliding = int(window)  # ModelConfig.sliding_window has Mistral's meaning (model/build.py)
        if sliding < 1:
            raise ConvertError(f"unsupported model: sliding_window={window}")
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        vocab_size=vocab,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        rotary_base=theta,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        sliding_window=sliding,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )


def model_config_to_hf_config(m: ModelConfig, source: dict | None = None, dtype: torch.dtype = torch.float32):
    """A transformers config object for ``m`` (Mistral when it has a sliding window, else Llama)."""
    from transformers import LlamaConfig, MistralConfig

    source = source or {}
    mistral = bool(m.sliding_window) or source.get("model_type") == "mistral"
    kwargs = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings or 4096,
        rms_norm_eps=m.norm_epsilon,
        rope_theta=float(m.rotary_base),
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        initializer_range=m.init_method_std,
        torch_dtype="bfloat16" if dtype == torch.bfloat16 else "float32",  # transformers 5 reads it as dtype
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in source:
            kwargs[key] = source[key]
    if mistral:
        window = None
        if m.sliding_window:
            window = m.sliding_window
        kwargs["sliding_window"] = window
        cfg = MistralConfig(**kwargs)
    else:
        cfg = LlamaConfig(**kwargs)
    cfg.architectures = [ARCHITECTURES["mistral" if mistral else "llama"]]
    if source.get("unk_token_id") is not None:
        cfg.unk_token_id = source["unk_token_id"]
    return cfg


# ----------------------------------------------------------------------------------------------
# HF weights


def _safe_open():
    """safetensors' ``safe_open``, or the one-line error naming the extra that installs it."""
    return require("safetensors", "reading a transformers directory's .safetensors weights").safe_open


class HFWeights:
    """Lazy access to the tensors of a transformers directory (safetensors or .bin, sharded or not)."""

    def __init__(self, hf_dir: str):
        path = Path(hf_dir)
        self.where: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict] = {}
        index = None
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / name).is_file():
                index = path / name
                break
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, OSError) as exc:
                raise ConvertError(f"'{index}' is not a valid weight index ({exc})") from None
            for key, file in weight_map.items():
                self.where[key] = path / file
            missing = sorted({str(f) for f in self.where.values() if not f.is_file()})
            if missing:
                raise ConvertError(f"'{hf_dir}' lacks weight files listed in {index.name}: {', '.join(missing[:3])}")
        else:
            files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
            if not files and (path / "pytorch_model.bin").is_file():
                files = [path / "pytorch_model.bin"]
            if not files:
                raise ConvertError(
                    f"'{hf_dir}' has no weights (model.safetensors, pytorch_model.bin or their sharded index); "
                    "save the model with save_pretrained"
                )
            for file in files:
                for key in self._keys_of(file):
                    self.where[key] = file
        # Some checkpoints lack the "model." prefix (LlamaModel rather than LlamaForCausalLM).
        if self.where and not any(k.startswith("model.") for k in self.where):
            self.where = {
                ("lm_head.weight" if k == "lm_head.weight" else "model." + k): f for k, f in self.where.items()
            }
            self._strip_prefix = True
        else:
            self._strip_prefix = False

    def _keys_of(self, file: Path):
        safe_open = _safe_open() if file.suffix == ".safetensors" else None
        try:
            if safe_open is not None:
                with safe_open(str(file), framework="pt") as f:
                    return list(f.keys())
            return list(self._load_bin(file).keys())
        except ConvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
            raise ConvertError(f"cannot read weights '{file}' ({type(exc).__name__}: {str(exc)[:200]})") from None

    def _load_bin(self, file: Path) -> dict:
        if file not in self._bin_cache:
            try:  # weights_only: a directory from elsewhere cannot run code (transformers' own reads do the same)
                self._bin_cache = {file: torch.load(str(file), map_location="cpu", weights_only=True)}
            except Exception as exc:  # noqa: BLE001
                from megatron_slm.checkpoint.sharded import refusal

                why = refusal(exc)
                if why:
                    raise ConvertError(
                        f"refused to load '{file}': it {why}, and loading it could run code (weights "
                        "may come from anyone, so only plain data is loaded); get the weights from a "
                        "source you trust, preferably as safetensors"
                    ) from None
                raise ConvertError(
                    f"cannot read weights '{file}' ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                ) from None
        return self._bin_cache[file]

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ConvertError(f"the HF weights lack '{key}'")
        file = self.where[key]
        stored = key[len("model.") :] if self._strip_prefix and key != "lm_head.weight" else key
        safe_open = _safe_open() if file.suffix == ".safetensors" else None
        try:
            if safe_open is not None:
                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(stored)
            return self._load_bin(file)[stored]
        except ConvertError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConvertError(f"cannot read '{key}' from '{file}' ({type(exc).__name__}: {str(exc)[:200]})") from None


# ----------------------------------------------------------------------------------------------
# Weight layouts

_TE_NAMES = {  # TransformerEngine fuses the pre-norms into the following linear
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(global_name: str) -> str:
    """Megatron global parameter name -> the local-spec name used by the converter (TE names folded)."""
    for te, local in _TE_NAMES.items():
        if global_name.endswith("." + te):
            return global_name[: -len(te)] + local
    return global_name


def megatron_names(m: ModelConfig) -> list[str]:
    names = ["embedding.word_embeddings.weight"]
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        names += [
            p + s
            for s in (
                "input_layernorm.weight",
                "self_attention.linear_qkv.weight",
                "self_attention.linear_proj.weight",
                "pre_mlp_layernorm.weight",
                "mlp.linear_fc1.weight",
                "mlp.linear_fc2.weight",
            )
        ]
    names.append("decoder.final_layernorm.weight")
    if m.untie_embeddings_and_output_weights:
        names.append("output_layer.weight")
    return names


def _qkv_dims(m: ModelConfig):
    ng = m.num_query_groups or m.num_attention_heads
    hn = m.hidden_size // m.num_attention_heads
    return ng, m.num_attention_heads // ng, hn


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """HF q/k/v [heads*hn, h], [ng*hn, h] x2 -> megatron linear_qkv [ng * (np/ng + 2) * hn, h]."""
    ng, per, hn = _qkv_dims(m)
    h = q.shape[-1]
    qkv = torch.cat([q.reshape(ng, per * hn, h), k.reshape(ng, hn, h), v.reshape(ng, hn, h)], dim=1)
    return qkv.reshape(ng * (per + 2) * hn, h)


def split_qkv(qkv: torch.Tensor, m: ModelConfig):
    ng, per, hn = _qkv_dims(m)
    h = qkv.shape[-1]
    grouped = qkv.reshape(ng, (per + 2) * hn, h)
    q, k, v = torch.split(grouped, [per * hn, hn, hn], dim=1)
    return q.reshape(ng * per * hn, h), k.reshape(ng * hn, h), v.reshape(ng * hn, h)


def hf_tensor_for(name: str, hf: HFWeights, m: ModelConfig) -> torch.Tensor:
    """The full megatron tensor ``name`` (local-spec global name, true vocab rows) from the HF weights."""
    if name == "embedding.word_embeddings.weight":
        return hf.get("model.embed_tokens.weight")
    if name == "output_layer.weight":
        return hf.get("lm_head.weight")
    if name == "decoder.final_layernorm.weight":
        return hf.get("model.norm.weight")
    parts = name.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    p = f"model.layers.{i}."
    if rest == "input_layernorm.weight":
        return hf.get(p + "input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return hf.get(p + "post_attention_layernorm.weight")
    if rest == "self_attention.linear_qkv.weight":
        return fuse_qkv(*(hf.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"), m)
    if rest == "self_attention.linear_proj.weight":
        return hf.get(p + "self_attn.o_proj.weight")
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf.get(p + "mlp.gate_proj.weight"), hf.get(p + "mlp.up_proj.weight")], dim=0)
    if rest == "mlp.linear_fc2.weight":
        return hf.get(p + "mlp.down_proj.weight")
    raise ConvertError(f"no HF counterpart for megatron parameter '{name}'")


def hf_names_used(m: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if m.untie_embeddings_and_output_weights:
        names.add("lm_head.weight")
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        names |= {
            p + s
            for s in (
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            )
        }
    return names


def megatron_to_hf_tensors(full: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Full megatron tensors (by local-spec global name, true vocab rows) -> HF state dict."""
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"]}
    for i in range(m.num_layers):
        s, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = full[s + "input_layernorm.weight"]
        q, k, v = split_qkv(full[s + "self_attention.linear_qkv.weight"], m)
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = (
            q,
            k,
            v,
        )
        out[p + "self_attn.o_proj.weight"] = full[s + "self_attention.linear_proj.weight"]
        out[p + "post_attention_layernorm.weight"] = full[s + "pre_mlp_layernorm.weight"]
        gate, up = torch.chunk(full[s + "mlp.linear_fc1.weight"], 2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = full[s + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = full["output_layer.weight"]
    return out


@torch.no_grad()
def load_hf_weights_into(model, hf: HFWeights, m: ModelConfig) -> None:
    """Copy HF weights into this rank's megatron model (any TP/PP; vocab padding rows zeroed)."""
    from megatron_slm.model.build import VOCAB_PARAMS, full_shape, global_param_name, shard_of

    cache = {}
    for local_name, param in model.named_parameters():
        name = canonical_name(global_param_name(model, local_name))
        if name not in cache:
            cache.clear()  # tensors are used once (a tied output layer reuses the embedding just read)
            cache[name] = hf_tensor_for(name, hf, m)
        full = cache[name]
        shape = full_shape(param)
        if name in VOCAB_PARAMS:
            if full.shape[0] != m.vocab_size or list(full.shape[1:]) != shape[1:]:
                raise ConvertError(f"'{name}' has shape {list(full.shape)}; expected [{m.vocab_size}, {shape[1]}]")
            padded = torch.zeros(shape, dtype=full.dtype)
            padded[: m.vocab_size] = full
            full = padded
        if list(full.shape) != shape:
            raise ConvertError(f"HF weights for '{name}' have shape {list(full.shape)}; the config implies {shape}")
        param.copy_(shard_of(full, param).to(device=param.device, dtype=param.dtype))


def full_megatron_tensors(model) -> dict[str, torch.Tensor]:
    """Full tensors by local-spec global name (true vocab rows) of a model built at TP=1 PP=1."""
    from megatron_slm.model.build import VOCAB_PARAMS, global_param_name

    out = {}
    for local_name, param in model.named_parameters():
        name = canonical_name(global_param_name(model, local_name))
        t = param.detach().cpu()
        if name in VOCAB_PARAMS:
            t = t[: model.true_vocab_size]
        out[name] = t
    return out
