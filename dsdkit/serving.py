"""``dsdkit serve``: online ranking over HTTP with Ray Serve, a bundle's :class:`~dsdkit.runtime.matcher.Matcher` per
replica, and dynamic batching of the scorer across concurrent requests.

Endpoints (JSON in, JSON out; an image is ``{"base64": "..."}``, an uploaded file's bytes, or ``{"path": "a/b.png"}``,
a file under the server's image root):

- ``POST /rank-captions`` ``{"image": IMAGE, "captions": [...], "top_k": 3}``: the captions best first for the image;
- ``POST /rank-images`` ``{"caption": "...", "images": [IMAGE, ...], "top_k": 3}``: the images best first;
- ``POST /score-pairs`` ``{"images": [...], "captions": [...], "pairs": [[i, j], ...]}``: the given pairs' scores;
- ``GET /health``: the replica's configuration, engine and counters (scorer batches, requests, pairs, evaluations).

How a request is served: its body is parsed and checked against :class:`ServeLimits` (:func:`parse_request`, plain
Python, no Ray), its images decoded and encoded and its captions encoded (cached per replica, as every engine
caches); its (image, caption) pairs are then cut into :class:`Piece` objects of at most
:attr:`ServeConfig.max_batch_items` work items (pairs x timesteps; :func:`split_pairs`), so a request larger than a
batch is split. The pieces go to one ``@serve.batch`` method whose size function counts work items: each of its
calls gathers the pieces of many requests into one :meth:`~dsdkit.runtime.engine.Engine.score_encoded_pairs` call,
a *scorer batch* (the ``scorer_batches`` counter). A pair's score does not depend on what else is in its batch (the
scoring contract), so a request gets the scores it would get alone, within the backend's batch tolerance.

Errors: a bad request gets a 4xx status and ``{"error": "one line"}``; see :func:`error_response` for the statuses.
A server bug gets a one-line 500, and its traceback goes to the replica's log, never to the client.

Ray is imported only inside the functions that need it, so importing this module (and ``dsdkit --help``) costs
nothing and works without the ``ray`` extra; the module never imports torch (it serves bundles).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from .runtime.errors import ConfigError, DsdkitError, InputError, MissingDependencyError, install_hint

__all__ = [
    "ServeLimits",
    "ServeConfig",
    "RequestError",
    "ScoreRequest",
    "Piece",
    "Counters",
    "ROUTES",
    "parse_request",
    "decode_image",
    "resolve_image_path",
    "split_pairs",
    "combine_pieces",
    "format_response",
    "error_response",
    "DsdServer",
    "build_app",
    "serve",
]

logger = logging.getLogger(__name__)

MiB = 1 << 20

#: The scoring endpoints (``POST``) and the fields each one takes (``GET /health`` takes none).
ROUTES: dict[str, tuple[str, ...]] = {
    "/rank-captions": ("image", "captions", "top_k"),
    "/rank-images": ("caption", "images", "top_k"),
    "/score-pairs": ("images", "captions", "pairs"),
}
HEALTH = "/health"

#: Longest error message a client receives (a caption or a path quoted in it cannot make it grow without bound).
_MESSAGE_LIMIT = 400


def _ray_serve():
    """``ray.serve``, or the one-line error naming the extra that installs it."""
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError(
            "dsdkit serve needs Ray Serve, which is not installed: it comes with the 'ray' extra "
            f"({install_hint('ray')})"
        ) from None
    return serve


# -- configuration -------------------------------------------------------------------------------------------------


def _check_positive(owner: str, name: str, value, kind=int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{owner}.{name} must be {what}{' or null' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold; beyond it the request gets a 413 naming the limit.

    Attributes:
        max_body_bytes: the request body (JSON with base64 images: about 4/3 of the image bytes).
        max_image_bytes: one image file (decoded from base64, or on disk under the image root).
        max_image_pixels: one image's width x height, read from its header before any pixel is decoded.
        max_images: images per request (``/rank-images``, ``/score-pairs``).
        max_captions: captions per request (``/rank-captions``, ``/score-pairs``).
        max_caption_chars: characters per caption (the text encoder keeps 75 word tokens anyway).
        max_pairs: (image, caption) pairs per request: scored pairs for the rankings, given ones for ``/score-pairs``.
    """

    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 25_000_000
    max_images: int = 64
    max_captions: int = 256
    max_caption_chars: int = 1000
    max_pairs: int = 4096

    def __post_init__(self):
        from .runtime.images import MAX_IMAGE_PIXELS

        for f in dataclasses.fields(self):
            _check_positive("limits", f.name, getattr(self, f.name))
        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise ConfigError(
                f"limits.max_image_pixels {self.max_image_pixels:,} is over the runtime's decompression-bomb guard "
                f"of {MAX_IMAGE_PIXELS:,} pixels; give at most that"
            )


