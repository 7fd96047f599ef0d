"""`npvlm classify`: zero-shot image classification with a SigLIP model folder.

    npvlm classify --model DIR --image a.png b.jpg --labels cat dog "red square" [--template "a photo of {}."]

Each label is scored on its own (sigmoid of the pair's logit, as SigLIP is trained); --softmax
normalises over the labels instead.
"""

from __future__ import annotations

import json

from ..siglip_api import probabilities, prompts
from .cli import argv_text, load_model


def add_siglip_model_args(p):
    p.add_argument("--model", "-m", metavar="DIR", default=None,
                   help="HF SigLIP model folder (config.json, *.safetensors, spiece.model); default: the embedded scenes model")
    p.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (CUDA GPU); default numpy")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads on the CPU (default: the library's own)")


def add_parser(sub):
    c = sub.add_parser("classify", help="zero-shot classification with a SigLIP model: images x labels -> probabilities")
    add_siglip_model_args(c)
    c.add_argument("--image", "-i", nargs="+", required=True, metavar="PATH", help="one or more image files")
    c.add_argument("--labels", "-l", nargs="+", required=True, metavar="LABEL", help="candidate labels")
    c.add_argument("--template", default="{}", help='text around each label, "{}" marks it (e.g. "a photo of {}."); default "{}"')
    c.add_argument("--softmax", action="store_true", help="normalise over the labels (default: a sigmoid per label)")
    c.add_argument("--json", action="store_true", help="print JSON: [{image, probabilities: {label: p}}]")
    c.add_argument("--no-exif", action="store_true", help="ignore the EXIF orientation tag")
    return c


def load_siglip(args):
    from ..siglip_api import EMBEDDED_SIGLIP

    if args.model is None:
        args.model = EMBEDDED_SIGLIP
    return load_model(args, want="siglip")


def run(args) -> int:
    labels = [argv_text(lab, "--labels") for lab in args.labels]
    template = argv_text(args.template, "--template")
    texts = prompts(labels, template)  # a bad template is refused before the model loads
    model = load_siglip(args)
    probs = probabilities(model.logits(args.image, texts, exif=not args.no_exif), softmax=args.softmax)  # [B, C]
    out = [{"image": path, "probabilities": {lab: float(p) for lab, p in zip(labels, row)}}
           for path, row in zip(args.image, probs)]
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    width = max(len(lab) for lab in labels)
    for item in out:
        print(item["image"])
        for lab, p in sorted(item["probabilities"].items(), key=lambda kv: -kv[1]):
            print(f"  {lab:<{width}}  {p:.6f}")
    return 0
