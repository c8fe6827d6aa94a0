""":func:`serve`: ``dsdkit serve`` as a library function. One app (:mod:`dsdkit.serving.app`), two runners: in this
process on uvicorn (the default: :mod:`dsdkit.serving.local`, no Ray imported) or on Ray Serve replicas
(``ray=ADDRESS|local``: :mod:`dsdkit.serving.ray_serve`). Both print the same ready line and stop the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .config import EngineSpec, RayServeOptions, ServeConfig

__all__ = ["serve", "ready_line"]

logger = logging.getLogger(__name__)


def ready_line(url: str, described: dict, mode: str) -> str:
    """The one line a server prints once it answers: URL, engine, mode and limits."""
    engine = f"{described['engine']} {described.get('model') or ''}".strip()
    device = f" on {described['device']}" if described.get("device") else ""
    return (
        f"dsdkit serve: ready at {url} (engine: {engine}{device}, S={described['timesteps']}; mode: {mode}; limits: "
        f"{described['limits']}); Ctrl-C or SIGTERM stops"
    )


def serve(
    spec: EngineSpec | str | os.PathLike,
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ray: RayServeOptions | str | None = None,
    on_ready: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> None:
    """Serve ``spec`` (an :class:`EngineSpec`, or a bundle's path) over HTTP at ``http://host:port/`` until Ctrl-C
    or SIGTERM.

    Args:
        ray: ``None``: in this process (uvicorn; the engine's device is the spec's). A :class:`RayServeOptions` (or
            its address alone: ``local``, a new Ray cluster on this machine, loopback only; ``auto`` or
            ``HOST:PORT``, a Ray cluster to join): the app runs on its replicas.
        host: the interface to listen on (``0.0.0.0`` for other machines: there is no authentication, and the
            ``Host`` names clients use must be given in :attr:`ServeConfig.allowed_hosts`).
        on_ready: called with the ready line (:func:`ready_line`) once the server answers (default: logged).
        verbose: uvicorn's access log, and Ray's own log lines on the terminal instead of its log file.

    Raises:
        ConfigError, BundleError, ModelError, MissingDependencyError: in one line, before anything listens.
    """
    if not isinstance(spec, EngineSpec):
        spec = EngineSpec(bundle=os.fspath(spec))
    config = config or ServeConfig()
    if (
        host not in ("127.0.0.1", "localhost", "::1")
        and host not in config.allowed_hosts
        and host not in ("0.0.0.0", "::")
    ):
        config = _with_host(config, host)
    say = on_ready or (lambda line: logger.warning("%s", line))
    if ray is None:
        from .app import open_app
        from .local import serve_local

        app = open_app(spec, config)
        described = app.describe()
        serve_local(
            app, host, port, on_ready=lambda url: say(ready_line(url, described, "in-process")), verbose=verbose
        )
        return
    from .ray_serve import serve_ray

    options = ray if isinstance(ray, RayServeOptions) else RayServeOptions(address=ray)
    replicas, gpus = options.replicas, options.gpus_per_replica
    mode = (
        f"Ray Serve, {replicas} replica{'s' if replicas != 1 else ''}"
        + (f" x {gpus:g} GPU" if gpus else "")
        + (", local cluster on loopback" if options.address == "local" else f", cluster {options.address}")
    )
    serve_ray(
        spec,
        config,
        options,
        host=host,
        port=port,
        on_ready=lambda url: say(ready_line(url, _describe_served(url, spec, config), mode)),
        verbose=verbose,
    )


def _with_host(config: ServeConfig, host: str) -> ServeConfig:
    """A server bound to one named address answers to that name too."""
    import dataclasses

    return dataclasses.replace(config, allowed_hosts=(*config.allowed_hosts, host))


def _describe_served(url: str, spec: EngineSpec, config: ServeConfig) -> dict:
    """What the ready line says of a Ray deployment: its replica's own ``/health`` (the engine it opened), or what
    the spec says when that cannot be read."""
    import json
    import urllib.request

    described = {"engine": spec.kind, "model": spec.bundle or spec.model, "device": None, "limits": config.summary()}
    described["timesteps"] = spec.knobs.get("num_timesteps") or "default"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=30) as response:
            engine = json.loads(response.read())["engine"]
        described.update(model=engine.get("model") or described["model"], device=engine.get("device"))
        described["timesteps"] = len(engine.get("timesteps") or []) or described["timesteps"]
    except (OSError, ValueError, KeyError, TypeError):
        logger.debug("the deployment's /health could not be read for the ready line", exc_info=True)
    return described
