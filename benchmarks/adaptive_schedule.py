"""Choosing the adaptive (successive-elimination) default schedule by measurement, on the demo world.

Two steps:

    python benchmarks/adaptive_schedule.py collect            # exhaustive per-timestep scores (long; resumable)
    python benchmarks/adaptive_schedule.py choose --verify 64 -o benchmarks/results/adaptive-schedule-DATE.json
    python benchmarks/adaptive_schedule.py table benchmarks/results/adaptive-schedule-DATE.json  # docs/match.md

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
from machine import machine  # noqa: E402  benchmarks/machine.py (scripts run from their folder)

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
    from dsdkit.pytorch.scorer import build_scorer

    torch.set_num_threads(args.threads)
    # Both terms, as measured (the demo model's declared default since 2026-12-08 leaves the attention term out).
    overrides = {"num_timesteps": args.timesteps, "attention_term": True}
    scorer = build_scorer("demo", overrides=overrides, batch_size=args.batch_size)
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
            buffer = io.BytesIO()
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


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def candidate_schedules(num_timesteps: int):
    """The family searched: two and three stages; the first keeps a fraction of K (one rule for every K) or a count,
    the second a fraction or a small count (the last stage's entrants, whose cost is S each, need not grow with K);
    the first stages on a few of the S timesteps."""
    from dsdkit.runtime.adaptive import Schedule

    fractions = (0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625, 0.03125)
    counts = (2, 3, 4, 6, 8)
    firsts = [s for s in (1, 2, 3, 4, 5, 6, 8) if s < num_timesteps]
    seen = set()

    def once(schedule):
        if str(schedule) not in seen:
            seen.add(str(schedule))
            yield schedule

    for first in firsts:
        for keep in fractions + counts:
            yield from once(Schedule((keep, 0), (first, None)))
            for second in (3, 4, 6, 8, 10, 15):
                if not first < second < num_timesteps:
                    continue
                for keep2 in fractions + counts[:3]:
                    same_kind = isinstance(keep, float) == isinstance(keep2, float)
                    if same_kind and keep2 >= keep:
                        continue
                    if isinstance(keep, int) and isinstance(keep2, float):
                        continue  # a fraction after a count would grow with K past the count
                    yield from once(Schedule((keep, keep2, 0), (first, second, None)))


#: What the issue asks of the default schedule: at least these times fewer UNet evaluations, per candidate count.
TARGETS = {"rank-8": 2.0, "rank-32": 4.0}


def evaluate_schedule(schedule, per_step: np.ndarray, positives: np.ndarray) -> dict:
    """Simulated outcome of ``schedule`` over queries ``per_step[Q, K, S]``: agreement with exhaustive top-1,
    accuracy of both against the truth, and UNet evaluations (the unconditional pass: S per query either way,
    since survivors reach every timestep)."""
    from dsdkit.runtime.adaptive import simulate

    queries, k, steps = per_step.shape
    outcomes, spent, plan = simulate(per_step, schedule, top_k=1)
    exhaustive_top = np.argmax(per_step.mean(-1), axis=1)  # argmax: ties to the lower index, as the ranking's order
    adaptive_top = np.array([o.order[0] for o in outcomes])
    agree = int((adaptive_top == exhaustive_top).sum())
    low, high = wilson(agree, queries)
    exhaustive_conditional = queries * k * steps
    unconditional = queries * steps
    total = spent["conditional"] + unconditional
    return {
        "schedule": str(schedule),
        "keep": list(plan.keep),
        "steps": [len(s) for s in plan.steps],
        "queries": queries,
        "top1_agreement": agree / queries,
        "top1_agreement_wilson95": [low, high],
        "top1_accuracy_exhaustive": float((exhaustive_top == positives).mean()),
        "top1_accuracy_adaptive": float((adaptive_top == positives).mean()),
        "conditional": spent["conditional"],
        "unconditional": unconditional,
        "exhaustive_conditional": exhaustive_conditional,
        "exhaustive_unconditional": unconditional,
        "evaluation_ratio": (exhaustive_conditional + unconditional) / total,
        "conditional_ratio": exhaustive_conditional / spent["conditional"],
    }


def choose(args) -> None:
    import torch

    import dsdkit

    data = {}
    for subset in SUBSETS:
        path = _cache_file(args.cache, subset, args.queries, args.timesteps)
        saved = np.load(path, allow_pickle=False)
        if int(saved["done"]) < args.queries:
            raise SystemExit(f"{path}: only {int(saved['done'])} of {args.queries} queries collected; run collect")
        data[subset] = (saved["per_step"], saved["positives"])
    # Two halves by a seeded shuffle of each subset's queries: choose on one, report on the other.
    halves = {}
    for subset, (per_step, _) in data.items():
        order = np.random.default_rng(args.split_seed).permutation(len(per_step))
        middle = len(order) // 2
        halves[subset] = {"choose": np.sort(order[:middle]), "report": np.sort(order[middle:])}

    def on(subset, half, schedule):
        per_step, positives = data[subset]
        index = halves[subset][half]
        return evaluate_schedule(schedule, per_step[index], positives[index])

    searched = []
    for schedule in candidate_schedules(args.timesteps):
        rows = {subset: on(subset, "choose", schedule) for subset in SUBSETS}
        # The saving against each candidate count's target, at the worse of the two (higher is better), and the
        # fractions of exhaustive cost summed (lower is better) to break ties.
        margin = min(rows[s]["evaluation_ratio"] / TARGETS[s] for s in SUBSETS)
        cost = sum(1 / rows[s]["evaluation_ratio"] for s in SUBSETS)
        worst = min(rows[s]["top1_agreement"] for s in SUBSETS)
        searched.append((schedule, (-margin, cost), worst, rows))
    logger.info("searched %d schedules on the choose half", len(searched))

    def cheapest(threshold):
        passing = [entry for entry in searched if entry[2] >= threshold]
        return min(passing, key=lambda entry: (entry[1], str(entry[0]))) if passing else None

    chosen = cheapest(args.agreement)
    if chosen is None:
        raise SystemExit(f"no schedule reaches {args.agreement:.1%} top-1 agreement on the choose half")
    trade_off = []
    for threshold in (0.90, 0.95, 0.98, 0.99, 0.995, 1.0):
        entry = cheapest(threshold)
        if entry is not None:
            trade_off.append(
                {
                    "choose_half_threshold": threshold,
                    "schedule": str(entry[0]),
                    "report": {subset: on(subset, "report", entry[0]) for subset in SUBSETS},
                }
            )
    record = {
        "benchmark": "adaptive_schedule",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/adaptive_schedule.py", *sys.argv[1:]]),
        "machine": machine(threads=torch.get_num_threads()),
        "versions": {"dsdkit": dsdkit.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "model": "demo (shipped weights, no adapter)",
        "scoring": f"discffusion preset, S = {args.timesteps}, denoising term on",
        "queries_per_subset": args.queries,
        "split_seed": args.split_seed,
        "rule": (
            f"among schedules whose top-1 agreement with exhaustive scoring is >= {args.agreement:.1%} on the choose "
            "half of both K = 8 and K = 32, the one whose evaluation saving is largest against the targets (2x at "
            "K = 8, 4x at K = 32) at the worse of the two; ties to the smaller summed cost fraction"
        ),
        "targets": TARGETS,
        "searched": len(searched),
        "chosen": {
            "schedule": str(chosen[0]),
            "choose_half": chosen[3],
            "report_half": {subset: on(subset, "report", chosen[0]) for subset in SUBSETS},
        },
        "trade_off": trade_off,
    }
    if args.verify:
        record["real_run"] = verify(args, chosen[0], data, halves)
    text = json.dumps(record, indent=1) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        logger.info("wrote %s", args.output)
    for subset, row in record["chosen"]["report_half"].items():
        print(
            f"{subset}: {row['schedule']} keep {row['keep']} steps {row['steps']}: agreement "
            f"{row['top1_agreement']:.2%} (Wilson95 low {row['top1_agreement_wilson95'][0]:.2%}), "
            f"{row['evaluation_ratio']:.2f}x fewer evaluations ({row['conditional_ratio']:.2f}x conditional), "
            f"top-1 vs truth {row['top1_accuracy_exhaustive']:.2%} exhaustive, {row['top1_accuracy_adaptive']:.2%} "
            f"adaptive, n={row['queries']}"
        )


def verify(args, schedule, data, halves) -> dict:
    """A real adaptive run on the first ``--verify`` queries of each report half, timed against exhaustive scoring of
    the same queries in the same process: its ranking must equal the simulation's, and its speed ratio is measured."""
    import torch
    from dsdkit.runtime.adaptive import simulate

    from dsdkit import world
    from dsdkit.pytorch.scorer import build_scorer

    torch.set_num_threads(args.threads)
    out = {}
    for subset in SUBSETS:
        items = world.benchmark_items(seed=QUERY_SEED, per_subset=args.queries, subsets=[subset])
        index = halves[subset]["report"][: args.verify]
        chosen = [items[i] for i in index]
        images = [world.render(item.scenes[0]) for item in chosen]
        texts = sorted({c for item in chosen for c in item.captions})
        column = {t: j for j, t in enumerate(texts)}
        candidates = [[column[c] for c in item.captions] for item in chosen]
        pairs = [(i, j) for i, listed in enumerate(candidates) for j in listed]
        timings = {}
        for mode in ("exhaustive", "adaptive", "exhaustive-again"):
            # A fresh scorer per mode: nothing cached between them (encodings and unconditional passes included).
            overrides = {"num_timesteps": args.timesteps, "attention_term": True}  # both terms, as measured
            engine = build_scorer("demo", overrides=overrides, batch_size=args.batch_size)
            started = time.perf_counter()
            if mode.startswith("exhaustive"):
                stored = engine.score_pairs(images, texts, pairs).per_step
            else:
                real = engine.rank_matrix(images, texts, schedule=schedule, candidates=candidates)
            timings[mode] = time.perf_counter() - started
        k = len(chosen[0].captions)
        outcomes, spent, _ = simulate(stored.reshape(len(chosen), k, -1), schedule)
        simulated_from_cache, _, _ = simulate(data[subset][0][index], schedule)
        same = all(real.order(q).tolist() == [candidates[q][c] for c in o.order] for q, o in enumerate(outcomes))
        same_as_cache = all(
            a.order.tolist() == b.order.tolist() for a, b in zip(outcomes, simulated_from_cache, strict=True)
        )
        exhaustive_s = min(timings["exhaustive"], timings["exhaustive-again"])
        out[subset] = {
            "queries": len(chosen),
            "real_equals_simulation": bool(same),
            "this_run_equals_collected_run": bool(same_as_cache),
            "conditional_real": real.evaluations["conditional"],
            "conditional_simulated": spent["conditional"],
            "exhaustive_s": exhaustive_s,
            "adaptive_s": timings["adaptive"],
            "speed_ratio": exhaustive_s / timings["adaptive"],
        }
        logger.info("%s real run: %s", subset, out[subset])
    return out


def table(args) -> None:
    """The trade-off table of docs/match.md from a ``choose`` record (report half only)."""
    record = json.loads(args.record.read_text())
    lines = [
        "| schedule (chosen at ≥ X% agreement on the choose half) | K | keep | steps | top-1 agreement (Wilson 95%) "
        "| top-1 vs truth: exhaustive / adaptive | UNet evaluations: adaptive / exhaustive | fewer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    chosen = record["chosen"]["schedule"]
    for entry in record["trade_off"]:
        for subset, row in entry["report"].items():
            mark = " **(default)**" if entry["schedule"] == chosen else ""
            low, high = row["top1_agreement_wilson95"]
            lines.append(
                f"| `{entry['schedule']}`{mark} (≥ {entry['choose_half_threshold']:.1%}) | {subset.split('-')[1]} "
                f"| {row['keep']} | {row['steps']} | {row['top1_agreement']:.1%} ({low:.1%}–{high:.1%}) "
                f"| {row['top1_accuracy_exhaustive']:.1%} / {row['top1_accuracy_adaptive']:.1%} "
                f"| {row['conditional'] + row['unconditional']:,} / "
                f"{row['exhaustive_conditional'] + row['exhaustive_unconditional']:,} "
                f"| {row['evaluation_ratio']:.2f}× |"
            )
    print("\n".join(lines))


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
    h.add_argument("--split-seed", type=int, default=0)
    h.add_argument("--agreement", type=float, default=0.99, help="top-1 agreement the choice needs on its half")
    h.add_argument("--verify", type=int, default=0, help="queries per subset of a real, timed adaptive run")
    h.add_argument("--batch-size", type=int, default=256)
    h.add_argument("--threads", type=int, default=2)
    h.add_argument("-o", "--output", type=Path)
    t = sub.add_parser("table", help="the trade-off table of docs/match.md from a choose record")
    t.add_argument("record", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"collect": collect, "choose": choose, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
