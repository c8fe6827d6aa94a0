"""Serve latency under load: `dsdkit serve`'s application on loopback, 1 to 16 concurrent clients, bounded.

    taskset -c 0,1 python benchmarks/serve_load.py                 # the demo bundle, exported once to benchmarks/cache
    python benchmarks/serve_load.py --bundle BUNDLE --requests 200 --clients 1 2 4 8 16 --timesteps 4
    python benchmarks/serve_load.py --table benchmarks/results/serve-load-DATE.json      # the markdown table only

Starts a local Ray cluster (``--ray-cpus``), runs :func:`dsdkit.serving.build_app` on ``127.0.0.1`` (nothing listens
beyond loopback) with the default :class:`~dsdkit.serving.ServeConfig` but ``--timesteps``, and sends
``/rank-captions`` requests: one demo-world image and its 8 captions (the benchmark's ``rank-8`` items, seed 17:
the true caption among 8, half the distractors one edit away), every request a new image, so each one pays its
image encoding, its unconditional pass (S evaluations) and 8 x S conditional ones; captions repeat across items and
are cached, as a label set would be.

For each concurrency level, ``c`` client threads (one keep-alive HTTP connection each) share ``--requests``
requests, each client sending its next request when the last one is answered (a closed loop). Per level: latency
p50 / p95 / max over the requests (p99 only with >= 200 of them), throughput, and scorer batches per request (the
replica's ``scorer_batches`` counter, read from ``GET /health`` before and after the level, over the requests). A
level stops taking new requests after ``--level-timeout`` seconds (the record says so), which bounds the run.

Load conditions: the record holds the machine's CPU use during each level from ``/proc/stat`` and the part of it
used by this benchmark's own processes (the driver, Ray and the replica, its descendants), so CPU used by anything
else on the machine at the same time is visible (``other_cpus``). Writes
``benchmarks/results/serve-load-<date>.json`` (``-o`` to change) and prints the table.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import io
import json
import logging
import os
import platform
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
from machine import machine  # benchmarks/machine.py (scripts run from their folder)

logger = logging.getLogger("serve_load")

HERE = Path(__file__).resolve().parent
ITEM_SEED = 17  # fresh items: not the demo benchmark's seed 0 (none of them is in the demo model's training data)


# -- CPU accounting (Linux /proc) ----------------------------------------------------------------------------------


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every field of ``/proc/stat``'s cpu line but idle, iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its living descendants (Ray's processes start below the driver)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            rest = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ... utime(12) stime(13)
            stats[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """Machine-wide and own-process-tree CPU use between :meth:`start` and :meth:`stop`, in CPUs (cores busy)."""

    def start(self) -> None:
        self.t, self.busy, self.ours = time.perf_counter(), _machine_busy(), _tree_cpu(os.getpid())

    def stop(self) -> dict:
        dt = time.perf_counter() - self.t
        busy = (_machine_busy() - self.busy) / dt
        ours = (_tree_cpu(os.getpid()) - self.ours) / dt
        return {
            "machine_cpus_busy": round(busy, 3),
            "benchmark_cpus": round(ours, 3),
            "other_cpus": round(max(0.0, busy - ours), 3),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        }


# -- requests --------------------------------------------------------------------------------------------------------


def request_bodies(count: int) -> list[bytes]:
    """``count`` rank-captions bodies: a new demo-world image each, with its item's 8 captions."""
    from dsdkit import world

    bodies = []
    for item in world.benchmark_items(seed=ITEM_SEED, per_subset=count, subsets=["rank-8"]):
        buffer = io.BytesIO()
        world.render(item.scenes[0]).save(buffer, "PNG")
        image = {"base64": base64.b64encode(buffer.getvalue()).decode("ascii")}
        bodies.append(json.dumps({"image": image, "captions": list(item.captions), "top_k": 1}).encode())
    return bodies


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def counters(self) -> dict:
        status, text = self.call("GET", "/health")
        if status != 200:
            raise SystemExit(f"GET /health: HTTP {status}: {text[:200]!r}")
        return json.loads(text)["counters"]


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="linear"))


def run_level(port: int, clients: int, bodies: list[bytes], timeout_s: float) -> dict:
    """``clients`` closed-loop clients over ``bodies``; latencies and counters of the level."""
    monitor = Client(port)
    before = monitor.counters()
    lock = threading.Lock()
    queue = iter(bodies)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + timeout_s
    stopped = threading.Event()

    def work():
        client = Client(port)
        while True:
            with lock:
                body = next(queue, None)
            if body is None:
                return
            if time.perf_counter() > deadline:
                stopped.set()
                return
            started = time.perf_counter()
            status, text = client.call("POST", "/rank-captions", body)
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"HTTP {status}: {text[:200]!r}")

    cpu = CpuWindow()
    cpu.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    load = cpu.stop()
    after = monitor.counters()
    done = len(latencies)
    delta = {key: after[key] - before[key] for key in after}
    ms = np.array(latencies or [np.nan]) * 1000.0  # NaN statistics when every request failed
    row = {
        "clients": clients,
        "requests": done,
        "errors": len(errors),
        "first_errors": errors[:3],
        "stopped_by_timeout": stopped.is_set(),
        "wall_s": round(wall, 3),
        "throughput_rps": round(done / wall, 3),
        "latency_ms": {
            "mean": round(float(ms.mean()), 2),
            "p50": round(percentile(ms, 50), 2),
            "p95": round(percentile(ms, 95), 2),
            "max": round(float(ms.max()), 2),
        },
        "scorer_batches": delta["scorer_batches"],
        "scorer_batches_per_request": round(delta["scorer_batches"] / max(1, done), 4),
        "work_items_per_batch": round(delta["work_items"] / max(1, delta["scorer_batches"]), 2),
        "unet_evaluations": delta["unet_evaluations"],
        "load": load,
    }
    if done >= 200:  # a p99 of fewer requests is one or two samples
        row["latency_ms"]["p99"] = round(percentile(ms, 99), 2)
    return row


