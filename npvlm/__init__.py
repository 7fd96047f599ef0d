"""npvlm: PaliGemma in NumPy, with a pluggable array backend.

    import npvlm
    model = npvlm.load("path/to/paligemma-3b-pt-224")       # an HF model folder
    print(model.generate("cat.jpg", "caption en").text)

Importing npvlm imports neither torch, transformers nor cupy.
"""

from .errors import (BackendError, CheckpointError, ConfigError, GenerationError, ImageError, NpvlmError, ShapeError,
                     TokenizerError)

__version__ = "0.1.0"


def load(model_dir=None, backend="numpy", *, progress=None):
    """Load an HF PaliGemma model folder (the embedded shapes model if None) onto a backend.

    Returns a `npvlm.model.PaliGemmaModel` with `.logits(image, prompt, suffix=None)`,
    `.generate(image, prompt, ...)` and `.stream(image, prompt, ...)`.
    """
    from .model import load as _load

    return _load(model_dir, backend=backend, progress=progress)


__all__ = ["load", "NpvlmError", "BackendError", "ConfigError", "CheckpointError", "TokenizerError", "ImageError",
           "GenerationError", "ShapeError", "__version__"]
