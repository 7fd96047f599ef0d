"""The synthetic scene generator (npvlm.shapes) and the output parsers (npvlm.postprocess). Fast, NumPy + Pillow only."""

import re

import numpy as np
import pytest
from PIL import Image

from npvlm.postprocess import Detection, draw_detections, iou, parse_detections, parse_segments
from npvlm.demo.scenes import (COLOURS, EVAL_SEED0, KINDS, PLURALS, detect_answer, eval_seeds, loc_bin, make_scene,
                          task_kind, tasks)

SEEDS = range(60)
CAPTION = re.compile(r"^an? (\w+) (\w+)(?:(?: left of |, | and )an? (\w+) (\w+))?(?:(?:, | and )an? (\w+) (\w+))?$")


def test_same_seed_same_scene_and_tasks():
    a, b = make_scene(123), make_scene(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.shapes == b.shapes and tasks(a) == tasks(b)
    c = make_scene(124)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_generator_argument_and_size():
    sc = make_scene(np.random.default_rng(5), size=64)
    assert sc.image.size == (64, 64) and sc.image.mode == "RGB" and sc.seed is None
    assert all(0 <= v <= 64 for s in sc.shapes for v in s.box)


@pytest.mark.parametrize("seed", SEEDS)
def test_ground_truth_consistent(seed):
    sc = make_scene(seed)
    assert sc.image.size == (sc.width, sc.height) == (128, 128)
    assert 1 <= len(sc.shapes) <= 3
    cxs = [s.cx for s in sc.shapes]
    assert cxs == sorted(cxs) and len(set(cxs)) == len(cxs)  # left to right, no ties
    for s in sc.shapes:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= sc.width and 0 <= y0 < y1 <= sc.height and x1 - x0 == y1 - y0 == s.side
        assert s.kind in KINDS and s.colour in COLOURS
        # the box centre (inside every kind) is painted close to the shape's colour
        px = np.asarray(sc.image, dtype=np.float32)[int((y0 + y1) / 2), int((x0 + x1) / 2)]
        assert np.abs(px - COLOURS[s.colour]).max() < 45, (s, px)
    for i, a in enumerate(sc.shapes):  # no overlap
        for b in sc.shapes[i + 1:]:
            assert iou(a.box, b.box) == 0.0
    assert sum(sc.counts.values()) == len(sc.shapes) and sc.colours == [s.colour for s in sc.shapes]


@pytest.mark.parametrize("seed", SEEDS)
def test_caption_grammar(seed):
    sc = make_scene(seed)
    m = CAPTION.match(sc.caption)
    assert m, sc.caption
    words = [w for w in m.groups() if w]
    assert words == [w for s in sc.shapes for w in (s.colour, s.kind)]
    n = len(sc.shapes)
    assert (" left of " in sc.caption) == (n == 2) and (" and " in sc.caption) == (n == 3)
    assert all(f"an {c}" in sc.caption for c in sc.colours if c == "orange")


@pytest.mark.parametrize("seed", SEEDS)
def test_tasks_answers(seed):
    sc = make_scene(seed)
    got = dict(tasks(sc))
    assert got["caption en"] == sc.caption
    assert got["answer en how many shapes?"] == str(len(sc.shapes))
    for k in KINDS:
        assert got[f"answer en how many {PLURALS[k]}?"] == str(sc.counts[k])
        q = f"answer en what color is the {k}?"
        assert (q in got) == (sc.counts[k] == 1)
        if q in got:
            assert got[q] == next(s.colour for s in sc.shapes if s.kind == k)
    assert {task_kind(p) for p in got} >= {"caption", "count", "count_kind", "detect"}


@pytest.mark.parametrize("seed", SEEDS)
def test_detection_targets_parse_back_within_one_bin(seed):
    sc = make_scene(seed)
    for prompt, answer in tasks(sc):
        if not prompt.startswith("detect "):
            continue
        query = prompt[len("detect "):]
        truth = [s for s in sc.shapes if query in (s.kind, s.name)]
        dets = parse_detections(answer, sc.width, sc.height)
        assert [d.label for d in dets] == [query] * len(truth) and truth
        one_bin = sc.width / 1023
        for d, s in zip(dets, truth):
            assert np.allclose(d.box, s.box, atol=one_bin), (d.box, s.box)
            assert iou(d.box, s.box) > 0.95


def test_detection_format():
    sc = make_scene(3)
    s = sc.shapes[0]
    a = detect_answer([s, s], "x", 128, 128)
    y0, x0, y1, x1 = (loc_bin(v, 128) for v in (s.box[1], s.box[0], s.box[3], s.box[2]))
    one = f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}> x"
    assert a == f"{one} ; {one}"
    assert loc_bin(0, 128) == 0 and loc_bin(128, 128) == 1023 and loc_bin(64, 128) == 512


