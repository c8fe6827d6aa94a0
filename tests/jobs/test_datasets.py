"""Dataset readers on small fixtures in each real format, bad rows included; image-root confinement; few-shot."""

from __future__ import annotations

import csv
import json
import os
import pickle

import pytest
from dsdkit.runtime.errors import ConfigError, InputError
from PIL import Image

from dsdkit.jobs.datasets import TaskKind, few_shot, load_dataset, restricted_unpickle


def touch_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(path)


def test_generic_jsonl_all_three_shapes_and_bad_rows(tmp_path):
    touch_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "outside.png").parent.mkdir(exist_ok=True)
    lines = [
        {"image": "a.png", "caption": "a cat", "label": 1, "split": "train"},
        {"image": "a.png", "captions": ["a cat", "a dog"], "positive": 1, "id": "x"},
        {"caption": "a cat", "images": ["a.png", "b.png", "c.png"], "positive": 2},
        "not json at all",
        {"image": "a.png", "captions": ["a cat"], "positive": 3},  # positive out of range
        {"image": "../escape.png", "caption": "a cat", "label": 0},  # escapes the image root
        {"image": "a.png", "caption": "", "label": 1},  # empty caption
        {"image": "a.png", "caption": "a cat", "label": "yes"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    dataset = load_dataset(path)
    assert [e.kind for e in dataset.examples] == [TaskKind.pair, TaskKind.image_to_text, TaskKind.text_to_image]
    assert dataset.examples[0].label == 1 and dataset.examples[0].split == "train"
    assert dataset.examples[1].positive == 1 and dataset.examples[1].id == "x"
    assert dataset.examples[2].images[2] == (tmp_path / "c.png").resolve()
    assert [where for where, _ in dataset.skipped] == [f"data.jsonl line {n}" for n in (4, 5, 6, 7, 8)]
    assert "escapes the image root" in dataset.skipped[2][1]


def test_comvg_csv(tmp_path):
    touch_images(tmp_path / "vg", ["1.jpg", "2.jpg", "3.jpg"])
    path = tmp_path / "compositional_visual_genome.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value"])
        writer.writerow(
            [1, "a man is sitting at a table", "man,sit,table", "('dog', 'sit', 'table')", 1, 2, "subject"]
        )
        writer.writerow([2, "a man is sitting at a table", "man,sit,table", "('man', 'sit', 'bed')", 1, 3, "object"])
        writer.writerow([3, "a dog runs", "dog,run,grass", "('dog', 'sit', 'grass')", "not-an-id", 3, "verb"])
        writer.writerow([4, "a dog runs", "dog,run,grass", "('dog', 'sit', 'grass')", 1, 3, ""])
    dataset = load_dataset(path, image_root=tmp_path / "vg")
    assert dataset.format == "comvg" and len(dataset.examples) == 2 and len(dataset.skipped) == 2
    first = dataset.examples[0]
    assert first.kind is TaskKind.text_to_image and first.positive == 0 and first.split == "subject"
    assert [p.name for p in first.images] == ["1.jpg", "2.jpg"]
    assert dataset.splits() == ["object", "subject"]


def test_comvg_missing_images_reported_at_once(tmp_path):
    path = tmp_path / "comvg.csv"
    path.write_text(
        "id,sentence,pos_triplet,neg_triplet,pos_image_id,neg_image_id,neg_value\n"
        "1,a cat,x,y,10,11,subject\n2,a dog,x,y,12,13,object\n"
    )
    with pytest.raises(InputError, match=r"4 of 4 images .* are missing .*10\.jpg, 11\.jpg, 12\.jpg, 13\.jpg"):
        load_dataset(path, "comvg")


def test_sugarcrepe_folder(tmp_path):
    touch_images(tmp_path / "val2017", ["000000000139.jpg", "000000000285.jpg"])
    folder = tmp_path / "sugar"
    folder.mkdir()
    (folder / "add_att.json").write_text(
        json.dumps(
            {
                "0": {
                    "filename": "000000000139.jpg",
                    "caption": "A woman in a room.",
                    "negative_caption": "A woman in a red room.",
                },
                "1": {"filename": "000000000285.jpg", "caption": "A bear."},  # no negative
            }
        )
    )
    (folder / "swap_obj.json").write_text(
        json.dumps(
            {
                "7": {
                    "filename": "000000000285.jpg",
                    "caption": "A bear sits on grass.",
                    "negative_caption": "Grass sits on a bear.",
                },
            }
        )
    )
    dataset = load_dataset(folder, image_root=tmp_path / "val2017")
    assert dataset.format == "sugarcrepe" and dataset.splits() == ["add_att", "swap_obj"]
    assert len(dataset.examples) == 2 and dataset.skipped[0][0] == "add_att.json entry 1"
    assert dataset.examples[1].texts == ["A bear sits on grass.", "Grass sits on a bear."]


