"""Optimisers and what they train: pure functions over flat dicts {dotted name: float32 array}, state explicit.

    flatten(tree) -> {"a.b.0.c": x}              (io.checkpoint.unflatten is its inverse)

    opt = sgd(lr)                                 plain SGD: p <- p - lr g (torch.optim.SGD's defaults: no
                                                  momentum, no weight decay, no Nesterov)
    opt = adamw(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)   torch.optim.AdamW with its default flags
    state = opt.init(train)                       {} for SGD; {"step": 0, "m": zeros, "v": zeros} for AdamW
    train, state = opt.step(train, grads, state, lr=None)   new dicts; nothing is changed in place. lr: this
                                                  step's learning rate (a schedule's, schedule.py); None: opt.lr

    sel = select("attention" | "all" | "lora", flat_params, rank=8, alpha=8.0)
    train = sel.init(flat_params, seed)           the arrays the optimiser updates
    sel.model(flat_params, train)                 the flat parameters the forward sees
    sel.needs                                     the model parameters whose gradients sel.grads reads
    sel.grads(flat_grads, train)                  the gradient of each array of `train` (same keys)
    sel.merged(flat_params, train)                the parameters to save (LoRA merged into its weights)

AdamW, as torch's single-tensor path computes it (t counts steps from 1; lr, betas, eps are Python floats):

    p <- p (1 - lr wd)                                   decoupled weight decay, before the moments
    m <- m + (1 - b1) (g - m)                            torch's lerp_
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Selections (names are the hub's, `language_model.model.layers.J.self_attn.q_proj.weight`):
    attention  the decoder's q/k/v/o projections only: big_vision's PaliGemma colab recipe
    all        every parameter (both towers, projector, the tied embedding)
    lora       low-rank adapters on the decoder's q/k/v/o/gate/up/down projections (HF PEFT's usual targets):
               W_eff = W + s B A with A [r, in], B [out, r], s = alpha / r (PEFT's scaling, not rsLoRA).
               B = 0 at first (so W_eff = W); A ~ U(-1/sqrt(in), 1/sqrt(in)), which is PEFT's
               kaiming_uniform_(a=sqrt(5)), drawn from numpy.random.default_rng(seed) target by target,
               layer by layer in the order of LORA_TARGETS. The gradient is taken from the full weight's:
               dA = s B^T dW_eff, dB = s dW_eff A^T (the chain rule through W + s B A; it costs one dW per
               target, which the whole-model backward computes anyway). Train keys are PEFT's module names:
               "<module>.lora_A.weight", "<module>.lora_B.weight".
Everything stays float32: the scalars are Python floats, which keep a float32 array float32 (NEP 50).
References: torch/optim/adam.py `_single_tensor_adam`, torch/optim/sgd.py; peft/tuners/lora/layer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace

from ..errors import ConfigError

DECODER = "language_model.model.layers."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_TARGETS = (*(f"self_attn.{p}" for p in ATTENTION), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SELECTIONS = ("attention", "all", "lora")


def flatten(tree, prefix: str = "") -> dict:
    """A params tree of dicts and lists -> {"a.b.0.c": leaf} in the tree's order."""
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flatten(v, f"{prefix}{k}.").items()}
    if isinstance(tree, list):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in flatten(v, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


# ---------------------------------------------------------------------------------------------
# Optimisers


@dataclass(frozen=True)
class SGD:
    lr: float

    def init(self, train: dict) -> dict:
        _check_float32(train)
        return {}

    def step(self, train: dict, grads: dict, state: dict, lr: float | None = None):  # -> (new train, state)
        lr = self.lr if lr is None else lr
        return {k: p - lr * grads[k] for k, p in train.items()}, state


@dataclass(frozen=True)
class AdamW:
    lr: float
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def init(self, train: dict) -> dict:
        _check_float32(train)
        zeros = lambda p: array_namespace(p).zeros(p.shape, dtype=p.dtype)  # noqa: E731
        return {"step": 0, "m": {k: zeros(p) for k, p in train.items()}, "v": {k: zeros(p) for k, p in train.items()}}

    def step(self, train: dict, grads: dict, state: dict, lr: float | None = None):  # -> (new train, new state)
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        t = state["step"] + 1
        step_size = lr / (1 - b1**t)  # bias corrections: Python floats, as torch computes them
        bc2_sqrt = (1 - b2**t) ** 0.5
        out, m_new, v_new = {}, {}, {}
        for k, p in train.items():
            g, m, v = grads[k], state["m"][k], state["v"][k]
            xp = array_namespace(p)
            p = p * (1 - lr * self.weight_decay)  # decoupled weight decay: it follows the schedule, as torch's
            m = m + (1 - b1) * (g - m)
            v = v * b2 + (1 - b2) * (g * g)
            out[k] = p - step_size * (m / (xp.sqrt(v) / bc2_sqrt + self.eps))
            m_new[k], v_new[k] = m, v
        return out, {"step": t, "m": m_new, "v": v_new}


def sgd(lr: float) -> SGD:
    return SGD(float(lr))


def adamw(lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> AdamW:
    return AdamW(float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay))


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}


