"""Requests and answers of the JSON API, plain Python (no web framework, no engine): parsing and checking a body
against :class:`~dsdkit.serving.config.ServeLimits`, reading images (uploads and paths under the image root) with
their pixel counts known before any pixel is decoded, formatting results, and turning any exception into a status
and a one-line ``{"error": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ..runtime.errors import ConfigError, DsdkitError, InputError
from .config import ServeConfig, ServeLimits

__all__ = [
    "ROUTES",
    "RANKING_ROUTES",
    "RequestError",
    "ScoreRequest",
    "PendingImage",
    "parse_request",
    "pending_image",
    "decode_image",
    "decode_images",
    "resolve_image_path",
    "format_response",
    "error_response",
    "one_line",
]

#: The POST routes and the fields each one takes.
ROUTES: dict[str, tuple[str, ...]] = {
    "/rank-captions": ("image", "captions", "top_k", "adaptive", "timeout_s"),
    "/rank-images": ("caption", "images", "top_k", "adaptive", "timeout_s"),
    "/score-pairs": ("images", "captions", "pairs", "timeout_s"),
    "/explain": ("image", "caption", "timeout_s"),
    "/search": ("caption", "top_k", "adaptive", "timeout_s"),
}
RANKING_ROUTES = ("/rank-captions", "/rank-images")

#: Longest error message a client receives (a caption or a path quoted in it cannot make it grow without bound).
_MESSAGE_LIMIT = 400
#: Digits of the longest integer a body may hold: every count here fits in far fewer. Python refuses to convert
#: more than 4,300 digits (a ValueError deep in json.loads); checked first, so a long number is the client's error.
_MAX_INT_DIGITS = 18


class RequestError(InputError):
    """A request the server refuses: the HTTP status (4xx, or 503/504 when it cannot answer in time) and a one-line
    message for the client. ``headers``: extra response headers (``Retry-After``)."""

    def __init__(self, message: str, status: int = 422, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def one_line(text, limit: int = _MESSAGE_LIMIT) -> str:
    """``text`` on one line (whitespace runs, line breaks included, become one space), at most ``limit`` long."""
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
class PendingImage:
    """An image file's bytes whose header was read (size checked) but whose pixels are not decoded yet."""

    name: str  # how messages name it: images[3], image ('a/b.png')
    data: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class ScoreRequest:
    """A checked request: its images (:class:`PendingImage`, or 8-bit RGB PIL images once decoded), captions, the
    pairs to score, the ranking's ``top_k`` and ``adaptive`` schedule.

    The routes reduce to this: ``/rank-captions`` is one image and pairs ``(0, j)``, ``/rank-images`` one caption
    and pairs ``(i, 0)``, ``/score-pairs`` the given pairs, ``/explain`` one image and one caption.
    """

    route: str
    images: list
    captions: list[str]
    pairs: list[tuple[int, int]]
    top_k: int | None = None
    adaptive: str | None = None  # a schedule's text form (``default``): successive elimination; None: exhaustive
    pixels: int = field(default=0)  # all images' width x height, from their headers
    timeout_s: float | None = None  # the client's own deadline (the server's applies too; the shorter one wins)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise RequestError(f"a number in the request body has {len(text.lstrip('-')):,} digits; it is out of range")
    return int(text)


def _no_constant(name: str):
    raise RequestError(f"the request body holds {name}, which is not JSON; send finite numbers", 400)


def _load_json(body: bytes):
    try:
        return json.loads(body, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError("request body is nested too deeply to parse", 400) from None
    except UnicodeDecodeError:
        raise RequestError("request body is not UTF-8 text; send JSON", 400) from None
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", 400
        ) from None
    except ValueError as exc:  # anything else json refuses (a float it cannot represent): the client's body
        raise RequestError(f"request body cannot be read as JSON ({one_line(exc, 80)})", 400) from None


