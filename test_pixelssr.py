"""
Property tests of pixelssr: each test states one property in its name.

Sections: the FRFT (frft.py) against its defining properties, the DFT and an independent float64
construction; the selective scan (ssm.py) against the sequential loop; DyPro-Mamba, its losses,
point spectra and metrics (pixelssr.py), the metrics against independent numpy code; data.py on the
real sample in ../shared/data and on every kind of bad input; train.py end to end, resume included.
Real-data tests are skipped, saying why, when ../shared/data is not beside the checkout.
"""

import copy
import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import scipy.io
import scipy.signal
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import backbones
import bench
import data
import frft
import pixelssr as P
import ssm
import train
from ssm import SS2D, selective_scan, selective_scan_ref, ss2d_ref


# ---- FRFT ----

# Sizes 1..96, with the edge cases (1, 2, 3) and multiples of 4 drawn often.
_frft_sizes = st.one_of(st.sampled_from([1, 2, 3, 4, 8, 12, 16, 32, 64, 96]), st.integers(1, 96))
_frft_orders = st.floats(-6, 6, allow_nan=False)
_frft_dtypes = st.sampled_from([torch.float32, torch.float64])
_frft_settings = settings(max_examples=40, deadline=None)
_FRFT_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _frft_signal(seed: int, n: int, dtype: torch.dtype, is_complex: bool, batch: int = 3) -> torch.Tensor:
    """(batch, n) random data, complex when asked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dtype=dtype, generator=g)
    return torch.complex(x, torch.randn(batch, n, dtype=dtype, generator=g)) if is_complex else x


def _frft_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative error of y against ref, computed in complex128."""
    y, ref = y.to(torch.complex128), ref.to(torch.complex128)
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _frft_centred_dft(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The centred unitary DFT (or its inverse) along the last dim, by torch.fft."""
    f = torch.fft.ifft if inverse else torch.fft.fft
    return torch.fft.fftshift(f(torch.fft.ifftshift(x, dim=-1), norm="ortho"), dim=-1)


def _frft_reference_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 numpy construction of the centred eigenvectors V (columns) and orders k,
    following Candan, Kutay, Ozaktas (2000) literally: S with explicit loops, their block matrix P,
    one eigh per parity block, descending order, and centring by numpy's fftshift."""
    s = np.zeros((n, n))
    for j in range(n):
        s[j, j] += 2 * np.cos(2 * np.pi * j / n) - 4
        s[j, (j + 1) % n] += 1
        s[j, (j - 1) % n] += 1
    r = (n - 1) // 2                      # number of pairs (j, n - j)
    p = np.zeros((n, n))
    p[0, 0] = 1
    for i in range(r):
        j = i + 1
        p[1 + i, j] = p[1 + i, n - j] = 1 / np.sqrt(2)
        p[n - r + i, j], p[n - r + i, n - j] = 1 / np.sqrt(2), -1 / np.sqrt(2)
    n_even = n - r
    if n % 2 == 0:
        p[n_even - 1, n // 2] = 1
    blocks = p @ s @ p.T
    v, k = np.zeros((n, n)), np.zeros(n)
    for lo, hi, first in ((0, n_even, 0), (n_even, n, 1)):
        w, u = np.linalg.eigh(blocks[lo:hi, lo:hi])
        order = np.argsort(-w)
        v[:, lo:hi] = p[lo:hi].T @ u[:, order]
        k[lo:hi] = first + 2 * np.arange(hi - lo)
    # Centred F^a = fftshift ∘ F^a ∘ ifftshift = (fftshift V) D (fftshift V)ᵀ
    return np.fft.fftshift(v, axes=0), k


def _frft_reference_matrix(n: int, a: float) -> np.ndarray:
    """F^a (n, n), complex128, from the independent basis."""
    v, k = _frft_reference_basis(n)
    return (v * np.exp(-0.5j * np.pi * a * k)) @ v.T


@_frft_settings
@given(n=_frft_sizes, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_order_one_is_the_centred_unitary_dft(n, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, 1.0), _frft_centred_dft(x)) < _FRFT_TOL[dtype]


def test_frft_order_one_matrix_is_the_centred_dft_for_every_size_up_to_96():
    for n in range(1, 97):
        eye = torch.eye(n, dtype=torch.float64)
        assert _frft_err(frft.frft(eye, 1.0), _frft_centred_dft(eye)) < 1e-13, n


@_frft_settings
@given(n=_frft_sizes, order=st.sampled_from([-1.0, 3.0]), dtype=_frft_dtypes, is_complex=st.booleans(),
       seed=st.integers(0, 2**31))
def test_frft_orders_minus_one_and_three_are_the_inverse_centred_dft(n, order, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, order), _frft_centred_dft(x, inverse=True)) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_order_two_reverses_about_the_centre(n, dtype, is_complex, seed):
    # Centred position m holds x[m - n//2]; x[t] -> x[-t] sends m to 2·(n//2) - m: a plain flip for
    # odd n, and for even n position 0 (t = -n/2 = n/2 mod n) stays while the rest flips.
    x = _frft_signal(seed, n, dtype, is_complex)
    reversed_x = x.flip(-1) if n % 2 else torch.cat([x[:, :1], x[:, 1:].flip(-1)], -1)
    assert _frft_err(frft.frft(x, 2.0), reversed_x) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_order_zero_is_the_identity(n, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, 0.0), x) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_fractional_order_matches_an_independent_float64_computation(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    ref = x.to(torch.complex128) @ torch.from_numpy(_frft_reference_matrix(n, a)).T
    assert _frft_err(frft.frft(x, a), ref) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_derivative_wrt_order_matches_the_analytic_one(n, a, is_complex, seed):
    # d/da F^a x = V diag(-iπk/2 · exp(-iπak/2)) Vᵀ x
    x = _frft_signal(seed, n, torch.float64, is_complex, batch=1)[0]
    v, k = _frft_reference_basis(n)
    lam = np.exp(-0.5j * np.pi * a * k)
    analytic = torch.from_numpy((v * (-0.5j * np.pi * k * lam)) @ v.T @ x.numpy())
    order = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    y = frft.frft(x, order)
    # Reverse mode sees dy/da through random probes w: d/da Re<w, y> = Re<w, dy/da>.
    probes = _frft_signal(seed + 1, n, torch.float64, True, batch=4)
    grads = torch.stack([torch.autograd.grad(torch.vdot(w, y).real, order, retain_graph=True)[0] for w in probes])
    expected = (probes.conj() @ analytic).real
    assert (grads - expected).abs().max() <= 1e-12 * probes.norm(dim=1).max() * analytic.norm()


def test_frft_passes_gradcheck_in_x_and_order():
    x = torch.randn(2, 7, dtype=torch.complex128, requires_grad=True)
    a = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: frft.frft2(x, a, 2 * a), (x, a))


@settings(max_examples=20, deadline=None)
@given(n=_frft_sizes)
def test_frft_grunbaum_matrix_commutes_with_the_dft(n):
    s = frft._grunbaum(n).to(torch.complex128)
    dft = torch.fft.fft(torch.eye(n, dtype=torch.complex128), dim=0, norm="ortho")
    assert (dft @ s - s @ dft).abs().max() < 1e-12 * max(1.0, s.abs().max().item())


@settings(max_examples=20, deadline=None)
@given(n=_frft_sizes)
def test_frft_basis_vector_of_order_k_has_parity_minus_one_to_the_k(n):
    v, k = frft._basis(n)
    centre = n // 2
    reversal = (2 * centre - torch.arange(n)) % n  # centred position of -t
    assert torch.allclose(v[reversal], v * (-1.0) ** k, atol=1e-13)


@settings(max_examples=20, deadline=None)
@given(n=_frft_sizes)
def test_frft_basis_vector_of_order_k_is_a_dft_eigenvector_with_eigenvalue_minus_i_to_the_k(n):
    v, k = frft._basis(n)
    v = v.to(torch.complex128)
    dft_v = _frft_centred_dft(v.T).T
    assert (dft_v - v * (-1j) ** k).abs().max() < 1e-12


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, b=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(),
       seed=st.integers(0, 2**31))
def test_frft_orders_add(n, a, b, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(frft.frft(x, a), b), frft.frft(x, a + b)) < 2 * _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_negative_order_inverts(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(frft.frft(x, a), -a), x) < 2 * _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes)
def test_frft_is_unitary(n, a, dtype):
    m = frft.frft(torch.eye(n, dtype=dtype), a)
    assert _frft_err(m @ m.mH, torch.eye(n, dtype=m.dtype)) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_has_period_four(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, a + 4), frft.frft(x, a)) < _FRFT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frft_keeps_full_precision_at_orders_in_the_millions(dtype):
    """F^(4e6 + 1/2) = F^(1/2) to the dtype's full precision. Guards against the phase a·k not reduced mod 4
    in float64 before the exponential: unreduced, π/2·a·k reaches 4e8 at N = 64 and its float64 rounding
    (~5e-8) is far above float64's 1e-12 (float32 sees a phase formed in float32)."""
    x = _frft_signal(0, 64, dtype, True)
    assert _frft_err(frft.frft(x, 4_000_000.5), frft.frft(x.to(torch.complex128), 0.5)) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, seed=st.integers(0, 2**31),
       alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_frft_is_linear(n, a, dtype, seed, alpha, beta):
    x, y = _frft_signal(seed, n, dtype, True, batch=2)
    lhs = frft.frft(alpha * x + beta * y, a)
    rhs = alpha * frft.frft(x, a) + beta * frft.frft(y, a)
    scale = (abs(alpha) * x.norm() + abs(beta) * y.norm()).item()
    assert (lhs - rhs).norm().item() <= 2 * _FRFT_TOL[dtype] * scale


@_frft_settings
@given(h=_frft_sizes, w=_frft_sizes, a_h=_frft_orders, a_w=_frft_orders, dtype=_frft_dtypes,
       is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft2_height_then_width_equals_width_then_height(h, w, a_h, a_w, dtype, is_complex, seed):
    x = _frft_signal(seed, h * w, dtype, is_complex, batch=2).unflatten(-1, (h, w))
    height_first = frft.frft(frft.frft(x, a_h, dim=-2), a_w, dim=-1)
    width_first = frft.frft(frft.frft(x, a_w, dim=-1), a_h, dim=-2)
    assert _frft_err(height_first, width_first) < 2 * _FRFT_TOL[dtype]


@_frft_settings
@given(h=_frft_sizes, w=_frft_sizes, a_h=_frft_orders, a_w=_frft_orders, dtype=_frft_dtypes,
       is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft2_is_frft_along_height_and_width(h, w, a_h, a_w, dtype, is_complex, seed):
    x = _frft_signal(seed, h * w, dtype, is_complex, batch=2).unflatten(-1, (h, w))
    along_each = frft.frft(frft.frft(x, a_h, dim=1), a_w, dim=2)
    assert _frft_err(frft.frft2(x, a_h, a_w), along_each) < 2 * _FRFT_TOL[dtype]


def test_frft2_width_order_defaults_to_the_height_order():
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    assert torch.equal(frft.frft2(x, 0.3), frft.frft2(x, 0.3, 0.3))


@settings(max_examples=10, deadline=None)
@given(n=_frft_sizes, a=_frft_orders)
def test_frft_along_a_middle_dim_equals_frft_along_the_last(n, a):
    x = torch.randn(2, n, 3, dtype=torch.float64)
    assert _frft_err(frft.frft(x, a, dim=1), frft.frft(x.transpose(1, 2), a).transpose(1, 2)) < 1e-12


def test_frft_output_is_complex64_or_complex128_as_promised():
    expected = {torch.float16: torch.complex64, torch.float32: torch.complex64, torch.complex64: torch.complex64,
                torch.float64: torch.complex128, torch.complex128: torch.complex128}
    for dtype, out in expected.items():
        x = torch.ones(2, 4, 5, dtype=dtype)
        assert frft.frft(x, 0.3).dtype == out and frft.frft2(x, 0.3).dtype == out, dtype


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_frft_float_order_and_tensor_order_agree(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    order = torch.tensor(a, dtype=dtype, requires_grad=True)
    assert torch.equal(frft.frft(x, order.item()), frft.frft(x, order))


# ---- selective scan ----

SCAN_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCAN_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                  scale: float | None = None) -> None:
    """max |actual − expected| ≤ rtol · scale, scale = max |expected| unless given (exact zeros pass)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{what}: error {err:.3g} at scale {scale:.3g}"


@st.composite
def scan_cases(draw, dtypes=(torch.float64, torch.float32), optional=True):
    """Shapes, options and a seed for one scan; l covers 1, < chunk, multiples and non-multiples of it."""
    chunk = draw(st.sampled_from([4, 8]))
    l = draw(st.one_of(st.sampled_from([1, chunk - 1, chunk, chunk + 1, 3 * chunk]), st.integers(1, 4 * chunk + 3)))
    grouped = draw(st.booleans())
    flag = st.booleans() if optional else st.just(True)
    return dict(seed=draw(st.integers(0, 2**31 - 1)), b=draw(st.integers(1, 2)), dg=draw(st.integers(1, 3)),
                g=draw(st.integers(1, 3)) if grouped else 1, grouped=grouped, n=draw(st.integers(1, 4)), l=l,
                chunk=chunk, dtype=draw(st.sampled_from(dtypes)), softplus=draw(st.booleans()),
                D=draw(flag), z=draw(flag), delta_bias=draw(flag))


def _scan_inputs(case: dict, delta_scale: float = 0.5) -> dict:
    """Random inputs for a case: A < 0, Δ + delta_bias > 0 (or any sign when softplus follows)."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, g, n, l, dtype = case["b"], case["g"], case["n"], case["l"], case["dtype"]
    d = g * case["dg"]

    def rand(*shape, positive=False):
        x = torch.rand(*shape, generator=gen, dtype=torch.float64) if positive else \
            torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.to(dtype)

    BC = (b, g, n, l) if case["grouped"] else (b, n, l)
    return dict(u=rand(b, d, l), A=-rand(d, n).exp(), B=rand(*BC), C=rand(*BC),
                delta=rand(b, d, l) if case["softplus"] else delta_scale * rand(b, d, l, positive=True),
                D=rand(d) if case["D"] else None, z=rand(b, d, l) if case["z"] else None,
                delta_bias=0.5 * rand(d, positive=not case["softplus"]) if case["delta_bias"] else None)


def _scan_with_grads(fn, inputs: dict, softplus: bool, **kwargs):
    """y, last state, and the gradient of a fixed random projection of (y, last state) w.r.t. every input."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}   # keeps strides
    y, last = fn(**leaves, delta_softplus=softplus, return_last_state=True, **kwargs)
    gen = torch.Generator().manual_seed(0)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y)
    wl = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(y)
    grads = torch.autograd.grad((y * wy).sum() + (last * wl).sum(), list(leaves.values()))
    return y.detach(), last.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("only", ["u", "delta", "A", "B", "C", "D", "delta_bias"])
def test_scan_gradient_of_one_input_alone_is_the_loops(only):
    """With one input alone requiring a gradient (a model frozen but for one parameter) the chunked scan
    still keeps the states its backward restarts from, and that gradient is the loop's."""
    case = dict(seed=0, b=2, dg=3, g=2, grouped=True, n=4, l=37, chunk=8, dtype=torch.float64, softplus=True,
                D=True, z=False, delta_bias=True)
    inputs = _scan_inputs(case)
    w = torch.randn(2, 6, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn, kw in ((selective_scan, {"chunk_size": 8}), (selective_scan_ref, {})):
        leaves = {k: v.detach().requires_grad_(k == only) for k, v in inputs.items() if v is not None}
        (grad,) = torch.autograd.grad((fn(**leaves, delta_softplus=True, **kw) * w).sum(), leaves[only])
        grads.append(grad)
    _assert_close(grads[0], grads[1], 1e-10)


def _assert_same_scan(actual: tuple, expected: tuple, rtol: float) -> None:
    """Two `_scan_with_grads` results agree: y, last state and every gradient, each at its own scale,
    except the parameters summed over b and l (A, D, delta_bias). Such a sum may nearly cancel, far below
    the rounding error of its terms, so it is measured against 1e-2 of the largest gradient. (Hypothesis
    found delta_bias = 0.0064 in float32, a sum of 38 terms up to 2.7, where two orders of summation
    differ by 1.1e-7 of the largest gradient; and A = 3e-4 in float64, 7e-16 apart between chunk sizes.
    A lost or doubled term would be off by that whole term, far beyond rtol · 1e-2 of the largest.)"""
    (y1, last1, g1), (y0, last0, g0) = actual, expected
    _assert_close(y1, y0, rtol, "y")
    _assert_close(last1, last0, rtol, "last state")
    floor = 1e-2 * max(g.abs().max().item() for g in g0.values())
    for k in g0:
        scale = g0[k].abs().max().item()
        reduced = k in ("A", "D", "delta_bias")
        _assert_close(g1[k], g0[k], rtol, f"grad {k}", scale=max(scale, floor) if reduced else scale)


def _assert_scans_agree(case: dict, inputs: dict, rtol: float) -> None:
    """selective_scan == selective_scan_ref in y, last state and every gradient."""
    _assert_same_scan(_scan_with_grads(selective_scan, inputs, case["softplus"], chunk_size=case["chunk"]),
                      _scan_with_grads(selective_scan_ref, inputs, case["softplus"]), rtol)


@SCAN_SETTINGS
@given(case=scan_cases())
def test_scan_matches_ref(case):
    inputs = _scan_inputs(case)
    y0, last0 = selective_scan_ref(**inputs, delta_softplus=case["softplus"], return_last_state=True)
    y1, last1 = selective_scan(**inputs, delta_softplus=case["softplus"], return_last_state=True,
                               chunk_size=case["chunk"])
    _assert_close(y1, y0, SCAN_TOL[case["dtype"]], "y")
    _assert_close(last1, last0, SCAN_TOL[case["dtype"]], "last state")


_SCAN_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="no CUDA device"))]


