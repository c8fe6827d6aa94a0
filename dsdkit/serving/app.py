"""The one application both runners serve: an ASGI app (:class:`DsdApp`) over one engine, with its routes, limits,
bounds, deadlines, batching and counters. The in-process runner (:mod:`dsdkit.serving.local`) puts it on uvicorn;
the Ray Serve runner (:mod:`dsdkit.serving.ray_serve`) hands each replica's requests to its own copy. Nothing here
imports Ray, uvicorn or a web framework (it speaks ASGI itself), nor torch unless the engine is the PyTorch one.

Routes (JSON in, JSON out; an image is ``{"base64": "..."}`` (also a ``data:`` URL) or ``{"path": "a/b.png"}``, a
file under the image root):

- ``POST /rank-captions`` ``{"image", "captions", "top_k", "adaptive"}``: the captions best first for the image;
- ``POST /rank-images`` ``{"caption", "images", "top_k", "adaptive"}``: the images best first for the caption;
- ``POST /score-pairs`` ``{"images", "captions", "pairs": [[i, j], ...]}``: the given pairs' scores;
- ``POST /explain`` ``{"image", "caption"}``: per-word heat maps (the PyTorch engine only; 501 on a bundle);
- ``GET /health``: engine, config, bounds, load and counters; ``GET /``: the page; ``GET /examples``: the demo
  world's example images and captions (``GET /examples/NAME.png``).

How a request is served (every step bounded, every refusal one line of JSON, see :class:`~dsdkit.serving.config.
ServeConfig`): the ``Host`` (and any ``Origin``) must name this server, a POST must be ``application/json``; the
body arrives within ``receive_timeout_s`` in one of ``max_receiving`` slots; the request takes one of
``max_active_requests`` slots and must be answered within ``request_timeout_s`` of its headers; it is parsed and
checked (:func:`~dsdkit.serving.requests.parse_request`), its work (pairs x S) checked against ``max_work_items``,
its pixels (known from the image headers) wait for their share of ``max_pixels_in_flight``, then its images are
decoded and encoded and its captions encoded (the engine's caches, bounded by bytes); its pairs go to the
:class:`~dsdkit.serving.batching.Batcher` (scorer batches shared with other requests), or, adaptive, to successive
elimination whose every round goes through the same batcher. ``GET /health`` and the page never wait for a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import mimetypes
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..runtime.errors import ConfigError
from .batching import Batcher, Busy, Piece, combine_pieces, split_pairs
from .config import EngineSpec, ServeConfig
from .requests import (
    ROUTES,
    RequestError,
    ScoreRequest,
    decode_images,
    error_response,
    format_response,
    parse_request,
    pending_image,
)

__all__ = ["DsdApp", "Counters", "open_app", "HEALTH", "PAGE_FILES"]

logger = logging.getLogger(__name__)

HEALTH = "/health"
#: The page's files (package data in ``dsdkit/serving/page``): route -> (file, content type).
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
#: The page loads only its own files and talks only to its own server; no other site may frame it.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_RETRY_AFTER = "1"  # seconds a refused-for-load client should wait before trying again (503s)


@dataclass
class Counters:
    """What one server (or Ray replica) did since it started (``GET /health``): ``scorer_batches`` counts the
    batched scoring calls, so ``scorer_batches / requests`` < 1 shows batching at work."""

    requests: int = 0  # POST requests to the scoring and explain routes
    answered: int = 0  # ... answered with 200
    refused: int = 0  # ... with a 4xx (or 501: no heat maps on a bundle)
    busy: int = 0  # ... with a 503: a bound in flight was full
    timed_out: int = 0  # ... with a 408 (body too slow) or 504 (past the deadline)
    failed: int = 0  # ... with a 500
    disconnected: int = 0  # ... whose client went away first
    pieces: int = 0  # pieces submitted to the scorer batches
    scorer_batches: int = 0
    searches: int = 0  # POST /search requests answered (a gallery's shortlist, then DSD)
    pairs_scored: int = 0  # distinct pairs in the scorer batches
    work_items: int = 0  # their pairs x timesteps
    unet_evaluations: int = 0  # scorer-graph evaluations run, the unconditional pass included (cached work is not)
    explanations: int = 0  # heat-map jobs run


class _ClientGone(Exception):
    """The client closed its connection before its answer was ready: nothing to answer, nothing failed."""


class _Load:
    """Requests receiving bodies and requests being worked on, and the decoded pixels in flight (asyncio)."""

    def __init__(self, config: ServeConfig):
        self.receiving = 0
        self.active = 0
        self.pixels = 0
        self._capacity = config.max_pixels_in_flight
        self._pixels_freed: asyncio.Condition | None = None

    @contextlib.contextmanager
    def slot(self, counter: str, limit: int, doing: str):
        """One of ``limit`` slots counted by ``counter`` (``receiving`` or ``active``) for the block, or a 503 at once
        when all are taken: the two admission limits (bodies received, requests worked on) share this rule."""
        taken = getattr(self, counter)
        if taken >= limit:
            raise RequestError(doing.format(taken), 503, {"Retry-After": _RETRY_AFTER})
        setattr(self, counter, taken + 1)
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) - 1)

    async def take_pixels(self, count: int) -> None:
        if self._pixels_freed is None:
            self._pixels_freed = asyncio.Condition()
        async with self._pixels_freed:
            await self._pixels_freed.wait_for(lambda: self.pixels + count <= self._capacity)
            self.pixels += count

    def give_pixels(self, count: int) -> None:
        self.pixels -= count
        if self._pixels_freed is not None:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._pixels_freed:
            self._pixels_freed.notify_all()


@dataclass
class _Prepared:
    request: ScoreRequest
    images: list  # ImageEncoding
    texts: list  # TextEncoding


def open_app(spec: EngineSpec, config: ServeConfig | None = None, runner: str = "in-process", device=None) -> DsdApp:
    """Open ``spec``'s engine (bounded caches, warmed up when the config asks) and the app over it.

    Raises:
        ConfigError, BundleError, ModelError, MissingDependencyError: in one line, before anything listens.
    """
    config = config or ServeConfig()
    root = config.root()  # an image root that does not exist fails before the engine opens
    from ..jobs.engines import open_engine

    if spec.threads is not None:  # before torch loads (it reads OMP_NUM_THREADS once); ONNX Runtime reads it too
        from ..runtime.threads import configure_threads

        configure_threads(spec.threads)
    engine = open_engine(spec.replace(device=device) if device is not None else spec)
    gallery = None
    try:
        steps = len(engine.timesteps)
        split_pairs([], steps, config.max_batch_items)  # one pair's work must fit a batch
        if config.gallery is not None and config.shortlist_k * steps > config.limits.max_work_items:
            raise ConfigError(
                f"shortlist_k {config.shortlist_k} x {steps} timesteps is over max_work_items "
                f"{config.limits.max_work_items:,}: a search could never be answered; lower `shortlist_k`"
            )
        if steps > config.limits.max_work_items:
            raise ConfigError(
                f"limits.max_work_items {config.limits.max_work_items} is less than one pair's work ({steps} "
                f"timesteps); give at least {steps}"
            )
        if config.gallery is not None:  # indexed before anything listens: a bad gallery fails the start
            from .gallery import open_gallery

            gallery = open_gallery(
                config.gallery, engine, config.shortlist, config.shortlist_k, config.max_gallery_images
            )
        if config.warmup:
            _warm_up(engine)
    except BaseException:
        engine.close()
        raise
    return DsdApp(engine, spec, config, runner=runner, root=root, gallery=gallery)


def _warm_up(engine) -> None:
    """Create every graph's session now (one grey image, one caption, one pair at one timestep)."""
    image = engine.encode_images([np.full((8, 8, 3), 128, dtype=np.uint8)])
    text = engine.encode_texts(["warm up"])
    engine.score_encoded_pairs(image, text, [(0, 0)], steps=[0])


