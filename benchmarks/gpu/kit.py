"""The GPU measurement kit: in one run within a deadline, what the README's performance table needs from a GPU.

    bash benchmarks/gpu/run.sh                                # on the GPU machine: installs the wheelhouse, runs this
    python benchmarks/gpu/kit.py --micro --out-dir /tmp/kit   # CI's smoke run: micro size on the CPU, about a minute

Sections, in the order they run (``benchmarks/gpu/README.md`` says how to read the JSON):

``machine``
    device, compute capability, torch / CUDA / driver versions, the packages used and where each came from, the
    TF32 switches; the matrix-multiply peak measured per precision (:func:`dsdkit.jobs.bench.measure_matmul_peak`).
``model``
    the full-size SD2-2.1-base architecture with random weights (:func:`dsdkit.pytorch.tiny.write_tiny_model`).
``eager-P``
    the eager scorer with its UNet in precision P over a batch sweep at S = 30: ``dsdkit bench`` rows
    (:func:`dsdkit.jobs.bench.run_bench` on the model loaded once), with evaluations/s, pairs/s, the counted GFLOP per
    evaluation, MFU against the datasheet peak and the fraction of the GEMM peak measured in ``machine``.
``reference-P``
    the authors' cost structure (:mod:`dsdkit.pytorch.reference`) at S = 30 on a small job beside our scorer (and
    ours with their B3 switched on, whose scores the reference must reproduce: their agreement is recorded).
``compiled-P``
    ``torch.compile`` with CUDA graphs (:mod:`dsdkit.pytorch.acceleration`, mode ``auto``) at P's best eager batch,
    beside an eager row at that batch, with the compiled-vs-eager parity gate's verdict.
``demo-precision``
    the trained demo model: fp16 and bf16 against fp32, top-1 agreement over the world benchmark's rank-8 items.
``adaptive``
    the demo model: adaptive ranking (:mod:`dsdkit.runtime.adaptive`) against exhaustive scoring of the same items,
    in UNet evaluations, seconds and top-1 agreement.

Order. The sections run by priority: the machine, the model, both precisions' eager sweeps and their references
(cheap, and every ratio needs its reference), one precision compiled, the demo model's two sections (cheap), then the
other precision compiled. Compiling is last because it is the one cost nobody can predict well (minutes of cold
inductor compilation per precision): run before the cheap sections it could crowd them all out, run after them it
takes whatever time is left.

Deadline. Before each section, and between the batch sizes of a sweep, the time left is checked against an estimate
(:data:`FULL` / :data:`MICRO`'s ``estimates``, refined from what this run has already measured); what does not fit
is recorded as skipped with the reason (``deadline: 41 s left, needs ~90 s``), as is what this machine cannot run
(fp16 or CUDA graphs on a CPU). A section that raises is recorded with its error on one line, and the kit goes on.
The JSON is rewritten after every section, and should a section still run when the deadline comes, a watchdog
records it as cut and writes the file before the process ends: there is always a JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # the deadline counts from here: imports and the model's writing are part of the run
ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine is offline: nothing may try the hub

logger = logging.getLogger("gpu_kit")


@dataclass(frozen=True)
class Plan:
    """What one kit run measures, and how long each part is expected to take.

    ``estimates`` (seconds) are planning figures for the deadline checks, not results: the first GPU run replaces
    them with its own measured ``seconds`` per section, and within a run later checks use what was measured so far.
    """

    mode: str
    device: str
    size: str  # write_tiny_model's size of the "full-size" sections
    precisions: tuple[str, ...]
    timesteps: int
    images: int  # the sweep's and the compiled rows' job
    captions: int
    batch_sizes: tuple[int, ...]
    reference_images: int  # the reference's small job
    reference_captions: int
    demo_items: int  # rank-8 items of the world benchmark
    demo_timesteps: int
    demo_batch: int
    matmul_size: int | None  # None: dsdkit.jobs.bench's default for the device (8192 on a GPU)
    margin_s: float  # kept free at the end for writing the JSON and the summary
    estimates: dict[str, float] = field(default_factory=dict)


FULL = Plan(
    mode="full",
    device="cuda",
    size="full",
    precisions=("bf16", "fp16"),
    timesteps=30,
    images=4,
    captions=8,
    batch_sizes=(8, 16, 32, 64, 128),
    reference_images=2,
    reference_captions=2,
    demo_items=200,
    demo_timesteps=30,
    demo_batch=256,
    matmul_size=None,
    margin_s=5.0,
    # H100/H200 with 16 CPU cores, guessed before any such run: the model is 1.3 G random parameters initialised and
    # written on the CPU (about 5 GB); an eager row 960 UNet evaluations at 100-400 per second; compiled = a cold
    # inductor compile of the scoring UNet (1-2 min) plus an eager and a compiled row.
    estimates={
        "machine": 20,
        "model": 90,
        "load": 20,
        "eager_row": 15,
        "reference": 30,
        "compiled": 150,
        "demo_load": 10,
        "demo_run": 20,
        "adaptive": 30,
    },
)
MICRO = Plan(
    mode="micro",
    device="cpu",
    size="micro",
    precisions=("fp32", "fp16"),
    timesteps=4,
    images=2,
    captions=2,
    batch_sizes=(2, 4),
    reference_images=1,
    reference_captions=2,
    demo_items=6,
    demo_timesteps=10,  # the default adaptive schedule's stages need more than 4 timesteps
    demo_batch=32,
    matmul_size=1024,
    margin_s=2.0,
    # One busy CPU core (CI), measured on the 2-core VM.
    estimates={
        "machine": 5,
        "model": 8,
        "load": 3,
        "eager_row": 3,
        "reference": 8,
        "compiled": 150,
        "demo_load": 4,
        "demo_run": 4,
        "adaptive": 6,
    },
)


def section_order(plan: Plan) -> list[tuple[str, str | None]]:
    """``(kind, precision)`` of every section, in the order they run (see the module doc)."""
    first, *others = plan.precisions
    return (
        [("machine", None), ("model", None)]
        + [("eager", p) for p in plan.precisions]
        + [("reference", p) for p in plan.precisions]
        + [("compiled", first), ("demo-precision", None), ("adaptive", None)]
        + [("compiled", p) for p in others]
    )


def section_name(kind: str, precision: str | None) -> str:
    return kind if precision is None else f"{kind}-{precision}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:400] if text else ''}".rstrip(": ")


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, paths, tuples: what the records hold besides JSON's own types."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


class Kit:
    """One run: the sections, the deadline, the record and its file (see the module doc)."""

    def __init__(
        self,
        plan: Plan,
        deadline_s: float,
        out_dir: Path,
        model_dir: Path | None,
        compile_mode: str | None,
        only: set[str] | None,
    ):
        self.plan = plan
        self.deadline_s = float(deadline_s)
        self.out_dir = out_dir
        self.model_dir = model_dir
        self.compile_mode = compile_mode
        self.only = only
        self.lock = threading.RLock()
        self.done = False
        self.models: dict[tuple[str, str], Any] = {}
        self.matmul: dict[str, dict] = {}
        self.best_batch: dict[str, int] = {}
        self.measured: dict[str, float] = {}  # refined estimates, from this run
        self.demo: dict[str, Any] = {}
        self.folder: Path | None = None  # the full-size model, once the model section has it
        self._scratch: tempfile.TemporaryDirectory | None = None
        # Known once torch is imported (identify_device): until then a record written at the deadline says so.
        self.cuda, self.device_name, self.torch_version = False, "unknown", None
        today = datetime.date.today().isoformat()
        self.record: dict[str, Any] = {
            "benchmark": "dsdkit gpu kit",
            "mode": plan.mode,
            "device": self.device_name,
            "date": today,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "deadline_s": self.deadline_s,
            "command": " ".join(["python", "benchmarks/gpu/kit.py", *sys.argv[1:]]),
            "plan": dataclasses.asdict(plan),
            "sections": {section_name(kind, p): {"status": "pending"} for kind, p in section_order(plan)},
            "skipped": [],
            "errors": [],
        }

    def identify_device(self) -> None:
        """Import torch and name the device (the record's file is named after it)."""
        try:
            import torch
        except Exception as error:  # noqa: BLE001 - recorded: the kit still writes its JSON
            self.error("import torch", error)
            self.device_name = "no-torch"
        else:
            self.cuda = self.plan.device == "cuda" and torch.cuda.is_available()
            self.device_name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
            self.torch_version = torch.__version__
        with self.lock:
            self.record["device"] = self.device_name

    @property
    def path(self) -> Path:
        name = slug(self.device_name) + ("-micro" if self.plan.mode == "micro" else "")
        return self.out_dir / f"gpu-kit-{name}-{self.record['date']}.json"

    # -- time -----------------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def deadline_reason(self, needs: float) -> str | None:
        """Why something needing ``needs`` seconds cannot start now, or None when it fits."""
        left = self.left()
        if left - self.plan.margin_s < needs:
            return f"deadline: {max(left, 0):.0f} s left, needs ~{needs:.0f} s"
        return None

    def estimate(self, key: str) -> float:
        return self.measured.get(key, self.plan.estimates[key])

    # -- the record -----------------------------------------------------------------------------------------------

    def skip(self, what: str, reason: str) -> None:
        logger.info("skipped %s: %s", what, reason)
        with self.lock:
            self.record["skipped"].append({"what": what, "reason": reason})

    def error(self, what: str, error: BaseException) -> str:
        line = one_line(error)
        logger.error("%s failed: %s", what, line, exc_info=error)
        with self.lock:
            self.record["errors"].append({"what": what, "error": line})
        return line

    def write(self) -> Path:
        """Write the record (atomically: a reader, or a kill, never sees half a file)."""
        with self.lock:
            self.record["wall_s"] = round(self.elapsed(), 1)
            self.record["table"] = table(self.record)
            text = json.dumps(self.record, indent=1, default=_jsonable) + "\n"
        path = self.path
        self.out_dir.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, path)
        return path

    def cut(self, cause: str) -> None:
        """``cause`` (the deadline, a signal) ends the run: the section running is recorded as cut, those not
        started as skipped; the record is written and the summary printed, then the process ends."""
        with self.lock:
            if self.done:
                return
            self.done = True
            for name, entry in self.record["sections"].items():
                if entry["status"] == "running":
                    why = f"cut: {cause} while it ran"
                    entry.update(status="cut", reason=why, seconds=round(self.elapsed() - entry["started_at_s"], 1))
                elif entry["status"] == "pending":
                    why = f"not started: {cause} first"
                    entry.update(status="skipped", reason=why)
                else:
                    continue
                self.record["skipped"].append({"what": name, "reason": why})
        path = self.write()
        print(summary(self.record, path), flush=True)
        logging.shutdown()
        os._exit(0)

    def watch(self) -> None:
        """A daemon thread that cuts the run at the deadline (the kit promises to end by then)."""

        def wait() -> None:
            time.sleep(max(0.0, self.left() - 0.5))
            self.cut(f"the deadline ({self.deadline_s:.0f} s) passed")

        threading.Thread(target=wait, name="deadline", daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: self.cut("the run was terminated (SIGTERM)"))

    # -- sections -------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        self.write()
        for kind, precision in section_order(self.plan):
            self.section(kind, precision)
        with self.lock:
            self.done = True
        return self.write()

    def section(self, kind: str, precision: str | None) -> None:
        name = section_name(kind, precision)
        entry = self.record["sections"][name]
        function, estimate, requires = self._spec(kind, precision)
        reason = None
        if self.only is not None and not self._wanted(kind, precision):
            reason = "not asked for (--only)"
        for needed in requires if reason is None else ():
            status = self.record["sections"].get(needed, {}).get("status")
            if status != "done":
                reason = f"needs section {needed} ({status})"
                break
        reason = reason or self.unavailable(kind, precision) or self.deadline_reason(estimate)
        if reason is not None:
            with self.lock:
                entry.update(status="skipped", reason=reason, estimate_s=round(estimate))
            self.skip(name, reason)
            self.write()
            return
        logger.info("section %s (~%.0f s of %.0f s left)", name, estimate, self.left())
        with self.lock:
            entry.update(status="running", started_at_s=round(self.elapsed(), 1), estimate_s=round(estimate))
        self.write()
        begin = time.monotonic()
        try:
            result = function(precision) if precision is not None else function()
            with self.lock:
                entry.update(status="done", result=result)
        except Exception as error:  # noqa: BLE001 - one section's failure is recorded; the others still run
            line = self.error(name, error)
            with self.lock:
                entry.update(status="error", error=line)
        finally:
            self._free_device_memory()
        with self.lock:
            entry["seconds"] = round(time.monotonic() - begin, 1)
        self.write()

    def _wanted(self, kind: str, precision: str | None) -> bool:
        """Whether ``--only`` asks for this section, for a section that needs it, or it is ``machine`` (every
        section reads its GEMM peak)."""
        name = section_name(kind, precision)
        if kind == "machine" or name in self.only or kind in self.only:
            return True
        return any(
            name in self._spec(k, p)[2] and self._wanted(k, p)
            for k, p in section_order(self.plan)
            if section_name(k, p) != name
        )

    def _spec(self, kind: str, precision: str | None) -> tuple[Callable, float, tuple[str, ...]]:
        """``(function, estimated seconds, sections it needs)`` of a section."""
        if kind == "machine":
            return self.machine, self.estimate("machine"), ()
        if kind == "model":
            return self.write_model, self.estimate("model"), ()
        load = 0.0 if (str(self.folder), precision) in self.models else self.estimate("load")
        if kind == "eager":
            return self.eager, load + self.estimate("eager_row"), ("model",)
        if kind == "reference":
            return self.reference, load + self.estimate("reference"), ("model",)
        if kind == "compiled":
            return self.compiled, load + self.estimate("compiled"), ("model",)
        demo_load = 0.0 if ("demo", "fp32") in self.models else self.estimate("demo_load")
        if kind == "demo-precision":  # fp32, then one half precision at least
            return self.demo_precision, demo_load + self.estimate("demo_load") + 2 * self.estimate("demo_run"), ()
        return self.adaptive, demo_load + self.estimate("adaptive"), ()

    def unavailable(self, kind: str, precision: str | None) -> str | None:
        """Why this machine cannot run a section at all (not a matter of time), or None."""
        if self.torch_version is None:
            return "torch does not import"
        if self.plan.device == "cuda" and not self.cuda and kind != "machine":
            return f"torch {self.torch_version} sees no CUDA GPU (--micro runs on the CPU)"
        if precision == "fp16" and not self.cuda:
            return "fp16 needs a CUDA GPU (dsdkit refuses fp16 on the CPU: its kernels are slow or missing there)"
        if kind == "compiled" and not self.cuda and self.compile_mode is None:
            return (
                "CUDA graphs need a CUDA GPU (compile mode auto is reduce-overhead there); --compile-mode default "
                "compiles on the CPU instead (minutes)"
            )
        if kind == "adaptive":
            try:
                import dsdkit.runtime.adaptive  # noqa: F401
            except ImportError as error:
                return f"dsdkit.runtime.adaptive not available ({one_line(error)})"
        return None

    def _free_device_memory(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def machine(self) -> dict[str, Any]:
        import platform

        import torch

        import dsdkit
        from dsdkit.jobs.bench import measure_matmul_peak

        sys.path.insert(0, str(BENCHMARKS))
        from machine import machine

        info: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "dsdkit": dsdkit.__version__,
            "dsdkit_from": str(Path(dsdkit.__file__).parent),  # run.sh's layout, or an install
            "packages": _packages(),
            **machine(torch_threads=torch.get_num_threads()),
        }
        if self.cuda:
            properties = torch.cuda.get_device_properties(0)
            info.update(
                device=self.device_name,
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                multiprocessors=properties.multi_processor_count,
                memory_gib=round(properties.total_memory / 2**30, 1),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                driver=_driver_version(),
                tf32={
                    "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                    "cudnn": bool(torch.backends.cudnn.allow_tf32),
                },
            )
        peaks = {}
        for precision in self.plan.precisions:
            reason = self.unavailable("eager", precision)  # a peak only for what the other sections can run
            if reason is not None:
                self.skip(f"machine: {precision} GEMM peak", reason)
                continue
            device = "cuda" if self.cuda else "cpu"
            peaks[precision] = measure_matmul_peak(device, precision, size=self.plan.matmul_size)
        self.matmul.update(peaks)
        info["matmul_peak"] = peaks
        return info

    def write_model(self) -> dict[str, Any]:
        from dsdkit.pytorch.models import TEST_MODEL_MARKER
        from dsdkit.pytorch.tiny import write_tiny_model

        folder = self.model_dir
        if folder is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="dsdkit-kit-")
            folder = Path(self._scratch.name) / f"sd2-{self.plan.size}"
        marker = folder / TEST_MODEL_MARKER
        reused = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("size") == self.plan.size
        if not reused:
            write_tiny_model(folder, size=self.plan.size, overwrite=True)
        self.folder = folder
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return {"size": self.plan.size, "folder": str(folder), "reused": reused, "gb_on_disk": round(size / 1e9, 2)}

    def model(self, precision: str, source: str | None = None):
        """The model (``source``: the full-size folder by default, or ``demo``) in ``precision``, loaded once."""
        from dsdkit.pytorch.models import load_model

        source = source or str(self.folder)
        key = (source, precision)
        if key not in self.models:
            self.models[key] = load_model(source, device="cuda" if self.cuda else "cpu", dtype=precision)
        return self.models[key]

    def _bench(self, precision: str, engines: list[str], batch: int, images: int, captions: int, **knobs):
        """One ``dsdkit bench`` job on the loaded full-size model (its record), checks recorded, never raised."""
        from dsdkit.jobs.bench import BenchConfig, run_bench

        config = BenchConfig(
            model=str(self.folder),
            size=self.plan.size,
            timesteps=self.plan.timesteps,
            images=images,
            captions=captions,
            batch_sizes=[batch],
            engines=engines,
            device="cuda" if self.cuda else "cpu",
            dtype=precision,
            **knobs,
        )
        return run_bench(config, model=self.model(precision), matmul_peak=self.matmul.get(precision), strict=False)

    def _load(self, precision: str) -> float | None:
        """Load the full-size model in ``precision`` (timed when it was not loaded yet)."""
        if (str(self.folder), precision) in self.models:
            return None
        begin = time.monotonic()
        self.model(precision)
        seconds = time.monotonic() - begin
        self.measured["load"] = seconds
        return round(seconds, 1)

    def eager(self, precision: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "precision": precision,
            "job": {"images": self.plan.images, "captions": self.plan.captions, "timesteps": self.plan.timesteps},
            "load_s": self._load(precision),
            "rows": [],
        }
        for batch in self.plan.batch_sizes:
            reason = self.deadline_reason(self.estimate("eager_row")) if out["rows"] else None
            if reason is not None:
                self.skip(f"eager-{precision} batch {batch}", reason)
                continue
            begin = time.monotonic()
            try:
                record = self._bench(precision, ["pytorch"], batch, self.plan.images, self.plan.captions, check=False)
            except Exception as error:  # noqa: BLE001 - a batch that fails (out of memory, say) ends the sweep
                out.setdefault("failed", []).append({"batch": batch, "error": self.error(f"eager-{precision}", error)})
                break
            # The next row runs as many evaluations in larger batches: this one's time is a safe estimate.
            self.measured["eager_row"] = 1.2 * (time.monotonic() - begin) + 1
            for key in ("unet_gflops_per_evaluation", "unet_gflops_attention_scores", "device_dense_peak_tflops"):
                out[key] = record[key]
            out["matmul_peak"] = record["matmul_peak"]
            out["unet_parameters"] = record["model"]["unet_parameters"]
            out["rows"].append(record["rows"][0])
        if out["rows"]:
            best = max(out["rows"], key=lambda row: row["pairs_per_s"])
            out["best_batch"] = self.best_batch[precision] = best["batch"]
        return out

    def reference(self, precision: str) -> dict[str, Any]:
        batch = self.best_batch.get(precision, self.plan.batch_sizes[0])
        load_s = self._load(precision)
        begin = time.monotonic()
        record = self._bench(
            precision,
            ["pytorch", "reference"],
            batch,
            self.plan.reference_images,
            self.plan.reference_captions,
            check=True,
        )
        self.measured["reference"] = 1.1 * (time.monotonic() - begin)
        rows = record["rows"]
        reference = next(r for r in rows if r["engine"] == "reference")
        return {
            "precision": precision,
            "job": {
                "images": self.plan.reference_images,
                "captions": self.plan.reference_captions,
                "timesteps": self.plan.timesteps,
            },
            "batch": batch,
            "load_s": load_s,
            "rows": rows,
            "reference_pairs_per_s": reference["pairs_per_s"],
            "agreement": record.get("agreement"),
            "ratios_vs_reference": record.get("ratios_vs_reference"),
        }

    def compiled(self, precision: str) -> dict[str, Any]:
        batch = self.best_batch.get(precision, self.plan.batch_sizes[0])
        load_s = self._load(precision)
        begin = time.monotonic()
        record = self._bench(
            precision,
            ["pytorch", "pytorch-compiled"],
            batch,
            self.plan.images,
            self.plan.captions,
            check=False,
            compile_mode=self.compile_mode or "auto",
        )
        self.measured["compiled"] = 1.1 * (time.monotonic() - begin)  # the next precision compiles as long
        return {
            "precision": precision,
            "compile_mode": self.compile_mode or "auto",
            "batch": batch,
            "load_s": load_s,
            "rows": record["rows"],
            "compiled_vs_eager": record.get("compiled_vs_eager"),
        }

    def _demo_examples(self):
        if "examples" not in self.demo:
            from dsdkit import world
            from dsdkit.jobs.datasets import items_to_examples

            items = world.benchmark_items(per_subset=self.plan.demo_items, subsets=("rank-8",))
            self.demo["examples"] = items_to_examples(items)
        return self.demo["examples"]

    def _demo_scores(self, precision: str) -> tuple[list, float, float | None]:
        """Exhaustive scores of every rank-8 item on the demo model in ``precision``: (matrices, seconds, load s)."""
        from dsdkit.runtime.config import ScoringConfig

        from dsdkit.jobs.evaluation import score_examples
        from dsdkit.pytorch.scorer import Scorer

        begin = time.monotonic()
        loaded = ("demo", precision) in self.models
        model = self.model(precision, "demo")
        load_s = None if loaded else time.monotonic() - begin
        if load_s is not None:
            self.measured["demo_load"] = load_s + 1
        config = ScoringConfig.from_preset("discffusion", num_timesteps=self.plan.demo_timesteps)
        begin = time.monotonic()
        scores = score_examples(Scorer(model, config, batch_size=self.plan.demo_batch), self._demo_examples())
        seconds = time.monotonic() - begin
        self.measured["demo_run"] = 1.5 * seconds + 1
        return scores, round(seconds, 2), None if load_s is None else round(load_s, 1)

    def demo_precision(self) -> dict[str, Any]:
        sys.path.insert(0, str(BENCHMARKS))
        from world_table import compare

        examples = self._demo_examples()
        fp32, seconds, load_s = self._demo_scores("fp32")
        self.demo["fp32"] = fp32
        out: dict[str, Any] = {
            "items": len(examples),
            "subset": "rank-8",
            "timesteps": self.plan.demo_timesteps,
            "fp32": {"score_s": seconds, "load_s": load_s, "top1_accuracy": _accuracy(examples, fp32)},
        }
        for precision in ("fp16", "bf16"):
            reason = self.unavailable("demo", precision) or self.deadline_reason(
                self.estimate("demo_load") + self.estimate("demo_run")
            )
            if reason is not None:
                self.skip(f"demo-precision {precision}", reason)
                out[precision] = {"skipped": reason}
                continue
            scores, seconds, load_s = self._demo_scores(precision)
            out[precision] = {
                "score_s": seconds,
                "load_s": load_s,
                "top1_accuracy": _accuracy(examples, scores),
                "vs_fp32": compare(fp32, scores),
            }
        return out

    def adaptive(self) -> dict[str, Any]:
        import numpy as np
        from dsdkit.runtime.adaptive import rank_matrix
        from dsdkit.runtime.config import ScoringConfig

        from dsdkit.pytorch.scorer import Scorer

        examples = self._demo_examples()
        model = self.model("fp32", "demo")
        config = ScoringConfig.from_preset("discffusion", num_timesteps=self.plan.demo_timesteps)
        images = [example.images[0] for example in examples]
        texts = [text for example in examples for text in example.texts]
        starts = np.cumsum([0] + [len(example.texts) for example in examples[:-1]])
        candidates = [list(range(s, s + len(e.texts))) for s, e in zip(starts, examples, strict=True)]
        pairs = [(query, caption) for query, listed in enumerate(candidates) for caption in listed]
        # Each side on a fresh scorer (nothing cached): encodings and unconditional passes count on both, and the
        # exhaustive side scores exactly the candidates adaptive ranking starts from, in one call (full batches).
        begin = time.monotonic()
        exhaustive = Scorer(model, config, batch_size=self.plan.demo_batch).score_pairs(images, texts, pairs).scores
        exhaustive_s = time.monotonic() - begin
        begin = time.monotonic()
        scorer = Scorer(model, config, batch_size=self.plan.demo_batch)
        result = rank_matrix(scorer, images, texts, top_k=1, candidates=candidates)
        adaptive_s = time.monotonic() - begin
        offsets = np.cumsum([0] + [len(c) for c in candidates])
        best_exhaustive = [
            int(c[int(np.argmax(exhaustive[offsets[q] : offsets[q + 1]]))]) for q, c in enumerate(candidates)
        ]
        best_adaptive = [int(order[0]) for order in result.top(1)]
        positives = [int(s + e.positive) for s, e in zip(starts, examples, strict=True)]
        evaluations = {key: int(value) for key, value in result.evaluations.items()}
        spent = evaluations["conditional"] + evaluations["unconditional"]
        exhaustive_spent = evaluations["exhaustive_conditional"] + evaluations["exhaustive_unconditional"]
        return {
            "items": len(examples),
            "timesteps": self.plan.demo_timesteps,
            "precision": "fp32",
            "schedule": result.schedule,
            "evaluations": evaluations,
            "evaluation_ratio": round(exhaustive_spent / spent, 3) if spent else None,
            "adaptive_s": round(adaptive_s, 2),
            "exhaustive_s": round(exhaustive_s, 2),
            "speedup": round(exhaustive_s / adaptive_s, 3) if adaptive_s else None,
            "top1_agreement": float(np.mean(np.array(best_adaptive) == np.array(best_exhaustive))),
            "winners_exact": bool(all(result.exact[q, best_adaptive[q]] for q in range(len(examples)))),
            "top1_accuracy": {
                "adaptive": float(np.mean(np.array(best_adaptive) == np.array(positives))),
                "exhaustive": float(np.mean(np.array(best_exhaustive) == np.array(positives))),
            },
        }