@pytest.mark.parametrize("device", _SCAN_DEVICES)
@SCAN_SETTINGS
@given(case=scan_cases())
def test_scan_forward_and_backward_are_deterministic_whatever_ran_before(device, case):
    """The same inputs give the same y, last state and gradients, bit for bit, also after a run on other
    data of the same shapes has left its numbers in the memory the allocator hands out next. Guards against
    a buffer of the forward or the backward taken with torch.empty where it is accumulated into (e.g.
    _scan_backward's dA): its result depends on stale memory, and a first run on fresh pages hides it."""
    inputs = {k: None if v is None else v.to(device) for k, v in _scan_inputs(case).items()}
    run = lambda x: _scan_with_grads(selective_scan, x, case["softplus"], chunk_size=case["chunk"])
    first = run(inputs)
    run(dict(inputs, u=-inputs["u"], B=2 * inputs["B"], C=inputs["C"].flip(-1)))  # other numbers, same sizes
    again = run(inputs)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    for k in first[2]:
        assert torch.equal(again[2][k], first[2][k]), f"grad {k}"


@SCAN_SETTINGS
@given(case=scan_cases(optional=False))
@example(case=dict(seed=2**31 - 1, b=2, dg=1, g=1, grouped=False, n=3, l=19, chunk=4, dtype=torch.float32,
                   softplus=True, D=True, z=True, delta_bias=True))  # a near-cancelling delta_bias
def test_scan_grads_match_ref(case):
    # Every input carries a gradient here (D, z and delta_bias always present).
    inputs = _scan_inputs(case)
    _assert_scans_agree(case, inputs, SCAN_TOL[case["dtype"]])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scan_cases(optional=False), chunk=st.integers(ssm._SUB + 1, 3 * ssm._SUB + 3),
       n_chunks=st.integers(1, 3), tail=st.integers(0, 2))
@example(case=dict(seed=0, b=1, dg=2, g=1, grouped=False, n=2, l=0, chunk=0, dtype=torch.float64,
                   softplus=True, D=True, z=True, delta_bias=True), chunk=2 * ssm._SUB + 1, n_chunks=3, tail=2)
def test_scan_grads_match_ref_with_chunks_longer_than_the_backward_block(case, chunk, n_chunks, tail):
    """Chunks of more than ssm._SUB (16) steps, so that the backward recomputes each chunk's states in
    several blocks, each from a state the forward kept; the other comparisons with the loop use chunks of
    at most 9 steps, one block. Guards against a block restarted from the wrong kept state (kept.pop(0)
    for kept.pop()), or blocks that miss or repeat a step at their edges."""
    case = dict(case, chunk=chunk, l=n_chunks * chunk - tail % n_chunks)  # < n_chunks padded steps
    K = math.ceil(case["l"] / chunk)
    assert math.ceil(case["l"] / K) == chunk > ssm._SUB  # the premise: the scan really runs chunks this long
    _assert_scans_agree(case, _scan_inputs(case), SCAN_TOL[case["dtype"]])


@SCAN_SETTINGS
@given(case=scan_cases(dtypes=(torch.float64,), optional=False), n_chunks=st.integers(4, 8))
def test_scan_slow_decay_carries_state_across_chunks(case, n_chunks):
    # Δ ≈ 1e-4: the state hardly decays, so what chunk 0 writes still dominates the last chunk; a lost or
    # mis-scaled carry between chunks (forward or backward) shows up at full size.
    # No skip or gate: y is the state read-out alone, so the tolerance applies to it.
    case = dict(case, l=n_chunks * case["chunk"] + case["l"] % case["chunk"], softplus=False, delta_bias=False,
                D=False, z=False)
    inputs = _scan_inputs(case, delta_scale=1e-4)
    inputs["delta"] = 1e-4 + inputs["delta"] * 0.1
    _assert_scans_agree(case, inputs, 1e-10)
    # The premise holds: what the first chunk leaves in the state is still there, nearly undecayed, at the end.
    c = case["chunk"]
    first = {k: v[..., :c] if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    silenced = dict(inputs, u=torch.cat([torch.zeros_like(inputs["u"][..., :c]), inputs["u"][..., c:]], -1))
    (_, h_first), (_, h_all), (_, h_silenced) = (selective_scan_ref(**x, return_last_state=True)
                                                 for x in (first, inputs, silenced))
    assert ((h_all - h_silenced).abs() >= 0.25 * h_first.abs()).all()


@SCAN_SETTINGS
@given(case=scan_cases(optional=False))
def test_scan_strong_decay_stays_finite_and_correct(case):
    # Δ·A ≤ −3000 per step: a chunk's total decay sums below −1e4, far past exp's float range; every
    # exponent the scan forms must stay ≤ 0, or inf/NaN appear.
    case = dict(case, softplus=False, delta_bias=False)
    inputs = _scan_inputs(case, delta_scale=100.0)
    inputs["delta"] = 300.0 + inputs["delta"]                                  # Δ in [300, 400]
    inputs["A"] = -10.0 - inputs["A"].abs()                                    # A ≤ −10
    _assert_scans_agree(case, inputs, SCAN_TOL[case["dtype"]])


@SCAN_SETTINGS
@given(case=scan_cases(optional=False), edge=st.sampled_from(["delta=0", "A=0", "B=0"]))
def test_scan_exact_edge_values(case, edge):
    case = dict(case, softplus=False, delta_bias=False)
    inputs = _scan_inputs(case)
    key = edge.split("=")[0]
    inputs[key] = torch.zeros_like(inputs[key])
    y, last = selective_scan(**inputs, return_last_state=True, chunk_size=case["chunk"])
    skip = inputs["D"][:, None] * inputs["u"] * torch.nn.functional.silu(inputs["z"])
    if edge == "A=0":
        # No decay: the state is the plain sum of every Δ_t·B_t·u_t.
        B = inputs["B"] if case["grouped"] else inputs["B"][:, None]
        b, d, l = inputs["u"].shape
        Bd = B.repeat_interleave(d // B.shape[1], dim=1)                      # (b, d, n, l)
        expected = ((inputs["delta"] * inputs["u"])[:, :, None, :] * Bd).sum(-1)
        _assert_close(last, expected, SCAN_TOL[case["dtype"]], "last state")
        _assert_close(y, selective_scan_ref(**inputs), SCAN_TOL[case["dtype"]], "y")
    else:
        # Nothing enters the state: it stays exactly 0 and y is exactly the skip path.
        assert torch.equal(last, torch.zeros_like(last))
        assert torch.equal(y, skip)


@SCAN_SETTINGS
@given(case=scan_cases(dtypes=(torch.float64,)), chunks=st.lists(st.integers(1, 40), min_size=2, max_size=3))
@example(case=dict(seed=309, b=2, dg=1, g=1, grouped=True, n=1, l=23, chunk=8, dtype=torch.float64, softplus=False,
                   D=False, z=True, delta_bias=True), chunks=[1, 3])  # a near-cancelling A
def test_scan_any_chunk_size_gives_same_result(case, chunks):
    inputs = _scan_inputs(case)
    results = [_scan_with_grads(selective_scan, inputs, case["softplus"], chunk_size=c) for c in chunks]
    for other in results[1:]:
        _assert_same_scan(other, results[0], 1e-12)


@SCAN_SETTINGS
@given(case=scan_cases(optional=False), data=st.data())
def test_scan_is_causal(case, data):
    # ∂y_s/∂x_t = 0 for s < t, for every per-step input x: exactly, not approximately.
    case = dict(case, l=max(case["l"], 2))
    cut = data.draw(st.integers(1, case["l"] - 1))
    inputs = _scan_inputs(case)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**leaves, delta_softplus=case["softplus"], chunk_size=case["chunk"])
    grads = torch.autograd.grad(y[..., :cut].square().sum(), [leaves[k] for k in ("u", "delta", "B", "C", "z")])
    for k, grad in zip(("u", "delta", "B", "C", "z"), grads):
        assert torch.equal(grad[..., cut:], torch.zeros_like(grad[..., cut:])), k
        assert grad[..., :cut].abs().sum() > 0, k                           # and not vacuously


@pytest.mark.parametrize("grouped", [False, True])
def test_scan_gradcheck(grouped):
    g, dg, n, l = (2, 2, 2, 5) if grouped else (1, 3, 2, 5)
    case = dict(seed=0, b=2, g=g, dg=dg, n=n, l=l, grouped=grouped, dtype=torch.float64, softplus=True,
                D=True, z=True, delta_bias=True)
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(case).items()}

    def fn(*args):
        return selective_scan(**dict(zip(SCAN_INPUTS, args)), delta_softplus=True, return_last_state=True,
                              chunk_size=2)
    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in SCAN_INPUTS))


@SCAN_SETTINGS
@given(case=scan_cases(dtypes=(torch.float64,), optional=False))
def test_scan_noncontiguous_inputs(case):
    # Same numbers, stored transposed or strided: results must not change.
    inputs = _scan_inputs(case)
    strided = {}
    for k, v in inputs.items():
        wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)    # every other element
        wide[..., ::2] = v
        strided[k] = wide[..., ::2]
    strided["A"] = inputs["A"].t().contiguous().t()                          # column-major
    strided["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)  # (b, l, d) storage
    assert case["l"] == 1 or not strided["delta"].is_contiguous()
    _assert_same_scan(_scan_with_grads(selective_scan, strided, case["softplus"], chunk_size=case["chunk"]),
                      _scan_with_grads(selective_scan, inputs, case["softplus"], chunk_size=case["chunk"]), 1e-12)


def _ss2d(seed: int, dim: int, d_state: int, expand: int) -> SS2D:
    torch.manual_seed(seed)
    model = SS2D(dim, d_state=d_state, expand=expand).double()
    with torch.no_grad():                         # non-trivial values everywhere, so every path matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("grad", [True, False])
@SCAN_SETTINGS
@given(h=st.integers(1, 6), w=st.integers(1, 6), dim=st.integers(1, 9), d_state=st.integers(1, 4),
       expand=st.integers(1, 2), seed=st.integers(0, 1000))
def test_ss2d_is_its_four_routes_scanned_one_by_one(grad, h, w, dim, d_state, expand, seed):
    """Both ways SS2D runs: with autograd (training) the four routes in one scan; without it on a CPU
    (SS2D.paired) a route and its reverse per scan."""
    model = _ss2d(seed, dim, d_state, expand)
    x = torch.randn(2, dim, h, w, dtype=torch.float64)
    with torch.no_grad():
        reference = ss2d_ref(model, x)
    with torch.set_grad_enabled(grad):
        assert SS2D.paired(x) is not grad
        _assert_close(model(x), reference, 1e-10)


@pytest.mark.parametrize("grad", [True, False])
@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), dim=st.integers(2, 9), d_state=st.integers(1, 4),
       expand=st.integers(1, 2))
def test_bench_counts_the_multiply_accumulates_of_ss2d_route_by_route(grad, h, w, dim, d_state, expand):
    """bench.macs of SS2D is what flop_counter finds in the route-by-route form: the zero blocks of the
    block-diagonal Δ projection are not counted as work, whether the routes go four at once (with
    autograd) or in pairs (without). (dim from 2: an einsum over one channel is a plain product, which
    flop_counter does not count.)"""
    model, x = _ss2d(0, dim, d_state, expand), torch.randn(2, dim, h, w, dtype=torch.float64)
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(grad):
        with counter:
            ss2d_ref(model, x)
        assert bench.macs(lambda: model(x)) == counter.get_total_flops() / 2


@SCAN_SETTINGS
@given(h=st.sampled_from([1, 3, 5, 7]), w=st.sampled_from([1, 3, 5, 7]), dim=st.integers(1, 9),
       d_state=st.integers(1, 4), expand=st.integers(1, 2), seed=st.integers(0, 1000))
def test_ss2d_keeps_shape(h, w, dim, d_state, expand, seed):
    model = _ss2d(seed, dim, d_state, expand)
    x = torch.randn(2, dim, h, w, dtype=torch.float64)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@SCAN_SETTINGS
@given(h=st.integers(2, 6), w=st.integers(2, 6), symmetry=st.sampled_from(["transpose", "rotate180"]),
       seed=st.integers(0, 1000))
def test_ss2d_routes_map_onto_each_other_under_image_symmetries(h, w, symmetry, seed):
    # The four routes are the orbit of the row-major scan under {identity, transpose, 180° rotation, both}:
    # transposing the image turns row-major into column-major (routes 0↔1, 2↔3), rotating it by 180°
    # reverses each scan (routes 0↔2, 1↔3). So SS2D on the transformed image, with its route parameters
    # permuted to match and its 3×3 kernel transformed alike, must be SS2D on the image, transformed.
    # Routes that read the image in the same order (a flip or transpose missing) break this.
    model = _ss2d(seed, 4, 3, 2)
    x = torch.randn(2, 4, h, w, dtype=torch.float64)
    if symmetry == "transpose":
        perm, transform = [1, 0, 3, 2], (lambda t: t.transpose(-1, -2))
    else:
        perm, transform = [2, 3, 0, 1], (lambda t: t.flip(-1, -2))
    mirrored = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D"):   # per route, (4, ...)
            getattr(mirrored, name).copy_(getattr(model, name)[perm])
        mirrored.conv.weight.copy_(transform(model.conv.weight))
    _assert_close(transform(mirrored(transform(x))), model(x), 1e-10)


@SCAN_SETTINGS
@given(h=st.sampled_from([5, 7]), w=st.sampled_from([5, 7]), seed=st.integers(0, 1000), data=st.data())
def test_ss2d_sees_the_whole_image(h, w, seed, data):
    # Every output pixel depends on every input pixel, above, below, left and right of it — far beyond
    # the 3×3 conv: the forward and reversed row- and column-major scans together reach everywhere.
    model = _ss2d(seed, 3, 2, 1)
    i, j = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    x = torch.randn(1, 3, h, w, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x)[0, :, i, j].sum(), x)
    assert (grad[0].abs().sum(0) > 0).all()


@SCAN_SETTINGS
@given(scan_cases())
def test_scan_default_chunking_matches_ref(case):
    """chunk_size=None (the automatic K: a power of two, at most √l, tail padded) agrees with the loop."""
    _assert_scans_agree({**case, "chunk": None}, _scan_inputs(case), SCAN_TOL[case["dtype"]])


