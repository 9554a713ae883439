"""
Property tests of predict.py: a photo (8-bit sRGB, 16-bit linear, RGBA, JPEG, any size) decodes to the
model's RGB of the scene it shows, is brought to the training exposure unless its highlights would clip,
and is warned about when it looks unlike the training data; `predict` gives eval's cube for eval's RGB,
writes ENVI on request, and with a spectrometer's points keeps them and corrects the rest. Real-data tests
are skipped, saying why, when ../shared/data is not beside the checkout.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cameras
import data
import predict
import train
from conftest import DATA, REAL_TEST, _demo_dir, _fit, _read_envi, _write_png16, needs_data


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve (IEC 61966-2-1), written here independently of cameras.srgb_to_linear."""
    linear = np.clip(linear, 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


@needs_data
def test_an_8bit_srgb_photo_of_a_scene_decodes_to_the_models_rgb_of_that_scene(tmp_path):
    """A white-balanced camera's 8-bit sRGB PNG of a real scene (CIE 1931 XYZ through the sRGB primaries,
    white at (1, 1, 1), gamma-encoded) reads back, under the CIE 1931 response, as that scene's S.Y to
    within the 8-bit quantisation. Guards against feeding gamma-encoded values or sRGB primaries as S.Y."""
    truth = data.load_scene(DATA / "cave" / "fake_and_real_sushi_ms")[200:240:2, 180:240:2].astype(np.float64)
    xyz = truth @ np.array(cameras.SRF_TABLES["cie1931"]).clip(0)
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    white = m @ np.array(cameras.SRF_TABLES["cie1931"]).clip(0).sum(0)
    srgb = xyz @ m.T / white
    Image.fromarray(np.round(_srgb_encode(srgb) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    rgb, kind, clipped = predict.photo_rgb(str(tmp_path / "photo.png"), "auto", "cie1931")
    expected = truth @ cameras.srf_matrix("cie1931").T
    in_gamut = (srgb >= 0).all(-1)  # sRGB cannot hold the most saturated colours: a camera clips them too
    assert kind == "srgb" and clipped == 0 and in_gamut.mean() > 0.5
    np.testing.assert_allclose(rgb[in_gamut], expected[in_gamut], rtol=1e-2, atol=1e-3)  # half an 8-bit step


def test_exposure_brings_the_photo_mean_to_the_training_mean_unless_its_highlights_would_pass_one():
    train_rgb = np.full((10, 3), 0.2, np.float32)
    dark = np.full((8, 8, 3), 0.05, np.float32)
    gain, why = predict.exposure_gain(dark, train_rgb)
    assert gain == pytest.approx(4) and "0.2000" in why
    dark[0, 0] = 0.5  # one pixel in 64 is brighter than the 99.9th percentile allows at x4
    gain, why = predict.exposure_gain(dark, train_rgb)
    assert gain * np.percentile(dark, 99.9) == pytest.approx(1) and "held back" in why


def test_photo_warnings_name_clipped_highlights_and_a_colour_cast():
    train_rgb = np.full((10, 3), 0.3, np.float32)
    grey, cast = np.full((4, 4, 3), 0.3, np.float32), np.full((4, 4, 3), [0.5, 0.3, 0.1], np.float32)
    assert predict.photo_warnings(grey, 0.0, train_rgb) == []
    clipped, = predict.photo_warnings(grey, 0.05, train_rgb)
    balance, = predict.photo_warnings(cast, 0.0, train_rgb)
    assert "5.0 % of the pixels are clipped" in clipped and "channel balance" in balance


def test_an_image_level_run_brings_a_photo_to_the_mean_of_its_gamma(tmp_path, capsys):
    """At --label-ratio 1 the checkpoint keeps only the rule "every pixel", not the training RGB: predict's
    exposure then aims at the Gamma's mean (fitted to every training spectrum), as for a run without labels."""
    ckpt = _fit(_demo_dir(tmp_path), tmp_path / "run", "--label-ratio", "1")
    assert all("every_pixel" in v for v in ckpt["labels"].values())
    Image.fromarray(np.full((20, 30, 3), 40, np.uint8)).save(tmp_path / "grey.png")
    assert train.main(["predict", "--ckpt", str(tmp_path / "run" / "last.pt"), "--rgb", str(tmp_path / "grey.png"),
                       "--out", str(tmp_path / "pred")]) == 0
    gamma_mean = ckpt["gamma"][0] * ckpt["gamma"][1]
    assert f"to the training RGB's {gamma_mean:.4f}" in capsys.readouterr().out
    assert np.load(tmp_path / "pred" / "cube.npy").shape == (20, 30, 31)


def _predict(real_run, image: Path, out: Path, *extra: str) -> np.ndarray:
    """`python train.py predict` of real_run's checkpoint on image into out, checked; -> its cube."""
    assert train.main(["predict", "--ckpt", str(real_run.run / "last.pt"), "--rgb", str(image), "--out", str(out),
                       *extra]) == 0
    return np.load(out / "cube.npy")


@needs_data
def test_predict_on_a_16_bit_linear_png_gives_evals_cube(real_run, tmp_path):
    """By default predict runs a 16-bit PNG of the test scene's RGB whole, as linear S.Y at its own
    exposure, with eval's seed-0 point cube: eval's cube, to within the PNG's 16-bit quantisation."""
    truth = np.load(real_run.root / f"{REAL_TEST}.npy")
    rgb = truth @ cameras.srf_matrix(real_run.ckpt["train_config"]["srf"]).T
    _write_png16(tmp_path / "rgb16.png", np.round(rgb * 65535).astype(np.uint16))
    cube = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "pred")
    # the 16-bit step is 1.5e-5 of the RGB; it moves this cube by under 3e-5 (another seed: by 7e-3)
    np.testing.assert_allclose(cube, np.load(real_run.eval / REAL_TEST / "cube.npy"), rtol=0, atol=3e-5)


@needs_data
def test_predict_reads_an_odd_sized_rgba_png_as_its_rgb_and_writes_envi(real_run, tmp_path):
    rgb = np.load(real_run.root / f"{REAL_TEST}.npy")[:23, :37] @ cameras.srf_matrix("cie1964").T
    rgb8 = np.round(_srgb_encode(rgb) * 255).astype(np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb8, np.full(rgb8.shape[:2], 90, np.uint8)])).save(tmp_path / "rgba.png")
    with_alpha = _predict(real_run, tmp_path / "rgba.png", tmp_path / "a", "--envi")
    assert with_alpha.shape == (23, 37, 31)
    np.testing.assert_array_equal(with_alpha, _predict(real_run, tmp_path / "rgb.png", tmp_path / "b"))
    np.testing.assert_array_equal(_read_envi(tmp_path / "a" / "cube.hdr")[1], with_alpha)


