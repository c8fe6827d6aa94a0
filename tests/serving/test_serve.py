"""``dsdkit serve`` (dsdkit.serving): request parsing, limits, batching and bounds without a server; then the live
server through the real command, once per runner (in-process always; Ray Serve on a loopback-only local cluster
under the ``ray`` marker): the same routes, limits, batching, deadlines and protections on both."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from dsdkit.runtime.errors import ConfigError, MissingDependencyError

from dsdkit.serving import (
    Batcher,
    Busy,
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

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
DEMO_IMAGES = sorted(DEMO.glob("*.png"))
DEMO_CAPTIONS = [line for line in (DEMO / "captions.txt").read_text("utf-8").splitlines() if line.strip()]
DSDKIT = Path(sys.executable).parent / "dsdkit"

#: Small limits, so that each one can be crossed with a cheap request.
LIMITS = ServeLimits(
    max_body_bytes=1 << 20,
    max_image_bytes=64 << 10,
    max_image_pixels=512 * 512,
    max_request_pixels=300_000,
    max_images=16,
    max_captions=16,
    max_caption_chars=200,
    max_pairs=64,
    max_work_items=64,
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
HALF_THE_PIXELS = flat_png(500, 400)  # 200,000 pixels: one fits a request, two do not
CORRUPT = GOOD[: len(GOOD) // 2]
HUGE_TOP_K = b'{"image": {"path": "x.png"}, "captions": ["a"], "top_k": ' + b"9" * 5000 + b"}"

#: (name, route, body, status, words the message must hold): bad requests and the answer each must get.
BAD_REQUESTS = [
    ("not JSON", "/rank-captions", b"{captions: [", 400, "not valid JSON"),
    ("not UTF-8", "/rank-captions", b"\xff\xfe\x00{", 400, "JSON"),
    ("not an object", "/rank-captions", b"[1, 2]", 400, "JSON object"),
    ("deeply nested", "/rank-captions", b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    ("NaN", "/rank-captions", b'{"captions": ["a"], "top_k": NaN}', 400, "not JSON"),
    ("5,000-digit top_k", "/rank-captions", HUGE_TOP_K, 422, "5,000 digits"),
    ("missing captions", "/rank-captions", {"image": b64(GOOD)}, 422, "missing field 'captions'"),
    ("missing image", "/rank-captions", {"captions": ["a red circle"]}, 422, "missing field 'image'"),
    ("unknown field", "/rank-captions", {"image": b64(GOOD), "captions": ["x"], "topk": 1}, 422, "unknown fields"),
    ("captions not a list", "/rank-captions", {"image": b64(GOOD), "captions": "a red circle"}, 422, "array"),
    ("caption not a string", "/rank-captions", {"image": b64(GOOD), "captions": ["a", 3]}, 422, "captions[1]"),
    ("empty caption", "/rank-captions", {"image": b64(GOOD), "captions": ["a", "  "]}, 422, "empty"),
    ("no captions", "/rank-captions", {"image": b64(GOOD), "captions": []}, 422, "empty"),
    ("top_k zero", "/rank-captions", {"image": b64(GOOD), "captions": ["a"], "top_k": 0}, 422, "top_k"),
    ("top_k boolean", "/rank-captions", {"image": b64(GOOD), "captions": ["a"], "top_k": True}, 422, "top_k"),
    ("bad schedule", "/rank-captions", {"image": b64(GOOD), "captions": ["a"], "adaptive": "keep=1"}, 422, "adaptive"),
    ("bad timeout", "/rank-captions", {"image": b64(GOOD), "captions": ["a"], "timeout_s": -1}, 422, "timeout_s"),
    ("image not an object", "/rank-captions", {"image": "abc", "captions": ["a"]}, 422, "base64"),
    ("image both kinds", "/rank-captions", {"image": {**b64(GOOD), "path": "x"}, "captions": ["a"]}, 422, "base64"),
    ("bad base64", "/rank-captions", {"image": {"base64": "not*base64!"}, "captions": ["a"]}, 422, "not valid base64"),
    ("non-ASCII base64", "/rank-captions", {"image": {"base64": "é"}, "captions": ["a"]}, 422, "base64"),
    ("empty image", "/rank-captions", {"image": {"base64": ""}, "captions": ["a"]}, 422, "empty"),
    ("corrupt image", "/rank-captions", {"image": b64(CORRUPT), "captions": ["a"]}, 422, "corrupt"),
    ("not an image", "/rank-captions", {"image": b64(b"hello world"), "captions": ["a"]}, 422, "not a readable"),
    ("image bytes", "/rank-captions", {"image": b64(TOO_MANY_BYTES), "captions": ["a"]}, 413, "max_image_bytes"),
    ("image pixels", "/rank-captions", {"image": b64(TOO_MANY_PIXELS), "captions": ["a"]}, 413, "max_image_pixels"),
    (
        "request pixels",
        "/rank-images",
        {"caption": "a", "images": [b64(HALF_THE_PIXELS)] * 2},
        413,
        "max_request_pixels",
    ),
    ("too many captions", "/rank-captions", {"image": b64(GOOD), "captions": ["a"] * 17}, 413, "max_captions"),
    ("caption too long", "/rank-captions", {"image": b64(GOOD), "captions": ["a" * 201]}, 413, "max_caption_chars"),
    ("too many images", "/rank-images", {"caption": "a", "images": [b64(GOOD)] * 17}, 413, "max_images"),
    ("caption missing", "/rank-images", {"images": [b64(GOOD)]}, 422, "missing field 'caption'"),
    ("explain caption missing", "/explain", {"image": b64(GOOD)}, 422, "missing field 'caption'"),
    ("path escapes", "/rank-captions", {"image": {"path": "../outside.png"}, "captions": ["a"]}, 403, "'..'"),
    ("link escapes", "/rank-captions", {"image": {"path": "escape.png"}, "captions": ["a"]}, 403, "outside"),
    ("absolute outside", "/rank-captions", {"image": {"path": "/"}, "captions": ["a"]}, 403, "outside"),
    ("/etc/passwd", "/rank-captions", {"image": {"path": "/etc/passwd"}, "captions": ["a"]}, 403, "outside"),
    ("/etc/nope", "/rank-captions", {"image": {"path": "/etc/nope"}, "captions": ["a"]}, 403, "outside"),
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
    (root / "to-etc").symlink_to("/etc")
    return root


# -- without a server ------------------------------------------------------------------------------------------------


def test_import_needs_neither_ray_nor_uvicorn_nor_torch():
    code = (
        "import sys, dsdkit.serving\n"
        "print(sorted(m for m in ('ray', 'torch', 'onnxruntime', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_ray_or_uvicorn_is_a_one_line_error_naming_the_extra(monkeypatch):
    from dsdkit.serving import build_app, local

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"'ray' extra .*\.\[ray\]"):
        build_app("bundle")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingDependencyError, match=r"'serve' extra .*\.\[serve\]"):
        local._uvicorn()


def test_config_round_trip_and_refusals(tmp_path):
    config = ServeConfig(
        limits=LIMITS, max_batch_items=32, batch_wait_timeout_s=0.5, top_k=3, allowed_hosts=("dsd.example",)
    )
    assert ServeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "dsd.example" in config.hosts() and "localhost" in config.hosts()
    with pytest.raises(ConfigError, match="unknown keys"):
        ServeConfig.from_dict({"max_batch_item": 3})
    with pytest.raises(ConfigError, match="limits: unknown keys"):
        ServeConfig.from_dict({"limits": {"max_image": 3}})
    bad_values = (
        {"max_batch_items": 0},
        {"batch_wait_timeout_s": -1},
        {"top_k": True},
        {"request_timeout_s": 0},
        {"max_receiving": 1.5},
        {"text_cache_bytes": -1},
        {"allowed_hosts": "localhost"},
    )
    for bad in bad_values:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ServeConfig(**bad)
    with pytest.raises(ConfigError, match="decompression-bomb"):
        ServeLimits(max_image_pixels=10**9)
    with pytest.raises(ConfigError, match="max_pixels_in_flight"):
        ServeConfig(max_pixels_in_flight=1_000_000)  # under the default max_request_pixels
    with pytest.raises(ConfigError, match="max_queued_work"):
        ServeConfig(max_queued_work=100)  # under the default max_work_items
    with pytest.raises(ConfigError, match="image root"):
        ServeConfig(image_root=str(tmp_path / "missing")).root()


def test_parse_requests_of_each_route(image_root):
    config = ServeConfig(limits=LIMITS, top_k=2)
    body = {"image": b64(GOOD), "captions": ["a", "b", "c"], "adaptive": True, "timeout_s": 5}
    request = parse_request("/rank-captions", encode(body), config, image_root)
    assert request.pairs == [(0, 0), (0, 1), (0, 2)] and request.top_k == 2 and len(request.images) == 1
    assert request.adaptive == "default" and request.timeout_s == 5.0
    body = {"caption": "a", "images": [b64(GOOD), {"path": "sub/inner.png"}], "top_k": None}
    request = parse_request("/rank-images", encode(body), config, image_root)
    assert request.pairs == [(0, 0), (1, 0)] and request.top_k is None and request.captions == ["a"]
    assert np.array_equal(np.asarray(request.images[0]), np.asarray(request.images[1]))
    body = {"images": [b64(GOOD)] * 2, "captions": ["a", "b"], "pairs": [[1, 0], [0, 1]]}
    request = parse_request("/score-pairs", encode(body), config, image_root)
    assert request.pairs == [(1, 0), (0, 1)]
    request = parse_request("/explain", encode({"image": b64(GOOD), "caption": "a"}), config, image_root, decode=False)
    assert request.pairs == [(0, 0)] and request.pixels == 64 * 64 and request.images[0].data == GOOD


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


def test_paths_outside_the_root_cannot_probe_the_disk(image_root):
    """A file that exists and one that does not, outside the root, get the same answer: directly, and through a
    link in the root that leads out."""

    def answer(value):
        with pytest.raises(RequestError) as caught:
            resolve_image_path(value, image_root)
        return caught.value.status, str(caught.value).replace(repr(value), "PATH")

    assert Path("/etc/passwd").exists() and not Path("/etc/nope").exists()
    assert answer("/etc/passwd") == answer("/etc/nope")
    assert answer("to-etc/passwd") == answer("to-etc/nope")
    assert answer("/etc/passwd")[0] == 403


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


def test_format_response_ranks_stably_with_margins():
    from dsdkit.serving import ScoreRequest

    request = ScoreRequest("/rank-captions", [None], ["a", "b", "c"], [(0, 0), (0, 1), (0, 2)], top_k=2)
    body = format_response(request, np.array([1.0, 3.0, 2.5]), [489, 989], truncated=[0, 2, 0])
    assert body["ranking"] == [
        {"index": 1, "score": 3.0, "caption": "b", "margin": 0.5},
        {"index": 2, "score": 2.5, "caption": "c", "margin": None},
    ]
    assert body["scores"] == [1.0, 3.0, 2.5] and body["truncated"] == [0, 2, 0] and body["timesteps"] == [489, 989]
    # Adaptive: candidates that held more timesteps rank first (their scores are exact), as runtime.adaptive orders.
    request.top_k = None
    body = format_response(request, np.array([1.0, 3.0, 2.0]), [489, 989], exact=[True, False, False], held=[2, 1, 1])
    assert [e["index"] for e in body["ranking"]] == [0, 1, 2]
    assert [e["exact"] for e in body["ranking"]] == [True, False, False]


def test_error_response_never_leaks_a_traceback():
    from dsdkit.runtime.errors import BundleError, InputError

    status, body = error_response(InputError("caption #0 is empty\nsecond line"))
    assert (status, body) == (422, {"error": "caption #0 is empty second line"})
    status, body = error_response(BundleError("bundle damaged"))
    assert status == 500 and "bundle damaged" in body["error"]
    status, body = error_response(KeyError("secret internals"))
    assert status == 500 and "KeyError" in body["error"] and "secret" not in body["error"]


def test_shared_cache_byte_bound_is_lru_and_counts_shared_buffers_once():
    from dsdkit.runtime.engine import SharedCache

    batch = np.zeros((4, 1000), dtype=np.float32)  # 16,000 bytes, four cached rows share it
    cache = SharedCache()
    cache.fetch(list(range(4)), lambda keys: [batch[k] for k in keys])
    assert cache.bytes == 0  # measured only under a bound
    cache.bound(20_000)
    assert len(cache) == 4 and cache.bytes == 16_000  # rows are views: the batch counts once
    for name in ("x", "y"):  # 4,000 bytes each: 24,000 in all, over the bound
        cache.fetch([name], lambda keys: [np.zeros(1000, dtype=np.float32)])
    # The four rows were least recently used; their batch leaves only with the last of them.
    assert list(cache._values) == ["x", "y"] and cache.bytes == 8_000
    cache.fetch(["x"], lambda keys: pytest.fail("x is cached"))  # used: now the most recent
    cache.bound(6_000)
    assert list(cache._values) == ["x"] and cache.bytes == 4_000
    cache.fetch(["big"], lambda keys: [np.zeros(10_000, dtype=np.float32)])  # alone over the bound: not kept
    assert list(cache._values) == ["x"] and cache.bytes == 4_000
    cache.bound(None)
    cache.fetch(["big"], lambda keys: [np.zeros(10_000, dtype=np.float32)])
    assert "big" in cache and "x" in cache  # no bound, no eviction


def test_batcher_is_fair_bounded_and_drops_what_a_request_gives_up():
    """Round-robin across requests (a small request is in the next batch, not behind a large one), the queue bound
    answered at once, and a cancelled request's queued pieces never scored."""
    scored: list[list[str]] = []

    def run_batch(pieces):
        time.sleep(0.05)
        scored.append([p.images for p in pieces])
        return [p.images for p in pieces]

    def piece(name, work=2):
        return Piece(name, [], [(0, 0)] * (work // 2), steps=2)

    async def scenario():
        batcher = Batcher(run_batch, max_items=4, wait_s=0.05, max_queued=12)
        # Both queued before the first batch forms: the large one first.
        large = asyncio.ensure_future(batcher.submit([piece(f"L{n}") for n in range(5)], batcher.new_owner()))
        small = asyncio.ensure_future(batcher.submit([piece("S")], batcher.new_owner()))
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="max_queued_work"):
            await batcher.submit([piece("X", 2)] * 3, batcher.new_owner())  # 12 (or 8) queued + 6 > 12
        assert await small == ["S"]
        assert await large == [f"L{n}" for n in range(5)]
        assert scored[0] == ["L0", "S"]  # the small request shares the first batch
        scored.clear()
        # A request that gives up while its piece waits for the batch to fill: never scored.
        doomed = asyncio.ensure_future(batcher.submit([piece("D")], batcher.new_owner()))
        await asyncio.sleep(0.01)
        assert batcher.queued_work == 2
        doomed.cancel()
        await asyncio.sleep(0.2)
        assert batcher.queued_work == 0 and not scored
        # One that gives up while its first batch runs: the rest of its pieces never run.
        doomed = asyncio.ensure_future(batcher.submit([piece(f"D{n}") for n in range(5)], batcher.new_owner()))
        await asyncio.sleep(0.01)
        assert batcher.queued_work == 6  # 4 of its 10 items are in the running batch
        doomed.cancel()
        await asyncio.sleep(0.3)
        assert batcher.queued_work == 0 and scored == [["D0", "D1"]]
        batcher.close()

    asyncio.run(scenario())


def test_pixel_budget_waits_for_its_share():
    from dsdkit.serving.app import _Load

    async def scenario():
        load = _Load(ServeConfig(limits=ServeLimits(max_request_pixels=100), max_pixels_in_flight=100))
        await load.take_pixels(70)
        waiting = asyncio.ensure_future(load.take_pixels(50))
        await asyncio.sleep(0.05)
        assert not waiting.done() and load.pixels == 70
        load.give_pixels(70)
        await asyncio.wait_for(waiting, 1)
        assert load.pixels == 50

    asyncio.run(scenario())


@pytest.mark.ray
def test_match_ray_local_starts_a_loopback_only_cluster():
    """`match --ray local` (and `serve --ray local`) start their cluster through init_local_cluster: every port
    of every process it starts listens on loopback (read from the processes' own listening sockets)."""
    code = """
import json, os, psutil, ray
from dsdkit.jobs.ray_runner import _connect
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
assert _connect(ray, "local") is True

@ray.remote
class Probe:
    def pid(self):
        return os.getpid()

ray.get(Probe.remote().pid.remote())
me = psutil.Process()
found = []
for process in [me] + me.children(recursive=True):
    try:
        found += [[process.name(), c.laddr.ip, c.laddr.port] for c in process.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(listening) >= 3  # GCS, raylet, workers: the probe saw the cluster
    assert all(_loopback(ip) for _, ip, _ in listening), listening


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or ip.startswith("127.")


@pytest.mark.parametrize("runner", ["in-process", pytest.param("ray", marks=pytest.mark.ray)])
def test_damaged_bundle_exits_7_in_one_line_before_serving(bundle, tmp_path, runner):
    import shutil

    damaged = tmp_path / "damaged.bundle"
    shutil.copytree(bundle, damaged)
    graph = next((damaged / "onnx").glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-100] + b"\0" * 100)
    command = [DSDKIT, "serve", str(damaged), "--port", str(free_port())]
    if runner == "ray":
        command += ["--ray", "local"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 7, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out.stderr, out.stderr
    assert "ready at" not in out.stdout


@pytest.mark.parametrize("runner", ["in-process", pytest.param("ray", marks=pytest.mark.ray)])
def test_missing_model_exits_4_in_one_line_before_serving(tmp_path, runner):
    command = [DSDKIT, "serve", "--model", str(tmp_path / "no-model"), "--port", str(free_port())]
    if runner == "ray":
        command += ["--ray", "local"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 4, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "no-model" in out.stderr and "Traceback" not in out.stderr


# -- the live server, once per runner ------------------------------------------------------------------------------

S = 2
MAX_BATCH_ITEMS = 32  # 16 pairs at S = 2
#: Generous, so that concurrent requests meet in one scorer batch even on a loaded 2-core machine; a lone request
#: that does not fill a batch waits this long (the deadline test relies on that wait).
BATCH_WAIT_S = 0.5
RECEIVE_TIMEOUT_S = 3.0
MAX_RECEIVING = 40
TEXT_CACHE_BYTES = 200_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


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


class Served:
    """A `dsdkit serve` process: its URL, runner and process."""

    def __init__(self, runner: str, process: subprocess.Popen, url: str, ready: str, stderr_path: Path):
        self.runner, self.process, self.url, self.ready, self.stderr_path = runner, process, url, ready, stderr_path
        split = urlsplit(url)
        self.host, self.port = split.hostname, split.port
        self.session_dir = _ray_session(process.pid) if runner == "ray" else None

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def launch(command: list, stderr_path: Path, timeout: float = 300) -> tuple[subprocess.Popen, str, float]:
    """Start a `dsdkit serve` command; its process, ready line and seconds to it."""
    started = time.monotonic()
    stderr = stderr_path.open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    while time.monotonic() - started < timeout:
        ready = next((line for line in lines if "ready at" in line), None)
        if ready is not None:
            return process, ready.strip(), time.monotonic() - started
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no ready line: {lines} {stderr_path.read_text()[-3000:]}")


@pytest.fixture(scope="module", params=["in-process", pytest.param("ray", marks=pytest.mark.ray)])
def served(request, bundle, image_root, tmp_path_factory):
    """`dsdkit serve BUNDLE` on this machine, in-process or on Ray Serve (`--ray local`), with small limits."""
    runner = request.param
    folder = tmp_path_factory.mktemp(f"serve-{runner}")
    config = ServeConfig(
        limits=LIMITS,
        max_batch_items=MAX_BATCH_ITEMS,
        batch_wait_timeout_s=BATCH_WAIT_S,
        receive_timeout_s=RECEIVE_TIMEOUT_S,
        header_timeout_s=2.0,
        request_timeout_s=60.0,
        max_receiving=MAX_RECEIVING,
        max_active_requests=12,
        max_queued_work=96,
        text_cache_bytes=TEXT_CACHE_BYTES,
    )
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    port = 0 if runner == "in-process" else free_port()
    command = [DSDKIT, "serve", str(bundle), "--timesteps", str(S), "--threads", "1", "--port", str(port)]
    command += ["--config", str(folder / "config.json"), "--image-root", str(image_root)]
    if runner == "ray":
        command += ["--ray", "local", "--cpus-per-replica", "1", "--ray-log", str(folder / "ray.log")]
    process, ready, _ = launch(command, folder / "stderr.txt")
    url = re.search(r"ready at (\S+)", ready).group(1).rstrip("/")
    server = Served(runner, process, url, ready, folder / "stderr.txt")
    try:
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def call(url: str, route: str, body=None, method: str | None = None, headers: dict | None = None):
    """(status, text, headers) of one request; a POST is JSON unless the headers say otherwise."""
    import http.client

    split = urlsplit(url)
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=120)
    data = None if body is None else encode(body)
    sent = {"Content-Type": "application/json"} if data is not None else {}
    sent.update(headers or {})
    connection.request(method or ("GET" if data is None else "POST"), route, body=data, headers=sent)
    response = connection.getresponse()
    text = response.read().decode("utf-8", "replace")
    connection.close()
    return response.status, text, {k.lower(): v for k, v in response.getheaders()}


def ok(url: str, route: str, body) -> dict:
    status, text, _ = call(url, route, body)
    assert status == 200, text
    return json.loads(text)


def health(url: str) -> dict:
    return ok(url, "/health", None)


def counters(url: str) -> dict:
    return health(url)["counters"]


def one_line_error(text: str) -> str:
    assert "Traceback" not in text and "\n" not in text.strip(), text
    return json.loads(text)["error"]


def close(served, local) -> None:
    """The batch-invariance tolerance of the scoring contract (fp32 on the CPU)."""
    np.testing.assert_allclose(np.asarray(served, dtype=np.float64), np.asarray(local), rtol=1e-5, atol=1e-6)


def demo_request(n: int) -> dict:
    """Request n: demo image n against four demo captions (its own first), each request a different set."""
    captions = [DEMO_CAPTIONS[(n + k) % len(DEMO_CAPTIONS)] for k in range(4)]
    return {"image": b64(DEMO_IMAGES[n].read_bytes()), "captions": captions}


def test_ready_line_and_health_report_engine_and_bounds(served):
    assert f"mode: {'in-process' if served.runner == 'in-process' else 'Ray Serve, 1 replica'}" in served.ready
    assert "engine: bundle" in served.ready and f"S={S}" in served.ready and "limits:" in served.ready
    body = health(served.url)
    assert body["status"] == "ok" and body["runner"] == served.runner
    assert body["config"]["max_batch_items"] == MAX_BATCH_ITEMS and body["engine"]["model"] == "demo"
    assert len(body["engine"]["timesteps"]) == S and body["explain"] is False and body["gallery"] is None
    bounds = body["bounds"]
    assert bounds["per_request"]["max_work_items"] == LIMITS.max_work_items
    assert bounds["in_flight"]["max_receiving"] == MAX_RECEIVING and bounds["deadlines_s"]["body"] == RECEIVE_TIMEOUT_S
    assert bounds["caches"]["texts"]["max_bytes"] == TEXT_CACHE_BYTES
    assert set(body["counters"]) >= {"requests", "scorer_batches", "pairs_scored", "unet_evaluations", "timed_out"}


def test_concurrent_requests_share_scorer_batches_and_match_sequential(served, matcher):
    url = served.url
    requests = [demo_request(n) for n in range(8)]
    start = threading.Barrier(len(requests))

    def concurrent(body):
        start.wait()  # all eight leave at once
        return ok(url, "/rank-captions", body)

    before = counters(url)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(concurrent, requests))
    after = counters(url)
    batches = after["scorer_batches"] - before["scorer_batches"]
    assert after["requests"] - before["requests"] == 8 and after["answered"] - before["answered"] == 8
    # Batching happened (fewer batches than requests), and no batch held more than its size in pairs x timesteps.
    work = sum(len(r["captions"]) for r in requests) * S
    assert math.ceil(work / MAX_BATCH_ITEMS) <= batches < len(requests), after

    alone = []
    for body in requests:
        before = counters(url)
        alone.append(ok(url, "/rank-captions", body))
        assert counters(url)["scorer_batches"] - before["scorer_batches"] == 1
    for n, (a, b) in enumerate(zip(together, alone, strict=True)):
        close(a["scores"], b["scores"])
        local = matcher.rank_texts(DEMO_IMAGES[n], requests[n]["captions"])
        close([e["score"] for e in a["ranking"]], [e.score for e in local])
        assert [e["caption"] for e in a["ranking"]] == [e.candidate for e in local]
        assert a["ranking"][0]["margin"] == pytest.approx(a["ranking"][0]["score"] - a["ranking"][1]["score"])
        assert a["timesteps"] == list(matcher.timesteps)


def test_a_request_larger_than_a_batch_is_split(served, matcher):
    images, captions = DEMO_IMAGES[:4], DEMO_CAPTIONS[:6]
    pairs = [(i, j) for i in range(len(images)) for j in range(len(captions))]  # 24 pairs: 48 work items at S = 2
    body = {"images": [b64(p.read_bytes()) for p in images], "captions": captions, "pairs": [list(p) for p in pairs]}
    before = counters(served.url)
    answer = ok(served.url, "/score-pairs", body)
    after = counters(served.url)
    pieces = math.ceil(len(pairs) * S / MAX_BATCH_ITEMS)
    assert pieces > 1
    assert after["pieces"] - before["pieces"] == pieces
    assert after["scorer_batches"] - before["scorer_batches"] == pieces  # each piece alone: one batch each
    close(answer["scores"], matcher.score_pairs(images, captions, pairs).scores)


def test_adaptive_ranking_keeps_the_best_exact(served, matcher):
    """Successive elimination through the same batches: the survivor's score is its exhaustive score, the others
    keep partial means, and fewer pair evaluations ran than exhaustive ranking would."""
    # At S = 2 an explicit schedule: half the captions after one timestep, then the best at both.
    body = {"image": b64(DEMO_IMAGES[0].read_bytes()), "captions": DEMO_CAPTIONS, "adaptive": "keep=50%,k:steps=1,all"}
    answer = ok(served.url, "/rank-captions", body)
    best = answer["ranking"][0]
    assert best["exact"] is True and best["timesteps_held"] == S
    # The half that reached the last stage holds both timesteps (exact, ranked first), the rest one.
    assert [e["timesteps_held"] for e in answer["ranking"]] == [S] * 4 + [1] * 4
    exhaustive = matcher.score_pairs(DEMO_IMAGES[:1], DEMO_CAPTIONS, [(0, j) for j in range(len(DEMO_CAPTIONS))])
    exact = [e for e in answer["ranking"] if e["exact"]]
    close([e["score"] for e in exact], exhaustive.scores[[e["index"] for e in exact]])
    spent = answer["adaptive"]["evaluations"]
    assert spent["conditional"] < spent["exhaustive_conditional"] == len(DEMO_CAPTIONS) * S


def test_rank_images_and_paths_under_the_root(served, matcher):
    caption = DEMO_CAPTIONS[2]
    uploaded = ok(
        served.url, "/rank-images", {"caption": caption, "images": [b64(p.read_bytes()) for p in DEMO_IMAGES]}
    )
    by_path = ok(
        served.url,
        "/rank-images",
        {"caption": caption, "images": [{"path": p.name} for p in DEMO_IMAGES], "top_k": 3},
    )
    local = matcher.rank_images(caption, DEMO_IMAGES)
    close(uploaded["scores"], by_path["scores"])
    close([e["score"] for e in uploaded["ranking"]], [e.score for e in local])
    assert [e["index"] for e in by_path["ranking"]] == [e["index"] for e in uploaded["ranking"]][:3]


@pytest.mark.parametrize("name, route, body, status, words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_one_line_4xx_over_http(served, name, route, body, status, words):
    got, text, _ = call(served.url, route, body)
    assert got == status, text
    assert words in one_line_error(text)


def test_paths_outside_the_root_are_answered_alike_over_http(served):
    answers = []
    for path in ("/etc/passwd", "/etc/nope", "to-etc/passwd", "to-etc/nope"):
        status, text, _ = call(served.url, "/rank-captions", {"image": {"path": path}, "captions": ["a"]})
        answers.append((status, one_line_error(text).replace(repr(path), "PATH")))
    assert answers[0] == answers[1] and answers[2] == answers[3] and answers[0][0] == 403


def test_routes_methods_and_no_server_errors(served):
    status, text, _ = call(served.url, "/rank-everything", {})
    assert status == 404 and "no endpoint" in one_line_error(text)
    status, text, headers = call(served.url, "/rank-captions")  # a GET
    assert status == 405 and "POST" in one_line_error(text) and headers["allow"] == "POST"
    status, text, _ = call(served.url, "/health", {}, method="POST")
    assert status == 405 and "GET" in one_line_error(text)
    assert counters(served.url)["failed"] == 0


def test_foreign_host_foreign_origin_form_post_and_cors_preflight_are_refused(served):
    body = demo_request(0)
    status, text, _ = call(served.url, "/health", headers={"Host": f"attacker.example:{served.port}"})
    assert status == 403 and "attacker.example" in one_line_error(text)  # DNS rebinding
    status, text, _ = call(served.url, "/rank-captions", body, headers={"Host": "attacker.example"})
    assert status == 403
    status, text, _ = call(served.url, "/rank-captions", body, headers={"Origin": "http://attacker.example"})
    assert status == 403 and "other sites" in one_line_error(text)
    other_port = f"http://127.0.0.1:{served.port + 1}"  # another origin on this machine
    assert call(served.url, "/rank-captions", body, headers={"Origin": other_port})[0] == 403
    own = f"http://127.0.0.1:{served.port}"  # the page's own requests
    assert call(served.url, "/rank-captions", body, headers={"Origin": own})[0] == 200
    for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"):
        status, text, _ = call(served.url, "/rank-captions", body, headers={"Content-Type": content_type})
        assert status == 415 and "application/json" in one_line_error(text), content_type
    preflight = {
        "Origin": f"http://127.0.0.1:{served.port}",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, text, headers = call(served.url, "/rank-captions", method="OPTIONS", headers=preflight)
    assert status == 405 and "CORS" in one_line_error(text)
    # No answer carries a CORS header, whatever the request asked.
    for route, payload in (("/health", None), ("/rank-captions", body), ("/", None)):
        _, _, headers = call(served.url, route, payload, headers={"Origin": f"http://localhost:{served.port}"})
        assert not [h for h in headers if h.startswith("access-control-")], headers
    status, _, _ = call(served.url, "/health", headers={"Host": f"localhost:{served.port}"})
    assert status == 200  # the server's own names are fine


def test_page_and_demo_examples_are_served(served):
    status, text, headers = call(served.url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and "page.js" in text
    assert (
        "default-src 'none'" in headers["content-security-policy"]
        and "frame-ancestors 'none'" in text + headers["content-security-policy"]
    )
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing from another site
    for route in ("/page.js", "/page.css"):
        status, text, _ = call(served.url, route)
        assert status == 200 and "http://" not in text and "https://" not in text
    listing = ok(served.url, "/examples", None)
    assert listing["captions"] == DEMO_CAPTIONS
    first = listing["examples"][0]
    status, _, headers = call(served.url, first["url"])
    assert status == 200 and headers["content-type"] == "image/png"
    maps = Path(f"/proc/{served.process.pid}/maps")
    if served.runner == "in-process" and maps.exists():  # a bundle is served torch-free, the page and examples too
        assert "libtorch" not in maps.read_text()


def test_explain_on_a_bundle_says_maps_need_the_pytorch_engine(served):
    status, text, _ = call(served.url, "/explain", {"image": b64(GOOD), "caption": "a red circle"})
    assert status == 501 and "--model" in one_line_error(text)


def test_work_per_request_is_bounded(served):
    pairs = [[0, j % 2] for j in range(LIMITS.max_work_items // S + 1)]  # one pair over max_work_items
    body = {"images": [b64(GOOD)], "captions": ["a red circle", "a blue square"], "pairs": pairs}
    status, text, _ = call(served.url, "/score-pairs", body)
    assert status == 413 and "max_work_items" in one_line_error(text)


def test_queued_work_is_bounded_and_answered_at_once(served):
    """While one request's work waits for its batch, a request that would pass max_queued_work (96) gets a 503 at
    once, not a place in the queue."""
    first = {"images": [b64(GOOD)], "captions": ["a red circle"], "pairs": [[0, 0]] * 12}  # 24 items: waits
    second = {"images": [b64(GOOD)], "captions": ["a blue square"], "pairs": [[0, 0]] * 32}  # 64 items
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ok, served.url, "/score-pairs", first)
        deadline = time.monotonic() + 20
        while health(served.url)["load"]["queued_work"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = {"images": [b64(GOOD)], "captions": ["a green triangle"], "pairs": [[0, 0]] * 32}
        # 24 queued + 64 fits (88), then 88 + 64 does not: one of the two later requests is refused at once.
        with ThreadPoolExecutor(2) as more:
            answers = list(more.map(lambda b: call(served.url, "/score-pairs", b), [second, third]))
        assert waiting.result()["scores"]
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 503], answers
    refused = next(text for status, text, _ in answers if status == 503)
    assert "max_queued_work" in one_line_error(refused)
    assert next(h for status, _, h in answers if status == 503)["retry-after"] == "1"


def test_caption_cache_is_bounded_by_bytes(served):
    captions = [f"a red circle number {n}" for n in range(40)]
    for chunk in range(0, len(captions), 8):
        ok(served.url, "/rank-captions", {"image": b64(GOOD), "captions": captions[chunk : chunk + 8]})
    texts = health(served.url)["bounds"]["caches"]["texts"]
    assert 0 < texts["bytes"] <= TEXT_CACHE_BYTES and texts["max_bytes"] == TEXT_CACHE_BYTES
    assert texts["entries"] < len(captions), texts  # evicted, least recently used first


def test_a_request_past_its_deadline_gets_504_and_its_work_is_dropped(served):
    before = counters(served.url)
    started = time.monotonic()
    body = {"image": b64(DEMO_IMAGES[3].read_bytes()), "captions": DEMO_CAPTIONS[:4], "timeout_s": 0.2}
    status, text, _ = call(served.url, "/rank-captions", body)  # 8 items: its batch waits 0.5 s for more
    assert status == 504 and "timeout_s" in one_line_error(text)
    assert time.monotonic() - started < BATCH_WAIT_S + 5
    after = health(served.url)
    assert after["load"]["queued_work"] == 0 and after["load"]["active"] == 0
    assert after["counters"]["timed_out"] == before["timed_out"] + 1
    assert after["counters"]["scorer_batches"] == before["scorer_batches"]  # nothing of it was scored
    assert ok(served.url, "/rank-captions", demo_request(3))["ranking"]  # the server goes on


def slow_post(served, route: str = "/rank-captions", declared: int = 4000, sent: int = 10) -> socket.socket:
    """A connection that sends its headers and ``sent`` of ``declared`` body bytes, then nothing."""
    sock = socket.create_connection((served.host, served.port), timeout=30)
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"{" + b" " * (sent - 1))
    return sock


def read_answer(sock: socket.socket, timeout: float = 30) -> tuple[int, str]:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def _length(data: bytes) -> int:
    match = re.search(rb"content-length: *(\d+)", data.split(b"\r\n\r\n", 1)[0], re.IGNORECASE)
    return int(match.group(1)) if match else 1 << 30


def test_slow_clients_cost_a_slot_not_the_server(served):
    """32 connections that send headers and part of a body: /health answers at once and a normal request is served
    while they hang; each slow one gets a one-line 408 when its receipt deadline passes. With every receiving slot
    taken (max_receiving), a new request gets a 503 at once, and /health still answers."""
    slow = [slow_post(served) for _ in range(32)]
    time.sleep(0.3)
    started = time.monotonic()
    assert health(served.url)["load"]["receiving"] == 32
    assert time.monotonic() - started < 1.5
    assert ok(served.url, "/rank-captions", demo_request(5))["ranking"]
    for sock in slow:  # the normal request did not wait for them: they are all still waiting for their answers
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    answers = [read_answer(sock) for sock in slow]
    assert {status for status, _ in answers} == {408}, answers[:3]
    assert all("receive_timeout_s" in one_line_error(text) for _, text in answers)

    full = [slow_post(served) for _ in range(MAX_RECEIVING)]
    time.sleep(0.3)
    status, text, headers = call(served.url, "/rank-captions", demo_request(6))
    assert status == 503 and "max_receiving" in one_line_error(text) and headers["retry-after"] == "1"
    assert health(served.url)["status"] == "ok"
    assert {read_answer(sock)[0] for sock in full} == {408}
    load = health(served.url)["load"]
    assert load["receiving"] == 0 and load["active"] == 0


def test_slow_headers_are_cut_off(served):
    if served.runner == "ray":
        pytest.skip("under Ray Serve the headers are read by Ray's own HTTP proxy")
    sock = socket.create_connection((served.host, served.port), timeout=30)
    sock.sendall(b"POST /rank-captions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end of the headers
    started = time.monotonic()
    for _ in range(3):  # a byte now and then does not extend the deadline
        time.sleep(0.4)
        sock.sendall(b"X")
    sock.settimeout(20)
    assert sock.recv(100) == b""  # closed by the server
    assert time.monotonic() - started < 2.0 + 5
    sock.close()


def test_a_client_that_leaves_mid_body_is_not_a_failure(served):
    before = counters(served.url)
    sock = slow_post(served)
    time.sleep(0.3)
    sock.close()
    time.sleep(1.0)
    after = counters(served.url)
    assert after["failed"] == before["failed"]
    if served.runner == "in-process":  # Ray's proxy may cancel the request instead of passing the disconnect on
        assert after["disconnected"] == before["disconnected"] + 1


@pytest.fixture(scope="module")
def client():
    spec = importlib.util.spec_from_file_location("serve_client", REPO / "examples" / "serve_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_client(served, matcher, client, capsys):
    url = served.url
    assert client.health(url)["status"] == "ok"
    out = client.rank_captions(url, DEMO_IMAGES[1], DEMO_CAPTIONS[:5], top_k=2)
    assert len(out["ranking"]) == 2
    close(out["scores"], matcher.score_pairs(DEMO_IMAGES[1:2], DEMO_CAPTIONS[:5], [(0, j) for j in range(5)]).scores)
    out = client.rank_images(url, DEMO_CAPTIONS[0], ["00-a-red-circle.png", "sub/inner.png"], server_path=True)
    close(out["scores"][0], out["scores"][1])  # the same pixels under two names
    out = client.score_pairs(url, DEMO_IMAGES[:2], DEMO_CAPTIONS[:2], [(1, 0), (0, 1)])
    close(out["scores"], matcher.score_pairs(DEMO_IMAGES[:2], DEMO_CAPTIONS[:2], [(1, 0), (0, 1)]).scores)
    with pytest.raises(client.ServeError) as caught:
        client.rank_captions(url, DEMO_IMAGES[0], ["x" * 201])
    assert caught.value.status == 413 and "max_caption_chars" in caught.value.message
    assert client.main(["--url", url, "rank-captions", str(DEMO_IMAGES[0]), "--caption", "a red circle"]) == 0
    assert json.loads(capsys.readouterr().out)["ranking"][0]["caption"] == "a red circle"
    assert client.main(["--url", url, "--server-paths", "rank-images", "a", "nope.png"]) == 1
    assert "HTTP 422" in capsys.readouterr().err


def _ray_session(pid: int) -> Path | None:
    """The session folder of the Ray cluster a `dsdkit serve --ray local` process started (its raylet says)."""
    for process in _process_tree(pid):
        for arg in process.cmdline() or []:
            if arg.startswith("--session_dir="):
                return Path(arg.split("=", 1)[1])
    return None


def _process_tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def test_everything_the_server_started_listens_on_loopback_only(served):
    import psutil

    listening = []
    for process in _process_tree(served.process.pid):
        try:
            listening += [
                (process.name(), c.laddr.ip, c.laddr.port)
                for c in process.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            continue
    assert (served.port in {port for _, _, port in listening}) and all(_loopback(ip) for _, ip, _ in listening), (
        listening
    )
    if served.runner == "ray":  # the cluster's own servers (GCS, raylet, workers, proxy, replica) were all seen
        assert len(listening) >= 6, listening


def test_a_dying_replica_answers_in_one_line_of_json(served):
    """A replica that dies under a request: the request gets a JSON 500 that says it can be retried (not Ray's
    plain text), and a new replica takes over."""
    if served.runner != "ray":
        pytest.skip("only Ray Serve has replicas that can die under a request and be restarted")
    replica = next(p for p in _process_tree(served.process.pid) if "ServeReplica" in " ".join(p.cmdline() or []))
    old = health(served.url)["replica"]
    sock = slow_post(served)  # a request inside the replica for sure: it is waiting there for the rest of its body
    deadline = time.monotonic() + 20
    while health(served.url)["load"]["receiving"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    replica.kill()
    status, text = read_answer(sock, timeout=60)
    assert status == 500 and "retried" in one_line_error(text)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, text, _ = call(served.url, "/health")
        if status == 200 and json.loads(text)["replica"] != old:
            break
        time.sleep(0.5)
    else:
        pytest.fail("no new replica within 120 s")
    assert ok(served.url, "/rank-captions", demo_request(2))["ranking"]


def test_sigterm_stops_the_server_cleanly(served):
    """Last: SIGTERM ends the server (exit 0, in-process and Ray alike); nothing on stderr is a traceback, a colour
    code or one of Ray's own log lines."""
    assert served.stop(signal.SIGTERM, timeout=90) == 0
    stderr = served.stderr_path.read_text()
    assert "Traceback" not in stderr and "\x1b[" not in stderr, stderr[-3000:]
    assert not [line for line in stderr.splitlines() if re.search(r"\bray\b|raylet|ServeReplica|\(pid=", line)], (
        stderr[-3000:]
    )
    if served.runner == "ray":
        assert "Started Serve" in (served.stderr_path.parent / "ray.log").read_text()  # Ray's lines: in its file
    if served.runner == "ray":  # the replicas' logs: no request of this suite was a failure with a traceback
        logs = list(served.session_dir.glob("logs/serve/replica_*.log")) + list(served.session_dir.glob("logs/*.err"))
        assert logs
        for path in logs:
            text = path.read_text(errors="replace")
            assert "/dsdkit/serving/" not in text and not re.search("dsdkit serve: .* failed", text), path
