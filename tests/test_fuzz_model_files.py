"""Fuzz tests for the side files of a model folder that HF reads and npvlm now reads too (issue 17):
processor_config.json, generation_config.json, tokenizer_config.json (PaliGemma and SigLIP) and
special_tokens_map.json. Each example writes one mutated file into a copy of the embedded model and loads
the folder with `npvlm.load`; the property is "a model that works, or the domain's one-line error naming the
folder, nothing else" (no TypeError / KeyError / MemoryError, no hang):

    processor_config.json   -> pixel values float32 [3, S, S], finite and within +-1e4, or ConfigError
    generation_config.json  -> stop ids that are token ids of the model, or ConfigError
    tokenizer_config.json   -> encode / decode give ids in the vocabulary and text, or TokenizerError / ConfigError
    special_tokens_map.json -> as tokenizer_config.json, the named bos / eos the map's, special (dropped by
                               decode) and the stop ids unchanged (HF's generate does not read the tokenizer),
                               or TokenizerError / ConfigError (a new token past the embedding)

Mutations: keys deleted or set to hostile values (wrong JSON types, absurd numbers, NaN / Infinity, 5000-digit
integers, huge lists, deep nesting, lone surrogates, CJK), then sometimes bytes flipped, cut, spliced or
junk appended. The weights are read once: `load_weights` is replaced by the arrays it returned the first
time (every side file is read before it, generation_config.json after it), so an example costs ~10 ms.
Counts: FUZZ_EXAMPLES in test_fuzz_inputs.py (the README quotes them).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npvlm
from npvlm.api import EMBEDDED_MODEL
from npvlm.errors import NpvlmError
from npvlm.io.images import MAX_PIXEL
from npvlm.siglip_api import EMBEDDED_SIGLIP
from test_fuzz_inputs import fuzz_settings, report

SLOW = 5.0  # seconds for one example: a load is ~10 ms; a parse that never ends (or a 25 s one) is far over
RAW = {  # JSON text json.dumps cannot write (or would be slow to): put in place of the placeholder string "__raw_K__"
    "deep": "[" * 50_000 + "]" * 50_000, "deep_obj": '{"a":' * 3000 + "1" + "}" * 3000, "bigint": "1" + "0" * 5000,
    "list1e3": "[" + ", ".join(["0.5"] * 1000) + "]", "list1e5": "[" + ",".join(["7"] * 100_000) + "]",  # huge lists
    "1e999": "1e999", "-1e999": "-1e999", "surrogate": '"\\ud800"', "nul": '"\\u0000"', "neg0": "-0",
}
HOSTILE = st.one_of(  # groups of equal weight, so that each kind of wrong value comes up often
    st.sampled_from([None, True, False]),
    st.sampled_from([0, -1, 1, 2, 3, 5, 7, 128, 1600, 2**31, 2**63, -(2**63), 10**30]),
    st.sampled_from([1e300, -1e300, 5e-324, 1e-30, 1.5, -0.0, 255.0, float("nan"), float("inf"), float("-inf")]),
    st.sampled_from(["", " ", "128", "3", "猫", "<image>", "<eos>", "<loc0001>", "\x00", "a" * 5000]),
    st.sampled_from([[], [0.5], [0.5, 0.5, 0.5], [1, 107], ["a", "b", "c"], [[0.5, 0.5, 0.5]], {}, {"height": 128},
                     {"height": 128, "width": 128}, {"content": "<eos>"}, {"content": "", "special": True},
                     {"content": 5}, {"content": "<loc0001>", "special": True}]),
    st.sampled_from([f"__raw_{k}__" for k in RAW]),
    st.integers(), st.floats(), st.text(max_size=12),
    st.lists(st.floats(-3, 3) | st.integers(-5, 2000), max_size=8),
)


def _dicts(d, path=()):
    """Every (path, dict) inside a JSON document, the root first."""
    if isinstance(d, dict):
        yield path, d
        for k, v in d.items():
            yield from _dicts(v, path + (k,))


def _numbers(v) -> bool:  # a JSON number or a list of them
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v if isinstance(v, list) else [v]))


def _dumps(d) -> bytes:
    text = json.dumps(d, ensure_ascii=False)
    for k, raw in RAW.items():
        text = text.replace(f'"__raw_{k}__"', raw)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate from st.text: invalid UTF-8, as on disk


@st.composite
def mutated_file(draw, seed: dict, keys: list[str]) -> bytes:
    """`seed` with 1-4 keys deleted or set (in any of its objects), then 0-3 byte-level edits."""
    d = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 4))):
        objects = [obj for _, obj in _dicts(d)]
        obj = draw(st.sampled_from(objects[1:] or objects) | st.sampled_from(objects))  # inner objects, more often
        numeric = sorted(k for k in obj if _numbers(obj[k]))
        op = draw(st.sampled_from(["delete", "scale", "set", "set", "set"] if numeric else ["delete", "set", "set"]))
        if op == "scale":  # absurd numbers where numbers belong
            key, k = draw(st.sampled_from(numeric)), draw(st.sampled_from([0, -1, 1e300, 1e-300, 1e38, 1e-38, 1e30, 2**64]))
            obj[key] = [x * k for x in obj[key]] if isinstance(obj[key], list) else obj[key] * k
            continue
        known = st.sampled_from(keys)  # the keys the reader looks at, half the time
        key = draw(st.one_of(known, known, st.sampled_from(sorted(obj) or keys), st.text(max_size=6)))
        if op == "delete":
            obj.pop(key, None)
        else:
            obj[key] = copy.deepcopy(draw(HOSTILE))  # never the strategy's own list or dict, which a later edit would change
    if draw(st.integers(0, 40)) == 0:
        d = copy.deepcopy(draw(HOSTILE))  # not an object at all
    data = bytearray(_dumps(d))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "truncate", "delete", "insert", "append"]))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b"\xff", b"\xc3", b",", b"}", b'"', b"[", b"\x00", b"NaN", b"\xe7\x8c\xab"]))
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Copies of both embedded models, and load_weights answered from memory after the first read."""
    root = tmp_path_factory.mktemp("fuzz")
    out = {"paligemma": str(root / "pg"), "siglip": str(root / "sig")}
    shutil.copytree(EMBEDDED_MODEL, out["paligemma"])
    shutil.copytree(EMBEDDED_SIGLIP, out["siglip"])
    return out


