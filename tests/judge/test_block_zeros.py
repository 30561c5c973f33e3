"""Zero layers at the same place of every numbered block (Fixup, adaLN-zero) read from a bare state_dict: a block
recipe where they end their blocks, no recipe where the next layer of the block takes their output in (a zeroed
squeeze-excite fc1: every unit of fc2 then sees the same constant)."""

from __future__ import annotations

import torch
from torch import nn

import initaudit
from helpers import recipes


def zero_severities(model: nn.Module, folder, **kwargs) -> dict[str, str]:
    path = folder / "model.pt"
    torch.save(model.state_dict(), path)
    report = initaudit.audit(path, **kwargs)
    return {f.layer: f.severity for f in report.findings if f.rule == "zero-weights"}


def test_a_zeroed_squeeze_excite_fc1_feeds_its_blocks_fc2_and_is_an_error(tmp_path):
    found = zero_severities(recipes.build_se_resnet_twin(), tmp_path)
    assert found == {f"{k}.fc1": "error" for k in range(1, 5)}


def test_a_zero_conv_ending_every_block_stays_a_recipe(tmp_path):
    found = zero_severities(recipes.build_fixup(), tmp_path, activation="relu")
    assert {found[f"layers.{k}.conv2"] for k in range(6)} == {"info"}


class Modulated(nn.Module):
    """Numbered blocks each ending in a modulation `mod`, and a final layer whose own `mod` comes before its head in
    the file (as DiT's FinalLayer holds adaLN_modulation beside linear)."""

    def __init__(self, zero_blocks: bool, width: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(width, width), "mod": nn.Linear(width, 2 * width)})
                                    for _ in range(3))
        self.final = nn.ModuleDict({"mod": nn.Linear(width, 2 * width), "head": nn.Linear(width, 4)})
        for block in self.blocks if zero_blocks else []:
            nn.init.zeros_(block["mod"].weight)
        nn.init.zeros_(self.final["mod"].weight)


def test_a_lone_zero_with_the_blocks_recipe_path_is_that_recipe_and_alone_it_is_not(tmp_path):
    assert zero_severities(Modulated(zero_blocks=True), tmp_path)["final.mod"] == "info"
    assert zero_severities(Modulated(zero_blocks=False), tmp_path)["final.mod"] == "error"