# ---- DyPro-Mamba ----

SMALL = P.Config(width=8, d_state=4, drpn_d_state=2)  # the real architecture, narrow enough for CPU tests
MODEL_SETTINGS = settings(max_examples=10, deadline=None)


def _model(cfg: P.Config = SMALL, seed: int = 0) -> P.DyProMamba:
    torch.manual_seed(seed)
    return P.DyProMamba(cfg)


def _inputs(b: int, h: int, w: int, seed: int = 0, ratio: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, h, w, generator=g)
    return rgb, P.sample_points((b, 31, h, w), ratio, 2.0, 0.1, generator=g)


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
           **{b: dataclasses.replace(SMALL, backbone=b) for b in backbones.BODIES}}


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_reaches_every_parameter(config):
    """Through the training loss (L_P2I only where there is an H2R), for every ablation and every backbone."""
    m = _model(CONFIGS[config])
    rgb, pts = _inputs(2, 15, 13)  # odd: the bodies' padding must pass gradients too
    hsi, y3 = m(rgb, pts)
    mask = torch.zeros(2, 1, 15, 13, dtype=torch.bool)
    mask[:, :, 3, 5] = True
    weights = {**P.LOSS_WEIGHTS, "p2i": P.LOSS_WEIGHTS["p2i"] if m.h2r is not None else 0}
    loss, _ = P.pixel_ssr_loss(m, rgb, hsi, y3, torch.rand(2, 31, 15, 13) * mask, mask, torch.full((3, 31), 1 / 31), weights)
    loss.backward()
    silent = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, f"no gradient reaches {silent}"


def test_model_size_is_within_30_percent_of_the_paper():
    """Table 10: 0.61 M parameters and 4.65 G multiply-accumulates at 128x128 (DESIGN.md allows ±30 %),
    counted as DESIGN.md says, flop_counter / 2, by bench.macs (which leaves out the zero blocks of SS2D's
    block-diagonal Δ projection). H2R is a training-only head, outside the inference model the paper measures."""
    m = P.DyProMamba().eval()
    params = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("h2r."))
    with torch.no_grad():
        macs = bench.macs(lambda: m(torch.rand(1, 3, 128, 128), torch.zeros(1, 31, 128, 128)))
    assert params == pytest.approx(0.61e6, rel=0.3)
    assert macs == pytest.approx(4.65e9, rel=0.3)


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
        return P.pixel_ssr_loss(m, rgb, out["hsi"], out["y3"], target, mask, srf)[1][term]

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
    _, terms = P.pixel_ssr_loss(_model(), rgb, hsi, y3, target, mask, srf)
    expected = np.abs(rgb.numpy() - np.einsum("cn,bnhw->bchw", srf.numpy(), hsi.detach().numpy())).mean()
    assert terms["rep"].item() == pytest.approx(expected, rel=1e-6)


def test_ssim_loss_is_one_minus_the_mean_ssim_of_adjacent_bands():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    _, terms = P.pixel_ssr_loss(_model(), rgb, hsi, y3, target, mask, srf)
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
    _, terms = P.pixel_ssr_loss(m, rgb, hsi, y3, target, mask, srf)
    expected = np.abs(rgb.numpy() - np.einsum("cn,bnhw->bchw", srf.numpy(), y3.detach().numpy())).mean()
    assert terms["p2i"].item() == pytest.approx(expected, rel=1e-6)


def test_loss_total_is_the_weighted_sum_of_eq15():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    total, t = P.pixel_ssr_loss(_model(), rgb, hsi, y3, target, mask, srf)
    torch.testing.assert_close(total, t["phsi"] + t["rep"] + 0.3 * t["ssim"] + 0.3 * t["p2i"])


def test_phsi_is_zero_without_labels():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    _, terms = P.pixel_ssr_loss(_model(), rgb, hsi, y3, target * 0, torch.zeros_like(mask), srf)
    assert terms["phsi"].item() == 0


def test_phsi_reads_only_labelled_pixels():
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    m = _model()
    _, before = P.pixel_ssr_loss(m, rgb, hsi, y3, target, mask, srf)
    with torch.no_grad():
        hsi2, target2 = hsi.clone(), target.clone()
        hsi2[~mask.expand_as(hsi)] += 0.5  # change the prediction and the target off the labels
        target2[~mask.expand_as(target)] = 7.0
    _, after = P.pixel_ssr_loss(m, rgb, hsi2, y3, target2, mask, srf)
    assert after["phsi"].item() == pytest.approx(before["phsi"].item())
    expected = (hsi - target).abs().permute(1, 0, 2, 3)[:, mask[:, 0]].mean()
    assert before["phsi"].item() == pytest.approx(expected.item())


