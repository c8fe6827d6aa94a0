"""The GPU measurement kit (benchmarks/gpu/) cannot rot: CI runs it at micro size on the CPU.

``kit.py --micro`` must write a complete JSON with finite, positive numbers; a deadline too short for its sections
must skip them with their reasons and still write it; a run terminated mid-section records that section as cut. The
wheelhouse helpers that run on the GPU machine (which wheels to install, dsdkit's layout from the checkout) are
checked here too; downloading the wheelhouse needs an index and is not.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu" / "kit.py"
WHEELHOUSE = ROOT / "benchmarks" / "gpu" / "wheelhouse.py"
DEADLINE_REASON = re.compile(r"^deadline: \d+ s left, needs ~\d+ s$")
FINAL = {"done", "skipped", "error", "cut"}


def _environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _kit(out: Path, *args: str, timeout: float = 150) -> tuple[dict, subprocess.CompletedProcess]:
    done = subprocess.run(
        [sys.executable, str(KIT), "--micro", "--out-dir", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_environment(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (path,) = out.glob("gpu-kit-*.json")
    assert path.name == f"gpu-kit-cpu-micro-{datetime.date.today().isoformat()}.json"
    return json.loads(path.read_text(encoding="utf-8")), done


def _numbers(value, where: str = ""):
    """Every number in a JSON value, with where it sits."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    else:
        for index, item in enumerate(value):
            yield from _numbers(item, f"{where}[{index}]")


def test_micro_run_writes_a_complete_record(tmp_path):
    """The CI smoke run: every section that a CPU can run is done, the rest are skipped with their reason."""
    record, done = _kit(tmp_path, "--deadline", "150")
    sections = record["sections"]
    assert record["mode"] == "micro" and record["device"] == "cpu" and record["errors"] == []
    ran = ["machine", "model", "eager-fp32", "reference-fp32", "demo-precision", "adaptive"]
    assert [name for name, entry in sections.items() if entry["status"] == "done"] == ran
    for name in ("eager-fp16", "reference-fp16", "compiled-fp16"):
        assert sections[name]["reason"].startswith("fp16 needs a CUDA GPU")
    assert sections["compiled-fp32"]["reason"].startswith("CUDA graphs need a CUDA GPU")
    assert {skip["what"] for skip in record["skipped"]} >= {"eager-fp16", "compiled-fp32", "demo-precision fp16"}
    for where, number in _numbers(record):
        assert math.isfinite(number), where
    for name in ran:
        assert sections[name]["seconds"] >= 0
    assert 0 < record["wall_s"] < 150

    machine = sections["machine"]["result"]
    peak = machine["matmul_peak"]["fp32"]
    assert peak["shape"] == [1024, 1024, 1024] and peak["gflop_per_s"] > 0 and machine["torch"]
    eager = sections["eager-fp32"]["result"]
    assert [row["batch"] for row in eager["rows"]] == list(record["plan"]["batch_sizes"])
    assert eager["best_batch"] in record["plan"]["batch_sizes"] and eager["unet_gflops_per_evaluation"] > 0
    for row in eager["rows"]:
        assert row["evaluations_per_s"] > 0 and row["pairs_per_s"] > 0 and row["matmul_peak_fraction"] > 0
        assert row["unet_evaluations"] == 2 * 2 * record["plan"]["timesteps"]
    reference = sections["reference-fp32"]["result"]
    assert reference["agreement"]["ok"] and reference["reference_pairs_per_s"] > 0
    assert reference["batch"] == eager["best_batch"]

    rows = record["table"]
    assert {(row["section"], row["engine"]) for row in rows} == {
        ("eager-fp32", "pytorch"),
        ("reference-fp32", "pytorch"),
        ("reference-fp32", "reference"),
    }
    assert all(row["vs_reference"] > 0 for row in rows)
    assert next(row for row in rows if row["engine"] == "reference")["vs_reference"] == 1.0

    demo = sections["demo-precision"]["result"]
    assert demo["items"] == record["plan"]["demo_items"] and "skipped" in demo["fp16"]
    assert 0 <= demo["bf16"]["vs_fp32"]["top1_agreement"] <= 1 and 0 <= demo["fp32"]["top1_accuracy"] <= 1
    adaptive = sections["adaptive"]["result"]
    evaluations = adaptive["evaluations"]
    assert 0 < evaluations["conditional"] < evaluations["exhaustive_conditional"]
    assert adaptive["evaluation_ratio"] > 1 and adaptive["winners_exact"]
    assert 0 <= adaptive["top1_agreement"] <= 1

    screen = done.stdout
    assert screen.startswith("dsdkit GPU kit (micro) on cpu") and "vs ref" in screen
    assert "skipped compiled-fp32: CUDA graphs need a CUDA GPU" in screen and len(screen.splitlines()) < 40


