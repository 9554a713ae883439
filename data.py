"""
Data for Pixel-SSR: hyperspectral scenes, RGB rendering, label sets, training patches, demo scenes.

Paper: "From Image- to Pixel-level: Label-efficient Hyperspectral Image Reconstruction" (Leng et al.,
2025). The network sees an RGB image X and learns a 31-band HSI (400-700 nm in 10 nm steps) from a
few measured point spectra per scene. This file prepares everything it sees:
  - reading scenes: CAVE folders of PNG bands as downloaded, .mat (v5, and v7.3 as
    NTIRE / ARAD and ICVL ship them) and .npy cubes                                   load_scene
  - the CAVE protocol: 12 fixed test scenes, the other 20 train                      find_scenes, split_scenes
  - RGB from HSI with a spectral response S, X = S.Y (the projection of L_rep, Eq. (14))  srf_matrix, rgb_from_hsi
  - the label budget of Sec. 3.1, Eq. (2): max(1, floor(omega.H.W)) fixed pixels per
    training scene, drawn once from a seed, as a spectrometer measures fixed points   draw_label_set
  - training patches that carry their labelled pixels through crops, flips, rotations PatchDataset
  - synthetic demo scenes from measured ColorChecker spectra (no download needed)     demo_scenes
  - reading the user's RGB images and photos (sRGB to the model's RGB)               load_rgb, model_rgb_from_srgb
  - writing results: .npy / .mat cubes, ENVI (.hdr + raw BSQ), PNG                  save_cube, save_envi, save_png

Conventions: files and numpy arrays are (H, W, bands) as CAVE and MATLAB store them; tensors are
(b, c, H, W); values are reflectance-like in [0, 1].

Glossary (code name = paper symbol):
  ratio  = omega, the label ratio              labels = the labelled pixels, (k, 2) (row, col)
  hsi    = Y, the ground-truth HSI              target = Y^p, point spectra ground truth at labelled pixels
  rgb    = X = S.Y, the RGB image               srf    = S, the 3x31 spectral response
"""

import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

BANDS = 31
WAVELENGTHS = np.arange(400, 701, 10)  # nm, band i of every cube; CAVE's PNG band NN is 400 + 10 (NN - 1)

# The 12 CAVE test scenes of the first author's earlier work; the other 20 CAVE scenes train.
CAVE_TEST_SCENES = ("balloons", "clay", "egyptian_statue", "fake_and_real_beers", "fake_and_real_lemons",
                    "fake_and_real_peppers", "fake_and_real_tomatoes", "hairs", "real_and_fake_apples",
                    "real_and_fake_peppers", "stuffed_toys", "thread_spools")

