"""Fuzz tests for the three doors hostile input comes through (issue #7): image bytes, generation
parameters and config.json. Each property is "a valid result, or the domain's own error, nothing else":

    images      load_image + preprocess -> float32 [3, S, S] in [-1, 1], or ImageError
    parameters  check_params -> accepts exactly what the documented rules allow, else GenerationError
    config      PaliGemmaConfig.from_hf -> a config that validates, or ConfigError

Deterministic for CI: hypothesis derandomized, no example database: the same examples on every run of
the same selection of tests (hypothesis also mixes in literals from the test modules it finds loaded, so
running this file alone draws other examples than the whole suite does; both are fixed).
FUZZ_EXAMPLES is the number of examples each test draws (the README quotes it; NPVLM_FUZZ_SCALE=k draws k times
as many, for longer runs outside CI); every test prints "tried / accepted / refused" through pytest's terminal reporter.
"""

from __future__ import annotations

import copy
import io
import math
import numbers
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from npvlm.models.paligemma_config import PaliGemmaConfig
from npvlm.errors import ConfigError, GenerationError, ImageError
from npvlm.generation.sampling import check_params
from npvlm.io.images import load_image, preprocess

FUZZ_EXAMPLES = {"images": 300, "generation_parameters": 300, "config": 300,
                 # the model folder's side files (tests/test_fuzz_model_files.py)
                 "processor_config": 300, "generation_config": 300, "tokenizer_config": 200,
                 "siglip_tokenizer_config": 100, "special_tokens_map": 100}


def examples(name) -> int:
    """FUZZ_EXAMPLES[name], times NPVLM_FUZZ_SCALE (default 1) for longer runs outside CI."""
    return FUZZ_EXAMPLES[name] * int(os.environ.get("NPVLM_FUZZ_SCALE", "1"))


def fuzz_settings(name):
    return settings(max_examples=examples(name), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def report(request, name, counts: Counter, both_ways: bool = True):
    """Check the fuzz really ran (both ways, unless the input is one that is never refused), and print its
    counts (visible without -s)."""
    tried = counts["accepted"] + counts["refused"]
    line = f"fuzz {name}: {tried} tried, {counts['accepted']} accepted, {counts['refused']} refused"
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            tr.ensure_newline()
            tr.write_line(line)
    assert tried >= examples(name) * 0.9, line
    assert counts["accepted"] > 0 and (counts["refused"] > 0 or not both_ways), line  # only refusing tests little


# ---------------------------------------------------------------------------------------------
# (a) images: random bytes, mutated valid files, random sizes and modes


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    frames = [rgb.convert("P")] + [Image.new("P", rgb.size, i) for i in (3, 9)]
    return [
        _encode(rgb, "PNG"), _encode(rgb.convert("RGBA"), "PNG"), _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(Image.fromarray(rng.integers(0, 65536, (7, 5), dtype=np.uint16)), "PNG"),  # 16-bit greyscale
        _encode(rgb, "JPEG", quality=80), _encode(rgb.convert("L"), "JPEG", progressive=True),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=30, loop=0),
        _encode(rgb, "BMP"), _encode(rgb.convert("P"), "BMP"), _encode(rgb, "TIFF"), _encode(rgb, "WEBP"),
        _encode(rgb, "PPM"),
    ]


SEEDS = _seed_files()
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK", "YCbCr"]
FORMATS = {"PNG": ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I"), "JPEG": ("RGB", "L", "CMYK"),
           "GIF": ("P", "L"), "BMP": ("RGB", "L", "P", "1"), "TIFF": tuple(MODES), "WEBP": ("RGB", "RGBA"),
           "PPM": ("RGB", "L", "1")}