def parse_request(
    route: str, body: bytes, config: ServeConfig, root: Path | None = None, decode: bool = True
) -> ScoreRequest:
    """Parse and check one request body of ``route`` (one of :data:`ROUTES`); read its images' headers (sizes
    checked against the limits) and, with ``decode``, their pixels (:func:`decode_images`).

    ``root``: the resolved image root (:meth:`ServeConfig.root`; default: resolved here).

    Raises:
        RequestError: with its HTTP status: 400 (not a JSON object), 413 (over a limit), 403 (a path outside the
            image root, or paths refused), 422 (a missing or mistyped field, bad base64, an undecodable image, an
            index out of range, a number out of range).
    """
    if route not in ROUTES:
        raise RequestError(f"unknown endpoint {_quote(route)}; use one of {', '.join(ROUTES)}", 404)
    limits = config.limits
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            f"request body of {len(body):,} bytes is over the {limits.max_body_bytes:,}-byte limit", 413
        )
    data = _load_json(body)
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
    adaptive = _adaptive(data.get("adaptive", False))
    timeout_s = _timeout(data.get("timeout_s"))

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
    elif route == "/score-pairs":
        captions = _captions(required("captions"), limits)
        images_field = _array(required("images"), "images", limits.max_images, "max_images", 413)
        pairs = _pairs(required("pairs"), len(images_field), len(captions), limits)
        images = [_image(item, f"images[{i}]", limits, root) for i, item in enumerate(images_field)]
    elif route == "/search":  # the images are the gallery's shortlist, filled in by the app
        captions, images, pairs = [_caption(required("caption"), "caption", limits)], [], []
    else:  # /explain
        captions = [_caption(required("caption"), "caption", limits)]
        images = [_image(required("image"), "image", limits, root)]
        pairs = [(0, 0)]
    pixels = sum(image.pixels for image in images)
    if pixels > limits.max_request_pixels:
        raise RequestError(
            f"the request's images hold {pixels:,} pixels together, over the limit of {limits.max_request_pixels:,} "
            "per request (max_request_pixels); downscale them or send fewer",
            413,
        )
    request = ScoreRequest(route, images, captions, pairs, top_k, adaptive, pixels, timeout_s)
    if decode:
        decode_images(request, limits)
    return request


def _top_k(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"top_k must be a positive integer or null, got {_quote(json.dumps(value), 40)}")
    return value


def _timeout(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise RequestError(
            f"timeout_s must be a positive number of seconds or null, got {_quote(json.dumps(value), 40)}"
        )
    return float(value)


def _adaptive(value) -> str | None:
    """``false`` (exhaustive), ``true`` (the default schedule) or a schedule's text form."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if not isinstance(value, str):
        raise RequestError(
            f"adaptive must be true, false or a schedule like 'keep=50%,25%,k:steps=1,4,all', got {_kind(value)}"
        )
    from ..runtime.adaptive import Schedule

    try:
        Schedule.parse(value)
    except ConfigError as exc:
        raise RequestError(f"adaptive: {one_line(exc, 300)}") from None
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


def _image(value, name: str, limits: ServeLimits, root: Path | None) -> PendingImage:
    """One image field, ``{"base64": ...}`` or ``{"path": ...}``: its bytes, with its size read from the header."""
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
        return _pending(data, f"{name} ({_quote(value['path'])})", limits)
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
        raise RequestError(f"{name}.base64 is not valid base64 ({one_line(exc, 80)})") from None
    return _pending(data, name, limits)


def _too_many_bytes(name: str, size: int, limits: ServeLimits) -> str:
    return f"{name}: {size:,} bytes is over the limit of {limits.max_image_bytes:,} bytes per image (max_image_bytes)"


def resolve_image_path(value, root: Path | None, name: str = "image") -> Path:
    """The file a ``{"path": ...}`` image names, which must lie under ``root`` (resolved) once every link is followed.

    Where a path leads is decided before whether it exists, so a path outside the root gets the same answer
    whether or not a file is there (``/etc/passwd`` and ``/etc/nope`` alike): a client cannot probe the disk.

    Raises:
        RequestError: 403 when paths are refused (no root), for ``..`` and for paths (absolute, or through a link)
            that lead outside the root; 422 for a path that is not a string, or names no file under the root.
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
        # Not strict: links are followed as far as the path exists, so a missing file behind a link that leaves the
        # root is "outside" too. An absolute path replaces root here, and is checked below.
        resolved = (root / path).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13), a permission problem
        raise RequestError(f"{name}: path {shown} cannot be resolved ({type(exc).__name__})") from None
    if not resolved.is_relative_to(root):
        raise RequestError(f"{name}: path {shown} leads outside the image root", 403)
    if not resolved.exists():
        raise RequestError(f"{name}: no such image under the image root: {shown}")
    if not resolved.is_file():
        raise RequestError(f"{name}: path {shown} is not a file")
    return resolved


def _guard(name: str):
    # The runtime's own guard around Pillow calls: whatever a decoder raises becomes the same one-line InputError a
    # file on disk would get (the exception type named), with Pillow's warnings noted against the image.
    from ..runtime.images import pillow_guard

    return functools.partial(pillow_guard, name)


def pending_image(data: bytes, name: str, limits: ServeLimits) -> PendingImage:
    """An image file's bytes checked against the limits from its header, its pixels not decoded yet (a gallery's
    image reaches the scorer as an upload would)."""
    return _pending(data, name, limits)


