"""`dsdkit serve` start-up and latency under a bounded load on loopback: both runners in one run.

    taskset -c 0,1 python benchmarks/serve_load.py      # the demo bundle, exported once to benchmarks/cache
    python benchmarks/serve_load.py --bundle BUNDLE --requests 200 --clients 1 2 4 8 --timesteps 4
    python benchmarks/serve_load.py --runners in-process --requests 8 --clients 1 2 -o /tmp/smoke.json   # a smoke run
    python benchmarks/serve_load.py --table benchmarks/results/serve-load-DATE.json      # the markdown table only

For each runner, one after the other (never side by side): the in-process runner (``dsdkit serve BUNDLE``, uvicorn
in one process) and Ray Serve with one replica (``dsdkit serve BUNDLE --ray local``, a new loopback-only cluster).
Each is the real command, started as a subprocess with the same engine threads (``--threads``, also Ray's CPUs per
replica) and the default :class:`~dsdkit.serving.config.ServeConfig` but ``--timesteps``; the record holds:

- start-up: seconds from starting the command to its ready line, and to its first ``GET /health`` answer;
- per concurrency level, ``c`` closed-loop client threads (one keep-alive HTTP connection each) sharing
  ``--requests`` ``/rank-captions`` requests (one demo-world image and its 8 captions, the benchmark's ``rank-8``
  items, seed 17, a new image each, so each pays its image encoding and 8 x S scorer evaluations; captions repeat
  across items and are cached, as a label set would be): latency p50 / p95 / max (p99 with >= 200 requests),
  throughput, scorer batches per request (the server's ``scorer_batches`` counter from ``GET /health``);
- stopping: seconds from SIGTERM to exit, and the exit code.

A level stops taking new requests after ``--level-timeout`` seconds (the record says so), which bounds the run.
Load conditions: the whole machine's CPU use during each level (``/proc/stat``) and the part of it used by this
benchmark's own processes (the driver and the server with its children), so CPU used by anything else at the same
time is visible (``other_cpus``). Writes ``benchmarks/results/serve-load-<date>.json`` (``-o`` to change) and prints
the table.
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
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import machine  # benchmarks/machine.py (scripts run from their folder)

logger = logging.getLogger("serve_load")

HERE = Path(__file__).resolve().parent
ITEM_SEED = 17  # fresh items: not the demo benchmark's seed 0 (none of them is in the demo model's training data)
RUNNERS = ("in-process", "ray")


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
        try:
            return self._exchange(method, path, body, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # The server closes a keep-alive connection that stayed idle past its timeout (the in-process runner:
            # uvicorn's 5 s; the monitor idles through a whole level): reconnect once and send again, as an HTTP
            # client library does. Nothing was processed: the request never reached the server.
            self.connection.close()
            return self._exchange(method, path, body, headers)

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
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


def start_server(command: list[str], timeout: float) -> tuple[subprocess.Popen, int, float, float]:
    """Start `dsdkit serve`; (process, port, seconds to its ready line, seconds to its first /health answer)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(iter(process.stderr.readline, "")), daemon=True).start()
    while not any("ready at" in line for line in lines):
        if process.poll() is not None or time.perf_counter() - started > timeout:
            process.kill()
            raise SystemExit(f"{shlex.join(command)}: no ready line; stderr: {''.join(errors)[-2000:]}")
        time.sleep(0.01)
    ready_s = time.perf_counter() - started
    url = re.search(r"ready at http://([^/]+)/", next(line for line in lines if "ready at" in line)).group(1)
    port = int(url.rsplit(":", 1)[1])
    while True:
        try:
            Client(port).counters()
            break
        except OSError:
            time.sleep(0.01)
    return process, port, ready_s, time.perf_counter() - started


def run_runner(runner: str, args, bundle: Path, bodies: list[bytes], offset: int) -> dict:
    """One runner: start it, warm it up, run every level, stop it."""
    dsdkit = str(Path(sys.executable).parent / "dsdkit")
    command = [dsdkit, "serve", str(bundle), "--timesteps", str(args.timesteps), "--threads", str(args.threads)]
    if args.max_batch_items:
        command += ["--max-batch-items", str(args.max_batch_items)]
    if runner == "ray":
        log = Path(tempfile.gettempdir()) / f"serve-load-ray-{os.getpid()}.log"
        command += ["--ray", "local", "--cpus-per-replica", str(args.threads), "--ray-log", str(log)]
        command += ["--port", str(free_port())]
    else:
        command += ["--port", "0"]
    logger.info("%s: %s", runner, shlex.join(command))
    process, port, ready_s, answered_s = start_server(command, args.start_timeout)
    try:
        warm = Client(port)
        for body in bodies[:offset]:
            warm.call("POST", "/rank-captions", body)
        health = json.loads(warm.call("GET", "/health")[1])
        levels = []
        for clients in args.clients:
            chunk = bodies[offset : offset + args.requests]
            offset += args.requests
            row = run_level(port, clients, chunk, args.level_timeout)
            logger.info("%s, %d clients: %s", runner, clients, json.dumps(row))
            levels.append(row)
    finally:
        stopping = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            code = None
        stop_s = time.perf_counter() - stopping
    return {
        "runner": runner,
        "command": shlex.join(["dsdkit", *command[1:]]),
        "startup": {"ready_line_s": round(ready_s, 3), "first_health_answer_s": round(answered_s, 3)},
        "engine": health["engine"],
        "config": health["config"],
        "levels": levels,
        "stop": {"sigterm_to_exit_s": round(stop_s, 3), "exit_code": code},
    }


