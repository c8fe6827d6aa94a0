"""The Ray Serve runner: the same :class:`~dsdkit.serving.app.DsdApp` in each replica of a Ray Serve deployment, for
users who outgrow one machine (``dsdkit serve ... --ray ADDRESS|local --replicas N --gpus-per-replica G``).

Each replica opens its own engine from the :class:`~dsdkit.serving.config.EngineSpec` and passes every request's
ASGI scope and messages to its app, unchanged: the routes, limits, deadlines and batching are the app's, the same
as in-process. Ray's share: the HTTP proxy (on ``host:port``), spreading requests over replicas, restarting a
replica that dies. Each replica admits ``max_receiving + max_active_requests`` requests plus a few for health
checks (``max_ongoing_requests``), so slow or heavy clients cannot take the slots ``GET /health`` needs.

``local`` starts a private cluster on this machine whose every port listens on loopback only
(:func:`~dsdkit.jobs.ray_runner.init_local_cluster`); it ends with :func:`serve_ray`. Joining a cluster (``auto``,
``HOST:PORT``) is the user's choice, and securing it (Ray's token authentication, a private network) is theirs.
Without ``verbose`` Ray's own log lines go to a file, not to the terminal.

Ray is imported only inside the functions here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..runtime.errors import ConfigError, MissingDependencyError, install_hint
from .config import EngineSpec, RayServeOptions, ServeConfig
from .requests import one_line

__all__ = ["DsdReplica", "build_app", "serve_ray", "HEALTH_SLOTS", "proxy_middlewares"]

logger = logging.getLogger(__name__)

#: Requests a replica admits beyond the app's own bounds, so that health checks and ``GET /health`` always get in.
HEALTH_SLOTS = 8


def _ray_serve():
    """``ray.serve``, or the one-line error naming the extra that installs it."""
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError(
            "serving on Ray needs Ray Serve, which is not installed: it comes with the 'ray' extra "
            f"({install_hint('ray')})"
        ) from None
    return serve


class DsdReplica:
    """A Ray Serve replica: the app over its own engine (bind it with :func:`build_app`).

    Args:
        spec: the :class:`EngineSpec` as a dict.
        config: the :class:`ServeConfig` as a dict (:meth:`ServeConfig.to_dict`).
        device: the device its engine opens on (``cuda`` on replicas with GPUs, else ``cpu``).
    """

    def __init__(self, spec: dict, config: dict, device: str = "cpu"):
        from .app import open_app

        _replica_grpc_on_loopback()
        self.app = open_app(EngineSpec.from_dict(spec), ServeConfig.from_dict(config), runner="ray", device=device)
        try:
            from ray import serve

            self.app.replica = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside a replica (the class used directly) there is no context
            self.app.replica = None

    async def __call__(self, request):
        """One HTTP request: its ASGI scope and messages go to the app as they are; the app's answer comes back as
        one response (every answer of the app is small and complete)."""
        from starlette.responses import Response

        started: dict = {}
        chunks: list[bytes] = []

        async def send(message):
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(request.scope, request.receive, send)
        if not started:  # the client went away: nobody reads this
            return Response(b"", status_code=499)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in started.get("headers", [])}
        return Response(b"".join(chunks), status_code=started["status"], headers=headers)

    def check_health(self) -> None:
        """Ray Serve's health check: the engine is open once ``__init__`` returned."""
        if self.app is None:
            raise RuntimeError("the engine is not open")

    def __del__(self):
        app = getattr(self, "app", None)
        if app is not None:
            with contextlib.suppress(Exception):
                app.close()


