"""The `npvlm label` batch loop: pending (image, prompt) pairs -> left-padded batches -> line-atomic appends.

Pairs are taken image-major in input order and written in that order, so the output is always a prefix of
the full run's output: a killed and restarted run, or one with another batch size, ends byte-identical to an
uninterrupted one (greedy decoding; the left-padded batch gives each row the ids it gets alone, see
tests/test_generate.py and tests/test_label.py). Each image is decoded once per batch it appears in.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from PIL import Image

from ..errors import GenerationError, ImageError
from ..io.images import load_image
from ..models.paligemma_inputs import prepare_prompts
from .inputs import Item
from .output import Appender, read_records, repair, rewrite_without_failures


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


def check_prompts(model, prompts, max_new_tokens):
    """Every prompt laid out once, so a prompt the model cannot take fails before any image is read."""
    for p in prompts:
        prepare_prompts(model.tokenizer, model.config, model.backend, [p], max_new_tokens=max_new_tokens)


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
    """(upright RGB image, None) or (None, the one-line error)."""
    if os.path.islink(item.source) and not os.path.exists(item.source):
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


def run_job(model, items: list[Item], prompts: list[str], out_path: str, *, batch_size=8, max_new_tokens=64,
            retry_failed=False, max_pixels=None, progress=True) -> Summary:
    if batch_size < 1:
        raise GenerationError(f"--batch-size must be >= 1, got {batch_size}")
    check_prompts(model, prompts, max_new_tokens)
    items = list({it.path: it for it in reversed(items)}.values())[::-1]  # a path listed twice is labelled once
    prompts = list(dict.fromkeys(prompts))
    t0 = time.perf_counter()
    summary = Summary()
    writer = Appender(out_path)  # lock first, then repair and read: no other run can be appending
    try:
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
        old_limit = Image.MAX_IMAGE_PIXELS
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                out = _label_batch(model, chunk, max_new_tokens)
                writer.write(out)
                summary.failed += sum("error" in r for r in out)
                summary.done += sum("error" not in r for r in out)
                finished = 0
                for it, _ in chunk:
                    left[it.path] -= 1
                    finished += left[it.path] == 0
                if bar is not None and finished:
                    bar.update(finished)
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
            if bar is not None:
                bar.close()
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _label_batch(model, chunk, max_new_tokens) -> list[dict]:
    """One left-padded model.generate over the pairs whose image loaded; records in `chunk` order."""
    loaded = {}
    for it, _ in chunk:
        if it.path not in loaded:
            loaded[it.path] = _load(it)
    rows = [(i, it, p) for i, (it, p) in enumerate(chunk) if loaded[it.path][0] is not None]
    results = {}
    if rows:
        res = model.generate([loaded[it.path][0] for _, it, _ in rows], [p for _, _, p in rows],
                             max_new_tokens=max_new_tokens, exif=False)  # EXIF applied by load_image
        results = {i: r for (i, _, _), r in zip(rows, res)}
    return [_record(it, p, res=results[i]) if i in results else _record(it, p, error=loaded[it.path][1])
            for i, (it, p) in enumerate(chunk)]


def _bar(total, progress):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is the `label` extra; without it the run is silent until the summary
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc="label")
