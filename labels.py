"""
Label sets and training patches: the label budget of Pixel-SSR (Sec. 3.1, Eq. (2)).

A spectrometer measures fixed points. Every training scene gets one fixed set of
max(1, floor(omega.H.W)) labelled pixels (pixelssr.num_points), drawn once from the run seed and the
scene's name and saved with the run; training patches carry those pixels through crops, flips and
rotations, and supervise only where they hold one (docs/design.md, "The label budget").
  - the fixed labelled pixels of a scene                        scene_seed, draw_label_set, pixel_coords
  - a run's label sets as its checkpoint keeps them, its Gamma    make_label_sets, expand_label_sets, gamma_params
  - training patches that carry their labels                    PatchDataset
  - the exposure augmentation of a batch                          augment_exposure

Glossary: ratio = omega, the label ratio; labels = the labelled pixels, (k, 2) (row, col);
hsi = Y, the ground-truth HSI (H, W, 31); target = Y^p, its spectra at the labelled pixels, zero elsewhere;
rgb = X = S.Y; mask = the labelled pixels of a patch.
"""

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cameras import BANDS, rgb_from_hsi
from data import scene_name
from pixelssr import fit_gamma, num_points
from runs import UsageError, stable_seed


# -----------------------------------------------------------------------------
# Label sets

def pixel_coords(index: np.ndarray, w: int) -> np.ndarray:
    """Row-major pixel indices (k,) of an image w pixels wide -> (k, 2) int64 (row, col)."""
    return np.stack(np.divmod(np.asarray(index), w), axis=1).astype(np.int64)


def scene_seed(seed: int, name: str) -> int:
    """Seed of a scene's label set, stable across runs and machines: the run seed and a CRC of the
    normalised scene name, 32 bits."""
    return stable_seed(seed, zlib.crc32(scene_name(name).encode())) & 0xFFFFFFFF


def draw_label_set(h: int, w: int, ratio: float, seed: int) -> np.ndarray:
    """The fixed labelled pixels of one scene: (k, 2) int64 (row, col), k = num_points(h, w, ratio)
    distinct pixels in row-major order, the same for the same seed. Drawn once per run and saved with it:
    redrawing every step would leak the whole image over an epoch."""
    k = num_points(h, w, ratio)
    return pixel_coords(np.sort(np.random.default_rng(seed).choice(h * w, size=k, replace=False)), w)


# -----------------------------------------------------------------------------
# A run's label sets and its Gamma

def make_label_sets(scenes: dict[str, np.ndarray], ratio: float, seed: int, srf: torch.Tensor) -> dict:
    """The fixed labelled pixels of every training scene as the checkpoint keeps them: coords (k, 2), their
    spectra and RGB; at ratio 1 (image-level supervision: every pixel) only the rule and the scene's size,
    {"every_pixel": (H, W)}, which expand_label_sets turns back into the pixels, so that a checkpoint does not
    carry every training spectrum (all of CAVE's 20 training cubes, rewritten every epoch)."""
    if ratio >= 1:
        return {name: {"every_pixel": torch.tensor(hsi.shape[:2])} for name, hsi in scenes.items()}
    labels = {}
    for name, hsi in scenes.items():
        coords = draw_label_set(*hsi.shape[:2], ratio, scene_seed(seed, name))
        spectra = torch.from_numpy(hsi[coords[:, 0], coords[:, 1]]) if len(coords) else torch.zeros(0, hsi.shape[2])
        labels[name] = {"coords": torch.from_numpy(coords).long(), "spectra": spectra,
                        "rgb": spectra @ srf.T}
    return labels

def expand_label_sets(labels: dict, scenes: dict[str, np.ndarray], srf: torch.Tensor) -> dict:
    """Label sets with coords, spectra and RGB for every scene: as stored, or re-derived from the scene (in
    `scenes`) where the checkpoint keeps only the rule "every pixel" (make_label_sets)."""
    out = {}
    for name, v in labels.items():
        if "every_pixel" not in v:
            out[name] = v
            continue
        hsi = scenes[name]
        if list(hsi.shape[:2]) != v["every_pixel"].tolist():
            raise UsageError(f"{name}: the run labelled every pixel of a {v['every_pixel'].tolist()} scene; "
                                  f"this one is {list(hsi.shape[:2])}.")
        h, w, bands = hsi.shape
        spectra = torch.from_numpy(hsi.reshape(h * w, bands))
        coords = torch.from_numpy(pixel_coords(np.arange(h * w), w))  # row-major, as draw_label_set's
        out[name] = {"coords": coords, "spectra": spectra, "rgb": spectra @ srf.T}
    return out

