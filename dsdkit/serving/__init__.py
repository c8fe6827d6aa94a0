"""Online serving: one app (routes, limits, batching, a page for people) and two runners, in-process (uvicorn) and
Ray Serve. Importing this package imports neither Ray, uvicorn nor torch."""

from .app import HEALTH, Counters, DsdApp, open_app
from .batching import Batcher, Busy, Piece, combine_pieces, split_pairs
from .config import LOOPBACK_HOSTS, EngineSpec, RayServeOptions, ServeConfig, ServeLimits
from .requests import (
    ROUTES,
    PendingImage,
    RequestError,
    ScoreRequest,
    decode_image,
    error_response,
    format_response,
    parse_request,
    resolve_image_path,
)
from .runner import ready_line, serve

__all__ = [
    "EngineSpec",
    "ServeLimits",
    "ServeConfig",
    "RayServeOptions",
    "LOOPBACK_HOSTS",
    "RequestError",
    "ScoreRequest",
    "PendingImage",
    "Piece",
    "Busy",
    "Batcher",
    "Counters",
    "ROUTES",
    "HEALTH",
    "parse_request",
    "decode_image",
    "resolve_image_path",
    "split_pairs",
    "combine_pieces",
    "format_response",
    "error_response",
    "DsdApp",
    "open_app",
    "build_app",
    "serve",
    "ready_line",
]


def build_app(*args, **kwargs):
    """The Ray Serve application (:func:`dsdkit.serving.ray_serve.build_app`); imports Ray only when called."""
    from .ray_serve import build_app as build

    return build(*args, **kwargs)