# Spectral responses at 400, 410, ..., 700 nm (rows), three columns each, copied from ../shared/data/srf:
# CIE 1964 10-degree and CIE 1931 2-degree observers (x, y, z; colour-science, BSD-3), and measured camera
# sensitivities (R, G, B; Jiang, Liu, Gu, Suesstrunk, WACV 2013). srf_matrix() normalises them.
SRF_TABLES = {
    "cie1964": (
        (0.0191097, 0.0020044, 0.0860109),
        (0.084736, 0.008756, 0.389366),
        (0.204492, 0.021391, 0.972542),
        (0.314679, 0.038676, 1.55348),
        (0.383734, 0.062077, 1.96728),
        (0.370702, 0.089456, 1.9948),
        (0.302273, 0.128201, 1.74537),
        (0.195618, 0.18519, 1.31756),
        (0.080507, 0.253589, 0.772125),
        (0.016172, 0.339133, 0.415254),
        (0.003816, 0.460777, 0.218502),
        (0.037465, 0.606741, 0.112044),
        (0.117749, 0.761757, 0.060709),
        (0.236491, 0.875211, 0.030451),
        (0.376772, 0.961988, 0.013676),
        (0.529826, 0.991761, 0.003988),
        (0.705224, 0.99734, -1.3552527e-20),
        (0.878655, 0.955552, 0),
        (1.01416, 0.868934, 0),
        (1.11852, 0.777405, 0),
        (1.12399, 0.658341, 0),
        (1.03048, 0.527963, 0),
        (0.856297, 0.398057, 0),
        (0.647467, 0.283493, 0),
        (0.431567, 0.179828, 0),
        (0.268329, 0.107633, 0),
        (0.152568, 0.060281, 0),
        (0.0812606, 0.0318004, 0),
        (0.0408508, 0.0159051, 0),
        (0.0199413, 0.0077488, 0),
        (0.00957688, 0.00371774, 0),
    ),
    "cie1931": (
        (0.01431, 0.000396, 0.06785001),
        (0.04351, 0.00121, 0.2074),
        (0.13438, 0.004, 0.6456),
        (0.2839, 0.0116, 1.3856),
        (0.34828, 0.023, 1.74706),
        (0.3362, 0.038, 1.77211),
        (0.2908, 0.06, 1.6692),
        (0.19536, 0.09098, 1.28764),
        (0.09564, 0.13902, 0.8129501),
        (0.03201, 0.20802, 0.46518),
        (0.0049, 0.323, 0.272),
        (0.0093, 0.503, 0.1582),
        (0.06327, 0.71, 0.07824999),
        (0.1655, 0.862, 0.04216),
        (0.2904, 0.954, 0.0203),
        (0.4334499, 0.9949501, 0.008749999),
        (0.5945, 0.995, 0.0039),
        (0.7621, 0.952, 0.0021),
        (0.9163, 0.87, 0.001650001),
        (1.0263, 0.757, 0.0011),
        (1.0622, 0.631, 0.0008),
        (1.0026, 0.503, 0.00034),
        (0.8544499, 0.381, 0.00019),
        (0.6424, 0.265, 4.999999e-05),
        (0.4479, 0.175, 2e-05),
        (0.2835, 0.107, 2.1175824e-22),
        (0.1649, 0.061, 0),
        (0.0874, 0.032, 0),
        (0.04677, 0.017, 0),
        (0.0227, 0.00821, 0),
        (0.01135916, 0.004102, 0),
    ),
    "nikon_d700": (
        (0.0017775, 0.0014335, 0.0059157),
        (0.0027445, 0.001874, 0.014395),
        (0.048766, 0.02308, 0.37455),
        (0.05565, 0.043356, 0.65271),
        (0.039817, 0.059914, 0.75309),
        (0.031348, 0.082364, 0.90218),
        (0.026632, 0.13356, 0.91167),
        (0.02811, 0.24498, 0.86787),
        (0.032437, 0.35961, 0.81577),
        (0.029863, 0.40937, 0.64403),
        (0.031673, 0.57699, 0.46041),
        (0.038347, 0.76619, 0.27786),
        (0.06215, 0.90061, 0.13072),
        (0.075373, 1, 0.064085),
        (0.039432, 0.95495, 0.031748),
        (0.021926, 0.88728, 0.015075),
        (0.02526, 0.74714, 0.0074314),
        (0.095391, 0.6249, 0.0053662),
        (0.49461, 0.45115, 0.0041164),
        (0.74372, 0.2869, 0.0026565),
        (0.71172, 0.14489, 0.001269),
        (0.61752, 0.065037, 0.00075685),
        (0.51236, 0.031947, 0.00050643),
        (0.41128, 0.019449, 0.0003322),
        (0.3198, 0.012242, 0.0003053),
        (0.24236, 0.0081427, 0.00039176),
        (0.16547, 0.0059358, 0.00023539),
        (0.082116, 0.0042266, 0.00018848),
        (0.02628, 0.0020565, 8.047e-05),
        (0.0073938, 0.0008812, 4.5734e-05),
        (0.0028568, 0.00048014, 3.4504e-05),
    ),
    "canon_5dmarkii": (
        (0.0019, 0.0036, 0.0127),
        (0.0045, 0.0123, 0.0971),
        (0.0103, 0.0377, 0.3516),
        (0.0055, 0.0422, 0.4765),
        (0.0034, 0.0565, 0.56),
        (0.0021, 0.0704, 0.6476),
        (0.0023, 0.097, 0.7745),
        (0.0039, 0.209, 0.6759),
        (0.0073, 0.43, 0.6858),
        (0.0118, 0.6381, 0.5932),
        (0.0179, 0.692, 0.3971),
        (0.0612, 1, 0.3559),
        (0.0874, 0.8735, 0.1617),
        (0.1534, 0.9058, 0.0883),
        (0.1686, 0.8326, 0.0551),
        (0.1724, 0.8057, 0.0424),
        (0.2003, 0.712, 0.0269),
        (0.3158, 0.6467, 0.0205),
        (0.4514, 0.5426, 0.0159),
        (0.5258, 0.3935, 0.0122),
        (0.5989, 0.2958, 0.01),
        (0.4728, 0.1287, 0.0054),
        (0.4084, 0.06, 0.0036),
        (0.3562, 0.0402, 0.0032),
        (0.292, 0.0276, 0.0029),
        (0.226, 0.0182, 0.0032),
        (0.1704, 0.0138, 0.0032),
        (0.1372, 0.0143, 0.0034),
        (0.0428, 0.0061, 0.0013),
        (0.0087, 0.0017, 0.0005),
        (0.0017, 0.0008, 0.0004),
    ),
}

