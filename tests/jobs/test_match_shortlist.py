"""`dsdkit match --shortlist MODEL --shortlist-k K` (a gallery search: a CLIP shortlist, then DSD on it) on the demo
model and the shipped mini-CLIP, over examples/demo (8 images x 8 captions) at S = 2.

The reference for the shortlist is a brute-force ranking of every image-caption cosine, computed here in float64 from
the CLIP's embeddings; the reference for the scores is the job without a shortlist. K at or above the candidates is
that job exactly; a small K scores the shortlisted pairs only (empty in CSV, null in JSON / JSONL, no row in
Parquet), each with its shortlist rank and similarity, per image and per caption, exhaustively or adaptively inside;
the Python API ranks as the job does.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.adaptive import Schedule, resolve_schedule
from dsdkit.runtime.errors import ConfigError
from typer.testing import CliRunner

from dsdkit.cli import app
from dsdkit.jobs.specs import MatchOptions, ShortlistSpec

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CAPTIONS = DEMO / "captions.txt"
S = 2
K = 3
SCHEDULE = "keep=2,k:steps=1,all"
#: The demo model's default score is its denoising term alone, a difference of two residual norms of about 16 per
#: timestep: fp32 rounding that depends on which pairs share a batch moves it by up to ~1e-6 absolute.
SCORE_ATOL = 1e-6


@pytest.fixture(scope="module")
def engine():
    from dsdkit.pytorch.scorer import build_scorer

    return build_scorer("demo", overrides={"num_timesteps": S}, batch_size=32)


@pytest.fixture(scope="module")
def clip():
    from dsdkit.pytorch.clip import TorchClip

    return TorchClip("demo", device="cpu")


@pytest.fixture(scope="module")
def demo_inputs():
    from PIL import Image

    paths = sorted(DEMO.glob("*.png"))
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return paths, images, CAPTIONS.read_text().splitlines()


@pytest.fixture(scope="module")
def cosine(clip, demo_inputs):
    """``float64[image, caption]``: every pair's cosine, renormalised in float64 from the CLIP's embeddings."""
    _, images, captions = demo_inputs
    image_vectors = clip.embed_images(images).astype(np.float64)
    text_vectors = clip.embed_texts(captions).astype(np.float64)
    image_vectors /= np.linalg.norm(image_vectors, axis=1, keepdims=True)
    text_vectors /= np.linalg.norm(text_vectors, axis=1, keepdims=True)
    return image_vectors @ text_vectors.T


def brute_force_ranks(cosine: np.ndarray, k: int, per: str) -> np.ndarray:
    """``int[image, caption]``: each pair's place in its query's top ``k`` by cosine (ties to the lower index), 0 for
    the pairs outside it."""
    queries = cosine if per == "image" else cosine.T
    ranks = np.zeros(queries.shape, dtype=np.int64)
    for query, row in enumerate(queries):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        # The shortlist is only unambiguous where the K-th and (K+1)-th cosines are apart by more than float32 error.
        if k < len(row):
            assert row[order[k - 1]] - row[order[k]] > 1e-5, (query, order[: k + 1])
        for place, candidate in enumerate(order[:k], start=1):
            ranks[query, candidate] = place
    return ranks if per == "image" else ranks.T


def run(engine, **options):
    """A job on a fresh engine over the loaded model (empty caches: each job's evaluation counts are its own)."""
    from dsdkit.jobs.match import match
    from dsdkit.pytorch.scorer import Scorer

    return match(DEMO, CAPTIONS, Scorer(engine.model, engine.config, batch_size=32), MatchOptions(**options))


@pytest.fixture(scope="module")
def exhaustive(engine):
    return run(engine)


def shortlist_of(k: int, model: str = "demo") -> ShortlistSpec:
    return ShortlistSpec(model=model, k=k)


# -- K at or above the candidates: the run without a shortlist --------------------------------------------------------


def test_a_shortlist_of_every_caption_is_the_run_without_one_cli(tmp_path):
    """The same CLI run with and without ``--shortlist demo --shortlist-k 8`` (8 captions): identical CSV files."""
    runner = CliRunner()
    common = ["match", str(DEMO), str(CAPTIONS), "--model", "demo", "--timesteps", str(S), "--batch-size", "32"]
    plain = runner.invoke(app, [*common, "-o", str(tmp_path / "plain.csv")])
    assert plain.exit_code == 0, plain.output
    searched = runner.invoke(
        app, [*common, "--shortlist", "demo", "--shortlist-k", "8", "-o", str(tmp_path / "s.csv")]
    )
    assert searched.exit_code == 0, searched.output
    assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()
    rows = list(csv.reader((tmp_path / "s.csv").open()))
    assert len(rows) == 9 and all(cell != "" for row in rows[1:] for cell in row[1:])


@pytest.mark.parametrize("per,k", [("image", 50), ("caption", 8)])  # the CLI test above: per image, K = 8
def test_a_shortlist_of_every_candidate_is_the_run_without_one(engine, exhaustive, cosine, per, k, tmp_path):
    from dsdkit.runtime.results import write_result

    result = run(engine, shortlist=shortlist_of(k), per=per, output=tmp_path / "s.json")
    np.testing.assert_array_equal(result.scores, exhaustive.scores)
    assert result.held is None  # exhaustive scoring: no partial or unscored cell to mark
    np.testing.assert_array_equal(result.shortlist_rank, brute_force_ranks(cosine, 8, per))
    np.testing.assert_allclose(result.shortlist_similarity, cosine, atol=1e-5, rtol=0)
    shortlist = result.meta["shortlist"]
    assert shortlist["k"] == k and shortlist["per"] == per and shortlist["pairs"] == 64
    assert (
        shortlist["unet_evaluations"]
        == shortlist["exhaustive_unet_evaluations"]
        == exhaustive.meta["unet_evaluations"]
    )
    assert shortlist["fraction_of_exhaustive"] == 1.0
    # The files: the same matrix and rankings, with each entry's shortlist place and similarity beside it.
    write_result(exhaustive, tmp_path / "plain.json")
    ours, plain = (json.loads((tmp_path / name).read_text()) for name in ("s.json", "plain.json"))
    assert ours["scores"] == plain["scores"]
    extra = ("shortlist_rank", "shortlist_similarity")
    for key in ("per_image", "per_caption"):
        for mine, theirs in zip(ours["top_k"][key], plain["top_k"][key], strict=True):
            assert [{n: v for n, v in e.items() if n not in extra} for e in mine["top_k"]] == theirs["top_k"]
            assert all(e["shortlist_rank"] >= 1 and e["shortlist_similarity"] is not None for e in mine["top_k"])


# -- a small K: only the shortlisted pairs are scored -----------------------------------------------------------------


def _listed(result) -> np.ndarray:
    return result.shortlist_rank > 0


def check_shortlisted(result, exhaustive, cosine, per: str, k: int) -> None:
    """Scored cells are exactly the brute-force shortlist, each with its rank and cosine and the exhaustive score."""
    ranks = brute_force_ranks(cosine, k, per)
    np.testing.assert_array_equal(result.shortlist_rank, ranks)
    listed = ranks > 0
    assert listed.sum() == k * 8
    np.testing.assert_allclose(result.shortlist_similarity[listed], cosine[listed], atol=1e-5, rtol=0)
    assert np.isnan(result.shortlist_similarity[~listed]).all()
    assert (np.isfinite(result.scores) == listed).all()
    assert (result.held[listed] == S).all() and (result.held[~listed] == 0).all()
    np.testing.assert_allclose(result.scores[listed], exhaustive.scores[listed], rtol=1e-6, atol=SCORE_ATOL)


def test_a_small_k_scores_the_shortlisted_pairs_only_in_every_format(engine, exhaustive, cosine, tmp_path):
    from dsdkit.runtime.results import read_result

    assert engine.config.needs_unconditional_pass  # the evaluation counts below include one per image and timestep
    results = {
        suffix: run(engine, shortlist=shortlist_of(K), output=tmp_path / f"r{suffix}", top_k=5)
        for suffix in (".csv", ".json", ".jsonl", ".parquet")
    }
    ranks = brute_force_ranks(cosine, K, "image")
    listed = ranks > 0
    for result in results.values():
        check_shortlisted(result, exhaustive, cosine, "image", K)
    result = results[".json"]

    # meta: the stage and what it spent beside exhaustive scoring.
    meta = result.meta["shortlist"]
    assert {k: meta[k] for k in ("model", "k", "per", "embedded_images", "embedded_captions", "pairs")} == {
        "model": "demo",
        "k": K,
        "per": "image",
        "embedded_images": 8,
        "embedded_captions": 8,
        "pairs": 8 * K,
    }
    assert meta["embedder"]["model"] == "demo" and meta["embedder"]["backend"] == "pytorch"
    assert meta["embedder"]["embedding_dim"] == 64
    spent = 8 * K * S + 8 * S  # the listed pairs and each image's unconditional pass, at every timestep
    assert meta["unet_evaluations"] == spent == result.meta["unet_evaluations"]
    assert meta["exhaustive_unet_evaluations"] == 8 * S * (8 + 1) == exhaustive.meta["unet_evaluations"]
    assert meta["fraction_of_exhaustive"] == pytest.approx(spent / (8 * S * 9), abs=1e-6)

    # CSV: the scored cells hold the score, the others are empty.
    rows = list(csv.reader((tmp_path / "r.csv").open()))
    assert rows[0][1:] == result.captions
    for i, row in enumerate(rows[1:]):
        assert [cell != "" for cell in row[1:]] == listed[i].tolist()
        assert [float(c) for c in row[1:] if c] == result.scores[i][listed[i]].tolist()

    # JSON: null scores and shortlist entries outside the shortlist; the rankings list shortlisted pairs only.
    document = json.loads((tmp_path / "r.json").read_text())
    for i in range(8):
        assert [v is not None for v in document["scores"][i]] == listed[i].tolist()
        assert document["shortlist"]["rank"][i] == [int(r) if r else None for r in ranks[i]]
        similarities = document["shortlist"]["similarity"][i]
        assert [v is not None for v in similarities] == listed[i].tolist()
        np.testing.assert_allclose([v for v in similarities if v is not None], cosine[i][listed[i]], atol=1e-5)
        entries = document["top_k"]["per_image"][i]["top_k"]
        expected = sorted(np.flatnonzero(listed[i]), key=lambda j: (-result.scores[i, j], j))
        assert [e["index"] for e in entries] == expected
        for entry in entries:
            assert entry["exact"] is True and entry["shortlist_rank"] == ranks[i, entry["index"]]
            assert entry["shortlist_similarity"] == pytest.approx(cosine[i, entry["index"]], abs=1e-5)
    for j, record in enumerate(document["top_k"]["per_caption"]):  # each caption's best images among those listing it
        expected = sorted(np.flatnonzero(listed[:, j]), key=lambda i: (-result.scores[i, j], i))[:5]
        assert [e["index"] for e in record["top_k"]] == expected
    assert document["meta"]["shortlist"] == json.loads(json.dumps(meta))

    # JSONL: the same per image record.
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "meta" and records[0]["shortlist"]["pairs"] == 8 * K
    images = [r for r in records if r["type"] == "image"]
    for i, record in enumerate(images):
        assert [v is not None for v in record["scores"]] == listed[i].tolist()
        assert record["shortlist"]["rank"] == [int(r) if r else None for r in ranks[i]]

    # Parquet: a row per shortlisted pair and none for the others.
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "r.parquet").to_pydict()
    assert sorted(zip(table["image_id"], table["caption_id"], strict=True)) == sorted(map(tuple, np.argwhere(listed)))
    for i, j, rank, similarity in zip(
        table["image_id"], table["caption_id"], table["shortlist_rank"], table["shortlist_similarity"], strict=True
    ):
        assert rank == ranks[i, j] and similarity == pytest.approx(cosine[i, j], abs=1e-5)
    back = read_result(tmp_path / "r.parquet")
    np.testing.assert_array_equal(back.shortlist_rank, ranks)
    assert (np.isfinite(back.scores) == listed).all()


