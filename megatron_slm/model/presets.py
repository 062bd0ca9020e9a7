"""Named model shapes. ``tiny`` is for tests and the CPU demo; the others are the real shapes for launches."""

from __future__ import annotations

from megatron_slm.errors import ConfigError

PRESETS = {
    # 4 layers, hidden 64: trains in seconds on 2 CPU cores; divisible by TP in {1,2,4} and PP in {1,2,4}.
    "tiny": dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=192,
        num_attention_heads=4,
        num_query_groups=4,
        max_position_embeddings=1024,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
    ),
    # TinyLlama-1.1B (the paper's 1B policy/reference base).
    "tinyllama-1.1b": dict(
        num_layers=22,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=32,
        num_query_groups=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
    ),
    # Mistral-7B v0.1 (the paper's 7B base; Rho-1-7B).
    "mistral-7b": dict(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
        sliding_window=4096,
    ),
}

_DEFAULTS = dict(rotary_base=10000.0, norm_epsilon=1e-5, untie_embeddings_and_output_weights=True)


def apply_preset(model_cfg) -> None:
    """Fill the unset fields of ``model_cfg`` from its preset (explicit values win)."""
    if model_cfg.preset is not None:
        if model_cfg.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {model_cfg.preset!r}; choose one of {sorted(PRESETS)}")
        for key, value in PRESETS[model_cfg.preset].items():
            if getattr(model_cfg, key) is None:
                setattr(model_cfg, key, value)
    for key, value in _DEFAULTS.items():
        if getattr(model_cfg, key) is None:
            setattr(model_cfg, key, value)
