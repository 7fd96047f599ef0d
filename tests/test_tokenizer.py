"""npvlm.tokenizer against HF transformers' PaliGemmaProcessor / GemmaTokenizer (transformers 5.x).

Tokenizers are trained here with tools/make_tokenizer.py (no network): a small one (default word list,
few merges), a richer one (many BPE merges, non-Latin text in the corpus), and the richer one converted
by HF and saved as a folder holding only tokenizer.json (the PaliGemma 2 layout).
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings

import pytest

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tools.make_tokenizer import DEFAULT_WORDS, train_tokenizer  # noqa: E402

from npvlm.errors import TokenizerError  # noqa: E402
from npvlm.io.tokenizer import Tokenizer
from npvlm.models.paligemma_inputs import prompt_ids as build_prompt_ids  # noqa: E402

N_IMG = 4  # image tokens in the processor tests (HF's image_seq_length)

PROMPTS = [
    "caption en",
    "answer en what color is the square?",
    "detect red circle ; blue square",
    "",
    "caption es ¿qué?",
    "describe 😀 emoji 🐈‍⬛",
    "中文 字 日本語",
    "a  b   c    d",
    " leading space",
    "trailing space ",
    "line one\nline two",
    "find <loc0012> here <seg005>",
    "<loc0001><loc1023> x",
    "naïve café façade",
    "tab\tand\rreturn",
    "nul\x00byte",
    "▁ literal and <0x41> text",
    "<bos>double bos",
    "stray <eos> and <pad> and <unk>",
    "ocr",
]
SUFFIXES = [None, "on the beach", "", "<loc0010><loc0020><loc0030><loc0040> red circle", " two words \n"]


def _rich_lines():
    rng = random.Random(0)
    words = DEFAULT_WORDS.split() + ("the quick brown fox jumps over lazy dog people walking street running "
                                     "building window water mountain river bridge person man woman child").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    return lines + ["¿qué es esto? café niño naïve 中文 字 日本語 😀"] * 5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import transformers
    base = tmp_path_factory.mktemp("tok")
    small, rich, js = str(base / "small"), str(base / "rich"), str(base / "json_only")
    train_tokenizer(small)
    train_tokenizer(rich, _rich_lines(), vocab_size=1800)
    hf = transformers.GemmaTokenizer.from_pretrained(rich)
    hf.save_pretrained(str(base / "saved"))
    os.makedirs(js)
    os.replace(str(base / "saved" / "tokenizer.json"), os.path.join(js, "tokenizer.json"))
    return {"small": small, "rich": rich, "json": js}


_HF = {}


def hf_processor(path):
    """HF's PaliGemmaProcessor over the tokenizer in `path` (cached: conversion takes a moment)."""
    if path not in _HF:
        from transformers import GemmaTokenizer, PaliGemmaProcessor, SiglipImageProcessor
        from transformers.utils import logging

        logging.set_verbosity_error()
        ip = SiglipImageProcessor(size={"height": 8, "width": 8})
        ip.image_seq_length = N_IMG
        _HF[path] = PaliGemmaProcessor(image_processor=ip, tokenizer=GemmaTokenizer.from_pretrained(path))
    return _HF[path]


def hf_ids(path, prompt, suffix=None):
    from PIL import Image

    r = hf_processor(path)(images=Image.new("RGB", (8, 8)), text="<image>" + prompt, suffix=suffix)
    return [int(i) for i in r["input_ids"][0]], [int(i) for i in r["token_type_ids"][0]]


_TOK = {}


def npvlm_tok(path):
    if path not in _TOK:
        _TOK[path] = Tokenizer.from_dir(path)
    return _TOK[path]


KINDS = ["small", "rich", "json"]