def test_per_caption_shortlist_from_the_cli(engine, exhaustive, cosine, tmp_path):
    """``--adaptive-per caption``: each caption's K most similar images, a broken image never among them."""
    images = tmp_path / "images"
    shutil.copytree(DEMO, images, ignore=shutil.ignore_patterns("*.txt"))
    (images / "zz-broken.png").write_bytes(b"not a png")  # sorts last: the other images keep their indices
    out = tmp_path / "r.json"
    args = ["match", str(images), str(CAPTIONS), "--model", "demo", "--timesteps", str(S), "--batch-size", "32"]
    args += [
        "--shortlist",
        "demo",
        "--shortlist-k",
        str(K),
        "--adaptive-per",
        "caption",
        "--top-k",
        "2",
        "-o",
        str(out),
    ]
    ran = CliRunner().invoke(app, args)
    assert ran.exit_code == 0, ran.output
    document = json.loads(out.read_text())
    assert len(document["images"]) == 8 and "zz-broken.png" not in document["images"]
    assert document["meta"]["skipped"]["images"][0]["image"].endswith("zz-broken.png")
    ranks = brute_force_ranks(cosine, K, "caption")
    listed = ranks > 0
    scores = np.array([[np.nan if v is None else v for v in row] for row in document["scores"]])
    assert (np.isfinite(scores) == listed).all() and (listed.sum(axis=0) == K).all()
    np.testing.assert_allclose(scores[listed], exhaustive.scores[listed], rtol=1e-6, atol=SCORE_ATOL)
    assert document["shortlist"]["rank"] == [[int(r) if r else None for r in row] for row in ranks]
    for j, record in enumerate(document["top_k"]["per_caption"]):
        expected = sorted(np.flatnonzero(listed[:, j]), key=lambda i: (-scores[i, j], i))[:2]
        assert [e["index"] for e in record["top_k"]] == expected
        assert [e["shortlist_rank"] for e in record["top_k"]] == [ranks[i, j] for i in expected]
    meta = document["meta"]["shortlist"]
    assert meta["per"] == "caption" and meta["k"] == K and meta["pairs"] == 8 * K
    assert meta["embedded_images"] == 8 and meta["embedded_captions"] == 8
    distinct = int(listed.any(axis=1).sum())  # images some caption shortlisted: their unconditional pass only
    assert meta["unet_evaluations"] == S * (8 * K + distinct)


