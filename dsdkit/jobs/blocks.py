"""How one chunk of a ``match`` job is scored: every pair at every timestep, the listed pairs only, or adaptive
ranking by successive elimination. Each is a :class:`BlockScorer`: ``score(rows, positions, encodings)`` returns the
chunk's rows of the job's matrix, and every scorer counts the UNet evaluations it spent beside what exhaustive
scoring of the same cells would have spent (:data:`~dsdkit.runtime.adaptive.EVALUATION_KEYS`).

A "detailed" block holds three numbers per cell: the score, the timesteps the pair held, and the adaptive stage
after which it left (cells that are no candidate: NaN, 0, 0), so partial scores stay apart from exact ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..runtime.adaptive import EVALUATION_KEYS, rank_matrix
from ..runtime.encodings import ImageEncoding, ScoreOutput, TextEncoding
from ..runtime.engine import Engine
from .specs import MatchOptions

__all__ = ["EvaluationCounter", "BlockScorer", "ExhaustiveBlocks", "PairBlocks", "AdaptiveBlocks", "block_scorer"]


class EvaluationCounter:
    """The progress callback of a job: counts evaluations and forwards them to the user's reporter; also what the
    job spent by kind (:data:`~dsdkit.runtime.adaptive.EVALUATION_KEYS`)."""

    def __init__(self, advance: Callable[[int], None] | None = None, spent: dict[str, int] | None = None):
        self.advance = advance
        self.evaluations = 0
        self.spent = {key: 0 for key in EVALUATION_KEYS} if spent is None else spent

    def __call__(self, n: int) -> None:
        self.evaluations += n
        if self.advance is not None:
            self.advance(n)

    def count(self, out: ScoreOutput, exhaustive_conditional: int) -> None:
        """Add what a scoring call spent; its unconditional passes are what exhaustive scoring would spend too."""
        unconditional = out.unconditional_evaluations
        self.spent["conditional"] += out.unet_evaluations - unconditional
        self.spent["unconditional"] += unconditional
        self.spent["exhaustive_conditional"] += exhaustive_conditional
        self.spent["exhaustive_unconditional"] += unconditional


class BlockScorer:
    """Scores one chunk of images against the job's captions."""

    detailed = False

    def __init__(self, engine: Engine, texts: Sequence[TextEncoding], counter: EvaluationCounter):
        self.engine, self.texts, self.counter = engine, list(texts), counter

    def empty(self, rows: slice) -> np.ndarray:
        shape = (rows.stop - rows.start, len(self.texts))
        if not self.detailed:
            return np.full(shape, np.nan)
        block = np.zeros((*shape, 3))
        block[..., 0] = np.nan
        return block

    def score(self, rows: slice, positions: list[int], encoded: list[ImageEncoding]) -> np.ndarray:
        raise NotImplementedError


class ExhaustiveBlocks(BlockScorer):
    """Every pair at every timestep; optionally the attention term of every layer (``layers[N, M, L]``)."""

    def __init__(self, engine, texts, counter, layers: np.ndarray | None = None):
        super().__init__(engine, texts, counter)
        self.layers = layers
        self.unique_texts = len({e.text for e in self.texts})

    def score(self, rows, positions, encoded):
        block = self.empty(rows)
        if not encoded:
            return block
        out = self.engine.score_encoded_matrix(encoded, self.texts, progress=self.counter)
        block[np.asarray(positions) - rows.start] = out.scores
        if self.layers is not None:
            self.layers[positions] = out.layer_scores
        self.counter.count(out, len(positions) * self.unique_texts * len(out.steps))
        return block


class _Lists:
    """Per query of a chunk, its candidates (local image positions or caption indices)."""

    def __init__(self, per: str, num_texts: int, per_image=None, per_caption=None):
        self.per, self.num_texts = per, num_texts
        self.per_image, self.per_caption = per_image, per_caption

    def of(self, positions: list[int]) -> list[list[int]]:
        if self.per == "image":
            every = list(range(self.num_texts))
            return [self.per_image[index] if self.per_image is not None else every for index in positions]
        local = {index: position for position, index in enumerate(positions)}
        if self.per_caption is None:
            return [list(local.values()) for _ in range(self.num_texts)]
        return [[local[i] for i in self.per_caption[j] if i in local] for j in range(self.num_texts)]


class PairBlocks(BlockScorer):
    """The listed pairs only, each at every timestep (the other cells stay empty)."""

    detailed = True

    def __init__(self, engine, texts, counter, lists: _Lists):
        super().__init__(engine, texts, counter)
        self.lists = lists

    def score(self, rows, positions, encoded):
        block = self.empty(rows)
        lists = self.lists.of(positions) if encoded else []
        if self.lists.per == "image":  # per image: its listed captions
            here = [(q, j) for q, listed in enumerate(lists) for j in listed]
        else:  # per caption (a shortlist of each caption's images): its listed local image positions
            here = sorted((q, j) for j, listed in enumerate(lists) for q in listed)
        if not here:
            return block
        out = self.engine.score_encoded_pairs(encoded, self.texts, here, progress=self.counter)
        self.counter.count(out, len(here) * len(out.steps))
        rows_at = np.asarray(positions) - rows.start
        for (q, j), score in zip(here, out.scores, strict=True):
            block[rows_at[q], j] = (score, len(out.steps), 0)
        return block


class AdaptiveBlocks(BlockScorer):
    """Successive elimination per query (an image ranking its captions, or a caption ranking the chunk's images):
    the ``top_k`` best keep exact scores, the others partial means."""

    detailed = True

    def __init__(self, engine, texts, counter, lists: _Lists, options: MatchOptions):
        super().__init__(engine, texts, counter)
        self.lists, self.options = lists, options

    def score(self, rows, positions, encoded):
        block = self.empty(rows)
        if not encoded:
            return block
        options = self.options
        ranked = rank_matrix(
            self.engine,
            encoded,
            self.texts,
            options.top_k,
            options.adaptive,
            options.per,
            self.lists.of(positions),
            progress=self.counter,
        )
        for key in EVALUATION_KEYS:
            self.counter.spent[key] += ranked.evaluations[key]
        rows_at = np.asarray(positions) - rows.start
        block[rows_at, :, 0] = ranked.scores
        block[rows_at, :, 1] = ranked.held
        block[rows_at, :, 2] = ranked.left_after
        return block


def block_scorer(
    engine: Engine,
    texts: Sequence[TextEncoding],
    counter: EvaluationCounter,
    options: MatchOptions,
    pairs=None,
    num_images: int = 0,
) -> BlockScorer:
    """The block scorer a job's options ask for (``pairs``: the job's :class:`~dsdkit.runtime.pairs.PairList`)."""
    lists = _Lists(
        options.per,
        len(texts),
        pairs.candidates_per_image(num_images) if pairs is not None else None,
        pairs.candidates_per_caption(len(texts)) if pairs is not None else None,
    )
    if options.adaptive is not None:
        return AdaptiveBlocks(engine, texts, counter, lists, options)
    if pairs is not None:
        return PairBlocks(engine, texts, counter, lists)
    layers = None
    if options.per_layer:
        layers = np.full((num_images, len(texts), len(engine.layer_names)), np.nan)
    return ExhaustiveBlocks(engine, texts, counter, layers)
