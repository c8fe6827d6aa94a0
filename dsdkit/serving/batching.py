"""Dynamic batching across concurrent requests, the one mechanism both runners use (asyncio, no Ray).

A request's (image, caption) pairs are cut into :class:`Piece` objects of at most ``max_items`` work items (pairs x
timesteps; :func:`split_pairs`). :class:`Batcher` queues pieces per request and runs *scorer batches* on one
thread of its own, one batch at a time: a batch takes pieces round-robin across the requests waiting (one piece
of each in turn), up to ``max_items``, waiting at most ``wait_s`` after its first piece for more to arrive. So a
small request is in the next batch even behind a large one, a request that gives up (deadline, disconnect) takes
its queued pieces with it, and the work queued for all requests together is bounded (:class:`Busy` beyond it).
Jobs that cannot share a batch (heat maps) take their turn alone (:meth:`Batcher.run_alone`).

A pair's score does not depend on what else is in its batch (the scoring contract), so a request gets the scores it
would get alone, within the backend's batch tolerance.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime.errors import ConfigError

__all__ = ["Piece", "Busy", "Batcher", "split_pairs", "combine_pieces", "batch_work"]


@dataclass
class Piece:
    """Some of one request's pairs, as a unit of a scorer batch: ``pairs`` index ``images`` and ``texts`` (the
    request's encodings), scored at the timestep indices ``steps`` (``None``: all of the engine's ``steps_count``);
    :attr:`work` = pairs x timesteps is what a batch's size counts."""

    images: Sequence[Any]  # ImageEncoding
    texts: Sequence[Any]  # TextEncoding
    pairs: list[tuple[int, int]]
    steps: int  # how many timesteps each pair is scored at
    engine: Any = None
    step_indices: tuple[int, ...] | None = None  # None: every timestep of the engine

    @property
    def work(self) -> int:
        return len(self.pairs) * self.steps


def batch_work(pieces: Sequence[Piece]) -> int:
    """A batch's size: its pieces' work items (pairs x timesteps)."""
    return sum(piece.work for piece in pieces)


def split_pairs(pairs: Sequence[tuple[int, int]], steps: int, max_items: int) -> list[list[tuple[int, int]]]:
    """``pairs`` cut, in order, into pieces of at most ``max_items`` work items (``steps`` per pair)."""
    if steps > max_items:
        raise ConfigError(
            f"max_batch_items {max_items} is less than one pair's work ({steps} timesteps); give at least {steps}"
        )
    size = max_items // steps
    return [list(pairs[begin : begin + size]) for begin in range(0, len(pairs), size)]


def combine_pieces(pieces: Sequence[Piece]) -> tuple[list, list, list[tuple[int, int]], list[np.ndarray]]:
    """One scoring call for many pieces: the images and captions they use (each once), the distinct pairs among
    theirs (a pair asked for by several requests is scored once), and per piece the positions of its pairs' scores.

    Returns ``(images, texts, pairs, where)``: ``scores[where[n]]`` are piece ``n``'s scores, in its order.
    """
    images: dict[str, int] = {}
    texts: dict[str, int] = {}
    image_list, text_list = [], []
    unique: dict[tuple[int, int], int] = {}
    where = []
    for piece in pieces:
        positions = []
        for i, j in piece.pairs:
            image, text = piece.images[i], piece.texts[j]
            if image.key not in images:
                images[image.key] = len(image_list)
                image_list.append(image)
            if text.text not in texts:
                texts[text.text] = len(text_list)
                text_list.append(text)
            pair = (images[image.key], texts[text.text])
            positions.append(unique.setdefault(pair, len(unique)))
        where.append(np.asarray(positions, dtype=np.int64))
    return image_list, text_list, list(unique), where


class Busy(Exception):
    """The scorer's queue holds too much work to take a request's pieces: answer 503 now rather than let it wait."""


@dataclass
class _Entry:
    owner: int
    work: int
    future: asyncio.Future
    piece: Piece | None = None
    job: Callable[[], Any] | None = None  # a solo job (run_alone)
    arrived: float = field(default_factory=time.monotonic)
    queued: bool = True