@pytest.fixture()
def cached_weights(monkeypatch):
    import npvlm.api
    import npvlm.siglip_api

    cache = {}

    def patch(module):
        real = module.load_weights

        def load_weights(model_dir, schema, **kw):
            if model_dir not in cache:
                cache[model_dir] = real(model_dir, schema, **{k: v for k, v in kw.items() if k != "identities"})
            return dict(cache[model_dir])

        monkeypatch.setattr(module, "load_weights", load_weights)

    patch(npvlm.api)
    patch(npvlm.siglip_api)


def fuzz_file(request, name, folder, filename, seed, keys, use):
    """Write each mutated `filename` into `folder`, load it, and `use(model)`; count accepted / refused."""
    path = os.path.join(folder, filename)
    original = open(path, "rb").read() if os.path.exists(path) else None
    counts = Counter()

    @fuzz_settings(name)
    @given(data=mutated_file(seed, keys))
    def run(data):
        with open(path, "wb") as f:
            f.write(data)
        t0 = time.perf_counter()
        try:
            model = npvlm.load(folder)
        except NpvlmError as e:
            msg = str(e)
            assert msg.startswith(folder) and "\n" not in msg and len(msg) < 600, msg  # names the folder's file
            counts["refused"] += 1
        else:
            use(model)
            counts["accepted"] += 1
        assert time.perf_counter() - t0 < SLOW

    try:
        run()
    finally:
        if original is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(original)
    report(request, name, counts)


def _json(folder, filename):
    return json.load(open(os.path.join(folder, filename)))


RGB = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)


