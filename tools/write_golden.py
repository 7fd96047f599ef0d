"""Write tests/golden/shapes_tokens.json: the embedded model's greedy token ids on one held-out scene.

    python tools/write_golden.py [--seed 1000002] [--max-new-tokens 40]

Run it only when a change is *meant* to move the ids (new weights, a fixed tokenizer bug); the
golden test exists to catch every other change that does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import npvlm  # noqa: E402
from npvlm.demo.scenes import make_scene, tasks  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=10**6 + 2)  # a held-out scene of three shapes
    ap.add_argument("--max-new-tokens", type=int, default=40)
    a = ap.parse_args(argv)
    model, scene = npvlm.load(), make_scene(a.seed)
    cases = []
    for prompt, answer in tasks(scene):
        out = model.generate(scene.image, prompt, max_new_tokens=a.max_new_tokens)
        cases.append({"prompt": prompt, "truth": answer, "text": out.text, "token_ids": out.token_ids})
        print(f"{prompt:<36} {out.text!r:<60} truth {answer!r}")
    path = os.path.join(ROOT, "tests", "golden", "shapes_tokens.json")
    with open(path, "w") as f:
        json.dump({"seed": a.seed, "max_new_tokens": a.max_new_tokens, "cases": cases}, f, indent=1)
    print(path)


if __name__ == "__main__":
    main()