# ------------------------------------------------------------------ parity with HF
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_match_hf_processor(dirs, kind, prompt):
    tok = npvlm_tok(dirs[kind])
    ids, types = build_prompt_ids(tok, prompt, N_IMG)
    ref_ids, ref_types = hf_ids(dirs[kind], prompt)
    assert ids == ref_ids
    assert types == ref_types == [0] * len(ids)
    assert ids[:N_IMG + 1] == [tok.image_id] * N_IMG + [tok.bos_id]
    assert ids[-1] == tok.piece_to_id("\n")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", SUFFIXES[1:])
def test_suffix_ids_and_token_types_match_hf(dirs, kind, suffix):
    tok = npvlm_tok(dirs[kind])
    prompt = "answer en what color is the square?"
    ids, types = build_prompt_ids(tok, prompt, N_IMG, suffix=suffix)
    assert (ids, types) == hf_ids(dirs[kind], prompt, suffix)
    n_suffix = len(tok.encode(suffix)) + 1
    assert types == [0] * (len(ids) - n_suffix) + [1] * n_suffix
    assert ids[-1] == tok.eos_id


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_hf(dirs, kind):
    tok, hf = npvlm_tok(dirs[kind]), hf_processor(dirs[kind])
    for prompt in PROMPTS:
        for suffix in SUFFIXES:
            ids, _ = build_prompt_ids(tok, prompt, N_IMG, suffix=suffix)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # the processor made <image> special: it disappears, <loc>/<seg> stay as text
    assert tok.decode([tok.image_id, tok.piece_to_id("<loc0012>"), tok.piece_to_id("<seg005>"), tok.eos_id]) == "<loc0012><seg005>"


_ALPHABET = list("abcdefghij klmnop  qrstuvwxyz,.?;<>\n\t\r\x00é¿😀中文字") + [
    "<bos>", "<eos>", "<pad>", "<unk>", "<loc0012>", "<seg005>", "caption", "  ", "the ", "▁", "<0x41>", "<ima", "ge>"]
_texts = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(_ALPHABET), max_size=25).map("".join))


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_texts, suffix=st.one_of(st.none(), _texts), kind=st.sampled_from(KINDS))
def test_random_text_matches_hf(dirs, prompt, suffix, kind):
    tok = npvlm_tok(dirs[kind])
    for bad in ("<image>", "<mask>" if tok.piece_to_id("<mask>") is None else "<image>"):  # see test_mask_token_absent...
        hypothesis.assume(bad not in prompt and bad not in (suffix or ""))
    assert build_prompt_ids(tok, prompt, N_IMG, suffix=suffix) == hf_ids(dirs[kind], prompt, suffix)


