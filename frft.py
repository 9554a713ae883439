"""The discrete fractional Fourier transform (FRFT), for the Spa-FRFT prompt of Pixel-SSR.

What it is. The unitary DFT F has only four eigenvalues, 1, -i, -1, i, so F = V diag((-i)^k) Vᵀ for
an orthonormal set of eigenvectors V. Raising the eigenvalues to a real power gives the fractional
transform F^a = V diag(exp(-i·π/2·a·k)) Vᵀ: order 0 is the identity, 1 the DFT, 2 the reversal
x[n] -> x[-n], 3 (= -1) the inverse DFT, and orders in between rotate a signal continuously between
"space" and "frequency". F^a F^b = F^(a+b), F^-a is the inverse, and every F^a is unitary.

Why the numbering matters. The eigenvalues of F are hugely degenerate, so V is not fixed by F alone.
The standard choice (Candan, Kutay, Ozaktas 2000) takes the eigenvectors of Grünbaum's matrix S,
which commutes with F and has distinct eigenvalues; they are discrete analogues of the Hermite-Gauss
functions, and k must be the Hermite-Gauss order of each, which fixes its DFT eigenvalue (-i)^k
and its parity (-1)^k. S splits into an even and an odd block; sorted by descending eigenvalue, the
even ones get k = 0, 2, 4, ... and the odd ones k = 1, 3, 5, ...; for even N the order N-1 has no
vector (k runs to N). Sorting the eigenvectors of the whole S instead (the classic mistake) still
gives a unitary, additive, 4-periodic family, but order 1 is no longer the DFT.

Centred convention. As in Deep FRFT and optics, index n runs from -(N//2) to (N-1)//2 with the origin
at position N//2, so order 1 is fftshift(fft(ifftshift(x), norm="ortho")) and a centred sampled
Gaussian is (nearly) an eigenfunction. We build V for the usual origin-at-0 DFT and fftshift its rows.

In Pixel-SSR (Sec. 3.2.1) the order is learnable, one per FRFT layer, initialised at 0.5:
F_FRFT = iFRFT(scan(FRFT(F1)))   # Eq. (4)

Glossary (code -> symbol):
  a          order a of F^a (float or 0-dim tensor, may require grad)
  s          Grünbaum's commuting matrix S
  v, k       Hermite-Gauss-like eigenvectors V (columns) and their orders k
  m          the N×N matrix F^a
"""
import functools
import math

import torch


def _grunbaum(n: int) -> torch.Tensor:
    """Grünbaum's S (n, n), float64, origin at index 0: the circular shift sum plus diag(2·cos(2πj/n) - 4),
    i.e. the circular second difference plus its DFT conjugate diag(2·cos(2πj/n) - 2). It commutes with
    the unitary DFT."""
    eye = torch.eye(n, dtype=torch.float64)
    j = torch.arange(n, dtype=torch.float64)
    return eye.roll(1, 0) + eye.roll(-1, 0) + torch.diag(2 * torch.cos(2 * math.pi * j / n) - 4)


