"""Adaptive ranking: spend UNet evaluations only on candidates that can still win.

Successive elimination, the schedule of Diffusion Classifier (Li et al. 2023, Algorithm 2), written once, torch-free,
above the engine interface (:class:`~dsdkit.runtime.engine.Engine`), so the PyTorch scorer and a bundle's Matcher
rank the same way, and a simulation over stored per-timestep scores (:func:`simulate`) runs the very same code.

A query (an image ranking captions, or a caption ranking images) has K candidates and the engine S timesteps. A
:class:`Schedule` has stages: stage i evaluates every surviving candidate on new timesteps until it holds
``steps[i]`` timesteps in all, then keeps the ``keep[i]`` best by their mean score so far. The last stage reaches
all S timesteps, so every candidate that enters it gets its **exhaustive** score: the same timesteps and the same
noise-bank entries as exhaustive scoring (equal within the scoring contract's batch-invariance tolerance; bitwise
where the UNet batches are the same). Each stage's timesteps are a nested, evenly spread subset of the S grid
(:func:`nested_steps`), and a candidate's terms at a timestep do not depend on what else is scored, so the only
thing elimination changes is *which* pairs are evaluated. Eliminated candidates keep their partial mean and the
stage after which they left. The unconditional pass stays cached per (image, timestep) by the engine.

Rules (the CLI's ``--adaptive-schedule``, :meth:`Schedule.parse`):

- ``steps`` increase strictly and end at S (write ``all`` for it); ``keep`` has one entry per stage and never
  increases. A keep at or above the number of candidates keeps them all (that stage only evaluates).
- A ``top_k`` larger than the last ``keep`` raises every stage's keep to at least ``top_k``: the top k are then
  always exact.
- Noise-level timestep tables (the ``paper`` preset) are a grid like any other: stages draw from the levels in the
  same nested way.
- Candidates are ordered by (timesteps held, mean score, lower index first): the kept ones first, then those that
  left at the last stage, and so on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encodings import ImageEncoding, TextEncoding
from .errors import ConfigError

__all__ = [
    "EVALUATION_KEYS",
    "Schedule",
    "Stages",
    "DEFAULT_SCHEDULE",
    "nested_steps",
    "resolve_schedule",
    "eliminate",
    "simulate",
    "rank_matrix",
    "AdaptiveMatrix",
    "QueryOutcome",
    "Ranked",
    "Ranking",
]


#: What rankings and jobs count (``AdaptiveMatrix.evaluations``, ``meta["evaluations"]``): the UNet evaluations run,
#: conditional (a pair at a timestep) and unconditional (the empty caption, once per image and timestep) apart, and
#: what exhaustive scoring of the same candidates would have run.
EVALUATION_KEYS = ("conditional", "unconditional", "exhaustive_conditional", "exhaustive_unconditional")


@dataclass(frozen=True)
class Schedule:
    """Successive-elimination stages: after stage i, candidates hold ``steps[i]`` timesteps and ``keep[i]`` stay.

    ``keep`` entries are a candidate count (``int``), a fraction of the query's candidates rounded up (``float`` in
    (0, 1), written ``25%``), or ``0`` for "the requested top-k" (written ``k``). ``steps`` entries are counts of
    the engine's timestep grid (``int``) or fractions of it rounded up (``float`` in (0, 1), written ``30%``); the
    last is ``None`` for "all S timesteps" (written ``all``; S itself also works). Fractions let one rule serve
    K = 8 and K = 300, and S = 4 and S = 50: the default schedule is of that kind. On a grid too small for every
    stage, a fractional stage that would hold no more timesteps than the stage before it is left out.
    """

    keep: tuple[int | float, ...]
    steps: tuple[int | float | None, ...]
    name: str | None = None

    def __post_init__(self):
        example = "e.g. keep=8,3,1:steps=2,6,all or keep=50%,25%,k:steps=1,4,all"
        if not self.keep or len(self.keep) != len(self.steps):
            raise ConfigError(
                f"adaptive schedule {self}: keep and steps need one entry per stage (got {len(self.keep)} and "
                f"{len(self.steps)}), {example}"
            )
        for k in self.keep:
            bad_fraction = isinstance(k, float) and not 0.0 < k < 1.0
            if bad_fraction or (isinstance(k, int) and k < 0):
                raise ConfigError(f"adaptive schedule {self}: keep entries are counts >= 1, percentages or k")
        counts = [k for k in self.keep if isinstance(k, int) and k > 0]
        fractions = [k for k in self.keep if isinstance(k, float)]
        for same_kind in (counts, fractions):
            if any(a < b for a, b in zip(same_kind, same_kind[1:], strict=False)):
                raise ConfigError(f"adaptive schedule {self}: keep must never increase from stage to stage")
        fixed = list(self.steps[:-1])
        last = self.steps[-1]
        if any(isinstance(s, float) and not 0.0 < s < 1.0 for s in self.steps):
            raise ConfigError(f"adaptive schedule {self}: step fractions lie between 0% and 100%; {example}")
        if isinstance(last, float):
            raise ConfigError(f"adaptive schedule {self}: the last stage holds all timesteps (all); {example}")
        for same_kind in ([s for s in fixed if isinstance(s, int)], [s for s in fixed if isinstance(s, float)]):
            if any(a >= b for a, b in zip(same_kind, same_kind[1:], strict=False)):
                raise ConfigError(f"adaptive schedule {self}: steps must increase strictly from stage to stage")
        counts = [s for s in fixed if isinstance(s, int)] + ([] if last is None else [last])
        if any(s is None or (isinstance(s, int) and s < 1) for s in fixed) or any(
            a >= b for a, b in zip(counts, counts[1:], strict=False)
        ):
            raise ConfigError(
                f"adaptive schedule {self}: steps must be whole numbers >= 1 or percentages that increase strictly, "
                f"the last one all (or S); {example}"
            )

    def __str__(self) -> str:
        if self.name:
            return self.name
        return f"keep={','.join(_keep_text(k) for k in self.keep)}:steps=" + ",".join(
            "all" if s is None else (f"{s * 100:g}%" if isinstance(s, float) else str(s)) for s in self.steps
        )

    def describe(self) -> str:
        """The text form, also for a named schedule (``default (keep=...:steps=...)``)."""
        plain = Schedule(self.keep, self.steps)
        return f"{self.name} ({plain})" if self.name else str(plain)

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``keep=8,3,1:steps=2,6,all``, ``keep=50%,25%,k:steps=1,4,all`` or ``default`` (:data:`DEFAULT_SCHEDULE`)."""
        text = text.strip()
        if text == "default":
            return DEFAULT_SCHEDULE
        parts = dict(part.split("=", 1) for part in text.split(":") if "=" in part)
        if set(parts) != {"keep", "steps"} or text.count(":") != 1:
            raise ConfigError(
                f"adaptive schedule {text!r}: write keep=K1,K2,...:steps=S1,S2,...,all (keep entries: counts, "
                "percentages of the candidates or k; e.g. keep=8,3,1:steps=2,6,all), or default"
            )
        try:
            keep = tuple(_parse_keep(v.strip()) for v in parts["keep"].split(","))
            steps = tuple(_parse_step(v.strip()) for v in parts["steps"].split(","))
        except ValueError:
            raise ConfigError(
                f"adaptive schedule {text!r}: keep entries are whole numbers, percentages (25%) or k; steps are "
                "whole numbers, the last one may be all"
            ) from None
        return cls(keep, steps)


