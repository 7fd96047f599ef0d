"""The multi-class detection task `detect A ; B` of the synthetic scenes (npvlm.demo.scenes), its scoring in
tools/eval_shapes.py and the fine-tuning set tools/make_shapes_jsonl.py writes. Fast: NumPy + Pillow only."""

import json

import numpy as np
import pytest

from npvlm.postprocess import iou, parse_detections
from npvlm.demo.scenes import (EVAL_SEED0, KINDS, NAMES, eval_seeds, make_scene, multi_detect_answer,
                               multi_detect_task, multi_detect_tasks, task_kind, tasks)
from tools import eval_shapes, make_shapes_jsonl

SEEDS = range(40)


def classes_of(prompt):
    assert prompt.startswith("detect ")
    return prompt[len("detect "):].split(" ; ")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_classes, named", [(2, False), (3, False), (2, True), (3, True)])
def test_multi_answer_parses_back_left_to_right_with_each_class(seed, n_classes, named):
    sc = make_scene(seed)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        prompt, answer = multi_detect_task(sc, rng, n_classes, named)
        classes = classes_of(prompt)
        assert len(set(classes)) == n_classes and set(classes) <= set(NAMES if named else KINDS)
        truth = [(s.name if named else s.kind, s) for s in sc.shapes if (s.name if named else s.kind) in classes]
        assert truth, prompt  # at least one asked class is in the scene
        dets = parse_detections(answer, sc.width, sc.height)
        assert [d.label for d in dets] == [c for c, _ in truth]
        for d, (_, s) in zip(dets, truth):  # one bin of 1023 is 128/1023 px: the box comes back within it
            assert np.allclose(d.box, s.box, atol=sc.width / 1023) and iou(d.box, s.box) > 0.95


def test_absent_classes_add_nothing_and_the_prompt_order_does_not_matter():
    sc = next(make_scene(s) for s in range(200) if [x.kind for x in make_scene(s).shapes] == ["square", "circle"])
    w, h = sc.width, sc.height
    both = multi_detect_answer(sc.shapes, ["circle", "triangle", "square"], w, h)
    assert both == multi_detect_answer(sc.shapes, ["square", "circle"], w, h)
    single = dict(tasks(sc))  # the square (left) then the circle, each boxed as its single-class answer
    assert both == single["detect square"] + " ; " + single["detect circle"]
    assert [d.label for d in parse_detections(both, w, h)] == ["square", "circle"]


def test_named_queries_mix_present_and_near_miss_classes():
    rng, absent, near = np.random.default_rng(0), 0, 0
    for seed in range(300):
        sc = make_scene(seed)
        present = {s.name for s in sc.shapes}
        for c in classes_of(multi_detect_task(sc, rng, 2, named=True)[0]):
            if c not in present:
                absent += 1
                near += any(w in c.split() for p in present for w in p.split())
    # about a third of the slots are absent classes, and most of those share a colour or kind with the scene
    assert 100 < absent < 300 and near > absent / 2, (absent, near)


def test_held_out_questions_fixed_by_seed_and_kinds():
    for seed in eval_seeds(20):
        a, b = multi_detect_tasks(make_scene(seed)), multi_detect_tasks(make_scene(seed))
        assert a == b and len(a) == 2
        assert set(classes_of(a[0][0])) <= set(KINDS) and set(classes_of(a[1][0])) <= set(NAMES)
        assert [task_kind(p) for p, _ in a] == ["detect_multi"] * 2
    assert task_kind("detect circle") == "detect" and task_kind("detect red circle") == "detect"


def test_eval_scores_labels_and_extra_boxes():
    sc = next(make_scene(s) for s in range(200) if {x.kind for x in make_scene(s).shapes} == {"circle", "square"})
    prompt = "detect circle ; square"
    truth = multi_detect_answer(sc.shapes, ["circle", "square"], sc.width, sc.height)
    r = eval_shapes.score(sc, prompt, truth, truth)
    n = len(sc.shapes)
    assert r == {"kind": "detect_multi", "ok": True, "hits": n, "n_true": n, "n_pred": n}
    swapped = truth.replace(" circle", " X").replace(" square", " circle").replace(" X", " square")
    assert eval_shapes.score(sc, prompt, truth, swapped)["hits"] == 0  # right boxes, wrong labels: nothing found
    extra = truth + " ; <loc0000><loc0000><loc0100><loc0100> triangle"
    assert eval_shapes.score(sc, prompt, truth, extra)["n_pred"] == n + 1  # an unasked label counts against precision
    assert eval_shapes.score(sc, prompt, truth, "garbage")["hits"] == 0


