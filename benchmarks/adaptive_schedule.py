"""Choosing the adaptive (successive-elimination) default schedule by measurement, on the demo world.

Two steps:

    python benchmarks/adaptive_schedule.py collect            # exhaustive per-timestep scores (long; resumable)
    python benchmarks/adaptive_schedule.py choose -o benchmarks/results/adaptive-schedule-DATE.json

``collect`` scores the demo benchmark's K-way ranking sets (``rank-8`` and ``rank-32``: the true caption among K,
up to half of the distractors one edit away) **exhaustively** with the default ``discffusion`` score at S = 30 on
the shipped demo model, keeping every candidate's per-timestep score (``ScoreOutput.per_step``). Those arrays are
generated data, kept out of git in ``benchmarks/cache/`` (``--cache``); the run saves after every chunk and
continues where it stopped.

``choose`` then simulates candidate schedules *exactly* from those arrays: successive elimination is a function of
the per-timestep scores alone (:func:`dsdkit.runtime.adaptive.simulate`), because a candidate's terms at a timestep
do not depend on what else is scored (the scoring contract's batch invariance). The queries are split in two halves
by a seeded shuffle: the schedule is chosen on the first half (the cheapest candidate whose top-1 agreement with
exhaustive scoring is >= 99% there) and reported on the second (agreement with its Wilson 95% interval, top-1
accuracy against the truth for both, UNet evaluations, the ratio). Each record carries the machine, versions, date
and command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads beside other work
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

logger = logging.getLogger("adaptive_schedule")

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"
SUBSETS = ("rank-8", "rank-32")
#: The benchmark seed of the demo-data benchmark is 0; these queries use another, so they are fresh items (still
#: disjoint from the demo model's training layouts, as every benchmark item is).
QUERY_SEED = 16


def _cache_file(cache: Path, subset: str, queries: int, steps: int) -> Path:
    return cache / f"exhaustive-{subset}-q{queries}-s{steps}.npz"


def collect(args) -> None:
    import torch
    from dsdkit.runtime.files import atomic_write_bytes

    from dsdkit import world
    from dsdkit.scorer import build_scorer

    torch.set_num_threads(args.threads)
    scorer = build_scorer("demo", overrides={"num_timesteps": args.timesteps}, batch_size=args.batch_size)
    steps = len(scorer.timesteps)
    args.cache.mkdir(parents=True, exist_ok=True)
    for subset in args.subsets:
        path = _cache_file(args.cache, subset, args.queries, steps)
        items = world.benchmark_items(seed=QUERY_SEED, per_subset=args.queries, subsets=[subset])
        k = len(items[0].captions)
        per_step = np.full((len(items), k, steps), np.nan)
        positives = np.array([item.positive for item in items])
        done = 0
        if path.exists():
            saved = np.load(path, allow_pickle=False)
            per_step[:] = saved["per_step"]
            done = int(saved["done"])
            logger.info("%s: resuming at query %d of %d", subset, done, len(items))
        started = time.perf_counter()
        evaluations = 0
        while done < len(items):
            chunk = items[done : done + args.chunk]
            images = [world.render(item.scenes[0]) for item in chunk]
            texts = sorted({c for item in chunk for c in item.captions})
            column = {t: j for j, t in enumerate(texts)}
            pairs = [(i, column[c]) for i, item in enumerate(chunk) for c in item.captions]
            out = scorer.score_pairs(images, texts, pairs)
            evaluations += out.unet_evaluations
            per_step[done : done + len(chunk)] = out.per_step.reshape(len(chunk), k, steps)
            done += len(chunk)
            buffer = __import__("io").BytesIO()
            np.savez(
                buffer,
                per_step=per_step,
                positives=positives,
                done=np.array(done),
                timesteps=np.array(scorer.timesteps),
            )
            atomic_write_bytes(path, buffer.getvalue())
            rate = evaluations / (time.perf_counter() - started)
            logger.info("%s: %d/%d queries, %.0f UNet evaluations/s", subset, done, len(items), rate)


def choose(args) -> None:
    print("choose: not written yet", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="exhaustive per-timestep scores of the K-way sets (resumable)")
    c.add_argument("--queries", type=int, default=2000, help="queries per candidate count (both halves)")
    c.add_argument("--timesteps", type=int, default=30)
    c.add_argument("--subsets", nargs="+", default=list(SUBSETS))
    c.add_argument("--chunk", type=int, default=64, help="queries per scoring call (and per save)")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    h = sub.add_parser("choose", help="simulate schedules; choose on one half, report on the other")
    h.add_argument("--queries", type=int, default=2000)
    h.add_argument("--timesteps", type=int, default=30)
    h.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    h.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"collect": collect, "choose": choose}[args.command](args)


if __name__ == "__main__":
    main()
