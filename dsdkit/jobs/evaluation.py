"""`dsdkit eval`: score a benchmark's examples and report the benchmark's own metrics.

| dataset | metrics |
|---|---|
| ComVG | accuracy per split (subject / object / verb), their unweighted average, and overall |
| SugarCrepe | accuracy per subset, their unweighted average, and att / obj / rel (means of their subsets) |
| Winoground | text, image and group scores (Thrush et al.), overall and per tag |
| candidate sets (JSONL, RefCOCOg, VQA) | top-1 (top-5 where a set has > 5 candidates), per split or subset |
| labelled pairs (JSONL) | ROC-AUC and accuracy at the best threshold |

A candidate counts as chosen only if it scores strictly higher than every other candidate: ties count as wrong
(the authors' argmax counted ties in favour of the positive, which sits at index 0: their bug B7).

With ``adaptive`` (``dsdkit eval --adaptive``), candidate-set examples (image -> captions, caption -> images) are
ranked by successive elimination (:mod:`dsdkit.runtime.adaptive`): a candidate's rank is its place in the
elimination order (exact survivors by score first, then the eliminated by stage and partial mean), so top-1 is the
exact winner and top-5 beyond ``top_k`` comes from partial means. Groups and labelled pairs are scored exhaustively.
The report's ``meta["evaluations"]`` counts what ran against what exhaustive scoring would have run.

Pairs are scored in chunks across examples, so images and captions shared by several examples are encoded once
and unconditional passes are shared.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime.errors import ConfigError
from ..runtime.files import atomic_write_text
from .datasets import Dataset, Example, TaskKind

__all__ = ["EvalReport", "score_examples", "planned_evaluations", "compute_metrics", "evaluate", "write_report"]

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    dataset: str
    source: str
    split: str | None
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # rows and examples left out, with the reason
    evaluations: dict[str, int] = field(default_factory=dict)  # with adaptive: ran vs exhaustive (rank_examples)


def _chunks(examples: list[Example], chunk_pairs: int):
    """Consecutive chunks of examples with at most ``chunk_pairs`` pairs (one example at least), each as
    ``(images, texts, pairs, owners, keys)``: the chunk's distinct images and captions, its ``(image slot, text
    slot)`` pairs, the ``(example, i, j)`` each pair fills, and the images' sharing keys."""
    start = 0
    while start < len(examples):
        chunk, count = [], 0
        while start < len(examples) and (not chunk or count + len(examples[start].candidate_pairs()) <= chunk_pairs):
            chunk.append(start)
            count += len(examples[start].candidate_pairs())
            start += 1
        image_slot, text_slot, images, texts, pairs, owners = {}, {}, [], [], [], []
        for index in chunk:
            example = examples[index]
            for i, j in example.candidate_pairs():
                image, text = example.images[i], example.texts[j]
                # Paths are shared by value; in-memory images (PIL, arrays: unhashable) by identity.
                key = image if isinstance(image, str | os.PathLike) else id(image)
                if key not in image_slot:
                    image_slot[key] = len(images)
                    images.append(image)
                if text not in text_slot:
                    text_slot[text] = len(texts)
                    texts.append(text)
                pairs.append((image_slot[key], text_slot[text]))
                owners.append((index, i, j))
        yield images, texts, pairs, owners, list(image_slot)


def _chunk_plans(scorer, examples: list[Example], chunk_pairs: int) -> list[int]:
    """UNet evaluations each chunk is expected to run: the unconditional pass of images no earlier chunk had (when
    the config needs it) and one evaluation per pair and timestep."""
    seen, plans = set(), []
    for _, _, pairs, _, keys in _chunks(examples, chunk_pairs):
        plans.append(scorer.planned_evaluations(len(set(keys) - seen), len(pairs)))
        seen.update(keys)
    return plans


def planned_evaluations(scorer, examples: list[Example], chunk_pairs: int = 256) -> int:
    """UNet evaluations :func:`score_examples` runs for ``examples`` on a scorer with nothing cached (the total of
    its progress)."""
    return sum(_chunk_plans(scorer, examples, chunk_pairs))


