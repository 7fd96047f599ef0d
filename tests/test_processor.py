"""npvlm.processor against HF transformers' SiglipImageProcessor (PIL backend, transformers 5.x), and its
refusals of bad input. Images are synthesised here (gradients + noise so that bicubic weights matter)."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from npvlm.errors import ConfigError, ImageError  # noqa: E402
from npvlm.io.images import (  # noqa: E402
    ACCEPTED_FORMATS, ImageProcessorConfig, load_image, preprocess)


def _rgb(h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 7 % 256], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.where(rng.random((h, w, 1)) < 0.3, noise, base).astype(np.uint8)


def _images():
    rgb = _rgb()
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, (*rgb.shape[:2], 1), dtype=np.uint8)
    alpha[:6], alpha[-6:] = 0, 255
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=40)
    p_key = pal.copy()
    p_key.info["transparency"] = int(np.asarray(pal)[0, 0])  # one palette index transparent
    p_bytes = pal.copy()
    p_bytes.info["transparency"] = bytes(range(0, 240, 6))  # per-entry palette alpha
    l_key = Image.fromarray(rgb).convert("L")
    l_key.info["transparency"] = int(np.asarray(l_key)[0, 0])
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha], -1)),
        "L": Image.fromarray(rgb).convert("L"),
        "LA": Image.fromarray(np.concatenate([rgb[..., :1], alpha], -1)),
        "P": pal,
        "P+transparency": p_key,
        "P+alpha bytes": p_bytes,
        "L+transparency": l_key,
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "1": Image.fromarray(rgb).convert("1"),
        "YCbCr": Image.fromarray(rgb).convert("YCbCr"),
        "RGB 1x1": Image.fromarray(rgb[:1, :1]),
        "RGB tall": Image.fromarray(_rgb(91, 13)),
    }


IMAGES = _images()
_HF = {}


def hf_pixels(image, size):
    """transformers' SiglipImageProcessor output (PIL backend when torchvision is absent)."""
    if size not in _HF:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        _HF[size] = transformers.SiglipImageProcessor(size={"height": size, "width": size})
    return _HF[size](images=image, return_tensors="np")["pixel_values"][0]


# ------------------------------------------------------------------ parity with HF
@pytest.mark.parametrize("size", [224, 64, 32, 30])
@pytest.mark.parametrize("mode", list(IMAGES))
def test_matches_hf_siglip_processor(mode, size):
    im = IMAGES[mode]
    ours = preprocess(im, size, exif=False)
    ref = hf_pixels(im, size)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, size, size)
    assert np.abs(ours - ref).max() <= 1e-5  # measured: 0.0 (same float32 ops in the same order)
    assert -1.0 <= ours.min() and ours.max() <= 1.0


@pytest.mark.parametrize("shape", [(37, 53, 3), (37, 53, 4), (37, 53, 1)])
def test_arrays_match_hf(shape):
    a = np.concatenate([_rgb(), np.random.default_rng(2).integers(0, 256, (37, 53, 1), dtype=np.uint8)], -1)[..., :shape[2]]
    assert np.abs(preprocess(a, 32) - hf_pixels(a, 32)).max() <= 1e-5


def test_rgba_is_composited_on_white_as_transformers_5():
    # transformers 5's convert_to_rgb blends alpha onto white (older versions dropped alpha -> black)
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200  # red-ish but fully transparent
    assert np.all(np.asarray(load_image(a)) == 255)
    assert np.all(np.asarray(load_image(Image.fromarray(a))) == 255)
    assert np.all(preprocess(Image.fromarray(a), 8) == 1.0)
    half = a.copy()
    half[..., 3] = 128
    assert np.asarray(load_image(Image.fromarray(half)))[0, 0].tolist() == [227, 127, 127]


