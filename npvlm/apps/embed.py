"""`npvlm embed`: SigLIP unit-vector embeddings of images or texts, saved as one float32 .npy [N, D].

    npvlm embed --model DIR --image a.png b.png --out img.npy
    npvlm embed --model DIR --text "a cat" "a dog" --out txt.npy
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError
from .classify import add_siglip_model_args, load_siglip
from .cli import argv_text


def add_parser(sub):
    e = sub.add_parser("embed", help="SigLIP embeddings of images or texts -> a float32 .npy [N, D]")
    add_siglip_model_args(e)
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", "-i", nargs="+", metavar="PATH", help="image files")
    what.add_argument("--text", "-t", nargs="+", metavar="TEXT", help="texts")
    e.add_argument("--out", "-o", required=True, metavar="FILE.npy", help="output file (NumPy .npy)")
    e.add_argument("--no-exif", action="store_true", help="ignore the EXIF orientation tag")
    return e


def run(args) -> int:
    folder = os.path.dirname(os.path.abspath(args.out))
    if not args.out.endswith(".npy"):
        raise ConfigError(f"{args.out}: --out must name a .npy file")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{args.out}: --out: the folder {folder} does not exist or is not writable")
    texts = None if args.text is None else [argv_text(t, "--text") for t in args.text]
    model = load_siglip(args)
    vecs = model.embed_images(args.image, exif=not args.no_exif) if texts is None else model.embed_texts(texts)
    np.save(args.out, np.ascontiguousarray(vecs, dtype=np.float32))
    print(f"{args.out}: {vecs.shape[0]} x {vecs.shape[1]} float32 unit vectors")
    return 0
