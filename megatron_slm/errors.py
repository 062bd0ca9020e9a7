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
