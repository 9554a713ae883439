"""
Golden values: what the commands compute, pinned to the last bit.

A fixed-seed `fit` of a few steps (on 64 x 64 crops of the real CAVE sample, and on the built-in demo
scenes with the CPU recipe's flags), its `eval` metrics.json, a `predict` cube (sRGB photo, tiles and
measured points) and a two-row `table`, each reduced to a SHA-256 of its exact bytes. They were taken
before the code was reorganised into one module per command, so that the move provably changed nothing;
any later change that alters what a command computes must update them on purpose, saying why.

Everything runs in this process on one thread: the sums of a parallel reduction may be ordered
differently with another thread count, and the values would then differ in the last bits.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cameras
import data
import train

DATA = Path(__file__).parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not found: the golden run on real crops "
                                                          "needs the shared data beside the checkout")
FAST = ["--patch", "32", "--stride", "32", "--batch-size", "2", "--device", "cpu"]

# SHA-256 (first 16 hex digits) of each pinned result; see `_weights_digest` and `_numbers_digest`.
GOLDEN = {
    "real/weights": "6f24c17877c025c6",
    "real/metrics": "3187d8a5d177642d",
    "real/predict": "af72589d3343be12",
    "demo/weights": "81140ab773809516",
    "demo/metrics": "76875c117a962045",
    "table/rows": "92a0d887f2ae6cc1",
}


def _digest(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def _weights_digest(ckpt_path: Path) -> str:
    """The names, shapes and exact bytes of every tensor of a checkpoint's model state, in order."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
    return _digest(f"{k}{tuple(v.shape)}".encode() + v.contiguous().numpy().tobytes() for k, v in state.items())


def _numbers(tree, path=""):
    """Every number of a JSON tree with its key path, in order (paths of files and the like are left out)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def _numbers_digest(tree) -> str:
    return _digest(f"{p}={v!r};".encode() for p, v in _numbers(tree))


def _metrics_digest(report: dict) -> str:
    """The metrics of an eval: overall, per scene (bands included) and the classical baseline's."""
    kept = {k: report[k] for k in ("labelled_pixels", "overall", "scenes", "root_poly_baseline", "calibration")
            if k in report}
    return _numbers_digest(kept)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _srgb8(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def golden_real(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("golden_real")
    root = tmp / "scenes"
    root.mkdir()
    for name, f in [("paints", "paints_ms"), ("sponges", "sponges_ms"), ("balloons", "balloons_ms.mat"),
                    ("fake_and_real_sushi", "fake_and_real_sushi_ms")]:
        np.save(root / f"{name}.npy", data.load_scene(DATA / "cave" / f)[100:164, 200:264])
    run = tmp / "run"
    assert train.main(["fit", "--data", str(root), "--epochs", "1", "--label-ratio", "0.01", "--test-scenes",
                       "fake_and_real_sushi", *FAST, "--out", str(run)]) == 0
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp / "eval"), "--seeds", "2",
                       "--calib-points", "5", "--device", "cpu"]) == 0
    sushi = np.load(root / "fake_and_real_sushi.npy")
    Image.fromarray(_srgb8(cameras.linear_srgb(sushi))).save(tmp / "photo.png")
    with open(tmp / "points.csv", "w") as f:
        f.write("row,col," + ",".join(f"{nm}nm" for nm in cameras.WAVELENGTHS) + "\n")
        for r, c in ((5, 7), (30, 40), (60, 12)):
            f.write(f"{r},{c}," + ",".join(f"{v:.6f}" for v in sushi[r, c]) + "\n")
    assert train.main(["predict", "--ckpt", str(run / "last.pt"), "--rgb", str(tmp / "photo.png"), "--out",
                       str(tmp / "pred"), "--tile", "48", "--points", str(tmp / "points.csv"), "--device", "cpu"]) == 0
    return {"real/weights": _weights_digest(run / "last.pt"),
            "real/metrics": _metrics_digest(json.loads((tmp / "eval" / "metrics.json").read_text())),
            "real/predict": _digest([np.load(tmp / "pred" / "cube.npy").tobytes()])}


@pytest.fixture(scope="module")
def golden_demo(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("golden_demo")
    run = tmp / "run"
    assert train.main(["fit", "--epochs", "1", "--patch", "32", "--stride", "64", "--batch-size", "4",
                       "--label-ratio", "0.001", "--lr", "3e-3", "--test-scenes", "demo_03", "--prior", "rootpoly",
                       "--exposure", "2", "--warmup", "2", "--device", "cpu", "--out", str(run)]) == 0
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp / "eval"), "--seeds", "2",
                       "--device", "cpu"]) == 0
    return {"demo/weights": _weights_digest(run / "last.pt"),
            "demo/metrics": _metrics_digest(json.loads((tmp / "eval" / "metrics.json").read_text()))}


@pytest.fixture(scope="module")
def golden_table(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("golden_table")
    root = tmp / "scenes"
    root.mkdir()
    for name, cube in data.demo_scenes(n=3, size=64):
        np.save(root / f"{name}.npy", cube[:48, :48])
    assert train.main(["table", "transform", "--data", str(root), "--out", str(tmp / "table"), "--test-scenes",
                       "demo_02", "--epochs", "1", *FAST]) == 0
    result = json.loads((tmp / "table" / "table.json").read_text())
    rows = [{"label": r["label"], "runs": [{"steps": run["steps"], **{k: run["report"][k] for k in
                                                                       ("overall", "scenes", "root_poly_baseline")
                                                                       if k in run["report"]}}
                                           for run in r["runs"]]} for r in result["rows"]]
    labels = json.dumps([r["label"] for r in rows]).encode()
    return {"table/rows": _digest([labels, _numbers_digest(rows).encode()])}


@needs_data
@pytest.mark.parametrize("key", ["real/weights", "real/metrics", "real/predict"])
def test_fit_eval_and_predict_on_real_crops_compute_the_pinned_values(golden_real, key):
    assert golden_real[key] == GOLDEN[key]


@pytest.mark.parametrize("key", ["demo/weights", "demo/metrics"])
def test_the_recipe_on_the_demo_scenes_computes_the_pinned_values(golden_demo, key):
    assert golden_demo[key] == GOLDEN[key]


def test_a_table_computes_the_pinned_values(golden_table):
    assert golden_table["table/rows"] == GOLDEN["table/rows"]
