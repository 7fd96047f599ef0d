"""What `npvlm label INPUT` names, as an ordered list of images to label.

INPUT is one of
    a folder      walked recursively in sorted order, symlinked folders not followed (no loops). A file is
                  taken when its first bytes are an image signature (content, not name) or when its name has
                  an image extension (so `notes.jpg` holding text is taken, and then fails as "not an image");
    a glob        `shots/**/*.png` (recursive), sorted;
    a JSONL file  a manifest: one JSON object a line with an "image" path; the other fields are carried into
                  every output line under "meta". Relative paths are relative to the manifest's folder;
    a text file   one path a line (blank lines and `#` comments skipped), relative to the list's folder.
Order is the listing order; it fixes the output order, so the output does not depend on batch size.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

from ..errors import ImageError, show

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm", ".mpo")
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class Item:
    path: str  # as written in the output (the key of the done-set together with the prompt)
    source: str  # where to read it from
    meta: dict = field(default_factory=dict, compare=False)  # manifest fields carried through


def looks_like_image(prefix: bytes) -> bool:
    """Magic bytes of the formats npvlm opens (io.images.ACCEPTED_FORMATS)."""
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return True
    if len(prefix) >= 2 and prefix[:1] == b"P" and prefix[1:2] in b"123456":
        return len(prefix) < 3 or prefix[2:3] in b" \t\r\n#"
    return any(prefix.startswith(s) for s in _SIGNATURES)


def _head(path: str, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:  # unreadable, a symlink loop, a dangling link: decided by the name alone
        return b""


def list_inputs(spec: str) -> list[Item]:
    """INPUT -> the ordered images. Raises ImageError when INPUT names nothing usable."""
    if os.path.isdir(spec):
        return _walk(spec)
    if os.path.isfile(spec):
        head = _head(spec, 4096)
        if looks_like_image(head) or spec.lower().endswith(IMAGE_EXTENSIONS):
            return [Item(spec, spec)]
        if spec.lower().endswith(".jsonl") or head.lstrip().startswith(b"{"):
            return _manifest(spec)
        return _path_list(spec)
    if glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
        if not paths:
            raise ImageError(f"{spec}: the pattern matches no file")
        return [Item(p, p) for p in paths]
    raise ImageError(f"{spec}: no such file, folder or pattern")


def _walk(root: str) -> list[Item]:
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):  # symlink loops and dangling links are listed here too
            path = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) or looks_like_image(_head(path)):
                out.append(Item(path, path))
    return out


def _resolve(base: str, p: str) -> str:
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.join(os.path.dirname(os.path.abspath(base)), p)


def _manifest(path: str) -> list[Item]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImageError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
                raise ImageError(f"{path}:{n}: each line needs an \"image\" path string, got {show(line.strip())}")
            img = row.pop("image")
            out.append(Item(img, _resolve(path, img), row))
    return out


def _path_list(path: str) -> list[Item]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except UnicodeDecodeError:
        raise ImageError(f"{path}: neither an image, a folder, a JSONL manifest nor a UTF-8 list of paths") from None
    return [Item(ln, _resolve(path, ln)) for ln in lines if ln and not ln.startswith("#")]