def _parse_step(value: str) -> int | float | None:
    if value == "all":
        return None
    if value.endswith("%"):
        return float(value[:-1]) / 100.0
    return int(value)


def _parse_keep(value: str) -> int | float:
    if value == "k":
        return 0
    if value.endswith("%"):
        return float(value[:-1]) / 100.0
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _keep_text(keep: int | float) -> str:
    if isinstance(keep, float):
        return f"{keep * 100:g}%"
    return "k" if keep == 0 else str(keep)


#: The default schedule, chosen by measurement on the demo world (``benchmarks/adaptive_schedule.py``; docs/match.md's
#: trade-off table): ``keep=18.75%,2,k:steps=3,8,all``. Stage 1 scores every candidate at 3 of the S timesteps and
#: keeps 18.75% of them (at least k); stage 2 takes those to 8 timesteps and keeps 2 (at least k): they get all S.
#: On a grid of S <= 8 timesteps a stage that would hold S or more is left out (S = 4: 3 timesteps, then all 4).
DEFAULT_SCHEDULE = Schedule(keep=(0.1875, 2, 0), steps=(3, 8, None), name="default")


@dataclass(frozen=True)
class Stages:
    """A schedule resolved for one query: K candidates, S timesteps, top-k.

    Attributes:
        keep: candidates kept after each stage.
        steps: per stage, the timestep indices a candidate holds after it (nested; the last is all S).
    """

    keep: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]

    @property
    def new_steps(self) -> list[tuple[int, ...]]:
        """Per stage, the timestep indices evaluated in it (those not held after the stage before)."""
        out, held = [], set()
        for stage in self.steps:
            out.append(tuple(s for s in stage if s not in held))
            held.update(stage)
        return out

    def evaluations(self, num_candidates: int) -> int:
        """Conditional evaluations of one query: Σ over stages of survivors × new timesteps."""
        alive, total = num_candidates, 0
        for keep, new in zip(self.keep, self.new_steps, strict=True):
            total += alive * len(new)
            alive = keep
        return total


