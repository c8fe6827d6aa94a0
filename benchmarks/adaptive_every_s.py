"""Adaptive savings at every S: what successive elimination can save at S = 4, 10 and 30 on the demo world, measured.

The default (``keep=18.75%,2,k:steps=3,8,all``) was chosen at S = 30 (``adaptive_schedule.py``). This study asks,
for S = 4, 10 and 30 and K = 32 and 8 candidates, how the default does and what the best schedule of its kind could
do at each, against the gallery-search issue's targets:

    python benchmarks/adaptive_every_s.py collect --timesteps 4 10 30 --shard 0/2    # one process per core
    python benchmarks/adaptive_every_s.py collect --timesteps 4 10 30 --shard 1/2
    python benchmarks/adaptive_every_s.py choose -o benchmarks/results/adaptive-every-s-DATE.json
    python benchmarks/adaptive_every_s.py choose --no-attention -o benchmarks/results/adaptive-every-s-no-att-DATE.json

``collect`` scores the world benchmark's ``rank-32`` items (the true caption among 32, up to half of the distractors
one edit away; seed 16, disjoint from the training data) **exhaustively** at each S with the ``discffusion`` score,
keeping every candidate's per-timestep attention and denoising terms apart (``benchmarks/cache/``, resumable, out of
git), so that ``choose`` studies the score with both terms or, with ``--no-attention``, the denoising term alone (the
demo model's declared default since 2026-12-08). K = 8 queries are
the same items with 7 of their 31 distractors (a seeded draw per query).

``choose`` splits the queries in two halves by a seeded shuffle. On the choose half it searches, for every (S, K)
apart, the two- and three-stage schedules with whole-number stages for the largest saving that keeps the exhaustive
top-1 in >= 98.5% of the queries (:func:`frontier`); the best one per (S, K), and the shipped default, are then
simulated on the report half by the runtime's own elimination (:func:`dsdkit.runtime.adaptive.simulate`: it is a
function of the per-timestep scores alone). The targets (the gallery-search issue): top-1 agreement with exhaustive
scoring >= 98% with its Wilson 95% lower bound >= 97%, and at least

| S | K = 32 | K = 8 |
|---|---|---|
| 30 | 4x | 2x |
| 10 | 4x | 2x |
| 4 | 2.5x | 1.5x |

fewer UNet evaluations (the unconditional pass counted on both sides). The best per (S, K) bounds what any one
default could do there.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads beside other work
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_schedule import evaluate_schedule, wilson  # noqa: E402
from machine import machine  # noqa: E402

logger = logging.getLogger("adaptive_every_s")

HERE = Path(__file__).resolve().parent
QUERY_SEED = 16
TARGETS = {(30, 32): 4.0, (30, 8): 2.0, (10, 32): 4.0, (10, 8): 2.0, (4, 32): 2.5, (4, 8): 1.5}
AGREEMENT, AGREEMENT_LOW = 0.98, 0.97
CHOOSE_AGREEMENT = 0.985


def _cache(cache: Path, model: str, steps: int, shard: int, shards: int, queries: int) -> Path:
    name = model if model == "demo" else Path(model).name
    return cache / f"every-s-terms-{name}-s{steps}-q{queries}-shard{shard}of{shards}.npz"


def collect(args) -> None:
    import torch
    from dsdkit.runtime.files import atomic_write_bytes

    from dsdkit import world
    from dsdkit.pytorch.scorer import build_scorer

    torch.set_num_threads(args.threads)
    index, count = (int(v) for v in args.shard.split("/"))
    items = world.benchmark_items(seed=QUERY_SEED, per_subset=args.queries, subsets=["rank-32"])
    mine = list(range(index, len(items), count))
    args.cache.mkdir(parents=True, exist_ok=True)
    for steps in args.timesteps:
        # Both terms are kept apart (each step's attention term, its mean over layers, and its denoising term), so
        # one collection serves both scores: the method's (both terms) and the denoising term alone (the demo
        # model's declared default since 2026-12-08; choose --no-attention).
        overrides = {"num_timesteps": steps, "attention_term": True}
        scorer = build_scorer(args.model, overrides=overrides, batch_size=args.batch_size)
        grid = len(scorer.timesteps)
        path = _cache(args.cache, args.model, steps, index, count, args.queries)
        attention, denoise = np.full((len(mine), 32, grid), np.nan), np.full((len(mine), 32, grid), np.nan)
        done = 0
        if path.exists():
            saved = np.load(path, allow_pickle=False)
            attention[:], denoise[:] = saved["attention"], saved["denoise"]
            done = int(saved["done"])
        started, evaluations = time.perf_counter(), 0
        while done < len(mine):
            chunk = [items[i] for i in mine[done : done + args.chunk]]
            texts = sorted({c for item in chunk for c in item.captions})
            column = {t: j for j, t in enumerate(texts)}
            pairs = [(q, column[c]) for q, item in enumerate(chunk) for c in item.captions]
            out = scorer.score_pairs([world.render(item.scenes[0]) for item in chunk], texts, pairs)
            evaluations += out.unet_evaluations
            attention[done : done + len(chunk)] = out.attention_steps.mean(-1).reshape(len(chunk), 32, grid)
            denoise[done : done + len(chunk)] = out.denoise_steps.reshape(len(chunk), 32, grid)
            done += len(chunk)
            buffer = io.BytesIO()
            np.savez(buffer, attention=attention, denoise=denoise, queries=np.array(mine), done=np.array(done))
            atomic_write_bytes(path, buffer.getvalue())
            rate = evaluations / (time.perf_counter() - started)
            logger.info(
                "S=%d shard %s: %d/%d queries, %.0f UNet evaluations/s", steps, args.shard, done, len(mine), rate
            )


def _load(args) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per S: per_step[Q, 32, S], positives[Q] and each query's K = 8 candidate subset."""
    from dsdkit.runtime.scoring import sum_terms

    from dsdkit import world

    items = world.benchmark_items(seed=QUERY_SEED, per_subset=args.queries, subsets=["rank-32"])
    positives = np.array([item.positive for item in items])
    subsets = []
    for q, positive in enumerate(positives):
        rng = np.random.default_rng([QUERY_SEED, 8, q])
        others = [c for c in range(32) if c != positive]
        chosen = sorted([positive, *rng.choice(others, size=7, replace=False).tolist()])
        subsets.append(chosen)
    out = {}
    for steps in args.timesteps:
        per_step = None
        for shard in range(args.shards):
            saved = np.load(
                _cache(args.cache, args.model, steps, shard, args.shards, args.queries), allow_pickle=False
            )
            if int(saved["done"]) < len(saved["queries"]):
                raise SystemExit(f"S={steps} shard {shard}: collection not finished; run collect")
            # The runtime's own sum of the terms (runtime.scoring.sum_terms): both, or the denoising term alone.
            terms = sum_terms(saved["attention"][..., None], saved["denoise"], not args.no_attention)
            if per_step is None:
                per_step = np.full((len(items), *terms.shape[1:]), np.nan)
            per_step[saved["queries"]] = terms
        out[steps] = (per_step, positives, np.array(subsets))
    return out


