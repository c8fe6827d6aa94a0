"""Runners: one interface over ONNX Runtime (and, with the TensorRT issue, TensorRT), Polygraphy-style.

A runner has a lifecycle: construct (cheap, nothing loaded), :meth:`activate` (create the session), :meth:`infer`
any number of times, :meth:`close`. It is a context manager.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .engine_key import check_engine_key, engine_key_fields
from .errors import BundleError, ConfigError, install_hint
from .threads import ort_session_options

__all__ = [
    "Runner",
    "OrtRunner",
    "TrtRunner",
    "ort_providers",
    "make_runners",
    "gpu_compute_capability",
    "BACKENDS",
]

logger = logging.getLogger(__name__)


class Runner:
    """Base class of backends: ``activate`` / ``infer`` / ``close``.

    Threads: :meth:`infer` may be called from several threads at once; the first calls activate the runner once
    (the others wait for it), and a backend whose runs are not thread-safe serialises them (see its class).
    :meth:`close` must not overlap running calls.
    """

    name = "runner"

    def __init__(self):
        self.active = False
        self._activation = threading.Lock()

    def activate(self) -> Runner:
        if not self.active:
            # Checked again under the lock: racing first calls must not each load a session (or an engine).
            with self._activation:
                if not self.active:
                    self._activate()
                    self.active = True
        return self

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            self.activate()
        return self._infer(feed)

    def close(self) -> None:
        if self.active:
            self._close()
            self.active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict[str, Any]:
        """What result files record about this runner (each backend adds its own details)."""
        return {"backend": self.name}

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed):
        raise NotImplementedError

    def _close(self) -> None:
        pass


def ort_providers(device: str = "auto") -> list[str]:
    """Providers to ask ONNX Runtime for: CUDA first when the installed build offers it (``auto``/``cuda``)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ConfigError(
            "`device` cuda: this onnxruntime build has no CUDA provider; install onnxruntime-gpu", field="device"
        )
    return ["CPUExecutionProvider"]


