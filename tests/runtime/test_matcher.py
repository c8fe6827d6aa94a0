"""The torch-free runtime on a tiny bundle: chunked streaming, ranking helpers, no torch imported, match --bundle
against match --model, resume after an interruption or a kill, the cost estimate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dsdkit.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red circle"]


@pytest.fixture(scope="module")
def bundle(export_case):
    return export_case("discffusion-kv-prompt")[0]


def test_chunked_streaming_equals_one_chunk_and_pytorch(
    bundle, tiny_model, adapter_files, shape_images, pytorch_scores
):
    from dsdkit.runtime import Matcher

    images = shape_images + shape_images[:2]  # duplicates are scored once and still fill their rows
    with Matcher.from_bundle(bundle, num_timesteps=2, chunk_size=100) as whole:
        reference = whole.score(images, CAPTIONS)
    with Matcher.from_bundle(bundle, num_timesteps=2, chunk_size=2, batch_size=3) as streamed:
        streamed.max_cached_images = 2  # evicts while streaming
        chunked = streamed.score(images, CAPTIONS)
        assert len(streamed._images) <= 2
    np.testing.assert_allclose(chunked, reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(reference[4:], reference[:2])
    np.testing.assert_array_equal(reference[:, 4], reference[:, 0])
    manifest = json.loads((bundle / "manifest.json").read_text())
    torch_scores = pytorch_scores(tiny_model, manifest, adapter_files["kv-prompt"], images, CAPTIONS, 2)
    np.testing.assert_allclose(reference, torch_scores, atol=1e-5, rtol=1e-5)


def test_rank_texts_and_images(bundle, shape_images):
    from dsdkit.runtime import Matcher

    with Matcher.from_bundle(bundle, num_timesteps=1) as matcher:
        matrix = matcher.score(shape_images, CAPTIONS[:4])
        ranked = matcher.rank_texts(shape_images[1], CAPTIONS[:4])
        assert [c for c, _ in ranked] == [CAPTIONS[j] for j in np.argsort(-matrix[1], kind="stable")]
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
        images = matcher.rank_images(CAPTIONS[2], shape_images)
        assert [i for i, _ in images] == list(np.argsort(-matrix[:, 2], kind="stable"))
        assert matcher.planned_evaluations(4, 16) == 4 * 1 * (4 + 1)


def test_adaptive_ranking_on_a_bundle_keeps_survivors_exhaustive(bundle, shape_images):
    """The bundle path runs the same elimination (runtime.adaptive) as the PyTorch scorer."""
    from dsdkit.runtime import Matcher

    with Matcher.from_bundle(bundle, num_timesteps=4) as matcher:
        exhaustive = matcher.score_matrix(shape_images, CAPTIONS[:4])
        result = matcher.rank_matrix(shape_images, CAPTIONS[:4], top_k=1, schedule="keep=2,1:steps=1,all")
        assert (result.exact.sum(1) == 2).all() and (result.held[~result.exact] == 1).all()
        np.testing.assert_allclose(result.scores[result.exact], exhaustive.scores[result.exact], rtol=1e-6)
        assert result.evaluations["conditional"] == len(shape_images) * (4 * 1 + 2 * 3)
        ranked = matcher.rank_texts(shape_images[0], CAPTIONS[:4], top_k=1, schedule="keep=2,1:steps=1,all")
        assert ranked[0].exact and ranked[0].candidate in CAPTIONS[:4]


def test_runtime_never_imports_torch(bundle, tmp_path):
    """A fresh interpreter: import the runtime, open the bundle, score; torch, diffusers, transformers stay
    unloaded."""
    script = f"""
import sys
import numpy as np
from dsdkit.runtime import Matcher
images = [np.full((40, 50, 3), v, dtype=np.uint8) for v in (30, 200)]
with Matcher.from_bundle({str(bundle)!r}, num_timesteps=1) as matcher:
    scores = matcher.score(images, ["a dark picture", "a bright picture"])