def _pending(data: bytes, name: str, limits: ServeLimits) -> PendingImage:
    """The image's header read (no pixels decoded) and its size checked."""
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise RequestError(_too_many_bytes(name, len(data), limits), 413)
    if not data:
        raise RequestError(f"{name}: the image is empty (0 bytes)")
    try:
        with _guard(name)(opening=True), Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
    except InputError as exc:
        bomb = isinstance(exc.__cause__, Image.DecompressionBombError)  # Pillow's own, larger, limit
        raise RequestError(str(exc), 413 if bomb else 422) from None
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{limits.max_image_pixels:,} (max_image_pixels); downscale the image",
            413,
        )
    if width < 1 or height < 1:
        raise RequestError(f"{name}: the image has no pixels ({width}x{height})")
    return PendingImage(name, data, width, height)


def decode_image(data: bytes | PendingImage, name: str, limits: ServeLimits):
    """An image file's bytes as an 8-bit RGB PIL image, by the same steps as
    :func:`~dsdkit.runtime.images.load_image` (EXIF orientation, alpha on white), so an upload scores exactly as the
    same file read from disk; its pixel count is checked from the header before anything is decoded.

    Raises:
        RequestError: 413 over ``max_image_bytes`` or ``max_image_pixels``; 422 empty, unreadable or corrupt.
    """
    from PIL import Image

    from ..runtime.images import decode_opened

    pending = data if isinstance(data, PendingImage) else _pending(data, name, limits)
    guard = _guard(pending.name)
    try:
        with guard(opening=True):
            opened = Image.open(io.BytesIO(pending.data))
    except InputError as exc:
        raise RequestError(str(exc)) from None
    try:
        return decode_opened(opened, pending.name)
    except InputError as exc:
        raise RequestError(str(exc)) from None
    finally:
        with guard():
            opened.close()


def decode_images(request: ScoreRequest, limits: ServeLimits) -> ScoreRequest:
    """Decode the request's pending images in place (their bytes are dropped once decoded)."""
    request.images = [
        decode_image(image, image.name, limits) if isinstance(image, PendingImage) else image
        for image in request.images
    ]
    return request


def format_response(
    request: ScoreRequest, scores: np.ndarray, timesteps, truncated=None, exact=None, held=None, evaluations=None
) -> dict:
    """The JSON body of an answered scoring request.

    ``/rank-captions``: ``ranking`` (best first, ``top_k`` of them: ``index``, ``caption``, ``score``, ``margin`` to
    the next entry) and ``scores`` in the request's caption order; ``/rank-images``: the same with image indices;
    ``/score-pairs``: ``scores`` in the request's pair order. All carry ``timesteps`` (the scores are means over
    them) and, when the text encoder dropped word tokens of a caption, ``truncated`` (per caption, the tokens
    dropped). An adaptive ranking adds per entry ``exact`` (scored at every timestep) and ``timesteps_held``, and
    ``adaptive`` (the schedule and the evaluations spent).
    """
    scores = np.asarray(scores, dtype=np.float64)
    body: dict[str, Any] = {}
    if request.route in RANKING_ROUTES:
        if held is None:
            # Stable order: equal scores keep the request's order, as Engine.rank_texts / rank_images.
            order = np.argsort(-scores, kind="stable")
        else:  # adaptive: by timesteps held, then score, then index (runtime.adaptive's order)
            order = np.array(sorted(range(len(scores)), key=lambda n: (-held[n], -scores[n], n)), dtype=np.int64)
        order = order[: request.top_k]
        ranking = []
        for place, n in enumerate(order.tolist()):
            entry: dict[str, Any] = {"index": n, "score": float(scores[n])}
            if request.route == "/rank-captions":
                entry["caption"] = request.captions[n]
            following = order[place + 1] if place + 1 < len(order) else None
            entry["margin"] = None if following is None else float(scores[n] - scores[following])
            if exact is not None:
                entry["exact"] = bool(exact[n])
                entry["timesteps_held"] = int(held[n])
            ranking.append(entry)
        body["ranking"] = ranking
    body["scores"] = [float(s) for s in scores]
    body["timesteps"] = [int(t) for t in timesteps]
    if truncated and any(truncated):
        body["truncated"] = [int(t) for t in truncated]
    if evaluations is not None:
        body["adaptive"] = {"schedule": request.adaptive, "evaluations": evaluations}
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
        return exc.status, {"error": one_line(exc)}
    if isinstance(exc, (InputError, ConfigError)):
        return 422, {"error": one_line(exc)}
    if isinstance(exc, DsdkitError):
        return 500, {"error": one_line(f"server error: {exc}")}
    return 500, {"error": f"internal server error ({type(exc).__name__}); the traceback is in the server's log"}