def test_fuzz_processor_config(request, folders, cached_weights):
    def use(model):
        x = model.processor.preprocess(RGB)
        assert x.dtype == np.float32 and x.shape == (3, 128, 128), model.processor
        assert np.all(np.isfinite(x)) and np.abs(x).max() <= MAX_PIXEL, model.processor  # numbers a tower can take

    fuzz_file(request, "processor_config", folders["paligemma"], "processor_config.json",
              _json(folders["paligemma"], "processor_config.json"),
              ["image_processor", "image_mean", "image_std", "rescale_factor", "resample", "size", "height", "width",
               "do_resize", "do_rescale", "do_normalize"], use)


def test_fuzz_generation_config(request, folders, cached_weights):
    vocab = 1600

    def use(model):
        assert all(type(i) is int and 0 <= i < vocab for i in model.stop_ids), model.stop_ids

    seed = {"bos_token_id": 2, "eos_token_id": [1, 107], "pad_token_id": 0, "max_new_tokens": 64, "do_sample": False,
            "_from_model_config": True, "transformers_version": "5.24.0"}
    fuzz_file(request, "generation_config", folders["paligemma"], "generation_config.json", seed,
              ["eos_token_id", "bos_token_id", "pad_token_id", "max_new_tokens"], use)


def _use_tokenizer(model, base):
    tok = model.tokenizer
    text = "caption en <loc0001> 猫 <image>"
    ids = tok.encode(text)
    vocab = tok.vocab_size
    assert all(type(i) is int and 0 <= i < vocab for i in ids), ids
    assert isinstance(tok.decode(list(range(0, vocab, 7)) + ids), str)
    plain = "caption en"  # a text no added token of this file touches is split as without the file's added tokens
    if not any(t and t in plain for t, _ in tok._added.values()):
        assert tok.encode(plain) == base.encode(plain), tok._added


def test_fuzz_tokenizer_config(request, folders, cached_weights):
    base = npvlm.load(folders["paligemma"]).tokenizer
    seed = _json(folders["paligemma"], "tokenizer_config.json")
    seed["added_tokens_decoder"] = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True}
                                    for i, c in ((0, "<pad>"), (1, "<eos>"), (2, "<bos>"), (5, "<image>"))}
    fuzz_file(request, "tokenizer_config", folders["paligemma"], "tokenizer_config.json", seed,
              ["added_tokens_decoder", "content", "special", "0", "5", "1599", "1600", "-1", "eos_token"],
              lambda model: _use_tokenizer(model, base))


def test_fuzz_siglip_tokenizer_config(request, folders, cached_weights):
    def use(model):
        ids, mask = model.tokenizer(["a photo of a cat", "猫 " * 40])
        L = model.config.text.max_position_embeddings
        assert all(len(r) == L and all(type(i) is int and 0 <= i < model.config.text.vocab_size for i in r) for r in ids)
        assert np.all(np.isfinite(model.embed_texts(["a red circle"])))

    fuzz_file(request, "siglip_tokenizer_config", folders["siglip"], "tokenizer_config.json",
              _json(folders["siglip"], "tokenizer_config.json"),
              ["eos_token", "pad_token", "unk_token", "do_lower_case", "model_max_length", "content"], use)


def test_fuzz_special_tokens_map(request, folders, cached_weights):
    base_model = npvlm.load(folders["paligemma"])  # its tokenizer_config.json has no added_tokens_decoder: the map is read
    path = os.path.join(folders["paligemma"], "special_tokens_map.json")

    def use(model):
        _use_tokenizer(model, base_model.tokenizer)
        tok = model.tokenizer
        assert model.stop_ids == base_model.stop_ids, model.stop_ids  # config.json's, whatever the map calls eos
        assert tok.decode([tok.bos_id, tok.eos_id]) == "", (tok.bos_id, tok.eos_id)  # both special
        smap = json.load(open(path, encoding="utf-8"))  # strict JSON, as npvlm accepted it
        for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
            named = smap.get(key) if isinstance(smap, dict) else None
            named = named.get("content") if isinstance(named, dict) else named
            if named is not None:  # the map's token is the one used, in the vocabulary or appended as HF does
                assert tok.id_to_piece(i) == named, (key, named, i)

    fuzz_file(request, "special_tokens_map", folders["paligemma"], "special_tokens_map.json",
              _json(folders["paligemma"], "special_tokens_map.json"),
              ["bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens", "extra_special_tokens",
               "content"], use)