# The 24 X-Rite ColorChecker patches (BabelColor average of measured charts; colour-science, BSD-3), from
# ../shared/data/reflectance, in thousandths of reflectance (the source has three decimals). Columns:
# dark skin, light skin, blue sky, foliage, blue flower, bluish green, orange, purplish blue, moderate red,
# purple, yellow green, orange yellow, blue, green, red, yellow, magenta, cyan, white 9.5, neutral 8,
# neutral 6.5, neutral 5, neutral 3.5, black 2.
_COLORCHECKER_PERMILLE = (
    ( 61,175,251, 56,294,247, 53,229,131,146, 62, 63,102, 54, 48, 52,283,192,423,365,272,163, 84, 32),  # 400
    ( 62,191,306, 57,375,297, 54,286,135,169, 63, 64,146, 55, 47, 52,346,236,660,507,331,180, 87, 33),  # 410
    ( 62,196,324, 58,408,320, 54,327,133,178, 64, 64,200, 57, 47, 53,362,261,811,567,350,186, 89, 33),  # 420
    ( 62,199,330, 59,421,337, 55,361,132,173, 66, 64,244, 59, 47, 54,354,286,862,583,357,190, 90, 33),  # 430
    ( 62,204,333, 60,426,355, 55,388,130,158, 69, 65,282, 61, 47, 56,334,317,877,588,361,193, 92, 33),  # 440
    ( 62,213,331, 61,426,381, 55,400,128,139, 75, 66,309, 66, 47, 59,306,353,884,590,363,194, 92, 33),  # 450
    ( 62,228,323, 62,419,419, 56,392,125,119, 85, 67,308, 75, 46, 67,276,390,891,591,363,194, 91, 32),  # 460
    ( 62,251,311, 63,403,466, 57,362,120,101,105, 68,278, 93, 45, 81,248,426,896,590,361,192, 90, 32),  # 470
    ( 62,280,298, 65,379,510, 58,316,115, 87,139, 71,231,125, 44,107,218,446,899,588,359,191, 90, 32),  # 480
    ( 63,309,285, 67,346,546, 61,260,110, 75,192, 76,178,178, 44,152,190,444,904,588,358,191, 90, 32),  # 490
    ( 65,329,269, 75,311,567, 68,209,105, 66,271, 87,130,246, 45,225,168,423,907,589,358,191, 90, 32),  # 500
    ( 70,333,250,101,281,574, 89,168,100, 60,376,125, 94,307, 46,336,149,385,909,589,359,192, 90, 32),  # 510
    ( 76,315,231,145,254,569,125,138, 95, 56,476,206, 70,337, 47,462,127,337,911,591,360,192, 90, 32),  # 520
    ( 79,286,214,178,229,551,154,117, 93, 53,531,305, 54,334, 48,559,107,283,910,590,360,192, 90, 32),  # 530
    ( 81,273,199,184,214,524,174,104, 92, 51,549,383, 46,317, 49,616,100,231,911,590,361,192, 90, 32),  # 540
    ( 84,276,185,170,208,488,199, 96, 93, 51,546,431, 42,293, 50,650,102,185,914,590,361,192, 90, 32),  # 550
    ( 91,277,169,149,202,445,248, 90, 96, 52,528,469, 39,262, 54,672,104,146,913,589,360,192, 90, 32),  # 560
    (103,289,157,133,194,400,335, 86,108, 52,504,518, 38,230, 60,694,109,118,916,591,362,193, 90, 32),  # 570
    (119,339,149,122,193,350,444, 84,156, 51,471,568, 38,198, 72,710,137,101,915,590,362,192, 90, 32),  # 580
    (134,420,145,115,200,299,538, 84,265, 52,428,607, 38,165,104,723,200, 90,916,590,361,192, 89, 32),  # 590
    (143,488,142,109,214,252,587, 84,399, 58,381,628, 38,135,178,731,290, 82,914,587,359,191, 89, 32),  # 600
    (147,525,141,105,230,221,595, 84,500, 73,347,637, 39,115,312,739,400, 76,915,585,358,189, 88, 32),  # 610
    (151,546,141,104,241,204,591, 84,556, 96,327,640, 39,104,467,746,516, 74,918,583,355,188, 87, 32),  # 620
    (158,562,141,106,254,196,587, 85,579,119,318,642, 40, 98,581,752,615, 73,919,580,352,186, 86, 32),  # 630
    (168,578,143,109,279,191,584, 90,588,141,312,645, 41, 94,644,758,687, 73,921,578,350,184, 86, 32),  # 640
    (179,595,147,112,313,188,584, 98,591,166,310,648, 42, 92,675,764,732, 74,923,576,348,182, 85, 32),  # 650
    (188,612,152,114,348,191,590,109,593,194,314,651, 44, 93,690,769,760, 76,924,574,345,181, 84, 32),  # 660
    (190,625,154,114,366,199,603,123,594,227,327,653, 45, 97,698,771,774, 77,922,572,343,179, 84, 32),  # 670
    (186,638,150,112,366,212,620,143,598,265,345,657, 46,102,706,776,783, 76,922,571,340,178, 83, 32),  # 680
    (181,656,144,112,359,223,639,169,602,309,363,664, 46,108,715,782,793, 75,925,569,338,176, 83, 32),  # 690
    (182,678,136,115,358,232,655,205,607,355,376,673, 48,113,724,790,803, 73,927,568,335,174, 82, 32),  # 700
)
COLORCHECKER = np.array(_COLORCHECKER_PERMILLE) / 1000  # (31, 24) reflectance, one column per patch


class SceneError(Exception):
    """A scene file or folder, or a scene selection, that cannot be used; the message is one sentence
    naming the file (or scene) and the problem, so that train.py prints it without a traceback."""


# -----------------------------------------------------------------------------
# Reading scenes

_BAND_PNG = re.compile(r"[^.].*_(\d+)\.png", re.IGNORECASE)  # <scene>_ms_NN.png; hidden files (._x) excluded
_DEEP_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1.0}  # Pillow modes above 8 bit
_PLAIN_MODES = ("L", "LA", "RGB", "RGBA")  # 8-bit modes numpy reads as they are


def _png_16bit_colour(path: Path, rawmode: str) -> np.ndarray:
    """A 16-bit colour PNG at its full precision: (H, W, 3 or 4) float32 in [0, 1].

    Pillow has no 16-bit colour mode: it unfilters the PNG's big-endian samples and keeps each one's
    high byte (rawmode "RGB;16B"). Decoding the same data again as little-endian ("RGB;16L") keeps the
    other byte, the low one; the two together are the 16-bit values. Pillow's own decoder does the
    inflating and unfiltering both times, so nothing of PNG is re-implemented here."""
    planes = []
    for raw in (rawmode, rawmode.replace(";16B", ";16L")):
        with Image.open(path) as img:
            img.tile = [t._replace(args=raw) for t in img.tile]
            img.load()
            planes.append(np.asarray(img, dtype=np.float32))
    high, low = planes
    return (high * 256 + low) / 65535


def _read_image(path: Path) -> np.ndarray:
    """Any image Pillow reads -> (H, W, channels) float32 in [0, 1]. 16-bit grey and 16-bit colour PNGs
    are divided by 65535 and 8-bit images by 255; palette and other modes become RGB. Raises SceneError
    naming the file."""
    try:
        with Image.open(path) as img:
            rawmode = img.tile[0].args if img.format == "PNG" and len(img.tile) == 1 else None
            if rawmode in ("RGB;16B", "RGBA;16B"):
                return _png_16bit_colour(path, rawmode)  # PNGs keep no EXIF orientation to apply
            img.load()
            img = ImageOps.exif_transpose(img)  # phone JPEGs: the pixels as viewers show them
            if img.mode in _DEEP_MODES:
                a = np.asarray(img, dtype=np.float32)[..., None] / _DEEP_MODES[img.mode]
            else:
                img = img if img.mode in _PLAIN_MODES else img.convert("RGB")
                a = np.asarray(img, dtype=np.float32).reshape(img.height, img.width, -1) / 255
    except Exception as e:  # Pillow signals broken files with many exception types (OSError, SyntaxError, ...)
        raise SceneError(f"{path}: not a readable image ({str(e).rstrip('.')})") from None
    return np.clip(a, 0, 1)  # "I" and "F" modes can hold values outside the 16-bit / unit range


