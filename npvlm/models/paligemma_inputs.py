"""From images and prompts to the arrays PaliGemma reads, in the order it happens.

    image (path / PIL / array) --load_image--> upright RGB (opened once, EXIF applied once)
          --ImageProcessorConfig.preprocess--> pixels [3, S, S]           --stack--> [B, 3, S, S]
    prompt --prompt_ids--> "<image>"*N <bos> prompt "\\n" [suffix <eos>] ids and token types
          --layout_batch--> left-padded host lists --check_length, check_vocab--> device arrays [B, T]

`prepare_prompts` runs the text half end to end and `pixel_batch` the image half; npvlm.api calls
them, and so do the tools.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GenerationError, TokenizerError
from ..io.images import load_image
from ..io.tokenizer import IMAGE_TOKEN, as_text
from .paligemma_config import PaliGemmaConfig


@dataclass
class PromptBatch:
    """A left-padded batch of prompts: host lists (for bookkeeping) and their device arrays, all [B, T]."""

    host: dict
    ids: object  # int64 token ids (padding = pad_token_id)
    positions: object  # int64, 1-indexed over the real tokens of each row
    valid: object  # bool, False on left padding
    prefix: object  # bool, token type 0 (image, prompt, "\\n"): attended bidirectionally
    image_slot: object  # int64, 0..N-1 at <image> positions, -1 elsewhere


def prepare_prompts(tok, cfg: PaliGemmaConfig, backend, prompts, suffixes=None, max_new_tokens: int = 0) -> PromptBatch:
    """Prompts (and optional suffixes) -> a PromptBatch on `backend`, checked to fit the model."""
    suffixes = [None] * len(prompts) if suffixes is None else suffixes
    seqs = [prompt_ids(tok, p, cfg.num_image_tokens, suffix=s) for p, s in zip(prompts, suffixes)]
    host = layout_batch(seqs, pad_id=cfg.pad_token_id, image_id=cfg.image_token_index,
                        num_image_tokens=cfg.num_image_tokens)
    check_length(cfg, len(host["ids"][0]), max_new_tokens)
    check_vocab(host["ids"], cfg.text.vocab_size)
    xp = backend.xp
    arr = lambda k, dt: xp.asarray(host[k], dtype=dt)  # noqa: E731
    return PromptBatch(host, arr("ids", xp.int64), arr("positions", xp.int64), arr("valid", xp.bool),
                       arr("prefix", xp.bool), arr("image_slot", xp.int64))


def load_images(images, *, exif: bool = True) -> list:
    """Paths / PIL images / uint8 arrays -> upright RGB PIL images: each source opened exactly once."""
    return [load_image(im, exif=exif) for im in images]


def pixel_batch(rgb, processor, backend):  # RGB PIL images -> device float32 [B, 3, S, S]
    """`processor` is the folder's ImageProcessorConfig; the images are already upright RGB."""
    return backend.xp.stack([backend.asarray(processor.preprocess(im, exif=False)) for im in rgb], axis=0)


def prompt_ids(tok, prompt, num_image_tokens: int, suffix=None) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) as HF's PaliGemmaProcessor (SPEC.md §8).

    input_ids = [<image>]*N + [<bos>] + encode(prompt + "\\n") [+ encode(suffix) + [<eos>]];
    token_type_ids are 0 for the prefix and 1 for the suffix and its <eos>.
    """
    prompt = as_text(prompt, "prompt")
    if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 0:
        raise TokenizerError(f"num_image_tokens must be a non-negative int, got {num_image_tokens!r}")
    if tok.image_id is None and num_image_tokens:
        raise TokenizerError(f"{tok.path}: no {IMAGE_TOKEN} token (pass image_token_id= from config.json to Tokenizer.from_dir)")
    for name, text in (("prompt", prompt), ("suffix", suffix)):
        k = -1 if text is None or not isinstance(text, str) else text.find(IMAGE_TOKEN)
        if k >= 0:
            raise TokenizerError(f"{name} contains {IMAGE_TOKEN} at offset {k}: npvlm adds the image tokens itself")
    ids = [tok.image_id] * num_image_tokens + [tok.bos_id] + tok.encode(prompt + "\n")
    types = [0] * len(ids)
    if suffix is not None:
        s = tok.encode(as_text(suffix, "suffix")) + [tok.eos_id]
        ids += s
        types += [1] * len(s)
    return ids, types


def layout_batch(seqs, *, pad_id: int, image_id: int, num_image_tokens: int):
    """Left-pad token sequences into the host lists a forward pass needs.

    seqs: list of (input_ids, token_type_ids). Returns a dict of [B, T] Python lists:
    ids, valid (bool), prefix (bool, type 0 and real), positions (1-indexed over real tokens),
    image_slot (0..N-1 at <image> positions, -1 elsewhere).
    """
    T = max(len(ids) for ids, _ in seqs)
    out = {k: [] for k in ("ids", "valid", "prefix", "positions", "image_slot")}
    for b, (ids, types) in enumerate(seqs):
        n_img = sum(1 for t in ids if t == image_id)
        if n_img != num_image_tokens:
            raise GenerationError(f"sequence {b} holds {n_img} <image> tokens, the model expects {num_image_tokens}")
        pad = T - len(ids)
        slot, count = [], 0
        for t in ids:
            slot.append(count if t == image_id else -1)
            count += t == image_id
        out["ids"].append([pad_id] * pad + list(ids))
        out["valid"].append([False] * pad + [True] * len(ids))
        out["prefix"].append([False] * pad + [ty == 0 for ty in types])
        out["positions"].append([1] * pad + list(range(1, len(ids) + 1)))
        out["image_slot"].append([-1] * pad + slot)
    return out


def check_length(cfg: PaliGemmaConfig, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt (plus its answer budget) longer than the model's positions, with the numbers."""
    limit = cfg.text.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        n = cfg.num_image_tokens
        what = f"prompt of {prompt_tokens} tokens ({n} image + {prompt_tokens - n} text)"
        if max_new_tokens:
            what += f" plus max_new_tokens {max_new_tokens} = {prompt_tokens + max_new_tokens}"
        raise GenerationError(f"{what} exceeds the model's {limit} positions")


def check_vocab(rows, vocab_size: int) -> None:
    """Token ids outside the vocabulary would wrap silently on a GPU: refuse them on the host."""
    for b, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"sequence {b}: token id {bad[0]} is outside the vocabulary of {vocab_size}")
