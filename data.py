"""
Scenes on disk: reading hyperspectral cubes and photos, the CAVE split, demo scenes, writing results.

Paper: "From Image- to Pixel-level: Label-efficient Hyperspectral Image Reconstruction" (Leng et al.,
2025). The network sees an RGB image X and learns a 31-band HSI (400-700 nm in 10 nm steps) from a
few measured point spectra per scene. This file reads and writes what it sees:
  - reading scenes: CAVE folders of PNG bands as downloaded, .mat (v5, and v7.3 as
    NTIRE / ARAD and ICVL ship them) and .npy cubes                                   load_scene
  - reading the user's RGB images and a spectrometer's points                         load_rgb, read_points
  - the CAVE protocol: 12 fixed test scenes, the other 20 train                      find_scenes, split_scenes
  - a run's scenes by name, from a folder or the demo set                            load_scenes, scene_names
  - synthetic demo scenes from measured ColorChecker spectra (no download needed)     demo_scenes
  - writing results: .npy / .mat cubes, ENVI (.hdr + raw BSQ), PNG                  save_cube, save_envi, save_png
RGB rendering and colour are in cameras.py; label sets and training patches in labels.py.

Conventions: files and numpy arrays are (H, W, bands) as CAVE and MATLAB store them; tensors are
(b, c, H, W); values are reflectance-like in [0, 1]. Every problem with a file is a runs.UsageError whose
message names the file.

Glossary (code name = paper symbol):
  hsi = Y, the ground-truth HSI     rgb = X = S.Y, the RGB image     points = measured (row, col, spectrum)
"""

import math
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image, ImageOps

from cameras import BANDS, COLORCHECKER, WAVELENGTHS
from runs import UsageError

# The 12 CAVE test scenes of the first author's earlier work; the other 20 CAVE scenes train.
CAVE_TEST_SCENES = ("balloons", "clay", "egyptian_statue", "fake_and_real_beers", "fake_and_real_lemons",
                    "fake_and_real_peppers", "fake_and_real_tomatoes", "hairs", "real_and_fake_apples",
                    "real_and_fake_peppers", "stuffed_toys", "thread_spools")


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
    are divided by 65535 and 8-bit images by 255; palette and other modes become RGB. Raises UsageError
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
        raise UsageError(f"{path}: not a readable image ({str(e).rstrip('.')})") from None
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
                raise UsageError(f"{f}: a second image for band {n:02d} beside {bands[n].name}")
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
        raise UsageError(f"{path}: no band images named <scene>_NN.png here or in a single subfolder")
    bands = _band_files(folder)
    expected = set(range(1, BANDS + 1))
    if set(bands) != expected:
        missing, extra = sorted(expected - set(bands)), sorted(set(bands) - expected)
        problems = [f"{what} band {_numbers(ns)}" for what, ns in (("missing", missing), ("unexpected", extra)) if ns]
        raise UsageError(f"{folder}: found {len(bands)} band images where 31 numbered 01-31 are expected "
                         f"({'; '.join(problems)})")
    planes = []
    # Pillow decodes without holding the GIL, so threads read the bands in parallel (docs/performance.md, "Reading a scene").
    # The results come in band order, so the first band with a problem is the one named, as read one by one.
    with ThreadPoolExecutor(min(BANDS, os.cpu_count() or 1)) as pool:
        for n, image in enumerate(pool.map(_read_image, [bands[n] for n in range(1, BANDS + 1)]), 1):
            plane = image[..., 0]  # multi-channel bands (CAVE's watercolors_ms): the first channel
            if planes and plane.shape != planes[0].shape:
                raise UsageError(f"{bands[n]}: band image is {plane.shape[1]}x{plane.shape[0]} pixels "
                                 f"but band 01 is {planes[0].shape[1]}x{planes[0].shape[0]}")
            planes.append(plane)
    return np.stack(planes, axis=-1)


def _one_cube(arrays: dict[str, np.ndarray], path: Path) -> tuple[str, np.ndarray]:
    """The one 3-D array with 31 bands (first or last axis) among a file's variables, or UsageError."""
    cubes = [k for k, v in arrays.items() if v.ndim == 3 and BANDS in (v.shape[0], v.shape[-1])]
    if len(cubes) != 1:
        found = ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) or "no arrays"
        raise UsageError(f"{path}: expected exactly one 3-D array with 31 bands, found {found}")
    return cubes[0], arrays[cubes[0]]


