"""`npvlm label --engine ray`: the same job, the labelling spread over Ray Data actors (the `ray` extra).

    pending (item, prompt) pairs -> ray.data.from_items rows {path, source, meta (JSON text), prompt}
      -> map_batches(LabelActor, compute=ActorPoolStrategy(size=workers), num_cpus=<per actor>)
      -> iter_batches in input order (DataContext preserve_order) -> the driver's Appender

Each actor loads the model once and calls job.label_batch, the function the local engine calls, so the lines
are the same bytes. Only the driver writes, a block of lines at a time, in input order: the output stays a
prefix of the full output and a killed run resumes exactly once (output.py). The images are read by the
actors from `source`, so on a cluster every node must see the same paths (a shared filesystem).
Ray Data: https://docs.ray.io/en/latest/data/api/doc/ray.data.Dataset.map_batches.html
"""

from __future__ import annotations

import json
import logging
import os
import warnings

from ..errors import GenerationError
from .inputs import Item
from .job import Settings, check_prompts, label_batch


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise GenerationError("--engine ray needs Ray Data: pip install 'npvlm[ray]'") from None
    return ray


class LabelActor:
    """A Ray Data callable class: loads the model once per actor; a batch of rows -> {"line": JSONL lines}."""

    def __init__(self, model_dir=None, backend="numpy", threads=None, max_new_tokens=64, max_pixels=None):
        from .. import load
        from ..backends import get_backend

        be = get_backend(backend)
        if threads is not None:
            be.set_threads(threads)
        self.model = load(model_dir, backend=be)
        self.settings = Settings("", (), int(max_new_tokens), max_pixels)

    def __call__(self, batch: dict) -> dict:  # numpy batch format: column name -> array of strings
        pairs = [(Item(str(p), str(s), json.loads(str(m))), str(q))
                 for p, s, m, q in zip(batch["path"], batch["source"], batch["meta"], batch["prompt"])]
        return {"line": label_batch(self.model, pairs, self.settings)}


def rows_of(pending) -> list[dict]:
    """(Item, prompt) pairs -> rows with only strings (meta as JSON text: a column of mixed dicts would
    need one Arrow schema)."""
    return [{"path": it.path, "source": it.source, "meta": json.dumps(it.meta, ensure_ascii=False), "prompt": p}
            for it, p in pending]


def cpus_per_actor(total_cpus: float, workers: int) -> float:
    """Leave one CPU for the driver and Ray's own tasks: on 2 cores, 1 actor gets 1 CPU, 2 actors 0.5 each
    (two actors of 1 CPU each starve the other tasks and the job hangs)."""
    if total_cpus > 1:
        return min(1.0, (total_cpus - 1.0) / workers)
    return total_cpus / (workers + 1)


class RayEngine:
    """Labels the pending pairs on `workers` Ray actors. Uses the running Ray (ray.init before, or
    RAY_ADDRESS for a cluster); otherwise starts a local one for the job and shuts it down after."""

    def __init__(self, model_dir=None, backend="numpy", threads=None, workers=1, num_cpus=None):
        if workers < 1:
            raise GenerationError(f"--workers must be >= 1, got {workers}")
        self.ray = import_ray()
        self.model_dir, self.backend, self.threads = model_dir, backend, threads
        self.workers, self.num_cpus = workers, num_cpus

    def check_prompts(self, prompts, max_new_tokens):
        from .. import api
        from ..io.tokenizer import Tokenizer
        from ..models.paligemma_config import PaliGemmaConfig

        folder = os.path.expanduser(self.model_dir) if self.model_dir else api.EMBEDDED_MODEL
        cfg = PaliGemmaConfig.from_dir(folder)
        check_prompts(Tokenizer.from_dir(folder, image_token_id=cfg.image_token_index), cfg, prompts, max_new_tokens)

    def batches(self, pending, settings: Settings, batch_size: int):
        if not pending:
            return
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
        try:
            yield from self._run(pending, settings, batch_size)
        finally:
            if started:
                ray.shutdown()

    def _run(self, pending, settings, batch_size):
        ray = self.ray
        from ray.data import ActorPoolStrategy, DataContext

        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")  # ray.data's own settings
        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True  # blocks come back in input order
        ctx.enable_progress_bars = False
        cpus = self.num_cpus or cpus_per_actor(float(ray.cluster_resources().get("CPU", 1.0)), self.workers)
        # ~one batch a block (small writes, little lost to a kill), and a block for each actor at least
        n_blocks = min(len(pending), max(self.workers, min(-(-len(pending) // batch_size), 4096)))
        ds = ray.data.from_items(rows_of(pending), override_num_blocks=n_blocks)
        ds = ds.map_batches(LabelActor, batch_size=batch_size, batch_format="numpy", num_cpus=cpus,
                            compute=ActorPoolStrategy(size=self.workers),
                            fn_constructor_kwargs=dict(model_dir=self.model_dir, backend=self.backend,
                                                       threads=self.threads, max_new_tokens=settings.max_new_tokens,
                                                       max_pixels=settings.max_pixels))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            yield [str(line) for line in batch["line"]]


# ---- the recipe for a Ray cluster: any Ray dataset of images -> label rows -> write_json / write_parquet ----

COLUMNS = ("path", "prompt", "text", "token_ids", "finish_reason", "detections", "width", "height", "error")


class ImageLabelActor(LabelActor):
    """Rows {"image": uint8 HxWxC, "path"} (ray.data.read_images(..., include_paths=True)) -> one row per
    (image, prompt) with the COLUMNS of the JSONL line; "detections" as JSON text and "error" "" when none,
    so every block has one Arrow schema."""

    def __init__(self, prompts, model_dir=None, backend="numpy", threads=None, max_new_tokens=64):
        super().__init__(model_dir, backend, threads, max_new_tokens)
        self.prompts = list(prompts)

    def __call__(self, batch: dict) -> dict:
        pairs = [(Item(str(path), image), p) for path, image in zip(batch["path"], batch["image"]) for p in self.prompts]
        recs = [json.loads(line) for line in label_batch(self.model, pairs, self.settings)]
        return {"path": [r["path"] for r in recs], "prompt": [r["prompt"] for r in recs],
                "text": [r.get("text", "") for r in recs], "token_ids": [r.get("token_ids", []) for r in recs],
                "finish_reason": [r.get("finish_reason", "") for r in recs],
                "detections": [json.dumps(r.get("detections", []), ensure_ascii=False) for r in recs],
                "width": [r.get("width", 0) for r in recs], "height": [r.get("height", 0) for r in recs],
                "error": [r.get("error", "") for r in recs]}


def label_images(ds, prompts, *, model_dir=None, backend="numpy", workers=1, num_cpus=1.0, batch_size=8,
                 max_new_tokens=64, threads=None):
    """A Ray dataset of {"image", "path"} rows -> a dataset of label rows (COLUMNS), for ds.write_json /
    ds.write_parquet. `batch_size` counts images; each actor decodes len(prompts) answers per image.

        ds = ray.data.read_images("s3://bucket/shots/", mode="RGB", include_paths=True)
        label_images(ds, ["caption en"], workers=8, num_cpus=4, threads=4).write_parquet("s3://bucket/labels/")

    Unlike `npvlm label`, this has no resume: Ray writes a fresh set of files per run."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(ImageLabelActor, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                          compute=ActorPoolStrategy(size=workers),
                          fn_constructor_kwargs=dict(prompts=list(prompts), model_dir=model_dir, backend=backend,
                                                     threads=threads, max_new_tokens=max_new_tokens))