def test_eval_seeds_disjoint_from_training():
    seeds = eval_seeds(200)
    assert len(seeds) == 200 and min(seeds) == EVAL_SEED0 >= 10**6 and len(set(seeds)) == 200


def test_parse_detections_pixels_and_order():
    d = parse_detections("<loc0000><loc0512><loc1023><loc1023> red circle ; <loc0100><loc0200><loc0300><loc0400> cat", 200, 100)
    assert [x.label for x in d] == ["red circle", "cat"]
    assert d[0].box == pytest.approx((512 / 1023 * 200, 0.0, 200.0, 100.0))
    assert d[1].box == pytest.approx((200 / 1023 * 200, 100 / 1023 * 100, 400 / 1023 * 200, 300 / 1023 * 100))
    # swapped corners are put in order
    (e,) = parse_detections("<loc0300><loc0400><loc0100><loc0200> dog", 1023, 1023)
    assert e.box == pytest.approx((200, 100, 400, 300))


@pytest.mark.parametrize("text", [
    "", None, 42, "garbage", "<loc0001><loc0002><loc0003> three only", "<loc12><loc0002><loc0003><loc0004> short",
    "<loc9999><loc0000><loc0001><loc0002> out of range", "; ; ;", "<loc0001><loc0002><loc0003><loc0004",
    "<seg001>" * 20, "\x00\xff<loc\n", "<loc0001>" * 3 + "x<loc0002>",
])
def test_garbage_never_raises(text):
    assert parse_detections(text, 10, 10) == [] or all(isinstance(d, Detection) for d in parse_detections(text, 10, 10))
    assert parse_segments(text, 10, 10) == []


def test_garbage_around_good_pieces_is_skipped():
    text = "junk <loc0001><loc0002> ; <loc0010><loc0020><loc0030><loc0040> a ; <loc9999> ; <loc0050><loc0060><loc0070><loc0080>b"
    d = parse_detections(text, 1023, 1023)
    assert [x.label for x in d] == ["a", "b"] and d[1].box == pytest.approx((60, 50, 80, 70))


def test_parse_segments():
    codes = list(range(0, 128, 8))
    text = "<loc0100><loc0200><loc0300><loc0400>" + "".join(f"<seg{c:03d}>" for c in codes) + " cat ; " \
           "<loc0100><loc0200><loc0300><loc0400><seg001> short"
    (s,) = parse_segments(text, 1023, 1023)
    assert s.label == "cat" and s.codes == tuple(codes) and s.box == pytest.approx((200, 100, 400, 300))
    assert parse_detections(text, 1023, 1023)[-1].label == "short"  # a detection still parses from it


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)


def test_draw_detections():
    img = Image.new("RGB", (64, 48), (255, 255, 255))
    dets = parse_detections("<loc0100><loc0100><loc0900><loc0900> red circle ; <loc0000><loc0000><loc0500><loc0500> sq", 64, 48)
    out = draw_detections(img, dets)
    assert out.size == img.size and out.mode == "RGB" and out is not img
    assert np.asarray(img).min() == 255  # the input is untouched
    a = np.asarray(out)
    assert (a != 255).any()
    # the two labels get different outline colours
    c1 = tuple(a[int(dets[0].box[3]) - 1, 32]), tuple(a[47 // 2, 0])
    assert c1[0] != c1[1]
    assert draw_detections(img.convert("L"), []).mode == "RGB"
