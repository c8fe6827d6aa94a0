"""Structural layer selection, checked against the UNet's module names read independently."""

from __future__ import annotations

import re

import pytest
from dsdkit.runtime.config import LayerSet

from dsdkit.pytorch.attention import select_layers


def attn2_by_block(unet) -> dict[str, list[str]]:
    """attn2 module names grouped by their block ("down_blocks.2", "mid_block", ...), in module order."""
    groups: dict[str, list[str]] = {}
    for name, _ in unet.named_modules():
        if name.endswith(".attn2"):
            block = re.match(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)", name).group(1)
            groups.setdefault(block, []).append(name)
    return groups


@pytest.mark.parametrize("size", ["tiny", "micro"])
def test_layer_sets_follow_the_block_structure(size, tiny_model, micro_model_dir):
    from dsdkit.pytorch.models import load_model

    model = tiny_model if size == "tiny" else load_model(micro_model_dir, device="cpu", dtype="fp32")
    groups = attn2_by_block(model.unet)
    downs = [b for b in groups if b.startswith("down_blocks")]
    ups = [b for b in groups if b.startswith("up_blocks")]
    forward_order = downs + ["mid_block"] + ups  # the UNet registers up_blocks before mid_block; it runs mid first
    every = [name for block in forward_order for name in groups[block]]
    assert select_layers(model.unet, LayerSet.all) == every

    def last_per_attention(block):  # each attention's last transformer block
        by_attention: dict[str, str] = {}
        for name in groups[block]:
            by_attention[name.split(".transformer_blocks.")[0]] = name
        return list(by_attention.values())

    expected = last_per_attention(downs[-1]) + last_per_attention("mid_block") + last_per_attention(ups[-1])
    assert select_layers(model.unet, LayerSet.last) == expected
    assert set(expected) < set(every)
