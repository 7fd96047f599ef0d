"""SigLIP two-tower model against HF transformers' SiglipModel / SiglipTokenizer (transformers 5.24).

Random checkpoints are written by transformers itself (save_pretrained), with a unigram spiece.model
(<pad>=0 </s>=1 <unk>=2, no bos; TESTING-NOTES.md), in three tower shapes: odd widths and head
counts, 1-3 layers, different patch / image sizes, text width != vision width, with and without a
text projection_size.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from npvlm.errors import ConfigError
from tests.namespaces import each_namespace

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

WORDS = ("a photo of the cat dog red green blue square circle triangle two three on left right big small picture "
         "drawing cats dogs über café naïve tokyo east west north south one four five six seven eight nine ten "
         "apple banana orange car bus train plane boat house tree flower sky sea sun moon star").split()

SHAPES = {
    # vision (D, heads, F, layers, image, patch), text (D, heads, F, layers, positions, projection_size)
    "odd": (dict(hidden_size=36, num_attention_heads=3, intermediate_size=50, num_hidden_layers=2, image_size=28, patch_size=7),
            dict(hidden_size=20, num_attention_heads=4, intermediate_size=44, num_hidden_layers=3, max_position_embeddings=12,
                 projection_size=36)),
    "one-layer": (dict(hidden_size=30, num_attention_heads=5, intermediate_size=22, num_hidden_layers=1, image_size=30, patch_size=10),
                  dict(hidden_size=30, num_attention_heads=2, intermediate_size=18, num_hidden_layers=1, max_position_embeddings=9)),
    "wide-text": (dict(hidden_size=24, num_attention_heads=2, intermediate_size=40, num_hidden_layers=3, image_size=32, patch_size=8),
                  dict(hidden_size=40, num_attention_heads=5, intermediate_size=36, num_hidden_layers=2, max_position_embeddings=16,
                       projection_size=24)),
}
VOCAB = 200

TEXTS = ["a photo of a cat.", "A Photo Of A DOG!!", "  spaces   and\ttabs\n", "", "über café naïve", "東京 日本",
         "x" * 40, "a, b; c: d", "cat</s>dog", "hello <unk> world", "<pad>", "\u2581under\u2581score", "it's (big) [red] {x}",
         "a photo of " * 10, "emoji 🐱 cat", "--", "the cat </s>", "RED Square, BLUE circle.", "two   dogs\u00a0on the left",
         "Ünïcödé CAFÉ", "sky/sea\\sun", "one-two_three", "3 cats & 4 dogs", "\"quoted\" 'single'", "tree?", "MOON!!!",
         "a\nb\nc", "ten nine eight seven six five four three two one zero", "train bus plane boat car house",
         "ÀÉÎÕÜ àéîõü", "a photo of a {}.", "#hashtag @user", "   ", "the end</s>"]


def _train_spiece(folder):
    lines = [" ".join(WORDS[(i * 7 + j * 3 + i // 5) % len(WORDS)] for j in range(3 + i % 5)) for i in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "spiece"),
                                   model_type="unigram", vocab_size=150, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, root: str) -> str:
    """A random HF SiglipModel folder (weights spread so embeddings differ visibly) + spiece.model."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    folder = os.path.join(root, name)
    vc, tc = SHAPES[name]
    torch.manual_seed(len(name))
    model = SiglipModel(SiglipConfig(vision_config=vc, text_config=dict(tc, vocab_size=VOCAB, pad_token_id=1,
                                                                         bos_token_id=None, eos_token_id=1))).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("logit_scale"):
                p.fill_(1.5)
            elif n.endswith("logit_bias"):
                p.fill_(-0.7)
            elif "norm" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25 / max(1.0, (p.shape[-1] / 32) ** 0.5) if p.ndim > 1 else 0.1)
    model.save_pretrained(folder)
    _train_spiece(folder)
    T = tc["max_position_embeddings"]
    SiglipTokenizer(vocab_file=os.path.join(folder, "spiece.model"), model_max_length=T).save_pretrained(folder)
    SiglipImageProcessor(size={"height": vc["image_size"], "width": vc["image_size"]}).save_pretrained(folder)
    return folder


