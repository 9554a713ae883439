"""
Property tests of evaluate.py: the metrics eval reports are those of its reconstructions, seed by seed
(independent numpy code), its spread is over Gamma seeds; the classical baselines (the root-polynomial
regression on the run's labels only, the smoothest non-negative spectrum); calibration with measured
points; the per-band report and its warnings; tiled reconstruction against whole images. Real-data tests
are skipped, saying why, when ../shared/data is not beside the checkout.
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
import cameras
import data
import evaluate
import pixelssr as P
import runs
from conftest import DATA, REAL_TEST, _demo_dir, _eval, _fit, _model, _np_metrics, _real_label_count, needs_data


def _scene_points(cubes: list[torch.Tensor], hw: tuple[int, int]) -> list[torch.Tensor]:
    """The point cubes drawn for an image of size hw, in the order drawn."""
    return [c for c in cubes if tuple(c.shape[-2:]) == hw]


@needs_data
def test_eval_reports_the_metrics_of_its_reconstructions_for_each_seed(real_run):
    """The per-scene and overall mean and std in metrics.json are those, over the seeds, of the metrics
    (independent numpy code) of the checkpoint's network run on the scene's RGB and the point cube eval
    drew for each seed; cube.npy is seed 0's reconstruction; the label count is the run's. Guards against
    reported numbers that are not the reconstruction's (e.g. metrics swapped between keys, a spread over
    the wrong axis), which a check of files and keys lets through."""
    truth = np.load(real_run.root / f"{REAL_TEST}.npy")
    target = torch.from_numpy(truth).permute(2, 0, 1)
    srf = cameras.srf_matrix(real_run.ckpt["train_config"]["srf"])
    rgb = cameras.rgb_from_hsi(target[None], srf)
    model = backbones.network(P.Config(**real_run.ckpt["model_config"]))
    model.load_state_dict(real_run.ckpt["model"])
    cubes = _scene_points(real_run.points, truth.shape[:2])
    assert len(cubes) == 2  # one per seed
    with torch.no_grad():
        preds = [model.eval()(rgb, c.reshape(1, 31, *truth.shape[:2]))[0][0].clamp(0, 1) for c in cubes]
    per_seed = [_np_metrics(p.double().numpy(), target.double().numpy()) for p in preds]
    report = real_run.report
    for k in per_seed[0]:
        values = [m[k] for m in per_seed]
        for where, summary in (("scene", report["scenes"][REAL_TEST][k]), ("overall", report["overall"][k])):
            assert summary["mean"] == pytest.approx(np.mean(values), rel=1e-9), (where, k)
            assert summary["std"] == pytest.approx(np.std(values), rel=1e-6, abs=1e-9 * abs(np.mean(values))), (where, k)
    np.testing.assert_array_equal(np.load(real_run.eval / REAL_TEST / "cube.npy"), preds[0].permute(1, 2, 0).numpy())
    assert report["labelled_pixels"] == sum(len(v["coords"]) for v in real_run.ckpt["labels"].values()) == \
        _real_label_count(real_run)


@needs_data
def test_metrics_json_says_which_code_torch_device_and_command_made_it(real_run):
    where = real_run.report["provenance"]
    head = subprocess.run(["git", "-C", str(Path(evaluate.__file__).parent), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert where["commit"].startswith(head) and len(head) == 12
    assert where["torch"] == torch.__version__ and where["device"] == "cpu" and where["threads"] >= 1
    assert where["command"].startswith("python")


@needs_data
def test_eval_draws_a_different_point_cube_for_each_seed_and_the_same_for_the_same_seed(real_run, tmp_path,
                                                                                        monkeypatch):
    """Eval's point cubes differ from seed to seed (so the reported std is the spread the Gamma draws cause)
    and a seed gives the same cube again in another eval. Guards against eval ignoring its Gamma seed:
    every seed then gives the same cube, and the spread reported over seeds is 0."""
    hw = (64, 64)
    cubes = _scene_points(real_run.points, hw)
    assert len(cubes) == 2
    assert not torch.equal(cubes[0], cubes[1]), "seeds 0 and 1 drew the same point cube"
    assert real_run.report["scenes"][REAL_TEST]["psnr"]["std"] > 0
    again, real_points = [], P.sample_points
    monkeypatch.setattr(P, "sample_points", lambda *a, **k: again.append(real_points(*a, **k)) or again[-1])
    _eval(real_run.run, tmp_path / "again", "--data", str(real_run.root))
    assert [torch.equal(c, cubes[0]) for c in _scene_points(again, hw)] == [True]


def test_overall_spread_is_over_seeds_not_over_scenes():
    """Per seed the mean over scenes, then the std over seeds: two scenes 10 dB apart that the seed moves by
    0.5 dB together spread by 0.5; moved in opposite directions, their mean does not move at all (a mean
    of each scene's own spread would say 0.5 both times)."""
    together = [[{"psnr": 29.5}, {"psnr": 30.5}], [{"psnr": 39.5}, {"psnr": 40.5}]]
    opposite = [[{"psnr": 29.5}, {"psnr": 30.5}], [{"psnr": 40.5}, {"psnr": 39.5}]]
    overall = evaluate.summarise_over_seeds(together)["psnr"]
    assert overall["mean"] == pytest.approx(35.0) and overall["std"] == pytest.approx(0.5)
    assert evaluate.summarise_over_seeds(opposite)["psnr"]["std"] == pytest.approx(0.0, abs=1e-12)


@needs_data
def test_root_poly_baseline_is_fitted_on_the_runs_labelled_pixels_only(real_run):
    """Eval fits the root-polynomial baseline on exactly the labelled pixels of the run (their spectra, read
    here from the scenes at the checkpoint's coordinates, and their own RGB), and the baseline numbers it
    reports are those of that fit applied to the test scene's RGB (numpy metrics). Guards against the
    baseline fitted on the test scene's own spectra, which makes the floor the network must beat look
    like image-level supervision."""
    ckpt = real_run.ckpt
    s = cameras.srf_matrix(ckpt["train_config"]["srf"])
    lab_spec = np.concatenate([np.load(real_run.root / f"{name}.npy")[c[:, 0], c[:, 1]]
                               for name, c in ((n, v["coords"].numpy()) for n, v in ckpt["labels"].items())])
    assert len(lab_spec) == _real_label_count(real_run) and real_run.root_poly, "the baseline was never fitted"
    for rgb, spectra in real_run.root_poly:
        same = sorted(map(tuple, spectra.tolist())) == sorted(map(tuple, lab_spec.tolist()))
        assert same, f"fitted on {len(spectra)} spectra that are not the run's {len(lab_spec)} labelled ones"
        np.testing.assert_allclose(rgb, spectra @ s.T, rtol=1e-5, atol=1e-7)  # each pixel's own RGB
    weights = evaluate.fit_root_poly(lab_spec @ s.T, lab_spec)
    truth = np.load(real_run.root / f"{REAL_TEST}.npy").astype(np.float64)
    base = P.root_poly_features((truth @ s.T).reshape(-1, 3)) @ weights
    expected = _np_metrics(base.reshape(truth.shape).transpose(2, 0, 1), truth.transpose(2, 0, 1))
    report = real_run.report
    for k, v in expected.items():
        assert report["scenes"][REAL_TEST]["root_poly_baseline"][k] == pytest.approx(v, rel=1e-6), k
        assert report["root_poly_baseline"][k]["mean"] == pytest.approx(v, rel=1e-6), k


def test_root_polynomial_regression_is_exact_on_spectra_it_can_represent():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.05, 1, (50, 3))
    W = rng.standard_normal((6, 31))
    spectra = P.root_poly_features(rgb) @ W
    np.testing.assert_allclose(evaluate.fit_root_poly(rgb, spectra, ridge=0), W, rtol=1e-6, atol=1e-8)


