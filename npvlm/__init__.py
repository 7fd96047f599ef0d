"""npvlm: PaliGemma in NumPy, with a pluggable array backend.

    import npvlm
    model = npvlm.load("path/to/paligemma-3b-pt-224")       # an HF model folder
    print(model.generate("cat.jpg", "caption en").text)

Importing npvlm imports neither torch, transformers nor cupy.
"""

from .errors import (BackendError, CheckpointError, ConfigError, GenerationError, ImageError, NpvlmError, ShapeError,
                     TokenizerError)

__version__ = "0.1.0"

__all__ = ["NpvlmError", "BackendError", "ConfigError", "CheckpointError", "TokenizerError", "ImageError",
           "GenerationError", "ShapeError", "__version__"]