def image(seed: int, w: int = 41, h: int = 33) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_outputs(folder, images, texts):
    from transformers import SiglipImageProcessor, SiglipModel, SiglipTokenizer

    model = SiglipModel.from_pretrained(folder, dtype=torch.float32).eval()
    tok = SiglipTokenizer.from_pretrained(folder)
    ids = tok(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    px = SiglipImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("siglip"))


LABELS = ["red square", "Blue circle!", "a cat", "two dogs on the left", "über café"]


@each_namespace
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_embeddings_and_logits_match_hf(ns, name, root):
    import npvlm

    folder = checkpoint(name, root)
    model = npvlm.load(folder, backend=ns.backend)
    assert type(model).__name__ == "SiglipModel"
    imgs = [image(1), image(2, 64, 20), image(3, 17, 50)]
    img_hf, txt_hf, logits_hf = hf_outputs(folder, imgs, LABELS)
    img, txt = model.embed_images(imgs), model.embed_texts(LABELS)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    # float32 towers of <= 3 layers: differences are summation-order rounding, far below 1e-4
    np.testing.assert_allclose(img, img_hf, atol=1e-4, rtol=0)
    np.testing.assert_allclose(txt, txt_hf, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-5)  # unit vectors
    logits = model.logits(imgs, LABELS)
    np.testing.assert_allclose(logits, logits_hf, atol=1e-4, rtol=0)  # logits: exp(1.5) * cos + b, cos to 1e-5
    assert np.ptp(logits_hf) > 0.5  # the weights are spread enough that a wrong tower would show
    probs = model.classify(imgs[0], LABELS)
    sig = 1.0 / (1.0 + np.exp(-logits_hf[0].astype(np.float64)))
    np.testing.assert_allclose(list(probs.values()), sig, atol=1e-5, rtol=0)  # sigmoid damps logit error by <= 1/4
    soft = model.classify(imgs[0], LABELS, softmax=True)
    e = np.exp(logits_hf[0] - logits_hf[0].max())
    np.testing.assert_allclose(list(soft.values()), e / e.sum(), atol=1e-5, rtol=0)


def test_tokenizer_matches_hf(root):
    from transformers import SiglipTokenizer as HFTok

    from npvlm.io.siglip_tokenizer import SiglipTokenizer

    folder = checkpoint("wide-text", root)
    for L in (16, 5):  # the folder's model_max_length, and a short one that truncates most texts
        hf = HFTok.from_pretrained(folder, model_max_length=L)
        ours = SiglipTokenizer.from_dir(folder, max_length=L)
        ids, mask = ours(TEXTS)
        for t, i, m in zip(TEXTS, ids, mask):
            ref = hf([t], padding="max_length", truncation=True)
            assert (i, m) == (ref["input_ids"][0], ref["attention_mask"][0]), t
    assert len(TEXTS) >= 30


def test_lower_case_off_is_honoured(root):
    from transformers import SiglipTokenizer as HFTok

    from npvlm.io.siglip_tokenizer import SiglipTokenizer

    spiece = os.path.join(checkpoint("odd", root), "spiece.model")
    hf = HFTok(vocab_file=spiece, model_max_length=12, do_lower_case=False)
    ours = SiglipTokenizer(spm.SentencePieceProcessor(model_file=spiece), spiece, max_length=12, do_lower_case=False)
    for t in ("Cat DOG", "a Photo."):
        assert ours([t])[0][0] == hf([t], padding="max_length", truncation=True)["input_ids"][0]


def test_wrong_model_type_is_refused_in_one_line(root):
    from npvlm.api import EMBEDDED_MODEL, load
    from npvlm.siglip_api import load as load_siglip

    folder = checkpoint("odd", root)
    with pytest.raises(ConfigError) as e:
        load(folder, want="paligemma")
    msg = str(e.value)
    assert "'siglip'" in msg and "'paligemma'" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        load(EMBEDDED_MODEL, want="siglip")
    assert "'siglip'" in str(e.value) and "'paligemma'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_siglip(EMBEDDED_MODEL)
    assert "'paligemma'" in str(e.value) and "'siglip'" in str(e.value)


