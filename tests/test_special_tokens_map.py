"""special_tokens_map.json and tokenizer_config.json's special tokens against transformers 5.24 (issue 17).

HF's `from_pretrained` reads special_tokens_map.json only when tokenizer_config.json has no `added_tokens_decoder`,
and then its keys beat the config's (npvlm/io/special_tokens.py says the whole precedence). Each folder here is laid
out one way (the special tokens only in the map; only in the config; in both, disagreeing; in both with an
`added_tokens_decoder`, so the map is ignored) over a SentencePiece tokenizer.model and over a tokenizer.json, and
must give HF's ids (prompt + suffix through the processor, and plain encode), HF's decode with and without
skip_special_tokens over the whole vocabulary, HF's bos / eos and HF's vocabulary size (new tokens appended as HF
does). The embedded model then checks npvlm.load and generation: the eos a map names is not where HF's generate
stops (that is generation_config.json's, else config.json's), so it is not where npvlm stops either.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

import npvlm
from npvlm.api import EMBEDDED_MODEL
from npvlm.errors import ConfigError, TokenizerError
from npvlm.io.siglip_tokenizer import SiglipTokenizer
from npvlm.io.tokenizer import Tokenizer
from npvlm.models.paligemma_inputs import prompt_ids
from npvlm.siglip_api import EMBEDDED_SIGLIP
from tools.make_tokenizer import train_tokenizer

N_IMG = 2
ATOKEN = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
SETS = {  # what a folder names; dicts are AddedToken objects
    "eos": {"eos_token": "<loc0002>"},
    "bos pad unk": {"bos_token": "<seg003>", "pad_token": "<loc0004>",
                    "unk_token": {"content": "<loc0005>", "special": False, **ATOKEN}},
    "additional": {"additional_special_tokens": ["<loc0003>", "hello", "<new_one>"]},
    "extra": {"extra_special_tokens": ["<loc0006>", "the", "<new_two>"], "eos_token": "<end_of_turn>"},
    "model-specific": {"boi_token": "<loc0007>", "bos_token": "<start>"},
}
OTHER = {"eos_token": "<loc0009>", "bos_token": "<seg009>", "additional_special_tokens": ["<loc0010>"],
         "boi_token": "<loc0011>"}  # the disagreeing side of "both"
LAYOUTS = ["map only", "config only", "both: map wins", "both: added_tokens_decoder, map ignored"]
PROBES = ["caption en", "<bos>a <loc0002> b<eos> hello the <loc0003><pad>cat<unk> <mask> <end_of_turn> <start>",
          "<new_one><new_two> <seg003><seg009> <loc0004><loc0005><loc0006><loc0007><loc0009><loc0010><loc0011> x",
          "the other them hellohello 猫 <unk>"]
PAIRS = [("caption en", None), ("answer en <loc0002> hello?", "the <new_one> answer"), ("", "<end_of_turn>")]


def _with_mask(src_dir, dst_dir):
    """src_dir's tokenizer.model with a user-defined "<mask>" appended (id 1500), so that HF's GemmaTokenizer,
    which appends its default <mask> when a model lacks one (npvlm does not: see test_tokenizer.py), gives the
    same ids to the new tokens that come after it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(open(os.path.join(src_dir, "tokenizer.model"), "rb").read())
    p = m.pieces.add()
    p.piece, p.score, p.type = "<mask>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    os.makedirs(dst_dir)
    open(os.path.join(dst_dir, "tokenizer.model"), "wb").write(m.SerializeToString())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("stm")
    train_tokenizer(str(root / "trained"))
    _with_mask(str(root / "trained"), str(root / "sp"))
    transformers.GemmaTokenizer.from_pretrained(str(root / "sp")).save_pretrained(str(root / "saved"))
    os.makedirs(root / "json")
    shutil.copy(root / "saved" / "tokenizer.json", root / "json")
    return {"sp": str(root / "sp"), "json": str(root / "json")}


def _for_config(tokens: dict) -> dict:
    """The same tokens as tokenizer_config.json writes them (HF reads an AddedToken there only with its "__type")."""
    return {k: {**v, "__type": "AddedToken"} if isinstance(v, dict) else v for k, v in tokens.items()}


