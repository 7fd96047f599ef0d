"""Images in: load safely, convert to RGB as HF does, squash-resize, normalise (SPEC.md §3, FIELD-NOTES.md §3.2).

`preprocess` reproduces transformers 5's `SiglipImageProcessor` with its PIL backend, the one HF uses
without torchvision, to float32 rounding (bit-identical in the tests):
    convert to RGB -> PIL BICUBIC resize to (S, S), aspect ratio not kept -> x * (1/255) in float64,
    cast to float32 -> (x - mean) / std in float32 -> channels first [3, S, S].

Colour (what transformers 5.24's `convert_to_rgb` does, which differs from older versions):
    an image with an alpha band ("A" in its bands: RGBA, LA, PA, also LAB) or a `transparency` entry
    (P, L or RGB with tRNS) is converted to RGBA and alpha-composited onto WHITE; older transformers
    dropped alpha (black where transparent). Every other mode goes through PIL's `convert("RGB")`.
Where npvlm deliberately differs from HF:
    16-bit "I;16*" / "I" images are scaled to 8 bit (round(v / 257)) before conversion; PIL's
    convert clips them (a mostly white image). "F" images in [0, 1] are scaled by 255, others clipped.
    "La" (premultiplied) goes through "LA" (HF fails on it).
    EXIF orientation is applied by default (HF applies it only when it opens a path or URL itself).
Safety: only ACCEPTED_FORMATS are opened; the pixel count is checked against PIL's MAX_IMAGE_PIXELS
right after the lazy open, before any decoding (the warning level is an error here too); truncated
files are errors; the first frame of an animation is used.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, ImageError, show
from .files import check_regular, read_json_object

# Pillow plugin names. JPEG includes camera MPO files (the JPEG opener returns them); PPM covers PBM/PGM/PNM.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, HF's `resample` for SigLIP
MAX_PIXEL = 1e4  # |pixel value| a model folder's image settings may produce (HF's SigLIP: [-1, 1]; CLIP's: [-1.8, 2.2])
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(src, *, exif: bool = True) -> Image.Image:
    """An RGB PIL image from a path, bytes, a PIL image or a uint8 array (HxW, HxWx1, HxWx3, HxWx4).

    Never modifies `src`. Raises ImageError (one line, naming the source) for anything it cannot use.
    """
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, Image.Image):
        name = _pil_name(src)
        img = _checked_load(src, name)
        if exif:
            img = _exif_transpose(img, name)
        return _to_rgb(img, name)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(src)), "<bytes>", exif)
    if isinstance(src, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(src))  # "~/cat.jpg" as a shell would
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        check_regular(path, ImageError)  # a FIFO or /dev/zero would block or never end
        return _open(path, path, exif)
    raise ImageError(f"<{type(src).__name__}>: not an image (expected a path, bytes, a PIL image or a uint8 array)")


def preprocess(image, size, *, mean=0.5, std=0.5, rescale_factor: float = 1 / 255, resample: int = BICUBIC,
               exif: bool = True) -> np.ndarray:
    """float32 [3, S, S] pixel values as HF's SiglipImageProcessor (PIL backend); `image` as for load_image.

    `size` is S or (height, width); mean/std are a float or one per channel (0.5 maps to [-1, 1]).
    """
    h, w = _size_hw(size)
    mean, std = _per_channel(mean, "mean"), _per_channel(std, "std")
    if not np.all(np.isfinite(std)) or np.any(std == 0):
        raise ImageError(f"std must be finite and non-zero, got {std.tolist()}")
    img = load_image(image, exif=exif)
    try:
        img = img.resize((w, h), resample=resample)  # PIL takes (width, height)
    except (ValueError, TypeError) as e:
        raise ImageError(f"{_pil_name(img)}: cannot resize with resample={resample!r} ({e})") from None
    x = np.asarray(img)  # [S, S, 3] uint8
    x = (x.astype(np.float64) * float(rescale_factor)).astype(np.float32)  # as HF: float64 multiply, then float32
    x = (x - mean) / std  # float32
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [S, S, 3] -> [3, S, S]


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What preprocess needs, from a model folder's preprocessor_config.json (HF) or defaults."""

    size: int  # S: the side of the square input (vision_config.image_size)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC

    @classmethod
    def from_dir(cls, model_dir, default_size: int) -> "ImageProcessorConfig":
        """The image settings HF's from_pretrained reads (transformers 5 image_processing_base): the
        `image_processor` object inside `processor_config.json` first, else `preprocessor_config.json`,
        else the defaults. The size must equal `default_size`."""
        found = _settings_file(os.fspath(model_dir))
        if found is None:
            return cls(size=int(default_size))
        path, d = found
        try:
            size = d.get("size", {"height": default_size, "width": default_size})
            if isinstance(size, int):
                size = {"height": size, "width": size}
            if not isinstance(size, dict) or "height" not in size or "width" not in size:
                raise ConfigError(f"{path}: size must be {{'height': S, 'width': S}} (aspect-preserving resizes are not supported), got {show(size)}")
            hw = (int(size["height"]), int(size["width"]))
            if hw != (default_size, default_size):
                raise ConfigError(f"{path}: size {hw[0]}x{hw[1]} does not match the model's image_size {default_size}")
            if d.get("do_resize") is False:
                raise ConfigError(f"{path}: do_resize false is not supported (the model needs {default_size}x{default_size})")
            mean = (0.0,) * 3 if d.get("do_normalize") is False else tuple(float(v) for v in _per_channel(d.get("image_mean", 0.5), "image_mean"))
            std = (1.0,) * 3 if d.get("do_normalize") is False else tuple(float(v) for v in _per_channel(d.get("image_std", 0.5), "image_std"))
            rescale = 1.0 if d.get("do_rescale") is False else float(d.get("rescale_factor", 1 / 255))
            resample = int(d.get("resample", BICUBIC))
        except ImageError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{path}: malformed value ({e})") from None
        if not np.all(np.isfinite([*mean, *std, rescale])):
            raise ConfigError(f"{path}: image_mean, image_std and rescale_factor must be finite, got {list(mean)}, {list(std)}, {rescale}")
        if any(s == 0 for s in std):
            raise ConfigError(f"{path}: image_std must be non-zero, got {list(std)}")
        ends = [v * rescale for v in (0.0, 255.0)] + [(v * rescale - m) / s for v in (0.0, 255.0) for m, s in zip(mean, std)]
        if not all(abs(x) <= MAX_PIXEL for x in ends):  # HF would feed the model Inf (or values no tower was trained on)
            g = lambda xs: "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"  # noqa: E731
            raise ConfigError(f"{path}: image_mean {g(mean)}, image_std {g(std)} and rescale_factor {rescale:.4g} take "
                              f"pixel values to {min(ends):.3g}..{max(ends):.3g}, beyond +-{MAX_PIXEL:g}")
        if resample not in (0, 1, 2, 3, 4, 5):
            raise ConfigError(f"{path}: resample must be a PIL filter 0-5, got {resample}")
        return cls(size=default_size, mean=mean, std=std, rescale_factor=rescale, resample=resample)

    def preprocess(self, image, *, exif: bool = True) -> np.ndarray:
        return preprocess(image, self.size, mean=self.mean, std=self.std, rescale_factor=self.rescale_factor,
                          resample=self.resample, exif=exif)