def _survives(per_step: np.ndarray, plan) -> np.ndarray:
    """Per query: whether its exhaustive top-1 survives successive elimination by ``plan`` (the runtime's resolved
    :class:`~dsdkit.runtime.adaptive.Stages`) -- the elimination written as array operations, to search many
    schedules quickly; every reported figure is then recomputed by the runtime's own :func:`simulate`."""
    queries = per_step.shape[0]
    winner = per_step.mean(-1).argmax(axis=1)
    alive = np.ones(per_step.shape[:2], dtype=bool)
    for held, keep in zip(plan.steps, plan.keep, strict=True):
        means = np.where(alive, per_step[:, :, list(held)].mean(-1), -np.inf)
        rank = np.argsort(np.argsort(-means, axis=1, kind="stable"), axis=1, kind="stable")  # ties: lower index
        alive &= rank < keep
    return alive[np.arange(queries), winner]


def frontier(per_step: np.ndarray, num_timesteps: int) -> list[tuple[float, list[int], list[int], float]]:
    """Two- and three-stage schedules with whole-number stages, best saving first: (ratio, counts, keeps,
    agreement). The first stage holds 1..8 timesteps (fewer than S) and keeps 1..K-1; an optional second holds up
    to 16 and keeps fewer than 8 (cheap early stages are where the savings are: the last stage's entrants cost S)."""
    from dsdkit.runtime.adaptive import Schedule, resolve_schedule

    k = per_step.shape[1]
    exhaustive = k * num_timesteps + num_timesteps
    found = []
    for first in range(1, min(num_timesteps, 9)):
        for keep in range(1, k):
            for second in [None, *range(first + 1, min(num_timesteps, 17))]:
                for keep2 in [None] if second is None else range(1, min(keep, 8)):
                    counts = [first] if second is None else [first, second]
                    keeps = [keep] if second is None else [keep, keep2]
                    plan = resolve_schedule(Schedule((*keeps, 0), (*counts, None)), k, num_timesteps)
                    agreement = float(_survives(per_step, plan).mean())
                    cost = plan.evaluations(k) + num_timesteps  # the unconditional pass: S, on both sides
                    found.append((exhaustive / cost, counts, keeps, agreement))
    return sorted(found, key=lambda entry: -entry[0])


