"""
The metrics of spectral reconstruction (Pixel-SSR's supplementary Sec. 6, Eq. (10)-(13)), on whole images.

  rmse, psnr, psnr_bandwise   Eq. (10), (11): over the whole cube per image (PSNR peak 1), or per band
  ssim                        Eq. (12): Wang et al.'s SSIM per band, Gaussian window 11 / sigma 1.5, valid region
  sam                         Eq. (13): the spectral angle per pixel, in degrees
  mrae                        NTIRE's mean relative absolute error, with a stated zero guard (MRAE_EPS)
  channel_ssim                SSIM per channel of (b, c, h, w) maps: the metric's core, and L_SSIM's (pixelssr.py)
Every metric clamps pred to [0, 1], as evaluation on whole images does (docs/design.md, "Evaluation"),
accepts (31, h, w) or (b, 31, h, w) and returns the mean over images of the per-image value. pixelssr.py
re-exports them under its own name, the public one (pixelssr.rmse, ...).
"""

import torch
import torch.nn.functional as F

def _batched(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred clamped to [0, 1], target), as (b, c, h, w). The clamp is a full-size copy, so it is made only
    when pred leaves [0, 1], which one cheaper pass of aminmax tells (docs/performance.md, "The metrics'
    clamp, layout and norms")."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    lo, hi = torch.aminmax(pred)
    if lo < 0 or hi > 1:
        pred = pred.clamp(0, 1)
    return (pred[None], target[None]) if pred.dim() == 3 else (pred, target)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    g = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-g * g / (2 * sigma * sigma))
    return g / g.sum()  # (size,): the 2-D window is its outer product with itself


def _gaussian_sums(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Window sums of (b, c, h, w) maps under the 2-D window g gᵀ over the valid region -> (b, c, h', w').

    float32 (the training loss, with gradients): one depthwise convolution, which oneDNN runs fast.
    float64 (the metrics): PyTorch's CPU float64 depthwise convolution is slow, so the separable window's
    sums are taken as 11 shifted, weighted slices per axis (docs/performance.md, "SSIM in blocks")."""
    s = g.numel()
    if t.dtype != torch.float64:
        return F.conv2d(t, (g[:, None] * g[None, :]).expand(t.shape[1], 1, s, s), groups=t.shape[1])
    h, w = t.shape[-2] - s + 1, t.shape[-1] - s + 1
    cols = t[..., :h, :] * g[0]                                          # (b, c, h', w)
    for k in range(1, s):
        cols.add_(t[..., k:k + h, :], alpha=float(g[k]))
    out = cols[..., :w] * g[0]                                           # (b, c, h', w')
    for k in range(1, s):
        out.add_(cols[..., k:k + w], alpha=float(g[k]))
    return out


def channel_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-channel SSIM of (b, c, h, w) maps -> (b, c): Wang et al. 2004 with an 11x11 Gaussian
    window (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over the valid region (no padding), as in
    Wang's reference code. Images smaller than 11 pixels use a window as large as they allow."""
    size = min(11, *x.shape[-2:])
    g = _gaussian_window(size, 1.5, x.dtype, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _gaussian_sums(x, g), _gaussian_sums(y, g)
    # SSIM needs the variances only as their sum, σx² + σy²: one window sum of x² + y², not two
    sxx_syy = _gaussian_sums(x * x + y * y, g) - mx * mx - my * my
    sxy = _gaussian_sums(x * y, g) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx_syy + c2))
    return smap.mean((-2, -1))


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error over the whole cube, Eq. (10)."""
    p, t = _batched(pred, target)
    return ((p - t) ** 2).mean((1, 2, 3)).sqrt().mean()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB with peak 1 from the MSE over the whole cube, per image, then averaged.

    This is the common "cube" PSNR; the paper's Eq. (11) is garbled. Infinite for identical images.
    """
    p, t = _batched(pred, target)
    return (10 * torch.log10(1 / ((p - t) ** 2).mean((1, 2, 3)))).mean()


def psnr_bandwise(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR per band (peak 1), averaged over bands and images: the other convention papers report."""
    p, t = _batched(pred, target)
    return (10 * torch.log10(1 / ((p - t) ** 2).mean((2, 3)))).mean()


# pixels per block of bands in ssim: 4 bands of a 512x512 cube, a block that stays in a CPU's cache
# (the measured choice: docs/performance.md, "SSIM in blocks")
SSIM_BLOCK = 2 ** 20


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per band (Gaussian 11 / sigma 1.5, data range 1, valid region), mean over bands, Eq. (12).
    Taken a few bands at a time, about SSIM_BLOCK pixels over the batch, each band contiguous (a cube read
    from disk is (H, W, 31)): the float64 window sums (_gaussian_sums) pass over their maps 22 times, and
    a block that stays in the CPU's cache takes far less time than a whole cube at once."""
    p, t = (x.contiguous() for x in _batched(pred, target))
    step = max(1, SSIM_BLOCK // (p.shape[0] * p.shape[-2] * p.shape[-1]))
    return torch.cat([channel_ssim(p[:, i:i + step], t[:, i:i + step]) for i in range(0, p.shape[1], step)], 1).mean()


def sam(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spectral angle in degrees per pixel, mean over pixels, Eq. (13). A pixel that is zero in both
    pred and target has angle 0 (they agree); a zero pixel in one of them only, 90 (eps keeps the
    division finite and the cosine 0). Computed in float64: near cos = 1, acos of a float32 cosine
    cannot resolve angles below ~0.02 degrees."""
    p, t = _batched(pred.double(), target.double())
    pn, tn = (p * p).sum(1).sqrt(), (t * t).sum(1).sqrt()  # not .norm(dim=1), slower over bands
    cos = torch.where((pn == 0) & (tn == 0), 1.0, (p * t).sum(1) / (pn * tn).clamp_min(eps))
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1))).mean().to(pred.dtype)


MRAE_EPS = 1e-3  # the zero guard of mrae: a quarter of one 8-bit step (1/255)


def mrae(pred: torch.Tensor, target: torch.Tensor, eps: float = MRAE_EPS) -> torch.Tensor:
    """Mean relative absolute error, the NTIRE challenges' primary metric: mean over pixels and bands of
    |pred - target| / max(target, eps), per image, then averaged.

    The guard: NTIRE's scoring divides by target + machine epsilon, which leaves a zero target's error
    ~1e16 times too large. Its float cubes hold no exact zeros, but copies of CAVE quantised to 8 bits
    do (2.9 % of fake_and_real_sushi's values), and one of them would outweigh the whole image.
    eps = 1e-3 is below the smallest non-zero 8-bit value (1/255), so every non-zero value of such data
    is divided by itself, and a zero one by 1e-3."""
    p, t = _batched(pred, target)
    return ((p - t).abs() / t.clamp_min(eps)).mean((1, 2, 3)).mean()
