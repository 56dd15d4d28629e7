"""Tiles for large images: the grid, the seamless stitch, and train -> predict through the CLI with tiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import _texture, make_fake_category
from PIL import Image

from msflow.cli import main
from msflow.config import Config, ConfigError, ModelConfig, load_yaml, save_yaml
from msflow.data.datasets import Sample
from msflow.data.tiles import Stitcher, axis_starts, stitch, tile_grid
from msflow.evaluate import report
from msflow.evaluate.metrics import pixel_auroc

# -- geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [31, 64, 65, 100, 127, 128, 500, 1201])
@pytest.mark.parametrize("tile", [32, 64, 100])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.89])
def test_tiles_cover_every_pixel_with_the_requested_overlap(length: int, tile: int, overlap: float) -> None:
    starts = axis_starts(length, tile, overlap)
    extent = min(tile, length)
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + extent] += 1
    assert covered.min() >= 1  # every pixel, the edges included
    assert starts[0] == 0 and starts[-1] + extent == length  # the last tile ends at the edge, inside
    assert starts == sorted(set(starts))
    need = math.ceil(overlap * tile)
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= need  # neighbours overlap at least as asked
    if len(starts) > 1:  # and no more tiles than needed: one fewer cannot reach the edge
        assert (len(starts) - 2) * (tile - need) < length - tile


def test_grid_boxes_cover_a_rectangle_and_clip_a_short_side() -> None:
    grid = tile_grid(50, 300, 64, 0.25)  # shorter than a tile vertically: one row spanning it
    assert grid.ys == (0,) and grid.tile_height == 50
    seen = np.zeros((50, 300), int)
    for top, left, bottom, right in grid.boxes():
        assert bottom - top == 50 and right - left == 64
        seen[top:bottom, left:right] += 1
    assert seen.min() >= 1 and len(grid) == len(grid.xs)


# -- stitching --------------------------------------------------------------------------------------


def _crops(big: torch.Tensor, grid) -> torch.Tensor:
    return torch.stack([big[..., top:bottom, left:right] for top, left, bottom, right in grid.boxes()])


@pytest.mark.parametrize("tile_shape", [None, (40, 40), (150, 150)])  # None: maps at tile resolution
def test_a_constant_stitches_to_that_constant(tile_shape: tuple[int, int] | None) -> None:
    grid = tile_grid(230, 410, 100, 0.3)
    shape = tile_shape or (100, 100)
    out = stitch(torch.full((len(grid), 3, *shape), 2.5), grid)
    assert out.shape[0] == 3
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_crops_of_a_smooth_map_stitch_back_to_it(overlap: float) -> None:
    y, x = torch.meshgrid(torch.arange(230.0), torch.arange(410.0), indexing="ij")
    big = torch.stack([torch.sin(y / 17) * torch.cos(x / 23), (y - x) / 100])
    grid = tile_grid(230, 410, 96, overlap)
    torch.testing.assert_close(stitch(_crops(big, grid), grid), big, atol=1e-5, rtol=1e-5)


def test_maps_at_model_resolution_stitch_to_the_scaled_image() -> None:
    """Tiles of 128 px whose maps are 64 x 64 (the tile resized to a 64 px input): the stitched map is
    the image at half resolution, each tile's map at its place (within one cell of rounding)."""
    y, x = torch.meshgrid(torch.arange(150.0), torch.arange(250.0), indexing="ij")
    big = torch.sin(y / 11) + torch.cos(x / 13)  # at half resolution
    grid = tile_grid(300, 500, 128, 0.25)
    stitcher = Stitcher(grid, (64, 64))
    assert (stitcher.height, stitcher.width) == (150, 250)
    for (top, left, _, _), oy, ox in zip(
        grid.boxes(),
        [o for o in stitcher.oy for _ in stitcher.ox],
        stitcher.ox * len(stitcher.oy),
        strict=True,
    ):
        assert abs(oy - top / 2) <= 0.5 and abs(ox - left / 2) <= 0.5
        stitcher.add(big[oy : oy + 64, ox : ox + 64])
    torch.testing.assert_close(stitcher.result(), big, atol=1e-5, rtol=1e-5)


def test_tiles_that_disagree_meet_without_a_seam() -> None:
    """Each tile sees the map plus its own offset (as two tiles of one image never agree exactly): with
    overlap the stitch moves between them gradually; without, it jumps (the check can fail)."""

    def largest_step(overlap: float) -> float:
        grid = tile_grid(192, 192, 64, overlap)  # without overlap: tiles at 0, 64, 128
        tiles = torch.stack([torch.full((64, 64), float(i % 2)) for i in range(len(grid))])
        out = stitch(tiles, grid)
        return max(out.diff(dim=0).abs().max().item(), out.diff(dim=1).abs().max().item())

    assert largest_step(0.0) == pytest.approx(1.0)  # a mosaic: seams
    assert largest_step(0.25) < 0.15  # 16 px of overlap: at most ~1/10 of the jump per pixel
    assert largest_step(0.5) < 0.06