def test_jsonl_rows_images_and_seeds(tmp_path):
    assert make_shapes_jsonl.main(["--out", str(tmp_path), "--rows", "41", "--seed0", "700", "--multi-share", "0.5"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert len(rows) == 41 and all(set(r) == {"image", "prefix", "suffix"} for r in rows)
    seeds = sorted({int(r["image"].split("/")[-1][:-4]) for r in rows})
    assert seeds == list(range(700, 721))  # two rows per scene, the last scene one
    for r in rows:
        assert (tmp_path / r["image"]).is_file()
        sc = make_scene(int(r["image"].split("/")[-1][:-4]))
        if task_kind(r["prefix"]) == "detect_multi":
            classes = classes_of(r["prefix"])
            assert r["suffix"] == multi_detect_answer(sc.shapes, classes, sc.width, sc.height)
        else:
            assert (r["prefix"], r["suffix"]) in tasks(sc)  # a replayed known task, answered as ever
    assert 8 <= sum(task_kind(r["prefix"]) == "detect_multi" for r in rows) <= 33  # half of 41, loosely
    with pytest.raises(SystemExit):  # training scenes may not reach the held-out seeds
        make_shapes_jsonl.main(["--out", str(tmp_path), "--rows", "10", "--seed0", str(EVAL_SEED0 - 2)])


def test_jsonl_shares_of_names_three_classes_and_captions(tmp_path):
    """--named-share / --three-share shape the `detect A ; B` rows, --caption-share the replay (binomial bounds at
    400 rows, loose: > 4 standard deviations)."""
    assert make_shapes_jsonl.main(["--out", str(tmp_path), "--rows", "400", "--seed0", "800", "--multi-share", "0.5",
                                   "--named-share", "1", "--three-share", "0", "--caption-share", "0.6"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    multi = [r for r in rows if task_kind(r["prefix"]) == "detect_multi"]
    replay = [r for r in rows if task_kind(r["prefix"]) != "detect_multi"]
    assert all(len(classes_of(r["prefix"])) == 2 for r in multi)  # --three-share 0: always two classes
    assert all(all(" " in c for c in classes_of(r["prefix"])) for r in multi)  # --named-share 1: "colour kind"
    captions = sum(task_kind(r["prefix"]) == "caption" for r in replay)
    assert 0.45 * len(replay) <= captions <= 0.75 * len(replay)  # --caption-share 0.6 of the replay
    assert make_shapes_jsonl.replay_mix(0.4)["caption"] == pytest.approx(0.18 / 0.5 * 0.6)  # train_shapes' ratio
    with pytest.raises(ValueError):
        make_shapes_jsonl.replay_mix(0.5, 0.6)


def test_bf16_weights_round_as_torch_does(tmp_path):
    import torch
    from safetensors.torch import load_file

    from tools.bf16_weights import to_bf16_bits, write_bf16

    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 1e-40, 3.4e38, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8]  # subnormal, overflow, both ties
    x = np.concatenate([(rng.standard_normal(50_000) * 3).astype(np.float32), np.array(specials, np.float32)])
    torch_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bf16_bits(x), torch_bits)  # bit for bit: round to nearest, ties to even
    write_bf16({"w": x[:-8].reshape(-1, 4), "b": x[-8:]}, str(tmp_path / "m.safetensors"), {"format": "pt"})
    back = load_file(str(tmp_path / "m.safetensors"))  # safetensors' own reader takes the file
    assert back["w"].dtype == torch.bfloat16 and back["w"].shape == (12_500, 4)
    assert torch.equal(back["b"], torch.from_numpy(x[-8:]).to(torch.bfloat16))


def test_interpolate_weights_blends_bf16_and_f32_folders(tmp_path):
    """tools/interpolate_weights.py (WiSE-FT / model soups): alpha 0 gives the base exactly, alpha 1 the tuned
    model, 0.25 the float32 blend (exact to float32 rounding, rtol 1e-6); the BF16 base is widened bit-exactly;
    a mismatch is refused before any folder appears."""
    from safetensors.numpy import load_file, save_file

    from tools import interpolate_weights
    from tools.bf16_weights import write_bf16

    rng = np.random.default_rng(1)
    base = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    base_bf16 = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in base.items()}  # exact in bf16
    tuned = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    (tmp_path / "base").mkdir()
    (tmp_path / "tuned").mkdir()
    write_bf16(base_bf16, str(tmp_path / "base" / "model.safetensors"), {"format": "pt"})
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "tuned" / "config.json").write_text('{"model_type": "paligemma"}')
    for alpha, want in ((0.0, base_bf16), (1.0, tuned),
                        (0.25, {k: 0.75 * base_bf16[k] + 0.25 * tuned[k] for k in base})):
        out = tmp_path / f"out{alpha}"
        assert interpolate_weights.main(["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                                          "--alpha", str(alpha), "--out", str(out)]) == 0
        got = load_file(str(out / "model.safetensors"))
        assert (out / "config.json").read_text() == '{"model_type": "paligemma"}'  # the tuned folder's files copied
        for k in base:
            assert got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    save_file({"a": tuned["a"]}, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="different tensors"):
        interpolate_weights.main(["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                                  "--alpha", "0.5", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".blend-*"))


def test_eval_val_split_is_disjoint_from_training_and_held_out_seeds():
    """--split val picks models without looking at the held-out scenes: its seeds sit above every training seed
    (make_shapes_jsonl's and train_shapes', below 900000) and train_shapes' validation scenes (900000 + a few
    thousand), and below the held-out ones (EVAL_SEED0)."""
    from tools.train_shapes import TRAIN_SEED_LIMIT, VAL_SEED0

    assert TRAIN_SEED_LIMIT <= VAL_SEED0 and VAL_SEED0 + 10_000 < eval_shapes.VAL_SEED0
    assert eval_shapes.VAL_SEED0 + 10_000 < EVAL_SEED0
