"""Pair lists (``dsdkit match --pairs FILE``): formats, references by index / name / path / text, duplicates, and
one-line errors that name the file and the line (or item)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from dsdkit.runtime.errors import InputError
from dsdkit.runtime.pairs import PairList, read_pairs

IMAGES = [
    "examples/demo/red-circle.png",
    "examples/demo/blue-square.png",
    "other/a.png",
    "more/a.png",
    "/abs/photos/cat.jpg",
]
CAPTIONS = ["a red circle", "a blue square", "a red circle, on white", "a cat", "a red circle"]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(path, pattern: str, images=IMAGES, captions=CAPTIONS) -> str:
    """The InputError of reading ``path``, checked to be one line naming the file and matching ``pattern``."""
    with pytest.raises(InputError) as info:
        read_pairs(path, images, captions)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    assert re.search(pattern, message), message
    return message


# -- formats and references ---------------------------------------------------------------------------------------


def test_csv_names_texts_and_ignored_columns(tmp_path):
    path = write(
        tmp_path,
        "pairs.csv",
        "image,caption,clip_score\n"
        'red-circle.png,"a red circle, on white",0.31\n'  # basename; quoted caption with a comma
        "examples/demo/blue-square.png,a blue square,0.30\n"  # the name as listed
        "demo/red-circle.png,  a cat  ,0.1\n"  # a path relative to the images folder; spaces around the text
        "/abs/photos/cat.jpg,a cat,0.2\n",  # an absolute name
    )
    read = read_pairs(path, IMAGES, CAPTIONS)
    assert isinstance(read, PairList)
    assert read.pairs == [(0, 2), (1, 1), (0, 3), (4, 3)]
    assert read.source == str(path)
    assert read.duplicates == 0


def test_csv_index_columns_mixed_with_names(tmp_path):
    path = write(tmp_path, "pairs.csv", "caption_index,image\n3,cat.jpg\n0,other/a.png\n")
    assert read_pairs(path, IMAGES, CAPTIONS).pairs == [(4, 3), (2, 0)]
    path = write(tmp_path, "idx.csv", "image_index,caption_index\n1,4\n 0 , 2 \n")
    assert read_pairs(path, IMAGES, CAPTIONS).pairs == [(1, 4), (0, 2)]
    path = write(tmp_path, "idx2.csv", "image_index,caption\n3,a blue square\n")
    assert read_pairs(path, IMAGES, CAPTIONS).pairs == [(3, 1)]


def test_csv_header_is_case_and_space_insensitive_with_bom_crlf_and_blank_rows(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b'\xef\xbb\xbf Image , Caption \r\n\r\nred-circle.png, "a, b"\r\n,,\r\ncat.jpg,a cat\r\n')
    read = read_pairs(path, IMAGES, [*CAPTIONS, "a, b"])
    assert read.pairs == [(0, 5), (4, 3)]


def test_csv_multiline_quoted_caption_and_line_numbers(tmp_path):
    captions = [*CAPTIONS, "first line\nsecond line"]
    path = write(tmp_path, "good.csv", 'image,caption\ncat.jpg,"first line\nsecond line"\ncat.jpg,a cat\n')
    assert read_pairs(path, IMAGES, captions).pairs == [(4, 5), (4, 3)]
    path = write(tmp_path, "pairs.csv", 'image,caption\ncat.jpg,"first line\nsecond line"\nnope.png,a cat\n')
    # The row after the two-line field starts on line 4, which is the line its error names.
    one_line_error(path, r"pairs\.csv line 4: image 'nope\.png' is not one", captions=captions)


def test_jsonl_keys_ints_and_blank_lines(tmp_path):
    lines = [
        {"image": 1, "caption": "a blue square"},  # an int in `image` is an index
        {"image": "red-circle.png", "caption_index": 2},
        {"image_index": 4, "caption": 3, "score": 0.5},  # an int in `caption` is an index; other keys ignored
        {"image": "more/a.png", "caption": " a red circle "},
    ]
    text = (
        "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n   \n" + "\n".join(json.dumps(x) for x in lines[2:])
    )
    path = write(tmp_path, "pairs.jsonl", text + "\n")
    assert read_pairs(path, IMAGES, CAPTIONS).pairs == [(1, 1), (0, 2), (4, 3), (3, 0)]


def test_json_list_of_pair_objects(tmp_path):
    items = [{"image": "cat.jpg", "caption": "a cat"}, {"image_index": 2, "caption_index": 1}]
    path = write(tmp_path, "pairs.json", json.dumps(items, indent=2))
    assert read_pairs(path, IMAGES, CAPTIONS).pairs == [(4, 3), (2, 1)]


def test_json_t2v_metrics_records_are_every_image_with_every_text(tmp_path):
    records = [
        {"images": ["red-circle.png", 1], "texts": ["a red circle", 3]},
        {"images": ["cat.jpg"], "texts": ["a cat", "a blue square"]},
        {"images": [0], "texts": [0]},  # listed in the first record already
    ]
    path = write(tmp_path, "pairs.json", json.dumps(records))
    read = read_pairs(path, IMAGES, CAPTIONS)
    assert read.pairs == [(0, 0), (0, 3), (1, 0), (1, 3), (4, 3), (4, 1)]
    assert read.duplicates == 1


def test_duplicates_are_dropped_in_file_order_and_counted(tmp_path):
    # The same pair three ways (index, basename, name as listed), and a caption text listed twice in the job.
    path = write(
        tmp_path,
        "pairs.csv",
        "image,caption\n"
        "cat.jpg,a cat\n"
        "red-circle.png,a red circle\n"
        "/abs/photos/cat.jpg,a cat\n"
        "examples/demo/red-circle.png,a red circle\n"
        "blue-square.png,a red circle\n",
    )
    read = read_pairs(path, IMAGES, CAPTIONS)
    assert read.pairs == [(4, 3), (0, 0), (1, 0)]  # "a red circle" is caption 0, its first occurrence, not 4
    assert read.duplicates == 2
    assert len(read) == 3


def test_candidates_per_image_and_per_caption(tmp_path):
    path = write(
        tmp_path, "pairs.jsonl", "\n".join(json.dumps({"image": i, "caption": c}) for i, c in [(2, 1), (0, 3), (2, 0)])
    )
    read = read_pairs(path, IMAGES, CAPTIONS)
    assert read.candidates_per_image(5) == [[3], [], [1, 0], [], []]
    assert read.candidates_per_caption(5) == [[2], [2], [], [0], []]
    with pytest.raises(ValueError, match="image 2"):
        read.candidates_per_image(2)


def test_normalised_paths_and_the_same_image_listed_twice(tmp_path):
    images = ["imgs/x.png", "imgs/sub/y.png", "imgs/x.png"]
    path = write(tmp_path, "pairs.csv", "image,caption\n./imgs//x.png,a cat\nsub/y.png,a cat\nx.png,a blue square\n")
    # x.png is the same path twice in the job: one image (its first occurrence), not an ambiguity.
    assert read_pairs(path, images, CAPTIONS).pairs == [(0, 3), (1, 3), (0, 1)]


def test_a_normalised_suffix_and_an_absolute_path_find_a_relative_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = ["imgs/x.png", "imgs/sub/y.png"]
    absolute = tmp_path / "imgs" / "x.png"
    path = write(tmp_path, "pairs.csv", f"image,caption\nsub/.././sub//y.png,a cat\n{absolute},a cat\n")
    assert read_pairs(path, images, CAPTIONS).pairs == [(1, 3), (0, 3)]


def test_a_path_suffix_matches_whole_components_only(tmp_path):
    path = write(tmp_path, "pairs.csv", "image,caption\ncircle.png,a cat\n")
    one_line_error(path, r"pairs\.csv line 2: image 'circle\.png' is not one of the job's 5 images")


def test_ambiguous_basename_names_the_line_and_both_candidates(tmp_path):
    path = write(tmp_path, "pairs.csv", "image,caption\nother/a.png,a cat\na.png,a cat\n")
    message = one_line_error(path, r"pairs\.csv line 3: image 'a\.png' fits 2 of the job's images")
    assert "'other/a.png'" in message and "'more/a.png'" in message
    assert "more of its path" in message


def test_import_does_not_load_torch():
    code = "import sys, dsdkit.runtime.pairs; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- errors: one line, the file, the line, what to do ------------------------------------------------------------


def test_missing_file_unknown_suffix_and_folder(tmp_path):
    one_line_error(tmp_path / "nope.csv", r"nope\.csv: no such file")
    message = one_line_error(write(tmp_path, "pairs.txt", "a,b\n"), r"pairs\.txt: unknown pair list format '\.txt'")
    assert ".csv" in message and ".jsonl" in message and ".json" in message
    (tmp_path / "folder.csv").mkdir()
    one_line_error(tmp_path / "folder.csv", r"folder\.csv: is a folder")


def test_missing_header_columns_name_the_accepted_ones(tmp_path):
    path = write(tmp_path, "pairs.csv", "\nimg,caption\nred-circle.png,a cat\n")
    message = one_line_error(path, r"pairs\.csv line 2: the header row has no image or image_index column")
    assert "'img'" in message and "image or image_index, and caption or caption_index" in message
    path = write(tmp_path, "headless.csv", "red-circle.png,a cat\n")
    one_line_error(path, r"headless\.csv line 1: the header row has no image or image_index column")
    path = write(tmp_path, "nocaption.csv", "image_index,text\n0,a cat\n")
    one_line_error(path, r"nocaption\.csv line 1: the header row has no caption or caption_index column")
    path = write(tmp_path, "both.csv", "image,image_index,caption\nred-circle.png,0,a cat\n")
    one_line_error(path, r"both\.csv line 1: the header has both image and image_index columns; keep one")


@pytest.mark.parametrize(
    "row, pattern",
    [
        ("5,0", r"line 3: image index 5 is out of range: the job has 5 images, so use 0 to 4"),
        ("-1,0", r"line 3: image index -1 is out of range"),
        ("0,7", r"line 3: caption index 7 is out of range: the job has 5 captions, so use 0 to 4"),
        ("1.0,0", r"line 3: image_index '1\.0' is not an integer; write a 0-based index"),
        ("0,", r"line 3: the caption_index cell is empty"),
        ("0", r"line 3: the caption_index cell is empty"),
    ],
)
def test_bad_indices_in_csv(tmp_path, row, pattern):
    path = write(tmp_path, "pairs.csv", f"image_index,caption_index\n0,0\n{row}\n")
    one_line_error(path, r"pairs\.csv " + pattern)


def test_unknown_image_name_says_how_many_and_what_to_use(tmp_path):
    path = write(tmp_path, "pairs.csv", "image,caption\ncat.jpg,a cat\nsquare.jpg,a cat\n")
    message = one_line_error(path, r"pairs\.csv line 3: image 'square\.jpg' is not one of the job's 5 images")
    assert "index (0 to 4)" in message and "'examples/demo/red-circle.png'" in message
    path = write(tmp_path, "digits.csv", "image,caption\n3,a cat\n")
    one_line_error(path, r"digits\.csv line 2: image '3' .*image_index column")


def test_unknown_caption_is_quoted_shortened(tmp_path):
    long = "a very long caption about " + "many red circles " * 10
    path = write(tmp_path, "pairs.csv", f'image,caption\ncat.jpg,a cat\ncat.jpg,"{long}"\n')
    message = one_line_error(path, r"pairs\.csv line 3: caption 'a very long caption about many.*\.\.\.' is not one")
    quoted = re.search(r"caption ('.*?')", message).group(1)
    assert 55 <= len(quoted) <= 65
    assert "exactly" in message and "index" in message
    path = write(tmp_path, "case.csv", "image,caption\ncat.jpg,A  Cat\n")
    one_line_error(
        path, r"case\.csv line 2: caption 'A  Cat' is not one .*\(caption 3 differs only in case or spacing"
    )


def test_bad_json_names_the_line(tmp_path):
    path = write(tmp_path, "pairs.jsonl", '{"image": 0, "caption": 0}\n\n{"image": 1, "caption": }\n')
    one_line_error(path, r"pairs\.jsonl line 3: not valid JSON \(.*column \d+\); write one JSON object per line")
    path = write(tmp_path, "pairs.json", '[\n  {"image": 0, "caption": 0},\n  {"image": 1 "caption": 1}\n]\n')
    one_line_error(path, r"pairs\.json line 3: not valid JSON")
    path = write(tmp_path, "lines.json", '{"image": 0, "caption": 0}\n{"image": 1, "caption": 1}\n')
    one_line_error(path, r"lines\.json line 2: not valid JSON \(Extra data.*a \.jsonl file")


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("[0, 1]", r"line 2: expected a JSON object"),
        ('{"image": 0}', r"line 2: has no caption or caption_index key \(keys: 'image'\)"),
        ('{"image": 0, "image_index": 0, "caption": 0}', r"line 2: has both image and image_index"),
        ('{"image_index": true, "caption": 0}', r"line 2: image_index must be an integer \(0-based\), got true"),
        ('{"image_index": "1", "caption": 0}', r"line 2: image_index must be an integer"),
        ('{"image": 1.5, "caption": 0}', r"line 2: image must be an image name or index, got the number 1\.5"),
        ('{"image": 0, "caption": null}', r"line 2: caption must be a caption text or index, got null"),
        ('{"image": 9, "caption": 0}', r"line 2: image index 9 is out of range"),
        ('{"image": "zebra.png", "caption": 0}', r"line 2: image 'zebra\.png' is not one of the job's 5 images"),
        ('{"image": 0, "caption": "a dog"}', r"line 2: caption 'a dog' is not one of the job's 5 captions"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, pattern):
    path = write(tmp_path, "pairs.jsonl", '{"image": 0, "caption": 0}\n' + line + "\n")
    one_line_error(path, r"pairs\.jsonl " + pattern)


@pytest.mark.parametrize(
    "item, pattern",
    [
        ({"images": [0]}, r"item 2: an \{images, texts\} record needs both lists; texts is missing"),
        ({"images": [0, None], "texts": [0]}, r"item 2, images\[1\]: images must be an image name or index, got null"),
        ({"images": [0], "texts": ["a cat", "a dog"]}, r"item 2, texts\[1\]: caption 'a dog' is not one"),
        ({"images": [], "texts": [0]}, r"item 2: images is empty"),
        ({"images": [0], "texts": [0], "image": 0}, r"item 2: mixes an \{images, texts\} record with pair keys"),
        ({"image": 0}, r"item 2: has no caption or caption_index key"),
        ("a.png", r"item 2: expected a JSON object"),
    ],
)
def test_bad_json_items(tmp_path, item, pattern):
    path = write(tmp_path, "pairs.json", json.dumps([{"image": 0, "caption": 0}, item]))
    one_line_error(path, r"pairs\.json " + pattern)


def test_json_that_is_not_a_list(tmp_path):
    path = write(tmp_path, "pairs.json", '{"images": [0], "texts": [0]}')
    one_line_error(path, r"pairs\.json: expected a JSON list .* got an object")


@pytest.mark.parametrize(
    "name, text",
    [
        ("header-only.csv", "image,caption,clip_score\n\n"),
        ("blank.jsonl", "\n  \n"),
        ("empty-list.json", "[]"),
        ("empty-rows.csv", "image,caption\n,\n , \n"),
    ],
)
def test_an_empty_pair_list_is_an_error(tmp_path, name, text):
    one_line_error(write(tmp_path, name, text), r": no pairs found; list at least one \(image, caption\) pair")


def test_an_empty_csv_file_says_a_header_is_needed(tmp_path):
    one_line_error(write(tmp_path, "pairs.csv", ""), r"pairs\.csv: the file is empty; .*header row")


def test_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"image,caption\ncat.jpg,a cat\ncat.jpg,caf\xe9\n")
    one_line_error(path, r"pairs\.csv line 3: not valid UTF-8; save the pair list as UTF-8")
