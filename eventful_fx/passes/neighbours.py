"""Neighbour reuse: which gates may let a skipped token take a neighbour's cached results, and from where.

When the camera pans, a patch's content moves to the next token: its own last update is a
poor stand-in, its neighbour's is a good one. A gate with a neighbour table compares each
token with the references of the tokens around it on the patch grid (column 0 is the token
itself) and, where a neighbour's reference is closer, moves that reference and everything
the region cached from it into the token's slot before it picks the k tokens to recompute
(`runtime.gate.TokenGate`). ViT-B/224, all output tokens at budget 0.125: error 29.8% →
26.3% on the built-in clip (a pan), 7.10% → 5.15% on bikes (a moving camera), unchanged on
carphone (a static one); it does not help at 0.5 (`benchmarks/RESULTS.md`).

Only where the region's results depend on a token's own values and nothing else: not where
the region reads per-token tables (position embeddings, relative-position biases, rotary
tables), an attention mask, or feeds incremental attention (which keeps per-query sums).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.fx as fx

from . import ops
from .ops import tensor_shape
from .regions import AttentionSite, Region
from .tokens import _PADDING, NodeInfo

MATCH_RADIUS = 1  # a 3x3 neighbourhood: radius 2 gained 1-2% more on the check, for 25 candidates instead of 9


def patch_grid(gm: fx.GraphModule, infos: dict[fx.Node, NodeInfo]) -> tuple[int, ...] | None:
    """The patch grid's sizes (H, W) where tokens are born, when one patch embedding makes them all."""
    grids = {tuple(tensor_shape(n)[d] for d in infos[n].layout.dims)
             for n in gm.graph.nodes if infos[n].kind == "patch_embed"}
    return grids.pop() if len(grids) == 1 else None


def grid_index(order: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor | None:
    """[N] flat index on the patch grid of each position along a token run (-1: class, register, padding token).

    Patch tokens keep their grid order through concatenation and padding (which renumber ids
    by position), so the patch token of rank r among the run's ids sits at flat index r of the
    grid; a run with another count of patch tokens than the grid has gives None.
    """
    ids = order.reshape(-1)
    patches = torch.nonzero(ids < _PADDING).flatten()
    if len(patches) != math.prod(grid):
        return None
    index = torch.full((len(ids),), -1, dtype=torch.long)
    index[patches[torch.argsort(ids[patches], stable=True)]] = torch.arange(len(patches))
    return index


def neighbour_table(order: torch.Tensor, grid: tuple[int, ...], radius: int = MATCH_RADIUS) -> torch.Tensor | None:
    """[N, M] positions along a token run: row p lists p itself, then the tokens within `radius` of it on the grid.

    Class, register and padding tokens have no neighbours; a missing neighbour repeats p;
    None where the run's patch tokens do not fill the grid (`grid_index`).
    """
    index = grid_index(order, grid)
    if index is None:
        return None
    position = torch.empty(math.prod(grid), dtype=torch.long)
    patches = torch.nonzero(index >= 0).flatten()
    position[index[patches]] = patches
    position = position.tolist()  # grid flat index -> run position
    offsets = [o for o in itertools.product(range(-radius, radius + 1), repeat=len(grid)) if any(o)]
    table = torch.arange(len(index)).unsqueeze(1).repeat(1, len(offsets) + 1)
    for flat, p in enumerate(position):
        coords = [(flat // math.prod(grid[d + 1:])) % grid[d] for d in range(len(grid))]
        for m, offset in enumerate(offsets, 1):
            c = [a + o for a, o in zip(coords, offset)]
            if all(0 <= a < g for a, g in zip(c, grid)):
                table[p, m] = position[sum(a * math.prod(grid[d + 1:]) for d, a in enumerate(c))]
    return table


def attach_neighbours(gm: fx.GraphModule, infos: dict[fx.Node, NodeInfo], regions: list[Region],
                      sites: list[AttentionSite], attention: str, radius: int = MATCH_RADIUS) -> None:
    """Give each region its tokens' places on the patch grid (`region.grid_index`, for pictures) and, with a
    radius > 0, where its results depend on its tokens' own values alone, a neighbour table (`region.neighbours`)."""
    grid = patch_grid(gm, infos)
    for region in regions:
        region.neighbours = None
        region.grid = grid
        region.grid_index = grid_index(infos[region.root].layout.order, grid) if grid else None
        if region.grid_index is None or radius <= 0:
            continue
        members = set(region.nodes) | {region.root}
        if any(infos[n].per_token_args for n in region.nodes):
            continue  # a per-token table: a token's results depend on where it sits
        if any(site.q in members and (site.mask is not None or attention == "incremental") for site in sites):
            continue
        if any(infos[n].kind == ops.ATTENTION for n in region.nodes):
            continue
        table = neighbour_table(infos[region.root].layout.order, grid, radius)
        if table is not None and (table[:, 1:] != table[:, :1]).any():
            region.neighbours = table