class Batcher:
    """Scorer batches over the pieces of concurrent requests (see the module doc).

    Args:
        run_batch: ``run_batch(pieces) -> one result per piece``, called on the batcher's own thread.
        max_items: a batch's size in work items (a piece never exceeds it: :func:`split_pairs`).
        wait_s: how long a batch that is not full waits after its first piece for more.
        max_queued: work items that may wait at once, all requests together; :meth:`submit` raises :class:`Busy`
            for pieces that would go over it.

    Created outside any event loop; its worker task starts on the loop of the first :meth:`submit`.
    """

    def __init__(self, run_batch: Callable[[list[Piece]], list[Any]], max_items: int, wait_s: float, max_queued: int):
        self.run_batch = run_batch
        self.max_items = max_items
        self.wait_s = float(wait_s)
        self.max_queued = max_queued
        self.queued_work = 0
        self._queues: dict[int, deque[_Entry]] = {}
        self._owners = itertools.count()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dsdkit-scorer")
        self._worker: asyncio.Task | None = None
        self._changed: asyncio.Event | None = None

    def new_owner(self) -> int:
        """An id for one request's pieces (they are taken round-robin by owner)."""
        return next(self._owners)

    async def submit(self, pieces: Sequence[Piece], owner: int) -> list[Any]:
        """Score ``pieces`` in batches with other requests' pieces; their results, in order.

        Raises:
            Busy: the queue cannot take this much work now (nothing was queued).
        """
        if not pieces:
            return []
        work = sum(piece.work for piece in pieces)
        entries = [self._entry(owner, piece.work, piece=piece) for piece in pieces]
        self._enqueue(entries, work)
        return await self._results(entries)

    async def run_alone(self, job: Callable[[], Any], work: int, owner: int) -> Any:
        """Run ``job()`` on the scorer's thread in its turn, alone (no batch is running beside it)."""
        entry = self._entry(owner, work, job=job)
        self._enqueue([entry], work)
        return (await self._results([entry]))[0]

    def close(self) -> None:
        """Stop the worker and the scorer thread (queued pieces are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
        for queue in self._queues.values():
            for entry in queue:
                entry.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- inside ----------------------------------------------------------------------------------------------------

    def _entry(self, owner: int, work: int, piece: Piece | None = None, job=None) -> _Entry:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._changed = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="dsdkit-batcher")
        return _Entry(owner, work, loop.create_future(), piece, job)

    def _enqueue(self, entries: list[_Entry], work: int) -> None:
        if self.queued_work + work > self.max_queued:
            raise Busy(
                f"the scorer has {self.queued_work:,} work items queued; {work:,} more would pass the limit of "
                f"{self.max_queued:,} (max_queued_work)"
            )
        for entry in entries:
            self._queues.setdefault(entry.owner, deque()).append(entry)
            entry.future.add_done_callback(lambda _, entry=entry: self._forget(entry))
        self.queued_work += work
        self._changed.set()

    def _forget(self, entry: _Entry) -> None:
        """A queued entry whose request gave up (its future cancelled) leaves the queue at once."""
        if not entry.queued:
            return
        entry.queued = False
        self.queued_work -= entry.work
        queue = self._queues.get(entry.owner)
        if queue is not None:
            try:
                queue.remove(entry)
            except ValueError:
                pass
            if not queue:
                del self._queues[entry.owner]

    async def _results(self, entries: list[_Entry]) -> list[Any]:
        try:
            return list(await asyncio.gather(*(entry.future for entry in entries)))
        except BaseException:
            for entry in entries:  # this request gave up or failed: its other pieces are not scored
                entry.future.cancel()
            raise

    def _take(self) -> list[_Entry]:
        """The next batch: round-robin over the waiting requests, one entry of each per round, while they fit; a
        solo job at the head of the rotation goes alone. Served requests move to the end of the rotation."""
        taken: list[_Entry] = []
        work = 0
        progress = True
        while progress and self._queues:
            progress = False
            for owner in list(self._queues):
                queue = self._queues.get(owner)
                if not queue:
                    continue
                entry = queue[0]
                if entry.job is not None:
                    if taken:
                        continue
                    self._pop(entry)
                    return [entry]
                if taken and work + entry.work > self.max_items:
                    continue
                self._pop(entry)
                taken.append(entry)
                work += entry.work
                progress = True
                if owner in self._queues:  # to the end of the rotation: the next batch starts with another request
                    self._queues[owner] = self._queues.pop(owner)
                if work >= self.max_items:
                    return taken
        return taken

    def _pop(self, entry: _Entry) -> None:
        queue = self._queues[entry.owner]
        queue.popleft()
        if not queue:
            del self._queues[entry.owner]
        entry.queued = False
        self.queued_work -= entry.work

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queues:
                self._changed.clear()
                await self._changed.wait()
                continue
            first = min(queue[0].arrived for queue in self._queues.values())
            remaining = first + self.wait_s - time.monotonic()
            if self.queued_work < self.max_items and remaining > 0:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                continue  # look again: more pieces, a full batch, or the wait is over
            batch = self._take()
            if not batch:
                continue
            try:
                if batch[0].job is not None:
                    results = [await loop.run_in_executor(self._executor, batch[0].job)]
                else:
                    results = await loop.run_in_executor(self._executor, self.run_batch, [e.piece for e in batch])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the batch's requests answer it; the batcher goes on
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                continue
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