def test_channel_order_and_normalisation():
    a = np.zeros((2, 2, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 255, 0, 51
    x = preprocess(a, 2)
    assert x[0].tolist() == [[1.0, 1.0]] * 2 and x[1].tolist() == [[-1.0, -1.0]] * 2
    assert np.allclose(x[2], 51 / 255 * 2 - 1, atol=1e-7)
    y = preprocess(a, 2, mean=(0.0, 0.0, 0.0), std=1.0)
    assert np.allclose(y[:, 0, 0], [1.0, 0.0, 0.2], atol=1e-7)
    assert preprocess(a, (4, 6)).shape == (3, 4, 6)


def test_image_settings_from_preprocessor_config(tmp_path):
    import transformers
    transformers.utils.logging.set_verbosity_error()
    ip = transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.48, 0.45, 0.4],
                                           image_std=[0.26, 0.26, 0.27])
    ip.save_pretrained(str(tmp_path))
    s = vars(ImageProcessorConfig.from_dir(str(tmp_path), 32))
    assert s["size"] == 32 and s["resample"] == 3 and np.allclose(s["mean"], [0.48, 0.45, 0.4])
    im = IMAGES["RGBA"]
    ref = ip(images=im, return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess(im, **s) - ref).max() <= 1e-5
    assert np.abs(ImageProcessorConfig.from_dir(str(tmp_path), 32).preprocess(im) - ref).max() <= 1e-5
    with pytest.raises(ConfigError, match="size 32x32 does not match the model's image_size 224"):
        ImageProcessorConfig.from_dir(str(tmp_path), 224)
    (tmp_path / "preprocessor_config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="preprocessor_config.json: not valid JSON"):
        ImageProcessorConfig.from_dir(str(tmp_path), 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert vars(ImageProcessorConfig.from_dir(str(empty), 224)) == dict(size=224, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                                        rescale_factor=1 / 255, resample=3)


# ------------------------------------------------------------------ colour modes npvlm treats on purpose
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_rescaled_not_clipped(tmp_path, mode):
    v = np.array([[0, 257, 1000, 32768, 65535, 65280]], np.uint16)
    im = Image.fromarray(v).convert(mode) if mode != "I;16B" else Image.frombytes("I;16B", (6, 1), v.astype(">u2").tobytes())
    assert im.mode == mode
    want = [0, 1, 4, 128, 255, 254]  # round(v / 257)
    assert np.asarray(load_image(im))[0, :, 0].tolist() == want
    p = str(tmp_path / "g16.png")
    Image.fromarray(v).save(p)  # a 16-bit greyscale PNG
    assert np.asarray(load_image(p))[0, :, 0].tolist() == want
    # what plain PIL conversion (and so HF) gives: clipped to mostly white
    assert np.asarray(Image.fromarray(v).convert("RGB"))[0, :, 0].tolist() == [0, 255, 255, 255, 255, 255]


def test_float_mode():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[-5.0, 100.0, 300.0, np.nan]], np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 100, 255, 0]


def _jpeg_with_orientation(orientation):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation(tmp_path):
    data = _jpeg_with_orientation(6)  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    p.write_bytes(data)
    for src in (str(p), p, data, Image.open(io.BytesIO(data))):
        assert load_image(src).size == (20, 40)
        assert load_image(src, exif=False).size == (40, 20)
    upright = np.asarray(load_image(data))
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50  # white half on top after rotation
    assert preprocess(data, 16).shape == preprocess(data, 16, exif=False).shape == (3, 16, 16)


