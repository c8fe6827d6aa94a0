"""How much slower `dsdkit match` gets when another process keeps one core busy: spinning vs passive waiting.

    python benchmarks/thread_contention.py                    # tiny model, examples/, S = 4, 3 repeats
    python benchmarks/thread_contention.py --timesteps 10 --repeats 5

Writes a random-weight tiny model (not timed), then runs ``dsdkit match examples/images examples/captions.txt``
on it, each run a fresh process (libgomp reads its wait policy once, when torch loads), in every configuration,
first on the quiet machine and then beside a background load this script starts itself: one busy-looping process
pinned to one core (the last one this process may use). Configurations:

- ``spin-active`` (before, the worst case): ``OMP_WAIT_POLICY=ACTIVE``, all cores;
- ``spin-default`` (before, the CLI until this change): no wait policy set, so libgomp spins 300,000 times
  (milliseconds) before it sleeps, all cores; the CLI's passive default is switched off inside the child;
- ``passive`` (after, the new defaults): nothing set; the CLI sets ``OMP_WAIT_POLICY=PASSIVE`` and its default
  thread count;
- ``passive-1`` (after, ``--threads 1``): what the docs' advice to lower ``--threads`` buys.

Repeats are interleaved (quiet and loaded, every configuration, then again), so drifting load from elsewhere
spreads over all of them. Each run records its wall time, the time of its ``match()`` call alone (the scoring,
without process start and imports), the load average at its start and the CPU seconds that
processes other than this benchmark (and its own background load) used meanwhile, ``other_cpu_s``: a quiet run
beside other work is not quiet, and that column shows it. On a machine shared with other jobs, each run first waits
(up to ``--max-wait`` seconds) until other processes use less than ``--quiet-below`` of a core, and a run during
which they used more than twice that is recorded as ``disturbed`` and run again (up to ``--retries`` times); the
medians are over the undisturbed runs. Prints medians and the slowdowns (loaded / quiet) and writes
``benchmarks/results/thread-contention-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py (scripts run from their folder)

logger = logging.getLogger("thread_contention")

ROOT = Path(__file__).resolve().parent.parent
POLICY_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")

# The child: runs the CLI in-process, optionally with its passive-waiting default switched off (the CLI as it was),
# and writes what the run really used (wait policy, torch's thread count) to the report file when it exits.
CHILD = r"""
import atexit, json, os, sys, time
import dsdkit.runtime.threads as threads
if os.environ.pop("TC_NO_PASSIVE_DEFAULT", None):
    threads.use_passive_waiting = lambda: False
import dsdkit.cli as cli
import dsdkit.jobs.match as matching
cli.use_passive_waiting = threads.use_passive_waiting
timed = {}
untimed_match = matching.match

def match(*args, **kwargs):  # the scoring itself, without imports and process start (the command imports it late)
    started = time.perf_counter()
    try:
        return untimed_match(*args, **kwargs)
    finally:
        timed["match_s"] = round(time.perf_counter() - started, 3)

matching.match = match

