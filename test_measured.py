"""measured.py: the point path spreads fed spectra as its formula says (against a loop over pixels and
points), reaches a lone fed pixel exactly, moves the pixels of a fed material and not others, and leaves
the network untouched where nothing is fed; fit --point-path trains it, eval reads it across tiles, and
predict feeds it a points file. fit --measured-points feeds a random part of each patch's labels, and cuts
patches around pairs of labels."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cameras
import data
import evaluate
import labels
import measured as M
import predict
import train
from conftest import SMALL, _demo_dir, _eval, _fit, _inputs, _model, examples


def reference(y: np.ndarray, points: np.ndarray, fed: np.ndarray, angle: float, reach: float,
              scale: np.ndarray) -> np.ndarray:
    """The module docstring's formula, one pixel q and one fed pixel k at a time. y, points (n, h, w), fed (h, w)."""
    n, h, w = y.shape
    ks = list(zip(*np.nonzero(fed)))
    out = y.copy()
    for q in np.ndindex(h, w):
        num, den = np.zeros(n), 0.0
        for k in ks:
            pq, pk = y[:, q[0], q[1]], y[:, k[0], k[1]]
            cos = pq @ pk / max(np.linalg.norm(pq), 1e-12) / max(np.linalg.norm(pk), 1e-12)
            wt = math.exp(-(1 - cos) / angle ** 2 - ((q[0] - k[0]) ** 2 + (q[1] - k[1]) ** 2) / (2 * reach ** 2))
            gain = np.clip(np.log(np.maximum(points[:, k[0], k[1]], 1e-4)) - np.log(np.maximum(pk, 1e-4)), -1, 1)
            num, den = num + wt * gain, den + wt
        out[:, q[0], q[1]] = y[:, q[0], q[1]] * np.exp(scale * num / max(den, 1.0))
    return out


@given(h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(1, 4), seed=st.integers(0, 999),
       angle=st.floats(0.05, 1.0), reach=st.floats(0.5, 10.0), chunk=st.integers(1, 40))
@examples(25)
def test_point_path_matches_a_loop_over_pixels_and_points(h, w, k, seed, angle, reach, chunk):
    """Two images, each with its own fed pixels (the second maybe none), against the loop; and one image
    in chunks of pixels (`one`) as in one piece."""
    rng = np.random.default_rng(seed)
    y, pts = rng.uniform(0, 1, (2, 2, 4, h, w))
    fed = np.zeros((2, 1, h, w), bool)
    fed[0].flat[rng.choice(h * w, min(k, h * w), replace=False)] = True
    fed[1].flat[rng.choice(h * w, rng.integers(0, min(k, h * w) + 1), replace=False)] = True
    path = M.PointPath(4).double()
    with torch.no_grad():
        path.log_angle.fill_(math.log(angle))
        path.log_reach.fill_(math.log(reach))
        path.scale.copy_(torch.from_numpy(rng.uniform(0, 2, 4)))
        out = path(*map(torch.from_numpy, (y, pts, fed)))
        chunked = path.one(*map(torch.from_numpy, (y[0], pts[0], fed[0, 0])), chunk=chunk)
    for i in range(2):
        want = reference(y[i], pts[i], fed[i, 0], angle, reach, path.scale.detach().numpy())
        np.testing.assert_allclose(out[i].numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked.numpy(), out[0].numpy(), rtol=1e-12, atol=1e-14)


def test_a_lone_fed_pixel_takes_its_measured_spectrum():
    """At its starting scale (a = 1) a fed pixel with no other fed pixel gets the spectrum measured there."""
    g = torch.Generator().manual_seed(0)
    y, pts = torch.rand(2, 1, 31, 8, 8, generator=g) * 0.5 + 0.25  # |log-ratio| < 1: inside the clip
    fed = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    fed[0, 0, 3, 5] = True
    out = M.PointPath(31)(y, pts, fed)
    torch.testing.assert_close(out[0, :, 3, 5], pts[0, :, 3, 5])


def test_a_fed_spectrum_corrects_its_material_and_not_another():
    """Two pixels share a spectrum and a third has another: feeding the true spectrum at the first moves the
    second most of the way to it (same material, nearby) and leaves the third where it was."""
    base = torch.full((1, 31, 1, 3), 0.3)
    base[0, 15:, 0, 2] = 0.05  # another material: a spectrum far in angle
    truth = base.clone()
    truth[0, :, 0, :2] *= 1.2
    fed = torch.tensor([[[[True, False, False]]]])
    out = M.PointPath(31)(base, truth, fed)
    torch.testing.assert_close(out[0, :, 0, 1], truth[0, :, 0, 1], rtol=1e-3, atol=0)
    torch.testing.assert_close(out[0, :, 0, 2], base[0, :, 0, 2], rtol=1e-6, atol=0)


def test_network_without_fed_pixels_is_the_network_without_the_path():
    plain = _model().eval()
    with_path = _model(dataclasses.replace(SMALL, point_path=True)).eval()
    with_path.load_state_dict(plain.state_dict(), strict=False)
    rgb, pts = _inputs(2, 16, 16)
    with torch.no_grad():
        want = plain(rgb, pts)[0]
        for fed in (None, torch.zeros(2, 1, 16, 16, dtype=torch.bool)):
            torch.testing.assert_close(with_path(rgb, pts, fed)[0], want, rtol=0, atol=0)