def test_a_short_deadline_skips_sections_and_still_writes_the_record(tmp_path):
    """Sections that do not fit are skipped with the time left and the time they need; the ones that need a skipped
    section say so; the JSON is written all the same and the run ends by its deadline."""
    record, done = _kit(tmp_path / "short", "--deadline", "3", timeout=60)
    assert record["wall_s"] <= 3 + 1
    statuses = {name: entry["status"] for name, entry in record["sections"].items()}
    assert set(statuses.values()) <= FINAL and "skipped" in statuses.values()
    reasons = [skip["reason"] for skip in record["skipped"]]
    assert any(DEADLINE_REASON.match(reason) or reason.startswith(("cut:", "not started:")) for reason in reasons)
    assert all(set(skip) == {"what", "reason"} for skip in record["skipped"])

    # The model would not fit: what needs it is skipped, the demo model's sections still run.
    record, done = _kit(tmp_path / "partial", "--deadline", "100", "--estimate", "model=1000", timeout=110)
    sections = record["sections"]
    assert sections["machine"]["status"] == "done" and sections["demo-precision"]["status"] == "done"
    assert DEADLINE_REASON.match(sections["model"]["reason"]) and sections["model"]["reason"].endswith("~1000 s")
    assert sections["eager-fp32"]["reason"] == "needs section model (skipped)"
    assert f"skipped model: {sections['model']['reason']}" in done.stdout


def test_the_full_kit_without_a_gpu_says_why_it_measures_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full kit would run (minutes)")
    done = subprocess.run(
        [sys.executable, str(KIT), "--out-dir", str(tmp_path), "--deadline", "60"],
        capture_output=True,
        text=True,
        timeout=90,
        env=_environment(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (path,) = tmp_path.glob("gpu-kit-cpu-*.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["mode"] == "full" and record["sections"]["machine"]["status"] == "done"
    for name, entry in record["sections"].items():
        if name != "machine":
            assert entry["status"] == "skipped"
            assert "sees no CUDA GPU" in entry["reason"] or entry["reason"] == "needs section model (skipped)"


def test_a_terminated_run_records_the_section_it_cut(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(KIT), "--micro", "--out-dir", str(tmp_path), "--deadline", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_environment(),
    )
    try:
        started = time.monotonic()
        running = None
        while running is None and time.monotonic() - started < 60:
            time.sleep(0.05)
            for path in tmp_path.glob("gpu-kit-*.json"):
                try:
                    sections = json.loads(path.read_text(encoding="utf-8"))["sections"]
                except (OSError, json.JSONDecodeError):
                    continue
                running = next((n for n, e in sections.items() if e["status"] == "running" and n != "machine"), None)
        assert running is not None, "no section seen running"
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0
    (path,) = tmp_path.glob("gpu-kit-*.json")
    sections = json.loads(path.read_text(encoding="utf-8"))["sections"]
    assert sections[running]["status"] == "cut" and "terminated (SIGTERM)" in sections[running]["reason"]
    assert {entry["status"] for entry in sections.values()} <= FINAL
    assert f"skipped {running}: cut: the run was terminated (SIGTERM) while it ran" in stdout


def _wheelhouse():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_wheelhouse", WHEELHOUSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_wheels_of_missing_distributions_are_installed(tmp_path):
    """The machine's own packages are never shadowed (its torch above all); only what it lacks is installed."""
    wheelhouse = _wheelhouse()
    for name in (
        "numpy-9.9-cp312-cp312-manylinux_2_28_x86_64.whl",  # installed here: the machine's own wins
        "torch-9.9-cp312-cp312-manylinux_2_28_x86_64.whl",  # never carried, never installed
        "nvidia_cublas-9.9-py3-none-manylinux_2_28_x86_64.whl",
        "Not_Installed.Anywhere-0.1-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in wheelhouse.missing(tmp_path)] == ["Not_Installed.Anywhere-0.1-py3-none-any.whl"]
    have = tmp_path / "have.txt"
    have.write_text("# image\nNumPy==2.5.2\ntyping_extensions\nhuggingface-hub>=1.3\n\n", encoding="utf-8")
    assert wheelhouse.read_have(have) == {"numpy", "typing-extensions", "huggingface-hub"}
    assert wheelhouse.target_environment("3.12")["python_full_version"] == "3.12.0"


def test_dsdkit_is_laid_out_from_the_checkout_as_pyproject_maps_it(tmp_path):
    wheelhouse = _wheelhouse()
    package = wheelhouse.layout(tmp_path)
    assert {"runtime", "train", "export", "assets", "__init__.py"} <= {p.name for p in package.iterdir()}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dsdkit, dsdkit.runtime.engine, dsdkit.train, dsdkit.export.parity, dsdkit.world.demo as d; "
            "print(dsdkit.__file__); print(d.demo_model_folder())",
        ],
        capture_output=True,
        text=True,
        env={**_environment(), "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split()
    assert Path(first).parent == package and Path(second) == package / "assets" / "demo"
    assert (Path(second) / "model_index.json").is_file()