# -- the run ---------------------------------------------------------------------------------------------------------


def demo_bundle(cache: Path) -> Path:
    """The demo model's bundle in ``cache`` (exported once, TorchScript exporter; ~15 s on 2 cores)."""
    path = cache / "serve-demo.bundle"
    if (path / "manifest.json").exists():
        return path
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    logger.info("exporting the demo model to %s", path)
    cache.mkdir(parents=True, exist_ok=True)
    export_bundle(
        "demo", path, config=ExportConfig(exporter="torchscript", parity=ParitySettings(images=2, captions=2))
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    import onnxruntime
    import ray
    from ray import serve

    import dsdkit
    from dsdkit.serving import ServeConfig, build_app

    bundle = Path(args.bundle) if args.bundle else demo_bundle(args.cache)
    total = args.requests * len(args.clients) + args.warmup
    bodies = request_bodies(total)
    sizes = {"max_batch_items": args.max_batch_items} if args.max_batch_items else {}
    config = ServeConfig(num_timesteps=args.timesteps, **sizes)
    quiet_before = CpuWindow()
    quiet_before.start()
    time.sleep(2.0)
    idle = quiet_before.stop()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(bundle, config, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica)
        serve.run(app, name="serve-load", route_prefix="/")
        warm = Client(port)
        for body in bodies[: args.warmup]:
            warm.call("POST", "/rank-captions", body)
        engine = json.loads(warm.call("GET", "/health")[1])["engine"]
        levels = []
        offset = args.warmup
        for clients in args.clients:
            chunk = bodies[offset : offset + args.requests]
            offset += args.requests
            row = run_level(port, clients, chunk, args.level_timeout)
            logger.info("%d clients: %s", clients, json.dumps(row))
            levels.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "benchmark": "serve_load",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": machine(
            affinity=len(os.sched_getaffinity(0)),
            ray_cpus=args.ray_cpus,
            python=platform.python_version(),
        ),
        "versions": {
            "dsdkit": dsdkit.__version__,
            "ray": ray.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "bundle": {
            "model": engine["model"],
            "identity": engine["identity"][:12],
            "timesteps": engine["timesteps"],
            "engine_batch_size": engine["batch_size"],
            "backend": "onnxruntime, CPU, fp32",
        },
        "deployment": {
            "replicas": args.replicas,
            "cpus_per_replica": args.cpus_per_replica,
            "onnxruntime_threads_per_replica": max(1, int(args.cpus_per_replica)),
            "config": config.to_dict(),
        },
        "workload": {
            "endpoint": "POST /rank-captions",
            "request": (
                f"one new {engine['model']}-world image (64 px PNG, base64) and its 8 captions (rank-8 items, seed "
                f"{ITEM_SEED}); per request 8 x S conditional + S unconditional scorer evaluations"
            ),
            "requests_per_level": args.requests,
            "warmup_requests": args.warmup,
            "clients": "closed loop: each client thread sends its next request when the last is answered; one "
            "keep-alive HTTP/1.1 connection per client; loopback only",
            "level_timeout_s": args.level_timeout,
        },
        "load_conditions": {
            "stated": args.conditions,
            "measured": (
                "per level: machine_cpus_busy is the whole machine's CPU use (cores busy, /proc/stat), "
                "benchmark_cpus this benchmark's process tree (driver, Ray, replica), other_cpus the rest; "
                "before_start_2s the same over 2 s before Ray started"
            ),
            "pinning": args.pinning,
            "before_start_2s": idle,
        },
        "levels": levels,
    }


def table(record: dict) -> str:
    lines = [
        "| clients | requests | p50 ms | p95 ms | p99 ms | max ms | req/s | scorer batches / request "
        "| work items / batch | other CPUs busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["levels"]:
        lat = row["latency_ms"]
        p99 = f"{lat['p99']:.1f}" if "p99" in lat else "–"
        lines.append(
            f"| {row['clients']} | {row['requests']}{' (timed out)' if row['stopped_by_timeout'] else ''} "
            f"| {lat['p50']:.1f} | {lat['p95']:.1f} | {p99} | {lat['max']:.1f} | {row['throughput_rps']:.2f} "
            f"| {row['scorer_batches_per_request']:.3f} | {row['work_items_per_batch']:.1f} "
            f"| {row['load']['other_cpus']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a bundle to serve (default: the demo model's, exported to --cache)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=200, help="requests per level (p99 needs >= 200)")
    parser.add_argument("--warmup", type=int, default=8, help="requests before the first level, not measured")
    parser.add_argument("--timesteps", type=int, default=4, help="S")
    parser.add_argument("--max-batch-items", type=int, default=None, help="default: ServeConfig's")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=2, help="also ONNX Runtime's threads")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--level-timeout", type=float, default=60.0, help="seconds a level may take new requests")
    parser.add_argument("--pinning", default="none stated", help="how the run was pinned, recorded as given")
    parser.add_argument("--conditions", default="none stated", help="what else ran on the machine, as given")
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of a record and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    record = run(args)
    output = args.output or HERE / "results" / f"serve-load-{record['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", output)
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
