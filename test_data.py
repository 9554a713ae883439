"""
Property tests of data.py, cameras.py and labels.py: reading scenes (the real CAVE sample in
../shared/data, every layout of .mat, .npy, PNG band folders) and every kind of bad input, one sentence
naming the file; photos and a spectrometer's points; the CAVE split; writing cubes (.npy, .mat, ENVI)
and PNGs; the demo scenes; the camera responses and ColorChecker against their CSV files; the fixed
label sets and the training patches that carry them through crops, flips and rotations.
Real-data tests are skipped, saying why, when ../shared/data is not beside the checkout.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import example, given, strategies as st
from PIL import Image

import cameras
import data
import labels
import runs
from conftest import DATA, _read_envi, _write_png16, examples, needs_data


def _band_folder(root: Path, scene: str = "tiny", bands=range(1, 32), h: int = 6, w: int = 5,
                 mode: str = "I;16") -> Path:
    """A CAVE-style <scene>_ms/<scene>_ms/<scene>_ms_NN.png folder with band NN filled with value NN
    (times 1000 in 16 bit); returns the outer folder."""
    inner = root / f"{scene}_ms" / f"{scene}_ms"
    inner.mkdir(parents=True)
    for n in bands:
        if mode == "I;16":
            img = Image.fromarray(np.full((h, w), 1000 * n, np.uint16))
        else:
            img = Image.new(mode, (w, h), (n,) * len(mode))
        img.save(inner / f"{scene}_ms_{n:02d}.png")
    return root / f"{scene}_ms"


def _load_error(path) -> str:
    """The message of the UsageError that loading path raises."""
    with pytest.raises(runs.UsageError) as e:
        data.load_scene(path)
    return str(e.value)


@needs_data
def test_a_real_cave_png_folder_reads_as_31_bands_in_0_1():
    cube = data.load_scene(DATA / "cave" / "paints_ms")
    assert cube.shape == (512, 512, 31) and cube.dtype == np.float32
    assert 0 <= cube.min() and 0.5 < cube.max() <= 1


@needs_data
def test_a_real_cave_mat_reads_as_its_16_bit_counts_scaled_to_0_1():
    cube = data.load_scene(DATA / "cave" / "balloons_ms.mat")
    raw = scipy.io.loadmat(DATA / "cave" / "balloons_ms.mat")["Omsi"]
    assert cube.shape == (256, 256, 31)
    np.testing.assert_allclose(cube, raw / 65535, atol=1e-6)


def test_a_band_folder_reads_the_same_from_its_outer_and_inner_folder(tmp_path):
    outer = _band_folder(tmp_path)
    cube = data.load_scene(outer)
    np.testing.assert_array_equal(cube, data.load_scene(outer / "tiny_ms"))
    np.testing.assert_allclose(cube[0, 0], np.arange(1, 32) * 1000 / 65535, rtol=1e-6)


def test_a_missing_path_is_an_error_naming_it(tmp_path):
    assert "nowhere_ms" in _load_error(tmp_path / "nowhere_ms")


def test_a_folder_of_30_bands_is_an_error_naming_the_missing_band(tmp_path):
    msg = _load_error(_band_folder(tmp_path, bands=range(1, 31)))
    assert "tiny_ms" in msg and "30 band" in msg and "missing band 31" in msg


def test_missing_and_unexpected_band_numbers_are_named(tmp_path):
    msg = _load_error(_band_folder(tmp_path, bands=[*range(1, 7), *range(8, 32), 32]))
    assert "missing band 07" in msg and "unexpected band 32" in msg


def test_a_corrupt_band_png_is_an_error_naming_it(tmp_path):
    outer = _band_folder(tmp_path)
    bad = outer / "tiny_ms" / "tiny_ms_12.png"
    bad.write_bytes(bad.read_bytes()[:20])
    assert "tiny_ms_12.png" in _load_error(outer)


def test_a_band_of_another_size_is_an_error_naming_it(tmp_path):
    outer = _band_folder(tmp_path)
    Image.fromarray(np.zeros((7, 5), np.uint16)).save(outer / "tiny_ms" / "tiny_ms_09.png")
    assert "tiny_ms_09.png" in _load_error(outer)


@pytest.mark.parametrize("first", ["unreadable", "wrong size"])
def test_the_error_names_the_first_bad_band_of_several(tmp_path, first):
    """The bands are decoded on threads; the error still names the lowest-numbered band with a problem."""
    inner = _band_folder(tmp_path) / "tiny_ms"
    if first == "unreadable":
        bad = inner / "tiny_ms_05.png"
        bad.write_bytes(bad.read_bytes()[:20])
    else:
        Image.fromarray(np.zeros((7, 5), np.uint16)).save(inner / "tiny_ms_05.png")
    late = inner / "tiny_ms_20.png"
    late.write_bytes(late.read_bytes()[:20])
    msg = _load_error(inner.parent)
    assert "tiny_ms_05.png" in msg and "tiny_ms_20.png" not in msg


def test_an_rgba_band_reads_as_its_first_channel(tmp_path):
    cube = data.load_scene(_band_folder(tmp_path, mode="RGBA"))
    np.testing.assert_allclose(cube[2, 3], np.arange(1, 32) / 255, rtol=1e-6)


def test_an_8_bit_band_is_scaled_by_255(tmp_path):
    cube = data.load_scene(_band_folder(tmp_path, mode="L"))
    np.testing.assert_allclose(cube[0, 0], np.arange(1, 32) / 255, rtol=1e-6)


def test_stray_files_in_a_band_folder_are_ignored(tmp_path):
    outer = _band_folder(tmp_path)
    inner = outer / "tiny_ms"
    (inner / "Thumbs.db").write_bytes(b"\0junk")
    (inner / "._tiny_ms_01.png").write_bytes(b"apple double")
    Image.new("RGB", (5, 6)).save(inner / "tiny_RGB.bmp")
    assert data.load_scene(outer).shape == (6, 5, 31)


def test_a_mat_without_a_cube_is_an_error_listing_its_variables(tmp_path):
    path = tmp_path / "odd.mat"
    scipy.io.savemat(path, {"rgb": np.zeros((4, 4, 3)), "cube": np.zeros((4, 4, 30))})
    msg = _load_error(path)
    assert "odd.mat" in msg and "rgb (4, 4, 3)" in msg and "cube (4, 4, 30)" in msg


def test_an_unreadable_mat_v73_is_an_error_naming_it_and_its_version(tmp_path):
    path = tmp_path / "hdf.mat"
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\0\2IM"
    path.write_bytes(header + bytes(512))
    msg = _load_error(path)
    assert "hdf.mat" in msg and "v7.3" in msg


def _write_mat_v73(path: Path, variables: dict[str, np.ndarray]) -> None:
    """A MATLAB v7.3 MAT-file as MATLAB writes one: an HDF5 file behind a 512-byte user block that
    starts with the MAT header, each variable a dataset holding the column-major array, i.e. with
    its dimensions reversed (MATLAB's 482 x 512 x 31 is a (31, 512, 482) dataset)."""
    import h5py
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, a in variables.items():
            f.create_dataset(name, data=np.asarray(a).T)
            f[name].attrs["MATLAB_class"] = np.bytes_({"f": "single" if a.dtype == np.float32 else "double",
                                                      "u": f"uint{8 * a.dtype.itemsize}"}[a.dtype.kind])
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\0\2IM")


def _asymmetric_cube(h: int = 5, w: int = 4) -> np.ndarray:
    """(h, w, 31) in (0, 1), every value different and growing with row, then column, then band: any
    transposition or reversal of the axes reads back as something else. Multiples of 1/65535, so that
    16-bit storage holds them exactly."""
    return (np.arange(1, h * w * 31 + 1).reshape(h, w, 31) * (65535 // (h * w * 31 + 1)) / 65535)


_NM = cameras.WAVELENGTHS.astype(np.float64)[None]  # (1, 31), as MATLAB stores a row vector


@pytest.mark.parametrize("layout", ["ntire2022_arad", "ntire2020", "icvl", "uint16", "bands_first"])
def test_every_mat_v73_layout_reads_back_in_its_orientation_and_scale(tmp_path, layout):
    """Each layout MATLAB v7.3 files come in reads back as the (H, W, 31) cube MATLAB shows, scaled as its
    source defines: NTIRE 2020 / 2022 (ARAD-1K) `cube` floats as they are, ICVL `rad` 12-bit counts
    by 4095, integers by their type's maximum."""
    truth = _asymmetric_cube()
    variables = {
        "ntire2022_arad": {"cube": truth.astype(np.float32), "bands": _NM, "norm_factor": np.array([[0.42]])},
        "ntire2020": {"cube": truth.astype(np.float32), "bands": _NM.T},
        "icvl": {"rad": truth * 4095, "bands": _NM, "rgb": np.zeros((5, 4, 3), np.uint8)},
        "uint16": {"hsi": np.round(truth * 65535).astype(np.uint16)},
        "bands_first": {"cube": np.moveaxis(truth, -1, 0).astype(np.float32)},
    }[layout]
    _write_mat_v73(tmp_path / "scene.mat", variables)
    np.testing.assert_allclose(data.load_scene(tmp_path / "scene.mat"), truth, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variables,words", [
    ({"rgb": np.zeros((5, 4, 3)), "cube": np.zeros((5, 4, 30))}, ["31 bands", "rgb (5, 4, 3)"]),
    ({"ref": np.zeros((5, 4, 31)), "bands": np.arange(420.0, 721, 10)[None]}, ["420 to 720 nm", "400:10:700"]),
])
def test_a_mat_v73_without_a_400_700_nm_cube_is_one_sentence(tmp_path, variables, words):
    _write_mat_v73(tmp_path / "odd.mat", variables)
    msg = _load_error(tmp_path / "odd.mat")
    assert "odd.mat" in msg and all(w in msg for w in words) and "\n" not in msg


def test_a_bands_first_mat_cube_reads_bands_last(tmp_path):
    cube = np.random.default_rng(0).integers(0, 65536, (31, 5, 4)).astype(np.uint16)
    scipy.io.savemat(tmp_path / "t.mat", {"orig": cube})
    np.testing.assert_allclose(data.load_scene(tmp_path / "t.mat"), np.moveaxis(cube, 0, -1) / 65535, rtol=1e-6)


def test_float_counts_above_one_are_scaled_by_65535(tmp_path):
    np.save(tmp_path / "f.npy", np.full((3, 3, 31), 4000.0))
    np.testing.assert_allclose(data.load_scene(tmp_path / "f.npy"), 4000 / 65535, rtol=1e-6)


def test_a_cube_holding_nan_is_an_error_naming_the_file(tmp_path):
    cube = np.zeros((4, 4, 31), np.float32)
    cube[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", cube)
    msg = _load_error(tmp_path / "nan.npy")
    assert "nan.npy" in msg and "NaN" in msg


@pytest.mark.parametrize("content,words", [(b"PK\x03\x04 a cut-short archive", "not a readable .npy"),
                                           (np.zeros((0, 5, 31), np.float32), "shape (0, 5, 31)")])
def test_a_broken_or_empty_npy_is_an_error_naming_the_file(tmp_path, content, words):
    path = tmp_path / "cube.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    msg = _load_error(path)
    assert "cube.npy" in msg and words in msg


def test_an_unsupported_extension_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "cube.tif").write_bytes(b"II*\0")
    assert "cube.tif" in _load_error(tmp_path / "cube.tif")


def test_a_16_bit_grey_or_an_rgba_photo_reads_as_rgb(tmp_path):
    Image.fromarray(np.full((3, 4), 30000, np.uint16)).save(tmp_path / "grey16.png")
    Image.new("RGBA", (4, 3), (255, 0, 51, 7)).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(data.load_rgb(tmp_path / "grey16.png"), 30000 / 65535, rtol=1e-6)
    np.testing.assert_allclose(data.load_rgb(tmp_path / "rgba.png")[1, 2], [1, 0, 0.2], rtol=1e-6)


@pytest.mark.parametrize("channels", [3, 4])
def test_a_16_bit_colour_png_reads_at_16_bits(tmp_path, channels):
    a = np.random.default_rng(channels).integers(0, 65536, (7, 9, channels)).astype(np.uint16)
    _write_png16(tmp_path / "deep.png", a)
    np.testing.assert_array_equal(data.load_rgb(tmp_path / "deep.png") * 65535, a[..., :3].astype(np.float32))
    assert data.bit_depth(tmp_path / "deep.png") == 16


def test_an_unreadable_photo_is_an_error_naming_it(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(runs.UsageError, match="x.jpg"):
        data.load_rgb(tmp_path / "x.jpg")


@pytest.mark.parametrize("line,words", [("3,4," + ",".join(["0.5"] * 30), "line 2 has 32 values"),
                                        ("3,x," + ",".join(["0.5"] * 31), "line 2 holds something"),
                                        ("3,9," + ",".join(["0.5"] * 31), "pixel (3, 9)"),
                                        ("3,4," + ",".join(["-0.5"] * 31), "negative"),
                                        ("nan,4," + ",".join(["0.5"] * 31), "pixel (nan, 4)"),
                                        ("3,inf," + ",".join(["0.5"] * 31), "pixel (3, inf)")])
def test_points_file_errors_name_the_file_and_line(tmp_path, line, words):
    (tmp_path / "pts.csv").write_text("row,col," + ",".join(f"nm{n}" for n in cameras.WAVELENGTHS) + "\n" + line + "\n")
    with pytest.raises(runs.UsageError) as e:
        data.read_points(tmp_path / "pts.csv", 6, 9)
    assert "pts.csv" in str(e.value) and words in str(e.value)


def test_scene_names_match_whatever_their_case_and_suffix():
    assert data.scene_name("Egyptian_statue_ms") == data.scene_name("egyptian_statue") == "egyptian_statue"
    assert data.scene_name(Path("x") / "Balloons_ms.mat") == "balloons"
    assert data.split_scenes(["Egyptian_statue_ms", "paints_ms"])[2] == ["egyptian_statue"]


def test_find_scenes_lists_every_scene_format_and_nothing_else(tmp_path):
    _band_folder(tmp_path, scene="Paints")
    np.save(tmp_path / "Flowers_ms.npy", np.zeros((2, 2, 31)))
    scipy.io.savemat(tmp_path / "balloons_ms.mat", {"Omsi": np.zeros((2, 2, 31))})
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "runs").mkdir()
    assert list(data.find_scenes(tmp_path)) == ["balloons", "flowers", "paints"]


_OTHER_SCENES = ["paints", "sponges", "beads", "cd", "chart_and_stuffed_toy", "watercolors"]


@given(st.sets(st.sampled_from(list(data.CAVE_TEST_SCENES) + _OTHER_SCENES), min_size=1), st.data())
@examples(50)
def test_the_split_never_trains_on_a_test_scene(names, draw):
    default = [n for n in names if n in data.CAVE_TEST_SCENES]
    candidates = sorted(set(names) - set(default))
    val = draw.draw(st.lists(st.sampled_from(candidates), unique=True)) if candidates else []
    train_out, val_out, test_out = data.split_scenes(sorted(names), val_scenes=val)
    assert sorted(test_out) == sorted(default) and val_out == val
    assert sorted(train_out + val_out + test_out) == sorted(names)


def test_scenes_without_a_cave_test_scene_all_train():
    assert data.split_scenes(["demo_00", "demo_01"]) == (["demo_00", "demo_01"], [], [])


def test_an_unknown_test_scene_is_an_error_listing_the_scenes():
    with pytest.raises(runs.UsageError, match="nope.*paints"):
        data.split_scenes(["paints", "sponges"], test_scenes=["nope"])


def test_a_saved_cube_reads_back_exactly_from_npy_and_mat(tmp_path):
    cube = np.random.default_rng(1).random((5, 4, 31), dtype=np.float32)
    npy, mat = data.save_cube(tmp_path / "out" / "scene.v1", cube)
    assert npy.name == "scene.v1.npy" and mat.name == "scene.v1.mat"
    np.testing.assert_array_equal(data.load_scene(npy), cube)
    np.testing.assert_array_equal(data.load_scene(mat), cube)
    np.testing.assert_array_equal(scipy.io.loadmat(mat)["wavelengths"].ravel(), cameras.WAVELENGTHS)


def test_an_envi_cube_reads_back_with_its_wavelengths(tmp_path):
    cube = np.random.default_rng(2).random((5, 7, 31), dtype=np.float32)
    hdr, img = data.save_envi(tmp_path / "out" / "cube", cube)
    fields, back = _read_envi(hdr)
    np.testing.assert_array_equal(back, cube)
    assert fields["interleave"] == "bsq" and img.stat().st_size == cube.size * 4
    assert [float(v) for v in fields["wavelength"].split(",")] == list(cameras.WAVELENGTHS)


def test_save_png_writes_8_bit_grey_clipped_to_0_1(tmp_path):
    data.save_png(tmp_path / "p.png", np.array([[0.0, 0.5, 2.0]]))
    img = Image.open(tmp_path / "p.png")
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 128, 255]]


