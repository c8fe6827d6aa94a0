"""Gallery search measured: a CLIP shortlist, then DSD, on a 10,000-image world gallery against every caption.

The gallery is ``world.gallery`` (every colour-shape combination, held-out ones included; no layout of the
training data); the vocabulary is ``world.vocabulary()``: 15 one-object and 180 "A left of B" captions, one
phrasing per meaning, so a prediction is correct when it is among the image's true captions. S = 10, top-1.

Stages (each resumable, its arrays under ``benchmarks/cache/gallery/``, out of git):

    python benchmarks/gallery_search.py render              # the gallery's PNGs, captions.txt, truths
    python benchmarks/gallery_search.py embed               # CLIP embeddings of every image and caption
    python benchmarks/gallery_search.py score               # DSD per-step scores: the subsample against every
                                                            # caption, the cascade slice's top 32, caption->images
    python benchmarks/gallery_search.py job                 # the real job, timed: dsdkit match GALLERY CAPTIONS
                                                            # --shortlist demo --shortlist-k 8 --adaptive --top-k 1
    python benchmarks/gallery_search.py slice               # 1,000 images: PyTorch vs bundle vs Ray, equal results
    python benchmarks/gallery_search.py report -o benchmarks/results/gallery-search-DATE.json

``--no-attention`` runs every DSD stage with the denoising term alone (the ``attention_term`` knob off; on the demo
model the attention term prefers the longer captions whatever the image): its files sit beside the default's in the
same gallery folder, named ``no-attention-*``, and reuse its images and CLIP embeddings. ``report`` without a
``job`` (or a ``slice``) for the variant reports the K = 8 adaptive cascade from the subsample, replayed, and
chooses the fused score's weight on one half of the subsample and reports it on the other.

``score`` computes exhaustive per-timestep scores once; exhaustive and adaptive cascades at every K are read from
them (adaptive by :func:`dsdkit.runtime.adaptive.simulate`, the same elimination code as a real run, replayed on the
stored scores), so each figure comes from one set of evaluations. Only ``job`` is timed (run it on a quiet
machine: ``--threads 2``); the others' rates are logged but not reported.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from math import comb
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_schedule import wilson  # noqa: E402
from machine import machine  # noqa: E402

logger = logging.getLogger("gallery_search")

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "gallery"
GALLERY_SEED = 30
STEPS = 10
KS = (1, 4, 8, 16, 32)
CASCADE_KS = (8, 16, 32)
CAPTION_K = 32  # caption -> images: DSD reranks each caption's CLIP top 32
SLICE = 1000


# -- shared ----------------------------------------------------------------------------------------------------


def _folder(args) -> Path:
    return args.cache / f"gallery-{args.images}"


#: Everything in a gallery's folder that the models produced; dropped when the models change (``_models_stamp``).
DERIVED = ("clip.npz", "dsd-alone.npz", "cascade.npz", "captions.npz", "job.parquet", "job.json", "slice.txt")


def _model_key(name: str) -> str:
    """What identifies a model's weights: its manifest's hash (the demo model, bundles), else its resolved path."""
    import hashlib

    from dsdkit.world.demo import demo_model_folder

    folder = demo_model_folder() if name == "demo" else Path(name).expanduser().resolve()
    manifest = folder / "MANIFEST.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else str(folder)


def _derived(args, name: str) -> Path:
    """A DSD-derived file of the gallery (the score variant's own: ``no-attention-NAME`` with ``--no-attention``)."""
    return _folder(args) / (f"no-attention-{name}" if args.no_attention else name)


def _models_stamp(args) -> None:
    """Scores cached for other weights are not reused: a gallery's folder remembers the models that filled it and
    its derived files are removed (and recomputed by their stages) when ``--model`` or ``--shortlist`` changed."""
    import shutil

    folder = _folder(args)
    stamp = folder / "models.json"
    now = {"model": _model_key(args.model), "shortlist": _model_key(args.shortlist)}
    if stamp.is_file() and json.loads(stamp.read_text()) == now:
        return
    if stamp.is_file():
        logger.warning("%s: the models changed since its scores were computed; they are computed again", folder)
    for name in DERIVED:
        (folder / name).unlink(missing_ok=True)
        (folder / f"no-attention-{name}").unlink(missing_ok=True)
    for stale in [*folder.glob("slice-*"), *folder.glob("no-attention-slice-*"), *folder.glob("*.bundle")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(now, indent=1) + "\n")


def _save(path: Path, **arrays) -> None:
    from dsdkit.runtime.files import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def _scenes(args):
    from dsdkit import world

    return world.gallery(GALLERY_SEED, args.images)


def _truth(args) -> dict:
    """The gallery's truth: per image its true captions' indices in the vocabulary, and its object count."""
    from dsdkit import world

    vocabulary = world.vocabulary()
    column = {caption: j for j, caption in enumerate(vocabulary)}
    truths, objects = [], []
    for scene in _scenes(args):
        truths.append(sorted(column[c] for c in scene.true_captions() if c in column))
        objects.append(len(scene.things))
    return {"vocabulary": vocabulary, "truths": truths, "objects": np.array(objects)}


def _subsample(args) -> np.ndarray:
    """A seeded order of the gallery: its first ``--dsd-images`` are DSD alone's subsample, its first
    ``--cascade-images`` the cascade slice (the subsample inside it)."""
    return np.random.default_rng([GALLERY_SEED, 1]).permutation(args.images)


def _scorer(args, normalize: str | None = None):
    from dsdkit.pytorch.scorer import build_scorer

    overrides = {"num_timesteps": STEPS, **({"normalize": normalize} if normalize else {})}
    # Explicit either way: the demo model declares the denoising term alone as its default (since 2026-12-08), and the
    # default score's records were measured with both terms.
    overrides["attention_term"] = not args.no_attention
    return build_scorer(args.model, overrides=overrides, batch_size=args.batch_size)


def _per_step_pairs(scorer, images, captions, pairs, label: str) -> tuple[np.ndarray, int]:
    out = scorer.score_pairs(images, captions, pairs)
    logger.debug("%s: %d pairs, %d UNet evaluations", label, len(pairs), out.unet_evaluations)
    return out.per_step, out.unet_evaluations


# -- render and embed -------------------------------------------------------------------------------------------


def render(args) -> None:
    from dsdkit import world

    folder = _folder(args)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes = _scenes(args)
    for n, scene in enumerate(scenes):
        path = images / f"{n:05d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            world.render(scene).save(tmp)
            tmp.replace(path)
    (folder / "captions.txt").write_text("\n".join(world.vocabulary()) + "\n", "utf-8")
    logger.info("%d gallery images and %d captions in %s", len(scenes), len(world.vocabulary()), folder)


def _paths(args) -> list[Path]:
    return [_folder(args) / "images" / f"{n:05d}.png" for n in range(args.images)]


def embed(args) -> None:
    from dsdkit.runtime.images import load_image

    from dsdkit.pytorch.clip import TorchClip

    path = _folder(args) / "clip.npz"
    if path.exists():
        return
    clip = TorchClip(args.shortlist, batch_size=256)
    started = time.perf_counter()
    parts = []
    paths = _paths(args)
    for start in range(0, len(paths), 1024):
        parts.append(clip.embed_images([load_image(p) for p in paths[start : start + 1024]]))
    texts = clip.embed_texts(_truth(args)["vocabulary"])
    _save(path, images=np.concatenate(parts), texts=texts)
    logger.info("embedded %d images and %d captions in %.0f s", len(paths), len(texts), time.perf_counter() - started)


def _clip(args) -> tuple[np.ndarray, np.ndarray]:
    saved = _load(_folder(args) / "clip.npz")
    return saved["images"].astype(np.float32), saved["texts"].astype(np.float32)


# -- DSD scores ---------------------------------------------------------------------------------------------------


def _collect(path: Path, rows: np.ndarray, columns: list[np.ndarray], score_row, chunk: int, label: str) -> None:
    """Per-step scores ``[len(rows), width, S]`` of each row's candidate columns, in resumable chunks."""
    width = max(len(c) for c in columns)
    state = _load(path) if path.exists() else {"per_step": np.full((len(rows), width, STEPS), np.nan), "done": 0}
    per_step, done = state["per_step"], int(state["done"])
    if len(per_step) < len(rows):  # a larger subsample than the saved one: rows are a prefix of the same order
        grown = np.full((len(rows), width, STEPS), np.nan)
        grown[: len(per_step)] = per_step
        per_step = grown
    started, spent = time.perf_counter(), 0
    while done < len(rows):
        block = range(done, min(done + chunk, len(rows)))
        for n in block:
            values, evaluations = score_row(rows[n], columns[n])
            per_step[n, : len(columns[n])] = values
            spent += evaluations
        done = block.stop
        _save(path, per_step=per_step, done=np.array(done))
        logger.info(
            "%s: %d/%d, %.0f UNet evaluations/s", label, done, len(rows), spent / (time.perf_counter() - started)
        )


def score(args) -> None:
    from dsdkit.runtime.images import load_image
    from dsdkit.runtime.shortlist import top_k

    truth = _truth(args)
    vocabulary = truth["vocabulary"]
    paths = _paths(args)
    order = _subsample(args)
    image_vectors, text_vectors = _clip(args)
    scorer = _scorer(args)
    everything = np.arange(len(vocabulary))

    def image_row(image: int, candidates: np.ndarray):
        pairs = [(0, int(j)) for j in candidates]
        values, spent = _per_step_pairs(scorer, [load_image(paths[image])], vocabulary, pairs, f"image {image}")
        return values, spent

    # DSD alone: the subsample against all 195 captions.
    alone = order[: args.dsd_images]
    _collect(
        _derived(args, "dsd-alone.npz"), alone, [everything] * len(alone), image_row, 8, "DSD alone (all captions)"
    )
    # The cascade slice: each image's CLIP top 32 captions (its top 8 and 16 are inside).
    sliced = order[: args.cascade_images]
    chosen, _ = top_k(image_vectors[sliced], text_vectors, max(CASCADE_KS))
    _collect(_derived(args, "cascade.npz"), sliced, list(chosen), image_row, 16, "cascade slice (CLIP top 32)")
    # Caption -> images: each caption's CLIP top CAPTION_K images, with the unconditional normalisation.
    normalized = _scorer(args, normalize="uncond")
    listed, _ = top_k(text_vectors, image_vectors, CAPTION_K)

    def caption_row(caption: int, candidates: np.ndarray):
        images = [load_image(paths[int(i)]) for i in candidates]
        pairs = [(i, 0) for i in range(len(images))]
        return _per_step_pairs(normalized, images, [vocabulary[caption]], pairs, f"caption {caption}")

    _collect(_derived(args, "captions.npz"), everything, list(listed), caption_row, 5, "caption -> images (uncond)")


# -- the real job -----------------------------------------------------------------------------------------------


def job(args) -> None:
    """``dsdkit match`` on the whole gallery, timed, its peak memory read by ``/usr/bin/time`` (GNU time)."""
    folder = _folder(args)
    out = _derived(args, "job.parquet")
    command = [
        str(Path(sys.executable).parent / "dsdkit"),
        "match",
        str(folder / "images"),
        str(folder / "captions.txt"),
        "--model",
        args.model,
        "--shortlist",
        args.shortlist,
        "--shortlist-k",
        "8",
        "--adaptive",
        "--top-k",
        "1",
        "--timesteps",
        str(STEPS),
        "--threads",
        str(args.threads),
        "--no-attention" if args.no_attention else "--attention",
        "-o",
        str(out),
    ]
    timed = ["/usr/bin/time", "-f", "%e %M", *command]
    started = time.perf_counter()
    done = subprocess.run(
        timed, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({done.returncode}): {done.stderr[-2000:]}")
    seconds, peak_kib = done.stderr.strip().splitlines()[-1].split()
    record = {"command": " ".join(["dsdkit", *command[1:]]), "wall_s": wall, "time_s": float(seconds)}
    record["threads"] = args.threads
    record["peak_rss_mib"] = int(peak_kib) / 1024
    _derived(args, "job.json").write_text(json.dumps(record, indent=1) + "\n")
    logger.info("job: %.0f s, peak %.0f MiB", wall, record["peak_rss_mib"])


def _read_job_arrays(args) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """The job's top captions and meta, and its scores (partial means where a candidate left early; NaN where not
    shortlisted) and shortlist similarities, as ``[image, vocabulary caption]`` in gallery order."""
    from dsdkit.runtime.results import read_result

    result = read_result(_derived(args, "job.parquet"))
    vocabulary = _truth(args)["vocabulary"]
    column = {c: j for j, c in enumerate(result.captions)}
    remap = np.array([column[c] for c in vocabulary])
    scores = np.asarray(result.scores, dtype=np.float64)[:, remap]
    exact = np.asarray(result.exact)[:, remap] if result.exact is not None else np.isfinite(scores)
    masked = np.where(exact, scores, -np.inf)
    top = np.where(np.isfinite(masked).any(axis=1), masked.argmax(axis=1), -1)
    names = [Path(n).stem for n in result.images]
    order = np.argsort([int(n) for n in names])
    similarity = np.asarray(result.shortlist_similarity, dtype=np.float64)[:, remap]
    return top[order], result.meta, scores[order], similarity[order]


def _fusion(args, chosen, similarity_k, per_step_k, clip_correct, objects, truths, cascade_rows, job) -> dict:
    """Issue 30 item 6, the reranker alone being below the shortlist: the fused score (:func:`dsdkit.runtime.
    shortlist.fuse`), its CLIP weight chosen on the cascade subsample (K = 8, adaptive inside, replayed) and
    reported on the job's other images (``job``: :func:`_read_job_arrays`; its scores are partial means where a
    candidate left early); without a job, chosen on the first half of the subsample and reported on the second (a
    seeded split)."""
    from dsdkit.runtime.adaptive import Schedule, simulate
    from dsdkit.runtime.shortlist import fuse

    outcomes, _, _ = simulate(per_step_k, Schedule.parse("default"), top_k=1)
    partial = np.stack([o.scores for o in outcomes])
    adaptive_pick = chosen[np.arange(len(chosen)), [o.order[0] for o in outcomes]]
    weights = np.round(np.linspace(0.0, 1.0, 21), 2)
    halves = np.random.default_rng([GALLERY_SEED, 2]).permutation(len(cascade_rows))
    validate = np.arange(len(cascade_rows)) if job is not None else np.sort(halves[: len(halves) // 2])
    validation = []
    for weight in weights:
        fused = fuse(partial[validate], similarity_k[validate], weight)
        pick = chosen[validate, np.nanargmax(fused, axis=1)]
        validation.append(float(_is_true(truths, cascade_rows[validate], pick).mean()))
    best = float(weights[int(np.argmax(validation))])
    if job is not None:
        job_top, _, scores, similarity = job
        rows = np.setdiff1d(np.arange(args.images), cascade_rows)
        fused = fuse(scores[rows], similarity[rows], best)
        usable = np.isfinite(fused).any(axis=1)
        pick = np.where(usable, np.nanargmax(np.where(np.isfinite(fused), fused, -np.inf), axis=1), -1)
        correct = np.array([p >= 0 and int(p) in truths[int(r)] for r, p in zip(rows, pick, strict=True)])
        cascade_correct = np.array(
            [t >= 0 and int(t) in truths[int(r)] for r, t in zip(rows, job_top[rows], strict=True)]
        )
        chosen_on = f"the cascade subsample ({len(cascade_rows)} images, K=8 adaptive replayed)"
    else:
        held = np.sort(halves[len(halves) // 2 :])
        rows = cascade_rows[held]
        pick = chosen[held, np.nanargmax(fuse(partial[held], similarity_k[held], best), axis=1)]
        correct = _is_true(truths, rows, pick)
        cascade_correct = _is_true(truths, rows, adaptive_pick[held])
        chosen_on = f"half of the cascade subsample ({len(validate)} images, K=8 adaptive replayed)"
    return {
        "clip_weight": best,
        "chosen_on": chosen_on,
        "validation_top1_by_weight": dict(zip([str(w) for w in weights], validation, strict=True)),
        "report_images": int(len(rows)),
        "fused": _split(correct, objects[rows]),
        "clip_alone": _split(clip_correct[rows], objects[rows]),
        "cascade": _split(cascade_correct, objects[rows]),
        "fused_vs_clip": _mcnemar(clip_correct[rows], correct),
        "fused_vs_cascade": _mcnemar(cascade_correct, correct),
    }


# -- the 1,000-image slice: the other paths give the same result -----------------------------------------------


def slice_check(args) -> None:
    """The slice's job three ways: PyTorch in one process, the exported bundle (torch-free ONNX Runtime, its own
    CLIP graphs), and Ray with two workers (the planned job's stored shortlist, which workers reuse)."""
    folder = _folder(args)
    listing = folder / "slice.txt"  # the same images for both score variants
    listing.write_text("".join(f"images/{n:05d}.png\n" for n in range(SLICE)))
    dsdkit = str(Path(sys.executable).parent / "dsdkit")
    common = ["--shortlist-k", "8", "--adaptive", "--top-k", "1", "--timesteps", str(STEPS)]
    common += ["--threads", "1" if args.threads < 2 else str(args.threads)]
    common += ["--no-attention" if args.no_attention else "--attention"]
    bundle = folder / "demo-shortlist.bundle"
    runs = {
        "pytorch": [dsdkit, "match", str(listing), str(folder / "captions.txt"), "--model", args.model]
        + ["--shortlist", args.shortlist, *common, "-o", str(_derived(args, "slice-pytorch.parquet"))],
        "bundle": [dsdkit, "match", str(listing), str(folder / "captions.txt"), "--bundle", str(bundle)]
        + [*common, "-o", str(_derived(args, "slice-bundle.parquet"))],
        "ray": [dsdkit, "match", str(listing), str(folder / "captions.txt"), "--model", args.model]
        + ["--shortlist", args.shortlist, *common, "--ray", "local", "--workers", "2", "--cpus-per-worker", "1"]
        + ["-o", str(_derived(args, "slice-ray.parquet"))],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    if not bundle.exists():
        export = [dsdkit, "export", "--model", args.model, "--shortlist", args.shortlist, "--out", str(bundle)]
        subprocess.run(export + ["--timesteps", str(STEPS), common[-1]], check=True, env=env)
    for name, command in runs.items():
        if not _derived(args, f"slice-{name}.parquet").exists():
            logger.info("slice: %s", name)
            subprocess.run(command, check=True, env=env)


def _slice_agreement(args) -> dict:
    from dsdkit.runtime.results import read_result

    results = {name: read_result(_derived(args, f"slice-{name}.parquet")) for name in ("pytorch", "bundle", "ray")}
    base = results["pytorch"]

    def top(result):
        scores = np.where(np.asarray(result.exact), np.asarray(result.scores, np.float64), -np.inf)
        return scores.argmax(axis=1)

    out = {}
    for name in ("bundle", "ray"):
        other = results[name]
        assert other.images == base.images and other.captions == base.captions
        both = np.asarray(base.exact) & np.asarray(other.exact)
        difference = np.abs(np.asarray(base.scores, np.float64) - np.asarray(other.scores, np.float64))[both]
        out[name] = {
            "images": len(base.images),
            "top1_equal": float((top(base) == top(other)).mean()),
            "same_pairs_scored_exactly": bool((np.asarray(base.exact) == np.asarray(other.exact)).all()),
            "max_abs_score_difference": float(difference.max()) if difference.size else 0.0,
        }
    return out


# -- report ---------------------------------------------------------------------------------------------------


def _accuracy(correct: np.ndarray) -> dict:
    n, k = len(correct), int(correct.sum())
    low, high = wilson(k, n)
    return {"n": n, "top1": k / n if n else float("nan"), "wilson95": [low, high]}


def _mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of paired correctness: b right where a is wrong against the reverse."""
    gained, lost = int((b & ~a).sum()), int((a & ~b).sum())
    n = gained + lost
    tail = sum(comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"b_right_a_wrong": gained, "a_right_b_wrong": lost, "p_two_sided": min(1.0, 2 * tail)}


def _split(correct: np.ndarray, objects: np.ndarray) -> dict:
    return {
        "all": _accuracy(correct),
        "one_object": _accuracy(correct[objects == 1]),
        "two_objects": _accuracy(correct[objects == 2]),
    }


def _is_true(truths: list, rows: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return np.array([int(p) in truths[int(r)] for r, p in zip(rows, predicted, strict=True)])


def _average_precision(relevant: np.ndarray) -> float:
    """AP of one ranking of the whole gallery (``relevant[i]``: the i-th ranked image is true)."""
    hits = np.cumsum(relevant)
    total = relevant.sum()
    return float((hits[relevant] / (np.flatnonzero(relevant) + 1)).sum() / total) if total else float("nan")


def report(args) -> None:
    from dsdkit.runtime.adaptive import Schedule, simulate
    from dsdkit.runtime.shortlist import top_k

    import dsdkit

    truth = _truth(args)
    truths, objects, vocabulary = truth["truths"], truth["objects"], truth["vocabulary"]
    captions = len(vocabulary)
    image_vectors, text_vectors = _clip(args)
    similarity_top, _ = top_k(image_vectors, text_vectors, max(KS))
    everyone = np.arange(args.images)
    recall = {
        f"recall@{k}": float(np.mean([any(int(j) in truths[i] for j in similarity_top[i, :k]) for i in everyone]))
        for k in KS
    }
    clip_correct = _is_true(truths, everyone, similarity_top[:, 0])
    schedule = Schedule.parse("default")
    record: dict = {"clip_alone": _split(clip_correct, objects), "shortlist_recall": recall}

    # DSD alone on the subsample, and the cascade restricted to those images for agreement with it.
    order = _subsample(args)
    alone = _load(_derived(args, "dsd-alone.npz"))["per_step"]
    alone_rows = order[: len(alone)]  # as many as ``score`` scored (its --dsd-images)
    alone_top = alone.mean(-1).argmax(axis=1)
    alone_correct = _is_true(truths, alone_rows, alone_top)
    record["dsd_alone"] = _split(alone_correct, objects[alone_rows])
    record["dsd_alone"]["vs_clip"] = _mcnemar(clip_correct[alone_rows], alone_correct)

    cascade = _load(_derived(args, "cascade.npz"))["per_step"]
    cascade_rows = order[: len(cascade)]  # as many as ``score`` scored (its --cascade-images)
    chosen, similarity_chosen = top_k(image_vectors[cascade_rows], text_vectors, max(CASCADE_KS))
    similarity_k8 = np.asarray(similarity_chosen[:, :8], dtype=np.float64)
    tables = {}
    for k in CASCADE_KS:
        per_step = cascade[:, :k]
        exhaustive_pick = chosen[np.arange(len(chosen)), per_step.mean(-1).argmax(axis=1)]
        outcomes, spent, _ = simulate(per_step, schedule, top_k=1)
        adaptive_pick = chosen[np.arange(len(chosen)), [o.order[0] for o in outcomes]]
        rows = {}
        for mode, pick, conditional in (
            ("exhaustive", exhaustive_pick, len(chosen) * k * STEPS),
            ("adaptive", adaptive_pick, spent["conditional"]),
        ):
            correct = _is_true(truths, cascade_rows, pick)
            inside = np.isin(cascade_rows, alone_rows)
            position = {int(r): n for n, r in enumerate(alone_rows)}
            agree = [pick[n] == alone_top[position[int(r)]] for n, r in enumerate(cascade_rows) if inside[n]]
            unconditional = len(chosen) * STEPS
            exhaustive_all = len(chosen) * (captions * STEPS + STEPS)
            rows[mode] = {
                **_split(correct, objects[cascade_rows]),
                "vs_clip": _mcnemar(clip_correct[cascade_rows], correct),
                "agreement_with_dsd_alone": float(np.mean(agree)) if agree else None,
                "unet_evaluations_per_image": (conditional + unconditional) / len(chosen),
                "fraction_of_exhaustive": (conditional + unconditional) / exhaustive_all,
            }
        tables[f"K={k}"] = rows
    record["cascade"] = tables
    have_job = _derived(args, "job.json").exists() and _derived(args, "job.parquet").exists()
    job = _read_job_arrays(args) if have_job else None
    record["fusion"] = _fusion(
        args, chosen[:, :8], similarity_k8, cascade[:, :8], clip_correct, objects, truths, cascade_rows, job
    )
    if have_job:
        _report_job(args, record, job, truths, objects, clip_correct, captions)
    else:
        record["job"] = None  # not run for this variant: the K = 8 adaptive cascade is the subsample's, replayed
    _report_captions(args, record, truths, captions, image_vectors, text_vectors)
    if all(_derived(args, f"slice-{n}.parquet").exists() for n in ("pytorch", "bundle", "ray")):
        record["slice"] = _slice_agreement(args)
    k8 = tables["K=8"]["adaptive"]
    cascade_top1 = record["job"]["all"]["top1"] if have_job else k8["all"]["top1"]
    best_alone = max(record["clip_alone"]["all"]["top1"], record["dsd_alone"]["all"]["top1"])
    record["targets"] = {
        "cascade_k8_adaptive_top1": cascade_top1,
        "cascade_k8_adaptive_images": args.images if have_job else len(cascade_rows),
        "clip_alone_top1": record["clip_alone"]["all"]["top1"],
        "dsd_alone_top1": record["dsd_alone"]["all"]["top1"],
        "cascade_at_least_the_better_alone": cascade_top1 >= best_alone
        or (
            record["dsd_alone"]["all"]["top1"] > record["clip_alone"]["all"]["top1"]
            and cascade_top1 >= record["dsd_alone"]["all"]["top1"] - 0.01
        ),
        "evaluations_at_most_1_40_of_exhaustive": (
            (record["job"]["fraction_of_exhaustive"] or 1) if have_job else k8["fraction_of_exhaustive"]
        )
        <= 1 / 40,
        "slice_fraction_k8_adaptive": k8["fraction_of_exhaustive"],
        "within_60_minutes": record["job"]["wall_s"] <= 3600 if have_job else None,
        "fusion_beats_clip_and_cascade_on_report_images": record["fusion"]["fused"]["all"]["top1"]
        > max(record["fusion"]["clip_alone"]["all"]["top1"], record["fusion"]["cascade"]["all"]["top1"]),
    }
    threads = json.loads(_derived(args, "job.json").read_text()).get("threads") if have_job else args.threads
    record.update(
        benchmark="gallery_search",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/gallery_search.py", *sys.argv[1:]]),
        machine=machine(threads=threads),  # the timed job's threads
        versions={"dsdkit": dsdkit.__version__, "numpy": np.__version__},
        gallery={"images": args.images, "seed": GALLERY_SEED, "captions": captions, "timesteps": STEPS},
        subsamples={"dsd_alone": len(alone_rows), "cascade": len(cascade_rows)},
        schedule=schedule.describe(),
        knobs={"num_timesteps": STEPS, "attention_term": not args.no_attention},
    )
    text = json.dumps(record, indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    logger.info("%s", text)


def _report_job(args, record, job, truths, objects, clip_correct, captions) -> None:
    """The real job (``job``: :func:`_read_job_arrays`): K = 8, adaptive, every gallery image."""
    job_top, job_meta, _, _ = job
    job_correct = np.array([t >= 0 and int(t) in truths[i] for i, t in enumerate(job_top)])
    timing = json.loads(_derived(args, "job.json").read_text())
    # The record names the checkout's files relative to its root (no path of the machine that ran it).
    timing["command"] = timing["command"].replace(str(HERE.parent) + os.sep, "")
    spent = job_meta.get("evaluations", {})
    exhaustive = args.images * (captions * STEPS + STEPS)
    used = (spent.get("conditional") or 0) + (spent.get("unconditional") or 0)
    rate = used / timing["wall_s"] if used else float("nan")
    record["job"] = {
        **timing,
        **_split(job_correct, objects),
        "vs_clip": _mcnemar(clip_correct, job_correct),
        "unet_evaluations": used,
        "exhaustive_unet_evaluations": exhaustive,
        "fraction_of_exhaustive": used / exhaustive if used else None,
        "exhaustive_wall_s_extrapolated": exhaustive / rate if used else None,
        "evaluations_meta": spent,
    }


def _report_captions(args, record, truths, captions, image_vectors, text_vectors) -> None:
    # Caption -> images: P@10 and AP over the whole gallery, CLIP alone against the cascade (uncond-normalised).
    relevant = np.zeros((captions, args.images), dtype=bool)
    for i, listed in enumerate(truths):
        relevant[listed, i] = True
    ranking = np.argsort(-(text_vectors @ image_vectors.T), axis=1, kind="stable")
    per_caption = _load(_derived(args, "captions.npz"))["per_step"]
    clip_p10, clip_ap, cascade_p10, cascade_ap = [], [], [], []
    for j in range(captions):
        clip_order = ranking[j]
        head = clip_order[:CAPTION_K][np.argsort(-per_caption[j, :CAPTION_K].mean(-1), kind="stable")]
        cascade_order = np.concatenate([head, clip_order[CAPTION_K:]])
        for order_, p10, ap in ((clip_order, clip_p10, clip_ap), (cascade_order, cascade_p10, cascade_ap)):
            hits = relevant[j, order_]
            p10.append(float(hits[:10].mean()))
            ap.append(_average_precision(hits))
    record["caption_to_images"] = {
        "rerank_k": CAPTION_K,
        "clip_alone": {"p@10": float(np.mean(clip_p10)), "map": float(np.nanmean(clip_ap))},
        "cascade_uncond": {"p@10": float(np.mean(cascade_p10)), "map": float(np.nanmean(cascade_ap))},
        "true_images_per_caption": {"min": int(relevant.sum(1).min()), "median": float(np.median(relevant.sum(1)))},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["render", "embed", "score", "job", "slice", "report", "all"])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--dsd-images", type=int, default=400)
    parser.add_argument("--cascade-images", type=int, default=2000)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--shortlist", default="demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("-o", "--output", default=None)
    parser.add_argument("--no-attention", action="store_true", help="DSD with the denoising term alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    stages = {"render": render, "embed": embed, "score": score, "job": job, "slice": slice_check, "report": report}
    for name in stages if args.stage == "all" else [args.stage]:
        if name != "render":
            _models_stamp(args)
        stages[name](args)


if __name__ == "__main__":
    main()
