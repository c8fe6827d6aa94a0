"""`dsdkit export --shortlist demo`: a bundle that carries the shipped mini-CLIP's towers as ONNX graphs, so that a
gallery search runs torch-free. The towers pass the export's own parity check (and agree with PyTorch here, on the
parity inputs and on examples/demo), are listed and hashed in the manifest (an edited tower or tokenizer file is
refused), the bundle's ``shortlist_embedder()`` shortlists as ``TorchClip`` does, and ``match --bundle ...
--shortlist-k K`` searches in an interpreter where torch cannot be imported.

One export of the session's micro model (torchscript, parity on 2 x 2 at S = 1) for the whole module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import BundleError
from typer.testing import CliRunner

from dsdkit.cli import app

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CAPTIONS = DEMO / "captions.txt"
CLIP_GRAPHS = ("clip_image_encoder", "clip_text_encoder")


@pytest.fixture(scope="module")
def search_bundle(micro_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("search-bundle") / "bundle"
    args = ["export", "--model", str(micro_model_dir), "--out", str(out), "--exporter", "torchscript"]
    args += ["--parity-size", "2", "--no-engines", "--shortlist", "demo"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def clip():
    from dsdkit.pytorch.clip import TorchClip

    return TorchClip("demo", device="cpu")


@pytest.fixture(scope="module")
def demo_inputs():
    from PIL import Image

    images = []
    for path in sorted(DEMO.glob("*.png")):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images, CAPTIONS.read_text().splitlines()


def brute_force_top(cosine: np.ndarray, k: int) -> list[list[int]]:
    """Each row's ``k`` best columns by cosine (ties to the lower index), unambiguous beyond float32 error."""
    out = []
    for row in cosine:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        assert row[order[k - 1]] - row[order[k]] > 1e-4, order
        out.append(order[:k])
    return out