def bit_depth(path) -> int:
    """Bits per sample of an image file: 16 for 16-bit PNGs (grey or colour) and deep TIFFs, else 8."""
    with Image.open(path) as img:
        deep = img.mode in _DEEP_MODES or (img.format == "PNG" and ";16" in str(img.tile[0].args if img.tile else ""))
    return 16 if deep else 8


def _band_files(folder: Path) -> dict[int, Path]:
    """{band number: file} of the <scene>_NN.png images directly in `folder`; other files are ignored
    (CAVE downloads hold a *_RGB.bmp and Thumbs.db beside the bands)."""
    bands: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        m = _BAND_PNG.fullmatch(f.name)
        if m and f.is_file():
            n = int(m.group(1))
            if n in bands:
                raise SceneError(f"{f}: a second image for band {n:02d} beside {bands[n].name}")
            bands[n] = f
    return bands


def _band_folder(path: Path) -> Path | None:
    """The folder holding the band PNGs: `path` itself (CAVE's inner folder) or its single subfolder
    that has them (CAVE's outer folder <scene>_ms/<scene>_ms/); None when there is none."""
    if _band_files(path):
        return path
    subs = [d for d in sorted(path.iterdir()) if d.is_dir() and _band_files(d)]
    return subs[0] if len(subs) == 1 else None


def _numbers(ns: list[int]) -> str:
    return ", ".join(f"{n:02d}" for n in ns)


def _load_png_folder(path: Path) -> np.ndarray:
    folder = _band_folder(path)
    if folder is None:
        raise SceneError(f"{path}: no band images named <scene>_NN.png here or in a single subfolder")
    bands = _band_files(folder)
    expected = set(range(1, BANDS + 1))
    if set(bands) != expected:
        missing, extra = sorted(expected - set(bands)), sorted(set(bands) - expected)
        problems = [f"{what} band {_numbers(ns)}" for what, ns in (("missing", missing), ("unexpected", extra)) if ns]
        raise SceneError(f"{folder}: found {len(bands)} band images where 31 numbered 01-31 are expected "
                         f"({'; '.join(problems)})")
    planes = []
    # Pillow decodes without holding the GIL: on 2 cores two threads read a 512x512 scene in 0.05 s, not 0.09 s.
    # The results come in band order, so the first band with a problem is the one named, as read one by one.
    with ThreadPoolExecutor(min(BANDS, os.cpu_count() or 1)) as pool:
        for n, image in enumerate(pool.map(_read_image, [bands[n] for n in range(1, BANDS + 1)]), 1):
            plane = image[..., 0]  # multi-channel bands (CAVE's watercolors_ms): the first channel
            if planes and plane.shape != planes[0].shape:
                raise SceneError(f"{bands[n]}: band image is {plane.shape[1]}x{plane.shape[0]} pixels "
                                 f"but band 01 is {planes[0].shape[1]}x{planes[0].shape[0]}")
            planes.append(plane)
    return np.stack(planes, axis=-1)


def _one_cube(arrays: dict[str, np.ndarray], path: Path) -> tuple[str, np.ndarray]:
    """The one 3-D array with 31 bands (first or last axis) among a file's variables, or SceneError."""
    cubes = [k for k, v in arrays.items() if v.ndim == 3 and BANDS in (v.shape[0], v.shape[-1])]
    if len(cubes) != 1:
        found = ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) or "no arrays"
        raise SceneError(f"{path}: expected exactly one 3-D array with 31 bands, found {found}")
    return cubes[0], arrays[cubes[0]]


def _check_wavelengths(arrays: dict[str, np.ndarray], path: Path) -> None:
    """NTIRE / ARAD and ICVL files carry their band centres as `bands`; a set other than 400:10:700 nm
    (Harvard's 420-720, say) is refused rather than read as if it were."""
    for key in ("bands", "wavelengths"):
        nm = arrays.get(key)
        if nm is not None and nm.size == BANDS and not np.allclose(np.sort(nm.ravel()), WAVELENGTHS, atol=0.5):
            raise SceneError(f"{path}: its {key} run from {nm.min():g} to {nm.max():g} nm, not the 31 bands "
                             f"400-700 nm in 10 nm steps this model reads; resample the spectra to 400:10:700 nm")


# Full scale of the float cubes of known MATLAB v7.3 sources, by variable name: NTIRE 2020 / 2022 (ARAD)
# ship `cube` already normalised to [0, 1] by the organisers (their `norm_factor`), ICVL and NTIRE 2018
# ship `rad`, the raw counts of a 12-bit camera. Other names, and integer data, follow _as_cube's rule.
_V73_SCALE = {"cube": 1.0, "rad": 4095.0}