@needs_data
def test_smoothest_spectra_are_non_negative_consistent_with_the_rgb_and_no_rougher_than_the_truth():
    """The classical unsupervised answer on a real crop: every spectrum >= 0, its RGB the pixel's, and — the
    truth being one non-negative spectrum with that RGB — no rougher than the truth (sum of squared band
    differences), pixel by pixel. Guards against a solve that drops the constraint (negative values) or the
    consistency, or minimises something else."""
    hsi = data.load_scene(DATA / "cave" / "fake_and_real_sushi_ms")[200:232, 200:232].reshape(-1, 31).astype(np.float64)
    s = cameras.srf_matrix().astype(np.float64)
    y = evaluate.smoothest_spectra(hsi @ s.T, s)
    rough = lambda z: np.square(np.diff(z, axis=1)).sum(1)  # noqa: E731
    assert (y >= 0).all()
    np.testing.assert_allclose(y @ s.T, hsi @ s.T, atol=1e-4)
    assert (rough(y) <= rough(hsi) + 1e-6).all()
    assert (hsi @ s.T).min() >= 0 and ((y == 0).any(1)).any()  # the constraint was active somewhere


@pytest.mark.parametrize("change", ["a setting the code no longer has", "weights of another shape"])
def test_a_checkpoint_of_an_earlier_network_is_refused_in_one_sentence(tmp_path, change):
    """A checkpoint written before the network changed (a Config field since removed, or the same fields
    with weights of other shapes) is named, said to be of an earlier network, with what to do: the code of
    the commit that made it; no traceback of torch's state-dict mismatch."""
    root = _demo_dir(tmp_path)
    ckpt = _fit(root, tmp_path / "run")
    if change == "weights of another shape":
        ckpt["model"]["body.out.weight"] = ckpt["model"]["body.out.weight"][:, :-1]
    else:
        ckpt["model_config"]["drpn_d_state"] = 4
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(runs.UsageError, match=r"old\.pt: a checkpoint of an earlier pixelssr network .*; use it with "
                                               r"the code that made it, commit [0-9a-f]{12}"):
        evaluate.evaluate(tmp_path / "old.pt", tmp_path / "eval", str(root), seeds=1)


