"""Scores do not drift, and files written by earlier versions still load.

``tests/data/golden-*.npz`` hold the score matrices of one fixed job, recorded by ``tests/data/make_golden.py``
(which also wrote ``tests/data/formats/``) before the scoring core was reshaped. The same job must give the same
matrices: ``|Δ| <= 1e-5 + 1e-5·|x|`` on PyTorch, the bundle's own parity tolerance on ONNX Runtime.

fp32 convolutions sum in an order that depends on the thread count (~1e-6 on these scores), so the tests run with
the recorded number of torch threads; and on the CPU's vector width: the same job on an AVX-512 machine differs from
the recording (made where CI then passed at 1e-6) by up to 2.9e-6 (measured 2026-12-02), hence the 1e-5 gate, far
below what a change of the computation moves. These tests never skip. The tiny model's
weights are a function of the installed torch (and diffusers); when the matrices differ while those versions differ
from the recorded ones, the failure says so and gives the command that re-records them. A difference at the
recorded versions is a regression.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
FORMATS = DATA / "formats"
RECORD = json.loads((DATA / "golden.json").read_text(encoding="utf-8"))
ROOT = Path(__file__).parents[1]
IMAGES = [str(ROOT / p) for p in RECORD["images"]]
CAPTIONS = RECORD["captions"]


def _version_note() -> str:
    import diffusers
    import onnxruntime
    import torch
    import transformers

    installed = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    changed = {k: (RECORD["versions"][k], v) for k, v in installed.items() if RECORD["versions"].get(k) != v}
    if not changed:
        return "at the recorded library versions: this is a regression"
    listed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    return f"library versions differ from the recording ({listed}); if intended, re-record with `{RECORD['command']}`"


@pytest.fixture(autouse=True)
def recorded_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(RECORD["threads"])
    yield
    torch.set_num_threads(before)


def assert_matches(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != recorded {expected.shape}"
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    if (excess > 0).any():
        worst = float(np.abs(actual - expected).max())
        pytest.fail(f"{name}: scores differ from the golden matrix by up to {worst:.3g}; {_version_note()}")


def test_pytorch_scores_are_unchanged(tiny_model):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.adapters import load_adapter
    from dsdkit.pytorch.scorer import Scorer

    golden = np.load(DATA / "golden-pytorch.npz")
    for name, job in RECORD["jobs"].items():
        if job["adapter"] is None:
            config, adapter = ScoringConfig.from_preset(job["preset"], **job["overrides"]), None
        else:
            # The committed adapter files are in the format of the day they were recorded: they must still load.
            adapter, trained = load_adapter(FORMATS / f"{job['adapter']}.safetensors", tiny_model)
            config = trained.replace(**job["overrides"])
        assert config.to_dict() == ScoringConfig.from_dict(json.loads(str(golden[f"{name}.config"]))).to_dict()
        scores = Scorer(tiny_model, config, batch_size=5, adapter=adapter).score(IMAGES, CAPTIONS)
        assert_matches(name, scores, golden[name], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def golden_bundle(tiny_model_dir, tmp_path_factory):
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    spec = RECORD["bundle"]
    config = ExportConfig(
        exporter=spec["exporter"], noise_bank_size=spec["noise_bank_size"], parity=ParitySettings(**spec["parity"])
    )
    out = tmp_path_factory.mktemp("golden") / "bundle"
    export_bundle(tiny_model_dir, out, adapters=FORMATS / f"{spec['adapter']}.safetensors", config=config)
    return out


def _bundle_scores(path: Path) -> np.ndarray:
    from dsdkit.runtime.matcher import Matcher

    steps = RECORD["jobs"]["kv-prompt"]["overrides"]["num_timesteps"]
    with Matcher.from_bundle(path, backend="onnxruntime", device="cpu", num_timesteps=steps) as matcher:
        return matcher.score(IMAGES, CAPTIONS)


def test_bundle_scores_are_unchanged(golden_bundle):
    golden = np.load(DATA / "golden-bundle.npz")
    tolerance = json.loads(str(golden["tolerance"]))["end_to_end"]["scores"]
    assert_matches("bundle", _bundle_scores(golden_bundle), golden["scores"], tolerance["atol"], tolerance["rtol"])


def test_a_recorded_bundle_manifest_still_loads(golden_bundle, tmp_path, caplog):
    """The recorded manifest (its format, fields and scoring config as written then) drives today's runtime.

    Only the graphs are re-exported (they are too large to commit), without the export fields that today's scorer
    graph records (the graphs of the day had none); the recorded manifest replaces the new one, with the new files'
    hashes and sizes, so every other field is read as it was written. Such a bundle loads, saying once that it
    predates the check of its scoring fields."""
    from tests.conftest import strip_baked_fields

    old = json.loads((FORMATS / "bundle-kv-prompt.manifest.json").read_text(encoding="utf-8"))
    bundle = tmp_path / "bundle"
    shutil.copytree(golden_bundle, bundle)
    strip_baked_fields(bundle / old["graphs"]["scorer"]["file"])
    for name, entry in old["files"].items():
        entry["sha256"] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
        entry["size"] = (bundle / name).stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(old), encoding="utf-8")
    golden = np.load(DATA / "golden-bundle.npz")
    tolerance = json.loads(str(golden["tolerance"]))["end_to_end"]["scores"]
    with caplog.at_level("WARNING", logger="dsdkit.runtime.bundle"):
        scores = _bundle_scores(bundle)
    assert_matches("old manifest", scores, golden["scores"], tolerance["atol"], tolerance["rtol"])
    lines = [r.getMessage() for r in caplog.records if r.name == "dsdkit.runtime.bundle"]
    assert len(lines) == 1 and "exported before dsdkit recorded the scoring fields" in lines[0], lines
    assert "re-export it with `dsdkit export`" in lines[0]


def test_a_recorded_partial_state_is_rescored(tiny_model, tmp_path, caplog):
    """A ``.partial`` folder of an interrupted run written by the recording predates the resume digest: it cannot be
    verified, so ``--resume`` discards it with one line and scores the job from the start (docs/security.md)."""
    from dsdkit.runtime.config import ScoringConfig
    from dsdkit.runtime.images import load_image

    from dsdkit.jobs.match import match

    output = tmp_path / "scores.csv"
    shutil.copytree(FORMATS / "scores.csv.partial", tmp_path / "scores.csv.partial")
    state = json.loads((FORMATS / "scores.csv.partial" / "state.json").read_text(encoding="utf-8"))
    assert state["format"] == "dsdkit-partial/1" and "digest" not in state
    images = [np.asarray(load_image(p)) for p in IMAGES]
    steps = RECORD["jobs"]["discffusion"]["overrides"]["num_timesteps"]
    config = ScoringConfig.from_preset("discffusion", num_timesteps=steps)
    evaluations = []
    with caplog.at_level("WARNING", logger="dsdkit.runtime.resume"):
        result = match(
            images,
            CAPTIONS,
            model=tiny_model,
            config=config,
            output=output,
            chunk_size=1,
            resume=True,
            progress=lambda total, done: evaluations.append,
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "dsdkit.runtime.resume"]
    assert len(lines) == 1 and "discarding the partial results (written by an earlier dsdkit" in lines[0], lines
    golden = np.load(DATA / "golden-pytorch.npz")["discffusion"]
    assert_matches("rescored", result.scores, golden, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "scores.csv.partial").exists()
