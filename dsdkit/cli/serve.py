"""``serve``: the JSON API and its page, in this process or on Ray Serve (:mod:`dsdkit.serving`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

from ..runtime.errors import ConfigError
from .app import app, command
from .options import (
    IO_PANEL,
    PERFORMANCE_PANEL,
    SCALE_PANEL,
    SCORING_PANEL,
    DtypeName,
    Scoring,
    ThreadsOption,
    argument,
    option,
    plain,
    scoring_options,
)
from .ui import say


@command(app, "serve", "Serve the JSON API and a browser page over HTTP.")
@scoring_options(only=("num_timesteps", "normalize"))
def serve_command(
    bundle: Annotated[Path | None, argument("BUNDLE", help="A bundle to serve (torch-free); or give --model.")] = None,
    scoring: Scoring = None,
    model: Annotated[
        str | None,
        option(
            "--model",
            help="Serve a model on the PyTorch engine instead (e.g. demo); heat maps need it.",
            panel=SCORING_PANEL,
        ),
    ] = None,
    adapters: Annotated[
        Path | None, option("--adapters", help="Adapter file for --model.", panel=SCORING_PANEL)
    ] = None,
    device: Annotated[
        str, option("--device", help="auto, cpu, cuda or cuda:N (in-process).", panel=PERFORMANCE_PANEL)
    ] = "auto",
    dtype: Annotated[
        DtypeName, option("--dtype", help="UNet precision of --model.", panel=PERFORMANCE_PANEL, choices=DtypeName)
    ] = DtypeName.fp32,
    port: Annotated[
        int, option("--port", min=0, max=65535, help="The HTTP port (0: any free port, in-process).", panel=IO_PANEL)
    ] = 8000,
    host: Annotated[
        str,
        option(
            "--host",
            help="The interface to listen on (0.0.0.0 for other machines; there is no authentication).",
            panel=IO_PANEL,
        ),
    ] = "127.0.0.1",
    allow_host: Annotated[
        list[str] | None,
        option(
            "--allow-host",
            help="A name clients reach this server by, besides loopback's (repeatable; DNS rebinding guard).",
            panel=IO_PANEL,
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        option(
            "--image-root",
            help='Folder that {"path": ...} images are read from (default: uploads only).',
            panel=IO_PANEL,
        ),
    ] = None,
    ray: Annotated[
        str | None,
        option(
            "--ray",
            help="Run on Ray Serve: local (a new loopback-only cluster here) or a cluster's address (auto, "
            "HOST:PORT). Default: in this process, without Ray.",
            panel=SCALE_PANEL,
        ),
    ] = None,
    replicas: Annotated[
        int, option("--replicas", min=1, help="With --ray: replicas, each with its own engine.", panel=SCALE_PANEL)
    ] = 1,
    gpus_per_replica: Annotated[
        float,
        option(
            "--gpus-per-replica",
            min=0,
            help="With --ray: GPUs per replica (0: CPU replicas; above 0 on cuda).",
            panel=SCALE_PANEL,
        ),
    ] = 0.0,
    cpus_per_replica: Annotated[
        float,
        option(
            "--cpus-per-replica",
            help="With --ray: CPUs per replica; also its threads unless --threads.",
            panel=SCALE_PANEL,
        ),
    ] = 1.0,
    ray_log: Annotated[
        Path | None,
        option(
            "--ray-log",
            help="With --ray: where Ray's log lines go (without -v; default: a temp file).",
            panel=SCALE_PANEL,
        ),
    ] = None,
    max_batch_items: Annotated[
        int | None,
        option(
            "--max-batch-items",
            min=1,
            help="A scorer batch's size in pairs x timesteps (requests are split to fit).",
            panel=PERFORMANCE_PANEL,
        ),
    ] = None,
    batch_wait: Annotated[
        float | None,
        option(
            "--batch-wait",
            min=0,
            help="Seconds a scorer batch waits for more requests' pairs after its first.",
            panel=PERFORMANCE_PANEL,
        ),
    ] = None,
    request_timeout: Annotated[
        float | None,
        option(
            "--request-timeout",
            min=0.001,
            help="Seconds within which a request is answered (else 504).",
            panel=PERFORMANCE_PANEL,
        ),
    ] = None,
    gallery: Annotated[
        Path | None,
        option(
            "--gallery",
            help="A folder (or image-list file) to search: POST /search ranks its best images for a caption (a CLIP "
            "shortlist, then DSD). Embedded once, at start.",
            panel=IO_PANEL,
        ),
    ] = None,
    shortlist: Annotated[
        str | None,
        option(
            "--shortlist",
            help="The CLIP model of --gallery's search (a CLIPModel folder, a hub id or demo; default: a bundle's "
            "own towers, else demo).",
            panel=SCORING_PANEL,
        ),
    ] = None,
    shortlist_k: Annotated[
        int | None,
        option(
            "--shortlist-k",
            min=1,
            help="Gallery images the shortlist proposes per search (default 16).",
            panel=SCORING_PANEL,
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        option(
            "--config",
            help="A JSON file of ServeConfig fields (limits, bounds, caches); options win.",
            panel=PERFORMANCE_PANEL,
        ),
    ] = None,
    threads: ThreadsOption = None,
) -> None:
    """Serve a bundle (torch-free) or a model (--model, PyTorch) over HTTP until Ctrl-C or SIGTERM: a page at /,
    POST /rank-captions, /rank-images, /score-pairs, /explain and (with --gallery) /search (JSON), GET /health. In
    this process by default; on Ray Serve with --ray. A client: examples/serve_client.py."""
    from ..jobs.specs import EngineSpec
    from ..serving import RayServeOptions, ServeConfig, serve

    if (bundle is None) == (model is None):
        raise ConfigError("give a bundle (dsdkit serve BUNDLE) or a model (dsdkit serve --model MODEL), not both")
    options = {
        "image_root": None if image_root is None else str(image_root),
        "max_batch_items": max_batch_items,
        "batch_wait_timeout_s": batch_wait,
        "request_timeout_s": request_timeout,
        "allowed_hosts": tuple(allow_host) if allow_host else None,
        "gallery": None if gallery is None else str(gallery),
        "shortlist": shortlist,
        "shortlist_k": shortlist_k,
    }
    if gallery is None and (shortlist is not None or shortlist_k is not None):
        raise ConfigError("--shortlist and --shortlist-k choose how --gallery is searched: give --gallery DIR too")
    config = ServeConfig.from_dict(
        {**_config_file(config_file), **{k: v for k, v in options.items() if v is not None}}
    )
    knobs = dict(scoring.knobs) if scoring is not None else {}
    spec = EngineSpec(
        model=model,
        bundle=None if bundle is None else str(bundle),
        adapters=None if adapters is None else str(adapters),
        knobs=knobs,
        device=device,
        dtype=plain(dtype) if bundle is None else "fp32",
        threads=threads,
    )
    if ray is None and (replicas != 1 or gpus_per_replica):
        raise ConfigError("--replicas and --gpus-per-replica are for Ray Serve: add --ray local (or an address)")
    on_ray = None
    if ray is not None:
        on_ray = RayServeOptions(
            address=ray,
            replicas=replicas,
            gpus_per_replica=gpus_per_replica,
            cpus_per_replica=cpus_per_replica,
            log_file=None if ray_log is None else str(ray_log),
        )
    serve(
        spec,
        config,
        host=host,
        port=port,
        ray=on_ray,
        on_ready=say,
        verbose=logging.getLogger("dsdkit").isEnabledFor(logging.INFO),
    )


def _config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        fields = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"--config {path}: must hold a JSON object of ServeConfig fields")
    return fields