@needs_data
@pytest.mark.parametrize("k", [1, 2, 25])
def test_calib_points_bring_the_unmeasured_pixels_closer_to_the_truth(real_run, tmp_path, k):
    """eval --calib-points K on a real crop: the cube corrected with K true spectra is closer to the truth
    (RMSE) at the pixels not measured than the network's own, with one or two points as with 25. (With this
    one-epoch model, 16 dB, one or two points raise the SAM from 48 to 53 degrees while the RMSE halves.)"""
    cal = _eval(real_run.run, tmp_path / "eval", "--data", str(real_run.root), "--calib-points", str(k))["calibration"]
    assert cal["points"] == k
    assert cal["unmeasured"]["rmse"]["mean"] < cal["uncorrected_unmeasured"]["rmse"]["mean"]


def test_calibration_on_points_black_in_the_rgb_leaves_the_cube_as_it_was():
    """Measured pixels whose RGB is black carry no exposure and no colour to fit a correction on: the cube
    comes back unchanged (clamped), not a singular solve's traceback."""
    g = torch.Generator().manual_seed(0)
    pred, rgb = torch.rand(31, 6, 7, generator=g) * 1.2, torch.rand(3, 6, 7, generator=g)
    coords = np.array([[1, 2], [4, 5]])
    rgb[:, coords[:, 0], coords[:, 1]] = 0
    srf = torch.from_numpy(cameras.srf_matrix())
    fixed = evaluate.calibrate(pred, rgb, srf, coords, np.random.default_rng(0).random((2, 31)))
    torch.testing.assert_close(fixed, pred.clamp(0, 1), rtol=0, atol=0)


def test_band_warnings_name_an_inverted_and_an_outlying_band():
    rmse = [0.04] * 31
    rmse[20] = 0.09
    mean = [0.2] * 31
    mean[8] = -0.1
    lines = evaluate.band_warnings("sushi", {"band_rmse": rmse, "band_raw_mean": mean})
    assert len(lines) == 2 and "band 20 (600 nm)" in lines[0] and "band 8 (480 nm)" in lines[1]
    assert evaluate.band_warnings("sushi", {"band_rmse": [0.04] * 31, "band_raw_mean": [0.2] * 31}) == []