def nested_steps(num_timesteps: int, counts: Sequence[int]) -> list[tuple[int, ...]]:
    """Nested, evenly spread subsets of ``range(num_timesteps)`` of the given increasing sizes.

    The first subset is the evenly spread one (the centre of each of ``counts[0]`` equal parts of the grid); each
    later one adds, one at a time, the index farthest from every index already held (the grid's edges count as
    mirror images, so points spread to the ends as well), ties to the lower index. Deterministic.
    """
    if not counts or any(c < 1 or c > num_timesteps for c in counts):
        raise ConfigError(f"stage timestep counts {list(counts)} must lie in 1..{num_timesteps}")
    first = counts[0]
    held = sorted({min(num_timesteps - 1, int((j + 0.5) * num_timesteps / first)) for j in range(first)})
    # Rounding can merge two centres on a tiny grid: fill up the same way as the later stages.
    out = []
    for count in counts:
        while len(held) < count:
            best, best_gap = None, -1.0
            for candidate in range(num_timesteps):
                if candidate in held:
                    continue
                gap = min(
                    min(abs(candidate - h) for h in held) if held else math.inf,
                    2 * candidate + 1,  # the mirror image of the candidate in the grid's lower edge
                    2 * (num_timesteps - candidate) - 1,  # and in its upper edge
                )
                if gap > best_gap:
                    best, best_gap = candidate, gap
            held = sorted([*held, best])
        out.append(tuple(held))
    return out


def resolve_schedule(schedule: Schedule, num_candidates: int, num_timesteps: int, top_k: int = 1) -> Stages:
    """``schedule`` for a query of ``num_candidates`` candidates on an ``num_timesteps`` grid, keeping ``top_k``
    exact (see the module doc's rules)."""
    if num_candidates < 1:
        raise ConfigError("adaptive ranking needs at least one candidate")
    if top_k < 1:
        raise ConfigError(f"`top_k` must be >= 1, got {top_k}", field="top_k")
    counts, kept = [], []
    for k, s in zip(schedule.keep, schedule.steps, strict=True):
        count = num_timesteps if s is None else (math.ceil(s * num_timesteps - 1e-9) if isinstance(s, float) else s)
        if isinstance(s, float):
            count = max(1, min(count, num_timesteps))
            if (counts and count <= counts[-1]) or count >= num_timesteps:
                continue  # a fractional stage the grid is too small for: left out
        elif s is not None and count >= num_timesteps and schedule.name == DEFAULT_SCHEDULE.name:
            # The default's fixed stages (3 and 8 timesteps) on a grid of S <= 8: left out like a fractional stage,
            # so `--adaptive --timesteps 4` runs (3, then all 4) instead of refusing; a schedule given explicitly
            # is still refused, since the user asked for those counts.
            continue
        counts.append(int(count))
        kept.append(k)
    if counts[-1] != num_timesteps:
        raise ConfigError(
            f"adaptive schedule {schedule}: the last stage must reach all {num_timesteps} timesteps (it ends at "
            f"{counts[-1]}), so that survivors get their exhaustive scores; end steps with all"
        )
    if counts[0] > num_timesteps or len(set(counts)) != len(counts):
        raise ConfigError(f"adaptive schedule {schedule}: steps exceed the engine's {num_timesteps} timesteps")
    keep, alive = [], num_candidates
    for k in kept:
        count = math.ceil(k * num_candidates - 1e-9) if isinstance(k, float) else (top_k if k == 0 else k)
        # Never fewer than the top k (they end exact), never more than are still in the race.
        alive = min(alive, max(count, top_k))
        keep.append(alive)
    return Stages(tuple(keep), tuple(nested_steps(num_timesteps, counts)))


