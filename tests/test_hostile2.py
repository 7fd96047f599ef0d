"""Hostile input, round two (issue 17): memory spent before it is known to fit, config files HF reads,
files that are not regular files, output that cannot be written, a checkpoint that changes on disk.

CLI cases run `python -m npvlm` under /usr/bin/time (its %M is that command's own peak RSS, not the
largest of every child so far, nor the forked pytest process's). The base model is the embedded
shapes model (bf16, 4+4 layers, 6 MB), copied and broken per test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import npvlm
from npvlm.api import EMBEDDED_MODEL
from npvlm.errors import CheckpointError, ConfigError, GenerationError, ImageError, TokenizerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RSS = 600 << 20  # a refused command stays near the interpreter's own ~150 MB (torch is never imported)
FAST = 20.0  # seconds: python start-up + imports on 2 shared cores is ~3 s; a 25 s parse or a hang is far over


def cli(*args, env=None, stdout_path=None, preexec=None, timeout=60.0):
    """(status, stdout, stderr, peak RSS bytes, seconds) of `python -m npvlm ARGS`, killed after `timeout`."""
    out_path = stdout_path or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"npvlm-out-{os.getpid()}")
    err_path = out_path + ".err" if stdout_path is None else f"/tmp/npvlm-err-{os.getpid()}"
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    t0 = time.perf_counter()
    with open(out_path if stdout_path is None else os.devnull, "wb") as o, open(err_path, "wb") as e:
        stdout = open(stdout_path, "wb") if stdout_path else o
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", err_path + ".rss", sys.executable, "-m", "npvlm", *args], stdout=stdout, stderr=e, env=full_env,
                             preexec_fn=preexec, cwd=ROOT)
        if stdout_path:
            stdout.close()
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    out = b"" if stdout_path else open(out_path, "rb").read()
    err = open(err_path, "rb").read().decode("utf-8", "backslashreplace")
    rss = int(open(err_path + ".rss").read().split()[-1]) * 1024  # %M is in KiB
    return p.returncode, out, err, rss, seconds


def one_line_error(err: str, *words) -> None:
    assert "Traceback" not in err and "MemoryError" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("npvlm: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(EMBEDDED_MODEL, d)
    return str(d)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("img") / "scene.png")
    from npvlm.demo.scenes import make_scene  # noqa: PLC0415 - the demo's own scenes

    make_scene(3).image.save(p)
    return p


def edit_config(model_dir, **text):
    path = os.path.join(model_dir, "config.json")
    c = json.load(open(path))
    for k, v in text.items():
        c["text_config"][k] = v
    json.dump(c, open(path, "w"))
    return path


# ------------------------------------------------------------------ 1. memory before it is spent
@pytest.mark.parametrize("key,value,cap", [("num_hidden_layers", 1 << 20, "1024"),
                                           ("max_position_embeddings", 1 << 22, "1048576")])
def test_absurd_config_sizes_refused_before_building(model_dir, image_path, key, value, cap):
    cfg = edit_config(model_dir, **{key: value})
    rc, out, err, rss, secs = cli("generate", "--model", model_dir, "--image", image_path)
    assert rc == 2, err
    one_line_error(err, cfg, f"text_config.{key} = {value}", cap)
    assert rss < SMALL_RSS and secs < FAST, (rss, secs)


def test_layer_count_checked_against_the_tensors_present(model_dir, image_path):
    cfg = edit_config(model_dir, num_hidden_layers=1000)  # within the bound, but the file has 4 layers
    rc, out, err, rss, secs = cli("generate", "--model", model_dir, "--image", image_path)
    assert rc == 2, err
    held = sum(1 for _ in npvlm.io.checkpoint.read_headers(EMBEDDED_MODEL)[0][os.path.join(EMBEDDED_MODEL, "model.safetensors")])
    one_line_error(err, cfg, "num_hidden_layers 1000", f"the checkpoint holds {held}")
    assert rss < SMALL_RSS and secs < FAST, (rss, secs)


def _sparse_big_vocab(model_dir, vocab):
    """The shapes checkpoint with embed_tokens grown to `vocab` rows, the new rows a hole in a sparse file:
    a valid bf16 checkpoint of several GB that takes no disk and whose float32 copy cannot fit."""
    path = os.path.join(model_dir, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    emb = next(k for k in header if k.endswith("embed_tokens.weight"))
    blobs = {k: raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]] for k, v in header.items()}
    d = header[emb]["shape"][1]
    new, at = {}, 0
    for k in [k for k in header if k != emb] + [emb]:
        size = vocab * d * 2 if k == emb else len(blobs[k])
        new[k] = {**header[k], "data_offsets": [at, at + size], **({"shape": [vocab, d]} if k == emb else {})}
        at += size
    if meta is not None:
        new["__metadata__"] = meta
    hb = json.dumps(new).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for k in new:
            if k not in (emb, "__metadata__"):
                f.write(blobs[k])
        f.truncate(8 + len(hb) + at)
    c = json.load(open(os.path.join(model_dir, "config.json")))
    c["text_config"]["vocab_size"] = vocab
    json.dump(c, open(os.path.join(model_dir, "config.json"), "w"))
    return path


def test_bf16_widening_that_does_not_fit_is_refused_with_the_numbers(model_dir, image_path):
    _sparse_big_vocab(model_dir, 8 << 20)  # 8 Mi rows x 160 bf16 = 2.5 GiB on disk (sparse), 5 GiB as float32
    import resource

    limit = 3 << 30  # `ulimit -v 3G`: before, numpy's _ArrayMemoryError (or a failed mmap) ended the run

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    rc, out, err, rss, secs = cli("generate", "--model", model_dir, "--image", image_path, preexec=cap)
    assert rc == 2, err
    one_line_error(err, model_dir, "as float32 needs 5.", "GiB of memory", "is available")
    assert rss < SMALL_RSS and secs < FAST, (rss, secs)


def test_available_bytes_takes_the_least_figure(monkeypatch):
    from npvlm.io import memory

    monkeypatch.setenv("NPVLM_MEMORY_LIMIT", "12345")
    assert memory.available_bytes() == 12345  # far below any real MemAvailable / cgroup room
    monkeypatch.setenv("NPVLM_MEMORY_LIMIT", "lots")
    with pytest.raises(ConfigError, match="NPVLM_MEMORY_LIMIT must be a number of bytes, got 'lots'"):
        memory.available_bytes()


def test_generation_that_does_not_fit_names_a_max_new_tokens_that_would(monkeypatch, image_path):
    from npvlm.io import memory

    model = npvlm.load()
    T = model.config.num_image_tokens + len(model.tokenizer.encode("caption en")) + 2  # image + bos + prompt + "\n"
    want = 200
    need = memory.generation_estimate(model.config, 1, T, want)
    monkeypatch.setenv("NPVLM_MEMORY_LIMIT", str(memory.generation_estimate(model.config, 1, T, 50)))
    with pytest.raises(memory.OutOfMemory) as e:
        model.generate(image_path, "caption en", max_new_tokens=want)
    msg = str(e.value)
    assert f"generating {want} tokens after a {T}-token prompt" in msg and memory.gib(need) in msg, msg
    assert "--max-new-tokens 50 would fit" in msg, msg  # the estimate grows by one token's cost: 50 is the largest
    res = model.generate(image_path, "caption en", max_new_tokens=50)  # ...and it does run
    assert len(res.token_ids) <= 50


def _added_tokens_config(model_dir, count, compact):
    path = os.path.join(model_dir, "tokenizer_config.json")
    d = json.load(open(path))
    entry = (lambda i: {"content": "a"}) if compact else (lambda i: {"content": f"<tok{i}>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True})
    d["added_tokens_decoder"] = {str(100000 + i): entry(i) for i in range(count)}
    json.dump(d, open(path, "w"))
    return path, os.path.getsize(path)


@pytest.mark.parametrize("count,compact,words", [(1_400_000, False, ["bytes", "larger than 16 MiB"]),
                                                 (300_000, True, ["lists 300000 added tokens", "262144"])])
def test_huge_added_tokens_decoder_refused_fast(model_dir, image_path, count, compact, words):
    path, size = _added_tokens_config(model_dir, count, compact)
    rc, out, err, rss, secs = cli("generate", "--model", model_dir, "--image", image_path)
    assert rc == 2, err
    one_line_error(err, path, *[w for w in words if w != "bytes"])
    assert rss < SMALL_RSS and secs < FAST, (rss, secs)  # was a 25 s parse


# ------------------------------------------------------------------ 2. config files HF reads
SETTINGS = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4], "resample": 2,
            "size": {"height": 128, "width": 128}, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "rescale_factor": 1 / 255, "image_processor_type": "SiglipImageProcessor", "image_seq_length": 16,
            "do_convert_rgb": True}


def _layout(model_dir, layout):
    pre, proc = os.path.join(model_dir, "preprocessor_config.json"), os.path.join(model_dir, "processor_config.json")
    other = {**SETTINGS, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}
    if layout == "nested only":
        os.remove(pre)
        json.dump({"image_processor": SETTINGS, "processor_class": "PaliGemmaProcessor"}, open(proc, "w"))
    elif layout == "both, nested wins":
        json.dump(other, open(pre, "w"))
        json.dump({"image_processor": SETTINGS, "processor_class": "PaliGemmaProcessor"}, open(proc, "w"))
    else:  # "flat only": processor_config.json without image settings
        json.dump(SETTINGS, open(pre, "w"))
        json.dump({"processor_class": "PaliGemmaProcessor", "image_seq_length": 16}, open(proc, "w"))


@pytest.mark.parametrize("layout", ["nested only", "both, nested wins", "flat only"])
def test_image_settings_read_with_hf_precedence(model_dir, layout):
    import transformers
    from npvlm.io.images import ImageProcessorConfig

    transformers.utils.logging.set_verbosity_error()
    _layout(model_dir, layout)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    hf = transformers.PaliGemmaProcessor.from_pretrained(model_dir)(images=rgb, text="<image>caption en",
                                                                     return_tensors="np")["pixel_values"][0]
    ours = ImageProcessorConfig.from_dir(model_dir, 128).preprocess(rgb)
    # 1e-5: both resize with PIL and normalise in float32; only rounding of (x - mean) / std may differ
    np.testing.assert_allclose(ours, hf, atol=1e-5)
    assert abs(float(ours.mean()) - float(hf.mean())) < 1e-5


def test_generation_config_eos_stops_where_hf_stops(model_dir, image_path):
    import torch
    import transformers

    base = npvlm.load(model_dir).generate(image_path, "caption en", max_new_tokens=8)
    assert len(base.token_ids) >= 3, base
    stop = base.token_ids[2]
    json.dump({"eos_token_id": [1, stop], "bos_token_id": 2, "pad_token_id": 0},
              open(os.path.join(model_dir, "generation_config.json"), "w"))
    ours = npvlm.load(model_dir).generate(image_path, "caption en", max_new_tokens=8)
    assert ours.token_ids == base.token_ids[: base.token_ids.index(stop)] and ours.finish_reason == "eos"

    transformers.utils.logging.set_verbosity_error()
    proc = transformers.PaliGemmaProcessor.from_pretrained(model_dir)
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = proc(images=Image.open(image_path).convert("RGB"), text="<image>caption en", return_tensors="pt")
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert gen[-1] == stop and gen[:-1] == ours.token_ids, (gen, ours.token_ids)  # HF keeps the eos it met


def test_generation_config_bad_eos_is_one_line(model_dir):
    path = os.path.join(model_dir, "generation_config.json")
    json.dump({"eos_token_id": [1, 10 ** 9]}, open(path, "w"))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id must be token ids in \[0, 1600\), got \[1, 1000000000\]"):
        npvlm.load(model_dir)


# ------------------------------------------------------------------ 3. not regular files
def test_fifo_and_char_device_images_refused_without_hanging(tmp_path, model_dir):
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO (named pipe)"), ("/dev/zero", "a character device")):
        rc, out, err, rss, secs = cli("generate", "--image", path, timeout=30)
        assert rc == 2, (path, err)
        one_line_error(err, path, f"is {kind}, not a regular file")
        assert secs < FAST, secs  # before: blocked in open() for ever / read without end
        with pytest.raises(ImageError, match=re.escape(f"is {kind}")):
            npvlm.io.images.load_image(path)


def test_fifo_model_files_refused(tmp_path, model_dir):
    from npvlm.io.safetensors_file import read_safetensors_header

    fifo = str(tmp_path / "x.safetensors")
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="x.safetensors: is a FIFO"):
        read_safetensors_header(fifo)
    os.remove(os.path.join(model_dir, "tokenizer_config.json"))
    os.mkfifo(os.path.join(model_dir, "tokenizer_config.json"))
    with pytest.raises((TokenizerError, ConfigError), match="tokenizer_config.json: is a FIFO"):
        npvlm.load(model_dir)


# ------------------------------------------------------------------ 4. output that cannot be written
def test_stdout_full_is_one_line_exit_1(image_path):
    rc, out, err, rss, secs = cli("generate", "--image", image_path, "-n", "4", stdout_path="/dev/full")
    assert rc == 1, err
    one_line_error(err, "cannot write the output", "No space left on device")


def test_closed_pipe_is_quiet(image_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(f"{sys.executable} -m npvlm generate --image {image_path} -n 8 --json | head -c 0",
                       shell=True, capture_output=True, env=env, cwd=ROOT, timeout=120,
                       executable="/bin/bash")
    err = r.stderr.decode()
    assert "Exception ignored" not in err and "Traceback" not in err and "error" not in err, err


def test_console_that_cannot_show_the_text_gets_replacements_and_one_warning(capsys):
    from npvlm.apps.generate import _Console

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    con = _Console(stream)
    con.write("猫 <loc0001>")
    con.write(" 犬")
    assert raw.getvalue() == b"? <loc0001> ?"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cp1252 cannot show '猫'" in err[0], err


# ------------------------------------------------------------------ 5. a checkpoint that changes on disk
def _rewrite_weights(model_dir):
    path = os.path.join(model_dir, "model.safetensors")
    data = open(path, "rb").read()
    os.remove(path)  # a new inode, as `git pull` / a copy would leave
    open(path, "wb").write(data)


def test_mapped_checkpoint_changed_on_disk_is_refused(model_dir, image_path):
    model = npvlm.load(model_dir)
    model.generate(image_path, "caption en", max_new_tokens=2)
    _rewrite_weights(model_dir)
    with pytest.raises(GenerationError, match="model.safetensors: checkpoint changed on disk since it was loaded: reload it"):
        model.generate(image_path, "caption en", max_new_tokens=2)


def test_no_mmap_reads_into_memory_and_survives_a_change(model_dir, image_path):
    model = npvlm.load(model_dir, mmap=False)
    before = model.generate(image_path, "caption en", max_new_tokens=6)
    path = os.path.join(model_dir, "model.safetensors")
    with open(path, "r+b") as f:  # scribble over the data: a mapped view would read these bytes
        f.seek(os.path.getsize(path) - 4096)
        f.write(b"\x7f" * 4096)
    after = model.generate(image_path, "caption en", max_new_tokens=6)
    assert after.token_ids == before.token_ids and model.mapped_files == {}
    rc, out, err, rss, secs = cli("generate", "--no-mmap", "--image", image_path, "-n", "3")
    assert rc == 0 and out.strip(), err
