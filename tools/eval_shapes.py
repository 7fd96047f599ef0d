"""Measure the bundled shapes model on held-out scenes (npvlm.shapes.eval_scenes), greedy decoding.

    python tools/eval_shapes.py [--model npvlm/demo/shapes_model] [--engine hf|npvlm|both] [--n 200] [--json out.json]
    python tools/eval_shapes.py --model FINETUNED --engine npvlm --split val --n 400   # choose between models here

Every (prompt, answer) of `npvlm.shapes.tasks(scene)` is asked of each scene; scores per task kind:
  caption     exact match of the whole caption
  count       "how many shapes?" exact
  count_kind  "how many {circles,squares,triangles}?" exact (0 included)
  colour      "what color is the {kind}?" exact (kinds present once)
  detect      "detect {kind}": the fraction of true shapes matched one-to-one by a box of the right label
              with IoU >= 0.5 (recall; precision is printed beside it)
  detect_named "detect {colour} {kind}": the same
  detect_multi "detect {kind} ; {kind}" (scenes.multi_detect_tasks: two kinds, one at least present):
              the fraction of true shapes of the asked classes matched one-to-one by a box carrying
              that shape's class as its label, IoU >= 0.5 (recall); precision = matched boxes / ALL
              boxes of the answer (a box with a wrong or unasked label counts against it)
  detect_multi_named "detect {colour} {kind} ; {colour} {kind}": the same
Targets (issues #5, #12): caption >= 90%, count >= 95%, detect >= 85%, detect_multi(_named) >= 85%.

`--engine hf` runs transformers (a dev-time dependency) on the checkpoint read back in float32;
`--engine npvlm` runs `npvlm.load(model_dir, backend=...)`; `--engine both` runs both and also
reports the fraction of prompts whose generated token ids are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from npvlm.postprocess import iou, parse_detections  # noqa: E402
from npvlm.demo.scenes import KINDS, eval_scenes, make_scene, multi_detect_tasks, task_kind, tasks  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "npvlm", "demo", "shapes_model")
TARGETS = {"caption": 0.90, "count": 0.95, "detect": 0.85, "detect_multi": 0.85, "detect_multi_named": 0.85}
KINDS_SHOWN = ("caption", "count", "count_kind", "colour", "detect", "detect_named", "detect_multi", "detect_multi_named")
VAL_SEED0 = 920_000  # --split val: scenes for choosing between fine-tuned models, disjoint from the held-out ones
# (EVAL_SEED0+), from every training seed (below 900000) and from train_shapes' validation scenes (900000 + a few thousand)
MAX_NEW = 48  # the longest answer (three boxes of a kind) is 3 * 6 + 2 * 2 tokens


def score(scene, prompt: str, truth: str, text: str) -> dict:
    """{"kind", "ok"} for text answers; detection adds "hits", "n_true", "n_pred"."""
    kind = task_kind(prompt)
    text = (text or "").strip()
    if kind not in ("detect", "detect_multi"):
        return {"kind": kind, "ok": text == truth}
    classes = prompt[len("detect "):].split(" ; ")
    named = classes[0] not in KINDS
    truth_boxes = [(c, s.box) for c in classes for s in scene.shapes if (s.name if named else s.kind) == c]
    dets = parse_detections(text, scene.width, scene.height)
    if kind == "detect":  # single class: boxes with another label are ignored, as they always were
        dets = [d for d in dets if d.label == classes[0]]
    hits = matches(truth_boxes, [(d.label, d.box) for d in dets])
    return {"kind": kind + ("_named" if named else ""), "ok": text == truth, "hits": hits,
            "n_true": len(truth_boxes), "n_pred": len(dets)}


def matches(truth, preds) -> int:
    """Greedy one-to-one matching of (label, box) lists, best IoU first: pairs of equal label with IoU >= 0.5."""
    pairs = sorted(((iou(t, p), i, j) for i, (a, t) in enumerate(truth) for j, (b, p) in enumerate(preds) if a == b),
                   reverse=True)
    used_t, used_p, hits = set(), set(), 0
    for v, i, j in pairs:
        if v >= 0.5 and i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            hits += 1
    return hits


def summarise(scores: list[dict]) -> dict:
    by = defaultdict(list)
    for s in scores:
        by[s["kind"]].append(s)
    out = {}
    for kind, ss in by.items():
        row = {"n": len(ss), "exact": sum(s["ok"] for s in ss) / len(ss)}
        if kind.startswith("detect"):
            n_true = sum(s["n_true"] for s in ss)
            n_pred = sum(s["n_pred"] for s in ss)
            hits = sum(s["hits"] for s in ss)
            row.update(shapes=n_true, recall=hits / max(1, n_true), precision=hits / max(1, n_pred))
            row["score"] = row["recall"]
        else:
            row["score"] = row["exact"]
        out[kind] = row
    return out


def jobs_for(scenes, multi: bool = True):
    """(scene index, prompt, truth) of every task of every scene; `multi` adds the `detect A ; B` ones."""
    return [(i, p, a) for i, sc in enumerate(scenes) for p, a in tasks(sc) + (multi_detect_tasks(sc) if multi else [])]


class HFEngine:
    """transformers greedy generate; prompts batched by identical text (so no padding is needed)."""

    def __init__(self, model_dir: str, batch: int = 64, threads: int = 1):
        import torch
        from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.proc = PaliGemmaProcessor.from_pretrained(model_dir)
        self.eos = {1}
        self.batch = batch

    def run(self, scenes, jobs, max_new_tokens=MAX_NEW):
        by_prompt = defaultdict(list)
        for n, (i, p, _a) in enumerate(jobs):
            by_prompt[p].append((n, i))
        out = [None] * len(jobs)
        for p, items in by_prompt.items():
            for k in range(0, len(items), self.batch):
                chunk = items[k:k + self.batch]
                inputs = self.proc(images=[scenes[i].image for _, i in chunk], text=["<image>" + p] * len(chunk),
                                   return_tensors="pt")
                inputs.pop("labels", None)  # all -100 without a suffix; generate has no use for them
                with self.torch.no_grad():
                    gen = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                gen = gen[:, inputs["input_ids"].shape[1]:].tolist()
                for (n, _i), ids in zip(chunk, gen):
                    ids = ids[:ids.index(1)] if 1 in ids else ids
                    ids = [t for t in ids if t != 0]  # pads after eos in a batch
                    out[n] = (self.proc.tokenizer.decode(ids, skip_special_tokens=True), ids)
        return out


class NpvlmEngine:
    def __init__(self, model_dir: str, backend: str = "numpy", weights: str = "float32"):
        import npvlm

        self.model = npvlm.load(model_dir, backend=backend, weights=weights)

    def run(self, scenes, jobs, max_new_tokens=MAX_NEW, batch=64):
        """Batched like the HF engine (same prompt text in a batch); npvlm's batches equal its single runs."""
        by_prompt = defaultdict(list)
        for n, (i, p, _a) in enumerate(jobs):
            by_prompt[p].append((n, i))
        out = [None] * len(jobs)
        for p, items in by_prompt.items():
            for k in range(0, len(items), batch):
                chunk = items[k:k + batch]
                res = self.model.generate([scenes[i].image for _, i in chunk], [p] * len(chunk),
                                          max_new_tokens=max_new_tokens)
                for (n, _i), r in zip(chunk, res):
                    out[n] = (r.text, list(r.token_ids))
        return out