def score_examples(
    scorer,
    examples: list[Example],
    chunk_pairs: int = 256,
    progress: Callable[[int], None] | None = None,
    terms: bool = False,
):
    """Score matrix ``[images, texts]`` of every example (only the pairs it needs; others are NaN), on either engine.

    With ``terms``, a dict of such matrix lists instead: ``score``, ``attention`` (the mean attention term over the
    scored layers) and ``denoise`` (the denoising term; 0 when it is off), all means over timesteps.

    ``progress(n)`` is called after each UNet batch with the evaluations it ran (the engine's progress callback),
    and, where a chunk ran fewer than planned (work the engine had cached), once more with the rest, so that the
    calls add up to :func:`planned_evaluations`.
    """
    names = ("score", "attention", "denoise") if terms else ("score",)
    mats = {name: [np.full((len(e.images), len(e.texts)), np.nan) for e in examples] for name in names}
    plans = _chunk_plans(scorer, examples, chunk_pairs) if progress is not None else None
    for number, (images, texts, pairs, owners, _) in enumerate(_chunks(examples, chunk_pairs)):
        if progress is None:
            out = scorer.score_pairs(images, texts, pairs)
        else:
            out = scorer.score_pairs(images, texts, pairs, progress=progress)
            if plans[number] > out.unet_evaluations:
                progress(plans[number] - out.unet_evaluations)
        values = {"score": out.scores}
        if terms:
            values["attention"] = out.layer_scores.mean(axis=-1)
            values["denoise"] = np.zeros(len(pairs)) if out.denoise is None else out.denoise
        for name, column in values.items():
            for (index, i, j), value in zip(owners, column, strict=True):
                mats[name][index][i, j] = value
    return mats if terms else mats["score"]


def rank_examples(
    scorer,
    examples: list[Example],
    schedule,
    top_k: int = 1,
    chunk_pairs: int = 4096,
    progress: Callable[[int], None] | None = None,
    shortlist=None,
) -> tuple[list[np.ndarray], list[int | None], dict[str, int]]:
    """Adaptive ranking of candidate-set examples (the others scored exhaustively, as :func:`score_examples`).

    ``shortlist`` (a :class:`~dsdkit.runtime.shortlist.Shortlister`): each example ranks only the candidates a CLIP
    model puts in its top K (``schedule`` ``None``: every shortlisted candidate at every timestep); a positive the
    shortlist misses ranks after every listed candidate.

    Returns each example's matrix (partial means for eliminated candidates), each candidate-set example's rank of
    its positive in the elimination order (``None`` for the others), and the evaluations spent (the keys of
    :data:`dsdkit.runtime.adaptive.EVALUATION_KEYS`).
    """
    from ..runtime.adaptive import EVALUATION_KEYS, Schedule, rank_matrix

    if schedule is None:  # every listed candidate at every timestep: one stage that keeps them all
        schedule = Schedule(keep=(1 << 30,), steps=(None,), name="exhaustive")

    spent = dict.fromkeys(EVALUATION_KEYS, 0)
    matrices = [np.full((len(e.images), len(e.texts)), np.nan) for e in examples]
    ranks: list[int | None] = [None] * len(examples)
    ranked_kinds = (TaskKind.image_to_text, TaskKind.text_to_image)
    others = [i for i, e in enumerate(examples) if e.kind not in ranked_kinds]
    if others:
        scored = score_examples(scorer, [examples[i] for i in others], progress=progress)
        for index, matrix in zip(others, scored, strict=True):
            matrices[index] = matrix
    for kind, per in ((TaskKind.image_to_text, "image"), (TaskKind.text_to_image, "caption")):
        members = [i for i, e in enumerate(examples) if e.kind is kind]
        start = 0
        while start < len(members):
            chunk, count = [], 0
            while start < len(members):
                size = examples[members[start]].num_candidates
                if chunk and count + size > chunk_pairs:
                    break
                chunk.append(members[start])
                count += size
                start += 1
            # One query slot per example (the engine's caches share equal images and captions anyway).
            if per == "image":
                queries = [examples[i].images[0] for i in chunk]
                pool, slot = _pool([t for i in chunk for t in examples[i].texts], key=lambda t: t)
                candidates = [[slot[t] for t in examples[i].texts] for i in chunk]
                ranked = _shortlisted(shortlist, queries, pool, candidates, per) if shortlist else candidates
                result = rank_matrix(scorer, queries, pool, top_k, schedule, "image", ranked, progress)
            else:
                queries = [examples[i].texts[0] for i in chunk]
                pool, slot = _pool([im for i in chunk for im in examples[i].images], key=_image_key)
                candidates = [[slot[_image_key(im)] for im in examples[i].images] for i in chunk]
                ranked = _shortlisted(shortlist, queries, pool, candidates, per) if shortlist else candidates
                result = rank_matrix(scorer, pool, queries, top_k, schedule, "caption", ranked, progress)
            for key in spent:
                spent[key] += result.evaluations[key]
            for q, index in enumerate(chunk):
                listed = candidates[q]
                row = result.scores[q, listed] if per == "image" else result.scores[listed, q]
                matrices[index] = row[None, :] if per == "image" else row[:, None]
                # The positive's place in the elimination order (pool slots, best first); one the shortlist left out
                # comes after every listed candidate.
                order = result.order(q).tolist()
                positive = listed[examples[index].positive]
                ranks[index] = order.index(positive) if positive in order else len(order)
    return matrices, ranks, spent


