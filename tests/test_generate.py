"""Generation against HF transformers' `generate`, and the sampler's own properties.

Greedy decoding must give exactly HF's token ids (issue #4) on random checkpoints; the tests
check the top-2 logit margin along HF's path so that a match is not luck on near-ties.
"""

from __future__ import annotations

import numpy as np
import pytest

import npvlm
from namespaces import each_backend
from hf_ref import hf_generate, image, write
from npvlm.generation.generate import GenerationResult
from npvlm.generation.sampling import sample

SHAPE = dict(hidden=20, heads=4, kv_heads=2, head_dim=12, layers=3, image_size=32, patch_size=8)
PROMPTS = ["caption en", "answer en how many shapes?", "detect red circle ; blue square", "ocr"]
MIN_MARGIN = 1e-3  # a top-2 gap this wide is far above the ~1e-5 float32 noise between the two sides


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write(tmp_path_factory.mktemp("gen"), seed=11, **SHAPE)


@each_backend
def test_greedy_32_tokens_equal_hf_one_at_a_time(ckpt, backend):
    model = npvlm.load(ckpt, backend=backend)
    for i, prompt in enumerate(PROMPTS[:2] if backend != "numpy" else PROMPTS):
        ref, margin = hf_generate(ckpt, [image(i)], [prompt], max_new_tokens=32)
        assert margin > MIN_MARGIN, f"weights give a near-tie ({margin:.1e}): pick another seed"
        out = model.generate(image(i), prompt, max_new_tokens=32)
        assert out.token_ids == ref[0], prompt


@each_backend
def test_greedy_batch_with_left_padding_equals_hf_and_single_runs(ckpt, backend):
    model = npvlm.load(ckpt, backend=backend)
    imgs = [image(i) for i in range(len(PROMPTS))]
    ref, margin = hf_generate(ckpt, imgs, PROMPTS, max_new_tokens=32)
    assert margin > MIN_MARGIN
    outs = model.generate(imgs, PROMPTS, max_new_tokens=32)
    assert [o.token_ids for o in outs] == ref
    singles = [model.generate(im, p, max_new_tokens=32).token_ids for im, p in zip(imgs[:2], PROMPTS[:2])]
    assert singles == ref[:2]


def test_stream_yields_the_text_piece_by_piece(ckpt):
    model = npvlm.load(ckpt)
    items = list(model.stream(image(0), "caption en", max_new_tokens=12))
    *pieces, result = items
    assert isinstance(result, GenerationResult) and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == result.text == model.generate(image(0), "caption en", max_new_tokens=12).text
    assert result.stats["new_tokens"] == len(result.token_ids)  # the answer's tokens, as returned
    assert result.stats["steps"] == len(result.token_ids) + (result.finish_reason == "eos")  # + the stop step


def test_stats_report_the_phases(ckpt):
    model = npvlm.load(ckpt)
    out = model.generate(image(0), "caption en", max_new_tokens=8)
    st = out.stats
    prompt_len = 16 + 1 + len(model.tokenizer.encode("caption en\n"))  # image tokens + <bos> + prompt + "\n"
    assert st["prompt_tokens"] == prompt_len and st["batch"] == 1
    assert st["new_tokens"] == len(out.token_ids) + (out.finish_reason == "eos")  # the eos is generated, not shown
    assert 1 <= st["new_tokens"] <= 8
    for k in ("image_seconds", "prefill_seconds", "decode_seconds", "load_seconds"):
        assert st[k] > 0, k  # each phase ran and took measurable time (perf_counter resolves < 1 us)
    # Rates are the counts over the seconds (rel 1e-12: the same float division, recomputed here).
    # The first new token comes out of the prefill; the decode steps make the other new_tokens - 1.
    assert st["prefill_tokens_per_second"] == pytest.approx(prompt_len / st["prefill_seconds"], rel=1e-12)
    assert st["decode_tokens_per_second"] == pytest.approx((st["new_tokens"] - 1) / st["decode_seconds"], rel=1e-12)
    assert st["peak_rss_bytes"] > 10 * 2**20  # a Python with numpy loaded holds more than 10 MiB
    assert st["kv_cache_bytes"] > 0 and st["backend"] == "numpy"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(ckpt):
    model = npvlm.load(ckpt)
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95)
    a = model.generate(image(1), "caption en", seed=3, **kw).token_ids
    assert a == model.generate(image(1), "caption en", seed=3, **kw).token_ids
    assert a != model.generate(image(1), "caption en", seed=4, **kw).token_ids  # 16 draws at T=1.5 differ
    greedy = model.generate(image(1), "caption en", max_new_tokens=16).token_ids
    assert model.generate(image(1), "caption en", temperature=2.0, top_k=1, seed=5, max_new_tokens=16).token_ids == greedy
    assert model.generate(image(1), "caption en", temperature=2.0, top_p=1e-6, seed=5, max_new_tokens=16).token_ids == greedy


