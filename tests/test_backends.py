"""Backends by name, the errors users see, and the rule that model code imports no array library.

    get_backend: unknown names and missing libraries raise BackendError saying what to do
    layers: mis-shaped inputs raise ShapeError "<layer>: expected <what>, got <shape>"
    imports: `import npvlm` (and its model modules) pulls in neither torch nor cupy, and the
             model files have no `import numpy` / `import cupy` line at all
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from array_api_compat import array_namespace

from npvlm import nn
from npvlm.backends import BACKENDS, Backend, get_backend
from npvlm.errors import BackendError, ShapeError

if __package__:  # tests/ imported as a package (an __init__.py exists)
    from .namespaces import each_namespace
else:  # pytest's default rootdir-less import: tests/ itself is on sys.path
    from namespaces import each_namespace

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every file of model code: the layers, the cache, the losses, each model family, generation and the seam.
MODEL_FILES = ("nn.py", "kv_cache.py", "contrastive.py", "fast_ops.py", *(f"models/{p.name}" for p in
               sorted((REPO / "npvlm" / "models").glob("*.py")) if p.name not in ("__init__.py",)),
               "generation/generate.py", "generation/sampling.py")


# --- get_backend --------------------------------------------------------------------------------

def test_unknown_backend_names_the_expected_ones():
    with pytest.raises(BackendError) as e:
        get_backend("nope")
    message = str(e.value)
    assert "'nope'" in message
    for name in ("numpy", "cupy", "array_api_strict"):
        assert name in message, f"{name!r} missing from: {message}"


def test_cupy_backend_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError, GPU or not
    with pytest.raises(BackendError, match=r"pip install .*(npvlm\[cuda\]|cupy-cuda)") as e:
        get_backend("cupy")
    assert "\n" not in str(e.value)


def test_strict_backend_without_array_api_strict_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "array_api_strict", None)
    with pytest.raises(BackendError, match=r"pip install array-api-strict"):
        get_backend("array_api_strict")


def test_known_names_and_instances():
    assert set(BACKENDS) == {"numpy", "cupy", "array_api_strict"}
    b = get_backend("numpy")
    assert isinstance(b, Backend) and b.name == "numpy"
    assert get_backend(b) is b  # an instance passes through
    assert get_backend("strict").name == "array_api_strict"  # the short alias


@each_namespace
def test_backend_round_trips_host_arrays(ns):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    x = ns.put(a)
    assert array_namespace(x) is ns.xp  # the backend's xp is the namespace its arrays report
    back = ns.get(x)
    assert back.dtype == np.float32 and back.shape == (3, 4)
    np.testing.assert_array_equal(back, a)
    ns.backend.synchronize()  # never raises, on any backend


# --- ShapeError from the layers -----------------------------------------------------------------

f32 = np.float32


def z(*shape):
    return np.zeros(shape, f32)


# (id, layer name in the message, call(ns) -> layer output, what "expected" names, what "got" names)
SHAPE_CASES = [
    ("linear-width", "linear", lambda ns: nn.linear(ns.put(z(2, 4)), ns.put(z(3, 5))), "x[..., 5]", "(2, 4)"),
    ("linear-bias", "linear", lambda ns: nn.linear(ns.put(z(2, 5)), ns.put(z(3, 5)), ns.put(z(4))),
     "bias of shape (3,)", "(4,)"),
    ("rms_norm-width", "rms_norm", lambda ns: nn.rms_norm(ns.put(z(2, 4)), ns.put(z(5))), "x[..., 5]", "(2, 4)"),
    ("layer_norm-width", "layer_norm", lambda ns: nn.layer_norm(ns.put(z(2, 3, 4)), ns.put(z(6)), ns.put(z(6))),
     "D = 6", "(2, 3, 4)"),
    ("attention-head-dim", "attention",
     lambda ns: nn.attention(ns.put(z(1, 2, 3, 4)), ns.put(z(1, 1, 3, 5)), ns.put(z(1, 1, 3, 5)), scale=1.0),
     "E=4", "(1, 1, 3, 5)"),
    ("attention-groups", "attention",  # 3 query heads cannot share 2 kv heads
     lambda ns: nn.attention(ns.put(z(1, 3, 2, 4)), ns.put(z(1, 2, 2, 4)), ns.put(z(1, 2, 2, 4)), scale=1.0),
     "K | 3", "(1, 2, 2, 4)"),
    ("attention-k-vs-v", "attention",
     lambda ns: nn.attention(ns.put(z(1, 2, 3, 4)), ns.put(z(1, 1, 3, 4)), ns.put(z(1, 1, 2, 4)), scale=1.0),
     "k and v", "(1, 1, 2, 4)"),
    ("attention-mask", "attention",
     lambda ns: nn.attention(ns.put(z(1, 2, 3, 4)), ns.put(z(1, 1, 5, 4)), ns.put(z(1, 1, 5, 4)),
                             ns.put(z(1, 1, 3, 4)), scale=1.0),
     "mask [1 | 1, 1, 3, 5]", "(1, 1, 3, 4)"),
    ("patch_embed-channels", "patch_embed",
     lambda ns: nn.patch_embed(ns.put(z(1, 1, 4, 4)), ns.put(z(2, 3, 2, 2)), ns.put(z(2))), "pixels [B, 3, S, S]",
     "(1, 1, 4, 4)"),
    ("patch_embed-side", "patch_embed",
     lambda ns: nn.patch_embed(ns.put(z(1, 3, 5, 4)), ns.put(z(2, 3, 2, 2)), ns.put(z(2))), "patch size 2", "(5, 4)"),
    ("rope-length", "rope", lambda ns: nn.rope(ns.put(z(1, 2, 3, 4)), ns.put(z(1, 2, 4)), ns.put(z(1, 2, 4))),
     "cos and sin [B | 1, T, E]", "(1, 2, 3, 4)"),
    ("rope-head-dim", "rope", lambda ns: nn.rope(ns.put(z(1, 2, 3, 6)), ns.put(z(1, 3, 4)), ns.put(z(1, 3, 4))),
     "cos and sin [B | 1, T, E]", "(1, 2, 3, 6)"),
    ("split_heads", "split_heads", lambda ns: nn.split_heads(ns.put(z(1, 2, 10)), 3), "divisible by 3", "(1, 2, 10)"),
    ("batch_norm-channels", "batch_norm",
     lambda ns: nn.batch_norm(ns.put(z(2, 4)), *(ns.put(z(3)) for _ in range(4))), "x[B, 3, ...]", "(2, 4)"),
    ("batch_norm-one-value", "batch_norm",  # training needs >1 value per channel for a variance
     lambda ns: nn.batch_norm(ns.put(z(1, 3)), *(ns.put(z(3)) for _ in range(4)), training=True),
     "more than one value per channel", "(1, 3)"),
]

# Mis-shapes that once slipped through (silently broadcasting, or a bare NumPy ValueError naming
# neither the layer nor the expected shape).
SHAPE_GAPS = [
    # layer_norm checks x against weight only: a (1,) bias broadcasts silently over D=4.
    pytest.param("layer_norm-bias", "layer_norm",
                 lambda ns: nn.layer_norm(ns.put(z(2, 4)), ns.put(z(4)), ns.put(z(1))), "bias [D]", "(1,)",
                 id="layer_norm-bias"),
    # rope checks x against cos only: a sin of [B, T, 1] broadcasts silently (a wrong rotation).
    pytest.param("rope-sin", "rope", lambda ns: nn.rope(ns.put(z(1, 2, 3, 4)), ns.put(z(1, 3, 4)), ns.put(z(1, 3, 1))),
                 "cos and sin [B | 1, T, E]", "(1, 3, 1)", id="rope-sin"),
    # rope: cos/sin for 3 sequences applied to x of batch 1 return a batch of 3, silently.
    pytest.param("rope-batch", "rope",
                 lambda ns: nn.rope(ns.put(z(1, 2, 3, 4)), ns.put(z(3, 3, 4)), ns.put(z(3, 3, 4))),
                 "B | 1", "(3, 3, 4)", id="rope-batch"),
    # attention checks only the mask's last two axes: a mask of batch 2 for B=1 dies in a reshape.
    pytest.param("attention-mask-batch", "attention",
                 lambda ns: nn.attention(ns.put(z(1, 2, 3, 4)), ns.put(z(1, 1, 5, 4)), ns.put(z(1, 1, 5, 4)),
                                         ns.put(z(2, 1, 3, 5)), scale=1.0),
                 "mask [1 | 1, 1, 3, 5]", "(2, 1, 3, 5)", id="attention-mask-batch"),
    # attention: a 3-D q fails to unpack ("not enough values to unpack") before any check.
    pytest.param("attention-q-3d", "attention",
                 lambda ns: nn.attention(ns.put(z(2, 3, 4)), ns.put(z(1, 1, 3, 4)), ns.put(z(1, 1, 3, 4)), scale=1.0),
                 "q [B, H, T, E]", "(2, 3, 4)", id="attention-q-3d"),
]


@each_namespace
@pytest.mark.parametrize("case, layer, call, expected, got",
                         [pytest.param(*c, id=c[0]) for c in SHAPE_CASES] + SHAPE_GAPS)
def test_misshaped_inputs_raise_shape_error(ns, case, layer, call, expected, got):
    with pytest.raises(ShapeError) as e:
        call(ns)
    message = str(e.value)
    assert message.startswith(f"{layer}: expected "), message
    assert "\n" not in message
    what, _, shape = message.partition(", got ")  # "<layer>: expected <what>" / "<shape>"
    assert expected in what, f"expected part {what!r} should name {expected!r}"
    assert got in shape, f"got part {shape!r} should name {got!r}"


# --- no array library in the model code ---------------------------------------------------------

NO_HEAVY_IMPORTS = ("import {module}, sys; heavy = [m for m in ('torch', 'cupy', 'transformers') if m in sys.modules]; "
                    "assert not heavy, heavy")


def import_in_fresh_python(module: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS.format(module=module)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["npvlm", "npvlm.nn", "npvlm.kv_cache", "npvlm.models.gemma", "npvlm.models.siglip_vision",
                                    "npvlm.models.paligemma", "npvlm.backends", "npvlm.api", "npvlm.apps.cli",
                                    "npvlm.generation.generate", "npvlm.contrastive"])
def test_import_pulls_in_neither_torch_nor_cupy(module):
    r = import_in_fresh_python(module)
    assert r.returncode == 0, r.stderr


IMPORT_LINE = re.compile(r"^\s*(import\s+(numpy|cupy)\b|from\s+(numpy|cupy)\b)")


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_no_array_library(name):
    path = REPO / "npvlm" / name
    offending = [f"{name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                 if IMPORT_LINE.match(line)]
    assert not offending, "model code must take xp = array_namespace(x), not import:\n" + "\n".join(offending)


def test_the_import_pattern_catches_what_it_should():  # the grep above must be able to fail
    for line in ("import numpy as np", "    import cupy", "from numpy import ndarray", "from cupy.cuda import x",
                 "import numpy"):
        assert IMPORT_LINE.match(line), line
    for line in ("from array_api_compat import array_namespace", "import numpydoc", "# import numpy", "x = 1"):
        assert not IMPORT_LINE.match(line), line
