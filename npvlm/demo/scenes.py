"""Synthetic scenes of coloured shapes, with their ground truth and PaliGemma-style task examples.

The bundled model `npvlm/demo/shapes_model/` was trained on these scenes (tools/train_shapes.py) and is
measured on `eval_scenes()` (tools/eval_shapes.py), whose seeds the training never uses.

    from npvlm.demo.scenes import make_scene, tasks
    scene = make_scene(7)             # the same seed always gives the same scene
    scene.image                       # PIL RGB, 128 x 128 by default
    scene.caption                     # "a red circle left of a blue square"
    tasks(scene)                      # [("caption en", "a red circle left of a blue square"), ...]

A scene holds one to three shapes (circle, square, triangle) in six colours that stay distinct after
resizing, at random sizes and positions, on a plain or lightly noisy light background. Shapes never
overlap and their centres are at least `MIN_GAP` pixels apart horizontally, so "left to right" is
unambiguous.

Caption grammar (shapes ordered by the x of their box centre, left to right):
    1 shape:   "a {colour} {kind}"
    2 shapes:  "a {colour} {kind} left of a {colour} {kind}"
    3 shapes:  "a {colour} {kind}, a {colour} {kind} and a {colour} {kind}"
with "an" in place of "a" before "orange".

Detection targets follow PaliGemma: `<locYMIN><locXMIN><locYMAX><locXMAX> label`, each bin
round(c * 1023) with c the coordinate divided by the image side, several instances joined with " ; "
in left-to-right order. A multi-class prompt `detect A ; B [; C]` (A, B, C all kinds or all
"colour kind" names) is answered the same way: every shape of an asked class, left to right, each
labelled with its own class; a class the scene lacks adds nothing (`multi_detect_task`). Grouping
the boxes class by class in the prompt's order was tried first: the model kept listing boxes left
to right and gave them the prompt's labels in order, mislabelling them (README, "The embedded model").
NumPy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLOURS = {  # chosen to stay apart in hue and brightness, and away from the light backgrounds
    "red": (215, 25, 30),
    "green": (30, 150, 45),
    "blue": (35, 65, 215),
    "yellow": (235, 195, 0),
    "purple": (135, 40, 175),
    "orange": (245, 125, 15),
}
SIZE = 128  # default image side in pixels
MIN_SIDE, MAX_SIDE = 18, 42  # shape box side at SIZE pixels, scaled with the image
MIN_GAP = 6  # least horizontal distance between two box centres at SIZE pixels
SUPERSAMPLE = 4  # drawn this many times larger, then reduced: smooth edges
EVAL_SEED0 = 10**6  # held-out scenes use seeds from here; training uses seeds below it


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a key of COLOURS
    side: int  # box side in pixels (boxes are square)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive (continuous coordinates)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]  # left to right
    seed: int | None = None
    background: tuple[int, int, int] = (255, 255, 255)
    noise: float = 0.0
    width: int = SIZE
    height: int = SIZE
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def caption(self) -> str:
        return caption(self.shapes)

    @property
    def counts(self) -> dict[str, int]:
        """Number of shapes of each kind (every kind present, zero included)."""
        return {k: sum(s.kind == k for s in self.shapes) for k in KINDS}

    @property
    def colours(self) -> list[str]:
        """Colours of the shapes, left to right."""
        return [s.colour for s in self.shapes]


def caption(shapes) -> str:
    names = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.name}" for s in shapes]
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} left of {names[1]}"
    return ", ".join(names[:-1]) + " and " + names[-1]


def loc_bin(c: float, side: int) -> int:
    """PaliGemma's 1024-bin location of pixel coordinate `c` on an image side of `side` pixels."""
    return int(min(1023, max(0, round(c / side * 1023))))


def loc_tokens(box, width: int, height: int) -> str:
    x0, y0, x1, y1 = box
    return "".join(f"<loc{b:04d}>" for b in (loc_bin(y0, height), loc_bin(x0, width), loc_bin(y1, height), loc_bin(x1, width)))


def detect_answer(shapes, label: str, width: int, height: int) -> str:
    return " ; ".join(f"{loc_tokens(s.box, width, height)} {label}" for s in shapes)


def make_scene(seed_or_rng=0, size: int = SIZE, n_shapes: int | None = None) -> Scene:
    """A random scene from an int seed or a `numpy.random.Generator`; deterministic for a seed."""
    seed = None
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    else:
        seed = int(seed_or_rng)
        rng = np.random.default_rng(seed)
    scale = size / SIZE
    n = int(rng.integers(1, 4)) if n_shapes is None else int(n_shapes)
    while True:  # rejection sampling of a layout; almost always accepted in a few tries
        shapes = _place(rng, n, size, scale)
        if shapes is not None:
            break
    shapes = tuple(sorted(shapes, key=lambda s: s.cx))
    plain = rng.random() < 0.4
    background = (255, 255, 255) if plain else tuple(int(v) for v in rng.integers(222, 256, size=3))
    noise = 0.0 if rng.random() < 0.5 else float(rng.uniform(2.0, 9.0))
    image = _render(shapes, size, background, noise, rng)
    return Scene(image=image, shapes=shapes, seed=seed, background=background, noise=noise, width=size, height=size)