def test_per_caption_shortlist_in_the_library(engine, exhaustive, cosine):
    result = run(engine, shortlist=shortlist_of(K), per="caption")
    check_shortlisted(result, exhaustive, cosine, "caption", K)


@pytest.mark.parametrize("per", ["image", "caption"])
def test_adaptive_ranking_inside_the_shortlist_keeps_the_best_exact(engine, exhaustive, cosine, per):
    k = 4
    result = run(engine, shortlist=shortlist_of(k), per=per, adaptive=SCHEDULE, top_k=1)
    ranks = brute_force_ranks(cosine, k, per)
    listed = ranks > 0
    np.testing.assert_array_equal(result.shortlist_rank, ranks)
    assert (result.held[~listed] == 0).all() and np.isnan(result.scores[~listed]).all()  # never evaluated
    assert (result.held[listed] >= 1).all()  # every shortlisted candidate enters the first stage
    plan = resolve_schedule(Schedule.parse(SCHEDULE), k, S)
    axis = 1 if per == "image" else 0
    assert (result.exact.sum(axis=axis) == plan.keep[-2]).all()  # the survivors of the last cut, all exact
    assert not (result.exact & ~listed).any()
    np.testing.assert_allclose(
        result.scores[result.exact], exhaustive.scores[result.exact], rtol=1e-6, atol=SCORE_ATOL
    )
    # Each query's best is exact: the best of its exact candidates, above every eliminated one's standing.
    scores, exact = (result.scores, result.exact) if per == "image" else (result.scores.T, result.exact.T)
    for query, best in enumerate(result.top(1, axis=axis)):
        assert exact[query, best[0]] and scores[query, best[0]] == scores[query][exact[query]].max()
    spent = result.meta["evaluations"]
    assert spent["conditional"] == 8 * plan.evaluations(k)
    assert spent["exhaustive_conditional"] == 8 * k * S
    meta = result.meta["shortlist"]
    assert meta["unet_evaluations"] == spent["conditional"] + spent["unconditional"]
    assert meta["exhaustive_unet_evaluations"] == exhaustive.meta["unet_evaluations"]
    assert result.meta["adaptive"] == {"schedule": SCHEDULE, "per": per, "top_k": 1}


