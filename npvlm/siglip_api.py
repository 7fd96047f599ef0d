"""The SigLIP object a user holds: `npvlm.load(siglip_dir)` -> `SiglipModel`.

    images -> load_images -> pixel_batch -> image_embeds ─┐
    texts  -> SiglipTokenizer (max-length padded) -> text_embeds ─┴-> logits -> sigmoid (or softmax)
"""

from __future__ import annotations

import os
import time

import numpy as np

from .backends import get_backend
from .errors import ConfigError, TokenizerError, show
from .io.checkpoint import load_weights, unflatten
from .io.images import ImageProcessorConfig
from .io.scan import check_finite, checked_step, weights_error
from .io.siglip_tokenizer import SiglipTokenizer
from .io.special_tokens import appended_note
from .io.tokenizer import as_text
from .models import siglip as S
from .models.paligemma_inputs import load_images, pixel_batch
from .models.siglip_config import SiglipConfig
from .models.siglip_schema import siglip_schema

# a small SigLIP trained on the synthetic scenes (tools/train_siglip_shapes.py; measured by tools/eval_siglip_shapes.py)
EMBEDDED_SIGLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "siglip_model")


def load(model_dir=None, backend="numpy", *, progress=None, mask_padding: bool = False) -> "SiglipModel":
    """Load an HF SiglipModel folder (config.json, *.safetensors, spiece.model; None: the embedded
    scenes model, EMBEDDED_SIGLIP) onto `backend`; every
    name and shape is checked against config.json before a weight is mapped. `mask_padding`: see SiglipModel."""
    t0 = time.perf_counter()
    model_dir = os.path.expanduser(os.fspath(model_dir)) if model_dir else EMBEDDED_SIGLIP
    be = get_backend(backend)
    cfg = SiglipConfig.from_dir(model_dir)
    tok = SiglipTokenizer.from_dir(model_dir, max_length=cfg.text.max_position_embeddings)
    if tok.vocab_size > cfg.text.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{cfg.text.vocab_size}{appended_note(tok)}")
    processor = ImageProcessorConfig.from_dir(model_dir, cfg.vision.image_size)
    flat = load_weights(model_dir, siglip_schema(cfg), progress=progress)
    params = unflatten({k: be.asarray(v) for k, v in flat.items()})
    be.synchronize()
    return SiglipModel(cfg, params, be, tok, processor, model_dir=model_dir, load_seconds=time.perf_counter() - t0,
                       mask_padding=mask_padding)


class SiglipModel:
    def __init__(self, config: SiglipConfig, params: dict, backend, tokenizer: SiglipTokenizer,
                 processor: ImageProcessorConfig, model_dir: str | None = None, load_seconds: float = 0.0,
                 mask_padding: bool = False):
        self.config, self.params, self.backend, self.tokenizer = config, params, backend, tokenizer
        self.processor, self.model_dir, self.load_seconds = processor, model_dir, load_seconds
        # False: the pads are attended to, as in training and HF SiglipModel(input_ids=...); True: they are
        # hidden, as transformers 5's zero-shot pipeline does (its tokenizer returns an attention_mask)
        self.mask_padding = bool(mask_padding)

    def __repr__(self):
        v, t = self.config.vision, self.config.text
        return (f"<SiglipModel vision {v.num_hidden_layers}x{v.hidden_size} @ {v.image_size}px/{v.patch_size}, text "
                f"{t.num_hidden_layers}x{t.hidden_size} ({t.max_position_embeddings} tokens), embed {self.config.embed_dim}, "
                f"backend {self.backend.name}>")

    def _not_finite(self, what):  # error(values) naming the NaN / Inf weights: a scan only when it is needed
        return lambda values: weights_error(self, siglip_schema(self.config).rename, what, values)

    def _image_embeds(self, images, exif):  # -> device unit [B, D]
        rgb = load_images(images, exif=exif)
        with checked_step():  # the check reports what numpy would only warn about
            x = S.image_embeds(self.params, pixel_batch(rgb, self.processor, self.backend), cfg=self.config)
            return check_finite(x, self._not_finite("the image embeddings"))  # NaN weights would give NaN scores

    def _text_embeds(self, texts):  # -> device unit [C, D]
        ids, mask = self.tokenizer(texts)  # padded to max_position_embeddings, as trained
        arr = self.backend.asarray(np.asarray(ids, dtype=np.int64))
        valid = self.backend.asarray(np.asarray(mask, dtype=bool)) if self.mask_padding else None
        with checked_step():
            x = S.text_embeds(self.params, arr, cfg=self.config, valid=valid)
            return check_finite(x, self._not_finite("the text embeddings"))

    def embed_images(self, images, *, exif=True) -> np.ndarray:
        """Paths / PIL images / uint8 arrays -> host float32 unit vectors [B, D]."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return self.backend.to_host(self._image_embeds(images, exif))

    def embed_texts(self, texts) -> np.ndarray:
        """Strings -> host float32 unit vectors [C, D]."""
        return self.backend.to_host(self._text_embeds(_texts(texts)))

    def logits(self, images, texts, *, exif=True) -> np.ndarray:
        """logits_per_image, host float32 [B, C] (HF `SiglipModel(...).logits_per_image`)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        feats, texts = self._image_embeds(images, exif), self._text_embeds(_texts(texts))
        with checked_step():
            out = check_finite(S.logits_per_image(self.params, feats, texts), self._not_finite("the logits"))
        return self.backend.to_host(out)  # exp(logit_scale) may overflow: checked

    def classify(self, image, labels, *, softmax=False, template="{}", exif=True) -> dict[str, float]:
        """{label: probability}: sigmoid per label (SigLIP's own reading: each pair on its own), or a softmax
        over the labels with softmax=True. `template` is formatted with each label ("a photo of {}.")."""
        labels = _texts(labels, "label")
        p = probabilities(self.logits([image], prompts(labels, template), exif=exif), softmax=softmax)[0]  # [C]
        return {lab: float(x) for lab, x in zip(labels, p)}


def prompts(labels, template: str = "{}") -> list[str]:
    """Each label put into `template` at "{}" (plain replacement: braces in a label stay as they are)."""
    if not isinstance(template, str) or "{}" not in template:
        raise TokenizerError(f"template {show(template)} has no '{{}}' to put the label in")
    return [template.replace("{}", lab) for lab in labels]


def probabilities(logits, *, softmax=False) -> np.ndarray:  # host [B, C] -> float64 [B, C]
    """SigLIP's reading, a sigmoid per pair; or with softmax=True a distribution over the C labels."""
    z = np.asarray(logits, dtype=np.float64)
    if softmax:
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-z))


def _texts(texts, what="text") -> list[str]:
    texts = [texts] if isinstance(texts, (str, bytes)) else list(texts)
    if not texts:
        raise TokenizerError(f"no {what}s given")
    return [as_text(t, f"{what} {i}") for i, t in enumerate(texts)]