@dataclass
class QueryOutcome:
    """What elimination did to one query's candidates (indices into its candidate list)."""

    scores: np.ndarray  # float64[K]: mean per-timestep score over the timesteps each candidate held
    held: np.ndarray  # int[K]: timesteps held
    left_after: np.ndarray  # int[K]: the stage (1-based) after which it left; 0 for the kept ones
    order: np.ndarray  # int[K]: best first (held, then score, then lower index)


#: ``evaluate(pairs, steps) -> float64[P, len(steps)]`` per-timestep scores of ``(query, candidate)`` pairs at the
#: given timestep indices, and the conditional and unconditional evaluations it ran.
Evaluate = Callable[[list[tuple[int, int]], tuple[int, ...]], tuple[np.ndarray, int, int]]


def eliminate(
    num_candidates: Sequence[int], stages: Sequence[Stages], num_timesteps: int, evaluate: Evaluate
) -> tuple[list[QueryOutcome], dict[str, int]]:
    """Run successive elimination for many queries at once, stage by stage: in each stage the survivors of every
    query that evaluate the same new timesteps go to ``evaluate`` together (so batches stay full).

    Returns each query's :class:`QueryOutcome` and the evaluations (``conditional``, ``unconditional``).
    """
    values = [np.full((k, num_timesteps), np.nan) for k in num_candidates]
    alive = [np.arange(k) for k in num_candidates]
    left_after = [np.zeros(k, dtype=np.int64) for k in num_candidates]
    spent = {"conditional": 0, "unconditional": 0}
    depth = max(len(s.keep) for s in stages)
    for stage in range(depth):
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for query, plan in enumerate(stages):
            if stage < len(plan.keep) and len(alive[query]):
                groups[plan.new_steps[stage]].append(query)
        for new, queries in groups.items():
            if not new:
                continue
            pairs = [(q, int(c)) for q in queries for c in alive[q]]
            terms, conditional, unconditional = evaluate(pairs, new)
            spent["conditional"] += conditional
            spent["unconditional"] += unconditional
            row = 0
            for q in queries:
                count = len(alive[q])
                values[q][np.ix_(alive[q], list(new))] = terms[row : row + count]
                row += count
        for query, plan in enumerate(stages):
            if stage >= len(plan.keep):
                continue
            candidates = alive[query]
            if not len(candidates):
                continue
            means = _means(values[query][candidates], plan.steps[stage])
            ranked = candidates[np.lexsort((candidates, -means))]
            keep = plan.keep[stage]
            left_after[query][ranked[keep:]] = stage + 1
            alive[query] = np.sort(ranked[:keep])
    outcomes = []
    for query in range(len(num_candidates)):
        held = (~np.isnan(values[query])).sum(-1)
        scores = np.array([_mean_held(row) for row in values[query]])
        order = np.lexsort((np.arange(len(held)), -scores, -held))
        outcomes.append(QueryOutcome(scores, held, left_after[query], order))
    return outcomes, spent


def _means(rows: np.ndarray, steps: tuple[int, ...]) -> np.ndarray:
    """Mean per-timestep score of each row over ``steps`` (ascending), as :attr:`ScoreOutput.scores` takes it."""
    return rows[:, list(steps)].mean(-1)


