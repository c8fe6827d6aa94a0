"""The shipped demo model: its files are the ones its manifest lists, `--model demo` loads it as real weights, and it
really matches (the default score on held-out benchmark items, and the README's try-it command)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsdkit.demo import MANIFEST_FILE, demo_model_folder, verify_demo_model
from dsdkit.errors import ModelError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_model():
    from dsdkit.models import load_model

    return load_model("demo", device="cpu", dtype="fp32")


def test_shipped_files_match_their_manifest():
    manifest = verify_demo_model()
    folder = demo_model_folder()
    assert set(manifest["files"]) >= {
        "unet/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "world_model.json",
    }
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    assert total < 21 * 2**20, f"the demo model should stay within about 20 MB, it is {total / 2**20:.1f} MB"
    assert (folder / MANIFEST_FILE).is_file()


def test_every_shipped_file_is_package_data():
    """A built wheel carries only files that pyproject's package-data globs match: each shipped file must match."""
    import fnmatch

    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["dsdkit.assets"]
    names = [f"demo/{name}" for name in verify_demo_model()["files"]] + [f"demo/{MANIFEST_FILE}"]
    missed = [n for n in names if not any(fnmatch.fnmatch(n, g) and n.count("/") == g.count("/") for g in globs)]
    assert not missed, f"not in the wheel: {missed}"


def test_a_modified_or_extra_file_is_refused(tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_model_folder(), copy)
    verify_demo_model(copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the demo model's manifest"):
        verify_demo_model(copy)
    shutil.copy(demo_model_folder() / "vae" / "diffusion_pytorch_model.safetensors", weights)
    (copy / "stray.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not in the demo model's manifest: stray.bin"):
        verify_demo_model(copy)


def test_demo_loads_as_real_weights_without_the_random_weight_warning(caplog):
    from dsdkit.models import load_model

    with caplog.at_level(logging.WARNING, logger="dsdkit"):
        model = load_model("demo", device="cpu")
    assert not model.is_test_model
    assert not [r for r in caplog.records if "random-weight" in r.getMessage() or "meaningless" in r.getMessage()]
    assert model.folder == demo_model_folder() and model.resolution == 64
    recipe = json.loads((model.folder / "world_model.json").read_text())
    assert recipe["recipe"]["weights_dtype"] == "fp16"


def test_missing_default_model_points_at_the_demo_model(monkeypatch, tmp_path):
    from dsdkit.models import DEFAULT_MODEL, resolve_model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="--model demo"):
        resolve_model_folder(DEFAULT_MODEL)


def test_zero_shot_default_score_discriminates_colour_shape_and_binding(demo_model):
    """The default `discffusion` score at S = 10 on 200 held-out benchmark items per subset (two candidates each,
    ties wrong): at least 95% on replace colour, replace shape and colour binding. The shipped model measured
    100% / 100% / 100% on these items (README table)."""
    from dsdkit.train.world import measure_world_model

    metrics = measure_world_model(
        demo_model.folder, per_subset=200, num_timesteps=10, subsets=("colour", "shape", "binding")
    )
    accuracy = metrics["zero_shot_accuracy"]
    print("zero-shot accuracy at S=10, 200 items per subset:", accuracy)
    assert min(accuracy.values()) >= 0.95, accuracy


def _readme_try_it() -> list[str]:
    """The README's one-command try-it line, from `dsdkit match` on (the install part is the test's own)."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^pip install [^\n]*?&& (dsdkit match [^\n]*?--model demo[^\n]*)$", text, re.M)
    assert match, "the README's try-it command (pip install ... && dsdkit match ... --model demo) is missing"
    return match.group(1).split()


def test_readme_try_it_command_picks_the_right_caption_for_every_example(tmp_path):
    command = _readme_try_it()
    assert command[:4] == ["dsdkit", "match", "examples/demo", "examples/demo/captions.txt"]
    result = tmp_path / "scores.json"
    done = subprocess.run(
        [sys.executable, "-m", "dsdkit.cli", *command[1:], "-o", str(result)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "random-weight" not in done.stderr and "meaningless" not in done.stderr
    document = json.loads(result.read_text())
    captions = (REPO / "examples" / "demo" / "captions.txt").read_text().splitlines()
    images = sorted(p.name for p in (REPO / "examples" / "demo").glob("*.png"))
    assert len(document["scores"]) == len(images) == len(captions)
    for row, name, caption in zip(document["scores"], images, captions, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        assert captions[best] == caption, (name, captions[best])
        assert name.endswith(caption.replace(" ", "-") + ".png")


def test_eval_and_explain_take_model_demo(tmp_path):
    """`--model demo` in eval (the demo-data benchmark, one subset) and explain, as a user types them."""
    from dsdkit.world import write_demo_data

    paths = write_demo_data(tmp_path / "demo", per_subset=4, shots=1)
    report = tmp_path / "metrics.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsdkit.cli",
            "eval",
            str(paths["benchmark"]),
            "--model",
            "demo",
            "--subset",
            "colour",
            "--subset",
            "rank-8",
            "--timesteps",
            "2",
            "-o",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads(report.read_text())["metrics"]
    assert {"top1/colour", "top1/rank-8", "top5/rank-8"} <= set(metrics) and "top5/colour" not in metrics
    assert metrics["examples"] == 8
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsdkit.cli",
            "eval",
            str(paths["benchmark"]),
            "--model",
            "demo",
            "--subset",
            "colours",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wrong.returncode == 2 and "no examples in subset(s) colours" in wrong.stderr
    heat = tmp_path / "heat.png"
    image = sorted((REPO / "examples" / "demo").glob("*.png"))[0]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsdkit.cli",
            "explain",
            str(image),
            "a red circle",
            "--model",
            "demo",
            "--timesteps",
            "2",
            "--out",
            str(heat),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert heat.stat().st_size > 0