# ---------------------------------------------------------------------------- helpers
def _settings_file(model_dir: str):
    """(where, settings dict) with HF's precedence, or None when neither file holds image settings."""
    nested = os.path.join(model_dir, "processor_config.json")
    if os.path.exists(nested):
        d = read_json_object(nested, ConfigError, limit=1 << 20)
        if "image_processor" in d:
            if not isinstance(d["image_processor"], dict):
                raise ConfigError(f"{nested}: image_processor must be an object, got {type(d['image_processor']).__name__}")
            return f"{nested} (image_processor)", d["image_processor"]
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.exists(path):
        return path, read_json_object(path, ConfigError, limit=1 << 20)
    return None


def _size_hw(size) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size) if isinstance(size, (tuple, list)) else None
    if hw is None or len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 < v <= 16384 for v in hw):
        raise ImageError(f"size must be a positive int or (height, width) up to 16384, got {show(size)}")
    return int(hw[0]), int(hw[1])


def _per_channel(v, what) -> np.ndarray:
    with np.errstate(over="ignore"):  # 1e300 becomes inf here, and is refused as not finite
        a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, 3)
    if a.size != 3:
        raise ImageError(f"{what} must be a float or 3 floats, got {show(v)}")
    return a


def _pil_name(img) -> str:
    return getattr(img, "filename", "") or f"<PIL {img.mode} image>"


