"""
Property tests of metrics.py, each against independent numpy code (Wang et al.'s reference SSIM, the
spectral angle, NTIRE's MRAE with its stated zero guard): the clamp to [0, 1], black pixels and zero
values, the mean over a batch, SSIM taken a block of bands at a time.
"""

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import metrics
from conftest import _np_metrics, _np_ssim_band, examples


@pytest.mark.parametrize("leaves", ["below 0", "above 1", "both ways", "nowhere"])
@examples(10)
@given(h=st.integers(11, 24), w=st.integers(11, 24), noise=st.floats(0.01, 0.3), seed=st.integers(0, 10**6))
def test_every_metric_matches_independent_numpy_code(leaves, h, w, noise, seed):
    """pred leaves [0, 1] below, above, both ways or nowhere: the clamp is tested too, each side alone
    (it is skipped when nothing is out of range)."""
    rng = np.random.default_rng(seed)
    target = rng.random((31, h, w))
    pred = target + noise * rng.standard_normal((31, h, w))
    pred = {"below 0": np.minimum(pred, 1), "above 1": np.maximum(pred, 0), "both ways": pred,
            "nowhere": np.clip(pred, 0, 1)}[leaves]
    ref = _np_metrics(pred, target)
    for name, value in ref.items():
        got = getattr(metrics, name)(torch.from_numpy(pred), torch.from_numpy(target)).item()
        assert got == pytest.approx(value, rel=1e-9, abs=1e-9), name


@examples(10)
@given(bands_per_block=st.integers(1, 31), seed=st.integers(0, 10**6))
def test_ssim_taken_a_block_of_bands_at_a_time_is_the_reference_ssim(bands_per_block, seed):
    """Two images, each given as a cube read from disk is laid out, (H, W, 31) permuted to (31, H, W)."""
    rng = np.random.default_rng(seed)
    target = rng.random((2, 12, 13, 31))
    pred = np.clip(target + 0.1 * rng.standard_normal((2, 12, 13, 31)), 0, 1)
    expected = np.mean([_np_ssim_band(a, b) for p, t in zip(pred, target) for a, b in zip(p.transpose(2, 0, 1),
                                                                                          t.transpose(2, 0, 1))])
    with mock.patch.object(metrics, "SSIM_BLOCK", bands_per_block * 2 * 12 * 13):
        got = metrics.ssim(*(torch.from_numpy(x).permute(0, 3, 1, 2) for x in (pred, target))).item()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@examples(10)
@given(h=st.integers(3, 10), w=st.integers(3, 24), seed=st.integers(0, 10**6))
def test_ssim_of_an_image_under_11_pixels_uses_the_largest_window_it_allows(dtype, h, w, seed):
    """Under 11 pixels a side SSIM takes the Gaussian (sigma 1.5) over min(h, w) taps; float64 sums its
    windows by slices, float32 by a convolution: both are the reference."""
    rng = np.random.default_rng(seed)
    target = rng.random((31, h, w))
    pred = np.clip(target + 0.1 * rng.standard_normal((31, h, w)), 0, 1)
    expected = np.mean([_np_ssim_band(a, b, min(h, w)) for a, b in zip(pred, target)])
    got = metrics.ssim(torch.from_numpy(pred).to(dtype), torch.from_numpy(target).to(dtype)).item()
    assert got == pytest.approx(expected, abs=1e-12 if dtype == torch.float64 else 1e-5)


def test_every_metric_is_the_mean_of_its_per_image_values_over_a_batch():
    rng = np.random.default_rng(0)
    target = rng.random((2, 31, 12, 12))
    pred = target + rng.uniform(0, 0.2, (2, 1, 1, 1)) * rng.standard_normal((2, 31, 12, 12))
    for name in ("rmse", "psnr", "psnr_bandwise", "ssim", "sam", "mrae"):
        fn = getattr(metrics, name)
        batch = fn(torch.from_numpy(pred), torch.from_numpy(target)).item()
        single = np.mean([fn(torch.from_numpy(p), torch.from_numpy(t)).item() for p, t in zip(pred, target)])
        assert batch == pytest.approx(single, rel=1e-12), name


@examples(10)
@given(h=st.integers(11, 20), w=st.integers(11, 20), seed=st.integers(0, 10**6))
def test_identical_images_score_perfectly(h, w, seed):
    x = torch.from_numpy(np.random.default_rng(seed).random((31, h, w)))
    assert metrics.rmse(x, x).item() == 0 and metrics.psnr(x, x).item() == math.inf
    assert metrics.ssim(x, x).item() == pytest.approx(1, abs=1e-12)
    assert metrics.sam(x, x).item() == pytest.approx(0, abs=1e-5)  # arccos near 1 amplifies rounding


@examples(10)
@given(h=st.integers(11, 16), w=st.integers(11, 16), seed=st.integers(0, 10**6))
def test_sam_and_mrae_with_black_pixels_and_zero_values_match_numpy(h, w, seed):
    """Black pixels in the truth, the prediction or both, and zero values in single bands (8-bit CAVE
    copies hold many): SAM counts a pixel black in both as 0 degrees, MRAE divides by max(truth, 1e-3)."""
    rng = np.random.default_rng(seed)
    target = rng.random((31, h, w)) * (rng.random((31, h, w)) > 0.1)  # ~10 % of values exactly 0
    pred = np.clip(target + 0.05 * rng.standard_normal((31, h, w)), 0, 1)
    black = rng.integers(0, 3, (h, w))  # 0: neither, 1: the truth, 2: both
    target[:, black >= 1], pred[:, black == 2] = 0, 0
    ref = _np_metrics(pred, target)
    for name in ("sam", "mrae"):
        got = getattr(metrics, name)(torch.from_numpy(pred), torch.from_numpy(target)).item()
        assert got == pytest.approx(ref[name], rel=1e-9), name


def test_sam_of_an_image_with_itself_is_zero_even_where_it_is_black():
    x = torch.rand(31, 12, 12, dtype=torch.float64)
    x[:, :3] = 0
    assert metrics.sam(x, x).item() == pytest.approx(0, abs=1e-5)


def test_sam_resolves_small_angles_in_float32():
    x = torch.from_numpy(np.random.default_rng(0).uniform(0.1, 1, (31, 12, 12)).astype(np.float32))
    assert metrics.sam(x, x).item() < 1e-4


@examples(10)
@given(seed=st.integers(0, 10**6))
def test_sam_ignores_per_pixel_scaling(seed):
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.uniform(0.1, 1, (31, 12, 12)))
    pred = torch.from_numpy(rng.uniform(0.1, 1, (31, 12, 12)))
    scale = torch.from_numpy(rng.uniform(0.2, 1, (1, 12, 12)))  # keeps pred in [0, 1]: no clamping
    assert metrics.sam(pred * scale, target).item() == pytest.approx(metrics.sam(pred, target).item(), rel=1e-9)