class _FirstChannels(torch.nn.Module):
    """Stands in for a fusing conv3(cat(Y, P)): passes Y (the first `n` channels) through, drops the prompt."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.n]


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
        m.drpn.y2 = _FirstChannels(m.cfg.bands)                    # Y2 = Y1
    elif switch == "use_hf":
        m.drpn.y3 = _FirstChannels(m.cfg.bands)                    # Y3 = Y2
    elif switch == "use_spe":
        m.drpn.spe = torch.nn.ModuleList(_IdentityPrompt(p) for p in m.drpn.spe)
    else:
        for block in (m.body.enc, m.body.mid, m.body.dec):
            block.attn = _NoAttention()


# one switch at a time: (config change, the parameters that must disappear with it)
ABLATIONS = {
    "use_spa": ("drpn.spa.", "drpn.y2."),
    "use_hf": ("drpn.hf.", "drpn.y3."),
    "use_spe": ("drpn.spe.",),
    "use_prompt_ssm": ("drpn.spe.", *(f"body.{blk}.{sub}." for blk in ("enc", "mid", "dec") for sub in ("attn", "norm1"))),
}


@pytest.mark.parametrize("switch", ABLATIONS)
def test_each_ablation_switch_removes_its_branch_and_nothing_else(switch):
    """The cut model holds exactly the full model's parameters less its branch's; given the full model's
    weights it computes what the full model computes with that branch bypassed (a fusing conv replaced by
    a pass-through of Y, P_spe by the identity, the attention sub-layer by zero); and the branch did
    matter. (Comparing a full and a cut model as initialised says nothing: their initialisations differ.)
    Guards against a switch that also cuts or rewires another branch (e.g. the Spa-HF step nested under
    `if self.spa`), and against branch parameters built but unused."""
    full, cut = _model(), _model(dataclasses.replace(SMALL, **{switch: False}))
    full_sd, cut_sd = full.state_dict(), cut.state_dict()
    gone = {k for k in full_sd if k.startswith(ABLATIONS[switch])}
    assert gone and set(cut_sd) == set(full_sd) - gone
    cut.load_state_dict({k: full_sd[k] for k in cut_sd})
    bypassed = copy.deepcopy(full)
    _bypass(bypassed, switch)
    x = _inputs(2, 12, 10)
    with torch.no_grad():
        out_full, out_bypassed, out_cut = full(*x)[0], bypassed(*x)[0], cut(*x)[0]
    _assert_close(out_cut, out_bypassed, 1e-6)
    assert (out_full - out_bypassed).abs().max() > 1e-3 * out_full.abs().max()


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


@pytest.mark.parametrize("weights", [{"ssim": 0}, {"p2i": 0}, {"phsi": 0, "rep": 0}])
def test_a_loss_term_of_weight_zero_is_not_computed(weights, monkeypatch):
    """Table 6's "w/o" rows: a term of weight 0 is absent from the terms, its computation never runs (no SSIM
    call, no H2R forward) and no gradient comes through it; the total is the weighted sum of the others."""
    m = _model()
    hsi, y3, rgb, target, mask, srf = _loss_inputs()
    calls = []
    monkeypatch.setattr(P, "_ssim", lambda *a, _real=P._ssim: calls.append("ssim") or _real(*a))
    m.h2r.register_forward_hook(lambda *a: calls.append("p2i"))
    w = {**P.LOSS_WEIGHTS, **weights}
    total, terms = P.pixel_ssr_loss(m, rgb, hsi, y3, target, mask, srf, w)
    assert set(terms) == {k for k, v in w.items() if v}
    assert not {"ssim", "p2i"} & set(weights) & set(calls)
    torch.testing.assert_close(total, sum(w[k] * v for k, v in terms.items()))
    total.backward()
    if "p2i" in weights:
        assert y3.grad is None and all(p.grad is None for p in m.h2r.parameters())


def test_backbone_bodies_have_their_papers_parameter_counts():
    """MST++ 1.62 M (Cai et al. 2022), HSCNN+ 4.65 M (HSCNN-D at 30 blocks, the MST++ paper's table): the body
    alone, within 20 %. Its first convolution takes X and Y3 (34 channels, not 3), a few thousand more."""
    for name, paper in backbones.PAPER_PARAMS.items():
        body = backbones.BODIES[name](P.Config())
        assert _n_params(body) == pytest.approx(paper, rel=0.2), name


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
    centred = _frft_centred_dft(_frft_centred_dft(x, inverse).transpose(-1, -2), inverse).transpose(-1, -2)
    torch.testing.assert_close(fft.transform(x, inverse), centred)
    torch.testing.assert_close(spa.transform(x, inverse), centred, rtol=1e-4, atol=1e-5)


# ---- point spectra ----

@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.5, 20), theta=st.floats(0.005, 0.5), seed=st.integers(0, 2**31))
def test_fit_gamma_recovers_known_parameters(alpha, theta, seed):
    x = np.random.default_rng(seed).gamma(alpha, theta, 200_000)
    a, t = P.fit_gamma(x)
    assert a == pytest.approx(alpha, rel=0.05) and t == pytest.approx(theta, rel=0.05)


@pytest.mark.parametrize("bad", [[], [0.5], [0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [0.2, float("nan")]])
def test_fit_gamma_refuses_empty_negative_or_degenerate_data(bad):
    with pytest.raises(ValueError):
        P.fit_gamma(bad)


@settings(max_examples=30, deadline=None)
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


# ---- metrics ----

def _np_ssim_band(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s reference SSIM (ssim_index.m): 11x11 Gaussian, sigma 1.5, 'valid' filtering."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda a: scipy.signal.convolve2d(a, np.rot90(win, 2), mode="valid")
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


@pytest.mark.parametrize("leaves", ["below 0", "above 1", "both ways", "nowhere"])
@settings(max_examples=10, deadline=None)
@given(h=st.integers(11, 24), w=st.integers(11, 24), noise=st.floats(0.01, 0.3), seed=st.integers(0, 10**6))
def test_metrics_match_independent_numpy_computation(leaves, h, w, noise, seed):
    """pred leaves [0, 1] below, above, both ways or nowhere: the clamp is tested too, each side alone
    (it is skipped when nothing is out of range)."""
    rng = np.random.default_rng(seed)
    target = rng.random((31, h, w))
    pred = target + noise * rng.standard_normal((31, h, w))
    pred = {"below 0": np.minimum(pred, 1), "above 1": np.maximum(pred, 0), "both ways": pred,
            "nowhere": np.clip(pred, 0, 1)}[leaves]
    ref = _np_metrics(pred, target)
    for name, value in ref.items():
        got = getattr(P, name)(torch.from_numpy(pred), torch.from_numpy(target)).item()
        assert got == pytest.approx(value, rel=1e-9, abs=1e-9), name


@settings(max_examples=10, deadline=None)
@given(bands_per_block=st.integers(1, 31), seed=st.integers(0, 10**6))
def test_ssim_taken_a_block_of_bands_at_a_time_is_the_reference_ssim(bands_per_block, seed):
    """Two images, each given as a cube read from disk is laid out, (H, W, 31) permuted to (31, H, W)."""
    rng = np.random.default_rng(seed)
    target = rng.random((2, 12, 13, 31))
    pred = np.clip(target + 0.1 * rng.standard_normal((2, 12, 13, 31)), 0, 1)
    expected = np.mean([_np_ssim_band(a, b) for p, t in zip(pred, target) for a, b in zip(p.transpose(2, 0, 1),
                                                                                          t.transpose(2, 0, 1))])
    with mock.patch.object(P, "SSIM_BLOCK", bands_per_block * 2 * 12 * 13):
        got = P.ssim(*(torch.from_numpy(x).permute(0, 3, 1, 2) for x in (pred, target))).item()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_metrics_average_per_image_over_a_batch():
    rng = np.random.default_rng(0)
    target = rng.random((2, 31, 12, 12))
    pred = target + rng.uniform(0, 0.2, (2, 1, 1, 1)) * rng.standard_normal((2, 31, 12, 12))
    for name in ("rmse", "psnr", "psnr_bandwise", "ssim", "sam", "mrae"):
        fn = getattr(P, name)
        batch = fn(torch.from_numpy(pred), torch.from_numpy(target)).item()
        single = np.mean([fn(torch.from_numpy(p), torch.from_numpy(t)).item() for p, t in zip(pred, target)])
        assert batch == pytest.approx(single, rel=1e-12), name


@settings(max_examples=10, deadline=None)
@given(h=st.integers(11, 20), w=st.integers(11, 20), seed=st.integers(0, 10**6))
def test_metrics_of_identical_images_are_perfect(h, w, seed):
    x = torch.from_numpy(np.random.default_rng(seed).random((31, h, w)))
    assert P.rmse(x, x).item() == 0 and P.psnr(x, x).item() == math.inf
    assert P.ssim(x, x).item() == pytest.approx(1, abs=1e-12)
    assert P.sam(x, x).item() == pytest.approx(0, abs=1e-5)  # arccos near 1 amplifies rounding


@settings(max_examples=10, deadline=None)
@given(h=st.integers(11, 16), w=st.integers(11, 16), seed=st.integers(0, 10**6))
def test_sam_and_mrae_with_black_pixels_and_zero_values_match_numpy(h, w, seed):
    """Black pixels in the truth, the prediction or both, and zero values in single bands (8-bit CAVE
    copies hold many): SAM counts a pixel black in both as 0 degrees, MRAE divides by max(truth, 1e-3)."""
    rng = np.random.default_rng(seed)
    target = rng.random((31, h, w)) * (rng.random((31, h, w)) > 0.1)  # ~10 % of values exactly 0
    pred = np.clip(target + 0.05 * rng.standard_normal((31, h, w)), 0, 1)
    black = rng.integers(0, 3, (h, w))  # 0: neither, 1: the truth, 2: both
    target[:, black >= 1], pred[:, black == 2] = 0, 0
    ref = _np_metrics(pred, target)
    for name in ("sam", "mrae"):
        got = getattr(P, name)(torch.from_numpy(pred), torch.from_numpy(target)).item()
        assert got == pytest.approx(ref[name], rel=1e-9), name


def test_sam_of_an_image_with_itself_is_zero_even_where_it_is_black():
    x = torch.rand(31, 12, 12, dtype=torch.float64)
    x[:, :3] = 0
    assert P.sam(x, x).item() == pytest.approx(0, abs=1e-5)


def test_sam_resolves_small_angles_in_float32():
    x = torch.from_numpy(np.random.default_rng(0).uniform(0.1, 1, (31, 12, 12)).astype(np.float32))
    assert P.sam(x, x).item() < 1e-4


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_sam_ignores_per_pixel_scaling(seed):
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.uniform(0.1, 1, (31, 12, 12)))
    pred = torch.from_numpy(rng.uniform(0.1, 1, (31, 12, 12)))
    scale = torch.from_numpy(rng.uniform(0.2, 1, (1, 12, 12)))  # keeps pred in [0, 1]: no clamping
    assert P.sam(pred * scale, target).item() == pytest.approx(P.sam(pred, target).item(), rel=1e-9)


# ---- data ----

DATA = Path(__file__).parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not found: real-data tests need "
                                                          "the shared data beside the checkout")

def _data_band_folder(root: Path, scene: str = "tiny", bands=range(1, 32), h: int = 6, w: int = 5,
                      mode: str = "I;16") -> Path:
    """A CAVE-style <scene>_ms/<scene>_ms/<scene>_ms_NN.png folder with band NN filled with value NN
    (times 1000 in 16 bit); returns the outer folder."""
    inner = root / f"{scene}_ms" / f"{scene}_ms"
    inner.mkdir(parents=True)
    for n in bands:
        if mode == "I;16":
            img = Image.fromarray(np.full((h, w), 1000 * n, np.uint16))
        else:
            img = Image.new(mode, (w, h), (n,) * len(mode))
        img.save(inner / f"{scene}_ms_{n:02d}.png")
    return root / f"{scene}_ms"


def _data_error(path) -> str:
    with pytest.raises(data.SceneError) as e:
        data.load_scene(path)
    return str(e.value)


@needs_data
def test_data_load_cave_png_folder_real():
    cube = data.load_scene(DATA / "cave" / "paints_ms")
    assert cube.shape == (512, 512, 31) and cube.dtype == np.float32
    assert 0 <= cube.min() and 0.5 < cube.max() <= 1


@needs_data
def test_data_load_mat_real():
    cube = data.load_scene(DATA / "cave" / "balloons_ms.mat")
    raw = scipy.io.loadmat(DATA / "cave" / "balloons_ms.mat")["Omsi"]
    assert cube.shape == (256, 256, 31)
    np.testing.assert_allclose(cube, raw / 65535, atol=1e-6)


def test_data_outer_and_inner_folder_agree(tmp_path):
    outer = _data_band_folder(tmp_path)
    cube = data.load_scene(outer)
    np.testing.assert_array_equal(cube, data.load_scene(outer / "tiny_ms"))
    np.testing.assert_allclose(cube[0, 0], np.arange(1, 32) * 1000 / 65535, rtol=1e-6)


def test_data_missing_path_error(tmp_path):
    assert "nowhere_ms" in _data_error(tmp_path / "nowhere_ms")


def test_data_wrong_band_count_error(tmp_path):
    msg = _data_error(_data_band_folder(tmp_path, bands=range(1, 31)))
    assert "tiny_ms" in msg and "30 band" in msg and "missing band 31" in msg


def test_data_missing_band_numbers_error(tmp_path):
    msg = _data_error(_data_band_folder(tmp_path, bands=[*range(1, 7), *range(8, 32), 32]))
    assert "missing band 07" in msg and "unexpected band 32" in msg


def test_data_corrupt_png_error(tmp_path):
    outer = _data_band_folder(tmp_path)
    bad = outer / "tiny_ms" / "tiny_ms_12.png"
    bad.write_bytes(bad.read_bytes()[:20])
    assert "tiny_ms_12.png" in _data_error(outer)


def test_data_band_sizes_differ_error(tmp_path):
    outer = _data_band_folder(tmp_path)
    Image.fromarray(np.zeros((7, 5), np.uint16)).save(outer / "tiny_ms" / "tiny_ms_09.png")
    assert "tiny_ms_09.png" in _data_error(outer)


@pytest.mark.parametrize("first", ["unreadable", "wrong size"])
def test_data_names_the_first_bad_band_of_several(tmp_path, first):
    """The bands are decoded on threads; the error still names the lowest-numbered band with a problem."""
    inner = _data_band_folder(tmp_path) / "tiny_ms"
    if first == "unreadable":
        bad = inner / "tiny_ms_05.png"
        bad.write_bytes(bad.read_bytes()[:20])
    else:
        Image.fromarray(np.zeros((7, 5), np.uint16)).save(inner / "tiny_ms_05.png")
    late = inner / "tiny_ms_20.png"
    late.write_bytes(late.read_bytes()[:20])
    msg = _data_error(inner.parent)
    assert "tiny_ms_05.png" in msg and "tiny_ms_20.png" not in msg


def test_data_rgba_band_takes_first_channel(tmp_path):
    cube = data.load_scene(_data_band_folder(tmp_path, mode="RGBA"))
    np.testing.assert_allclose(cube[2, 3], np.arange(1, 32) / 255, rtol=1e-6)


def test_data_8bit_band_scaled_by_255(tmp_path):
    cube = data.load_scene(_data_band_folder(tmp_path, mode="L"))
    np.testing.assert_allclose(cube[0, 0], np.arange(1, 32) / 255, rtol=1e-6)


def test_data_stray_files_ignored(tmp_path):
    outer = _data_band_folder(tmp_path)
    inner = outer / "tiny_ms"
    (inner / "Thumbs.db").write_bytes(b"\0junk")
    (inner / "._tiny_ms_01.png").write_bytes(b"apple double")
    Image.new("RGB", (5, 6)).save(inner / "tiny_RGB.bmp")
    assert data.load_scene(outer).shape == (6, 5, 31)


def test_data_mat_without_cube_error(tmp_path):
    path = tmp_path / "odd.mat"
    scipy.io.savemat(path, {"rgb": np.zeros((4, 4, 3)), "cube": np.zeros((4, 4, 30))})
    msg = _data_error(path)
    assert "odd.mat" in msg and "rgb (4, 4, 3)" in msg and "cube (4, 4, 30)" in msg


def test_data_mat_v73_error(tmp_path):
    path = tmp_path / "hdf.mat"
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\0\2IM"
    path.write_bytes(header + bytes(512))
    msg = _data_error(path)
    assert "hdf.mat" in msg and "v7.3" in msg


def _write_mat_v73(path: Path, variables: dict[str, np.ndarray]) -> None:
    """A MATLAB v7.3 MAT-file as MATLAB writes one: an HDF5 file behind a 512-byte user block that
    starts with the MAT header, each variable a dataset holding the column-major array, i.e. with
    its dimensions reversed (MATLAB's 482 x 512 x 31 is a (31, 512, 482) dataset)."""
    import h5py
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, a in variables.items():
            f.create_dataset(name, data=np.asarray(a).T)
            f[name].attrs["MATLAB_class"] = np.bytes_({"f": "single" if a.dtype == np.float32 else "double",
                                                      "u": f"uint{8 * a.dtype.itemsize}"}[a.dtype.kind])
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\0\2IM")


def _asymmetric_cube(h: int = 5, w: int = 4) -> np.ndarray:
    """(h, w, 31) in (0, 1), every value different and growing with row, then column, then band: any
    transposition or reversal of the axes reads back as something else. Multiples of 1/65535, so that
    16-bit storage holds them exactly."""
    return (np.arange(1, h * w * 31 + 1).reshape(h, w, 31) * (65535 // (h * w * 31 + 1)) / 65535)


_NM = data.WAVELENGTHS.astype(np.float64)[None]  # (1, 31), as MATLAB stores a row vector


@pytest.mark.parametrize("layout", ["ntire2022_arad", "ntire2020", "icvl", "uint16", "bands_first"])
def test_data_mat_v73_layouts_read_back_in_orientation_and_scale(tmp_path, layout):
    """Each layout MATLAB v7.3 files come in reads back as the (H, W, 31) cube MATLAB shows, scaled as its
    source defines: NTIRE 2020 / 2022 (ARAD-1K) `cube` floats as they are, ICVL `rad` 12-bit counts
    by 4095, integers by their type's maximum."""
    truth = _asymmetric_cube()
    variables = {
        "ntire2022_arad": {"cube": truth.astype(np.float32), "bands": _NM, "norm_factor": np.array([[0.42]])},
        "ntire2020": {"cube": truth.astype(np.float32), "bands": _NM.T},
        "icvl": {"rad": truth * 4095, "bands": _NM, "rgb": np.zeros((5, 4, 3), np.uint8)},
        "uint16": {"hsi": np.round(truth * 65535).astype(np.uint16)},
        "bands_first": {"cube": np.moveaxis(truth, -1, 0).astype(np.float32)},
    }[layout]
    _write_mat_v73(tmp_path / "scene.mat", variables)
    np.testing.assert_allclose(data.load_scene(tmp_path / "scene.mat"), truth, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variables,words", [
    ({"rgb": np.zeros((5, 4, 3)), "cube": np.zeros((5, 4, 30))}, ["31 bands", "rgb (5, 4, 3)"]),
    ({"ref": np.zeros((5, 4, 31)), "bands": np.arange(420.0, 721, 10)[None]}, ["420 to 720 nm", "400:10:700"]),
])
def test_data_mat_v73_without_a_400_700_nm_cube_is_one_sentence(tmp_path, variables, words):
    _write_mat_v73(tmp_path / "odd.mat", variables)
    msg = _data_error(tmp_path / "odd.mat")
    assert "odd.mat" in msg and all(w in msg for w in words) and "\n" not in msg


def test_data_mat_bands_first_moved(tmp_path):
    cube = np.random.default_rng(0).integers(0, 65536, (31, 5, 4)).astype(np.uint16)
    scipy.io.savemat(tmp_path / "t.mat", {"orig": cube})
    np.testing.assert_allclose(data.load_scene(tmp_path / "t.mat"), np.moveaxis(cube, 0, -1) / 65535, rtol=1e-6)


def test_data_float_counts_scaled_by_65535(tmp_path):
    np.save(tmp_path / "f.npy", np.full((3, 3, 31), 4000.0))
    np.testing.assert_allclose(data.load_scene(tmp_path / "f.npy"), 4000 / 65535, rtol=1e-6)


def test_data_nan_npy_error(tmp_path):
    cube = np.zeros((4, 4, 31), np.float32)
    cube[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", cube)
    msg = _data_error(tmp_path / "nan.npy")
    assert "nan.npy" in msg and "NaN" in msg


def test_data_unsupported_extension_error(tmp_path):
    (tmp_path / "cube.tif").write_bytes(b"II*\0")
    assert "cube.tif" in _data_error(tmp_path / "cube.tif")


def test_data_scene_name_matching():
    assert data.scene_name("Egyptian_statue_ms") == data.scene_name("egyptian_statue") == "egyptian_statue"
    assert data.scene_name(Path("x") / "Balloons_ms.mat") == "balloons"
    assert data.split_scenes(["Egyptian_statue_ms", "paints_ms"])[2] == ["egyptian_statue"]


def test_data_find_scenes(tmp_path):
    _data_band_folder(tmp_path, scene="Paints")
    np.save(tmp_path / "Flowers_ms.npy", np.zeros((2, 2, 31)))
    scipy.io.savemat(tmp_path / "balloons_ms.mat", {"Omsi": np.zeros((2, 2, 31))})
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "runs").mkdir()
    assert list(data.find_scenes(tmp_path)) == ["balloons", "flowers", "paints"]


_DATA_OTHER_SCENES = ["paints", "sponges", "beads", "cd", "chart_and_stuffed_toy", "watercolors"]


@given(st.sets(st.sampled_from(list(data.CAVE_TEST_SCENES) + _DATA_OTHER_SCENES), min_size=1), st.data())
@settings(max_examples=50, deadline=None)
def test_data_split_test_scenes_never_train(names, draw):
    default = [n for n in names if n in data.CAVE_TEST_SCENES]
    candidates = sorted(set(names) - set(default))
    val = draw.draw(st.lists(st.sampled_from(candidates), unique=True)) if candidates else []
    train, val_out, test = data.split_scenes(sorted(names), val_scenes=val)
    assert sorted(test) == sorted(default) and val_out == val
    assert sorted(train + val_out + test) == sorted(names)


def test_data_split_all_train_without_cave_test_scenes():
    assert data.split_scenes(["demo_00", "demo_01"]) == (["demo_00", "demo_01"], [], [])


def test_data_split_unknown_scene_error():
    with pytest.raises(data.SceneError, match="nope.*paints"):
        data.split_scenes(["paints", "sponges"], test_scenes=["nope"])


@needs_data
@pytest.mark.parametrize("name,file", [("cie1964", "cie1964_10deg"), ("cie1931", "cie1931_2deg"),
                                       ("nikon_d700", "nikon_d700"), ("canon_5dmarkii", "canon_5dmarkii")])
def test_data_srf_tables_equal_csv(name, file):
    with open(DATA / "srf" / f"{file}_400_700_10nm.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert [int(r[0]) for r in rows] == list(data.WAVELENGTHS)
    assert np.array_equal(np.array(data.SRF_TABLES[name]), np.array(rows, dtype=np.float64)[:, 1:])


@needs_data
def test_data_colorchecker_equals_csv():
    with open(DATA / "reflectance" / "colorchecker_babelcolor_400_700_10nm.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert np.array_equal(data.COLORCHECKER, np.array(rows, dtype=np.float64)[:, 1:])


@pytest.mark.parametrize("name", list(data.SRF_TABLES))
def test_data_srf_rows_sum_to_one(name):
    s = data.srf_matrix(name)
    assert s.shape == (3, 31) and s.dtype == np.float32 and (s >= 0).all()
    np.testing.assert_allclose(s.sum(axis=1), 1, rtol=1e-6)


def test_data_srf_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="cie1964.*canon_5dmarkii"):
        data.srf_matrix("sony")


def test_data_rgb_numpy_torch_agree():
    hsi = np.random.default_rng(0).random((2, 7, 5, 31), dtype=np.float32)
    out_np = data.rgb_from_hsi(hsi, "nikon_d700")
    out_t = data.rgb_from_hsi(torch.from_numpy(hsi).permute(0, 3, 1, 2), "nikon_d700")
    assert out_np.shape == (2, 7, 5, 3) and out_t.shape == (2, 3, 7, 5)
    np.testing.assert_allclose(out_t.permute(0, 2, 3, 1).numpy(), out_np, rtol=1e-5, atol=1e-7)
    assert 0 <= out_np.min() and out_np.max() <= 1


def test_load_rgb_accepts_16_bit_grey_and_rgba(tmp_path):
    Image.fromarray(np.full((3, 4), 30000, np.uint16)).save(tmp_path / "grey16.png")
    Image.new("RGBA", (4, 3), (255, 0, 51, 7)).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(data.load_rgb(tmp_path / "grey16.png"), 30000 / 65535, rtol=1e-6)
    np.testing.assert_allclose(data.load_rgb(tmp_path / "rgba.png")[1, 2], [1, 0, 0.2], rtol=1e-6)


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


@pytest.mark.parametrize("channels", [3, 4])
def test_load_rgb_reads_16_bit_colour_pngs_at_16_bits(tmp_path, channels):
    a = np.random.default_rng(channels).integers(0, 65536, (7, 9, channels)).astype(np.uint16)
    _write_png16(tmp_path / "deep.png", a)
    np.testing.assert_array_equal(data.load_rgb(tmp_path / "deep.png") * 65535, a[..., :3].astype(np.float32))
    assert data.bit_depth(tmp_path / "deep.png") == 16


def test_data_load_rgb_bad_file_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.SceneError, match="x.jpg"):
        data.load_rgb(tmp_path / "x.jpg")


def test_data_save_cube_round_trip(tmp_path):
    cube = np.random.default_rng(1).random((5, 4, 31), dtype=np.float32)
    npy, mat = data.save_cube(tmp_path / "out" / "scene.v1", cube)
    assert npy.name == "scene.v1.npy" and mat.name == "scene.v1.mat"
    np.testing.assert_array_equal(data.load_scene(npy), cube)
    np.testing.assert_array_equal(data.load_scene(mat), cube)
    np.testing.assert_array_equal(scipy.io.loadmat(mat)["wavelengths"].ravel(), data.WAVELENGTHS)


def _read_envi(hdr: Path) -> tuple[dict, np.ndarray]:
    """A small independent ENVI reader: the header's key = value pairs ({...} lists may span lines), then
    the raw file beside it (.img, or the header's name without .hdr) by data type, byte order and
    interleave -> (header, (lines, samples, bands) array)."""
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


def test_data_envi_cube_reads_back_with_its_wavelengths(tmp_path):
    cube = np.random.default_rng(2).random((5, 7, 31), dtype=np.float32)
    hdr, img = data.save_envi(tmp_path / "out" / "cube", cube)
    fields, back = _read_envi(hdr)
    np.testing.assert_array_equal(back, cube)
    assert fields["interleave"] == "bsq" and img.stat().st_size == cube.size * 4
    assert [float(v) for v in fields["wavelength"].split(",")] == list(data.WAVELENGTHS)


def test_data_save_png_8bit(tmp_path):
    data.save_png(tmp_path / "p.png", np.array([[0.0, 0.5, 2.0]]))
    img = Image.open(tmp_path / "p.png")
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 128, 255]]


def test_data_demo_scenes_valid():
    scenes = data.demo_scenes(n=3, size=40, seed=5)
    assert [name for name, _ in scenes] == ["demo_00", "demo_01", "demo_02"]
    for _, hsi in scenes:
        assert hsi.shape == (40, 40, 31) and hsi.dtype == np.float32
        assert 0 <= hsi.min() and hsi.max() <= 1 and hsi.std() > 0.01


def test_data_demo_scenes_deterministic():
    a, b, c = data.demo_scenes(2, 32, seed=3), data.demo_scenes(2, 32, seed=3), data.demo_scenes(2, 32, seed=4)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert not np.array_equal(a[0][1], c[0][1])


@given(st.integers(1, 64), st.integers(1, 64), st.integers(0, 10000))
@example(29, 100, 100)  # 0.01 * 29 * 100 = 28.999999999999996 in floating point
@example(58, 50, 100)   # the one such size up to 64 x 64 at omega = 0.01
def test_label_set_has_max_1_floor_ratio_hw_pixels(h, w, permyriad):
    """Counted in integers. Guards against the label count one short where omega.H.W rounds just below an
    integer in floating point."""
    expected = 0 if permyriad == 0 else max(1, permyriad * h * w // 10000)
    assert len(data.draw_label_set(h, w, permyriad / 10000, seed=0)) == expected


@given(st.integers(1, 64), st.integers(1, 64), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_labels_distinct_in_range(h, w, ratio, seed):
    labels = data.draw_label_set(h, w, ratio, seed)
    assert labels.shape[1] == 2 and labels.dtype == np.int64
    assert ((labels >= 0) & (labels < (h, w))).all()
    assert len({tuple(p) for p in labels}) == len(labels)


def test_labels_ratio_one_is_every_pixel():
    labels = data.draw_label_set(3, 4, 1.0, seed=0)
    assert sorted(map(tuple, labels)) == [(r, c) for r in range(3) for c in range(4)]


def test_labels_fixed_per_seed():
    seed = data.scene_seed(7, "Egyptian_statue_ms")
    assert seed == data.scene_seed(7, "egyptian_statue") != data.scene_seed(8, "egyptian_statue")
    a, b = data.draw_label_set(512, 512, 1e-3, seed), data.draw_label_set(512, 512, 1e-3, seed)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, data.draw_label_set(512, 512, 1e-3, data.scene_seed(7, "clay")))


def _data_coord_scene(h: int, w: int) -> np.ndarray:
    """An HSI whose band 0 encodes the pixel's row and band 1 its column, so that a spectrum says where it
    came from after any crop, flip or rotation."""
    hsi = np.full((h, w, 31), 0.5, np.float32)
    hsi[..., 0] = (np.arange(h)[:, None] + 1) / 256
    hsi[..., 1] = (np.arange(w)[None, :] + 1) / 256
    return hsi


@pytest.mark.parametrize("rot", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_labels_move_with_augmentation(rot, flip):
    h, w, p = 40, 36, 16
    labels = data.draw_label_set(h, w, 0.05, seed=1)
    ds = data.PatchDataset([(_data_coord_scene(h, w), labels)], patch=p, stride=8)
    s = data.srf_matrix()
    for i, (_, top, left) in enumerate(ds.index):
        rgb, target, mask = ds.crop(i, rot, flip)
        inside = {(r, c) for r, c in labels if top <= r < top + p and left <= c < left + p}
        assert int(mask.sum()) == len(inside)
        assert torch.equal(target, target * mask)  # zero outside the labelled pixels
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        origin = {(round(float(target[0, y, x]) * 256) - 1, round(float(target[1, y, x]) * 256) - 1)
                  for y, x in zip(ys, xs)}
        assert origin == inside  # every labelled spectrum sits on a pixel of the mask and came from a label
        # and the RGB moved with them: X = S.Y at every labelled pixel
        np.testing.assert_allclose(rgb[:, ys, xs].numpy(), s @ target[:, ys, xs].numpy(), rtol=1e-5)


def test_data_patch_is_rigid_transform_of_scene():
    hsi = np.random.default_rng(2).random((20, 20, 31), dtype=np.float32)
    ds = data.PatchDataset([(hsi, np.zeros((0, 2)))], patch=12, stride=8)
    rgb_scene = data.rgb_from_hsi(hsi)
    _, top, left = ds.index[-1]
    expected = np.fliplr(np.rot90(rgb_scene[top:top + 12, left:left + 12], 3))
    np.testing.assert_allclose(ds.crop(len(ds) - 1, 3, True)[0].permute(1, 2, 0).numpy(), expected, rtol=1e-5)


def test_data_patch_positions_cover_scene():
    ds = data.PatchDataset([(np.zeros((200, 128, 31)), np.zeros((0, 2))), (np.zeros((512, 512, 31)), [[3, 4]])])
    assert [(t, l) for s, t, l in ds.index if s == 0] == [(0, 0), (64, 0), (72, 0)]
    assert len(ds) == 3 + 7 * 7


def test_data_patch_small_scene_padded_without_labels():
    ds = data.PatchDataset([(np.full((10, 12, 31), 0.5), [[9, 11]])], patch=16)
    rgb, target, mask = ds.crop(0)
    assert len(ds) == 1 and rgb.shape == (3, 16, 16) and int(mask.sum()) == 1 and bool(mask[0, 9, 11])
    assert float(rgb[:, 10:].abs().sum()) == 0 and float(target[:, :, 12:].abs().sum()) == 0


def test_data_patch_batch_augmentation_reproducible():
    hsi = np.random.default_rng(3).random((24, 24, 31), dtype=np.float32)
    ds = data.PatchDataset([(hsi, data.draw_label_set(24, 24, 0.1, 0))], patch=16, stride=8)
    idx = list(range(len(ds)))
    first = ds.batch(idx, torch.Generator().manual_seed(0))
    again = ds.batch(idx, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    plain = torch.stack([ds[i][0] for i in idx])
    assert not torch.equal(first[0], plain)  # some were augmented


# ---- train.py: fit, eval, predict ----

FAST = ["--patch", "32", "--stride", "32", "--batch-size", "2"]


def _scene_dir(tmp_path, scenes: dict[str, np.ndarray]):
    root = tmp_path / "scenes"
    root.mkdir()
    for name, cube in scenes.items():
        np.save(root / f"{name}.npy", cube)
    return root


def _demo_dir(tmp_path):
    return _scene_dir(tmp_path, {n: c[:48, :48] for n, c in data.demo_scenes(n=3, size=64)})


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_fit_resumed_after_a_crash_mid_epoch_ends_with_the_same_weights(tmp_path, monkeypatch, extra):
    root = _demo_dir(tmp_path)
    args = ["fit", "--data", str(root), "--epochs", "3", "--test-scenes", "demo_02", *FAST, *extra]
    assert train.main(args + ["--out", str(tmp_path / "straight")]) == 0

    calls, real_loss = [0], P.pixel_ssr_loss

    def crash_in_epoch_two(*a, **k):  # 2 scenes x 4 patches / batch 2 = 4 steps an epoch
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(P, "pixel_ssr_loss", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "crashed")])
    assert torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["step"] == 4  # end of epoch one
    monkeypatch.setattr(P, "pixel_ssr_loss", real_loss)
    assert train.main(args + ["--out", str(tmp_path / "crashed"), "--resume"]) == 0

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)
    for key in ("model", "ema") if extra else ("model",):  # the weight average resumes exactly too
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key])