@st.composite
def fresh_image(draw) -> bytes:
    """A valid file of random size, mode and format."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("RGB")
    img = img.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        rng.integers(0, 65536, (h, w)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    try:
        return _encode(img, fmt)
    except (OSError, ValueError, KeyError):
        return _encode(img.convert("RGB"), "PNG")


@st.composite
def mutated(draw, base) -> bytes:
    """Flip, overwrite, truncate, delete, duplicate or splice in bytes of another file."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        op = draw(st.sampled_from(["flip", "set", "truncate", "delete", "duplicate", "splice", "header"]))
        i = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif op == "truncate":
            del data[i:]
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "duplicate":
            data[i:i] = data[i : i + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            j = draw(st.integers(0, len(other) - 1))
            data[i:i] = other[j : j + draw(st.integers(1, 128))]
        elif op == "header" and n > 26:  # overwrite a width / height field region with big numbers
            k = draw(st.integers(0, 24))
            data[k : k + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\x00\x01"]))
    return bytes(data)


IMAGE_BYTES = st.one_of(
    st.binary(max_size=512),  # garbage, sometimes behind a real magic number
    st.tuples(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"RIFF", b"P6\n"]),
              st.binary(max_size=256)).map(b"".join),
    fresh_image(),
    mutated(st.sampled_from(SEEDS)),
    mutated(fresh_image()),
)


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's own notes on corrupt EXIF / MPO data
def test_fuzz_images(request, monkeypatch):
    # Headers may claim any size. A lower pixel limit keeps each example small in memory and time;
    # the refusal path for sizes over the limit is the same at any limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 20)
    counts = Counter()

    @fuzz_settings("images")
    @given(data=IMAGE_BYTES, size=st.sampled_from([8, 16, 30, 224]), exif=st.booleans())
    def run(data, size, exif):
        try:
            x = preprocess(data, size, exif=exif)
        except ImageError as e:
            msg = str(e)
            assert msg.startswith("<bytes>: ") and "\n" not in msg, msg
            counts["refused"] += 1
            return
        assert x.dtype == np.float32 and x.shape == (3, size, size)
        assert np.all(np.isfinite(x)) and x.min() >= -1.0 and x.max() <= 1.0
        assert load_image(data, exif=exif).mode == "RGB"
        counts["accepted"] += 1

    run()
    report(request, "images", counts)


# ---------------------------------------------------------------------------------------------
# (b) generation parameters

FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 1.0000000000000002, 0.9999999999999999, -1e-300])
INTS = st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, -1, 2**31, 2**63, 10**400, -(10**5000)])
ANY = st.one_of(FLOATS, INTS, st.booleans(), st.none(), st.text(max_size=5), st.just([1]), st.just({"a": 1}),
                st.sampled_from([np.float32(0.5), np.float64(0.5), np.int64(3), np.nan, complex(1, 0)]))


def _real(x) -> bool:  # a real number (NumPy scalars too), not a bool, small enough for a float
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _int(x) -> bool:  # an integer (NumPy integers too), not a bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


RULES = {  # the documented rules (generate.check_params' messages), in check_params' argument order
    "max_new_tokens": lambda v: _int(v) and v >= 1,
    "temperature": lambda v: _real(v) and math.isfinite(v) and v >= 0,
    "top_p": lambda v: _real(v) and 0 < v <= 1,
    "top_k": lambda v: _int(v) and v >= 0,
    "seed": lambda v: v is None or (_int(v) and v >= 0),
}


def _mostly(valid):  # a valid value 4 times in 5, else anything at all (flatmap: one_of would flatten ANY's branches)
    return st.integers(0, 4).flatmap(lambda i: ANY if i == 0 else valid)


PARAMS = {
    "max_new_tokens": _mostly(st.integers(1, 4096)),
    "temperature": _mostly(st.floats(0, 10)),
    "top_p": _mostly(st.floats(0, 1, exclude_min=True)),
    "top_k": _mostly(st.integers(0, 300000)),
    "seed": _mostly(st.none() | st.integers(0, 2**64)),
}


def test_fuzz_generation_parameters(request):
    counts = Counter()

    @fuzz_settings("generation_parameters")
    @given(**PARAMS)
    def run(**kw):
        bad = [name for name in RULES if not RULES[name](kw[name])]
        try:
            check_params(kw["max_new_tokens"], kw["temperature"], kw["top_p"], kw["top_k"], kw["seed"])
        except GenerationError as e:
            msg = str(e)
            assert bad, f"valid parameters refused: {kw} -> {msg}"
            assert "\n" not in msg and msg.startswith(bad[0]), (bad, msg)  # names the first bad one
            counts["refused"] += 1
            return
        assert not bad, f"check_params accepted invalid {bad}: {kw}"
        counts["accepted"] += 1

    run()
    report(request, "generation_parameters", counts)


# ---------------------------------------------------------------------------------------------
# (c) config.json dicts: random mutations of valid configs

