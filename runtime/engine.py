"""The one engine interface behind every command: the PyTorch :class:`~dsdkit.pytorch.scorer.Scorer` and the bundle
:class:`~dsdkit.runtime.matcher.Matcher` are both an :class:`Engine`.

Everything that does not depend on *how* a UNet runs lives here, once, torch-free:

- per image, once: preprocessing, then the engine's image encoder, cached by pixel content (bounded);
- per caption, once: tokenizing, then the engine's text encoder, cached by caption;
- per (image, timestep), once, when the config needs it: the empty caption's terms (the unconditional pass);
- per (pair, timestep): one UNet evaluation, work items packed into batches of :attr:`Engine.batch_size`;
- combining terms (:func:`~dsdkit.runtime.scoring.combine_terms`), duplicates scored once, matrices, ranking.

An engine implements the primitives :meth:`Engine._encode_pixel_batch`, :meth:`Engine._encode_token_batch`,
:meth:`Engine._evaluate` and :meth:`Engine.metadata`, and sets the attributes listed on :class:`Engine`. Scores
come back as a :class:`ScoreOutput` holding the **per-timestep** terms, so a caller can combine any subset of
timesteps (:meth:`ScoreOutput.at`), or ask for a subset only (the ``steps`` argument of the scoring methods).
A pair's score never depends on what else is scored with it: every work item is evaluated on its own.

Threads: one engine may be called from any number of threads at once (see :class:`Engine`); its caches are
:class:`SharedCache` objects, locked only to look up and store, so the engines' heavy work runs in parallel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .adaptive import Ranked, Ranking, rank_matrix
from .config import ScoringConfig
from .decode_warnings import collecting
from .encodings import ImageEncoding, ProgressCallback, ScoreOutput, TextEncoding
from .errors import ConfigError, InputError
from .images import ImageInput, preprocess_image
from .scoring import combine_terms
from .tokenizer import TokenizedText

__all__ = [
    "Engine",
    "EngineIdentity",
    "EngineDescription",
    "ScoreOutput",
    "ImageEncoding",
    "TextEncoding",
    "ProgressCallback",
    "SharedCache",
    "held_memory",
    "chunk_slices",
]


def chunk_slices(total: int, size: int, start: int = 0) -> Iterator[slice]:
    """Consecutive ``slice``s of at most ``size`` items covering ``start..total`` (the one chunking rule)."""
    if size < 1:
        raise ConfigError(f"chunk size must be >= 1, got {size}")
    for begin in range(start, total, size):
        yield slice(begin, min(begin + size, total))


# What a waiter receives when the thread computing its key failed (it then computes the key itself).
_FAILED = object()
# The empty caption's key in the caption cache: not a string, so no caption can collide with it.
_EMPTY = None


def held_memory(value) -> tuple[dict[tuple, int], int]:
    """The memory an engine's cached value holds: its arrays' (numpy or torch) whole buffers by identity, and a
    nominal 64 bytes for anything else, through tuples, lists and dataclasses; ``(buffers, other_bytes)``.

    An engine's outputs are rows of one batch's array, and the whole array lives as long as any row does: a view
    counts the buffer it lives in, once however many cached views share it (:class:`SharedCache` counts each
    buffer once), so a byte bound bounds the memory actually kept.
    """
    buffers: dict[tuple, int] = {}
    other = 0
    todo = [value]
    while todo:
        item = todo.pop()
        storage = getattr(item, "untyped_storage", None)
        if callable(storage):  # a torch tensor (torch is never imported here)
            data = storage()
            buffers[("torch", data.data_ptr() or id(data))] = int(data.nbytes())
        elif isinstance(item, np.ndarray):
            while isinstance(item.base, np.ndarray):
                item = item.base
            buffers[("numpy", id(item))] = int(item.nbytes)  # the root stays alive while a view of it is cached
        elif isinstance(item, (tuple, list)):
            todo.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            todo.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        else:
            other += 64
    return buffers, other


class SharedCache:
    """A cache that any number of threads read and fill at once (each engine's images, captions and unconditional
    terms).

    A missing key is computed by the first thread that asks for it; threads that ask for the same key meanwhile wait
    for that result instead of computing it again, and keys that no other thread is computing are computed by each
    thread at the same time. The lock is held only to look up, store and evict, never while computing, so the
    computing (VAE, text encoder, UNet or graph runs) of different threads runs in parallel. When the computing
    thread fails, the error is its own call's: nothing is stored, and each waiter computes the key itself.
    Entries are kept least recently used first, for :meth:`evict` and for the byte bound.

    ``max_bytes`` (also :meth:`bound`): the memory the entries hold (:func:`held_memory`, each buffer once) is kept
    at or under it, least recently used out first (``None``: no bound, the default; a long-lived server bounds its
    engine's caches, a job needs none). A call gets its values from the fetch itself, so an entry evicted meanwhile
    never fails it.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._values: dict[Any, Any] = {}
        self._flights: dict[Any, Future] = {}  # key -> the result of the thread computing it now
        # While a byte bound is set: per entry its buffers and other bytes; per buffer its size and how many hold it.
        self._held: dict[Any, tuple[dict[tuple, int], int]] = {}
        self._buffers: dict[tuple, list[int]] = {}
        self._bytes = 0
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key) -> bool:
        return key in self._values

    @property
    def bytes(self) -> int:
        """The memory the entries hold (0 while no byte bound is set: it is measured only for a bound)."""
        return self._bytes

    def bound(self, max_bytes: int | None) -> None:
        """Set (or with ``None`` lift) the byte bound, evicting least recently used entries now to meet it."""
        with self._lock:
            self.max_bytes = max_bytes
            self._held, self._buffers, self._bytes = {}, {}, 0
            if max_bytes is not None:
                for key, value in self._values.items():
                    self._count(key, value)
                self._trim()

    def _count(self, key, value, held=None) -> None:  # under the lock
        buffers, other = self._held[key] = held or held_memory(value)
        self._bytes += other
        for buffer, size in buffers.items():
            entry = self._buffers.get(buffer)
            if entry is None:
                self._buffers[buffer] = [size, 1]
                self._bytes += size
            else:
                entry[1] += 1

    def _remove(self, key) -> None:  # under the lock
        del self._values[key]
        held = self._held.pop(key, None)
        if held is None:
            return
        buffers, other = held
        self._bytes -= other
        for buffer in buffers:
            entry = self._buffers[buffer]
            entry[1] -= 1
            if entry[1] == 0:
                self._bytes -= entry[0]
                del self._buffers[buffer]

    def _store(self, key, value) -> None:  # under the lock
        if self.max_bytes is None:
            self._values[key] = value
            return
        held = held_memory(value)
        if held[1] + sum(n for b, n in held[0].items() if b not in self._buffers) > self.max_bytes:
            return  # alone over the bound: not kept, rather than emptying the cache for it
        self._values[key] = value
        self._count(key, value, held)
        self._trim()

    def _trim(self) -> None:  # under the lock
        while self.max_bytes is not None and self._bytes > self.max_bytes and self._values:
            self._remove(next(iter(self._values)))  # the least recently used

    def items(self) -> list[tuple[Any, Any]]:
        with self._lock:
            return list(self._values.items())

    def fetch(self, keys, compute: Callable[[list], Sequence[Any]]) -> dict[Any, Any]:
        """The values of ``keys`` (duplicates allowed): cached ones, ones another thread is computing (waited
        for), and the rest from ``compute(missing keys) -> their values, in order``, run here outside the lock."""
        found: dict[Any, Any] = {}
        theirs: dict[Any, Future] = {}
        mine: list = []
        with self._lock:
            for key in dict.fromkeys(keys):
                if key in self._values:
                    found[key] = self._values[key] = self._values.pop(key)  # used: now the most recent
                elif key in self._flights:
                    theirs[key] = self._flights[key]
                else:
                    self._flights[key] = Future()
                    mine.append(key)
        if mine:
            computed: dict[Any, Any] = {}
            try:
                computed = dict(zip(mine, compute(mine), strict=True))
            finally:
                # Always settle this thread's flights, so that an error here never leaves a waiter waiting.
                with self._lock:
                    for key in mine:
                        value = computed.get(key, _FAILED)
                        if value is not _FAILED:
                            self._store(key, value)
                        self._flights.pop(key).set_result(value)
            found.update(computed)
        for key, flight in theirs.items():
            value = flight.result()  # never raises: failures arrive as _FAILED
            found[key] = self.fetch([key], compute)[key] if value is _FAILED else value
        return found

    def evict(self, limit: int, keep: set) -> list:
        """Drop the least recently used entries beyond ``max(limit, len(keep))``, never one in ``keep``; returns
        those dropped."""
        with self._lock:
            excess = len(self._values) - max(limit, len(keep))
            if excess <= 0:
                return []
            gone = [key for key in self._values if key not in keep][:excess]
            for key in gone:
                self._remove(key)
            return gone

    def discard_where(self, predicate: Callable[[Any], bool]) -> None:
        """Drop every entry whose key satisfies ``predicate``."""
        with self._lock:
            for key in [key for key in self._values if predicate(key)]:
                self._remove(key)