class DsdApp:
    """The ASGI application over one open engine (see the module doc); build it with :func:`open_app`.

    Args:
        engine: an open :class:`~dsdkit.runtime.engine.Engine` (the app closes it on ASGI shutdown or
            :meth:`close`).
        spec: what the engine is (reported on ``/health``; ``/explain`` needs the PyTorch engine).
        config: the :class:`ServeConfig`.
        runner: ``in-process`` or ``ray`` (reported on ``/health``).
        root: the resolved image root (default: resolved here).
    """

    def __init__(
        self, engine, spec: EngineSpec, config: ServeConfig, runner: str = "in-process", root=None, gallery=None
    ):
        self.engine = engine
        self.gallery = gallery  # a Gallery (dsdkit.serving.gallery) behind POST /search, or None
        self.spec = spec
        self.config = config
        self.runner = runner
        self.replica: str | None = None  # the Ray replica's tag, set by the Ray runner
        self._root = root if root is not None else config.root()
        self.counters = Counters()
        self._started = time.time()
        self._load = _Load(config)
        self._batcher = Batcher(
            self._score_pieces, config.max_batch_items, config.batch_wait_timeout_s, config.max_queued_work
        )
        # Decoding, encoding and adaptive rankings run here; one thread per active request is enough.
        self._prep = ThreadPoolExecutor(config.max_active_requests, thread_name_prefix="dsdkit-prep")
        self._hosts = config.hosts()
        self._examples: dict[str, Any] | None = None
        # A long-lived server bounds what clients can make it keep: the engine's caches, least recently used out.
        caches = engine.caches()
        for name, limit in (
            ("images", config.image_cache_bytes),
            ("texts", config.text_cache_bytes),
            ("unconditional", config.unconditional_cache_bytes),
        ):
            caches[name].bound(limit)

    def close(self) -> None:
        """Stop the batcher and the threads, and close the engine."""
        self._batcher.close()
        self._prep.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    # -- what the server reports -------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The engine and the bounds in a few words, for the ready line."""
        meta = self.engine.metadata()
        model = meta.get("model") or {}
        return {
            "engine": self.spec.kind,
            "model": model.get("source") if isinstance(model, dict) else str(model),
            "device": self._device(meta),
            "timesteps": len(self.engine.timesteps),
            "limits": self.config.summary(),
        }

    @staticmethod
    def _device(meta: dict) -> str | None:
        """Where the engine computes: the PyTorch model's device, or the bundle scorer's backend and providers."""
        model = meta.get("model")
        if meta.get("backend") == "pytorch" and isinstance(model, dict):
            return model.get("device")
        scorer = (meta.get("runners") or {}).get("scorer") or {}
        providers = ", ".join(p.replace("ExecutionProvider", "") for p in scorer.get("providers") or [])
        return f"{scorer.get('backend', 'bundle')}{f' ({providers})' if providers else ''}"

    def health(self) -> dict[str, Any]:
        """The ``GET /health`` body: status, runner, engine, config, bounds, load and counters."""
        from ..runtime.version import __version__

        engine = self.engine
        meta = engine.metadata()
        model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        caches = {}
        for name, cache in engine.caches().items():
            caches[name] = {"entries": len(cache), "bytes": cache.bytes, "max_bytes": cache.max_bytes}
        config = self.config
        return {
            "status": "ok",
            "dsdkit_version": __version__,
            "runner": self.runner,
            "replica": self.replica,
            "uptime_s": round(time.time() - self._started, 3),
            "engine": {
                "kind": self.spec.kind,
                "bundle": meta.get("bundle"),
                "model": model.get("source"),
                "identity": model.get("identity") or meta.get("model_identity"),
                "adapters": meta.get("adapters"),
                "device": self._device(meta),
                "scoring": meta.get("scoring"),
                "timesteps": meta.get("timesteps"),
                "batch_size": engine.batch_size,
                "warnings": meta.get("warnings", []),
            },
            "explain": self.spec.kind == "pytorch",
            "gallery": None if self.gallery is None else self.gallery.describe(),
            "config": config.to_dict(),
            "bounds": {
                "per_request": dataclasses.asdict(config.limits),
                "in_flight": {
                    "max_receiving": config.max_receiving,
                    "max_active_requests": config.max_active_requests,
                    "max_queued_work": config.max_queued_work,
                    "max_pixels_in_flight": config.max_pixels_in_flight,
                },
                "deadlines_s": {
                    "headers": config.header_timeout_s,
                    "body": config.receive_timeout_s,
                    "request": config.request_timeout_s,
                },
                "caches": caches,
            },
            "load": {
                "receiving": self._load.receiving,
                "active": self._load.active,
                "queued_work": self._batcher.queued_work,
                "pixels_in_flight": self._load.pixels,
            },
            "counters": dataclasses.asdict(self.counters),
        }

    # -- ASGI ------------------------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # Anything else (websockets) is not served: returning closes it.

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._batcher.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        started = time.monotonic()
        method = scope["method"]
        path = scope["path"]
        prefix = scope.get("root_path") or ""
        if prefix and path.startswith(prefix):  # an application under a route prefix sees its own paths
            path = path[len(prefix) :]
        path = "/" + path.strip("/") if path != "/" else "/"
        work_route = path in ROUTES
        if work_route and method == "POST":
            self.counters.requests += 1
        try:
            self._check_origin(scope)
            if method == "OPTIONS":
                raise _NotAllowed(
                    "GET, POST", "cross-origin requests are not served (no CORS): use the page or a program"
                )
            if not work_route:
                await self._get(path, method, send)
                return
            if method != "POST":
                raise _NotAllowed("POST", f"{path} takes POST requests only, not {method}")
            _check_json(scope)
            body = await self._receive_body(scope, receive, started)
            response = await self._within_deadline(path, body, receive, started)
            self.counters.answered += 1
            await _send_json(send, 200, response)
        except _ClientGone:
            self.counters.disconnected += 1
            logger.info("dsdkit serve: %s %s: the client went away before its answer", method, path)
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: a client never sees a traceback
            headers: dict[str, str] = {}
            if isinstance(exc, _NotAllowed):
                status, body = 405, {"error": exc.message}
                headers["Allow"] = exc.allow
            else:
                status, body = error_response(exc)
                headers.update(getattr(exc, "headers", None) or {})
            if status >= 500 and not isinstance(exc, RequestError):
                logger.error("dsdkit serve: %s %s failed", method, path, exc_info=exc)
            if work_route and method == "POST":
                self._count(status)
            await _send_json(send, status, body, headers)

    def _count(self, status: int) -> None:
        counters = self.counters
        if status in (408, 504):
            counters.timed_out += 1
        elif status == 503:
            counters.busy += 1
        elif status >= 500 and status != 501:
            counters.failed += 1
        else:
            counters.refused += 1

    def _check_origin(self, scope) -> None:
        """Refuse a ``Host`` that is not this server's (a page on another site whose name was rebound to this
        address) and an ``Origin`` of another site (a page elsewhere calling this server)."""
        headers = _headers(scope)
        host = headers.get("host")
        if host is None:
            raise RequestError("the request has no Host header; this server answers only requests that name it", 400)
        name = _host_name(host)
        if name not in self._hosts:
            raise RequestError(
                f"Host {_short(host)} is not a name of this server; it answers to {', '.join(sorted(self._hosts))} "
                "(a server that listens beyond loopback is given its names with --allow-host)",
                403,
            )
        origin = headers.get("origin")
        if origin is not None:  # a browser's request: only the page this server served may make it (same origin)
            try:
                same = urlsplit(origin).netloc.lower() == host.strip().lower()
            except ValueError:
                same = False
            if not same:
                raise RequestError(f"requests from other sites are refused (Origin {_short(origin)})", 403)

    async def _receive_body(self, scope, receive, started: float) -> bytes:
        """The body, within the receipt deadline, in one of ``max_receiving`` slots; refused with a 413 as soon as it
        is known to exceed ``max_body_bytes`` (from ``Content-Length`` before reading anything)."""
        config = self.config
        limit = config.limits.max_body_bytes
        declared = _headers(scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit() or len(declared.strip()) > 18:
                raise RequestError("the Content-Length header is not a number", 400)
            if int(declared) > limit:
                raise RequestError(f"request body of {int(declared):,} bytes is over the {limit:,}-byte limit", 413)
        busy = "the server is receiving {} request bodies, its limit (max_receiving); retry shortly"
        with self._load.slot("receiving", config.max_receiving, busy):
            deadline = started + min(config.receive_timeout_s, config.request_timeout_s)
            chunks, size = [], 0
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise RequestError(
                        f"the request body did not arrive within {config.receive_timeout_s:g} s (receive_timeout_s)",
                        408,
                    ) from None
                except Exception as exc:  # noqa: BLE001 - a runner whose receive fails when the client left (Ray)
                    raise _ClientGone from exc
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"request body is over the {limit:,}-byte limit", 413)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

    async def _within_deadline(self, route: str, body: bytes, receive, started: float) -> dict:
        """:meth:`_answer` in one of ``max_active_requests`` slots, cancelled at the request's deadline (504) or when
        the client goes away."""
        config = self.config
        busy = "the server is working on {} requests, its limit (max_active_requests); retry shortly"
        with self._load.slot("active", config.max_active_requests, busy):
            work = asyncio.ensure_future(self._answer(route, body, started))
            gone = asyncio.ensure_future(_disconnect(receive))
            try:
                deadline = started + config.request_timeout_s
                done, _ = await asyncio.wait({work, gone}, timeout=_left(deadline), return_when="FIRST_COMPLETED")
                if work in done:
                    return work.result()
                if gone in done and gone.result():
                    raise _ClientGone
                if gone in done:  # this runner cannot tell a disconnect: wait for the work alone
                    done, _ = await asyncio.wait({work}, timeout=_left(deadline))
                    if work in done:
                        return work.result()
                raise RequestError(
                    f"the request was not answered within {config.request_timeout_s:g} s (request_timeout_s); its "
                    "work was dropped: send less per request, or retry when the server is less busy",
                    504,
                )
            finally:
                for task in (work, gone):
                    if not task.done():
                        task.cancel()

    # -- GET routes ----------------------------------------------------------------------------------------------

    async def _get(self, path: str, method: str, send) -> None:
        if method not in ("GET", "HEAD"):
            if path == HEALTH or path in PAGE_FILES or path.startswith("/examples"):
                raise _NotAllowed("GET", f"{path} takes GET requests only, not {method}")
            raise RequestError(self._unknown(path), 404)
        if path == HEALTH:
            await _send_json(send, 200, self.health())
            return
        if path in PAGE_FILES:
            name, content_type = PAGE_FILES[path]
            headers = {"Content-Security-Policy": _PAGE_POLICY, "Referrer-Policy": "no-referrer"}
            await _send(send, 200, _page_file(name), content_type, headers)
            return
        if path == "/examples":
            examples = await self._demo_examples()
            listing = [{"name": n, "caption": c, "url": f"/examples/{n}.png"} for n, (c, _) in examples.items()]
            await _send_json(send, 200, {"examples": listing, "captions": [c for c, _ in examples.values()]})
            return
        if path.startswith("/gallery/") and self.gallery is not None:
            number = path[len("/gallery/") :]
            if number.isdigit() and int(number) < len(self.gallery.paths):
                data = await asyncio.get_running_loop().run_in_executor(self._prep, self.gallery.read, int(number))
                kind = mimetypes.guess_type(self.gallery.paths[int(number)].name)[0] or "application/octet-stream"
                await _send(send, 200, data, kind, {"Cache-Control": "max-age=3600"})
                return
        if path.startswith("/examples/") and path.endswith(".png"):
            examples = await self._demo_examples()
            found = examples.get(path[len("/examples/") : -len(".png")])
            if found is not None:
                await _send(send, 200, found[1], "image/png", {"Cache-Control": "max-age=3600"})
                return
        raise RequestError(self._unknown(path), 404)

    @staticmethod
    def _unknown(path: str) -> str:
        return f"no endpoint {path[:80]!r}; use POST {', '.join(ROUTES)}, GET {HEALTH} or the page at /"

    async def _demo_examples(self) -> dict[str, tuple[str, bytes]]:
        """The demo world's eight example images (``examples/demo`` in the repository), made once: name ->
        (caption, PNG bytes)."""
        if self._examples is None:
            self._examples = await asyncio.get_running_loop().run_in_executor(self._prep, _make_examples)
        return self._examples

    # -- POST routes -----------------------------------------------------------------------------------------------

    async def _answer(self, route: str, body: bytes, started: float) -> dict:
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(
            self._prep, functools.partial(parse_request, route, body, self.config, self._root, decode=False)
        )
        if request.timeout_s is None or request.timeout_s >= self.config.request_timeout_s:
            return await self._work(request)  # the server's own deadline is kept by the caller
        try:
            return await asyncio.wait_for(self._work(request), _left(started + request.timeout_s))
        except asyncio.TimeoutError:
            raise RequestError(
                f"the request was not answered within its timeout_s of {request.timeout_s:g} s; its work was dropped",
                504,
            ) from None

    async def _search(self, request: ScoreRequest) -> dict:
        """``POST /search``: the gallery's CLIP shortlist for the caption, then DSD ranks those images only."""
        if self.gallery is None:
            raise RequestError("this server has no gallery: start it with dsdkit serve ... --gallery DIR", 404)
        caption = request.captions[0]
        loop = asyncio.get_running_loop()
        k = self.gallery.k
        chosen, similarities = await loop.run_in_executor(self._prep, self.gallery.shortlist, caption, k)
        images = []
        for index in chosen:
            data = await loop.run_in_executor(self._prep, self.gallery.read, index)
            images.append(pending_image(data, f"gallery image {self.gallery.names[index]!r}", self.config.limits))
        ranked = ScoreRequest(
            "/rank-images",
            images,
            [caption],
            [(i, 0) for i in range(len(images))],
            request.top_k,
            request.adaptive,
            sum(image.pixels for image in images),
            request.timeout_s,
        )
        body = await self._work(ranked)
        for entry in body.get("ranking", []):
            place = entry["index"]
            index = chosen[place]
            entry.update(
                index=index,
                name=self.gallery.names[index],
                url=f"/gallery/{index}",
                shortlist_rank=place + 1,
                similarity=similarities[place],
            )
        # ``scores`` stays in shortlist order, beside the images it belongs to.
        body["candidates"] = [
            {"index": index, "name": self.gallery.names[index], "similarity": similarity}
            for index, similarity in zip(chosen, similarities, strict=True)
        ]
        body["shortlist"] = {"model": self.gallery.describe()["shortlist"], "k": k, "gallery": len(self.gallery.paths)}
        self.counters.searches += 1
        return body

    async def _work(self, request: ScoreRequest) -> dict:
        if request.route == "/search":
            return await self._search(request)
        loop = asyncio.get_running_loop()
        engine, config = self.engine, self.config
        steps = len(engine.timesteps)
        explaining = request.route == "/explain"
        if explaining:
            if self.spec.kind != "pytorch":
                raise RequestError(
                    "heat maps need the PyTorch engine: serve a model (dsdkit serve --model MODEL); a bundle outputs "
                    "pooled scores only",
                    501,
                )
            steps *= 2 if engine.config.needs_unconditional_pass else 1
        work = len(request.pairs) * steps
        if work > config.limits.max_work_items:
            raise RequestError(
                f"{len(request.pairs):,} pairs x {steps} timesteps = {work:,} work items is over the limit of "
                f"{config.limits.max_work_items:,} per request (max_work_items); send fewer pairs per request",
                413,
            )
        await self._load.take_pixels(request.pixels)
        job = self._prep.submit(self._prepare, request, not explaining)
        # The pixels are given back when the thread is done with them (or never started), also when this request is
        # cancelled meanwhile: a cancelled request's thread still holds its pixels until it ends.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._load.give_pixels, request.pixels))
        prepared = await asyncio.wrap_future(job)
        if explaining:
            return await self._explain(prepared, work)
        if request.adaptive is not None:
            return await self._rank_adaptive(prepared)
        owner = self._batcher.new_owner()
        pieces = [
            Piece(prepared.images, prepared.texts, chunk, steps, engine)
            for chunk in split_pairs(request.pairs, steps, config.max_batch_items)
        ]
        self.counters.pieces += len(pieces)
        try:
            parts = await self._batcher.submit(pieces, owner)
        except Busy as exc:
            raise RequestError(f"{exc}; retry shortly", 503, {"Retry-After": _RETRY_AFTER}) from None
        scores = np.concatenate([part.scores for part in parts])
        truncated = [t.tokens.truncated for t in prepared.texts]
        return format_response(request, scores, engine.timesteps, truncated)

    def _prepare(self, request: ScoreRequest, encode_images: bool = True) -> _Prepared:
        """Decode the request's images and encode them and its captions (on a prep thread)."""
        engine = self.engine
        decode_images(request, self.config.limits)
        images = engine.encode_images(request.images) if encode_images else list(request.images)
        single = request.route in ("/rank-images", "/explain")
        where = ["caption"] if single else [f"captions[{j}]" for j in range(len(request.captions))]
        texts = engine.encode_texts(request.captions, where=where)
        if encode_images:
            request.images = []  # the decoded pixels are not needed any more
        return _Prepared(request, images, texts)

    def _score_pieces(self, pieces: list[Piece]) -> list:
        """One scorer batch (on the batcher's thread): the pieces of any requests, one ``score_encoded_pairs`` call
        per set of timesteps they ask for. Each piece gets its rows of the output."""
        results: list[Any] = [None] * len(pieces)
        groups: dict[tuple, list[int]] = {}
        for n, piece in enumerate(pieces):
            groups.setdefault((id(piece.engine), piece.step_indices), []).append(n)
        counters = self.counters
        for (_, step_indices), members in groups.items():
            engine = pieces[members[0]].engine
            images, texts, pairs, where = combine_pieces([pieces[n] for n in members])
            out = engine.score_encoded_pairs(images, texts, pairs, steps=step_indices)
            counters.scorer_batches += 1
            counters.pairs_scored += len(pairs)
            counters.work_items += len(pairs) * len(out.steps)
            counters.unet_evaluations += out.unet_evaluations
            for first, (n, positions) in enumerate(zip(members, where, strict=True)):
                piece = pieces[n]
                results[n] = dataclasses.replace(
                    out,
                    attention_steps=out.attention_steps[positions],
                    denoise_steps=None if out.denoise_steps is None else out.denoise_steps[positions],
                    truncated=[],
                    # Shared work is counted once, against the first piece of the group.
                    unet_evaluations=piece.work,
                    unconditional_evaluations=out.unconditional_evaluations if first == 0 else 0,
                )
        return results

    async def _rank_adaptive(self, prepared: _Prepared) -> dict:
        """Successive elimination (:func:`~dsdkit.runtime.adaptive.rank_matrix`) on a prep thread, every round of
        its scoring through the batcher."""
        from ..runtime.adaptive import rank_matrix

        request = prepared.request
        loop = asyncio.get_running_loop()
        engine = _BatchedEngine(self, loop)
        per = "image" if request.route == "/rank-captions" else "caption"

        def rank():
            return rank_matrix(
                engine, prepared.images, prepared.texts, top_k=request.top_k or 1, schedule=request.adaptive, per=per
            )

        try:
            result = await loop.run_in_executor(self._prep, rank)
        except BaseException:
            engine.cancel()
            raise
        pick = (lambda a: a[0]) if per == "image" else (lambda a: a[:, 0])
        scores, held = pick(result.scores), pick(result.held)
        exact = held == result.num_timesteps
        truncated = [t.tokens.truncated for t in prepared.texts]
        return format_response(
            request,
            scores,
            self.engine.timesteps,
            truncated,
            exact=exact,
            held=held,
            evaluations={k: int(v) for k, v in result.evaluations.items()},
        )

    async def _explain(self, prepared: _Prepared, work: int) -> dict:
        """Per-word heat maps of the one pair, alone on the scorer's thread in its turn."""
        from ..pytorch.explain import explain

        image, caption = prepared.images[0], prepared.request.captions[0]
        owner = self._batcher.new_owner()
        try:
            explanation = await self._batcher.run_alone(lambda: explain(self.engine, image, caption), work, owner)
        except Busy as exc:
            raise RequestError(f"{exc}; retry shortly", 503, {"Retry-After": _RETRY_AFTER}) from None
        self.counters.explanations += 1
        maps = np.asarray(explanation.maps, dtype=np.float64)
        return {
            "caption": caption,
            "score": float(explanation.score),
            "tokens": list(explanation.tokens),
            "grid": int(maps.shape[-1]) if maps.size else 0,
            # Attention probabilities, 4 significant digits: the page draws them, nobody needs more.
            "maps": [[[float(f"{v:.4g}") for v in row] for row in heat] for heat in maps],
            # One colour scale for every token, from the smallest value of all maps to the largest (the sheet's).
            "min": float(maps.min()) if maps.size else 0.0,
            "max": float(maps.max()) if maps.size else 0.0,
            "region": [float(v) for v in explanation.region],
            "timesteps": [int(t) for t in explanation.timesteps],
        }