def _accuracy(examples, matrices) -> float:
    """Top-1 accuracy of rank-K items: the positive caption strictly best (ties count as wrong)."""
    import numpy as np

    right = 0
    for example, matrix in zip(examples, matrices, strict=True):
        row = np.asarray(matrix)[0]
        right += int((row > row[example.positive]).sum() == 0 and (row == row[example.positive]).sum() == 1)
    return right / len(examples) if examples else math.nan


def _packages() -> dict[str, dict[str, str | None]]:
    """Version and origin of each package the kit uses: the machine's own, or the wheelhouse's (run.sh's site)."""
    from importlib import metadata

    site = os.environ.get("DSDKIT_KIT_SITE")
    out = {}
    for name in (
        "torch",
        "triton",
        "numpy",
        "diffusers",
        "transformers",
        "huggingface-hub",
        "accelerate",
        "safetensors",
        "tokenizers",
        "pillow",
    ):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out[name] = {"version": None, "from": None}
            continue
        where = str(dist.locate_file(""))
        origin = "wheelhouse" if site and where.startswith(site) else "machine"
        out[name] = {"version": dist.version, "from": origin}
    return out


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


# -- reading the record --------------------------------------------------------------------------------------------


def table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The README's performance rows from a record: every eager, compiled and reference row with its precision,
    FLOP rate, MFU, fraction of the measured GEMM peak and ratio to the reference of the same precision.

    The reference's pairs/s come from its own small job: the reference shares nothing between pairs (every pair
    pays its VAE passes and both UNet halves), so its cost per pair does not depend on the job's size."""
    sections = record["sections"]
    references = {
        entry["result"]["precision"]: entry["result"]["reference_pairs_per_s"]
        for name, entry in sections.items()
        if name.startswith("reference-") and entry.get("status") == "done"
    }
    rows = []
    for name, entry in sections.items():
        kind = name.split("-", 1)[0]
        if kind not in ("eager", "reference", "compiled") or entry.get("status") != "done":
            continue
        precision = entry["result"]["precision"]
        for row in entry["result"]["rows"]:
            if kind != "eager" and row["engine"] == "pytorch (B3 on)":
                continue
            reference = references.get(precision)
            rows.append(
                {
                    "section": name,
                    "engine": row["engine"],
                    "precision": precision,
                    "batch": row["batch"],
                    "evaluations_per_s": row["evaluations_per_s"],
                    "pairs_per_s": row["pairs_per_s"],
                    "achieved_tflop_per_s": round(row["achieved_gflop_per_s"] / 1000, 3),
                    "mfu": row.get("mfu"),
                    "matmul_peak_fraction": row.get("matmul_peak_fraction"),
                    "vs_reference": round(row["pairs_per_s"] / reference, 3) if reference else None,
                    "warm_up_s": row.get("warm_up_s"),
                }
            )
    return rows