@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_decode_random_ids_matches_hf(dirs, data, kind):
    # random ids include invalid UTF-8 byte runs (HF: one U+FFFD per byte) and ids past the vocabulary
    tok, hf = npvlm_tok(dirs[kind]), hf_processor(dirs[kind])
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size + 5), max_size=30))
    # ids HF appended past the file's vocabulary (its own <mask>, see test_mask_token_absent...) are HF-only
    ids = [i for i in ids if not tok.vocab_size <= i < len(hf.tokenizer)]
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_characters="\u2581"), max_size=60), kind=st.sampled_from(KINDS))
def test_round_trip(dirs, text, kind):
    # byte fallback: any text comes back unchanged; with specials skipped, any text that does not spell one.
    # Except U+2581 "▁": SentencePiece's own mark for a space, which it reads back as " " (HF does the same).
    tok = npvlm_tok(dirs[kind])
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    if not any(t in text for t in ("<bos>", "<eos>", "<pad>", "<unk>", "<image>", "<mask>")):
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_and_tokenizer_json_agree(dirs):
    sp, js = npvlm_tok(dirs["rich"]), npvlm_tok(dirs["json"])
    assert type(sp._b).__name__ == "_SentencePiece" and type(js._b).__name__ == "_HFTokenizers"
    for p in PROMPTS:
        assert sp.encode(p) == js.encode(p)
    specials = ["<pad>"] + [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    assert (sp.bos_id, sp.eos_id, sp.image_id) == (js.bos_id, js.eos_id, js.image_id)
    assert [sp.piece_to_id(t) for t in specials] == [js.piece_to_id(t) for t in specials]


# ------------------------------------------------------------------ vocabulary
@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_found_by_name(dirs, kind):
    tok = npvlm_tok(dirs[kind])
    assert (tok.piece_to_id("<pad>"), tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.image_id == tok.piece_to_id("<image>") == 5  # tools/make_tokenizer.py's layout
    locs = [tok.piece_to_id(f"<loc{i:04d}>") for i in range(1024)]
    segs = [tok.piece_to_id(f"<seg{i:03d}>") for i in range(128)]
    assert None not in locs + segs and len(set(locs + segs)) == 1024 + 128
    assert [tok.id_to_piece(i) for i in (locs[0], locs[1023], segs[127])] == ["<loc0000>", "<loc1023>", "<seg127>"]
    assert tok.encode("<loc0012>") == [locs[12]]
    assert tok.encode("<image><bos>") == [tok.image_id, tok.bos_id]
    assert tok.piece_to_id("no such piece") is None
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size + 10)


def _rename_piece(src_model, dst_dir, old, new):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    with open(src_model, "rb") as f:
        m.ParseFromString(f.read())
    for p in m.pieces:
        if p.piece == old:
            p.piece = new
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(dst_dir, "tokenizer.model"), "wb") as f:
        f.write(m.SerializeToString())


def test_image_token_outside_the_sentencepiece_model(dirs, tmp_path):
    # big_vision's tokenizer.model has no <image>: HF appends it (257152 in the real model) and lists it
    # in tokenizer_config.json; npvlm reads it from there, or from the caller (config.json's image_token_index)
    d = str(tmp_path / "noimage")
    _rename_piece(os.path.join(dirs["small"], "tokenizer.model"), d, "<image>", "<unused0>")
    tok = Tokenizer.from_dir(d)
    assert tok.image_id is None
    with pytest.raises(TokenizerError, match="no <image> token"):
        build_prompt_ids(tok, "caption en", 4)
    tok = Tokenizer.from_dir(d, image_token_id=1500)
    assert (tok.image_id, tok.vocab_size, tok.id_to_piece(1500)) == (1500, 1501, "<image>")
    ids, _ = build_prompt_ids(tok, "caption en", 3)
    assert ids[:4] == [1500, 1500, 1500, 2] and tok.decode(ids) == "caption en\n"
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {"1500": {"content": "<image>", "special": True}}}, f)
    tok = Tokenizer.from_dir(d)
    assert tok.image_id == 1500 and tok.encode("a<image>") == tok.encode("a") + [1500]
    with pytest.raises(TokenizerError, match="config says 7"):
        Tokenizer.from_dir(d, image_token_id=7)
    with pytest.raises(TokenizerError, match="already the piece"):
        Tokenizer.from_dir(_copy_model(d, str(tmp_path / "noimage2")), image_token_id=7)  # 7 is <loc0001>


def _copy_model(src_dir, dst_dir):
    """A folder with src_dir's tokenizer.model only (no tokenizer_config.json)."""
    with open(os.path.join(src_dir, "tokenizer.model"), "rb") as f:
        _write(dst_dir, "tokenizer.model", f.read())
    return dst_dir


def test_mask_token_absent_from_model_is_spelled_out(dirs):
    # HF's GemmaTokenizer always has a <mask>: when the model lacks it, HF appends it as a new id (1500
    # here) that the model's vocabulary does not have; npvlm's SentencePiece path spells it out instead.
    # Real Gemma/PaliGemma models have <mask> (id 4), where both agree.
    tok = npvlm_tok(dirs["small"])
    assert tok.piece_to_id("<mask>") is None
    assert len(tok.encode("<mask>")) > 1 and tok.decode(tok.encode("<mask>")) == "<mask>"


