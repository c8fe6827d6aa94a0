"""Faster UNet runs for the PyTorch scorer: ``torch.compile`` (CUDA graphs on a GPU) and channels-last weights.

Neither changes what is computed, only how: a compiled scorer's scores agree with the eager scorer's within the
export's parity tolerances (``tests/pytorch/test_acceleration.py`` checks fp32 on CPU; ``dsdkit bench`` checks every
run).

How the compiled path is built, and why:

* What is compiled is the whole scoring forward of one UNet batch, :class:`dsdkit.pytorch.forward.ScoringForward`
(noising,
  the UNet with its processors, the pooling of each scored layer, the noise error), so the scored layers' fp32
  logits, softmax and LogSumExp fuse with their neighbours and nothing leaves the graph but ``[B, L]`` and ``[B]``.
  The per-call state the processors record into is made inside the compiled frame, and the processors are installed
  once, so nothing a guard checks changes from call to call.
* One compiled forward per (model, mode, adapter, pooling definition, scored layers) is kept on the model and shared
  by every :class:`~dsdkit.pytorch.scorer.Scorer` that matches, so a new scorer (another S, another job) does not
  recompile.
* Shapes are static (``dynamic=False``): the scorer pads a short last batch to the batch size, so a job compiles
  once per batch size, and CUDA graphs (``reduce-overhead``, ``max-autotune``) replay one recorded graph.
* Threads: compiled CPU forwards run in parallel like eager ones (``torch.compile`` itself compiles one graph at a
  time, under dynamo's lock). With CUDA graphs a compiled forward runs one batch at a time (:class:`CompiledForward`
  holds a lock around the replay and the copy of its outputs), and each thread records graphs of its own (CUDA-graph
  trees are per thread), so a GPU scorer is best called from few threads. The cache of compiled forwards and the
  channels-last conversion are changed under a lock.
* Compiling costs time once per process and shape (about 2 min for the tiny test model on a 2-core CPU with a cold
  inductor cache, 20 s warm); ``dsdkit bench`` reports it separately as the warm-up.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any

from ..runtime.errors import CompileError, ConfigError

__all__ = [
    "COMPILE_MODES",
    "Acceleration",
    "CompiledForward",
    "compiled_forward",
    "release_compiled",
    "set_channels_last",
]

logger = logging.getLogger(__name__)

# torch.compile's modes; "auto" picks reduce-overhead (CUDA graphs) on a GPU and default on a CPU.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Guards what scorers change on a shared model: its compiled forwards' cache and its UNet's memory format. Both are
# quick, so one lock serves every model.
_MODEL_LOCK = threading.RLock()


@dataclass(frozen=True)
class Acceleration:
    """How the PyTorch scorer runs its UNet.

    Args:
        compile: a :data:`COMPILE_MODES` mode, or ``None`` to run eagerly.
        channels_last: convert the UNet's weights (in place, for every scorer on the model) and its inputs to
            channels-last; ``None`` follows ``compile`` (on when compiling).
    """

    compile: str | None = None
    channels_last: bool | None = None

    def __post_init__(self):
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile mode {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")

    @property
    def uses_channels_last(self) -> bool:
        return self.compile is not None if self.channels_last is None else self.channels_last

    def mode_for(self, device_type: str) -> str | None:
        """The torch.compile mode on this device (``auto`` resolved), or None when eager."""
        if self.compile != "auto":
            return self.compile
        return "reduce-overhead" if device_type == "cuda" else "default"


def set_channels_last(model, enabled: bool) -> None:
    """Convert ``model``'s UNet weights to channels-last (or back to contiguous), in place; no-op when already so."""
    import torch

    with _MODEL_LOCK:
        if getattr(model, "_channels_last", False) == enabled:
            return
        model.unet.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        model._channels_last = enabled


