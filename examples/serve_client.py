"""A thin client of `dsdkit serve`: the Python standard library only (urllib, json, base64), nothing to install.

    dsdkit serve BUNDLE --port 8000                        # in another shell (or: dsdkit serve --model demo)
    python examples/serve_client.py health
    python examples/serve_client.py rank-captions examples/demo/00-a-red-circle.png --captions examples/captions.txt
    python examples/serve_client.py rank-images "a red circle" examples/demo/*.png --top-k 3
    python examples/serve_client.py score-pairs examples/demo/00-a-red-circle.png --caption "a red circle" --pair 0,0
    python examples/serve_client.py explain examples/demo/00-a-red-circle.png "a red circle"   # --model servers only

Images are uploaded as base64 unless ``--server-paths`` is given: then they are sent as paths relative to the
server's image root (``--image-root`` of the server), for images that already sit beside it. Use the functions
from your own code: ``rank_captions(url, image, captions)`` and the others return the server's JSON as a dict and
raise :class:`ServeError` (the HTTP status and the server's one-line message) for a refused request.

What to retry: a 503 (the server is busy or starting: wait its ``Retry-After`` seconds), a 500 whose message says
it "can be retried" (a Ray Serve replica died under the request; a new one is starting), and a connection that
failed; every request is read-only, so retrying never does anything twice. Do not retry a 4xx: the request itself
is refused, and its message says why. A 504 means the request did not finish within the server's deadline (or
your ``timeout_s``): send less per request.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


class ServeError(Exception):
    """A request the server refused (4xx) or failed (5xx): ``status`` and the server's one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def image_field(image: str | Path | bytes, server_path: bool = False) -> dict:
    """One image's JSON: a file's (or raw bytes') base64, or with ``server_path`` a path under the server's root."""
    if server_path:
        return {"path": str(image)}
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return {"base64": base64.b64encode(data).decode("ascii")}


def request(url: str, route: str, payload: dict | None = None, timeout: float = 120.0) -> dict:
    """POST ``payload`` as JSON to ``url + route`` (or GET when it is ``None``); the response's JSON."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"} if data is not None else {}
    call = urllib.request.Request(url.rstrip("/") + route, data=data, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):  # not dsdkit's JSON: a proxy in between, or Ray's own answer
            message = " ".join(body.split())[:300] or exc.reason
        raise ServeError(exc.code, message) from None


def health(url: str = DEFAULT_URL, timeout: float = 30.0) -> dict:
    """``GET /health``: status, engine, config and counters of the replica that answered."""
    return request(url, "/health", timeout=timeout)


def rank_captions(url, image, captions, top_k=None, server_path=False, timeout=120.0, adaptive=False) -> dict:
    """The captions best first for one image: ``{"ranking": [{"index", "caption", "score", "margin"}], "scores":
    [...]}``; ``adaptive`` (``True`` or a schedule) ranks by successive elimination."""
    payload = {"image": image_field(image, server_path), "captions": list(captions), "top_k": top_k}
    if adaptive:
        payload["adaptive"] = adaptive
    return request(url, "/rank-captions", payload, timeout)


def rank_images(url, caption, images, top_k=None, server_path=False, timeout=120.0, adaptive=False) -> dict:
    """The images best first for one caption: ``{"ranking": [{"index", "score", "margin"}], "scores": [...]}``."""
    payload = {"caption": caption, "images": [image_field(i, server_path) for i in images], "top_k": top_k}
    if adaptive:
        payload["adaptive"] = adaptive
    return request(url, "/rank-images", payload, timeout)


def explain(url, image, caption, server_path=False, timeout=300.0) -> dict:
    """Per-word heat maps of one pair (a server running ``--model``): ``{"tokens", "maps", "grid", "region",
    "score"}``, each map a ``grid`` x ``grid`` list of attention probabilities."""
    payload = {"image": image_field(image, server_path), "caption": caption}
    return request(url, "/explain", payload, timeout)


def score_pairs(url, images, captions, pairs, server_path=False, timeout=120.0) -> dict:
    """Scores of the given ``(image index, caption index)`` pairs, in their order: ``{"scores": [...]}``."""
    payload = {
        "images": [image_field(i, server_path) for i in images],
        "captions": list(captions),
        "pairs": [[int(i), int(j)] for i, j in pairs],
    }
    return request(url, "/score-pairs", payload, timeout)


def _captions(args) -> list[str]:
    captions = list(args.caption or [])
    if args.captions:
        captions += [line.strip() for line in Path(args.captions).read_text("utf-8").splitlines() if line.strip()]
    if not captions:
        raise SystemExit("give captions with --caption TEXT (repeatable) or --captions FILE")
    return captions


def _pair(text: str) -> tuple[int, int]:
    try:
        i, j = text.split(",")
        return int(i), int(j)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pair is IMAGE,CAPTION indices, e.g. 0,1; got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--server-paths", action="store_true", help="send image paths under the server's root")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("health", help="the server's status, config and counters")
    rc = sub.add_parser("rank-captions", help="rank captions for one image")
    rc.add_argument("image")
    ri = sub.add_parser("rank-images", help="rank images for one caption")
    ri.add_argument("query", metavar="CAPTION")
    ri.add_argument("images", nargs="+")
    sp = sub.add_parser("score-pairs", help="score given (image, caption) pairs")
    sp.add_argument("images", nargs="+")
    sp.add_argument("--pair", type=_pair, action="append", required=True, help="IMAGE,CAPTION indices (repeatable)")
    ex = sub.add_parser("explain", help="per-word heat maps of one image and caption (a --model server)")
    ex.add_argument("image")
    ex.add_argument("query", metavar="CAPTION")
    for command in (rc, sp):
        command.add_argument("--caption", action="append", help="a caption (repeatable)")
        command.add_argument("--captions", help="a file of captions, one per line")
    for command in (rc, ri):
        command.add_argument("--top-k", type=int, default=None)
        command.add_argument("--adaptive", action="store_true", help="rank by successive elimination")
    args = parser.parse_args(argv)
    try:
        if args.command == "health":
            out = health(args.url)
        elif args.command == "rank-captions":
            out = rank_captions(
                args.url, args.image, _captions(args), args.top_k, args.server_paths, adaptive=args.adaptive
            )
        elif args.command == "rank-images":
            out = rank_images(args.url, args.query, args.images, args.top_k, args.server_paths, adaptive=args.adaptive)
        elif args.command == "explain":
            out = explain(args.url, args.image, args.query, args.server_paths)
        else:
            out = score_pairs(args.url, args.images, _captions(args), args.pair, args.server_paths)
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"error: cannot reach {args.url}: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:  # an image file that cannot be read here, a timeout
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