def _shortlisted(shortlist, queries: list, pool: list, candidates: list[list[int]], per: str) -> list[list[int]]:
    """Each query's candidates restricted to its CLIP top K among them (queries and pool embedded once)."""
    from ..runtime.images import as_pil
    from ..runtime.shortlist import top_k

    embedder = shortlist.embedder
    if per == "image":
        query_vectors = embedder.embed_images([as_pil(q) for q in queries])
        pool_vectors = embedder.embed_texts(pool)
    else:
        query_vectors = embedder.embed_texts(queries)
        pool_vectors = embedder.embed_images([as_pil(p) for p in pool])
    out = []
    for q, listed in enumerate(candidates):
        chosen, _ = top_k(query_vectors[q : q + 1], pool_vectors[listed], shortlist.k)
        out.append([listed[int(c)] for c in chosen[0]])
    return out


def _image_key(image):
    return image if isinstance(image, str | os.PathLike) else id(image)


def _pool(items: list, key) -> tuple[list, dict]:
    """Distinct items in first-seen order, and each key's slot."""
    pool, slot = [], {}
    for item in items:
        if key(item) not in slot:
            slot[key(item)] = len(pool)
            pool.append(item)
    return pool, slot


def _rank(scores: np.ndarray, positive: int) -> int:
    """How many other candidates score at least as high as the positive (0 = strictly best)."""
    others = np.delete(scores, positive)
    return int((others >= scores[positive]).sum())


def _candidate_scores(example: Example, matrix: np.ndarray) -> np.ndarray:
    return matrix[0, :] if example.kind is TaskKind.image_to_text else matrix[:, 0]


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(greater / (len(positives) * len(negatives)))


def compute_metrics(
    fmt: str, examples: list[Example], matrices: list[np.ndarray], given_ranks: list[int | None] | None = None
) -> dict[str, float]:
    """The benchmark's own metrics (see the module docstring), as a flat ``{name: value}`` dict.

    ``given_ranks`` (adaptive ranking) replaces the rank read from a candidate-set example's scores where not
    ``None``: its positive's place in the elimination order."""
    metrics: dict[str, float] = {}
    given = {id(e): r for e, r in zip(examples, given_ranks or [], strict=False) if r is not None}
    by_kind: dict[TaskKind, list[tuple[Example, np.ndarray]]] = defaultdict(list)
    for example, matrix in zip(examples, matrices, strict=True):
        by_kind[example.kind].append((example, matrix))
    candidates = by_kind[TaskKind.image_to_text] + by_kind[TaskKind.text_to_image]
    if candidates:
        metrics.update(_candidate_metrics(fmt, candidates, given))
        metrics["examples"] = float(len(candidates))
    if by_kind[TaskKind.group]:
        metrics.update(_group_metrics(by_kind[TaskKind.group]))
        metrics["examples"] = metrics.get("examples", 0.0) + len(by_kind[TaskKind.group])
    if by_kind[TaskKind.pair]:
        metrics.update(_pair_metrics(by_kind[TaskKind.pair]))
        metrics["examples"] = metrics.get("examples", 0.0) + len(by_kind[TaskKind.pair])
    return metrics