@dataclass(frozen=True)
class EngineIdentity:
    """What, besides the inputs, makes an engine's numbers: result fingerprints (``--resume``) and sharded jobs
    compare it (a worker whose engine differs from the job's is refused).

    Attributes:
        engine: ``"pytorch"`` or ``"bundle"``.
        weights: sha256 of the model's UNet config and weights (PyTorch) or of the bundle's scorer graph.
        scoring: the resolved scoring config (:meth:`ScoringConfig.to_dict`).
        timesteps: the timestep table.
        adapters: the adapter file (PyTorch; a bundle's adapter is folded into its graphs).
    """

    engine: str
    weights: str
    scoring: dict[str, Any]
    timesteps: tuple[int, ...]
    adapters: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; its keys are the ones partial results and job manifests of earlier versions recorded, so
        their fingerprints still match."""
        if self.engine == "pytorch":
            return {
                "engine": "pytorch",
                "model": self.weights,
                "scoring": self.scoring,
                "adapters": self.adapters,
                "timesteps": list(self.timesteps),
            }
        return {"engine": "bundle", "scorer": self.weights, "scoring": self.scoring, "timesteps": list(self.timesteps)}


@dataclass(frozen=True)
class EngineDescription:
    """What result files and messages say about an engine, the same fields for both backends.

    Attributes:
        backend: ``"pytorch"`` or the bundle's runner (``"onnxruntime"``, ``"tensorrt"``).
        label: one line for messages, e.g. ``pytorch (cpu, fp32)``.
        model: the model's description (source, resolution, ...).
        precision: the scoring graph's / UNet's precision.
        scoring, timesteps, layers: how scores are computed.
        adapters: the adapter file, if any.
        text_length: the text encoder's context (captions beyond it are truncated).
        warnings: what a result must carry (a random-weight test model, ...).
        details: what only one backend has (``compile``; ``bundle`` and ``runners``), at the top level of ``meta``.
    """

    backend: str
    label: str
    model: dict[str, Any]
    precision: str
    scoring: dict[str, Any]
    timesteps: list[int]
    layers: list[str]
    adapters: str | None
    text_length: int
    warnings: list[str]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The engine's part of a result's ``meta`` (the job adds evaluations, truncation, skips)."""
        return {
            "backend": self.backend,
            "model": self.model,
            "precision": self.precision,
            "adapters": self.adapters,
            "scoring": self.scoring,
            "timesteps": list(self.timesteps),
            "layers": list(self.layers),
            **self.details,
            "warnings": list(self.warnings),
        }


