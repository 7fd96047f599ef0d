"""The `npvlm label` batch loop: pending (image, prompt) pairs -> left-padded batches -> line-atomic appends.

Pairs are taken image-major in input order and written in that order, so the output is always a prefix of
the full run's output: a killed and restarted run, or one with another batch size, ends byte-identical to an
uninterrupted one (greedy decoding; the left-padded batch gives each row the ids it gets alone, see
tests/test_generate.py and tests/test_label.py). Each image is decoded once per batch it appears in.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from PIL import Image

from ..errors import GenerationError, ImageError
from ..io.images import load_image
from ..models.paligemma_inputs import prepare_prompts
from .inputs import Item
from .output import Appender, dumps, read_records, repair, rewrite_without_failures


@dataclass
class Summary:
    done: int = 0  # pairs labelled by this run
    failed: int = 0  # pairs recorded as failed by this run
    skipped: int = 0  # pairs already in the output
    images: int = 0
    seconds: float = 0.0
    torn_bytes: int = 0  # a torn last line dropped at the start

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        torn = f"; dropped a torn last line ({self.torn_bytes} bytes)" if self.torn_bytes else ""
        return (f"label: done {self.done}, skipped {self.skipped} (already in the output), failed {self.failed} "
                f"(image, prompt) pairs; {self.images} images in {self.seconds:.1f} s ({rate:.1f} images/s){torn}")


@dataclass(frozen=True)
class Settings:
    """What decides the output lines. A resumed run must use the same, or the file would mix two jobs."""
    model: str  # the model folder, absolute, or "embedded"
    prompts: tuple  # in order (the output is image-major in this order)
    max_new_tokens: int
    max_pixels: int | None = None  # decides which big images are recorded as failed

    def as_json(self) -> dict:
        return {"model": self.model, "prompts": list(self.prompts), "max_new_tokens": self.max_new_tokens,
                "max_pixels": self.max_pixels}


def model_id(model_dir) -> str:
    from ..api import EMBEDDED_MODEL

    if not model_dir or os.path.realpath(model_dir) == os.path.realpath(EMBEDDED_MODEL):
        return "embedded"
    return os.path.abspath(os.path.expanduser(model_dir))


def check_prompts(tokenizer, config, prompts, max_new_tokens):
    """Every prompt laid out once, so a prompt the model cannot take fails before any image is read."""
    from ..backends import get_backend

    host = get_backend("numpy")  # a host layout only: the ray driver holds no model
    for p in prompts:
        prepare_prompts(tokenizer, config, host, [p], max_new_tokens=max_new_tokens)


def _record(item: Item, prompt: str, res=None, error=None) -> dict:
    if error is not None:
        rec = {"path": item.path, "prompt": prompt, "error": error}
    else:
        w, h = res.image_size
        rec = {"path": item.path, "prompt": prompt, "text": res.text, "token_ids": [int(t) for t in res.token_ids],
               "finish_reason": res.finish_reason,
               "detections": [{"label": d.label, "box": [round(float(c), 1) for c in d.box]} for d in res.detections],
               "width": int(w), "height": int(h)}
    if item.meta:
        rec["meta"] = item.meta
    return rec


def _load(item: Item):
    """(upright RGB image, None) or (None, the one-line error). `item.source` is a path, or decoded pixels
    (a uint8 array, as ray.data.read_images gives)."""
    if isinstance(item.source, str) and os.path.islink(item.source) and not os.path.exists(item.source):
        try:
            os.stat(item.source)
        except OSError as e:
            return None, f"{item.path}: cannot read ({e.strerror})"
    try:
        return load_image(item.source), None
    except ImageError as e:
        return None, str(e)
    except (OSError, MemoryError, ValueError) as e:  # anything else Pillow or the OS raises on one bad file
        return None, f"{item.path}: cannot read ({type(e).__name__}: {e})"


class LocalEngine:
    """This process labels the pending pairs, `batch_size` at a time, with a model it already holds."""

    def __init__(self, model):
        self.model = model

    def check_prompts(self, prompts, max_new_tokens):
        check_prompts(self.model.tokenizer, self.model.config, prompts, max_new_tokens)

    def batches(self, pending, settings: Settings, batch_size: int):
        for start in range(0, len(pending), batch_size):
            yield label_batch(self.model, pending[start:start + batch_size], settings)


def run_job(model, items: list[Item], prompts: list[str], out_path: str, *, batch_size=8, max_new_tokens=64,
            retry_failed=False, max_pixels=None, progress=True, engine=None, model_dir=None) -> Summary:
    """Label every (item, prompt) not yet in `out_path`, appending in input order. `engine` (default: a
    LocalEngine on `model`) yields the JSONL lines of consecutive pending pairs, in order; this process alone
    writes them, so the exactly-once rules of output.py hold whatever engine computed the lines."""
    if batch_size < 1:
        raise GenerationError(f"--batch-size must be >= 1, got {batch_size}")
    engine = engine or LocalEngine(model)
    items = list({it.path: it for it in reversed(items)}.values())[::-1]  # a path listed twice is labelled once
    prompts = list(dict.fromkeys(prompts))
    engine.check_prompts(prompts, max_new_tokens)
    if model_dir is None and model is not None:
        model_dir = model.model_dir
    settings = Settings(model_id(model_dir), tuple(prompts), int(max_new_tokens), max_pixels)
    t0 = time.perf_counter()
    summary = Summary()
    writer = Appender(out_path)  # lock first, then repair and read: no other run can be appending
    try:
        check_settings(out_path, settings)
        summary.torn_bytes = repair(out_path)
        records = read_records(out_path)
        if retry_failed and any("error" in r for r in records):
            records = rewrite_without_failures(out_path, records)
            writer.close()
            writer = Appender(out_path)  # the file was replaced: append to the new one
        done = {(r["path"], r["prompt"]) for r in records}
        pending = [(it, p) for it in items for p in prompts if (it.path, p) not in done]
        summary.skipped = len(items) * len(prompts) - len(pending)
        left = {}
        for it, _ in pending:
            left[it.path] = left.get(it.path, 0) + 1
        summary.images = len(left)
        bar = _bar(len(left), progress)
        at = 0  # pending[:at] are written
        try:
            for lines in engine.batches(pending, settings, batch_size):
                if not lines:
                    continue
                chunk = pending[at:at + len(lines)]
                if len(chunk) < len(lines) or _key(lines[0]) != (chunk[0][0].path, chunk[0][1]):
                    raise GenerationError(f"the engine returned {len(lines)} lines out of input order at pair {at}")
                writer.write_lines(lines)
                at += len(lines)
                failed = sum('"error"' in ln and "error" in json.loads(ln) for ln in lines)
                summary.failed += failed
                summary.done += len(lines) - failed
                finished = 0
                for it, _ in chunk:
                    left[it.path] -= 1
                    finished += left[it.path] == 0
                if bar is not None and finished:
                    bar.update(finished)
        finally:
            if bar is not None:
                bar.close()
        if at != len(pending):
            raise GenerationError(f"the engine labelled {at} of {len(pending)} pending pairs")
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def check_settings(out_path: str, settings: Settings) -> None:
    """First start: write OUT.settings.json (tmp + fsync + rename). Later starts: refuse other settings."""
    path = settings_path(out_path)
    want = settings.as_json()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                had = json.load(f)
            except json.JSONDecodeError as e:
                raise GenerationError(f"{path}: not a settings record ({e.msg})") from None
        diff = [f"{k} {had.get(k)!r} -> {v!r}" for k, v in want.items() if had.get(k) != v]
        if diff:
            raise GenerationError(f"{out_path}: was started with other settings ({'; '.join(diff)}): run with "
                                  f"the first settings, or write to another --out")
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(want, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key(line: str) -> tuple:
    rec = json.loads(line)
    return rec["path"], rec["prompt"]


def settings_path(out_path: str) -> str:
    return out_path + ".settings.json"


def label_batch(model, pairs, settings: Settings) -> list[str]:
    """(item, prompt) pairs -> their JSONL lines (with "\\n"), in `pairs` order: one left-padded
    model.generate over the pairs whose image loaded, an error line for the others. Both engines call this."""
    old_limit = Image.MAX_IMAGE_PIXELS
    if settings.max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = settings.max_pixels
    try:
        loaded = {}
        for it, _ in pairs:
            if it.path not in loaded:
                loaded[it.path] = _load(it)
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    rows = [(i, it, p) for i, (it, p) in enumerate(pairs) if loaded[it.path][0] is not None]
    results = {}
    if rows:
        res = model.generate([loaded[it.path][0] for _, it, _ in rows], [p for _, _, p in rows],
                             max_new_tokens=settings.max_new_tokens, exif=False)  # EXIF applied by load_image
        results = {i: r for (i, _, _), r in zip(rows, res)}
    recs = [_record(it, p, res=results[i]) if i in results else _record(it, p, error=loaded[it.path][1])
            for i, (it, p) in enumerate(pairs)]
    return [dumps(r) + "\n" for r in recs]


def _bar(total, progress):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is the `label` extra; without it the run is silent until the summary
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc="label")
