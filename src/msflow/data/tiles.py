"""Tiles for large images: where the tiles lie, the tiles as model inputs, and stitching their maps.

With ``tile: T`` (``msflow train --tile T``) an image is cut into T x T pixel tiles of the ORIGINAL image,
each resized to the model input. Training learns the good tiles; a test image is judged from its tiles'
per-scale log-likelihood maps stitched into one map of the whole image (``msflow.infer.predictor``).
Why and when to use them: docs/choices.md, "Tiles for large images".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from msflow.data.datasets import Sample
from msflow.data.images import header_size, read_image, to_tensor
from msflow.errors import DataError

Box = tuple[int, int, int, int]  # (top, left, bottom, right) in original pixels, bottom/right exclusive


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    The first tile starts at 0 and the last ends at the edge; in between the fewest tiles are spread
    evenly so that neighbours overlap by at least ``ceil(overlap * tile)`` pixels (integer floor
    arithmetic keeps the spread exact). A side no longer than a tile gets a single tile spanning it.
    """
    if length <= tile:
        return [0]
    step = tile - math.ceil(overlap * tile)  # the largest distance between two starts
    gaps = -(-(length - tile) // step)  # ceil: the fewest steps that reach the last start
    span = length - tile
    return [(i * span + gaps // 2) // gaps for i in range(gaps + 1)]


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one image of ``height`` x ``width`` pixels, row by row."""

    height: int
    width: int
    tile: int  # the requested side in original pixels
    ys: tuple[int, ...]  # tops of the rows of tiles
    xs: tuple[int, ...]  # lefts of the columns of tiles

    @property
    def tile_height(self) -> int:
        return min(self.tile, self.height)

    @property
    def tile_width(self) -> int:
        return min(self.tile, self.width)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def boxes(self) -> list[Box]:
        th, tw = self.tile_height, self.tile_width
        return [(y, x, y + th, x + tw) for y in self.ys for x in self.xs]


def tile_grid(height: int, width: int, tile: int, overlap: float) -> TileGrid:
    """The grid of ``tile``-pixel tiles, neighbours overlapping by at least ``overlap`` of a tile."""
    ys, xs = axis_starts(height, tile, overlap), axis_starts(width, tile, overlap)
    return TileGrid(height, width, tile, tuple(ys), tuple(xs))


def grids_for(samples: Sequence[Sample], tile: int, overlap: float) -> list[TileGrid]:
    """Each sample's grid, from the image headers."""
    return [tile_grid(*header_size(s.image), tile, overlap) for s in samples]


def training_grids(samples: Sequence[Sample], tile: int, overlap: float) -> list[TileGrid]:
    """:func:`grids_for` the training images; one smaller than the tile on a side is refused, naming it:
    a model should learn at the scale it will judge."""
    grids = grids_for(samples, tile, overlap)
    for sample, grid in zip(samples, grids, strict=True):
        if grid.height < tile or grid.width < tile:
            raise DataError(
                f"training image '{sample.image}' is {grid.width}x{grid.height} (WxH), smaller than the "
                f"tile ({tile} px): use a smaller --tile, or no tiling"
            )
    return grids


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    top, left, bottom, right = box
    return image[top:bottom, left:right]


class TileDataset(Dataset):
    """Every tile of every sample, image after image, as model inputs.

    Each item is a dict with ``image`` (3, H, W) float32 (the tile resized to ``image_size``),
    ``sample`` (index into ``samples``) and ``tile`` (index into that sample's grid). Consecutive items
    share an image, so the last decoded image is kept: each file is decoded once per pass (per loader
    worker, which reads consecutive items too).
    """

    def __init__(
        self, samples: Sequence[Sample], grids: Sequence[TileGrid], image_size: int | tuple[int, int]
    ) -> None:
        self.samples, self.grids, self.image_size = list(samples), list(grids), image_size
        self.items = [(i, j) for i, grid in enumerate(self.grids) for j in range(len(grid))]
        self._boxes = [grid.boxes() for grid in self.grids]
        self._last: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        i, j = self.items[index]
        if self._last is None or self._last[0] != i:
            image = read_image(self.samples[i].image)
            if image.shape[:2] != (self.grids[i].height, self.grids[i].width):
                raise DataError(f"image '{self.samples[i].image}' decodes to a size its header does not say")
            self._last = (i, image)
        tile = to_tensor(crop(self._last[1], self._boxes[i][j]), self.image_size)
        return {"image": tile, "sample": i, "tile": j}


def _ramp(n: int) -> np.ndarray:
    """n weights rising smoothly from near 0 to near 1 (half a Hann window, sampled at pixel centres)."""
    return np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / n) ** 2


def axis_weights(extent: int, index: int, count: int) -> Tensor:
    """The ``index``-th of ``count`` tiles' blending weights along an axis: 1, tapering over half the
    tile at each edge it shares with a neighbour."""
    w = np.ones(extent)
    half = extent // 2
    if index > 0:
        w[:half] = _ramp(half)
    if index < count - 1:
        w[extent - half :] = np.minimum(w[extent - half :], _ramp(half)[::-1])
    return torch.from_numpy(w).float()


def _canvas_offsets(starts: tuple[int, ...], length: int, tile: int, extent: int) -> tuple[int, list[int]]:
    """Canvas side and tile offsets along one axis when a ``tile``-pixel tile's map is ``extent`` cells.

    The canvas has ``round(length * extent / tile)`` cells; the first tile starts at 0 and the last ends
    at the canvas edge exactly, the others at their scaled (rounded) positions.
    """
    if length <= tile:
        return extent, [0] * len(starts)
    side = max(extent, (length * extent + tile // 2) // tile)
    span, room = length - tile, side - extent
    return side, [(s * room + span // 2) // span for s in starts]


class Stitcher:
    """Blends the maps of one image's tiles, given in grid order, into one map of the whole image.

    Each tile's map is weighted by a separable window that falls smoothly (half a Hann window) from 1
    to almost 0 at each edge it shares with a neighbour and stays 1 towards the image border; the
    weighted sum divided by the summed weights moves continuously from tile to tile (no seam).
    ``tile_shape`` is (h, w) of each tile's map (all channels of a map are blended alike). The stitched
    map has one cell per tile-map cell: (``round(H * h / tile)``, ``round(W * w / tile)``) for an
    H x W image; at ``--tile S --image-size S`` with maps at the input size, that is H x W.
    """

    def __init__(self, grid: TileGrid, tile_shape: tuple[int, int]) -> None:
        self.grid, (self.h, self.w) = grid, tile_shape
        self.height, self.oy = _canvas_offsets(grid.ys, grid.height, grid.tile_height, self.h)
        self.width, self.ox = _canvas_offsets(grid.xs, grid.width, grid.tile_width, self.w)
        self.wy = [axis_weights(self.h, i, len(grid.ys)) for i in range(len(grid.ys))]
        self.wx = [axis_weights(self.w, i, len(grid.xs)) for i in range(len(grid.xs))]
        self._sum: Tensor | None = None
        self._weight = torch.zeros(self.height, self.width)
        self.added = 0

    @property
    def done(self) -> bool:
        return self.added == len(self.grid)

    def add(self, maps: Tensor) -> None:
        """The next tile's (C, h, w) maps (or (h, w))."""
        if self.done:
            raise ValueError("every tile of this grid has been added")
        maps = maps.float().cpu()
        row, col = divmod(self.added, len(self.grid.xs))
        weight = self.wy[row][:, None] * self.wx[col][None, :]
        if self._sum is None:
            self._sum = torch.zeros(*maps.shape[:-2], self.height, self.width)
        y, x = self.oy[row], self.ox[col]
        self._sum[..., y : y + self.h, x : x + self.w] += maps * weight
        self._weight[y : y + self.h, x : x + self.w] += weight
        self.added += 1

    def result(self) -> Tensor:
        """The stitched (C, H', W') (or (H', W')) map; needs every tile."""
        if not self.done or self._sum is None:
            raise ValueError(f"{self.added} of {len(self.grid)} tiles added")
        return self._sum / self._weight


def stitch(tile_maps: Tensor, grid: TileGrid) -> Tensor:
    """Stitch (N, [C,] h, w) maps of a grid's N tiles, in grid order, in one call (see :class:`Stitcher`)."""
    stitcher = Stitcher(grid, (int(tile_maps.shape[-2]), int(tile_maps.shape[-1])))
    for maps in tile_maps:
        stitcher.add(maps)
    return stitcher.result()