def test_the_clip_graphs_pass_parity_and_are_listed_and_hashed(search_bundle, clip):
    from dsdkit.export.parity import ParitySettings, parity_inputs
    from dsdkit.runtime import Matcher
    from dsdkit.runtime.shortlist import ClipPreprocessor

    path, manifest = search_bundle
    # The export's own parity report covers both towers, within its tolerance.
    graphs = manifest["parity"]["graphs"]
    for name in CLIP_GRAPHS:
        check = graphs[name]["embeddings"]
        assert check["ok"] is True
        assert check["max_abs"] <= check["atol"] + check["rtol"] * check["reference_max_abs"]
        assert check["reference_max_abs"] > 0.05  # unit vectors of 64 entries: the check compared real embeddings
    # ... and the runtime's towers agree with PyTorch on those parity inputs, measured here.
    images, captions = parity_inputs(ParitySettings(**manifest["parity"]["inputs"]))
    with Matcher.from_bundle(path, num_timesteps=1, backend="onnxruntime", device="cpu") as matcher:
        embedder = matcher.shortlist_embedder()
        ours = {
            "clip_image_encoder": embedder.embed_images(images),
            "clip_text_encoder": embedder.embed_texts(captions),
        }
    reference = {"clip_image_encoder": clip.embed_images(images), "clip_text_encoder": clip.embed_texts(captions)}
    for name in CLIP_GRAPHS:
        check = graphs[name]["embeddings"]
        assert ours[name].shape == reference[name].shape == (2, 64)
        np.testing.assert_allclose(ours[name], reference[name], atol=check["atol"], rtol=check["rtol"])

    # Listed in the manifest: the graphs, their files and the tokenizer / processor files, each with its sha256.
    for name in CLIP_GRAPHS:
        graph = manifest["graphs"][name]
        assert graph["file"] == f"onnx/{name}.onnx" and graph["precision"] == "fp32"
    record = manifest["shortlist"]
    assert record["graphs"] == {"image": "clip_image_encoder", "text": "clip_text_encoder"}
    assert record["model"] == "demo" and record["folder"] == "clip" and record["embedding_dim"] == 64
    assert record["identity"] == clip.identity()
    assert record["preprocess"] == ClipPreprocessor.from_folder(clip.folder).to_dict()
    listed = [f"onnx/{name}.onnx" for name in CLIP_GRAPHS]
    listed += [f"clip/{name}" for name in ("vocab.json", "merges.txt", "preprocessor_config.json")]
    for relative in listed:
        data = (path / relative).read_bytes()
        assert manifest["files"][relative]["sha256"] == hashlib.sha256(data).hexdigest(), relative
    for name in ("vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (path / "clip" / name).read_bytes() == (clip.folder / name).read_bytes()


@pytest.mark.parametrize("relative", ["onnx/clip_text_encoder.onnx", "clip/preprocessor_config.json"])
def test_an_edited_tower_or_processor_file_is_refused(search_bundle, relative, tmp_path):
    from dsdkit.runtime import Matcher

    copy = tmp_path / "bundle"
    shutil.copytree(search_bundle[0], copy)
    data = bytearray((copy / relative).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / relative).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{relative} was modified") as refused:
        Matcher.from_bundle(copy, num_timesteps=1)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("role, other", [("image", "text_encoder"), ("text", "clip_image_encoder")])
def test_a_shortlist_naming_another_graph_is_refused_in_one_line(search_bundle, role, other, tmp_path):
    """A hand-edited manifest whose shortlist tower names a graph that exists but is not that tower."""
    import json

    from dsdkit.runtime import Matcher

    copy = tmp_path / "bundle"
    shutil.copytree(search_bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shortlist"]["graphs"][role] = other
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"not a CLIP {role} tower") as refused:
        Matcher.from_bundle(copy, num_timesteps=1)
    assert "\n" not in str(refused.value) and other in str(refused.value)


def test_the_bundles_towers_shortlist_as_torchclip(search_bundle, clip, demo_inputs):
    from dsdkit.runtime import Matcher
    from dsdkit.runtime.shortlist import Shortlister

    path, _ = search_bundle
    images, captions = demo_inputs
    reference_images, reference_texts = clip.embed_images(images), clip.embed_texts(captions)
    with Matcher.from_bundle(path, num_timesteps=1, backend="onnxruntime", device="cpu") as matcher:
        embedder = matcher.shortlist_embedder()
        assert embedder.describe()["backend"] == "onnxruntime" and embedder.describe()["model"] == "demo"
        image_vectors, text_vectors = embedder.embed_images(images), embedder.embed_texts(captions)
        np.testing.assert_allclose(image_vectors, reference_images, atol=1e-5, rtol=0)
        np.testing.assert_allclose(text_vectors, reference_texts, atol=1e-5, rtol=0)
        cosine = reference_images.astype(np.float64) @ reference_texts.astype(np.float64).T
        for per, queries in (("image", cosine), ("caption", cosine.T)):
            listed = Shortlister(embedder, k=3)(images, captions, per)
            assert listed.candidate_lists() == brute_force_top(queries, 3)
            np.testing.assert_allclose(listed.similarities, np.sort(queries, axis=1)[:, ::-1][:, :3], atol=1e-5)
        # The Python API on the bundle ranks exactly its image's CLIP top 3, by DSD score.
        scores = matcher.score(images[:2], captions)
        for i in range(2):
            ranking = matcher.rank_texts(images[i], captions, shortlist=Shortlister(embedder, k=3))
            top = brute_force_top(cosine[i : i + 1], 3)[0]
            expected = sorted(top, key=lambda j: (-scores[i, j], j))
            assert [caption for caption, _ in ranking] == [captions[j] for j in expected]
            np.testing.assert_allclose([s for _, s in ranking], scores[i, expected], rtol=1e-5, atol=1e-6)


#: Runs the CLI in an interpreter where torch, transformers and diffusers cannot be imported.
TORCH_FREE_MATCH = """
import sys
for name in ("torch", "transformers", "diffusers"):
    sys.modules[name] = None  # `import torch` now raises ImportError
from dsdkit.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("LOADED", sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "transformers", "diffusers")
                       and sys.modules[n] is not None))
"""


def test_match_bundle_shortlist_k_searches_without_torch(search_bundle, clip, demo_inputs, tmp_path):
    from dsdkit.runtime import Matcher

    path, _ = search_bundle
    images, captions = demo_inputs
    out = tmp_path / "search.json"
    args = ["match", str(DEMO), str(CAPTIONS), "--bundle", str(path), "--timesteps", "1", "--shortlist-k", "2"]
    args += ["--threads", "1", "-o", str(out)]
    ran = subprocess.run([sys.executable, "-c", TORCH_FREE_MATCH, *args], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "LOADED []" in ran.stdout, ran.stdout
    document = json.loads(out.read_text())
    meta = document["meta"]["shortlist"]
    assert meta["k"] == 2 and meta["model"] == "demo (the bundle's)" and meta["embedder"]["backend"] == "onnxruntime"
    assert meta["pairs"] == 8 * 2
    # The scored pairs are each image's CLIP top 2 (PyTorch embeddings, brute force), with their ranks.
    cosine = clip.embed_images(images).astype(np.float64) @ clip.embed_texts(captions).astype(np.float64).T
    top = brute_force_top(cosine, 2)
    for i, row in enumerate(document["scores"]):
        assert sorted(j for j, v in enumerate(row) if v is not None) == sorted(top[i])
        assert [document["shortlist"]["rank"][i][j] for j in top[i]] == [1, 2]
    # ... and their scores are the bundle's scores of those pairs.
    with Matcher.from_bundle(path, num_timesteps=1, backend="onnxruntime", device="cpu") as matcher:
        scores = matcher.score(images, captions)
    for i, row in enumerate(document["scores"]):
        np.testing.assert_allclose([row[j] for j in top[i]], scores[i, top[i]], rtol=1e-5, atol=1e-6)
