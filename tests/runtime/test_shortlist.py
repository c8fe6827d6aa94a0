"""The torch-free part of gallery search (``dsdkit.runtime.shortlist``): the exact blocked top K against a brute-force
ranking (ties to the lower index, K at or above the pool, one query, any block size), its memory bound, the shortlist's
pairs / rank / similarity matrices and stored form, bad K, and the CLIP image processor's arithmetic against
transformers' own processor."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from dsdkit.runtime import shortlist as shortlist_module
from dsdkit.runtime.errors import ConfigError, ModelError
from dsdkit.runtime.shortlist import DEFAULT_BLOCK_ROWS, ClipPreprocessor, Shortlist, Shortlister, shortlist, top_k


def brute_force(queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every similarity in float64, each query's pool sorted by (-similarity, index) in plain Python."""
    similarities = np.asarray(queries, np.float64) @ np.asarray(pool, np.float64).T
    order = [sorted(range(len(pool)), key=lambda j, row=row: (-row[j], j))[:k] for row in similarities]
    indices = np.array(order, dtype=np.int64).reshape(len(queries), min(k, len(pool)))
    return indices, np.take_along_axis(similarities, indices, axis=1)


def grid_embeddings(rng, rows: int, dim: int = 8) -> np.ndarray:
    """Entries on a coarse grid (multiples of 1/4 in [-3/4, 3/4]): every product and sum is exact in float32, so the
    blocked float32 matrix and the float64 brute force hold the same numbers, and equal similarities (ties) abound."""
    return (rng.integers(-3, 4, size=(rows, dim)) / 4).astype(np.float32)


def normalised(rng, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 4, 9, 29, 30, 45])
def test_top_k_is_the_brute_force_ranking_ties_included(k):
    rng = np.random.default_rng(k)
    queries, pool = grid_embeddings(rng, 23), grid_embeddings(rng, 30)
    expected, expected_similarities = brute_force(queries, pool, k)
    # The grid makes ties common, also across the K boundary: the check below is about tie-breaking, not luck.
    exact = queries.astype(np.float64) @ pool.astype(np.float64).T
    if k < len(pool):
        boundary = np.take_along_axis(exact, expected[:, -1:], axis=1)
        assert ((exact == boundary).sum(axis=1) > 1).any(), "no tie at the K boundary to break"
    indices, similarities = top_k(queries, pool, k, block_rows=5)
    assert indices.dtype == np.int64 and similarities.dtype == np.float32
    assert indices.shape == similarities.shape == (23, min(k, 30))
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(similarities, expected_similarities)


def test_top_k_of_random_unit_vectors_is_the_float64_cosine_ranking():
    rng = np.random.default_rng(7)
    queries, pool = normalised(rng, 37, 12), normalised(rng, 101, 12)
    k = 6
    expected, cosines = brute_force(queries, pool, k + 1)
    # Random data: the ranking is unambiguous where neighbouring cosines are further apart than float32's error.
    assert np.diff(-cosines, axis=1).min() > 1e-5
    indices, similarities = top_k(queries, pool, k)
    np.testing.assert_array_equal(indices, expected[:, :k])
    np.testing.assert_allclose(similarities, cosines[:, :k], atol=1e-6, rtol=0)


def test_exact_duplicates_are_ranked_by_the_lower_index():
    rng = np.random.default_rng(0)
    a, b, c = normalised(rng, 3, 16)
    # Copies of a at 1, 3, 6, 7; of b at 0, 5; c at 2, 4 (bitwise equal rows, so bitwise equal similarities).
    pool = np.stack([b, a, c, a, c, b, a, a])
    query = a[None]
    order_b_c = [0, 5, 2, 4] if float(a @ b) > float(a @ c) else [2, 4, 0, 5]
    everything = [1, 3, 6, 7, *order_b_c]
    for k in range(1, 10):
        indices, similarities = top_k(query, pool, k, block_rows=1)
        assert indices[0].tolist() == everything[:k], k
        np.testing.assert_allclose(similarities[0], (pool @ a)[everything[:k]], rtol=0, atol=1e-6)
    # Duplicated queries give duplicated rows, whichever block they fall in.
    queries = np.stack([a, b, a, a, c])
    for block_rows in (1, 2, 4):
        indices, _ = top_k(queries, pool, 3, block_rows=block_rows)
        np.testing.assert_array_equal(indices[[0, 2, 3]], np.repeat(indices[:1], 3, axis=0))


def test_k_at_or_above_the_pool_keeps_every_candidate_in_order():
    rng = np.random.default_rng(3)
    queries, pool = grid_embeddings(rng, 6), grid_embeddings(rng, 11)
    expected, _ = brute_force(queries, pool, 11)
    for k in (11, 12, 1000):
        indices, similarities = top_k(queries, pool, k)
        assert indices.shape == (6, 11)
        np.testing.assert_array_equal(indices, expected)
        assert (np.sort(indices, axis=1) == np.arange(11)).all()  # each candidate exactly once
        assert (np.diff(similarities, axis=1) <= 0).all()


def test_one_query_and_a_pool_of_one():
    rng = np.random.default_rng(4)
    pool = grid_embeddings(rng, 17)
    query = grid_embeddings(rng, 1)
    expected, _ = brute_force(query, pool, 5)
    indices, _ = top_k(query, pool, 5)
    np.testing.assert_array_equal(indices, expected)
    indices, similarities = top_k(grid_embeddings(rng, 4), pool[:1], 3)
    assert indices.shape == (4, 1) and (indices == 0).all() and similarities.shape == (4, 1)


def test_every_block_size_gives_the_same_result():
    """Bit for bit: blocks of one row (block_rows 1, or a last block of one row: 41 queries in blocks of 40) and one
    query on its own (the Python API's rank_texts, a served search) get the numbers a job's larger blocks get."""
    rng = np.random.default_rng(5)
    queries, pool = normalised(rng, 41, 10), normalised(rng, 64, 10)
    queries[7] = queries[3]  # a duplicated query spread over blocks of different sizes
    reference = top_k(queries, pool, 5, block_rows=len(queries))
    for block_rows in (1, 2, 3, 8, 40, 41, 1000, DEFAULT_BLOCK_ROWS):
        indices, similarities = top_k(queries, pool, 5, block_rows=block_rows)
        np.testing.assert_array_equal(indices, reference[0])
        np.testing.assert_array_equal(similarities, reference[1])
    for row in (0, 7, 40):
        indices, similarities = top_k(queries[row : row + 1], pool, 5)
        np.testing.assert_array_equal(indices[0], reference[0][row])
        np.testing.assert_array_equal(similarities[0], reference[1][row])
    # A served gallery passes its pool's float64 copy, made once: the same numbers.
    indices, similarities = top_k(queries, pool.astype(np.float64), 5, block_rows=3)
    np.testing.assert_array_equal(indices, reference[0])
    np.testing.assert_array_equal(similarities, reference[1])


def test_no_similarity_block_is_larger_than_block_rows_by_pool(monkeypatch):
    """Every similarity array handed to the selection is one block of at most ``block_rows`` rows, the blocks tile
    the queries, and the peak traced memory (numpy reports its buffers to tracemalloc) is a few blocks, far below the
    whole matrix, and does not grow with the number of queries."""
    rng = np.random.default_rng(6)
    pool = normalised(rng, 4000, 8)
    block_rows, k = 16, 5
    seen = []
    real = shortlist_module._block_top

    def spy(block, keep):
        seen.append(block.shape)
        return real(block, keep)

    monkeypatch.setattr(shortlist_module, "_block_top", spy)
    queries = normalised(rng, 203, 8)
    top_k(queries, pool, k, block_rows=block_rows)
    assert all(rows <= block_rows and size == len(pool) for rows, size in seen)
    assert sum(rows for rows, _ in seen) == len(queries) and len(seen) == -(-len(queries) // block_rows)
    monkeypatch.setattr(shortlist_module, "_block_top", real)

    block_bytes = block_rows * len(pool) * 4
    peaks = {}
    for count in (500, 2000):
        queries = normalised(rng, count, 8)
        output_bytes = count * k * (8 + 4)
        tracemalloc.start()
        try:
            top_k(queries, pool, k, block_rows=block_rows)
            peaks[count] = tracemalloc.get_traced_memory()[1] - output_bytes
        finally:
            tracemalloc.stop()
    whole = 2000 * len(pool) * 4
    # A few block-sized temporaries (the block, its partition, masks, a cumulative count): 8 blocks at the most.
    assert max(peaks.values()) < 8 * block_bytes < whole / 3
    assert peaks[2000] < 1.25 * peaks[500]  # four times the queries, the same peak
    # The measurement sees numpy's buffers: building the whole matrix at once is over the bound.
    tracemalloc.start()
    try:
        full = queries @ pool.T
        assert tracemalloc.get_traced_memory()[1] >= full.nbytes > 8 * block_bytes
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("k", [0, -1, -50])
def test_a_bad_k_is_a_config_error(k):
    rng = np.random.default_rng(0)
    queries, pool = normalised(rng, 3, 4), normalised(rng, 5, 4)
    with pytest.raises(ConfigError, match="shortlist_k") as caught:
        top_k(queries, pool, k)
    assert caught.value.field == "shortlist_k"
    with pytest.raises(ConfigError, match="block_rows"):
        top_k(queries, pool, 2, block_rows=k)
    with pytest.raises(ConfigError, match="shortlist_k"):
        Shortlister(FixedEmbedder(queries, pool), k=k)(["x"] * 3, ["y"] * 5)
    from dsdkit.jobs.specs import ShortlistSpec

    for bad in (k, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="shortlist_k") as caught:
            ShortlistSpec(model="demo", k=bad)
        assert caught.value.field == "shortlist_k"


class FixedEmbedder:
    """An :class:`~dsdkit.runtime.shortlist.Embedder` of given vectors (images and captions by position)."""

    def __init__(self, images: np.ndarray, texts: np.ndarray):
        self.images, self.texts = images, texts

    def embed_images(self, images):
        return self.images[: len(images)]

    def embed_texts(self, texts):
        return self.texts[: len(texts)]

    def describe(self):
        return {"model": "fixed"}


@pytest.mark.parametrize("per", ["image", "caption"])
def test_a_shortlists_pairs_ranks_and_similarities(per):
    rng = np.random.default_rng(8)
    image_vectors, text_vectors = normalised(rng, 5, 6), normalised(rng, 7, 6)
    k = 3
    listed = Shortlister(FixedEmbedder(image_vectors, text_vectors), k=k)(["i"] * 5, ["t"] * 7, per)
    assert (listed.per, listed.k, listed.num_images, listed.num_captions) == (per, k, 5, 7)
    assert listed.pool_size == (7 if per == "image" else 5) and not listed.keeps_all
    cosine = image_vectors.astype(np.float64) @ text_vectors.astype(np.float64).T  # [image, caption]
    queries = cosine if per == "image" else cosine.T
    expected = [sorted(range(queries.shape[1]), key=lambda j, row=row: (-row[j], j))[:k] for row in queries]
    assert listed.candidate_lists() == expected
    ranks, similarities = listed.rank_matrix(), listed.similarity_matrix()
    assert ranks.shape == similarities.shape == (5, 7)
    pairs = []
    for query, row in enumerate(expected):
        for place, candidate in enumerate(row, start=1):
            image, caption = (query, candidate) if per == "image" else (candidate, query)
            pairs.append((image, caption))
            assert ranks[image, caption] == place
            assert similarities[image, caption] == pytest.approx(cosine[image, caption], abs=1e-6)
    assert listed.pairs() == pairs
    unlisted = np.ones((5, 7), dtype=bool)
    unlisted[tuple(np.array(pairs).T)] = False
    assert (ranks[unlisted] == 0).all() and np.isnan(similarities[unlisted]).all()
    assert (ranks > 0).sum() == len(pairs) == k * (5 if per == "image" else 7)
    # Every candidate: the job without a shortlist.
    assert Shortlister(FixedEmbedder(image_vectors, text_vectors), k=listed.pool_size)(
        ["i"] * 5, ["t"] * 7, per
    ).keeps_all
    with pytest.raises(ConfigError, match="per"):
        shortlist(FixedEmbedder(image_vectors, text_vectors), ["i"], ["t"], 2, per="pair")


def test_a_query_without_a_usable_image_lists_nothing():
    """A row of -1s (an image the job skipped) lists no pair and no rank."""
    listed = Shortlist(
        "image",
        2,
        np.array([[1, 0], [-1, -1], [0, 2]]),
        np.array([[0.9, 0.1], [np.nan, np.nan], [0.5, 0.4]], np.float32),
        3,
        3,
    )
    assert listed.pairs() == [(0, 1), (0, 0), (2, 0), (2, 2)]
    assert listed.candidate_lists() == [[1, 0], [], [0, 2]]
    assert (listed.rank_matrix()[1] == 0).all() and np.isnan(listed.similarity_matrix()[1]).all()


def test_the_stored_form_round_trips_and_refuses_what_does_not_fit():
    rng = np.random.default_rng(9)
    listed = Shortlister(FixedEmbedder(normalised(rng, 4, 5), normalised(rng, 6, 5)), k=2)(["i"] * 4, ["t"] * 6)
    arrays = listed.to_arrays()
    again = Shortlist.from_arrays(arrays, "image")
    np.testing.assert_array_equal(again.candidates, listed.candidates)
    np.testing.assert_array_equal(again.similarities, listed.similarities)
    assert (again.k, again.num_images, again.num_captions) == (2, 4, 6)
    out_of_range = dict(arrays, candidates=np.where(arrays["candidates"] == 0, 6, arrays["candidates"]))
    bad = {
        "out of range": out_of_range,
        "out of range (below -1)": dict(arrays, candidates=arrays["candidates"] - 2),
        "does not fit": dict(arrays, candidates=arrays["candidates"][:, :1]),
        "does not fit (similarities)": dict(arrays, similarities=arrays["similarities"][:3]),
        "not a stored shortlist": {k: v for k, v in arrays.items() if k != "shape"},
    }
    for words, tampered in bad.items():
        with pytest.raises(ModelError, match=words.split(" (")[0]):
            Shortlist.from_arrays(tampered, "image", "job/shortlist.npz")
    # Read in the other direction the same arrays are the wrong shape.
    with pytest.raises(ModelError, match="does not fit"):
        Shortlist.from_arrays(arrays, "caption")


def test_the_clip_preprocessor_is_transformers_clip_image_processor():
    """The numpy/Pillow preprocessing (shared by the PyTorch and ONNX towers) against transformers' PIL processor,
    on the demo CLIP's config and on one with a rectangular crop and CLIP's own mean and std."""
    import json
    from pathlib import Path

    import transformers
    from PIL import Image

    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    folder = Path(shortlist_module.__file__).resolve().parents[1] / "dsdkit" / "assets" / "demo" / "clip"
    if not folder.is_dir():
        from dsdkit.world.demo import demo_clip_folder

        folder = demo_clip_folder()
    configs = [
        json.loads((folder / "preprocessor_config.json").read_text()),
        {
            "size": {"shortest_edge": 40},
            "crop_size": {"height": 32, "width": 36},
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
        },
    ]
    rng = np.random.default_rng(10)
    for config in configs:
        ours = ClipPreprocessor(config)
        theirs = processor(**{k: v for k, v in config.items() if k != "image_processor_type"})
        for width, height, mode in ((96, 80, "RGB"), (50, 130, "RGB"), (64, 64, "RGB"), (33, 201, "L")):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            expected = theirs(images=image, return_tensors="np")["pixel_values"][0]
            got = ours(image)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="not a CLIP image processor"):
        ClipPreprocessor({"size": {}})


def _fused_by_loops(scores, similarities, weight):
    """The fused score written out query by query with the statistics module (population standard deviation)."""
    import statistics

    out = np.full(scores.shape, np.nan)
    for i in range(scores.shape[0]):
        listed = [j for j in range(scores.shape[1]) if np.isfinite(scores[i, j]) and np.isfinite(similarities[i, j])]
        if not listed:
            continue

        def z(values):
            mean, spread = statistics.fmean(values), statistics.pstdev(values)
            return [(v - mean) / spread if spread > 0 else 0.0 for v in values]

        for j, a, b in zip(
            listed,
            z([float(similarities[i, j]) for j in listed]),
            z([float(scores[i, j]) for j in listed]),
            strict=True,
        ):
            out[i, j] = weight * a + (1 - weight) * b
    return out


def test_fuse_equals_a_query_by_query_formulation_per_image_and_per_caption():
    from dsdkit.runtime.shortlist import fuse

    rng = np.random.default_rng(7)
    scores = rng.normal(3.0, 1.0, (6, 9))
    similarities = rng.uniform(-0.2, 0.6, (6, 9)).astype(np.float32)
    scores[rng.random((6, 9)) < 0.4] = np.nan  # not shortlisted
    scores[5] = np.nan
    scores[4, :3] = 2.5  # one query: a tie of three scores
    scores[4, 3:] = np.nan
    for weight in (0.0, 0.35, 1.0):
        np.testing.assert_allclose(
            fuse(scores, similarities, weight), _fused_by_loops(scores, similarities, weight), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            fuse(scores, similarities, weight, per="caption"),
            _fused_by_loops(scores.T, similarities.T, weight).T,
            rtol=1e-12,
            atol=1e-12,
        )
    # Weight 1 ranks by CLIP alone, weight 0 by DSD alone, within each query's shortlist.
    listed = np.isfinite(scores[0])
    order = lambda values: np.argsort(-np.where(listed, values, -np.inf))[: listed.sum()]  # noqa: E731
    assert (order(fuse(scores, similarities, 1.0)[0]) == order(similarities[0].astype(np.float64))).all()
    assert (order(fuse(scores, similarities, 0.0)[0]) == order(scores[0])).all()


@pytest.mark.parametrize(
    "weight,per,fragment", [(1.5, "image", "from 0"), (-0.1, "image", "from 0"), (0.5, "x", "per")]
)
def test_fuse_refuses_bad_arguments_in_one_line(weight, per, fragment):
    from dsdkit.runtime.errors import ConfigError
    from dsdkit.runtime.shortlist import fuse

    with pytest.raises(ConfigError, match=fragment):
        fuse(np.zeros((2, 2)), np.zeros((2, 2)), weight, per=per)
