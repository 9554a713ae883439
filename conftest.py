"""
What several test files share: the real sample's path, a small model and its inputs, Hypothesis settings,
independent reference code (the centred DFT, numpy metrics, a 16-bit PNG writer, an ENVI reader), scene
folders on disk, `_fit` / `_eval` for the commands, and `real_run`, one short fit and eval on real crops.

Test files import the helpers by name (`from conftest import SMALL, _fit, ...`); pytest puts this folder
on sys.path. `real_run` is a fixture, computed once per session for every file that asks for it.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.signal
import torch
from hypothesis import settings

import backbones
import data
import evaluate
import pixelssr as P
import train
from ssm import SS2D

# ---- the real sample (../shared/data) ----

DATA = Path(__file__).parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not found: real-data tests need "
                                                          "the shared data beside the checkout")
REAL_TEST = "fake_and_real_sushi"  # the test scene of every run on real crops


# ---- Hypothesis ----

def examples(n: int, **kwargs) -> settings:
    """Hypothesis settings: n examples, no deadline (a CPU shared with other jobs makes timings vary)."""
    return settings(max_examples=n, deadline=None, **kwargs)


# ---- a small model ----

SMALL = P.Config(width=8, d_state=4)  # the real architecture, narrow enough for CPU tests


def _model(cfg: P.Config = SMALL, seed: int = 0) -> P.DyProMamba:
    """The network cfg describes (its body included), initialised from seed."""
    torch.manual_seed(seed)
    return backbones.network(cfg)


def _inputs(b: int, h: int, w: int, seed: int = 0, ratio: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb (b, 3, h, w) in [0, 1), a Gamma point cube (b, 31, h, w) at the label ratio)."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, h, w, generator=g)
    return rgb, P.sample_points((b, 31, h, w), ratio, 2.0, 0.1, generator=g)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                  scale: float | None = None) -> None:
    """max |actual − expected| ≤ rtol · scale, scale = max |expected| unless given (exact zeros pass)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{what}: error {err:.3g} at scale {scale:.3g}"


def _ss2d(seed: int, dim: int, d_state: int, expand: int) -> SS2D:
    """An SS2D block in float64 with non-trivial values everywhere, so that every path matters."""
    torch.manual_seed(seed)
    model = SS2D(dim, d_state=d_state, expand=expand).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# ---- independent reference code ----

def _centred_dft(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The centred unitary DFT (or its inverse) along the last dim, by torch.fft."""
    f = torch.fft.ifft if inverse else torch.fft.fft
    return torch.fft.fftshift(f(torch.fft.ifftshift(x, dim=-1), norm="ortho"), dim=-1)


def _np_ssim_band(x: np.ndarray, y: np.ndarray, size: int = 11) -> float:
    """Wang et al.'s reference SSIM (ssim_index.m): 11x11 Gaussian, sigma 1.5, 'valid' filtering; a smaller
    image's window: the same Gaussian over `size` taps, centred."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda a: scipy.signal.convolve2d(a, np.rot90(win, 2), mode="valid")  # noqa: E731
    c1, c2 = 0.01**2, 0.03**2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())


def _np_metrics(pred: np.ndarray, target: np.ndarray) -> dict:
    """Independent numpy versions on one (31, h, w) image, pred clamped to [0, 1]."""
    p, t = np.clip(pred, 0, 1), target
    mse = ((p - t) ** 2).mean()
    band_mse = ((p - t) ** 2).mean(axis=(1, 2))
    pf, tf = p.reshape(31, -1).T, t.reshape(31, -1).T
    cos = [1.0 if not (a.any() or b.any()) else np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8)
           for a, b in zip(pf, tf)]  # two black pixels agree
    return {"rmse": math.sqrt(mse), "psnr": 10 * math.log10(1 / mse),
            "psnr_bandwise": float(np.mean(10 * np.log10(1 / band_mse))),
            "ssim": float(np.mean([_np_ssim_band(a, b) for a, b in zip(p, t)])),
            "sam": float(np.mean(np.degrees(np.arccos(np.clip(cos, -1, 1))))),
            "mrae": float(np.mean(np.abs(p - t) / np.maximum(t, 1e-3)))}  # the stated guard: max(t, 1e-3)


def _write_png16(path: Path, a: np.ndarray) -> None:
    """An independent 16-bit PNG encoder (Pillow cannot write 16-bit colour): a (H, W, 3 or 4) uint16
    array, big-endian samples, rows filtered in turn with None, Sub and Up, as encoders mix them."""
    import struct
    import zlib
    h, w, c = a.shape
    rows = a.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    bpp = 2 * c
    out = []
    for i, row in enumerate(rows):
        kind = i % 3
        prior = rows[i - 1] if i else np.zeros_like(row)
        filtered = {0: row, 1: row - np.concatenate([np.zeros(bpp, np.uint8), row[:-bpp]]), 2: row - prior}[kind]
        out.append(bytes([kind]) + filtered.astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(out)))
                     + chunk(b"IEND", b""))