def _check_wavelengths(arrays: dict[str, np.ndarray], path: Path) -> None:
    """NTIRE / ARAD and ICVL files carry their band centres as `bands`; a set other than 400:10:700 nm
    (Harvard's 420-720, say) is refused rather than read as if it were."""
    for key in ("bands", "wavelengths"):
        nm = arrays.get(key)
        if nm is not None and nm.size == BANDS and not np.allclose(np.sort(nm.ravel()), WAVELENGTHS, atol=0.5):
            raise UsageError(f"{path}: its {key} run from {nm.min():g} to {nm.max():g} nm, not the 31 bands "
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
        raise UsageError(f"{path}: a MATLAB v7.3 (HDF5) file h5py cannot read ({str(e).rstrip('.')})") from None
    name, cube = _one_cube(arrays, path)
    _check_wavelengths(arrays, path)
    return cube, _V73_SCALE.get(name)


def _read_mat(path: Path) -> tuple[np.ndarray, float | None]:
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 files, which are HDF5
        return _read_mat_v73(path)
    except Exception as e:  # scipy signals broken files with many exception types (ValueError, IndexError, ...)
        raise UsageError(f"{path}: not a readable .mat file ({str(e).rstrip('.')})") from None
    arrays = {k: v for k, v in mat.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    _, cube = _one_cube(arrays, path)
    _check_wavelengths(arrays, path)
    return cube, None


def _read_npy(path: Path) -> tuple[np.ndarray, None]:
    try:
        a = np.load(path, allow_pickle=False)  # no pickles: a data file must not run code
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile: a broken .npz under this name
        raise UsageError(f"{path}: not a readable .npy file ({str(e).rstrip('.')})") from None
    if not isinstance(a, np.ndarray):  # an .npz archive saved under a .npy name
        raise UsageError(f"{path}: an .npz archive, not a single .npy array")
    return a, None


def _as_cube(a: np.ndarray, path: Path, scale: float | None = None) -> np.ndarray:
    """A stored array -> (H, W, 31) float32 in [0, 1], or UsageError.

    scale: the full scale its source defines for float data (see _V73_SCALE); None: the rule below.

    (31, H, W) is accepted and moved to (H, W, 31): PyTorch code and h5py exports store bands first.
    When both ends have 31, (H, W, 31) wins. Integers are divided by their type's maximum (uint16 by
    65535, as CAVE). Floats with maximum <= 1 are taken as they are; floats above 1 are taken to be
    integer counts saved as float (a common way .mat copies of CAVE store it) and divided by 255 or
    65535, whichever is the first to hold the file's maximum (a bit depth, decided per file, not the
    cube's own maximum); beyond 65535 there is no bit depth to go by and the cube is divided by its own
    maximum.
    """
    if a.ndim != 3 or BANDS not in (a.shape[0], a.shape[-1]) or a.size == 0:
        raise UsageError(f"{path}: array of shape {a.shape} is not a (H, W, 31) cube")
    if a.shape[-1] != BANDS:
        a = np.moveaxis(a, 0, -1)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise UsageError(f"{path}: cube has data type {a.dtype}, expected integers or floats")
    if np.issubdtype(a.dtype, np.integer):
        scale = float(np.iinfo(a.dtype).max)
    else:
        bad = int(np.size(a) - np.isfinite(a).sum())
        if bad:
            raise UsageError(f"{path}: cube holds {bad} non-finite values (NaN or inf)")
        peak = float(a.max())
        scale = scale or (1.0 if peak <= 1 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak)
    # reflectance is non-negative; processed cubes carry small negative values from noise and unmixing
    return np.ascontiguousarray(np.clip(a.astype(np.float32) / np.float32(scale), 0, 1))


def load_scene(path) -> np.ndarray:
    """Read one scene -> (H, W, 31) float32 in [0, 1].

    path: a CAVE scene folder as downloaded (the outer <scene>_ms/ or the inner <scene>_ms/<scene>_ms/,
    one <scene>_ms_NN.png per band, 16-bit / 65535 or 8-bit / 255), a .mat file (the one 3-D array with
    31 bands, any variable name; MATLAB v5 through scipy, v7.3 (NTIRE 2020 / 2022, ARAD-1K, ICVL)
    through h5py) or a .npy file. Raises UsageError naming the file for anything else, a `bands`
    vector other than 400:10:700 nm included.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_png_folder(path)
    readers = {".mat": _read_mat, ".npy": _read_npy}
    if path.suffix.lower() not in readers:
        raise UsageError(f"{path}: unsupported file type {path.suffix!r}, expected a CAVE folder of PNG "
                         f"bands, a .mat or a .npy file")
    a, scale = readers[path.suffix.lower()](path)
    return _as_cube(a, path, scale)


def load_rgb(path) -> np.ndarray:
    """Read the user's RGB image (PNG, JPEG, ...; 8 or 16 bit) -> (H, W, 3) float32 in [0, 1].
    Greyscale is replicated to three channels and alpha dropped. Raises UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    a = _read_image(path)
    rgb = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, axis=-1)
    return np.ascontiguousarray(rgb)


def read_points(path, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A spectrometer's measurements of an h x w image: a CSV file, one point a line, `row, col` (pixel,
    from 0 at the top left) then 31 values at 400, 410, ..., 700 nm on the cube's scale (reflectance,
    [0, 1]); a first line that is not numbers is a header. -> (coords (k, 2) int64, spectra (k, 31)).
    Raises UsageError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a readable points file ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split(",")]
        except ValueError:
            if n == 1:  # a header
                continue
            raise UsageError(f"{path}: line {n} holds something that is not a number") from None
        if len(values) != 2 + BANDS:
            raise UsageError(f"{path}: line {n} has {len(values)} values where row, col and 31 spectrum values "
                             f"(400-700 nm) are expected")
        r, c, *spectrum = values
        if not (0 <= r < h and 0 <= c < w) or r != int(r) or c != int(c):  # range first: NaN and inf fail it
            raise UsageError(f"{path}: line {n} names pixel ({r:g}, {c:g}), not a pixel of the {h} x {w} image")
        if not all(0 <= v < math.inf for v in spectrum):
            raise UsageError(f"{path}: line {n} holds a negative or non-finite spectrum value")
        rows.append(values)
    if not rows:
        raise UsageError(f"{path}: no measured points in it")
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
    sorted by name. Other entries are ignored; two entries for one scene, or none at all, raise UsageError."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
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
                raise UsageError(f"{entry}: scene {name!r} is also {scenes[name].name}, keep one of the two")
            scenes[name] = entry
    if not scenes:
        raise UsageError(f"{root}: no scenes found (expected CAVE folders of PNG bands, .mat or .npy files)")
    return dict(sorted(scenes.items()))


