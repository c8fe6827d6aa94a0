"""Full-size SD2-2.1-base architecture (random weights): the real loading and scoring path at 512 px.

Slow (about 2-3 minutes, ~8 GB RAM, ~5 GB of temporary disk); CI runs it once.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
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