def _hf_decoder(base) -> dict:
    """tokenizer_config.json's added_tokens_decoder as HF's save_pretrained (4.x) writes it for the plain folder."""
    t = _hf(base).tokenizer
    return {str(i): {"content": a.content, "special": a.special, **ATOKEN} for i, a in t.added_tokens_decoder.items()}


def lay_out(root, base, layout, tokens) -> str:
    d = os.path.join(root, f"{os.path.basename(base)} {layout} {len(os.listdir(root))}".replace(":", "").replace(" ", "_"))
    shutil.copytree(base, d)
    smap, config = {"map only": (tokens, None), "config only": (None, _for_config(tokens)),
                    "both: map wins": (tokens, _for_config(OTHER)),
                    "both: added_tokens_decoder, map ignored": (OTHER, {**_for_config(tokens),
                                                                        "added_tokens_decoder": _hf_decoder(base)})}[layout]
    for name, value in (("special_tokens_map.json", smap), ("tokenizer_config.json", config)):
        if value is not None:
            json.dump(value, open(os.path.join(d, name), "w"))
    return d


def _hf(d):
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    ip = transformers.SiglipImageProcessor(size={"height": 8, "width": 8})
    ip.image_seq_length = N_IMG
    return transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=transformers.GemmaTokenizer.from_pretrained(d))


def _hf_prompt_ids(proc, prompt, suffix):
    from PIL import Image

    return [int(i) for i in proc(images=Image.new("RGB", (8, 8)), text="<image>" + prompt, suffix=suffix)["input_ids"][0]]


def assert_same_as_hf(ours: Tokenizer, proc):
    t = proc.tokenizer
    assert (ours.bos_id, ours.eos_id) == (t.bos_token_id, t.eos_token_id)
    assert ours.vocab_size == len(t)  # new tokens appended as HF appends them, in its order
    for text in PROBES:
        assert ours.encode(text) == t.encode(text, add_special_tokens=False), text
    for prompt, suffix in PAIRS:
        assert prompt_ids(ours, prompt, N_IMG, suffix=suffix)[0] == _hf_prompt_ids(proc, prompt, suffix)
    every = list(range(len(t)))
    for skip in (True, False):
        assert ours.decode(every, skip_special_tokens=skip) == t.decode(every, skip_special_tokens=skip)
    dropped = [i for i in every if ours.decode([i]) == ""]  # what skip_special_tokens drops, one id at a time
    assert dropped == [i for i in every if t.decode([i], skip_special_tokens=True) == ""]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["sp", "json"])
def test_special_tokens_match_hf(bases, tmp_path, kind, layout):
    for name, tokens in SETS.items():
        d = lay_out(str(tmp_path), bases[kind], layout, tokens)
        ours = Tokenizer.from_dir(d)
        assert_same_as_hf(ours, _hf(d))
        # the precedence itself: the map's over the config's, unless the config has an added_tokens_decoder
        winner = tokens.get("eos_token", {"both: map wins": OTHER["eos_token"]}.get(layout, "<eos>"))
        assert ours.id_to_piece(ours.eos_id) == winner, (name, layout)


def test_hf_drops_the_maps_additional_special_tokens_over_a_sentencepiece_model(bases, tmp_path):
    # HF's tokenizer.model converter overwrites `additional_special_tokens` (not `extra_special_tokens`); from a
    # tokenizer.json the map's list is read. npvlm does both, so "hello" is a special token only in the second.
    for kind, special in (("sp", False), ("json", True)):
        d = lay_out(str(tmp_path), bases[kind], "map only", SETS["additional"])
        ours = Tokenizer.from_dir(d)
        assert (len(ours.encode("hello")) == 1) == special and (ours.decode(ours.encode("hello")) == "") == special
        assert_same_as_hf(ours, _hf(d))