#: The schedules searched for one default at every S and K (``one_default``): a first stage of 1-3 timesteps keeping
#: a count or a fraction of the candidates, a second of 2-3 keeping 1-3 or k, then all S. Fixed counts below 4 make
#: the same stages at S = 4, 10 and 30.
UNIVERSAL_KEEPS = (2, 3, 4, 5, 6, 8, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5)
UNIVERSAL_STEPS = ((1, 2), (1, 3), (2, 3))


def one_default(choose_half: dict) -> list[dict]:
    """Every schedule of the universal family, scored on the choose half at every (S, K): the lowest agreement and
    each (S, K)'s saving. Best first: those whose lowest agreement is >= the choose bar, by targets met, then by
    the smallest saving relative to its target."""
    from dsdkit.runtime.adaptive import Schedule, resolve_schedule

    rows = []
    for first in UNIVERSAL_KEEPS:
        for second in (1, 2, 3, 0):
            if isinstance(first, int) and second and second >= first:
                continue
            for steps in UNIVERSAL_STEPS:
                schedule = Schedule((first, second, 0), (*steps, None))
                cells = {}
                for (s, k), (per_step, _) in choose_half.items():
                    plan = resolve_schedule(schedule, k, s)
                    cost = plan.evaluations(k) + s
                    ratio = (k * s + s) / cost
                    cells[f"S={s} K={k}"] = (float(_survives(per_step, plan).mean()), ratio, TARGETS[(s, k)])
                lowest = min(c[0] for c in cells.values())
                met = sum(c[1] >= c[2] for c in cells.values())
                margin = min(c[1] / c[2] for c in cells.values())
                rows.append(
                    {
                        "schedule": str(schedule),
                        "lowest_agreement": lowest,
                        "targets_met": met,
                        "worst_ratio_over_target": margin,
                        "cells": cells,
                    }
                )
    passing = [r for r in rows if r["lowest_agreement"] >= CHOOSE_AGREEMENT]
    return sorted(passing, key=lambda r: (-r["targets_met"], -r["worst_ratio_over_target"]))


def _replayed(row: dict, report_cells: dict) -> dict:
    """A schedule chosen on the choose half (``row``, from :func:`one_default`) and its verdict on each (S, K) of
    ``report_cells`` (the report half), replayed by the runtime's own elimination."""
    from dsdkit.runtime.adaptive import Schedule

    chosen = Schedule.parse(row["schedule"])
    verdicts = {
        f"S={s} K={k}": _verdict(evaluate_schedule(chosen, *cells), s, k) for (s, k), cells in report_cells.items()
    }
    return {"schedule": row["schedule"], "choose_half": row, "report_half": verdicts}


def _by_k(data: dict, index: np.ndarray) -> dict:
    """{(S, K): (per_step, positives)} of the queries ``index`` (K = 8: each query's seeded candidate subset)."""
    out = {}
    for steps, (per_step, positives, subsets) in data.items():
        out[(steps, 32)] = (per_step[index], positives[index])
        k8 = np.take_along_axis(per_step[index], subsets[index][:, :, None], axis=1)
        positive8 = np.array([list(s).index(p) for s, p in zip(subsets[index], positives[index], strict=True)])
        out[(steps, 8)] = (k8, positive8)
    return out


def _verdict(row: dict, steps: int, k: int) -> dict:
    low = wilson(row["top1_agreement"] * row["queries"], row["queries"])[0]
    return {
        "schedule": row["schedule"],
        "agreement": row["top1_agreement"],
        "agreement_wilson95_low": low,
        "ratio": row["evaluation_ratio"],
        "target_ratio": TARGETS[(steps, k)],
        "met": row["top1_agreement"] >= AGREEMENT
        and low >= AGREEMENT_LOW
        and row["evaluation_ratio"] >= TARGETS[(steps, k)],
    }