# ------------------------------------------------------------------ prompt checks
def test_prompt_types(dirs):
    tok = npvlm_tok(dirs["small"])
    assert build_prompt_ids(tok, "caption es ¿qué?".encode(), 2) == build_prompt_ids(tok, "caption es ¿qué?", 2)
    assert build_prompt_ids(tok, "", 2)[0] == [5, 5, 2, tok.piece_to_id("\n")]  # empty prompt: image <bos> \n
    with pytest.raises(TokenizerError, match=r"not valid UTF-8 \(byte 0xff at offset 3\)"):
        build_prompt_ids(tok, b"abc\xffdef", 2)
    with pytest.raises(TokenizerError, match="prompt must be str, got int"):
        build_prompt_ids(tok, 42, 2)
    with pytest.raises(TokenizerError, match="lone surrogate U\\+D800 at offset 1"):
        build_prompt_ids(tok, "a\ud800", 2)
    with pytest.raises(TokenizerError, match="prompt contains <image> at offset 0"):
        build_prompt_ids(tok, "<image>caption en", 2)
    with pytest.raises(TokenizerError, match="suffix contains <image>"):
        build_prompt_ids(tok, "caption en", 2, suffix="x<image>")
    with pytest.raises(TokenizerError, match="num_image_tokens"):
        build_prompt_ids(tok, "caption en", -1)


# ------------------------------------------------------------------ bad files
def _write(d, name, data: bytes):
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d9f1e\nsize 4264023\n"


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_lfs_pointer(tmp_path, name):
    p = _write(str(tmp_path), name, LFS)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(str(tmp_path))
    msg = str(e.value)
    assert p in msg and "git-LFS pointer" in msg and "git lfs pull" in msg and "\n" not in msg


def test_truncated_model(dirs, tmp_path):
    data = open(os.path.join(dirs["small"], "tokenizer.model"), "rb").read()
    for cut in (len(data) // 2, 7, len(data) - 3):
        p = _write(str(tmp_path / str(cut)), "tokenizer.model", data[:cut])
        with pytest.raises(TokenizerError, match=r"could not parse ModelProto: truncated file") as e:
            Tokenizer.from_dir(os.path.dirname(p))
        assert p in str(e.value)


@pytest.mark.parametrize("data, why", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a SentencePiece model"),
    (b'{"version": "1.0"}', "this is JSON"),
    (b"IQ== 0\nIg== 1\nIw== 2\n", "tiktoken"),
    (b"", "empty file"),
])
def test_not_a_sentencepiece_model(tmp_path, data, why):
    p = _write(str(tmp_path), "tokenizer.model", data)
    with pytest.raises(TokenizerError, match=why) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert p in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="looked for tokenizer.model and tokenizer.json") as e:
        Tokenizer.from_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(str(tmp_path / "nope"))


@pytest.mark.parametrize("data, why", [
    (b'{"version": "1.0", "model": ', "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"hello": "world"}', "not an HF tokenizers file"),
])
def test_bad_tokenizer_json(tmp_path, data, why):
    p = _write(str(tmp_path), "tokenizer.json", data)
    with pytest.raises(TokenizerError, match=why) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert p in str(e.value)


def test_falls_back_to_tokenizer_json(dirs, tmp_path):
    d = str(tmp_path)
    _write(d, "tokenizer.model", LFS)
    _write(d, "tokenizer.json", open(os.path.join(dirs["json"], "tokenizer.json"), "rb").read())
    with pytest.warns(UserWarning, match="git-LFS pointer.*using .*tokenizer.json"):
        tok = Tokenizer.from_dir(d)
    assert tok.encode("caption en") == npvlm_tok(dirs["rich"]).encode("caption en")
    _write(d, "tokenizer.json", b"{")  # both bad: both reasons in one line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TokenizerError, match="git-LFS pointer.*; .*not valid JSON"):
            Tokenizer.from_dir(d)
