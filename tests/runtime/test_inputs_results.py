"""Job inputs (image folders and lists, captions files) and result files (CSV/JSON/JSONL, atomic)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import InputError, OutputError
from dsdkit.runtime.inputs import list_images, read_captions
from dsdkit.runtime.results import MatchResult, top_k, write_result


def test_captions_file_with_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"\xef\xbb\xbfa red circle\r\n\r\n  a blue square  \r\n   \r\nwow!\r\n")
    read = read_captions(path)
    assert read.captions == ["a red circle", "a blue square", "wow!"]
    assert read.line_numbers == [1, 3, 5]
    assert [n for n, _ in read.skipped] == [2, 4]


def test_non_utf8_caption_names_the_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"fine\nalso fine\ncaf\xe9 latin-1\n")
    with pytest.raises(InputError, match=r"captions.txt line 3: not valid UTF-8"):
        read_captions(path)


def test_empty_captions_file_is_an_error(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n \n")
    with pytest.raises(InputError, match="no captions"):
        read_captions(path)


def test_image_folder_and_list(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nb.png\n\n/abs/c.png\n")
    assert list_images(listing) == [tmp_path / "b.png", Path("/abs/c.png")]
    with pytest.raises(InputError, match="no images found"):
        list_images(tmp_path / "sub")
    with pytest.raises(InputError, match="no such folder"):
        list_images(tmp_path / "nope")


def test_top_k_orders_by_score_with_stable_ties():
    scores = np.array([[0.1, 0.9, 0.9, 0.2], [0.5, 0.4, 0.3, 0.2]])
    assert top_k(scores, 3, axis=1).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert top_k(scores, 1, axis=0).tolist() == [[1], [0], [0], [0]]


@pytest.fixture
def result():
    rng = np.random.default_rng(0)
    return MatchResult(
        images=["a.png", "b, with comma.png", "c.png"],
        captions=["a cat", 'a "quoted", caption', "ünïcode"],
        scores=rng.normal(size=(3, 3)),
        meta={"model": {"source": "x"}},
    )


def test_csv_has_the_full_matrix(tmp_path, result):
    path = write_result(result, tmp_path / "out.csv")
    rows = list(csv.reader(path.open(encoding="utf-8")))
    assert rows[0] == ["image", *result.captions]
    assert [r[0] for r in rows[1:]] == result.images
    np.testing.assert_array_equal(np.array([[float(v) for v in r[1:]] for r in rows[1:]]), result.scores)


def test_json_and_jsonl_have_matrix_and_top_k(tmp_path, result):
    document = json.loads(write_result(result, tmp_path / "out.json", k=2).read_text(encoding="utf-8"))
    np.testing.assert_array_equal(np.array(document["scores"]), result.scores)
    best = int(np.argmax(result.scores[0]))
    assert document["top_k"]["per_image"][0]["top_k"][0] == {
        "caption": result.captions[best],
        "index": best,
        "score": result.scores[0, best],
    }
    assert len(document["top_k"]["per_caption"]) == 3 and len(document["top_k"]["per_caption"][0]["top_k"]) == 2
    lines = [json.loads(line) for line in write_result(result, tmp_path / "out.jsonl", k=2).read_text().splitlines()]
    assert [line["type"] for line in lines] == ["meta"] + ["image"] * 3 + ["caption"] * 3
    np.testing.assert_array_equal(np.array([line["scores"] for line in lines[1:4]]), result.scores)


def test_unknown_format_and_failed_writes_leave_nothing_behind(tmp_path, result, monkeypatch):
    with pytest.raises(OutputError, match="unknown output format"):
        write_result(result, tmp_path / "out.xlsx")
    target = tmp_path / "out.csv"
    target.write_text("previous result")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError, match="no space left"):
        write_result(result, target)
    assert target.read_text() == "previous result"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary file left