def _read_mat_v73(path: Path) -> tuple[np.ndarray, float | None]:
    """A MATLAB v7.3 file (HDF5) through h5py. HDF5 stores MATLAB's column-major arrays with the
    dimensions reversed: ARAD's 482 x 512 x 31 `cube` is a (31, 512, 482) dataset. Reversing every
    dataset's axes gives back the array as MATLAB shows it, (H, W, bands), whatever the source."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {k: np.asarray(v).T for k, v in f.items()  # groups (structs, cells' #refs#) are skipped
                      if isinstance(v, h5py.Dataset) and v.dtype.kind in "iuf"}
    except Exception as e:  # h5py signals broken files with OSError, KeyError, ...
        raise SceneError(f"{path}: a MATLAB v7.3 (HDF5) file h5py cannot read ({str(e).rstrip('.')})") from None
    name, cube = _one_cube(arrays, path)
    _check_wavelengths(arrays, path)
    return cube, _V73_SCALE.get(name)


def _read_mat(path: Path) -> tuple[np.ndarray, float | None]:
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 files, which are HDF5
        return _read_mat_v73(path)
    except Exception as e:  # scipy signals broken files with many exception types (ValueError, IndexError, ...)
        raise SceneError(f"{path}: not a readable .mat file ({str(e).rstrip('.')})") from None
    arrays = {k: v for k, v in mat.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    _, cube = _one_cube(arrays, path)
    _check_wavelengths(arrays, path)
    return cube, None


def _read_npy(path: Path) -> tuple[np.ndarray, None]:
    try:
        a = np.load(path, allow_pickle=False)  # no pickles: a data file must not run code
    except (ValueError, OSError, EOFError) as e:
        raise SceneError(f"{path}: not a readable .npy file ({str(e).rstrip('.')})") from None
    if not isinstance(a, np.ndarray):  # an .npz archive saved under a .npy name
        raise SceneError(f"{path}: an .npz archive, not a single .npy array")
    return a, None


def _as_cube(a: np.ndarray, path: Path, scale: float | None = None) -> np.ndarray:
    """A stored array -> (H, W, 31) float32 in [0, 1], or SceneError.

    scale: the full scale its source defines for float data (see _V73_SCALE); None: the rule below.

    (31, H, W) is accepted and moved to (H, W, 31): PyTorch code and h5py exports store bands first.
    When both ends have 31, (H, W, 31) wins. Integers are divided by their type's maximum (uint16 by
    65535, as CAVE). Floats with maximum <= 1 are taken as they are; floats above 1 are taken to be
    integer counts saved as float (a common way .mat copies of CAVE store it) and divided by 255 or
    65535, whichever is the first to hold the maximum, so that the scale is the same for every scene of
    a set; beyond 65535 there is no bit depth to go by and the cube is divided by its own maximum.
    """
    if a.ndim != 3 or BANDS not in (a.shape[0], a.shape[-1]):
        raise SceneError(f"{path}: array of shape {a.shape} is not a (H, W, 31) cube")
    if a.shape[-1] != BANDS:
        a = np.moveaxis(a, 0, -1)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise SceneError(f"{path}: cube has data type {a.dtype}, expected integers or floats")
    if np.issubdtype(a.dtype, np.integer):
        scale = float(np.iinfo(a.dtype).max)
    else:
        bad = int(np.size(a) - np.isfinite(a).sum())
        if bad:
            raise SceneError(f"{path}: cube holds {bad} non-finite values (NaN or inf)")
        peak = float(a.max())
        scale = scale or (1.0 if peak <= 1 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak)
    # reflectance is non-negative; processed cubes carry small negative values from noise and unmixing
    return np.ascontiguousarray(np.clip(a.astype(np.float32) / np.float32(scale), 0, 1))


def load_scene(path) -> np.ndarray:
    """Read one scene -> (H, W, 31) float32 in [0, 1].

    path: a CAVE scene folder as downloaded (the outer <scene>_ms/ or the inner <scene>_ms/<scene>_ms/,
    one <scene>_ms_NN.png per band, 16-bit / 65535 or 8-bit / 255), a .mat file (the one 3-D array with
    31 bands, any variable name; MATLAB v5 through scipy, v7.3 (NTIRE 2020 / 2022, ARAD-1K, ICVL)
    through h5py) or a .npy file. Raises SceneError naming the file for anything else, a `bands`
    vector other than 400:10:700 nm included.
    """
    path = Path(path)
    if not path.exists():
        raise SceneError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_png_folder(path)
    readers = {".mat": _read_mat, ".npy": _read_npy}
    if path.suffix.lower() not in readers:
        raise SceneError(f"{path}: unsupported file type {path.suffix!r}, expected a CAVE folder of PNG "
                         f"bands, a .mat or a .npy file")
    a, scale = readers[path.suffix.lower()](path)
    return _as_cube(a, path, scale)


def load_rgb(path) -> np.ndarray:
    """Read the user's RGB image (PNG, JPEG, ...; 8 or 16 bit) -> (H, W, 3) float32 in [0, 1].
    Greyscale is replicated to three channels and alpha dropped. Raises SceneError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SceneError(f"{path}: no such file")
    a = _read_image(path)
    rgb = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, axis=-1)
    return np.ascontiguousarray(rgb)