def test_learning_curve_starts_at_the_untrained_network_and_ends_at_the_saved_one(tmp_path):
    """--val-every N logs the validation PSNR at step 0, every N steps and at the end; the first point is
    the network before any step, the last is the one in last.pt."""
    root = _demo_dir(tmp_path)
    out = tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(out), "--epochs", "2", "--val-every", "1",
                       "--test-scenes", "demo_02", "--val-scenes", "demo_01", *FAST]) == 0
    curve = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_psnr"]) for r in curve if "val_psnr" in r]
    ckpt = train.load_checkpoint(str(out / "last.pt"))
    assert [s for s, _ in curve] == list(range(ckpt["step"] + 1))
    cfg, srf = train.TrainConfig(**ckpt["train_config"]), torch.from_numpy(data.srf_matrix())
    val = {"demo_01": np.load(root / "demo_01.npy")}
    torch.manual_seed(cfg.seed)
    untrained = P.DyProMamba(P.Config(**ckpt["model_config"]))
    for model, (_, psnr) in ((untrained, curve[0]), (train.build_model(ckpt, torch.device("cpu")), curve[-1])):
        model.to(memory_format=torch.channels_last)  # as fit trains and validates (the layout changes the rounding)
        assert train.validate(model, val, srf, cfg, ckpt["gamma"], "gamma") == pytest.approx(psnr, abs=1e-9)


def test_ema_is_the_decayed_average_of_the_weights():
    torch.manual_seed(0)
    ema, model = P.DyProMamba(P.Config()), P.DyProMamba(P.Config())
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    train.update_ema(ema, model, 0.75)
    for k, v in ema.state_dict().items():  # ema <- 0.75 ema + 0.25 model
        torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * model.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_eval_builds_the_weight_average_when_the_run_kept_one(tmp_path):
    root = _demo_dir(tmp_path)
    assert train.main(["fit", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--ema", "0.5",
                       "--test-scenes", "demo_02", *FAST]) == 0
    ckpt = train.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    built = train.build_model(ckpt, torch.device("cpu")).state_dict()
    assert all(torch.equal(built[k], ckpt["ema"][k]) for k in built)


def test_label_sets_are_fixed_counted_and_drawn_only_from_training_scenes(tmp_path):
    """The checkpoint's label sets: one per training scene (none for test or validation scenes), the
    promised count, the seeded draw, the scene's own spectra; and Gamma(alpha, theta) is the moment fit of
    those labelled spectra alone (not of every training spectrum, which the run must not read)."""
    root = _demo_dir(tmp_path)
    out = tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(out), "--epochs", "1", "--label-ratio", "0.01",
                       "--test-scenes", "demo_02", "--val-scenes", "demo_01", *FAST]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert set(ckpt["labels"]) == {"demo_00"} and ckpt["split"]["test"] == ["demo_02"]
    coords = ckpt["labels"]["demo_00"]["coords"].numpy()
    assert len(coords) == max(1, int(0.01 * 48 * 48))
    np.testing.assert_array_equal(coords, data.draw_label_set(48, 48, 0.01, data.scene_seed(0, "demo_00")))
    cube = np.load(root / "demo_00.npy")
    np.testing.assert_allclose(ckpt["labels"]["demo_00"]["spectra"].numpy(), cube[coords[:, 0], coords[:, 1]])
    labelled = cube[coords[:, 0], coords[:, 1]].astype(np.float64)
    m, v = labelled.mean(), labelled.var()
    assert ckpt["gamma"] == pytest.approx([m * m / v, v / m], rel=1e-9)
    assert (out / "best.pt").is_file()  # validation scenes choose best.pt


def _coded_demo_dir(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three 48 x 48 demo scenes whose bands 0, 1 and 2 say which pixel a spectrum came from: (row + 1) / 256,
    (col + 1) / 256 and (scene + 1) / 16, exact in float32, so that a labelled spectrum names its origin after
    any crop, flip or rotation."""
    cubes = {}
    for i, (name, cube) in enumerate(data.demo_scenes(n=3, size=64)):
        cube = cube[:48, :48].copy()
        cube[..., 0] = (np.arange(48)[:, None] + 1) / 256
        cube[..., 1] = (np.arange(48)[None, :] + 1) / 256
        cube[..., 2] = (i + 1) / 16
        cubes[name] = cube
    return _scene_dir(tmp_path, cubes), cubes


def _loss_input_spy(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Records (rgb, target, mask) of every call of P.pixel_ssr_loss, passing the call through unchanged."""
    calls, real_loss = [], P.pixel_ssr_loss

    def spy(*a, **k):
        calls.append(tuple(t.detach().cpu().clone() for t in (a[1], a[4], a[5])))
        return real_loss(*a, **k)

    monkeypatch.setattr(P, "pixel_ssr_loss", spy)
    return calls


def _spied_fit(tmp_path, monkeypatch, ratio: str) -> tuple[Path, Path, dict, list]:
    """One epoch on the demo crops at --label-ratio ratio, the loss's inputs recorded: (data folder, run
    folder, its last.pt, the loss calls)."""
    root, out = _demo_dir(tmp_path), tmp_path / "run"
    calls = _loss_input_spy(monkeypatch)
    assert train.main(["fit", "--data", str(root), "--out", str(out), "--epochs", "1", "--label-ratio", ratio,
                       "--test-scenes", "demo_02", *FAST]) == 0
    return root, out, torch.load(out / "last.pt", weights_only=True), calls


def test_the_loss_sees_only_the_runs_fixed_labelled_pixels_in_every_epoch(tmp_path, monkeypatch):
    """Over two epochs, every pixel the loss is told is labelled (its mask) carries the spectrum of a pixel of
    the fixed label set saved in the checkpoint, and only that pixel's own spectrum; so the labelled pixels
    seen never grow beyond that set, wherever the patches fall. Tested through the training loop with a spy
    on the loss's inputs. Guards against label sets redrawn every epoch (seeded with the epoch), which over
    the epochs leaks the whole image; one epoch, or a resume that replays the redraw, cannot show it."""
    root, cubes = _coded_demo_dir(tmp_path)
    calls = _loss_input_spy(monkeypatch)
    out = tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(out), "--epochs", "2", "--label-ratio", "0.01",
                       "--test-scenes", "demo_02", *FAST]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert len(calls) == ckpt["step"] >= 2
    fixed = {(name, r, c) for name, v in ckpt["labels"].items() for r, c in v["coords"].tolist()}
    assert set(ckpt["labels"]) == {"demo_00", "demo_01"}
    assert all(len(v["coords"]) == data.label_count(48, 48, 0.01) for v in ckpt["labels"].values())
    seen = set()
    for _, target, mask in calls:
        for i, _, y, x in torch.nonzero(mask).tolist():
            spectrum = target[i, :, y, x].numpy()
            r, c, scene = (int(round(float(v))) - 1 for v in spectrum[:3] * (256, 256, 16))
            name = f"demo_{scene:02d}"
            assert (name, r, c) in fixed, f"{name} pixel {(r, c)} is not in the run's label set"
            np.testing.assert_array_equal(spectrum, cubes[name][r, c])  # that pixel's own spectrum, whole
            seen.add((name, r, c))
    assert seen  # and the loss did see labels


def test_unsupervised_mode_has_no_labels_and_fits_gamma_to_the_rgb(tmp_path, monkeypatch):
    """omega = 0: no label set, the loss never sees a labelled pixel, and Gamma(alpha, theta) is the
    method-of-moments fit of the training scenes' RGB values (computed here in numpy from the cubes), not of
    their spectra. Guards against the unsupervised Gamma fitted to the hidden training spectra, which the
    unsupervised mode must never read (a check that alpha, theta are finite and positive accepts it)."""
    root, out, ckpt, calls = _spied_fit(tmp_path, monkeypatch, "0")
    assert all(len(v["coords"]) == 0 for v in ckpt["labels"].values())
    assert calls and not any(mask.any() for _, _, mask in calls)
    s = data.srf_matrix().astype(np.float64)
    rgb = np.concatenate([(np.load(root / f"{n}.npy").astype(np.float64) @ s.T).ravel() for n in ("demo_00", "demo_01")])
    m, v = rgb.mean(), rgb.var()
    assert ckpt["gamma"] == pytest.approx([m * m / v, v / m], rel=1e-5)


def _real_crops(tmp_path):
    cave = DATA / "cave"
    crops = {n: data.load_scene(cave / f)[100:164, 200:264] for n, f in
             [("paints", "paints_ms"), ("sponges", "sponges_ms"), ("balloons", "balloons_ms.mat"),
              ("fake_and_real_sushi", "fake_and_real_sushi_ms")]}
    return _scene_dir(tmp_path, crops)


