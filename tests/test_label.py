"""`npvlm label` on the embedded shapes model: equal to one-by-one generate, batch-size independent,
exactly-once under SIGKILL, failures recorded, COCO / YOLO exports that parse."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import npvlm
from npvlm.apps.cli import main
from npvlm.demo.scenes import make_scene
from npvlm.label.inputs import list_inputs
from npvlm.label.job import run_job
from npvlm.label.output import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["caption en", "detect circle ; square"]
N_TOKENS = 24  # enough for every caption / two boxes of the shapes model; keeps the suite fast
N_SCENES = 40


@pytest.fixture(scope="module")
def model():
    return npvlm.load()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """40 scenes as PNG, half of them one folder down (the walk is recursive)."""
    root = tmp_path_factory.mktemp("scenes")
    os.makedirs(root / "sub")
    for s in range(N_SCENES):
        make_scene(s).image.save(root / ("sub" if s % 2 else ".") / f"scene{s:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def reference(model, scenes, tmp_path_factory):
    """The batch-size-8 output bytes of the scenes folder."""
    out = str(tmp_path_factory.mktemp("ref") / "ref.jsonl")
    run_job(model, list_inputs(scenes), PROMPTS, out, batch_size=8, max_new_tokens=N_TOKENS, progress=False)
    with open(out, "rb") as f:
        return f.read()


def _pairs(data: bytes):
    return [(r["path"], r["prompt"]) for r in map(json.loads, data.splitlines())]


def test_label_equals_generate_one_by_one(model, scenes, reference):
    recs = [json.loads(line) for line in reference.splitlines()]
    assert len(recs) == N_SCENES * len(PROMPTS)
    assert len(set(_pairs(reference))) == len(recs)  # every (image, prompt) exactly once
    for r in recs:
        one = model.generate(r["path"], r["prompt"], max_new_tokens=N_TOKENS)
        assert (r["token_ids"], r["text"], r["finish_reason"]) == (one.token_ids, one.text, one.finish_reason)
        assert r["detections"] == [{"label": d.label, "box": [round(float(c), 1) for c in d.box]} for d in one.detections]
        assert (r["width"], r["height"]) == one.image_size
    assert any(r["detections"] for r in recs)  # the detect prompt does find boxes, so their mapping is exercised


@pytest.mark.parametrize("batch_size", [1, 3])
def test_output_bytes_do_not_depend_on_batch_size(model, scenes, reference, tmp_path, batch_size):
    out = str(tmp_path / "o.jsonl")
    run_job(model, list_inputs(scenes), PROMPTS, out, batch_size=batch_size, max_new_tokens=N_TOKENS, progress=False)
    with open(out, "rb") as f:
        assert f.read() == reference  # batch size 8 made the reference


def _cli(args, env=None):
    return [sys.executable, "-m", "npvlm", "label", *args]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


def test_sigkill_at_random_moments_then_resume_is_exactly_once(scenes, reference, tmp_path):
    out = str(tmp_path / "o.jsonl")
    cmd = _cli([scenes, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", out, "-b", "4",
                "-n", str(N_TOKENS), "--no-progress"])
    # the hook sleeps 30 ms halfway through each batch's bytes and again before fsync, so kills land mid-write too
    env = _env(_NPVLM_LABEL_TEST_WRITE_PAUSE="0.03")
    rng = random.Random(15)
    lines_seen = []
    for _ in range(4):
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.7, 1.2))  # import + load take ~0.6 s; a full run takes ~3 s here
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = open(out, "rb").read() if os.path.exists(out) else b""
        lines_seen.append((len(data), not data.endswith(b"\n") and bool(data)))  # (bytes, torn tail?)
    print("bytes and torn tail after each kill:", lines_seen, "of", len(reference))
    assert any(0 < n < len(reference) for n, _ in lines_seen), "no kill landed mid-run: change the delays"
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    assert sorted(_pairs(data)) == sorted(_pairs(reference))  # each pair once: nothing lost, nothing twice
    assert data == reference  # and in order, byte for byte, though written by five processes at batch size 4


def test_torn_last_line_is_dropped_and_redone(model, scenes, reference, tmp_path):
    out = str(tmp_path / "o.jsonl")
    lines = reference.splitlines(keepends=True)
    with open(out, "wb") as f:
        f.write(b"".join(lines[:7]) + lines[7][: len(lines[7]) // 2])  # a write cut off by a kill
    s = run_job(model, list_inputs(scenes), PROMPTS, out, batch_size=8, max_new_tokens=N_TOKENS, progress=False)
    assert (s.skipped, s.done, s.failed) == (7, len(lines) - 7, 0)
    assert s.torn_bytes == len(lines[7]) // 2
    with open(out, "rb") as f:
        assert f.read() == reference


@pytest.fixture
def bad_folder(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for s in range(3):
        make_scene(s).image.save(d / f"good{s}.png")
    png = (d / "good0.png").read_bytes()
    (d / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated PNG data
    (d / "notes.jpg").write_text("this is text, not a JPEG\n")
    (d / "empty.png").write_bytes(b"")
    os.symlink("loop_b.png", d / "loop_a.png")
    os.symlink("loop_a.png", d / "loop_b.png")
    Image.new("RGB", (200, 200), (9, 9, 9)).save(d / "huge.png")  # 40000 pixels > --max-pixels 20000
    make_scene(3).image.save(d / "no_extension", format="PNG")  # found by its PNG signature
    (d / "README.txt").write_text("not an image and not named like one: not listed\n")
    return d


def test_bad_inputs_are_recorded_and_the_rest_labelled(bad_folder, tmp_path, capsys):
    out = str(tmp_path / "o.jsonl")
    args = [str(bad_folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", out, "-n", str(N_TOKENS), "--max-pixels", "20000", "--no-progress"]
    assert main(["label", *args]) == 0
    recs = read_records(out)
    failed = {os.path.basename(r["path"]): r["error"] for r in recs if "error" in r}
    assert set(failed) == {"corrupt.png", "notes.jpg", "empty.png", "loop_a.png", "loop_b.png", "huge.png"}
    assert "decompression bomb" in failed["huge.png"] and "20000" in failed["huge.png"]
    assert "symbolic links" in failed["loop_a.png"]
    ok = {os.path.basename(r["path"]) for r in recs if "error" not in r}
    assert ok == {"good0.png", "good1.png", "good2.png", "no_extension"}
    err = capsys.readouterr().err
    assert "done 8, skipped 0 (already in the output), failed 12" in err  # 4 good + 6 bad images x 2 prompts
    # a second run retries nothing; --retry-failed labels a repaired file and still keeps every pair once
    assert main(["label", *args]) == 0
    assert len(read_records(out)) == len(recs)
    make_scene(9).image.save(bad_folder / "notes.jpg", format="PNG")
    assert main(["label", *args, "--retry-failed"]) == 0
    again = read_records(out)
    assert sorted((r["path"], r["prompt"]) for r in again) == sorted((r["path"], r["prompt"]) for r in recs)
    assert "error" not in next(r for r in again if r["path"].endswith("notes.jpg"))


def test_inputs_glob_list_and_manifest_carry_fields(scenes, tmp_path):
    pngs = sorted(p.path for p in list_inputs(scenes))[:3]
    assert [i.path for i in list_inputs(os.path.join(scenes, "**", "*.png"))] == sorted(
        i.path for i in list_inputs(scenes))
    lst = tmp_path / "list.txt"
    lst.write_text("# three scenes\n" + "\n".join(pngs) + "\n\n")
    assert [i.path for i in list_inputs(str(lst))] == pngs
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"image": p, "id": k, "split": "val"}) + "\n" for k, p in enumerate(pngs)))
    out = str(tmp_path / "o.jsonl")
    assert main(["label", str(man), "--out", out, "-n", "8", "--no-progress"]) == 0
    assert [(r["path"], r["meta"]) for r in read_records(out)] == [(p, {"id": k, "split": "val"})
                                                                   for k, p in enumerate(pngs)]


def test_coco_and_yolo_exports_parse_and_match_the_jsonl(scenes, tmp_path):
    files = sorted(i.path for i in list_inputs(scenes))[:6]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(files) + "\n")
    out = str(tmp_path / "o.jsonl")
    base = [str(lst), "--classes", "circle, square, triangle", "--out", out, "-n", str(N_TOKENS), "--no-progress"]
    assert main(["label", *base, "--format", "coco"]) == 0
    recs = read_records(out)
    assert {r["prompt"] for r in recs} == {"detect circle ; square ; triangle"}
    dets = [(r["path"], d) for r in recs for d in r["detections"]]
    assert dets, "the shapes model finds no box: the export checks below would be vacuous"
    coco = json.load(open(tmp_path / "o.coco.json"))
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    images = {im["id"]: im for im in coco["images"]}
    assert sorted(im["file_name"] for im in images.values()) == files
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ids)) == len(ids) == sum(d["label"] in cats.values() for _, d in dets)
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= im["width"] + 0.1 and y + h <= im["height"] + 0.1
        assert a["category_id"] in cats and a["iscrowd"] == 0
    assert main(["label", *base, "--format", "yolo"]) == 0  # resumes: nothing to label, only the export
    ydir = tmp_path / "o_yolo"
    yaml = (ydir / "data.yaml").read_text()
    assert 'names:\n  0: "circle"\n  1: "square"\n  2: "triangle"\n' in yaml
    labels = sorted(os.listdir(ydir / "labels"))
    assert len(labels) == len(files) == len(os.listdir(ydir / "images"))
    n_boxes = 0
    for name in labels:
        for line in (ydir / "labels" / name).read_text().splitlines():
            c, *v = line.split()
            assert int(c) in (0, 1, 2) and len(v) == 4 and all(0.0 <= float(t) <= 1.0 for t in v)
            n_boxes += 1
    assert n_boxes == len(coco["annotations"])
    for link in os.listdir(ydir / "images"):
        assert Image.open(ydir / "images" / link).size == (128, 128)  # the links resolve to the scenes


def test_resume_with_other_settings_is_refused(scenes, tmp_path, capsys):
    files = sorted(i.path for i in list_inputs(scenes))[:2]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(files) + "\n")
    out = str(tmp_path / "o.jsonl")
    base = [str(lst), "--out", out, "--no-progress"]
    assert main(["label", *base, "-n", "8"]) == 0
    assert json.load(open(out + ".settings.json")) == {"model": "embedded", "prompts": ["caption en"],
                                                       "max_new_tokens": 8, "max_pixels": None}
    before = open(out, "rb").read()
    capsys.readouterr()  # the first run's summary
    for other in (["-n", "9"], ["-n", "8", "--prompt", "caption es"], ["-n", "8", "--max-pixels", "100000"]):
        assert main(["label", *base, *other]) == 2
        err = capsys.readouterr().err
        assert "was started with other settings" in err and err.count("\n") == 1  # one line
    assert open(out, "rb").read() == before  # nothing written by the refused runs
    assert main(["label", *base, "-n", "8", "--format", "coco"]) == 0  # the export format is no setting of the JSONL
