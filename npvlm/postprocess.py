"""Turn PaliGemma's structured outputs into boxes, and draw them.

Detection output (SPEC.md §11): `<locYMIN><locXMIN><locYMAX><locXMAX> label ; ...`, 1024 bins over
the square model input. The processor resizes without keeping the aspect ratio, so a normalised
coordinate bin/1023 maps straight onto the original image: x = bin / 1023 * width.

Segmentation output: the same 4 loc tokens, then 16 `<segNNN>` codes, then the label. The codes
index the codebook of big_vision's VQ-VAE (`vae-oid.npz`), whose decoder turns them into a 64x64
mask to paste into the box. That decoder is not part of HF PaliGemma checkpoints, so npvlm returns
the box and the raw codes and does not build masks.

Model output is untrusted text: the parsers skip malformed pieces and never raise on it.
NumPy and Pillow only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_LOC4 = r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>"
_DET = re.compile(_LOC4 + r"(?:<seg\d{3}>)*[ \t]*([^;<\n]*)")  # seg codes, if any, are skipped
_SEG = re.compile(_LOC4 + r"((?:<seg\d{3}>){16})[ \t]*([^;<\n]*)")
_SEG_CODE = re.compile(r"<seg(\d{3})>")

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image (PaliGemma gives no score)


@dataclass(frozen=True)
class Segment:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    codes: tuple[int, ...]  # the 16 VQ-VAE codes, each in [0, 128)


def _box(groups, width, height):
    """(ymin, xmin, ymax, xmax) bins -> (x0, y0, x1, y1) pixels, or None when a bin is out of range."""
    try:
        y0, x0, y1, x1 = (int(g) for g in groups)
    except (TypeError, ValueError):
        return None
    if not all(0 <= b <= 1023 for b in (y0, x0, y1, x1)):
        return None
    y0, y1 = sorted((y0, y1))
    x0, x1 = sorted((x0, x1))
    return (x0 / 1023 * width, y0 / 1023 * height, x1 / 1023 * width, y1 / 1023 * height)


def parse_detections(text, width, height) -> list[Detection]:
    """All well-formed `<loc>x4 label` pieces of `text`, with boxes in pixels of a width x height image."""
    if not isinstance(text, str):
        return []
    out = []
    for m in _DET.finditer(text):
        box = _box(m.groups()[:4], width, height)
        if box is not None:
            out.append(Detection(label=m.group(5).strip(), box=box))
    return out


def parse_segments(text, width, height) -> list[Segment]:
    """All well-formed `<loc>x4 <seg>x16 label` pieces: box in pixels plus the 16 raw codes (no mask, see above)."""
    if not isinstance(text, str):
        return []
    out = []
    for m in _SEG.finditer(text):
        box = _box(m.groups()[:4], width, height)
        codes = tuple(int(c) for c in _SEG_CODE.findall(m.group(5)))
        if box is not None and len(codes) == 16 and all(0 <= c < 128 for c in codes):
            out.append(Segment(label=m.group(6).strip(), box=box, codes=codes))
    return out


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0.0 when both are empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def draw_detections(image, detections, width: int | None = None) -> Image.Image:
    """A copy of `image` with each box outlined and labelled; one colour per distinct label.

    Line width and font size follow the image's shorter side (2 px and 11 px on a 128 px image, 20 px and
    133 px on a 6000x4000 photo), so boxes and labels stay visible on large photos; a label sits above its
    box, or inside it at the top when there is no room, and is moved left to stay inside the image."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    width = width if width is not None else max(1, round(short / 200))
    font = _font(max(10, round(short / 30)))
    colours: dict[str, tuple[int, int, int]] = {}
    for d in detections:
        c = colours.setdefault(d.label, PALETTE[len(colours) % len(PALETTE)])
        x0, y0, x1, y1 = d.box
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=c, width=width)
        if d.label:
            tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), d.label, font=font)
            tx, ty, w, h = label_box(x0, y0, tx1 - tx0 + 2, ty1 - ty0 + 2, out.size)
            draw.rectangle([tx, ty, tx + w - 1, ty + h - 1], fill=c)
            draw.text((tx + 1 - tx0, ty + 1 - ty0), d.label, fill=(255, 255, 255), font=font)
    return out


def label_box(x0, y0, w, h, size):
    """Where a w x h label of a box whose top-left is (x0, y0) goes: (left, top, w, h). Above the box when
    there is room, else just inside its top; shifted left / up so it stays inside the image where it fits."""
    ty = y0 - h if y0 - h >= 0 else y0
    return max(0, min(x0, size[0] - w)), max(0, min(ty, size[1] - h)), w, h


def _font(size: int):
    """Pillow's bundled scalable font (Pillow >= 10.1) at `size` px; the fixed bitmap font on older Pillow."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()