def _mean_held(row: np.ndarray) -> float:
    held = row[~np.isnan(row)]
    # The same reduction over the same ascending values as exhaustive scoring's per_step.mean(-1).
    return float(held[None, :].mean(-1)[0]) if len(held) else math.nan


def simulate(
    per_step: np.ndarray, schedule: Schedule, top_k: int = 1
) -> tuple[list[QueryOutcome], dict[str, int], Stages]:
    """Successive elimination replayed on stored exhaustive per-timestep scores ``float64[Q, K, S]`` (the same code
    as a real run; a stored score stands in for the evaluation it came from). Returns the outcomes, the conditional
    evaluations it would spend (``unconditional`` is 0: the caller knows the images) and the resolved stages."""
    per_step = np.asarray(per_step, dtype=np.float64)
    queries, k, steps = per_step.shape
    plan = resolve_schedule(schedule, k, steps, top_k)

    def evaluate(pairs, new):
        q = np.array([p[0] for p in pairs])
        c = np.array([p[1] for p in pairs])
        return per_step[q[:, None], c[:, None], np.array(new)[None, :]], len(pairs) * len(new), 0

    outcomes, spent = eliminate([k] * queries, [plan] * queries, steps, evaluate)
    return outcomes, spent, plan


# -- on an engine ------------------------------------------------------------------------------------------------


@dataclass
class AdaptiveMatrix:
    """Adaptive ranking of a score matrix ``[N images, M captions]``.

    Attributes:
        scores: ``float64[N, M]`` mean score over the timesteps each pair held (exact where :attr:`exact`; NaN
            where the pair was not a candidate).
        held: ``int[N, M]`` timesteps held (0: not a candidate).
        left_after: ``int[N, M]`` the stage after which the candidate left (1-based); 0 for the kept ones and for
            pairs that were not candidates.
        per: ``"image"`` (each image ranks captions; queries are rows) or ``"caption"`` (queries are columns).
        num_timesteps: S; a pair is exact when it held all S.
        evaluations: ``conditional`` and ``unconditional`` UNet evaluations this ranking ran, and
            ``exhaustive_conditional`` / ``exhaustive_unconditional``: what scoring every candidate at every
            timestep would have run from the same cache state.
        schedule: the schedule's text form.
    """

    scores: np.ndarray
    held: np.ndarray
    left_after: np.ndarray
    per: str
    num_timesteps: int
    evaluations: dict[str, int] = field(default_factory=dict)
    schedule: str = ""

    @property
    def exact(self) -> np.ndarray:
        return self.held == self.num_timesteps

    @property
    def candidate(self) -> np.ndarray:
        return self.held > 0

    def order(self, query: int) -> np.ndarray:
        """Candidates of ``query`` best first: (timesteps held, score, lower index)."""
        held = self.held[query] if self.per == "image" else self.held[:, query]
        scores = self.scores[query] if self.per == "image" else self.scores[:, query]
        listed = np.flatnonzero(held > 0)
        return listed[np.lexsort((listed, -scores[listed], -held[listed]))]

    def top(self, k: int) -> list[np.ndarray]:
        """Per query (image rows, or caption columns), its best ``k`` candidates."""
        queries = self.scores.shape[0] if self.per == "image" else self.scores.shape[1]
        return [self.order(q)[:k] for q in range(queries)]


