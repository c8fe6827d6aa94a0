"""The Python API against the CLI beside a busy core: an 8 x 8 ``score_matrix`` on the demo model (CPU), before and
after ``import dsdkit`` set passive waiting (issue 31 item 3).

    python benchmarks/library_vs_cli.py                          # 8 x 8, S = 10, 3 repeats
    python benchmarks/library_vs_cli.py --repeats 5 --quiet-too  # also without the busy loop

Every run is a fresh process (libgomp reads its wait policy once, when torch loads), started with no
``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS`` or ``GOMP_SPINCOUNT`` in its environment, while a busy-looping process
this script starts itself keeps one core busy (pinned to the last CPU this process may use). Three ways of scoring
the same job, the first ``--images`` demo images of ``examples/demo/`` against its first ``--captions`` captions at
S = ``--timesteps`` of the ``discffusion`` table:

- ``library-before``: the Python API as a program that imports torch before dsdkit runs it, which is exactly what
  every program got before ``import dsdkit`` set passive waiting (dsdkit cannot change the policy of a torch that is
  already loaded, so libgomp spins);
- ``library-after``: the Python API with dsdkit imported first (nothing else set: ``import dsdkit`` sets
  ``OMP_WAIT_POLICY=PASSIVE`` before torch loads);
- ``cli``: ``dsdkit match IMAGES CAPTIONS --model demo --timesteps S -o scores.json`` (the CLI set passive waiting
  before and after the change).

The library runs ``load_model("demo", device="cpu")``, ``Scorer(model, ScoringConfig.from_preset("discffusion",
num_timesteps=S))`` and ``scorer.score_matrix(images, captions)`` with every default left as it is (its thread count
is torch's own), as a user's program would. Two clocks per run: ``wall_s``, the process from start to exit, and
``work_s``, the job without interpreter start and the import of torch (the library: model load to the end
of ``score_matrix``; the CLI: its ``match()`` call, which loads the model too, with torch imported before it).
Repeats are interleaved (every way, then again), so drifting load from elsewhere spreads over all of them; the
record has the medians, the ratios library / CLI before and after on both clocks, the load average at each start
and the CPU seconds other processes used meanwhile. Writes ``benchmarks/results/library-vs-cli-<date>.json``
(``--out`` another folder).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py (scripts run from their folder)
from thread_contention import BackgroundLoad, _busy_jiffies, _children_cpu, _process_jiffies

import dsdkit  # first: this process's own torch (for the record's versions) waits passively too

logger = logging.getLogger("library_vs_cli")

ROOT = Path(__file__).resolve().parent.parent
POLICY_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")

# The library's job, as a user's program writes it; "torch-first" emulates every program before the change.
LIBRARY = r"""
import json, os, sys, time
started = time.perf_counter()
order, images, captions, steps, report = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(
    sys.argv[4]), sys.argv[5]
if order == "torch-first":
    import torch
from dsdkit import Scorer, ScoringConfig, load_model
import torch

work = time.perf_counter()
model = load_model("demo", device="cpu")
scorer = Scorer(model, ScoringConfig.from_preset("discffusion", num_timesteps=steps))
scores = scorer.score_matrix(images, captions).scores
work_s = time.perf_counter() - work
with open(report, "w") as f:
    json.dump({"work_s": round(work_s, 3), "imports_s": round(work - started, 3),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(),
               "shape": list(scores.shape)}, f)
"""

# The CLI's job: the console script's main() in-process, its match() call timed (as thread_contention.py does).
CLI = r"""
import atexit, json, os, sys, time
import dsdkit.cli as cli  # `import dsdkit` has set passive waiting (the CLI's main() would too)
import dsdkit.jobs.match as matching
import torch  # loaded here, as the library's program loads it before its clock starts: both clocks exclude it
timed = {}
untimed = matching.match

def match(*args, **kwargs):
    started = time.perf_counter()
    try:
        return untimed(*args, **kwargs)
    finally:
        timed["work_s"] = round(time.perf_counter() - started, 3)

matching.match = match

