"""
Property tests of maektsr (MAE-KTSR: S2-MAE pre-training, the stage-2 body with ISFF), one property per test,
named for it. Small MAE configurations keep them fast; the body's defaults are checked for size only, and
once end to end inside pixelssr.DyProMamba.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import maektsr as M
import pixelssr as P

SMALL = M.MAEConfig(patch=4, width=32, depth=2, heads=2, dec_width=16, dec_depth=1, dec_heads=2)
_settings = settings(max_examples=10, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: a second thread buys nothing, and on a busy machine its synchronisation
    made single steps far slower. Restored for the modules that run after this one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(b: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hsi (b, 31, h, w) in [0, 1], its rgb = S.hsi, and a random S (3, 31) whose rows sum to 1."""
    g = torch.Generator().manual_seed(seed)
    hsi = torch.rand(b, 31, h, w, generator=g)
    srf = torch.rand(3, 31, generator=g)
    srf = srf / srf.sum(1, keepdim=True)
    return hsi, torch.einsum("cn,bnhw->bchw", srf, hsi), srf


def _mae(cfg: M.MAEConfig = SMALL, seed: int = 0) -> M.S2MAE:
    torch.manual_seed(seed)
    return M.S2MAE(cfg)


def _body(cfg: P.Config, mae_cfg: M.MAEConfig = SMALL, seed: int = 0) -> M.MAEKTSR:
    torch.manual_seed(seed)
    return M.MAEKTSR(cfg, mae_cfg=mae_cfg)


def _params(m: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


# ---- masking ----

@_settings
@given(seed=st.integers(0, 2**31), masking=st.sampled_from(["both", "spectral", "spatial"]),
       rgb_only=st.sampled_from([0.0, 0.25, 1.0]))
def test_rgb_tokens_are_never_masked(seed, masking, rgb_only):
    mae = _mae(M.MAEConfig(**{**SMALL.__dict__, "masking": masking, "rgb_only": rgb_only}))
    hsi, rgb, _ = _data(2, 8, 12, seed)
    keep = M.draw_mask(mae.cfg, 2, 6, torch.Generator().manual_seed(seed))
    x, valid = mae.tokens(hsi, rgb, keep)
    assert valid[:, :6].all()
    assert torch.equal(x[:, :6], mae.encoder.embed_rgb(rgb))


def test_ratio_one_input_holds_only_rgb_tokens():
    mae = _mae(M.MAEConfig(**{**SMALL.__dict__, "rgb_only": 1.0}))
    hsi, rgb, _ = _data(3, 8, 12, 0)
    keep = M.draw_mask(mae.cfg, 3, 6, torch.Generator().manual_seed(0))
    x, valid = mae.tokens(hsi, rgb, keep)
    assert x.shape[1] == 6 and valid.all()
    z, _ = mae.encode(hsi, rgb, keep)
    assert torch.equal(z.transpose(1, 2).reshape(3, -1, 2, 3), mae.encode_rgb(rgb))


@_settings
@given(seed=st.integers(0, 2**31))
def test_encoder_sees_only_visible_tokens(seed):
    """Masked band entries replaced by anything: the whole encoder output, padding included, is bitwise the same."""
    mae = _mae(M.MAEConfig(**{**SMALL.__dict__, "rgb_only": 0.0}))
    hsi, rgb, _ = _data(3, 8, 8, seed)
    keep = M.draw_mask(mae.cfg, 3, 4, torch.Generator().manual_seed(seed))
    seen = M.unpatchify(keep[..., None].expand(-1, -1, -1, 16), 2, 2)  # (3, 31, 8, 8)
    other = torch.where(seen, hsi, 1e3 * torch.randn(hsi.shape, generator=torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad():
        (z, valid), (z2, _) = mae.encode(hsi, rgb, keep), mae.encode(other, rgb, keep)
    assert not valid.all()  # the batch's counts differ, so there is padding to leak through
    assert torch.equal(z, z2)


@_settings
@given(seed=st.integers(0, 2**31), n=st.integers(2, 40))
def test_spatial_masking_removes_whole_positions(seed, n):
    cfg = M.MAEConfig(masking="spatial", rgb_only=0.0)
    keep = M.draw_mask(cfg, 4, n, torch.Generator().manual_seed(seed))
    on = keep.any(-1)
    assert torch.equal(keep, on[..., None].expand_as(keep))
    assert (on.sum(1) == n - int(cfg.spatial_ratio * n)).all()


@_settings
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), masking=st.sampled_from(["both", "spectral"]))
def test_band_mask_ratio_stays_in_its_range(seed, n, masking):
    cfg = M.MAEConfig(masking=masking, rgb_only=0.0)
    keep = M.draw_mask(cfg, 4, n, torch.Generator().manual_seed(seed))
    m = (n - (int(cfg.spatial_ratio * n) if masking == "both" else 0)) * cfg.bands  # tokens left to band masking
    lo, hi = cfg.band_ratio
    count = keep.flatten(1).sum(1)
    assert ((count >= math.floor((1 - hi) * m) - 1) & (count <= math.floor((1 - lo) * m) + 1)).all()


def test_rgb_only_draws_follow_their_probability():
    keep = M.draw_mask(M.MAEConfig(), 4000, 1, torch.Generator().manual_seed(0))
    # with one position, spatial masking (floor(0.5)) removes nothing: an empty sample is an RGB-only draw
    assert abs((~keep.flatten(1).any(1)).float().mean().item() - 0.25) < 0.03


def test_masks_are_reproducible_from_the_generator():
    draw = lambda s: M.draw_mask(M.MAEConfig(), 4, 16, torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))


