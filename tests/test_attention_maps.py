"""Attention maps (`generate(..., return_attention=True)`): equal to HF's attentions, and they look where the answer is.

1. On random checkpoints (Gemma 1, and Gemma 2 with soft-cap and a sliding window), each map equals the
   attention probabilities HF's `generate(output_attentions=True)` reports for the step that chose the token:
   the last query's row, mean over heads, the image columns, per layer.
2. On the embedded shapes model and held-out scenes, the maps of the tokens of `detect circle` peak on a
   patch that overlaps the circle's box more often than a uniformly random patch would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import npvlm
from hf_ref import hf_inputs, hf_model, image, write
from namespaces import each_backend
from npvlm.demo.scenes import eval_seeds, make_scene

SHAPES = {
    "gemma": dict(hidden=20, heads=4, kv_heads=2, head_dim=12, layers=3, image_size=32, patch_size=8),
    "gemma2": dict(model_type="gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden=24, heads=4,
                   kv_heads=2, head_dim=8, layers=4, query_pre_attn_scalar=8, sliding_window=8, image_size=32,
                   patch_size=8),
}
PROMPTS = ["caption en", "answer en how many shapes are there?"]  # different lengths: the batch is left-padded
TOL = 1e-5  # probabilities in [0, 1] from float32 on both sides; the differences seen are ~1e-7


@pytest.fixture(scope="module", params=sorted(SHAPES))
def ckpt(request, tmp_path_factory):
    return write(tmp_path_factory.mktemp(request.param), seed=11, **SHAPES[request.param])


def hf_maps(model_dir, images, prompts, max_new_tokens):
    """HF greedy generate with output_attentions: per row, (token ids, maps [steps, L, N]) of every step."""
    import torch

    model = hf_model(model_dir)
    inputs = hf_inputs(model_dir, images, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True, pad_token_id=0)
    T = inputs["input_ids"].shape[1]
    image_cols = inputs["input_ids"] == model.config.image_token_index  # [B, T]
    rows = []
    for b in range(len(prompts)):
        cols = np.flatnonzero(image_cols[b].numpy())
        steps = [np.stack([_image_weights(a[b, :, -1, :].float().numpy().mean(axis=0), cols, T + i) for a in layers])
                 for i, layers in enumerate(out.attentions)]  # [L, N] per step
        rows.append((out.sequences[b, T:].tolist(), np.stack(steps)))
    return rows


def _image_weights(row, cols, keys):  # [S] over the last S of `keys` columns (a sliding layer keeps only its window)
    offset = keys - row.shape[0]
    return np.array([row[c - offset] if c >= offset else 0.0 for c in cols], np.float32)


@each_backend
def test_maps_equal_hf_output_attentions(ckpt, backend):
    model = npvlm.load(ckpt, backend=backend)
    imgs = [image(i) for i in range(len(PROMPTS))]
    ref = hf_maps(ckpt, imgs, PROMPTS, max_new_tokens=12)
    side = model.config.vision.image_size // model.config.vision.patch_size
    L = model.config.text.num_hidden_layers
    for outs in (model.generate(imgs, PROMPTS, max_new_tokens=12, return_attention=True),  # left-padded batch
                 [model.generate(im, p, max_new_tokens=12, return_attention=True) for im, p in zip(imgs, PROMPTS)]):
        for out, (ids, want) in zip(outs, ref):
            n = len(out.token_ids)
            assert out.token_ids == ids[:n] and n > 0
            assert out.attention.shape == (n, L, side, side) and out.attention.dtype == np.float32
            got = out.attention.reshape(n, L, side * side)
            err = float(np.max(np.abs(got - want[:n])))
            assert err <= TOL, err


def test_plain_generate_has_no_maps_and_the_same_answer(ckpt):
    model = npvlm.load(ckpt)
    plain = model.generate(image(0), PROMPTS[0], max_new_tokens=12)
    with_maps = model.generate(image(0), PROMPTS[0], max_new_tokens=12, return_attention=True)
    assert plain.attention is None and plain.token_ids == with_maps.token_ids
    with pytest.raises(ValueError, match="return_attention"):
        plain.attention_maps()
    streamed = list(model.stream(image(0), PROMPTS[0], max_new_tokens=12, return_attention=True))[-1]
    np.testing.assert_array_equal(streamed.attention, with_maps.attention)  # the same computation, bit for bit
    mean, last = with_maps.attention_maps(), with_maps.attention_maps(-1)
    np.testing.assert_allclose(mean, with_maps.attention.mean(axis=1), rtol=0, atol=0)
    np.testing.assert_array_equal(last, with_maps.attention[:, -1])


def test_the_forward_pass_does_not_compute_probabilities_unless_asked(ckpt, monkeypatch):
    import npvlm.models.gemma as gemma

    calls = []
    real = gemma.attention_probs
    monkeypatch.setattr(gemma, "attention_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = npvlm.load(ckpt)
    model.generate(image(0), PROMPTS[0], max_new_tokens=4)
    assert calls == []
    model.generate(image(0), PROMPTS[0], max_new_tokens=4, return_attention=True)
    assert len(calls) >= model.config.text.num_hidden_layers  # one per layer and step


# --- the embedded model: does the map look at the circle? -------------------------------------------

def circle_peaks(n_scenes: int, layer=None):
    """Over held-out scenes with one circle: (the share of `detect circle` tokens whose map peaks on a patch
    overlapping the circle's box, the chance share for a uniform random patch, the mean box area fraction)."""
    model = npvlm.load()
    side = model.config.vision.image_size // model.config.vision.patch_size
    hits = chance = area = 0.0
    tokens = 0
    for seed in eval_seeds(n_scenes):
        scene = make_scene(seed)
        circles = [s for s in scene.shapes if s.kind == "circle"]
        if len(circles) != 1:
            continue
        x0, y0, x1, y1 = (c / scene.width * side for c in circles[0].box)  # the box in patch units
        cells = np.zeros((side, side), bool)  # patches (row, col) that overlap the box
        cells[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
        res = model.generate(scene.image, "detect circle", max_new_tokens=8, return_attention=True)
        for m in res.attention_maps(layer):
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            hits += bool(cells[r, c])
            chance += cells.mean()
            area += (x1 - x0) * (y1 - y0) / side**2
            tokens += 1
    return hits / tokens, chance / tokens, area / tokens, tokens


def test_detect_circle_maps_peak_on_the_circle_more_often_than_chance():
    hit, chance, area, tokens = circle_peaks(60)
    assert tokens >= 60  # 24 of the 60 scenes hold one circle, 5 tokens each (4 locations + "circle"): 120
    # measured: 0.74 of the tokens vs a chance of 0.21 (box area fraction 0.056); over 200 scenes 0.73 vs 0.21.
    # A margin of 0.15 over chance on 120 tokens is > 4 binomial sd (~0.037) for a map unrelated to the image
    assert hit > chance + 0.15, (hit, chance, area)


def test_cli_writes_one_heat_map_per_token(tmp_path, capsys):
    from PIL import Image

    from npvlm.apps.cli import main

    scene = make_scene(eval_seeds()[0])  # a scene with a circle: `detect circle` answers 4 locations + "circle"
    scene.image.save(tmp_path / "scene.png")
    out = tmp_path / "maps.png"
    assert main(["generate", "-i", str(tmp_path / "scene.png"), "-p", "detect circle", "--json",
                 "--attention-map", str(out)]) == 0
    tokens = len(json.loads(capsys.readouterr().out)["token_ids"])
    strip = Image.open(out)
    assert tokens == 5 and strip.size == (5 * 128, 128 + 18)  # one 128-px tile per token, a label row below
    tiles = np.asarray(strip.convert("RGB"), np.float32)[:128]
    assert np.std(tiles[:, :128] - tiles[:, 128:256]) > 1.0  # the tiles differ: each token has its own map
    assert main(["generate", "-i", str(tmp_path / "scene.png"), "-p", "detect circle", "--attention-map", str(out),
                 "--attention-layer", "9"]) != 0  # the shapes model has 4 layers: refused with a message
    assert "--attention-layer 9" in capsys.readouterr().err


# --- the server: {"npvlm": {"attention": true}} adds the maps to the answer ----------------------------

def _serve():
    pytest.importorskip("starlette", reason="npvlm serve needs the serve extra (starlette, uvicorn)")
    pytest.importorskip("uvicorn", reason="npvlm serve needs the serve extra (starlette, uvicorn)")
    pytest.importorskip("httpx", reason="the tests call the server with httpx")
    pytest.importorskip("openai", reason="the tests call the server with the official openai client")
    import test_serve

    return test_serve


def test_server_returns_the_maps_only_when_asked_and_they_equal_generate():
    ts = _serve()
    model = npvlm.load()
    server = ts._Server(model, max_batch=4)
    try:
        for seed, prompt in ((eval_seeds()[0], "detect circle"), (eval_seeds()[1], "caption en")):
            want = model.generate(make_scene(seed).image, prompt, max_new_tokens=12, return_attention=True)
            plain = ts._post(server, ts._body(seed, prompt, 12), key=None).json()
            assert "npvlm" not in plain and plain["choices"][0]["message"]["content"] == want.text
            r = ts._post(server, ts._body(seed, prompt, 12, npvlm={"attention": True}), key=None).json()
            a = r["npvlm"]["attention"]
            n = len(want.token_ids)
            assert a["grid"] == [4, 4] and a["layers"] == 4 and len(a["tokens"]) == n
            assert "".join(a["tokens"]) == want.text  # one label per token, in order
            got = np.asarray(a["maps"], np.float32).reshape(want.attention.shape)
            # 6 decimals in the JSON; a running batch of 4 rows and wider cache sums in another order (~1e-7)
            np.testing.assert_allclose(got, want.attention, rtol=0, atol=2e-6)
            with ts.httpx.stream("POST", server.url + "/v1/chat/completions", timeout=ts.TIMEOUT,
                                 json=ts._body(seed, prompt, 12, stream=True, npvlm={"attention": True})) as s:
                chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
            last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][0]
            np.testing.assert_array_equal(np.asarray(last["npvlm"]["attention"]["maps"], np.float32),
                                          np.asarray(a["maps"], np.float32))  # the same maps on the finish chunk
        c = ts.openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=ts.TIMEOUT, max_retries=0)
        body = ts._body(eval_seeds()[0], "detect circle", 12)
        r = c.chat.completions.create(model="npvlm", messages=body["messages"], max_tokens=12,
                                      extra_body={"npvlm": {"attention": True}})  # how an OpenAI client asks
        assert len(r.model_extra["npvlm"]["attention"]["maps"]) == len(r.model_extra["npvlm"]["attention"]["tokens"]) > 0
        bad = ts._post(server, ts._body(1, "caption en", 3, npvlm={"attention": "yes"}), key=None)
        assert bad.status_code == 400 and "npvlm" in bad.json()["error"]["message"]
    finally:
        server.close()
