"""
`python train.py eval`: a checkpoint on whole test images, beside the classical baselines.

The evaluation protocol (paper Sec. 4.1 and supplementary Sec. 6; docs/design.md, "Evaluation"):
  - whole images (tile 0), the output clamped to [0, 1]; RMSE, PSNR (per image, over the whole cube),
    band-wise PSNR, SSIM, SAM and NTIRE's MRAE (pixelssr.rmse ... mrae);
  - the network's point cube is drawn by seed; mean +- std over --seeds draws: per seed the mean over
    scenes, then the spread over seeds (the paper's Tables 7-9);
  - per band: the RMSE and the raw (unclamped) mean, so that a dead or inverted band shows;
  - beside the network, the classical answer from the same labels: the root-polynomial regression
    (Finlayson et al. 2015) fitted on the run's labelled pixels, or without labels the smoothest
    non-negative spectrum consistent with the RGB; for a run with --prior-library, also the map fitted on
    the labels and that library (the prior the network starts from);
  - --calib-points K (beyond the paper): K of each scene's own true spectra used as `predict --points`
    uses a spectrometer's: fed into the network's point cube, correcting its cube, or both; scored over
    the unmeasured pixels;
  - --point-dependence: how much the output moves when its point cube is replaced (another seed, the
    other distribution of Table 3, no points): the paper's claim that point spectra carry information,
    put to the network that was trained.

Glossary: X = rgb = S.Y; Y^r = pred (the network's output, clamped) or raw (unclamped); M = the
root-polynomial map (6, 31); omega = label_ratio; alpha, theta = the run's Gamma parameters.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import cameras
import data
import pixelssr as P
from labels import expand_label_sets, pixel_coords, scene_seed
from runs import UsageError, build_model, load_checkpoint, pick_device, positive, provenance, seeded


# -----------------------------------------------------------------------------
# reconstruction and metrics

@torch.no_grad()
def reconstruct(model: P.DyProMamba, rgb: torch.Tensor, points: torch.Tensor, tile: int = 0,
                overlap: int | None = None, fed: torch.Tensor | None = None) -> torch.Tensor:
    """Y^r for one image. rgb (3, H, W), points (31, H, W) -> (31, H, W), on the model's device.

    tile = 0 runs the whole image at once (the evaluation protocol). tile > 0 runs overlapping
    tile x tile windows and blends them with a tent weight, so memory stays bounded on large photos.
    fed (1, H, W) bool: the pixels whose spectra in `points` were measured, for a network with a point path
    (measured.py), which then reads them over the whole image after the tiles.
    """
    dev = next(model.parameters()).device
    rgb, points = rgb.to(dev), points.to(dev)
    fed = None if fed is None else fed.to(dev)[None]
    H, W = rgb.shape[-2:]
    if tile <= 0 or (H <= tile and W <= tile):
        return model(rgb[None], points[None], fed)[0][0]
    out = tiled(model, rgb, points, tile, overlap)
    path = getattr(model, "point_path", None)  # None: the paper's network, or a stand-in without one
    return out if path is None else path(out[None], points[None], fed)[0]

def tiled(model: P.DyProMamba, rgb: torch.Tensor, points: torch.Tensor, tile: int,
          overlap: int | None) -> torch.Tensor:
    """reconstruct's overlapping tiles, blended."""
    dev, (H, W) = rgb.device, rgb.shape[-2:]
    out = torch.zeros(points.shape, device=dev)
    weight = torch.zeros(1, H, W, device=dev)
    overlap = tile // 4 if overlap is None else min(overlap, tile // 4)  # keep most of each tile new
    step = tile - overlap
    ramp = torch.minimum(torch.arange(tile, device=dev) + 1.0, torch.arange(tile, 0, -1, device=dev).float())
    for top in sorted({*range(0, max(H - tile, 0) + 1, step), max(H - tile, 0)}):
        for left in sorted({*range(0, max(W - tile, 0) + 1, step), max(W - tile, 0)}):
            win = (slice(None), slice(top, top + tile), slice(left, left + tile))
            y = model(rgb[win][None], points[win][None])[0][0]
            wgt = (ramp[: y.shape[-2], None] * ramp[None, : y.shape[-1]])[None]
            out[win] += y * wgt
            weight[win] += wgt
    return out / weight

def as_float64(x: torch.Tensor) -> torch.Tensor:
    """x as the metrics take it: float64 on the CPU, contiguous (a cube read from disk is (H, W, 31) in
    memory, where the per-band reductions are slower; docs/performance.md, "The metrics' clamp, layout and
    norms"). A no-op on a tensor already so, which
    lets the callers convert a truth once for all the metrics they take of it."""
    return x.to("cpu", torch.float64, memory_format=torch.contiguous_format)

