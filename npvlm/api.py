"""The object a user holds: `npvlm.load(model_dir)` -> `PaliGemmaModel`.

It owns the config, the parameter tree on the chosen backend, the tokenizer and the image
processor settings, and runs the straight line from inputs to outputs:

    images -> load_images -> pixel_batch -> image_features ─┐
    prompts -> prepare_prompts ─────────────────────────────┴-> generate_tokens -> collect / stream_text
"""

from __future__ import annotations

import os
import time

from .backends import get_backend
from .errors import ConfigError, GenerationError
from .generation.generate import Sampling, collect, finish_stats, generate_tokens, stream_text
from .io.checkpoint import file_identity, load_weights, read_headers, unflatten
from .io.files import bad_number, read_json_object
from .io.hub import looks_like_hub_id, resolve_model
from .io.images import ImageProcessorConfig
from .io.memory import check_generation, check_sizes
from .io.scan import checked_step, pack_naming_nonfinite, weights_error
from .io.special_tokens import appended_note
from .io.tokenizer import Tokenizer
from .models.paligemma import forward, image_features, prefix_lm_masks
from .models.paligemma_config import PaliGemmaConfig
from .models.paligemma_inputs import load_images, pixel_batch, prepare_prompts
from .models.paligemma_schema import paligemma_schema

EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "shapes_model")


MODEL_TYPES = {"paligemma": "a PaliGemma", "siglip": "a SigLIP"}


def model_type(model_dir) -> str | None:
    """config.json's model_type (None if the folder or file is missing: the loader then says what is wrong)."""
    from .io.files import read_json_object

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    mt = read_json_object(path, ConfigError).get("model_type")
    return mt if isinstance(mt, str) else None


def load(model_dir: str | None = None, backend="numpy", *, progress=None, mmap: bool = True,
         want: str | None = None, weights: str = "float32"):
    """Load an HF model folder onto `backend`: PaliGemma -> PaliGemmaModel, SigLIP -> siglip_api.SiglipModel.

    The folder's config.json model_type picks the model; `want` ("paligemma" / "siglip") refuses the other
    kind in one line naming both. A PaliGemma folder holds config.json, *.safetensors and a tokenizer.

    With no folder, the small shapes model that ships inside npvlm is loaded. An `org/name` that is not a
    local folder is looked up in the Hugging Face cache (npvlm/io/hub.py; never downloaded from here).
    Everything is checked (config, tokenizer, every tensor name and shape, the memory it will take) before
    any weight is mapped. `mmap=False` reads the weights into memory, so the files may change afterwards;
    with mmap (the default) a checkpoint that changes on disk is refused at the next generate call.
    `weights` says how the 2-D Linear weights (both towers, the projector) stay in memory: "float32", "bfloat16"
    (a bf16 checkpoint's weights stay memory-mapped as stored; a float32 one is rounded) or "int8" (per-output-
    channel symmetric, quantized here), the tied token embedding / head with them; norms, biases and the vision
    patch and position embeddings stay float32 (backends/packing.py). Decode
    reads every weight once per token, so fewer bytes a weight is a faster token (numba kernels, npvlm[fast]).
    """
    from .io.memory import WEIGHTS
    from .packed import PackedWeight

    t0 = time.perf_counter()
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    model_dir = os.path.expanduser(os.fspath(model_dir)) if model_dir else EMBEDDED_MODEL
    if looks_like_hub_id(model_dir):  # `org/name` that is not a local folder: the Hugging Face cache's snapshot
        model_dir = resolve_model(model_dir)
    mt = model_type(model_dir)
    if want is not None and mt in MODEL_TYPES and mt != want:
        raise ConfigError(f"{model_dir}: is {MODEL_TYPES[mt]} model (model_type {mt!r}), but {MODEL_TYPES[want]} model "
                          f"(model_type {want!r}) is needed here")
    if mt == "siglip":
        from .siglip_api import load as load_siglip

        return load_siglip(model_dir, backend, progress=progress)
    be = get_backend(backend)
    cfg = PaliGemmaConfig.from_dir(model_dir)
    check_sizes(cfg, os.path.join(model_dir, "config.json"))  # before any table or cache is sized from it
    tok = Tokenizer.from_dir(model_dir, image_token_id=cfg.image_token_index)
    if tok.image_id is not None and tok.image_id != cfg.image_token_index:
        raise ConfigError(f"{model_dir}: the tokenizer's <image> id {tok.image_id} differs from config.json's "
                          f"image_token_index {cfg.image_token_index}")
    if tok.vocab_size > cfg.text.vocab_size:
        raise ConfigError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{cfg.text.vocab_size}{appended_note(tok)}")
    processor = ImageProcessorConfig.from_dir(model_dir, cfg.vision.image_size)
    headers = read_headers(model_dir)
    schema = paligemma_schema(cfg)
    held = sum(len(h) for h in headers[0].values())
    if len(schema.required) > held:
        raise ConfigError(f"{os.path.join(model_dir, 'config.json')}: describes a model of {len(schema.required)} tensors "
                          f"(text_config.num_hidden_layers {cfg.text.num_hidden_layers}, vision_config.num_hidden_layers "
                          f"{cfg.vision.num_hidden_layers}) but the checkpoint holds {held}")
    identities = {}
    from .backends.packing import is_packed

    flat = load_weights(model_dir, schema, progress=progress, mmap=mmap, headers=headers,
                        identities=identities if mmap else None, weights=weights, packed=is_packed)
    # float32: unchanged; int8 cannot hold NaN / Inf, and the refusal names the tensor
    flat = pack_naming_nonfinite(lambda f: be.pack_weights(f, weights), flat, model_dir, schema.rename)
    params = unflatten({k: v if isinstance(v, PackedWeight) else be.asarray(v) for k, v in flat.items()})
    be.synchronize()
    model = PaliGemmaModel(cfg, params, be, tok, processor, model_dir=model_dir, load_seconds=time.perf_counter() - t0)
    model.stop_ids = _generation_eos(model_dir, cfg.text.vocab_size, model.stop_ids)
    model.mapped_files = identities  # {path: (size, mtime_ns, inode)}: checked before each generation
    model.weights = weights
    return model