def test_fed_points_reach_the_output_of_a_network_with_the_path_beyond_their_pixels():
    """eval_scene with a spectrometer's points: the network with the point path moves at unmeasured pixels
    by far more than the paper's network does (guards against fed points that never reach the path)."""
    hsi = data.demo_scenes(n=1, size=32)[0][1]
    coords, spectra = evaluate.calibration_points(hsi, 5, seed=0)
    srf = torch.from_numpy(cameras.srf_matrix("cie1964"))
    keep = np.ones(hsi.shape[:2], bool)
    keep[coords[:, 0], coords[:, 1]] = False
    moved = {}
    for path in (False, True):
        model = _model(dataclasses.replace(SMALL, point_path=path)).eval()
        plain = evaluate.eval_scene(model, hsi, srf, 1e-4, (2.0, 0.1), "gamma", 0)[0]
        fed = evaluate.eval_scene(model, hsi, srf, 1e-4, (2.0, 0.1), "gamma", 0, measured=(coords, spectra))[0]
        moved[path] = float((fed - plain)[:, keep].abs().mean())
    assert moved[True] > 1e-3 and moved[True] > 100 * moved[False]


def test_predict_feeds_a_points_file_to_the_path(tmp_path):
    """predict --points FILE --use-points network: the file's spectra reach the path, which moves the pixels
    beyond them (the paper's network, without the path, barely moves)."""
    hsi = data.demo_scenes(n=1, size=32)[0][1]
    srf = torch.from_numpy(cameras.srf_matrix("cie1964"))
    rgb = torch.from_numpy(hsi @ cameras.srf_matrix("cie1964").T).permute(2, 0, 1).float()
    coords = np.array([[3, 4], [20, 9], [28, 30]])
    with open(tmp_path / "pts.csv", "w") as f:
        f.writelines(",".join(map(str, [r, c, *hsi[r, c]])) + "\n" for r, c in coords)
    keep = np.ones(hsi.shape[:2], bool)
    keep[coords[:, 0], coords[:, 1]] = False
    _, pts = _inputs(1, 32, 32)
    moved = {}
    for path in (False, True):
        model = _model(dataclasses.replace(SMALL, point_path=path)).eval()
        with torch.no_grad():
            plain = evaluate.reconstruct(model, rgb, pts[0]).clamp(0, 1)
            fed = predict.reconstruct_with_points(model, rgb, pts[0], 0, srf, str(tmp_path / "pts.csv"), "network")
        moved[path] = float((fed - plain)[:, keep].abs().mean())
    assert moved[True] > 1e-3 and moved[True] > 100 * moved[False]


def test_tiled_reconstruction_spreads_a_point_across_tiles():
    """With tiles, the path runs once over the stitched image: a point fed in one tile corrects the pixels
    of its material in the others, exactly as the path applied to the tiled network's own cube."""
    model = _model(dataclasses.replace(SMALL, point_path=True)).eval()
    rgb, pts = _inputs(1, 48, 48)
    fed = torch.zeros(1, 48, 48, dtype=torch.bool)
    fed[0, 2, 2] = True
    pts[0, :, 2, 2] = 0.5
    with torch.no_grad():
        base = evaluate.reconstruct(model, rgb[0], pts[0], tile=16)
        out = evaluate.reconstruct(model, rgb[0], pts[0], tile=16, fed=fed)
        want = model.point_path(base[None], pts, fed[None])[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert (out - base)[:, 32:, 32:].abs().max() > 0  # the far tile moved


def test_training_with_fed_points_moves_the_paths_scales(tmp_path):
    """fit --measured-points --point-path: the loss at the unfed labels reaches the path's angle, reach and
    per-band scale; the checkpoint keeps the switch, so eval builds the same network."""
    root = _demo_dir(tmp_path)
    flags = ("--label-ratio", "0.05", "--measured-points", "0.5", "--point-path")
    ckpt = _fit(root, tmp_path / "run", *flags)
    state, fresh = ckpt["model"], M.PointPath(31).state_dict()
    assert ckpt["model_config"]["point_path"]
    for name in ("log_angle", "log_reach", "scale"):
        assert not torch.equal(state["point_path." + name], fresh[name]), name
    _fit(root, tmp_path / "run", "--resume", "--point-path", epochs=None)  # restating the run's own flag is no error
    report = _eval(tmp_path / "run", tmp_path / "eval", "--calib-points", "3")
    assert "calibration" in next(iter(report["scenes"].values()))


def test_point_path_without_fed_labels_is_one_sentence(tmp_path, capsys):
    argv = ["fit", "--data", str(_demo_dir(tmp_path)), "--out", str(tmp_path / "run"), "--label-ratio", "0.05",
            "--point-path"]
    assert train.main(argv) != 0
    err = capsys.readouterr().err
    assert "--point-path" in err and "--measured-points" in err and "Traceback" not in err


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_reaches_every_parameter_of_the_path(k):
    g = torch.Generator().manual_seed(k)
    y, pts = torch.rand(2, 1, 31, 6, 6, generator=g)
    fed = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    fed.view(-1)[torch.randperm(36, generator=g)[:k]] = True
    path = M.PointPath(31)
    with torch.no_grad():
        path.log_angle.fill_(0.0)  # wide enough that no weight underflows
    path(y, pts, fed).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in path.parameters())


