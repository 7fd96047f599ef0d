"""`npvlm label --engine ray` on a local Ray instance: the same bytes as the local engine, exactly once
after a SIGKILL, and the one-line hint when Ray is missing. Needs the `ray` extra (pip install 'ray[data]');
about 60 s on 2 shared cores, most of it Ray starting (~5 s a start) and actors loading the model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import npvlm
from npvlm.apps.cli import main
from npvlm.demo.scenes import make_scene
from npvlm.errors import GenerationError
from npvlm.label.inputs import list_inputs
from npvlm.label.job import run_job

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray Data is not installed (pip install 'ray[data]'): "
                                                   "the ray engine cannot run")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["caption en", "detect circle ; square"]
N_TOKENS = 24  # as tests/test_label.py: every caption / two boxes of the shapes model fit
N_SCENES = 12


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs, as the CI machine); shut down after, so no worker outlives it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """12 scenes listed in a JSONL manifest with an id each (meta must come through the Ray rows too)."""
    root = tmp_path_factory.mktemp("scenes")
    lines = []
    for s in range(N_SCENES):
        make_scene(s).image.save(root / f"scene{s:02d}.png")
        lines.append(json.dumps({"image": f"scene{s:02d}.png", "id": s, "tags": ["shapes", {"k": 0.1 * s}]}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "m.jsonl")


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    """The local engine's bytes at batch size 4."""
    out = str(tmp_path_factory.mktemp("ref") / "ref.jsonl")
    run_job(npvlm.load(), list_inputs(manifest), PROMPTS, out, batch_size=4, max_new_tokens=N_TOKENS, progress=False)
    with open(out, "rb") as f:
        return f.read()


def _pairs(data: bytes):
    return [(r["path"], r["prompt"]) for r in map(json.loads, data.splitlines())]


@needs_ray
@pytest.mark.parametrize("workers, batch_size", [(1, 4), (2, 3)])
def test_ray_engine_writes_the_local_engines_bytes(local_ray, manifest, reference, tmp_path, workers, batch_size):
    out = str(tmp_path / "o.jsonl")
    args = [manifest, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", out, "-b", str(batch_size),
            "-n", str(N_TOKENS), "--no-progress", "--engine", "ray", "--workers", str(workers)]
    assert main(["label", *args]) == 0
    with open(out, "rb") as f:
        data = f.read()
    assert len(data.splitlines()) == N_SCENES * len(PROMPTS)
    assert data == reference  # same lines, same order, same bytes: the actors run the local engine's label_batch
    assert json.loads(data.splitlines()[-1])["meta"] == {"id": 11, "tags": ["shapes", {"k": 0.1 * 11}]}


@needs_ray
def test_ray_run_killed_then_resumed_is_exactly_once(local_ray, manifest, reference, tmp_path):
    out = str(tmp_path / "o.jsonl")
    args = [manifest, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", out, "-b", "2",
            "-n", str(N_TOKENS), "--no-progress", "--engine", "ray"]
    # the write hook sleeps 0.2 s mid-write and before fsync, so the run is slow and a kill can tear a line
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", _NPVLM_LABEL_TEST_WRITE_PAUSE="0.2")
    env.pop("RAY_ADDRESS", None)  # the child starts its own local Ray, not the fixture's
    proc = subprocess.Popen([sys.executable, "-m", "npvlm", "label", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # kill once the first lines are written
            if os.path.exists(out) and os.path.getsize(out) > 0:
                time.sleep(0.3)
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the Ray run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started (its own session)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(out, "rb") as f:
        killed = f.read()
    n_reference = len(reference.splitlines())
    torn = not killed.endswith(b"\n")
    print(f"after the kill: {len(killed)} of {len(reference)} bytes, torn tail: {torn}")
    assert 0 < len(killed) < len(reference), "the kill did not land mid-run"
    assert main(["label", *args]) == 0  # resumed on the fixture's Ray
    with open(out, "rb") as f:
        data = f.read()
    assert sorted(_pairs(data)) == sorted(_pairs(reference)) and len(data.splitlines()) == n_reference
    assert data == reference  # nothing lost, nothing twice, in input order


def test_missing_ray_is_one_line_with_the_install_hint(monkeypatch):
    from npvlm.label import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(GenerationError, match=r"pip install 'npvlm\[ray\]'") as e:
        ray_engine.RayEngine()
    assert "\n" not in str(e.value)


@needs_ray
def test_recipe_read_images_label_write_json(local_ray, manifest, reference, tmp_path):
    from npvlm.label.ray_engine import label_images

    folder = os.path.dirname(manifest)
    ds = ray.data.read_images(folder, mode="RGB", include_paths=True, file_extensions=["png"])
    label_images(ds, PROMPTS, batch_size=4, num_cpus=0.5, max_new_tokens=N_TOKENS).write_json(str(tmp_path / "out"))
    rows = [json.loads(line) for name in sorted(os.listdir(tmp_path / "out")) if name.endswith(".json")
            for line in open(tmp_path / "out" / name)]
    got = {(os.path.basename(r["path"]), r["prompt"]): r for r in rows}
    want = {(r["path"], r["prompt"]): r for r in map(json.loads, reference.splitlines())}
    assert len(rows) == len(got) == len(want)  # each (image, prompt) once
    for key, r in want.items():  # Ray decoded the PNGs itself: the same pixels, so the same greedy answers
        g = got[key]
        assert (g["text"], g["token_ids"], g["finish_reason"]) == (r["text"], r["token_ids"], r["finish_reason"])
        assert json.loads(g["detections"]) == r["detections"] and (g["width"], g["height"], g["error"]) == (128, 128, "")