def read_points(path, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A spectrometer's measurements of an h x w image: a CSV file, one point a line, `row, col` (pixel,
    from 0 at the top left) then 31 values at 400, 410, ..., 700 nm on the cube's scale (reflectance,
    [0, 1]); a first line that is not numbers is a header. -> (coords (k, 2) int64, spectra (k, 31)).
    Raises SceneError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SceneError(f"{path}: not a readable points file ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split(",")]
        except ValueError:
            if n == 1:  # a header
                continue
            raise SceneError(f"{path}: line {n} holds something that is not a number") from None
        if len(values) != 2 + BANDS:
            raise SceneError(f"{path}: line {n} has {len(values)} values where row, col and 31 spectrum values "
                             f"(400-700 nm) are expected")
        r, c, *spectrum = values
        if r != int(r) or c != int(c) or not (0 <= r < h and 0 <= c < w):
            raise SceneError(f"{path}: line {n} names pixel ({r:g}, {c:g}), not a pixel of the {h} x {w} image")
        if not all(0 <= v < math.inf for v in spectrum):
            raise SceneError(f"{path}: line {n} holds a negative or non-finite spectrum value")
        rows.append(values)
    if not rows:
        raise SceneError(f"{path}: no measured points in it")
    a = np.array(rows)
    return a[:, :2].astype(np.int64), a[:, 2:].astype(np.float32)


# -----------------------------------------------------------------------------
# Scenes and the CAVE split

_SCENE_SUFFIXES = (".mat", ".npy")


def scene_name(name) -> str:
    """Normalised scene name: copies of CAVE differ in case and suffix, so 'Egyptian_statue_ms',
    'egyptian_statue_ms.mat' and 'egyptian_statue' are all 'egyptian_statue'."""
    n = Path(name).name.lower()
    if Path(n).suffix in _SCENE_SUFFIXES:
        n = Path(n).stem
    return n.removesuffix("_ms")


def find_scenes(root) -> dict[str, Path]:
    """{normalised name: path} of the scenes directly under `root`: CAVE folders, .mat and .npy files,
    sorted by name. Other entries are ignored; two entries for one scene, or none at all, raise SceneError."""
    root = Path(root)
    if not root.is_dir():
        raise SceneError(f"{root}: no such folder")
    scenes: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            is_scene = _band_folder(entry) is not None
        else:
            is_scene = entry.suffix.lower() in _SCENE_SUFFIXES
        if is_scene:
            name = scene_name(entry)
            if name in scenes:
                raise SceneError(f"{entry}: scene {name!r} is also {scenes[name].name}, keep one of the two")
            scenes[name] = entry
    if not scenes:
        raise SceneError(f"{root}: no scenes found (expected CAVE folders of PNG bands, .mat or .npy files)")
    return dict(sorted(scenes.items()))


def split_scenes(names, test_scenes=None, val_scenes=None) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) lists of normalised scene names.

    test_scenes None: the CAVE default (those of CAVE_TEST_SCENES present) when any is present, else no
    test scenes. val_scenes come from the training scenes and are then not trained on; they pick the best
    checkpoint, which test scenes never do. Unknown names raise SceneError listing the available scenes.
    """
    names = list(dict.fromkeys(scene_name(n) for n in names))

    def pick(wanted, role: str) -> list[str]:
        unknown = [w for w in wanted if scene_name(w) not in names]
        if unknown:
            raise SceneError(f"{role} scene {', '.join(map(str, unknown))} not found among the available "
                             f"scenes {', '.join(names)}")
        return list(dict.fromkeys(scene_name(w) for w in wanted))

    test = [n for n in names if n in CAVE_TEST_SCENES] if test_scenes is None else pick(test_scenes, "test")
    val = pick(val_scenes or [], "validation")
    both = [n for n in val if n in test]
    if both:
        raise SceneError(f"scene {', '.join(both)} is both a test and a validation scene; validation scenes "
                         f"come from the training scenes")
    train = [n for n in names if n not in test and n not in val]
    return train, val, test


# -----------------------------------------------------------------------------
# Spectral response and RGB

def srf_matrix(name: str = "cie1964") -> np.ndarray:
    """The spectral response S, (3, 31) float32, each row normalised to sum to 1 so that X = S.Y stays in
    [0, 1] for Y in [0, 1]. name: one of SRF_TABLES."""
    if name not in SRF_TABLES:
        raise ValueError(f"unknown spectral response {name!r}; choose one of {', '.join(SRF_TABLES)}")
    # responses are non-negative; the CIE tables' -1.4e-20 is interpolation round-off
    s = np.clip(np.array(SRF_TABLES[name], dtype=np.float64).T, 0, None)
    return (s / s.sum(axis=1, keepdims=True)).astype(np.float32)


def rgb_from_hsi(hsi, srf="cie1964"):
    """X = S.Y (the projection inside L_rep, Eq. (14)).

    hsi: numpy (..., H, W, 31) -> numpy (..., H, W, 3), the file layout; or torch (..., 31, h, w) ->
    torch (..., 3, h, w), the tensor layout (same dtype and device). srf: a name of SRF_TABLES or a (3, 31)
    matrix (numpy or torch).
    """
    s = srf_matrix(srf) if isinstance(srf, str) else srf
    if isinstance(hsi, torch.Tensor):
        if hsi.dim() < 3 or hsi.shape[-3] != BANDS:
            raise ValueError(f"expected a (..., 31, h, w) tensor, got shape {tuple(hsi.shape)}")
        return torch.einsum("cn,...nhw->...chw", torch.as_tensor(s, dtype=hsi.dtype, device=hsi.device), hsi)
    hsi = np.asarray(hsi)
    if hsi.ndim < 3 or hsi.shape[-1] != BANDS:
        raise ValueError(f"expected a (..., H, W, 31) array, got shape {hsi.shape}")
    return hsi @ np.asarray(s, dtype=np.float32).T


# -----------------------------------------------------------------------------
# Photos: sRGB to the model's RGB

# XYZ -> linear sRGB, IEC 61966-2-1 (the sRGB primaries, for the CIE 1931 observer)
_SRGB_FROM_XYZ = np.array([[3.2406, -1.5372, -0.4986],
                           [-0.9689, 1.8758, 0.0415],
                           [0.0557, -0.2040, 1.0570]])


def srgb_to_linear(a: np.ndarray) -> np.ndarray:
    """Undo the sRGB transfer curve (IEC 61966-2-1): encoded values in [0, 1] -> linear light."""
    a = np.asarray(a, dtype=np.float32)
    return np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_srgb(hsi: np.ndarray) -> np.ndarray:
    """The linear sRGB a white-balanced camera records of spectra (..., 31) under flat light: CIE 1931
    XYZ through the sRGB matrix, each channel scaled so that the perfect white reflector is (1, 1, 1)."""
    xyz = np.asarray(hsi, dtype=np.float64) @ np.clip(np.array(SRF_TABLES["cie1931"]), 0, None)
    white = _SRGB_FROM_XYZ @ np.clip(np.array(SRF_TABLES["cie1931"]), 0, None).sum(0)
    return (xyz @ _SRGB_FROM_XYZ.T) / white


def model_rgb_from_srgb(srf="cie1964") -> np.ndarray:
    """(3, 3) M taking a white-balanced photo's linear sRGB to the RGB the model was trained on, S.Y.

    The two are different colour spaces (S is CIE 1964 XYZ, or a camera's response, with rows summing to
    1; sRGB has its own primaries), so a photo fed as it is comes out with the wrong colours. M is the
    least-squares fit over the 24 measured ColorChecker spectra and the perfect white of S.Y against
    linear_srgb: exact up to the 1931 / 1964 observers' difference for the CIE responses, the best
    linear guess for a camera's (its raw RGB is lost in a JPEG). White maps to (nearly) white."""
    spectra = np.concatenate([COLORCHECKER.T, np.ones((1, BANDS))])  # (25, 31)
    s = srf_matrix(srf) if isinstance(srf, str) else np.asarray(srf)
    m, *_ = np.linalg.lstsq(linear_srgb(spectra), spectra @ np.asarray(s, dtype=np.float64).T, rcond=None)
    return m.T.astype(np.float32)


