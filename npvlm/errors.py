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


def show(value, limit: int = 60) -> str:
    """repr() of a value from outside (a file, an argument), cut short so messages stay one line; never fails."""
    try:
        r = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        return f"<{type(value).__name__} too long to print>"
    return r if len(r) <= limit else r[: limit - 4] + "..." + r[-1]


def show_path(path) -> str:
    """A path for a message: as it is when printable, repr() otherwise (newlines, escapes)."""
    import os

    s = os.fspath(path)
    return s if s.isprintable() else repr(s)
