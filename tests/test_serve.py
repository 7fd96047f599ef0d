"""`npvlm serve` end to end: the real uvicorn server on a free loopback port, called with the official
`openai` client and with raw HTTP (httpx). Answers must equal `npvlm.load().generate(...)` for the same
image, prompt and settings, alone or among concurrent clients; every bad request is a 4xx JSON error and
the server keeps answering. Every network call has a timeout; everything binds 127.0.0.1."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="npvlm serve needs the serve extra (starlette, uvicorn)")
uvicorn = pytest.importorskip("uvicorn", reason="npvlm serve needs the serve extra (starlette, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the tests call the server with httpx")
openai = pytest.importorskip("openai", reason="the tests call the server with the official openai client")

import npvlm  # noqa: E402
from npvlm.demo.scenes import make_scene  # noqa: E402
from npvlm.serve.app import make_app  # noqa: E402
from npvlm.serve.engine import Engine  # noqa: E402

KEY = "test-key-123"
TIMEOUT = 60.0  # seconds per HTTP call: the embedded model answers in well under a second


def _png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, model, **kw):
        engine_kw = {k: kw.pop(k) for k in ("max_batch", "max_queue") if k in kw}
        self.engine = kw.pop("engine_cls", Engine)(model, **engine_kw)
        app = make_app(model, self.engine, **kw)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30, "the server did not start within 30 s"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def model():
    return npvlm.load()


@pytest.fixture(scope="module")
def server(model):
    s = _Server(model, api_key=KEY, max_batch=8, max_queue=32, max_body_bytes=2 << 20, max_image_pixels=300 * 300)
    yield s
    s.close()


def _body(scene, prompt, n=24, **kw):
    return {"model": "npvlm", "max_tokens": n, **kw, "messages": [{"role": "user", "content": [
        {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": _png_url(make_scene(scene).image)}}]}]}


def _post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT, **kw)


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def _alone(model, scene, prompt, n, **kw):
    return model.generate(make_scene(scene).image, prompt, max_new_tokens=n, **kw)


JOBS = [(1, "caption en", 40), (2, "detect circle", 30), (3, "caption en", 5), (4, "answer en how many shapes?", 20),
        (5, "detect square ; triangle", 40), (6, "caption en", 12), (7, "detect circle ; square", 48), (8, "caption en", 3)]


def test_openai_client_plain_and_streamed_equal_generate(server, model):
    c = _client(server)
    for seed, prompt, n in JOBS[:3]:
        want = _alone(model, seed, prompt, n)
        msgs = _body(seed, prompt)["messages"]
        r = c.chat.completions.create(model="npvlm", messages=msgs, max_tokens=n)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
        # completion_tokens counts every token the model produced, the closing <eos> too (as vLLM counts them)
        assert r.usage.completion_tokens == len(want.token_ids) + (want.finish_reason == "eos")
        assert r.usage.prompt_tokens == want.stats["prompt_tokens"]
        pieces, reasons, usage = [], [], None
        for ch in c.chat.completions.create(model="npvlm", messages=msgs, max_tokens=n, stream=True,
                                            stream_options={"include_usage": True}):
            if ch.usage is not None:
                usage = ch.usage
            for choice in ch.choices:
                pieces.append(choice.delta.content or "")
                reasons.append(choice.finish_reason)
        assert "".join(pieces) == want.text
        assert reasons[-1] == r.choices[0].finish_reason and all(x is None for x in reasons[:-1])
        assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_detections_are_in_original_pixels(server, model):
    want = _alone(model, 2, "detect circle", 30)
    r = _post(server, _body(2, "detect circle", 30))
    assert r.status_code == 200
    got = r.json()["detections"]
    assert [d["label"] for d in got] == [d.label for d in want.detections]
    for g, w in zip(got, want.detections):
        assert g["box"] == pytest.approx(list(w.box), abs=0.01)  # the server rounds to 2 decimals


def test_sampling_with_seed_matches_generate(server, model):
    want = _alone(model, 3, "caption en", 20, temperature=0.9, top_p=0.95, seed=7)
    r = _post(server, _body(3, "caption en", 20, temperature=0.9, top_p=0.95, seed=7))
    assert r.json()["choices"][0]["message"]["content"] == want.text


def test_stop_string_cuts_the_answer(server, model):
    want = _alone(model, 1, "caption en", 40).text
    assert " of " in want, want  # the scene's caption names a relation
    r = _post(server, _body(1, "caption en", 40, stop=[" of "]))
    assert r.json()["choices"][0]["message"]["content"] == want[:want.index(" of ")]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_concurrent_clients_get_their_answers_alone(server, model):
    want = [_alone(model, s, p, n).text for s, p, n in JOBS]

    def ask(job, stream):
        s, p, n = job
        c = _client(server)
        msgs = _body(s, p)["messages"]
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="npvlm", messages=msgs, max_tokens=n, stream=True)
                           if ch.choices)
        return c.chat.completions.create(model="npvlm", messages=msgs, max_tokens=n).choices[0].message.content

    for rnd in range(2):  # a bounded number of rounds, streamed and not
        with cf.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, JOBS, [(i + rnd) % 2 == 0 for i in range(8)], timeout=TIMEOUT))
        assert got == want


class _SlowEngine(Engine):
    """The embedded model answers in milliseconds, faster than a client can hang up: 50 ms a step
    stands in for a large model, so a client leaving after its first chunk leaves mid-answer."""

    def _step(self):
        time.sleep(0.05)
        super()._step()


def test_late_requests_join_the_running_batch(model):
    s = _Server(model, max_batch=8, engine_cls=_SlowEngine)
    want = [_alone(model, sd, p, n).text for sd, p, n in JOBS]

    def ask(i):
        time.sleep(0.1 * i)  # arrivals staggered over 0.7 s, while earlier answers are being decoded
        sd, p, n = JOBS[i]
        return _post(s, _body(sd, p, n), key=None).json()["choices"][0]["message"]["content"]

    try:
        with cf.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(8), timeout=TIMEOUT))
        assert got == want
        assert s.engine.load()["peak_running"] >= 3  # they were decoded together, not one after another
    finally:
        s.close()


def test_disconnect_mid_stream_leaves_others_intact(model):
    job = (1, "caption en", 40)
    want = _alone(model, 7, "detect circle ; square", 48).text
    assert len(_alone(model, *job).token_ids) >= 6  # long enough (>= 0.3 s here) to leave in the middle
    s = _Server(model, max_batch=4, engine_cls=_SlowEngine)

    def quitter():
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={**_body(*job), "stream": True}) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # leave after the first piece of text

    try:
        with cf.ThreadPoolExecutor(4) as pool:
            quits = [pool.submit(quitter) for _ in range(2)]
            others = [pool.submit(lambda: _post(s, _body(7, "detect circle ; square", 48), key=None).json())
                      for _ in range(2)]
            for q in quits:
                q.result(timeout=TIMEOUT)
            assert [o.result(timeout=TIMEOUT)["choices"][0]["message"]["content"] for o in others] == [want, want]
        t0 = time.time()
        while s.engine.load()["running"]:
            assert time.time() - t0 < 10, s.engine.load()
            time.sleep(0.05)
        assert s.engine.load()["dropped"] == 2  # both rows were freed early, not decoded to their end
        assert _post(s, _body(8, "caption en", 3), key=None).json()["choices"][0]["message"]["content"] == \
            _alone(model, 8, "caption en", 3).text
    finally:
        s.close()


def test_auth_models_health(server):
    assert _post(server, _body(1, "caption en"), key=None).status_code == 401
    r = _post(server, _body(1, "caption en"), key="wrong")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", timeout=TIMEOUT, max_retries=0).models.list()
    assert [m.id for m in _client(server).models.list()] == ["npvlm"]
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"


def _big_png_url(side):
    from PIL import Image

    return _png_url(Image.new("RGB", (side, side), (10, 20, 30)))


def _with_url(url):
    b = _body(1, "caption en")
    b["messages"][0]["content"][1]["image_url"]["url"] = url
    return b


BAD = {
    "malformed JSON": (lambda: dict(content=b'{"model": "npvlm", "messages": [', headers={"Content-Type": "application/json"}), 400, "JSON"),
    "not an object": (lambda: dict(json=[1, 2]), 400, "object"),
    "non-image data URL": (lambda: dict(json=_with_url("data:text/plain;base64,aGVsbG8=")), 400, "image/*"),
    "bad base64": (lambda: dict(json=_with_url("data:image/png;base64,@@@")), 400, "base64"),
    "not an image": (lambda: dict(json=_with_url("data:image/png;base64," + base64.b64encode(b"x" * 50).decode())), 400, "readable"),
    "remote URL": (lambda: dict(json=_with_url("http://169.254.169.254/latest")), 400, "remote"),
    "too many pixels": (lambda: dict(json=_with_url(_big_png_url(400))), 413, "pixels"),
    "body too large": (lambda: dict(json={**_body(1, "caption en"), "pad": "x" * (3 << 20)}), 413, "limit"),
    "missing image": (lambda: dict(json={"messages": [{"role": "user", "content": "caption en"}]}), 400, "image"),
    "unknown model": (lambda: dict(json={**_body(1, "caption en"), "model": "gpt-9"}), 404, "gpt-9"),
    "max_tokens -1": (lambda: dict(json={**_body(1, "caption en"), "max_tokens": -1}), 400, "max_tokens"),
    "max_tokens too big": (lambda: dict(json={**_body(1, "caption en"), "max_tokens": 100000}), 400, "context"),
    "temperature": (lambda: dict(json={**_body(1, "caption en"), "temperature": "hot"}), 400, "temperature"),
    "no messages": (lambda: dict(json={"model": "npvlm"}), 400, "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_4xx_json_and_server_lives(server, model, case):
    make, status, word = BAD[case]
    kw = make()
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})},
                   timeout=TIMEOUT, **kw)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert word in msg and "Traceback" not in msg
    ok = _post(server, _body(8, "caption en", 3))
    assert ok.json()["choices"][0]["message"]["content"] == _alone(model, 8, "caption en", 3).text


def test_queue_full_is_429_with_retry_after(model):
    s = _Server(model, max_batch=1, max_queue=2)
    try:
        s.engine.pause()  # nothing is admitted: the queue fills
        with cf.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(_post, s, _body(k, "caption en", 8), None) for k in (1, 2)]
            t0 = time.time()
            while s.engine.load()["waiting"] < 2:
                assert time.time() - t0 < 10, s.engine.load()
                time.sleep(0.02)
            r = _post(s, _body(3, "caption en", 8), key=None)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert "busy" in r.json()["error"]["message"]
            s.engine.resume()
            got = [w.result(timeout=TIMEOUT).json()["choices"][0]["message"]["content"] for w in waiting]
        assert got == [_alone(model, k, "caption en", 8).text for k in (1, 2)]
    finally:
        s.engine.resume()
        s.close()


def test_cli_parses_serve():
    from npvlm.apps.cli import build_parser

    a = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "2", "--api-key", "k"])
    assert (a.host, a.port, a.max_batch, a.api_key, a.allow_remote_images) == ("127.0.0.1", 0, 2, "k", False)


def test_page_is_self_contained(server):
    r = httpx.get(server.url + "/", timeout=TIMEOUT)  # the page needs no key: the key is typed into it
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "<canvas" in r.text
    assert "src=\"http" not in r.text and "href=\"http" not in r.text  # no CDN: it works offline
