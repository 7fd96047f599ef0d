"""The object a user holds: `npvlm.load(model_dir)` -> `PaliGemmaModel`.

It owns the config, the parameter tree on the chosen backend, the tokenizer and the image
settings, and turns images + prompts into the arrays the pure functions in paligemma.py take.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .backends import get_backend
from .config import PaliGemmaConfig
from .errors import ConfigError, GenerationError
from .generate import check_length
from .paligemma import forward, image_features, layout_batch, prefix_lm_masks
from .processor import image_settings, load_image, preprocess
from .tokenizer import Tokenizer, build_prompt_ids
from .weights import load_weights, unflatten

EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shapes")


@dataclass
class PreparedBatch:
    """Host-side layout of a batch (Python lists) and its device arrays."""

    host: dict
    ids: object  # [B, T] int
    positions: object  # [B, T] int
    valid: object  # [B, T] bool
    prefix: object  # [B, T] bool
    image_slot: object  # [B, T] int


class PaliGemmaModel:
    def __init__(self, config: PaliGemmaConfig, params: dict, backend, tokenizer: Tokenizer, images: dict,
                 model_dir: str | None = None, load_seconds: float = 0.0):
        self.config, self.params, self.backend, self.tokenizer = config, params, backend, tokenizer
        self.image_settings = images  # preprocess() keywords (size, mean, std, ...) from preprocessor_config.json
        self.model_dir, self.load_seconds = model_dir, load_seconds
        self.stop_ids = frozenset(config.eos_token_ids) | {tokenizer.eos_id}  # generation ends at any of these

    @property
    def xp(self):
        return self.backend.xp

    def __repr__(self):
        t, v = self.config.text, self.config.vision
        return (f"<PaliGemmaModel {t.model_type} {t.num_hidden_layers}x{t.hidden_size}, SigLIP {v.num_hidden_layers}x"
                f"{v.hidden_size} @ {v.image_size}px, {self.config.num_image_tokens} image tokens, backend {self.backend.name}>")

    # --- inputs ---------------------------------------------------------------------------------

    def load_images(self, images, *, exif=True):  # paths / PIL images / uint8 arrays -> upright RGB PIL images
        return [load_image(im, exif=exif) for im in images]

    def encode_images(self, rgb):  # RGB PIL images (from load_images) -> device [B, N, D]
        arrs = [preprocess(im, **self.image_settings, exif=False) for im in rgb]  # [3, S, S] each
        pixels = self.xp.stack([self.backend.asarray(a) for a in arrs], axis=0)  # [B, 3, S, S]
        return image_features(pixels, self.params, cfg=self.config)

    def prompt_ids(self, prompt, suffix=None):
        return build_prompt_ids(self.tokenizer, prompt, self.config.num_image_tokens, suffix=suffix)

    def prepare(self, seqs) -> PreparedBatch:
        cfg = self.config
        host = layout_batch(seqs, pad_id=cfg.pad_token_id, image_id=cfg.image_token_index,
                            num_image_tokens=cfg.num_image_tokens)
        for b, row in enumerate(host["ids"]):
            bad = [t for t in row if not 0 <= t < cfg.text.vocab_size]
            if bad:  # out-of-range ids would wrap silently on a GPU
                raise GenerationError(f"sequence {b}: token id {bad[0]} is outside the vocabulary of {cfg.text.vocab_size}")
        xp = self.xp
        arr = lambda k, dt: xp.asarray(host[k], dtype=dt)  # noqa: E731
        return PreparedBatch(host, arr("ids", xp.int64), arr("positions", xp.int64), arr("valid", xp.bool),
                             arr("prefix", xp.bool), arr("image_slot", xp.int64))

    # --- the forward pass -----------------------------------------------------------------------

    def logits(self, image, prompt: str, suffix: str | None = None, *, exif=True):
        """Logits over the whole sequence `<image>*N <bos> prompt "\\n" [suffix <eos>]`: host float32 [L, V]."""
        batch = self.prepare([self.prompt_ids(prompt, suffix)])
        check_length(self, batch.ids.shape[1], 0)
        feats = self.encode_images(self.load_images([image], exif=exif))
        masks = prefix_lm_masks(batch.valid, batch.prefix, 0, cfg=self.config)
        out = forward(self.params, batch.ids, batch.positions, masks, cfg=self.config, image_slot=batch.image_slot,
                      feats=feats)
        return self.backend.to_host(out[0, ...])

    def generate(self, image, prompt, **kwargs):
        """Generate text for one image + prompt (or lists of them: a batch). See npvlm.generate.generate."""
        from .generate import generate

        return generate(self, image, prompt, **kwargs)

    def stream(self, image, prompt: str, **kwargs):
        """Yield text pieces as tokens arrive; the last item is the full GenerationResult."""
        from .generate import stream

        return stream(self, image, prompt, **kwargs)


def load(model_dir: str | None = None, backend="numpy", *, progress=None) -> PaliGemmaModel:
    """Load an HF PaliGemma model folder (config.json, *.safetensors, tokenizer) onto `backend`.

    With no folder, the small shapes model that ships inside npvlm is loaded. Everything is
    checked (config, tokenizer, every tensor name and shape) before any weight is mapped.
    """
    t0 = time.perf_counter()
    model_dir = os.path.expanduser(os.fspath(model_dir)) if model_dir else EMBEDDED_MODEL
    be = get_backend(backend)
    cfg = PaliGemmaConfig.from_dir(model_dir)
    tok = Tokenizer.from_dir(model_dir, image_token_id=cfg.image_token_index)
    if tok.image_id is not None and tok.image_id != cfg.image_token_index:
        raise ConfigError(f"{model_dir}: the tokenizer's <image> id {tok.image_id} differs from config.json's "
                          f"image_token_index {cfg.image_token_index}")
    if tok.vocab_size > cfg.text.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{cfg.text.vocab_size}")
    images = image_settings(model_dir, cfg.vision.image_size)
    flat = load_weights(model_dir, cfg, progress=progress)
    params = unflatten({k: be.asarray(v) for k, v in flat.items()})
    be.synchronize()
    return PaliGemmaModel(cfg, params, be, tok, images, model_dir=model_dir, load_seconds=time.perf_counter() - t0)