# -- the Python API ranks as the job does -----------------------------------------------------------------------------


def test_the_python_api_ranks_within_the_shortlist_as_the_job(engine, clip, demo_inputs, exhaustive):
    from dsdkit.runtime.shortlist import Shortlister

    _, images, captions = demo_inputs
    shortlister = Shortlister(clip, k=K)
    per_image = run(engine, shortlist=shortlist_of(K))
    per_caption = run(engine, shortlist=shortlist_of(K), per="caption")
    for i in (0, 5, 7):
        ranking = engine.rank_texts(images[i], captions, shortlist=shortlister)
        listed = np.flatnonzero(per_image.shortlist_rank[i] > 0)
        expected = sorted(listed, key=lambda j: (-per_image.scores[i, j], j))
        assert [caption for caption, _ in ranking] == [captions[j] for j in expected]
        np.testing.assert_allclose(
            [score for _, score in ranking], per_image.scores[i, expected], rtol=1e-6, atol=SCORE_ATOL
        )
        assert ranking.evaluations["conditional"] == K * S
    for j in (1, 6):
        ranking = engine.rank_images(captions[j], images, shortlist=shortlister)
        listed = np.flatnonzero(per_caption.shortlist_rank[:, j] > 0)
        expected = sorted(listed, key=lambda i: (-per_caption.scores[i, j], i))
        assert [index for index, _ in ranking] == expected
        np.testing.assert_allclose(
            [score for _, score in ranking], per_caption.scores[expected, j], rtol=1e-6, atol=SCORE_ATOL
        )
    # Adaptive ranking of many queries at once: the job's cells, held timesteps and exact flags.
    job = run(engine, shortlist=shortlist_of(4), adaptive=SCHEDULE, top_k=1)
    ranked = engine.rank_matrix(images, captions, top_k=1, schedule=SCHEDULE, shortlist=Shortlister(clip, k=4))
    np.testing.assert_array_equal(ranked.held, job.held)
    np.testing.assert_array_equal(ranked.exact, job.exact)
    np.testing.assert_allclose(ranked.scores, job.scores, rtol=1e-6, atol=SCORE_ATOL)


