"""`dsdkit match --adaptive / --pairs` and `dsdkit eval --adaptive` on the demo model: survivors' scores are the
exhaustive job's, partial cells are marked in every format, evaluation counts, chunked streaming and --resume, given
pairs, per-caption ranking, and the one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.adaptive import Schedule, resolve_schedule
from typer.testing import CliRunner

from dsdkit.cli import app

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CAPTIONS = DEMO / "captions.txt"
S = 4
SCHEDULE = "keep=4,2,k:steps=1,2,all"


@pytest.fixture(scope="module")
def engine():
    from dsdkit.pytorch.scorer import build_scorer

    return build_scorer("demo", overrides={"num_timesteps": S}, batch_size=32)


@pytest.fixture(scope="module")
def exhaustive(engine):
    from dsdkit.jobs.match import match

    return match(DEMO, CAPTIONS, model=engine.model, config=engine.config)


def run(engine, **options):
    from dsdkit.jobs.match import match

    return match(DEMO, CAPTIONS, model=engine.model, config=engine.config, **options)


def test_adaptive_job_keeps_survivors_exact_and_counts_its_evaluations(engine, exhaustive, tmp_path):
    result = run(engine, adaptive=SCHEDULE, top_k=1, output=tmp_path / "r.json")
    n, m = exhaustive.scores.shape
    exact = result.exact
    plan = resolve_schedule(Schedule.parse(SCHEDULE), m, S)
    assert (exact.sum(1) == plan.keep[-2]).all()  # those entering the last stage reach all S timesteps
    np.testing.assert_allclose(result.scores[exact], exhaustive.scores[exact], rtol=1e-6, atol=1e-6)
    spent = result.meta["evaluations"]
    assert spent["conditional"] == n * plan.evaluations(m)
    assert spent["exhaustive_conditional"] == n * m * S
    assert spent["unconditional"] == spent["exhaustive_unconditional"] == n * S
    assert result.meta["unet_evaluations"] == spent["conditional"] + spent["unconditional"]
    document = json.loads((tmp_path / "r.json").read_text())
    for i in range(n):
        for j in range(m):
            cell, partial = document["scores"][i][j], document["partial"]["scores"][i][j]
            assert (cell is None) == (not exact[i, j]) and (partial is None) == exact[i, j]
            assert document["partial"]["timesteps"][i][j] == result.held[i, j]
        best = document["top_k"]["per_image"][i]["top_k"][0]
        assert best["exact"] is True and best["index"] == int(
            np.nanargmax(np.where(exact[i], result.scores[i], np.nan))
        )
    assert document["meta"]["adaptive"] == {"schedule": SCHEDULE, "per": "image", "top_k": 1}


def test_csv_holds_exact_cells_only_and_jsonl_marks_partial_entries(engine, tmp_path):
    result = run(engine, adaptive=SCHEDULE, top_k=2, output=tmp_path / "r.csv")
    rows = list(csv.reader((tmp_path / "r.csv").open()))
    for i, row in enumerate(rows[1:]):
        assert [cell != "" for cell in row[1:]] == result.exact[i].tolist()
    run(engine, adaptive=SCHEDULE, top_k=5, output=tmp_path / "r.jsonl")
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    images = [r for r in records if r["type"] == "image"]
    entries = [e for r in images for e in r["top_k"]]
    # top-k 5 of 8 captions: the schedule keeps 5 exact (raised from 4, 2), the rest are partial.
    assert sum(e["exact"] for e in entries) == 5 * len(images)
    assert all("stage" not in e for e in entries)
    assert all(sum(v is not None for v in r["partial"]["scores"]) == 3 for r in images)


def test_chunked_and_resumed_adaptive_job_equals_one_run(engine, tmp_path, monkeypatch):
    import dsdkit.jobs.blocks as matching  # the adaptive block scorer ranks each chunk

    whole = run(engine, adaptive=SCHEDULE, top_k=1)
    calls = {"n": 0}
    real = matching.rank_matrix

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(matching, "rank_matrix", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(engine, adaptive=SCHEDULE, top_k=1, chunk_size=3, output=tmp_path / "r.json")
    monkeypatch.setattr(matching, "rank_matrix", real)
    resumed = run(engine, adaptive=SCHEDULE, top_k=1, chunk_size=3, output=tmp_path / "r.json", resume=True)
    # fp32 noise only: chunks of 3 batch other pairs together, and the demo model's masked cross-attention runs a
    # masked attention kernel whose sums follow the batch (seen: 4.8e-7 on a score of 0.22); the decisions are exact.
    np.testing.assert_allclose(resumed.scores, whole.scores, rtol=1e-5, atol=1e-6)
    assert (resumed.held == whole.held).all() and (resumed.left_after == whole.left_after).all()
    assert resumed.meta["evaluations"]["conditional"] == whole.meta["evaluations"]["conditional"]
    # Another schedule is another job: its partial results are not mixed in.
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(matching, "rank_matrix", interrupted)
        calls["n"] = 0
        run(engine, adaptive=SCHEDULE, top_k=1, chunk_size=3, output=tmp_path / "other.json")
    monkeypatch.setattr(matching, "rank_matrix", real)
    from dsdkit.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="different job"):
        run(
            engine, adaptive="keep=2,k:steps=1,all", top_k=1, chunk_size=3, output=tmp_path / "other.json", resume=True
        )


def test_given_pairs_score_only_those_pairs(engine, exhaustive, tmp_path):
    pairs = tmp_path / "pairs.csv"
    listed = [(0, 0), (0, 3), (2, 2), (5, 7), (5, 5), (7, 1)]
    pairs.write_text("image_index,caption_index,clip_score\n" + "".join(f"{i},{j},0.3\n" for i, j in listed))
    result = run(engine, pairs=pairs, output=tmp_path / "p.csv")
    mask = np.zeros(exhaustive.scores.shape, dtype=bool)
    mask[tuple(np.array(listed).T)] = True
    assert (result.exact == mask).all()
    np.testing.assert_allclose(result.scores[mask], exhaustive.scores[mask], rtol=1e-6, atol=1e-7)
    assert result.meta["evaluations"]["conditional"] == len(listed) * S
    assert result.meta["evaluations"]["unconditional"] == 4 * S  # four distinct images listed
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert sum(cell != "" for row in rows[1:] for cell in row[1:]) == len(listed)


def test_adaptive_ranking_within_each_images_listed_candidates(engine, exhaustive, tmp_path):
    names = sorted(p.name for p in DEMO.glob("*.png"))
    captions = CAPTIONS.read_text().splitlines()
    pairs = tmp_path / "pairs.jsonl"
    lines = []
    for i, name in enumerate(names[:3]):
        for j in range(5):
            lines.append(json.dumps({"image": name, "caption": captions[(i + j) % len(captions)]}))
    pairs.write_text("\n".join(lines) + "\n")
    result = run(engine, pairs=pairs, adaptive="keep=2,k:steps=1,all", top_k=1)
    assert (result.held[3:] == 0).all()
    for i in range(3):
        listed = [(i + j) % len(captions) for j in range(5)]
        assert set(np.flatnonzero(result.held[i])) == set(listed)
        assert result.exact[i].sum() == 2
        np.testing.assert_allclose(result.scores[i, result.exact[i]], exhaustive.scores[i, result.exact[i]], rtol=1e-6)


def test_per_caption_ranking_under_uncond_normalisation(engine):
    from dsdkit.jobs.match import match

    config = engine.config.replace(normalize="uncond")
    result = match(DEMO, CAPTIONS, model=engine.model, config=config, adaptive=SCHEDULE, per="caption", top_k=1)
    assert (result.exact.sum(0) == 2).all()
    spent = result.meta["evaluations"]
    # Per caption, the savings are in the conditional passes; an image's unconditional passes stop only once it has
    # left every caption's race, which these eight images (each a close second somewhere) may never do.
    assert spent["conditional"] < spent["exhaustive_conditional"] == 8 * 8 * S
    assert spent["unconditional"] <= spent["exhaustive_unconditional"] == 8 * S


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--adaptive-per", "caption"], "add --adaptive"),
        (["--adaptive-schedule", "keep=3,1:steps=1,2"], "must reach all"),
        (["--adaptive-schedule", "keep=1,3:steps=1,all"], "never increase"),
        (["--adaptive", "--per-layer"], "--per-layer"),
        (["--pairs", "missing-pairs.csv"], "missing-pairs.csv"),
    ],
)
def test_adaptive_and_pairs_errors_are_one_line(extra, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["match", str(DEMO), str(CAPTIONS), "--model", "demo", "--timesteps", "4", *extra]
    )
    assert result.exit_code in (2, 3), result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


def test_eval_adaptive_keeping_every_candidate_reproduces_exhaustive_eval(engine, tmp_path):
    from dsdkit.jobs.datasets import load_dataset
    from dsdkit.jobs.evaluation import evaluate
    from dsdkit.world import write_demo_data

    paths = write_demo_data(tmp_path / "demo-data", per_subset=6, shots=2)
    dataset = load_dataset(paths["benchmark"])
    subsets = ["rank-8", "colour", "group-binding"]
    plain = evaluate(engine, dataset, subsets=subsets)
    kept = evaluate(engine, dataset, subsets=subsets, adaptive="keep=8:steps=all")
    assert kept.metrics == plain.metrics
    assert [e["rank"] for e in kept.examples if "rank" in e] == [e["rank"] for e in plain.examples if "rank" in e]
    eliminating = evaluate(engine, dataset, subsets=["rank-8"], adaptive="keep=2,k:steps=1,all")
    assert eliminating.evaluations["conditional"] < eliminating.evaluations["exhaustive_conditional"]


def test_dry_run_plans_the_adaptive_evaluations_the_job_runs(engine):
    from dsdkit.jobs.dry_run import estimate_match
    from dsdkit.jobs.specs import MatchOptions

    planned = estimate_match(DEMO, CAPTIONS, engine, MatchOptions(adaptive=SCHEDULE, top_k=1))
    engine_fresh = run(engine, adaptive=SCHEDULE, top_k=1)
    assert planned["unet_evaluations"] == engine_fresh.meta["unet_evaluations"]
    assert planned["exhaustive_unet_evaluations"] == 8 * S + 8 * 8 * S