@pytest.mark.parametrize("smap, why", [
    ({"eos_token": 5}, "special_tokens_map.json: eos_token must be a token string or an AddedToken object"),
    ({"bos_token": ["<bos>"]}, "special_tokens_map.json: bos_token must be a token string"),
    ({"pad_token": {"special": True}}, "special_tokens_map.json: pad_token must be a token string"),
    ({"unk_token": ""}, "special_tokens_map.json: unk_token is an empty string, not a token"),
    ({"extra_special_tokens": "<loc0001>"}, "special_tokens_map.json: extra_special_tokens must be a list"),
    ({"extra_special_tokens": ["<loc0001>", 7]}, r"special_tokens_map.json: extra_special_tokens\[1\] must be a token"),
    ({"extra_special_tokens": {"boi_token": None, "eoi_token": 3.5}}, "special_tokens_map.json: eoi_token must be"),
    ({"mask_token": "\ud800"}, "special_tokens_map.json: mask_token '\\\\ud800' is not valid Unicode"),
])
def test_bad_values_are_one_line_naming_file_and_key(tmp_path, smap, why):
    d = str(tmp_path / "m")
    shutil.copytree(EMBEDDED_MODEL, d)
    json.dump(smap, open(os.path.join(d, "special_tokens_map.json"), "w"))
    with pytest.raises(TokenizerError, match=why) as e:
        npvlm.load(d)
    assert str(e.value).startswith(os.path.join(d, "special_tokens_map.json")) and "\n" not in str(e.value)