# -----------------------------------------------------------------------------
# Label sets: the label budget of Sec. 3.1, Eq. (2)

def label_count(h: int, w: int, ratio: float) -> int:
    """Number of labelled pixels of an h x w scene: max(1, floor(omega.H.W)); 0 for omega = 0, the
    unsupervised mode; omega = 1 labels every pixel (image-level supervision)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"label ratio must be in [0, 1], got {ratio}")
    return 0 if ratio == 0 else max(1, math.floor(ratio * h * w + 1e-9))  # + 1e-9: 0.29 * 100 must give 29


def scene_seed(seed: int, name: str) -> int:
    """Seed of a scene's label set, stable across runs and machines: the run seed and a CRC of the
    normalised scene name (not hash(), which Python salts per process)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(scene_name(name).encode())]).generate_state(1)[0])


def draw_label_set(h: int, w: int, ratio: float, seed: int) -> np.ndarray:
    """The fixed labelled pixels of one scene: (k, 2) int64 (row, col), k = label_count(h, w, ratio)
    distinct pixels in row-major order, the same for the same seed. Drawn once per run and saved with it:
    redrawing every step would leak the whole image over an epoch."""
    k = label_count(h, w, ratio)
    idx = np.sort(np.random.default_rng(seed).choice(h * w, size=k, replace=False))
    return np.stack(np.divmod(idx, w), axis=1).astype(np.int64)


# -----------------------------------------------------------------------------
# Training patches

def _starts(n: int, patch: int, stride: int) -> list[int]:
    """Patch offsets along a side of n >= patch pixels: every stride, plus the last one flush with the border."""
    starts = list(range(0, n - patch + 1, stride))
    return starts if starts[-1] == n - patch else starts + [n - patch]


class PatchDataset(Dataset):
    """Training patches: (rgb (3, p, p) float32, target (31, p, p) float32, mask (1, p, p) bool).

    scenes: list of (hsi (H, W, 31) array in [0, 1], labels (k, 2) (row, col)); srf: name or (3, 31) S.
    rgb = S.hsi over the whole patch; mask marks the labelled pixels in it; target = hsi * mask, the
    point spectra Y^p, zero elsewhere. Only the labelled spectra are kept at all (the rest of the cube
    is dropped once the RGB is made), so no unlabelled ground truth can leak into training.
    One epoch visits every patch position at `stride` of every scene, the last one flush with the
    border; the random crop is the DataLoader's shuffled visit of these positions. Scenes smaller than
    the patch are zero-padded at the bottom and right: a zero HSI renders to a zero RGB, so the padding
    is consistent with X = S.Y, and it holds no labels.
    `batch` gives each sample a random 90-degree rotation and horizontal flip (the 8 symmetries of
    the square) drawn from the generator it is handed, so a training step is a pure function of its
    seed and a resumed run repeats it exactly; ds[i] is the un-augmented sample.
    With around_labels, `batch` instead places each sample of a scene that has labels around one of
    them: a labelled pixel of the sample's scene drawn at random, then a patch position drawn uniformly
    among those that contain it (the paper's "one point spectrum per 128x128 patch"). The label set
    stays the fixed one; only where patches are cut changes, so that L_pHSI reaches every step instead
    of the ~1 batch in 3 that holds a label at omega = 0.01 % with 64x64 patches. The epoch keeps its
    length and its balance between scenes (each grid position stands for one draw in its scene).
    """

    def __init__(self, scenes, srf="cie1964", patch: int = 128, stride: int = 64, around_labels: bool = False):
        self.patch, self.around_labels = patch, around_labels
        self.stacks = []  # per scene, (3 + 31 + 1, H, W): rgb, target, mask
        self.labels = []  # per scene, (k, 2) labelled pixels
        self.index = []   # (scene, top, left) of every patch position
        for s, (hsi, labels) in enumerate(scenes):
            h, w, bands = hsi.shape
            labels = np.asarray(labels, dtype=np.int64).reshape(-1, 2)
            if bands != BANDS or not ((labels >= 0) & (labels < (h, w))).all():
                raise ValueError(f"scene {s}: expected a (H, W, 31) cube with labels inside it, got {hsi.shape}")
            y = torch.as_tensor(np.asarray(hsi, dtype=np.float32)).permute(2, 0, 1)
            mask = torch.zeros(1, h, w)
            mask[0, labels[:, 0], labels[:, 1]] = 1
            # one stack, so that every crop, flip and rotation moves the mask with its pixels
            stack = torch.cat([rgb_from_hsi(y, srf), y * mask, mask])
            stack = F.pad(stack, (0, max(0, patch - w), 0, max(0, patch - h)))
            self.stacks.append(stack)
            self.labels.append(labels)
            self.index += [(s, top, left) for top in _starts(stack.shape[1], patch, stride)
                           for left in _starts(stack.shape[2], patch, stride)]

    def __len__(self) -> int:
        return len(self.index)

    def crop(self, i: int, rot: int = 0, flip: bool = False, at: tuple[int, int] | None = None):
        """Sample i rotated by rot x 90 degrees (torch.rot90 over (h, w)), then flipped left-right if flip;
        at = (top, left) cuts it there in sample i's scene instead of at its grid position."""
        s, top, left = self.index[i]
        top, left = at if at is not None else (top, left)
        x = torch.rot90(self.stacks[s][:, top:top + self.patch, left:left + self.patch], rot, dims=(1, 2))
        x = x.flip(2) if flip else x
        return x[:3].contiguous(), x[3:3 + BANDS].contiguous(), x[3 + BANDS:].bool()

    def __getitem__(self, i: int):
        return self.crop(i)

    def batch(self, indices, generator: torch.Generator | None = None):
        """Samples `indices`, each randomly rotated and flipped by `generator`, stacked into
        (rgb (b, 3, p, p), target (b, 31, p, p), mask (b, 1, p, p))."""
        rot = torch.randint(4, (len(indices),), generator=generator)
        flip = torch.randint(2, (len(indices),), generator=generator)
        at = [self.around_label(int(i), generator) if self.around_labels else None for i in indices]
        samples = [self.crop(int(i), int(r), bool(f), a) for i, r, f, a in zip(indices, rot, flip, at)]
        return tuple(torch.stack(t) for t in zip(*samples))

    def around_label(self, i: int, generator: torch.Generator | None = None) -> tuple[int, int] | None:
        """(top, left) of a patch of sample i's scene holding one of its labelled pixels, drawn uniformly:
        first the label, then the position among the patches that contain it. None if the scene has none."""
        s = self.index[i][0]
        labels, (h, w) = self.labels[s], self.stacks[s].shape[1:]
        if len(labels) == 0:
            return None
        r, c = labels[int(torch.randint(len(labels), (1,), generator=generator))]

        def start(x: int, n: int) -> int:  # uniform over the starts in [x - patch + 1, x] that fit in [0, n - patch]
            lo, hi = max(0, x - self.patch + 1), min(x, n - self.patch)
            return lo + int(torch.randint(hi - lo + 1, (1,), generator=generator))

        return start(int(r), h), start(int(c), w)


