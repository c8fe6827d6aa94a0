"""``Matcher``: DSD scores from a bundle, without torch.

The same computation as the PyTorch scorer, split the same way: per image once (preprocess, ``image_encoder`` graph
-> ``z0`` and, for kv-prompt adapters, the image condition), per caption once (tokenize, ``text_encoder`` graph),
per (image, timestep) once the unconditional pass when the config needs it, and per (pair, timestep) one run of the
``scorer`` graph, with pairs of all timesteps packed into batches. Terms are combined by
:func:`dsdkit.runtime.scoring.combine_terms`, the function the PyTorch path uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .backends import Runner, make_runners
from .bundle import Bundle
from .errors import ConfigError, InputError
from .images import ImageInput, preprocess_image
from .schedule import discffusion_timesteps, noise_level_timesteps
from .scoring import combine_terms
from .tokenizer import TokenizedText, token_mask

__all__ = ["Matcher", "timesteps_from_scoring"]

logger = logging.getLogger(__name__)


def timesteps_from_scoring(scoring: dict, num_timesteps: int | None = None) -> list[int]:
    """The timestep table of a scoring config (as stored in a manifest), optionally with another S."""
    if scoring.get("timesteps", "discffusion") == "discffusion":
        return discffusion_timesteps(int(num_timesteps or scoring.get("num_timesteps", 30)))
    return noise_level_timesteps(tuple(scoring.get("noise_levels", (0.2, 0.4, 0.6, 0.8))))


@dataclass
class _Image:
    key: str
    latent: np.ndarray
    condition: np.ndarray | None


@dataclass
class _Text:
    text: str
    tokens: TokenizedText
    states: np.ndarray
    mask: np.ndarray


class Matcher:
    """Scores images against captions with the graphs of a bundle.

    Build one with :meth:`from_bundle`. ``score(images, texts)`` returns ``float64[N, M]``; images may be paths,
    PIL images or arrays. Encodings are cached, so repeated images or captions cost nothing.
    """

    def __init__(
        self,
        bundle: Bundle,
        runners: dict[str, Runner],
        batch_size: int | None = None,
        num_timesteps: int | None = None,
        progress: Callable[[int], None] | None = None,
        chunk_size: int = 64,
        max_cached_images: int = 4096,
    ):
        self.bundle = bundle
        self.runners = runners
        self.scoring = dict(bundle.scoring)
        if num_timesteps is not None:
            if self.scoring.get("timesteps") != "discffusion":
                raise ConfigError("num_timesteps applies to the discffusion timestep table only")
            self.scoring["num_timesteps"] = int(num_timesteps)
        self.timesteps = timesteps_from_scoring(self.scoring)
        bank = bundle.manifest["noise"]["bank_size"]
        if len(self.timesteps) > bank:
            raise ConfigError(f"{len(self.timesteps)} timesteps asked for, the bundle's noise bank has {bank}")
        self.tokenizer = bundle.tokenizer()
        model = bundle.manifest["model"]
        self.resolution = int(self.scoring.get("resolution") or model["resolution"])
        self.resize = self.scoring.get("resize", "squash")
        self.conditioned = "condition" in bundle.graph("scorer")["inputs"]
        profile = bundle.manifest["export"]["batch"]
        self.batch_size = int(batch_size or profile[1])
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if any(getattr(r, "max_batch", None) for r in runners.values()):  # engines cannot exceed their profile
            self.batch_size = min(self.batch_size, int(profile[2]))
        self.progress = progress
        if chunk_size < 1:
            raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        # Bounded caches (oldest first out) keep memory flat over thousands of images; captions are few and stay.
        self.max_cached_images = max(int(max_cached_images), self.chunk_size)
        self._images: dict[str, _Image] = {}
        self._texts: dict[str, _Text] = {}
        self._uncond: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._empty: _Text | None = None

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike,
        backend: str = "auto",
        device: str = "auto",
        batch_size: int | None = None,
        num_timesteps: int | None = None,
        verify: bool = True,
        chunk_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> Matcher:
        """Open a bundle and prepare its runners (sessions are created on first use).

        Args:
            backend: ``auto`` (TensorRT when the bundle has engines and TensorRT is installed, else ONNX Runtime),
                ``onnxruntime`` or ``tensorrt``.
            device: ``auto``, ``cpu`` or ``cuda`` (for ONNX Runtime: the CUDA provider, when installed).
            batch_size: pairs per scorer run (default: the export profile's optimal batch; at most its maximum).
            num_timesteps: another S for the discffusion table (the graph serves any S up to its noise bank).
            verify: check every file's sha256 first.
            chunk_size: images per streamed chunk (see :meth:`iter_blocks`).
            progress: called with the number of scorer evaluations after each batch.
        """
        bundle = Bundle.open(path, verify=verify)
        runners = make_runners(bundle, backend, device)
        return cls(
            bundle,
            runners,
            batch_size=batch_size,
            num_timesteps=num_timesteps,
            chunk_size=chunk_size,
            progress=progress,
        )

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- encodings -------------------------------------------------------------------------------------------------

    def _run_batched(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(next(iter(feeds.values())))
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, count, self.batch_size):
            chunk = {name: value[start : start + self.batch_size] for name, value in feeds.items()}
            for name, value in self.runners[graph].infer(chunk).items():
                outputs.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in outputs.items()}

    def encode_images(self, images: Sequence[ImageInput], offset: int = 0) -> list[_Image]:
        """Latents (and kv-prompt conditions) of ``images``, cached by pixel content; ``offset`` numbers them in
        error messages when they are a chunk of a longer list."""
        keys, todo = [], {}
        for index, image in enumerate(images):
            pixels = preprocess_image(image, self.resolution, self.resize, index=offset + index)
            key = hashlib.sha1(pixels.tobytes()).hexdigest()
            keys.append(key)
            if key not in self._images:
                todo[key] = pixels
        if todo:
            out = self._run_batched("image_encoder", {"pixels": np.stack(list(todo.values()))})
            for i, key in enumerate(todo):
                condition = out["condition"][i] if "condition" in out else None
                self._images[key] = _Image(key, out["latents"][i], condition)
        encodings = [self._images[key] for key in keys]
        self._evict(set(keys))
        return encodings

    def _evict(self, keep: set[str]) -> None:
        """Drop the oldest cached images (and their unconditional terms) beyond :attr:`max_cached_images`."""
        excess = len(self._images) - self.max_cached_images
        for key in [k for k in self._images if k not in keep][: max(0, excess)]:
            del self._images[key]
            self._uncond.pop(key, None)

    def _encode_tokens(self, todo: dict[str, TokenizedText]) -> None:
        if not todo:
            return
        ids = np.stack([t.ids for t in todo.values()])
        states = self._run_batched("text_encoder", {"input_ids": ids})["states"]
        for i, (key, tokens) in enumerate(todo.items()):
            self._texts[key] = _Text(
                key, tokens, states[i], token_mask(tokens.roles, self.scoring.get("tokens", "all"))
            )

    def encode_texts(self, texts: Sequence[str], where: Sequence[str] | None = None) -> list[_Text]:
        keys, todo = [], {}
        for index, text in enumerate(texts):
            tokens = self.tokenizer.encode(text, where=where[index] if where else f"caption #{index}")
            key = text.strip()
            keys.append(key)
            if key not in self._texts and key not in todo:
                todo[key] = tokens
        self._encode_tokens(todo)
        return [self._texts[key] for key in keys]

    @property
    def empty_caption(self) -> _Text:
        if self._empty is None:
            self._encode_tokens({"": self.tokenizer.encode_empty()})
            self._empty = self._texts.pop("")
        return self._empty

    # -- scoring ---------------------------------------------------------------------------------------------------

    @property
    def needs_unconditional_pass(self) -> bool:
        s = self.scoring
        return bool(s.get("denoise_term") or s.get("uncond_in_attention") or s.get("normalize") == "uncond")

    def _scorer_runs(self, latents, conditions, states, masks) -> tuple[np.ndarray, np.ndarray]:
        """``G`` groups x K timesteps (group-major) through the scorer graph: layer terms [G, K, L], errors [G, K]."""
        groups, steps = len(latents), len(self.timesteps)
        step_of = np.tile(np.arange(steps), groups)
        group_of = np.repeat(np.arange(groups), steps)
        layers, errors = [], []
        for start in range(0, groups * steps, self.batch_size):
            sl = slice(start, start + self.batch_size)
            feed = {
                "latents": latents[group_of[sl]],
                "states": states[group_of[sl]],
                "token_mask": masks[group_of[sl]],
                "timestep": np.asarray(self.timesteps, dtype=np.int64)[step_of[sl]],
                "noise_index": step_of[sl].astype(np.int64),
            }
            if self.conditioned:
                feed["condition"] = conditions[group_of[sl]]
            out = self.runners["scorer"].infer(feed)
            layers.append(out["layer_scores"])
            errors.append(out["noise_error"])
            if self.progress is not None:
                self.progress(len(feed["timestep"]))
        layers_array = np.concatenate(layers).astype(np.float64).reshape(groups, steps, -1)
        return layers_array, np.concatenate(errors).astype(np.float64).reshape(groups, steps)

    def _ensure_unconditional(self, images: list[_Image]) -> None:
        todo = list({i.key: i for i in images if i.key not in self._uncond}.values())
        if not todo:
            return
        empty = self.empty_caption
        count = len(todo)
        conditions = np.stack([i.condition for i in todo]) if self.conditioned else None
        layers, errors = self._scorer_runs(
            np.stack([i.latent for i in todo]),
            conditions,
            np.broadcast_to(empty.states, (count, *empty.states.shape)),
            np.broadcast_to(empty.mask, (count, *empty.mask.shape)),
        )
        for index, image in enumerate(todo):
            self._uncond[image.key] = (layers[index], errors[index])

    def score_encoded_pairs(self, images: list[_Image], texts: list[_Text], pairs) -> dict[str, np.ndarray]:
        """Scores of ``(image index, text index)`` pairs: ``{"scores" [P], "layer_scores" [P, L], "denoise"}``."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if self.needs_unconditional_pass:
            self._ensure_unconditional([images[i] for i in sorted(set(pairs[:, 0].tolist()))])
        latents = np.stack([images[i].latent for i in pairs[:, 0]])
        conditions = np.stack([images[i].condition for i in pairs[:, 0]]) if self.conditioned else None
        states = np.stack([texts[j].states for j in pairs[:, 1]])
        masks = np.stack([texts[j].mask for j in pairs[:, 1]])
        layers, errors = self._scorer_runs(latents, conditions, states, masks)
        uncond_layers = uncond_errors = None
        if self.needs_unconditional_pass:
            uncond_layers = np.stack([self._uncond[images[i].key][0] for i in pairs[:, 0]])
            uncond_errors = np.stack([self._uncond[images[i].key][1] for i in pairs[:, 0]])
        s = self.scoring
        per_step, attention, denoise = combine_terms(
            layers,
            errors,
            uncond_layers,
            uncond_errors,
            uncond_in_attention=bool(s.get("uncond_in_attention")),
            normalize_uncond=s.get("normalize") == "uncond",
            denoise_term=bool(s.get("denoise_term")),
        )
        return {
            "scores": per_step.mean(1),
            "layer_scores": attention.mean(1),
            "denoise": None if denoise is None else denoise.mean(1),
        }

    def score_pairs(self, images: Sequence[ImageInput], texts: Sequence[str], pairs) -> np.ndarray:
        return self.score_encoded_pairs(self.encode_images(images), self.encode_texts(texts), pairs)["scores"]

    def score(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """``float64[N, M]`` scores of every image against every caption (streamed in chunks of images)."""
        out = np.empty((len(images), len(texts)), dtype=np.float64)
        for rows, block in self.iter_blocks(images, texts):
            out[rows] = block
        return out

    def iter_blocks(self, images: Sequence[ImageInput], texts: Sequence[str], start: int = 0):
        """Yield ``(rows, scores[rows, M])`` for consecutive chunks of :attr:`chunk_size` images from ``start``.

        Only one chunk of images is loaded and encoded at a time, so memory stays flat however many images there
        are; captions are encoded once. Duplicate images or captions are scored once.
        """
        if len(images) == 0 or len(texts) == 0:
            raise InputError("nothing to score: give at least one image and one caption")
        text_enc = self.encode_texts(texts)
        for begin in range(start, len(images), self.chunk_size):
            rows = slice(begin, min(begin + self.chunk_size, len(images)))
            yield rows, self.score_encoded_matrix(self.encode_images(images[rows], offset=begin), text_enc)

    def score_encoded_matrix(self, images: list[_Image], texts: list[_Text]) -> np.ndarray:
        """``float64[len(images), len(texts)]`` scores of encoded images x encoded captions; duplicates scored once."""
        unique_images = list({e.key: e for e in images}.values())
        unique_texts = list({e.text: e for e in texts}.values())
        rows = {e.key: i for i, e in enumerate(unique_images)}
        cols = {e.text: j for j, e in enumerate(unique_texts)}
        pairs = [(i, j) for i in range(len(unique_images)) for j in range(len(unique_texts))]
        flat = self.score_encoded_pairs(unique_images, unique_texts, pairs)["scores"].reshape(len(unique_images), -1)
        return flat[np.ix_([rows[e.key] for e in images], [cols[e.text] for e in texts])]

    def rank_texts(self, image: ImageInput, texts: Sequence[str]) -> list[tuple[str, float]]:
        """``texts`` sorted best first for ``image``, as ``(caption, score)``."""
        scores = self.score([image], texts)[0]
        return [(texts[j], float(scores[j])) for j in np.argsort(-scores, kind="stable")]

    def rank_images(self, text: str, images: Sequence[ImageInput]) -> list[tuple[int, float]]:
        """Images sorted best first for ``text``, as ``(index into images, score)``.

        Ranking images under one caption is where ``normalize=uncond`` bundles help (DESIGN.md).
        """
        scores = self.score(images, [text])[:, 0]
        return [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")]

    def planned_evaluations(self, num_images: int, num_texts: int) -> int:
        """Scorer evaluations for an ``N x M`` job with nothing cached.

        ``N·S`` unconditional (when needed) + ``N·M·S``.
        """
        steps = len(self.timesteps)
        return num_images * steps * (num_texts + (1 if self.needs_unconditional_pass else 0))

    def describe(self) -> dict:
        return {
            name: runner.describe() if hasattr(runner, "describe") else {"backend": runner.name}
            for name, runner in self.runners.items()
        }