def _read_envi(hdr: Path) -> tuple[dict, np.ndarray]:
    """A small independent ENVI reader: the header's key = value pairs ({...} lists may span lines), then
    the raw file beside it (.img, or the header's name without .hdr) by data type, byte order and
    interleave -> (header, (lines, samples, bands) array)."""
    import re
    text = hdr.read_text()
    assert text.startswith("ENVI")
    fields = {}
    for key, value in re.findall(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text, re.M):
        fields[key.lower()] = value.strip("{} \n")
    dtype = {"1": "u1", "2": "i2", "3": "i4", "4": "f4", "5": "f8", "12": "u2"}[fields["data type"]]
    dtype = np.dtype(dtype).newbyteorder("<" if fields.get("byte order", "0") == "0" else ">")
    raw = next(p for p in (hdr.with_suffix(".img"), hdr.with_suffix("")) if p.is_file())
    lines, samples, bands = (int(fields[k]) for k in ("lines", "samples", "bands"))
    a = np.fromfile(raw, dtype=dtype, offset=int(fields.get("header offset", "0")))
    order = {"bsq": (bands, lines, samples), "bil": (lines, bands, samples), "bip": (lines, samples, bands)}
    a = a.reshape(order[fields["interleave"].lower()])
    to_hwb = {"bsq": (1, 2, 0), "bil": (0, 2, 1), "bip": (0, 1, 2)}[fields["interleave"].lower()]
    return fields, a.transpose(to_hwb)


# ---- scenes on disk ----

def _scene_dir(tmp_path: Path, scenes: dict[str, np.ndarray]) -> Path:
    """A folder of <name>.npy cubes."""
    root = tmp_path / "scenes"
    root.mkdir()
    for name, cube in scenes.items():
        np.save(root / f"{name}.npy", cube)
    return root


def _demo_dir(tmp_path: Path) -> Path:
    """Three 48 x 48 demo scenes, demo_00 .. demo_02."""
    return _scene_dir(tmp_path, {n: c[:48, :48] for n, c in data.demo_scenes(n=3, size=64)})


def _real_crops(tmp_path: Path) -> Path:
    """64 x 64 crops of four real CAVE scenes (balloons' is 64 x 56): three to train, REAL_TEST to test."""
    cave = DATA / "cave"
    crops = {n: data.load_scene(cave / f)[100:164, 200:264] for n, f in
             [("paints", "paints_ms"), ("sponges", "sponges_ms"), ("balloons", "balloons_ms.mat"),
              (REAL_TEST, "fake_and_real_sushi_ms")]}
    return _scene_dir(tmp_path, crops)


# ---- the commands ----

FAST = ("--patch", "32", "--stride", "32", "--batch-size", "2")  # 48 x 48 scenes: 4 patches each, 2 a step


def _fit_argv(root: Path, out: Path, *flags: str, epochs: int | None = 1, test: str = "demo_02",
              patches: tuple[str, ...] = FAST) -> list[str]:
    """`python train.py fit` on the scenes in root into out, `test` held out, the patches of `patches`;
    `epochs` None leaves --epochs out (a resume keeps the run's own)."""
    return ["fit", "--data", str(root), "--out", str(out), *(["--epochs", str(epochs)] if epochs else []),
            "--test-scenes", test, *patches, *flags]


def _fit(root: Path, out: Path, *flags: str, **kwargs) -> dict:
    """Run `_fit_argv(root, out, *flags, **kwargs)`, check that it succeeds; -> its last.pt."""
    assert train.main(_fit_argv(root, out, *flags, **kwargs)) == 0
    return torch.load(Path(out) / "last.pt", weights_only=True)


def _eval(run: Path, out: Path, *flags: str, seeds: int = 1) -> dict:
    """`python train.py eval` of run/last.pt into out over `seeds` Gamma draws, checked; -> its metrics.json."""
    assert train.main(["eval", "--ckpt", str(Path(run) / "last.pt"), "--out", str(out), "--seeds", str(seeds),
                       *flags]) == 0
    return json.loads((Path(out) / "metrics.json").read_text())


def _crash_on_call(monkeypatch, owner, name: str, n: int):
    """Make owner.name raise KeyboardInterrupt (a killed run) on its n-th call; -> the real function."""
    real, calls = getattr(owner, name), [0]

    def crash(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(owner, name, crash)
    return real


# ---- one short run on real crops, shared by the eval, predict and data-parallel tests ----

@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """One short fit on 64 x 64 real crops (three training scenes, 1 % labels, REAL_TEST to test), then its
    eval over two Gamma seeds, with spies recording every point cube eval draws and the inputs of every
    root-polynomial fit; the tests read the run, the report and what the spies saw."""
    tmp = tmp_path_factory.mktemp("real_run")
    root = _real_crops(tmp)
    run, ev = tmp / "run", tmp / "eval"
    fit_flags = ("--label-ratio", "0.01", "--device", "cpu")
    ckpt = _fit(root, run, *fit_flags, test=REAL_TEST)
    points, root_poly = [], []
    real_points, real_fit = P.sample_points, evaluate.fit_root_poly

    def points_spy(*a, **k):
        out = real_points(*a, **k)
        points.append(out.detach().cpu().clone())
        return out

    def fit_spy(*a, **k):
        root_poly.append(tuple(np.array(x, copy=True) for x in a[:2]))
        return real_fit(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "sample_points", points_spy)
        mp.setattr(evaluate, "fit_root_poly", fit_spy)
        report = _eval(run, ev, "--data", str(root), seeds=2)
    return SimpleNamespace(root=root, run=run, eval=ev, report=report, ckpt=ckpt, points=points,
                           root_poly=root_poly, fit_flags=fit_flags)


def _real_label_count(run) -> int:
    """max(1, floor(omega.H.W)) at omega = 1 %, in whole numbers (H.W // 100), summed over the run's training
    scenes (balloons' crop is 64 x 56)."""
    sizes = [np.load(run.root / f"{n}.npy").shape[:2] for n in run.ckpt["split"]["train"]]
    return sum(max(1, h * w // 100) for h, w in sizes)