# ---- the loss ----

@pytest.mark.parametrize("seed", [0, 1])
def test_loss_counts_masked_entries_as_stated(seed):
    """Each term against float64 numpy loops over (sample, position, band, pixel)."""
    mae = _mae(M.MAEConfig(**{**SMALL.__dict__, "rgb_only": 0.0}), seed)
    hsi, rgb, srf = _data(2, 8, 12, seed)
    keep = M.draw_mask(mae.cfg, 2, 6, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        terms = mae.loss(hsi, rgb, srf, keep)
        pred = mae(hsi, rgb, keep).double().numpy()
    y, k = hsi.double().numpy(), keep.numpy()
    sums, counts = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for b in range(2):
        for j in range(6):
            r, c = divmod(j, 3)
            for band in range(31):
                e = (pred[b, band, 4 * r:4 * r + 4, 4 * c:4 * c + 4] - y[b, band, 4 * r:4 * r + 4, 4 * c:4 * c + 4]) ** 2
                sums[bool(k[b, j, band])] += e.sum()
                counts[bool(k[b, j, band])] += e.size
    angles = [math.acos(np.clip(pred[b, :, i, j] @ y[b, :, i, j] / np.linalg.norm(pred[b, :, i, j])
                                / np.linalg.norm(y[b, :, i, j]), -1, 1)) for b in range(2) for i in range(8) for j in range(12)]
    camera = ((np.einsum("cn,bnhw->bchw", srf.double().numpy(), pred) - rgb.double().numpy()) ** 2).mean()
    expect = {"masked": sums[False] / counts[False], "visible": sums[True] / counts[True],
              "sam": np.mean(angles), "camera": camera}
    expect["total"] = (expect["masked"] + SMALL.w_visible * expect["visible"] + SMALL.w_sam * expect["sam"]
                       + SMALL.w_camera * expect["camera"])
    for name, value in expect.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e4, -3.0])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_points_regime_ignores_unknown_spectra(junk, seed):
    """Spectra at unknown pixels replaced by anything: the loss terms and every gradient are bitwise the same."""
    mae = _mae(M.MAEConfig(**{**SMALL.__dict__, "rgb_only": 0.0, "spatial_ratio": 0.0}))
    hsi, rgb, srf = _data(2, 8, 8, seed)
    g = torch.Generator().manual_seed(seed)
    known = torch.rand(2, 1, 8, 8, generator=g) < 0.15
    known[:, :, 0, 0] = True  # at least one known pixel per sample
    keep = M.draw_mask(mae.cfg, 2, 4, g)
    results = []
    for cube in (hsi, torch.where(known, hsi, junk)):
        mae.zero_grad()
        terms = mae.loss(cube, rgb, srf, keep, known)
        terms["total"].backward()
        results.append((terms, [p.grad.clone() for p in mae.parameters()]))
    (t1, g1), (t2, g2) = results
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_pretrain_step_is_reproducible_from_the_seed():
    hsi, rgb, srf = _data(2, 8, 8, 0)
    runs = []
    for run in range(2):
        mae = _mae()
        torch.manual_seed(run)  # torch's global RNG differs between the runs: only the generator may matter
        opt = torch.optim.Adam(mae.parameters())
        g = torch.Generator().manual_seed(3)
        logs = [M.pretrain_step(mae, opt, hsi, rgb, srf, g, 1e-3) for _ in range(2)]
        runs.append((logs, [p.detach().clone() for p in mae.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# ---- stage 2 ----

def test_isff_at_zero_scale_is_the_plain_cnn():
    full, plain = _body(P.Config(), seed=0), _body(P.Config(use_isff=False), seed=1)
    full.load_state_dict(plain.state_dict(), strict=False)  # the CNN's weights; ISFF and encoder stay
    _, rgb, _ = _data(2, 16, 12, 0)
    y3 = torch.rand(2, 31, 16, 12)
    with torch.no_grad():
        assert torch.equal(full(rgb, y3), plain(rgb, y3))
        for isff in full.isff.values():  # not vacuous: ISFF does change the output once its scales move
            isff.scale.fill_(1.0)
        assert not torch.allclose(full(rgb, y3), plain(rgb, y3))


def test_plain_body_builds_no_encoder():
    body = _body(P.Config(use_isff=False))
    assert body.mae is None and body.isff is None
    assert not any(name.startswith(("mae", "isff")) for name, _ in body.named_parameters())


def test_isff_scale_gets_gradient_at_zero():
    body = _body(P.Config())
    _, rgb, _ = _data(1, 8, 8, 0)
    body(rgb, torch.rand(1, 31, 8, 8)).square().sum().backward()
    assert all(isff.scale.grad.abs().sum() > 0 for isff in body.isff.values())


def test_tokens_of_a_window_depend_on_that_window_alone():
    """A13: the encoder attends within windows of mae_window pixels, here 2 x 2 tokens of 4 pixels."""
    body = _body(P.Config(mae_window=8)).eval()
    _, rgb, _ = _data(1, 16, 24, 0)
    moved = rgb.clone()
    moved[..., 8:16, 8:16] = torch.rand(1, 3, 8, 8)  # the window of token rows 2-3, columns 2-3
    with torch.no_grad():
        changed = (body.tokens(moved) - body.tokens(rgb)).abs().amax(1)[0] > 0  # (4, 6) token grid
    expect = torch.zeros(4, 6, dtype=torch.bool)
    expect[2:4, 2:4] = True
    assert torch.equal(changed, expect)


def test_every_window_is_full_size_and_the_last_ends_flush_with_the_image():
    """A 20 x 12 image in windows of 8: rows start at 0, 8, 12 and columns at 0, 4; the last window's tokens
    past its overlap with the one before are the image's last tokens."""
    body = _body(P.Config(mae_window=8)).eval()
    seen, encode = [], body.encode_window
    body.encode_window = lambda x: seen.append(tuple(x.shape[-2:])) or encode(x)
    _, rgb, _ = _data(1, 20, 12, 1)
    with torch.no_grad():
        tokens = body.tokens(rgb)  # (1, width, 5, 3)
        last = encode(rgb[..., 12:20, 4:12])  # (1, width, 2, 2)
    assert seen == [(8, 8)] * 6 and tokens.shape[-2:] == (5, 3)
    assert torch.equal(tokens[..., 4:, 2:], last[..., 1:, 1:])


def test_a_window_as_large_as_the_image_is_the_global_encoder():
    """One window holding the whole image is encode_rgb's global attention; smaller windows are not."""
    body = _body(P.Config(mae_window=16)).eval()
    _, rgb, _ = _data(2, 16, 12, 1)
    with torch.no_grad():
        assert torch.equal(body.tokens(rgb), body.mae.encode_rgb(rgb))
        assert not torch.allclose(_body(P.Config(mae_window=8)).eval().tokens(rgb), body.mae.encode_rgb(rgb))


def test_local_attention_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 4, generator=g), torch.randn(1, 4, 3, 2, generator=g), torch.randn(1, 4, 3, 2, generator=g)
    out = M.local_attention(q, k, v, heads=2)
    for i in range(6):
        for j in range(4):
            ti, tj = i // 2, j // 2
            nbrs = [(a, b) for a in range(ti - 1, ti + 2) for b in range(tj - 1, tj + 2) if 0 <= a < 3 and 0 <= b < 2]
            for h in range(2):
                ch = slice(2 * h, 2 * h + 2)
                logits = torch.stack([q[0, ch, i, j] @ k[0, ch, a, b] for a, b in nbrs]) / math.sqrt(2)
                w = torch.softmax(logits, 0)
                expect = sum(wt * v[0, ch, a, b] for wt, (a, b) in zip(w, nbrs))
                assert torch.allclose(out[0, ch, i, j], expect, atol=1e-6)


@pytest.mark.parametrize("freeze", ["all", "last", "none"])
def test_frozen_encoder_gets_no_gradient_and_trainable_count_matches(freeze):
    body = _body(P.Config(mae_freeze=freeze, mae_window=4))  # the 8 x 8 image in 4 windows (A13)
    enc = body.mae.encoder
    unfrozen = {"all": [], "last": [enc.blocks[-1], enc.norm], "none": [enc]}[freeze]
    cnn = _params(body) - _params(body.mae)
    assert _params(body, trainable=True) == cnn + sum(_params(m) for m in unfrozen)
    for isff in body.isff.values():
        torch.nn.init.ones_(isff.scale)  # at 0, no gradient would reach the encoder through ISFF at all
    _, rgb, _ = _data(1, 8, 8, 0)
    body.train()
    body(rgb, torch.rand(1, 31, 8, 8)).square().sum().backward()
    trained = {id(p) for m in unfrozen for p in m.parameters()}
    for p in body.mae.parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if id(p) in trained else p.grad is None


def test_encoder_state_round_trip(tmp_path):
    mae, body = _mae(seed=1), _body(P.Config(), seed=2)
    torch.save(M.encoder_state(mae), tmp_path / "encoder.pt")
    M.load_encoder(body, torch.load(tmp_path / "encoder.pt"))
    _, rgb, _ = _data(2, 8, 12, 0)
    with torch.no_grad():
        assert torch.equal(body.mae.encode_rgb(rgb), mae.encode_rgb(rgb))


@pytest.mark.parametrize("change", [{"width": 48}, {"depth": 3}, {"patch": 8}, {"heads": 4}])
def test_encoder_state_that_does_not_fit_is_refused_in_one_sentence(change):
    state = M.encoder_state(_mae(M.MAEConfig(**{**SMALL.__dict__, **change})))
    with pytest.raises(ValueError) as err:
        M.load_encoder(_body(P.Config()), state)
    msg = str(err.value)
    assert msg.endswith(".") and "\n" not in msg and ". " not in msg


def test_body_has_the_intended_size():
    assert 0.8e6 < _params(M.S2MAE()) < 1.3e6
    body = M.MAEKTSR(P.Config())
    assert body.multiple == 8 and 0.6e6 < _params(body, trainable=True) < 1.0e6


@pytest.fixture(scope="module")
def network() -> P.DyProMamba:
    torch.manual_seed(0)
    return P.DyProMamba(P.Config(backbone="maektsr"), body=M.MAEKTSR).eval()


@settings(max_examples=6, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20))
def test_body_keeps_any_image_size_in_dypromamba(network, h, w):
    rgb, points = torch.rand(1, 3, h, w), torch.zeros(1, 31, h, w)
    with torch.no_grad():
        hsi, y3 = network(rgb, points)
    assert hsi.shape == y3.shape == (1, 31, h, w) and torch.isfinite(hsi).all()