def report():
    torch = sys.modules.get("torch")
    with open(os.environ["LVC_REPORT"], "w") as f:
        json.dump({"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "torch_threads": torch.get_num_threads() if torch else None, **timed}, f)

atexit.register(report)
sys.argv = ["dsdkit", *sys.argv[1:]]
cli.main()
"""

WAYS = ("library-before", "library-after", "cli")


def job(scratch: Path, images: int, captions: int) -> tuple[list[str], Path]:
    """The first ``images`` demo images (paths) and a captions file of the first ``captions`` demo captions."""
    demo = ROOT / "examples" / "demo"
    paths = sorted(str(p) for p in demo.glob("*.png"))[:images]
    lines = (demo / "captions.txt").read_text(encoding="utf-8").splitlines()[:captions]
    folder = scratch / "images"
    folder.mkdir(exist_ok=True)
    for path in paths:  # the CLI takes a folder: the same files, linked
        link = folder / Path(path).name
        if not link.exists():
            link.symlink_to(path)
    captions_file = scratch / "captions.txt"
    captions_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths, captions_file


def run_once(way: str, paths: list[str], captions_file: Path, steps: int, load, scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    report = scratch / "report.json"
    report.unlink(missing_ok=True)
    captions = captions_file.read_text(encoding="utf-8").splitlines()
    if way == "cli":
        env["LVC_REPORT"] = str(report)
        command = [sys.executable, "-c", CLI, "match", str(scratch / "images"), str(captions_file), "--model", "demo"]
        command += ["--timesteps", str(steps), "-o", str(scratch / "scores.json")]
    else:
        order = "torch-first" if way == "library-before" else "dsdkit-first"
        command = [sys.executable, "-c", LIBRARY, order, json.dumps(paths), json.dumps(captions), str(steps)]
        command.append(str(report))
    hz = os.sysconf("SC_CLK_TCK")
    loadavg = os.getloadavg()[0]
    busy, own = _busy_jiffies(), _children_cpu()
    background = _process_jiffies(load.process.pid) if load else 0
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    busy_s, own_s = (_busy_jiffies() - busy) / hz, _children_cpu() - own
    background_s = ((_process_jiffies(load.process.pid) - background) / hz) if load else 0.0
    if done.returncode != 0:
        raise RuntimeError(f"{way} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    used = json.loads(report.read_text())
    return {
        "way": way,
        "wall_s": round(wall, 3),
        "work_s": used.pop("work_s"),
        "cpu_s": round(own_s, 2),
        "other_cpu_s": round(max(0.0, busy_s - own_s - background_s), 2),
        "loadavg_1min_at_start": round(loadavg, 2),
        "used": used,
    }


def summarise(runs: list[dict], loaded: bool) -> dict:
    these = [r for r in runs if r["loaded"] == loaded]
    medians = {
        way: {
            key: round(statistics.median(r[key] for r in these if r["way"] == way), 3) for key in ("wall_s", "work_s")
        }
        for way in WAYS
    }
    ratios = {
        f"{way.replace('library-', '')}_library_vs_cli": {
            key: round(medians[way][key] / medians["cli"][key], 2) for key in ("wall_s", "work_s")
        }
        for way in ("library-before", "library-after")
    }
    return {"medians": medians, "ratios": ratios}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="demo images (at most 8)")
    parser.add_argument("--captions", type=int, default=8, help="demo captions (at most 8)")
    parser.add_argument("--timesteps", type=int, default=10, help="S of the discffusion table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-too", action="store_true", help="also run every way without the busy loop")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the with-blocks: the background load stops

    cpus = sorted(os.sched_getaffinity(0))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        paths, captions_file = job(scratch, args.images, args.captions)
        captions = captions_file.read_text(encoding="utf-8").splitlines()
        for repeat in range(args.repeats):
            for loaded in (True, False) if args.quiet_too else (True,):
                load = BackgroundLoad(cpus[-1]) if loaded else None
                with load or contextlib.nullcontext():
                    for way in WAYS:
                        record = run_once(way, paths, captions_file, args.timesteps, load, scratch)
                        record.update(loaded=loaded, repeat=repeat)
                        runs.append(record)
                        logger.info(
                            "repeat %d %-6s %-14s wall %6.1f s, scoring %6.1f s (other processes: %.1f CPU s, "
                            "load %.2f, OMP_WAIT_POLICY %s)",
                            repeat,
                            "loaded" if loaded else "quiet",
                            way,
                            record["wall_s"],
                            record["work_s"],
                            record["other_cpu_s"],
                            record["loadavg_1min_at_start"],
                            record["used"].get("OMP_WAIT_POLICY"),
                        )
    summary = {"beside_a_busy_core": summarise(runs, True)}
    if args.quiet_too:
        summary["quiet"] = summarise(runs, False)
    for name, part in summary.items():
        for ratio, values in part["ratios"].items():
            logger.info("%s: %s = %.2f (wall), %.2f (scoring)", name, ratio, values["wall_s"], values["work_s"])

    import torch  # versions for the record only, after every timed run (dsdkit was imported first)

    today = datetime.date.today().isoformat()
    record = {
        "benchmark": "library_vs_cli",
        "date": today,
        "command": " ".join(["python", "benchmarks/library_vs_cli.py", *(argv if argv is not None else sys.argv[1:])]),
        "job": {
            "images": [Path(p).name for p in paths],
            "captions": captions,
            "model": "demo",
            "device": "cpu",
            "scoring": f"discffusion, S = {args.timesteps}",
            "library": "load_model('demo', device='cpu'); Scorer(model, ScoringConfig.from_preset('discffusion', "
            f"num_timesteps={args.timesteps})).score_matrix(images, captions)",
            "cli": f"dsdkit match IMAGES CAPTIONS --model demo --timesteps {args.timesteps} -o scores.json",
            "before": "torch imported before dsdkit (dsdkit cannot set passive waiting)",
            "after": "dsdkit imported first (nothing set by hand)",
            "repeats": args.repeats,
        },
        "background_load": f"one busy-looping python process pinned to CPU {cpus[-1]}",
        "machine": machine(
            affinity=len(cpus), torch=torch.__version__, dsdkit=dsdkit.__version__, python=sys.version.split()[0]
        ),
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"library-vs-cli-{today}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