@dataclass(frozen=True)
class ServeConfig:
    """How a replica serves: request limits, batching, the image root, S and the default ``top_k``.

    Everything here is the deployment's ``user_config`` (:meth:`to_dict`), so a running application takes a new one
    without restarting its replicas (a new ``num_timesteps`` reopens the bundle). ``GET /health`` returns it.

    Attributes:
        limits: what one request may hold (:class:`ServeLimits`).
        max_batch_items: a scorer batch's size in work items, pairs x timesteps: a request's pairs are cut into
            pieces of at most this many items, and one scorer batch gathers pieces (of any requests) up to it.
        batch_wait_timeout_s: how long a scorer batch waits for more pieces after its first one, unless it is full
            (a longer wait makes fuller batches under load, and adds up to that much latency to a lone request).
        image_root: the folder ``{"path": ...}`` images are read from (``None``: paths are refused, uploads only).
            Paths are relative to it; ``..``, absolute paths outside it and links that leave it are refused.
        num_timesteps: S of the bundle's timestep table (``None``: the bundle's own).
        top_k: the ranking endpoints' default ``top_k`` (``None``: the whole ranking).
        warmup: score one pair when the engine opens, so the first request does not pay for creating sessions.
    """

    limits: ServeLimits = field(default_factory=ServeLimits)
    max_batch_items: int = 256
    batch_wait_timeout_s: float = 0.01
    image_root: str | None = None
    num_timesteps: int | None = None
    top_k: int | None = None
    warmup: bool = True

    def __post_init__(self):
        if isinstance(self.limits, dict):  # from_dict and dataclasses.replace(limits={...}) both land here
            object.__setattr__(self, "limits", _from_fields(ServeLimits, self.limits, "limits"))
        if not isinstance(self.limits, ServeLimits):
            raise ConfigError(f"limits must be a ServeLimits or a mapping, got {type(self.limits).__name__}")
        _check_positive("config", "max_batch_items", self.max_batch_items)
        _check_positive("config", "num_timesteps", self.num_timesteps, allow_none=True)
        _check_positive("config", "top_k", self.top_k, allow_none=True)
        wait = self.batch_wait_timeout_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < math.inf:
            raise ConfigError(f"config.batch_wait_timeout_s must be a number of seconds >= 0, got {wait!r}")
        if self.image_root is not None and not isinstance(self.image_root, str):
            object.__setattr__(self, "image_root", os.fspath(self.image_root))
        if not isinstance(self.warmup, bool):
            raise ConfigError(f"config.warmup must be true or false, got {self.warmup!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the deployment's ``user_config``), read back by :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        """The config of a :meth:`to_dict` dict; an unknown key is a :class:`ConfigError` (a typo would be ignored)."""
        return _from_fields(cls, data, "config")

    def root(self) -> Path | None:
        """:attr:`image_root` resolved (it must be an existing folder), or ``None`` when paths are refused."""
        if self.image_root is None:
            return None
        try:
            root = Path(self.image_root).expanduser().resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise ConfigError(
                f"image root {self.image_root}: cannot be resolved ({exc}); give an existing folder"
            ) from None
        if not root.is_dir():
            raise ConfigError(f"image root {self.image_root}: is not a folder")
        return root


def _from_fields(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(names))}")
    return cls(**data)


# -- requests ------------------------------------------------------------------------------------------------------


class RequestError(InputError):
    """A request the server refuses: the HTTP status (4xx) and a one-line message for the client."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quote(value: str, limit: int = 80) -> str:
    """A client's string inside a message: escaped (no line breaks, no control characters) and shortened."""
    text = value if len(value) <= limit else value[:limit] + "…"
    return ascii(text) if not text.isprintable() else repr(text)


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


@dataclass
class ScoreRequest:
    """A checked request: decoded images, captions, the pairs to score and the ranking's ``top_k``.

    The three endpoints reduce to this: ``/rank-captions`` is one image and pairs ``(0, j)``, ``/rank-images`` one
    caption and pairs ``(i, 0)``, ``/score-pairs`` the given pairs.
    """

    route: str
    images: list  # 8-bit RGB PIL images
    captions: list[str]
    pairs: list[tuple[int, int]]
    top_k: int | None = None


def parse_request(route: str, body: bytes, config: ServeConfig, root: Path | None = None) -> ScoreRequest:
    """Parse, check and decode one request body of ``route`` (one of :data:`ROUTES`).

    ``root``: the resolved image root (:meth:`ServeConfig.root`; default: resolved here).

    Raises:
        RequestError: with its HTTP status: 400 (not a JSON object), 413 (over a limit), 403 (a path outside the
            image root, or paths refused), 422 (a missing or mistyped field, bad base64, an undecodable image, an
            index out of range).
    """
    if route not in ROUTES:
        raise RequestError(f"unknown endpoint {_quote(route)}; use one of {', '.join(ROUTES)}", 404)
    limits = config.limits
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            f"request body of {len(body):,} bytes is over the {limits.max_body_bytes:,}-byte limit", 413
        )
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError("request body is nested too deeply to parse", 400) from None
    except UnicodeDecodeError:
        raise RequestError("request body is not UTF-8 text; send JSON", 400) from None
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", 400
        ) from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {_kind(data)}", 400)
    allowed = ROUTES[route]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        names = ", ".join(_quote(str(k), 30) for k in unknown[:5])
        raise RequestError(f"{route}: unknown fields {names}; it takes {', '.join(allowed)}")
    if root is None:
        root = config.root()
    top_k = _top_k(data.get("top_k", config.top_k))

    def required(name):
        if name not in data:
            raise RequestError(f"{route}: missing field {name!r} (it takes {', '.join(allowed)})")
        return data[name]

    if route == "/rank-captions":
        captions = _captions(required("captions"), limits)
        _check_pairs_limit(len(captions), limits)
        images = [_image(required("image"), "image", limits, root)]
        pairs = [(0, j) for j in range(len(captions))]
    elif route == "/rank-images":
        caption = _caption(required("caption"), "caption", limits)
        images_field = _array(required("images"), "images", limits.max_images, "max_images", 413)
        _check_pairs_limit(len(images_field), limits)
        images = [_image(item, f"images[{i}]", limits, root) for i, item in enumerate(images_field)]
        captions, pairs = [caption], [(i, 0) for i in range(len(images))]
    else:
        captions = _captions(required("captions"), limits)
        images_field = _array(required("images"), "images", limits.max_images, "max_images", 413)
        pairs = _pairs(required("pairs"), len(images_field), len(captions), limits)
        images = [_image(item, f"images[{i}]", limits, root) for i, item in enumerate(images_field)]
    return ScoreRequest(route, images, captions, pairs, top_k)