class CompiledForward:
    """A compiled :class:`~dsdkit.pytorch.forward.ScoringForward` (see the module doc); called like the forward
    itself."""

    def __init__(self, forward, mode: str):
        import torch

        self.forward = forward
        self.mode = mode
        self.cuda_graphs = forward.model.device.type == "cuda" and mode in _CUDA_GRAPH_MODES
        # Every instance compiles the same code object (_forward). Without isolation all of them would share one
        # recompile budget per process, and past it dynamo silently runs the frame eagerly: a "compiled" scorer
        # that is not. Where this torch can isolate them, each instance gets its own budget, and exceeding it is an
        # error (see __call__), never a silent fallback.
        options: dict[str, Any] = {}
        if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
            options["isolate_recompiles"] = True
        try:
            self._compiled = torch.compile(self._forward, mode=mode, dynamic=False, **options)
        except Exception as error:  # e.g. a Python build torch.compile does not support
            raise _compile_error(error) from error
        self._shapes: set[tuple] = set()
        # CUDA-graph replays write their outputs into the graph's memory pool, to be copied before the next replay;
        # one replay at a time keeps a thread's outputs from being overwritten by another's.
        self._replay = threading.Lock() if self.cuda_graphs else contextlib.nullcontext()

    def _forward(self, latents, signal, noise_scale, noise, timesteps, states, masks):
        # Tensors in, tensors out: what torch.compile specialises on is the batch's shapes, nothing else.
        from .forward import Noising

        return self.forward(latents, Noising(signal, noise_scale, noise, timesteps), states, masks)

    def __call__(self, latents, noising, states, masks) -> tuple[Any, Any]:
        import torch

        shape = (tuple(latents.shape), tuple(states.shape))
        first = shape not in self._shapes
        if first:
            logger.info(
                "compiling the scoring UNet (torch.compile mode %s, batch %d): the first batch of this shape "
                "takes minutes",
                self.mode,
                latents.shape[0],
            )
        # Guards check strides: an expanded (stride-0) caption batch must not compile a second graph.
        states, masks = states.contiguous(), masks.contiguous()
        with self._replay:
            if self.cuda_graphs:
                # Inference loops must mark each new step, or CUDA-graph trees cannot tell when outputs may be reused.
                torch.compiler.cudagraph_mark_step_begin()
            try:
                with _no_silent_fallback():
                    layers, errors = self._compiled(latents, *noising, states, masks)
            except Exception as error:
                # Compiling (and, with CUDA graphs, recording) happens on the first call of a shape; errors there
                # are the compiler's, whatever their type. Later calls run compiled code: their errors are the run's.
                if first or isinstance(error, torch._dynamo.exc.TorchDynamoException):
                    raise _compile_error(error) from error
                raise
            # CUDA-graph outputs live in the graph's memory pool and are overwritten by the next replay.
            if self.cuda_graphs:
                layers, errors = layers.clone(), errors.clone()
        self._shapes.add(shape)
        return layers, errors


def _compile_error(error: BaseException) -> CompileError:
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    return CompileError(f"torch.compile failed ({type(error).__name__}: {reason[:300]}); run without `compile`")


@contextlib.contextmanager
def _no_silent_fallback():
    """Past its recompile limit dynamo runs a frame eagerly with a one-time warning; make that an error instead.

    The patch is the calling thread's own (torch's config overrides are per thread), so overlapping calls of several
    threads neither see nor undo each other's."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        yield
        return
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        yield


# Compiled forwards kept per model: each holds compiled code (and, with CUDA graphs, a memory pool) and its adapter.
MAX_CACHED_FORWARDS = 4


def compiled_forward(forward, mode: str) -> CompiledForward:
    """The shared :class:`CompiledForward` for this forward's model, mode, adapter and pooling definition (made on
    first use; the least recently used of more than :data:`MAX_CACHED_FORWARDS` is dropped)."""
    # What the forward computes depends on these and nothing else of the scoring config (the timesteps, noise bank
    # and token masks are inputs); the adapter is held by the entry, so its id cannot be reused while cached.
    config = forward.config
    key = (
        mode,
        id(forward.adapter),
        tuple(forward.layer_names),
        config.pooling,
        float(config.lse_lambda),
        config.heads,
    )
    # Under the lock, scorers built at once by several threads find one entry (one compilation), not one each.
    # Making an entry is cheap: torch.compile compiles on the first call.
    with _MODEL_LOCK:
        cache: dict = forward.model.__dict__.setdefault("_compiled_forwards", {})
        entry = cache.pop(key, None) or CompiledForward(forward, mode)
        cache[key] = entry  # most recently used last
        while len(cache) > MAX_CACHED_FORWARDS:
            cache.pop(next(iter(cache)))
    return entry


def release_compiled(model) -> None:
    """Drop every compiled forward kept on ``model`` (their code, CUDA-graph memory and adapters)."""
    with _MODEL_LOCK:
        model.__dict__.pop("_compiled_forwards", None)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
