"""npvlm: PaliGemma in NumPy, with a pluggable array backend.

    import npvlm
    model = npvlm.load("path/to/paligemma-3b-pt-224")       # an HF model folder
    print(model.generate("cat.jpg", "caption en").text)

Importing npvlm imports neither torch, transformers nor cupy.
"""

import os as _os
import sys as _sys

from .errors import (BackendError, CheckpointError, ConfigError, GenerationError, ImageError, NpvlmError, ShapeError,
                     TokenizerError)


def _find_checkout_backends():
    """backends/ sits at the top of the repository (the design card's layout) and installs as npvlm.backends.
    From a plain checkout, where nothing is installed, register that folder under the same name."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), "backends")
    if _os.path.isdir(_os.path.join(here, "backends")) or not _os.path.isfile(_os.path.join(folder, "__init__.py")):
        return
    import importlib.util

    if importlib.util.find_spec(__name__ + ".backends") is not None:  # an install (editable or not) knows where it is
        return
    spec = importlib.util.spec_from_file_location(__name__ + ".backends", _os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_find_checkout_backends()

__version__ = "0.1.0"


def load(model_dir=None, backend="numpy", **options):
    """Load an HF model folder (the embedded shapes PaliGemma if None) onto a backend.

    A PaliGemma folder gives a `npvlm.api.PaliGemmaModel` (`.generate`, `.stream`, `.logits`); a SigLIP
    folder a `npvlm.siglip_api.SiglipModel` (`.embed_images`, `.embed_texts`, `.classify`). Options as
    `npvlm.api.load`: `progress=`, `mmap=False` (read the weights into memory), `weights="float32" | "bfloat16" | "int8"` (how the Linear weights stay in memory),
    `want="paligemma" | "siglip"` (refuse the other kind).
    """
    from .api import load as _load

    return _load(model_dir, backend=backend, **options)


__all__ = ["load", "NpvlmError", "BackendError", "ConfigError", "CheckpointError", "TokenizerError", "ImageError",
           "GenerationError", "ShapeError", "__version__"]