def evaluate(scenes, jobs, outputs):
    return summarise([score(scenes[i], p, a, text) for (i, p, a), (text, _ids) in zip(jobs, outputs)])


def print_table(name: str, summary: dict, file=sys.stdout):
    print(f"\n{name}", file=file)
    print(f"{'task':<19}{'n':>6}{'score':>9}{'target':>9}  notes", file=file)
    for kind in KINDS_SHOWN:
        if kind not in summary:
            continue
        r = summary[kind]
        target = TARGETS.get(kind)
        notes = f"recall over {r['shapes']} shapes, precision {r['precision']:.3f}, exact {r['exact']:.3f}" \
            if kind.startswith("detect") else ""
        tgt = f"{target:.2f}" if target else ""
        flag = "" if target is None else (" ok" if r["score"] >= target else " BELOW")
        print(f"{kind:<19}{r['n']:>6}{r['score']:>9.3f}{tgt:>9}{flag:<7} {notes}", file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--engine", choices=["hf", "npvlm", "both"], default="hf")
    ap.add_argument("--backend", default="numpy", help="npvlm backend (default numpy)")
    ap.add_argument("--weights", choices=["float32", "bfloat16", "int8"], default="float32",
                    help="how npvlm holds the Linear weights (npvlm.load(weights=...)); HF always runs float32")
    ap.add_argument("--n", type=int, default=200, help="held-out scenes (default 200)")
    ap.add_argument("--split", choices=["heldout", "val"], default="heldout",
                    help="heldout: the scenes the README reports (seeds 1000000+); val: other unseen scenes (seeds "
                    f"{VAL_SEED0}+), to choose between models without looking at the held-out ones")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for --engine hf (1 is fastest on a busy machine)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--show", type=int, default=0, help="print the first N wrong answers per engine")
    a = ap.parse_args(argv)

    scenes = eval_scenes(a.n) if a.split == "heldout" else [make_scene(VAL_SEED0 + i) for i in range(a.n)]
    jobs = jobs_for(scenes)
    print(f"{len(scenes)} {'held-out' if a.split == 'heldout' else 'validation'} scenes (seeds {scenes[0].seed}..{scenes[-1].seed}), {len(jobs)} prompts", file=sys.stderr)
    results, outputs = {}, {}
    engines = ["hf", "npvlm"] if a.engine == "both" else [a.engine]
    for name in engines:
        t0 = time.perf_counter()
        engine = HFEngine(a.model, threads=a.threads) if name == "hf" else NpvlmEngine(a.model, a.backend, a.weights)
        outputs[name] = engine.run(scenes, jobs, a.max_new_tokens)
        dt = time.perf_counter() - t0
        results[name] = {"summary": evaluate(scenes, jobs, outputs[name]), "seconds": dt,
                         "weights": a.weights if name == "npvlm" else "float32"}
        print_table(f"engine {name} ({dt:.1f} s)", results[name]["summary"])
        if a.show:
            wrong = [(p, t, o[0]) for (i, p, t), o in zip(jobs, outputs[name]) if o[0].strip() != t][:a.show]
            for p, t, o in wrong:
                print(f"  {p!r}: want {t!r} got {o!r}")
    if a.engine == "both":
        same = [h[1] == n[1] for h, n in zip(outputs["hf"], outputs["npvlm"])]
        results["token_agreement"] = sum(same) / len(same)
        print(f"\nnpvlm token ids equal HF's on {sum(same)}/{len(same)} prompts ({results['token_agreement']:.4f})")
    if a.json:
        results["prompts"] = [{"scene_seed": scenes[i].seed, "prompt": p, "truth": t,
                               **{f"{e}_text": outputs[e][n][0] for e in outputs},
                               **{f"{e}_ids": outputs[e][n][1] for e in outputs}}
                              for n, (i, p, t) in enumerate(jobs)]
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [k for k, t in TARGETS.items() for e in engines if results[e]["summary"].get(k, {"score": 0})["score"] < t]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