def _place(rng, n, size, scale):
    shapes: list[Shape] = []
    lo, hi = max(4, round(MIN_SIDE * scale)), max(5, round(MAX_SIDE * scale))
    margin = max(1, round(2 * scale))
    for _ in range(n):
        for _attempt in range(50):
            side = int(rng.integers(lo, hi + 1))
            x0 = int(rng.integers(margin, size - margin - side + 1))
            y0 = int(rng.integers(margin, size - margin - side + 1))
            kind = KINDS[int(rng.integers(len(KINDS)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            s = Shape(kind, colour, side, (x0, y0, x0 + side, y0 + side))
            if all(_apart(s, t, margin, MIN_GAP * scale) for t in shapes):
                shapes.append(s)
                break
        else:
            return None
    return shapes


def _apart(a: Shape, b: Shape, margin: int, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    disjoint = ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0
    return disjoint and abs(a.cx - b.cx) >= gap


def _render(shapes, size, background, noise, rng) -> Image.Image:
    k = SUPERSAMPLE
    big = Image.new("RGB", (size * k, size * k), background)
    draw = ImageDraw.Draw(big)
    for s in shapes:
        x0, y0, x1, y1 = (v * k for v in s.box)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:  # apex at the top centre, base along the bottom edge of the box
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    image = big.resize((size, size), Image.Resampling.BOX)
    if noise > 0:
        a = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise, size=(size, size, 3)).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    return image


def tasks(scene: Scene) -> list[tuple[str, str]]:
    """Every (prompt, answer) pair the scene supports, in a fixed order.

    caption; "how many shapes?"; "how many {plural}?" for every kind (0 included); "what color is
    the {kind}?" for each kind present exactly once; "detect {kind}" for each kind present and
    "detect {colour} {kind}" for each colour-kind pair present.
    """
    out = [("caption en", scene.caption), ("answer en how many shapes?", str(len(scene.shapes)))]
    counts = scene.counts
    out += [(f"answer en how many {PLURALS[k]}?", str(counts[k])) for k in KINDS]
    out += [(f"answer en what color is the {k}?", next(s.colour for s in scene.shapes if s.kind == k))
            for k in KINDS if counts[k] == 1]
    out += detect_tasks(scene)
    return out


def detect_tasks(scene: Scene) -> list[tuple[str, str]]:
    w, h = scene.width, scene.height
    out = []
    for k in KINDS:
        of_kind = [s for s in scene.shapes if s.kind == k]
        if of_kind:
            out.append((f"detect {k}", detect_answer(of_kind, k, w, h)))
    for name in sorted({s.name for s in scene.shapes}):
        out.append((f"detect {name}", detect_answer([s for s in scene.shapes if s.name == name], name, w, h)))
    return out


NAMES = tuple(f"{c} {k}" for c in COLOURS for k in KINDS)  # every "colour kind" class


def multi_detect_answer(shapes, classes, width: int, height: int) -> str:
    """The answer to `detect {classes joined by ' ; '}`: the shapes of those classes left to right (as
    `shapes` are), each labelled with its class (classes are all kinds or all names: one fits a shape)."""
    return " ; ".join(detect_answer([s], c, width, height) for s in shapes for c in classes if c in (s.kind, s.name))


def multi_detect_task(scene: Scene, rng, n_classes: int = 2, named: bool = False) -> tuple[str, str]:
    """A random `detect A ; B` (n_classes distinct classes) with at least one class in the scene.

    Kinds: any n_classes of KINDS, in random order. Names: each slot is a name the scene holds or
    (half the time, while one present name is already in) an absent one, itself half the time a
    near miss sharing the colour or the kind of a shape there: "red square" beside a red circle.
    """
    present = sorted({s.name if named else s.kind for s in scene.shapes})
    if not named:
        while True:
            classes = [KINDS[i] for i in rng.permutation(len(KINDS))[:n_classes]]
            if set(classes) & set(present):
                return f"detect {' ; '.join(classes)}", multi_detect_answer(scene.shapes, classes, scene.width, scene.height)
    near = sorted({n for n in NAMES if n not in present and any(w in n.split() for p in present for w in p.split())})
    absent = [n for n in NAMES if n not in present]
    classes: list[str] = []
    while len(classes) < n_classes:
        free = [n for n in present if n not in classes]
        if free and not (set(classes) & set(present) and rng.random() < 0.5):
            pool = free
        else:
            pool = [n for n in (near if near and rng.random() < 0.5 else absent) if n not in classes]
        classes.append(pool[int(rng.integers(len(pool)))])
    order = [classes[i] for i in rng.permutation(len(classes))]
    return f"detect {' ; '.join(order)}", multi_detect_answer(scene.shapes, order, scene.width, scene.height)


def multi_detect_tasks(scene: Scene) -> list[tuple[str, str]]:
    """The held-out `detect A ; B` questions of a scene: two kinds, then two names; fixed by its seed."""
    rng = np.random.default_rng([scene.seed, 2])
    return [multi_detect_task(scene, rng, 2, named=False), multi_detect_task(scene, rng, 2, named=True)]


def task_kind(prompt: str) -> str:
    """Which metric a prompt belongs to: caption, count, count_kind, colour, detect or detect_multi."""
    if prompt.startswith("detect ") and " ; " in prompt:
        return "detect_multi"
    if prompt.startswith("caption"):
        return "caption"
    if prompt == "answer en how many shapes?":
        return "count"
    if prompt.startswith("answer en how many"):
        return "count_kind"
    if prompt.startswith("answer en what color"):
        return "colour"
    return "detect"


def eval_seeds(n: int = 200) -> list[int]:
    """Seeds of the held-out scenes: disjoint from the training seeds (all below EVAL_SEED0)."""
    return list(range(EVAL_SEED0, EVAL_SEED0 + n))


def eval_scenes(n: int = 200, size: int = SIZE) -> list[Scene]:
    return [make_scene(s, size=size) for s in eval_seeds(n)]