def split_scenes(names, test_scenes=None, val_scenes=None) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) lists of normalised scene names.

    test_scenes None: the CAVE default (those of CAVE_TEST_SCENES present) when any is present, else no
    test scenes. val_scenes come from the training scenes and are then not trained on; they pick the best
    checkpoint, which test scenes never do. Unknown names raise UsageError listing the available scenes.
    """
    names = list(dict.fromkeys(scene_name(n) for n in names))

    def pick(wanted, role: str) -> list[str]:
        unknown = [w for w in wanted if scene_name(w) not in names]
        if unknown:
            raise UsageError(f"{role} scene {', '.join(map(str, unknown))} not found among the available "
                             f"scenes {', '.join(names)}")
        return list(dict.fromkeys(scene_name(w) for w in wanted))

    test = [n for n in names if n in CAVE_TEST_SCENES] if test_scenes is None else pick(test_scenes, "test")
    val = pick(val_scenes or [], "validation")
    both = [n for n in val if n in test]
    if both:
        raise UsageError(f"scene {', '.join(both)} is both a test and a validation scene; validation scenes "
                         f"come from the training scenes")
    train = [n for n in names if n not in test and n not in val]
    return train, val, test


def load_scenes(root: str | None, names: list[str]) -> dict[str, np.ndarray]:
    """name -> (H, W, 31) cube, from a data folder, or the built-in demo scenes when root is None."""
    if root is None:
        demo = dict(demo_scenes())
        found, read = {n: n for n in demo}, demo.__getitem__
    else:
        found, read = find_scenes(root), load_scene
    missing = [n for n in names if scene_name(n) not in found]
    if missing:
        raise UsageError(f"{root or 'the demo scenes'}: no scene named {', '.join(missing)} "
                         f"(found: {', '.join(found)}).")
    return {scene_name(n): read(found[scene_name(n)]) for n in names}


def scene_names(root: str | None) -> list[str]:
    return [n for n, _ in demo_scenes()] if root is None else sorted(find_scenes(root))


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
    # uncompressed: zlib shrinks a float32 cube by little and costs much of an eval (docs/performance.md, "Writing the cube")
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
    # zlib's fastest level: a larger file, written several times faster (docs/performance.md, "Writing the cube")
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)
