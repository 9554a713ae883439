"""
Pixel-SSR and its network DyPro-Mamba, in one file read top to bottom.

Paper: "From Image- to Pixel-level: Label-efficient Hyperspectral Image Reconstruction"
(Leng, Li, Xu, Song, 2025). Spectral super-resolution (SSR) turns an RGB image X into a
31-band hyperspectral image (HSI, 400-700 nm). Pixel-SSR supervises it with only a handful of
measured point spectra per scene (a spectrometer's worth), and feeds the network a sparse cube of
Gamma-distributed "point spectra" so that it runs on new scenes where nothing was measured.

What is here, in reading order (the paper's sections and equations):
  - point spectra: fit_gamma, sample_points                          Sec. 3.1, Eq. (2)-(3)
  - root_poly_features, the classical baseline's RGB terms (Finlayson et al. 2015)
  - building blocks: LayerNorm2d, SpectralPrompt, SpectralAttention, FFN, PromptSSM
  - DRPN, the Dynamic Receptive Prompt Neck                          Sec. 3.2.1, Eq. (4)-(7)
  - PromptSSMU, the U-shaped body of three PromptSSMs                Sec. 3.2.2, Eq. (8)-(9)
  - DyProMamba, the network: DRPN, a body (PromptSSMU or one of backbones.py's, Table 2), the output layer
  - metrics: rmse, psnr, psnr_bandwise, ssim, sam (and mrae, NTIRE's)  Supp. Sec. 6, Eq. (10)-(13), metrics.py
The FRFT lives in frft.py, the selective scan (M_scan, SS2D) in ssm.py, the metrics in metrics.py (named
here too), the losses of Eq. (14)-(15) in losses.py, the other bodies of the universal paradigm (Sec. 4.3,
Table 2: MST++, HSCNN+) in backbones.py, and the path of measured points around the body (beyond the
paper; cfg.point_path) in measured.py.

Glossary (code name = paper symbol):
  rgb        = X, the RGB image (b, 3, h, w)            points = Y_g^p, Gamma point spectra (b, 31, h, w)
  target     = Y^p, measured spectra at labelled pixels   mask   = the labelled pixels (b, 1, h, w)
  hsi        = Y^r, the reconstructed HSI                 y3     = Y^3, DRPN's preliminary HSI
  f1         = F_1, shallow RGB feature                   p_spa  = P_spa, Spa-FRFT prompt
  p_hf       = P_hf, Spa-HF prompt                        p_spe  = P_spe, spectral prompt (heads, d, d)
  srf        = S, the 3x31 spectral response (X = S.Y)    h2r    = M_H2R, HSI-to-RGB map of L_P2I
  prior      = M, root-polynomial RGB-to-spectrum map (6, 31), only with Config.prior = "rootpoly" (not the paper's)
  gate       = g, per-band scale of the correction to M (31, 1, 1), zero at the start; with the prior only
  C          = cfg.width (the paper's B = 40)             ratio  = omega, the label ratio
  C'         = cfg.drpn_width, of F1, P_spa and P_hf (Table 4's costs; docs/design.md "Model size")
  body       = the dotted box of Fig. 3: Y3 and P_spe (and X) in, the 31 bands before the output layer out
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from frft import frft2
from measured import PointPath
from metrics import MRAE_EPS, mrae, psnr, psnr_bandwise, rmse, sam, ssim  # noqa: F401 (the public names)
from ssm import SS2D


@dataclass
class Config:
    bands: int = 31                 # 400-700 nm in 10 nm steps, the CAVE / NTIRE convention
    width: int = 40                 # C, feature width of the body's level 0 (paper Sec. 4.1: B = 40)
    d_state: int = 8                # n of the PromptSSM scans; Mamba's 16 is far over the paper's MACs (Table 10)
    expand: int = 2                 # SS2D inner width E = expand * width in the PromptSSMs, as VMamba
    heads: int = 1                  # spectral-attention heads at level 0, doubled at level 1 (MST++)
    ffn_mult: int = 2               # FFN hidden width = ffn_mult * width: with 3x3 convs, the body of Table 4 (0.56 M)
    # The DRPN at the paper's cost (Table 4: 0.05 M, 0.47 G; P_spa ~0.05 G, P_hf ~0.02 G at 128x128)
    drpn_width: int = 8             # channels of F1, P_spa and P_hf: two 3x3 convs at 8 are P_hf's 0.02 G
    drpn_expand: int = 1            # SS2D inner width of the P_spa scans (their n is d_state's): a light branch
    y1_width: int = 10              # the hidden width of Eq. (6)'s two convolutions, which the paper does not give
    spe_pool: int = 4               # P_spe reads Y3 average-pooled by this per side: a channel Gram needs few pixels
    frft_order: float = 0.5         # initial learnable FRFT order: halfway between space and frequency
    # ablation switches (paper Tables 3-6)
    use_spa: bool = True            # P_spa, the Spa-FRFT prompt branch (Table 4)
    use_hf: bool = True             # P_hf, the Spa-HF prompt branch (Table 4)
    use_spe: bool = True            # P_spe, the spectral prompt handed to every PromptSSM (Table 4)
    use_prompt_ssm: bool = True     # PromptSSM's prompted spectral attention; off = plain SS2D + FFN block (Table 4)
    use_drpn: bool = True           # the whole DRPN (Table 4, row 4): off = the body gets the point cube as Y3, no P_spe
    spa_transform: str = "frft"     # "frft" or "fft": the transform of the P_spa branch (Table 5)
    points: str = "gamma"           # "gamma", "gaussian" or "zeros": the input point spectra (Table 3)
    # the name of the body in Fig. 3's dotted box (Table 2, the universal paradigm), a key of backbones.BODIES:
    # "dypro", the paper's U of PromptSSMs (PromptSSMU below), "mst++" or "hscnn+", fed the same DRPN output
    backbone: str = "dypro"
    h2r: bool = True                # build M_H2R, the training-only head of L_P2I; train.py turns it off with that term
    # the output layer (see DyProMamba.head): "abs" = |conv3(.)|, non-negative as spectra are, yet never
    # saturated (its gradient is +-1 everywhere) and blind to the sign a band's weights happen to take;
    # "linear" = the paper's bare conv3, whose bands trained networks flipped (docs/results.md, "What training fixes")
    output: str = "abs"
    # "rootpoly" (opt-in, beyond the paper): Y^r = |M(X) + g * correction|, M the root-polynomial map
    # fitted on the run's labelled pixels (a (6, 31) buffer, saved with the weights), g a per-band gate
    # that starts at zero, so training starts at the classical baseline; "none": the paper's network alone
    prior: str = "none"
    # MAE-KTSR's body only (backbone "maektsr", maektsr.py): ISFF on or off (--no-isff); which encoder weights
    # train (--mae-freeze all / none / last); the window its encoder attends within (fit's --patch, A13)
    use_isff: bool = True
    mae_freeze: str = "all"
    mae_window: int = 128           # pixels, fit's default --patch (the paper's minimum input size)
    # beyond the paper (fit --point-path, measured.py): a last layer that spreads measured spectra fed at known
    # pixels to the pixels of their material, so that a spectrometer's points reach the output
    point_path: bool = False


# -----------------------------------------------------------------------------
# Point spectra (Sec. 3.1)

def fit_gamma(values: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Method-of-moments Gamma fit: alpha = m^2 / v, theta = v / m.

    values: any array or tensor of non-negative spectral values (e.g. the labelled training spectra).
    Returns (alpha, theta), the shape and scale of Gamma(alpha, theta).
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise ValueError(f"fit_gamma needs at least 2 values, got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError("fit_gamma got non-finite values (NaN or inf)")
    if (v < 0).any():
        raise ValueError(f"fit_gamma needs non-negative values, the smallest is {v.min().item():.3g}")
    mean, var = v.mean().item(), v.var(unbiased=False).item()
    if mean <= 0 or var <= 0:
        raise ValueError(f"fit_gamma needs positive mean and variance, got mean {mean:.3g}, variance {var:.3g}")
    return mean * mean / var, var / mean


UNSUPERVISED_POINTS = 1e-4  # omega = 0 (unsupervised) still feeds the network a sparse cube, at the 0.01 % count


def num_points(h: int, w: int, ratio: float) -> int:
    """max(1, floor(omega.H.W)), Eq. (2): the labelled pixels of an h x w scene (labels.draw_label_set) and the
    point spectra of its cube (sample_points). 0 at omega = 0, the unsupervised mode; 1 labels every pixel."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"label ratio must be in [0, 1], got {ratio}")
    return 0 if ratio == 0 else max(1, math.floor(ratio * h * w + 1e-9))  # + 1e-9: 0.29 * 100 must give 29