def rank_matrix(
    engine,
    images: Sequence[Any],
    texts: Sequence[Any],
    top_k: int = 1,
    schedule: Schedule | str | None = None,
    per: str = "image",
    candidates: Sequence[Sequence[int]] | None = None,
    progress=None,
) -> AdaptiveMatrix:
    """Adaptive ranking on ``engine``: every image ranks the captions (``per="image"``), or every caption ranks the
    images (``per="caption"``; compare images under ``normalize=uncond``).

    Args:
        images, texts: raw inputs (paths, PIL images, arrays; captions) or the engine's encodings
            (:class:`~dsdkit.runtime.engine.ImageEncoding` / :class:`~dsdkit.runtime.engine.TextEncoding`).
        top_k: candidates per query that are kept exact to the end.
        schedule: a :class:`Schedule`, its text form, or ``None`` for :data:`DEFAULT_SCHEDULE`.
        candidates: per query, the candidate indices (pairs mode: each image's listed captions); default all.
        progress: the engine's progress callback (called after each UNet batch with its evaluations).
    """
    if per not in ("image", "caption"):
        raise ConfigError(f"per must be image or caption, got {per!r}")
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    schedule = schedule or DEFAULT_SCHEDULE
    image_codes = (
        list(images) if images and isinstance(images[0], ImageEncoding) else engine.encode_images(list(images))
    )
    text_codes = list(texts) if texts and isinstance(texts[0], TextEncoding) else engine.encode_texts(list(texts))
    num_steps = len(engine.timesteps)
    queries, pool = (len(image_codes), len(text_codes)) if per == "image" else (len(text_codes), len(image_codes))
    lists = [list(range(pool)) for _ in range(queries)] if candidates is None else [list(c) for c in candidates]
    if len(lists) != queries:
        raise ConfigError(f"candidates: {len(lists)} lists for {queries} queries")
    plans = {}
    stages = []
    for listed in lists:
        if len(listed) not in plans and listed:
            plans[len(listed)] = resolve_schedule(schedule, len(listed), num_steps, top_k)
        stages.append(plans.get(len(listed), Stages((0,), ((),))))

    def evaluate(pairs, new):
        if per == "image":
            matrix_pairs = [(q, lists[q][c]) for q, c in pairs]
        else:
            matrix_pairs = [(lists[q][c], q) for q, c in pairs]
        out = engine.score_encoded_pairs(image_codes, text_codes, matrix_pairs, steps=list(new), progress=progress)
        unconditional = out.unconditional_evaluations
        return out.per_step, out.unet_evaluations - unconditional, unconditional

    needs_uncond = engine.config.needs_unconditional_pass
    cached_before = engine.cached_unconditional({e.key for e in image_codes}) if needs_uncond else 0
    outcomes, spent = eliminate([len(c) for c in lists], stages, num_steps, evaluate)
    shape = (len(image_codes), len(text_codes))
    scores = np.full(shape, np.nan)
    held = np.zeros(shape, dtype=np.int64)
    left = np.zeros(shape, dtype=np.int64)
    for query, (outcome, listed) in enumerate(zip(outcomes, lists, strict=True)):
        if not listed:
            continue
        index = (query, listed) if per == "image" else (listed, query)
        scores[index], held[index], left[index] = outcome.scores, outcome.held, outcome.left_after
    # Exhaustive scoring of the same candidates from the same cache state: every pair at every timestep, and the
    # unconditional pass of every image that is some query's candidate (or query) at every timestep.
    used_images = {i for i in range(shape[0]) if held[i].any()}
    uncond_needed = len({image_codes[i].key for i in used_images}) * num_steps if needs_uncond else 0
    evaluations = {
        **spent,
        "exhaustive_conditional": sum(len(c) for c in lists) * num_steps,
        "exhaustive_unconditional": max(0, uncond_needed - cached_before),
    }
    return AdaptiveMatrix(scores, held, left, per, num_steps, evaluations, str(schedule))


# -- ranking lists (Engine.rank_texts / rank_images) -------------------------------------------------------------


class Ranked(tuple):
    """One ranked candidate: unpacks as ``(candidate, score)``; also says whether the score is exact (all S
    timesteps), how many timesteps it held, and the stage after which it left (``None``: kept to the end)."""

    def __new__(cls, candidate, score: float, exact: bool = True, held: int | None = None, left_after=None):
        self = super().__new__(cls, (candidate, score))
        self.exact, self.held, self.left_after = exact, held, left_after
        return self

    @property
    def candidate(self):
        return self[0]

    @property
    def score(self) -> float:
        return self[1]


class Ranking(list):
    """Ranked candidates, best first, with the UNet evaluations they cost (``evaluations``, as in
    :attr:`AdaptiveMatrix.evaluations`) and the schedule (``None``: exhaustive)."""

    def __init__(self, entries=(), evaluations: dict[str, int] | None = None, schedule: str | None = None):
        super().__init__(entries)
        self.evaluations = evaluations or {}
        self.schedule = schedule