def _top_k(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"top_k must be a positive integer or null, got {_quote(json.dumps(value), 40)}")
    return value


def _array(value, name: str, limit: int, limit_name: str, status: int) -> list:
    if not isinstance(value, list):
        raise RequestError(f"{name} must be an array, got {_kind(value)}")
    if not value:
        raise RequestError(f"{name} is empty; give at least one")
    if len(value) > limit:
        raise RequestError(f"{len(value):,} {name} is over the limit of {limit:,} per request ({limit_name})", status)
    return value


def _caption(value, name: str, limits: ServeLimits) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {_kind(value)}")
    if len(value) > limits.max_caption_chars:
        raise RequestError(
            f"{name} has {len(value):,} characters, over the limit of {limits.max_caption_chars:,} "
            "(max_caption_chars)",
            413,
        )
    if not value.strip():
        raise RequestError(f"{name} is empty; every caption needs at least one word")
    return value


def _captions(value, limits: ServeLimits) -> list[str]:
    items = _array(value, "captions", limits.max_captions, "max_captions", 413)
    return [_caption(item, f"captions[{j}]", limits) for j, item in enumerate(items)]


def _check_pairs_limit(count: int, limits: ServeLimits) -> None:
    if count > limits.max_pairs:
        raise RequestError(f"{count:,} pairs to score is over the limit of {limits.max_pairs:,} (max_pairs)", 413)


def _pairs(value, num_images: int, num_captions: int, limits: ServeLimits) -> list[tuple[int, int]]:
    items = _array(value, "pairs", limits.max_pairs, "max_pairs", 413)
    pairs = []
    for n, item in enumerate(items):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in item)
        ):
            raise RequestError(f"pairs[{n}] must be [image index, caption index], got {_quote(json.dumps(item), 40)}")
        i, j = item
        if not (0 <= i < num_images and 0 <= j < num_captions):
            raise RequestError(
                f"pairs[{n}] = [{i}, {j}] is out of range: {num_images} images and {num_captions} captions were given"
            )
        pairs.append((i, j))
    return pairs