def test_animated_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for fmt in ("GIF", "PNG", "WEBP"):
        p = str(tmp_path / f"anim.{fmt.lower()}")
        frames[0].save(p, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
        with Image.open(p) as im:
            assert getattr(im, "n_frames", 1) == 3
        r, g, b = np.asarray(load_image(p)).reshape(-1, 3).mean(0)
        assert r > 240 and g < 15 and b < 15, fmt


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_accepted_formats_load(tmp_path, fmt):
    assert fmt in ACCEPTED_FORMATS
    p = str(tmp_path / f"x.{fmt.lower()}")
    Image.fromarray(_rgb(9, 11)).save(p, fmt)
    assert load_image(p).size == (11, 9) and load_image(p).mode == "RGB"
    assert preprocess(p, 16).shape == (3, 16, 16)


# ------------------------------------------------------------------ refusals
def _raises(src, match, name=None, **kw):
    with pytest.raises(ImageError, match=match) as e:
        preprocess(src, 16, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    if name is not None:
        assert msg.startswith(f"{name}: "), msg
    return msg


def test_missing_file_and_directory(tmp_path):
    _raises(str(tmp_path / "nope.png"), "no such file", str(tmp_path / "nope.png"))
    _raises(str(tmp_path), "is a directory", str(tmp_path))


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    _raises(str(p), "not an image file Pillow can identify", str(p))
    _raises(b"\x00garbage bytes", "not an image", "<bytes>")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _raises(str(tmp_path / "empty.jpg"), "empty file", str(tmp_path / "empty.jpg"))


def test_format_not_accepted(tmp_path):
    p = str(tmp_path / "icon.ico")
    Image.fromarray(_rgb(16, 16)).save(p, "ICO")
    _raises(p, "image format ICO is not accepted", p)
    fits = tmp_path / "x.fits"  # FITS: a gzip-bomb CVE in Pillow 10.3-12.1; never decoded here
    fits.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    _raises(str(fits), "image format FITS is not accepted", str(fits))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, fmt)
    p = str(tmp_path / f"cut.{fmt.lower()}")
    with open(p, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _raises(p, f"truncated or corrupt {fmt} data", p)


def test_truncated_even_if_pillow_is_told_to_tolerate_it(tmp_path, monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _raises(buf.getvalue()[:800], "truncated", "<bytes>")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored to the caller's value


def test_decompression_bomb(tmp_path, monkeypatch):
    p = str(tmp_path / "big.png")
    Image.new("L", (40, 40)).save(p)  # 1600 pixels
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded before the size check"))
        m.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 > 1000: Pillow would only warn
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _raises(p, r"40x40 = 1600 pixels exceeds the limit of 1000|decompression bomb", p)
        m.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 > 2 * 500: Pillow raises itself
        _raises(p, "decompression bomb", p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)
    assert preprocess(p, 8).shape == (3, 8, 8)


def test_pillow_global_state_untouched(tmp_path):
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    p = str(tmp_path / "ok.png")
    Image.fromarray(_rgb()).save(p)
    preprocess(p, 16)
    with pytest.raises(ImageError):
        preprocess(b"junk", 16)
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before


def test_zero_size():
    _raises(Image.new("RGB", (0, 5)), "zero-size image")
    _raises(np.zeros((0, 4, 3), np.uint8), "zero-size image", "<array 0x4x3 uint8>")


@pytest.mark.parametrize("a, match", [
    (np.zeros((4, 4, 3), np.float32), "expected dtype uint8"),
    (np.zeros((4, 4, 3), np.uint16), "expected dtype uint8"),
    (np.zeros((4, 4, 2), np.uint8), "expected shape"),
    (np.zeros((3, 4, 4, 3), np.uint8), "expected shape"),
    (np.zeros((4,), np.uint8), "expected shape"),
])
def test_bad_arrays(a, match):
    _raises(a, match, f"<array {'x'.join(map(str, a.shape))} {a.dtype}>")


def test_bad_types_and_arguments():
    _raises(42, "not an image", "<int>")
    _raises([[1, 2]], "not an image", "<list>")
    assert load_image(Image.new("La", (3, 2), (9, 0))).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    with pytest.raises(ImageError, match="size must be"):
        preprocess(IMAGES["RGB"], 0)
    with pytest.raises(ImageError, match="std must be"):
        preprocess(IMAGES["RGB"], 8, std=0.0)
    with pytest.raises(ImageError, match="mean must be"):
        preprocess(IMAGES["RGB"], 8, mean=(0.5, 0.5))


def test_caller_image_not_modified():
    im = IMAGES["P+transparency"]
    before = (im.mode, im.size, dict(im.info), np.asarray(im).copy())
    preprocess(im, 16)
    assert (im.mode, im.size, dict(im.info)) == before[:3] and np.array_equal(np.asarray(im), before[3])


# ------------------------------------------------------------------ properties
MODES = ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "1", "I;16", "I", "F", "YCbCr", "HSV", "RGBX", "La", "RGBa"]


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), s=st.integers(1, 48), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16), as_file=st.booleans())
def test_preprocess_shape_range_or_image_error(h, w, s, mode, seed, as_file):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    try:
        im = im.convert(mode)
    except ValueError:  # Pillow cannot make this mode from RGBA: build it from raw bytes instead
        im = Image.frombytes(mode, (w, h), rng.bytes(len(Image.new(mode, (w, h)).tobytes())))
    src = im
    if as_file:
        fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK", "YCbCr", "LA", "RGBX", "La", "RGBa", "PA", "HSV") else "PNG"
        buf = io.BytesIO()
        try:
            im.save(buf, fmt)
            src = buf.getvalue()
        except (OSError, ValueError, KeyError):
            src = im  # this format cannot store the mode
    try:
        x = preprocess(src, s)
    except ImageError:
        return
    assert x.dtype == np.float32 and x.shape == (3, s, s)
    assert np.all(np.isfinite(x)) and x.min() >= -1.0 and x.max() <= 1.0


@settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"]))
def test_garbage_bytes_raise_image_error(data, prefix):
    try:
        x = preprocess(prefix + data, 8)
    except ImageError as e:
        assert str(e).startswith("<bytes>: ")
        return
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