class _BatchedEngine:
    """The engine as :func:`~dsdkit.runtime.adaptive.rank_matrix` sees it (from a prep thread), its pair scoring
    sent through the app's batcher; :meth:`cancel` drops what it has queued and refuses more."""

    def __init__(self, app: DsdApp, loop):
        self._app = app
        self._engine = app.engine
        self._loop = loop
        self._owner = app._batcher.new_owner()
        self._calls: set = set()
        self._cancelled = False

    def __getattr__(self, name):  # timesteps, config, the caches: the engine's own
        return getattr(self._engine, name)

    def cancel(self) -> None:
        self._cancelled = True
        for call in list(self._calls):
            call.cancel()

    def score_encoded_pairs(self, images, texts, pairs, steps=None, progress=None):
        from ..runtime.engine import ScoreOutput

        if self._cancelled:
            raise asyncio.CancelledError
        app, engine = self._app, self._engine
        chosen = engine.step_indices(steps)
        pairs = [(int(i), int(j)) for i, j in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist()]
        pieces = [
            Piece(images, texts, chunk, len(chosen), engine, tuple(chosen))
            for chunk in split_pairs(pairs, len(chosen), app.config.max_batch_items)
        ]
        app.counters.pieces += len(pieces)
        call = asyncio.run_coroutine_threadsafe(app._batcher.submit(pieces, self._owner), self._loop)
        self._calls.add(call)
        try:
            parts = call.result()
        except Busy as exc:
            raise RequestError(f"{exc}; retry shortly", 503, {"Retry-After": _RETRY_AFTER}) from None
        finally:
            self._calls.discard(call)
        first = parts[0]
        return ScoreOutput(
            attention_steps=np.concatenate([p.attention_steps for p in parts]),
            denoise_steps=None if first.denoise_steps is None else np.concatenate([p.denoise_steps for p in parts]),
            steps=first.steps,
            timesteps=first.timesteps,
            layer_names=first.layer_names,
            truncated=[t.tokens.truncated for t in texts],
            unet_evaluations=sum(p.unet_evaluations for p in parts),
            unconditional_evaluations=sum(p.unconditional_evaluations for p in parts),
            attention_in_score=first.attention_in_score,
        )


