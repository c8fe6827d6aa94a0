"""``dsdkit serve`` (dsdkit.serving): request parsing, limits, pieces and error responses without Ray; then the live
application on a local Ray cluster (``ray`` marker): batching across concurrent requests, split requests, every
endpoint against the in-process Matcher, 4xx answers to bad requests, and the example client."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import ConfigError, MissingDependencyError

from dsdkit.serving import (
    Piece,
    RequestError,
    ServeConfig,
    ServeLimits,
    combine_pieces,
    decode_image,
    error_response,
    format_response,
    parse_request,
    resolve_image_path,
    split_pairs,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo"
DEMO_IMAGES = sorted(DEMO.glob("*.png"))
DEMO_CAPTIONS = [line for line in (DEMO / "captions.txt").read_text("utf-8").splitlines() if line.strip()]

#: Small limits, so that each one can be crossed with a cheap request.
LIMITS = ServeLimits(
    max_body_bytes=1 << 20,
    max_image_bytes=64 << 10,
    max_image_pixels=512 * 512,
    max_images=16,
    max_captions=16,
    max_caption_chars=200,
    max_pairs=64,
)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> dict:
    return {"base64": base64.b64encode(data).decode("ascii")}


def noise_png(size: int, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def flat_png(width: int, height: int) -> bytes:
    from PIL import Image

    return png(Image.new("RGB", (width, height), (200, 30, 30)))


GOOD = DEMO_IMAGES[0].read_bytes()
TOO_MANY_BYTES = noise_png(200)  # ~120 kB of incompressible pixels, but only 40,000 of them
TOO_MANY_PIXELS = flat_png(1000, 1000)  # a few kB, a million pixels
CORRUPT = GOOD[: len(GOOD) // 2]

#: (name, route, body, status, words the message must hold): bad requests and the answer each must get.
BAD_REQUESTS = [
    ("not JSON", "/rank-captions", b"{captions: [", 400, "not valid JSON"),
    ("not UTF-8", "/rank-captions", b"\xff\xfe\x00{", 400, "JSON"),
    ("not an object", "/rank-captions", b"[1, 2]", 400, "JSON object"),
    ("deeply nested", "/rank-captions", b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    ("missing captions", "/rank-captions", {"image": b64(GOOD)}, 422, "missing field 'captions'"),
    ("missing image", "/rank-captions", {"captions": ["a red circle"]}, 422, "missing field 'image'"),
    ("unknown field", "/rank-captions", {"image": b64(GOOD), "captions": ["x"], "topk": 1}, 422, "unknown fields"),
    ("captions not a list", "/rank-captions", {"image": b64(GOOD), "captions": "a red circle"}, 422, "array"),
    ("caption not a string", "/rank-captions", {"image": b64(GOOD), "captions": ["a", 3]}, 422, "captions[1]"),
    ("empty caption", "/rank-captions", {"image": b64(GOOD), "captions": ["a", "  "]}, 422, "empty"),
    ("no captions", "/rank-captions", {"image": b64(GOOD), "captions": []}, 422, "empty"),
    ("top_k zero", "/rank-captions", {"image": b64(GOOD), "captions": ["a"], "top_k": 0}, 422, "top_k"),
    ("top_k boolean", "/rank-captions", {"image": b64(GOOD), "captions": ["a"], "top_k": True}, 422, "top_k"),
    ("image not an object", "/rank-captions", {"image": "abc", "captions": ["a"]}, 422, "base64"),
    ("image both kinds", "/rank-captions", {"image": {**b64(GOOD), "path": "x"}, "captions": ["a"]}, 422, "base64"),
    ("bad base64", "/rank-captions", {"image": {"base64": "not*base64!"}, "captions": ["a"]}, 422, "not valid base64"),
    ("non-ASCII base64", "/rank-captions", {"image": {"base64": "é"}, "captions": ["a"]}, 422, "base64"),
    ("empty image", "/rank-captions", {"image": {"base64": ""}, "captions": ["a"]}, 422, "empty"),
    ("corrupt image", "/rank-captions", {"image": b64(CORRUPT), "captions": ["a"]}, 422, "corrupt"),
    ("not an image", "/rank-captions", {"image": b64(b"hello world"), "captions": ["a"]}, 422, "not a readable"),
    ("image bytes", "/rank-captions", {"image": b64(TOO_MANY_BYTES), "captions": ["a"]}, 413, "max_image_bytes"),
    ("image pixels", "/rank-captions", {"image": b64(TOO_MANY_PIXELS), "captions": ["a"]}, 413, "max_image_pixels"),
    ("too many captions", "/rank-captions", {"image": b64(GOOD), "captions": ["a"] * 17}, 413, "max_captions"),
    ("caption too long", "/rank-captions", {"image": b64(GOOD), "captions": ["a" * 201]}, 413, "max_caption_chars"),
    ("too many images", "/rank-images", {"caption": "a", "images": [b64(GOOD)] * 17}, 413, "max_images"),
    ("caption missing", "/rank-images", {"images": [b64(GOOD)]}, 422, "missing field 'caption'"),
    ("path escapes", "/rank-captions", {"image": {"path": "../outside.png"}, "captions": ["a"]}, 403, "'..'"),
    ("link escapes", "/rank-captions", {"image": {"path": "escape.png"}, "captions": ["a"]}, 403, "outside"),
    ("absolute outside", "/rank-captions", {"image": {"path": "/"}, "captions": ["a"]}, 403, "outside"),
    ("no such path", "/rank-captions", {"image": {"path": "nope.png"}, "captions": ["a"]}, 422, "no such image"),
    (
        "pair out of range",
        "/score-pairs",
        {"images": [b64(GOOD)], "captions": ["a"], "pairs": [[0, 1]]},
        422,
        "out of range",
    ),
    ("pair malformed", "/score-pairs", {"images": [b64(GOOD)], "captions": ["a"], "pairs": [[0]]}, 422, "pairs[0]"),
    (
        "too many pairs",
        "/score-pairs",
        {"images": [b64(GOOD)], "captions": ["a"], "pairs": [[0, 0]] * 65},
        413,
        "max_pairs",
    ),
    ("body too large", "/rank-captions", b" " * ((1 << 20) + 1), 413, "byte limit"),
]


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """The demo images under a root, an image outside it, and a link from inside the root to that image."""
    base = tmp_path_factory.mktemp("serve-root")
    root = base / "root"
    root.mkdir()
    for path in DEMO_IMAGES:
        (root / path.name).write_bytes(path.read_bytes())
    (root / "sub").mkdir()
    (root / "sub" / "inner.png").write_bytes(GOOD)
    (base / "outside.png").write_bytes(GOOD)
    (root / "escape.png").symlink_to(base / "outside.png")
    (root / "inside-link.png").symlink_to(root / "sub" / "inner.png")
    return root


# -- without Ray ---------------------------------------------------------------------------------------------------


def test_import_needs_neither_ray_nor_torch():
    code = "import sys, dsdkit.serving; print(sorted(m for m in ('ray', 'torch', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_ray_is_a_one_line_error_naming_the_extra(monkeypatch):
    from dsdkit import serving

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"'ray' extra .*\.\[ray\]"):
        serving.build_app("bundle")


def test_sigterm_stops_serve_as_ctrl_c_does(monkeypatch, caplog):
    """A SIGTERM while serve() blocks takes the Ctrl-C path: the application is deleted, Ray is left, serve()
    returns, and the previous SIGTERM handler is back (Ray and the app are fakes: this is serve()'s own logic)."""
    import signal
    import types

    from dsdkit import serving

    calls = []
    fake_ray = types.SimpleNamespace(init=lambda **kw: calls.append("init"), shutdown=lambda: calls.append("shutdown"))
    fake_serve = types.SimpleNamespace(
        start=lambda **kw: calls.append("start"),
        run=lambda app, **kw: calls.append(("run", app)),
        delete=lambda name: calls.append(("delete", name)),
    )
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(serving, "_ray_serve", lambda: fake_serve)
    monkeypatch.setattr(serving, "build_app", lambda *a, **kw: "app")

    class PreviousHandlerRan(Exception):
        pass

    def previous_handler(signum, frame):  # raises, so a serve() that kept it fails here instead of blocking
        raise PreviousHandlerRan

    previous = signal.signal(signal.SIGTERM, previous_handler)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with caplog.at_level("INFO", logger="dsdkit.serving"):
            serving.serve("some.bundle", port=8123)
        timer.join()
        assert calls == ["init", "start", ("run", "app"), ("delete", "dsdkit"), "shutdown"]
        assert "dsdkit serve: stopping" in caplog.text
        with pytest.raises(PreviousHandlerRan):  # the handler in place before serve() is back
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_handler_is_left_alone_off_the_main_thread():
    import signal

    from dsdkit.serving import _terminate_as_interrupt

    seen = []

    def inside():
        with _terminate_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    worker = threading.Thread(target=inside)
    worker.start()
    worker.join()
    assert seen == [before]


def test_config_round_trip_and_refusals(tmp_path):
    config = ServeConfig(limits=LIMITS, max_batch_items=32, batch_wait_timeout_s=0.5, num_timesteps=2, top_k=3)
    assert ServeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown keys"):
        ServeConfig.from_dict({"max_batch_item": 3})
    with pytest.raises(ConfigError, match="limits: unknown keys"):
        ServeConfig.from_dict({"limits": {"max_image": 3}})
    for bad in ({"max_batch_items": 0}, {"batch_wait_timeout_s": -1}, {"top_k": True}, {"num_timesteps": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ServeConfig(**bad)
    with pytest.raises(ConfigError, match="decompression-bomb"):
        ServeLimits(max_image_pixels=10**9)
    with pytest.raises(ConfigError, match="image root"):
        ServeConfig(image_root=str(tmp_path / "missing")).root()


def test_parse_requests_of_each_route(image_root):
    config = ServeConfig(limits=LIMITS, top_k=2)
    request = parse_request(
        "/rank-captions", encode({"image": b64(GOOD), "captions": ["a", "b", "c"]}), config, image_root
    )
    assert request.pairs == [(0, 0), (0, 1), (0, 2)] and request.top_k == 2 and len(request.images) == 1
    body = {"caption": "a", "images": [b64(GOOD), {"path": "sub/inner.png"}], "top_k": None}
    request = parse_request("/rank-images", encode(body), config, image_root)
    assert request.pairs == [(0, 0), (1, 0)] and request.top_k is None and request.captions == ["a"]
    assert np.array_equal(np.asarray(request.images[0]), np.asarray(request.images[1]))
    body = {"images": [b64(GOOD)] * 2, "captions": ["a", "b"], "pairs": [[1, 0], [0, 1]]}
    request = parse_request("/score-pairs", encode(body), config, image_root)
    assert request.pairs == [(1, 0), (0, 1)]


@pytest.mark.parametrize("name, route, body, status, words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_are_refused_with_one_line(image_root, name, route, body, status, words):
    with pytest.raises(RequestError) as caught:
        parse_request(route, encode(body), ServeConfig(limits=LIMITS), image_root)
    code, payload = error_response(caught.value)
    assert (code, caught.value.status) == (status, status), payload
    assert words in payload["error"] and "\n" not in payload["error"], payload


def test_paths_under_the_root(image_root):
    assert resolve_image_path("sub/inner.png", image_root) == image_root / "sub" / "inner.png"
    assert resolve_image_path(str(image_root / "sub" / "inner.png"), image_root).is_file()  # absolute, inside
    assert resolve_image_path("inside-link.png", image_root) == image_root / "sub" / "inner.png"
    for value, status in (("../outside.png", 403), ("sub/../../outside.png", 403), ("escape.png", 403)):
        with pytest.raises(RequestError) as caught:
            resolve_image_path(value, image_root)
        assert caught.value.status == status, value
    with pytest.raises(RequestError, match="refused by this server") as caught:
        resolve_image_path("sub/inner.png", None)
    assert caught.value.status == 403
    with pytest.raises(RequestError, match="not a file"):
        resolve_image_path("sub", image_root)
    with pytest.raises(RequestError, match="NUL"):
        resolve_image_path("a\x00b", image_root)
    with pytest.raises(RequestError, match=r"'a\\nb'"):  # a newline in a name stays escaped: messages are one line
        resolve_image_path("a\nb", image_root)


def test_uploads_decode_as_files_do(tmp_path):
    """EXIF orientation and alpha as load_image: an upload scores as the same file read from disk."""
    from dsdkit.runtime.images import load_image
    from PIL import Image

    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0], rgba[5:, :10, 3] = 255, 128
    image = Image.fromarray(rgba, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: load_image turns it upright
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    decoded = decode_image(path.read_bytes(), "image", LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (20, 30)
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(path)))


def test_split_pairs_and_combine_pieces():
    from types import SimpleNamespace

    pairs = [(0, j) for j in range(10)]
    pieces = split_pairs(pairs, steps=3, max_items=8)  # 2 pairs (6 items) per piece
    assert [len(p) for p in pieces] == [2, 2, 2, 2, 2] and sum(pieces, []) == pairs
    assert split_pairs(pairs, steps=2, max_items=100) == [pairs]
    with pytest.raises(ConfigError, match="less than one pair"):
        split_pairs(pairs, steps=4, max_items=3)

    def image(key):
        return SimpleNamespace(key=key)

    def text(t):
        return SimpleNamespace(text=t)

    first = Piece([image("x"), image("y")], [text("a"), text("b")], [(0, 0), (1, 1), (0, 1)], steps=2)
    second = Piece([image("y")], [text("b"), text("c")], [(0, 0), (0, 1)], steps=2)  # (y, b) again
    images, texts, unique, where = combine_pieces([first, second])
    assert [i.key for i in images] == ["x", "y"] and [t.text for t in texts] == ["a", "b", "c"]
    assert unique == [(0, 0), (1, 1), (0, 1), (1, 2)]
    assert [w.tolist() for w in where] == [[0, 1, 2], [1, 3]]
    assert first.work == 6 and second.work == 4


def test_format_response_ranks_stably():
    from dsdkit.serving import ScoreRequest

    request = ScoreRequest("/rank-captions", [None], ["a", "b", "c"], [(0, 0), (0, 1), (0, 2)], top_k=2)
    body = format_response(request, np.array([1.0, 3.0, 3.0]), [489, 989], truncated=[0, 2, 0])
    assert body["ranking"] == [{"index": 1, "score": 3.0, "caption": "b"}, {"index": 2, "score": 3.0, "caption": "c"}]
    assert body["scores"] == [1.0, 3.0, 3.0] and body["truncated"] == [0, 2, 0] and body["timesteps"] == [489, 989]


def test_error_response_never_leaks_a_traceback():
    from dsdkit.runtime.errors import BundleError, InputError

    status, body = error_response(InputError("caption #0 is empty\nsecond line"))
    assert (status, body) == (422, {"error": "caption #0 is empty second line"})
    status, body = error_response(BundleError("bundle damaged"))
    assert status == 500 and "bundle damaged" in body["error"]
    status, body = error_response(KeyError("secret internals"))
    assert status == 500 and "KeyError" in body["error"] and "secret" not in body["error"]


# -- the live application (Ray Serve on a local cluster) -------------------------------------------------------------

S = 2
MAX_BATCH_ITEMS = 32  # 16 pairs at S = 2
#: Generous, so that concurrent requests meet in one scorer batch even on a loaded 2-core machine; a lone request
#: that does not fill a batch waits this long.
BATCH_WAIT_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The demo world model exported as a bundle (about 15 s on 2 cores)."""
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    out = tmp_path_factory.mktemp("serve-bundle") / "demo.bundle"
    config = ExportConfig(exporter="torchscript", parity=ParitySettings(images=2, captions=2, timesteps=1))
    export_bundle("demo", out, config=config)
    return out


@pytest.fixture(scope="module")
def matcher(bundle):
    from dsdkit.runtime.matcher import Matcher

    with Matcher.from_bundle(bundle, num_timesteps=S, threads=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(bundle, image_root):
    """One application on its own local Ray cluster for the module: its URL."""
    import ray
    from ray import serve

    from dsdkit.serving import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(
            limits=LIMITS,
            max_batch_items=MAX_BATCH_ITEMS,
            batch_wait_timeout_s=BATCH_WAIT_S,
            image_root=str(image_root),
            num_timesteps=S,
        )
        serve.run(build_app(bundle, config, cpus_per_replica=1), name="dsdkit-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def call(url: str, route: str, body=None, method: str | None = None) -> tuple[int, str]:
    data = None if body is None else encode(body)
    request = urllib.request.Request(url + route, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def ok(url: str, route: str, body) -> dict:
    status, text = call(url, route, body)
    assert status == 200, text
    return json.loads(text)


def counters(url: str) -> dict:
    return ok(url, "/health", None)["counters"]


def close(served, local) -> None:
    """The batch-invariance tolerance of the scoring contract (fp32 on the CPU)."""
    np.testing.assert_allclose(np.asarray(served, dtype=np.float64), np.asarray(local), rtol=1e-5, atol=1e-6)


def demo_request(n: int) -> dict:
    """Request n: demo image n against four demo captions (its own first), each request a different set."""
    captions = [DEMO_CAPTIONS[(n + k) % len(DEMO_CAPTIONS)] for k in range(4)]
    return {"image": b64(DEMO_IMAGES[n].read_bytes()), "captions": captions}


@pytest.mark.ray
def test_health(server, bundle):
    status, text = call(server, "/health")
    body = json.loads(text)
    assert status == 200 and body["status"] == "ok"
    assert body["config"]["max_batch_items"] == MAX_BATCH_ITEMS and body["config"]["num_timesteps"] == S
    assert len(body["engine"]["timesteps"]) == S and body["engine"]["model"] == "demo"
    assert set(body["counters"]) >= {"requests", "scorer_batches", "pairs_scored", "unet_evaluations"}


@pytest.mark.ray
def test_concurrent_requests_share_scorer_batches_and_match_sequential(server, matcher):
    requests = [demo_request(n) for n in range(8)]
    start = threading.Barrier(len(requests))

    def concurrent(body):
        start.wait()  # all eight leave at once
        return ok(server, "/rank-captions", body)

    before = counters(server)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(concurrent, requests))
    after = counters(server)
    batches = after["scorer_batches"] - before["scorer_batches"]
    assert after["requests"] - before["requests"] == 8 and after["answered"] - before["answered"] == 8
    # Batching happened (fewer batches than requests), and no batch held more than its size in pairs x timesteps.
    work = sum(len(r["captions"]) for r in requests) * S
    assert math.ceil(work / MAX_BATCH_ITEMS) <= batches < len(requests), after

    alone = []
    for body in requests:
        before = counters(server)
        alone.append(ok(server, "/rank-captions", body))
        assert counters(server)["scorer_batches"] - before["scorer_batches"] == 1
    for n, (a, b) in enumerate(zip(together, alone, strict=True)):
        close(a["scores"], b["scores"])
        local = matcher.rank_texts(DEMO_IMAGES[n], requests[n]["captions"])
        close([e["score"] for e in a["ranking"]], [e.score for e in local])
        assert [e["caption"] for e in a["ranking"]] == [e.candidate for e in local]
        assert a["timesteps"] == list(matcher.timesteps)


@pytest.mark.ray
def test_a_request_larger_than_a_batch_is_split(server, matcher):
    images, captions = DEMO_IMAGES[:4], DEMO_CAPTIONS[:6]
    pairs = [(i, j) for i in range(len(images)) for j in range(len(captions))]  # 24 pairs: 48 work items at S = 2
    body = {"images": [b64(p.read_bytes()) for p in images], "captions": captions, "pairs": [list(p) for p in pairs]}
    before = counters(server)
    served = ok(server, "/score-pairs", body)
    after = counters(server)
    pieces = math.ceil(len(pairs) * S / MAX_BATCH_ITEMS)
    assert pieces > 1
    assert after["pieces"] - before["pieces"] == pieces
    assert after["scorer_batches"] - before["scorer_batches"] == pieces  # each piece alone: one batch each
    close(served["scores"], matcher.score_pairs(images, captions, pairs).scores)


@pytest.mark.ray
def test_rank_images_and_paths_under_the_root(server, matcher, image_root):
    caption = DEMO_CAPTIONS[2]
    uploaded = ok(server, "/rank-images", {"caption": caption, "images": [b64(p.read_bytes()) for p in DEMO_IMAGES]})
    by_path = ok(
        server, "/rank-images", {"caption": caption, "images": [{"path": p.name} for p in DEMO_IMAGES], "top_k": 3}
    )
    local = matcher.rank_images(caption, DEMO_IMAGES)
    close(uploaded["scores"], by_path["scores"])
    close([e["score"] for e in uploaded["ranking"]], [e.score for e in local])
    assert [e["index"] for e in by_path["ranking"]] == [e["index"] for e in uploaded["ranking"]][:3]
    status, text = call(server, "/rank-images", {"caption": caption, "images": [{"path": "escape.png"}]})
    assert status == 403 and "outside the image root" in json.loads(text)["error"]


@pytest.mark.ray
@pytest.mark.parametrize("name, route, body, status, words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_one_line_4xx_over_http(server, name, route, body, status, words):
    got, text = call(server, route, body)
    assert got == status, text
    assert "Traceback" not in text and "\n" not in text.strip()
    assert words in json.loads(text)["error"]


@pytest.mark.ray
def test_routes_methods_and_no_server_errors(server):
    status, text = call(server, "/rank-everything", {})
    assert status == 404 and "no endpoint" in json.loads(text)["error"]
    status, text = call(server, "/rank-captions")  # a GET
    assert status == 405 and "POST" in json.loads(text)["error"]
    status, text = call(server, "/health", {}, method="POST")
    assert status == 405 and "GET" in json.loads(text)["error"]
    assert counters(server)["failed"] == 0


@pytest.fixture(scope="module")
def client():
    spec = importlib.util.spec_from_file_location("serve_client", REPO / "examples" / "serve_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
def test_example_client(server, matcher, client, capsys):
    assert client.health(server)["status"] == "ok"
    out = client.rank_captions(server, DEMO_IMAGES[1], DEMO_CAPTIONS[:5], top_k=2)
    assert len(out["ranking"]) == 2
    close(out["scores"], matcher.score_pairs(DEMO_IMAGES[1:2], DEMO_CAPTIONS[:5], [(0, j) for j in range(5)]).scores)
    out = client.rank_images(server, DEMO_CAPTIONS[0], ["00-a-red-circle.png", "sub/inner.png"], server_path=True)
    close(out["scores"][0], out["scores"][1])  # the same pixels under two names
    out = client.score_pairs(server, DEMO_IMAGES[:2], DEMO_CAPTIONS[:2], [(1, 0), (0, 1)])
    close(out["scores"], matcher.score_pairs(DEMO_IMAGES[:2], DEMO_CAPTIONS[:2], [(1, 0), (0, 1)]).scores)
    with pytest.raises(client.ServeError) as caught:
        client.rank_captions(server, DEMO_IMAGES[0], ["x" * 201])
    assert caught.value.status == 413 and "max_caption_chars" in caught.value.message
    assert client.main(["--url", server, "rank-captions", str(DEMO_IMAGES[0]), "--caption", "a red circle"]) == 0
    assert json.loads(capsys.readouterr().out)["ranking"][0]["caption"] == "a red circle"
    assert client.main(["--url", server, "--server-paths", "rank-images", "a", "nope.png"]) == 1
    assert "HTTP 422" in capsys.readouterr().err