def choose(args) -> None:
    """Per (S, K): the largest saving any two- or three-stage schedule reaches with >= 98.5% agreement on the choose
    half, and what it and the shipped default do on the report half (the runtime's simulation)."""
    import torch
    from dsdkit.runtime.adaptive import DEFAULT_SCHEDULE, Schedule

    import dsdkit

    data = _load(args)
    count = len(next(iter(data.values()))[1])
    order = np.random.default_rng(args.split_seed).permutation(count)
    halves = {"choose": np.sort(order[: count // 2]), "report": np.sort(order[count // 2 :])}
    choose_half, report_half = _by_k(data, halves["choose"]), _by_k(data, halves["report"])
    best, default = {}, {}
    for (steps, k), (per_step, _) in choose_half.items():
        searched = frontier(per_step, steps)
        passing = [entry for entry in searched if entry[3] >= CHOOSE_AGREEMENT]
        key = f"S={steps} K={k}"
        report_steps, report_positives = report_half[(steps, k)]
        default[key] = _verdict(evaluate_schedule(DEFAULT_SCHEDULE, report_steps, report_positives), steps, k)
        if not passing:
            best[key] = {"searched": len(searched), "passing": 0}
            continue
        ratio, counts, keeps, agreement = passing[0]
        schedule = Schedule((*keeps, 0), (*counts, None))
        best[key] = {
            "searched": len(searched),
            "passing": len(passing),
            "choose_half": {"ratio": ratio, "agreement": agreement},
            "report_half": _verdict(evaluate_schedule(schedule, report_steps, report_positives), steps, k),
        }
        logger.info("%s: best %s %.2fx at %.1f%% (choose half)", key, schedule, ratio, 100 * agreement)
    per_s = {}
    for steps in args.timesteps:
        cells = {key: value for key, value in report_half.items() if key[0] == steps}
        found = one_default({key: value for key, value in choose_half.items() if key[0] == steps})
        if found:
            per_s[f"S={steps}"] = _replayed(found[0], cells)
    universal = one_default(choose_half)
    one = None
    if universal:
        one = {
            "searched": len(UNIVERSAL_KEEPS) * 4 * len(UNIVERSAL_STEPS),
            "passing": len(universal),
            **_replayed(universal[0], report_half),
        }
        logger.info("one schedule for every S and K: %s", one["schedule"])
    record = {
        "benchmark": "adaptive-every-s",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/adaptive_every_s.py", *sys.argv[1:]]),
        "machine": machine(threads=torch.get_num_threads()),
        "versions": {"dsdkit": dsdkit.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "model": args.model,
        "score": "the denoising term alone (attention_term off)" if args.no_attention else "both terms",
        "timesteps": args.timesteps,
        "queries": count,
        "halves": {"choose": len(halves["choose"]), "report": len(halves["report"])},
        "targets": {f"S={s} K={k}": v for (s, k), v in TARGETS.items()},
        "choose_agreement": CHOOSE_AGREEMENT,
        "default": DEFAULT_SCHEDULE.describe(),
        "default_report_half": default,
        "best_per_s_and_k": best,
        "one_schedule_for_every_s_and_k": one,
        "one_schedule_per_s": per_s,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    for key in default:
        d, b = default[key], best[key].get("report_half")
        line = f"{key}: default {d['agreement']:.1%} {d['ratio']:.2f}x (target {d['target_ratio']}x) "
        line += "met" if d["met"] else "NOT met"
        line += f"; best {b['schedule']} {b['agreement']:.1%} {b['ratio']:.2f}x" if b else "; no schedule passes"
        print(line)
    for label, entry in [*(("per-S", e) for e in per_s.values()), *([("one", one)] if one else [])]:
        for key, v in entry["report_half"].items():
            verdict = "met" if v["met"] else "NOT met"
            print(f"{key}: {label} schedule {entry['schedule']} {v['agreement']:.1%} {v['ratio']:.2f}x {verdict}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("collect", "choose"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="demo")
        p.add_argument("--queries", type=int, default=2000)
        p.add_argument("--timesteps", type=int, nargs="+", default=[4, 10, 30])
        p.add_argument("--cache", type=Path, default=HERE / "cache")
        if name == "collect":
            p.add_argument("--shard", default="0/1")
            p.add_argument("--chunk", type=int, default=64)
            p.add_argument("--batch-size", type=int, default=256)
            p.add_argument("--threads", type=int, default=1)
        else:
            p.add_argument("--shards", type=int, default=2)
            p.add_argument("--split-seed", type=int, default=0)
            p.add_argument("--no-attention", action="store_true", help="the score without its attention term")
            p.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"collect": collect, "choose": choose}[args.command](args)


if __name__ == "__main__":
    main()
