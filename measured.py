"""
Measured points through the network (beyond the paper; fit --point-path, issue 25).

A researcher with a spectrometer has true spectra at a few pixels of the very image being reconstructed.
Fed into Pixel-SSR's point cube they do not reach the output: with --prior rootpoly the body's correction
passes a per-band gate that ends near zero, and a handful of spectra cannot move it (docs/results.md,
"Patches around pairs of labels"). PointPath is a path around the body: the last layer of the network
spreads each fed spectrum's error to the pixels that look like its material, by learned scales.

For every fed pixel k with true spectrum y_k and the network's spectrum p_k there, a per-band log-ratio
g_k = clip(log(y_k / p_k), +-GAIN); pixel q's spectrum p_q becomes
    p_q . exp(a * sum_k w_qk g_k / max(1, sum_k w_qk)),
    w_qk = exp(-(1 - cos(p_q, p_k)) / angle^2 - |q - k|^2 / (2 reach^2)),
with a (per band), angle and reach learned. 1 - cos ~ theta^2 / 2, so w is a Gaussian in the angle between
the two spectra (scale `angle`, radians) and in their distance (scale `reach`, pixels). A pixel like no fed
one keeps its spectrum; a fed pixel with no fed neighbour takes its measured spectrum (w_kk = 1, a = 1).
It is evaluate.calibrate_locally's form (which corrects a finished cube after the network, with the scales
chosen on the regression's cubes) made a layer trained with the network: with --measured-points the loss
scores the unfed labels beside the fed ones, so the scales, and the body under them, are fitted on labels.
Without fed points (fed all False, or None) the output is the network's own: the paper's method unchanged.

Glossary: hsi = Y^r before the path (b, 31, h, w), points = the point cube with the fed spectra at their
pixels, fed = which pixels hold a measured spectrum (b, 1, h, w), gain = g, scale = a.
"""

import math

import torch
import torch.nn as nn

ANGLE = 2.0    # degrees: the starting angle scale, evaluate.LOCAL_ANGLE (chosen on the regression's cubes)
REACH = 128.0  # pixels: the starting reach, evaluate.LOCAL_REACH of a 512-pixel CAVE image's side
GAIN = 1.0     # the largest |log-ratio| a point applies per band: a near-black band is no measure


class PointPath(nn.Module):
    def __init__(self, bands: int):
        super().__init__()
        self.log_angle = nn.Parameter(torch.tensor(math.log(math.radians(ANGLE))))
        self.log_reach = nn.Parameter(torch.tensor(math.log(REACH)))
        self.scale = nn.Parameter(torch.ones(bands))  # a = 1: a lone fed pixel takes its measured spectrum

    def forward(self, hsi: torch.Tensor, points: torch.Tensor, fed: torch.Tensor | None) -> torch.Tensor:
        """hsi (b, n, h, w) >= 0, points (b, n, h, w), fed (b, 1, h, w) bool or None -> (b, n, h, w)."""
        if fed is None or not fed.any():
            return hsi
        # float32 under autocast (bf16 training): in bfloat16, 1 - cos of two like spectra is noise (~1e-2)
        # far above angle^2 (~1e-3), and the weights with it
        with torch.autocast(hsi.device.type, enabled=False):
            hsi, points = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (hsi, points))
            return torch.stack([self.one(y, p, f[0]) for y, p, f in zip(hsi, points, fed)])

    def one(self, y: torch.Tensor, points: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """One image: y, points (n, h, w), fed (h, w)."""
        rc = fed.nonzero()                                                # (k, 2)
        if not len(rc):
            return y
        n, h, w = y.shape
        p = y.flatten(1).T                                                # (h*w, n)
        pk, yk = y[:, rc[:, 0], rc[:, 1]].T, points[:, rc[:, 0], rc[:, 1]].T  # (k, n)
        gain = (yk.clamp_min(1e-4).log() - pk.clamp_min(1e-4).log()).clamp(-GAIN, GAIN)
        cos = unit(p) @ unit(pk).T                                        # (h*w, k)
        rows, cols = (i.flatten() for i in torch.meshgrid(torch.arange(h, device=y.device),
                                                           torch.arange(w, device=y.device), indexing="ij"))
        dist2 = (rows[:, None] - rc[:, 0]) ** 2 + (cols[:, None] - rc[:, 1]) ** 2  # (h*w, k)
        wt = torch.exp(-(1 - cos) / self.log_angle.exp() ** 2 - dist2 / (2 * self.log_reach.exp() ** 2))
        corr = wt @ gain / wt.sum(1, keepdim=True).clamp_min(1)           # (h*w, n)
        return y * torch.exp(self.scale * corr).T.reshape(n, h, w)


def unit(a: torch.Tensor) -> torch.Tensor:
    """Rows of a (m, n) scaled to length 1 (a zero row stays zero)."""
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
