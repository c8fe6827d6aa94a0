"""``dsdkit serve --gallery``: ``POST /search`` on an in-process app (its ASGI entry driven directly) over a gallery
of demo-world scenes. The shortlist is checked against a brute-force cosine ranking of independently computed CLIP
embeddings, and DSD's order of it against the engine's own ``rank_images`` of the same images."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from dsdkit.runtime.errors import ConfigError, InputError

from dsdkit.jobs.specs import EngineSpec
from dsdkit.serving import ServeConfig, ServeLimits
from dsdkit.serving.app import open_app

STEPS = 2
K = 4


def asgi(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict | bytes]:
    """One HTTP request through the app's ASGI entry; (status, JSON body or raw bytes)."""
    data = b"" if body is None else json.dumps(body).encode()
    headers = [(b"host", b"127.0.0.1")]
    if body is not None:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "root_path": ""}
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if delivered:
            await asyncio.sleep(3600)
        delivered = True
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


@pytest.fixture(scope="module")
def gallery_folder(tmp_path_factory):
    """Twelve gallery scenes (one- and two-object) and one file that is not an image."""
    from dsdkit.world import scenes

    folder = tmp_path_factory.mktemp("gallery")
    for n, scene in enumerate(scenes.gallery(seed=5, count=12)):
        scenes.render(scene).save(folder / f"scene-{n:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def app(gallery_folder):
    config = ServeConfig(gallery=str(gallery_folder), shortlist_k=K, warmup=False)
    spec = EngineSpec(model="demo", knobs={"num_timesteps": STEPS}, threads=1)
    served = open_app(spec, config)
    yield served
    served.close()


def test_search_is_the_exact_clip_top_k_ranked_by_dsd(app, gallery_folder):
    from dsdkit.runtime.images import load_image

    from dsdkit.pytorch.clip import TorchClip

    caption = "a red circle"
    status, body = asgi(app, "POST", "/search", {"caption": caption})
    assert status == 200, body
    paths = sorted(p for p in gallery_folder.glob("scene-*.png"))
    # Brute force: every image's embedding, cosine to the caption's, sorted (ties by name, as the gallery's order).
    clip = TorchClip("demo")
    images = clip.embed_images([load_image(p) for p in paths]).astype(np.float64)
    text = clip.embed_texts([caption]).astype(np.float64)[0]
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    similarity = images @ (text / np.linalg.norm(text))
    expected = sorted(range(len(paths)), key=lambda n: (-similarity[n], n))[:K]
    candidates = body["candidates"]
    assert [c["name"] for c in candidates] == [paths[n].name for n in expected]
    np.testing.assert_allclose([c["similarity"] for c in candidates], similarity[expected], atol=1e-4)
    # DSD's order of the K, as the engine ranks them itself.
    ranked = app.engine.rank_images(caption, [paths[n] for n in expected])
    assert [e["name"] for e in body["ranking"]] == [paths[expected[index]].name for index, _ in ranked]
    np.testing.assert_allclose([e["score"] for e in body["ranking"]], [score for _, score in ranked], rtol=1e-5)
    for entry in body["ranking"]:
        assert entry["shortlist_rank"] == 1 + [c["name"] for c in candidates].index(entry["name"])
        assert entry["url"] == f"/gallery/{entry['index']}"
    assert body["shortlist"]["k"] == K and body["shortlist"]["gallery"] == len(paths)


def test_gallery_images_are_served_and_reported(app, gallery_folder):
    status, body = asgi(app, "GET", "/health")
    assert status == 200
    assert body["gallery"]["images"] == 12 and body["gallery"]["skipped"] == 1
    assert body["gallery"]["shortlist_k"] == K
    status, data = asgi(app, "GET", "/gallery/0")
    assert status == 200 and data == (gallery_folder / "scene-00.png").read_bytes()
    assert asgi(app, "GET", "/gallery/12")[0] == 404
    assert asgi(app, "GET", "/gallery/-1")[0] == 404


def test_search_refuses_bad_requests_in_one_line(app):
    for body, words in (
        ({}, "missing field 'caption'"),
        ({"caption": " "}, "empty"),
        ({"caption": "a", "x": 1}, "unknown"),
    ):
        status, answer = asgi(app, "POST", "/search", body)
        assert status == 422 and words in answer["error"], answer
    status, answer = asgi(app, "POST", "/search", {"caption": "a blue square", "top_k": 2})
    assert status == 200 and len(answer["ranking"]) == 2


def test_a_server_without_a_gallery_answers_404(gallery_folder):
    spec = EngineSpec(model="demo", knobs={"num_timesteps": STEPS}, threads=1)
    served = open_app(spec, ServeConfig(warmup=False))
    try:
        status, body = asgi(served, "POST", "/search", {"caption": "a red circle"})
        assert status == 404 and "--gallery" in body["error"]
        assert asgi(served, "GET", "/health")[1]["gallery"] is None
    finally:
        served.close()


def test_gallery_start_errors_are_one_line(tmp_path, gallery_folder):
    spec = EngineSpec(model="demo", knobs={"num_timesteps": STEPS}, threads=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="no usable image"):
        open_app(spec, ServeConfig(gallery=str(empty), warmup=False))
    with pytest.raises(ConfigError, match="max_gallery_images"):
        open_app(spec, ServeConfig(gallery=str(gallery_folder), max_gallery_images=3, warmup=False))
    tight = ServeConfig(gallery=str(gallery_folder), shortlist_k=8, limits=ServeLimits(max_work_items=8), warmup=False)
    with pytest.raises(ConfigError, match="lower `shortlist_k`"):
        open_app(spec, tight)