_REAL_TEST = "fake_and_real_sushi"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One short fit on 64 x 64 real crops (three training scenes, 1 % labels, fake_and_real_sushi to test),
    then its eval over two Gamma seeds, with spies recording every point cube eval draws and the inputs of
    every root-polynomial fit; the tests below read the run, the report and what the spies saw."""
    tmp = tmp_path_factory.mktemp("real_run")
    root = _real_crops(tmp)
    run, ev = tmp / "run", tmp / "eval"
    fit_args = ["fit", "--data", str(root), "--epochs", "1", "--label-ratio", "0.01", "--test-scenes", _REAL_TEST,
                "--device", "cpu", *FAST]
    assert train.main(fit_args + ["--out", str(run)]) == 0
    points, root_poly = [], []
    real_points, real_fit = P.sample_points, train.fit_root_poly

    def points_spy(*a, **k):
        out = real_points(*a, **k)
        points.append(out.detach().cpu().clone())
        return out

    def fit_spy(*a, **k):
        root_poly.append(tuple(np.array(x, copy=True) for x in a[:2]))
        return real_fit(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "sample_points", points_spy)
        mp.setattr(train, "fit_root_poly", fit_spy)
        assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--data", str(root), "--out", str(ev),
                           "--seeds", "2"]) == 0
    return SimpleNamespace(root=root, run=run, eval=ev, report=json.loads((ev / "metrics.json").read_text()),
                           ckpt=torch.load(run / "last.pt", weights_only=True), points=points, root_poly=root_poly,
                           fit_args=fit_args)


def _real_label_count(run) -> int:
    """max(1, floor(omega.H.W)) summed over the run's training scenes (balloons' crop is 64 x 56)."""
    return sum(data.label_count(*np.load(run.root / f"{n}.npy").shape[:2], 0.01) for n in run.ckpt["split"]["train"])


def _scene_points(cubes: list[torch.Tensor], hw: tuple[int, int]) -> list[torch.Tensor]:
    """The point cubes drawn for an image of size hw, in the order drawn."""
    return [c for c in cubes if tuple(c.shape[-2:]) == hw]


@needs_data
def test_fit_eval_predict_end_to_end_on_real_crops(real_run, tmp_path):
    run, ev, pr, report = real_run.run, real_run.eval, tmp_path / "pred", real_run.report
    assert list(report["scenes"]) == [_REAL_TEST] and report["seeds"] == [0, 1]
    assert {"rmse", "psnr", "psnr_bandwise", "ssim", "sam", "mrae"} <= set(report["overall"])
    assert set(real_run.ckpt) == set(train.CHECKPOINT_KEYS)
    assert "root_poly_baseline" in report  # 115 labelled pixels in 3 scenes: enough to fit it
    cube = data.load_scene(ev / _REAL_TEST / "cube.mat")
    np.testing.assert_allclose(cube, np.load(ev / _REAL_TEST / "cube.npy"))
    assert cube.shape == (64, 64, 31)
    assert scipy.io.loadmat(ev / _REAL_TEST / "cube.mat")["wavelengths"].size == 31
    for f in ("preview.png", "error_rmse_0-0.1.png", "spectra.csv"):
        assert (ev / _REAL_TEST / f).is_file()
    assert train.main(["predict", "--ckpt", str(run / "last.pt"), "--rgb", str(ev / _REAL_TEST / "preview.png"),
                       "--out", str(pr), "--tile", "48"]) == 0
    assert np.load(pr / "cube.npy").shape == (64, 64, 31)


@needs_data
def test_eval_reports_the_metrics_of_its_reconstructions_for_each_seed(real_run):
    """The per-scene and overall mean and std in metrics.json are those, over the seeds, of the metrics
    (independent numpy code) of the checkpoint's network run on the scene's RGB and the point cube eval
    drew for each seed; cube.npy is seed 0's reconstruction; the label count is the run's. Guards against
    reported numbers that are not the reconstruction's (e.g. metrics swapped between keys, a spread over
    the wrong axis), which a check of files and keys lets through."""
    truth = np.load(real_run.root / f"{_REAL_TEST}.npy")
    target = torch.from_numpy(truth).permute(2, 0, 1)
    srf = data.srf_matrix(real_run.ckpt["train_config"]["srf"])
    rgb = data.rgb_from_hsi(target[None], srf)
    model = P.DyProMamba(P.Config(**real_run.ckpt["model_config"]))
    model.load_state_dict(real_run.ckpt["model"])
    cubes = _scene_points(real_run.points, truth.shape[:2])
    assert len(cubes) == 2  # one per seed
    with torch.no_grad():
        preds = [model.eval()(rgb, c.reshape(1, 31, *truth.shape[:2]))[0][0].clamp(0, 1) for c in cubes]
    per_seed = [_np_metrics(p.double().numpy(), target.double().numpy()) for p in preds]
    report = real_run.report
    for k in per_seed[0]:
        values = [m[k] for m in per_seed]
        for where, summary in (("scene", report["scenes"][_REAL_TEST][k]), ("overall", report["overall"][k])):
            assert summary["mean"] == pytest.approx(np.mean(values), rel=1e-9), (where, k)
            assert summary["std"] == pytest.approx(np.std(values), rel=1e-6, abs=1e-9 * abs(np.mean(values))), (where, k)
    np.testing.assert_array_equal(np.load(real_run.eval / _REAL_TEST / "cube.npy"), preds[0].permute(1, 2, 0).numpy())
    assert report["labelled_pixels"] == sum(len(v["coords"]) for v in real_run.ckpt["labels"].values()) == \
        _real_label_count(real_run)


@needs_data
def test_eval_draws_a_different_point_cube_for_each_seed_and_the_same_for_the_same_seed(real_run, tmp_path,
                                                                                        monkeypatch):
    """Eval's point cubes differ from seed to seed (so the reported std is the spread the Gamma draws cause)
    and a seed gives the same cube again in another eval. Guards against eval ignoring its Gamma seed:
    every seed then gives the same cube, and the spread reported over seeds is 0."""
    hw = (64, 64)
    cubes = _scene_points(real_run.points, hw)
    assert len(cubes) == 2
    assert not torch.equal(cubes[0], cubes[1]), "seeds 0 and 1 drew the same point cube"
    assert real_run.report["scenes"][_REAL_TEST]["psnr"]["std"] > 0
    again, real_points = [], P.sample_points
    monkeypatch.setattr(P, "sample_points", lambda *a, **k: again.append(real_points(*a, **k)) or again[-1])
    assert train.main(["eval", "--ckpt", str(real_run.run / "last.pt"), "--data", str(real_run.root),
                       "--out", str(tmp_path / "again"), "--seeds", "1"]) == 0
    assert [torch.equal(c, cubes[0]) for c in _scene_points(again, hw)] == [True]


@needs_data
def test_root_poly_baseline_is_fitted_on_the_runs_labelled_pixels_only(real_run):
    """Eval fits the root-polynomial baseline on exactly the labelled pixels of the run (their spectra, read
    here from the scenes at the checkpoint's coordinates, and their own RGB), and the baseline numbers it
    reports are those of that fit applied to the test scene's RGB (numpy metrics). Guards against the
    baseline fitted on the test scene's own spectra, which makes the floor the network must beat look
    like image-level supervision."""
    ckpt = real_run.ckpt
    s = data.srf_matrix(ckpt["train_config"]["srf"])
    lab_spec = np.concatenate([np.load(real_run.root / f"{name}.npy")[c[:, 0], c[:, 1]]
                               for name, c in ((n, v["coords"].numpy()) for n, v in ckpt["labels"].items())])
    assert len(lab_spec) == _real_label_count(real_run) and real_run.root_poly, "the baseline was never fitted"
    for rgb, spectra in real_run.root_poly:
        same = sorted(map(tuple, spectra.tolist())) == sorted(map(tuple, lab_spec.tolist()))
        assert same, f"fitted on {len(spectra)} spectra that are not the run's {len(lab_spec)} labelled ones"
        np.testing.assert_allclose(rgb, spectra @ s.T, rtol=1e-5, atol=1e-7)  # each pixel's own RGB
    weights = train.fit_root_poly(lab_spec @ s.T, lab_spec)
    truth = np.load(real_run.root / f"{_REAL_TEST}.npy").astype(np.float64)
    base = train.root_poly_features((truth @ s.T).reshape(-1, 3)) @ weights
    expected = _np_metrics(base.reshape(truth.shape).transpose(2, 0, 1), truth.transpose(2, 0, 1))
    report = real_run.report
    for k, v in expected.items():
        assert report["scenes"][_REAL_TEST]["root_poly_baseline"][k] == pytest.approx(v, rel=1e-6), k
        assert report["root_poly_baseline"][k]["mean"] == pytest.approx(v, rel=1e-6), k


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve (IEC 61966-2-1), written here independently of data.srgb_to_linear."""
    linear = np.clip(linear, 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


@needs_data
def test_an_8bit_srgb_photo_of_a_scene_decodes_to_the_models_rgb_of_that_scene(tmp_path):
    """A white-balanced camera's 8-bit sRGB PNG of a real scene (CIE 1931 XYZ through the sRGB primaries,
    white at (1, 1, 1), gamma-encoded) reads back, under the CIE 1931 response, as that scene's S.Y to
    within the 8-bit quantisation. Guards against feeding gamma-encoded values or sRGB primaries as S.Y."""
    truth = data.load_scene(DATA / "cave" / "fake_and_real_sushi_ms")[200:240:2, 180:240:2].astype(np.float64)
    xyz = truth @ np.array(data.SRF_TABLES["cie1931"]).clip(0)
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    white = m @ np.array(data.SRF_TABLES["cie1931"]).clip(0).sum(0)
    srgb = xyz @ m.T / white
    Image.fromarray(np.round(_srgb_encode(srgb) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    rgb, kind, clipped = train.photo_rgb(str(tmp_path / "photo.png"), "auto", "cie1931")
    expected = truth @ data.srf_matrix("cie1931").T
    in_gamut = (srgb >= 0).all(-1)  # sRGB cannot hold the most saturated colours: a camera clips them too
    assert kind == "srgb" and clipped == 0 and in_gamut.mean() > 0.5
    np.testing.assert_allclose(rgb[in_gamut], expected[in_gamut], rtol=1e-2, atol=1e-3)  # half an 8-bit step


def test_exposure_brings_the_photo_mean_to_the_training_mean_unless_its_highlights_would_pass_one():
    train_rgb = np.full((10, 3), 0.2, np.float32)
    dark = np.full((8, 8, 3), 0.05, np.float32)
    gain, why = train.exposure_gain(dark, train_rgb)
    assert gain == pytest.approx(4) and "0.2000" in why
    dark[0, 0] = 0.5  # one pixel in 64 is brighter than the 99.9th percentile allows at x4
    gain, why = train.exposure_gain(dark, train_rgb)
    assert gain * np.percentile(dark, 99.9) == pytest.approx(1) and "held back" in why


def test_photo_warnings_name_clipped_highlights_and_a_colour_cast():
    train_rgb = np.full((10, 3), 0.3, np.float32)
    grey, cast = np.full((4, 4, 3), 0.3, np.float32), np.full((4, 4, 3), [0.5, 0.3, 0.1], np.float32)
    assert train.photo_warnings(grey, 0.0, train_rgb) == []
    clipped, = train.photo_warnings(grey, 0.05, train_rgb)
    balance, = train.photo_warnings(cast, 0.0, train_rgb)
    assert "5.0 % of the pixels are clipped" in clipped and "channel balance" in balance


def _predict(real_run, image: Path, out: Path, *extra: str) -> np.ndarray:
    assert train.main(["predict", "--ckpt", str(real_run.run / "last.pt"), "--rgb", str(image), "--out", str(out),
                       *extra]) == 0
    return np.load(out / "cube.npy")


@needs_data
def test_predict_on_a_16_bit_linear_png_gives_evals_cube(real_run, tmp_path):
    """By default predict runs a 16-bit PNG of the test scene's RGB whole, as linear S.Y at its own
    exposure, with eval's seed-0 point cube: eval's cube, to within the PNG's 16-bit quantisation."""
    truth = np.load(real_run.root / f"{_REAL_TEST}.npy")
    rgb = truth @ data.srf_matrix(real_run.ckpt["train_config"]["srf"]).T
    _write_png16(tmp_path / "rgb16.png", np.round(rgb * 65535).astype(np.uint16))
    cube = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "pred")
    np.testing.assert_allclose(cube, np.load(real_run.eval / _REAL_TEST / "cube.npy"), atol=1e-3)


@needs_data
def test_predict_reads_an_odd_sized_rgba_png_as_its_rgb_and_writes_envi(real_run, tmp_path):
    rgb = np.load(real_run.root / f"{_REAL_TEST}.npy")[:23, :37] @ data.srf_matrix("cie1964").T
    rgb8 = np.round(_srgb_encode(rgb) * 255).astype(np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb8, np.full(rgb8.shape[:2], 90, np.uint8)])).save(tmp_path / "rgba.png")
    with_alpha = _predict(real_run, tmp_path / "rgba.png", tmp_path / "a", "--envi")
    assert with_alpha.shape == (23, 37, 31)
    np.testing.assert_array_equal(with_alpha, _predict(real_run, tmp_path / "rgb.png", tmp_path / "b"))
    np.testing.assert_array_equal(_read_envi(tmp_path / "a" / "cube.hdr")[1], with_alpha)


@needs_data
def test_predict_on_an_8bit_srgb_jpeg_prints_its_input_exposure_and_warnings(real_run, tmp_path, capsys):
    rgb = np.load(real_run.root / f"{_REAL_TEST}.npy") @ data.srf_matrix("cie1964").T
    photo = np.round(_srgb_encode(rgb * 60) * 255).astype(np.uint8)  # overexposed: about half the pixels clip
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    cube = _predict(real_run, tmp_path / "photo.jpg", tmp_path / "pred")
    out = capsys.readouterr().out
    assert cube.shape == (64, 64, 31) and "input: srgb" in out and "exposure: x" in out
    assert "of the pixels are clipped" in out


@needs_data
def test_tiled_and_whole_reconstructions_of_a_real_crop_agree_within_40_db(real_run):
    """Tiles of 32 (a quarter overlapping) against the whole 64 x 64 crop, with a trained checkpoint: the
    scans are global, so tiles differ, but far less than this one-epoch model's own error (16 dB): 44.6 dB
    measured; without overlap, 31.5. On fake_and_real_sushi (512 x 512, the README's checkpoint), tiles
    of 256 agreed with the whole image to 89 dB, max difference 0.0017."""
    truth = torch.from_numpy(np.load(real_run.root / f"{_REAL_TEST}.npy")).permute(2, 0, 1)
    model = train.build_model(real_run.ckpt, torch.device("cpu"))
    rgb = data.rgb_from_hsi(truth, data.srf_matrix(real_run.ckpt["train_config"]["srf"]))
    pts = P.sample_points((1, *truth.shape), 0.01, *real_run.ckpt["gamma"], generator=train.seeded(0))[0]
    whole = train.reconstruct(model, rgb, pts).clamp(0, 1)
    tiled = train.reconstruct(model, rgb, pts, tile=32).clamp(0, 1)
    assert P.psnr(tiled, whole) > 40 > P.psnr(whole, truth)


@pytest.mark.parametrize("line,words", [("3,4," + ",".join(["0.5"] * 30), "line 2 has 32 values"),
                                        ("3,x," + ",".join(["0.5"] * 31), "line 2 holds something"),
                                        ("3,9," + ",".join(["0.5"] * 31), "pixel (3, 9)"),
                                        ("3,4," + ",".join(["-0.5"] * 31), "negative")])
def test_points_file_errors_name_the_file_and_line(tmp_path, line, words):
    (tmp_path / "pts.csv").write_text("row,col," + ",".join(f"nm{n}" for n in data.WAVELENGTHS) + "\n" + line + "\n")
    with pytest.raises(data.SceneError) as e:
        data.read_points(tmp_path / "pts.csv", 6, 9)
    assert "pts.csv" in str(e.value) and words in str(e.value)


def _calibration(real_run, k: int, tmp_path: Path) -> dict:
    assert train.main(["eval", "--ckpt", str(real_run.run / "last.pt"), "--data", str(real_run.root), "--out",
                       str(tmp_path / f"k{k}"), "--seeds", "1", "--calib-points", str(k)]) == 0
    return json.loads((tmp_path / f"k{k}" / "metrics.json").read_text())["calibration"]


@needs_data
@pytest.mark.parametrize("k", [1, 2, 25])
def test_calib_points_bring_the_unmeasured_pixels_closer_to_the_truth(real_run, tmp_path, k):
    """eval --calib-points K on a real crop: the cube corrected with K true spectra is closer to the truth
    (RMSE) at the pixels not measured than the network's own, with one or two points as with 25. (With this
    one-epoch model, 16 dB, one or two points raise the SAM from 48 to 53 degrees while the RMSE halves.)"""
    cal = _calibration(real_run, k, tmp_path)
    assert cal["points"] == k
    assert cal["unmeasured"]["rmse"]["mean"] < cal["uncorrected_unmeasured"]["rmse"]["mean"]


@needs_data
def test_predict_points_keep_the_measured_spectra_and_correct_the_rest(real_run, tmp_path):
    truth = np.load(real_run.root / f"{_REAL_TEST}.npy")
    rgb = truth @ data.srf_matrix(real_run.ckpt["train_config"]["srf"]).T
    _write_png16(tmp_path / "rgb16.png", np.round(rgb * 65535).astype(np.uint16))
    coords = np.array([[5, 7], [40, 50], [60, 3]])
    with open(tmp_path / "pts.csv", "w") as f:
        f.writelines(",".join(map(str, [r, c, *truth[r, c]])) + "\n" for r, c in coords)
    plain = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "plain")
    fixed = _predict(real_run, tmp_path / "rgb16.png", tmp_path / "fixed", "--points", str(tmp_path / "pts.csv"))
    np.testing.assert_allclose(fixed[coords[:, 0], coords[:, 1]], truth[coords[:, 0], coords[:, 1]], rtol=1e-6)
    keep = np.ones(truth.shape[:2], bool)
    keep[coords[:, 0], coords[:, 1]] = False
    assert np.abs(fixed - truth)[keep].mean() < np.abs(plain - truth)[keep].mean()