class Engine:
    """The engine interface (see the module doc). Subclasses set, in ``__init__``:

    Threads: any number of threads may call one engine's encoding and scoring methods at the same time, and each
    call returns what it would return made alone (within the scoring contract's batch-invariance tolerance: a cached
    encoding or unconditional term may come from another thread's batch).

    - In parallel: preprocessing and tokenizing; each call's own pair work (its UNet or scorer-graph batches); the
      encoding and unconditional passes of images and captions that no other thread is computing at that moment.
    - Serialised: looking up, storing and evicting cache entries (one lock per cache, held for dictionary
      operations only). An image, caption or (image, timestep) unconditional term that is not cached yet is
      computed once: by the first thread that needs it, while the others that need it wait for its result.
    - Each call's ``progress`` callback is called from the thread that made the call.
    - Not to be done while calls run: changing the attributes below, or :meth:`close`.

    Attributes:
        config: the :class:`~dsdkit.runtime.config.ScoringConfig` scores are computed with.
        timesteps: the timestep table ``t_k`` (index k pairs with noise-bank entry k).
        layer_names: the scored cross-attention layers.
        resolution: the square size images are preprocessed to.
        batch_size: work items (pairs x timesteps) per UNet / scorer-graph batch; scores do not depend on it.
        tokenizer: has ``encode(text, where=...)`` and ``encode_empty()``.
        progress: the default :data:`ProgressCallback` (each scoring call may pass its own).
        chunk_size: images per chunk in :meth:`score` (memory stays flat).
        max_cached_images: the image cache's bound (oldest first out).
    """

    config: ScoringConfig
    timesteps: list[int]
    layer_names: list[str]
    resolution: int
    batch_size: int
    tokenizer: Any
    progress: ProgressCallback | None = None
    chunk_size: int = 64
    max_cached_images: int = 4096

    def _init_caches(self) -> None:
        self._images = SharedCache()  # sha1 of the pixels -> ImageEncoding
        self._texts = SharedCache()  # caption (and _EMPTY) -> TextEncoding
        # (image key, timestep index k) -> the empty caption's attention terms float64[L] and ‖ε_k − ε̂(x_t, ∅)‖₂;
        # per timestep, so a job that scores a subset of the timesteps computes only those.
        self._uncond = SharedCache()

    # -- what an engine implements -------------------------------------------------------------------------------

    def _encode_pixel_batch(self, pixels: np.ndarray) -> list[tuple[Any, Any]]:
        """``float32[B, 3, H, W]`` pixels in [-1, 1] -> per image ``(latent, condition or None)``."""
        raise NotImplementedError

    def _encode_token_batch(self, tokens: list[TokenizedText]) -> list[tuple[Any, Any]]:
        """Tokenized captions -> per caption ``(states, kept-token mask)``."""
        raise NotImplementedError

    def _evaluate(
        self, images: list[ImageEncoding], texts: list[TextEncoding], steps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One batch of work items ``(images[b], texts[b], timestep index steps[b])`` -> attention term per layer
        ``float64[B, L]`` and ``‖ε − ε̂(x_t, c)‖₂`` ``float64[B]``."""
        raise NotImplementedError

    def identity(self) -> EngineIdentity:
        """What makes this engine's numbers (see :class:`EngineIdentity`)."""
        raise NotImplementedError

    def describe(self) -> EngineDescription:
        """What result files and messages say about this engine (see :class:`EngineDescription`)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """What result files record about the engine: :meth:`describe` as a dict, with the dsdkit version."""
        from .version import __version__

        description = self.describe()
        return {"dsdkit_version": __version__, **description.to_dict(), "text_length": description.text_length}

    def shortlist_embedder(self):
        """The CLIP towers this engine carries for gallery search (a bundle exported with ``--shortlist``), as a
        :class:`~dsdkit.runtime.shortlist.Embedder`; ``None`` when it carries none."""
        return None

    def close(self) -> None:
        """Release the engine's resources (sessions, engines); the PyTorch scorer holds none of its own."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- per-image and per-caption work (cached) -----------------------------------------------------------------

    def encode_images(self, images: Sequence[ImageInput], offset: int = 0) -> list[ImageEncoding]:
        """Preprocess and encode ``images``; ``offset`` numbers them in error messages when they are a chunk."""
        pixels = [
            preprocess_image(image, self.resolution, self.config.resize, index=offset + i)
            for i, image in enumerate(images)
        ]
        return self.encode_pixels(pixels)

    def encode_pixels(self, pixels: Sequence[np.ndarray]) -> list[ImageEncoding]:
        """Encode already preprocessed images (``float32[3, R, R]`` from
        :func:`~dsdkit.runtime.images.preprocess_image` at :attr:`resolution`), cached by pixel content."""
        keys, arrays = [], {}
        for array in pixels:
            if array.shape[-2:] != (self.resolution, self.resolution):
                raise InputError(
                    f"preprocessed image of size {array.shape[-2:]}: this engine needs {self.resolution} pixels "
                    "(preprocess_image at engine.resolution)"
                )
            key = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()
            keys.append(key)
            arrays.setdefault(key, array)

        def encode(todo: list[str]) -> list[ImageEncoding]:
            out = []
            for chunk in chunk_slices(len(todo), self.batch_size):
                batch = todo[chunk]
                stacked = np.stack([arrays[key] for key in batch]).astype(np.float32, copy=False)
                encoded = self._encode_pixel_batch(stacked)
                out += [ImageEncoding(key, *item) for key, item in zip(batch, encoded, strict=True)]
            return out

        # The encodings come from the fetch itself, never from a second look into the cache, which another thread
        # may have evicted them from meanwhile.
        found = self._images.fetch(keys, encode)
        self._evict(set(keys))
        return [found[key] for key in keys]

    def share_encodings(self, source: Engine) -> None:
        """Use ``source``'s image and caption encodings (the same model's VAE and text encoder: an engine for
        another adapter of it); the unconditional terms stay this engine's own, since an adapter changes them."""
        self._images, self._texts = source._images, source._texts

    def caches(self) -> dict[str, SharedCache]:
        """The engine's caches by name (``images``, ``texts``, ``unconditional``): a server bounds their bytes and
        reports their size."""
        return {"images": self._images, "texts": self._texts, "unconditional": self._uncond}

    def cached_unconditional(self, image_keys: set[str]) -> int:
        """How many unconditional terms (image, timestep) of these images are cached (they cost nothing more)."""
        return sum(1 for key, _ in self._uncond.items() if key[0] in image_keys)

    def _evict(self, keep: set[str]) -> None:
        """Drop the oldest cached images (and their unconditional terms) beyond :attr:`max_cached_images`."""
        if self._images.evict(self.max_cached_images, keep):
            # Also the terms of images evicted earlier that a thread stored after (it was computing them), or that
            # an engine sharing this image cache (Scorer.with_adapter) evicted.
            self._uncond.discard_where(lambda key: key[0] not in self._images)

    def encode_texts(self, texts: Sequence[str], where: Sequence[str] | None = None) -> list[TextEncoding]:
        """Text states and kept-token masks of ``texts``, cached by caption.

        ``where`` names each caption in error messages (e.g. ``"captions.txt line 3"``).
        """
        keys, tokens = [], {}
        for index, text in enumerate(texts):
            tokenized = self.tokenizer.encode(text, where=where[index] if where is not None else f"caption #{index}")
            key = text.strip()
            keys.append(key)
            tokens.setdefault(key, tokenized)
        found = self._texts.fetch(keys, lambda todo: self._encode_tokens(todo, tokens))
        return [found[key] for key in keys]

    def _encode_tokens(self, keys: list, tokens: dict[Any, TokenizedText]) -> list[TextEncoding]:
        out = []
        for chunk in chunk_slices(len(keys), self.batch_size):
            batch = keys[chunk]
            encoded = self._encode_token_batch([tokens[key] for key in batch])
            for key, (states, mask) in zip(batch, encoded, strict=True):
                out.append(TextEncoding("" if key is _EMPTY else key, tokens[key], states, mask))
        return out

    @property
    def empty_caption(self) -> TextEncoding:
        """The unconditional prompt's encoding (BOS, EOS, padding)."""
        tokens = {_EMPTY: self.tokenizer.encode_empty()}
        return self._texts.fetch([_EMPTY], lambda todo: self._encode_tokens(todo, tokens))[_EMPTY]

    # -- scoring -------------------------------------------------------------------------------------------------

    def step_indices(self, steps: Sequence[int] | None = None) -> list[int]:
        """Validated timestep indices (positions in :attr:`timesteps`), ascending; ``None``: all of them."""
        if steps is None:
            return list(range(len(self.timesteps)))
        chosen = sorted({int(s) for s in steps})
        bad = [s for s in chosen if not 0 <= s < len(self.timesteps)]
        if bad or not chosen:
            raise ConfigError(
                f"timestep indices {bad or '[]'} are out of range: this engine has {len(self.timesteps)} timesteps "
                f"(indices 0..{len(self.timesteps) - 1})"
            )
        return chosen

    def planned_evaluations(self, num_images: int, num_pairs: int, num_steps: int | None = None) -> int:
        """UNet sample-evaluations for ``num_pairs`` pairs over ``num_images`` new images at ``num_steps``
        timesteps (default: all), nothing cached: the unconditional pass per image (when needed) plus one per pair."""
        steps = len(self.timesteps) if num_steps is None else int(num_steps)
        per_image = steps if self.config.needs_unconditional_pass else 0
        return num_images * per_image + num_pairs * steps

    def _run(self, work: list[tuple[ImageEncoding, TextEncoding, int]], progress) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate work items in batches: attention terms ``float64[W, L]`` and errors ``float64[W]``."""
        layers = np.empty((len(work), len(self.layer_names)), dtype=np.float64)
        errors = np.empty(len(work), dtype=np.float64)
        for sl in chunk_slices(len(work), self.batch_size):
            batch = work[sl]
            steps = np.fromiter((k for _, _, k in batch), dtype=np.int64, count=len(batch))
            layers[sl], errors[sl] = self._evaluate([i for i, _, _ in batch], [t for _, t, _ in batch], steps)
            if progress is not None:
                progress(len(batch))
        return layers, errors

    def _ensure_unconditional(
        self, images: Sequence[ImageEncoding], steps: list[int], progress
    ) -> tuple[dict[tuple[str, int], tuple[np.ndarray, float]], int]:
        """The empty caption's terms of ``images`` at ``steps``, computed once per (image, timestep): per
        ``(image key, k)`` the attention terms ``float64[L]`` and the noise error; and the evaluations run here."""
        # Fetched before this call claims any term, so that computing it never waits for a thread that waits for us.
        empty = self.empty_caption
        by_key = {e.key: e for e in images}
        evaluations = 0

        def compute(todo: list[tuple[str, int]]) -> list[tuple[np.ndarray, float]]:
            nonlocal evaluations
            layers, errors = self._run([(by_key[key], empty, k) for key, k in todo], progress)
            evaluations += len(todo)
            return [(layer, float(error)) for layer, error in zip(layers, errors, strict=True)]

        terms = self._uncond.fetch([(key, k) for key in by_key for k in steps], compute)
        return terms, evaluations

    def score_encoded_pairs(
        self,
        images: Sequence[ImageEncoding],
        texts: Sequence[TextEncoding],
        pairs,
        steps: Sequence[int] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ScoreOutput:
        """Per-timestep terms of the ``(image index, text index)`` pairs (indices into the two lists).

        Args:
            steps: timestep indices to score at (default: all of :attr:`timesteps`).
            progress: called after each batch with its evaluations (default: :attr:`progress`).
        """
        progress = progress or self.progress
        chosen = self.step_indices(steps)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        cfg = self.config
        evaluations = 0
        uncond = {}
        if cfg.needs_unconditional_pass:
            uncond, evaluations = self._ensure_unconditional(
                [images[i] for i in np.unique(pairs[:, 0])], chosen, progress
            )
        # Work items ordered (pair, timestep) so each pair's terms are contiguous; batches mix timesteps freely.
        unconditional = evaluations
        work = [(images[i], texts[j], k) for i, j in pairs.tolist() for k in chosen]
        layers, errors = self._run(work, progress)
        evaluations += len(work)
        count, num_steps = len(pairs), len(chosen)
        layers = layers.reshape(count, num_steps, -1)
        errors = errors.reshape(count, num_steps)
        uncond_layers = uncond_errors = None
        if cfg.needs_unconditional_pass:
            # This call's own copy of the terms: the cache may have evicted them since.
            terms = [[uncond[images[i].key, k] for k in chosen] for i in pairs[:, 0].tolist()]
            uncond_layers = np.array([[layer for layer, _ in row] for row in terms]).reshape(layers.shape)
            uncond_errors = np.array([[error for _, error in row] for row in terms]).reshape(errors.shape)
        _, attention, denoise = combine_terms(cfg, layers, errors, uncond_layers, uncond_errors)
        return ScoreOutput(
            attention_steps=attention,
            denoise_steps=denoise,
            steps=chosen,
            timesteps=[self.timesteps[k] for k in chosen],
            layer_names=list(self.layer_names),
            truncated=[e.tokens.truncated for e in texts],
            unet_evaluations=evaluations,
            unconditional_evaluations=unconditional,
            attention_in_score=cfg.attention_term,
        )

    def score_encoded_matrix(
        self,
        images: Sequence[ImageEncoding],
        texts: Sequence[TextEncoding],
        steps: Sequence[int] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ScoreOutput:
        """Every encoded image against every encoded caption (``[N, M]`` leading axes); duplicates scored once."""
        if len(images) == 0 or len(texts) == 0:
            raise InputError("nothing to score: give at least one image and one caption")
        unique_images = list({e.key: e for e in images}.values())
        unique_texts = list({e.text: e for e in texts}.values())
        rows = {e.key: i for i, e in enumerate(unique_images)}
        cols = {e.text: j for j, e in enumerate(unique_texts)}
        pairs = [(i, j) for i in range(len(unique_images)) for j in range(len(unique_texts))]
        out = self.score_encoded_pairs(unique_images, unique_texts, pairs, steps, progress)
        flat = np.array([rows[e.key] for e in images])[:, None] * len(unique_texts) + np.array(
            [cols[e.text] for e in texts]
        )
        return replace(
            out,
            attention_steps=out.attention_steps[flat],
            denoise_steps=None if out.denoise_steps is None else out.denoise_steps[flat],
            truncated=[e.tokens.truncated for e in texts],
        )

    def score_pairs(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        pairs,
        steps: Sequence[int] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ScoreOutput:
        """Terms of the given ``(image index, caption index)`` pairs only (e.g. a query and its candidates)."""
        return self.score_encoded_pairs(self.encode_images(images), self.encode_texts(texts), pairs, steps, progress)

    def score_matrix(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        steps: Sequence[int] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ScoreOutput:
        """Every image against every caption, with the per-timestep terms."""
        return self.score_encoded_matrix(self.encode_images(images), self.encode_texts(texts), steps, progress)

    def iter_image_chunks(
        self,
        images: Sequence[ImageInput],
        start: int = 0,
        skip: Container[int] = (),
        on_error: Callable[[int, InputError, list[str]], None] | None = None,
        on_warnings: Callable[[int, list[str]], None] | None = None,
    ) -> Iterator[tuple[slice, list[int], list[ImageEncoding]]]:
        """The one block iterator: consecutive chunks of :attr:`chunk_size` images from ``start``, each image
        decoded once, here, and the chunk encoded; yields ``(rows, positions, encodings)`` with the positions (image
        indices) of the images that were encoded. Only one chunk is decoded and held at a time, so memory stays
        flat however many images there are.

        ``skip``: indices to leave out (known to be unusable). An image that fails to decode goes to
        ``on_error(index, error, decoder warnings)`` (default: the error is raised); the decoder warnings of an
        image that is still used go to ``on_warnings(index, warnings)``.
        """
        for rows in chunk_slices(len(images), self.chunk_size, start):
            pixels, positions = [], []
            for index in range(rows.start, rows.stop):
                if index in skip:
                    continue
                with collecting() as notes:
                    try:
                        pixels.append(
                            preprocess_image(images[index], self.resolution, self.config.resize, index=index)
                        )
                    except InputError as exc:
                        if on_error is None:
                            raise
                        on_error(index, exc, list(notes))
                        continue
                if notes and on_warnings is not None:
                    on_warnings(index, list(notes))
                positions.append(index)
            yield rows, positions, self.encode_pixels(pixels) if pixels else []

    def iter_blocks(
        self, images: Sequence[ImageInput], texts: Sequence[str], start: int = 0
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, float64[rows, M] scores)`` for consecutive chunks of :attr:`chunk_size` images from
        ``start`` (:meth:`iter_image_chunks`); captions are encoded once."""
        if len(images) == 0 or len(texts) == 0:
            raise InputError("nothing to score: give at least one image and one caption")
        text_encodings = self.encode_texts(texts)
        for rows, _, encoded in self.iter_image_chunks(images, start):
            yield rows, self.score_encoded_matrix(encoded, text_encodings).scores

    def score(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """``float64[N, M]`` scores of every image against every caption (streamed by :meth:`iter_blocks`)."""
        out = np.empty((len(images), len(texts)), dtype=np.float64)
        for rows, block in self.iter_blocks(images, texts):
            out[rows] = block
        return out

    def rank_texts(
        self, image: ImageInput, texts: Sequence[str], top_k: int | None = None, schedule=None, shortlist=None
    ) -> Ranking:
        """``texts`` best first for ``image``, as :class:`~dsdkit.runtime.adaptive.Ranked` ``(caption, score)``
        entries (the first ``top_k`` only, when given).

        ``schedule`` (a :class:`~dsdkit.runtime.adaptive.Schedule`, its text form, or ``"default"``) ranks by
        successive elimination: the ``top_k`` best (default 1) get their exhaustive scores, the others keep partial
        means (``entry.exact`` is False) for a fraction of the evaluations. ``None`` scores every caption exhaustively.
        ``shortlist`` (a :class:`~dsdkit.runtime.shortlist.Shortlister`) ranks only the captions a CLIP model puts in
        the image's top K (the others are left out of the ranking).
        """
        ranking = self._rank(image, texts, top_k, schedule, per="image", shortlist=shortlist)
        entries = [Ranked(texts[e.candidate], e.score, e.exact, e.held, e.left_after) for e in ranking]
        return Ranking(entries, ranking.evaluations, ranking.schedule)

    def rank_images(
        self, text: str, images: Sequence[ImageInput], top_k: int | None = None, schedule=None, shortlist=None
    ) -> Ranking:
        """Images best first for ``text``, as :class:`~dsdkit.runtime.adaptive.Ranked` ``(index into images, score)``
        entries; ``top_k``, ``schedule`` and ``shortlist`` as in :meth:`rank_texts`.

        Comparing images under one caption is where ``normalize=uncond`` helps: raw scores depend on the image.
        """
        return self._rank(text, images, top_k, schedule, per="caption", shortlist=shortlist)

    def _rank(self, query, pool, top_k, schedule, per: str, shortlist=None) -> Ranking:
        images, texts = ([query], list(pool)) if per == "image" else (list(pool), [query])
        if shortlist is not None:
            candidates = shortlist(images, texts, per).candidate_lists()
            return self._rank_candidates(images, texts, top_k, schedule, per, candidates[0])
        if schedule is None:
            out = self.score_matrix(images, texts)
            scores = out.scores[0] if per == "image" else out.scores[:, 0]
            order = np.argsort(-scores, kind="stable")[:top_k]
            held = len(out.steps)
            entries = [Ranked(int(j), float(scores[j]), True, held, None) for j in order]
            unconditional = out.unconditional_evaluations
            spent = {"conditional": out.unet_evaluations - unconditional, "unconditional": unconditional}
            return Ranking(entries, spent, None)
        result = rank_matrix(self, images, texts, top_k=top_k or 1, schedule=schedule, per=per)
        held = result.held[0] if per == "image" else result.held[:, 0]
        scores = result.scores[0] if per == "image" else result.scores[:, 0]
        left = result.left_after[0] if per == "image" else result.left_after[:, 0]
        order = result.order(0)[:top_k]
        entries = [
            Ranked(int(j), float(scores[j]), bool(held[j] == result.num_timesteps), int(held[j]), int(left[j]) or None)
            for j in order
        ]
        return Ranking(entries, result.evaluations, result.schedule)

    def _rank_candidates(self, images, texts, top_k, schedule, per: str, listed: list[int]) -> Ranking:
        """One query's ranking of its listed candidates only (a shortlist)."""
        if schedule is None:
            pairs = [(0, j) for j in listed] if per == "image" else [(i, 0) for i in listed]
            out = self.score_pairs(images, texts, pairs)
            order = sorted(range(len(listed)), key=lambda n: (-out.scores[n], listed[n]))[:top_k]
            entries = [Ranked(listed[n], float(out.scores[n]), True, len(out.steps), None) for n in order]
            unconditional = out.unconditional_evaluations
            spent = {"conditional": out.unet_evaluations - unconditional, "unconditional": unconditional}
            return Ranking(entries, spent, None)
        result = rank_matrix(self, images, texts, top_k or 1, schedule, per, [listed])
        held = result.held[0] if per == "image" else result.held[:, 0]
        scores = result.scores[0] if per == "image" else result.scores[:, 0]
        left = result.left_after[0] if per == "image" else result.left_after[:, 0]
        entries = [
            Ranked(int(j), float(scores[j]), bool(held[j] == result.num_timesteps), int(held[j]), int(left[j]) or None)
            for j in result.order(0)[:top_k]
        ]
        return Ranking(entries, result.evaluations, result.schedule)

    def rank_matrix(
        self, images, texts, top_k: int = 1, schedule=None, per: str = "image", candidates=None, shortlist=None
    ):
        """Adaptive ranking of many queries at once: :func:`dsdkit.runtime.adaptive.rank_matrix` on this engine;
        ``shortlist`` (a :class:`~dsdkit.runtime.shortlist.Shortlister`) gives each query its CLIP top K as its
        ``candidates`` (a gallery search)."""
        if shortlist is not None:
            candidates = shortlist(images, texts, per).candidate_lists()
        return rank_matrix(self, images, texts, top_k, schedule, per, candidates)