def test_missing_head_weight_is_named(root, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from npvlm.errors import CheckpointError
    from npvlm.siglip_api import load as load_siglip

    src = checkpoint("one-layer", root)
    dst = str(tmp_path / "m")
    shutil.copytree(src, dst)
    w = load_file(os.path.join(dst, "model.safetensors"))
    del w["vision_model.head.probe"]
    save_file(w, os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision_model.head.probe"):
        load_siglip(dst)


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "npvlm", *argv], capture_output=True, text=True, env=env, timeout=300)


def test_cli_classify_and_embed_match_hf(root, tmp_path):
    folder = checkpoint("odd", root)
    paths = []
    for k in range(2):
        paths.append(str(tmp_path / f"im{k}.png"))
        image(10 + k).save(paths[-1])
    labels = ["cat", "Red square", "two dogs"]
    r = _cli("classify", "--model", folder, "--image", *paths, "--labels", *labels, "--template", "a photo of {}.", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    imgs = [PIL.Image.open(p).convert("RGB") for p in paths]
    _, _, logits_hf = hf_outputs(folder, imgs, [f"a photo of {lab}." for lab in labels])
    sig = 1.0 / (1.0 + np.exp(-logits_hf.astype(np.float64)))
    for k, item in enumerate(got):
        assert item["image"] == paths[k]
        np.testing.assert_allclose([item["probabilities"][lab] for lab in labels], sig[k], atol=1e-5, rtol=0)  # as above
    r = _cli("classify", "--model", folder, "--image", paths[0], "--labels", *labels)
    assert r.returncode == 0 and all(lab in r.stdout for lab in labels), r.stderr
    out = str(tmp_path / "t.npy")
    r = _cli("embed", "--model", folder, "--text", *labels, "--out", out)
    assert r.returncode == 0, r.stderr
    _, txt_hf, _ = hf_outputs(folder, imgs, labels)
    np.testing.assert_allclose(np.load(out), txt_hf, atol=1e-4, rtol=0)  # float32 tower, as above


def test_cli_refuses_the_other_model_kind(root, tmp_path):
    from npvlm.api import EMBEDDED_MODEL

    png = str(tmp_path / "x.png")
    image(0).save(png)
    r = _cli("classify", "--model", EMBEDDED_MODEL, "--image", png, "--labels", "a")
    assert r.returncode == 2 and "'paligemma'" in r.stderr and "'siglip'" in r.stderr, r.stderr
    r = _cli("generate", "--model", checkpoint("odd", root), "--image", png)
    assert r.returncode == 2 and "'paligemma'" in r.stderr and "'siglip'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@each_namespace
def test_mask_padding_matches_hf_given_the_attention_mask(ns, root):
    """transformers 5's tokenizer returns an attention_mask and its zero-shot pipeline passes it on: the pads are
    then hidden. mask_padding=True reproduces that; the default (pads attended, as trained) is tested above."""
    from transformers import SiglipModel, SiglipTokenizer

    from npvlm.siglip_api import load as load_siglip

    folder = checkpoint("wide-text", root)
    hf = SiglipModel.from_pretrained(folder, dtype=torch.float32).eval()
    t = SiglipTokenizer.from_pretrained(folder)(LABELS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.get_text_features(**t)
    ref = getattr(ref, "pooler_output", ref)  # transformers 5 returns a model output here
    ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
    got = load_siglip(folder, backend=ns.backend, mask_padding=True).embed_texts(LABELS)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # float32 tower, as above
    unmasked = load_siglip(folder, backend=ns.backend).embed_texts(LABELS)
    assert np.abs(unmasked - ref).max() > 1e-2  # the mask matters: the test would see it ignored


def test_embedded_scenes_model_matches_hf_and_classifies_held_out_scenes():
    from npvlm.demo.scenes import COLOURS, EVAL_SEED0, KINDS, make_scene
    from npvlm.siglip_api import EMBEDDED_SIGLIP, load as load_siglip

    model = load_siglip()
    assert model.model_dir == EMBEDDED_SIGLIP
    S = model.config.vision.image_size
    labels = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c in COLOURS for k in KINDS]
    scenes = [make_scene(EVAL_SEED0 + i, size=S, n_shapes=1) for i in range(40)]  # seeds the training never saw
    logits = model.logits([sc.image for sc in scenes], labels)
    _, _, ref = hf_outputs(EMBEDDED_SIGLIP, [sc.image for sc in scenes[:4]], labels)
    np.testing.assert_allclose(logits[:4], ref, atol=1e-4, rtol=0)  # float32 towers of 2 layers, as above
    top1 = np.mean([labels[int(np.argmax(row))] == sc.caption for row, sc in zip(logits, scenes)])
    # Deterministic: 39 of these 40 scenes (0.975); 0.940 on 200 held-out scenes (tools/eval_siglip_shapes.py), for
    # the model npvlm trained (tools/train_siglip_shapes.py). Chance is 1/18 = 0.056. Exact, so a change that moves
    # a single answer is seen.
    assert top1 == 39 / 40, top1


def test_cli_classify_defaults_to_the_embedded_model(tmp_path):
    from npvlm.demo.scenes import EVAL_SEED0, make_scene

    png = str(tmp_path / "s.png")
    make_scene(EVAL_SEED0, size=64).image.save(png)
    r = _cli("classify", "--image", png, "--labels", "a red circle", "a blue square", "--softmax", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)[0]["probabilities"]
    assert abs(sum(p.values()) - 1.0) < 1e-5  # softmax over the labels sums to one (float32 rounding)


@pytest.mark.parametrize("change, words", [
    (dict(text_config=dict(projection_size=7)), "projection_size 7 must equal vision_config.hidden_size"),
    (dict(vision_config=dict(vision_use_head=False)), "vision_use_head is false"),
    (dict(vision_config=dict(image_size=30, patch_size=7)), "not a multiple of patch_size"),
    (dict(text_config=dict(hidden_act="relu")), "hidden_act 'relu' is not supported"),
    (dict(text_config=dict(num_attention_heads=3, hidden_size=20)), "not divisible by num_attention_heads"),
])
def test_config_problems_are_refused_in_one_line(change, words):
    from npvlm.models.siglip_config import SiglipConfig

    d = {"model_type": "siglip", "vision_config": {"hidden_size": 36, "num_attention_heads": 3},
         "text_config": {"hidden_size": 20, "num_attention_heads": 4, "projection_size": 36}}
    SiglipConfig.from_hf(d)  # the base is valid
    for k, v in change.items():
        d[k] = {**d[k], **v}
    with pytest.raises(ConfigError, match=words) as e:
        SiglipConfig.from_hf(d)
    assert "\n" not in str(e.value)


def test_absent_keys_take_hf_defaults():
    from transformers import SiglipConfig as HFConfig

    from npvlm.models.siglip_config import SiglipConfig

    ours, hf = SiglipConfig.from_hf({"model_type": "siglip"}), HFConfig()
    for tower, ref in (("vision", hf.vision_config), ("text", hf.text_config)):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "layer_norm_eps"):
            assert getattr(getattr(ours, tower), name) == getattr(ref, name), (tower, name)
    assert (ours.vision.image_size, ours.vision.patch_size) == (hf.vision_config.image_size, hf.vision_config.patch_size)
    assert ours.text.max_position_embeddings == hf.text_config.max_position_embeddings == 64
    assert ours.text.head_size == hf.text_config.projection_size


def test_cli_template_without_a_slot_is_refused(tmp_path):
    r = _cli("classify", "--image", str(tmp_path / "none.png"), "--labels", "a", "--template", "a photo of")
    assert r.returncode == 2 and "has no '{}'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_folder_without_spiece_model_is_refused(root, tmp_path):
    import shutil

    from npvlm.errors import TokenizerError
    from npvlm.siglip_api import load as load_siglip

    dst = str(tmp_path / "m")
    shutil.copytree(checkpoint("one-layer", root), dst)
    os.remove(os.path.join(dst, "spiece.model"))
    with pytest.raises(TokenizerError, match="spiece.model: not found"):
        load_siglip(dst)