# ---- data-parallel training (torchrun) and bf16 autocast ----

def _log_losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@needs_data
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_gloo_processes_train_the_weights_of_one_process(real_run, tmp_path):
    """`torchrun --nproc_per_node 2 train.py fit` on CPU (gloo) with real_run's settings (6 steps of batch 2,
    one sample per process, 1 % labels spread unevenly among the patches): rank 0 logs the same steps and
    whole-batch loss terms as the single process, and ends with its weights up to float rounding, which
    Adam magnifies where a gradient is near 0 (2.3e-6 measured; L_pHSI averaged per process: 7e-4)."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *real_run.fit_args, "--out", str(out)], cwd=Path(__file__).parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training on") == 1  # rank 0 alone prints (and writes)
    one, two = _log_losses(real_run.run), _log_losses(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for r1, r2 in zip(one, two):
        assert {k: r2[k] for k in r1} == pytest.approx(r1, rel=1e-5)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == real_run.ckpt["step"]
    diff = max((ckpt["model"][k] - v).abs().max().item() for k, v in real_run.ckpt["model"].items())
    assert diff < train.TrainConfig().lr / 10, f"largest weight difference {diff:.3g}"


def test_the_slices_shares_add_up_to_the_whole_batchs_loss_terms_and_gradient():
    """A batch of 4 split among 3 ranks (slices of 1, 1 and 2 samples) with its labelled pixels spread
    unevenly (0, 1 and 7): the slices' shares of each term add up to the whole batch's term, and their
    gradients to its gradient. Guards against per-slice means averaged over the ranks, which would weigh
    each label by 1 / its slice's label count (and the slices by 1 / their number, whatever their size)."""
    m = _model()
    rgb, pts = _inputs(4, 8, 8)
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    mask[1, 0, 2, 3] = mask[2, 0, :2, :2] = mask[3, 0, 5, 1:4] = True
    target = torch.rand(4, 31, 8, 8, generator=torch.Generator().manual_seed(1)) * mask
    batch, srf, w = (rgb, target, mask), torch.from_numpy(data.srf_matrix()), P.LOSS_WEIGHTS
    parts = [train.Ranks(r, 3).part(4) for r in range(3)]
    assert parts == [slice(0, 1), slice(1, 2), slice(2, 4)]

    def terms_and_grads(part: slice):
        terms = train.slice_loss(m, batch, pts, srf, w, part)
        return terms, torch.autograd.grad(sum(w[k] * v for k, v in terms.items()), list(m.parameters()))

    whole, whole_grads = terms_and_grads(slice(0, 4))
    sliced = [terms_and_grads(part) for part in parts]
    for k, v in whole.items():
        assert sum(t[k] for t, _ in sliced).item() == pytest.approx(v.item(), rel=1e-6), k
    scale = max(g.abs().max().item() for g in whole_grads)
    for i, g in enumerate(whole_grads):
        _assert_close(sum(grads[i] for _, grads in sliced), g, 1e-5, f"gradient {i}", scale=scale)


def test_scan_and_frft_keep_float32_under_bf16_autocast():
    """Under CPU bfloat16 autocast the selective scan (y, last state, every gradient) and frft2 (real and
    complex input) give exactly their float32 results. Guards against their matrix products (which autocast
    casts) running in bfloat16, whose 8 significant bits lose the slow channels' decay and the FRFT's
    invertibility (see train.autocast)."""
    case = dict(seed=0, b=2, dg=3, g=2, grouped=True, n=4, l=37, chunk=8, dtype=torch.float32, softplus=True,
                D=True, z=True, delta_bias=True)
    inputs = _scan_inputs(case)
    plain = _scan_with_grads(selective_scan, inputs, True, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _scan_with_grads(selective_scan, inputs, True, chunk_size=8)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], plain[1])
    assert all(torch.equal(mixed[2][k], plain[2][k]) for k in plain[2])
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    for z in (x, torch.complex(x, x.flip(-1))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = frft.frft2(z, 0.3, -0.7)
        assert torch.equal(mixed, frft.frft2(z, 0.3, -0.7))


def test_ss2d_delta_is_float32_under_bf16_autocast():
    """SS2D's Δ = softplus(dt_proj(dts) + bias) is its float32 value under CPU bfloat16 autocast: in
    bfloat16 a bias near -7 (Δ ~ 1e-3) would move Δ by ~3 %, and exp(Δ·A) with it."""
    torch.manual_seed(0)
    m = SS2D(8, d_state=2, expand=2)
    dts = torch.randn(2, 5, 4 * m.R).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.delta(dts)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, m.delta(dts.float()))
    seen = []  # and it is this Δ that the block's forward hands the scan
    with mock.patch.object(ssm, "selective_scan", lambda u, delta, *a, **k: seen.append(delta.dtype) or u), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(1, 8, 3, 4))
    assert seen == [torch.float32]


def test_bf16_training_step_runs_the_network_in_bf16_and_the_losses_and_weights_in_float32(monkeypatch):
    """train_step(amp="bf16") on CPU: the network's convolutions ran in bfloat16, the losses saw float32
    outputs with autocast off, and the weights (what checkpoints save) are float32 after the Adam step."""
    m = _model()
    rgb, pts = _inputs(2, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, 0, 3, 4] = True
    batch = (rgb, torch.rand(2, 31, 8, 8) * mask, mask)
    seen, real_loss = {}, P.pixel_ssr_loss
    m.body.out.register_forward_hook(lambda mod, inp, out: seen.__setitem__("conv", out.dtype))

    def loss_spy(model, rgb, hsi, y3, *a, **k):
        seen["loss"] = (hsi.dtype, y3.dtype, torch.is_autocast_enabled("cpu"))
        return real_loss(model, rgb, hsi, y3, *a, **k)

    monkeypatch.setattr(P, "pixel_ssr_loss", loss_spy)
    before = copy.deepcopy(m.state_dict())
    loss, _ = train.train_step(m, torch.optim.Adam(m.parameters()), batch, pts, torch.from_numpy(data.srf_matrix()),
                               1e-3, P.LOSS_WEIGHTS, amp="bf16")
    assert torch.isfinite(loss) and seen["conv"] == torch.bfloat16
    assert seen["loss"] == (torch.float32, torch.float32, False)
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    assert not torch.equal(m.body.out.weight, before["body.out.weight"])  # the step was taken


def test_reconstruct_runs_an_image_that_fits_one_tile_whole():
    m = _model().eval()
    rgb, pts = torch.rand(3, 40, 52), torch.zeros(31, 40, 52)
    assert torch.equal(train.reconstruct(m, rgb, pts, tile=64), train.reconstruct(m, rgb, pts))


class _PixelwiseModel(torch.nn.Module):
    """A stand-in network whose output at a pixel depends on that pixel's input alone: tiling must not
    change its result, wherever the tiles fall and however they are blended."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3 + 31, 31, 1)

    def forward(self, rgb: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.mix(torch.cat([rgb, points], 1))
        return y, y


@pytest.mark.parametrize("tile,overlap", [(24, 8), (16, 32), (7, 2)])  # 16: below the default overlap
def test_tiled_reconstruction_equals_whole_for_a_pixelwise_model(tile, overlap):
    torch.manual_seed(0)
    m = _PixelwiseModel()
    rgb, pts = torch.rand(3, 40, 53), torch.rand(31, 40, 53)
    with torch.no_grad():
        torch.testing.assert_close(train.reconstruct(m, rgb, pts, tile, overlap), train.reconstruct(m, rgb, pts))


@pytest.mark.parametrize("argv,words", [
    (["fit", "--data", "/no/such/folder", "--out", "{tmp}/r"], "/no/such/folder"),
    (["eval", "--ckpt", "{tmp}/missing.pt"], "missing.pt"),
    (["predict", "--ckpt", "{tmp}/bad.pt", "--rgb", "x.png"], "bad.pt"),
    (["fit", "--data", "{tmp}/nan", "--out", "{tmp}/r"], "nan_scene.npy"),
    (["eval", "--ckpt", "{tmp}/foreign.pt"], "foreign.pt"),
    (["fit", "--out", "{tmp}/r", "--test-scenes", "no_such_scene"], "no_such_scene"),
    (["fit", "--out", "{tmp}/r", "--device", "cuda:7"], "cuda:7"),
    (["fit", "--out", "{tmp}/r", "--loss-weights", "phsi=1,sim=0.3"], "'sim'"),
    (["fit", "--out", "{tmp}/r", "--exposure", "0.5"], "--exposure"),
])
def test_bad_input_gives_one_sentence_naming_the_file_and_no_traceback(tmp_path, capsys, argv, words):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "nan").mkdir()
    cube = np.full((40, 40, 31), 0.5, np.float32)
    cube[3, 4, 5] = np.nan
    np.save(tmp_path / "nan" / "nan_scene.npy", cube)
    assert train.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["eval", "--ckpt", "x.pt", "--seeds", "0"], ["fit", "--batch-size", "0"],
                                  ["fit", "--stride", "-4"]])
def test_non_positive_counts_are_refused_by_the_command_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and "not a positive integer" in capsys.readouterr().err


def test_overall_spread_is_over_seeds_not_over_scenes():
    # two scenes 10 dB apart, each moved by the seed: +-0.5 dB together (seed 0 low, seed 1 high)
    by_scene = [[{"psnr": 29.5}, {"psnr": 30.5}], [{"psnr": 39.5}, {"psnr": 40.5}]]
    overall = train.summarise_over_seeds(by_scene)["psnr"]
    assert overall["mean"] == pytest.approx(35.0) and overall["std"] == pytest.approx(0.5)


def test_root_polynomial_regression_is_exact_on_spectra_it_can_represent():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.05, 1, (50, 3))
    W = rng.standard_normal((6, 31))
    spectra = train.root_poly_features(rgb) @ W
    np.testing.assert_allclose(train.fit_root_poly(rgb, spectra, ridge=0), W, rtol=1e-6, atol=1e-8)
    f = train.root_poly_features(rgb * 2.5)  # root-polynomial terms scale with exposure
    np.testing.assert_allclose(f, 2.5 * train.root_poly_features(rgb), rtol=1e-12)


def test_learning_rate_decays_polynomially_to_zero():
    cfg = train.TrainConfig()
    assert train.get_lr(0, 100, cfg) == cfg.lr and train.get_lr(100, 100, cfg) == 0
    assert train.get_lr(50, 100, cfg) == pytest.approx(cfg.lr * 0.5**1.5)


# ---- learning: the output layer, label-holding patches, the time budget, the band report, the prior ----

@settings(max_examples=30, deadline=None)
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


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 40), w=st.integers(8, 40), p=st.integers(4, 16), ratio=st.floats(0.003, 0.05),
       seed=st.integers(0, 2**31))
def test_label_patches_each_hold_a_fixed_labelled_pixel(h, w, p, ratio, seed):
    """Guards against label-holding patches that miss their label, leave the scene, or supervise with a
    pixel outside the fixed label set: every sample holds >= 1 labelled pixel, all of the scene's set."""
    labels = data.draw_label_set(h, w, ratio, seed)
    ds = data.PatchDataset([(_data_coord_scene(h, w), labels)], patch=p, stride=4, around_labels=True)
    g = torch.Generator().manual_seed(seed)
    _, target, mask = ds.batch(list(range(len(ds))), g)
    assert (mask.flatten(1).sum(1) >= 1).all()
    fixed = {(int(r), int(c)) for r, c in labels}
    for t, mk in zip(target, mask):
        ys, xs = torch.nonzero(mk[0], as_tuple=True)
        seen = {(round(float(t[0, y, x]) * 256) - 1, round(float(t[1, y, x]) * 256) - 1) for y, x in zip(ys, xs)}
        assert seen <= fixed


def test_label_patches_draw_every_position_that_holds_the_label():
    """Guards against a biased draw (e.g. the label always at the patch's corner): with one label, the
    patch's offset is uniform over the p x p positions that contain it."""
    ds = data.PatchDataset([(np.zeros((30, 30, 31)), [[15, 14]])], patch=4, around_labels=True)
    g = torch.Generator().manual_seed(0)
    seen = [ds.around_label(0, g) for _ in range(800)]
    assert set(seen) == {(t, l) for t in range(12, 16) for l in range(11, 15)}
    counts = np.unique([t * 100 + l for t, l in seen], return_counts=True)[1]
    assert counts.min() > 800 / 16 / 2  # each of the 16 drawn about 50 times


def test_time_budget_schedule_ends_at_the_budget(monkeypatch):
    """Guards against a --max-minutes schedule sized from the slow first steps (which stopped at 16 of 30
    minutes): steps of 2 s then 1 s in a 100 s budget end the schedule at the ~97 steps that fit."""
    clock = [0.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    budget, step, total = train.Budget(100 / 60, sized=True), 0, 10**6
    while step < total and not budget.out_of_time():
        clock[0] += 2.0 if step < 3 else 1.0
        step += 1
        total = budget.total_steps(step, step, total)
    assert total == step == 97 and clock[0] <= 100


def test_warm_up_rises_linearly_then_the_decay_takes_over():
    cfg = dataclasses.replace(train.TrainConfig(), warmup=10)
    assert train.get_lr(0, 100, cfg) == pytest.approx(cfg.lr / 10)
    assert train.get_lr(4, 100, cfg) == pytest.approx(cfg.lr / 2 * (1 - 0.04) ** 1.5)
    assert train.get_lr(50, 100, cfg) == pytest.approx(cfg.lr * 0.5 ** 1.5)


def test_exposure_augmentation_scales_rgb_and_spectra_together():
    """Guards against scaling one side only (X = S.Y broken) or a factor outside [1/k, k]."""
    hsi = torch.rand(64, 31, 4, 4)
    rgb = data.rgb_from_hsi(hsi, "cie1964")
    r2, h2 = train.augment_exposure(rgb, hsi, 2.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r2, data.rgb_from_hsi(h2, "cie1964"), rtol=1e-5, atol=1e-6)
    scale = (h2 / hsi).flatten(1)
    assert torch.allclose(scale, scale[:, :1]) and scale.min() >= 0.5 - 1e-6 and scale.max() <= 2 + 1e-6
    assert scale.std() > 0.1


def test_band_warnings_name_an_inverted_and_an_outlying_band():
    rmse = [0.04] * 31
    rmse[20] = 0.09
    mean = [0.2] * 31
    mean[8] = -0.1
    lines = train.band_warnings("sushi", {"band_rmse": rmse, "band_raw_mean": mean})
    assert len(lines) == 2 and "band 20 (600 nm)" in lines[0] and "band 8 (480 nm)" in lines[1]
    assert train.band_warnings("sushi", {"band_rmse": [0.04] * 31, "band_raw_mean": [0.2] * 31}) == []


def test_eval_reports_raw_band_means_and_warns_of_an_inverted_band(tmp_path, capsys):
    """Guards against a report that hides a dead band: eval of a run whose band 8 was flipped (paper's
    linear output) writes the raw per-band mean, negative there, and prints a warning naming it."""
    root = _demo_dir(tmp_path)
    run = tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--label-ratio", "0.01",
                       "--test-scenes", "demo_02", "--output", "linear", *FAST]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["model"]["body.out.weight"][8] = 0
    ckpt["model"]["body.out.bias"][8] = -0.2
    torch.save(ckpt, run / "last.pt")
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "ev"), "--seeds", "1"]) == 0
    bands = json.loads((tmp_path / "ev" / "metrics.json").read_text())["scenes"]["demo_02"]["bands"]
    assert bands["band_raw_mean"][8] == pytest.approx(-0.2, abs=1e-6)
    assert len(bands["band_rmse"]) == len(bands["true_mean"]) == 31
    assert "demo_02: band 8 (480 nm) has a negative raw mean" in capsys.readouterr().out