def _generation_eos(model_dir, vocab_size: int, config_eos: frozenset) -> frozenset:
    """The ids generation stops at, with HF's GenerationConfig precedence: generation_config.json's eos_token_id
    when that file exists (none there: HF's generate then stops only at max_new_tokens), else config.json's.
    The tokenizer's eos_token is not one of them (HF's generate does not read the tokenizer)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return config_eos
    eos = read_json_object(path, ConfigError, limit=1 << 20).get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    for i in ids:
        if bad_number(i, True) or not 0 <= i < vocab_size:
            raise ConfigError(f"{path}: eos_token_id must be token ids in [0, {vocab_size}), got {eos!r}"[:200])
    return frozenset(int(i) for i in ids)  # 1.0 is a whole number, and is token 1


class PaliGemmaModel:
    def __init__(self, config: PaliGemmaConfig, params: dict, backend, tokenizer: Tokenizer,
                 processor: ImageProcessorConfig, model_dir: str | None = None, load_seconds: float = 0.0):
        self.config, self.params, self.backend, self.tokenizer = config, params, backend, tokenizer
        self.processor = processor  # image size, mean, std, ... from preprocessor_config.json
        self.model_dir, self.load_seconds = model_dir, load_seconds
        self.stop_ids = frozenset(config.eos_token_ids)  # generation ends at any of these (load: _generation_eos)
        self.mapped_files = {}  # {path: file_identity}: the files the parameters are views of

    def __repr__(self):
        t, v = self.config.text, self.config.vision
        return (f"<PaliGemmaModel {t.model_type} {t.num_hidden_layers}x{t.hidden_size}, SigLIP {v.num_hidden_layers}x"
                f"{v.hidden_size} @ {v.image_size}px, {self.config.num_image_tokens} image tokens, backend {self.backend.name}>")

    def check_files(self):
        """Refuse to touch mapped weights whose file has changed since load (a page would read the new bytes,
        or SIGBUS on a truncated file)."""
        for path, ident in self.mapped_files.items():
            try:
                now = file_identity(path)
            except OSError:
                now = None
            if now != ident:
                raise GenerationError(f"{path}: checkpoint changed on disk since it was loaded: reload it "
                                      f"(npvlm.load(..., mmap=False) / --no-mmap reads it into memory)")

    def not_finite(self, what: str):
        """error(values) for outputs `what` that hold NaN / Inf: the weights at fault, by file and tensor name."""
        return lambda values: weights_error(self, paligemma_schema(self.config).rename, what, values)

    def encode_images(self, rgb):  # upright RGB PIL images -> image features on the device [B, N, D]
        self.check_files()  # the first use of the weights in generate / stream / logits
        return image_features(pixel_batch(rgb, self.processor, self.backend), self.params, cfg=self.config)

    def logits(self, image, prompt: str, suffix: str | None = None, *, exif=True):
        """Logits over the whole sequence `<image>*N <bos> prompt "\\n" [suffix <eos>]`: host float32 [L, V]."""
        batch = prepare_prompts(self.tokenizer, self.config, self.backend, [prompt], [suffix])
        feats = self.encode_images(load_images([image], exif=exif))
        masks = prefix_lm_masks(batch.valid, batch.prefix, 0, cfg=self.config)
        out = forward(self.params, batch.ids, batch.positions, masks, cfg=self.config, image_slot=batch.image_slot,
                      feats=feats)
        return self.backend.to_host(out[0, ...])

    def generate(self, image, prompt, *, max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None, exif=True,
                 return_attention=False):
        """One image + prompt -> GenerationResult; lists of images and prompts -> a list (a left-padded batch).
        return_attention: also put on each result `attention`, float32 [tokens, layers, grid_h, grid_w], the
        decoder's attention (mean over heads) from the query that chose each token to the image patches
        (`result.attention_maps(layer)` picks a layer or averages them)."""
        images, prompts, batched = _as_batch(image, prompt)
        sampling = Sampling(max_new_tokens, temperature, top_p, top_k, seed)
        maps = [] if return_attention else None
        steps, stats = self._run(images, prompts, sampling, exif, maps)
        results = collect(steps, self.tokenizer, self.stop_ids, prompts, stats["image_sizes"], stats)
        for b, r in enumerate(results if maps else []):
            r.attention = self._attention_grid(maps, b, len(r.token_ids))
        finish_stats(stats, self.backend, self.load_seconds)
        return results if batched else results[0]

    def stream(self, image, prompt: str, *, max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None,
               exif=True, return_attention=False):
        """Yield text pieces as tokens arrive; the last item is the full GenerationResult (with `attention`
        when return_attention, as generate). The parameters are checked at the call, before the first item."""
        if isinstance(image, (list, tuple)) or isinstance(prompt, (list, tuple)):
            raise GenerationError("stream() takes one image and one prompt; use generate() for a batch")
        sampling = Sampling(max_new_tokens, temperature, top_p, top_k, seed)
        return self._stream(image, prompt, sampling, exif, [] if return_attention else None)

    def _stream(self, image, prompt, sampling, exif, maps):
        steps, stats = self._run([image], [prompt], sampling, exif, maps)
        for item in stream_text(steps, self.tokenizer, self.stop_ids, prompt, stats["image_sizes"][0], stats):
            if not isinstance(item, str):
                finish_stats(stats, self.backend, self.load_seconds)
                if maps is not None:
                    item.attention = self._attention_grid(maps, 0, len(item.token_ids))
            yield item

    def _attention_grid(self, maps, row: int, tokens: int):  # host [B, L, N] per step -> [tokens, L, gh, gw]
        import numpy as np  # the maps are host arrays

        side = self.config.vision.image_size // self.config.vision.patch_size
        L = self.config.text.num_hidden_layers
        steps = [m[row] for m in maps[:tokens]]  # the step that chose a stop id (and any after it) is left out
        grid = np.stack(steps) if steps else np.zeros((0, L, side * side), np.float32)
        return grid.reshape(tokens, L, side, side)

    def _run(self, images, prompts, sampling: Sampling, exif, maps=None):
        """The prompts checked and laid out, the images encoded: (the token-step iterator, its stats)."""
        batch = prepare_prompts(self.tokenizer, self.config, self.backend, prompts, max_new_tokens=sampling.max_new_tokens)
        if self.backend.name != "cupy":  # host memory; a GPU's own memory is the device's to refuse
            check_generation(self.config, *batch.ids.shape, sampling.max_new_tokens)
        t0 = time.perf_counter()
        rgb = load_images(images, exif=exif)
        with checked_step():  # the features reach the first step's logits, which generate_tokens checks
            feats = self.encode_images(rgb)  # [B, N, D]
        self.backend.synchronize()
        stats = {"image_sizes": [im.size for im in rgb], "image_seconds": time.perf_counter() - t0}
        steps = generate_tokens(self.params, self.config, self.backend, batch, feats, sampling, self.stop_ids, stats, maps,
                                not_finite=self.not_finite("the first step's logits"))
        return steps, stats


def _as_batch(image, prompt):
    """(images, prompts, batched): a batch only when both are lists (or tuples) of the same length."""
    many = lambda x: isinstance(x, (list, tuple))  # noqa: E731
    if not many(prompt):
        if many(image):
            raise GenerationError(f"{len(image)} images for 1 prompt: give a list of prompts, one per image")
        return [image], [prompt], False
    images = list(image) if many(image) else [image]
    if len(images) != len(prompt):
        raise GenerationError(f"{len(images)} images for {len(prompt)} prompts: give one image per prompt")
    if not prompt:
        raise GenerationError("no prompts: a batch needs at least one image and prompt")
    return images, list(prompt), True