class _NotAllowed(Exception):
    def __init__(self, allow: str, message: str):
        super().__init__(message)
        self.allow = allow
        self.message = message


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _headers(scope) -> dict[str, str]:
    """The request's headers by lower-case name (latin-1, as HTTP/1.1 carries them); a repeated header: the first."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or []:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return (name if sep and port.isdigit() else host).rstrip(".")


def _short(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "…")


def _check_json(scope) -> None:
    """POST bodies are JSON only: a form on another site can post ``application/x-www-form-urlencoded``,
    ``multipart/form-data`` or ``text/plain`` without asking the server first; JSON it cannot."""
    content_type = _headers(scope).get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        shown = _short(content_type) if content_type else "none"
        raise RequestError(f"POST bodies must be JSON sent as Content-Type: application/json (got {shown})", 415)


async def _disconnect(receive) -> bool:
    """Wait for the client to close its connection (True); False when the runner cannot tell (its ``receive``
    returned something else or failed), after which only the deadline ends the wait."""
    try:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return True
            if message.get("type") != "http.request":
                return False
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a runner whose receive cannot be read again after the body
        return False


async def _send(send, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
    raw = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("latin-1")),
        (b"x-content-type-options", b"nosniff"),
        (b"cache-control", b"no-store"),
    ]
    for name, value in (headers or {}).items():
        if name.lower() == "cache-control":
            raw = [(n, v) for n, v in raw if n != b"cache-control"]
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    # allow_nan=False: a non-finite score would be a bug, better a 500 than invalid JSON.
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        logger.error("dsdkit serve: a %d answer held a non-finite number", status)
        status, text = 500, json.dumps({"error": "internal server error (a non-finite number in the answer)"})
    await _send(send, status, text.encode("utf-8"), "application/json", headers)


@functools.cache
def _page_file(name: str) -> bytes:
    return resources.files("dsdkit.serving").joinpath("page", name).read_bytes()


def _make_examples() -> dict[str, tuple[str, bytes]]:
    from ..world import write_examples

    with tempfile.TemporaryDirectory(prefix="dsdkit-examples-") as folder:
        write_examples(folder)
        captions = Path(folder, "captions.txt").read_text("utf-8").splitlines()
        files = sorted(Path(folder).glob("*.png"))
        return {path.stem: (caption, path.read_bytes()) for path, caption in zip(files, captions, strict=True)}
