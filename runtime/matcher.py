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

from .backends import OrtRunner, Runner, ort_providers
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

    def __init__(self, bundle: Bundle, runners: dict[str, Runner], batch_size: int | None = None,
                 num_timesteps: int | None = None, progress: Callable[[int], None] | None = None):
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
        self.batch_size = int(batch_size or bundle.manifest["export"]["batch"][1])
        self.progress = progress
        self._images: dict[str, _Image] = {}
        self._texts: dict[str, _Text] = {}
        self._uncond: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._empty: _Text | None = None

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str = "auto", device: str = "auto",
                    batch_size: int | None = None, num_timesteps: int | None = None, verify: bool = True) -> Matcher:
        """Open a bundle and prepare its runners (sessions are created on first use).

        Args:
            backend: ``auto`` (TensorRT when the bundle has engines for this machine, else ONNX Runtime) or
                ``onnxruntime``.
            device: ``auto``, ``cpu`` or ``cuda`` (for ONNX Runtime: the CUDA provider, when installed).
            batch_size: pairs per scorer run (default: the export profile's optimal batch).
            num_timesteps: another S for the discffusion table (the graph serves any S up to its noise bank).
            verify: check every file's sha256 first.
        """
        bundle = Bundle.open(path, verify=verify)
        if backend not in ("auto", "onnxruntime"):
            raise ConfigError(f"backend {backend!r} is not available in this runtime; use onnxruntime")
        providers = ort_providers(device)
        runners = {name: OrtRunner(bundle.graph_path(name), providers) for name in bundle.manifest["graphs"]}
        return cls(bundle, runners, batch_size=batch_size, num_timesteps=num_timesteps)

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

    def encode_images(self, images: Sequence[ImageInput]) -> list[_Image]:
        keys, todo = [], {}
        for index, image in enumerate(images):
            pixels = preprocess_image(image, self.resolution, self.resize, index=index)
            key = hashlib.sha1(pixels.tobytes()).hexdigest()
            keys.append(key)
            if key not in self._images:
                todo[key] = pixels
        if todo:
            out = self._run_batched("image_encoder", {"pixels": np.stack(list(todo.values()))})
            for i, key in enumerate(todo):
                condition = out["condition"][i] if "condition" in out else None
                self._images[key] = _Image(key, out["latents"][i], condition)
        return [self._images[key] for key in keys]

    def _encode_tokens(self, todo: dict[str, TokenizedText]) -> None:
        if not todo:
            return
        ids = np.stack([t.ids for t in todo.values()])
        states = self._run_batched("text_encoder", {"input_ids": ids})["states"]
        for i, (key, tokens) in enumerate(todo.items()):
            self._texts[key] = _Text(key, tokens, states[i], token_mask(tokens.roles, self.scoring.get("tokens", "all")))

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
        layers, errors = self._scorer_runs(np.stack([i.latent for i in todo]), conditions,
                                           np.broadcast_to(empty.states, (count, *empty.states.shape)),
                                           np.broadcast_to(empty.mask, (count, *empty.mask.shape)))
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
            layers, errors, uncond_layers, uncond_errors, uncond_in_attention=bool(s.get("uncond_in_attention")),
            normalize_uncond=s.get("normalize") == "uncond", denoise_term=bool(s.get("denoise_term")),
        )
        return {"scores": per_step.mean(1), "layer_scores": attention.mean(1),
                "denoise": None if denoise is None else denoise.mean(1)}

    def score_pairs(self, images: Sequence[ImageInput], texts: Sequence[str], pairs) -> np.ndarray:
        return self.score_encoded_pairs(self.encode_images(images), self.encode_texts(texts), pairs)["scores"]

    def score(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """``float64[N, M]`` scores of every image against every caption."""
        if len(images) == 0 or len(texts) == 0:
            raise InputError("nothing to score: give at least one image and one caption")
        image_enc, text_enc = self.encode_images(images), self.encode_texts(texts)
        unique_images = list({e.key: e for e in image_enc}.values())
        unique_texts = list({e.text: e for e in text_enc}.values())
        pairs = [(i, j) for i in range(len(unique_images)) for j in range(len(unique_texts))]
        flat = self.score_encoded_pairs(unique_images, unique_texts, pairs)["scores"].reshape(len(unique_images), -1)
        rows = [next(i for i, u in enumerate(unique_images) if u.key == e.key) for e in image_enc]
        cols = [next(j for j, u in enumerate(unique_texts) if u.text == e.text) for e in text_enc]
        return flat[np.ix_(rows, cols)]

    def describe(self) -> dict:
        return {name: getattr(runner, "describe", lambda: {"backend": runner.name})() for name, runner in self.runners.items()}

