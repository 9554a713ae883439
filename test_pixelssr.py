"""
Property tests of pixelssr.py: DyPro-Mamba (any image size, its equations against independent einsum
code, every ablation switch of Tables 4-5, the other bodies of Table 2, the output layer and the
root-polynomial prior) and the point spectra
(the Gamma fit and the sparse point cube, Eq. (2)-(3)).
"""

import copy
import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

import backbones
import cameras
import data
import evaluate
import losses
import pixelssr as P
from conftest import SMALL, _assert_close, _centred_dft, _inputs, _model, examples


MODEL_SETTINGS = examples(10)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@MODEL_SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 19), w=st.integers(1, 19))
def test_model_keeps_any_image_size(b, h, w):
    hsi, y3 = _model()(*_inputs(b, h, w))
    assert hsi.shape == y3.shape == (b, 31, h, w)
    assert torch.isfinite(hsi).all() and torch.isfinite(y3).all()


def test_model_batch_members_are_independent_in_eval_mode():
    m = _model().eval()
    rgb, pts = _inputs(3, 12, 10)
    with torch.no_grad():
        together = m(rgb, pts)[0]
        alone = torch.cat([m(rgb[i:i + 1], pts[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_model_is_deterministic_given_the_seed():
    a = _model(seed=3)(*_inputs(2, 9, 14, seed=5))[0]
    b = _model(seed=3)(*_inputs(2, 9, 14, seed=5))[0]
    assert torch.equal(a, b)


@MODEL_SETTINGS
@given(heads=st.sampled_from([1, 2, 4]), h=st.integers(1, 6), w=st.integers(1, 6), prompted=st.booleans(),
       seed=st.integers(0, 1000))
def test_spectral_attention_is_eq9_prompt_times_attention_times_values(heads, h, w, prompted, seed):
    """Eq. (9) in MST's channel-first layout: F3 = proj((P_spe @ A) @ V), A = softmax(sigma . k^ q^T) per head,
    q^ and k^ L2-normalised over pixels, computed here with einsum in float64 from the module's own Q, K, V
    (channels 3i, 3i+1, 3i+2 of its depthwise conv), heads with different temperatures. Guards against the
    prompt multiplied on the wrong side of the attention map (A @ P_spe), and against the heads' channels,
    the normalisation or the softmax axis mixed up."""
    torch.manual_seed(seed)
    width, b = 8, 2
    sa = P.SpectralAttention(width, heads).double()
    with torch.no_grad():
        sa.sigma.copy_(0.5 + 4 * torch.rand(heads, 1, 1))
    x = torch.randn(b, width, h, w, dtype=torch.float64)
    d = width // heads
    p_spe = torch.softmax(2 * torch.randn(b, heads, d, d, dtype=torch.float64), -1)  # row-stochastic, as P_spe is
    qkv = sa.qkv(sa.linear(x)).flatten(2)                                             # (b, 3 width, L)
    q, k, v = (qkv[:, j::3].unflatten(1, (heads, d)) for j in range(3))               # (b, heads, d, L)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    attn = torch.softmax(sa.sigma * torch.einsum("bhil,bhjl->bhij", k, q), dim=-1)
    mix = torch.einsum("bhij,bhjk->bhik", p_spe, attn) if prompted else attn
    f3 = torch.einsum("bhik,bhkl->bhil", mix, v).reshape(b, width, h, w)
    expected = torch.nn.functional.conv2d(f3, sa.proj.weight, sa.proj.bias)
    _assert_close(sa(x, p_spe if prompted else None), expected, 1e-12)


@MODEL_SETTINGS
@given(h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 1000))
def test_spa_hf_branch_is_fed_f1_minus_its_2x2_block_mean(h, w, seed):
    """Eq. (5): P_hf = conv3(gelu(conv3(F1 - F2))), F2 = up2(avgpool2(F1)): what enters the branch is F1
    less the mean of its 2x2 block, computed here by reshaping F1 (odd sizes are padded to even before the
    DRPN). Guards against the Spa-HF branch fed F1 itself (or F2, or a shifted F2)."""
    m = _model(seed=seed).double()
    seen = {}
    m.drpn.f1.register_forward_hook(lambda mod, inp, out: seen.__setitem__("f1", out))
    m.drpn.hf.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("hf_in", inp[0]))
    with torch.no_grad():
        m(*(t.double() for t in _inputs(2, h, w, seed)))
    f1 = seen["f1"]
    b, c, hh, ww = f1.shape
    blocks = f1.reshape(b, c, hh // 2, 2, ww // 2, 2)
    expected = (blocks - blocks.mean((3, 5), keepdim=True)).reshape(b, c, hh, ww)
    _assert_close(seen["hf_in"], expected, 1e-12)
    assert expected.abs().max() > 1e-3 * f1.abs().max()  # the residual is not vanishingly small


# every configuration the ablations build: nothing is built that the forward pass does not use
CONFIGS = {"full": SMALL, "fft": dataclasses.replace(SMALL, spa_transform="fft"),
           "no_spatial_prompts": dataclasses.replace(SMALL, use_spa=False, use_hf=False),
           **{f"no_{k[4:]}": dataclasses.replace(SMALL, **{k: False}) for k in ("use_spe", "use_prompt_ssm", "use_drpn")},
           **{b: dataclasses.replace(SMALL, backbone=b) for b in backbones.BODIES if b != "dypro"},
           "maektsr_encoder_trains": dataclasses.replace(SMALL, backbone="maektsr", mae_freeze="none")}


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_reaches_every_parameter_of_every_ablation_and_body(config):
    """Through the training loss (L_P2I only where there is an H2R), for every ablation and every backbone, to
    every parameter that trains (MAE-KTSR's frozen encoder does not). ISFF's scales start at 0 so that its
    layers get no gradient in the first step (maektsr A10): here they start at 1."""
    m = _model(CONFIGS[config])
    for isff in (m.body.isff or {}).values() if CONFIGS[config].backbone == "maektsr" else ():
        torch.nn.init.ones_(isff.scale)
    rgb, pts = _inputs(2, 15, 13)  # odd: the bodies' padding must pass gradients too
    hsi, y3 = m(rgb, pts)
    mask = torch.zeros(2, 1, 15, 13, dtype=torch.bool)
    mask[:, :, 3, 5] = True
    weights = {**losses.LOSS_WEIGHTS, "p2i": losses.LOSS_WEIGHTS["p2i"] if m.h2r is not None else 0}
    loss, _ = losses.pixel_ssr_loss(m, rgb, hsi, y3, torch.rand(2, 31, 15, 13) * mask, mask, torch.full((3, 31), 1 / 31), weights)
    loss.backward()
    silent = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not silent, f"no gradient reaches {silent}"


class _ZeroPrompt(torch.nn.Module):
    """Stands in for a spatial prompt branch: P = 0, so that its fusing conv3(cat(Y, P)) sees Y alone."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(f)


class _IdentityPrompt(torch.nn.Module):
    """Stands in for a SpectralPrompt: P_spe = I, so that P_spe @ A = A, the unprompted attention."""

    def __init__(self, prompt: P.SpectralPrompt):
        super().__init__()
        self.heads, self.d = prompt.heads, prompt.qk.out_channels // 2 // prompt.heads

    def forward(self, y3: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.d, dtype=y3.dtype).expand(y3.shape[0], self.heads, self.d, self.d)


class _NoAttention(torch.nn.Module):
    """Stands in for a PromptSSM's attention sub-layer: adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor, p_spe) -> torch.Tensor:
        return torch.zeros_like(x)


def _bypass(m: P.DyProMamba, switch: str) -> None:
    """Neutralise one branch of a full model in place, by swapping modules, not through the code paths the
    switch itself takes: the model then computes what the ablation claims to compute."""
    if switch == "use_spa":
        m.drpn.spa = _ZeroPrompt()                                 # Y2 = conv3(cat(Y1, 0))
    elif switch == "use_hf":
        m.drpn.hf = _ZeroPrompt()                                  # Y3 = conv3(cat(Y2, 0))
    elif switch == "use_spe":
        m.drpn.spe = torch.nn.ModuleList(_IdentityPrompt(p) for p in m.drpn.spe)
    else:
        for block in (m.body.enc, m.body.mid, m.body.dec):
            block.attn = _NoAttention()


# one switch at a time: (the parameters that must disappear with it, the fusing conv of Eq. (7) that then reads Y alone)
ABLATIONS = {
    "use_spa": (("drpn.spa.",), "drpn.y2.weight"),
    "use_hf": (("drpn.hf.",), "drpn.y3.weight"),
    "use_spe": (("drpn.spe.",), None),
    "use_prompt_ssm": (("drpn.spe.", *(f"body.{blk}.{sub}." for blk in ("enc", "mid", "dec") for sub in ("attn", "norm1"))),
                       None),
}


@pytest.mark.parametrize("switch", ABLATIONS)
def test_each_ablation_switch_removes_its_branch_and_nothing_else(switch):
    """The cut model holds exactly the full model's parameters less its branch's (a fusing conv of Eq. (7)
    keeps its weights on Y and loses those on the prompt); given the full model's weights it computes what
    the full model computes with that branch bypassed (a spatial prompt replaced by zeros, P_spe by the
    identity, the attention sub-layer by zero); and the branch did matter. (Comparing a full and a cut
    model as initialised says nothing: their initialisations differ.) Guards against a switch that also
    cuts or rewires another branch (e.g. the Spa-HF step nested under `if self.spa`), and against branch
    parameters built but unused."""
    full, cut = _model(), _model(dataclasses.replace(SMALL, **{switch: False}))
    full_sd, cut_sd = full.state_dict(), cut.state_dict()
    prefixes, narrowed = ABLATIONS[switch]
    gone = {k for k in full_sd if k.startswith(prefixes)}
    assert gone and set(cut_sd) == set(full_sd) - gone
    weights = {k: full_sd[k] for k in cut_sd}
    if narrowed:  # cat(Y, P): Y's input channels come first
        weights[narrowed] = full_sd[narrowed][:, :SMALL.bands]
    cut.load_state_dict(weights)
    bypassed = copy.deepcopy(full)
    _bypass(bypassed, switch)
    x = _inputs(2, 12, 10)
    with torch.no_grad():
        out_full, out_bypassed, out_cut = full(*x)[0], bypassed(*x)[0], cut(*x)[0]
    _assert_close(out_cut, out_bypassed, 1e-6)
    assert (out_full - out_bypassed).abs().max() > 1e-4 * out_full.abs().max()  # 100x the tolerance above


def test_fft_ablation_drops_only_the_learnable_order():
    full, fft = _model(), _model(dataclasses.replace(SMALL, spa_transform="fft"))
    assert _n_params(full) - _n_params(fft) == 1 and fft.drpn.spa.order is None
    x = _inputs(1, 12, 12)
    assert not torch.allclose(full(*x)[0], fft(*x)[0])


def test_without_the_drpn_the_body_gets_the_point_cube_and_nothing_of_the_neck_is_built():
    """Table 4's row without the DRPN: no DRPN parameter and no M_H2R (L_P2I has no Y3 to constrain); the body
    of a full model given the same weights and the point cube in place of Y3 (and no P_spe) computes the same.
    Guards against a 'no DRPN' that keeps Y1's convs or the spectral prompts."""
    full, cut = _model(), _model(dataclasses.replace(SMALL, use_drpn=False))
    assert cut.drpn is None and cut.h2r is None
    assert set(cut.state_dict()) == {k for k in full.state_dict() if k.startswith("body.")}
    cut.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith("body.")})
    rgb, pts = _inputs(2, 12, 10)
    with torch.no_grad():
        hsi, y3 = cut(rgb, pts)
        expected = full.head(full.body(rgb, pts, None), rgb)
    assert torch.equal(y3, pts)
    _assert_close(hsi, expected, 1e-6)


def test_backbone_bodies_have_their_papers_parameter_counts():
    """MST++ 1.62 M (Cai et al. 2022), HSCNN+ 4.65 M (HSCNN-D at 30 blocks, the MST++ paper's table): the body
    alone, within 1 % (the papers round to 10 k; a block or a stage too few is several %). Its first
    convolution takes X and Y3 (34 channels, not 3), a few thousand more."""
    for name, paper in backbones.PAPER_PARAMS.items():
        body = backbones.BODIES[name](P.Config())
        assert _n_params(body) == pytest.approx(paper, rel=0.01), name


@MODEL_SETTINGS
@given(name=st.sampled_from(list(backbones.BODIES)), h=st.integers(1, 13), w=st.integers(1, 13))
def test_every_backbone_keeps_any_image_size(name, h, w):
    hsi, y3 = _model(dataclasses.replace(SMALL, backbone=name))(*_inputs(1, h, w))
    assert hsi.shape == y3.shape == (1, 31, h, w) and torch.isfinite(hsi).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_frft_branch_at_order_one_is_the_fft_ablation(inverse):
    """At order a = 1 the Spa-FRFT branch's transform (and its inverse) is the FFT ablation's: the
    centred unitary 2-D DFT, so Table 5 compares orders and nothing else."""
    spa, fft = _model().drpn.spa, _model(dataclasses.replace(SMALL, spa_transform="fft")).drpn.spa
    with torch.no_grad():
        spa.order.fill_(1 / spa.order_scale)
    x = torch.randn(2, 8, 6, 7, dtype=torch.complex64)
    centred = _centred_dft(_centred_dft(x, inverse).transpose(-1, -2), inverse).transpose(-1, -2)
    torch.testing.assert_close(fft.transform(x, inverse), centred)
    torch.testing.assert_close(spa.transform(x, inverse), centred, rtol=1e-4, atol=1e-5)


@examples(30)
@given(seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3))
def test_output_layer_is_non_negative_and_its_gradient_never_vanishes(seed, scale):
    """Guards against an output that can go negative (the inverted bands) or die (a saturating
    softplus parked bands at exactly 0): |.| of any pre-activation is >= 0 with gradient +-1."""
    m = _model()
    y = (torch.randn(2, 31, 5, 6, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()
    out = m.head(y, torch.rand(2, 3, 5, 6))
    assert (out >= 0).all()
    (grad,) = torch.autograd.grad(out.sum(), y)
    assert torch.equal(grad.abs(), torch.ones_like(grad))


def _flip_band(m: P.DyProMamba, band: int) -> None:
    with torch.no_grad():
        m.body.out.weight[band].neg_()
        m.body.out.bias[band].neg_()


def test_a_band_whose_last_layer_flips_sign_comes_out_unchanged():
    """Guards against the inverted bands of issue 10: with the paper's bare conv ("linear") a flipped band
    leaves the loss's L_SSIM where it was (SSIM(x, -x) ~ SSIM(x, x)) and comes out negative; with the
    default |.| output the flip is not a different solution at all."""
    x = _inputs(1, 24, 24)
    for output in ("abs", "linear"):
        m = _model(dataclasses.replace(SMALL, output=output)).eval()
        with torch.no_grad():
            m.body.out.bias.fill_(0.3)  # a bright band, as real ones are
            before = m(*x)[0]
            _flip_band(m, 7)
            after = m(*x)[0]
        if output == "abs":
            assert torch.equal(before, after)
        else:
            assert (after[:, 7] < 0).all() and torch.allclose(after[:, 7], -before[:, 7])


def _prior_model(backbone: str = "dypro", seed: int = 0) -> tuple[P.DyProMamba, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a small model with --prior rootpoly fitted on every pixel of a 32x32 demo scene, its RGB, its cube,
    the srf)."""
    m = _model(dataclasses.replace(SMALL, prior="rootpoly", backbone=backbone), seed)
    hsi = torch.from_numpy(data.demo_scenes(n=1, size=32)[0][1]).permute(2, 0, 1)[None]  # (1, 31, 32, 32)
    srf = torch.from_numpy(cameras.srf_matrix("cie1964")).float()
    rgb = torch.einsum("cn,bnhw->bchw", srf, hsi)
    flat = lambda t: t[0].permute(1, 2, 0).reshape(-1, t.shape[1]).numpy()
    m.prior.copy_(torch.from_numpy(evaluate.fit_root_poly(flat(rgb), flat(hsi)).astype(np.float32)))
    return m, rgb, hsi, srf


@pytest.mark.parametrize("backbone", list(backbones.BODIES))
def test_a_fresh_model_with_the_prior_outputs_the_prior_whatever_its_body(backbone):
    """Guards the start of --prior rootpoly on every body: |M(X)| exactly, whatever the body's output."""
    m, rgb, _, _ = _prior_model(backbone)
    with torch.no_grad():
        out = m(rgb, torch.zeros(1, 31, *rgb.shape[-2:]))[0]
    base = torch.einsum("fn,bfhw->bnhw", m.prior, P.root_poly_features(rgb, dim=1)).abs()
    assert torch.equal(out, base)


@examples(6)
@given(seed=st.integers(0, 2**31), lr=st.floats(3e-4, 3e-3))
def test_the_first_adam_step_from_the_prior_leaves_the_output_near_it(seed, lr):
    """Guards against a start at the prior that the first step undoes: Adam moves every parameter by ~lr
    whatever its gradient, and from a zeroed last conv one step at lr 2e-3 moved the output by 24-46 % of its
    level (width 8 and 40). From the zero gate only the gate's step reaches the output: under 1 %."""
    m, rgb, hsi, srf = _prior_model(seed=seed % 1000)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., seed % 8::8, seed % 7::8] = True  # a few labelled pixels, as in a pixel-level batch
    points = torch.zeros_like(hsi)
    with torch.no_grad():
        before = m(rgb, points)[0]
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses.pixel_ssr_loss(m, rgb, *m(rgb, points), hsi, mask, srf)[0].backward()
    opt.step()
    with torch.no_grad():
        after = m(rgb, points)[0]
    assert (after - before).abs().mean() < 0.01 * before.abs().mean()


@examples(20)
@given(alpha=st.floats(0.5, 20), theta=st.floats(0.005, 0.5), seed=st.integers(0, 2**31))
def test_fit_gamma_recovers_known_parameters(alpha, theta, seed):
    x = np.random.default_rng(seed).gamma(alpha, theta, 200_000)
    a, t = P.fit_gamma(x)
    assert a == pytest.approx(alpha, rel=0.05) and t == pytest.approx(theta, rel=0.05)


@pytest.mark.parametrize("bad", [[], [0.5], [0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [0.2, float("nan")]])
def test_fit_gamma_refuses_empty_negative_or_degenerate_data(bad):
    with pytest.raises(ValueError):
        P.fit_gamma(bad)


@examples(30)
@given(b=st.integers(1, 3), h=st.integers(1, 40), w=st.integers(1, 40),
       ratio=st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0]), seed=st.integers(0, 1000))
