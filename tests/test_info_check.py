"""`npvlm info --check` (issue 17): every tensor of a folder scanned for NaN, Inf and |w| above a bound, a block
at a time through the map (npvlm/io/scan.py), and `npvlm info` on SigLIP folders. Checkpoints and `plant` as in
tests/test_hostile3.py: the embedded shapes model (BF16), the same as F32 and through `npvlm quantize`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from npvlm.api import EMBEDDED_MODEL
from npvlm.io.safetensors_file import read_safetensors, read_safetensors_header
from npvlm.siglip_api import EMBEDDED_SIGLIP
from test_hostile2 import _sparse_big_vocab, cli
from test_hostile3 import DOWN, EMBED, Q_VISION, UP, copier, plant, write_bases


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return write_bases(str(tmp_path_factory.mktemp("bases")))


@pytest.fixture()
def copy(bases, tmp_path):
    return copier(bases, tmp_path)


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_check_finds_planted_nan_inf_and_huge(copy, kind):
    d = copy(kind)
    clean = cli("info", "--check", "--model", d)
    assert clean[0] == 0 and "no NaN, no Inf, nothing above the bound" in clean[1].decode(), clean
    plant(d, UP, [float("nan")] * 2)
    plant(d, Q_VISION, [float("-inf")])
    plant(d, EMBED, [1e30, -2e5, 9000.0])  # 9000 is within the 1e4 bound
    rc, out, err, rss, secs = cli("info", "--check", "--model", d)
    assert rc == 1 and "Traceback" not in err, err
    dtype, path = kind.upper(), os.path.join(d, "model.safetensors")
    as_stored = (lambda v: struct.unpack("<f", b"\0\0" + struct.pack("<f", v)[2:])[0]) if kind == "bf16" else np.float32
    lines = out.decode().splitlines()
    problems = [line for line in lines if line.startswith(f"{path}: tensor ")]
    want = [f"'{UP}' ({dtype} [640, 160]): 2 NaN, 0 Inf, 0 with |w| > 10000",
            f"'{Q_VISION}' ({dtype} [128, 128]): 0 NaN, 1 Inf, 0 with |w| > 10000",
            f"'{EMBED}' ({dtype} [1600, 160]): 0 NaN, 0 Inf, 2 with |w| > 10000 (largest finite |w| {as_stored(1e30):.3g})"]
    assert len(problems) == 3 and all(sum(w in line for line in problems) == 1 for w in want), (want, lines)
    assert ("3 tensors with problems (2 NaN, 1 Inf, 2 above the bound); largest finite |w| "
            f"{as_stored(1e30):.3g} in '{EMBED}'") in lines[-1], lines
    rc, out, err, rss, secs = cli("info", "--check", "--json", "--model", d)
    check = json.loads(out)["check"]
    assert rc == 1 and check["tensors"] == 109 and check["max_abs"] == 1e4
    got = {p["tensor"]: (p["nan"], p["inf"], p["above"]) for p in check["problems"]}
    assert got == {UP: (2, 0, 0), Q_VISION: (0, 1, 0), EMBED: (0, 0, 2)}, got


def test_check_int8_scales_and_the_bound_option(copy):
    d = copy("int8")
    assert cli("info", "--check", "--model", d)[0] == 0
    plant(d, DOWN + "_scale", [100.0], at=(3,))  # |w| up to 127 * 100 = 12700 > 1e4
    rc, out, err, rss, secs = cli("info", "--check", "--model", d)
    assert rc == 1 and f"tensor '{DOWN}_scale' (F32 [160]) (the scale of an int8 weight: |w| = 127 x scale): 0 NaN, " \
        f"0 Inf, 1 with |w| > 10000 (largest finite |w| 1.27e+04)" in out.decode(), out
    rc, out, err, rss, secs = cli("info", "--check", "--max-abs", "2e4", "--model", d)
    assert rc == 0, out
    for bad in ("0", "nan", "-1"):
        rc, out, err, rss, secs = cli("info", "--check", "--max-abs", bad)
        assert rc == 2 and "npvlm: error: --max-abs must be a finite number > 0" in err, err


def test_info_and_check_on_a_siglip_folder(tmp_path):
    rc, out, err, rss, secs = cli("info", "--model", EMBEDDED_SIGLIP, "--json")
    info = json.loads(out)
    assert rc == 0 and info["model_type"] == "siglip" and info["vision"]["patches"] == 64 and info["embed_dim"] == 64
    weights = read_safetensors(os.path.join(EMBEDDED_SIGLIP, "model.safetensors"))
    assert info["parameters"]["total"] == sum(w.size for w in weights.values())  # every tensor counted
    d = str(tmp_path / "sig")
    shutil.copytree(EMBEDDED_SIGLIP, d)
    plant(d, "text_model.head.weight", [float("nan")])
    rc, out, err, rss, secs = cli("info", "--check", "--model", d)
    text = out.decode()
    assert rc == 1 and "SigLIP text: 2 layers" in text and "tensor 'text_model.head.weight' (F32 [64, 64]): 1 NaN" in text


def test_check_streams_a_large_folder(tmp_path):
    d = str(tmp_path / "big")
    shutil.copytree(EMBEDDED_MODEL, d)
    path = _sparse_big_vocab(d, 2 << 20)  # 2 Mi rows x 160 BF16 = 640 MiB (a hole in a sparse file), 1.25 GiB as float32
    t = read_safetensors_header(path)[EMBED]
    with open(path, "r+b") as f:
        f.seek(t.end - 2)
        f.write(struct.pack("<f", float("nan"))[2:])  # the very last value
    rc, out, err, rss, secs = cli("info", "--check", "--model", d, timeout=120)
    assert rc == 1 and f"tensor '{EMBED}' (BF16 [2097152, 160]): 1 NaN, 0 Inf" in out.decode(), (out, err)
    assert rss < 300 << 20, rss  # a block at a time, pages given back (~100 MB): not the 640 MiB file, nor 1.25 GiB widened
    lines = err.splitlines()  # off a terminal: plain lines, one a quarter, no carriage returns
    assert "\r" not in err and 1 <= len(lines) <= 5 and all(line.startswith("checking ") for line in lines), err


def test_tensor_stats_agree_with_numpy(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from npvlm.io import scan
    from npvlm.io.safetensors_file import _map_file

    rng = np.random.default_rng(0)
    specials = np.array([np.nan, np.inf, -np.inf, 1e4, -1e4, 10000.001, 9999.999, 6e4, 0.0, -0.0, 1e-30], np.float32)
    for dtype in ("F32", "F16", "BF16"):
        x = (rng.standard_normal(5000) * rng.choice([1e-3, 1, 1e3, 1e5], 5000)).astype(np.float32)
        x[rng.choice(5000, 200, replace=False)] = rng.choice(specials, 200)
        if dtype == "BF16":
            x = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # bfloat16 values, exactly
            arrays = {"w": (x.view(np.uint32) >> 16).astype(np.uint16)}  # stored as its bits (U16 retagged below)
        else:
            with np.errstate(over="ignore"):  # |x| > 65504 becomes Inf in float16, as intended
                x = x.astype(np.float16).astype(np.float32) if dtype == "F16" else x
            arrays = {"w": x.astype(np.float16) if dtype == "F16" else x}
        path = str(tmp_path / f"{dtype}.safetensors")
        save_file(arrays, path)
        if dtype == "BF16":
            raw = open(path, "rb").read().replace(b'"U16"', b'"BF16"', 1)
            n = struct.unpack("<Q", raw[:8])[0]
            raw = struct.pack("<Q", n + 1) + raw[8:]  # the header one byte longer ("BF16" for "U16"), data as it was
            open(path, "wb").write(raw)
        mm, infos = _map_file(path)
        for bound, block in ((1e4, 1 << 22), (1.0, 333), (0.5, 1 << 22), (65504.0, 4999), (1e38, 1)):
            monkeypatch.setattr(scan, "BLOCK", block)  # one block, many, a last one of 1 value
            st = scan.tensor_stats(mm, infos["w"], bound)
            fin = np.abs(x[np.isfinite(x)])
            want = {"nan": int(np.isnan(x).sum()), "inf": int(np.isinf(x).sum()), "above": int((fin > bound).sum()),
                    "max_abs": float(fin.max())}
            assert st == want, (dtype, bound, st, want)  # exact: counts, and the largest value as stored
        mm.close()
