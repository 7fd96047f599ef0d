"""Hostile and broken input at the Python API (issue #7): one test per rejection, each checking the exception
TYPE and that its one-line message names the file / key / value at fault.

Covered elsewhere and not repeated here: safetensors files and shard indexes (test_weights.py), image files
(test_processor.py), tokenizer files (test_tokenizer.py). The CLI's handling of all of them: test_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import safetensors.numpy as stn
from PIL import Image

import npvlm
from npvlm.io import checkpoint as W
from npvlm.models.paligemma_config import PaliGemmaConfig
from npvlm.errors import (BackendError, CheckpointError, ConfigError, GenerationError, ImageError, NpvlmError,
                          TokenizerError)
from npvlm.generation.generate import GenerationResult
from npvlm.generation.sampling import check_params
from npvlm.io.images import load_image
from npvlm.models.paligemma_inputs import load_images, prompt_ids

from hf_ref import image, write


def raises(kind, fn, *fragments):
    """fn() raises exactly `kind` (not a subclass of it, not a sibling) with one line holding each fragment."""
    with pytest.raises(NpvlmError) as e:
        fn()
    msg = str(e.value)
    assert type(e.value) is kind, f"{type(e.value).__name__}: {msg}"
    assert "\n" not in msg and msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write(tmp_path_factory.mktemp("errors"), seed=2)


@pytest.fixture(scope="module")
def model(ckpt):
    return npvlm.load(ckpt)


@pytest.fixture(scope="module")
def config(ckpt):
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f)


def copy_of(ckpt, tmp_path, name="model"):
    return shutil.copytree(ckpt, tmp_path / name)


# ---------------------------------------------------------------------------------------------
# config.json -> ConfigError


def _set(path: str, value):
    """An edit of the config dict: set a dotted key ("text_config.hidden_size"), or delete it (value is DEL)."""
    def edit(c):
        *parents, key = path.split(".")
        for p in parents:
            c = c[p]
        if value is DEL:
            del c[key]
        else:
            c[key] = value
    return edit


DEL = object()

CONFIG_CASES = {  # name: (edit of the dict | raw file bytes, fragments of the message)
    "not JSON": (b'{"model_type": "paligemma",', ["not valid JSON"]),
    "not UTF-8": (b'\xff\xfe{"model_type": "paligemma"}', ["not UTF-8"]),
    "a JSON array": (b"[1, 2]", ["expected a JSON object, got list"]),
    "100k nested brackets": (b"[" * 100_000 + b"]" * 100_000, ["not valid JSON (RecursionError"]),
    "5000-digit number": (b'{"model_type": "paligemma", "projection_dim": ' + b"9" * 5000 + b"}", ["not valid JSON (ValueError"]),
    "unknown model_type": (_set("model_type", "llava"), ["model_type 'llava' is not supported (supported: paligemma)"]),
    "no model_type": (_set("model_type", DEL), ["model_type None is not supported"]),
    "unknown text model_type": (_set("text_config.model_type", "llama"),
                                ["text_config.model_type 'llama' is not supported (supported: gemma, gemma2)"]),
    "unknown vision model_type": (_set("vision_config.model_type", "clip_vision_model"),
                                  ["vision_config.model_type 'clip_vision_model' is not supported"]),
    "image_size not a multiple of patch_size": (_set("vision_config.image_size", 20),
                                                ["vision_config.image_size 20 is not a multiple of patch_size 8"]),
    "projection_dim != text hidden_size": (_set("projection_dim", 32),
                                           ["projection_dim 32 must equal text_config.hidden_size 16"]),
    "heads not a multiple of kv heads": (lambda c: c["text_config"].update(num_attention_heads=3, num_key_value_heads=2),
                                         ["text_config.num_attention_heads 3 is not a multiple of num_key_value_heads 2"]),
    "negative vocab_size": (_set("text_config.vocab_size", -5), ["text_config.vocab_size must be a positive integer, got -5"]),
    "number as a string": (_set("text_config.hidden_size", "16"), ["text_config.hidden_size must be an integer, got '16'"]),
    "fractional layer count": (_set("text_config.num_hidden_layers", 2.5), ["text_config.num_hidden_layers must be an integer, got 2.5"]),
    "bool patch_size": (_set("vision_config.patch_size", True), ["vision_config.patch_size must be an integer, got True"]),
    "Infinity (Python's json reads it)": (_set("text_config.intermediate_size", float("inf")),
                                          ["text_config.intermediate_size must be an integer, got inf"]),
    "NaN eps": (_set("text_config.rms_norm_eps", float("nan")), ["text_config.rms_norm_eps must be a finite number, got nan"]),
    "zero heads and no head_dim": (lambda c: c["text_config"].update(num_attention_heads=0, head_dim=None),
                                   ["text_config.num_attention_heads must be a positive integer, got 0"]),
    "rope_parameters not an object": (_set("text_config.rope_parameters", [10000.0]),
                                      ["text_config.rope_parameters must be an object, got [10000.0]"]),
    "scaled RoPE": (_set("text_config.rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
                    ["text_config.rope_parameters.rope_type 'linear' is not supported"]),
    "negative rope_theta": (_set("text_config.rope_parameters", {"rope_type": "default", "rope_theta": -1.0}),
                            ["text_config.rope_theta must be > 0, got -1.0"]),
    "eos outside the vocabulary": (_set("text_config.eos_token_id", 5000),
                                   ["eos_token_id 5000 is outside the vocabulary (text_config.vocab_size 1536)"]),
    "eos a string list": (_set("text_config.eos_token_id", ["1"]), ["text_config.eos_token_id must be an integer or a list of integers, got ['1']"]),
    "image token outside the vocabulary": (_set("image_token_index", 99999), ["image_token_index 99999 is outside the vocabulary"]),
    "unknown activation": (_set("text_config.hidden_act", "relu"), ["text_config.hidden_activation 'relu' is not supported"]),
    "positions fewer than image tokens": (_set("text_config.max_position_embeddings", 4),
                                          ["4 image tokens do not fit text_config.max_position_embeddings 4"]),
    "gemma2 with a negative query scale": (lambda c: c["text_config"].update(model_type="gemma2", query_pre_attn_scalar=-4),
                                           ["text_config.query_pre_attn_scalar must be > 0, got -4.0"]),
    "gemma2 layer_types of the wrong length": (lambda c: c["text_config"].update(model_type="gemma2", layer_types=["full_attention"]),
                                               ["text_config.layer_types has 1 entries for 2 layers"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_rejections(case, config, tmp_path):
    edit, fragments = CONFIG_CASES[case]
    path = tmp_path / "config.json"
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        c = json.loads(json.dumps(config))
        edit(c)
        path.write_text(json.dumps(c))  # NaN / Infinity written as Python's json writes (and reads) them
    for fn in (lambda: PaliGemmaConfig.from_dir(str(tmp_path)), lambda: npvlm.load(str(tmp_path))):
        msg = raises(ConfigError, fn, *fragments)
        assert msg.startswith(f"{path}: "), msg


def test_config_missing(tmp_path):
    raises(ConfigError, lambda: npvlm.load(str(tmp_path)), f"{tmp_path / 'config.json'}: not found")
    raises(ConfigError, lambda: npvlm.load(str(tmp_path / "nope")), f"{tmp_path / 'nope'}: not a directory")


def test_config_from_hf_names_the_key_not_a_python_error():
    # reached without a file: a dict built in Python may hold values JSON cannot
    raises(ConfigError, lambda: PaliGemmaConfig.from_hf({"model_type": "paligemma", "projection_dim": 10**5000}),
           "projection_dim must be an integer, got <int too long to print>")
    raises(ConfigError, lambda: PaliGemmaConfig.from_hf({"model_type": "paligemma", "text_config": {"rope_theta": 10**400}}),
           "text_config.rope_theta must be a finite number")
    raises(ConfigError, lambda: PaliGemmaConfig.from_hf({"model_type": "paligemma", "vision_config": []}),
           "vision_config must be an object")


def test_sibling_json_files_are_hardened_too(ckpt, tmp_path):
    """preprocessor_config.json and tokenizer_config.json: hostile JSON is one error line, not a RecursionError."""
    d = copy_of(ckpt, tmp_path, "pre")
    (d / "preprocessor_config.json").write_text('{"size": ' + "9" * 5000 + "}")
    raises(ConfigError, lambda: npvlm.load(str(d)), f"{d / 'preprocessor_config.json'}: not valid JSON")
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, float("nan"), 0.5]}))
    raises(ConfigError, lambda: npvlm.load(str(d)), "image_mean, image_std and rescale_factor must be finite")
    d = copy_of(ckpt, tmp_path, "tok")
    (d / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    raises(TokenizerError, lambda: npvlm.load(str(d)), f"{d / 'tokenizer_config.json'}: not valid JSON")


# ---------------------------------------------------------------------------------------------
# generation parameters -> GenerationError, checked before the image is even opened

BAD_PARAMS = [
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", float("-inf")),
    ("temperature", "0.5"), ("temperature", None),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.1), ("top_p", float("inf")),
    ("top_p", None),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_k", "3"),
    ("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("max_new_tokens", True),
    ("max_new_tokens", None), ("max_new_tokens", "5"),
    ("seed", -1), ("seed", 1.5), ("seed", True), ("seed", "7"),
]


@pytest.mark.parametrize("name, value", BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_bad_generation_parameter(model, tmp_path, name, value):
    missing = str(tmp_path / "no-such-image.png")  # parameters are checked first: no ImageError
    kw = {name: value}
    raises(GenerationError, lambda: model.generate(missing, "caption en", **kw), name, repr(value))
    raises(GenerationError, lambda: next(model.stream(missing, "caption en", **kw)), name, repr(value))


def test_edge_parameters_are_accepted(model):
    img = image(1)
    for kw in [dict(temperature=0), dict(temperature=0.7, top_p=1, top_k=0, seed=0), dict(temperature=1e-3, top_p=1e-9),
               dict(temperature=2.0, top_k=1, seed=2**40)]:
        res = model.generate(img, "caption en", max_new_tokens=1, **kw)
        assert isinstance(res, GenerationResult) and len(res.token_ids) <= 1, kw


def test_huge_int_temperature_is_a_generation_error():
    raises(GenerationError, lambda: check_params(1, 10**400, 1.0, 0, None), "temperature")


def test_5000_digit_int_is_a_generation_error():
    raises(GenerationError, lambda: check_params(-10**5000, 0.0, 1.0, 0, None), "max_new_tokens")


def test_bool_temperature_and_top_p_are_refused():
    raises(GenerationError, lambda: check_params(1, True, 1.0, 0, None), "temperature")


# ---------------------------------------------------------------------------------------------
# prompts


def test_prompt_too_long_says_the_numbers(model):
    img = image(2)
    T = len(prompt_ids(model.tokenizer, "caption en", model.config.num_image_tokens)[0])
    n = model.config.num_image_tokens
    raises(GenerationError, lambda: model.generate(img, "caption en", max_new_tokens=8190),
           f"prompt of {T} tokens ({n} image + {T - n} text) plus max_new_tokens 8190 = {T + 8190} exceeds the model's 8192 positions")
    long = "red " * 9000
    T = len(prompt_ids(model.tokenizer, long, model.config.num_image_tokens)[0])
    assert T > 8192
    raises(GenerationError, lambda: model.generate(img, long, max_new_tokens=1), f"prompt of {T} tokens", "8192 positions")


def test_empty_prompt_is_allowed(model):
    res = model.generate(image(3), "", max_new_tokens=3)
    assert isinstance(res, GenerationResult) and isinstance(res.text, str) and len(res.token_ids) <= 3
    assert res.stats["prompt_tokens"] == model.config.num_image_tokens + 2  # <image>*N <bos> "\n"
    *pieces, last = list(model.stream(image(3), "", max_new_tokens=3))
    assert last.token_ids == res.token_ids and "".join(pieces) == res.text


def test_prompt_bytes(model):
    img = image(4)
    raises(TokenizerError, lambda: model.generate(img, b"caption \xc3\xa9 \xff en", max_new_tokens=1),
           "prompt is not valid UTF-8 (byte 0xff at offset 11)")
    raises(TokenizerError, lambda: model.generate(img, "caption \udcff en", max_new_tokens=1),
           "prompt is not valid Unicode (lone surrogate U+DCFF at offset 8)")
    raises(TokenizerError, lambda: model.generate(img, 42, max_new_tokens=1), "prompt must be str, got int")
    good = model.generate(img, "caption é".encode(), max_new_tokens=2)  # valid UTF-8 bytes are text
    assert good.token_ids == model.generate(img, "caption é", max_new_tokens=2).token_ids


# ---------------------------------------------------------------------------------------------
# images


def test_images_per_prompt_must_match_in_a_batch(model):
    a, b = image(5), image(6)
    raises(GenerationError, lambda: model.generate([a, b], ["caption en"]), "2 images for 1 prompts")
    raises(GenerationError, lambda: model.generate([a], ("caption en", "detect red")), "1 images for 2 prompts")
    out = model.generate([a, b], ["caption en", "detect red"], max_new_tokens=2)
    assert len(out) == 2 and all(isinstance(r, GenerationResult) for r in out)
    # a list of images with one prompt string: refused, not run
    raises(GenerationError, lambda: model.generate([a, b], "caption en"), "2 images for 1 prompt")


# a single image (never iterated as if it were a list) with a list of prompts
@pytest.mark.parametrize("kind", ["PIL", "path", "array"])
def test_one_image_for_a_list_of_prompts(model, tmp_path, kind):
    img = image(7)
    src = {"PIL": img, "array": np.asarray(img)[:2]}.get(kind)
    if kind == "path":
        src = str(tmp_path / "one.png")
        img.save(src)
    raises(GenerationError, lambda: model.generate(src, ["caption en", "detect red"], max_new_tokens=1), "1 images for 2 prompts")


def test_empty_batch_is_a_generation_error(model):
    raises(GenerationError, lambda: model.generate([], []), "no prompts")


def test_animated_gif_uses_its_first_frame(model, tmp_path):
    yy, xx = np.mgrid[0:16, 0:24]
    first = np.zeros((16, 24, 3), np.uint8)
    first[..., 0] = np.where(xx < 12, 255, 0)
    first[..., 2] = np.where(yy < 8, 255, 0)  # four flat quadrants: exact in a GIF palette
    frames = [Image.fromarray(first)] + [Image.new("RGB", (24, 16), c) for c in [(0, 255, 0), (255, 255, 0)]]
    gif = str(tmp_path / "anim.gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    with Image.open(gif) as im:
        assert im.n_frames == 3
    assert np.array_equal(np.asarray(load_image(gif)), first)
    encode = lambda src: model.encode_images(load_images([src]))  # noqa: E731
    assert np.array_equal(encode(gif), encode(first))
    a = model.generate(gif, "caption en", max_new_tokens=4)
    b = model.generate(first, "caption en", max_new_tokens=4)
    assert a.token_ids == b.token_ids and a.image_size == (24, 16)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # 10^8 pixels: Pillow only warns; 10^10: Pillow raises
def test_decompression_bomb_in_a_tiny_file(model, tmp_path, side):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_claiming(side, side))
    assert p.stat().st_size < 100
    raises(ImageError, lambda: model.generate(str(p), "caption en", max_new_tokens=1), str(p), "decompression bomb")


# ---------------------------------------------------------------------------------------------
# checkpoints: nothing is mapped before everything is checked


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip("\n").endswith(str(path)) for line in f)


@pytest.fixture
def map_calls(monkeypatch):
    """Count the calls that map or read tensor data (W._map_file, W._array)."""
    calls = []
    for name in ("_map_file", "_array"):
        real = getattr(W, name)
        monkeypatch.setattr(W, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def _misshape(path, key="language_model.model.layers.1.mlp.down_proj.weight"):
    t = stn.load_file(str(path))
    t[key] = np.zeros((t[key].shape[0], t[key].shape[1] - 1), np.float32)
    stn.save_file(t, str(path))
    return key


def _shard(d):
    """Split model.safetensors into two shards plus an index; returns the two paths."""
    t = stn.load_file(str(d / "model.safetensors"))
    names = sorted(t)
    half = {n: ("model-00001-of-00002.safetensors" if i < len(names) // 2 else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)}
    for shard in sorted(set(half.values())):
        stn.save_file({n: t[n] for n in names if half[n] == shard}, str(d / shard))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
    return [d / s for s in sorted(set(half.values()))]


def test_failed_load_maps_nothing(ckpt, tmp_path, map_calls):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    d = copy_of(ckpt, tmp_path)
    key = _misshape(d / "model.safetensors")
    raises(CheckpointError, lambda: npvlm.load(str(d)), str(d), f"{key} [16, 31] (config.json implies [16, 32])")
    assert map_calls == [] and not _mapped(d / "model.safetensors")
    # the hook is the right one: a good checkpoint goes through it and stays mapped while the model lives
    m = npvlm.load(ckpt)
    assert "_map_file" in map_calls and _mapped(os.path.join(ckpt, "model.safetensors"))
    del m


def test_failed_sharded_load_maps_no_shard(ckpt, tmp_path, map_calls):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    d = copy_of(ckpt, tmp_path)
    first, second = _shard(d)
    last_key = sorted(stn.load_file(str(second)))[-1]  # read after every tensor of the first shard
    t = stn.load_file(str(second))
    t[last_key] = np.zeros(t[last_key].shape + (2,), np.float32)
    stn.save_file(t, str(second))
    raises(CheckpointError, lambda: npvlm.load(str(d)), last_key, "with the wrong shape")
    assert map_calls == [] and not _mapped(first) and not _mapped(second)


# ---------------------------------------------------------------------------------------------
# backends


def test_unknown_backend(ckpt):
    raises(BackendError, lambda: npvlm.load(ckpt, backend="tpu"), "unknown backend 'tpu'", "numpy, cupy")


def test_cupy_missing_says_what_to_install(ckpt):
    try:
        import cupy  # noqa: F401
    except ImportError:
        raises(BackendError, lambda: npvlm.load(ckpt, backend="cupy"), "backend 'cupy' needs CuPy", "pip install")
    else:
        pytest.skip("cupy is installed")
