"""What a server serves and within which bounds: :class:`EngineSpec` (the engine each runner opens),
:class:`ServeLimits` (what one request may hold) and :class:`ServeConfig` (batching, bounds in flight, deadlines,
caches, the hosts it answers to). Plain, validated dataclasses: a bad value is a one-line
:class:`~dsdkit.runtime.errors.ConfigError` before anything starts, and every field is reported on ``GET /health``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..jobs.specs import EngineSpec
from ..runtime.errors import ConfigError

__all__ = ["EngineSpec", "ServeLimits", "ServeConfig", "RayServeOptions", "MiB", "LOOPBACK_HOSTS"]

MiB = 1 << 20

#: Names a client on this machine reaches a loopback server by; the ``Host`` header must be one of these (or of
#: :attr:`ServeConfig.allowed_hosts`), so a web page whose DNS name was rebound to 127.0.0.1 is refused.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_positive(owner: str, name: str, value, kind=int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or value == math.inf:
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{owner}.{name} must be {what}{' or null' if allow_none else ''}, got {value!r}")


def _from_fields(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(names))}")
    return cls(**data)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold; beyond it the request gets a 413 naming the limit.

    Attributes:
        max_body_bytes: the request body (JSON with base64 images: about 4/3 of the image bytes).
        max_image_bytes: one image file (decoded from base64, or on disk under the image root).
        max_image_pixels: one image's width x height, read from its header before any pixel is decoded.
        max_request_pixels: all of a request's images together, also read from their headers first (8 images of
            5000 x 5000 would decode to 600 MB).
        max_images: images per request (``/rank-images``, ``/score-pairs``).
        max_captions: captions per request (``/rank-captions``, ``/score-pairs``).
        max_caption_chars: characters per caption (the text encoder keeps 75 word tokens anyway).
        max_pairs: (image, caption) pairs per request: scored pairs for the rankings, given ones for ``/score-pairs``.
        max_work_items: pairs x timesteps per request (what the scorer runs), so that no request holds the scorer
            for long: at S = 30 about 270 pairs; a larger job belongs to ``dsdkit match``.
    """

    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 25_000_000
    max_request_pixels: int = 64_000_000
    max_images: int = 64
    max_captions: int = 256
    max_caption_chars: int = 1000
    max_pairs: int = 4096
    max_work_items: int = 8192

    def __post_init__(self):
        from ..runtime.images import MAX_IMAGE_PIXELS

        for f in dataclasses.fields(self):
            _check_positive("limits", f.name, getattr(self, f.name))
        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise ConfigError(
                f"limits.max_image_pixels {self.max_image_pixels:,} is over the runtime's decompression-bomb guard "
                f"of {MAX_IMAGE_PIXELS:,} pixels; give at most that"
            )