@example(b=1, h=29, w=100, ratio=0.01, seed=0)  # 0.01 * 29 * 100 = 28.999999999999996 in floating point
@example(b=2, h=58, w=50, ratio=0.01, seed=0)   # the one such size up to 64 x 64 at the usual ratios
def test_sample_points_places_exactly_the_promised_number_of_non_negative_spectra(b, h, w, ratio, seed):
    """max(1, floor(omega.H.W)) points (the 0.01 % count for omega = 0), counted here in exact decimal
    arithmetic. Guards against the count one short where omega.H.W rounds just below an integer."""
    pts = P.sample_points((b, 31, h, w), ratio, 2.0, 0.1, generator=torch.Generator().manual_seed(seed))
    k = max(1, math.floor(Fraction(str(ratio if ratio > 0 else 1e-4)) * h * w))
    assert (pts.abs().sum(1) > 0).sum((1, 2)).tolist() == [k] * b  # Gamma draws are a.s. positive
    assert (pts >= 0).all()


def test_sample_points_is_reproducible_with_a_seed():
    draw = lambda s: P.sample_points((2, 31, 20, 20), 0.05, 2.0, 0.1, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_gaussian_points_match_the_gamma_moments():
    g = torch.Generator().manual_seed(0)
    pts = P.sample_points((4, 31, 100, 100), 0.5, 3.0, 0.05, generator=g, dist="gaussian")
    vals = pts[pts != 0].double()
    assert vals.mean().item() == pytest.approx(3.0 * 0.05, rel=0.02)
    assert vals.var().item() == pytest.approx(3.0 * 0.05**2, rel=0.05)


def test_root_poly_features_scale_with_exposure():
    """The root-polynomial terms are homogeneous of degree one: a brighter exposure scales them alike."""
    rgb = np.random.default_rng(0).uniform(0.05, 1, (50, 3))
    f = P.root_poly_features(rgb * 2.5)
    np.testing.assert_allclose(f, 2.5 * P.root_poly_features(rgb), rtol=1e-12)
