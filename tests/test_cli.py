"""The `npvlm` command, run as a user runs it: a subprocess (`python -m npvlm ...`), exit status and streams.

Every error in the input must end the same way: exit status 2, stderr exactly one line starting
`npvlm: error:` that names the file / key / value at fault, and no traceback. One tiny random
checkpoint (tools/make_checkpoint.py, with the test tokenizer) is written once; each broken variant is
a copy with one thing broken. The subprocesses run two at a time (the CI machines have two cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import safetensors.numpy as stn
from PIL import Image

from hf_ref import write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d9f1e\nsize 4264023\n"
TIME = r"(?:\d+ ms|[\d.]+ s)"  # under a second in ms, else in s
STATS = re.compile(rf"^load [\d.]+ s \| image encode {TIME} \| prefill \d+ tokens {TIME} \(\d+ tok/s\) \| "
                   r"decode \d+ tokens? \([\d.]+ tok/s\) \| peak RSS \d+ MiB")


def npvlm(*args, timeout=120) -> subprocess.CompletedProcess:
    """Run the CLI of this checkout (bytes arguments are passed to the OS as they are)."""
    env = dict(os.environ, PYTHONWARNINGS="")
    return subprocess.run([sys.executable, "-m", "npvlm", *args], capture_output=True, timeout=timeout, env=env, cwd=ROOT)


def png_claiming(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims width x height pixels (8-bit RGB); its data is one empty row."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# fixtures: one checkpoint, broken copies, images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = write(root / "base", seed=1)
    rng = np.random.default_rng(0)
    img = root / "img.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(img)

    def variant(name, edit):
        d = root / name
        shutil.copytree(base, d)
        edit(d)
        return str(d)

    def edit_config(d, change):
        cfg = json.loads((d / "config.json").read_text())
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    def shard_missing(d):  # the index names two shards; only the first is there
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        names = sorted(stn.load_file(str(d / "model-00001-of-00002.safetensors")))
        wmap = {n: "model-00001-of-00002.safetensors" for n in names}
        wmap["language_model.model.norm.weight"] = "model-00002-of-00002.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))

    def wrong_shape(d):
        t = stn.load_file(str(d / "model.safetensors"))
        t["language_model.model.layers.1.mlp.down_proj.weight"] = np.zeros((16, 31), np.float32)
        stn.save_file(t, str(d / "model.safetensors"))

    def lfs_tokenizer(d):  # no tokenizer.json to fall back on
        (d / "tokenizer.model").write_bytes(LFS)
        (d / "tokenizer.json").unlink()

    f = {
        "model": str(base), "image": str(img), "root": str(root),
        "no_config": variant("no_config", lambda d: (d / "config.json").unlink()),
        "config_not_json": variant("config_not_json", lambda d: (d / "config.json").write_text('{"model_type": "paligemma",')),
        "llava": variant("llava", lambda d: edit_config(d, lambda c: c.update(model_type="llava"))),
        "no_weights": variant("no_weights", lambda d: (d / "model.safetensors").unlink()),
        "shard_missing": variant("shard_missing", shard_missing),
        "wrong_shape": variant("wrong_shape", wrong_shape),
        "lfs_tokenizer": variant("lfs_tokenizer", lfs_tokenizer),
        "lfs_with_fallback": variant("lfs_with_fallback", lambda d: (d / "tokenizer.model").write_bytes(LFS)),
        "short": variant("short", lambda d: edit_config(d, lambda c: c["text_config"].update(max_position_embeddings=40))),
    }
    (root / "empty").mkdir()  # --image FOLDER means its images: this one has none
    (root / "notes.png").write_text("these are my notes, not a picture\n")
    data = img.read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))  # 10^10 pixels claimed in 70 bytes
    return f


def _cupy_importable() -> bool:
    return importlib.util.find_spec("cupy") is not None


# (case, flags added to `generate --model MODEL --image IMG -n 3`, fragments the one line must hold);
# {name} placeholders are filled from the `files` fixture.
ERRORS = [
    ("no config.json", ["--model", "{no_config}"], ["{no_config}/config.json", "not found"]),
    ("config.json not JSON", ["--model", "{config_not_json}"], ["{config_not_json}/config.json", "not valid JSON"]),
    ("unknown model_type", ["--model", "{llava}"], ["{llava}/config.json", "model_type 'llava'", "supported: paligemma"]),
    ("no weights", ["--model", "{no_weights}"], ["{no_weights}", "no weights", "model.safetensors"]),
    ("shard missing", ["--model", "{shard_missing}"],
     ["{shard_missing}/model.safetensors.index.json", "'model-00002-of-00002.safetensors'", "does not exist",
      "language_model.model.norm.weight"]),
    ("tensor of the wrong shape", ["--model", "{wrong_shape}"],
     ["{wrong_shape}", "language_model.model.layers.1.mlp.down_proj.weight [16, 31]", "config.json implies [16, 32]"]),
    ("git-LFS tokenizer.model", ["--model", "{lfs_tokenizer}"],
     ["{lfs_tokenizer}/tokenizer.model", "git-LFS pointer", "git lfs pull"]),
    ("missing image", ["--image", "{root}/nope.jpg"], ["{root}/nope.jpg", "no such file"]),
    ("image folder without images", ["--image", "{root}/empty"], ["{root}/empty", "is a directory with no image files"]),
    ("not an image", ["--image", "{root}/notes.png"], ["{root}/notes.png", "not an image file"]),
    ("truncated PNG", ["--image", "{root}/cut.png"], ["{root}/cut.png", "truncated or corrupt PNG data"]),
    ("decompression bomb", ["--image", "{root}/bomb.png"], ["{root}/bomb.png", "decompression bomb"]),
    ("temperature < 0", ["--temperature", "-0.5"], ["temperature", "-0.5"]),
    ("top_p = 0", ["--top-p", "0"], ["top_p must be in (0, 1]", "0.0"]),
    ("top_p = 1.5", ["--top-p", "1.5"], ["top_p must be in (0, 1]", "1.5"]),
    ("max_new_tokens = 0", ["-n", "0"], ["max_new_tokens", "got 0"]),
    ("too long for the positions", ["--model", "{short}", "--max-new-tokens", "100"],
     ["prompt of 11 tokens (4 image + 7 text)", "max_new_tokens 100", "= 111", "40 positions"]),
    ("unknown backend", ["--backend", "tpu"], ["unknown backend 'tpu'", "numpy, cupy"]),
    ("cupy not installed", ["--backend", "cupy"], ["backend 'cupy' needs CuPy", "pip install"]),
    ("non-UTF-8 prompt", ["--prompt", b"caption \xc3\xa9 \xff en"], ["--prompt is not valid UTF-8", "byte 0xff at offset 11"]),
    ("--threads 0", ["--threads", "0"], ["--threads", "must be an integer >= 1", "'0'"]),
    ("--draw into a missing folder", ["--draw", "{root}/no/such/dir/out.png"], ["{root}/no/such/dir/out.png", "does not exist"]),
]


def _fill(arg, f):
    return arg if isinstance(arg, bytes) else arg.format(**f)


def _argv(extra, f):  # an option may be given once: the case's own --model / --image replace the defaults
    base = [("--model", f["model"]), ("--image", f["image"]), ("-n", "3")]
    own = {a for a in extra if isinstance(a, str) and a.startswith("-")} | ({"-n"} if "--max-new-tokens" in extra else set())
    return ["generate"] + [x for flag, v in base if flag not in own for x in (flag, v)] + [_fill(a, f) for a in extra]


@pytest.fixture(scope="module")
def error_runs(files):
    """Every ERRORS case run once, two subprocesses at a time: {case: CompletedProcess}."""
    cases = [c for c in ERRORS if not (c[0] == "cupy not installed" and _cupy_importable())]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(npvlm, *_argv(extra, files)) for name, extra, _ in cases}
        return {name: fut.result() for name, fut in futures.items()}


def assert_one_line_error(r: subprocess.CompletedProcess, fragments=()) -> str:
    err = r.stderr.decode("utf-8", "backslashreplace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not exactly one line: {err!r}"
    assert err.startswith("npvlm: error: "), err
    for frag in fragments:
        assert frag in err, (frag, err)
    return err


@pytest.mark.parametrize("case", [c[0] for c in ERRORS])
def test_error_is_one_line_and_exit_2(case, error_runs, files):
    if case not in error_runs:
        pytest.skip("cupy is installed here")
    fragments = next(c[2] for c in ERRORS if c[0] == case)
    r = error_runs[case]
    assert_one_line_error(r, [_fill(fr, files) for fr in fragments])
    assert r.stdout == b"", r.stdout  # refused before any text was generated


# ---------------------------------------------------------------------------------------------
# the happy path


@pytest.fixture(scope="module")
def happy_runs(files, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("draw") / "out.png")
    base = ["generate", "--model", files["model"], "--image", files["image"], "--prompt", "caption en",
            "--max-new-tokens", "5"]
    runs = {"stream": base, "json": base + ["--json", "--draw", out, "--threads", "1"],
            "info": ["info", "--model", files["model"]], "info_json": ["info", "--model", files["model"], "--json"],
            "help": ["--help"], "lfs_fallback": ["generate", "--model", files["lfs_with_fallback"], "--image",
                                                 files["image"], "-n", "2"]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(npvlm, *argv) for k, argv in runs.items()}
        res = {k: f.result() for k, f in futures.items()}
    res["draw_path"] = out
    return res


def test_generate_streams_text_and_prints_stats(happy_runs):
    r = happy_runs["stream"]
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert r.stdout.decode().strip(), "no text on stdout"
    lines = err.splitlines()
    assert len(lines) == 1 and STATS.match(lines[0]), err  # the stats line, nothing else (no progress bar for 0.1 MB)
    assert "backend numpy" in lines[0]


def test_generate_json_and_draw(happy_runs):
    r = happy_runs["json"]
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "stats", "finish_reason", "detections", "prompt"}
    assert out["prompt"] == "caption en"
    assert isinstance(out["text"], str) and 1 <= len(out["token_ids"]) <= 5
    assert all(isinstance(t, int) for t in out["token_ids"])
    for key in ("load_seconds", "image_seconds", "prefill_seconds", "decode_tokens_per_second", "peak_rss_bytes"):
        assert isinstance(out["stats"][key], (int, float)) and out["stats"][key] >= 0, key
    assert out["stats"]["new_tokens"] == len(out["token_ids"])  # the answer's tokens; steps counts the eos step too
    assert out["stats"]["steps"] == len(out["token_ids"]) + (out["finish_reason"] == "eos")
    # greedy: the streamed text and the JSON text are the same
    assert out["text"] == happy_runs["stream"].stdout.decode().rstrip("\n")
    err = r.stderr.decode().splitlines()
    assert any(line.startswith("drew ") and happy_runs["draw_path"] in line for line in err), err
    assert STATS.match(err[-1]) and "1 thread)" in err[-1], err  # --threads 1 reached the BLAS library
    with Image.open(happy_runs["draw_path"]) as im:
        assert im.format == "PNG" and im.size == (30, 20)  # drawn on the original image


def test_info_reads_headers_only(happy_runs, files):
    r = happy_runs["info"]
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    text = r.stdout.decode()
    for field in ("decoder", "vision", "parameters", "files", "memory (float32)", "max positions"):
        assert re.search(rf"^{re.escape(field)}\s", text, re.M), (field, text)
    assert "gemma: 2 layers, width 16" in text and "vocab 1536" in text and "4 image tokens" in text
    assert re.search(r"parameters\s+0\.\d\d M \(vision", text)
    info = json.loads(happy_runs["info_json"].stdout)
    assert info["max_positions"] == 8192 and info["model"] == files["model"]  # numbers, not display strings
    assert info["decoder"]["width"] == 16 and info["vision"]["image_tokens"] == 4 and info["parameters"]["total"] > 0


def test_help(happy_runs):
    r = happy_runs["help"]
    assert r.returncode == 0 and b"generate" in r.stdout and b"info" in r.stdout and r.stderr == b""


def test_tokenizer_fallback_warns_in_one_line(happy_runs, files):
    """tokenizer.model is a git-LFS pointer but tokenizer.json is fine: it runs, with a one-line warning."""
    r = happy_runs["lfs_fallback"]
    err = r.stderr.decode().splitlines()
    assert r.returncode == 0, err
    assert len(err) == 2 and err[0].startswith("npvlm: warning: ") and "git-LFS pointer" in err[0], err
    assert files["lfs_with_fallback"] + "/tokenizer.json" in err[0] and STATS.match(err[1])
