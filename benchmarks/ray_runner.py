"""The Ray Data runner against a plain Matcher on one job, and a job whose worker is killed mid-shard.

    python benchmarks/ray_runner.py                      # demo bundle, 96 images x 16 captions, S = 10
    python benchmarks/ray_runner.py --images 48 --timesteps 4

One job, four ways, one after another in this run (never side by side): the bundle's ``Matcher`` in this process
with all the machine's cores; Ray with one worker holding every core; Ray with one worker per core; and Ray with one
worker per core where a monitor SIGKILLs the process holding a shard's lock halfway through that shard (timed from
the lock's appearance, at half the unkilled run's mean shard time). Each Ray run starts its own local cluster; its
start is timed apart. Every result is compared with the Matcher's (max abs difference; 0 = bitwise).

The images are demo-world scenes (``dsdkit.world``), the captions their own; the bundle is the demo model exported
with the TorchScript exporter (not timed). Writes ``benchmarks/results/ray-runner-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py (scripts run from their folder)


def write_job_inputs(folder: Path, images: int, captions: int) -> tuple[Path, Path]:
    from dsdkit.world import render, training_scenes

    folder.mkdir(parents=True)
    texts = []
    for i, (scene, caption) in enumerate(training_scenes(seed=17, count=images)):
        render(scene).save(folder / f"{i:04d}.png")
        if caption not in texts and len(texts) < captions:
            texts.append(caption)
    captions_file = folder.parent / "captions.txt"
    captions_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return folder, captions_file


def kill_mid_shard(scores: Path, after_s: float, killed: dict, stop: threading.Event) -> None:
    """SIGKILL, once, the worker whose shard lock has existed for ``after_s`` seconds."""
    seen: dict[Path, float] = {}
    while not stop.is_set():
        for lock in scores.glob("*.lock") if scores.exists() else []:
            first = seen.setdefault(lock, time.monotonic())
            if time.monotonic() - first >= after_s:
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, ValueError):
                    continue
                os.kill(int(holder["pid"]), signal.SIGKILL)
                killed.update(pid=holder["pid"], lock=lock.name, after_s=round(time.monotonic() - first, 2))
                return
        time.sleep(0.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import numpy as np
    import ray
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle
    from dsdkit.runtime import Matcher
    from dsdkit.runtime.threads import configure_threads

    from dsdkit import __version__
    from dsdkit.jobs.match import match
    from dsdkit.jobs.ray_runner import RayOptions, run_job_on_ray
    from dsdkit.jobs.shards import merge_job, plan_job

    cores = os.cpu_count() or 1
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle = scratch / "demo.bundle"
        parity = ParitySettings(images=2, captions=2, timesteps=2)
        export_bundle("demo", bundle, config=ExportConfig(exporter="torchscript", parity=parity))
        images, captions = write_job_inputs(scratch / "images", args.images, args.captions)

        configure_threads(cores)
        started = time.perf_counter()
        engine = Matcher.from_bundle(bundle, num_timesteps=args.timesteps, chunk_size=args.chunk_size, threads=cores)
        reference = match(images, captions, engine=engine, chunk_size=args.chunk_size)
        wall = time.perf_counter() - started
        evaluations = reference.meta["unet_evaluations"]
        records.append({"run": f"Matcher, in-process, {cores} threads", "wall_s": wall, "max_abs_diff": 0.0})
        print(f"Matcher: {wall:.1f} s, {evaluations:,} UNet evaluations", flush=True)

        def on_ray(label: str, workers: int, cpus: float, kill_after: float | None = None) -> dict:
            job = scratch / label.replace(" ", "-")
            plan_job(
                images,
                captions,
                job,
                args.shards,
                bundle=bundle,
                num_timesteps=args.timesteps,
                chunk_size=args.chunk_size,
            )
            began = time.perf_counter()
            ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
            cluster_s = time.perf_counter() - began
            killed: dict = {}
            stop = threading.Event()
            monitor = None
            if kill_after is not None:
                monitor = threading.Thread(target=kill_mid_shard, args=(job / "scores", kill_after, killed, stop))
                monitor.start()
            try:
                began = time.perf_counter()
                report = run_job_on_ray(
                    job, RayOptions(address=None, workers=workers, cpus_per_worker=cpus, threads=int(cpus))
                )
                run_s = time.perf_counter() - began
            finally:
                stop.set()
                if monitor is not None:
                    monitor.join()
                ray.shutdown()
            result = merge_job(job)
            shard_s = [s["seconds"] for s in report.shards]
            record = {
                "run": label,
                "workers": workers,
                "cpus_per_worker": cpus,
                "cluster_start_s": cluster_s,
                "wall_s": run_s,
                "shards": len(report.shards),
                "mean_shard_s": float(np.mean(shard_s)),
                "sum_shard_s": float(np.sum(shard_s)),
                "restarted_workers": sum(w["restarted"] for w in report.workers),
                "rows": sum(s["rows"] for s in report.shards),
                "max_abs_diff": float(np.abs(result.scores - reference.scores).max()),
                "killed": killed or None,
            }
            print(json.dumps(record), flush=True)
            return record

        records.append(on_ray("Ray, 1 worker", 1, float(cores)))
        two = on_ray(f"Ray, {cores} workers", cores, 1.0)
        records.append(two)
        records.append(on_ray(f"Ray, {cores} workers, one killed mid-shard", cores, 1.0, two["mean_shard_s"] / 2))

    single = records[0]["wall_s"]
    for record in records:
        record["throughput_evals_per_s"] = evaluations / record["wall_s"]
        record["speed_vs_matcher"] = single / record["wall_s"]
    killed, unkilled = records[3], records[2]
    summary = {
        "time_lost_to_the_kill_s": killed["wall_s"] - unkilled["wall_s"],
        "nothing_lost": killed["rows"] == args.images and killed["max_abs_diff"] == 0.0,
    }
    out = {
        "benchmark": "ray-runner",
        "date": datetime.date.today().isoformat(),
        "dsdkit": __version__,
        "ray": ray.__version__,
        "machine": machine(threads=cores, device="cpu"),
        "job": {
            "model": "demo bundle (TorchScript export)",
            "images": args.images,
            "captions": args.captions,
            "timesteps": args.timesteps,
            "chunk_size": args.chunk_size,
            "shards": args.shards,
            "unet_evaluations": evaluations,
        },
        "runs": records,
        "summary": summary,
        "notes": (
            f"{cores} cores: Ray workers share them with the driver, the raylet and the object store, so more "
            "workers cannot beat the Matcher here; wall_s excludes the cluster start (cluster_start_s) but includes "
            "actor start (torch-free runtime import, bundle open) and planning is not timed. Multi-GPU and "
            "multi-node were not measured (no such machine)."
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ray-runner-{out['date']}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("| run | wall s | vs Matcher | evals/s | restarted | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['run']} | {r['wall_s']:.1f} | {r['speed_vs_matcher']:.2f}x | {r['throughput_evals_per_s']:.0f} | "
            f"{r.get('restarted_workers', 0)} | {r['max_abs_diff']:.1e} |"
        )
    print(json.dumps(summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