assert scores.shape == (2, 2) and np.isfinite(scores).all()
loaded = [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout


def test_match_bundle_cli_never_imports_torch(bundle, tmp_path):
    out = tmp_path / "scores.json"
    script = f"""
import sys
from dsdkit.cli import app
try:
    app(["match", {str(EXAMPLES / "images")!r}, {str(EXAMPLES / "captions.txt")!r}, "--bundle", {str(bundle)!r},
         "--timesteps", "1", "-o", {str(out)!r}])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("LOADED", [name for name in ("torch", "diffusers", "transformers") if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout
    assert json.loads(out.read_text())["meta"]["backend"] == "onnxruntime"


def test_match_bundle_and_model_rank_alike(bundle, tiny_model_dir, adapter_files, tmp_path):
    """The new-user path: the same job through the bundle and through the PyTorch model."""
    runner = CliRunner()
    common = [str(EXAMPLES / "images"), str(EXAMPLES / "captions.txt"), "--timesteps", "2"]
    via_bundle = runner.invoke(app, ["match", *common, "--bundle", str(bundle), "-o", str(tmp_path / "b.json")])
    assert via_bundle.exit_code == 0, via_bundle.output
    via_model = runner.invoke(
        app,
        [
            "match",
            *common,
            "--model",
            str(tiny_model_dir),
            "--adapters",
            str(adapter_files["kv-prompt"]),
            "-o",
            str(tmp_path / "m.json"),
        ],
    )
    assert via_model.exit_code == 0, via_model.output
    b, m = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "bm")
    np.testing.assert_allclose(np.array(b["scores"]), np.array(m["scores"]), atol=1e-5, rtol=1e-5)
    assert [[t["caption"] for t in r["top_k"]] for r in b["top_k"]["per_image"]] == [
        [t["caption"] for t in r["top_k"]] for r in m["top_k"]["per_image"]
    ]


def test_a_bundle_leaves_the_attention_term_out_when_asked(bundle, shape_images):
    """`attention_term=False` on the torch-free path: the denoising term alone, i.e. the full score minus the score
    without the denoising term, exhaustive and adaptive alike."""
    from dsdkit.runtime import Matcher

    images, captions = shape_images[:3], CAPTIONS[:4]
    with Matcher.from_bundle(bundle, num_timesteps=2) as full:
        both = full.score(images, captions)
    with Matcher.from_bundle(bundle, num_timesteps=2, denoise_term=False) as attention:
        attention_only = attention.score(images, captions)
    with Matcher.from_bundle(bundle, num_timesteps=2, attention_term=False) as matcher:
        alone = matcher.score(images, captions)
        ranked = matcher.rank_matrix(images, captions, top_k=1, schedule="keep=2,1:steps=1,all")
    np.testing.assert_allclose(alone, both - attention_only, atol=1e-5)
    assert np.abs(attention_only).max() > 1e-3
    np.testing.assert_allclose(ranked.scores[ranked.exact], alone[ranked.exact], atol=1e-6)


def test_bundle_refuses_scoring_knobs(bundle):
    result = CliRunner().invoke(
        app,
        [
            "match",
            str(EXAMPLES / "images"),
            str(EXAMPLES / "captions.txt"),
            "--bundle",
            str(bundle),
            "--pooling",
            "image-lse",
        ],
    )
    assert result.exit_code == 2 and "a bundle fixes the model, adapter and scoring config" in result.output


def test_interrupted_match_resumes_without_losing_rows(bundle, shape_images, tmp_path):
    """An interruption after the second chunk keeps two rows on disk; --resume scores only the rest."""
    from dsdkit.runtime.resume import partial_folder

    from dsdkit.jobs.match import match

    images = [tmp_path / f"im{i}.png" for i in range(4)]
    for path, image in zip(images, shape_images, strict=True):
        image.save(path)
    out = tmp_path / "scores.csv"
    calls = {"evaluations": 0}

    def progress(total, done):
        def advance(n):
            calls["evaluations"] += n
            if calls["evaluations"] >= 2 * (len(CAPTIONS) - 1 + 1) * 2 + 1:  # inside the third chunk
                raise KeyboardInterrupt

        return advance

    kwargs = dict(bundle=bundle, num_timesteps=2, chunk_size=1, batch_size=4, output=out)
    with pytest.raises(KeyboardInterrupt):
        match(images, CAPTIONS, progress=progress, **kwargs)
    state = json.loads((partial_folder(out) / "state.json").read_text())
    assert state["done_rows"] == 2 and not out.exists()
    counted = {"evaluations": 0}

    def count(total, done):
        return lambda n: counted.__setitem__("evaluations", counted["evaluations"] + n)

    resumed = match(images, CAPTIONS, progress=count, resume=True, **kwargs)
    assert counted["evaluations"] == 2 * 4 * 2 + 2 * 2  # rows 2 and 3 only: 4 unique captions + uncond, S=2
    fresh = match(images, CAPTIONS, bundle=bundle, num_timesteps=2, chunk_size=1, batch_size=4)
    np.testing.assert_array_equal(resumed.scores, fresh.scores)
    assert not partial_folder(out).exists() and out.is_file()


def test_partial_results_of_another_job_are_refused(bundle, shape_images, tmp_path):
    from dsdkit.runtime.errors import ConfigError
    from dsdkit.runtime.resume import _save, partial_folder

    from dsdkit.jobs.match import match

    out = tmp_path / "scores.csv"
    _save(partial_folder(out), np.zeros((2, 2)), 1, "e" * 64)  # a verified state, of another job
    with pytest.raises(ConfigError, match="pass `resume` to continue it"):
        match(shape_images[:2], CAPTIONS[:2], bundle=bundle, num_timesteps=1, output=out)
    with pytest.raises(ConfigError, match="partial results of a different job"):
        match(shape_images[:2], CAPTIONS[:2], bundle=bundle, num_timesteps=1, output=out, resume=True)


def test_killed_match_resumes_to_the_same_result(bundle, shape_images, tmp_path):
    """A real SIGKILL in the middle of a run (subprocess), then --resume: the same matrix as an uninterrupted run."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        shape_images[i % 4].rotate(15 * i).save(folder / f"im{i}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:4]) + "\n")
    dsdkit = str(Path(sys.executable).with_name("dsdkit"))
    args = [
        dsdkit,
        "match",
        str(folder),
        str(captions),
        "--bundle",
        str(bundle),
        "--timesteps",
        "12",
        "--chunk-size",
        "1",
        "--batch-size",
        "8",
    ]
    state = tmp_path / "killed.json.partial" / "state.json"
    process = subprocess.Popen(
        [*args, "-o", str(tmp_path / "killed.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and process.poll() is None:
        if state.exists():
            done = json.loads(state.read_text())["done_rows"]
            if done >= 1:
                break
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail("the run finished before it could be killed; make it longer")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 1 <= json.loads(state.read_text())["done_rows"] < 6
    resumed = subprocess.run([*args, "-o", str(tmp_path / "killed.json"), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    whole = subprocess.run([*args, "-o", str(tmp_path / "whole.json")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["scores"] for n in ("killed", "whole"))
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_dry_run_prints_the_cost(bundle):
    result = CliRunner().invoke(
        app,
        [
            "match",
            str(EXAMPLES / "images"),
            str(EXAMPLES / "captions.txt"),
            "--bundle",
            str(bundle),
            "--timesteps",
            "10",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    images = len([p for p in (EXAMPLES / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")])
    captions = len([line for line in (EXAMPLES / "captions.txt").read_text().splitlines() if line.strip()])
    assert f"{images} images x {captions} captions = {images * captions:,} pairs, S = 10" in result.output
    assert f"{images * 10 * (captions + 1):,} UNet evaluations" in result.output
    assert "estimate" in result.output


def test_dry_run_on_the_pytorch_path(tiny_model_dir):
    result = CliRunner().invoke(
        app,
        [
            "match",
            str(EXAMPLES / "images"),
            str(EXAMPLES / "captions.txt"),
            "--model",
            str(tiny_model_dir),
            "--timesteps",
            "3",
            "--no-denoise",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "S = 3 timesteps" in result.output and "calibrated pytorch" in result.output


def test_tensorrt_backend_without_engines_names_the_fix(bundle):
    result = CliRunner().invoke(
        app,
        [
            "match",
            str(EXAMPLES / "images"),
            str(EXAMPLES / "captions.txt"),
            "--bundle",
            str(bundle),
            "--backend",
            "tensorrt",
        ],
    )
    assert result.exit_code == 7
    assert "the bundle has no TensorRT engines; build them on this machine with `dsdkit build-engines" in result.output


def test_build_engines_without_tensorrt_is_one_line(bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the message on machines without it")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["build-engines", str(bundle)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "cannot build TensorRT engines here: TensorRT is not installed" in result.output