@needs_data
def test_predict_on_an_8bit_srgb_jpeg_prints_its_input_exposure_and_warnings(real_run, tmp_path, capsys):
    rgb = np.load(real_run.root / f"{REAL_TEST}.npy") @ cameras.srf_matrix("cie1964").T
    photo = np.round(_srgb_encode(rgb * 60) * 255).astype(np.uint8)  # overexposed: about half the pixels clip
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    cube = _predict(real_run, tmp_path / "photo.jpg", tmp_path / "pred")
    out = capsys.readouterr().out
    assert cube.shape == (64, 64, 31) and "input: srgb" in out and "exposure: x" in out
    assert "of the pixels are clipped" in out


def _photo_and_points(real_run, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """The test scene's RGB as a 16-bit PNG (tmp_path/rgb16.png) and three of its true spectra as a points file
    (tmp_path/pts.csv); -> (truth (H, W, 31), the points' (3, 2) pixels)."""
    truth = np.load(real_run.root / f"{REAL_TEST}.npy")
    rgb = truth @ cameras.srf_matrix(real_run.ckpt["train_config"]["srf"]).T
    _write_png16(tmp_path / "rgb16.png", np.round(rgb * 65535).astype(np.uint16))
    coords = np.array([[5, 7], [40, 50], [60, 3]])
    with open(tmp_path / "pts.csv", "w") as f:
        f.writelines(",".join(map(str, [r, c, *truth[r, c]])) + "\n" for r, c in coords)
    return truth, coords


@needs_data
def test_predict_points_enter_the_point_cube_at_the_rgbs_exposure(real_run, tmp_path, monkeypatch):
    """--use-points network: the measured spectra enter the network's point cube at their pixels, scaled to
    the exposure the network's RGB is at (here x2, so twice the measured values), as training fed them; the
    cube keeps them at their pixels, and the rest of it is brought to their scale (here half the network's
    output, which moves little with the points)."""
    truth, coords = _photo_and_points(real_run, tmp_path)
    cubes, real_reconstruct = [], predict.reconstruct
    monkeypatch.setattr(predict, "reconstruct",
                        lambda m, rgb, pts, tile, **kw: cubes.append(pts) or real_reconstruct(m, rgb, pts, tile, **kw))
    plain = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "plain", "--exposure", "2")
    fed = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "fed", "--exposure", "2", "--points",
                   str(tmp_path / "pts.csv"), "--use-points", "network")
    # the exposure is fitted on 16-bit RGB: 1.4e-4 off here
    np.testing.assert_allclose(cubes[1][:, coords[:, 0], coords[:, 1]].T.numpy(), 2 * truth[coords[:, 0], coords[:, 1]],
                               rtol=1e-3)
    np.testing.assert_array_equal(fed[coords[:, 0], coords[:, 1]], truth[coords[:, 0], coords[:, 1]])
    keep = np.ones(truth.shape[:2], bool)
    keep[coords[:, 0], coords[:, 1]] = False
    assert fed[keep].mean() == pytest.approx(plain[keep].mean() / 2, rel=0.01)


@needs_data
@pytest.mark.parametrize("form", ["global", "local"])
def test_predict_points_keep_the_measured_spectra_and_correct_the_rest(real_run, tmp_path, form):
    truth, coords = _photo_and_points(real_run, tmp_path)
    plain = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "plain")
    fixed = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "fixed", "--points", str(tmp_path / "pts.csv"),
                     "--use-points", "calibration", "--calibration", form)
    np.testing.assert_allclose(fixed[coords[:, 0], coords[:, 1]], truth[coords[:, 0], coords[:, 1]], rtol=1e-6)
    keep = np.ones(truth.shape[:2], bool)
    keep[coords[:, 0], coords[:, 1]] = False
    assert np.abs(fixed - truth)[keep].mean() < np.abs(plain - truth)[keep].mean()