def _candidate_metrics(fmt: str, candidates, given: dict[int, int]) -> dict[str, float]:
    """Candidate sets (image -> captions, caption -> images): each benchmark's accuracy or top-1/top-5."""
    ranks, per_split = [], defaultdict(list)
    for example, matrix in candidates:
        rank = given.get(id(example))
        if rank is None:
            rank = _rank(_candidate_scores(example, matrix), example.positive)
        ranks.append(rank)
        per_split[example.split or "all"].append(rank)
    if fmt in ("comvg", "sugarcrepe"):
        return _split_accuracy(fmt, per_split, np.array(ranks))
    return _top_k_metrics(candidates, ranks)


def _split_accuracy(fmt: str, per_split: dict[str, list[int]], ranks: np.ndarray) -> dict[str, float]:
    metrics: dict[str, float] = {}
    split_accuracy = {s: float(np.mean(np.array(r) == 0)) for s, r in sorted(per_split.items())}
    for split, accuracy in split_accuracy.items():
        metrics[f"accuracy/{split}"] = accuracy
    metrics["accuracy/average"] = float(np.mean(list(split_accuracy.values())))
    if fmt == "sugarcrepe":
        # The att / obj / rel grouping under which SugarCrepe results are usually reported.
        for group in ("att", "obj", "rel"):
            members = [a for s, a in split_accuracy.items() if s.endswith(f"_{group}")]
            if members:
                metrics[f"accuracy/{group}"] = float(np.mean(members))
    metrics["accuracy/overall"] = float(np.mean(ranks == 0))
    return metrics


def _top_k_metrics(candidates, ranks: list[int]) -> dict[str, float]:
    # Top-5 says nothing where no candidate set has more than 5 candidates (it would always be 1).
    metrics: dict[str, float] = {}
    ranks_array = np.array(ranks)
    large = np.array([e.num_candidates for e, _ in candidates]) > 5
    metrics["top1"] = float(np.mean(ranks_array < 1))
    if large.any():
        metrics["top5"] = float(np.mean(ranks_array[large] < 5))
    per_subset: dict[str, list[tuple[int, int]]] = defaultdict(list)
    by_split: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (example, _), rank in zip(candidates, ranks, strict=True):
        by_split[example.split or "all"].append((rank, example.num_candidates))
        if example.subset is not None:
            per_subset[example.subset].append((rank, example.num_candidates))
    groups_of = dict(per_subset) if per_subset else (dict(by_split) if len(by_split) > 1 else {})
    for name, entries in sorted(groups_of.items()):
        entry_ranks = np.array([rank for rank, _ in entries])
        entry_large = np.array([size > 5 for _, size in entries])
        metrics[f"top1/{name}"] = float(np.mean(entry_ranks < 1))
        if entry_large.any():
            metrics[f"top5/{name}"] = float(np.mean(entry_ranks[entry_large] < 5))
    return metrics


def _group_metrics(groups) -> dict[str, float]:
    """2 images x 2 captions (Winoground's text, image and group scores), overall and per tag."""
    metrics: dict[str, float] = {}
    tagged: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for example, m in groups:
        text = m[0, 0] > m[0, 1] and m[1, 1] > m[1, 0]  # each image prefers its own caption
        image = m[0, 0] > m[1, 0] and m[1, 1] > m[0, 1]  # each caption prefers its own image
        tagged["all"].append((text, image))
        tag = example.subset or example.split  # Winoground's tags are its splits; the demo world's, subsets
        if tag:
            tagged[tag].append((text, image))
    for tag, results in tagged.items():
        prefix = "" if tag == "all" else f"/{tag}"
        array = np.array(results, dtype=bool)
        metrics[f"text{prefix}"] = float(array[:, 0].mean())
        metrics[f"image{prefix}"] = float(array[:, 1].mean())
        metrics[f"group{prefix}"] = float((array[:, 0] & array[:, 1]).mean())
    return metrics


