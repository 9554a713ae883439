"""
Property tests of frft.py: the discrete fractional Fourier transform against its defining properties,
the centred unitary DFT, and an independent float64 construction of its eigenvectors (Candan, Kutay,
Ozaktas 2000); its gradient in the order; frft2 along height and width.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import frft
from conftest import _centred_dft, examples


# Sizes 1..96, with the edge cases (1, 2, 3) and multiples of 4 drawn often.
_frft_sizes = st.one_of(st.sampled_from([1, 2, 3, 4, 8, 12, 16, 32, 64, 96]), st.integers(1, 96))


_frft_orders = st.floats(-6, 6, allow_nan=False)


_frft_dtypes = st.sampled_from([torch.float32, torch.float64])


_frft_settings = examples(40)


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
def test_order_one_is_the_centred_unitary_dft(n, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, 1.0), _centred_dft(x)) < _FRFT_TOL[dtype]


def test_order_one_matrix_is_the_centred_dft_for_every_size_up_to_96():
    for n in range(1, 97):
        eye = torch.eye(n, dtype=torch.float64)
        assert _frft_err(frft.frft(eye, 1.0), _centred_dft(eye)) < 1e-13, n


@_frft_settings
@given(n=_frft_sizes, order=st.sampled_from([-1.0, 3.0]), dtype=_frft_dtypes, is_complex=st.booleans(),
       seed=st.integers(0, 2**31))
def test_orders_minus_one_and_three_are_the_inverse_centred_dft(n, order, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, order), _centred_dft(x, inverse=True)) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_order_two_reverses_about_the_centre(n, dtype, is_complex, seed):
    # Centred position m holds x[m - n//2]; x[t] -> x[-t] sends m to 2·(n//2) - m: a plain flip for
    # odd n, and for even n position 0 (t = -n/2 = n/2 mod n) stays while the rest flips.
    x = _frft_signal(seed, n, dtype, is_complex)
    reversed_x = x.flip(-1) if n % 2 else torch.cat([x[:, :1], x[:, 1:].flip(-1)], -1)
    assert _frft_err(frft.frft(x, 2.0), reversed_x) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_order_zero_is_the_identity(n, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, 0.0), x) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_fractional_order_matches_an_independent_float64_computation(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    ref = x.to(torch.complex128) @ torch.from_numpy(_frft_reference_matrix(n, a)).T
    assert _frft_err(frft.frft(x, a), ref) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_derivative_wrt_order_matches_the_analytic_one(n, a, is_complex, seed):
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


def test_passes_gradcheck_in_x_and_order():
    x = torch.randn(2, 7, dtype=torch.complex128, requires_grad=True)
    a = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: frft.frft2(x, a, 2 * a), (x, a))


@examples(20)
@given(n=_frft_sizes)
def test_grunbaum_matrix_commutes_with_the_dft(n):
    s = frft._grunbaum(n).to(torch.complex128)
    dft = torch.fft.fft(torch.eye(n, dtype=torch.complex128), dim=0, norm="ortho")
    assert (dft @ s - s @ dft).abs().max() < 1e-12 * max(1.0, s.abs().max().item())


@examples(20)
@given(n=_frft_sizes)
def test_basis_vector_of_order_k_has_parity_minus_one_to_the_k(n):
    v, k = frft._basis(n)
    centre = n // 2
    reversal = (2 * centre - torch.arange(n)) % n  # centred position of -t
    assert torch.allclose(v[reversal], v * (-1.0) ** k, atol=1e-13)


@examples(20)
@given(n=_frft_sizes)
def test_basis_vector_of_order_k_is_a_dft_eigenvector_with_eigenvalue_minus_i_to_the_k(n):
    v, k = frft._basis(n)
    v = v.to(torch.complex128)
    dft_v = _centred_dft(v.T).T
    assert (dft_v - v * (-1j) ** k).abs().max() < 1e-12


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, b=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(),
       seed=st.integers(0, 2**31))
def test_orders_add(n, a, b, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(frft.frft(x, a), b), frft.frft(x, a + b)) < 2 * _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_negative_order_inverts(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(frft.frft(x, a), -a), x) < 2 * _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes)
def test_is_unitary(n, a, dtype):
    m = frft.frft(torch.eye(n, dtype=dtype), a)
    assert _frft_err(m @ m.mH, torch.eye(n, dtype=m.dtype)) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_has_period_four(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    assert _frft_err(frft.frft(x, a + 4), frft.frft(x, a)) < _FRFT_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_full_precision_at_orders_in_the_millions(dtype):
    """F^(4e6 + 1/2) = F^(1/2) to the dtype's full precision. Guards against the phase a·k not reduced mod 4
    in float64 before the exponential: unreduced, π/2·a·k reaches 4e8 at N = 64 and its float64 rounding
    (~5e-8) is far above float64's 1e-12 (float32 sees a phase formed in float32)."""
    x = _frft_signal(0, 64, dtype, True)
    assert _frft_err(frft.frft(x, 4_000_000.5), frft.frft(x.to(torch.complex128), 0.5)) < _FRFT_TOL[dtype]


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, seed=st.integers(0, 2**31),
       alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_is_linear(n, a, dtype, seed, alpha, beta):
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


@examples(10)
@given(n=_frft_sizes, a=_frft_orders)
def test_along_a_middle_dim_equals_along_the_last(n, a):
    x = torch.randn(2, n, 3, dtype=torch.float64)
    assert _frft_err(frft.frft(x, a, dim=1), frft.frft(x.transpose(1, 2), a).transpose(1, 2)) < 1e-12


def test_output_is_complex64_or_complex128_as_promised():
    expected = {torch.float16: torch.complex64, torch.float32: torch.complex64, torch.complex64: torch.complex64,
                torch.float64: torch.complex128, torch.complex128: torch.complex128}
    for dtype, out in expected.items():
        x = torch.ones(2, 4, 5, dtype=dtype)
        assert frft.frft(x, 0.3).dtype == out and frft.frft2(x, 0.3).dtype == out, dtype


@_frft_settings
@given(n=_frft_sizes, a=_frft_orders, dtype=_frft_dtypes, is_complex=st.booleans(), seed=st.integers(0, 2**31))
def test_float_order_and_tensor_order_agree(n, a, dtype, is_complex, seed):
    x = _frft_signal(seed, n, dtype, is_complex)
    order = torch.tensor(a, dtype=dtype, requires_grad=True)
    assert torch.equal(frft.frft(x, order.item()), frft.frft(x, order))


def test_frft2_keeps_float32_under_bf16_autocast():
    """Under CPU bfloat16 autocast frft2 (real and complex input) gives exactly its float32 result. Guards
    against its matrix products (which autocast casts) running in bfloat16, whose 8 significant bits lose
    the FRFT's invertibility (see runs.autocast)."""
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    for z in (x, torch.complex(x, x.flip(-1))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = frft.frft2(z, 0.3, -0.7)
        assert torch.equal(mixed, frft.frft2(z, 0.3, -0.7))
