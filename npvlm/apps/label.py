"""`npvlm label`: label a folder / glob / list / manifest of images with one or more prompts, resumably.

    npvlm label shots/ --prompt "caption en" --classes "cat, dog" --out labels.jsonl --format coco

The JSONL at --out is the log and the result: one line per (image, prompt), appended a batch at a time.
Run the same command again after a crash and it carries on where it stopped (see npvlm/label/output.py).
--format coco writes <out stem>.coco.json, --format yolo the folder <out stem>_yolo/, both from the JSONL.
"""

from __future__ import annotations

import os
import sys

from ..errors import ImageError
from .cli import add_model_args, argv_text, load_model


def add_parser(sub):
    p = sub.add_parser("label", help="label many images with prompts into a resumable JSONL (COCO / YOLO export)")
    p.add_argument("input", metavar="INPUT", help="a folder (recursive), a glob, a text file of paths, or a JSONL "
                                                  "manifest with an \"image\" field")
    p.add_argument("--prompt", "-p", action="append", default=[], help='a prompt for every image; repeat for more '
                                                                       '(default: "caption en" unless --classes)')
    p.add_argument("--classes", help='comma-separated classes, e.g. "cat, dog": adds the prompt `detect cat ; dog`')
    p.add_argument("--out", "-o", required=True, help="the JSONL output (appended to; resumed from)")
    add_model_args(p)
    p.add_argument("--batch-size", "-b", type=int, default=8, help="(image, prompt) pairs per batch (default 8)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64, help="most tokens per answer (default 64; greedy)")
    p.add_argument("--format", choices=("jsonl", "coco", "yolo"), default="jsonl",
                   help="also export COCO JSON or a YOLO folder at the end (default: jsonl only)")
    p.add_argument("--draw", metavar="DIR", help="draw each image's detected boxes into DIR at the end")
    p.add_argument("--retry-failed", action="store_true", help="label again the inputs recorded as failed")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels (default: PIL.Image.MAX_IMAGE_PIXELS, ~89M)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process labels (default); ray: Ray Data actors label, this process writes "
                        "(pip install 'npvlm[ray]'; uses RAY_ADDRESS or starts a local Ray)")
    p.add_argument("--workers", type=int, default=1, help="--engine ray: actors, each loads the model once (default 1)")
    return p


def parse_classes(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def prompts_of(args) -> tuple[list[str], list[str]]:
    """(prompts, classes): the --prompt values, then `detect a ; b` for --classes."""
    prompts = [argv_text(p, "--prompt") for p in args.prompt]
    classes = parse_classes(argv_text(args.classes, "--classes")) if args.classes else []
    if args.classes is not None and not classes:
        raise ImageError(f"--classes {args.classes!r} names no class")
    if classes:
        prompts.append("detect " + " ; ".join(classes))
    return (prompts or ["caption en"]), classes


def export_paths(out: str) -> tuple[str, str]:
    stem = out[:-6] if out.endswith(".jsonl") else os.path.splitext(out)[0]
    return stem + ".coco.json", stem + "_yolo"


def run(args) -> int:
    from ..label.inputs import list_inputs
    from ..label.job import run_job
    from ..label.output import read_records, write_coco, write_yolo

    prompts, classes = prompts_of(args)
    if args.batch_size < 1:
        raise ImageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise ImageError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir):
        raise ImageError(f"{args.out}: --out must be a file in an existing folder")
    items = list_inputs(args.input)
    if not items:
        raise ImageError(f"{args.input}: no images found")
    if args.engine == "ray":
        from ..label.ray_engine import RayEngine

        model, engine = None, RayEngine(args.model, args.backend, args.threads, workers=args.workers)
    else:
        model, engine = load_model(args), None
    summary = run_job(model, items, prompts, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      retry_failed=args.retry_failed, max_pixels=args.max_pixels, progress=not args.no_progress,
                      engine=engine, model_dir=args.model)
    print(summary.line(), file=sys.stderr)
    wanted = {it.path for it in items}
    records = [r for r in read_records(args.out) if r["path"] in wanted and r["prompt"] in prompts]
    source = {it.path: it.source for it in items}
    coco_path, yolo_dir = export_paths(args.out)
    if args.format == "coco":
        coco = write_coco(records, coco_path, classes)
        print(f"label: COCO {coco_path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
              f"{len(coco['categories'])} categories", file=sys.stderr)
    elif args.format == "yolo":
        names = write_yolo(records, yolo_dir, source.__getitem__, classes)
        print(f"label: YOLO {yolo_dir}/ (data.yaml, images/, labels/), {len(names)} classes", file=sys.stderr)
    if args.draw:
        _draw_all(records, source, args.draw)
    return 0


def _draw_all(records, source, folder):
    from ..io.images import load_image
    from ..postprocess import Detection, draw_detections

    os.makedirs(folder, exist_ok=True)
    boxes = {}
    for r in records:
        if "error" not in r:
            boxes.setdefault(r["path"], []).extend(Detection(d["label"], tuple(d["box"])) for d in r["detections"])
    for n, (path, dets) in enumerate(boxes.items()):
        name = f"{n:06d}_{os.path.splitext(os.path.basename(path))[0]}.png"
        draw_detections(load_image(source[path]), dets).save(os.path.join(folder, name))
    print(f"label: drew {len(boxes)} image(s) into {folder}", file=sys.stderr)
