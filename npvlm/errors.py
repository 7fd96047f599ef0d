"""One exception type per domain of bad input.

Each carries a single-line message that says *what* is wrong and *where* (file, key, value).
The CLI prints `npvlm: error: <message>` on stderr and exits with status 2; the Python API
raises the same exceptions with the same messages.
"""


class NpvlmError(Exception):
    """Base class: a user-facing error with a one-line message."""


class BackendError(NpvlmError):
    """Unknown backend name, or a backend whose library / device is missing."""


class ConfigError(NpvlmError):
    """config.json missing, unreadable, or describing a model npvlm does not support."""


class CheckpointError(NpvlmError):
    """Weights missing, malformed, truncated, mis-named or mis-shaped."""


class TokenizerError(NpvlmError):
    """tokenizer.model / tokenizer.json missing or unreadable (git-LFS pointer, wrong format)."""


class ImageError(NpvlmError):
    """Image missing, unreadable, truncated, too large, or of an unsupported format."""


class GenerationError(NpvlmError):
    """Bad generation parameters or a prompt that does not fit the model's positions."""


class ShapeError(NpvlmError, ValueError):
    """Arrays of mismatched shapes were passed to a layer."""
