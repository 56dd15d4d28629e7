"""Image-score modes, the synthetic defect generator and the label-free score choice (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msflow.config import Config, ModelConfig
from msflow.data.synthetic import AREA_RANGE, KINDS, add_defect, synthetic_set
from msflow.errors import ConfigError
from msflow.model.anomaly_map import AnomalyMapper, image_score, score_map, upsample
from msflow.scoring import MapSettings, parse_score
from msflow.train.score_selection import INCUMBENT, difference_lower_bounds, rank_candidates

SIZE = (8, 12)


def _logps(seed: int = 0, batch: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(batch, 4, 6, generator=g) * 3, -torch.rand(batch, 2, 3, generator=g) * 3]


def _zs(logps: list[torch.Tensor]) -> list[torch.Tensor]:
    """One-channel latents whose log-likelihood maps are ``logps`` (-0.5 * z^2 = logp)."""
    return [torch.sqrt(-2 * m)[:, None] for m in logps]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("official", "official"),
        ("AUTO", "auto"),
        ("logp", "logp:0.03"),
        ("logp:0.010", "logp:0.01"),
        ("add:max", "add:max"),
        ("gmul:1", "gmul:1"),
    ],
)
def test_score_names(value: str, expected: str) -> None:
    assert parse_score(value) == expected


@pytest.mark.parametrize("value", ["best", "logp:0", "logp:2", "mul:x", "sum:0.1"])
def test_bad_score_names(value: str) -> None:
    with pytest.raises(ConfigError, match="score"):
        ModelConfig(score=value)


def test_score_maps_hand_computed() -> None:
    logps = _logps()
    fused = upsample(logps[0], SIZE) + upsample(logps[1], SIZE)
    torch.testing.assert_close(score_map("logp", logps, SIZE), -fused)
    per_image_max = fused.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(score_map("mul", logps, SIZE), 1 - torch.exp(fused - per_image_max))
    ref = torch.tensor(-1.0)
    torch.testing.assert_close(score_map("gmul", logps, SIZE, ref), 1 - torch.exp((fused - ref).clamp(max=0)))
    probs = [torch.exp(m - m.flatten(1).max(1).values[:, None, None]) for m in logps]
    summed = upsample(probs[0], SIZE) + upsample(probs[1], SIZE)
    torch.testing.assert_close(
        score_map("add", logps, SIZE), summed.flatten(1).max(1).values[:, None, None] - summed
    )
    # reductions: "max" is the largest value, a fraction the mean of the int(H * W * f) largest
    torch.testing.assert_close(image_score("logp:max", logps, SIZE), (-fused).flatten(1).max(1).values)
    top = torch.sort((-fused).flatten(1), dim=1, descending=True).values[:, :9]  # int(96 * 0.1) = 9
    torch.testing.assert_close(image_score("logp:0.1", logps, SIZE), top.mean(1))


def test_official_is_the_papers_score_and_other_modes_change_it() -> None:
    logps = _logps()
    official = AnomalyMapper(2, SIZE)
    out = official(_zs(logps))
    torch.testing.assert_close(out.scores, image_score("mul:0.03", logps, SIZE))
    logp = AnomalyMapper(2, SIZE, MapSettings(score="logp:0.03"))(_zs(logps))
    torch.testing.assert_close(logp.pixel_map, out.pixel_map)  # the maps do not depend on the score
    assert not torch.allclose(logp.scores, out.scores)


def test_raw_log_likelihood_flags_a_uniformly_unlikely_image_the_official_score_does_not() -> None:
    logps = _logps(batch=1)
    shifted = [m - 4.0 for m in logps]  # the same image, less likely everywhere
    both = [torch.cat([a, b]) for a, b in zip(logps, shifted, strict=True)]
    official = AnomalyMapper(2, SIZE)(_zs(both)).scores
    raw = AnomalyMapper(2, SIZE, MapSettings(score="logp:0.03"))(_zs(both)).scores
    torch.testing.assert_close(official[0], official[1])  # per-image normalisation cancels the shift
    assert raw[1] > raw[0] + 7  # two scales, each 4 nats less likely


def test_a_small_defect_is_not_averaged_away_by_a_small_fraction() -> None:
    good = [torch.full((2, 16, 16), -1.0), torch.full((2, 8, 8), -1.0)]
    good[0][1, 5, 5] = -30.0  # one unlikely cell: ~0.4 % of the image
    score_small = image_score("logp:0.001", good, (64, 64))
    score_paper = image_score("logp:0.03", good, (64, 64))
    assert score_small[1] - score_small[0] > 2 * (score_paper[1] - score_paper[0])


def test_old_runs_without_a_score_load_as_official(tmp_path: Path) -> None:
    from msflow.model.checkpoint import load_model, save_model
    from msflow.model.msflow import MSFlow

    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64, "score": "logp"}
    )
    save_model(MSFlow(cfg.model), cfg, tmp_path / "model", threshold={})
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["config"]["model"]["score"]  # as written before scores were configurable
    (tmp_path / "model.json").write_text(json.dumps(meta))
    model, loaded, _ = load_model(tmp_path / "model")
    assert loaded.model.score == "official" and model.anomaly.score == "official"


# -- synthetic defects ----------------------------------------------------------------------------
def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 15, (24, 48, 3)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(base).resize((192, 96), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_around_its_mask(kind: str) -> None:
    image = _image()
    out, mask = add_defect(image, np.random.default_rng(3), kind)
    assert out.size == image.size and mask.shape == (96, 192) and mask.dtype == bool
    area = mask.mean()
    assert 0.2 * AREA_RANGE[0] < area < 2 * AREA_RANGE[1]
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(image, np.int16)).max(axis=2)
    assert diff[mask].mean() > 5  # visibly changed inside
    near = np.zeros_like(mask)  # the mask grown by the blend's few pixels
    ys, xs = np.nonzero(mask)
    near[max(0, ys.min() - 4) : ys.max() + 5, max(0, xs.min() - 4) : xs.max() + 5] = True
    assert diff[~near].max() <= 1  # untouched elsewhere (rounding only)


def test_synthetic_set_is_reproducible_and_varied() -> None:
    images = [_image(0), _image(1)]
    a, b = synthetic_set(images, 3, seed=7), synthetic_set(images, 3, seed=7)
    c = synthetic_set(images, 3, seed=8)
    assert len(a) == 6
    assert all(
        np.array_equal(x[1], y[1]) and np.array_equal(np.asarray(x[0]), np.asarray(y[0]))
        for x, y in zip(a, b, strict=True)
    )
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))
    with pytest.raises(ValueError, match="kind"):
        add_defect(images[0], np.random.default_rng(0), "dent")


def test_rank_candidates_is_the_auroc_of_good_vs_defective() -> None:
    good = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([0.5, 0.2, 0.3])}
    bad = {"a": np.array([0.4, 0.5]), "b": np.array([0.4, 0.1])}
    ranks = rank_candidates(good, bad)
    assert ranks["a"] == 100.0
    assert ranks["b"] == pytest.approx(100 * 2 / 6, abs=1e-3)  # 2 of the 6 pairs ordered right


def test_auto_score_and_maps_without_two_good_images_fall_back_to_where_they_start(tmp_path) -> None:
    from fake_data import make_fake_category

    from msflow.config import Config, load_yaml
    from msflow.train.fit import fit

    data = make_fake_category(tmp_path / "one", n_train=1)
    cfg = Config().updated(
        model={
            "backbone": "resnet18",
            "pretrained": False,
            "image_size": 64,
            "score": "auto",
            "smoothing": "auto",
        },
        data={"dataset": str(data)},
        train={"epochs": 1, "batch_size": 4},
    )
    lines: list[str] = []
    fit(cfg, tmp_path / "run", progress=False, log=lines.append)
    saved = load_yaml(tmp_path / "run" / "config.yaml").model
    assert (saved.score, saved.normalization, saved.smoothing) == ("logp:0.03", "per_image", 0.0)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["config"]["model"]["smoothing"] == 0.0
    assert any("needs at least 2 good images" in line for line in lines)
    assert not (tmp_path / "run" / "map_selection.json").exists()


def _scores(rng: np.random.Generator, n: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """n good scores and 2 defective copies of each, the copies ``separation`` higher on average."""
    good = rng.normal(size=n)
    return good, np.repeat(good, 2) + separation + rng.normal(size=2 * n)


def test_bootstrap_at_unit_weights_is_the_auroc_and_equal_scores_never_win() -> None:
    rng = np.random.default_rng(0)
    g, b = _scores(rng, 30, 0.5)
    good, bad = {INCUMBENT: g, "same": g.copy()}, {INCUMBENT: b, "same": b.copy()}
    lower = difference_lower_bounds(good, bad, INCUMBENT, rounds=200)
    assert lower == {INCUMBENT: 0.0, "same": 0.0}  # identical scores: zero difference in every draw
    # The cluster weights with every count 1 give the plain AUROC (the matrix form of rank_candidates).
    from msflow.evaluate.metrics import pair_wins

    auroc = 100 * pair_wins(g, b).mean()
    assert auroc == pytest.approx(rank_candidates({"x": g}, {"x": b})["x"], abs=1e-3)


def test_a_clear_winner_beats_the_incumbent_and_a_lucky_one_does_not() -> None:
    rng = np.random.default_rng(1)
    g0, b0 = _scores(rng, 40, 0.0)  # the incumbent near chance
    g1, b1 = _scores(rng, 40, 3.0)  # a candidate that separates well
    lower = difference_lower_bounds({INCUMBENT: g0, "clear": g1}, {INCUMBENT: b0, "clear": b1}, INCUMBENT)
    assert lower["clear"] > 0
    # Seven good images, and a candidate that orders two more of the 98 pairs right: within the noise.
    g = np.arange(7.0)
    b = np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5, 11.5, 12.5, 13.5])
    lucky = b.copy()
    lucky[[0, 2]] += 1.0  # 0.5 -> 1.5 and 2.5 -> 3.5: each now above one more good image
    aurocs = rank_candidates({INCUMBENT: g, "lucky": g}, {INCUMBENT: b, "lucky": lucky})
    assert aurocs["lucky"] > aurocs[INCUMBENT]
    lower = difference_lower_bounds({INCUMBENT: g, "lucky": g}, {INCUMBENT: b, "lucky": lucky}, INCUMBENT)
    assert lower["lucky"] <= 0
    with pytest.raises(ValueError, match="2 defective copies"):
        difference_lower_bounds({INCUMBENT: g}, {INCUMBENT: b[:5]}, INCUMBENT)


def test_a_large_check_is_bounded_on_a_subset_and_still_finds_a_clear_winner(monkeypatch) -> None:
    from msflow.evaluate import metrics
    from msflow.train import synthetic_check as ss

    shapes = []
    pair_wins = metrics.pair_wins
    monkeypatch.setattr(metrics, "pair_wins", lambda g, b: shapes.append((len(b), len(g))) or pair_wins(g, b))
    rng = np.random.default_rng(2)
    n = ss.BOOTSTRAP_MAX_IMAGES + 300
    g0, b0 = _scores(rng, n, 0.2)
    g1, b1 = _scores(rng, n, 1.0)
    good, bad = {INCUMBENT: g0, "clear": g1}, {INCUMBENT: b0, "clear": b1}
    lower = difference_lower_bounds(good, bad, INCUMBENT, rounds=300)
    assert lower["clear"] > 0
    assert set(shapes) == {(2 * ss.BOOTSTRAP_MAX_IMAGES, ss.BOOTSTRAP_MAX_IMAGES)}  # the seeded subset


# -- the rule: keep the incumbent unless beaten by a gain that matters (issue 20 point 1) -----------
def test_a_gain_beyond_the_noise_but_below_the_minimum_effect_keeps_the_incumbent() -> None:
    from msflow.train.synthetic_check import MIN_EFFECT, keep_unless_beaten

    rng = np.random.default_rng(0)
    g = rng.normal(size=200)
    b = rng.normal(size=400) + 1.5
    for shift, switches in ((0.03, False), (0.13, True)):  # every pair's order kept or improved
        good, bad = {INCUMBENT: g, "other": g}, {INCUMBENT: b, "other": b + shift}
        aurocs = rank_candidates(good, bad)
        lower = difference_lower_bounds(good, bad, INCUMBENT, rounds=1000)
        gain = aurocs["other"] - aurocs[INCUMBENT]
        assert lower["other"] > 0  # not noise in either case
        assert (gain >= MIN_EFFECT) is switches and (0.3 < gain < 0.8 or 1.5 < gain < 2.5)
        assert keep_unless_beaten(aurocs, lower, INCUMBENT) == ("other" if switches else INCUMBENT)
    # the rule alone, on hand-set numbers: a bound above zero is needed too
    assert keep_unless_beaten({"a": 90.0, "b": 95.0}, {"a": 0.0, "b": -0.1}, "a") == "a"
    assert keep_unless_beaten({"a": 90.0, "b": 95.0, "c": 93.0}, {"a": 0, "b": 0.1, "c": 2}, "a") == "b"


def test_map_settings_resolve_auto_to_the_incumbents_only_there() -> None:
    from msflow.scoring import MAPS_INCUMBENT, SCORE_INCUMBENT

    asked = MapSettings("auto", "auto", "auto")
    assert asked.resolved() == MapSettings(*MAPS_INCUMBENT, SCORE_INCUMBENT)
    assert MapSettings("global", 2, "official").resolved() == MapSettings("global", 2.0, "official")
    assert MapSettings("global", 0, "official", top_k=0.05).score_name() == "gmul:0.05"
    assert MapSettings().score_name("logp:max@4") == "logp:max@4"
    # an unresolved mapper scores with the incumbent score
    logps = _logps()
    out = AnomalyMapper(2, SIZE, asked)(_zs(logps))
    torch.testing.assert_close(out.scores, image_score(SCORE_INCUMBENT, logps, SIZE, area=96))
    with pytest.raises(ConfigError, match="normalization"):
        MapSettings("best")


def test_with_settings_makes_a_new_mapper_and_leaves_the_old_one() -> None:
    mapper = AnomalyMapper(2, SIZE)
    mapper.ref_mul.fill_(-1.0)
    other = mapper.with_settings(MapSettings("global", 1.0, "logp:max"))
    assert (mapper.normalization, mapper.smoothing, mapper.score) == ("per_image", 0.0, "official")
    assert (other.normalization, other.smoothing, other.score) == ("global", 1.0, "logp:max")
    assert float(other.ref_mul) == -1.0  # the calibrated references are shared
    with pytest.raises(AttributeError):
        mapper.score = "logp:max"  # type: ignore[misc]  # no in-place edits


# -- scores built on the maps (issue 20 point 2) -----------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [("logp:max@4", "logp:max@4"), ("LOGP:0.010@2.0", "logp:0.01@2"), ("scales", "scales:0.03")],
)
def test_map_score_names(value: str, expected: str) -> None:
    assert parse_score(value) == expected


@pytest.mark.parametrize("value", ["logp:max@-1", "logp:max@x", "logp:max@100", "scale:max"])
def test_bad_map_score_names(value: str) -> None:
    with pytest.raises(ConfigError, match="score"):
        ModelConfig(score=value)


def test_per_scale_scores_hand_computed() -> None:
    # two scales at the map's own size (no interpolation): -1 everywhere, one extreme cell each
    s0, s1 = torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), -1.0)
    s0[0, 0, 0], s1[0, 3, 3] = -5.0, -6.0
    logps = [s0, s1]
    assert float(image_score("logp:max", logps, (4, 4))) == 7.0  # max of 5 + 1 and 1 + 6
    assert float(image_score("scales:max", logps, (4, 4))) == 11.0  # 5 + 6: each scale's own maximum
    assert float(image_score("scales:0.125", logps, (4, 4))) == 6.5  # k = 2: (5 + 1) / 2 + (6 + 1) / 2


def test_a_blurred_map_maximum_is_the_maximum_of_scipys_filter() -> None:
    from scipy.ndimage import gaussian_filter

    logps = _logps(batch=2)
    fused = (upsample(logps[0], SIZE) + upsample(logps[1], SIZE)).double().numpy()
    for b in range(2):
        expected = gaussian_filter(-fused[b], 1.5, mode="nearest", truncate=4.0).max()
        got = image_score("logp:max@1.5", logps, SIZE)[b]
        assert float(got) == pytest.approx(expected, abs=1e-5)
    # its own blur replaces the run's smoothing; without one the run's smoothing is used
    torch.testing.assert_close(
        image_score("logp:max@1.5", logps, SIZE, smoothing=4.0),
        image_score("logp:max", logps, SIZE, smoothing=1.5),
    )
    assert not torch.allclose(
        image_score("logp:max@0", logps, SIZE), image_score("logp:max@1.5", logps, SIZE)
    )


def test_a_small_defect_stands_out_of_a_blurred_maximum_where_noise_does_not() -> None:
    # Good image: isolated one-pixel noise peaks. Defective: a 5 x 5 patch, each pixel less extreme.
    g = torch.Generator().manual_seed(0)
    base = -0.5 - 0.1 * torch.rand(2, 32, 32, generator=g)
    base[0, 4, 4], base[0, 20, 25] = -4.0, -4.0  # noise
    base[1, 10:15, 10:15] -= 1.5  # the defect
    logps = [base]
    raw = image_score("logp:max", logps, (32, 32))
    blurred = image_score("logp:max@2", logps, (32, 32))
    assert raw[0] > raw[1]  # the raw maximum prefers the noise
    assert blurred[1] > blurred[0]  # the blurred maximum (PaDiM's verdict) the defect


def test_the_default_map_choice_never_blurs() -> None:
    """By default train may switch the normalisation on the check, never the blur: on real thin cracks
    and tiny pits blur lost points that the synthetic check rated as gains (docs/results.md)."""
    from msflow.config import Config
    from msflow.scoring import map_candidates

    model = Config().model
    assert model.normalization == "auto" and model.smoothing == 0.0
    assert map_candidates(model.normalization, model.smoothing) == [("per_image", 0.0), ("global", 0.0)]
    assert len(map_candidates("auto", "auto")) == 8  # the full choice stays there for who asks for it
