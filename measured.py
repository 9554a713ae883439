"""
Measured points through the network (beyond the paper; fit --point-path, issue 25).

A researcher with a spectrometer has true spectra at a few pixels of the very image being reconstructed.
Fed into Pixel-SSR's point cube they do not reach the output: with --prior rootpoly the body's correction
passes a per-band gate that ends near zero, and a handful of spectra cannot move it (docs/results.md,
"Patches around pairs of labels"). PointPath is a path around the body: the last layer of the network
spreads each fed spectrum's error to the pixels that look like its material, by learned scales.

For every fed pixel k with true spectrum y_k and the network's spectrum p_k there, a per-band log-ratio
g_k = clip(log(max(y_k, 1e-4) / max(p_k, 1e-4)), +-GAIN); pixel q's spectrum p_q becomes
    p_q . exp(a * sum_k w_qk g_k / max(1, sum_k w_qk)),
    w_qk = exp(-(1 - cos(p_q, p_k)) / angle^2 - |q - k|^2 / (2 reach^2)),
with a (per band), angle and reach learned. 1 - cos ~ theta^2 / 2, so w is a Gaussian in the angle between
the two spectra (scale `angle`, radians) and in their distance (scale `reach`, pixels). A pixel like no fed
one keeps its spectrum; a fed pixel with no fed pixel like it takes its measured spectrum while a = 1 (as
at the start) and the ratio is within the clip (a factor e).
The form is evaluate.calibrate_locally's, made a layer trained with the network: with --measured-points
the loss scores the unfed labels beside the fed ones, so the scales, and the body under them, are fitted
on labels. It differs from that post-hoc correction in four ways: it corrects the network's own cube (not
calibrate's globally corrected one) and does not put spectra back onto their pixels' RGB; its weight uses
1 - cos for the squared angle (smooth where the angle is 0); a is learned per band (1 there); and the reach
is in pixels, not a quarter of the image's longer side (the training patches are crops, which do not know
their image's size): 128 px at the start, a quarter of CAVE's 512-pixel side.
Without fed points (fed all False, or None) the output is the network's own: the paper's method unchanged.
The fed pixels are scored too, and a lone one matches its label at a = 1: the body learns from the unfed
labels, the path's scales from both. Validation during fit feeds no points, so it never sees the path.

Glossary: hsi = Y^r before the path (b, 31, h, w), points = the point cube with the fed spectra at their
pixels, fed = which pixels hold a measured spectrum (b, 1, h, w), gain = g, scale = a.
"""

import math

import torch
import torch.nn as nn

ANGLE = 2.0    # degrees: the starting angle scale, evaluate.LOCAL_ANGLE's (chosen on the regression's cubes)
REACH = 128.0  # pixels: the starting reach, evaluate.LOCAL_REACH (a quarter) of a 512-pixel CAVE side
GAIN = 1.0     # the largest |log-ratio| a point applies per band: a near-black band is no measure


class PointPath(nn.Module):
    """The last layer of a --point-path network: each fed pixel's log-ratio spread to the pixels like it
    (the formula above), with a learned angle, reach and per-band scale."""

    def __init__(self, bands: int):
        super().__init__()
        self.log_angle = nn.Parameter(torch.tensor(math.log(math.radians(ANGLE))))
        self.log_reach = nn.Parameter(torch.tensor(math.log(REACH)))
        self.scale = nn.Parameter(torch.ones(bands))  # a = 1: a lone fed pixel takes its measured spectrum

    def forward(self, hsi: torch.Tensor, points: torch.Tensor, fed: torch.Tensor | None) -> torch.Tensor:
        """hsi (b, n, h, w), points (b, n, h, w), fed (b, 1, h, w) bool or None -> (b, n, h, w). hsi is
        non-negative with the default |.| output; with --output linear a negative p_k reads as 1e-4."""
        if fed is None or not fed.any():
            # in training every parameter stays in the graph (a zero gradient): DistributedDataParallel
            # expects one for each, every step, and a rank's slice may hold no fed pixel
            return hsi + 0 * sum(p.sum() for p in self.parameters()) if self.training else hsi
        if fed.shape != (hsi.shape[0], 1, *hsi.shape[2:]):
            raise ValueError(f"fed must be (b, 1, h, w) = {(hsi.shape[0], 1, *hsi.shape[2:])}, got {tuple(fed.shape)}")
        # float32 under autocast (bf16 training): in bfloat16, 1 - cos of two like spectra is rounding noise
        # (~3e-3) above angle^2 (~1e-3), and the weights with it
        with torch.autocast(hsi.device.type, enabled=False):
            hsi, points = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (hsi, points))
            return torch.stack([self.one(y, p, f[0].to(y.device)) for y, p, f in zip(hsi, points, fed)])

    def one(self, y: torch.Tensor, points: torch.Tensor, fed: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """One image: y, points (n, h, w), fed (h, w); chunk pixels at a time, so that memory stays
        bounded on a large photo ((chunk, k) weights and (chunk, n) spectra at once)."""
        rc = fed.nonzero()                                                # (k, 2)
        if not len(rc):
            return y
        n, h, w = y.shape
        p = y.flatten(1).T                                                # (h*w, n)
        pk, yk = y[:, rc[:, 0], rc[:, 1]].T, points[:, rc[:, 0], rc[:, 1]].T  # (k, n)
        gain = (yk.clamp_min(1e-4).log() - pk.clamp_min(1e-4).log()).clamp(-GAIN, GAIN)
        angle2, reach2 = self.log_angle.exp() ** 2, self.log_reach.exp() ** 2
        out = []
        for q in torch.arange(h * w, device=y.device).split(chunk):
            cos = unit(p[q]) @ unit(pk).T                                 # (c, k)
            dist2 = (q[:, None] // w - rc[:, 0]) ** 2 + (q[:, None] % w - rc[:, 1]) ** 2  # (c, k)
            wt = torch.exp(-(1 - cos) / angle2 - dist2 / (2 * reach2))
            corr = wt @ gain / wt.sum(1, keepdim=True).clamp_min(1)       # (c, n)
            out.append(p[q] * torch.exp(self.scale * corr))
        return torch.cat(out).T.reshape(n, h, w)


def unit(a: torch.Tensor) -> torch.Tensor:
    """Rows of a (m, n) scaled to length 1 (a zero row stays zero)."""
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