def test_rootpoly_prior_starts_at_the_baseline_fitted_on_the_runs_labels(tmp_path):
    """Guards against a prior fitted on other pixels than the run's labels, or one that the network does
    not start from: a fresh model with --prior rootpoly outputs |M(X)|, M = fit_root_poly(labels)."""
    root = _demo_dir(tmp_path)
    run = tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--label-ratio", "0.01",
                       "--test-scenes", "demo_02", "--prior", "rootpoly", "--lr", "1e-12", *FAST]) == 0
    ckpt = train.load_checkpoint(str(run / "last.pt"))
    lab = ckpt["labels"].values()
    expected = train.fit_root_poly(torch.cat([v["rgb"] for v in lab]).numpy(), torch.cat([v["spectra"] for v in lab]).numpy())
    np.testing.assert_allclose(ckpt["model"]["prior"].numpy(), expected, rtol=1e-5, atol=1e-6)
    model = train.build_model(ckpt, torch.device("cpu"))
    rgb = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        out = model(rgb, torch.zeros(1, 31, 16, 16))[0]
    base = torch.from_numpy(train.root_poly_features(rgb[0].permute(1, 2, 0).reshape(-1, 3).numpy()) @ expected)
    torch.testing.assert_close(out[0].permute(1, 2, 0).reshape(-1, 31), base.float().abs(), rtol=1e-3, atol=1e-4)


def _prior_model(backbone: str = "dypro", seed: int = 0) -> tuple[P.DyProMamba, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a small model with --prior rootpoly fitted on every pixel of a 32x32 demo scene, its RGB, its cube,
    the srf)."""
    m = _model(dataclasses.replace(SMALL, prior="rootpoly", backbone=backbone), seed)
    hsi = torch.from_numpy(data.demo_scenes(n=1, size=32)[0][1]).permute(2, 0, 1)[None]  # (1, 31, 32, 32)
    srf = torch.from_numpy(data.srf_matrix("cie1964")).float()
    rgb = torch.einsum("cn,bnhw->bchw", srf, hsi)
    flat = lambda t: t[0].permute(1, 2, 0).reshape(-1, t.shape[1]).numpy()
    m.prior.copy_(torch.from_numpy(train.fit_root_poly(flat(rgb), flat(hsi)).astype(np.float32)))
    return m, rgb, hsi, srf


@pytest.mark.parametrize("backbone", ["dypro", *backbones.BODIES])
def test_a_fresh_model_with_the_prior_outputs_the_prior_whatever_its_body(backbone):
    """Guards the start of --prior rootpoly on every body: |M(X)| exactly, whatever the body's output."""
    m, rgb, _, _ = _prior_model(backbone)
    with torch.no_grad():
        out = m(rgb, torch.zeros(1, 31, *rgb.shape[-2:]))[0]
    base = torch.einsum("fn,bfhw->bnhw", m.prior, P.root_poly_features(rgb, dim=1)).abs()
    assert torch.equal(out, base)


@settings(max_examples=6, deadline=None)
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
    P.pixel_ssr_loss(m, rgb, *m(rgb, points), hsi, mask, srf)[0].backward()
    opt.step()
    with torch.no_grad():
        after = m(rgb, points)[0]
    assert (after - before).abs().mean() < 0.01 * before.abs().mean()


def test_a_prior_run_from_before_the_gate_evaluates_as_trained_and_refuses_to_resume(tmp_path, capsys):
    """Guards old --prior checkpoints (Y^r = |M(X) + body|, no gate): eval reads them with the gate at 1,
    the form they were trained in; resume cannot continue their Adam state and says so in one sentence."""
    root, run = _demo_dir(tmp_path), tmp_path / "run"
    fit = ["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--label-ratio", "0.01",
           "--test-scenes", "demo_02", "--prior", "rootpoly", *FAST]
    assert train.main(fit) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["model"]["gate"]
    torch.save(ckpt, run / "last.pt")
    model = train.build_model(train.load_checkpoint(str(run / "last.pt")), torch.device("cpu"))
    rgb, points = _inputs(1, 16, 16)
    with torch.no_grad():
        body = model.body(rgb, *model.drpn(rgb, points))
        expected = (body + torch.einsum("fn,bfhw->bnhw", model.prior, P.root_poly_features(rgb, dim=1))).abs()
        torch.testing.assert_close(model(rgb, points)[0], expected, rtol=0, atol=1e-6)
    capsys.readouterr()
    assert train.main(fit + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "before its gate" in err and "Traceback" not in err


def test_a_checkpoint_from_before_the_output_fix_keeps_its_linear_head(tmp_path):
    """Guards against an old run silently re-read with the new defaults (|.| output, label patches):
    a checkpoint without those fields is the paper's linear head on grid patches."""
    root = _demo_dir(tmp_path)
    run = tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--test-scenes", "demo_02",
                       "--output", "linear", "--no-label-patches", *FAST]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["model_config"]["output"], ckpt["train_config"]["label_patches"]
    del ckpt["model_config"]["backbone"]  # and from before the body was a module: its weights at the top level
    ckpt["model"] = {k.removeprefix("body."): v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run / "old.pt")
    old = train.load_checkpoint(str(run / "old.pt"))
    assert old["model_config"]["output"] == "linear" and old["train_config"]["label_patches"] is False
    assert train.build_model(old, torch.device("cpu")).cfg.output == "linear"


# one fit per flag set: the switches of Tables 3-6 reach the checkpoint, and eval rebuilds that network
_FLAG_SETS = {
    "no_spa_no_prompt_ssm_gaussian": (["--no-spa", "--no-prompt-ssm", "--points", "gaussian"],
                                      {"use_spa": False, "use_prompt_ssm": False, "points": "gaussian"}),
    "no_hf_no_spe_fft_no_ssim": (["--no-hf", "--no-spe", "--spa-transform", "fft", "--loss-weights", "ssim=0"],
                                 {"use_hf": False, "use_spe": False, "spa_transform": "fft"}),
    "no_drpn": (["--no-drpn"], {"use_drpn": False, "h2r": False}),
}


@pytest.mark.parametrize("flags", _FLAG_SETS)
def test_every_fit_flag_is_saved_in_the_checkpoint_and_eval_rebuilds_that_network(flags, tmp_path, monkeypatch):
    """Each flag lands in the checkpoint's model config, the weights saved are that network's, and eval builds
    exactly that network (its parameters are the checkpoint's, strictly) and runs it. Loss weights of 0 are
    saved as given, and without the DRPN L_P2I's weight is saved as 0."""
    argv, fields = _FLAG_SETS[flags]
    root, run = _demo_dir(tmp_path), tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--test-scenes", "demo_02",
                       *FAST, *argv]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert {k: ckpt["model_config"][k] for k in fields} == fields
    weights = train.parse_weights(ckpt["train_config"]["loss_weights"])
    assert weights["ssim"] == (0 if "ssim=0" in argv else 0.3) and weights["p2i"] == (0 if "--no-drpn" in argv else 0.3)
    built = []
    monkeypatch.setattr(train, "build_model", lambda *a, _real=train.build_model: built.append(_real(*a)) or built[-1])
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "ev"), "--seeds", "1"]) == 0
    assert dataclasses.asdict(built[0].cfg) == ckpt["model_config"]
    assert built[0].state_dict().keys() == ckpt["model"].keys()


def test_resume_refuses_a_flag_that_contradicts_the_run_and_takes_a_new_time_budget(tmp_path, capsys):
    """--resume continues a run with its own settings: a new --epochs (once silently dropped), a switch or a
    loss weight that differs is one line naming the flag and exit code 2; the same values again, or a new
    --max-minutes (the session's budget), are accepted."""
    root, run = _demo_dir(tmp_path), tmp_path / "run"
    base = ["fit", "--data", str(root), "--out", str(run), "--test-scenes", "demo_02", *FAST]
    assert train.main(base + ["--epochs", "1", "--loss-weights", "ssim=0"]) == 0
    capsys.readouterr()
    for flags, named in ((["--epochs", "2"], "--epochs"), (["--no-spa"], "--no-spa"), (["--loss-weights", "ssim=0.3"],
                         "--loss-weights"), (["--test-scenes", "demo_01"], "--test-scenes")):
        assert train.main(base + ["--resume", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "contradicts" in err and "Traceback" not in err
    assert train.main(base + ["--resume", "--epochs", "1", "--loss-weights", "rep=1,ssim=0", "--max-minutes", "5"]) == 0


@needs_data
@pytest.mark.parametrize("backbone", list(backbones.BODIES))
def test_every_backbone_fits_two_steps_and_evaluates_on_a_real_crop(backbone, tmp_path):
    """With the shared DRPN, point spectra and losses: two training steps on real crops, then eval's report."""
    root, run = _real_crops(tmp_path), tmp_path / "run"
    assert train.main(["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--label-ratio", "0.01",
                       "--test-scenes", _REAL_TEST, "--patch", "16", "--stride", "64", "--batch-size", "6",
                       "--backbone", backbone]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_config"]["backbone"] == backbone
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "ev"), "--seeds", "1"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert math.isfinite(report["overall"]["psnr"]["mean"])


def test_image_level_run_keeps_the_rule_not_the_spectra_and_every_pixel_supervises(tmp_path, monkeypatch):
    """--label-ratio 1: the checkpoint holds {"every_pixel": (H, W)} per scene, not the spectra (a ~0.8 GB
    file on CAVE, rewritten every epoch); every pixel of every patch reaches L_pHSI with its own spectrum; no
    point cube by default (the paper's supervised baselines); eval re-derives the labels for its regression."""
    _, run, ckpt, calls = _spied_fit(tmp_path, monkeypatch, "1")
    assert {n: v["every_pixel"].tolist() for n, v in ckpt["labels"].items()} == {"demo_00": [48, 48], "demo_01": [48, 48]}
    assert ckpt["model_config"]["points"] == "zeros"
    assert calls and all(mask.all() for _, _, mask in calls)
    assert all(torch.equal(target, target * mask) and (target.sum(1) > 0).all() for _, target, mask in calls)
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "ev"), "--seeds", "1"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["labelled_pixels"] == 2 * 48 * 48 and "root_poly_baseline" in report


@needs_data
def test_smoothest_spectra_are_non_negative_consistent_with_the_rgb_and_no_rougher_than_the_truth():
    """The classical unsupervised answer on a real crop: every spectrum >= 0, its RGB the pixel's, and — the
    truth being one non-negative spectrum with that RGB — no rougher than the truth (sum of squared band
    differences), pixel by pixel. Guards against a solve that drops the constraint (negative values) or the
    consistency, or minimises something else."""
    hsi = data.load_scene(DATA / "cave" / "fake_and_real_sushi_ms")[200:232, 200:232].reshape(-1, 31).astype(np.float64)
    s = data.srf_matrix().astype(np.float64)
    y = train.smoothest_spectra(hsi @ s.T, s)
    rough = lambda z: np.square(np.diff(z, axis=1)).sum(1)  # noqa: E731
    assert (y >= 0).all()
    np.testing.assert_allclose(y @ s.T, hsi @ s.T, atol=1e-4)
    assert (rough(y) <= rough(hsi) + 1e-6).all()
    assert (hsi @ s.T).min() >= 0 and ((y == 0).any(1)).any()  # the constraint was active somewhere


@needs_data
def test_unsupervised_mode_trains_the_prior_and_eval_reports_the_smoothest_baseline(tmp_path, monkeypatch):
    """--label-ratio 0 on real crops: the loss has the smoothness prior (weight saved with the run), no label
    reaches it, the network's spectra are non-negative, and eval reports the smoothest-spectrum answer beside
    the network (there are no labels for a regression)."""
    root, run = _real_crops(tmp_path), tmp_path / "run"
    terms = []
    monkeypatch.setattr(P, "pixel_ssr_loss", lambda *a, _real=P.pixel_ssr_loss: terms.append(_real(*a)[1]) or _real(*a))
    assert train.main(["fit", "--data", str(root), "--out", str(run), "--epochs", "1", "--label-ratio", "0",
                       "--test-scenes", _REAL_TEST, "--patch", "16", "--stride", "64", "--batch-size", "6"]) == 0
    assert train.parse_weights(torch.load(run / "last.pt", weights_only=True)["train_config"]["loss_weights"])["smooth"] > 0
    assert terms and all("smooth" in t and t["phsi"] == 0 for t in terms)
    assert train.main(["eval", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "ev"), "--seeds", "1"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "smoothest_baseline" in report and "root_poly_baseline" not in report
    assert min(report["scenes"][_REAL_TEST]["bands"]["band_raw_mean"]) >= 0


def test_table_writes_every_row_and_a_second_call_after_an_interruption_redoes_nothing_finished(tmp_path, monkeypatch):
    """`table modes` on tiny budgets: a first call is interrupted in the second row's eval; the second call
    neither refits nor re-evaluates the first row, resumes the second row's fit (no step redone) and runs the
    third; table.md then has every row and a baseline row per label ratio, and table.json every run."""
    root, out = _demo_dir(tmp_path), tmp_path / "table"
    argv = ["table", "modes", "--data", str(root), "--out", str(out), "--test-scenes", "demo_02", "--epochs", "1", *FAST]
    fits, evals, real_fit, real_eval = [], [], train.fit, train.evaluate

    def eval_then_stop(args):
        evals.append(args.ckpt)
        if len(evals) == 2:
            raise KeyboardInterrupt
        return real_eval(args)

    monkeypatch.setattr(train, "fit", lambda args: fits.append(args) or real_fit(args))
    monkeypatch.setattr(train, "evaluate", eval_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    second = out / train.row_dir(train.TABLES["modes"][1][0]) / "seed0"
    step = torch.load(second / "last.pt", weights_only=True)["step"]
    fits.clear(), evals.clear()
    monkeypatch.setattr(train, "evaluate", lambda args: evals.append(args.ckpt) or real_eval(args))
    assert train.main(argv) == 0
    assert [f.resume for f in fits] == [True, False] and Path(fits[0].out) == second
    assert torch.load(second / "last.pt", weights_only=True)["step"] == step
    assert [Path(c).parent for c in evals] == [second, out / train.row_dir(train.TABLES["modes"][2][0]) / "seed0"]
    md = (out / "table.md").read_text()
    assert all(label in md for label, _ in train.TABLES["modes"])
    # the classical rows: unsupervised and image-level (0.01 % of a 48 x 48 scene is one pixel, too few to regress)
    assert "smoothest non-negative spectrum" in md and md.count("root-polynomial regression") == 1
    assert len(json.loads((out / "table.json").read_text())["rows"]) == 3