def summary(record: dict[str, Any], path: Path | None = None) -> str:
    """One screen: the machine, the engine rows, the demo model's sections, what was skipped or failed."""
    sections = record["sections"]
    lines = [
        f"dsdkit GPU kit ({record['mode']}) on {record['device']}, {record['date']}: {record.get('wall_s', 0):.0f} s "
        f"of a {record['deadline_s']:.0f} s deadline" + (f"; {path}" if path else ""),
    ]
    machine = sections.get("machine", {}).get("result")
    if machine:
        versions = f"torch {machine['torch']}" + (
            f", CUDA {machine['cuda']}, driver {machine['driver']}, capability {machine['capability']}"
            if "cuda" in machine
            else ""
        )
        peaks = ", ".join(
            f"{p} {m['tflop_per_s']:.4g} TFLOP/s ({m['shape'][0]}³)" for p, m in machine["matmul_peak"].items()
        )
        lines.append(f"{versions}; GEMM peak measured: {peaks or 'none'}")
    eager = next((e["result"] for n, e in sections.items() if n.startswith("eager-") and e.get("result")), None)
    if eager and "unet_gflops_per_evaluation" in eager:
        lines.append(
            f"UNet {eager['unet_gflops_per_evaluation']:.4g} GFLOP per evaluation (counted), S = "
            f"{record['plan']['timesteps']}, sweep job {eager['job']['images']}x{eager['job']['captions']}"
        )
    rows = record.get("table") or table(record)
    if rows:
        lines.append(
            f"{'section':<16}{'engine':<18}{'batch':>5}{'evals/s':>10}{'pairs/s':>10}{'TFLOP/s':>9}{'of GEMM':>8}"
            f"{'MFU':>7}{'vs ref':>8}"
        )
        for row in rows:
            fraction, mfu, ratio = row["matmul_peak_fraction"], row["mfu"], row["vs_reference"]
            lines.append(
                f"{row['section']:<16}{row['engine']:<18}{row['batch']:>5}{row['evaluations_per_s']:>10.4g}"
                f"{row['pairs_per_s']:>10.4g}{row['achieved_tflop_per_s']:>9.4g}"
                f"{'' if fraction is None else f'{fraction:.1%}':>8}{'' if mfu is None else f'{mfu:.1%}':>7}"
                f"{'' if ratio is None else f'{ratio:.2f}x':>8}"
            )
    for name, entry in sections.items():
        result = entry.get("result") or {}
        if name.startswith("compiled-") and result.get("compiled_vs_eager"):
            parity = result["compiled_vs_eager"]
            warm = next((r["warm_up_s"] for r in result["rows"] if r["engine"] == "pytorch-compiled"), None)
            lines.append(
                f"{name}: compile warm-up (untimed) {warm} s; vs eager max abs diff {parity['max_abs_diff']:.2g} "
                f"({'within' if parity['ok'] else 'BEYOND'} the gate)"
            )
        if name.startswith("reference-") and result.get("agreement"):
            agreement = result["agreement"]
            lines.append(f"{name}: agreement with ours (B3 on) max abs diff {agreement['max_abs_diff']:.2g}")
    demo = sections.get("demo-precision", {}).get("result")
    if demo:
        parts = [
            f"{p} {demo[p]['vs_fp32']['top1_agreement']:.1%}" for p in ("fp16", "bf16") if "vs_fp32" in demo.get(p, {})
        ]
        lines.append(
            f"demo model, {demo['items']} rank-8 items, S = {demo['timesteps']}: top-1 agreement with fp32: "
            f"{', '.join(parts) or 'none measured'} (fp32 top-1 accuracy {demo['fp32']['top1_accuracy']:.1%})"
        )
    adaptive = sections.get("adaptive", {}).get("result")
    if adaptive:
        lines.append(
            f"adaptive vs exhaustive ({adaptive['items']} items, S = {adaptive['timesteps']}): "
            f"{adaptive['evaluation_ratio']}x fewer UNet evaluations, {adaptive['adaptive_s']} s vs "
            f"{adaptive['exhaustive_s']} s, top-1 agreement {adaptive['top1_agreement']:.1%}"
        )
    timing = ", ".join(
        f"{name} {entry['seconds']:.0f} s" for name, entry in sections.items() if entry.get("seconds") is not None
    )
    lines.append(f"sections: {timing or 'none ran'}")
    for skip in record["skipped"]:
        lines.append(f"skipped {skip['what']}: {skip['reason']}")
    for error in record["errors"]:
        lines.append(f"error in {error['what']}: {error['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro", action="store_true", help="micro size on the CPU in fp32, small counts (CI)")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds from start to the written JSON")
    parser.add_argument("--out-dir", type=Path, default=BENCHMARKS / "results")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="where the random-weight model is written (reused when a kit run left it there); default: a temporary "
        "folder removed at the end",
    )
    parser.add_argument(
        "--compile-mode",
        help="torch.compile mode of the compiled sections (default auto: CUDA graphs on a GPU; on a CPU they run "
        "only when a mode is given)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated sections or kinds (eager, compiled, ...) to run, with machine and what they need; "
        "the others are recorded as skipped",
    )
    parser.add_argument(
        "--estimate",
        action="append",
        default=[],
        metavar="KEY=SECONDS",
        help=f"replace a planning estimate (keys: {', '.join(FULL.estimates)}), e.g. from an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    plan = MICRO if args.micro else FULL
    overrides = {}
    for item in args.estimate:
        key, _, value = item.partition("=")
        if key not in plan.estimates:
            parser.error(f"--estimate {item}: the keys are {', '.join(plan.estimates)}")
        overrides[key] = float(value)
    plan = dataclasses.replace(plan, estimates={**plan.estimates, **overrides})
    only = None if args.only is None else {part.strip() for part in args.only.split(",") if part.strip()}
    kit = Kit(plan, args.deadline, args.out_dir, args.model_dir, args.compile_mode, only)
    kit.watch()
    kit.identify_device()
    path = kit.run()
    print(summary(kit.record, path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
