"""The page at `/` in a real browser: headless Chromium driven by Playwright, against the real server.

Upload a generated scene, run `detect` with attention maps on, wait for the streamed text, and check that the
page drew the boxes the API returns (the canvas's `data-boxes`) and an attention map per token; the screenshot
goes to docs/serve_page.png. Needs Debian's chromium (/usr/bin/chromium) and `pip install playwright` (never
`playwright install`: the system browser is used, nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("starlette", reason="npvlm serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="npvlm serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("httpx", reason="the test compares the page with the API through httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")
CHROMIUM = os.environ.get("NPVLM_CHROMIUM", "/usr/bin/chromium")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; or set NPVLM_CHROMIUM)", allow_module_level=True)

import npvlm  # noqa: E402
from npvlm.demo.scenes import eval_seeds, make_scene  # noqa: E402
from test_serve import TIMEOUT, _body, _post, _Server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    s = _Server(npvlm.load(), max_batch=2)
    yield s
    s.close()


def test_page_detects_draws_the_api_boxes_and_shows_attention(server, tmp_path):
    seed = eval_seeds()[0]  # a scene with a triangle, a square and a circle; `detect circle` finds the circle
    scene = make_scene(seed)
    png = tmp_path / "scene.png"
    scene.image.resize((384, 384)).save(png)  # larger, so the screenshot is readable; boxes scale with it
    api = _post(server, {**_body(seed, "detect circle", 32), "messages": [{"role": "user", "content": [
        {"type": "text", "text": "detect circle"}, {"type": "image_url", "image_url": {"url": _data_url(png)}}]}]},
        key=None).json()
    assert api["detections"], api  # the API finds the circle: the page must draw the same box
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/", timeout=TIMEOUT * 1000)
            page.set_input_files("#file", str(png))
            page.wait_for_function("document.getElementById('canvas').width > 1", timeout=TIMEOUT * 1000)
            page.select_option("#task", "detect")
            page.fill("#text", "circle")
            page.fill("#max", "32")
            page.check("#attn")
            page.click("#go")
            page.wait_for_function("document.getElementById('canvas').dataset.state === 'done'", timeout=TIMEOUT * 1000)
            text = page.inner_text("#out")
            drawn = json.loads(page.get_attribute("#canvas", "data-boxes"))
            tokens = page.locator("#tokens span")
            n_tokens = tokens.count()
            tokens.nth(n_tokens - 1).hover()  # hovering a token shows its map
            shown = page.get_attribute("#canvas", "data-attention-token")
            peak = json.loads(page.get_attribute("#canvas", "data-attention-peak"))
            tokens.nth(min(2, n_tokens - 1)).hover()  # the screenshot: a location token, whose map is on the circle
            os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
            page.screenshot(path=os.path.join(ROOT, "docs", "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert text == api["choices"][0]["message"]["content"]  # the streamed text, complete
    assert drawn == [{"label": d["label"], "box": d["box"]} for d in api["detections"]]  # exactly the API's boxes
    assert n_tokens == api["usage"]["completion_tokens"] - (api["choices"][0]["finish_reason"] == "stop")
    assert shown == str(n_tokens - 1) and len(peak) == 2 and all(0 <= v < 4 for v in peak)


def _data_url(path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()