def test_path_keeps_float32_under_bf16_autocast():
    """bf16 training: the weights need 1 - cos of like spectra (~1e-4) well below bfloat16's resolution, so the
    path computes in float32 whatever autocast says, and gives what it gives outside autocast. One fed
    pixel, spectra a degree or two from it (weights between 0 and 1, which set each pixel's correction),
    a gain that varies by band."""
    g = torch.Generator().manual_seed(0)
    y = 0.3 + 0.02 * torch.rand(1, 31, 8, 8, generator=g)  # one material, varied by a degree or two
    pts = y * torch.linspace(-0.3, 0.3, 31).exp()[None, :, None, None]
    fed = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    fed[0, 0, 1, 1] = True
    path = M.PointPath(31)
    want = path(y, pts, fed)
    weight = (want / y).log()[0, 0] / math.log(pts[0, 0, 1, 1] / y[0, 0, 1, 1])  # (8, 8): each pixel's w
    assert 0.5 < weight.min() and (weight < 0.99).float().mean() > 0.9  # all but the fed pixel's inside (0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = path(y, pts, fed)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_fed_mask_marks_the_pixels_paste_writes():
    coords = np.array([[0, 6], [2, 1], [4, 4]])  # (row, col) on a 5 x 7 image
    pasted = evaluate.paste(torch.zeros(31, 5, 7), coords, np.ones((3, 31)))
    assert torch.equal(evaluate.fed_mask(coords, (5, 7))[0], pasted.bool().any(0))


def test_in_training_every_parameter_of_the_path_gets_a_gradient_even_with_nothing_fed():
    """DistributedDataParallel expects a gradient for every parameter each step; a rank's slice may hold no
    fed pixel, and the path's output is then the network's own, with a zero gradient for its parameters."""
    path = M.PointPath(31).train()
    y = torch.rand(2, 31, 4, 4, requires_grad=True)
    out = path(y, torch.rand(2, 31, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in path.parameters())


@pytest.mark.parametrize("share", [0.25, 0.75])
def test_measured_points_feed_a_random_part_of_the_patchs_labels_with_their_true_spectra(share):
    """--measured-points P: the point cube of a batch differs from the paper's (the same seeded Gamma draw)
    at labelled pixels only, there it holds the pixel's true spectrum (the loss's target), and it does so at
    about a share P of them, drawn pixel by pixel; the mask draw_batch returns beside the cube marks exactly those pixels. The fed
    points are thus a subset of the run's fixed label set."""
    scenes = data.demo_scenes(n=2, size=64)
    ds = labels.PatchDataset([(cube, labels.draw_label_set(64, 64, 0.02, i)) for i, (_, cube) in enumerate(scenes)],
                             cameras.srf_matrix("cie1964"), patch=32, stride=16)
    cfg = train.TrainConfig(batch_size=16, patch=32, label_ratio=0.02, measured_points=share)
    (_, target, mask), pts, told = train.draw_batch(ds, 0, 0, cfg, (2.0, 0.1), "gamma", torch.device("cpu"))
    _, paper, none = train.draw_batch(ds, 0, 0, dataclasses.replace(cfg, measured_points=0.0), (2.0, 0.1), "gamma",
                                      torch.device("cpu"))
    fed = (pts != paper).any(1, keepdim=True)  # (b, 1, h, w)
    assert none is None and torch.equal(told, fed)  # the network (--point-path) is told which pixels were fed
    assert not (fed & ~mask).any()
    torch.testing.assert_close(pts * fed, target * fed, rtol=0, atol=0)
    labelled = int(mask.sum())
    assert labelled >= 16 and abs(fed.sum() / labelled - share) < 0.1  # 4 binomial sigmas at these ~330 labels
    # a coin per pixel, not per patch: a patch's labels are fed and unfed side by side, which the loss needs
    per_patch, fed_per_patch = mask.flatten(1).sum(1), fed.flatten(1).sum(1)
    several = per_patch >= 2
    mixed = (fed_per_patch > 0) & (fed_per_patch < per_patch)
    assert several.sum() >= 8 and mixed[several].float().mean() >= 0.5



@pytest.mark.parametrize("argv,pairs", [([], False), (["--pair-patches"], True), (["--measured-points", "0.5"], True),
                                        (["--measured-points", "0.5", "--no-pair-patches"], False)])
def test_measured_points_cut_pair_patches_unless_told_not_to(argv, pairs):
    """--measured-points needs an unfed label beside a fed one, so it turns --pair-patches on; an explicit
    --no-pair-patches keeps the patches cut around one label, and without either the paper's patches stay."""
    cfg, _ = train.run_configs(train.fit_args(["--label-ratio", "0.01", *argv]))
    assert cfg.pair_patches == pairs