def _replica_grpc_on_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on ``[::]:0`` (every interface) whatever the
    node's address; on a node that runs on loopback (a cluster dsdkit started, :func:`~dsdkit.jobs.ray_runner.
    init_local_cluster`) that port is opened on loopback too, through the function Ray opens it with. Where Ray
    opens it differently this does nothing, and the test that reads the cluster's listening sockets says so."""
    try:
        import ray
        from ray.serve._private import replica as replica_module
    except ImportError:
        return
    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return  # a node that other machines reach: its owner secures the cluster (Ray's authentication, a network)
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "dsdkit_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:") :]
        return original(server, address)

    add_port.dsdkit_loopback = True
    replica_module.add_port_to_grpc_server = add_port


def _check_spec(spec: EngineSpec, config: ServeConfig) -> EngineSpec:
    """The spec with absolute paths, after the checks that need no engine on this machine, so that a bad bundle or
    model fails here in one line before anything deploys (a replica's failure reaches the user as Ray's message):
    a bundle is verified (every file against its hash) and opened; a model is found and its folder's layout
    checked (without loading it), an adapter file must exist."""
    from .batching import split_pairs

    spec = spec.absolute()
    config.root()
    if spec.bundle is not None:
        from ..runtime.matcher import Matcher

        engine = Matcher.from_bundle(
            spec.bundle, backend="onnxruntime", device="cpu", verify=True, overrides=spec.knobs
        )
        try:
            split_pairs([], len(engine.timesteps), config.max_batch_items)
        finally:
            engine.close()
        return spec
    from ..pytorch.models import check_model_folder, resolve_model_folder

    folder = resolve_model_folder(spec.model)
    check_model_folder(folder)
    if spec.adapters is not None and not Path(spec.adapters).is_file():
        raise ConfigError(f"`adapters` {spec.adapters}: no such file", field="adapters")
    if Path(spec.model).expanduser().exists():  # a local folder: replicas may start in another working folder
        spec = dataclasses.replace(spec, model=str(folder.resolve()))
    if spec.adapters is not None:
        spec = dataclasses.replace(spec, adapters=str(Path(spec.adapters).resolve()))
    return spec


def build_app(
    spec: EngineSpec | str | os.PathLike,
    config: ServeConfig | None = None,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
):
    """The Ray Serve application (``serve.run(build_app(...))``): :class:`DsdReplica` over ``spec`` (an
    :class:`EngineSpec`, or a bundle's path).

    Args:
        config: the :class:`ServeConfig` (limits, batching, bounds, image root).
        replicas: replicas of the deployment, each with its own engine.
        gpus_per_replica: GPUs Ray reserves per replica; above 0 the engine runs on ``cuda`` (TensorRT engines when
            the bundle has them and TensorRT is installed, else ONNX Runtime's CUDA provider), else on the CPU.
        cpus_per_replica: CPUs Ray reserves per replica; also the engine's threads unless the spec sets them.

    Raises:
        MissingDependencyError: Ray Serve is not installed.
        ConfigError, BundleError: a bad option or bundle (checked here, before any replica starts).
    """
    serve = _ray_serve()
    if not isinstance(spec, EngineSpec):
        spec = EngineSpec(bundle=os.fspath(spec))
    config = config or ServeConfig()
    for name, value in (("replicas", replicas), ("cpus_per_replica", cpus_per_replica)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, (int, float)) or gpus_per_replica < 0:
        raise ConfigError(f"gpus_per_replica must be a number >= 0, got {gpus_per_replica!r}")
    spec = _check_spec(spec, config)
    if spec.threads is None:
        spec = dataclasses.replace(spec, threads=max(1, int(cpus_per_replica)))
    if config.image_root is not None:  # replicas run elsewhere: give them the absolute folder
        config = dataclasses.replace(config, image_root=str(config.root()))
    deployment = serve.deployment(DsdReplica).options(
        name="dsdkit",
        num_replicas=int(replicas),
        max_ongoing_requests=config.max_receiving + config.max_active_requests + HEALTH_SLOTS,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(spec.to_dict(), config.to_dict(), device="cuda" if gpus_per_replica > 0 else "cpu")


def proxy_middlewares():
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): answers the proxy itself
    makes (a replica that died under a request, no replica to take it) become one line of JSON, as every answer of
    the app is. :func:`serve_ray` sets it for the clusters it starts."""
    from starlette.middleware import Middleware

    return [Middleware(_JsonErrors)]


class _JsonErrors:
    """ASGI middleware on Ray's HTTP proxy. Every answer of the app is JSON; an answer that is not (Ray's own plain
    text: 503 when no replica takes the request, 408 past Ray's timeout) becomes one line of JSON, and a request
    whose replica died under it (the proxy raises, and its server would answer a plain "Internal Server Error")
    gets a JSON 500 saying that it can be retried."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        state: dict = {"started": False, "held": None, "text": b""}

        async def wrapped(message):
            kind = message["type"]
            if kind == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                    state["held"] = message["status"]
                    return
                state["started"] = True
                await send(message)
            elif kind == "http.response.body" and state["held"] is not None:
                state["text"] += message.get("body", b"")[:300]
                if not message.get("more_body", False):
                    status, text = state["held"], state["text"].decode("utf-8", "replace")
                    state.update(held=None, started=True)
                    await _send_error(send, status, f"Ray Serve answered {status}: {one_line(text, 200)}")
            else:
                await send(message)

        failure = None
        try:
            await self.app(scope, receive, wrapped)
        except Exception as exc:  # noqa: BLE001 - the proxy's own failure: answered in JSON below
            if state["started"]:
                raise
            failure = exc
        if not state["started"]:
            # Ray's proxy returns without any answer when the replica died under the request (its server would
            # then send a plain "Internal Server Error").
            if failure is not None:
                logger.warning("dsdkit serve: a request failed in Ray's proxy: %s", one_line(failure, 200))
            await _send_error(
                send,
                500,
                "the replica serving this request failed (it may have died and is being restarted); the request "
                "can be retried",
            )


async def _send_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (503, 500):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def _ray_logging(verbose: bool, log_file: Path | None):
    """Ray's driver-side log lines to ``log_file`` (unless ``verbose``), its workers' output kept off the terminal
    (unless ``verbose``), and no colour codes where stderr is not a terminal."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    names = ("ray", "ray.serve")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in names}
    handler = None
    if not verbose and log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in names:
            log = logging.getLogger(name)
            log.handlers[:] = [handler]
            log.propagate = False
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            log = logging.getLogger(name)
            log.handlers[:], log.propagate = handlers, propagate
        if handler is not None:
            handler.close()


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


def serve_ray(
    spec: EngineSpec,
    config: ServeConfig | None = None,
    options: RayServeOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str], None] | None = None,
    verbose: bool = False,
    app_name: str = "dsdkit",
) -> None:
    """Serve ``spec`` on Ray Serve at ``http://host:port/`` until Ctrl-C or SIGTERM; then delete the application and
    leave Ray (a local cluster started here ends with it).

    Args:
        options: the cluster and the replicas (default: one CPU replica on a new local cluster).
        on_ready: called with the URL once the replicas are up.
        verbose: Ray's own log lines on the terminal instead of ``options.log_file``.
    """
    config = config or ServeConfig()
    options = options or RayServeOptions()
    address, log_file = options.address, options.log_file
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"`port` must be 1..65535 on Ray Serve, got {port!r}", field="port")
    app = build_app(
        spec,
        config,
        replicas=options.replicas,
        gpus_per_replica=options.gpus_per_replica,
        cpus_per_replica=options.cpus_per_replica,
    )
    import ray

    serve = _ray_serve()
    log_path = Path(log_file) if log_file else Path(tempfile.gettempdir()) / f"dsdkit-serve-ray-{os.getpid()}.log"
    local = address == "local"
    with _ray_logging(verbose, log_path):
        if not verbose:
            logger.info("dsdkit serve: Ray's log lines go to %s", log_path)
        kwargs = dict(
            include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING
        )
        if local:
            from ..jobs.ray_runner import init_local_cluster

            # Ray's proxy answers a dead replica in plain text; this callback makes it JSON (processes of the
            # cluster started here inherit the variable).
            os.environ.setdefault(
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "dsdkit.serving.ray_serve.proxy_middlewares"
            )
            init_local_cluster(ray, **kwargs)
        else:
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise ConfigError(
                    f"`address` {address}: cannot connect to a Ray cluster there ({one_line(exc, 200)})",
                    field="address",
                ) from None
        try:
            # From here on, Ctrl-C or SIGTERM (also while the replicas start) removes the application and leaves Ray.
            with _terminate_as_interrupt():
                try:
                    http = {"host": host, "port": int(port), "request_timeout_s": config.request_timeout_s + 30}
                    serve.start(
                        http_options=http,
                        logging_config={"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose},
                    )
                    try:
                        serve.run(app, name=app_name, route_prefix="/", blocking=False)
                    except RuntimeError as exc:  # a replica that failed to start: Ray's message holds its error
                        raise ConfigError(_deploy_error(exc, log_path if not verbose else None)) from None
                    if on_ready is not None:
                        on_ready(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/")
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    logger.info("dsdkit serve: stopping")
            with contextlib.suppress(Exception):
                serve.delete(app_name)
            if local:
                with contextlib.suppress(Exception):
                    serve.shutdown()
        finally:
            ray.shutdown()
    logger.info("dsdkit serve: stopped")


def _deploy_error(exc: BaseException, log_path: Path | None) -> str:
    """One line from Ray's deployment failure: the replica's own error (a dsdkit one-liner) where it shows."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ours = [line for line in lines if any(name in line for name in ("Error:", "error:"))]
    first = ours[-1] if ours else (lines[0] if lines else type(exc).__name__)
    where = f" (Ray's log: {log_path})" if log_path else ""
    return one_line(f"the application did not start: {first}{where}")
