"""`npvlm finetune`: train a model folder on a JSONL of examples and write the trained folder.

    npvlm finetune --model DIR --data train.jsonl --out OUT_DIR [--steps N] [--batch-size B] [--lr LR]
                   [--optimizer sgd|adamw] [--train attention|all|lora] [--lora-rank R] [--lora-alpha A]
                   [--save-adapter] [--seed S] [--json FILE] [--overwrite] [--backend numpy|cupy|array_api_strict]

A PaliGemma row is {"image": "path relative to the JSONL file", "prefix": "caption en", "suffix": "a cat"}.
The loop, the data checks and the folder written are npvlm/train/finetune.py's; this module is the parser.
"""

from __future__ import annotations

import os

from .cli import Once, _threads, default_threads


def _positive_int(text: str) -> int:
    return _threads(text)  # an integer >= 1, with argparse's one-line message otherwise


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a model folder on JSONL rows (image, prefix, suffix)",
                       description="Train in float32 on rows taken in file order, B at a time, wrapping round; write "
                                   "OUT_DIR as a complete HF model folder (all at once: Ctrl-C leaves it absent).")
    p.add_argument("--model", "-m", metavar="DIR|ORG/NAME", default=None, action=Once,
                   help="the model folder to start from, or a Hub id in the Hugging Face cache (default: the embedded "
                        "shapes model)")
    p.add_argument("--data", required=True, action=Once,
                   help='JSONL, one row a line: {"image": path relative to this file, "prefix": ..., "suffix": ...}')
    p.add_argument("--out", "-o", required=True, action=Once, metavar="OUT_DIR", help="the folder to write")
    p.add_argument("--steps", type=_positive_int, default=100, action=Once, help="optimiser steps (default 100)")
    p.add_argument("--batch-size", type=_positive_int, default=4, action=Once, help="rows a step (default 4)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", action=Once,
                   help="sgd: plain (no momentum, no weight decay); adamw: torch's defaults (betas 0.9/0.999, "
                        "eps 1e-8, weight decay 0.01). Default sgd")
    p.add_argument("--lr", type=float, default=None, action=Once,
                   help="learning rate, constant (default: 0.03 for sgd, as big_vision's PaliGemma colab; 2e-5 for "
                        "adamw, as HF's PaliGemma fine-tuning guide)")
    p.add_argument("--train", choices=("attention", "all", "lora"), default="attention", action=Once,
                   help="attention: the decoder's q/k/v/o projections only (big_vision's colab; default); all: every "
                        "parameter; lora: low-rank adapters on the decoder's q/k/v/o/gate/up/down projections, merged "
                        "into the weights on save")
    p.add_argument("--lora-rank", type=_positive_int, default=8, action=Once, help="LoRA rank r (default 8, PEFT's)")
    p.add_argument("--lora-alpha", type=float, default=8.0, action=Once,
                   help="LoRA alpha; the update is scaled by alpha / r (default 8, PEFT's)")
    p.add_argument("--save-adapter", action="store_true",
                   help="with --train lora: write the adapters (PEFT's adapter_model.safetensors + adapter_config.json) "
                        "instead of merged weights")
    p.add_argument("--seed", type=int, default=0, action=Once, help="seed of the LoRA A initialisation (default 0)")
    p.add_argument("--json", default=None, action=Once, metavar="FILE",
                   help="write the run and its loss curve (step, loss, examples/s, elapsed seconds) to FILE")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--backend", default="numpy", action=Once, help="numpy (CPU), cupy (CUDA GPU) or array_api_strict")
    p.add_argument("--threads", type=_threads, default=None, action=Once,
                   help="BLAS threads on the CPU (default: OMP_NUM_THREADS if set, else the free cores)")
    return p


def run(args) -> int:
    from ..backends import get_backend
    from ..io.hub import looks_like_hub_id, resolve_model
    from ..train.finetune import finetune
    from .cli import _THREAD_VARS

    backend = get_backend(args.backend)
    if args.threads is not None:
        backend.set_threads(args.threads)
    elif not any(os.environ.get(v) for v in _THREAD_VARS):
        backend.set_threads(default_threads())
    model = resolve_model(args.model) if looks_like_hub_id(args.model) else args.model
    summary = finetune(model, args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       optimizer=args.optimizer, trainable=args.train, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, save_adapter=args.save_adapter, seed=args.seed,
                       json_path=args.json, overwrite=args.overwrite, backend=backend)
    last = summary["curve"][-1]
    print(f"wrote {args.out} ({summary['steps']} steps, {args.train}, {args.optimizer} lr {summary['lr']:g}; "
          f"last loss {last['loss']:.4f})")
    return 0