def report():
    torch = sys.modules.get("torch")
    with open(os.environ["TC_REPORT"], "w") as f:
        json.dump({"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                   "torch_threads": torch.get_num_threads() if torch else None, **timed}, f)

atexit.register(report)
sys.argv = ["dsdkit", *sys.argv[1:]]
cli.main()
"""

# The busy loop ends by itself once this benchmark is gone (its parent changes), so it can never be left behind.
BUSY = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


def configurations(cores: int) -> dict[str, dict]:
    return {
        "spin-active": {"env": {"OMP_WAIT_POLICY": "ACTIVE"}, "args": ["--threads", str(cores)]},
        "spin-default": {"env": {"TC_NO_PASSIVE_DEFAULT": "1"}, "args": ["--threads", str(cores)]},
        "passive": {"env": {}, "args": []},
        "passive-1": {"env": {}, "args": ["--threads", "1"]},
    }


def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait (guest time is inside user already)


def _process_jiffies(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def other_cores(load: BackgroundLoad | None, seconds: float = 2.0) -> float:
    """Cores that processes other than this benchmark and its background load keep busy, over ``seconds``."""
    hz = os.sysconf("SC_CLK_TCK")
    busy, background = _busy_jiffies(), _process_jiffies(load.process.pid) if load else 0
    time.sleep(seconds)
    background = (_process_jiffies(load.process.pid) - background) if load else 0
    return max(0.0, (_busy_jiffies() - busy - background) / hz / seconds)


def wait_for_quiet(load: BackgroundLoad | None, below: float, max_wait: float) -> float:
    """Wait until other processes use under ``below`` cores (at most ``max_wait`` s); returns the seconds waited."""
    started = time.perf_counter()
    while other_cores(load) >= below and time.perf_counter() - started < max_wait:
        pass
    return round(time.perf_counter() - started, 1)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class BackgroundLoad:
    """One busy-looping process pinned to one core, for the length of a ``with`` block."""

    def __init__(self, core: int):
        self.core, self.process = core, None

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", BUSY, str(self.core)])
        time.sleep(0.5)  # running and pinned before the first timed run starts
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def run_once(command: list[str], config: dict, load: BackgroundLoad | None, scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    env.update(config["env"])
    report = scratch / "report.json"
    report.unlink(missing_ok=True)
    env["TC_REPORT"] = str(report)
    hz = os.sysconf("SC_CLK_TCK")
    loadavg = os.getloadavg()[0]
    busy, own, background = _busy_jiffies(), _children_cpu(), _process_jiffies(load.process.pid) if load else 0
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *command, *config["args"]], env=env, cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    busy_s = (_busy_jiffies() - busy) / hz
    own_s = _children_cpu() - own
    background_s = ((_process_jiffies(load.process.pid) - background) / hz) if load else 0.0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    used = json.loads(report.read_text()) if report.is_file() else {}
    return {
        "wall_s": round(wall, 3),
        "match_s": used.pop("match_s", None),
        "cpu_s": round(own_s, 2),
        "other_cpu_s": round(max(0.0, busy_s - own_s - background_s), 2),
        "loadavg_1min_at_start": round(loadavg, 2),
        "used": used,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=4, help="S of the discffusion table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="tiny", choices=["micro", "tiny"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quiet-below", type=float, default=0.15, help="cores other processes may use (see above)")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for quiet before each run")
    parser.add_argument("--retries", type=int, default=3, help="reruns of a disturbed run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the with-blocks: the background load stops

    cpus = sorted(os.sched_getaffinity(0))
    configs = configurations(len(cpus))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = scratch / "model"
        subprocess.run(
            [sys.executable, "-m", "dsdkit", "tiny-model", str(model), "--size", args.size],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        command = [
            "match",
            "examples/images",
            "examples/captions.txt",
            "--model",
            str(model),
            "--timesteps",
            str(args.timesteps),
            "-o",
            str(scratch / "scores.json"),
        ]
        for repeat in range(args.repeats):
            for loaded in (False, True):
                load = BackgroundLoad(cpus[-1]) if loaded else None
                with load or contextlib.nullcontext():
                    for name, config in configs.items():
                        for attempt in range(args.retries + 1):
                            waited = wait_for_quiet(load, args.quiet_below, args.max_wait)
                            record = run_once(command, config, load, scratch)
                            disturbed = record["other_cpu_s"] > 2 * args.quiet_below * record["wall_s"]
                            record.update(
                                config=name, loaded=loaded, repeat=repeat, waited_s=waited, disturbed=disturbed
                            )
                            runs.append(record)
                            logger.info(
                                "repeat %d %-6s %-12s %6.1f s, match() %6.1f s  (other processes: %.1f CPU s, "
                                "load %.2f)%s",
                                repeat,
                                "loaded" if loaded else "quiet",
                                name,
                                record["wall_s"],
                                record["match_s"],
                                record["other_cpu_s"],
                                record["loadavg_1min_at_start"],
                                "  disturbed: run again" if disturbed and attempt < args.retries else "",
                            )
                            if not disturbed:
                                break

    def median(name: str, loaded: bool, key: str) -> tuple[float, int]:
        """Median of ``key`` over the undisturbed runs (all runs when every one was disturbed), and their count."""
        these = [r for r in runs if r["config"] == name and r["loaded"] == loaded]
        clean = [r for r in these if not r["disturbed"]] or these
        return statistics.median(r[key] for r in clean), len(clean) if clean is not these else 0

    # Two clocks: the whole command as a user waits for it (process start and imports included, which no thread
    # setting changes) and its match() call alone (the scoring, where the thread pools work and wait).
    summary = {}
    for key in ("wall_s", "match_s"):
        for name in configs:
            (quiet, quiet_n), (loaded, loaded_n) = median(name, False, key), median(name, True, key)
            summary.setdefault(key, {})[name] = {
                "quiet_median_s": round(quiet, 2),
                "loaded_median_s": round(loaded, 2),
                "slowdown": round(loaded / quiet, 2),
                "undisturbed_runs": {"quiet": quiet_n, "loaded": loaded_n},
            }
        baseline = summary[key]["passive"]["quiet_median_s"]
        for name, row in summary[key].items():
            row["loaded_vs_passive_quiet"] = round(row["loaded_median_s"] / baseline, 2)
            logger.info(
                "%-7s %-12s quiet %6.2f s  loaded %6.2f s  slowdown x%.2f (x%.2f of the quiet passive run)",
                key[:-2],
                name,
                row["quiet_median_s"],
                row["loaded_median_s"],
                row["slowdown"],
                row["loaded_vs_passive_quiet"],
            )
    import torch  # versions for the record only, after every timed run

    from dsdkit import __version__

    today = datetime.date.today().isoformat()
    record = {
        "benchmark": "thread_contention",
        "date": today,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "job": {
            "cli": "dsdkit " + " ".join(command[:3]) + f" --model <tiny model> --timesteps {args.timesteps}",
            "model": f"dsdkit tiny-model --size {args.size}",
            "repeats": args.repeats,
        },
        "background_load": f"one busy-looping python process pinned to CPU {cpus[-1]}",
        "configurations": {name: {"env": c["env"], "args": c["args"]} for name, c in configs.items()},
        "machine": machine(
            affinity=len(cpus),
            default_threads=_default_threads(),
            torch=torch.__version__,
            dsdkit=__version__,
            python=sys.version.split()[0],
        ),
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"thread-contention-{today}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", path)
    return 0


def _default_threads() -> int:
    from dsdkit.runtime.threads import default_threads

    return default_threads()


if __name__ == "__main__":
    sys.exit(main())
