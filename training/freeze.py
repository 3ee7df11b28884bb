"""Locked towers for fine-tuning: --lock-image / --lock-text, and --unlock-last N.

A tower is its stem (embeddings, positions, ln_pre, ...), its blocks, and what comes after
them (ln_post / the text tower's final norm, a head); parameters are sorted into the three
by where they sit relative to the blocks in the tower's own order. This holds for clipforge's
towers and for transformers backbones alike (model/hf_towers.py: layers, or ConvNeXt stages).
A lock freezes the whole tower; with unlock_last N its last N blocks and what follows them
train. The projections into the shared space and the temperature are not part of a tower
and always train. A fully locked tower stays in eval mode (no dropout in features that do not
learn), and since nothing in it needs a gradient, autograd records nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model import CLIP
from model.errors import ConfigError

TOWERS = {"image": "visual", "text": "text"}


@dataclass
class TowerParts:
    stem: list[nn.Parameter]
    blocks: list[list[nn.Parameter]]
    post: list[nn.Parameter]


def tower_parts(tower: nn.Module) -> TowerParts:
    """The tower's parameters before its blocks, per block, and after its blocks."""
    blocks = [list(block.parameters()) for block in tower.blocks]
    in_block = {id(p) for block in blocks for p in block}
    stem: list[nn.Parameter] = []
    post: list[nn.Parameter] = []
    after = False
    for p in tower.parameters():
        if id(p) in in_block:
            after = True
        else:
            (post if after else stem).append(p)
    return TowerParts(stem, blocks, post)


def lock_towers(model: CLIP, *, lock_image: bool, lock_text: bool, unlock_last: int = 0) -> dict[str, int]:
    """Freeze the locked towers (all but their last unlock_last blocks and what follows); frozen counts per tower."""
    frozen: dict[str, int] = {}
    eval_towers = []
    for side, locked in (("image", lock_image), ("text", lock_text)):
        if not locked:
            continue
        attr = TOWERS[side]
        parts = tower_parts(getattr(model, attr))
        if unlock_last > len(parts.blocks):
            raise ConfigError(f"unlock_last {unlock_last} exceeds the {side} tower's {len(parts.blocks)} blocks")
        keep = len(parts.blocks) - unlock_last
        to_freeze = parts.stem + [p for block in parts.blocks[:keep] for p in block]
        if unlock_last == 0:
            to_freeze += parts.post
            eval_towers.append(attr)
        for p in to_freeze:
            p.requires_grad_(False)
        frozen[side] = sum(p.numel() for p in to_freeze)
    model.eval_towers = tuple(eval_towers)
    model.train(model.training)
    return frozen
