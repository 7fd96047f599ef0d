"""The reference side of the end-to-end tests: HF transformers on checkpoints the tests write.

Checkpoints come from tools/make_checkpoint.py (random weights, the real HF file format, any shape);
HF loads them back from disk exactly as npvlm does, so both sides see the same (rounded) weights.
HF runs with eager attention: it is the path that applies Gemma 2's attention soft-cap.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tools.make_checkpoint import make_checkpoint  # noqa: E402


def write(tmp_dir, preset="tiny-tok", **kw) -> str:
    """A random checkpoint with a tokenizer (vocab >= 1536 so the 1500-piece test tokenizer fits)."""
    kw.setdefault("vocab", 1536)
    return make_checkpoint(str(tmp_dir), preset, tokenizer=True, **kw)


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: str = "float32"):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(0)
    m = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                          attn_implementation="eager")
    return m.eval()


@functools.lru_cache(maxsize=8)
def hf_processor(model_dir: str):
    from transformers import PaliGemmaProcessor

    p = PaliGemmaProcessor.from_pretrained(model_dir)
    p.tokenizer.padding_side = "left"  # batched generation pads on the left
    return p


def image(seed: int, w: int = 37, h: int = 29) -> PIL.Image.Image:
    """A random RGB image of an odd size (the processor squashes it to the model's square)."""
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_inputs(model_dir, images, prompts, suffix=None):
    proc = hf_processor(model_dir)
    text = ["<image>" + p for p in prompts]
    return proc(images=list(images), text=text, suffix=suffix, return_tensors="pt", padding="longest")


def hf_logits(model_dir, img, prompt, suffix=None, dtype: str = "float32") -> np.ndarray:
    """HF's logits [L, V] over `<image>*N <bos> prompt "\\n" [suffix <eos>]`, as float32; with dtype="float64" HF's
    own model computed in float64 (the weights widened exactly): the value both float32 runs approximate."""
    import torch

    inputs = hf_inputs(model_dir, [img], [prompt], [suffix] if suffix is not None else None)
    inputs.pop("labels", None)
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
    with torch.no_grad():
        return hf_model(model_dir, dtype)(**inputs).logits[0].float().numpy()


def hf_generate(model_dir, images, prompts, max_new_tokens=32):
    """HF greedy generate: a list of generated id lists (eos and what follows removed), and the least top-2 margin."""
    import torch

    inputs = hf_inputs(model_dir, images, prompts)
    model = hf_model(model_dir)
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    T = inputs["input_ids"].shape[1]
    rows, margin = [], np.inf
    for b in range(len(prompts)):
        ids = out.sequences[b, T:].tolist()
        cut = ids.index(eos) if eos in ids else len(ids)
        rows.append(ids[:cut])
        for step in range(cut):  # how far the chosen token led the runner-up, where it mattered
            top2 = torch.topk(out.scores[step][b].float(), 2).values
            margin = min(margin, float(top2[0] - top2[1]))
    return rows, margin