PIXEL_METRICS = {"rmse": P.rmse, "psnr": P.psnr, "psnr_bandwise": P.psnr_bandwise, "sam": P.sam, "mrae": P.mrae}

def metrics(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, float]:
    """The paper's four metrics (plus band-wise PSNR, and NTIRE's MRAE) on one whole (31, H, W) image.

    keep: (H, W) bool, the pixels the pixelwise metrics (all but SSIM, means over pixels) are taken over;
    SSIM, a windowed metric, is always of the whole image."""
    pred, target = as_float64(pred), as_float64(target)
    sel = (lambda x: x) if keep is None else (lambda x: x[:, keep.cpu()][:, None])  # (31, 1, n): the kept pixels
    out = {k: float(f(sel(pred), sel(target))) for k, f in PIXEL_METRICS.items()}
    return {**out, "ssim": float(P.ssim(pred, target))}

def band_stats(raw: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """Per band of one (31, H, W) image: the RMSE of the clamped output and the mean of the raw one.
    A mean PSNR hides a dead or inverted band; these do not."""
    raw, target = as_float64(raw), as_float64(target)
    return {"band_rmse": ((raw.clamp(0, 1) - target) ** 2).mean((1, 2)).sqrt().tolist(),
            "band_raw_mean": raw.mean((1, 2)).tolist()}

def band_warnings(name: str, bands: dict[str, list[float]]) -> list[str]:
    """The bands of a scene that look broken: RMSE over twice the median band's, or a negative raw mean."""
    rmse, mean = np.array(bands["band_rmse"]), np.array(bands["band_raw_mean"])
    nm = cameras.WAVELENGTHS
    bad = [f"band {i} ({nm[i]} nm) RMSE {rmse[i]:.4f} is {rmse[i] / np.median(rmse):.1f}x the median band's"
           for i in np.flatnonzero(rmse > 2 * np.median(rmse))]
    bad += [f"band {i} ({nm[i]} nm) has a negative raw mean {mean[i]:.4f}" for i in np.flatnonzero(mean < 0)]
    return [f"warning: {name}: {b}" for b in bad]

def eval_scene(model: P.DyProMamba, hsi: np.ndarray, srf: torch.Tensor, ratio: float, gamma: tuple[float, float],
               points: str, seed: int, tile: int = 0,
               measured: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, dict, dict]:
    """Reconstruct one scene from its RGB and a seeded point cube; return (pred (31, H, W) clamped to
    [0, 1] as the metrics see it, metrics, band_stats of the raw output). measured: (coords (k, 2), spectra
    (k, 31)) pasted into the point cube at their pixels, a spectrometer's points fed to the network."""
    target = torch.from_numpy(hsi).permute(2, 0, 1)  # (31, H, W)
    rgb = cameras.rgb_from_hsi(target[None], srf)[0]
    pts = P.sample_points((1, *target.shape), ratio, *gamma, generator=seeded(seed), dist=points)[0]
    fed = None
    if measured is not None:
        pts, fed = paste(pts, *measured), fed_mask(measured[0], target.shape[1:])
    raw = reconstruct(model, rgb, pts, tile, fed=fed).cpu()
    pred, target = raw.clamp(0, 1), as_float64(target)
    return pred, metrics(pred, target), band_stats(raw, target)


def point_dependence(model: P.DyProMamba, hsi: np.ndarray, srf: torch.Tensor, ratio: float,
                     gamma: tuple[float, float], points: str, ref: tuple[torch.Tensor, dict, dict],
                     tile: int = 0) -> dict[str, dict]:
    """eval --point-dependence (issue 25): how much the output depends on its point cube. ref is seed 0's
    eval_scene; against it, the output with the cube of another seed, of the other distribution of Table 3
    (Gamma <-> Gaussian) and with no points at all. Per cube: the RMS and the largest change of the clamped
    output per value (over bands and pixels), and the change of PSNR against the truth. Zero changes mean
    a network that ignores its points: its output is that of the RGB alone. (A run trained with --points
    zeros gets an empty cube for its own distribution at any seed: those two changes are zero by
    construction, and the Gamma cube measures it.)"""
    other = "gaussian" if points == "gamma" else "gamma"
    cubes = {f"{points}, seed 1": (points, 1), f"{other}, seed 0": (other, 0), "zeros": ("zeros", 0)}
    pred, m, _ = ref
    out = {}
    for label, (dist, seed) in cubes.items():
        alt, m_alt, _ = eval_scene(model, hsi, srf, ratio, gamma, dist, seed, tile)
        change = as_float64(alt) - as_float64(pred)
        out[label] = {"rms_change": float(change.pow(2).mean().sqrt()), "max_change": float(change.abs().max()),
                      "psnr_change": m_alt["psnr"] - m["psnr"]}
    return out


# -----------------------------------------------------------------------------
# the classical baselines

def fit_root_poly(rgb: np.ndarray, spectra: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares map (6, 31) from root-polynomial RGB features (k, 3) to spectra (k, 31).
    Solved in float64 whatever the input: the six features are nearly collinear (cond(F^T F) ~ 4e7 on CAVE
    crops), so float32 normal equations move the baseline's RMSE by ~0.2 % with the last bit of the RGB."""
    f = P.root_poly_features(np.asarray(rgb, dtype=np.float64))
    return np.linalg.solve(f.T @ f + ridge * np.eye(f.shape[1]), f.T @ np.asarray(spectra, dtype=np.float64))

def smoothest_spectra(rgb: np.ndarray, srf: np.ndarray, consistency: float = 1e3) -> np.ndarray:
    """The classical unsupervised answer: per pixel, the smoothest non-negative spectrum whose RGB is the
    pixel's, y = argmin ||D y||^2 subject to S y = x and y >= 0, D the first difference along bands (on the
    three sample training scenes it beat the second difference by 0.6-3.5 dB). rgb (k, 3), srf S (3, 31) ->
    (k, 31). Without y >= 0 the solution is linear, y = Q^-1 S^T (S Q^-1 S^T)^-1 x with Q = D^T D (plus 1e-8 I:
    constants are D's null space, which S y = x pins down); the few pixels where that goes negative are
    solved again by non-negative least squares on [c.S; D] y = [c.x; 0], c large so that S y = x holds to
    ~1e-5. Needs no label, so it is what the unsupervised network must beat."""
    import scipy.optimize  # here: only this baseline needs it, and every command would pay its import time

    rgb, srf = np.asarray(rgb, dtype=np.float64), np.asarray(srf, dtype=np.float64)
    d = np.diff(np.eye(srf.shape[1]), axis=0)  # (30, 31)
    q_inv = np.linalg.inv(d.T @ d + 1e-8 * np.eye(srf.shape[1]))
    y = rgb @ (q_inv @ srf.T @ np.linalg.inv(srf @ q_inv @ srf.T)).T  # (k, 31)
    a, zeros = np.vstack([consistency * srf, d]), np.zeros(len(d))
    for i in np.flatnonzero((y < 0).any(1)):
        y[i] = scipy.optimize.nnls(a, np.concatenate([consistency * rgb[i], zeros]))[0]
    return y

def labels_root_poly(labels: dict) -> tuple[np.ndarray | None, int]:
    """(the (6, 31) root-polynomial map fitted on the run's labelled pixels of all scenes, or None when
    there are fewer than its 6 terms; the number of labelled pixels). The baseline of eval and the map
    of --prior rootpoly are this one fit."""
    rgb = torch.cat([v["rgb"] for v in labels.values()]).numpy()
    spectra = torch.cat([v["spectra"] for v in labels.values()]).numpy()
    return (fit_root_poly(rgb, spectra) if len(rgb) >= 6 else None), len(rgb)

# what fit --prior-library adds to the labelled pixels that --prior rootpoly's map is fitted on (beyond the paper)
PRIOR_LIBRARIES = ("none", "colorchecker")

def with_library(labels: dict, library: str, srf: torch.Tensor) -> dict:
    """A run's expanded label sets plus, under the key "library", a measured reflectance library's spectra
    (n, 31) and their RGB S.y (n, 3), each spectrum one labelled pixel's worth in the fit: the labels of a few
    scenes lack the materials of another, a library of real reflectances holds some (docs/design.md, "A
    reflectance library in the prior"). library "none": the labels as they are."""
    if library == "none":
        return labels
    spectra = torch.from_numpy(np.ascontiguousarray(cameras.COLORCHECKER.T, dtype=np.float32))  # (24, 31)
    return {**labels, "library": {"rgb": spectra @ srf.float().T, "spectra": spectra}}

def prior_map(labels: dict, library: str, srf: torch.Tensor) -> np.ndarray:
    """The (6, 31) map M of fit --prior rootpoly, fitted on a run's expanded label sets and the library (the
    training starts from it: the network's output is |M(X)| at a zero gate), as float32 for the model's buffer."""
    rp, n = labels_root_poly(with_library(labels, library, srf))
    if rp is None:
        raise UsageError(f"--prior rootpoly needs at least 6 labelled pixels to fit its 6 terms, the run has {n} "
                         f"(--prior-library colorchecker adds 24 measured spectra).")
    return rp.astype(np.float32)


# -----------------------------------------------------------------------------
# a spectrometer's points at inference (beyond the paper; predict --points, eval --calib-points)

CALIBRATION_CONVENTION = (
    "K pixels of each scene, drawn once per scene, give their true spectra as a spectrometer would; each "
    "seed's cube is corrected with them (evaluate.calibrate) and the measured spectra pasted in. all: every "
    "pixel of that cube; unmeasured: the other pixels, SSIM of the cube before pasting (no window sees a "
    "true spectrum); local_unmeasured: that cube further corrected where a pixel looks like a point's "
    "material (evaluate.calibrate_locally), at those pixels; uncorrected_unmeasured: the network's own cube "
    "at those same pixels; fed_unmeasured: the network's cube with the K spectra also in its point cube, at "
    "those pixels; fed_calibrated_unmeasured: that cube corrected with them, at those pixels")

CALIB_RIDGE = 16.0  # the residual map's pull toward no correction, in measured points' worth

CALIBRATION_METHOD = ("the exposure the spectra imply, a ridge map of the RGB's root-polynomial terms fitted on "
                      "the network's error at the measured pixels, then each spectrum put back on its pixel's RGB")

def points_exposure(rgb: torch.Tensor, srf: torch.Tensor, coords: np.ndarray, spectra: np.ndarray) -> float:
    """The factor e that best matches measured spectra (k, 31) to the RGB (3, H, W) at their pixels (k, 2),
    S.y ~ e.X, by least squares over the k x 3 values: a photo's exposure is unknown, the spectra know it."""
    x = rgb.double()[:, coords[:, 0], coords[:, 1]].T.numpy()           # (k, 3)
    sy = np.asarray(spectra, dtype=np.float64) @ srf.double().numpy().T  # (k, 3)
    return float((sy * x).sum() / max((x ** 2).sum(), 1e-12))

def calibrate(pred: torch.Tensor, rgb: torch.Tensor, srf: torch.Tensor, coords: np.ndarray,
              spectra: np.ndarray) -> torch.Tensor:
    """The network's cube (31, H, W) corrected with spectra (k, 31) measured at k of its pixels (k, 2)
    (row, col), by low-dimensional maps fitted on those pixels and applied to every pixel. rgb (3, H, W)
    is the network's input and srf (3, 31) the S it was trained with.
      1. exposure: the factor e that best matches the measured spectra's S.y to the RGB at their pixels
         (points_exposure). A photo's exposure is unknown (predict only brings it to the training level);
         the measured spectra know it. For an image rendered from its cube (eval), e = 1.
      2. the network's error y - e.p at the measured pixels as a linear map of the root-polynomial terms of
         e.X (the classical baseline's six terms; they scale with the light, so the map does not care
         about exposure), ridge-regularised toward no correction by CALIB_RIDGE points' worth.
      3. each corrected spectrum moved, by the least change, back onto its pixel's e.X (S.y' = e.X), which
         the correction may have left: the RGB was measured, it stays true.
    Chosen by measurement over a gain per band and weaker ridges (docs/results.md, "Calibration with measured
    points"). It usually lowers SAM, but its PSNR depends on which pixels were measured and can fall by a few dB
    (docs/results.md, "Three training seeds on the shared split"); feeding the points through a --point-path
    network first (predict --use-points both) did not lose PSNR there.
    Returns the corrected cube clamped to [0, 1] (uncorrected where the measured pixels are black in the RGB,
    which says nothing of the exposure); paste puts the measured spectra at their own pixels."""
    h, w = pred.shape[1:]
    idx = coords[:, 0] * w + coords[:, 1]
    s = srf.double().numpy()                                           # (3, 31)
    p = pred.double().reshape(pred.shape[0], -1).T.numpy()             # (H*W, 31)
    x = rgb.double().reshape(3, -1).T.numpy()                          # (H*W, 3)
    y = np.asarray(spectra, dtype=np.float64)                          # (k, 31)
    exposure = points_exposure(rgb, srf, coords, spectra)
    if not exposure > 0:  # black at every measured pixel (or black spectra): no exposure, nothing to fit
        return pred.clamp(0, 1)
    p, x = p * exposure, x * exposure
    f = P.root_poly_features(x)                                          # (H*W, 6)
    ftf = f[idx].T @ f[idx]
    a = np.linalg.solve(ftf + CALIB_RIDGE * np.trace(ftf) / len(idx) * np.eye(6), f[idx].T @ (y - p[idx]))
    return onto_rgb(p + f @ a, x, s, pred)

def onto_rgb(spectra: np.ndarray, x: np.ndarray, s: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Each spectrum (H*W, 31) moved by the least change onto its pixel's RGB x (H*W, 3), S.y' = x, S = s
    (3, 31); returned as a cube shaped and typed as `like` (31, H, W), clamped to [0, 1]."""
    out = spectra + (x - spectra @ s.T) @ np.linalg.pinv(s).T
    return torch.from_numpy(out.T.reshape(like.shape)).clamp(0, 1).to(like.dtype)

LOCAL_ANGLE = 2.0  # degrees between two of the cube's spectra within which they read as one material
LOCAL_REACH = 0.25  # of the image's longer side: how far a point's error carries
LOCAL_GAIN = 1.0    # the largest log-ratio a point may apply per band (x e): a near-black band is no measure

def calibrate_locally(fixed: torch.Tensor, rgb: torch.Tensor, srf: torch.Tensor, coords: np.ndarray,
                      spectra: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    """calibrate's cube (31, H, W) corrected further, pixel by pixel, by the measured points (k, 2) whose
    spectra (k, 31) look like the pixel's material: each point's error as a per-band log-ratio
    g_k = log(y_k / p_k), applied to pixel q as p_q . exp(sum_k w_qk g_k / max(1, sum_k w_qk)), with
    w_qk = exp(-angle(p_q, p_k)^2 / 2 LOCAL_ANGLE^2 - |q - k|^2 / 2 (LOCAL_REACH . side)^2); then each
    spectrum back onto its pixel's e.X as in calibrate. A pixel like no point keeps calibrate's spectrum;
    a pixel like one point takes its full error. The angle alone spreads a point to metamers far away, the
    distance alone would spread it to other materials nearby; both scales were chosen on the regression's
    cubes of the four shared CAVE scenes (docs/results.md, "A local correction")."""
    c, h, w = fixed.shape
    p = fixed.double().reshape(c, -1).T.numpy()                        # (H*W, 31)
    y = np.asarray(spectra, dtype=np.float64)                          # (k, 31)
    pk = p[coords[:, 0] * w + coords[:, 1]]                            # (k, 31)
    gain = np.clip(np.log(np.maximum(y, 1e-4) / np.maximum(pk, 1e-4)), -LOCAL_GAIN, LOCAL_GAIN)
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    rows, cols = np.divmod(np.arange(h * w), w)
    reach = LOCAL_REACH * max(h, w)
    out = np.empty_like(p)
    for part in np.array_split(np.arange(h * w), -(-h * w // chunk)):  # bounded memory: (chunk, k) at a time
        angle = np.degrees(np.arccos(np.clip(unit(p[part]) @ unit(pk).T, -1, 1)))  # (n, k)
        dist2 = (rows[part, None] - coords[:, 0]) ** 2 + (cols[part, None] - coords[:, 1]) ** 2
        wt = np.exp(-0.5 * (angle / LOCAL_ANGLE) ** 2 - 0.5 * dist2 / reach ** 2)
        out[part] = p[part] * np.exp(wt @ gain / np.maximum(1, wt.sum(1))[:, None])
    x = rgb.double().reshape(3, -1).T.numpy() * points_exposure(rgb, srf, coords, spectra)
    return onto_rgb(out, x, srf.double().numpy(), fixed)

def paste(cube: torch.Tensor, coords: np.ndarray, spectra: np.ndarray) -> torch.Tensor:
    """cube (31, H, W) with the measured spectra (k, 31) at their pixels (k, 2): what was measured is known."""
    out = cube.clone()
    out[:, coords[:, 0], coords[:, 1]] = torch.as_tensor(spectra, dtype=out.dtype).T
    return out

def fed_mask(coords: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) bool, True at the measured pixels (k, 2) fed to the network."""
    fed = torch.zeros(1, *shape, dtype=torch.bool)
    fed[0, coords[:, 0], coords[:, 1]] = True
    return fed

def calibration_points(hsi: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """eval --calib-points: k pixels (k, 2) of a scene (H, W, 31), drawn once by seed, and their true spectra
    (k, 31), as a spectrometer would measure them."""
    h, w = hsi.shape[:2]
    if not 0 < k < h * w:
        raise UsageError(f"--calib-points must be between 1 and the scene's {h * w - 1} pixels, got {k}")
    coords = pixel_coords(np.sort(np.random.default_rng(seed).choice(h * w, k, replace=False)), w)
    return coords, hsi[coords[:, 0], coords[:, 1]]

def calibration_scores(runs: list, fed: list, hsi: np.ndarray, srf: torch.Tensor, coords: np.ndarray,
                       spectra: np.ndarray) -> dict[str, list[dict]]:
    """eval --calib-points: per seed, the metrics of its cube corrected with the measured spectra (k, 31) at
    coords (k, 2), over all pixels and over the unmeasured ones, and of the cube the network made with them
    in its point cube (`fed`, the same seeds' (pred, ...)), with and without that correction, over the
    unmeasured pixels (see CALIBRATION_CONVENTION)."""
    h, w = hsi.shape[:2]
    target = torch.from_numpy(hsi).permute(2, 0, 1)
    rgb, target = cameras.rgb_from_hsi(target[None], srf)[0], as_float64(target)
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[coords[:, 0], coords[:, 1]] = False
    scores = {"all": [], "unmeasured": [], "local_unmeasured": [], "uncorrected_unmeasured": [], "fed_unmeasured": [],
              "fed_calibrated_unmeasured": []}
    for (pred, *_), (pred_fed, *_) in zip(runs, fed):
        fixed = calibrate(pred, rgb, srf, coords, spectra)
        scores["all"].append(metrics(paste(fixed, coords, spectra), target))
        scores["unmeasured"].append(metrics(fixed, target, keep))
        scores["local_unmeasured"].append(metrics(calibrate_locally(fixed, rgb, srf, coords, spectra), target, keep))
        scores["uncorrected_unmeasured"].append(metrics(pred, target, keep))
        scores["fed_unmeasured"].append(metrics(pred_fed, target, keep))
        scores["fed_calibrated_unmeasured"].append(metrics(calibrate(pred_fed, rgb, srf, coords, spectra), target, keep))
    return scores

def calibration_line(cal: dict) -> str:
    """One printed line of eval --calib-points: each scored cube's mean PSNR, SSIM, SAM and MRAE."""
    return "; ".join(f"{k}: " + ", ".join(f"{m} {v[m]['mean']:.4f}" for m in ("psnr", "ssim", "sam", "mrae"))
                     for k, v in cal.items() if isinstance(v, dict))


# -----------------------------------------------------------------------------
# eval

def write_outputs(out: Path, pred: torch.Tensor, target: torch.Tensor | None = None, envi: bool = False,
                  exposure: float = 1.0) -> None:
    """Cube (.npy, .mat, and with envi ENVI .hdr + .img), its sRGB preview (at the photo's own exposure:
    cameras.srgb_preview), and for a known target: per-pixel RMSE map and spectral curves."""
    out.mkdir(parents=True, exist_ok=True)
    # (H, W, 31), the on-disk layout, made contiguous once: np.save of a permuted view is much slower than of a
    # copy (docs/performance.md, "Writing the cube")
    cube = np.ascontiguousarray(pred.permute(1, 2, 0).numpy())
    data.save_cube(out / "cube", cube)
    if envi:
        data.save_envi(out / "cube", cube)
    data.save_png(out / "preview.png", cameras.srgb_preview(cube, exposure))
    H, W = cube.shape[:2]
    pix = [(H // 2, W // 2), (H // 4, W // 4), (3 * H // 4, W // 4), (H // 4, 3 * W // 4), (3 * H // 4, 3 * W // 4)]
    cols, rows = ["wavelength_nm"], [list(cameras.WAVELENGTHS)]
    for r, c in pix:
        cols.append(f"pred_{r}_{c}")
        rows.append(cube[r, c].tolist())
        if target is not None:
            cols.append(f"true_{r}_{c}")
            rows.append(target[:, r, c].tolist())
    with open(out / "spectra.csv", "w") as f:
        f.write(",".join(cols) + "\n")
        f.writelines(",".join(f"{v:.6g}" for v in row) + "\n" for row in zip(*rows))
    if target is not None:
        err = ((pred - target) ** 2).mean(0).sqrt().numpy()  # per-pixel RMSE over bands
        data.save_png(out / "error_rmse_0-0.1.png", np.clip(err / 0.1, 0, 1))  # fixed scale: maps compare across runs

def summarise(values: list[dict]) -> dict:
    """Metrics dicts of several Gamma draws -> {metric: {"mean", "std"}} over them."""
    return {k: {"mean": float(np.mean([v[k] for v in values])), "std": float(np.std([v[k] for v in values]))}
            for k in values[0]}

def summarise_over_seeds(by_scene: list[list[dict]]) -> dict:
    """by_scene[i][s]: the metrics of scene i with Gamma seed s. Per seed the mean over scenes, then mean
    and std over seeds: the spread the Gamma draws cause, not the differences between scenes."""
    per_seed = [{k: float(np.mean([runs[s][k] for runs in by_scene])) for k in by_scene[0][s]}
                for s in range(len(by_scene[0]))]
    return summarise(per_seed)


def evaluate(ckpt_path: str | Path, out: str | Path, root: str | None = None, scenes: list[str] | None = None,
             seeds: int = 5, tile: int = 0, calib_points: int = 0, envi: bool = False, device: str = "auto",
             dependence: bool = False) -> dict:
    """Evaluate a checkpoint on whole scenes (default: the run's test scenes, from the run's own data folder
    root, or the demo scenes); write each scene's outputs and metrics.json into out; return the report."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt, pick_device(device), ckpt_path)
    run = ckpt["train_config"]
    srf = torch.from_numpy(cameras.srf_matrix(run["srf"]))
    gamma, points = tuple(ckpt["gamma"]), ckpt["model_config"]["points"]
    root = root or ckpt["data"]  # default: the folder the run trained on
    names = [data.scene_name(n) for n in scenes or ckpt["split"]["test"]]
    if not names:
        raise UsageError(f"{root or 'the demo scenes'}: no test scenes; name some with --scenes.")
    if set(names) & set(ckpt["split"]["train"]):
        print(f"warning: {sorted(set(names) & set(ckpt['split']['train']))} were training scenes.")
    # the classical floor: root-polynomial regression fitted on the very same labelled pixels
    # at image level the checkpoint keeps the rule "every pixel": re-read those training scenes from the
    # folder the run trained on, which --data (the scenes to evaluate) need not be
    every_pixel = [n for n, v in ckpt["labels"].items() if "every_pixel" in v]
    trained_on = data.load_scenes(ckpt["data"], every_pixel)
    labels = expand_label_sets(ckpt["labels"], trained_on, srf)
    rp, n_labels = labels_root_poly(labels)
    # the classical answer beside the network: with labels, that regression; without any (the unsupervised mode),
    # the smoothest non-negative spectrum consistent with the RGB, which needs none; 1 to 5 labelled pixels are
    # too few for the regression's 6 terms. A run whose prior also saw a library: that map too, its start.
    baselines = {}
    if rp is not None:
        baselines["root_poly_baseline"] = ("root-polynomial baseline", lambda x: P.root_poly_features(x) @ rp)
    elif n_labels == 0:
        baselines["smoothest_baseline"] = ("smoothest non-negative spectrum (no labels)",
                                           lambda x: smoothest_spectra(x, srf.numpy()))
    library = run.get("prior_library", "none")  # a run from before --prior-library has none
    if library != "none":
        lp = prior_map(labels, library, srf).astype(np.float64)  # the network's start, as the buffer holds it
        baselines["root_poly_library_baseline"] = (f"root-polynomial on the labels and the {library} (the prior)",
                                                   lambda x: P.root_poly_features(x) @ lp)
    out = Path(out)
    report = {"checkpoint": str(ckpt_path), "label_ratio": run["label_ratio"],
              "labelled_pixels": n_labels, "seeds": list(range(seeds)), **REPORT_CONVENTIONS,
              "provenance": provenance(next(model.parameters()).device), "scenes": {}}
    by_scene, calibrated, baseline_all = [], [], {k: [] for k in baselines}
    for name, hsi in data.load_scenes(root, names).items():
        runs = [eval_scene(model, hsi, srf, run["label_ratio"], gamma, points, s, tile) for s in range(seeds)]
        target = as_float64(torch.from_numpy(hsi).permute(2, 0, 1))  # (31, H, W); after the network's peak
        write_outputs(out / name, runs[0][0], target, envi)
        entry = summarise([m for _, m, _ in runs])
        print(f"{name}: " + ", ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in entry.items()))
        # per band, mean over the seeds
        entry["bands"] = {k: np.mean([b[k] for _, _, b in runs], 0).tolist() for k in runs[0][2]}
        entry["bands"]["true_mean"] = target.mean((1, 2)).tolist()
        for line in band_warnings(name, entry["bands"]):
            print(line)
        rgb = cameras.rgb_from_hsi(hsi, srf.numpy()).reshape(-1, 3)  # (H*W, 3), what every baseline reads
        for base_key, (_, baseline) in baselines.items():
            base = torch.from_numpy(baseline(rgb).reshape(hsi.shape)).permute(2, 0, 1).float()
            entry[base_key] = metrics(base.clamp(0, 1), target)
            baseline_all[base_key].append(entry[base_key])
            entry[base_key]["bands"] = band_stats(base, target)
        if calib_points:
            measured = calibration_points(hsi, calib_points, scene_seed(run["seed"], f"{name} calib"))
            fed = [eval_scene(model, hsi, srf, run["label_ratio"], gamma, points, s, tile, measured)
                   for s in range(seeds)]
            scores = calibration_scores(runs, fed, hsi, srf, *measured)
            entry["calibration"] = {"points": calib_points, **{k: summarise(v) for k, v in scores.items()}}
            calibrated.append(scores)
            print(f"{name}, corrected with {calib_points} true spectra: {calibration_line(entry['calibration'])}")
        if dependence:
            entry["point_dependence"] = point_dependence(model, hsi, srf, run["label_ratio"], gamma, points, runs[0],
                                                         tile)
            print(f"{name}, the point cube replaced: " + "; ".join(
                f"{k}: RMS change {v['rms_change']:.2e}, PSNR change {v['psnr_change']:+.2e} dB"
                for k, v in entry["point_dependence"].items()))
        report["scenes"][name] = entry
        by_scene.append([m for _, m, _ in runs])
    report["overall"] = summarise_over_seeds(by_scene)
    if calibrated:
        report["calibration"] = {"points": calib_points, "convention": CALIBRATION_CONVENTION,
                                 **{k: summarise_over_seeds([c[k] for c in calibrated]) for k in calibrated[0]}}
    if dependence:
        per_scene = [e["point_dependence"] for e in report["scenes"].values()]
        report["point_dependence"] = {k: {q: float(np.mean([d[k][q] for d in per_scene])) for q in v}
                                      for k, v in per_scene[0].items()}
    for base_key, values in baseline_all.items():
        report[base_key] = summarise([{k: v for k, v in b.items() if k != "bands"} for b in values])
    with open(out / "metrics.json", "w") as f:
        json.dump(report, f, indent=2)
    print("overall: " + ", ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in report["overall"].items()))
    if calibrated:
        print(f"overall, corrected with {calib_points} true spectra: {calibration_line(report['calibration'])}")
    for base_key, (base_name, _) in baselines.items():
        print(f"{base_name}: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in report[base_key].items()))
    print(f"wrote {out / 'metrics.json'}")
    return report


# what metrics.json says of its own numbers
REPORT_CONVENTIONS = {
    "psnr_convention": "psnr: 10 log10(1/MSE) over the whole cube per image; psnr_bandwise: mean of per-band PSNR",
    "mrae_convention": f"mrae: mean over pixels and bands of |pred - truth| / max(truth, {P.MRAE_EPS:g}), "
                       f"per image; sam: a pixel black in both is 0 degrees",
    "overall_convention": "per seed the mean over scenes; then mean and std over seeds",
    "bands_convention": "per scene, mean over seeds: band_rmse of the output clamped to [0, 1], "
                        "band_raw_mean of the raw (unclamped) output, true_mean of the truth",
}


# -----------------------------------------------------------------------------
# the command line

def add_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", default=None, help="default: the run's own data folder (or the demo scenes)")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--seeds", type=positive, default=5, help="Gamma draws per scene (mean +- std)")
    e.add_argument("--scenes", nargs="*", default=None, help="default: the run's test scenes")
    e.add_argument("--tile", type=int, default=0, help="0 = whole image (the protocol); >0 bounds memory")
    e.add_argument("--calib-points", type=int, default=0, metavar="K",
                   help="also score predict --points: K pixels of each scene's own truth fed to the network "
                        "and/or correcting its cube, scored over the unmeasured pixels (beyond the paper)")
    e.add_argument("--point-dependence", action="store_true",
                   help="also run each scene with another seed's, the other distribution's and an empty point cube, "
                        "and report how much the output changes")
    e.add_argument("--envi", action="store_true", help="also write the cube as ENVI (cube.hdr + cube.img, BSQ)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> dict:
    return evaluate(args.ckpt, args.out, args.data, args.scenes, args.seeds, args.tile, args.calib_points,
                    args.envi, args.device, args.point_dependence)
