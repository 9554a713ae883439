"""
`python train.py predict`: a 31-band cube from your own photo, optionally corrected with measured spectra.

A photo is not the model's RGB: it is gamma-encoded sRGB, white-balanced, exposed at will. predict
turns it into S.Y-like values at the level the model was trained on, says when it still looks unlike
them, reconstructs it (whole up to WHOLE_MAX pixels, as eval does; in overlapping tiles beyond), and with
--points uses a spectrometer's measurements, in the network's point cube and to correct its cube
(evaluate.calibrate, and with --calibration local evaluate.calibrate_locally; beyond the paper).
  - decoding: sRGB -> linear light -> the model's RGB (cameras.model_rgb_from_srgb)    photo_rgb
  - exposure to the training level, out-of-distribution warnings     exposure_gain, photo_warnings
  - a spectrometer's points in the point cube and/or correcting the cube   reconstruct_with_points
  - the command                                                       predict, add_arguments, run

Glossary: X = rgb (H, W, 3) in the model's space, S.Y; S = srf; Y_g^p = the seeded Gamma point cube.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

import cameras
import data
import pixelssr as P
from evaluate import (CALIBRATION_METHOD, calibrate, calibrate_locally, fed_mask, paste, points_exposure,
                      reconstruct, write_outputs)
from runs import UsageError, build_model, load_checkpoint, pick_device, positive, seeded

CLIPPED = 1 - 0.5 / 255    # a channel this close to full scale recorded more light than it holds

WHOLE_MAX = 1024 * 1024    # predict runs images up to this many pixels whole, as eval does; tiles beyond

TILE = 512                 # predict's tile beyond WHOLE_MAX; reconstruct overlaps tiles by a quarter

BALANCE = 1.5              # warn when a channel's share of the photo's mean is this far off the training's


def photo_rgb(path: str, kind: str, srf: str) -> tuple[np.ndarray, str, float]:
    """(rgb (H, W, 3) in the model's space, the input kind used, fraction of pixels clipped in a channel).

    kind "srgb": sRGB-encoded (8-bit JPEG / PNG, the default for them): decoded to linear light, then
    mapped by cameras.model_rgb_from_srgb to S.Y. kind "linear" (the default for 16-bit files): the values
    are the model's RGB already, S.Y as eval renders a cube, taken as they are."""
    raw = data.load_rgb(path)
    kind = kind if kind != "auto" else ("srgb" if data.bit_depth(path) == 8 else "linear")
    clipped = float((raw >= CLIPPED).any(-1).mean())
    if kind == "srgb":
        raw = np.clip(cameras.srgb_to_linear(raw) @ cameras.model_rgb_from_srgb(srf).T, 0, None)  # out-of-gamut: 0
    return np.ascontiguousarray(raw, dtype=np.float32), kind, clipped

def training_rgb(ckpt: dict) -> np.ndarray:
    """(k, 3) RGB the model was trained on: its labelled pixels' (an unbiased sample of the training RGB);
    with no labels, (1, 3) grey at the Gamma's mean, which was then fitted to the training RGB values; at
    image level (the checkpoint keeps only the rule "every pixel", labels.make_label_sets, and the training
    scenes need not be on this machine) that grey too, the Gamma then fitted to every training spectrum."""
    sets = list(ckpt["labels"].values())
    rgb = torch.cat([v["rgb"] for v in sets]).numpy() if all("rgb" in v for v in sets) else np.zeros((0, 3))
    return rgb if len(rgb) else np.full((1, 3), ckpt["gamma"][0] * ckpt["gamma"][1], np.float32)

def exposure_gain(rgb: np.ndarray, train_rgb: np.ndarray) -> tuple[float, str]:
    """The factor that brings a photo to the training exposure, and the sentence saying how it was chosen:
    the photo's mean to the training RGB's mean, held back if that would push its brightest 0.1 % of
    values past 1, beyond anything the model saw (training RGB = S.Y of reflectances <= 1)."""
    mean, level, top = float(rgb.mean()), float(train_rgb.mean()), float(np.percentile(rgb, 99.9))
    gain = level / max(mean, 1e-6)
    why = f"the photo's mean {mean:.4f} to the training RGB's {level:.4f}"
    if gain * top > 1:
        gain, why = 1 / top, why + f", held back so that its brightest 0.1 % ({top:.4f}) stay at or below 1"
    return gain, why

def photo_warnings(rgb: np.ndarray, clipped: float, train_rgb: np.ndarray) -> list[str]:
    """Out-of-distribution signs: clipped highlights (over 1 % of the pixels), and a channel balance (each
    channel's share of the mean RGB) off the training data's by more than BALANCE times."""
    out = []
    if clipped > 0.01:
        out.append(f"{100 * clipped:.1f} % of the pixels are clipped in at least one channel; the spectra "
                   f"of saturated highlights are guesses")
    share, train = rgb.mean((0, 1)) / rgb.mean((0, 1)).sum(), train_rgb.mean(0) / train_rgb.mean(0).sum()
    if np.any(np.maximum(share / train, train / share) > BALANCE):
        out.append(f"the photo's channel balance R:G:B = {share[0]:.2f}:{share[1]:.2f}:{share[2]:.2f} is far from "
                   f"the training data's {train[0]:.2f}:{train[1]:.2f}:{train[2]:.2f} (a colour cast, or a white "
                   f"balance unlike the training light)")
    return [f"warning: {w}." for w in out]


def predict(ckpt_path: str | Path, image: str | Path, out: str | Path, points: str | None = None, seed: int = 0,
            kind: str = "auto", exposure: str | None = None, tile: int | None = None, envi: bool = False,
            device: str = "auto", use_points: str | None = None, calibration: str = "global") -> torch.Tensor:
    """Reconstruct the photo `image` with a checkpoint; write the cube and its preview into out; return the
    cube (31, H, W). kind, exposure, tile, use_points and calibration as the flags --input, --exposure, --tile,
    --use-points (None: both for a run trained with --measured-points, else calibration) and --calibration."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt, pick_device(device), ckpt_path)
    srf_name = ckpt["train_config"]["srf"]
    srf = torch.from_numpy(cameras.srf_matrix(srf_name))
    rgb, kind, clipped = photo_rgb(image, kind, srf_name)
    train_rgb = training_rgb(ckpt)
    chosen = exposure or ("auto" if kind == "srgb" else "1")  # linear input: as eval renders a cube
    if chosen == "auto":
        gain, why = exposure_gain(rgb, train_rgb)
    else:
        gain, why = float(chosen), "as given" if exposure else "linear input keeps its exposure"
    print(f"input: {kind}{' (decoded to linear, mapped to the model RGB)' if kind == 'srgb' else ''}; "
          f"exposure: x{gain:.4g} ({why})")
    rgb = rgb * gain
    for line in photo_warnings(rgb, clipped, train_rgb):
        print(line)
    rgb = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    H, W = rgb.shape[-2:]
    tile = tile if tile is not None else (0 if H * W <= WHOLE_MAX else TILE)
    pts = P.sample_points((1, 31, H, W), ckpt["train_config"]["label_ratio"], *ckpt["gamma"], generator=seeded(seed),
                          dist=ckpt["model_config"]["points"])[0]
    if points:
        use = use_points or ("both" if ckpt["train_config"].get("measured_points") else "calibration")
        pred = reconstruct_with_points(model, rgb, pts, tile, srf, points, use, calibration)
    else:
        pred = reconstruct(model, rgb, pts, tile).clamp(0, 1).cpu()
    write_outputs(Path(out), pred, envi=envi, exposure=gain)
    print(f"wrote a {tuple(pred.shape)} cube to {Path(out) / 'cube.npy'}, .mat{', .hdr/.img' if envi else ''}"
          + (f" (tiles of {tile})" if tile else ""))
    return pred


def reconstruct_with_points(model: P.DyProMamba, rgb: torch.Tensor, pts: torch.Tensor, tile: int, srf: torch.Tensor,
                            points: str, use: str, calibration: str = "global") -> torch.Tensor:
    """The cube (31, H, W) of rgb (3, H, W) with the spectra measured in the file `points`: in the point cube
    pts (31, H, W) at their pixels (use "network" or "both"), correcting the network's cube (evaluate.calibrate;
    "calibration" or "both"; then evaluate.calibrate_locally with calibration "local"), and in any case pasted
    at their pixels, the cube at their scale."""
    coords, spectra = data.read_points(points, *rgb.shape[-2:])
    scale = points_exposure(rgb, srf, coords, spectra)  # S.y = scale.X at the measured pixels
    if not scale > 0:
        raise UsageError(f"{points}: the measured spectra do not match the image's colours at their pixels "
                         f"(exposure factor {scale:.3g}); check their rows and columns.")
    fed = None
    if use in ("network", "both"):  # at the RGB's exposure, as training fed them
        pts, fed = paste(pts, coords, spectra / scale), fed_mask(coords, rgb.shape[-2:])
        print(f"the {len(coords)} measured spectra of {points} enter the network's point cube at their pixels")
    pred = reconstruct(model, rgb, pts, tile, fed=fed).clamp(0, 1).cpu()
    if use in ("calibration", "both"):
        pred = calibrate(pred, rgb, srf, coords, spectra)
        print(f"corrected with the {len(coords)} measured spectra of {points} ({CALIBRATION_METHOD})")
        if calibration == "local":
            pred = calibrate_locally(pred, rgb, srf, coords, spectra)
            print("then corrected locally: each pixel by the points whose spectra and places are like its own")
    else:  # the cube at the spectra's scale, as calibrate's first step brings it
        pred = (pred * scale).clamp(0, 1)
    print(f"the measured spectra replace the reconstruction at their pixels; the cube is at their scale "
          f"(x{scale:.4g} the network's input)")
    return paste(pred, coords, spectra)


# -----------------------------------------------------------------------------
# the command line

def exposure_arg(text: str) -> str:
    """argparse type: 'auto' or a positive factor."""
    try:
        if text == "auto" or float(text) > 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a positive factor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True)
    p.add_argument("--rgb", required=True, help="PNG or JPEG, 8 or 16 bit")
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gamma point cube")
    p.add_argument("--input", default="auto", choices=["auto", "srgb", "linear"],
                   help="srgb: a camera's gamma-encoded photo; linear: the model's RGB (S.Y); "
                        "auto (default): srgb for 8-bit files, linear for 16-bit")
    p.add_argument("--exposure", type=exposure_arg, default=None,
                   help="auto (default for srgb): the photo's mean to the training RGB's; or a factor "
                        "(default 1 for linear input)")
    p.add_argument("--points", default=None, metavar="FILE.csv",
                   help="spectra you measured in this image (row, col, 31 values at 400-700 nm a line): fed to "
                        "the network and/or correcting its cube (--use-points), and kept at their pixels (beyond the paper)")
    p.add_argument("--use-points", default=None, choices=["both", "network", "calibration"],
                   help="what --points does: enter the network's point cube (they reach the output of a run "
                        "trained with --measured-points --point-path; other runs ignore them), correct its cube "
                        "afterwards (evaluate.calibrate), or both; default: both for a run trained with "
                        "--measured-points, else calibration")
    p.add_argument("--calibration", default="global", choices=["global", "local"],
                   help="the correction of --use-points calibration|both: global (one map for every pixel), or "
                        "local (then each pixel also by the points that look like its material; "
                        "evaluate.calibrate_locally)")
    p.add_argument("--tile", type=positive, default=None,
                   help=f"tile size (default: the whole image, as eval, up to {WHOLE_MAX} pixels; tiles of {TILE} beyond)")
    p.add_argument("--envi", action="store_true", help="also write the cube as ENVI (cube.hdr + cube.img, BSQ)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> torch.Tensor:
    return predict(args.ckpt, args.rgb, args.out, args.points, args.seed, args.input, args.exposure, args.tile,
                   args.envi, args.device, args.use_points, args.calibration)