@functools.lru_cache(maxsize=None)
@torch.inference_mode(False)  # a cache filled under inference_mode must still be usable by autograd
def _basis(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred Hermite-Gauss-like eigenvectors V (n, n) (column j has order k[j]) and k (n,), float64."""
    s = _grunbaum(n)
    eye = torch.eye(n, dtype=torch.float64)
    rev = eye[-torch.arange(n) % n]  # x[j] -> x[-j]
    # The P matrix: orthonormal rows spanning the even vectors (x[-j] = x[j]), then the odd ones.
    even = (eye + rev)[: n // 2 + 1]
    even = even / even.norm(dim=1, keepdim=True)
    odd = (eye - rev)[1 : (n + 1) // 2] / math.sqrt(2)
    vs, ks = [], []
    for p, first_k in ((even, 0), (odd, 1)):
        if len(p) == 0:  # N <= 2 has no odd vector
            continue
        vecs = torch.linalg.eigh(p @ s @ p.T).eigenvectors.flip(1)  # descending eigenvalue
        # eigh's signs are arbitrary; F^a does not depend on them, but a fixed V is easier to inspect.
        vecs = vecs * vecs.gather(0, vecs.abs().argmax(0, keepdim=True)).sign()
        vs.append(p.T @ vecs)
        ks.append(first_k + 2 * torch.arange(vecs.shape[1], dtype=torch.float64))
    return torch.cat(vs, 1).roll(n // 2, 0), torch.cat(ks)


@functools.lru_cache(maxsize=None)
@torch.inference_mode(False)
def _basis_on(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """V in `dtype` and k in float64, on `device`."""
    v, k = _basis(n)
    return v.to(device, dtype), k.to(device)


def _matrix(n: int, a: float | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """F^a (n, n), complex of the real `dtype`, differentiable wrt a tensor `a`."""
    v, k = _basis_on(n, device, dtype)
    if isinstance(a, torch.Tensor):
        if a.numel() != 1:
            raise ValueError(f"the order must be a scalar, got shape {tuple(a.shape)}")
        a = a.reshape(()).to(device, torch.float64)
    # Reduce a·k modulo 4 in float64: F^a is 4-periodic, and float32 would lose the phase at large a·k.
    # remainder has derivative 1, so the gradient wrt a survives.
    phase = -math.pi / 2 * torch.remainder(k * a, 4)
    re = (v * torch.cos(phase).to(dtype)) @ v.T
    im = (v * torch.sin(phase).to(dtype)) @ v.T
    return torch.complex(re, im)


def _last_dim(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ mᵀ: m applied along the last dim, as one matmul on the flattened batch."""
    if x.is_complex():
        return x @ m.T
    # Real input: one real matmul with [Re mᵀ, Im mᵀ] interleaved column by column yields the complex
    # result's memory layout directly: half the work of a complex matmul, and no complex copy of x.
    n = m.shape[0]
    out = x @ torch.view_as_real(m.T).reshape(n, 2 * n)
    return torch.view_as_complex(out.unflatten(-1, (n, 2)))


def _along(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """m applied along `dim` of x: x @ mᵀ for the last dim, m @ x on x with `dim` moved to -2 otherwise."""
    dim = dim % x.ndim
    if dim == x.ndim - 1:
        return _last_dim(x, m)
    return (m @ x.movedim(dim, -2).to(m.dtype)).movedim(-2, dim)


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """x in its working precision (real stays real) and the real dtype of that precision: float32
    for float32/complex64 (and lower) input, float64 for float64/complex128; never less precise.
    frft and frft2 keep to it under autocast too (bf16 training): an N-point unitary sum in bfloat16's
    8 significant bits would no longer be undone by its inverse, and the order's gradient, ~N·|x|, is
    a sum of nearly cancelling terms."""
    cdtype = torch.promote_types(x.dtype, torch.float32).to_complex()
    x = x.to(cdtype if x.is_complex() else cdtype.to_real())
    return x, cdtype.to_real()


def frft(x: torch.Tensor, a: float | torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Centred discrete FRFT of order `a` along `dim`.

    x: (..., N, ...) real or complex; a: float or 0-dim tensor (may require grad). Returns a complex
    tensor of x's shape: complex64 for float32/complex64 x, complex128 for float64/complex128 x.
    frft(x, 1) = fftshift(fft(ifftshift(x), norm="ortho")); frft(frft(x, a), -a) = x.
    The gradient wrt `a` is V diag(-iπk/2·exp(-iπak/2)) Vᵀ x, of size up to ~(π/2)·N·|x|: a layer
    learning the order may want to scale its parameter down.
    """
    with torch.autocast(x.device.type, enabled=False):  # full precision, see _prepare
        x, rdtype = _prepare(x)
        return _along(x, _matrix(x.shape[dim], a, x.device, rdtype), dim)


def frft2(x: torch.Tensor, a_h: float | torch.Tensor, a_w: float | torch.Tensor | None = None) -> torch.Tensor:
    """Centred 2-D discrete FRFT: order `a_h` along dim -2 (height), `a_w` (default `a_h`) along dim -1.

    x: (..., H, W) real or complex -> complex (..., H, W); dtypes and gradients as in `frft`. The inverse
    is frft2(y, -a_h, -a_w). One matrix product per dim, the width first, so that a real x takes the
    cheaper real path.
    """
    with torch.autocast(x.device.type, enabled=False):  # full precision, see _prepare
        x, rdtype = _prepare(x)
        a_w = a_h if a_w is None else a_w
        y = _last_dim(x, _matrix(x.shape[-1], a_w, x.device, rdtype))
        return _matrix(x.shape[-2], a_h, x.device, rdtype) @ y