@dataclass(frozen=True)
class ServeConfig:
    """How a server serves: request limits, batching, bounds in flight, deadlines, caches, the image root, the
    default ``top_k`` and the host names it answers to (what it serves is the :class:`EngineSpec`). ``GET /health``
    returns it.

    Attributes:
        limits: what one request may hold (:class:`ServeLimits`).
        max_batch_items: a scorer batch's size in work items, pairs x timesteps: a request's pairs are cut into
            pieces of at most this many items, and one scorer batch gathers pieces (of any requests) up to it.
        batch_wait_timeout_s: how long a scorer batch waits for more pieces after its first one, unless it is full
            (a longer wait makes fuller batches under load, and adds up to that much latency to a lone request).
        receive_timeout_s: a request's body must have arrived this long after its headers, else 408: a slow client
            holds one receiving slot for at most this long.
        header_timeout_s: a connection's request headers must have arrived this long after its first byte (or after
            it opened), else it is closed (in-process runner; Ray Serve's own proxy reads the headers there).
        request_timeout_s: a request is answered within this long of its headers (504 past it), its queued work
            dropped.
        max_receiving: requests receiving their bodies at once (memory: at most this many x ``max_body_bytes``);
            one more gets a 503 at once.
        max_active_requests: requests past their body (decoding, encoding, waiting for or in scorer batches) at
            once; one more gets a 503 at once. ``GET /health`` and the page never wait for either.
        max_queued_work: work items (pairs x timesteps) waiting for the scorer, all requests together; a request
            that would go over it gets a 503 at once instead of waiting behind them.
        max_pixels_in_flight: decoded pixels of all requests being decoded and encoded at once; a request waits for
            its share (within its deadline).
        image_cache_bytes, text_cache_bytes, unconditional_cache_bytes: the engine's caches of image encodings,
            caption encodings and unconditional terms, least recently used out first.
        image_root: the folder ``{"path": ...}`` images are read from (``None``: paths are refused, uploads only).
            Paths are relative to it; ``..``, absolute paths outside it and links that leave it are refused.
        top_k: the ranking routes' default ``top_k`` (``None``: the whole ranking).
        warmup: score one pair when the engine opens, so the first request does not pay for creating sessions.
        allowed_hosts: host names besides :data:`LOOPBACK_HOSTS` that the ``Host`` header may carry (the server's
            own name when it listens beyond loopback); any other is refused (DNS rebinding).
        gallery: a folder (or image-list file) indexed when the server starts: ``POST /search`` finds a caption's
            best images in it (a CLIP shortlist, then DSD); ``None``: no search route.
        shortlist: the CLIP model of the search (a CLIPModel folder, a hub id or ``demo``); ``None``: a bundle's own
            towers (``dsdkit export --shortlist``), else ``demo``.
        shortlist_k: images the CLIP shortlist proposes per search (DSD ranks only those).
        max_gallery_images: the most images a gallery may hold (each is embedded once, at start).
    """

    limits: ServeLimits = field(default_factory=ServeLimits)
    max_batch_items: int = 256
    batch_wait_timeout_s: float = 0.01
    receive_timeout_s: float = 15.0
    header_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    max_receiving: int = 64
    max_active_requests: int = 32
    max_queued_work: int = 32768
    max_pixels_in_flight: int = 100_000_000
    image_cache_bytes: int = 256 * MiB
    text_cache_bytes: int = 256 * MiB
    unconditional_cache_bytes: int = 32 * MiB
    image_root: str | None = None
    top_k: int | None = None
    warmup: bool = True
    allowed_hosts: tuple[str, ...] = ()
    gallery: str | None = None
    shortlist: str | None = None
    shortlist_k: int = 16
    max_gallery_images: int = 1_000_000

    def __post_init__(self):
        if isinstance(self.limits, dict):  # from_dict and dataclasses.replace(limits={...}) both land here
            object.__setattr__(self, "limits", _from_fields(ServeLimits, self.limits, "limits"))
        if not isinstance(self.limits, ServeLimits):
            raise ConfigError(f"limits must be a ServeLimits or a mapping, got {type(self.limits).__name__}")
        for name in (
            "max_batch_items",
            "max_receiving",
            "max_active_requests",
            "max_queued_work",
            "max_pixels_in_flight",
            "image_cache_bytes",
            "text_cache_bytes",
            "unconditional_cache_bytes",
        ):
            _check_positive("config", name, getattr(self, name))
        for name in ("receive_timeout_s", "header_timeout_s", "request_timeout_s"):
            _check_positive("config", name, getattr(self, name), kind=(int, float))
        _check_positive("config", "top_k", self.top_k, allow_none=True)
        _check_positive("config", "shortlist_k", self.shortlist_k)
        _check_positive("config", "max_gallery_images", self.max_gallery_images)
        for name in ("gallery", "shortlist"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        wait = self.batch_wait_timeout_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < math.inf:
            raise ConfigError(f"config.batch_wait_timeout_s must be a number of seconds >= 0, got {wait!r}")
        if self.image_root is not None and not isinstance(self.image_root, str):
            object.__setattr__(self, "image_root", os.fspath(self.image_root))
        if not isinstance(self.warmup, bool):
            raise ConfigError(f"config.warmup must be true or false, got {self.warmup!r}")
        hosts = self.allowed_hosts
        if isinstance(hosts, str) or not all(isinstance(h, str) and h.strip() for h in hosts):
            raise ConfigError(f"config.allowed_hosts must be a list of host names, got {hosts!r}")
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in hosts))
        # A request allowed by the limits must be able to get its share of what is in flight, or it never would.
        if self.limits.max_request_pixels > self.max_pixels_in_flight:
            raise ConfigError(
                f"limits.max_request_pixels {self.limits.max_request_pixels:,} is over max_pixels_in_flight "
                f"{self.max_pixels_in_flight:,}: such a request could never be decoded; raise the latter"
            )
        if self.limits.max_work_items > self.max_queued_work:
            raise ConfigError(
                f"limits.max_work_items {self.limits.max_work_items:,} is over max_queued_work "
                f"{self.max_queued_work:,}: such a request could never be queued; raise the latter"
            )
        if self.limits.max_body_bytes * self.max_receiving > 1 << 40:
            raise ConfigError("config.max_receiving x limits.max_body_bytes is over 1 TiB; lower one of them")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, read back by :meth:`from_dict`."""
        data = dataclasses.asdict(self)
        data["allowed_hosts"] = list(self.allowed_hosts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        """The config of a :meth:`to_dict` dict; an unknown key is a :class:`ConfigError` (a typo would be ignored)."""
        if isinstance(data, dict) and isinstance(data.get("allowed_hosts"), list):
            data = {**data, "allowed_hosts": tuple(data["allowed_hosts"])}
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

    def summary(self) -> str:
        """The main bounds in a few words (the ready line)."""
        limits = self.limits
        return (
            f"{limits.max_body_bytes / MiB:g} MiB bodies, {limits.max_images} images, {limits.max_captions} captions, "
            f"{limits.max_work_items:,} work items and {limits.max_request_pixels / 1e6:g} Mpx per request, "
            f"{self.request_timeout_s:g} s deadline"
        )

    def hosts(self) -> frozenset[str]:
        """Every host name the ``Host`` header may carry."""
        return frozenset(LOOPBACK_HOSTS) | frozenset(self.allowed_hosts)


@dataclass(frozen=True)
class RayServeOptions:
    """Where and how wide the app runs on Ray Serve (``dsdkit serve --ray``).

    Attributes:
        address: ``local`` (a new loopback-only cluster on this machine), ``auto`` or ``HOST:PORT`` (join one; on a
            cluster the bundle and the image root must be at the same path on every node).
        replicas: Ray Serve replicas, each with its own engine.
        gpus_per_replica: GPUs per replica (0: CPU replicas).
        cpus_per_replica: CPUs per replica (also its threads unless the spec sets them).
        log_file: where Ray's driver-side log lines go unless verbose (default: a file in the temp folder).
    """

    address: str = "local"
    replicas: int = 1
    gpus_per_replica: float = 0
    cpus_per_replica: float = 1
    log_file: str | None = None

    def __post_init__(self):
        if not isinstance(self.address, str) or not self.address.strip():
            raise ConfigError(f"ray.address must be local, auto or HOST:PORT, got {self.address!r}", field="ray")
        _check_positive("ray", "replicas", self.replicas)
        _check_positive("ray", "cpus_per_replica", self.cpus_per_replica, kind=(int, float))
        gpus = self.gpus_per_replica
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus < math.inf:
            raise ConfigError(f"ray.gpus_per_replica must be a number >= 0, got {gpus!r}")
        if self.log_file is not None:
            object.__setattr__(self, "log_file", os.fspath(self.log_file))