def _open(fp, name: str, exif: bool) -> Image.Image:
    """Open with the format allow-list, check the pixel count before decoding, decode frame 0 fully."""
    try:
        with warnings.catch_warnings():  # restored on exit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=ACCEPTED_FORMATS)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: too many pixels, refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: {_unaccepted(fp)}") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    except (SyntaxError, ValueError, EOFError) as e:  # a plugin choking on a malformed header
        raise ImageError(f"{name}: malformed image header ({e})") from None
    with im:
        w, h = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and w * h > limit:  # the size is known from the header; nothing decoded yet
            raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); "
                             "refused as a possible decompression bomb")
        img = _checked_load(im, name)
        return _to_rgb(_exif_transpose(img, name) if exif else img, name)


def _checked_load(im: Image.Image, name: str) -> Image.Image:
    """Decode the first frame completely; truncated data is an error even if LOAD_TRUNCATED_IMAGES is set."""
    if 0 in im.size:
        raise ImageError(f"{name}: zero-size image ({im.size[0]}x{im.size[1]})")
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()  # a freshly opened file is at frame 0; a caller's PIL image is used at its current frame
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        fmt = im.format or "image"
        raise ImageError(f"{name}: truncated or corrupt {fmt} data ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels, refused as a possible decompression bomb ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return im


def _exif_transpose(img: Image.Image, name: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as e:  # malformed EXIF blocks raise a variety of errors inside Pillow
        raise ImageError(f"{name}: unreadable EXIF data ({type(e).__name__}: {e}); pass exif=False to ignore it") from None
    return img.copy() if out is None else out


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """HF's convert_to_rgb (alpha composited on white), after scaling 16-bit and float images to 8 bit."""
    if img.mode in _16BIT_MODES:
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))  # round(v / 257)
    elif img.mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if v.size and v.min() >= 0.0 and v.max() <= 1.0:
            v = v * 255.0
        img = Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8))
    try:
        if img.mode == "La":  # premultiplied: PIL converts it only to LA (HF's convert("RGB") fails on it)
            img = img.convert("LA")
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: colour mode {img.mode} cannot be converted to RGB ({e})") from None


def _from_array(a: np.ndarray) -> Image.Image:
    name = f"<array {'x'.join(map(str, a.shape))} {a.dtype}>"
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8 (0-255); scale and cast with .astype(np.uint8)")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(f"{name}: expected shape HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), channels last")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: zero-size image")
    a = np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[2] == 4:  # HF's numpy path: composite onto white in float, rounded
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    img = Image.fromarray(a)
    return img.convert("RGB") if img.mode != "RGB" else img


def _unaccepted(fp) -> str:
    """Why Image.open refused: a known but unaccepted format, or not an image at all."""
    try:
        if isinstance(fp, str):
            with open(fp, "rb") as f:
                prefix = f.read(16)
        else:
            fp.seek(0)
            prefix = fp.read(16)
    except OSError:
        prefix = b""
    if not prefix:
        return "empty file, not an image"
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            ok = accept is not None and accept(prefix)
        except Exception:
            ok = False
        if ok and not isinstance(ok, str) and fmt not in ACCEPTED_FORMATS:
            return f"image format {fmt} is not accepted (accepted: {', '.join(ACCEPTED_FORMATS)})"
    return f"not an image file Pillow can identify (accepted formats: {', '.join(ACCEPTED_FORMATS)})"
