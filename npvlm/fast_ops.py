"""The fast-op seam: where a backend plugs in a faster kernel without the model code knowing.

The functions in `npvlm.nn` are the reference, the code a reader reads. Each one that a backend
may want to replace is wrapped by `@fast_path`: a call looks up the type of its dispatch argument
(the first one, or the one named by `on=`) in a table that backends fill with `register(...)`, and
runs the replacement if there is one, the reference otherwise. A lookup is one dict access, so the
seam costs nothing measurable in a decode step.

    register("gelu_tanh", numpy.ndarray, gelu_tanh_inplace)   # a backend, at import
    with reference_only(): ...                                 # tests: run the reference alone
    registered()                                               # {"gelu_tanh": [numpy.ndarray], ...}

Every registered replacement is checked against its reference on its backend by the test grid
(tests/test_fast_ops.py). A replacement must return what the reference returns: same values (to
the rounding the test states), same dtype, same shape, and never write into its inputs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

_TABLE: dict = {}  # op name -> {array type: replacement}
_REFERENCES: dict = {}  # op name -> its reference function
_STATE = {"enabled": True}


def fast_path(fn=None, *, on: int = 0):
    """Decorate a reference op so a backend may replace it for arrays of its type (dispatch on arg `on`)."""
    if fn is None:
        return functools.partial(fast_path, on=on)
    table = _TABLE.setdefault(fn.__name__, {})
    _REFERENCES[fn.__name__] = fn
    arg = list(inspect.signature(fn).parameters)[on]  # the dispatch argument may come by keyword: linear(x, **p)

    @functools.wraps(fn)
    def op(*args, **kwargs):
        if table and _STATE["enabled"]:
            impl = table.get(type(args[on] if len(args) > on else kwargs[arg]))
            if impl is not None:
                return impl(*args, **kwargs)
        return fn(*args, **kwargs)

    op.reference = fn
    return op


def register(name: str, array_type: type, impl) -> None:
    """Make `impl` the replacement of op `name` for arrays of exactly `array_type`.

    A backend may register before the module defining the op is imported; `reference(name)`
    (and the test grid) find an op registered under a name no module defines."""
    _TABLE.setdefault(name, {})[array_type] = impl


def reference(name: str):
    """The reference function of op `name` (KeyError naming the known ops if there is none)."""
    if name not in _REFERENCES:
        raise KeyError(f"no op {name!r} has a fast path (known: {', '.join(sorted(_REFERENCES))})")
    return _REFERENCES[name]


def registered() -> dict:
    """{op name: [array types with a replacement]}: what the test grid checks."""
    return {name: list(types) for name, types in _TABLE.items() if types}


def replacement(name: str, array_type: type):
    """The registered replacement of `name` for `array_type`, or None."""
    return _TABLE.get(name, {}).get(array_type)


@contextlib.contextmanager
def reference_only():
    """Within this block every op runs its reference function."""
    before = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = before
