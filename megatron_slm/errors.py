"""The user-facing error types. Each message says what is wrong and how to fix it; the command-line entry
points catch ``SLMError`` and print it as one ``error: ...`` line (exit 2) instead of a traceback."""


class SLMError(Exception):
    """Base of every error caused by the user's input (flags, files, checkpoints), not by a bug."""


class ConfigError(SLMError, ValueError):
    """A configuration that cannot run; the message lists each problem and how to fix it."""


class DataError(SLMError, ValueError):
    """A data or score file that cannot be used; the message names the file and the fix."""


class TokenizerError(SLMError, ValueError):
    """A tokenizer file that cannot be loaded or does not fit the data."""


class PreprocessError(SLMError, ValueError):
    """Input text that cannot be turned into an indexed dataset."""


class CheckpointError(SLMError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class ConvertError(SLMError, RuntimeError):
    """An input or output the checkpoint converter cannot use."""


class DivergenceError(SLMError, RuntimeError):
    """Training stopped on non-finite losses or gradients (``--on-nonfinite``); no checkpoint of them was saved."""


class MissingDependencyError(SLMError, ImportError):
    """A feature's optional dependency is not installed; the message names the extra that installs it."""


# The optional dependencies, by import name: (pip name, the extra of pyproject.toml that installs it).
OPTIONAL = {
    "transformers": ("transformers", "hf"),
    "safetensors": ("safetensors", "hf"),
    "tokenizers": ("tokenizers", "hf"),
    "matplotlib": ("matplotlib", "viz"),
    "lm_eval": ("lm-eval", "eval"),
    "accelerate": ("accelerate", "eval"),
    "pyarrow": ("pyarrow", "data"),
    "zstandard": ("zstandard", "data"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "wandb": ("wandb", "wandb"),
}


def install_hint(module: str) -> str:
    """``pip install 'megatron_slm[EXTRA]'`` for an optional dependency (by import name)."""
    return f"pip install 'megatron_slm[{OPTIONAL[module.split('.')[0]][1]}]'"


def require(module: str, what: str):
    """``importlib.import_module(module)``, or a one-line ``MissingDependencyError`` when the optional dependency
    is not installed: "<what> needs the '<package>' package: pip install 'megatron_slm[<extra>]'"."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but broken (one of its own imports failed): its own error says why
        raise MissingDependencyError(f"{what} needs the '{OPTIONAL[top][0]}' package: {install_hint(top)}") from None