class OrtRunner(Runner):
    """An ONNX Runtime session over one graph file. Its runs take no lock: ``InferenceSession.run`` is thread-safe,
    so concurrent calls run in parallel (sharing the session's intra-op threads).

    Args:
        path: the ``.onnx`` file (external data beside it is found automatically).
        providers: execution providers in order of preference; default :func:`ort_providers`.
        threads: intra-op threads (default: :func:`~dsdkit.runtime.threads.current_threads`, the CLI's
            ``--threads``). The session's thread pools never spin while they wait (see runtime/threads.py).
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.providers = providers
        self.threads = threads
        self.session = None

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                f"onnxruntime is not installed; install the ort extra on a CPU ({install_hint('ort')}) or ort-gpu on "
                "CUDA"
            ) from None
        options = ort_session_options(self.threads)
        requested = self.providers or ort_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(
                f"{self.path}: ONNX Runtime cannot load this graph ({first[:200]}); re-export it"
            ) from None
        got = self.session.get_providers()  # what the session really uses, not what is "available"
        if requested[0] != got[0]:
            logger.warning(
                "%s: asked ONNX Runtime for %s, the session runs on %s", self.path.name, requested[0], got[0]
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}")
        outputs = self.session.run(None, {n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))

    def _close(self) -> None:
        self.session = None

    @property
    def providers_in_use(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.providers_in_use}


def gpu_compute_capability(device: int = 0) -> str | None:
    """Compute capability (``"9.0"``) of CUDA device ``device``, asked of the driver; ``None`` when none answers.

    Read through the driver library with ctypes because the runtime has neither torch nor cuda-python to ask, and
    the driver is present wherever a TensorRT engine can run at all.
    """
    driver = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if driver is None:
        found = ctypes.util.find_library("cuda")  # last: it may run ldconfig or a compiler to search
        try:
            driver = ctypes.CDLL(found) if found else None
        except OSError:
            driver = None
    if driver is None:
        return None
    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR of the CUDA driver API.
    calls = (
        lambda: driver.cuInit(0),
        lambda: driver.cuDeviceGet(ctypes.byref(handle), device),
        lambda: driver.cuDeviceGetAttribute(ctypes.byref(major), 75, handle),
        lambda: driver.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle),
    )
    try:
        if any(call() != 0 for call in calls):
            return None
    except AttributeError:  # a library by that name that is not the CUDA driver
        return None
    return f"{major.value}.{minor.value}"


class TrtRunner(Runner):
    """A TensorRT engine from a bundle, through Polygraphy's runner (thin on purpose).

    The engine's cache key (written by ``dsdkit build-engines``) is checked against ``needs`` (the bundle's
    :func:`~dsdkit.runtime.engine_key.engine_key_fields`) and this machine's TensorRT version and compute capability
    before anything is deserialized: a stale engine, or one that this GPU cannot deserialize, is refused with the
    command that rebuilds it.

    Threads: runs are serialised (one execution context); the GPU is kept busy by one run at a time anyway.
    """

    name = "tensorrt"

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict[str, Any],
        bundle_path: str | os.PathLike,
        needs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.path = Path(path)
        self.meta = meta
        self.needs = dict(needs or {})
        self.bundle_path = bundle_path
        self.rebuild = f"rebuild the engines on this machine with `dsdkit build-engines {bundle_path}`"
        first = next(iter(meta["profile"].values()))
        self.max_batch = int(first["max"][0])
        self._runner = None
        self._serial = threading.Lock()

    def _activate(self) -> None:
        try:
            import tensorrt as trt
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes
            from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
        except ImportError:
            raise ConfigError(
                f"the TensorRT backend needs tensorrt and polygraphy (the trt extra: {install_hint('trt')}, with "
                "TensorRT from NVIDIA's index); or pass onnxruntime as `backend`"
            ) from None
        needed = {**self.needs, "tensorrt": trt.__version__}
        capability = gpu_compute_capability()
        if capability is not None:
            needed["compute_capability"] = capability
        check_engine_key(self.path, self.meta, needed, self.bundle_path)
        try:
            engine = EngineFromBytes(BytesFromPath(str(self.path)))()
        except Exception:  # noqa: BLE001 - TensorRT reports deserialization failures in several ways
            engine = None
        if engine is None:
            raise BundleError(
                f"{self.path}: TensorRT cannot load this engine here (built for {self.meta.get('gpu')}, "
                f"compute capability {self.meta.get('compute_capability')}); {self.rebuild}"
            )
        self._runner = PolygraphyTrtRunner(engine)
        self._runner.activate()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(feed.values())))
        if batch > self.max_batch:
            raise ConfigError(f"{self.path.name}: batch {batch} exceeds the engine's profile maximum {self.max_batch}")
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        # Polygraphy's runner has one execution context, stream and set of host output buffers, and returns views of
        # those buffers that its next run overwrites: one run at a time, its outputs copied out before the next.
        with self._serial:
            outputs = self._runner.infer(feed)
            return {name: np.array(value) for name, value in outputs.items()}

    def _close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "engine": self.path.name,
            "gpu": self.meta.get("gpu"),
            "tensorrt": self.meta.get("tensorrt"),
        }


BACKENDS = ("auto", "onnxruntime", "tensorrt")


def make_runners(bundle, backend: str = "auto", device: str = "auto", threads: int | None = None) -> dict[str, Runner]:
    """One runner per graph of ``bundle``: TensorRT engines or ONNX Runtime sessions (not yet activated; ``threads``:
    their intra-op CPU threads, default :func:`~dsdkit.runtime.threads.current_threads`)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    engines = bundle.manifest.get("engines") or {}
    if backend == "auto":
        try:
            import tensorrt  # noqa: F401

            backend = "tensorrt" if engines.get("built") else "onnxruntime"
        except ImportError:
            backend = "onnxruntime"
    if backend == "tensorrt":
        if not engines.get("built"):
            raise BundleError(
                f"{bundle.path}: the bundle has no TensorRT engines; build them on this machine with "
                f"`dsdkit build-engines {bundle.path}`, or pass onnxruntime as `backend`"
            )
        runners = {}
        for name, meta in engines["graphs"].items():
            try:
                needs = engine_key_fields(bundle.manifest, name)
            except KeyError as exc:
                raise BundleError(
                    f"{bundle.path}: the manifest has no {exc} record for the {name!r} engine's graph; re-export the "
                    f"bundle with `dsdkit export` and rebuild its engines with `dsdkit build-engines {bundle.path}`"
                ) from None
            runners[name] = TrtRunner(bundle.path / meta["file"], meta, bundle.path, needs)
        return runners
    providers = ort_providers(device)
    return {name: OrtRunner(bundle.graph_path(name), providers, threads) for name in bundle.manifest["graphs"]}
