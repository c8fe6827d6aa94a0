"""``dsdkit bench``: DSD throughput of our engines against the reference cost, measured side by side in one run.

Every job is scored from scratch (nothing cached between engines) on generated colour-shape images and captions:

* ``pytorch``: :class:`~dsdkit.pytorch.scorer.Scorer` (caches per image and caption, unconditional pass per image and
  timestep, pairs x timesteps packed into batches, SDPA outside the scored layers);
* ``reference``: :func:`dsdkit.pytorch.reference.reference_scores`, the authors' cost structure (VAE per timestep, an
  unconditional and a conditional UNet half per pair and timestep, eager attention everywhere);
* ``pytorch-adaptive``: the same scorer ranking each image's captions by successive elimination
  (:mod:`dsdkit.runtime.adaptive`, ``adaptive_schedule``, the ``top_k`` best exact): its evaluations, speed and top-1
  agreement against ``pytorch`` (exhaustive) are reported beside the reference's;
* ``pytorch-compiled``: the same scorer with ``torch.compile`` (``--compile-mode``; ``auto`` = CUDA graphs on a GPU)
  and channels-last weights (:mod:`dsdkit.pytorch.acceleration`); its scores must agree with ``pytorch``'s within the
  export's parity tolerances, checked in the run. Compilation happens in the untimed warm-up and is reported as
  ``warm_up_s``;
* ``onnxruntime`` / ``tensorrt``: the runtime :class:`~dsdkit.runtime.Matcher` on a bundle (``--bundle``; TensorRT
  needs engines in the bundle and ``import tensorrt``).

Before any ratio is printed, the reference is checked against our scorer with the same config and the authors'
unconditional-row mixing switched on (their B3), which must agree within 1e-5: the two compute the same numbers and
differ only in cost. Reported per engine and batch size: wall seconds, pairs/s, UNet evaluations/s, median latency
per UNet batch, process peak RSS, peak device memory, the UNet's FLOP rate from *counted* UNet FLOPs
(``torch.utils.flop_counter``) as a fraction of the matrix-multiply peak measured in the same process
(:func:`measure_matmul_peak`: the machine's own ceiling, in the UNet's precision), and, on a GPU, as a fraction of
the device's dense fp16/bf16 datasheet peak (MFU).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import Matcher
from ..runtime.config import ScoringConfig
from ..runtime.errors import ConfigError, ParityError

__all__ = [
    "BenchConfig",
    "run_bench",
    "planned_rows",
    "unet_flops",
    "unet_flop_counts",
    "measure_matmul_peak",
    "SCALING_TABLE",
]

logger = logging.getLogger(__name__)

ENGINES = ("pytorch", "pytorch-adaptive", "pytorch-compiled", "reference", "onnxruntime", "tensorrt")
BUNDLE_ENGINES = ("onnxruntime", "tensorrt")
# Dense (no sparsity) tensor-core peaks in TFLOP/s for fp16/bf16, from NVIDIA's datasheets.
DENSE_PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100 HBM3": 989.0,  # the SXM part, which torch names "NVIDIA H100 80GB HBM3"
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
AGREEMENT_TOLERANCE = 1e-5
# Compiled vs eager scores: the export's parity gates (absolute + relative to |eager score|), by UNet precision.
# bf16 keeps 7 mantissa bits to fp16's 10: its gate is fp16's times 8 (not yet measured on a GPU).
ACCELERATION_TOLERANCE = {"fp32": (1e-5, 1e-4), "fp16": (5e-3, 5e-3), "bf16": (4e-2, 4e-2)}
# The scaling table of docs/performance.md: (model size, images, captions, timesteps).
SCALING_TABLE = [("tiny", 2, 2, 4), ("tiny", 8, 8, 4), ("tiny", 32, 32, 4), ("full", 2, 2, 2)]


@dataclass
class BenchConfig:
    """One benchmark job (written into the result JSON)."""

    model: str | None = None  # a model folder; None writes a random-weight model of ``size``
    size: str = "tiny"
    preset: str = "discffusion"
    timesteps: int = 10
    denoise: bool = False
    images: int = 2
    captions: int = 2
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    engines: list[str] = field(default_factory=lambda: ["pytorch", "reference"])
    bundle: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    compile_mode: str = "auto"  # torch.compile mode of the pytorch-compiled engine
    check: bool = True  # compare reference and pytorch (B3 on) before reporting ratios
    adaptive_schedule: str = "default"  # the pytorch-adaptive engine's schedule (runtime.adaptive.Schedule.parse)
    top_k: int = 1  # candidates per image the pytorch-adaptive engine keeps exact

    def validate(self) -> None:
        from ..pytorch.acceleration import COMPILE_MODES

        unknown = set(self.engines) - set(ENGINES)
        if unknown:
            raise ConfigError(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
        for engine in set(self.engines) & set(BUNDLE_ENGINES):
            if not self.bundle:
                raise ConfigError(
                    f"engine {engine} needs a `bundle` (export one with `dsdkit export`)", field="bundle"
                )
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"`compile_mode` {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}", field="compile_mode"
            )
        if "pytorch-adaptive" in self.engines:
            from ..runtime.adaptive import Schedule

            Schedule.parse(self.adaptive_schedule)  # a bad schedule is refused before any model loads
        if min(self.images, self.captions, self.timesteps, self.top_k, *self.batch_sizes) < 1:
            raise ConfigError("images, captions, timesteps and batch sizes must be >= 1")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def planned_rows(config: BenchConfig) -> list[tuple[str, int]]:
    """The ``(engine, batch)`` rows :func:`run_bench` measures for ``config``, in order."""
    scoring = ScoringConfig.from_preset(config.preset, num_timesteps=config.timesteps, denoise_term=config.denoise)
    rows = []
    for batch in config.batch_sizes:
        if "pytorch" in config.engines:
            rows.append(("pytorch", batch))
            if config.check and "reference" in config.engines and not scoring.uncond_in_attention:
                rows.append(("pytorch (B3 on)", batch))
        if "pytorch-adaptive" in config.engines:
            rows.append(("pytorch-adaptive", batch))
        if "pytorch-compiled" in config.engines:
            rows.append(("pytorch-compiled", batch))
        rows += [(backend, batch) for backend in BUNDLE_ENGINES if backend in config.engines]
    if "reference" in config.engines:
        rows.append(("reference", 2))
    return rows


class _Clock:
    """Progress callback that timestamps every UNet batch (for latency per batch) and reports the count."""

    def __init__(self, report: Callable[[int], None] | None = None):
        self.stamps = [time.perf_counter()]
        self.evaluations = 0
        self.report = report

    def __call__(self, n: int) -> None:
        self.evaluations += n
        self.stamps.append(time.perf_counter())
        if self.report is not None:
            self.report(self.evaluations)

    def latency_ms(self) -> float | None:
        gaps = np.diff(self.stamps[1:]) if len(self.stamps) > 2 else np.diff(self.stamps)
        return round(float(statistics.median(gaps)) * 1000, 2) if len(gaps) else None


def unet_flops(scorer) -> int:
    """FLOPs of one scorer UNet evaluation at batch 1 (see :func:`unet_flop_counts`)."""
    return unet_flop_counts(scorer)["total"]


def unet_flop_counts(scorer) -> dict[str, int]:
    """FLOPs of one scorer UNet evaluation at batch 1, counted by ``torch.utils.flop_counter`` (matmuls and
    convolutions, 2 per multiply-add), with the scoring processors installed: ``total`` and, of it,
    ``attention_scores``, the ``QKᵀ`` and ``PV`` products of every attention layer (the part that grows with the
    square of the token count, and which module-level counters that only see ``Linear``/``Conv`` layers omit).
    The split assumes no adapter: an adapter's factor products run inside attention layers and would count there."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    model = scorer.model
    latent = scorer.resolution // model.vae_scale_factor
    z0 = torch.zeros(1, model.latent_channels, latent, latent, device=model.device)
    states = torch.zeros(
        1, model.tokenizer.max_length, int(model.text_encoder.config.hidden_size), device=model.device
    )
    mask = torch.ones(1, model.tokenizer.max_length, device=model.device)
    noising = scorer.noising(torch.tensor([0]))

    # torch's table has the CUDA flash/efficient SDPA kernels but not the CPU one the self-attention layers use here.
    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with torch.inference_mode(), counter:
        scorer.forward(z0, noising, states, mask)
    # The counter attributes FLOPs to every module on the stack. An attention layer's products are what it runs
    # beyond its own projections (op names cannot tell them apart: a Linear on a 3-D input may run as bmm too).
    by_module = {name: sum(int(n) for n in ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model.unet).__name__
    attention = 0
    for name, module in model.unet.named_modules():
        if hasattr(module, "to_q") and hasattr(module, "to_out") and f"{root}.{name}" in by_module:
            projections = sum(
                by_module.get(f"{root}.{name}.{child}", 0)
                for child, submodule in module.named_modules()
                if isinstance(submodule, torch.nn.Linear)
            )
            attention += by_module[f"{root}.{name}"] - projections
    return {"total": int(counter.get_total_flops()), "attention_scores": attention}


# The GEMM that measures the matrix-multiply peak: (side, timed repeats, untimed warm-ups) per device type. A CPU
# product of 4096² takes about a second on two cores; on a GPU 8192² is the smallest that fills an H100/H200.
MATMUL_SETTINGS = {"cpu": (4096, 3, 1), "cuda": (8192, 10, 3)}


def measure_matmul_peak(
    device: str = "cpu", dtype: str = "fp32", size: int | None = None, repeats: int | None = None
) -> dict[str, Any]:
    """The machine's own ceiling for the UNet's FLOP rate: the median rate of one square matrix product
    (``size``³, random normal operands, in ``dtype``) on ``device`` with torch's current settings and threads.

    A datasheet peak says what the silicon could do; this says what torch's GEMM does here and now (the CPU's
    vector units and threads, a GPU's clocks and cuBLAS), so a UNet rate as a fraction of it is what is left to
    gain in the scorer rather than in the libraries underneath. Measured once per process and arguments (a later
    call returns a copy of the first record: jobs in one run share one ceiling).
    """
    return dict(_matmul_peak(str(device), str(dtype), size, repeats))


@functools.cache
def _matmul_peak(device: str, dtype: str, size: int | None, repeats: int | None) -> dict[str, Any]:
    import torch

    from ..pytorch.models import Precision

    where = torch.device(device)
    side, default_repeats, warm_ups = MATMUL_SETTINGS["cuda" if where.type == "cuda" else "cpu"]
    side, repeats = int(size or side), int(repeats or default_repeats)
    torch_dtype = Precision(dtype).torch_dtype
    generator = torch.Generator(device=where).manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator, device=where, dtype=torch_dtype) for _ in range(2))
    out = torch.empty(side, side, device=where, dtype=torch_dtype)
    seconds = []
    with torch.inference_mode():
        for _ in range(warm_ups):
            torch.matmul(a, b, out=out)
        for _ in range(repeats):
            if where.type == "cuda":  # device time between events: no launch or host-sync cost in the figure
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(where)
                start.record()
                torch.matmul(a, b, out=out)
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                torch.matmul(a, b, out=out)
                seconds.append(time.perf_counter() - begin)
    median = float(statistics.median(seconds))
    rate = 2 * side**3 / median
    record = {
        "device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
        "dtype": dtype,
        "shape": [side, side, side],
        "repeats": repeats,
        "warm_ups": warm_ups,
        "median_s": round(median, 6),
        "gflop_per_s": round(rate / 1e9, 2),
        "tflop_per_s": round(rate / 1e12, 4),
        "threads": torch.get_num_threads(),
    }
    if where.type == "cuda" and dtype == "fp32":
        record["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    logger.info("matmul peak: %.4g GFLOP/s (%s %d³ on %s, median of %d)", rate / 1e9, dtype, side, device, repeats)
    return record


def _device_peak_tflops(name: str) -> float | None:
    for key, value in DENSE_PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def run_bench(
    config: BenchConfig,
    folder: str | os.PathLike | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    status: Callable[[str], None] | None = None,
    *,
    model=None,
    matmul_peak: dict[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Run one benchmark job; returns the JSON-ready record (see the module doc).

    Args:
        folder: the random-weight model of ``config.size`` when it is already written (else one is written).
        progress: ``progress(total, done) -> advance`` makes a reporter over the job's rows (one per engine and
            batch size, :func:`planned_rows`); ``advance(1)`` follows each measured row.
        status: called with a line saying what runs now: the row, its warm-up, and its UNet evaluations so far
            (of how many, where the engine can tell).
        model: an already loaded :class:`~dsdkit.pytorch.models.SD2Model` on ``config.device`` in ``config.dtype`` (a
            caller measuring many jobs on one model loads it once); ``config.model`` then only names it.
        matmul_peak: a :func:`measure_matmul_peak` record for this device and precision (else measured here).
        strict: with ``False`` a failed check (reference agreement, compiled parity) is recorded with
            ``"ok": False`` and its message instead of raised, so a measurement kit keeps every number it took.
    """
    from ..pytorch.models import load_model
    from ..pytorch.tiny import write_tiny_model

    config.validate()
    if model is not None and model.precision.value != config.dtype:
        raise ConfigError(
            f"run_bench: the model given runs in {model.precision.value}, the config asks for {config.dtype}"
        )
    advance = progress(len(planned_rows(config)), 0) if progress is not None else None
    if status is not None:
        status("loading the model, counting UNet FLOPs")
    with tempfile.TemporaryDirectory() as scratch:
        load_s = None
        if model is None:
            model_dir = config.model or folder or write_tiny_model(Path(scratch) / "model", size=config.size)
            started = time.perf_counter()
            model = load_model(model_dir, device=config.device, dtype=config.dtype)
            load_s = round(time.perf_counter() - started, 2)
        bench = _Bench(config, model, status, advance, matmul_peak)
        for batch in config.batch_sizes:
            bench.pytorch_rows(batch)
            bench.adaptive_row(batch)
            bench.compiled_row(batch)
            bench.bundle_rows(batch)
        bench.reference_row()
    return bench.record(load_s, strict)


class _Bench:
    """One benchmark job's measurements: a row per engine and batch size (:meth:`measure`), then the record."""

    def __init__(self, config: BenchConfig, model, status, advance, matmul_peak: dict[str, Any] | None):
        import torch

        from ..export.parity import ParitySettings, parity_inputs
        from ..pytorch.scorer import Scorer

        self.config, self.model, self.status, self.advance = config, model, status, advance
        self.scoring = ScoringConfig.from_preset(
            config.preset, num_timesteps=config.timesteps, denoise_term=config.denoise
        )
        self.images, self.captions = parity_inputs(
            ParitySettings(images=config.images, captions=config.captions, seed=2)
        )
        self.pairs = config.images * config.captions
        self.cuda = model.device.type == "cuda"
        self.probe = Scorer(model, self.scoring, batch_size=1)
        self.flop_counts = unet_flop_counts(self.probe)
        self.flops = self.flop_counts["total"]
        self.peak = _device_peak_tflops(torch.cuda.get_device_name(model.device)) if self.cuda else None
        if matmul_peak is None:
            self._say("measuring the matrix-multiply peak")
            matmul_peak = measure_matmul_peak(str(model.device), config.dtype)
        self.matmul_peak = matmul_peak
        self.rows: list[dict[str, Any]] = []
        self.results: dict[tuple[str, int], np.ndarray] = {}
        self.rankings: dict[int, Any] = {}  # batch -> the pytorch-adaptive engine's AdaptiveMatrix
        # Each engine first scores one pair at S=1, untimed: first-call costs (allocator, thread pools, kernel
        # selection, cuDNN autotuning on a GPU) must not land on whichever engine happens to run first.
        discffusion = self.scoring.timesteps.value == "discffusion"
        self.warm_scoring = self.scoring.replace(num_timesteps=1) if discffusion else self.scoring

    def _say(self, line: str) -> None:
        if self.status is not None:
            self.status(line)

    def scorer(self, batch: int, scoring=None, **kwargs):
        from ..pytorch.scorer import Scorer

        return Scorer(self.model, scoring or self.scoring, batch_size=batch, **kwargs)

    def warm_up(self, batch: int, **kwargs) -> Callable[[], Any]:
        return lambda: self.scorer(batch, self.warm_scoring, **kwargs).score(self.images[:1], self.captions[:1])

    def measure(self, engine: str, batch: int, run, warm_up=None, planned: int | None = None) -> None:
        """Time ``run(clock)`` (after its untimed ``warm_up``) and keep its row and scores."""
        import torch

        name = f"{engine} batch {batch}"
        begin = time.perf_counter()
        if warm_up is not None:
            self._say(f"{name}: warm-up")
            warm_up()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm_up_s = None if warm_up is None else round(time.perf_counter() - begin, 2)
        of = "" if planned is None else f"/{planned}"
        report = None if self.status is None else lambda done: self.status(f"{name}: {done}{of} UNet evals")
        if report is not None:
            report(0)
        clock = _Clock(report)
        begin = time.perf_counter()
        scores = run(clock)
        if self.cuda:
            torch.cuda.synchronize()
        row = self._row(engine, batch, time.perf_counter() - begin, clock, warm_up_s)
        logger.info(
            "%-26s batch %3d: %8.2f s, %.4g pairs/s, %.4g UNet evals/s",
            engine,
            batch,
            row["seconds"],
            row["pairs_per_s"],
            row["evaluations_per_s"],
        )
        self.rows.append(row)
        self.results[(engine, batch)] = scores
        if self.advance is not None:
            self.advance(1)

    def _row(self, engine: str, batch: int, seconds: float, clock: _Clock, warm_up_s) -> dict[str, Any]:
        import torch

        evals_per_s = clock.evaluations / seconds
        work = evals_per_s * self.flops  # useful UNet work only (no padding)
        return {
            "engine": engine,
            "batch": batch,
            "seconds": round(seconds, 3),
            "pairs_per_s": round(self.pairs / seconds, 5),
            "unet_evaluations": clock.evaluations,
            "evaluations_per_s": round(evals_per_s, 4),
            "latency_per_batch_ms": clock.latency_ms(),
            "peak_rss_gb_so_far": round(_peak_rss_gb(), 2),
            "peak_device_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None,
            "achieved_gflop_per_s": round(work / 1e9, 2),
            "matmul_peak_fraction": round(work / (self.matmul_peak["gflop_per_s"] * 1e9), 4),
            "mfu": round(work / (self.peak * 1e12), 4) if self.peak else None,
            "warm_up_s": warm_up_s,
        }

    def pytorch_rows(self, batch: int) -> None:
        """Our scorer; with the reference check, also ours with the authors' B3 on (what the reference computes)."""
        config = self.config
        if "pytorch" not in config.engines:
            return
        planned = self.probe.planned_evaluations(config.images, self.pairs)
        self.measure(
            "pytorch",
            batch,
            lambda clock: self.scorer(batch, progress=clock).score(self.images, self.captions),
            self.warm_up(batch),
            planned,
        )
        if config.check and "reference" in config.engines and not self.scoring.uncond_in_attention:
            b3 = self.scoring.replace(uncond_in_attention=True)
            planned = self.scorer(1, b3).planned_evaluations(config.images, self.pairs)
            self.measure(
                "pytorch (B3 on)",
                batch,
                lambda clock: self.scorer(batch, b3, progress=clock).score(self.images, self.captions),
                planned=planned,
            )

    def adaptive_row(self, batch: int) -> None:
        if "pytorch-adaptive" not in self.config.engines:
            return

        def adaptive(clock):
            engine = self.scorer(batch, progress=clock)
            ranked = engine.rank_matrix(
                self.images, self.captions, top_k=self.config.top_k, schedule=self.config.adaptive_schedule
            )
            self.rankings[batch] = ranked
            return ranked.scores

        self.measure("pytorch-adaptive", batch, adaptive, self.warm_up(batch))

    def compiled_row(self, batch: int) -> None:
        from ..pytorch.acceleration import Acceleration, release_compiled, set_channels_last

        if "pytorch-compiled" not in self.config.engines:
            return
        acceleration = Acceleration(compile=self.config.compile_mode)

        def compiled_warm_up():
            # Compiles (one static shape per batch size). Three batches, each by a fresh scorer so nothing is
            # cached: CUDA-graph trees run a shape eagerly once, record it on the second call and replay from the
            # third.
            for _ in range(3):
                self.warm_up(batch, acceleration=acceleration)()

        self.measure(
            "pytorch-compiled",
            batch,
            lambda clock: self.scorer(batch, progress=clock, acceleration=acceleration).score(
                self.images, self.captions
            ),
            compiled_warm_up,
            self.probe.planned_evaluations(self.config.images, self.pairs),
        )
        # The engines measured after this one run as they would alone: contiguous weights, and no compiled code or
        # CUDA-graph memory pool held (it would count in their peak device memory).
        set_channels_last(self.model, False)
        release_compiled(self.model)

    def bundle_rows(self, batch: int) -> None:
        discffusion = self.scoring.timesteps.value == "discffusion"

        def matcher(backend: str, batch: int, num_timesteps: int | None, progress=None):
            knobs = {} if not discffusion else {"num_timesteps": num_timesteps}
            return Matcher.from_bundle(
                self.config.bundle,
                backend=backend,
                device="cuda" if self.cuda else "cpu",
                batch_size=batch,
                overrides=knobs,
                progress=progress,
            )

        def runtime(clock, backend):
            with matcher(backend, batch, self.config.timesteps, clock) as engine:
                return engine.score(self.images, self.captions)

        def runtime_warm_up(backend):
            with matcher(backend, batch, 1) as engine:
                engine.score(self.images[:1], self.captions[:1])

        for backend in (e for e in BUNDLE_ENGINES if e in self.config.engines):
            self.measure(
                backend,
                batch,
                functools.partial(runtime, backend=backend),
                functools.partial(runtime_warm_up, backend=backend),
            )

    def reference_row(self) -> None:
        """The authors' cost structure (with B3 on when checking, so it reproduces our B3 row's scores)."""
        from ..pytorch.reference import reference_scores

        if "reference" not in self.config.engines:
            return
        reference_config = self.scoring.replace(uncond_in_attention=True) if self.config.check else self.scoring
        warm = self.warm_scoring.replace(uncond_in_attention=reference_config.uncond_in_attention)
        self.measure(
            "reference",
            2,
            lambda clock: reference_scores(
                self.scorer(2, reference_config), self.images, self.captions, progress=clock
            ),
            planned=2 * self.pairs * len(self.probe.timesteps),  # both halves of every pair and timestep
            warm_up=lambda: reference_scores(self.scorer(2, warm), self.images[:1], self.captions[:1]),
        )

    def record(self, load_s: float | None, strict: bool) -> dict[str, Any]:
        import torch

        from ..runtime.version import __version__

        config, model = self.config, self.model
        record = {
            "benchmark": "dsdkit bench",
            "date": datetime.date.today().isoformat(),
            "machine": _machine(torch, self.cuda, model.device),
            "versions": {"dsdkit": __version__, "python": sys.version.split()[0], "torch": torch.__version__},
            "config": dataclasses.asdict(config),
            "model": {
                "source": str(config.model or f"random-weight {config.size}"),
                "resolution": self.probe.resolution,
                "unet_parameters": int(sum(p.numel() for p in model.unet.parameters())),
                "load_s": load_s,
            },
            "unet_gflops_per_evaluation": round(self.flops / 1e9, 3),
            "unet_gflops_attention_scores": round(self.flop_counts["attention_scores"] / 1e9, 3),
            "device_dense_peak_tflops": self.peak,
            "matmul_peak": self.matmul_peak,
            "pairs": self.pairs,
            "rows": self.rows,
        }
        record.update(_ratios(self.rows, self.results, config, strict))
        if self.rankings:
            record["adaptive"] = _adaptive_summary(self.rankings, self.results, self.rows, config)
        best: dict[str, dict] = {}
        for row in self.rows:
            if row["engine"] not in best or row["pairs_per_s"] > best[row["engine"]]["pairs_per_s"]:
                best[row["engine"]] = row
        record["best_batch"] = {engine: row["batch"] for engine, row in best.items()}
        return record


def _machine(torch, cuda: bool, device) -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _compiled_parity(results, config: BenchConfig, strict: bool = True) -> dict[str, Any] | None:
    """Compiled vs eager scores at each batch size both ran, against the export's parity gate for the precision
    (beyond it: :class:`ParityError`, or with ``strict=False`` a record with ``"ok": False`` and the message)."""
    pairs = [
        (results[("pytorch-compiled", b)], results[("pytorch", b)])
        for e, b in results
        if e == "pytorch-compiled" and ("pytorch", b) in results
    ]
    if not pairs:
        return None
    atol, rtol = ACCELERATION_TOLERANCE[config.dtype]
    diff = max(float(np.abs(c - e).max()) for c, e in pairs)
    excess = max(float((np.abs(c - e) - (atol + rtol * np.abs(e))).max()) for c, e in pairs)
    out = {"max_abs_diff": diff, "atol": atol, "rtol": rtol, "ok": excess <= 0}
    if excess > 0:
        message = (
            f"bench: compiled and eager scores differ by up to {diff:.3g}, beyond the parity gate "
            f"{atol:g} + {rtol:g}*|score| for {config.dtype}: torch.compile changed the computation "
            "here; score without --compile and report your torch version"
        )
        if strict:
            raise ParityError(message)
        out["error"] = message
    return out


def _ratios(rows, results, config: BenchConfig, strict: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    parity = _compiled_parity(results, config, strict)
    if parity is not None:
        out["compiled_vs_eager"] = parity
    reference = next((r for r in rows if r["engine"] == "reference"), None)
    if reference is None:
        return out
    b3 = [key for key in results if key[0] == "pytorch (B3 on)"]
    if b3:
        diff = float(np.abs(results[b3[0]] - results[("reference", 2)]).max())
        out["agreement"] = {"max_abs_diff": diff, "tolerance": AGREEMENT_TOLERANCE, "ok": diff <= AGREEMENT_TOLERANCE}
        if diff > AGREEMENT_TOLERANCE:
            # The tolerance is an fp32 one: at half precision rounding alone can exceed it, which is not a bug.
            hint = (
                "at fp32 this is a dsdkit bug: report it with the bench config and your torch and diffusers versions"
                if config.dtype == "fp32"
                else f"the tolerance is for fp32, so at {config.dtype} this may be rounding: rerun with --dtype fp32"
            )
            disagree = (
                f"bench: the reference DSD computation (dsdkit/reference.py) and our scorer with the same config "
                f"(B3 on) disagree by up to {diff:.3g} > {AGREEMENT_TOLERANCE:g}"
            )
            if strict:
                raise ParityError(
                    f"{disagree}: they do not compute the same scores, so no speed ratios are reported (they would "
                    f"compare different computations); {hint}"
                )
            # Kept, not raised: the ratios below are reported with the disagreement beside them.
            out["agreement"]["error"] = f"{disagree}; the ratios are reported beside it; {hint}"
    out["ratios_vs_reference"] = {
        f"{r['engine']} batch {r['batch']}": round(r["pairs_per_s"] / reference["pairs_per_s"], 3)
        for r in rows
        if r["engine"] != "reference"
    }
    return out


def _adaptive_summary(rankings, results, rows, config: BenchConfig) -> dict[str, Any]:
    """The pytorch-adaptive engine against exhaustive scoring (the pytorch engine at the same batch, when measured):
    evaluations spent, top-1 agreement, the survivors' largest difference from their exhaustive scores, speed."""
    out: dict[str, Any] = {"schedule": config.adaptive_schedule, "top_k": config.top_k, "batches": {}}
    seconds = {(r["engine"], r["batch"]): r["seconds"] for r in rows}
    for batch, ranked in rankings.items():
        entry: dict[str, Any] = {"evaluations": ranked.evaluations, "exact_pairs": int(ranked.exact.sum())}
        spent = ranked.evaluations["conditional"] + ranked.evaluations["unconditional"]
        exhaustive = ranked.evaluations["exhaustive_conditional"] + ranked.evaluations["exhaustive_unconditional"]
        entry["evaluation_ratio"] = round(exhaustive / max(spent, 1), 3)
        full = results.get(("pytorch", batch))
        if full is not None:
            top = np.array([order[0] for order in ranked.top(1)])
            entry["top1_agreement_with_exhaustive"] = float((top == np.argmax(full, axis=1)).mean())
            entry["exact_max_abs_diff"] = float(np.abs(ranked.scores - full)[ranked.exact].max())
            entry["speed_ratio_vs_exhaustive"] = round(
                seconds[("pytorch", batch)] / seconds[("pytorch-adaptive", batch)], 3
            )
        out["batches"][str(batch)] = entry
    return out


def format_record(record: dict[str, Any]) -> str:
    """A readable table of one record."""
    lines = [
        f"model {record['model']['source']} ({record['model']['unet_parameters']:,} UNet params, "
        f"{record['model']['resolution']} px), {record['config']['preset']} S={record['config']['timesteps']} "
        f"denoise {'on' if record['config']['denoise'] else 'off'}, {record['config']['images']}x"
        f"{record['config']['captions']} pairs, {record['config']['device']} {record['config']['dtype']}; "
        f"UNet {record['unet_gflops_per_evaluation']:.4g} GFLOP/evaluation (counted; "
        f"{record['unet_gflops_attention_scores']:.4g} of them in attention QKᵀ/PV products)",
        f"{'engine':<18}{'batch':>6}{'seconds':>10}{'pairs/s':>11}{'evals/s':>10}{'ms/batch':>10}{'GFLOP/s':>10}"
        f"{'of GEMM':>9}{'ratio':>8}" + ("   MFU" if record.get("device_dense_peak_tflops") else ""),
    ]
    ratios = record.get("ratios_vs_reference", {})
    for row in record["rows"]:
        ratio = ratios.get(f"{row['engine']} batch {row['batch']}", 1.0 if row["engine"] == "reference" else None)
        fraction = row.get("matmul_peak_fraction")  # absent from records older than the measured peak
        lines.append(
            f"{row['engine']:<18}{row['batch']:>6}{row['seconds']:>10.2f}{row['pairs_per_s']:>11.4g}"
            f"{row['evaluations_per_s']:>10.4g}{(row['latency_per_batch_ms'] or 0):>10.1f}"
            f"{row.get('achieved_gflop_per_s', 0):>10.4g}{'' if fraction is None else f'{fraction:.1%}':>9}"
            f"{'' if ratio is None else f'{ratio:.2f}x':>8}" + (f"  {row['mfu']:.1%}" if row.get("mfu") else "")
        )
    peak = record.get("matmul_peak")
    if peak:
        lines.append(
            f"of GEMM: the UNet's counted FLOP rate over the matrix-multiply peak measured in this run, "
            f"{peak['gflop_per_s']:.4g} GFLOP/s ({peak['dtype']} {'x'.join(map(str, peak['shape']))}, median of "
            f"{peak['repeats']}, {peak['threads']} threads)"
        )
    if len(record["config"]["batch_sizes"]) > 1 and record.get("best_batch"):
        lines.append(
            "best batch: "
            + ", ".join(f"{engine} {batch}" for engine, batch in record["best_batch"].items() if engine != "reference")
        )
    if "compiled_vs_eager" in record:
        parity = record["compiled_vs_eager"]
        lines.append(
            f"pytorch-compiled vs pytorch: max abs diff {parity['max_abs_diff']:.2g} "
            f"(gate {parity['atol']:g} + {parity['rtol']:g}*|score|); compile/warm-up "
            + ", ".join(
                f"{row['warm_up_s']:.0f} s at batch {row['batch']}"
                for row in record["rows"]
                if row["engine"] == "pytorch-compiled"
            )
        )
    if "agreement" in record:
        lines.append(
            f"reference vs pytorch (B3 on): max abs diff {record['agreement']['max_abs_diff']:.2g} "
            f"(tolerance {record['agreement']['tolerance']:g})"
        )
    for batch, entry in record.get("adaptive", {}).get("batches", {}).items():
        line = (
            f"pytorch-adaptive ({record['adaptive']['schedule']}, top {record['adaptive']['top_k']} exact) batch "
            f"{batch}: {entry['evaluation_ratio']:.2f}x fewer UNet evaluations"
        )
        if "top1_agreement_with_exhaustive" in entry:
            line += (
                f", {entry['speed_ratio_vs_exhaustive']:.2f}x faster than pytorch, top-1 agreement "
                f"{entry['top1_agreement_with_exhaustive']:.0%}, exact scores within {entry['exact_max_abs_diff']:.2g}"
            )
        lines.append(line)
    return "\n".join(lines)