def gamma_params(labels: dict, scenes: dict[str, np.ndarray], srf: torch.Tensor) -> tuple[float, float]:
    """Gamma(alpha, theta) of the labelled spectra; with no labels, of the training RGB values."""
    spectra = torch.cat([v["spectra"] for v in labels.values()])
    if spectra.numel() >= 2 and spectra.var() > 0:
        return fit_gamma(spectra)
    rgb = torch.cat([rgb_from_hsi(torch.from_numpy(h).permute(2, 0, 1)[None], srf).flatten() for h in scenes.values()])
    return fit_gamma(rgb)


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
    border; the random crop is train.draw_batch's seeded permutation of these positions. Scenes smaller than
    the patch are zero-padded at the bottom and right: a zero HSI renders to a zero RGB, so the padding
    is consistent with X = S.Y, and it holds no labels.
    `batch` gives each sample a random 90-degree rotation and horizontal flip (the 8 symmetries of
    the square) drawn from the generator it is handed, so a training step is a pure function of its
    seed and a resumed run repeats it exactly; ds[i] is the un-augmented sample.
    With around_labels, `batch` instead places each sample of a scene that has labels around one of
    them: a labelled pixel of the sample's scene drawn at random, then a patch position drawn uniformly
    among those that contain it (the paper's "one point spectrum per 128x128 patch"). The label set
    stays the fixed one; only where patches are cut changes, so that L_pHSI reaches every step instead
    of the ~1 patch in 3 that holds a label at omega = 0.01 % with 64x64 patches. The epoch keeps its
    length and its balance between scenes (each grid position stands for one draw in its scene).
    With pairs as well (fit --pair-patches, on with --measured-points), the patch holds a second labelled pixel too where the first
    has a partner within reach (both coordinates less than a patch apart): a fed spectrum then has an unfed
    label beside it to teach carrying it (docs/results.md, "Measured points through the network").
    """

    def __init__(self, scenes, srf="cie1964", patch: int = 128, stride: int = 64, around_labels: bool = False,
                 pairs: bool = False):
        self.patch, self.around_labels, self.pairs = patch, around_labels, pairs
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
        first the label, then the position among the patches that contain it. None if the scene has none.
        With self.pairs, a partner within reach is drawn after the label, and the position among the patches
        that contain both."""
        s = self.index[i][0]
        labels, (h, w) = self.labels[s], self.stacks[s].shape[1:]
        if len(labels) == 0:
            return None
        a = labels[int(torch.randint(len(labels), (1,), generator=generator))]
        b = self.partner(s, a, generator) if self.pairs else a

        def start(x: int, y: int, n: int) -> int:  # uniform over the starts that hold x and y and fit in [0, n - patch]
            lo, hi = max(0, max(x, y) - self.patch + 1), min(min(x, y), n - self.patch)
            return lo + int(torch.randint(hi - lo + 1, (1,), generator=generator))

        return start(int(a[0]), int(b[0]), h), start(int(a[1]), int(b[1]), w)

    def partner(self, s: int, a: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
        """Another labelled pixel (2,) of scene s that one patch can hold with label a, drawn uniformly; a
        itself where none is in reach."""
        labels = self.labels[s]
        near = labels[(np.abs(labels - a).max(1) < self.patch) & (labels != a).any(1)]
        return near[int(torch.randint(len(near), (1,), generator=generator))] if len(near) else a


def augment_exposure(rgb: torch.Tensor, target: torch.Tensor, k: float, g: torch.Generator):
    """Scale each sample's RGB and spectra by one factor, log-uniform in [1/k, k]: the same surface under
    more or less light. X = S.Y is linear, so the pair stays consistent; it teaches the exposure
    invariance the root-polynomial regression has by construction. k = 1 changes nothing."""
    if k == 1:
        return rgb, target
    scale = torch.exp((2 * torch.rand(rgb.shape[0], 1, 1, 1, generator=g) - 1) * math.log(k))
    return rgb * scale.to(rgb.device), target * scale.to(target.device)
