"""``export_bundle``: (SD2 weights, adapter, scoring config) -> a self-contained, verified bundle folder.

Order of work, each step logged (and reported to the optional ``progress`` callback): load and fold -> export the
three graphs (one spec each) -> copy the tokenizer -> parity against PyTorch on generated images and captions (the
export fails, writing nothing, when a tolerance is exceeded) -> TensorRT engines where TensorRT and a GPU are
present -> manifest with every file's sha256. Everything is written into a temporary folder beside the target,
fsynced and renamed into place at the end, so an interrupted export or a full disk (an ``OutputError``) never leaves
a folder that looks like a bundle.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..pytorch.noise import noise_bank
from ..runtime.backends import OrtRunner, ort_providers
from ..runtime.bundle import BAKED_KEY, BUNDLE_FORMAT, Bundle, baked_fields, file_records, sha256_file
from ..runtime.errors import ConfigError
from ..runtime.files import atomic_write_text, output_error, staged_folder
from ..runtime.images import preprocess_image
from ..runtime.matcher import Matcher
from ..runtime.onnxfile import metadata_entry
from .parity import ParitySettings, check_report, compare_outputs, parity_inputs, ranking_agreement

__all__ = ["ExportConfig", "export_bundle", "add_engines", "model_licence", "Progress"]

#: ``progress(stage, done, total)``: ``stage`` is what runs now (e.g. ``"exporting scorer"``), ``done`` how many of
#: the export's ``total`` steps have finished. Called before every step and once more with ``done == total``.
Progress = Callable[[str, int, int], None]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# End-to-end score tolerance (atol, rtol): |ours - PyTorch| <= atol + rtol |PyTorch| for every pair. The tiny model
# agrees to ~5e-6 relative (its tests assert 1e-5). At full size the denoising term is a difference of two norms of
# ~135 over 16,384 latent elements; fp32 rounding in the UNet output moves each by ~2e-4 (1.5e-6 relative), which is
# ~6e-5 of a score of ~5 (measured on the random-weight SD2-2.1-base architecture, 2026-11-23).
SCORE_TOLERANCE = (1e-5, 1e-4)
# fp16 graphs against fp32 PyTorch (fp16 carries 11 significant bits, ~5e-4 relative per rounding).
FP16_TOLERANCE = (5e-3, 5e-3)
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class ExportConfig:
    """How to export (written into the manifest).

    Args:
        precision: ``fp32``, or ``fp16`` (the scorer graph in fp16 with fp32 score islands; encoders stay fp32).
        opset: ONNX opset (18 by default; the dynamo exporter produces nothing lower).
        batch: TensorRT profile ``(min, opt, max)`` over the batch axis; ``opt`` is also the runtime's batch.
        exporter: ``dynamo`` (default; one external-data file, lower memory) or ``torchscript`` (faster on small
            models, deprecated upstream).
        engines: ``None`` builds TensorRT engines when possible, ``True`` requires them, ``False`` skips them.
        noise_bank_size: noise latents stored in the scorer graph (the most timesteps a bundle can use).
        parity: the parity check's size.
        licence: the base model's licence when the model folder does not state it.
        device: where the PyTorch side runs (``cpu`` or ``cuda``).
    """

    precision: str = "fp32"
    opset: int = 18
    batch: tuple[int, int, int] = (1, 8, 32)
    exporter: str = "dynamo"
    engines: bool | None = None
    noise_bank_size: int = 200
    parity: ParitySettings = field(default_factory=ParitySettings)
    licence: str | None = None
    device: str = "cpu"
    #: A CLIP model (folder, hub id or ``demo``) whose towers the bundle carries for gallery search (torch-free).
    shortlist: str | None = None

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"export precision {self.precision!r}: use fp32 or fp16")
        low, opt, high = self.batch
        if not 1 <= low <= opt <= high <= 63:
            raise ConfigError(f"`batch` {low}:{opt}:{high}: need 1 <= min <= opt <= max <= 63", field="batch")
        if self.opset < 18:
            raise ConfigError(f"`opset` {self.opset}: the exporter produces opset 18 at the lowest; use 18 or higher")
        if not 1 <= self.noise_bank_size <= 1000:
            raise ConfigError(f"noise bank size {self.noise_bank_size}: use 1..1000")


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"1:8:32"`` -> ``(1, 8, 32)``; a single number means min = opt = max."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ConfigError(f"`batch` {text!r}: expected MIN:OPT:MAX, e.g. 1:8:32", field="batch")
    return values[0], values[1], values[2]


def model_licence(folder: Path, is_test_model: bool, override: str | None) -> dict[str, str]:
    """The base model's licence: ``--license``, else the model card's front matter, else ``unknown``."""
    if override:
        return {"licence": override, "licence_source": "--license"}
    if is_test_model:
        return {
            "licence": "none (random weights made by `dsdkit tiny-model`)",
            "licence_source": "dsdkit test-model marker",
        }
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        front = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
        found = re.search(r"^license:\s*(\S.*)$", front.group(1), re.M) if front else None
        if found:
            return {"licence": found.group(1).strip().strip("'\""), "licence_source": "model card README.md"}
    logger.warning("%s: no licence found in the model card; pass --license to record it in the manifest", folder)
    return {"licence": "unknown", "licence_source": "not stated in the model folder; pass --license"}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def export_bundle(
    model: str | os.PathLike,
    out: str | os.PathLike,
    adapters: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    config: ExportConfig | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export a bundle to ``out``; returns its manifest.

    Args:
        model: SD2 model folder or hub id.
        out: the bundle folder to create.
        adapters: an adapter file from ``dsdkit train`` (folded into the graphs).
        preset, overrides: the scoring config (default: the adapter's own, else ``discffusion``).
        config: how to export.
        overwrite: replace an existing bundle at ``out``.
        progress: called as ``progress(stage, done, total)`` before each step (loading the model, each graph's
            export, the parity check's PyTorch and ONNX Runtime halves, TensorRT engines when they are built) and
            once at the end with ``done == total`` (see :data:`Progress`).

    Raises:
        ConfigError: bad options, ``out`` exists, or engines were required but cannot be built here.
        ParityError: the exported graphs disagree with PyTorch beyond tolerance (nothing is written).
    """
    import torch

    from ..pytorch.scorer import build_scorer
    from ..runtime.version import __version__

    config = config or ExportConfig()
    config.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass `overwrite` to replace it or choose another `out`", field="out")
    trt_reason = _trt_reason() if config.engines is not False else None
    if config.engines is True and trt_reason is not None:
        raise ConfigError(
            f"`engines`: cannot build TensorRT engines here: {trt_reason}; leave `engines` off", field="engines"
        )
    engines = config.engines is not False and trt_reason is None
    stages = 1 + len(_GRAPHS) + (2 if config.parity.enabled else 0) + (1 if engines else 0)
    steps = _Steps(progress, stages + (1 if config.shortlist is not None else 0))
    started = time.perf_counter()
    steps.next("loading the model")
    scorer = build_scorer(model, adapters, preset, overrides, batch_size=config.batch[1], device=config.device)
    sd2 = scorer.model
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from None
    # Written into a temporary folder beside ``out`` (files.staged_folder: fsynced, then renamed into place): an
    # interrupted export, a failed parity check or a full disk (an OutputError) leaves ``out`` as it was.
    with staged_folder(out) as staging:
        manifest = _base_manifest(scorer, adapters, config, __version__)
        with torch.no_grad():
            timings = _export_graphs(scorer, staging, manifest, config, steps)
        _copy_tokenizer(sd2.folder / "tokenizer", staging / "tokenizer")
        clip = None
        if config.shortlist is not None:
            steps.next("exporting the shortlist's CLIP towers")
            clip = _export_shortlist(config, staging, manifest, timings, sd2.device)
        manifest["export"]["seconds"] = timings
        if config.parity.enabled:
            steps.next("parity: PyTorch")
            references = pytorch_references(scorer, manifest, config.parity)
            if clip is not None:
                references["graphs"].update(_clip_references(clip, references["images"], references["captions"]))
            clip = None
            # Free the PyTorch model before ONNX Runtime loads the same weights: at full size the two together would
            # need twice the memory (more than a 24 GB machine has).
            del scorer, sd2
            gc.collect()
            steps.next("parity: ONNX Runtime")
            manifest["parity"] = run_parity(staging, manifest, references, config)
            check_report(manifest["parity"])
        else:
            manifest["parity"] = {"skipped": True}
        manifest["files"] = file_records(staging)
        if engines:
            steps.next("building TensorRT engines")
        manifest["engines"] = _maybe_engines(staging, manifest, config, out)
        manifest["files"] = file_records(staging)
        manifest["export"]["total_seconds"] = round(time.perf_counter() - started, 1)
        manifest["export"]["peak_rss_gb"] = round(_peak_rss_gb(), 2)
        atomic_write_text(staging / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        Bundle.open(staging)  # the bundle reads back and every hash matches before it is moved into place
    steps.finish()
    logger.info(
        "wrote bundle %s in %.0f s (peak RSS %.1f GB)",
        out,
        manifest["export"]["total_seconds"],
        manifest["export"]["peak_rss_gb"],
    )
    return manifest


class _Steps:
    """Numbers the export's steps for a :data:`Progress` callback (without a callback it only counts)."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, -1

    def next(self, stage: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(stage, self.done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)


def _trt_reason() -> str | None:
    from .tensorrt import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason()


def _base_manifest(scorer, adapters, config: ExportConfig, version: str) -> dict[str, Any]:
    import onnx
    import torch

    sd2 = scorer.model
    scoring = scorer.config.to_dict()
    scoring["resolution"] = scorer.resolution
    latent = scorer.resolution // sd2.vae_scale_factor
    adapter = None
    if adapters is not None:
        from ..pytorch.adapters import read_adapter_header

        adapter = {
            "file": Path(adapters).name,
            "sha256": sha256_file(adapters),
            "header": read_adapter_header(adapters),
        }
    return {
        "format": BUNDLE_FORMAT,
        "dsdkit_version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "source": sd2.source if not Path(sd2.source).exists() else Path(sd2.source).name,
            "identity": sd2.identity(),
            "resolution": scorer.resolution,
            "latent_shape": [sd2.latent_channels, latent, latent],
            "text_length": sd2.tokenizer.max_length,
            "hidden_size": int(sd2.text_encoder.config.hidden_size),
            "prediction_type": sd2.prediction_type,
            "test_model_random_weights": sd2.is_test_model,
            # A model-declared masked context: the scorer graph attends as the model does (the forward computes it
            # from the token_mask input); the runtime builds that input with runtime.tokenizer.context_pool_mask.
            "context_tokens": sd2.context_tokens,
            **model_licence(sd2.folder, sd2.is_test_model, config.licence),
        },
        "adapter": adapter,
        "scoring": scoring,
        "layers": list(scorer.layer_names),
        "precision": config.precision,
        "export": {
            "exporter": config.exporter,
            "opset": config.opset,
            "batch": list(config.batch),
            "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__,
            "device": config.device,
        },
        "noise": {"seed": scorer.config.noise_seed, "bank_size": config.noise_bank_size},
        "tokenizer": {"folder": "tokenizer"},
        "graphs": {},
    }


#: The graphs of every bundle, in export order.
_GRAPHS = ("text_encoder", "image_encoder", "scorer")


def _export_graphs(
    scorer, staging: Path, manifest: dict[str, Any], config: ExportConfig, steps: _Steps
) -> dict[str, float]:
    from ..pytorch.models import Precision
    from .graphs import ImageEncoderGraph, ScorerGraph, TextEncoderGraph, fold_adapter
    from .specs import graph_specs
    from .to_onnx import export_graph

    sd2 = scorer.model
    folded_model, remainder, meta = fold_adapter(sd2, scorer.adapter, Precision(config.precision))
    grid = scorer.adapter.config.feature_grid if meta is not None else None
    condition_size = scorer.adapter.config.rank if meta is not None else None
    specs = graph_specs(sd2, scorer.resolution, len(scorer.layer_names), condition_size)
    bank = noise_bank(scorer.config.noise_seed, config.noise_bank_size, tuple(manifest["model"]["latent_shape"]))
    modules = {
        "text_encoder": lambda: TextEncoderGraph(sd2.text_encoder),
        "image_encoder": lambda: ImageEncoderGraph(sd2.vae, sd2.scaling_factor, meta, grid),
        "scorer": lambda: ScorerGraph(folded_model, scorer.layer_names, scorer.config, bank.to(sd2.device), remainder),
    }
    timings = {}
    for name in _GRAPHS:
        steps.next(f"exporting {name}")
        module = modules[name]().eval()
        file = f"onnx/{name}.onnx"
        info = export_graph(module, specs[name], staging / file, config.exporter, config.opset, sd2.device)
        timings[name] = info["seconds"]
        precision = config.precision if name == "scorer" else "fp32"
        manifest["graphs"][name] = {**specs[name].to_dict(file, config.batch), "precision": precision}
        if name == "scorer":
            record_baked_fields(staging / file, manifest)
    return timings


#: Where a bundle keeps the shortlist CLIP's tokenizer and image-processor files.
SHORTLIST_FOLDER = "clip"
_CLIP_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)


def _export_shortlist(config: ExportConfig, staging: Path, manifest: dict[str, Any], timings: dict, device):
    """Export the CLIP model's two towers as graphs of the bundle (fp32: they embed once per image and caption),
    copy its tokenizer and processor config, and record it in the manifest. Returns the loaded model (parity)."""
    from ..pytorch.clip import TorchClip
    from .graphs import ClipImageGraph, ClipTextGraph
    from .specs import clip_specs
    from .to_onnx import export_graph

    clip = TorchClip(config.shortlist, device=str(device))
    described = clip.describe()
    specs = clip_specs(described["image_size"], clip.tokenizer.max_length, described["embedding_dim"])
    for name, graph in (("clip_image_encoder", ClipImageGraph), ("clip_text_encoder", ClipTextGraph)):
        file = f"onnx/{name}.onnx"
        info = export_graph(
            graph(clip.model).eval(), specs[name], staging / file, config.exporter, config.opset, device
        )
        timings[name] = info["seconds"]
        manifest["graphs"][name] = {**specs[name].to_dict(file, config.batch), "precision": "fp32"}
    (staging / SHORTLIST_FOLDER).mkdir()
    for name in _CLIP_FILES:
        if (clip.folder / name).is_file():
            shutil.copy2(clip.folder / name, staging / SHORTLIST_FOLDER / name)
    source = config.shortlist if not Path(config.shortlist).exists() else Path(config.shortlist).name
    manifest["shortlist"] = {
        "model": source,
        "identity": clip.identity(),
        "folder": SHORTLIST_FOLDER,
        "graphs": {"image": "clip_image_encoder", "text": "clip_text_encoder"},
        "embedding_dim": described["embedding_dim"],
        "preprocess": described["preprocess"],
    }
    return clip


def _clip_references(clip, images, captions) -> dict[str, tuple[dict, dict]]:
    """Parity feeds and PyTorch outputs of the shortlist's graphs."""
    import torch

    from ..runtime.images import as_pil

    pixels = np.stack([clip.preprocess(as_pil(image)) for image in images]).astype(np.float32)
    ids = np.stack([clip.tokenizer.encode(c).ids for c in captions]).astype(np.int64)
    with torch.no_grad():
        image_vectors = clip.embed_images(list(images))
        text_vectors = clip.embed_texts(list(captions))
    return {
        "clip_image_encoder": ({"pixels": pixels}, {"embeddings": image_vectors}),
        "clip_text_encoder": ({"input_ids": ids}, {"embeddings": text_vectors}),
    }


def record_baked_fields(graph: Path, manifest: dict[str, Any]) -> None:
    """Record :func:`~dsdkit.runtime.bundle.baked_fields` of ``manifest`` in the scorer graph's ``metadata_props``.

    The graph's sha256 (in the manifest's file list) then protects them: a manifest whose scoring section, layers,
    noise bank or model shapes are edited after export no longer matches the graph, and the runtime refuses it
    instead of reporting (or scoring with) values the graph does not compute. Appended to the file, not rewritten
    through ``onnx``: see :func:`~dsdkit.runtime.onnxfile.metadata_entry`.
    """
    text = json.dumps(baked_fields(manifest), sort_keys=True, separators=(",", ":"))
    try:
        with open(graph, "ab") as handle:
            handle.write(metadata_entry(BAKED_KEY, text))
    except OSError as exc:
        raise output_error(graph, exc) from None


def _copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir()
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


# -- parity ------------------------------------------------------------------------------------------------------


def _tolerance(graph: dict[str, Any], output: str, precision: str) -> tuple[float, float]:
    tol = graph["tolerance"].get(output, {"atol": 1e-4, "rtol": 1e-4})
    if precision == "fp16":  # fp16 weights and activations against fp32 PyTorch: a few fp16 ulps of the output
        return max(tol["atol"], FP16_TOLERANCE[0]), max(tol["rtol"], FP16_TOLERANCE[1])
    return tol["atol"], tol["rtol"]


def pytorch_references(scorer, manifest: dict[str, Any], settings: ParitySettings) -> dict[str, Any]:
    """Everything parity compares against, computed with the (unfolded, fp32) PyTorch scorer: per-graph feeds and
    outputs, and the end-to-end score matrix at the parity's number of timesteps."""
    from ..pytorch.scorer import Scorer

    images, captions = parity_inputs(settings)
    started = time.perf_counter()
    graphs = _reference_outputs(scorer, images, captions, manifest, preprocess_image)
    steps = settings.timesteps if scorer.config.timesteps.value == "discffusion" else None
    reduced = scorer.config.replace(num_timesteps=steps or scorer.config.num_timesteps)
    matrix = Scorer(scorer.model, reduced, batch_size=scorer.batch_size, adapter=scorer.adapter).score(
        images, captions
    )
    return {
        "images": images,
        "captions": captions,
        "graphs": graphs,
        "matrix": matrix,
        "num_timesteps": steps,
        "seconds": time.perf_counter() - started,
    }


def run_parity(staging: Path, manifest: dict[str, Any], references: dict[str, Any], config: ExportConfig) -> dict:
    """Per-graph and end-to-end parity of the staged bundle on ONNX Runtime against :func:`pytorch_references`."""

    providers = ort_providers("cuda" if str(config.device).startswith("cuda") else "cpu")
    report: dict[str, Any] = {"inputs": asdict(config.parity), "providers": providers, "graphs": {}}
    started = time.perf_counter()
    # One session at a time for the per-graph checks, so peak memory is one graph's weights.
    for name, (feed, expected) in references["graphs"].items():
        graph = manifest["graphs"][name]
        with OrtRunner(staging / graph["file"], providers) as runner:
            got = runner.infer(feed)
        report["graphs"][name] = {
            output: compare_outputs(output, got[output], value, *_tolerance(graph, output, graph["precision"]))
            for output, value in expected.items()
        }
    # End to end: the runtime on the bundle vs the PyTorch scorer. Encode first and close the encoders' sessions
    # before the scorer's opens.
    images, captions, theirs = references["images"], references["captions"], references["matrix"]
    runners = {name: OrtRunner(staging / graph["file"], providers) for name, graph in manifest["graphs"].items()}
    matcher = Matcher(Bundle(staging, manifest), runners, num_timesteps=references["num_timesteps"])
    try:
        matcher.encode_images(images)
        matcher.encode_texts(captions)
        if matcher.config.needs_unconditional_pass:
            _ = matcher.empty_caption
        runners["text_encoder"].close()
        runners["image_encoder"].close()
        ours = matcher.score(images, captions)
    finally:
        matcher.close()
    atol, rtol = SCORE_TOLERANCE if config.precision == "fp32" else FP16_TOLERANCE
    scores = compare_outputs("scores", ours, theirs, atol, rtol)
    report["end_to_end"] = {
        "timesteps": matcher.timesteps,
        "matrix": [len(images), len(captions)],
        "scores": scores,
        # A top-1 flip between candidates whose reference scores differ by less than twice the measured error is a
        # numerical tie, not a disagreement.
        "ranking": ranking_agreement(ours, theirs, tie=2 * scores["max_abs"]),
        "onnxruntime": np.asarray(ours).round(7).tolist(),
        "pytorch": np.asarray(theirs).round(7).tolist(),
    }
    report["seconds"] = {
        "pytorch": round(references["seconds"], 1),
        "onnxruntime": round(time.perf_counter() - started, 1),
    }
    logger.info(
        "parity (%s): scores max abs %.2g, top-1 agreement %.3f, Spearman %.4f",
        config.precision,
        scores["max_abs"],
        report["end_to_end"]["ranking"]["top1_agreement"],
        report["end_to_end"]["ranking"]["spearman_mean"],
    )
    return report


def _reference_outputs(scorer, images, captions, manifest, preprocess_image) -> dict[str, tuple[dict, dict]]:
    """Feeds for each graph built from the parity inputs, and PyTorch's outputs for them (unfolded, fp32)."""
    import torch

    from ..pytorch.forward import Noising

    sd2 = scorer.model
    device = sd2.device
    pixels = np.stack([preprocess_image(im, scorer.resolution, scorer.config.resize) for im in images]).astype(
        np.float32
    )
    texts = scorer.encode_texts(captions)
    ids = np.stack([t.tokens.ids for t in texts]).astype(np.int64)
    with torch.no_grad():
        states = sd2.text_encoder(input_ids=torch.from_numpy(ids).to(device)).last_hidden_state.float()
        latents = sd2.vae.encode(torch.from_numpy(pixels).to(device)).latent_dist.mean.float() * sd2.scaling_factor
        condition = (
            scorer.adapter.condition(latents) if scorer.adapter is not None and scorer.adapter.conditioned else None
        )
    out = {
        "text_encoder": ({"input_ids": ids}, {"states": states.cpu().numpy()}),
        "image_encoder": (
            {"pixels": pixels},
            {
                "latents": latents.cpu().numpy(),
                **({"condition": condition.cpu().numpy()} if condition is not None else {}),
            },
        ),
    }
    # Scorer graph: pairs (image i, caption i mod M) at spread-out timesteps and noise-bank entries.
    count = len(images)
    pick = [i % len(texts) for i in range(count)]
    timesteps = np.linspace(50, 950, count).round().astype(np.int64)
    noise_index = (np.arange(count) * 7) % manifest["noise"]["bank_size"]
    masks = torch.stack([texts[j].mask for j in pick])
    feed = {
        "latents": latents.cpu().numpy(),
        "states": states[pick].cpu().numpy(),
        "token_mask": masks.cpu().numpy().astype(np.float32),
        "timestep": timesteps,
        "noise_index": noise_index.astype(np.int64),
    }
    if condition is not None:
        feed["condition"] = condition.cpu().numpy()
    signal, noise_scale = sd2.schedule.coefficients(timesteps.tolist())
    bank = noise_bank(scorer.config.noise_seed, int(noise_index.max()) + 1, tuple(manifest["model"]["latent_shape"]))
    with torch.no_grad():
        noising = Noising(
            torch.tensor(signal, dtype=torch.float32, device=device),
            torch.tensor(noise_scale, dtype=torch.float32, device=device),
            bank[noise_index].to(device),
            torch.from_numpy(timesteps).to(device),
        )
        layers, error = scorer.forward(latents, noising, states[pick], masks.to(device), condition=condition)
    out["scorer"] = (
        feed,
        {
            "attention": layers.mean(-1).cpu().numpy(),
            "layer_scores": layers.cpu().numpy(),
            "noise_error": error.cpu().numpy(),
        },
    )
    return out


# -- engines -------------------------------------------------------------------------------------------------


def _maybe_engines(staging: Path, manifest: dict[str, Any], config: ExportConfig, out: Path) -> dict[str, Any]:
    if config.engines is False:
        return {"built": False, "reason": "--no-engines"}
    reason = _trt_reason()
    if reason is not None:
        logger.warning(
            "TensorRT engines not built: %s; the ONNX bundle is complete (build engines on a GPU machine "
            "with `dsdkit build-engines %s`)",
            reason,
            out,
        )
        return {"built": False, "reason": reason}
    from .tensorrt import build_engines

    return build_engines(staging, manifest)


def add_engines(bundle_path: str | os.PathLike, workspace_gb: float | None = None) -> dict[str, Any]:
    """Build TensorRT engines into an existing bundle (on the GPU machine that will run them)."""
    from .tensorrt import build_engines

    bundle = Bundle.open(bundle_path)
    manifest = bundle.manifest
    manifest["engines"] = build_engines(bundle.path, manifest, workspace_gb)
    manifest["files"] = file_records(bundle.path)
    atomic_write_text(bundle.path / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest
