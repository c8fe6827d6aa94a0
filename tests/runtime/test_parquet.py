"""Parquet results: one row per scored pair, read back into the same MatchResult, atomic, and a one-line error naming
the extra when pyarrow is missing."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import InputError, MissingDependencyError, OutputError
from dsdkit.runtime.results import PARQUET_FORMAT, MatchResult, read_result, write_result

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DEMO = Path(__file__).parents[2] / "examples" / "demo"

COLUMNS = {
    "image_id": pa.int32(),
    "image": pa.string(),
    "caption_id": pa.int32(),
    "caption": pa.string(),
    "score": pa.float64(),
    "exact": pa.bool_(),
    "stage": pa.int16(),
    "timesteps": pa.int16(),
}


def _exhaustive() -> MatchResult:
    rng = np.random.default_rng(0)
    return MatchResult(
        images=["a/one.png", "b/twö.jpg", "three.webp"],
        captions=["a red circle", 'ein blaues Quadrat, "quoted"', "x"],
        scores=rng.normal(size=(3, 3)) * 1e-3 - 0.25,
        meta={"dsdkit_version": "0.1.0", "timesteps": [489, 989], "scoring": {"num_timesteps": 2}, "n": [1.5, None]},
    )


def _adaptive() -> MatchResult:
    """S = 4: exact cells (held 4), partial candidates (held 1 or 2, left after stage 1 or 2) and unscored pairs."""
    held = np.array([[4, 1, 0, 2], [0, 0, 0, 0], [4, 4, 2, 1]])
    left_after = np.array([[0, 1, 0, 2], [0, 0, 0, 0], [0, 0, 2, 1]])
    scores = np.where(held > 0, np.linspace(-1.0, 1.0, 12).reshape(3, 4) / 7.0, np.nan)
    return MatchResult(
        images=["i0", "i1 (no pairs)", "i2"],
        captions=["c0", "c1", "c2", "c3"],
        scores=scores,
        meta={"adaptive": {"schedule": "keep=2,1:steps=1,2,all", "per": "image", "top_k": 1}},
        held=held,
        left_after=left_after,
        num_timesteps=4,
    )


def _assert_same(a: MatchResult, b: MatchResult) -> None:
    assert a.images == b.images and a.captions == b.captions
    assert a.scores.tobytes() == b.scores.tobytes()  # bitwise, NaN cells included
    assert a.meta == b.meta
    assert a.num_timesteps == b.num_timesteps
    assert (a.held is None) == (b.held is None)
    if a.held is not None:
        assert np.array_equal(a.held, b.held) and np.array_equal(a.left_after, b.left_after)
    assert np.array_equal(a.exact, b.exact) and np.array_equal(a.partial, b.partial)


@pytest.mark.parametrize("make", [_exhaustive, _adaptive])
def test_round_trip(tmp_path, make):
    result = make()
    path = write_result(result, tmp_path / "r.parquet")
    _assert_same(read_result(path), result)


def test_rows_columns_and_metadata(tmp_path):
    result = _adaptive()
    path = write_result(result, tmp_path / "r.parquet")
    table = pq.read_table(path)
    assert {f.name: f.type for f in table.schema} == COLUMNS and table.column_names == list(COLUMNS)
    assert table.num_rows == int((result.held > 0).sum()) == 7
    rows = table.to_pylist()
    assert [(r["image_id"], r["caption_id"]) for r in rows] == sorted(zip(*np.nonzero(result.held > 0), strict=True))
    first, second = rows[0], rows[1]
    assert first == {
        "image_id": 0,
        "image": "i0",
        "caption_id": 0,
        "caption": "c0",
        "score": result.scores[0, 0],
        "exact": True,
        "stage": None,
        "timesteps": 4,
    }
    assert (second["exact"], second["stage"], second["timesteps"]) == (False, 1, 1)
    kv = table.schema.metadata
    assert kv[b"dsdkit.format"].decode() == PARQUET_FORMAT
    assert json.loads(kv[b"dsdkit"]) == result.meta
    assert b"pandas" not in kv


def test_exhaustive_rows_hold_every_cell_with_s(tmp_path):
    result = _exhaustive()
    table = pq.read_table(write_result(result, tmp_path / "r.parquet"))
    assert table.num_rows == result.scores.size
    assert set(table.column("timesteps").to_pylist()) == {2}  # S from meta["timesteps"]
    assert table.column("stage").null_count == table.num_rows and all(table.column("exact").to_pylist())


def test_exact_candidates_left_after_the_last_stage_read_back_as_kept(tmp_path):
    """``stage`` is null for exact pairs, so an exact candidate's stage (it left the top-k after the last stage)
    is not kept; only partial candidates' stages are."""
    result = _adaptive()
    result.left_after[2, 1] = 3  # exact (held 4 = S) but left after the last stage
    back = read_result(write_result(result, tmp_path / "r.parquet"))
    assert back.left_after[2, 1] == 0 and back.exact[2, 1]
    assert np.array_equal(back.left_after[result.partial], result.left_after[result.partial])


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_result(_exhaustive(), tmp_path / "r.parquet")
    before = path.read_bytes()

    def broken(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise RuntimeError("pyarrow failed")

    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", broken)
        with pytest.raises(RuntimeError, match="pyarrow failed"):
            write_result(_adaptive(), path)
    assert path.read_bytes() == before

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)  # the file is written, then the disk is full before the rename
        with pytest.raises(OutputError, match=r"r.parquet: no space left on the device"):
            write_result(_adaptive(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]  # no temporary file left behind
    _assert_same(read_result(path), _exhaustive())


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependencyError) as caught:
        write_result(_exhaustive(), tmp_path / "r.parquet")
    message = str(caught.value)
    assert "\n" not in message and "r.parquet" in message and "pyarrow" in message
    assert "'parquet' extra" in message and 'pip install -e ".[parquet]"' in message
    assert caught.value.exit_code == 10
    assert not (tmp_path / "r.parquet").exists()
    (tmp_path / "old.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r"old.parquet: .*'parquet' extra"):
        read_result(tmp_path / "old.parquet")


def test_read_rejects_files_that_are_not_dsdkit_results(tmp_path):
    with pytest.raises(InputError, match=r"x.json: only .parquet"):
        read_result(tmp_path / "x.json")
    with pytest.raises(InputError, match="no such file"):
        read_result(tmp_path / "gone.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="junk.parquet: not a readable Parquet file"):
        read_result(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="other.parquet: not a dsdkit result"):
        read_result(tmp_path / "other.parquet")


def test_match_writes_the_rows_of_its_json_output(tmp_path):
    from dsdkit.jobs.match import match
    from dsdkit.pytorch.scorer import build_scorer

    engine = build_scorer("demo", overrides={"num_timesteps": 2})
    common = dict(model=engine.model, config=engine.config, adaptive="keep=4,k:steps=1,all", top_k=1)
    result = match(DEMO, DEMO / "captions.txt", output=tmp_path / "r.parquet", **common)
    write_result(result, tmp_path / "r.json", k=1)  # the same job's JSON (a second run would re-score it)
    document = json.loads((tmp_path / "r.json").read_text())
    partial = document["partial"]
    expected = []
    for i, image in enumerate(document["images"]):
        for j, caption in enumerate(document["captions"]):
            exact = document["scores"][i][j] is not None
            score = document["scores"][i][j] if exact else partial["scores"][i][j]
            if score is None:
                continue
            stage = None if exact else partial["stage"][i][j]
            steps = partial["timesteps"][i][j]
            expected.append(
                dict(image_id=i, image=image, caption_id=j, caption=caption, score=score, exact=exact)
                | dict(stage=stage, timesteps=steps)
            )
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert rows == expected
    assert any(not r["exact"] for r in rows) and any(r["exact"] for r in rows)
    assert all(math.isfinite(r["score"]) for r in rows)
    back = read_result(tmp_path / "r.parquet")
    assert back.meta == document["meta"]
    assert back.scores.tobytes() == result.scores.tobytes() and np.array_equal(back.held, result.held)