def test_winoground_examples_jsonl(tmp_path):
    touch_images(tmp_path / "images", ["ex_0_img_0.png", "ex_0_img_1.png", "ex_1_img_0.png", "ex_1_img_1.png"])
    path = tmp_path / "examples.jsonl"
    rows = [
        {
            "id": 0,
            "image_0": "ex_0_img_0",
            "image_1": "ex_0_img_1",
            "caption_0": "an old person kisses a young person",
            "caption_1": "a young person kisses an old person",
            "tag": "Noun",
            "collapsed_tag": "Object",
        },
        {
            "id": 1,
            "caption_0": "the dog bites the man",
            "caption_1": "the man bites the dog",
            "collapsed_tag": "Relation",
        },
        {"id": 2, "caption_0": "only one caption"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = load_dataset(path, image_root=tmp_path / "images")
    assert dataset.format == "winoground" and len(dataset.examples) == 2 and len(dataset.skipped) == 1
    example = dataset.examples[1]
    assert example.kind is TaskKind.group and [p.name for p in example.images] == ["ex_1_img_0.png", "ex_1_img_1.png"]
    assert example.split == "Relation"


def write_refs(path):
    refs = [
        {
            "ref_id": 1,
            "image_id": 581857,
            "split": "train",
            "sentences": [{"sent": "the lady in blue"}, {"sent": "woman left"}],
        },
        {"ref_id": 2, "image_id": 581857, "split": "val", "sentences": [{"sent": "a man with a hat"}]},
        {
            "ref_id": 3,
            "image_id": 42,
            "split": "test",
            "sentences": [{"sent": "the red car"}, {"sent": "car on the right"}],
        },
        "not a ref",
    ]
    path.write_bytes(pickle.dumps(refs, protocol=2))


def test_refcocog_pickle_through_the_restricted_unpickler(tmp_path):
    touch_images(tmp_path, ["COCO_train2014_000000581857.jpg", "COCO_train2014_000000000042.jpg"])
    path = tmp_path / "refs(google).p"
    write_refs(path)
    dataset = load_dataset(path)
    assert dataset.format == "refcocog" and len(dataset.examples) == 5 and len(dataset.skipped) == 1
    first = dataset.examples[0]
    assert first.kind is TaskKind.image_to_text and first.positive == 0 and first.texts[0] == "the lady in blue"
    assert "woman left" not in first.texts[1:]  # negatives come from other referents
    assert 1 <= len(first.texts) - 1 <= 9 and first.split == "train"
    again = load_dataset(path)
    assert [e.texts for e in again.examples] == [e.texts for e in dataset.examples]  # seeded negatives


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(google).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _Exploit()}], protocol=2))
    with pytest.raises(InputError, match="refused .*posix.system|refused .*os.system|never executes code"):
        restricted_unpickle(path)
    assert not (tmp_path / "pwned").exists()


def test_few_shot_is_seeded_random_or_first_rows():
    examples = list(range(100))
    picked = few_shot(examples, shots=10, seed=3)
    assert picked == few_shot(examples, shots=10, seed=3) and picked != examples[:10] and len(picked) == 10
    assert few_shot(examples, fraction=0.05, first=True) == examples[:5]
    with pytest.raises(ConfigError, match="either `shots` or `fraction`"):
        few_shot(examples, shots=3, fraction=0.5)
    with pytest.raises(ConfigError, match="fraction"):
        few_shot(examples, fraction=1.5)


def test_unknown_format_and_missing_files(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ConfigError, match="`fmt`"):
        load_dataset(tmp_path / "data.txt")
    with pytest.raises(InputError, match="no such dataset"):
        load_dataset(tmp_path / "nope.jsonl")


def test_authors_vqa_csv(tmp_path):
    touch_images(tmp_path, ["COCO_val2014_000000108327.jpg"])
    path = tmp_path / "vqa_text_test.csv"
    header = "sentence,pos_image_id," + ",".join(f"neg_sentence_{i}" for i in range(1, 10))
    good = "What color is the frisbee? blue and white,108327," + ",".join(
        f"What color is the frisbee? c{i}" for i in range(1, 10)
    )
    bad = "What?,not-an-id," + ",".join("x" for _ in range(9))
    path.write_text("\n".join([header, good, bad]) + "\n")
    dataset = load_dataset(path)
    assert dataset.format == "vqa" and len(dataset.examples) == 1 and len(dataset.skipped) == 1
    example = dataset.examples[0]
    assert example.kind is TaskKind.image_to_text and len(example.texts) == 10 and example.positive == 0


def test_jsonl_groups_and_subsets(tmp_path):
    from dsdkit.jobs.datasets import TaskKind, load_dataset

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    rows = [
        {"images": ["a.png", "b.png"], "captions": ["x", "y"], "subset": "group-binding", "split": "test"},
        {"image": "a.png", "captions": ["x", "y"], "positive": 1, "subset": "colour"},
        {"images": ["a.png", "b.png", "a.png"], "captions": ["x", "y"]},  # a group needs 2 x 2: a bad row
        {"image": "a.png", "captions": ["x"], "subset": ""},  # an empty subset name: a bad row
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_dataset(tmp_path / "d.jsonl", check_images=False)
    kinds = [(e.kind, e.subset, e.split) for e in dataset.examples]
    assert kinds == [(TaskKind.group, "group-binding", "test"), (TaskKind.image_to_text, "colour", None)]
    assert [where for where, _ in dataset.skipped] == ["d.jsonl line 3", "d.jsonl line 4"]