def sample_points(shape: tuple[int, int, int, int], ratio: float, alpha: float, theta: float,
                  generator: torch.Generator | None = None, dist: str = "gamma",
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The sparse point-spectra cube Y_g^p = Y_g (x) M of Eq. (2).

    shape: (b, bands, h, w). Each image gets num_points(h, w, ratio or UNSUPERVISED_POINTS) distinct random
    pixels whose spectra are i.i.d. draws: Gamma(alpha, theta) ("gamma"), a Gaussian of the same mean and variance
    ("gaussian", the paper's ablation; it can go negative, which is the point of the comparison),
    or nothing ("zeros"). Everything else is zero. Returns a float32 tensor of `shape`.
    The draws come from `generator` when given (evaluation fixes it by seed), else from torch's global RNG;
    it must be a CPU generator, since the cube is drawn on the CPU and then moved to `device`.
    """
    b, bands, h, w = shape
    k = num_points(h, w, ratio or UNSUPERVISED_POINTS)
    out = torch.zeros(b, bands, h * w)
    if dist != "zeros":
        # torch's Gamma sampler takes no generator, so numpy draws the values from a seed taken from ours
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        if dist == "gamma":
            vals = rng.gamma(alpha, theta, size=(b, bands, k))
        elif dist == "gaussian":
            vals = rng.normal(alpha * theta, math.sqrt(alpha) * theta, size=(b, bands, k))
        else:
            raise ValueError(f"unknown point distribution {dist!r}: use gamma, gaussian or zeros")
        for i in range(b):
            idx = torch.randperm(h * w, generator=generator)[:k]
            out[i][:, idx] = torch.as_tensor(vals[i], dtype=torch.float32)
    return out.view(b, bands, h, w).to(device)


def root_poly_features(rgb: torch.Tensor | np.ndarray, dim: int = -1) -> torch.Tensor | np.ndarray:
    """Degree-2 root-polynomial terms of RGB (Finlayson, Mackiewicz, Hurlbert 2015): r, g, b, sqrt(rg),
    sqrt(gb), sqrt(rb), stacked along `dim` (3 channels in, 6 out, any layout; a numpy array in, one out).
    They scale linearly with exposure, which is why a linear map of them is the classical RGB-to-spectrum
    baseline (evaluate.fit_root_poly)."""
    if isinstance(rgb, np.ndarray):
        return root_poly_features(torch.from_numpy(rgb), dim).numpy()
    r, g, b = rgb.clamp_min(0).unbind(dim)
    # sqrt's gradient is infinite at 0; the features of a black pixel need none
    root = [torch.sqrt((u * v).clamp_min(1e-12)) * (u * v > 0) for u, v in ((r, g), (g, b), (r, b))]
    return torch.stack([r, g, b, *root], dim)


# -----------------------------------------------------------------------------
# Building blocks

def conv3(cin: int, cout: int) -> nn.Conv2d:
    """The paper's M_3x3: a 3x3 convolution that keeps the spatial size."""
    return nn.Conv2d(cin, cout, 3, padding=1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (b, c, h, w) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channel_attention(q: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """MST-style spectral-wise self-attention map softmax(sigma . k^ q^T) per head.

    q, k: (b, heads, d, L), L = pixels; sigma: (heads, 1, 1). Returns (b, heads, d, d), each row a
    probability vector over channels. q and k are L2-normalised over pixels so the logits are
    cosines, scaled by the learnable temperature sigma.
    """
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return torch.softmax(sigma * (k @ q.transpose(-2, -1)), dim=-1)


class SpectralPrompt(nn.Module):
    """P_spe for one PromptSSM: the spectral self-attention map of Y3 (Sec. 3.2.1, end).

    Y3 is average-pooled by `scale` (the block's downsampling times cfg.spe_pool: coarser than the
    block, docs/design.md) and then projected to the block's width (1x1 conv to q and k); the result is
    a (b, heads, d, d) channel-mixing matrix.
    """

    def __init__(self, bands: int, width: int, heads: int, scale: int):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.qk = nn.Conv2d(bands, 2 * width, 1)
        self.sigma = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, y3: torch.Tensor) -> torch.Tensor:
        if self.scale > 1:
            y3 = F.avg_pool2d(y3, self.scale, ceil_mode=True)  # ceil: a patch smaller than scale still gives a pixel
        b = y3.shape[0]
        q, k = self.qk(y3).reshape(b, 2, self.heads, -1, y3.shape[-2] * y3.shape[-1]).unbind(1)  # (b, heads, d, L)
        return channel_attention(q, k, self.sigma)


class SpectralAttention(nn.Module):
    """Prompt-guided spectral attention, Eq. (9): F3 = V . (P_spe . softmax(K^T Q)).

    As the paper says: a linear layer, then three 3x3 convolutions give Q, K and V. We make the 3x3
    convolutions depthwise (as Restormer and MST++ do): full 3x3 convs would cost 9.C^2 MACs per pixel
    each, far over the paper's 4.65 G for the whole model at 128x128 (Table 10; the counts: `python bench.py
    --only bodies`, docs/performance.md, "Parameters and MACs").
    In MST's channel-first layout Eq. (9) reads out = (P_spe @ A) @ v with A = softmax(sigma . k^ q^T)
    over its last dim; P_spe and A are both row-stochastic, so their product still mixes channels
    with weights that sum to one.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.linear = nn.Conv2d(width, width, 1)
        self.qkv = nn.Conv2d(width, 3 * width, 3, padding=1, groups=width)  # the three depthwise M_3x3 in one conv
        self.sigma = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor, p_spe: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.linear(x))  # groups=c: conv channels 3i, 3i+1, 3i+2 are q_i, k_i, v_i
        q, k, v = qkv.reshape(b, self.heads, c // self.heads, 3, h * w).unbind(3)  # (b, heads, d, L)
        attn = channel_attention(q, k, self.sigma)  # (b, heads, d, d)
        if p_spe is not None:
            attn = p_spe @ attn  # Eq. (9): the prompt re-mixes the block's own channel attention
        return self.proj((attn @ v).reshape(b, c, h, w))


class FFN(nn.Module):
    """The paper's "efficient FFN, consisting of several M_3x3 and M_GeLU" (Sec. 3.2.2), read as two 3x3
    convolutions around a GELU, the hidden one `mult` times wider (docs/design.md, "Readings of the paper")."""

    def __init__(self, width: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(conv3(width, mult * width), nn.GELU(), conv3(mult * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PromptSSM(nn.Module):
    """One PromptSSM (Sec. 3.2.2): prompted spectral attention, a 2-D selective scan, an FFN.

    Pre-norm residual block: x += SA(LN(x), P_spe); x += SS2D(LN(x)); x += FFN(LN(x)).
    With cfg.use_prompt_ssm off the attention sub-layer is gone and it is a plain Mamba block.
    """

    def __init__(self, cfg: Config, width: int, heads: int):
        super().__init__()
        self.attn = SpectralAttention(width, heads) if cfg.use_prompt_ssm else None
        self.norm1 = LayerNorm2d(width) if cfg.use_prompt_ssm else None
        self.norm2, self.ssm = LayerNorm2d(width), SS2D(width, d_state=cfg.d_state, expand=cfg.expand)
        self.norm3, self.ffn = LayerNorm2d(width), FFN(width, cfg.ffn_mult)

    def forward(self, x: torch.Tensor, p_spe: torch.Tensor | None) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.norm1(x), p_spe)  # Eq. (9)
        x = x + self.ssm(self.norm2(x))
        return x + self.ffn(self.norm3(x))


# -----------------------------------------------------------------------------
# DRPN (Sec. 3.2.1)

class SpaPrompt(nn.Module):
    """Spa-FRFT prompt P_spa, Eq. (4): a scan in the spatial domain and one in the FRFT domain.

    The FRFT of F1 is complex; it enters the second scan as 2C' real channels [Re; Im], leaves as
    2C', goes back by the inverse FRFT (order -a) and its real part is kept. The order a is learnable
    (one for both axes). It is stored divided by `order_scale`: Adam moves every parameter by ~lr per
    step whatever its gradient (and the order's gradient is ~N.|x|, frft.py), so this gives the order
    a 10x smaller learning rate than the weights — a step of lr in a is a large rotation of the
    spectrum, a step of lr in a weight is not.
    cfg.spa_transform = "fft" swaps the FRFT for the centred unitary 2-D DFT, which is the FRFT of
    order 1, so that the ablation changes only the order (Table 5).
    """

    order_scale = 0.1  # order = order_scale * self.order

    def __init__(self, cfg: Config):
        super().__init__()
        c = cfg.drpn_width
        self.use_frft = cfg.spa_transform == "frft"
        if cfg.spa_transform not in ("frft", "fft"):
            raise ValueError(f"spa_transform must be 'frft' or 'fft', got {cfg.spa_transform!r}")
        self.order = nn.Parameter(torch.tensor(cfg.frft_order / self.order_scale)) if self.use_frft else None
        self.scan_spa = SS2D(c, d_state=cfg.d_state, expand=cfg.drpn_expand)
        self.scan_frft = SS2D(2 * c, d_state=cfg.d_state, expand=cfg.drpn_expand)
        self.fuse = conv3(2 * c, c)

    def transform(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """FRFT2 of order a (inverse: -a), or the centred unitary DFT2 in the ablation; complex out."""
        if self.use_frft:
            a = self.order * self.order_scale
            return frft2(x, -a if inverse else a)
        dft = torch.fft.ifft2 if inverse else torch.fft.fft2
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bfloat16 under autocast: CUDA FFTs refuse it
        return torch.fft.fftshift(dft(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))

    def forward(self, f1: torch.Tensor) -> torch.Tensor:
        f_spa = self.scan_spa(f1)  # Eq. (4), F_Spa
        z = self.transform(f1)  # (b, c, h, w) complex
        z = torch.cat([z.real, z.imag], 1)  # (b, 2c, h, w): a line of its own, so the complex z is gone before the scan
        z = self.scan_frft(z)  # (b, 2c, h, w), real
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bfloat16 under autocast; torch.complex takes none
        f_frft = self.transform(torch.complex(*z.chunk(2, 1)), inverse=True).real  # Eq. (4), F_FRFT
        return self.fuse(torch.cat([f_spa, f_frft], 1)) * F.silu(f1)  # Eq. (4), P_spa


class DRPN(nn.Module):
    """Dynamic Receptive Prompt Neck: RGB + point spectra -> (Y3, [P_spe per PromptSSM]).

    Its widths are the paper's costs (Table 4, docs/design.md "Model size"): F1, P_spa and P_hf at
    cfg.drpn_width channels, Eq. (6)'s hidden layer at cfg.y1_width, Y1-Y3 at the 31 bands.
    A switched-off branch (cfg.use_spa / use_hf) leaves its fusing conv of Eq. (7) reading Y alone.
    Nothing is built that the configuration does not use: F1 only feeds the two spatial branches, and
    P_spe only exists for the PromptSSMs' prompted attention.
    """

    def __init__(self, cfg: Config, prompt_shapes: list[tuple[int, int, int]]):
        super().__init__()
        c, nb = cfg.drpn_width, cfg.bands
        self.f1 = conv3(3, c) if cfg.use_spa or cfg.use_hf else None
        self.spa = SpaPrompt(cfg) if cfg.use_spa else None
        self.hf = nn.Sequential(conv3(c, c), nn.GELU(), conv3(c, c)) if cfg.use_hf else None
        self.y1 = nn.Sequential(conv3(nb + 1, cfg.y1_width), nn.GELU(), conv3(cfg.y1_width, nb))
        # Eq. (7)'s convs stay when their prompt is switched off and read Y alone: Table 4 has the model 0.05 G
        # lighter without P_spa and 0.02 G without P_hf, what the prompts cost, not a 31-band conv's 0.18 G
        self.y2 = conv3(nb + (c if cfg.use_spa else 0), nb)
        self.y3 = conv3(nb + (c if cfg.use_hf else 0), nb)
        # one P_spe per prompted block of the body: (width, heads, downsampling) of that block; a body without
        # prompted attention (no PromptSSM attention, or another backbone) asks for none
        self.spe = (nn.ModuleList(SpectralPrompt(nb, w, h, s * cfg.spe_pool) for w, h, s in prompt_shapes)
                    if cfg.use_spe else None)

    def forward(self, rgb: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """rgb (b, 3, h, w), points (b, 31, h, w) -> Y3 (b, 31, h, w) and one P_spe (b, heads, d, d) per
        prompted block of the body, or None."""
        f1 = self.f1(rgb) if self.f1 is not None else None  # Eq. (4), (b, C', h, w)
        x_m = rgb.mean(1, keepdim=True)  # Eq. (6), X_m
        y = self.y1(torch.cat([points, x_m], 1))  # Eq. (6), Y1
        y = self.y2(torch.cat([y, self.spa(f1)], 1) if self.spa is not None else y)  # Eq. (7), Y2
        y = self.y3(torch.cat([y, self.p_hf(f1)], 1) if self.hf is not None else y)  # Eq. (7), Y3
        return y, [p(y) for p in self.spe] if self.spe else None

    def p_hf(self, f1: torch.Tensor) -> torch.Tensor:
        """P_hf, Eq. (5): the high frequencies F1 - F2 of F1 (b, C', h, w), F2 its 2x2 average-pooled and
        nearest-upsampled copy, through conv3, GELU, conv3."""
        h, w = f1.shape[-2:]
        f2 = F.interpolate(F.avg_pool2d(f1, 2, ceil_mode=True), scale_factor=2, mode="nearest")[..., :h, :w]
        return self.hf(f1 - f2)


# -----------------------------------------------------------------------------
# DyPro-Mamba (Sec. 3.2.2)

def no_prompts(cfg: Config) -> list[tuple[int, int, int]]:
    """prompt_shapes of a body with no slot for a spectral prompt (backbones.py, maektsr.py): no P_spe is built."""
    return []


class PromptSSMU(nn.Module):
    """DyPro-Mamba's body, the dotted box of Fig. 3: a two-level U of three PromptSSMs, Eq. (8).

    The interface every body has (backbones.py): `prompt_shapes(cfg)`, the (width, heads, downsampling) of
    each block that takes a P_spe (empty: none), asked before the body is built so that the DRPN is built
    (and initialised) first; `multiple`, what h and w must divide (DyProMamba pads to it);
    `out`, the last layer; forward(rgb (b, 3, h, w), y3 (b, 31, h, w),
    p_spe: list or None) -> (b, 31, h, w), before the output layer's |.|.
    """

    multiple = 2  # one down-sampling

    @staticmethod
    def prompt_shapes(cfg: Config) -> list[tuple[int, int, int]]:
        c, hd = cfg.width, cfg.heads
        return [(c, hd, 1), (2 * c, 2 * hd, 2), (c, hd, 1)] if cfg.use_prompt_ssm else []

    def __init__(self, cfg: Config):
        super().__init__()
        c, nb, hd = cfg.width, cfg.bands, cfg.heads
        self.embed = conv3(3, c)                      # Eq. (8), M_3x3(X)
        self.fuse_in = conv3(c + nb, c)               # Eq. (8), Y4
        self.enc = PromptSSM(cfg, c, hd)
        self.down = nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)
        self.mid = PromptSSM(cfg, 2 * c, 2 * hd)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.skip = nn.Conv2d(2 * c, c, 1)            # the level-0 skip, not in Eq. (8): as U-shaped networks (docs/design.md)
        self.dec = PromptSSM(cfg, c, hd)
        self.out = conv3(c, nb)                       # Eq. (8), Y^r

    def forward(self, rgb: torch.Tensor, y3: torch.Tensor, p_spe: list[torch.Tensor] | None) -> torch.Tensor:
        p0, p1, p2 = p_spe or (None, None, None)
        y4 = self.fuse_in(torch.cat([self.embed(rgb), y3], 1))  # Eq. (8), Y4
        e = self.enc(y4, p0)
        m = self.mid(self.down(e), p1)
        y5 = self.skip(torch.cat([self.up(m), e], 1))  # Eq. (8), Y5
        return self.out(self.dec(y5, p2))  # Eq. (8), Y^r before the output layer's |.|


class DyProMamba(nn.Module):
    """The full network: DRPN, then a body (Fig. 3's dotted box: PromptSSMU, or cfg.backbone's), then the
    output layer.

    forward(rgb (b, 3, h, w), points (b, 31, h, w)) -> (hsi (b, 31, h, w), y3 (b, 31, h, w)), any h, w:
    sizes the body cannot take are padded to its multiple (RGB by edge replication, points by zeros so no
    measured spectrum is duplicated) and cropped back. Without the DRPN (cfg.use_drpn off, Table 4's row
    without it) the body's Y3 is the point cube itself, and that is what comes back as y3. fed (b, 1, h, w)
    bool: the pixels whose point-cube spectrum was measured, read by cfg.point_path's layer only (measured.py).
    """

    def __init__(self, cfg: Config | None = None, body: type[nn.Module] = PromptSSMU):
        """body: the class in Fig. 3's dotted box (the universal paradigm, Table 2), built here as body(cfg):
        PromptSSMU, the paper's, or any other with its interface (backbones.BODIES maps cfg.backbone to one)."""
        super().__init__()
        cfg = Config() if cfg is None else cfg  # a fresh default each time: a shared one would be mutable state
        self.cfg = cfg
        nb = cfg.bands
        if cfg.output not in ("abs", "linear") or cfg.prior not in ("none", "rootpoly"):
            raise ValueError(f"output must be abs or linear and prior none or rootpoly, got {cfg.output!r}, {cfg.prior!r}")
        self.drpn = DRPN(cfg, body.prompt_shapes(cfg)) if cfg.use_drpn else None
        self.body = body(cfg)
        # M_H2R of L_P2I, training only; it maps Y3 to RGB, so without the DRPN there is nothing for it to constrain
        self.h2r = nn.Sequential(conv3(nb, nb), nn.GELU(), conv3(nb, 3)) if cfg.h2r and cfg.use_drpn else None
        if cfg.prior == "rootpoly":
            self.register_buffer("prior", torch.zeros(6, nb))  # set by train.py from the labelled pixels
            # Start at the prior with a zero gate on the body's output, not a zeroed last conv: Adam's
            # first step moves every parameter by ~lr whatever its gradient, so from a zero conv it adds
            # ~lr times 9C features to each band, enough to double the error at the labelled pixels
            # (docs/design.md); from a zero gate it adds lr * body output.
            self.gate = nn.Parameter(torch.zeros(nb, 1, 1))
        else:
            self.prior = self.gate = None
        self.point_path = PointPath(nb) if cfg.point_path else None

    def forward(self, rgb: torch.Tensor, points: torch.Tensor,
                fed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = rgb.shape[-2:]
        cube = points
        k = self.body.multiple
        ph, pw = -h % k, -w % k
        if ph or pw:
            rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
            points = F.pad(points, (0, pw, 0, ph))
        y3, p_spe = self.drpn(rgb, points) if self.drpn is not None else (points, None)
        hsi = self.head(self.body(rgb, y3, p_spe), rgb)[..., :h, :w]  # Eq. (8), Y^r
        if self.point_path is not None:
            hsi = self.point_path(hsi, cube, fed)
        return hsi, y3[..., :h, :w]

    def head(self, y: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """Y^r from the last conv's (b, 31, h, w) output: with the root-polynomial prior, M(X) plus the output
        scaled by the per-band gate; then |.| unless cfg.output is the paper's "linear".

        Why |.|: with a bare conv (the paper's form) trained networks flip whole bands negative, and
        the clamp at evaluation turns them black. L_SSIM over adjacent bands defends such a band: where
        a band has texture, both of SSIM's factors change sign with it, so SSIM(x, -x) ~ SSIM(x, x).
        Spectra are non-negative; softplus makes them so but saturates, and a band parked at exactly 0
        gets no gradient back (docs/design.md). |.| is non-negative, its gradient is +-1 everywhere, and
        a band whose weights flip sign comes out unchanged."""
        if self.prior is not None:
            y = self.gate * y + torch.einsum("fn,bfhw->bnhw", self.prior, root_poly_features(rgb, dim=1))
        return y.abs() if self.cfg.output == "abs" else y