# -- config -----------------------------------------------------------------------------------------


def test_tiling_round_trips_through_the_config(tmp_path: Path) -> None:
    cfg = Config().updated(model={"tile": 256, "tile_overlap": 0.4, "image_size": 256})
    assert Config.from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    loaded = load_yaml(tmp_path / "c.yaml")
    assert (loaded.model.tile, loaded.model.tile_overlap) == (256, 0.4)
    assert Config().model.tile == 0  # off unless asked


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tile": 16}, "tile must be 0"),
        ({"tile": 64, "tile_overlap": 0.9}, "tile_overlap must be in [0, 0.9)"),
        ({"tile": 64, "tile_overlap": -0.1}, "tile_overlap must be in [0, 0.9)"),
        ({"tile": 64, "image_size": "64x128"}, "tiles are square"),
    ],
)
def test_bad_tiling_values_are_refused(fields: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


# -- feature cache ----------------------------------------------------------------------------------


def test_the_feature_cache_holds_every_tile_and_sizes_itself_by_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msflow.model.msflow import MSFlow
    from msflow.train import features

    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate([(100, 150), (64, 64), (130, 70)]):
        Image.fromarray(_texture(rng, 160)[:h, :w]).save(tmp_path / f"{i}.png")
        samples.append(Sample(tmp_path / f"{i}.png", 0, "good"))
    model = MSFlow(
        ModelConfig(backbone="resnet18", pretrained=False, image_size=32, tile=64, tile_overlap=0.5)
    )
    needs: list[int] = []
    monkeypatch.setattr(features, "cache_location", lambda need, _: needs.append(need) or "memory")
    cache = features.FeatureCache.build(model, samples, torch.device("cpu"), where="auto", progress=False)
    tiles = sum(len(tile_grid(h, w, 64, 0.5)) for h, w in [(100, 150), (64, 64), (130, 70)])
    assert len(cache) == tiles == 3 * 4 + 1 + 4 * 2
    assert needs == [tiles * sum(c * h * w for c, h, w in model.feature_shapes) * 4]
    # each row is one tile's features: the first image's first tile, cut and run alone, gives row 0
    alone = model.standardize(model.extract(_tile_input(tmp_path / "0.png")))
    torch.testing.assert_close(cache.batch(torch.tensor([0]))[0], alone[0], atol=1e-4, rtol=1e-4)


def _tile_input(path: Path) -> torch.Tensor:
    from msflow.data.images import read_image, to_tensor

    return to_tensor(read_image(path)[:64, :64], 32)[None]


# -- end to end -------------------------------------------------------------------------------------

TILE_FLAGS = [
    "--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--tile", "64", "--tile-overlap",
    "0.25", "--epochs", "2", "--score", "logp:0.01", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiles")
    data = make_fake_category(root / "fake", n_train=6, size=160)  # 160 px images, 64 px tiles: 3 x 3
    run = root / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *TILE_FLAGS]) == 0
    return data, run


