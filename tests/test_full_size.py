"""The full-size SD2-2.1-base architecture (random weights; slow, about 12 minutes on one thread, ~13 GB of RAM at
the export's peak, ~17 GB of temporary disk): the real loading and scoring path at 512 px, then `dsdkit export` with
the default dynamo exporter, external data, the parity check, and a peak-memory budget for 24 GB machines.

One module, so that the parallel suite's scheduler (pytest-xdist, ``--dist loadfile``) keeps both tests on one
worker: the 5 GB model is written once and never held twice.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.config import ScoringConfig

pytestmark = pytest.mark.slow

SD2_SCORED_LAYERS = [
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2",
]


@pytest.fixture  # function scope: freed before the export test needs the memory
def full_model(full_model_dir):
    from dsdkit.pytorch.models import load_model

    return load_model(full_model_dir, device="cpu", dtype="fp32")


def test_full_size_layers_heads_and_one_pair(full_model, image_factory):
    from dsdkit.runtime.config import LayerSet

    from dsdkit.pytorch.attention import select_layers
    from dsdkit.pytorch.scorer import Scorer

    unet = full_model.unet
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724  # SD2-2.1-base UNet
    assert full_model.resolution == 512
    assert select_layers(unet, LayerSet.last) == SD2_SCORED_LAYERS
    assert [unet.get_submodule(n).heads for n in SD2_SCORED_LAYERS] == [20, 20, 20, 5, 5, 5]
    assert len(select_layers(unet, LayerSet.all)) == 16
    scorer = Scorer(full_model, ScoringConfig(num_timesteps=1), batch_size=1)
    out = scorer.score_matrix([image_factory("red", "circle")], ["a red circle"])
    assert out.unet_evaluations == 2  # one unconditional and one conditional pass
    assert np.isfinite(out.scores).all() and out.layer_scores.shape == (1, 1, 6)
    assert np.isfinite(out.denoise).all()


# The export process must leave room on a 24 GB machine for the test process and the OS.
PEAK_BUDGET_GB = 20.0


def test_full_size_export_external_data_parity_and_memory(full_model_dir, tmp_path, capsys):
    from dsdkit.export.bundle import SCORE_TOLERANCE
    from dsdkit.export.parity import ParitySettings, parity_inputs
    from dsdkit.runtime import Matcher

    out = tmp_path / "bundle"
    dsdkit = Path(sys.executable).with_name("dsdkit")
    started = time.perf_counter()
    run = subprocess.run(
        [
            str(dsdkit),
            "export",
            "--model",
            str(full_model_dir),
            "--out",
            str(out),
            "--parity-size",
            "2",
            "--parity-timesteps",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    data = out / "onnx" / "scorer.onnx.data"
    assert data.stat().st_size > 3_000_000_000  # 865.9 M fp32 parameters live in external data
    assert (out / "onnx" / "scorer.onnx").stat().st_size < 2**31
    assert manifest["graphs"]["scorer"]["inputs"]["latents"]["shape"] == ["batch", 4, 64, 64]
    assert manifest["graphs"]["scorer"]["inputs"]["states"]["shape"] == ["batch", 77, 1024]
    assert len(manifest["layers"]) == 6
    parity = manifest["parity"]
    assert all(o["ok"] for outputs in parity["graphs"].values() for o in outputs.values())
    assert parity["end_to_end"]["scores"]["ok"]

    # An independent ONNX Runtime run of one pair in this process against the export's PyTorch number.
    images, captions = parity_inputs(ParitySettings(images=2, captions=2))
    with Matcher.from_bundle(out, num_timesteps=1) as matcher:
        ours = matcher.score(images[:1], captions[:1])[0, 0]
    reference = parity["end_to_end"]["pytorch"][0][0]
    np.testing.assert_allclose(ours, reference, atol=SCORE_TOLERANCE[0], rtol=SCORE_TOLERANCE[1])
    np.testing.assert_allclose(ours, parity["end_to_end"]["onnxruntime"][0][0], atol=1e-6)  # the export's own run
    with capsys.disabled():
        print(
            f"\nfull-size export: {seconds:.0f} s wall ({json.dumps(manifest['export']['seconds'])} per graph), "
            f"peak RSS {peak_gb:.1f} GB; parity {json.dumps(parity['graphs']['scorer'])[:300]}; "
            f"scores max abs {parity['end_to_end']['scores']['max_abs']:.3g}; one pair {ours:.6f} vs {reference:.6f}"
        )
    assert peak_gb < PEAK_BUDGET_GB