def test_demo_scenes_are_named_sized_and_in_0_1():
    scenes = data.demo_scenes(n=3, size=40, seed=5)
    assert [name for name, _ in scenes] == ["demo_00", "demo_01", "demo_02"]
    for _, hsi in scenes:
        assert hsi.shape == (40, 40, 31) and hsi.dtype == np.float32
        assert 0 <= hsi.min() and hsi.max() <= 1 and hsi.std() > 0.01


def test_demo_scenes_are_fixed_by_their_seed():
    a, b, c = data.demo_scenes(2, 32, seed=3), data.demo_scenes(2, 32, seed=3), data.demo_scenes(2, 32, seed=4)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert not np.array_equal(a[0][1], c[0][1])


@needs_data
@pytest.mark.parametrize("name,file", [("cie1964", "cie1964_10deg"), ("cie1931", "cie1931_2deg"),
                                       ("nikon_d700", "nikon_d700"), ("canon_5dmarkii", "canon_5dmarkii")])
def test_srf_tables_equal_their_csv_files(name, file):
    with open(DATA / "srf" / f"{file}_400_700_10nm.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert [int(r[0]) for r in rows] == list(cameras.WAVELENGTHS)
    assert np.array_equal(np.array(cameras.SRF_TABLES[name]), np.array(rows, dtype=np.float64)[:, 1:])


@needs_data
def test_colorchecker_equals_its_csv_file():
    with open(DATA / "reflectance" / "colorchecker_babelcolor_400_700_10nm.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert np.array_equal(cameras.COLORCHECKER, np.array(rows, dtype=np.float64)[:, 1:])


def test_the_preview_shows_each_colorchecker_patch_in_its_published_srgb_colour():
    """eval's and predict's preview.png is the cube as a screen shows it: the 24 measured reflectances come
    out in the published sRGB colours of their patches (8-bit, BabelColor's), within a few levels on average
    (the light is flat, not D65, and cyan lies outside sRGB); S.Y shown as if it were sRGB is ~60 levels off."""
    shown = cameras.srgb_preview(cameras.COLORCHECKER.T) * 255  # (24, 3)
    levels = np.abs(shown - np.array(COLORCHECKER_SRGB))
    assert levels.mean() < 4 and np.median(levels) < 3


@pytest.mark.parametrize("name", list(cameras.SRF_TABLES))
def test_srf_rows_are_non_negative_and_sum_to_one(name):
    s = cameras.srf_matrix(name)
    assert s.shape == (3, 31) and s.dtype == np.float32 and (s >= 0).all()
    np.testing.assert_allclose(s.sum(axis=1), 1, rtol=1e-6)


def test_an_unknown_srf_name_lists_the_choices():
    with pytest.raises(ValueError, match="--srf sony.*cie1964.*canon_5dmarkii"):
        cameras.srf_matrix("sony")


def test_rgb_from_hsi_agrees_in_numpy_and_torch():
    hsi = np.random.default_rng(0).random((2, 7, 5, 31), dtype=np.float32)
    out_np = cameras.rgb_from_hsi(hsi, "nikon_d700")
    out_t = cameras.rgb_from_hsi(torch.from_numpy(hsi).permute(0, 3, 1, 2), "nikon_d700")
    assert out_np.shape == (2, 7, 5, 3) and out_t.shape == (2, 3, 7, 5)
    np.testing.assert_allclose(out_t.permute(0, 2, 3, 1).numpy(), out_np, rtol=1e-5, atol=1e-7)
    assert 0 <= out_np.min() and out_np.max() <= 1


@given(st.integers(1, 64), st.integers(1, 64), st.integers(0, 10000))
@example(29, 100, 100)  # 0.01 * 29 * 100 = 28.999999999999996 in floating point
@example(58, 50, 100)   # the one such size up to 64 x 64 at omega = 0.01
def test_label_set_has_max_1_floor_ratio_hw_pixels(h, w, permyriad):
    """Counted in integers. Guards against the label count one short where omega.H.W rounds just below an
    integer in floating point."""
    expected = 0 if permyriad == 0 else max(1, permyriad * h * w // 10000)
    assert len(labels.draw_label_set(h, w, permyriad / 10000, seed=0)) == expected


@given(st.integers(1, 64), st.integers(1, 64), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_a_label_set_is_distinct_pixels_inside_the_image(h, w, ratio, seed):
    coords = labels.draw_label_set(h, w, ratio, seed)
    assert coords.shape[1] == 2 and coords.dtype == np.int64
    assert ((coords >= 0) & (coords < (h, w))).all()
    assert len({tuple(p) for p in coords}) == len(coords)


def test_a_label_ratio_of_one_labels_every_pixel():
    coords = labels.draw_label_set(3, 4, 1.0, seed=0)
    assert sorted(map(tuple, coords)) == [(r, c) for r in range(3) for c in range(4)]


def test_a_label_set_is_fixed_by_the_run_seed_and_the_scene_name():
    seed = labels.scene_seed(7, "Egyptian_statue_ms")
    assert seed == labels.scene_seed(7, "egyptian_statue") != labels.scene_seed(8, "egyptian_statue")
    a, b = labels.draw_label_set(512, 512, 1e-3, seed), labels.draw_label_set(512, 512, 1e-3, seed)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, labels.draw_label_set(512, 512, 1e-3, labels.scene_seed(7, "clay")))


def _coord_scene(h: int, w: int) -> np.ndarray:
    """An HSI whose band 0 encodes the pixel's row and band 1 its column, so that a spectrum says where it
    came from after any crop, flip or rotation."""
    hsi = np.full((h, w, 31), 0.5, np.float32)
    hsi[..., 0] = (np.arange(h)[:, None] + 1) / 256
    hsi[..., 1] = (np.arange(w)[None, :] + 1) / 256
    return hsi


@pytest.mark.parametrize("rot", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_labels_move_with_the_patch_under_rotation_and_flip(rot, flip):
    h, w, p = 40, 36, 16
    coords = labels.draw_label_set(h, w, 0.05, seed=1)
    ds = labels.PatchDataset([(_coord_scene(h, w), coords)], patch=p, stride=8)
    s = cameras.srf_matrix()
    for i, (_, top, left) in enumerate(ds.index):
        rgb, target, mask = ds.crop(i, rot, flip)
        inside = {(r, c) for r, c in coords if top <= r < top + p and left <= c < left + p}
        assert int(mask.sum()) == len(inside)
        assert torch.equal(target, target * mask)  # zero outside the labelled pixels
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        origin = {(round(float(target[0, y, x]) * 256) - 1, round(float(target[1, y, x]) * 256) - 1)
                  for y, x in zip(ys, xs)}
        assert origin == inside  # every labelled spectrum sits on a pixel of the mask and came from a label
        # and the RGB moved with them: X = S.Y at every labelled pixel
        np.testing.assert_allclose(rgb[:, ys, xs].numpy(), s @ target[:, ys, xs].numpy(), rtol=1e-5)


def test_a_patch_is_a_rigid_transform_of_the_scene():
    hsi = np.random.default_rng(2).random((20, 20, 31), dtype=np.float32)
    ds = labels.PatchDataset([(hsi, np.zeros((0, 2)))], patch=12, stride=8)
    rgb_scene = cameras.rgb_from_hsi(hsi)
    _, top, left = ds.index[-1]
    expected = np.fliplr(np.rot90(rgb_scene[top:top + 12, left:left + 12], 3))
    np.testing.assert_allclose(ds.crop(len(ds) - 1, 3, True)[0].permute(1, 2, 0).numpy(), expected, rtol=1e-5)


def test_patch_positions_cover_the_scene():
    ds = labels.PatchDataset([(np.zeros((200, 128, 31)), np.zeros((0, 2))), (np.zeros((512, 512, 31)), [[3, 4]])])
    assert [(t, l) for s, t, l in ds.index if s == 0] == [(0, 0), (64, 0), (72, 0)]
    assert len(ds) == 3 + 7 * 7


def test_a_scene_smaller_than_a_patch_is_padded_without_labels():
    ds = labels.PatchDataset([(np.full((10, 12, 31), 0.5), [[9, 11]])], patch=16)
    rgb, target, mask = ds.crop(0)
    assert len(ds) == 1 and rgb.shape == (3, 16, 16) and int(mask.sum()) == 1 and bool(mask[0, 9, 11])
    assert float(rgb[:, 10:].abs().sum()) == 0 and float(target[:, :, 12:].abs().sum()) == 0


def test_a_batchs_augmentation_is_reproducible_from_its_generator():
    hsi = np.random.default_rng(3).random((24, 24, 31), dtype=np.float32)
    ds = labels.PatchDataset([(hsi, labels.draw_label_set(24, 24, 0.1, 0))], patch=16, stride=8)
    idx = list(range(len(ds)))
    first = ds.batch(idx, torch.Generator().manual_seed(0))
    again = ds.batch(idx, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    plain = torch.stack([ds[i][0] for i in idx])
    assert not torch.equal(first[0], plain)  # some were augmented


@examples(25)
@given(h=st.integers(8, 40), w=st.integers(8, 40), p=st.integers(4, 16), ratio=st.floats(0.003, 0.05),
       seed=st.integers(0, 2**31))
def test_label_patches_each_hold_a_fixed_labelled_pixel(h, w, p, ratio, seed):
    """Guards against label-holding patches that miss their label, leave the scene, or supervise with a
    pixel outside the fixed label set: every sample holds >= 1 labelled pixel, all of the scene's set."""
    coords = labels.draw_label_set(h, w, ratio, seed)
    ds = labels.PatchDataset([(_coord_scene(h, w), coords)], patch=p, stride=4, around_labels=True)
    g = torch.Generator().manual_seed(seed)
    _, target, mask = ds.batch(list(range(len(ds))), g)
    assert (mask.flatten(1).sum(1) >= 1).all()
    fixed = {(int(r), int(c)) for r, c in coords}
    for t, mk in zip(target, mask):
        ys, xs = torch.nonzero(mk[0], as_tuple=True)
        seen = {(round(float(t[0, y, x]) * 256) - 1, round(float(t[1, y, x]) * 256) - 1) for y, x in zip(ys, xs)}
        assert seen <= fixed


def test_label_patches_draw_every_position_that_holds_the_label():
    """Guards against a biased draw (e.g. the label always at the patch's corner): with one label, the
    patch's offset is uniform over the p x p positions that contain it."""
    ds = labels.PatchDataset([(np.zeros((30, 30, 31)), [[15, 14]])], patch=4, around_labels=True)
    g = torch.Generator().manual_seed(0)
    seen = [ds.around_label(0, g) for _ in range(800)]
    assert set(seen) == {(t, l) for t in range(12, 16) for l in range(11, 15)}
    counts = np.unique([t * 100 + l for t, l in seen], return_counts=True)[1]
    assert counts.min() > 800 / 16 / 2  # each of the 16 drawn about 50 times


@examples(25)
@given(h=st.integers(8, 40), w=st.integers(8, 40), p=st.integers(4, 16), data_=st.data())
def test_pair_patches_hold_a_label_and_its_partner_when_one_is_in_reach(h, w, p, data_):
    """fit --measured-points cuts patches around pairs of labels: with two labels less than a patch apart in
    both coordinates, every patch holds both, and every offset that holds both is drawn; out of reach, each
    patch still holds one. Guards against a partner drawn but not held (a fed point with no unfed one beside it)."""
    pixel = st.tuples(st.integers(0, h - 1), st.integers(0, w - 1))
    a = data_.draw(pixel)
    b = data_.draw(pixel.filter(lambda x: x != a))
    reach = max(abs(a[0] - b[0]), abs(a[1] - b[1])) < p
    ds = labels.PatchDataset([(_coord_scene(h, w), [a, b])], patch=p, stride=4, around_labels=True, pairs=True)
    g = torch.Generator().manual_seed(h * w * p)
    _, _, mask = ds.batch(list(range(len(ds))) * 4, g)
    held = mask.flatten(1).sum(1)
    assert (held == 2).all() if reach else (held >= 1).all()
    if reach:
        tops = {ds.around_label(0, g)[0] for _ in range(200)}
        span = ds.stacks[0].shape[1] - p  # the last start
        assert tops == set(range(max(0, max(a[0], b[0]) - p + 1), min(a[0], b[0], span) + 1))


# the 24 ColorChecker patches in 8-bit sRGB as BabelColor publishes them, dark skin to black
COLORCHECKER_SRGB = [(115, 82, 68), (194, 150, 130), (98, 122, 157), (87, 108, 67), (133, 128, 177), (103, 189, 170),
                     (214, 126, 44), (80, 91, 166), (193, 90, 99), (94, 60, 108), (157, 188, 64), (224, 163, 46),
                     (56, 61, 150), (70, 148, 73), (175, 54, 60), (231, 199, 31), (187, 86, 149), (8, 133, 161),
                     (243, 243, 242), (200, 200, 200), (160, 160, 160), (122, 122, 121), (85, 85, 85), (52, 52, 52)]
