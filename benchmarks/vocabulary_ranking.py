"""Ranking against every caption the world can say: full-vocabulary top-1 of the default DSD score.

Each held-out world image (never in training; one- and two-object images apart) is scored exhaustively against the
195 captions of :func:`dsdkit.world.vocabulary` (15 one-object + 180 "A left of B", one phrasing per meaning) at
S = 10; a prediction is correct when it is the image's truth. Pairwise benchmark items hide a bias that this shows:
a one-object image may prefer a two-object caption that contains its object (a longer caption scores higher).

Also measured, as a candidate fix of that bias: **per-caption mean normalisation**, each caption's score minus its
mean score over a fixed reference set of other held-out images (computed once per caption, as the empty caption's
score is per image). It would be offered as a ``--normalize`` choice only if it is better on every subset.

And the denoising term alone (``--no-attention``: the ``attention_term`` knob off, Diffusion Classifier's score),
since on the demo model the attention term is what prefers the longer caption (``default`` in that record is the
score with the knob off).

    python benchmarks/vocabulary_ranking.py MODEL --name NAME [--no-attention] -o benchmarks/results/ROW.json
"""

from __future__ import annotations

import argparse
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
import world_table  # noqa: E402  (machine record, Wilson intervals)

logger = logging.getLogger("vocabulary_ranking")

NUM_TIMESTEPS = 10


def _images(seed: int, one_object: int, two_object: int):
    from dsdkit import world

    return world.gallery(seed * 10 + 1, one_object, one_object_fraction=1.0) + world.gallery(
        seed * 10 + 2, two_object, one_object_fraction=0.0
    )


def _top1(scores: np.ndarray, truths: list[int], scenes) -> dict:
    best = scores.argmax(axis=1)
    right = best == np.asarray(truths)
    out = {}
    for name, chosen in (
        ("all", np.ones(len(scenes), bool)),
        ("one-object", np.array([len(s.things) == 1 for s in scenes])),
        ("two-object", np.array([len(s.things) == 2 for s in scenes])),
    ):
        hits, n = int(right[chosen].sum()), int(chosen.sum())
        out[name] = {"top1": hits / n, "correct": hits, "n": n, "wilson95": world_table.wilson(hits, n)}
    return out


def _longer_caption_bias(scores: np.ndarray, truths: list[int], scenes, vocabulary: list[str]) -> dict:
    """Of the one-object images' wrong picks, how many are a two-object caption containing their object."""
    wrong, containing = 0, 0
    for row, truth, scene in zip(scores, truths, scenes, strict=True):
        if len(scene.things) != 1 or row.argmax() == truth:
            continue
        wrong += 1
        pick = vocabulary[int(row.argmax())]
        containing += int(" left of " in pick and scene.things[0].phrase in pick)
    return {"wrong": wrong, "two_object_caption_containing_the_object": containing}


def measure(args) -> dict:
    from dsdkit.train.world import pin_threads

    from dsdkit import world
    from dsdkit.jobs.engines import open_engine
    from dsdkit.jobs.specs import EngineSpec

    pin_threads(args.threads)
    vocabulary = world.vocabulary()
    scenes = _images(args.items_seed, args.one_object, args.two_object)
    reference = world.gallery(args.items_seed * 10 + 3, args.reference)
    truths = [vocabulary.index(world.truth(scene)) for scene in scenes]
    # Explicit either way: the demo model's declared default (since 2026-12-08) is the denoising term alone.
    knobs = {"num_timesteps": NUM_TIMESTEPS, "attention_term": not args.no_attention}
    spec = EngineSpec(model=args.model, knobs=knobs, batch_size=64, chunk_size=32)
    started = time.perf_counter()
    with open_engine(spec) as engine:
        texts = vocabulary
        scores = engine.score([world.render(s) for s in scenes], texts)
        logger.info("scored %d x %d in %.0f s", len(scenes), len(texts), time.perf_counter() - started)
        reference_scores = engine.score([world.render(s) for s in reference], texts)
        identity = engine.identity().to_dict()["model"]
    caption_means = reference_scores.mean(axis=0)
    record = {
        "benchmark": "world-vocabulary-ranking",
        "name": args.name,
        "model": args.model if args.model == "demo" else Path(args.model).name,
        "model_identity": identity,
        "items_seed": args.items_seed,
        "num_timesteps": NUM_TIMESTEPS,
        "knobs": knobs,
        "vocabulary": len(vocabulary),
        "images": {"one_object": args.one_object, "two_object": args.two_object},
        "reference_images": args.reference,
        "default": _top1(scores, truths, scenes),
        "caption_mean_normalised": _top1(scores - caption_means[None, :], truths, scenes),
        "longer_caption_bias": {
            "default": _longer_caption_bias(scores, truths, scenes, vocabulary),
            "caption_mean_normalised": _longer_caption_bias(
                scores - caption_means[None, :], truths, scenes, vocabulary
            ),
        },
        "unet_evaluations": (len(scenes) + len(reference)) * len(vocabulary) * NUM_TIMESTEPS,
        "machine": world_table.machine(),
        "wall_s": round(time.perf_counter() - started, 1),
        "command": " ".join(["python", "benchmarks/vocabulary_ranking.py", *sys.argv[1:]]),
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--one-object", type=int, default=120)
    parser.add_argument("--two-object", type=int, default=180)
    parser.add_argument("--reference", type=int, default=40, help="images of the caption-mean reference set")
    parser.add_argument("--items-seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-attention", action="store_true", help="score with the denoising term alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dsdkit.runtime.files import atomic_write_text

    record = measure(args)
    atomic_write_text(args.output, json.dumps(record, indent=1) + "\n")
    for variant in ("default", "caption_mean_normalised"):
        cells = {k: f"{100 * v['top1']:.1f}% of {v['n']}" for k, v in record[variant].items()}
        print(args.name, variant, cells)


if __name__ == "__main__":
    main()