# -----------------------------------------------------------------------------
# Demo scenes

def demo_scenes(n: int = 4, size: int = 128, seed: int = 0, materials: int = 48) -> list[tuple[str, np.ndarray]]:
    """Synthetic scenes that need no download: [(name, hsi (size, size, 31) float32 in [0, 1])].

    They prove the pipeline runs end to end; they are not a benchmark. Each scene is a Voronoi tiling of
    24 regions under shading (a linear illumination gradient and a soft spot light) with mild
    multiplicative grain. A region's material comes from a catalogue of `materials` spectra, each a
    random mix of two measured ColorChecker reflectances, shared by all the scenes of a seed - as a lab's
    own captures share their objects, so that what is learnt on the training scenes holds on the test
    scene (with a fresh mix per region, a map fitted on every pixel of the training scenes scored lower
    on a new scene than one fitted on its 48 labels: there was nothing to learn). Deterministic per seed.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.integers(0, COLORCHECKER.shape[1], (2, materials))
    t = rng.random(materials)
    catalogue = t * COLORCHECKER[:, a] + (1 - t) * COLORCHECKER[:, b]  # (31, materials)
    scenes = []
    for i in range(n):
        centres = rng.random((24, 2))
        region = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).argmin(axis=0)
        spectra = catalogue[:, rng.integers(0, materials, 24)]  # (31, 24)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(angle) + yy * np.sin(angle)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        spot_y, spot_x = rng.random(2)
        spot = np.exp(-((yy - spot_y) ** 2 + (xx - spot_x) ** 2) / (2 * 0.2 ** 2))
        shade = 0.55 + 0.3 * ramp + 0.15 * spot  # in [0.55, 1]
        grain = 1 + 0.02 * rng.standard_normal((size, size))
        cube = spectra.T[region] * (shade * grain)[..., None]
        scenes.append((f"demo_{i:02d}", np.clip(cube, 0, 1).astype(np.float32)))
    return scenes


# -----------------------------------------------------------------------------
# Writing results

def _output(path_stem, cube, *suffixes: str) -> tuple[np.ndarray, list[Path]]:
    """(cube as float32 (H, W, 31), the paths <path_stem><suffix>, their folder made); a stem may hold dots."""
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim != 3 or cube.shape[-1] != BANDS:
        raise ValueError(f"expected a (H, W, 31) cube, got shape {cube.shape}")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return cube, [stem.with_name(stem.name + s) for s in suffixes]


def save_cube(path_stem, cube) -> tuple[Path, Path]:
    """Write cube (H, W, 31) as <path_stem>.npy and <path_stem>.mat (variables `cube`, float32 (H, W, 31),
    and `wavelengths` in nm); load_scene reads both back. Returns the two paths."""
    cube, (npy, mat) = _output(path_stem, cube, ".npy", ".mat")
    np.save(npy, cube)
    # uncompressed: zlib shrinks a float32 cube by about a tenth and took 1.5 s of a 512x512 eval
    scipy.io.savemat(mat, {"cube": cube, "wavelengths": WAVELENGTHS.astype(np.float64)})
    return npy, mat


def save_envi(path_stem, cube) -> tuple[Path, Path]:
    """Write cube (H, W, 31) as ENVI: <path_stem>.hdr, a text header with the wavelengths, and
    <path_stem>.img, the raw float32 little-endian values band by band (BSQ) - what ENVI, QGIS (GDAL)
    and Spectral Python open. Returns the two paths."""
    cube, (hdr, img) = _output(path_stem, cube, ".hdr", ".img")
    h, w, bands = cube.shape
    hdr.write_text("ENVI\n"
                   "description = {pixelssr reconstruction, reflectance-like values in [0, 1]}\n"
                   f"samples = {w}\nlines = {h}\nbands = {bands}\nheader offset = 0\n"
                   "file type = ENVI Standard\ndata type = 4\ninterleave = bsq\nbyte order = 0\n"
                   "wavelength units = Nanometers\n"
                   f"wavelength = {{{', '.join(str(int(nm)) for nm in WAVELENGTHS)}}}\n")
    # data type 4 = float32, byte order 0 = little-endian; BSQ: (bands, lines, samples)
    img.write_bytes(np.ascontiguousarray(cube.transpose(2, 0, 1)).astype("<f4").tobytes())
    return hdr, img


def save_png(path, img) -> None:
    """Write img, float in [0, 1], (H, W, 3) or (H, W), as an 8-bit PNG (values clipped, NaN as 0)."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float32))
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {a.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # zlib's fastest level: a 512x512 preview takes 14 ms instead of PIL's default 59 ms, and is 25 % larger
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)