def _pair_metrics(pairs) -> dict[str, float]:
    """Labelled pairs: AUC and the accuracy at the best threshold."""
    scores = np.array([m[0, 0] for _, m in pairs])
    labels = np.array([e.label for e, _ in pairs])
    thresholds = np.unique(scores)
    return {
        "auc": _auc(scores, labels),
        "accuracy/best_threshold": float(max(np.mean((scores >= t) == (labels == 1)) for t in thresholds)),
    }


def evaluate(
    scorer,
    dataset: Dataset,
    split: str | None = None,
    max_examples: int | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    subsets: list[str] | None = None,
    adaptive=None,
    shortlist=None,
) -> EvalReport:
    """Score ``dataset`` (one split of it, only ``subsets`` if given, optionally the first ``max_examples``) and
    compute its metrics.

    ``progress(total, done) -> advance`` makes a reporter for the job's ``total`` UNet evaluations
    (:func:`planned_evaluations`); ``advance(n)`` is called as each UNet batch finishes. ``shortlist`` (a
    :class:`~dsdkit.runtime.shortlist.Shortlister`): candidate sets are ranked within a CLIP model's top K only
    (:func:`rank_examples`); the report's ``shortlist`` says how often the positive was shortlisted. An adaptive
    ranking keeps each set's winner exact (top-1: what the ranking metrics need exactly).
    """
    examples = dataset.select(split)
    if subsets:
        known = {e.subset for e in examples}
        unknown = sorted(set(subsets) - known)
        if unknown:
            names = ", ".join(sorted(s for s in known if s)) or "none"
            raise ConfigError(f"{dataset.source}: no examples in subset(s) {', '.join(unknown)} (subsets: {names})")
        wanted = set(subsets)
        examples = [e for e in examples if e.subset in wanted]
    if max_examples is not None:
        examples = examples[:max_examples]
    # The progress unit is a UNet evaluation, reported per batch (examples differ in cost by their pair count).
    advance = progress(planned_evaluations(scorer, examples), 0) if progress is not None else None
    given_ranks, spent = None, {}
    if adaptive is not None or shortlist is not None:
        matrices, given_ranks, spent = rank_examples(
            scorer, examples, adaptive, 1, progress=advance, shortlist=shortlist
        )
    else:
        matrices = score_examples(scorer, examples, progress=advance)
    metrics = compute_metrics(dataset.format, examples, matrices, given_ranks)
    if shortlist is not None and given_ranks is not None:
        listed = [
            rank < min(shortlist.k, example.num_candidates)
            for example, rank in zip(examples, given_ranks, strict=True)
            if rank is not None
        ]
        if listed:  # the shortlist's recall: how often the positive was among the candidates DSD ranked
            metrics["shortlist_recall"] = float(np.mean(listed))
    records = []
    for number, (example, matrix) in enumerate(zip(examples, matrices, strict=True)):
        record = {
            "id": example.id,
            "split": example.split,
            "subset": example.subset,
            "kind": example.kind.value,
            "scores": [[None if np.isnan(v) else float(v) for v in row] for row in matrix],
        }
        if example.positive is not None:
            record["positive"] = example.positive
            record["rank"] = (
                given_ranks[number]
                if given_ranks is not None and given_ranks[number] is not None
                else _rank(_candidate_scores(example, matrix), example.positive)
            )
        if example.label is not None:
            record["label"] = example.label
        records.append(record)
    skipped = [{"where": where, "reason": why} for where, why in dataset.skipped]
    return EvalReport(dataset.format, str(dataset.source), split, metrics, records, skipped=skipped, evaluations=spent)


def write_report(report: EvalReport, path: str | os.PathLike) -> None:
    """Metrics and per-example scores as one JSON file (atomically)."""

    document = {
        "dataset": report.dataset,
        "source": report.source,
        "split": report.split,
        "metrics": report.metrics,
        "meta": report.meta,
        "skipped": report.skipped,
        **({"evaluations": report.evaluations} if report.evaluations else {}),
        "examples": report.examples,
    }
    atomic_write_text(path, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
