"""Anomaly maps and image scores from latents (B15, B16 of docs/official-code-differences.md); by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msflow.model.anomaly_map import AnomalyMapper, log_likelihood_maps, top_k_score, upsample
from msflow.scoring import MapSettings

# exp(-x) for the x that occur in the toy below, written out.
E_05, E_1, E_15, E_2 = 0.6065306597126334, 0.36787944117144233, 0.22313016014842982, 0.1353352832366127


def two_scale_toy() -> list[torch.Tensor]:
    """Two 2x2 scales, one image.

    scale 1 (2 channels): ch0 = [[0, 1], [2, 0]], ch1 = [[0, 1], [0, 2]]
        mean_c z^2 = [[0, 1], [2, 2]]          -> logp1 = [[0, -0.5], [-1, -1]]
    scale 2 (1 channel):  z = [[2, 0], [0, 0]] -> logp2 = [[-2, 0], [0, 0]]
    """
    z1 = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 2.0]]])[None]
    z2 = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])[None]
    return [z1, z2]


def test_log_likelihood_maps_use_the_channel_mean() -> None:
    logp1, logp2 = log_likelihood_maps(two_scale_toy())
    torch.testing.assert_close(logp1, torch.tensor([[[0.0, -0.5], [-1.0, -1.0]]]))
    torch.testing.assert_close(logp2, torch.tensor([[[-2.0, 0.0], [0.0, 0.0]]]))


@pytest.mark.usefixtures("float64")
def test_add_and_mul_maps_per_image_hand_computed() -> None:
    # Image 1 is image 0 with mean_c z^2 raised by 2 everywhere (z -> sqrt(z^2 + 2)): every logp_s is
    # 1 lower. Per-image normalisation uses each image's own maximum, so both get the same maps.
    toy = two_scale_toy()
    zs = [torch.cat([z, torch.sqrt(z.pow(2) + 2.0)]) for z in toy]
    out = AnomalyMapper(2, (2, 2), MapSettings(top_k=0.5, normalization="per_image"))(zs)
    # mul: L = logp1 + logp2 = [[-2, -0.5], [-1, -1]]; max -0.5; A_mul = 1 - exp(L + 0.5)
    #    = [[1 - e^-1.5, 0], [1 - e^-0.5, 1 - e^-0.5]]
    expected_mul = torch.tensor([[1 - E_15, 0.0], [1 - E_05, 1 - E_05]])
    # add: P1 = exp(logp1 - 0) = [[1, e^-.5], [e^-1, e^-1]], P2 = exp(logp2 - 0) = [[e^-2, 1], [1, 1]]
    #    S = [[1 + e^-2, 1 + e^-.5], [1 + e^-1, 1 + e^-1]], max S = 1 + e^-.5, A_add = max S - S
    expected_add = torch.tensor([[E_05 - E_2, 0.0], [E_05 - E_1, E_05 - E_1]])
    torch.testing.assert_close(out.image_map, expected_mul.expand(2, 2, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.pixel_map, expected_add.expand(2, 2, 2), rtol=0, atol=1e-12)
    # score: k = int(4 * 0.5) = 2 largest of A_mul: 1 - e^-1.5 and 1 - e^-0.5
    score = ((1 - E_15) + (1 - E_05)) / 2
    torch.testing.assert_close(out.scores, torch.tensor([score, score]), rtol=0, atol=1e-12)


@pytest.mark.usefixtures("float64")
def test_add_and_mul_maps_global_hand_computed() -> None:
    mapper = AnomalyMapper(2, (2, 2), MapSettings(top_k=0.5, normalization="global"))
    mapper.calibrate([log_likelihood_maps(two_scale_toy())])  # refs: max L = -0.5, max logp_s = (0, 0)
    torch.testing.assert_close(mapper.ref_mul, torch.tensor(-0.5))
    torch.testing.assert_close(mapper.ref_add, torch.tensor([0.0, 0.0]))
    out = mapper(two_scale_toy())
    # mul as per image here (the reference equals the image's own max)
    expected_mul = torch.tensor([[[1 - E_15, 0.0], [1 - E_05, 1 - E_05]]])
    # add: A_add = n_scales - S = 2 - S = [[1 - e^-2, 1 - e^-.5], [1 - e^-1, 1 - e^-1]]
    expected_add = torch.tensor([[[1 - E_2, 1 - E_05], [1 - E_1, 1 - E_1]]])
    torch.testing.assert_close(out.image_map, expected_mul, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.pixel_map, expected_add, rtol=0, atol=1e-12)


def test_upsampling_is_bilinear_with_aligned_corners() -> None:
    maps = torch.tensor([[[0.0, 3.0], [0.0, 3.0]]])
    # align_corners=True puts the output columns at 0, 1/3, 2/3, 1 of the input: 0, 1, 2, 3.
    # (align_corners=False would give 0, 0.75, 2.25, 3.)
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4, 4)[None]
    torch.testing.assert_close(upsample(maps, (4, 4)), expected)


def test_top_k_score_matches_a_manual_sorted_mean() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 10, 10))
    # k = max(1, int(100 * top_k)): truncation, not rounding (0.035 -> 3) and at least one (0.001 -> 1)
    for top_k, k in [(0.03, 3), (0.035, 3), (0.1, 10), (0.001, 1), (1.0, 100)]:
        expected = [np.sort(m.ravel())[::-1][:k].mean() for m in maps]
        got = top_k_score(torch.from_numpy(maps), top_k)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalization", ["per_image", "global"])
def test_output_size_equals_image_size(normalization: str) -> None:
    mapper = AnomalyMapper(3, (48, 64), MapSettings(normalization=normalization))
    zs = [torch.randn(2, 4, 6, 8), torch.randn(2, 6, 3, 4), torch.randn(2, 8, 2, 2)]
    out = mapper(zs)
    assert out.scores.shape == (2,)
    assert out.image_map.shape == (2, 48, 64) and out.pixel_map.shape == (2, 48, 64)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("normalization", ["per_image", "global"])
def test_an_outlier_feature_vector_is_the_maximum_of_both_maps(normalization: str) -> None:
    channels, sizes = [3, 5, 7], [8, 4, 2]

    def background(batch: int) -> list[torch.Tensor]:
        return [0.01 * torch.randn(batch, c, s, s) for c, s in zip(channels, sizes, strict=True)]

    mapper = AnomalyMapper(3, (64, 64), MapSettings(top_k=0.03, normalization=normalization))
    mapper.calibrate([log_likelihood_maps(background(4))])
    clean = background(1)
    zs = [z.clone() for z in clean]
    zs[1][0, :, 1, 2] = 5.0  # the outlier: scale 2 (4 x 4), row 1, column 2
    out = mapper(zs)
    # align_corners=True maps input node (1, 2) of a 4 x 4 grid onto pixel (21, 42) of 64 x 64: 63 / 3 = 21.
    for anomaly_map in (out.image_map[0], out.pixel_map[0]):
        row, col = divmod(int(anomaly_map.argmax()), 64)
        assert (row, col) == (21, 42)
    assert out.scores[0] > mapper(clean).scores[0] + 0.1


@pytest.mark.usefixtures("float64")
def test_global_normalisation_flags_a_uniformly_off_image_per_image_does_not() -> None:
    """Spec 6 design note / B15: per-image normalisation cannot see an image that is off everywhere.

    The "off" image has mean_c z^2 raised by exactly 2 at every position of every scale (each z is
    replaced by sign(z) sqrt(z^2 + 2)), so each logp_s drops by exactly 1 everywhere and their sum by 3.
    Per-image normalisation subtracts the image's own maximum, which removes that shift: maps and
    scores are identical to the normal image's. Global normalisation compares against the training
    reference, so the off image scores far higher.
    """
    channels, sizes = [3, 5, 7], [8, 4, 2]

    def normal(batch: int) -> list[torch.Tensor]:
        return [0.5 * torch.randn(batch, c, s, s) for c, s in zip(channels, sizes, strict=True)]

    train, test = normal(8), normal(1)
    off = [torch.sign(z) * torch.sqrt(z.pow(2) + 2.0) for z in test]
    per_image = AnomalyMapper(3, (32, 32), MapSettings(normalization="per_image"))
    glob = AnomalyMapper(3, (32, 32), MapSettings(normalization="global"))
    glob.calibrate([log_likelihood_maps(train)])

    normal_pi, off_pi = per_image(test), per_image(off)
    torch.testing.assert_close(off_pi.scores, normal_pi.scores, rtol=0, atol=1e-12)
    torch.testing.assert_close(off_pi.image_map, normal_pi.image_map, rtol=0, atol=1e-12)
    torch.testing.assert_close(off_pi.pixel_map, normal_pi.pixel_map, rtol=0, atol=1e-12)

    normal_gl, off_gl = glob(test), glob(off)
    assert off_gl.scores[0] > normal_gl.scores[0] + 0.3
    assert off_gl.pixel_map.mean() > normal_gl.pixel_map.mean() + 0.3


# -- smoothing (ours) --------------------------------------------------------------------------
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.0])
def test_gaussian_smooth_is_scipys_nearest_mode_filter(sigma: float) -> None:
    from scipy.ndimage import gaussian_filter

    from msflow.model.anomaly_map import gaussian_smooth

    maps = torch.rand(2, 23, 41)  # non-square, smaller than the kernel at sigma 4 (radius 16)
    ours = gaussian_smooth(maps, sigma)
    for b in range(2):
        reference = gaussian_filter(maps[b].numpy(), sigma, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(ours[b].numpy(), reference, rtol=0, atol=1e-12)
    assert gaussian_smooth(maps, 0.0) is maps


def test_smoothing_blurs_both_maps_and_the_score_reads_the_blurred_map() -> None:
    from msflow.model.anomaly_map import gaussian_smooth, image_score

    torch.manual_seed(0)
    zs = [torch.randn(2, 4, 12, 20), torch.randn(2, 4, 6, 10)]
    plain = AnomalyMapper(2, (24, 40), MapSettings(top_k=0.03, normalization="per_image"))(zs)
    smooth = AnomalyMapper(2, (24, 40), MapSettings(top_k=0.03, normalization="per_image", smoothing=2.0))(zs)
    torch.testing.assert_close(smooth.pixel_map, gaussian_smooth(plain.pixel_map, 2.0))
    torch.testing.assert_close(smooth.image_map, gaussian_smooth(plain.image_map, 2.0))
    torch.testing.assert_close(smooth.scores, top_k_score(smooth.image_map, 0.03))  # "official"
    assert not torch.allclose(smooth.scores, plain.scores)
    logps = log_likelihood_maps(zs)
    mapper = AnomalyMapper(2, (24, 40), MapSettings(score="logp:0.01", smoothing=2.0))
    expected = top_k_score(gaussian_smooth(-sum(upsample(m, (24, 40)) for m in logps), 2.0), 0.01)
    torch.testing.assert_close(mapper(zs).scores, expected)
    torch.testing.assert_close(image_score("logp:0.01", logps, (24, 40), smoothing=2.0), expected)


def test_an_isolated_peak_is_damped_more_than_a_defect_sized_region() -> None:
    """Why smoothing helps: one noisy pixel loses most of its height, a 9 x 9 defect keeps most of it."""
    from msflow.model.anomaly_map import gaussian_smooth

    maps = torch.zeros(1, 64, 64)
    maps[0, 10, 10] = 1.0
    maps[0, 40:49, 40:49] = 1.0
    out = gaussian_smooth(maps, 2.0)
    assert out[0, 10, 10] < 0.05 and out[0, 44, 44] > 0.8
