"""The label output: an append-only JSONL that survives SIGKILL, and the COCO / YOLO exports built from it.

Exactly-once: every batch is written as complete lines with ONE os.write on an O_APPEND descriptor, then
fsync'd. A process killed at any moment leaves the file as a sequence of complete lines, possibly followed by
one torn line (a write cut short); `repair` truncates that tail on the next start, and `read_records` rebuilds
the done-set {(path, prompt)} from what is left. An exclusive flock keeps two runs off one file.

Line (one per image x prompt), keys in a fixed order, no timings, so equal runs give equal bytes:
    {"path", "prompt", "text", "token_ids", "finish_reason", "detections": [{"label", "box": [x0, y0, x1, y1]}],
     "width", "height", ["meta"]}         or, for an input that failed:  {"path", "prompt", "error", ["meta"]}
COCO: https://cocodataset.org/#format-data (bbox = [x, y, w, h] in pixels, top-left origin).
YOLO: Ultralytics detection format (labels/<stem>.txt: `class cx cy w h` normalised to [0, 1]; data.yaml).
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from ..errors import ImageError

_PAUSE_ENV = "_NPVLM_LABEL_TEST_WRITE_PAUSE"  # test hook: seconds to sleep mid-write and before fsync


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def repair(path: str) -> int:
    """Drop a torn last line (no trailing newline) left by a killed run; returns the bytes removed."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep, pos, step = 0, size, 1 << 16
        while pos > 0:  # find the last newline from the end
            start = max(0, pos - step)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def read_records(path: str) -> list[dict]:
    """Every complete line of the output (run `repair` first). A line that is not a record is an error."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ImageError(f"{path}:{n}: not a label record ({e}); is --out another file?") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not isinstance(rec.get("prompt"), str):
                raise ImageError(f"{path}:{n}: not a label record (no path / prompt); is --out another file?")
            out.append(rec)
    return out


def rewrite_without_failures(path: str, records: list[dict]) -> list[dict]:
    """--retry-failed: the output minus its error lines, replaced atomically (tmp + fsync + rename)."""
    kept = [r for r in records if "error" not in r]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write("".join(dumps(r) + "\n" for r in kept).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return kept


class Appender:
    """O_APPEND writer: `write(records)` = one os.write of complete lines + fsync. Holds an exclusive lock."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ImageError(f"{path}: another `npvlm label` is writing this output") from None
        self.pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)

    def write(self, records: list[dict]) -> None:
        self.write_lines([dumps(r) + "\n" for r in records])

    def write_lines(self, lines: list[str]) -> None:
        """Complete JSONL lines (each ending in "\\n") -> one os.write, then fsync."""
        data = "".join(lines).encode("utf-8")
        if self.pause:  # test hook: make a kill land mid-write (a torn line) or between write and fsync
            half = len(data) // 2
            self._write_all(data[:half])
            time.sleep(self.pause)
            data = data[half:]
        self._write_all(data)
        if self.pause:
            time.sleep(self.pause)
        os.fsync(self.fd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one call for a regular file; a short write (disk full) loops or raises
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self):
        os.close(self.fd)  # releases the lock


def categories(records, classes=None) -> list[str]:
    """Class names: --classes in their order, else every detected label sorted."""
    if classes:
        return list(classes)
    return sorted({d["label"] for r in records if "error" not in r for d in r["detections"] if d["label"]})


def _images(records):
    """(path, width, height, [detections]) per image in first-seen order; failed images left out."""
    seen = {}
    for r in records:
        if "error" in r:
            continue
        entry = seen.setdefault(r["path"], (r["path"], r["width"], r["height"], []))
        entry[3].extend(r["detections"])
    return list(seen.values())


def to_coco(records, classes=None) -> dict:
    names = categories(records, classes)
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns = [], []
    for img_id, (path, w, h, dets) in enumerate(_images(records), 1):
        images.append({"id": img_id, "file_name": path, "width": w, "height": h})
        for d in dets:
            if d["label"] not in cat:
                continue  # a label outside --classes
            x0, y0, x1, y1 = d["box"]
            bw, bh = round(x1 - x0, 1), round(y1 - y0, 1)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat[d["label"]],
                         "bbox": [x0, y0, bw, bh], "area": round(bw * bh, 2), "iscrowd": 0})
    return {"info": {"description": "npvlm label"}, "images": images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in cat.items()]}


def write_coco(records, out_path, classes=None) -> dict:
    coco = to_coco(records, classes)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(coco, f, ensure_ascii=False, indent=1)
    return coco


def write_yolo(records, folder, source_of, classes=None) -> list[str]:
    """folder/images/<n>_<name> (symlinks to the sources), folder/labels/<n>_<stem>.txt, folder/data.yaml."""
    names = categories(records, classes)
    cls = {n: i for i, n in enumerate(names)}
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    for n, (path, w, h, dets) in enumerate(_images(records)):
        name = f"{n:06d}_{os.path.basename(path)}"
        link = os.path.join(folder, "images", name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(source_of(path)), link)
        lines = []
        for d in dets:
            if d["label"] not in cls:
                continue
            x0, y0, x1, y1 = d["box"]
            lines.append(f"{cls[d['label']]} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                         f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
        with open(os.path.join(folder, "labels", os.path.splitext(name)[0] + ".txt"), "w") as f:
            f.writelines(lines)
    with open(os.path.join(folder, "data.yaml"), "w", encoding="utf-8") as f:
        f.write(f"path: {json.dumps(os.path.abspath(folder))}\ntrain: images\nval: images\nnames:\n")
        f.writelines(f"  {i}: {json.dumps(n, ensure_ascii=False)}\n" for i, n in enumerate(names))
    return names
