"""Hand-written backward passes (vector-Jacobian products) for every layer of npvlm.nn, llm.c style.

    layers.py  dense layers, patch embedding, the norms, GELU / GeGLU, softmax, RoPE, attention
    lm.py      the scaled embedding lookup, the tied head, the final soft-cap, cross-entropy

Each forward `f` of nn.py has a pair: `y, saved = f_forward(...)` (the same values as nn.f) and
`dx, grads = f_backward(dy, saved)` (grads named like the parameters). Both modules' functions are
re-exported here: `from npvlm import nn_backward as NB; NB.rms_norm_backward(...)`.
"""

from .layers import *  # noqa: F401,F403
from .layers import ONE_HOT_BUDGET, add_grads  # noqa: F401
from .lm import *  # noqa: F401,F403