@each_backend
def test_sampler_follows_softmax_and_respects_top_k_and_top_p(backend):
    import random

    from npvlm.backends import get_backend

    be = get_backend(backend)
    rng = random.Random(0)
    probs = [0.15, 0.5, 0.05, 0.3]  # the most likely token is not the first: sorting matters
    logits = be.asarray(np.log(np.array([probs] * 4000, dtype=np.float32)))

    def draws(temperature, top_k, top_p):
        ids = sample(logits, temperature, top_k, top_p, [rng.random() for _ in range(4000)])
        return be.to_host(ids)

    freq = np.bincount(draws(1.0, 0, 1.0), minlength=4) / 4000
    assert np.abs(freq - probs).max() < 0.03  # ~4 standard errors at n=4000
    assert set(draws(1.0, 2, 1.0)) == {1, 3}  # top-k=2: the two most likely
    assert set(draws(1.0, 0, 0.7)) == {1, 3}  # 0.5 + 0.3 reaches 0.7
    assert set(draws(1.0, 0, 0.4)) == {1}  # the first token alone (0.5) reaches 0.4
    assert set(draws(0.0, 0, 1.0)) == {1}  # temperature 0 = greedy
    # top-p's cut at the boundary, on exact numbers: 4 equal logits give p = 0.25 each and cumulative
    # masses 0.25, 0.5, 0.75 with no rounding (float64), so "the smallest set whose mass reaches top_p"
    # is decided by the comparison alone: a mass equal to top_p stops the set, one just under does not.
    flat = be.asarray(np.zeros((400, 4), dtype=np.float32))
    for top_p, kept in ((0.25, 1), (0.5, 2), (0.5 + 1e-9, 3), (0.75 - 1e-9, 3), (0.75, 3), (0.75 + 1e-9, 4)):
        ids = be.to_host(sample(flat, 1.0, 0, top_p, [rng.random() for _ in range(400)]))
        assert set(ids.tolist()) == set(range(kept)), (top_p, sorted(set(ids.tolist())))  # ties keep id order
    hot = np.bincount(draws(100.0, 0, 1.0), minlength=4) / 4000
    assert np.abs(hot - 0.25).max() < 0.03  # a high temperature flattens the distribution


def test_decode_steps_have_fixed_shapes(ckpt, monkeypatch):
    """Structural, not timed: one prefill over the whole prompt, then every decode step runs one new token per
    row against the cache at full capacity, with arrays (ids, positions, mask) of the same shapes each step:
    what lets a CUDA graph capture a step, and keeps decode cost flat in position."""
    from npvlm.models import paligemma

    seen, real = [], paligemma.forward

    def spy(params, ids, positions, masks, **kw):
        seen.append((tuple(ids.shape), tuple(positions.shape), tuple(masks["full"].shape), type(kw.get("at"))))
        return real(params, ids, positions, masks, **kw)

    monkeypatch.setattr(paligemma, "forward", spy)
    out = npvlm.load(ckpt).generate(image(0), "caption en", max_new_tokens=10)
    prefill, steps = seen[0], seen[1:]
    T = prefill[0][1]
    assert T > 1 and prefill[3] is int
    assert len(steps) == len(out.token_ids) + (out.finish_reason == "eos") - 1 and steps
    assert all(s == ((1, 1), (1, 1), (1, 1, 1, T + 10), steps[0][3]) for s in steps), steps
    assert steps[0][3] is not int  # the write column is a device array, not a host int baked into the step


@pytest.mark.parametrize("shape,seed", [(SHAPE, 11), (dict(model_type="gemma2", hidden=32, heads=4, kv_heads=2, head_dim=8,
                                                         layers=3, query_pre_attn_scalar=8, sliding_window=4), 23)],
                         ids=["gemma", "gemma2-sliding"])
def test_prefill_logits_equal_hf_last_position_on_a_padded_batch(tmp_path, shape, seed):
    """prefill runs the last layer for the last position only: its next-token logits must still be HF's
    logits at the last position of each row (left padding: PROMPTS differ in length), and the full pass's."""
    import torch

    from hf_ref import hf_inputs, hf_model
    from npvlm.kv_cache import KVCache
    from npvlm.models.paligemma import forward, prefill, prefix_lm_masks
    from npvlm.models.paligemma_inputs import load_images, prepare_prompts

    ckpt = write(tmp_path, seed=seed, **shape)
    model = npvlm.load(ckpt)
    imgs = [image(i) for i in range(len(PROMPTS))]
    batch = prepare_prompts(model.tokenizer, model.config, model.backend, PROMPTS)
    feats = model.encode_images(load_images(imgs))
    t = model.config.text
    cache = KVCache(model.params["language_model"]["model"]["norm"]["weight"], t.num_hidden_layers, len(PROMPTS),
                    t.num_key_value_heads, batch.ids.shape[1] + 1, t.head_dim)
    ours, _ = prefill(model.params, batch, feats, cache, cfg=model.config)  # [B, V]
    masks = prefix_lm_masks(batch.valid, batch.prefix, 0, cfg=model.config)
    full = forward(model.params, batch.ids, batch.positions, masks, cfg=model.config, image_slot=batch.image_slot,
                   feats=feats)[:, -1, :]
    with torch.no_grad():
        hf = hf_model(ckpt)(**hf_inputs(ckpt, imgs, PROMPTS)).logits[:, -1, :].float().numpy()
    assert np.abs(ours - hf).max() <= 1e-4 * max(1.0, np.abs(hf).max())  # float32, the exactness bar
    assert np.abs(ours - full).max() <= 1e-5 * max(1.0, np.abs(full).max())  # the same sums, other row counts