TINY = {  # what tools/make_checkpoint.py writes (transformers 5.24 save_pretrained), trimmed
    "architectures": ["PaliGemmaForConditionalGeneration"], "dtype": "float32", "hidden_size": 16,
    "image_token_index": 5, "model_type": "paligemma", "projection_dim": 16, "tie_word_embeddings": True,
    "text_config": {"bos_token_id": 2, "eos_token_id": 1, "head_dim": 8, "hidden_act": "gelu_pytorch_tanh",
                    "hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 8192, "model_type": "gemma",
                    "num_attention_heads": 2, "num_hidden_layers": 2, "num_image_tokens": 4, "num_key_value_heads": 1,
                    "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                    "vocab_size": 1536},
    "vision_config": {"hidden_act": "gelu_pytorch_tanh", "hidden_size": 16, "image_size": 16, "intermediate_size": 32,
                      "layer_norm_eps": 1e-06, "model_type": "siglip_vision_model", "num_attention_heads": 2,
                      "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16,
                      "vision_use_head": False},
}
PG1 = {  # google/paligemma-3b-pt-224's config.json (transformers 4.41 era)
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 2048,
    "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1, "torch_dtype": "float32",
                    "vocab_size": 257216},
    "torch_dtype": "float32",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}
PG2 = {  # a PaliGemma 2 (Gemma 2 decoder) config
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 2048,
    "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0, "projection_dim": 2304,
    "text_config": {"attn_logit_softcapping": 50.0, "cache_implementation": "hybrid", "final_logit_softcapping": 30.0,
                    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26, "num_image_tokens": 256,
                    "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096, "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "image_size": 224, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2304},
}
CONFIGS = [TINY, PG1, PG2]

HOSTILE = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2, 3, 7, 8, 16, 10**30, 2**63, -(2**63), 1.5, 16.0, -0.0,
                     float("nan"), float("inf"), float("-inf"), "", "16", "gemma", "gemma2", "paligemma",
                     "sliding_attention", [], [1, 2], ["full_attention"], {}, {"rope_type": "linear"}, {"a": 1}]),
    st.integers(), st.floats(), st.text(max_size=8),
    st.lists(st.sampled_from(["full_attention", "sliding_attention", 1, None]), max_size=30),
)
SECTIONS = ["", "text_config", "vision_config", "text_config.rope_parameters"]
KEYS = sorted({k for c in CONFIGS for sec in ("", "text_config", "vision_config") for k in (c.get(sec, {}) if sec else c)}
              | {"rope_theta", "rope_type", "layer_types", "rope_scaling", "image_token_id", "hidden_activation", "dtype"})


def _section(d, path):
    for p in [p for p in path.split(".") if p]:
        d = d.get(p) if isinstance(d, dict) else None
    return d if isinstance(d, dict) else None


@st.composite
def mutated_config(draw):
    d = copy.deepcopy(draw(st.sampled_from(CONFIGS)))
    for _ in range(draw(st.integers(1, 4))):
        sec = _section(d, draw(st.sampled_from(SECTIONS)))
        if sec is None:
            continue
        key = draw(st.sampled_from(sorted(sec) + KEYS))
        op = draw(st.sampled_from(["delete", "set", "set", "set", "scale"]))
        if op == "delete":
            sec.pop(key, None)
        elif op == "scale" and _real(sec.get(key)) and not isinstance(sec.get(key), bool):
            sec[key] = sec[key] * draw(st.sampled_from([0, -1, 2, 3, 0.5, 10**6]))
        else:
            sec[key] = draw(HOSTILE)
    if draw(st.integers(0, 30)) == 0:  # now and then, not an object at all
        d = draw(HOSTILE)
    return d


def test_seed_configs_are_valid():
    for c in CONFIGS:
        PaliGemmaConfig.from_hf(copy.deepcopy(c))


def test_fuzz_config(request):
    counts = Counter()

    @fuzz_settings("config")
    @given(d=mutated_config())
    def run(d):
        before = copy.deepcopy(d)
        try:
            cfg = PaliGemmaConfig.from_hf(d, where="fuzz/config.json")
        except ConfigError as e:
            msg = str(e)
            assert msg.startswith("fuzz/config.json: ") and "\n" not in msg and len(msg) < 400, msg
            counts["refused"] += 1
            return
        finally:
            assert repr(d) == repr(before)  # the caller's dict is not modified (repr: NaN != NaN)
        cfg.validate("again")  # what it returns holds up
        t, v = cfg.text, cfg.vision
        for x in (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.head_dim, v.image_size, v.patch_size,
                  cfg.image_token_index, cfg.pad_token_id, *cfg.eos_token_ids):
            assert type(x) is int, x
        for x in (t.rms_norm_eps, t.rope_theta, v.layer_norm_eps):
            assert type(x) is float and math.isfinite(x), x
        assert cfg.num_image_tokens < t.max_position_embeddings and t.attn_scale > 0
        counts["accepted"] += 1

    run()
    report(request, "config", counts)