def _check_float32(train: dict) -> None:
    for k, p in train.items():
        xp = array_namespace(p)
        if p.dtype != xp.float32:
            raise ConfigError(f"{k}: training needs float32 parameters, got {p.dtype}")


# ---------------------------------------------------------------------------------------------
# What is trained


def attention_names(flat: dict) -> list[str]:
    """The decoder's q/k/v/o projection weights, in the tree's order."""
    return [k for k in flat if k.startswith(DECODER) and k.endswith(".weight")
            and k.split(".")[-3] == "self_attn" and k.split(".")[-2] in ATTENTION]


def lora_modules(flat: dict) -> list[str]:
    """The LoRA target modules ("language_model.model.layers.J.self_attn.q_proj", ...): layer by layer, each
    layer's in the order of LORA_TARGETS (the order the A matrices are drawn in)."""
    layers = sorted({int(k[len(DECODER):].split(".")[0]) for k in flat if k.startswith(DECODER)})
    mods = [f"{DECODER}{j}.{t}" for j in layers for t in LORA_TARGETS]
    missing = [m for m in mods if m + ".weight" not in flat]
    if missing:
        raise ConfigError(f"LoRA targets missing from the model: {', '.join(missing[:3])}")
    return mods


@dataclass(frozen=True)
class Selection:
    """Which parameters training changes, and how (see the module docstring)."""

    kind: str  # "attention" | "all" | "lora"
    names: tuple  # the weights trained (attention, all) or the modules adapted (lora)
    rank: int = 8  # LoRA r
    alpha: float = 8.0  # LoRA alpha (PEFT's default)

    @property
    def scale(self) -> float:  # LoRA's s = alpha / r
        return self.alpha / self.rank

    @property
    def needs(self) -> frozenset:
        """The model parameters whose gradients `grads` reads (a LoRA target's full weight)."""
        return frozenset(m + ".weight" for m in self.names) if self.kind == "lora" else frozenset(self.names)

    def init(self, flat: dict, seed: int = 0) -> dict:
        if self.kind != "lora":
            return {k: flat[k] for k in self.names}
        rng, train = np.random.default_rng(seed), {}  # drawn on the host: the same A for a seed on every backend
        for mod in self.names:
            w = flat[mod + ".weight"]  # [out, in]
            xp, (n_out, n_in) = array_namespace(w), w.shape
            bound = 1 / math.sqrt(n_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / 6) * sqrt(3 / in)
            train[mod + ".lora_A.weight"] = xp.asarray(rng.uniform(-bound, bound, (self.rank, n_in)).astype(np.float32))
            train[mod + ".lora_B.weight"] = xp.zeros((n_out, self.rank), dtype=w.dtype)
        return train

    def model(self, flat: dict, train: dict) -> dict:
        if self.kind != "lora":
            return {**flat, **train}
        s = self.scale
        eff = {m + ".weight": flat[m + ".weight"] + s * (train[m + ".lora_B.weight"] @ train[m + ".lora_A.weight"])
               for m in self.names}  # [out, r] @ [r, in]
        return {**flat, **eff}

    def grads(self, flat_grads: dict, train: dict) -> dict:
        if self.kind != "lora":
            return {k: flat_grads[k] for k in train}
        s, out = self.scale, {}
        for m in self.names:
            dw, a, b = flat_grads[m + ".weight"], train[m + ".lora_A.weight"], train[m + ".lora_B.weight"]
            out[m + ".lora_A.weight"] = s * (b.T @ dw)  # [r, out] @ [out, in]
            out[m + ".lora_B.weight"] = s * (dw @ a.T)  # [out, in] @ [in, r]
        return out

    def merged(self, flat: dict, train: dict) -> dict:
        return self.model(flat, train)


def select(kind: str, flat: dict, *, rank: int = 8, alpha: float = 8.0) -> Selection:
    """The Selection `kind` over a model's flat parameters."""
    if kind == "attention":
        names = attention_names(flat)
        if not names:
            raise ConfigError("--train attention: the model has no decoder attention projections")
        return Selection(kind, tuple(names))
    if kind == "all":
        return Selection(kind, tuple(flat))
    if kind == "lora":
        if rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {rank}")
        return Selection(kind, tuple(lora_modules(flat)), int(rank), float(alpha))
    raise ConfigError(f"unknown --train {kind!r} (expected one of: {', '.join(SELECTIONS)})")