def _image(value, name: str, limits: ServeLimits, root: Path | None):
    """One image field, ``{"base64": ...}`` or ``{"path": ...}``, decoded to an RGB PIL image."""
    if not isinstance(value, dict) or len(value) != 1 or not {"base64", "path"} & set(value):
        raise RequestError(f'{name} must be {{"base64": "..."}} or {{"path": "..."}}, got {_kind(value)}')
    if "path" in value:
        path = resolve_image_path(value["path"], root, name)
        try:
            size = path.stat().st_size
            if size > limits.max_image_bytes:
                raise RequestError(_too_many_bytes(name, size, limits), 413)
            data = path.read_bytes()
        except OSError as exc:
            raise RequestError(f"{name}: {_quote(value['path'])} cannot be read ({exc.strerror})") from None
        return decode_image(data, f"{name} ({_quote(value['path'])})", limits)
    text = value["base64"]
    if not isinstance(text, str):
        raise RequestError(f"{name}.base64 must be a string, got {_kind(text)}")
    if text.startswith("data:") and "," in text[:100]:  # a data URL from a browser: data:image/png;base64,....
        text = text.split(",", 1)[1]
    # Checked before decoding: a huge string must not be decoded only to be refused.
    if len(text) > 4 * math.ceil(limits.max_image_bytes / 3) + 4096:
        raise RequestError(_too_many_bytes(name, len(text) * 3 // 4, limits), 413)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{name}.base64 is not valid base64 ({_one_line(exc, 80)})") from None
    return decode_image(data, name, limits)


def _too_many_bytes(name: str, size: int, limits: ServeLimits) -> str:
    return f"{name}: {size:,} bytes is over the limit of {limits.max_image_bytes:,} bytes per image (max_image_bytes)"


def resolve_image_path(value, root: Path | None, name: str = "image") -> Path:
    """The file a ``{"path": ...}`` image names, which must lie under ``root`` (resolved) once every link is followed.

    Raises:
        RequestError: 403 when paths are refused (no root), for ``..`` and for paths (absolute, or through a link)
            that leave the root; 422 for a path that is not a string, or names no file.
    """
    if root is None:
        raise RequestError(
            f"{name}: image paths are refused by this server (it has no image root); upload base64", 403
        )
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{name}.path must be a non-empty string, got {_kind(value)}")
    if "\x00" in value:
        raise RequestError(f"{name}.path cannot contain a NUL byte")
    shown = _quote(value)
    path = PurePath(value)
    if ".." in path.parts:
        raise RequestError(f"{name}: path {shown} contains '..'; give a path inside the image root", 403)
    try:
        resolved = (root / path).resolve(strict=True)  # an absolute path replaces root here, and is checked below
    except FileNotFoundError:
        raise RequestError(f"{name}: no such image under the image root: {shown}") from None
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13), a permission problem
        raise RequestError(f"{name}: path {shown} cannot be resolved ({type(exc).__name__})") from None
    if not resolved.is_relative_to(root):
        raise RequestError(f"{name}: path {shown} leads outside the image root", 403)
    if not resolved.is_file():
        raise RequestError(f"{name}: path {shown} is not a file")
    return resolved


def decode_image(data: bytes, name: str, limits: ServeLimits):
    """An image file's bytes as an 8-bit RGB PIL image, by the same steps as
    :func:`~dsdkit.runtime.images.load_image` (EXIF orientation, alpha on white), so an upload scores exactly as the
    same file read from disk; its pixel count is checked from the header before anything is decoded.

    Raises:
        RequestError: 413 over ``max_image_bytes`` or ``max_image_pixels``; 422 empty, unreadable or corrupt.
    """
    from PIL import Image

    # The runtime's own guard around Pillow calls: whatever a decoder raises becomes the same one-line InputError a
    # file on disk would get (the exception type named), with Pillow's warnings noted against the image.
    from .runtime.images import _exif_upright, _pillow, to_rgb

    if len(data) > limits.max_image_bytes:
        raise RequestError(_too_many_bytes(name, len(data), limits), 413)
    if not data:
        raise RequestError(f"{name}: the image is empty (0 bytes)")
    guard = functools.partial(_pillow, name)
    try:
        with guard(opening=True):
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size
    except InputError as exc:
        bomb = isinstance(exc.__cause__, Image.DecompressionBombError)  # Pillow's own, larger, limit
        raise RequestError(str(exc), 413 if bomb else 422) from None
    try:
        if width * height > limits.max_image_pixels:
            raise RequestError(
                f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
                f"{limits.max_image_pixels:,} (max_image_pixels); downscale the image",
                413,
            )
        if width < 1 or height < 1:
            raise RequestError(f"{name}: the image has no pixels ({width}x{height})")
        try:
            with guard():
                opened.load()
                upright = _exif_upright(opened)
            return to_rgb(upright, guard)
        except InputError as exc:
            raise RequestError(str(exc)) from None
    finally:
        with guard():
            opened.close()


# -- pieces and scorer batches -------------------------------------------------------------------------------------


@dataclass
class Piece:
    """Some of one request's pairs, as a unit of a scorer batch: ``pairs`` index ``images`` and ``texts`` (the
    request's encodings); :attr:`work` = pairs x timesteps is what the batch's size counts."""

    images: Sequence[Any]  # ImageEncoding
    texts: Sequence[Any]  # TextEncoding
    pairs: list[tuple[int, int]]
    steps: int
    engine: Any = None  # the engine that encoded them (a new config may open another one meanwhile)

    @property
    def work(self) -> int:
        return len(self.pairs) * self.steps


def batch_work(pieces: list[Piece]) -> int:
    """The ``batch_size_fn`` of the scorer batches: their work items (pairs x timesteps)."""
    return sum(piece.work for piece in pieces)


def split_pairs(pairs: Sequence[tuple[int, int]], steps: int, max_items: int) -> list[list[tuple[int, int]]]:
    """``pairs`` cut, in order, into pieces of at most ``max_items`` work items (``steps`` per pair)."""
    if steps > max_items:
        raise ConfigError(
            f"max_batch_items {max_items} is less than one pair's work ({steps} timesteps); give at least {steps}"
        )
    size = max_items // steps
    return [list(pairs[begin : begin + size]) for begin in range(0, len(pairs), size)]


def combine_pieces(pieces: Sequence[Piece]) -> tuple[list, list, list[tuple[int, int]], list[np.ndarray]]:
    """One scoring call for many pieces: the images and captions they use (each once), the distinct pairs among
    theirs (a pair asked for by several requests is scored once), and per piece the positions of its pairs' scores.

    Returns ``(images, texts, pairs, where)``: ``scores[where[n]]`` are piece ``n``'s scores, in its order.
    """
    images: dict[str, int] = {}
    texts: dict[str, int] = {}
    image_list, text_list = [], []
    unique: dict[tuple[int, int], int] = {}
    where = []
    for piece in pieces:
        positions = []
        for i, j in piece.pairs:
            image, text = piece.images[i], piece.texts[j]
            if image.key not in images:
                images[image.key] = len(image_list)
                image_list.append(image)
            if text.text not in texts:
                texts[text.text] = len(text_list)
                text_list.append(text)
            pair = (images[image.key], texts[text.text])
            positions.append(unique.setdefault(pair, len(unique)))
        where.append(np.asarray(positions, dtype=np.int64))
    return image_list, text_list, list(unique), where


@dataclass
class Counters:
    """What one replica did since it started (``GET /health``): ``scorer_batches`` counts the batched scoring calls,
    so ``scorer_batches / requests`` < 1 shows batching at work."""

    requests: int = 0  # scoring requests received
    answered: int = 0  # ... answered with 200
    refused: int = 0  # ... and with a 4xx
    failed: int = 0  # ... and with a 5xx
    pieces: int = 0  # pieces submitted to the scorer batches
    scorer_batches: int = 0
    pairs_scored: int = 0  # distinct pairs in the scorer batches
    work_items: int = 0  # their pairs x timesteps
    unet_evaluations: int = 0  # scorer-graph evaluations run, the unconditional pass included (cached work is not)


# -- responses -----------------------------------------------------------------------------------------------------


def format_response(request: ScoreRequest, scores: np.ndarray, timesteps: Sequence[int], truncated=None) -> dict:
    """The JSON body of an answered request.

    ``/rank-captions``: ``ranking`` (best first, ``top_k`` of them: ``index``, ``caption``, ``score``) and ``scores``
    in the request's caption order; ``/rank-images``: the same with image indices; ``/score-pairs``: ``scores`` in
    the request's pair order. All carry ``timesteps`` (the scores are means over them) and, when the text encoder
    dropped word tokens of a caption, ``truncated`` (per caption, the tokens dropped).
    """
    scores = np.asarray(scores, dtype=np.float64)
    body: dict[str, Any] = {}
    if request.route in ("/rank-captions", "/rank-images"):
        # Stable order: equal scores keep the request's order, as Engine.rank_texts / rank_images.
        order = np.argsort(-scores, kind="stable")[: request.top_k]
        ranking = []
        for n in order.tolist():
            entry: dict[str, Any] = {"index": n, "score": float(scores[n])}
            if request.route == "/rank-captions":
                entry["caption"] = request.captions[n]
            ranking.append(entry)
        body["ranking"] = ranking
    body["scores"] = [float(s) for s in scores]
    body["timesteps"] = [int(t) for t in timesteps]
    if truncated and any(truncated):
        body["truncated"] = [int(t) for t in truncated]
    return body


def error_response(exc: BaseException) -> tuple[int, dict[str, str]]:
    """The status and ``{"error": "one line"}`` body of an exception raised while serving a request.

    :class:`RequestError`: its own status; any other :class:`~dsdkit.runtime.errors.InputError` (an empty caption
    after normalisation, a caption that is not valid Unicode) or :class:`~dsdkit.runtime.errors.ConfigError` (an
    option a request cannot use): 422. Another dsdkit error is the server's (a damaged bundle, a missing
    dependency): 500 with its message. Anything else is a bug: 500 with the exception's type only (the traceback is
    logged by the caller).
    """
    if isinstance(exc, RequestError):
        return exc.status, {"error": _one_line(exc)}
    if isinstance(exc, (InputError, ConfigError)):
        return 422, {"error": _one_line(exc)}
    if isinstance(exc, DsdkitError):
        return 500, {"error": _one_line(f"server error: {exc}")}
    return 500, {"error": f"internal server error ({type(exc).__name__}); the traceback is in the server's log"}


def _json_response(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import Response

    # allow_nan=False: a non-finite score would be a bug, better a 500 than invalid JSON.
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(text.encode("utf-8"), status_code=status, media_type="application/json", headers=headers)


# -- the deployment ------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    request: ScoreRequest
    images: list
    texts: list


class DsdServer:
    """The Ray Serve deployment's class: one :class:`~dsdkit.runtime.matcher.Matcher` per replica, the HTTP
    endpoints, and the scorer batches (see the module doc).

    Bind it with :func:`build_app`. The :class:`ServeConfig` arrives as the deployment's ``user_config`` through
    :meth:`reconfigure` (Ray calls it after ``__init__`` and whenever the config changes), which opens the engine.

    Args:
        bundle: the bundle folder (a path every replica's node can read).
        backend, device: of :meth:`~dsdkit.runtime.matcher.Matcher.from_bundle` (``cpu`` unless the replica has GPUs).
        threads: ONNX Runtime's intra-op threads (the replica's CPUs; default: the CPUs this process may use).
        config: a :meth:`ServeConfig.to_dict` dict, for use without ``user_config``.
    """

    def __init__(
        self,
        bundle: str,
        backend: str = "onnxruntime",
        device: str = "cpu",
        threads: int | None = None,
        config: dict | None = None,
    ):
        serve = _ray_serve()
        self._bundle = bundle
        self._backend = backend
        self._device = device
        self._threads = threads
        self._engine = None
        self._engine_key = None
        self.config = ServeConfig()
        self._root = None
        self._started = time.time()
        self.counters = Counters()
        # Decorated here rather than on the class, so the class imports without Ray and each replica's settings
        # come from its config (reconfigure updates them in place).
        self._score_batch = serve.batch(
            max_batch_size=self.config.max_batch_items,
            batch_wait_timeout_s=self.config.batch_wait_timeout_s,
            batch_size_fn=batch_work,
        )(self._score_pieces)
        try:  # also as a Ray metric (Prometheus), where the cluster exports them; the JSON counter is the reference
            from ray.serve import metrics

            self._batch_metric = metrics.Counter("dsdkit_scorer_batches", description="dsdkit scorer batches run")
        except Exception:  # noqa: BLE001 - the metric is a convenience; serving never depends on it
            logger.debug("no Ray metric for scorer batches", exc_info=True)
            self._batch_metric = None
        if config is not None:
            self.reconfigure(config)

    # -- configuration and health ---------------------------------------------------------------------------------

    def reconfigure(self, config: dict) -> None:
        """Apply a :meth:`ServeConfig.to_dict` dict: limits and batching at once, the engine reopened for a new S."""
        from .runtime.matcher import Matcher

        new = ServeConfig.from_dict(config)
        root = new.root()
        key = (new.num_timesteps,)
        if self._engine is None or key != self._engine_key:
            engine = Matcher.from_bundle(
                self._bundle,
                backend=self._backend,
                device=self._device,
                num_timesteps=new.num_timesteps,
                threads=self._threads,
            )
            split_pairs([], len(engine.timesteps), new.max_batch_items)  # one pair must fit a batch
            if new.warmup:
                self._warm_up(engine)
            # The old engine is not closed: requests may still be scoring with it; it goes with its last reference.
            self._engine, self._engine_key = engine, key
        else:
            split_pairs([], len(self._engine.timesteps), new.max_batch_items)
        self.config, self._root = new, root
        self._score_batch.set_max_batch_size(new.max_batch_items)
        self._score_batch.set_batch_wait_timeout_s(float(new.batch_wait_timeout_s))
        logger.info(
            "dsdkit serve: %s, S=%d, scorer batches of up to %d work items (wait %.3f s)",
            self._bundle,
            len(self._engine.timesteps),
            new.max_batch_items,
            new.batch_wait_timeout_s,
        )

    @staticmethod
    def _warm_up(engine) -> None:
        """Create every graph's session now (one grey image, one caption, one pair at each timestep)."""
        image = engine.encode_images([np.full((8, 8, 3), 128, dtype=np.uint8)])
        text = engine.encode_texts(["warm up"])
        engine.score_encoded_pairs(image, text, [(0, 0)])

    def check_health(self) -> None:
        """Ray Serve's health check: the replica is unhealthy until its engine is open."""
        if self._engine is None:
            raise RuntimeError("the engine is not open yet")

    def health(self) -> dict[str, Any]:
        """The ``GET /health`` body: status, replica, engine, config and counters."""
        from . import __version__

        engine = self._engine
        try:
            from ray import serve

            replica = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside a replica (tests of the class itself) there is no context
            replica = None
        body: dict[str, Any] = {"status": "ok" if engine is not None else "starting", "replica": replica}
        body["dsdkit_version"] = __version__
        body["uptime_s"] = round(time.time() - self._started, 3)
        if engine is not None:
            meta = engine.metadata()
            body["engine"] = {
                "bundle": meta["bundle"],
                "model": meta["model"].get("source"),
                "identity": meta["model"].get("identity"),
                "scoring": meta["scoring"],
                "timesteps": meta["timesteps"],
                "batch_size": engine.batch_size,
                "runners": meta["runners"],
                "warnings": meta["warnings"],
            }
        body["config"] = self.config.to_dict()
        body["counters"] = dataclasses.asdict(self.counters)
        return body

    # -- HTTP ------------------------------------------------------------------------------------------------------

    async def __call__(self, request):
        """Route one HTTP request; every exception becomes a JSON error response here (see :func:`error_response`)."""
        path = request.url.path
        prefix = request.scope.get("root_path") or ""
        if prefix and path.startswith(prefix):  # an application under a route prefix sees its own paths
            path = path[len(prefix) :]
        path = "/" + path.strip("/")
        scoring = path in ROUTES
        if scoring:
            self.counters.requests += 1
        try:
            if path == HEALTH:
                if request.method not in ("GET", "HEAD"):
                    raise _MethodNotAllowed("GET")
                return _json_response(200, self.health())
            if not scoring:
                raise RequestError(
                    f"no endpoint {_quote(path)}; use POST {', '.join(ROUTES)} or GET {HEALTH}",
                    404,
                )
            if request.method != "POST":
                raise _MethodNotAllowed("POST")
            if self._engine is None:
                raise RequestError("the server is starting; try again shortly", 503)
            body = await _read_body(request, self.config.limits.max_body_bytes)
            response = await self._answer(path, body)
            self.counters.answered += 1
            return response
        except asyncio.CancelledError:  # the client went away: nothing to answer
            raise
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: a client never sees a traceback
            if isinstance(exc, _MethodNotAllowed):
                status, body = 405, {"error": f"{path} takes {exc.allow} requests only, not {request.method}"}
                headers = {"Allow": exc.allow}
            else:
                status, body = error_response(exc)
                headers = None
            if status >= 500 and not isinstance(exc, RequestError):
                logger.exception("dsdkit serve: %s %s failed", request.method, path)
            if scoring:
                if status >= 500:
                    self.counters.failed += 1
                else:
                    self.counters.refused += 1
            return _json_response(status, body, headers)

    async def _answer(self, route: str, body: bytes):
        engine = self._engine
        # Parsing, decoding and encoding are blocking work: a thread, so the replica keeps accepting requests.
        prepared = await asyncio.to_thread(self._prepare, engine, route, body)
        steps = len(engine.timesteps)
        pieces = [
            Piece(prepared.images, prepared.texts, chunk, steps, engine)
            for chunk in split_pairs(prepared.request.pairs, steps, self.config.max_batch_items)
        ]
        self.counters.pieces += len(pieces)
        parts = await asyncio.gather(*(self._score_batch(piece) for piece in pieces))
        scores = np.concatenate(parts)
        truncated = [t.tokens.truncated for t in prepared.texts]
        return _json_response(200, format_response(prepared.request, scores, engine.timesteps, truncated))

    def _prepare(self, engine, route: str, body: bytes) -> _Prepared:
        request = parse_request(route, body, self.config, self._root)
        images = engine.encode_images(request.images)
        where = ["caption"] if route == "/rank-images" else [f"captions[{j}]" for j in range(len(request.captions))]
        texts = engine.encode_texts(request.captions, where=where)
        return _Prepared(request, images, texts)

    async def _score_pieces(self, pieces: list[Piece]) -> list[np.ndarray]:
        """One scorer batch: the pieces of any requests in one ``score_encoded_pairs`` call (wrapped by
        ``serve.batch`` in ``__init__``)."""
        results: list[np.ndarray | None] = [None] * len(pieces)
        groups: dict[int, list[int]] = {}
        for n, piece in enumerate(pieces):  # one group, unless a new S reopened the engine while requests ran
            groups.setdefault(id(piece.engine), []).append(n)
        for members in groups.values():
            engine = pieces[members[0]].engine
            images, texts, pairs, where = combine_pieces([pieces[n] for n in members])
            out = await asyncio.to_thread(engine.score_encoded_pairs, images, texts, pairs)
            counters = self.counters
            counters.scorer_batches += 1
            counters.pairs_scored += len(pairs)
            counters.work_items += len(pairs) * len(out.steps)
            counters.unet_evaluations += out.unet_evaluations
            if self._batch_metric is not None:
                self._batch_metric.inc()
            scores = out.scores
            for n, positions in zip(members, where, strict=True):
                results[n] = scores[positions]
        return results


class _MethodNotAllowed(Exception):
    def __init__(self, allow: str):
        super().__init__(allow)
        self.allow = allow


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (from its
    ``Content-Length`` before reading anything, else while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError("the Content-Length header is not a number", 400) from None
        if size > limit:
            raise RequestError(f"request body of {size:,} bytes is over the {limit:,}-byte limit", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is over the {limit:,}-byte limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# -- applications --------------------------------------------------------------------------------------------------


def _check_bundle(bundle: str | os.PathLike, config: ServeConfig) -> Path:
    """The bundle's absolute path, after a cheap local check (it opens; one pair's work fits a batch), so that a bad
    option fails here in one line rather than in every replica."""
    from .runtime.matcher import Matcher

    path = Path(bundle).expanduser().resolve()
    engine = Matcher.from_bundle(
        path, backend="onnxruntime", device="cpu", verify=False, num_timesteps=config.num_timesteps
    )
    try:
        split_pairs([], len(engine.timesteps), config.max_batch_items)
    finally:
        engine.close()
    config.root()  # an image root that does not exist fails now
    return path


def build_app(
    bundle: str | os.PathLike,
    config: ServeConfig | None = None,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    threads: int | None = None,
    max_ongoing_requests: int = 32,
):
    """The Ray Serve application (``serve.run(build_app(...))``): :class:`DsdServer` over ``bundle``.

    Args:
        config: the :class:`ServeConfig` (limits, batching, image root, S), the deployment's ``user_config``.
        replicas: replicas of the deployment, each with its own engine.
        gpus_per_replica: GPUs Ray reserves per replica; above 0 the engine runs on ``cuda`` (TensorRT engines when
            the bundle has them and TensorRT is installed, else ONNX Runtime's CUDA provider), else on the CPU.
        cpus_per_replica: CPUs Ray reserves per replica.
        threads: ONNX Runtime's intra-op threads per replica (default: ``cpus_per_replica``, at least 1).
        max_ongoing_requests: requests a replica holds at once; more concurrent requests than this wait in Ray's
            queue, and only requests a replica holds can share its scorer batches.

    Raises:
        MissingDependencyError: Ray Serve is not installed.
        ConfigError, BundleError: a bad option or bundle (checked here, before any replica starts).
    """
    serve = _ray_serve()
    config = config or ServeConfig()
    _check_positive("serve", "replicas", replicas)
    _check_positive("serve", "max_ongoing_requests", max_ongoing_requests)
    _check_positive("serve", "cpus_per_replica", cpus_per_replica, kind=(int, float))
    if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, (int, float)) or gpus_per_replica < 0:
        raise ConfigError(f"gpus_per_replica must be a number >= 0, got {gpus_per_replica!r}")
    path = _check_bundle(bundle, config)
    if config.image_root is not None:  # replicas run elsewhere: give them the absolute folder
        config = dataclasses.replace(config, image_root=str(config.root()))
    threads = threads or max(1, int(cpus_per_replica))
    gpu = gpus_per_replica > 0
    deployment = serve.deployment(DsdServer).options(
        name="dsdkit",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        user_config=config.to_dict(),
    )
    return deployment.bind(
        str(path), backend="auto" if gpu else "onnxruntime", device="cuda" if gpu else "cpu", threads=threads
    )


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a service manager, a container stop) stops the server as Ctrl-C does, cleanly."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    bundle: str | os.PathLike,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    port: int = 8000,
    host: str = "127.0.0.1",
    config: ServeConfig | None = None,
    address: str | None = None,
    threads: int | None = None,
    max_ongoing_requests: int = 32,
    app_name: str = "dsdkit",
    route_prefix: str = "/",
) -> None:
    """Serve ``bundle`` over HTTP until Ctrl-C or SIGTERM (``dsdkit serve``): start or join Ray, run
    :func:`build_app`'s application at ``http://host:port/``, log its URL, block; then delete the application and
    leave Ray (a local cluster started here ends with it).

    Args:
        address: the Ray cluster to join (``auto``, ``HOST:6379``, ``ray://HOST:10001``); ``None``: Ray's own rule
            (``RAY_ADDRESS``, else a new local cluster); ``local``: always a new local cluster, which ends with this
            call. On a cluster the bundle (and the image root) must be at the same path on every node.
        host: the interface the HTTP proxy listens on (``0.0.0.0`` to accept other machines; there is no
            authentication, so put it behind one).
        The others as in :func:`build_app`.
    """
    _check_positive("serve", "port", port)
    app = build_app(
        bundle,
        config,
        replicas=replicas,
        gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica,
        threads=threads,
        max_ongoing_requests=max_ongoing_requests,
    )
    import ray

    ray_serve = _ray_serve()
    ray.init(address=address, ignore_reinit_error=True)
    try:
        # From here on, Ctrl-C or SIGTERM (also while the replicas start) removes the application and leaves Ray.
        with _terminate_as_interrupt():
            try:
                ray_serve.start(http_options={"host": host, "port": int(port)})
                try:
                    ray_serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
                except RuntimeError as exc:  # a replica that failed to start: Ray's message holds its traceback
                    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                    raise ConfigError(
                        f"the application did not start: {_one_line(first)} (see the Ray logs)"
                    ) from None
                shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
                url = f"http://{shown}:{port}{route_prefix.rstrip('/')}"
                logger.info("dsdkit serve: %s at %s (%s/health); Ctrl-C or SIGTERM stops", Path(bundle), url, url)
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                logger.info("dsdkit serve: stopping")
        ray_serve.delete(app_name)
    finally:
        ray.shutdown()
