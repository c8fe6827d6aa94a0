"""Benchmark metrics on hand-made score matrices, and end-to-end evaluation on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsdkit.jobs.datasets import Example, TaskKind
from dsdkit.jobs.evaluation import compute_metrics, score_examples

IMG = [Path(f"/x/{i}.png") for i in range(4)]


def t2i(split, positive=0):
    return Example(TaskKind.text_to_image, IMG[:2], ["a cat"], positive=positive, split=split)


def test_comvg_accuracy_per_split_average_and_overall():
    examples = [t2i("subject"), t2i("subject"), t2i("object"), t2i("verb")]
    matrices = [np.array([[2.0], [1.0]]), np.array([[1.0], [2.0]]), np.array([[3.0], [1.0]]), np.array([[1.0], [1.0]])]
    metrics = compute_metrics("comvg", examples, matrices)
    assert metrics["accuracy/subject"] == 0.5 and metrics["accuracy/object"] == 1.0
    assert metrics["accuracy/verb"] == 0.0  # a tie is not a correct choice
    assert metrics["accuracy/average"] == pytest.approx(0.5) and metrics["accuracy/overall"] == 0.5


def test_winoground_text_image_group():
    example = Example(TaskKind.group, IMG[:2], ["c0", "c1"], split="Object")
    # rows: images, columns: captions
    both = np.array([[5.0, 1.0], [1.0, 5.0]])
    text_only = np.array([[5.0, 4.0], [6.0, 7.0]])  # each image prefers its caption; caption 0 prefers image 1
    neither = np.array([[1.0, 5.0], [5.0, 1.0]])
    metrics = compute_metrics("winoground", [example] * 3, [both, text_only, neither])
    assert metrics["text"] == pytest.approx(2 / 3) and metrics["image"] == pytest.approx(1 / 3)
    assert metrics["group"] == pytest.approx(1 / 3) and metrics["group/Object"] == pytest.approx(1 / 3)


def test_top_k_and_auc():
    candidates = [
        Example(TaskKind.image_to_text, IMG[:1], [f"c{j}" for j in range(10)], positive=p) for p in (0, 3, 9)
    ]
    rows = [np.arange(10.0)[::-1][None], np.arange(10.0)[None], np.arange(10.0)[None]]
    metrics = compute_metrics("jsonl", candidates, rows)
    assert metrics["top1"] == pytest.approx(2 / 3) and metrics["top5"] == pytest.approx(2 / 3)
    pairs = [Example(TaskKind.pair, IMG[:1], ["c"], label=label) for label in (1, 1, 0, 0)]
    auc = compute_metrics("jsonl", pairs, [np.array([[s]]) for s in (0.9, 0.4, 0.5, 0.1)])
    assert auc["auc"] == pytest.approx(0.75) and auc["accuracy/best_threshold"] == pytest.approx(0.75)


def test_subsets_are_reported_apart_and_top5_only_beyond_five_candidates():
    two = [Example(TaskKind.image_to_text, IMG[:1], ["a", "b"], positive=0, subset="colour", split="test")] * 4
    rows = [np.array([[2.0, 1.0]])] * 3 + [np.array([[1.0, 1.0]])]  # the last is a tie: wrong
    eight = [Example(TaskKind.image_to_text, IMG[:1], [f"c{j}" for j in range(8)], positive=7, subset="rank-8")] * 2
    ranked = [np.arange(8.0)[None], np.arange(8.0)[::-1][None]]  # rank 0, then rank 7
    group = Example(TaskKind.group, IMG[:2], ["c0", "c1"], subset="group-binding", split="test")
    # Each image prefers its own caption (text right); caption 0 prefers image 1 (image wrong).
    text_only = np.array([[5.0, 4.0], [6.0, 7.0]])
    metrics = compute_metrics(
        "jsonl", two + eight + [group] * 2, rows + ranked + [np.array([[5.0, 1.0], [1.0, 5.0]]), text_only]
    )
    assert metrics["top1/colour"] == pytest.approx(0.75)
    assert "top5/colour" not in metrics  # two candidates: top-5 would always be 1
    assert metrics["top1/rank-8"] == pytest.approx(0.5) and metrics["top5/rank-8"] == pytest.approx(0.5)
    assert metrics["text/group-binding"] == 1.0 and metrics["image/group-binding"] == 0.5
    assert metrics["group/group-binding"] == 0.5 and "group/test" not in metrics
    # Top-5 over the sets that have more than 5 candidates only (the 2-candidate sets would always count).
    assert metrics["top5"] == pytest.approx(0.5)
    small = compute_metrics("jsonl", two, rows)
    assert "top5" not in small and small["top1"] == pytest.approx(0.75)


def test_score_examples_matches_direct_scoring_and_shares_work(tiny_model, tmp_path, image_factory):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.scorer import Scorer

    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        path = tmp_path / f"{i}.png"
        image_factory(colour, "circle", seed=i).save(path)
        paths.append(path)
    examples = [
        Example(TaskKind.text_to_image, paths[:2], ["a red circle"], positive=0),
        Example(TaskKind.image_to_text, paths[1:2], ["a red circle", "a blue circle"], positive=1),
        Example(TaskKind.group, paths[1:], ["a blue circle", "a green circle"]),
    ]
    config = ScoringConfig(num_timesteps=1)
    scorer = Scorer(tiny_model, config)
    matrices = score_examples(scorer, examples, chunk_pairs=3)
    direct = Scorer(tiny_model, config).score(paths, ["a red circle", "a blue circle", "a green circle"])
    np.testing.assert_allclose(matrices[0][:, 0], direct[:2, 0], rtol=1e-6)
    np.testing.assert_allclose(matrices[1][0], direct[1, :2], rtol=1e-6)
    np.testing.assert_allclose(matrices[2], direct[1:, 1:], rtol=1e-6)


def test_evaluate_advances_per_unet_batch(tiny_model, tmp_path, image_factory):
    """The progress unit is a UNet evaluation, reported as each batch finishes (not once per chunk of examples)."""
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.jobs.datasets import Dataset
    from dsdkit.jobs.evaluation import evaluate, planned_evaluations
    from dsdkit.pytorch.scorer import Scorer

    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        paths.append(tmp_path / f"{i}.png")
        image_factory(colour, "circle", seed=i).save(paths[-1])
    examples = [
        Example(TaskKind.image_to_text, paths[:1], ["a red circle", "a blue circle", "a cat"], positive=0),
        Example(TaskKind.text_to_image, paths[:2], ["a red circle"], positive=0),
        Example(TaskKind.group, paths[1:], ["a blue circle", "a green circle"]),
    ]
    # 9 pairs over 3 images at S=1; the denoising term needs the unconditional pass of each image.
    config = ScoringConfig(num_timesteps=1)
    assert config.needs_unconditional_pass
    scorer = Scorer(tiny_model, config, batch_size=2)
    assert planned_evaluations(scorer, examples) == 3 + 9
    calls = []

    def progress(total, done):
        calls.append(("total", total, done))
        return calls.append

    dataset = Dataset("jsonl", tmp_path / "data.jsonl", tmp_path, examples)
    evaluate(scorer, dataset, progress=progress)
    # One chunk: the 3 unconditional evaluations in batches of 2 and 1, then the 9 conditional in 2, 2, 2, 2, 1.
    assert calls == [("total", 12, 0), 2, 1, 2, 2, 2, 2, 1]

    # In chunks that share images, and on a scorer that has the unconditional passes cached already: the calls
    # still add up to the planned total (the cached work is reported once its chunk is done).
    counted = []
    score_examples(scorer, examples, chunk_pairs=4, progress=counted.append)
    assert sum(counted) == planned_evaluations(scorer, examples, chunk_pairs=4) == 12