def test_a_new_token_past_the_models_embedding_is_refused_with_the_reason(tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(EMBEDDED_MODEL, d)  # its tokenizer already fills the 1600 rows of the embedding
    json.dump({"eos_token": "<end_of_turn>"}, open(os.path.join(d, "special_tokens_map.json"), "w"))
    with pytest.raises(ConfigError, match=r"the tokenizer has 1601 tokens, more than the model's vocab_size 1600: "
                                          r".*special_tokens_map.json \(eos_token\) names '<end_of_turn>', which is not "
                                          r"in the vocabulary, so it gets the new id 1600, as in HF"):
        npvlm.load(d)


# ------------------------------------------------------------------ the embedded model, end to end
@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    import numpy as np
    from PIL import Image

    p = str(tmp_path_factory.mktemp("img") / "noise.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    return p


def _hf_generate(d, image_path, n):
    import torch
    import transformers
    from PIL import Image

    transformers.utils.logging.set_verbosity_error()
    proc = transformers.AutoProcessor.from_pretrained(d)
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    inputs = proc(images=Image.open(image_path).convert("RGB"), text="<image>caption en", return_tensors="pt")
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    return gen, proc


def test_generation_stops_where_hf_stops_whatever_the_map_calls_eos(tmp_path, image_path):
    d = str(tmp_path / "m")
    shutil.copytree(EMBEDDED_MODEL, d)
    base = npvlm.load(d).generate(image_path, "caption en", max_new_tokens=6)
    assert len(base.token_ids) >= 3, base
    model = npvlm.load(d)
    renamed = model.tokenizer.id_to_piece(base.token_ids[1])  # a token it generates, now the map's eos
    smap = json.load(open(os.path.join(d, "special_tokens_map.json")))
    json.dump({**smap, "eos_token": renamed}, open(os.path.join(d, "special_tokens_map.json"), "w"))
    model = npvlm.load(d)
    assert model.tokenizer.eos_id == base.token_ids[1] and model.stop_ids == {1}  # config.json's eos_token_id
    ours = model.generate(image_path, "caption en", max_new_tokens=6)
    gen, proc = _hf_generate(d, image_path, 6)  # AutoProcessor: the folder's own tokenizer class (TokenizersBackend)
    for prompt, suffix in PAIRS + [(renamed, renamed)]:
        assert prompt_ids(model.tokenizer, prompt, 16, suffix=suffix)[0] == _hf_prompt_ids(proc, prompt, suffix)
    assert ours.token_ids == gen[:len(ours.token_ids)] and len(ours.token_ids) == len(gen) - (gen[-1] == 1)
    assert ours.text == proc.decode(ours.token_ids, skip_special_tokens=True)  # the renamed eos is dropped by both
    assert renamed not in ours.text


@pytest.mark.parametrize("generation_config, config_eos", [({"bos_token_id": 2}, None), (None, "first")])
def test_stop_ids_follow_hfs_generation_config_precedence(tmp_path, image_path, generation_config, config_eos):
    # generation_config.json without eos_token_id: HF's generate stops only at max_new_tokens; without the file,
    # config.json's eos_token_id (here the first generated token) is the only stop, not the tokenizer's <eos>
    d = str(tmp_path / "m")
    shutil.copytree(EMBEDDED_MODEL, d)
    first = npvlm.load(d).generate(image_path, "caption en", max_new_tokens=4).token_ids[0]
    if generation_config is not None:
        json.dump(generation_config, open(os.path.join(d, "generation_config.json"), "w"))
    if config_eos is not None:
        cfg = json.load(open(os.path.join(d, "config.json")))
        json.dump({**cfg, "eos_token_id": first}, open(os.path.join(d, "config.json"), "w"))
    model = npvlm.load(d)
    assert model.stop_ids == (set() if config_eos is None else {first})
    ours = model.generate(image_path, "caption en", max_new_tokens=4)
    gen, _ = _hf_generate(d, image_path, 4)
    assert ours.token_ids == ([] if config_eos else gen) and (config_eos is None or gen == [first])


# ------------------------------------------------------------------ SigLIP
SIG_SETS = {"eos": {"eos_token": "le"}, "pad unk": {"pad_token": "<pad>", "unk_token": "re"},
            "additional": {"additional_special_tokens": ["le", "<new>"]}, "extra": {"extra_special_tokens": ["re"]},
            "new eos": {"eos_token": {"content": "<end>", "special": True}}}
SIG_TEXTS = ["a photo of le re", "le </s> a <pad>re <unk> t", "Le, RE! \u2581o <new><end>", "re" * 30]


@pytest.mark.filterwarnings("ignore:This sequence already has")  # HF's, for a text that ends in its eos
@pytest.mark.parametrize("layout", LAYOUTS)
def test_siglip_special_tokens_match_hf(tmp_path, layout):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = {k: v for k, v in json.load(open(os.path.join(EMBEDDED_SIGLIP, "tokenizer_config.json"))).items()
              if k not in ("added_tokens_decoder", "extra_special_tokens")}
    atd = json.load(open(os.path.join(EMBEDDED_SIGLIP, "tokenizer_config.json")))["added_tokens_decoder"]
    for name, tokens in SIG_SETS.items():
        d = str(tmp_path / f"{name}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        shutil.copy(os.path.join(EMBEDDED_SIGLIP, "spiece.model"), d)
        other = {"eos_token": "re", "additional_special_tokens": ["a"]}
        smap, cfg = {"map only": (tokens, config), "config only": (None, {**config, **_for_config(tokens)}),
                     "both: map wins": (tokens, {**config, **other}),
                     "both: added_tokens_decoder, map ignored": (other, {**config, **_for_config(tokens),
                                                                         "added_tokens_decoder": atd})}[layout]
        if smap is not None:
            json.dump(smap, open(os.path.join(d, "special_tokens_map.json"), "w"))
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
        hf = transformers.SiglipTokenizer.from_pretrained(d)
        ref = hf(SIG_TEXTS, padding="max_length", truncation=True, max_length=12)
        ours = SiglipTokenizer.from_dir(d)
        assert ours(SIG_TEXTS, 12) == (ref["input_ids"], ref["attention_mask"]), (name, layout)
        assert (ours.eos_id, ours.pad_id, ours.unk_id, ours.vocab_size) == (
            hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, len(hf)), (name, layout)


def test_siglip_needs_its_eos_pad_unk(tmp_path):
    d = str(tmp_path / "s")
    shutil.copytree(EMBEDDED_SIGLIP, d)
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    json.dump({**cfg, "pad_token": None}, open(os.path.join(d, "tokenizer_config.json"), "w"))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json \(pad_token\): is null, but SigLIP's tokenizer "
                                             r"cannot do without this token"):
        npvlm.load(d)