def run(args) -> dict:
    import onnxruntime

    import dsdkit

    bundle = Path(args.bundle) if args.bundle else demo_bundle(args.cache)
    per_runner = args.requests * len(args.clients) + args.warmup
    bodies = request_bodies(per_runner)
    quiet_before = CpuWindow()
    quiet_before.start()
    time.sleep(2.0)
    idle = quiet_before.stop()
    runners = [run_runner(runner, args, bundle, bodies, args.warmup) for runner in args.runners]
    versions = {"dsdkit": dsdkit.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for name in ("ray", "uvicorn"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    engine = runners[0]["engine"]
    return {
        "benchmark": "serve_load",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": machine(affinity=len(os.sched_getaffinity(0)), python=platform.python_version()),
        "versions": versions,
        "bundle": {
            "model": engine["model"],
            "identity": (engine["identity"] or "")[:12],
            "timesteps": engine["timesteps"],
            "engine_batch_size": engine["batch_size"],
            "backend": engine["device"],
        },
        "deployment": {
            "threads": args.threads,
            "ray": "one replica with --cpus-per-replica = --threads, a new local cluster (--ray local)",
        },
        "workload": {
            "endpoint": "POST /rank-captions",
            "request": (
                f"one new {engine['model']}-world image (64 px PNG, base64) and its 8 captions (rank-8 items, seed "
                f"{ITEM_SEED}); per request 8 x S scorer evaluations (+ S unconditional where the config needs them)"
            ),
            "requests_per_level": args.requests,
            "warmup_requests": args.warmup,
            "clients": "closed loop: each client thread sends its next request when the last is answered; one "
            "keep-alive HTTP/1.1 connection per client; loopback only; the same requests for every runner",
            "level_timeout_s": args.level_timeout,
            "startup": "ready_line_s: from starting the dsdkit serve process to its ready line on stdout; "
            "first_health_answer_s: to its first GET /health answer",
        },
        "load_conditions": {
            "stated": args.conditions,
            "measured": (
                "per level: machine_cpus_busy is the whole machine's CPU use (cores busy, /proc/stat), "
                "benchmark_cpus this benchmark's process tree (driver, server and its children), other_cpus the "
                "rest; before_start_2s the same over 2 s before any server started"
            ),
            "pinning": args.pinning,
            "before_start_2s": idle,
        },
        "runners": runners,
    }


def table(record: dict) -> str:
    lines = [
        "| runner | start-up s | clients | requests | p50 ms | p95 ms | max ms | req/s | scorer batches / request "
        "| other CPUs busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for runner in record["runners"]:
        for n, row in enumerate(runner["levels"]):
            lat = row["latency_ms"]
            startup = f"{runner['startup']['ready_line_s']:.1f}" if n == 0 else ""
            lines.append(
                f"| {runner['runner'] if n == 0 else ''} | {startup} | {row['clients']} "
                f"| {row['requests']}{' (timed out)' if row['stopped_by_timeout'] else ''} "
                f"| {lat['p50']:.1f} | {lat['p95']:.1f} | {lat['max']:.1f} | {row['throughput_rps']:.2f} "
                f"| {row['scorer_batches_per_request']:.3f} | {row['load']['other_cpus']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a bundle to serve (default: the demo model's, exported to --cache)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=200, help="requests per level (p99 needs >= 200)")
    parser.add_argument("--warmup", type=int, default=8, help="requests before the first level, not measured")
    parser.add_argument("--timesteps", type=int, default=4, help="S")
    parser.add_argument("--threads", type=int, default=2, help="the engine's threads (Ray: CPUs per replica too)")
    parser.add_argument("--max-batch-items", type=int, default=None, help="default: ServeConfig's")
    parser.add_argument("--level-timeout", type=float, default=60.0, help="seconds a level may take new requests")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to start")
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
    output.write_text(portable(json.dumps(record, indent=1)) + "\n")
    logger.info("wrote %s", output)
    print(table(record))
    return 0


def portable(text: str) -> str:
    """The record without this machine's paths: the checkout's folder as ``.`` (the commands ran from its root) and
    the server's temporary Ray log as ``RAY_LOG``."""
    text = text.replace(str(HERE.parent) + "/", "").replace(str(HERE.parent), ".")
    return re.sub(r"[^\s\"]*serve-load-ray-\d+\.log", "RAY_LOG", text)


if __name__ == "__main__":
    sys.exit(main())