def test_shortlist_errors_are_one_line(tmp_path):
    runner = CliRunner()
    common = ["match", str(DEMO), str(CAPTIONS), "--model", "demo", "--timesteps", "1"]
    for extra, code, words in (
        (["--shortlist-k", "0"], 2, "--shortlist-k"),
        (["--shortlist", "demo", "--per-layer"], 2, "--per-layer needs every pair"),
        (["--shortlist-k", "2"], 2, "--shortlist needs a CLIP model"),
        # The way out names the shipped CLIP as the value it is (a library field name would become a flag).
        (
            ["--shortlist", str(tmp_path), "--shortlist-k", "2"],
            4,
            "not a CLIPModel folder (no config.json); pass a CLIP folder, a hub id or demo",
        ),
    ):
        ran = runner.invoke(app, [*common, *extra])
        assert ran.exit_code == code, ran.output
        errors = [line for line in ran.output.splitlines() if line.startswith("error:")]
        assert "Traceback" not in ran.output and len(errors) == 1 and words in errors[0], ran.output
        assert "--demo" not in errors[0]
    with pytest.raises(ConfigError, match="give one of them"):
        MatchOptions(shortlist=shortlist_of(2), pairs=tmp_path / "pairs.csv")


# -- a fused ranking (--shortlist-fuse W) ---------------------------------------------------------------------------


