"""
Property tests of losses.py: each term of Eq. (14)-(15) against independent numpy code, its gradient
against finite differences, the weighted total, and a term of weight 0 never computed.
"""

import numpy as np
import pytest
import torch

import losses
from conftest import _model, _np_ssim_band


def _loss_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hsi = torch.rand(2, 31, 16, 16, generator=g, requires_grad=True)
    y3 = torch.rand(2, 31, 16, 16, generator=g, requires_grad=True)
    rgb = torch.rand(2, 3, 16, 16, generator=g)
    mask = torch.rand(2, 1, 16, 16, generator=g) < 0.1
    target = torch.rand(2, 31, 16, 16, generator=g) * mask
    srf = torch.rand(3, 31, generator=g)
    return hsi, y3, rgb, target, mask, srf / srf.sum(1, keepdim=True)


@pytest.mark.parametrize("term,wrt", [("phsi", "hsi"), ("rep", "hsi"), ("ssim", "hsi"), ("p2i", "y3")])
def test_each_loss_term_alone_has_the_gradient_of_its_value(term, wrt):
    """In float64, each term's autograd gradient along a random direction equals the central finite
    difference of the term's value, and that derivative is far from zero. Guards against a detached term,
    and against a term that is identically zero (e.g. L_SSIM comparing each band with itself): its gradient
    is rounding noise (2.9e-7) that `gradient sum > 0` accepts, but its value does not move."""
    m = _model().double()
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    leaves = {"hsi": hsi.detach().double().requires_grad_(), "y3": y3.detach().double().requires_grad_()}
    rgb, target, srf = rgb.double(), target.double(), srf.double()

    def value(**out):
        return losses.pixel_ssr_loss(m, rgb, out["hsi"], out["y3"], target, mask, srf)[1][term]

    t = value(**leaves)
    assert t.requires_grad, f"{term} is detached"
    (grad,) = torch.autograd.grad(t, leaves[wrt])
    v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        moved = [value(**{**leaves, wrt: leaves[wrt] + s * eps * v}).item() for s in (1, -1)]
    slope = (moved[0] - moved[1]) / (2 * eps)
    assert abs(slope) > 1e-5, f"{term} hardly depends on {wrt}: slope {slope:.3g}"
    assert (grad * v).sum().item() == pytest.approx(slope, rel=1e-6)


def test_rep_loss_is_the_mean_abs_rgb_error_of_the_projected_hsi():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    _, terms = losses.pixel_ssr_loss(_model(), rgb, hsi, y3, target, mask, srf)
    expected = np.abs(rgb.numpy() - np.einsum("cn,bnhw->bchw", srf.numpy(), hsi.detach().numpy())).mean()
    assert terms["rep"].item() == pytest.approx(expected, rel=1e-6)


def test_ssim_loss_is_one_minus_the_mean_ssim_of_adjacent_bands():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    _, terms = losses.pixel_ssr_loss(_model(), rgb, hsi, y3, target, mask, srf)
    y = hsi.detach().double().numpy()
    expected = 1 - np.mean([_np_ssim_band(im[i], im[i + 1]) for im in y for i in range(30)])
    assert terms["ssim"].item() == pytest.approx(expected, rel=1e-5)


def test_p2i_loss_compares_the_rgb_with_h2r_of_y3():
    """With H2R swapped for the camera response itself, L_P2I is mean |X - S.Y3|, computed in numpy."""
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    m = _model()
    m.h2r = torch.nn.Conv2d(31, 3, 1, bias=False)
    with torch.no_grad():
        m.h2r.weight.copy_(srf[:, :, None, None])
    _, terms = losses.pixel_ssr_loss(m, rgb, hsi, y3, target, mask, srf)
    expected = np.abs(rgb.numpy() - np.einsum("cn,bnhw->bchw", srf.numpy(), y3.detach().numpy())).mean()
    assert terms["p2i"].item() == pytest.approx(expected, rel=1e-6)


def test_loss_total_is_the_weighted_sum_of_eq15():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    total, t = losses.pixel_ssr_loss(_model(), rgb, hsi, y3, target, mask, srf)
    torch.testing.assert_close(total, t["phsi"] + t["rep"] + 0.3 * t["ssim"] + 0.3 * t["p2i"])


def test_phsi_is_zero_without_labels():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    _, terms = losses.pixel_ssr_loss(_model(), rgb, hsi, y3, target * 0, torch.zeros_like(mask), srf)
    assert terms["phsi"].item() == 0


def test_phsi_reads_only_labelled_pixels():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    m = _model()
    _, before = losses.pixel_ssr_loss(m, rgb, hsi, y3, target, mask, srf)
    with torch.no_grad():
        hsi2, target2 = hsi.clone(), target.clone()
        hsi2[~mask.expand_as(hsi)] += 0.5  # change the prediction and the target off the labels
        target2[~mask.expand_as(target)] = 7.0
    _, after = losses.pixel_ssr_loss(m, rgb, hsi2, y3, target2, mask, srf)
    assert after["phsi"].item() == pytest.approx(before["phsi"].item())
    expected = (hsi - target).abs().permute(1, 0, 2, 3)[:, mask[:, 0]].mean()
    assert before["phsi"].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("weights", [{"ssim": 0}, {"p2i": 0}, {"phsi": 0, "rep": 0}])
def test_a_loss_term_of_weight_zero_is_not_computed(weights, monkeypatch):
    """Table 6's "w/o" rows: a term of weight 0 is absent from the terms, its computation never runs (no SSIM
    call, no H2R forward) and no gradient comes through it; the total is the weighted sum of the others."""
    m = _model()
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    calls = []
    monkeypatch.setattr(losses, "channel_ssim", lambda *a, _real=losses.channel_ssim: calls.append("ssim") or _real(*a))
    m.h2r.register_forward_hook(lambda *a: calls.append("p2i"))
    w = {**losses.LOSS_WEIGHTS, **weights}
    total, terms = losses.pixel_ssr_loss(m, rgb, hsi, y3, target, mask, srf, w)
    assert set(terms) == {k for k, v in w.items() if v}
    assert not {"ssim", "p2i"} & set(weights) & set(calls)
    torch.testing.assert_close(total, sum(w[k] * v for k, v in terms.items()))
    total.backward()
    if "p2i" in weights:
        assert y3.grad is None and all(p.grad is None for p in m.h2r.parameters())
