"""
The losses of Pixel-SSR: Eq. (14)-(15) of the paper's supplementary Sec. 7, and their weights.

L = L_pHSI + beta1.L_rep + beta2.L_SSIM + beta3.L_P2I, with the paper's (1, 0.3, 0.3); a weight of 0
removes its term (Table 6's "w/o" rows). "smooth" is a physical prior of the unsupervised mode, not the
paper's (docs/design.md). The network they train is pixelssr.DyProMamba.

Glossary (code name = paper symbol): hsi = Y^r, y3 = Y3, rgb = X, target = Y^p (the measured spectra at
the labelled pixels), mask = the labelled pixels, srf = S, model.h2r = M_H2R; phsi, rep, ssim, p2i =
L_pHSI, L_rep, L_SSIM, L_P2I.
"""

import math

import torch
import torch.nn.functional as F

import pixelssr as P
from metrics import channel_ssim

# Eq. (15): 1, beta1, beta2, beta3; and "smooth", the physical prior of the unsupervised mode (not the paper's,
# 0 = off; train.py turns it on at omega = 0, where nothing else ties the spectra outside what the camera sees)
LOSS_WEIGHTS = {"phsi": 1.0, "rep": 1.0, "ssim": 0.3, "p2i": 0.3, "smooth": 0.0}


def parse_weights(text: str) -> dict[str, float]:
    """'phsi=1,rep=1,ssim=0.3,p2i=0.3' -> the loss weights of Eq. (15); terms not named keep the paper's.
    A weight of 0 removes its term (pixel_ssr_loss computes nothing for it)."""
    weights = dict(LOSS_WEIGHTS)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            raise ValueError(f"--loss-weights: unknown term {name.strip()!r}; the terms are {', '.join(weights)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--loss-weights: {item.strip()!r} is not term=number") from None
    if any(w < 0 or not math.isfinite(w) for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"--loss-weights: weights must be finite and >= 0, and one > 0; got {format_weights(weights)}")
    return weights


def format_weights(weights: dict[str, float]) -> str:
    """The inverse of parse_weights: {'phsi': 1.0, ...} -> 'phsi=1,rep=1,ssim=0.3,p2i=0.3'."""
    return ",".join(f"{k}={v:g}" for k, v in weights.items())


def pixel_ssr_loss(model: P.DyProMamba, rgb: torch.Tensor, hsi: torch.Tensor, y3: torch.Tensor,
                   target: torch.Tensor, mask: torch.Tensor, srf: torch.Tensor,
                   weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_pHSI + 1.L_rep + 0.3.L_SSIM + 0.3.L_P2I, Eq. (14)-(15).

    The terms are the paper's. On the default |.| output (DyProMamba.head) L_SSIM can no longer hold a
    band inverted: on the paper's bare conv its gradient pushed flipped bands further down (docs/results.md,
    "What training fixes").

    rgb (b, 3, h, w); hsi = Y^r and y3 = Y3 (b, 31, h, w); target (b, 31, h, w), read only where
    mask (b, 1, h, w, bool) is set; srf (3, 31); weights: the terms' weights (default LOSS_WEIGHTS; its
    "smooth" is the unsupervised mode's prior, smoothness plus a hinge on negative values that the default
    |.| output never meets: the loss the classical smoothest-spectrum answer minimises, evaluate.smoothest_spectra).
    Returns (total, {term name: value}) so that training can log every term. A term of weight 0 is not
    computed at all (Table 6's "w/o" rows): it is absent from the dict and nothing flows through it.
    """
    weights = LOSS_WEIGHTS if weights is None else weights
    terms = {}
    if weights["phsi"]:
        n_lab = mask.sum()
        if n_lab > 0:  # Eq. (14), L_pHSI: mean |Y^r - Y^p| over labelled pixels only
            terms["phsi"] = ((hsi - target).abs() * mask).sum() / (n_lab * hsi.shape[1])
        else:
            terms["phsi"] = hsi.new_zeros(())
    if weights["rep"]:
        terms["rep"] = (rgb - torch.einsum("cn,bnhw->bchw", srf, hsi)).abs().mean()  # Eq. (14), L_rep = |X - S.Y^r|
    if weights["ssim"]:
        terms["ssim"] = 1 - channel_ssim(hsi[:, :-1], hsi[:, 1:]).mean()  # Eq. (14), L_SSIM over adjacent bands (i, i+1)
    if weights["p2i"]:
        if model.h2r is None:
            raise ValueError("L_P2I needs M_H2R, which this model does not have (no DRPN, or built without it)")
        terms["p2i"] = (rgb - model.h2r(y3)).abs().mean()  # Eq. (14), L_P2I = |X - H2R(Y3)|
    if weights["smooth"]:  # spectra are smooth and non-negative: mean (Y_{i+1} - Y_i)^2 + mean max(0, -Y)
        terms["smooth"] = (hsi[:, 1:] - hsi[:, :-1]).square().mean() + F.relu(-hsi).mean()
    return sum(weights[k] * v for k, v in terms.items()), terms