def test_an_image_level_runs_baseline_is_fitted_on_its_own_training_scenes_whatever_data_eval_reads(tmp_path):
    """eval --data names the scenes to evaluate; the regression beside an image-level run is still fitted
    on every pixel of the run's training scenes, re-read from the folder it trained on."""
    root = _demo_dir(tmp_path)
    _fit(root, tmp_path / "run", "--label-ratio", "1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "demo_02.npy").write_bytes((root / "demo_02.npy").read_bytes())
    moved = _eval(tmp_path / "run", tmp_path / "ev", "--data", str(elsewhere))
    cubes = {n: np.load(root / f"{n}.npy").astype(np.float64) for n in ("demo_00", "demo_01", "demo_02")}
    rgb = {n: (c @ cameras.srf_matrix("cie1964").T).reshape(-1, 3) for n, c in cubes.items()}
    rp = evaluate.fit_root_poly(np.concatenate([rgb["demo_00"], rgb["demo_01"]]),
                                np.concatenate([cubes["demo_00"].reshape(-1, 31), cubes["demo_01"].reshape(-1, 31)]))
    base = np.clip(P.root_poly_features(rgb["demo_02"]) @ rp, 0, 1)
    rmse = np.sqrt(np.mean((base - cubes["demo_02"].reshape(-1, 31)) ** 2))
    assert moved["root_poly_baseline"]["rmse"]["mean"] == pytest.approx(rmse, rel=1e-5)


def test_eval_reports_raw_band_means_and_warns_of_an_inverted_band(tmp_path, capsys):
    """Guards against a report that hides a dead band: eval of a run whose band 8 was flipped (paper's
    linear output) writes the raw per-band mean, negative there, and prints a warning naming it."""
    root = _demo_dir(tmp_path)
    run = tmp_path / "run"
    ckpt = _fit(root, run, "--label-ratio", "0.01", "--output", "linear")
    ckpt["model"]["body.out.weight"][8] = 0
    ckpt["model"]["body.out.bias"][8] = -0.2
    torch.save(ckpt, run / "last.pt")
    bands = _eval(run, tmp_path / "ev")["scenes"]["demo_02"]["bands"]
    assert bands["band_raw_mean"][8] == pytest.approx(-0.2, abs=1e-6)
    assert len(bands["band_rmse"]) == len(bands["true_mean"]) == 31
    assert "demo_02: band 8 (480 nm) has a negative raw mean" in capsys.readouterr().out


def test_reconstruct_runs_an_image_that_fits_one_tile_whole():
    m = _model().eval()
    rgb, pts = torch.rand(3, 40, 52), torch.zeros(31, 40, 52)
    assert torch.equal(evaluate.reconstruct(m, rgb, pts, tile=64), evaluate.reconstruct(m, rgb, pts))


class _PixelwiseModel(torch.nn.Module):
    """A stand-in network whose output at a pixel depends on that pixel's input alone: tiling must not
    change its result, wherever the tiles fall and however they are blended."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3 + 31, 31, 1)

    def forward(self, rgb: torch.Tensor, points: torch.Tensor, fed=None) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.mix(torch.cat([rgb, points], 1))
        return y, y


def _scene_and_points(k: int = 5) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A 32 x 32 demo scene (H, W, 31) and k of its pixels with their true spectra, as eval draws them."""
    hsi = data.demo_scenes(n=1, size=32)[0][1]
    return hsi, evaluate.calibration_points(hsi, k, seed=0)


def test_measured_points_fed_to_the_network_change_its_output_beyond_their_pixels():
    """eval_scene with a spectrometer's points pastes them into the point cube the network reads: the
    output moves, and not only at the measured pixels (the network spreads what it reads). Guards against
    measured points that never reach the network."""
    hsi, (coords, spectra) = _scene_and_points()
    model = _model().eval()
    srf = torch.from_numpy(cameras.srf_matrix("cie1964"))
    with torch.no_grad():
        plain = evaluate.eval_scene(model, hsi, srf, 1e-4, (2.0, 0.1), "gamma", 0)[0]
        fed = evaluate.eval_scene(model, hsi, srf, 1e-4, (2.0, 0.1), "gamma", 0, measured=(coords, spectra))[0]
    moved = (fed - plain).abs().amax(0) > 1e-6  # (H, W)
    moved[coords[:, 0], coords[:, 1]] = False
    assert moved.any()


def test_calib_points_never_score_a_measured_pixel_as_unmeasured():
    """Every *_unmeasured score of eval --calib-points is its own cube's error over the other pixels alone:
    the plain and fed cubes carry a wild value (9) at the measured pixels, which would show in any score
    that counted them; each score's RMSE and MRAE are numpy's over the unmeasured pixels of the cube it
    names (the plain or fed cube, corrected or not)."""
    hsi, (coords, spectra) = _scene_and_points()
    srf = torch.from_numpy(cameras.srf_matrix("cie1964"))
    rgb = cameras.rgb_from_hsi(torch.from_numpy(hsi).permute(2, 0, 1)[None], srf)[0]
    g = torch.Generator().manual_seed(0)
    plain, fed = (torch.rand(31, *hsi.shape[:2], generator=g, dtype=torch.float64) for _ in range(2))
    for cube in (plain, fed):
        cube[:, coords[:, 0], coords[:, 1]] = 9.0
    fixed = lambda c: evaluate.calibrate(c, rgb, srf, coords, spectra)  # noqa: E731
    cubes = {"unmeasured": fixed(plain), "uncorrected_unmeasured": plain, "fed_unmeasured": fed,
             "fed_calibrated_unmeasured": fixed(fed),
             "local_unmeasured": evaluate.calibrate_locally(fixed(plain), rgb, srf, coords, spectra)}
    scores = evaluate.calibration_scores([(plain,)], [(fed,)], hsi, srf, coords, spectra)
    keep = np.ones(hsi.shape[:2], bool)
    keep[coords[:, 0], coords[:, 1]] = False
    truth = hsi[keep].astype(np.float64)                                   # (n, 31)
    for name, cube in cubes.items():
        p = np.clip(cube.permute(1, 2, 0).numpy()[keep], 0, 1)
        assert scores[name][0]["rmse"] == pytest.approx(np.sqrt(np.mean((p - truth) ** 2)), rel=1e-12), name
        assert scores[name][0]["mrae"] == pytest.approx(np.mean(np.abs(p - truth) / np.maximum(truth, 1e-3)),
                                                        rel=1e-12), name


@pytest.mark.parametrize("tile,overlap", [(24, 8), (16, 32), (7, 2)])  # 16: below the default overlap
def test_tiled_reconstruction_equals_whole_for_a_pixelwise_model(tile, overlap):
    torch.manual_seed(0)
    m = _PixelwiseModel()
    rgb, pts = torch.rand(3, 40, 53), torch.rand(31, 40, 53)
    with torch.no_grad():
        torch.testing.assert_close(evaluate.reconstruct(m, rgb, pts, tile, overlap), evaluate.reconstruct(m, rgb, pts))


@needs_data
def test_tiled_and_whole_reconstructions_of_a_real_crop_agree_within_35_db(real_run):
    """Tiles of 32 (a quarter overlapping) against the whole 64 x 64 crop, with a trained checkpoint: the
    scans are global, so tiles differ: 38.5 dB measured; without the overlap's blending, 27.0 dB."""
    truth = torch.from_numpy(np.load(real_run.root / f"{REAL_TEST}.npy")).permute(2, 0, 1)
    model = runs.build_model(real_run.ckpt, torch.device("cpu"))
    rgb = cameras.rgb_from_hsi(truth, cameras.srf_matrix(real_run.ckpt["train_config"]["srf"]))
    pts = P.sample_points((1, *truth.shape), 0.01, *real_run.ckpt["gamma"], generator=runs.seeded(0))[0]
    whole = evaluate.reconstruct(model, rgb, pts).clamp(0, 1)
    tiled = evaluate.reconstruct(model, rgb, pts, tile=32).clamp(0, 1)
    assert P.psnr(tiled, whole) > 35


def _dependence(model) -> dict:
    hsi = data.demo_scenes(n=1, size=32)[0][1]
    srf = torch.from_numpy(cameras.srf_matrix("cie1964"))
    with torch.no_grad():
        ref = evaluate.eval_scene(model, hsi, srf, 1e-2, (2.0, 0.1), "gamma", 0)
        return evaluate.point_dependence(model, hsi, srf, 1e-2, (2.0, 0.1), "gamma", ref)


def test_point_dependence_is_nil_for_a_network_that_ignores_its_points():
    """A network that reads only the RGB (the points' weights zero) gives the same output whatever its point
    cube: every change, and the PSNR's, is exactly zero. This is what issue 25 found the trained one does."""
    torch.manual_seed(0)
    model = _PixelwiseModel()
    with torch.no_grad():
        model.mix.weight[:, 3:] = 0
    for cube, change in _dependence(model).items():
        assert change == {"rms_change": 0.0, "max_change": 0.0, "psnr_change": 0.0}, cube


def test_point_dependence_measures_the_change_each_replaced_cube_makes():
    """For a pixelwise linear network, the change of the clamped output when the seed-0 Gamma cube is replaced
    by another seed's, a Gaussian one or none, recomputed in numpy from the network's weights and the cubes."""
    torch.manual_seed(0)
    model = _PixelwiseModel()
    hsi = data.demo_scenes(n=1, size=32)[0][1]
    rgb = cameras.rgb_from_hsi(torch.from_numpy(hsi).permute(2, 0, 1)[None], torch.from_numpy(
        cameras.srf_matrix("cie1964")))[0].double().numpy()
    w, b = model.mix.weight[:, :, 0, 0].double().detach().numpy(), model.mix.bias.double().detach().numpy()

    def output(dist: str, seed: int) -> np.ndarray:  # (31, H, W), clamped as eval's metrics see it
        pts = P.sample_points((1, 31, 32, 32), 1e-2, 2.0, 0.1, generator=runs.seeded(seed), dist=dist)[0]
        x = np.concatenate([rgb, pts.double().numpy()]).reshape(34, -1)
        return np.clip(w @ x + b[:, None], 0, 1).reshape(31, 32, 32)

    ref = output("gamma", 0)
    got = _dependence(model)
    for cube, (dist, seed) in {"gamma, seed 1": ("gamma", 1), "gaussian, seed 0": ("gaussian", 0),
                               "zeros": ("zeros", 0)}.items():
        change = output(dist, seed) - ref
        assert got[cube]["rms_change"] == pytest.approx(np.sqrt((change ** 2).mean()), rel=1e-4), cube
        assert got[cube]["max_change"] == pytest.approx(np.abs(change).max(), rel=1e-4), cube
        assert got[cube]["rms_change"] > 0


def _two_materials(h: int = 12, w: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (31, h, w) truth of two materials under varying shade, a bluish left half and a reddish right half,
    its RGB and the S (3, 31) that made it."""
    nm = torch.tensor(cameras.WAVELENGTHS, dtype=torch.float64)
    blue, red = (0.05 + 0.6 * torch.exp(-((nm - c) / 40) ** 2) for c in (450, 650))  # (31,)
    shade = torch.linspace(0.4, 1.0, h * w, dtype=torch.float64).reshape(h, w)
    truth = torch.where(torch.arange(w) < w // 2, blue[:, None, None], red[:, None, None]) * shade  # (31, h, w)
    srf = torch.from_numpy(cameras.srf_matrix("cie1964"))
    return truth, cameras.rgb_from_hsi(truth[None], srf)[0], srf


def _metameric_error(cube: torch.Tensor, srf: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """cube with an error the camera cannot see (in S's null space) at the pixels `where` (h, w)."""
    null = torch.linalg.svd(srf.double())[2][-1]  # (31,): S . null = 0
    return cube + 0.05 * null[:, None, None] * where


def test_local_correction_gives_a_lone_point_its_own_spectrum_at_its_pixel():
    """With one measured point, its pixel is fully like itself (weight 1), so the local correction turns the
    cube's spectrum there into the measured one exactly, and keeps it on the pixel's RGB."""
    truth, rgb, srf = _two_materials()
    cube = _metameric_error(truth, srf, torch.ones(truth.shape[1:]))
    coords = np.array([[5, 3]])
    out = evaluate.calibrate_locally(cube, rgb, srf, coords, truth[:, 5, 3][None].numpy())
    assert torch.allclose(out[:, 5, 3], truth[:, 5, 3], atol=1e-9)


def test_local_correction_leaves_a_material_no_point_looks_like_as_it_was():
    """A point on the left (blue) material corrects the left half; the red half, a spectral angle of tens of
    degrees away, keeps the cube it had, even beside the point: the error of one material is not
    another's. The distance alone would carry it across."""
    truth, rgb, srf = _two_materials()
    left = (torch.arange(truth.shape[2]) < truth.shape[2] // 2).expand(truth.shape[1:])
    cube = _metameric_error(truth, srf, left)
    coords = np.array([[6, truth.shape[2] // 2 - 1]])  # at the border of the two halves
    out = evaluate.calibrate_locally(cube, rgb, srf, coords, truth[:, coords[0, 0], coords[0, 1]][None].numpy())
    assert torch.allclose(out[:, ~left], cube[:, ~left], atol=1e-12)
    assert (out[:, left] - truth[:, left]).abs().mean() < 0.5 * (cube[:, left] - truth[:, left]).abs().mean()