def test_train_and_predict_with_tiles_through_the_cli(tiled: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = tiled
    cfg = load_yaml(run / "config.yaml")
    assert (cfg.model.tile, cfg.model.tile_overlap) == (64, 0.25)  # saved with the run
    meta = json.loads((run / "model.json").read_text())
    assert meta["training"]["training_tiles"] == 5 * 9  # 6 images, one held out, 3 x 3 tiles each
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 90 and metrics["pixel_auroc"] >= 90  # bright squares on noise
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--input", str(data / "test"), "--output", str(out)]) == 0
    rows = list(report.read_rows(out / "predictions.csv"))
    assert len(rows) == 6
    assert np.asarray(Image.open(next(out.glob("*_map.png")))).shape == (160, 160)  # the whole image
    # msflow test runs the same tiled path and finds the training evaluation's figures again
    again = tmp_path / "again"
    assert main(["test", "--model", str(run), "--data", str(data), "--output", str(again), "--quiet"]) == 0
    retest = json.loads((again / "metrics.json").read_text())
    assert retest["image_auroc"] == pytest.approx(metrics["image_auroc"])
    # The same maps up to float rounding: training's evaluation and `msflow test` batch the tiles
    # differently, and oneDNN's convolutions round differently per batch shape (seen: 8e-4 points).
    assert retest["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-2)


def test_one_tile_is_the_untiled_model(tiled: tuple[Path, Path]) -> None:
    """An image exactly one tile large: stitching is the identity, so scores and maps are the model's."""
    from msflow.infer.predictor import Predictor
    from msflow.model.anomaly_map import upsample

    _, run = tiled
    predictor = Predictor.load(run, device="cpu")
    image = _texture(np.random.default_rng(3), 64).astype(np.float32) / 255
    tiled_pred = predictor.predict_images([image])[0]
    stitched = predictor.log_likelihoods([image])[0]
    predictor.config = predictor.config.updated(model={"tile": 0})
    plain = predictor.predict_images([image])[0]
    for one_tile, own in zip(stitched, predictor.log_likelihoods([image])[0], strict=True):
        assert own.shape[0] == 1 and one_tile.shape[-2:] == (64, 64)  # stitched at the input size
        torch.testing.assert_close(one_tile, upsample(own, (64, 64)), atol=1e-4, rtol=1e-4)
    assert tiled_pred.score == pytest.approx(plain.score, rel=1e-5)
    np.testing.assert_allclose(tiled_pred.image_map, plain.image_map, atol=1e-5)
    # the "add" map exponentiates the maps after their resize to the input size (they are stitched
    # there), the untiled model before it: the same map to within a small fraction of its range [0, 3]
    np.testing.assert_allclose(tiled_pred.anomaly_map, plain.anomaly_map, atol=2e-3)
    assert not np.allclose(tiled_pred.anomaly_map, 0)


def test_a_score_fraction_is_of_one_tile_however_large_the_image(tiled: tuple[Path, Path]) -> None:
    """A defect in one of 3 x 3 tiles (no overlap): the default logp:0.01 averages 1 % of ONE tile's
    pixels (40 at 64 px) of the stitched map, so the image scores as the defective tile alone does. A
    fraction of the whole image (368 pixels) would average the 144 defect pixels with normal ones."""
    from msflow.infer.predictor import Predictor

    _, run = tiled
    predictor = Predictor.load(run, device="cpu")
    assert predictor.config.model.score == "logp:0.01"
    predictor.config = predictor.config.updated(model={"tile_overlap": 0.0})  # tiles at 0, 64, 128
    rng = np.random.default_rng(6)
    mosaic = np.concatenate([np.concatenate([_texture(rng, 64) for _ in range(3)], 1) for _ in range(3)], 0)
    mosaic[64 + 20 : 64 + 32, 128 + 30 : 128 + 42] = 255  # 144 px in the middle row's last tile
    tiled_score = predictor.predict_images([mosaic.astype(np.float32) / 255])[0].score
    predictor.config = predictor.config.updated(model={"tile": 0})
    alone = predictor.predict_images([mosaic[64:128, 128:192].astype(np.float32) / 255])[0].score
    assert tiled_score == pytest.approx(alone, rel=1e-4)


def test_an_image_smaller_than_a_tile_is_one_tile_spanning_it(tiled: tuple[Path, Path]) -> None:
    from msflow.infer.predictor import Predictor

    _, run = tiled
    predictor = Predictor.load(run, device="cpu")
    image = _texture(np.random.default_rng(4), 160)[:40, :150].astype(np.float32) / 255  # 40 px < 64
    pred = predictor.predict_images([image])[0]
    assert pred.anomaly_map.shape == (40, 150) and np.isfinite(pred.score)


def test_a_defect_across_a_tile_border_is_found(tiled: tuple[Path, Path]) -> None:
    from msflow.infer.predictor import Predictor

    _, run = tiled
    predictor = Predictor.load(run, device="cpu")
    grid = tile_grid(160, 160, 64, 0.25)
    assert 64 in [x + 64 for x in grid.xs] and 48 in grid.xs  # a tile ends at 64, another starts at 48
    image = _texture(np.random.default_rng(5), 160)
    image[58:70, 40:70] = 255  # straddles x = 48 and x = 64, both tile borders
    mask = np.zeros((160, 160), bool)
    mask[58:70, 40:70] = True
    pred = predictor.predict_images([image.astype(np.float32) / 255])[0]
    assert pred.anomaly_map.shape == (160, 160)
    assert pixel_auroc(mask[None], pred.anomaly_map[None]) > 95
    peak = np.unravel_index(np.argmax(pred.anomaly_map), mask.shape)
    assert 50 <= peak[0] <= 78 and 32 <= peak[1] <= 78  # the peak lies on the defect (+- 8 px)


def test_onnx_runtime_refuses_a_tiled_model_in_one_line(
    tiled: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = tiled
    assert main(["export", "--model", str(run)]) == 0  # the graph scores one tile; it can be exported
    argv = ["predict", "--model", str(run), "--input", str(data / "test"), "--output", str(tmp_path / "o")]
    assert main([*argv, "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "tiles of 64 px" in err and "--runtime torch" in err and len(err.strip().splitlines()) == 1
    assert main(argv) == 0  # the default, --runtime auto, stitches with torch
    assert "runtime" not in capsys.readouterr().err  # nothing measured: torch is the only candidate


def test_training_images_smaller_than_the_tile_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_fake_category(tmp_path / "fake", n_train=4, size=48)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *TILE_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "000.png" in err and "smaller than the tile (64 px)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0.9", "-0.1"])
def test_a_bad_overlap_on_the_command_line_is_one_line(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", str(tmp_path), "--output", str(tmp_path / "r"), "--tile", "64"]
    assert main([*argv, "--tile-overlap", value]) == 2
    err = capsys.readouterr().err
    assert "tile_overlap must be in [0, 0.9)" in err and len(err.strip().splitlines()) == 1
