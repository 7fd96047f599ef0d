"""`npvlm finetune --train all --optimizer adamw` done in PyTorch on HF's model, to time the two side by side.

    python tools/finetune_torch.py --model npvlm/demo/shapes_model --data train.jsonl --steps 100 --batch-size 32 \
        --lr 3e-4 [--lr-schedule constant|cosine|linear] [--warmup-steps W] [--out DIR] [--threads 1]

Dev-time tool (torch + transformers). The same run as npvlm's: rows in file order, B at a time, wrapping
round; each batch built by HF's PaliGemmaProcessor(images, text="<image>" + prefix, suffix=suffix) padded on
the right (as npvlm.train.paligemma_grad lays batches out); the loss HF's PaliGemmaForConditionalGeneration
returns for it; torch.optim.AdamW with its defaults but the learning rate; float32, eager attention, every
parameter trained; the lr stepped by HF's get_scheduler (as npvlm's --lr-schedule). Prints s/step (mean over the steps after the first, which warms caches) and the loss;
`--out` saves the float32 weights (save_pretrained) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="save the trained float32 model here")
    a = ap.parse_args(argv)

    import torch
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, get_scheduler
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    base = os.path.dirname(os.path.abspath(a.data))
    with open(a.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    model = PaliGemmaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    proc = PaliGemmaProcessor.from_pretrained(a.model)
    proc.tokenizer.padding_side = "right"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[a.lr_schedule]
    sched = get_scheduler(name, opt, num_warmup_steps=a.warmup_steps, num_training_steps=a.steps)
    times = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        chunk = [rows[(step * a.batch_size + i) % len(rows)] for i in range(a.batch_size)]
        images = [Image.open(os.path.join(base, r["image"])).convert("RGB") for r in chunk]
        inputs = proc(images=images, text=["<image>" + r["prefix"] for r in chunk], suffix=[r["suffix"] for r in chunk],
                      return_tensors="pt", padding="longest")
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        if (step + 1) % max(1, a.steps // 10) == 0 or step == 0:
            print(f"step {step + 1}/{a.steps}  loss {loss.item():.4f}  {times[-1]:.3f} s", file=sys.stderr, flush=True)
    rest = times[1:] or times
    print(f"torch: {a.steps} steps x {a.batch_size} rows, {sum(rest) / len(rest):.3f} s/step "
          f"(mean of steps 2..{a.steps}), {sum(times):.1f} s in all")
    if a.out:
        model.save_pretrained(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
