"""Mask grid pictures from hand-made maps: layout, heatmap colours, mask cells, aspect."""

import numpy as np
import torch

from ela_ext.localize import Localization
from ela_ext.mask_grid import CELL, HEADER, LABEL_WIDTH, heatmap, mask_grid
from ela_ext.tokens import EntityColumns, ResolvedEntity, WordColumns

TARGET = EntityColumns((ResolvedEntity("cat", (1,), (WordColumns("black", (2,)),)), ResolvedEntity("frog", (3,), ())),
                       sot_columns=(0,))


def test_grid_has_a_row_per_word_and_shows_each_mask():
    maps = torch.zeros(4, 2, 4)
    maps[1, :, :2] = 1.0  # cat on the left half
    masks = torch.zeros(2, 2, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, :, 2:] = True
    grid = np.asarray(mask_grid(maps, maps, TARGET, Localization(masks, torch.zeros(2, 4, dtype=torch.bool))))
    cell_h = CELL // 2  # a 2x4 map keeps its aspect: 128 wide, 64 high
    assert grid.shape == (HEADER + 3 * (cell_h + 4), LABEL_WIDTH + 3 * (CELL + 4), 3)
    mask_left = LABEL_WIDTH + CELL + 4
    cat_row, frog_row = HEADER, HEADER + 2 * (cell_h + 4)
    assert (grid[cat_row + 5, mask_left + 5] == 255).all() and (grid[cat_row + 5, mask_left + CELL - 5] == 0).all()
    assert (grid[frog_row + 5, mask_left + 5] == 0).all() and (grid[frog_row + 5, mask_left + CELL - 5] == 255).all()
    # the attribute row shares its entity's mask
    black_row = HEADER + cell_h + 4
    assert (grid[black_row + 5, mask_left + 5] == 255).all()


def test_heatmap_runs_black_to_white():
    picture = np.asarray(heatmap(torch.tensor([[0.0, 1.0]]), size=8))
    assert picture.shape == (4, 8, 3)
    assert (picture[0, 0] == 0).all() and (picture[0, -1] == 255).all()
