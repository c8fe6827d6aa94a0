"""Which cross-attention layers are scored, selected structurally from the UNet's own block structure, so any
SD2-architecture model works with every layer set, including small test models. (The processors that record them
live with the rest of the scoring forward, in :mod:`dsdkit.pytorch.forward`.)
"""

from __future__ import annotations

from ..runtime.config import LayerSet
from ..runtime.errors import ModelError

__all__ = ["cross_attention_layers", "select_layers"]


def _attn2_names(block, prefix: str) -> list[list[str]]:
    """Per attention of ``block``, the attn2 module names of its transformer blocks (in forward order)."""
    out = []
    for a, attention in enumerate(getattr(block, "attentions", None) or []):
        names = []
        for t, transformer_block in enumerate(getattr(attention, "transformer_blocks", [])):
            if getattr(transformer_block, "attn2", None) is not None:
                names.append(f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn2")
        if names:
            out.append(names)
    return out


def cross_attention_layers(unet) -> dict[str, list[list[list[str]]]]:
    """attn2 names grouped by path ("down", "mid", "up") -> block -> attention -> transformer block."""
    down = [_attn2_names(b, f"down_blocks.{i}") for i, b in enumerate(unet.down_blocks)]
    mid = [_attn2_names(unet.mid_block, "mid_block")] if unet.mid_block is not None else []
    up = [_attn2_names(b, f"up_blocks.{i}") for i, b in enumerate(unet.up_blocks)]
    return {"down": down, "mid": mid, "up": up}


def select_layers(unet, layers: LayerSet) -> list[str]:
    """The scored attn2 layers, in forward order.

    ``last``: the last down block with cross-attention, the mid block and the last up block with cross-attention;
    in each, every attention's last transformer block (6 layers on SD2: down_blocks.2 x2, mid x1, up_blocks.3 x3).
    ``all``: every cross-attention layer (16 on SD2).
    """
    groups = cross_attention_layers(unet)
    selected: list[str] = []
    for path in ("down", "mid", "up"):
        blocks = [b for b in groups[path] if b]
        if not blocks:
            continue
        if layers is LayerSet.all:
            selected += [name for block in blocks for attention in block for name in attention]
        else:
            selected += [attention[-1] for attention in blocks[-1]]
    if not selected:
        raise ModelError(
            "the UNet has no cross-attention layers; DSD needs an SD2-architecture (text-conditioned) UNet"
        )
    return selected