@pytest.mark.parametrize("per", ["image", "caption"])
def test_a_fused_search_is_the_search_ranked_by_the_fused_score(engine, cosine, per, tmp_path):
    """`shortlist.fuse` ranks each query's shortlisted pairs by W z(cosine) + (1 - W) z(DSD), written out here from
    the plain search's scores and a float64 cosine; the DSD part is the same search's, adaptively inside."""
    weight = 0.35
    plain = run(engine, shortlist=shortlist_of(K), per=per, adaptive=SCHEDULE, top_k=1)
    fused = run(
        engine,
        shortlist=ShortlistSpec(model="demo", k=K, fuse=weight),
        per=per,
        adaptive=SCHEDULE,
        top_k=1,
        output=str(tmp_path / "fused.json"),
    )
    listed = np.isfinite(plain.scores)
    expected = np.full(plain.scores.shape, np.nan)
    axis_scores, axis_cosine, axis_listed = (
        (plain.scores, cosine, listed) if per == "image" else (plain.scores.T, cosine.T, listed.T)
    )
    for query in range(axis_scores.shape[0]):
        cells = np.flatnonzero(axis_listed[query])
        z_clip = (axis_cosine[query, cells] - axis_cosine[query, cells].mean()) / axis_cosine[query, cells].std()
        z_dsd = (axis_scores[query, cells] - axis_scores[query, cells].mean()) / axis_scores[query, cells].std()
        target = expected if per == "image" else expected.T
        target[query, cells] = weight * z_clip + (1 - weight) * z_dsd
    np.testing.assert_allclose(fused.scores, expected, rtol=1e-5, atol=1e-5)  # (float32 similarities in the job)
    assert fused.meta["fusion"]["clip_weight"] == weight and fused.meta["fusion"]["per"] == per
    assert fused.held is None and (fused.exact == listed).all()  # every listed pair ranks by its fused score
    written = json.loads((tmp_path / "fused.json").read_text())
    assert written["meta"]["fusion"]["clip_weight"] == weight
    # The plain result is left as it was: its DSD scores, its adaptive bookkeeping.
    assert plain.held is not None and "fusion" not in plain.meta


def test_shortlist_fuse_errors_are_one_line():
    runner = CliRunner()
    common = ["match", str(DEMO), str(CAPTIONS), "--model", "demo", "--timesteps", "1"]
    for extra, words in (
        (["--shortlist-fuse", "0.3"], "--shortlist-fuse ranks a gallery search's shortlist: add --shortlist"),
        (["--shortlist", "demo", "--shortlist-fuse", "1.5"], "--shortlist-fuse"),
    ):
        ran = runner.invoke(app, [*common, *extra])
        assert ran.exit_code == 2, ran.output
        assert "Traceback" not in ran.output and words in ran.output, ran.output
    with pytest.raises(ConfigError, match="from 0"):
        ShortlistSpec(model="demo", k=2, fuse=-0.5)
