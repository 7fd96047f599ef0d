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


class _CheckoutBackends:
    """backends/ sits at the top of the repository (the design card's layout) and installs as npvlm.backends.
    From a checkout (installed editable or not at all), a finder maps that folder to the same name. It is only
    looked up, not imported, here: `import npvlm` stays cheap (a few ms), which keeps the window in which a
    Ctrl-C at start-up could still meet Python's default handler as short as it can be."""

    def __init__(self, init_file: str):
        self.init_file = init_file

    def find_spec(self, name, path=None, target=None):
        if name != __name__ + ".backends":
            return None
        import importlib.util

        return importlib.util.spec_from_file_location(name, self.init_file,
                                                      submodule_search_locations=[_os.path.dirname(self.init_file)])


def _find_checkout_backends():
    here = _os.path.dirname(_os.path.abspath(__file__))
    init_file = _os.path.join(_os.path.dirname(here), "backends", "__init__.py")
    if _os.path.isdir(_os.path.join(here, "backends")) or not _os.path.isfile(init_file):
        return
    # first in line: the backends/ beside this very npvlm/ wins over any install's mapping (an editable install
    # of another checkout, as tools/mutate.py's scratch copies meet it, would otherwise lend them its backends/)
    _sys.meta_path.insert(0, _CheckoutBackends(init_file))


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
