"""Selective state-space scan (Mamba) and its 2-D, four-route form (VMamba's SS2D), in plain PyTorch.

What is here
- `selective_scan_ref`: the Mamba selective scan (Gu & Dao 2023, "Mamba: linear-time sequence modeling
  with selective state spaces") as a plain loop over time. It is the definition and the test oracle.
- `selective_scan`: the same function computed chunk-parallel with a hand-written backward; a drop-in
  replacement for mamba_ssm's `selective_scan_fn` (same arguments, same layout) that runs anywhere.
- `SS2D`: the 2-D selective scan block of VMamba (Liu et al. 2024): four scan routes over the image.
  In Pixel-SSR it is M_scan of Eq. (4) (DRPN, Sec. 3.2.1) and the SSM of every PromptSSM (Sec. 3.2.2).
- `ss2d_ref`: SS2D written out route by route with `selective_scan_ref`; its test oracle.

The recurrence, per channel d and state index n (Mamba's discretisation: zero-order hold for A, Euler for B):
    h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t          h_{-1} = 0
    y_t = C_t·h_t + D·u_t                               then optionally y_t ⊙ silu(z_t)

Glossary
    u      input sequence x, (b, d, l)            Δ      delta, the per-step, per-channel step size, (b, d, l)
    A      continuous state matrix (diagonal, real, normally < 0), (d, n)
    B, C   input and output projections of the state, chosen per step ("selective"), (b, n, l) or
           grouped (b, g, n, l): group i serves channels i·d/g … (i+1)·d/g − 1
    D      skip connection, (d,)                  z      gate, (b, d, l)
    h      hidden state, (b, d, n)                n      d_state, the state size per channel
    b, d, l  batch, channels, sequence length     E      expanded width of SS2D (expand · dim)
    T, K   chunk length and number of chunks      g      number of B/C groups
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------------
# Reference: the loop, written to be read
# ----------------------------------------------------------------------------------------------------

def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan; the definition `selective_scan` must reproduce.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,); z: (b, d, l).
    Returns y (b, d, l), and the final state (b, d, n) if `return_last_state`.
    """
    b, d, l = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]                      # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)                                # keeps Δ > 0, so exp(Δ·A) ≤ 1 for A ≤ 0
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)                    # (b, 1, n, l): one group
    g, n = B.shape[1], B.shape[2]
    # Channels as (g, d/g) so that each B/C group meets its own channels without copying B, C to d rows.
    A_g = A.view(g, d // g, n)                                   # (g, d/g, n)
    h = u.new_zeros(b, g, d // g, n)                             # (b, g, d/g, n)
    ys = []
    # unbind, not x[..., t]: indexing would make autograd's backward quadratic in l.
    for u_t, dt_t, B_t, C_t in zip(u.view(b, g, d // g, l).unbind(-1), delta.view(b, g, d // g, l).unbind(-1),
                                   B.unbind(-1), C.unbind(-1)):
        dA = torch.exp(dt_t[..., None] * A_g)                    # (b, g, d/g, n)  zero-order hold
        dBu = (dt_t * u_t)[..., None] * B_t[:, :, None, :]       # (b, g, d/g, n)  Euler step
        h = dA * h + dBu                                         # (b, g, d/g, n)
        ys.append((h * C_t[:, :, None, :]).sum(-1))              # (b, g, d/g)
    y = torch.stack(ys, dim=-1).reshape(b, d, l)                 # (b, d, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h.reshape(b, d, n)) if return_last_state else y


# ----------------------------------------------------------------------------------------------------
# Fast: chunked scan with a hand-written, recomputing backward
# ----------------------------------------------------------------------------------------------------
#
# The sequence is cut into K chunks of T steps. Inside a chunk the loop is sequential, but all K chunks
# take their step t together, so the loop has T iterations on (b, K, …) tensors instead of l iterations
# on (b, …) ones. Forward, three passes:
#   (1) every chunk's end state from a zero start;
#   (2) a short loop over chunks: start_{k+1} = exp(A·ΣΔ over chunk k) ⊙ start_k + end_k (the true starts);
#   (3) every chunk re-scanned from its true start, emitting y.
# Only Δ·A ≤ 0 is ever exponentiated, so nothing overflows (cumprod would divide by products that
# underflow; a log-space cumsum over a chunk overflows once its decay passes float32's ~88).
# Backward: the adjoint ĝ_t = ∂loss/∂h_t obeys the same recurrence run backwards,
#     ĝ_t = exp(Δ_{t+1}·A) ⊙ ĝ_{t+1} + C_t·dy_t,
# so it is chunked the same way, last chunk first. Memory is what costs most here (a full-size
# (b, l, d, n) tensor costs more than the arithmetic on it), so autograd is not used: forward keeps the
# inputs and the state before every `_SUB`-th step (1/_SUB of a full tensor); backward recomputes the rest.
# Without autograd it keeps no state at all, and the skip D·u goes into y in place: y is then the only
# full-size tensor the scan allocates when called as SS2D calls it (Δ ready, l a multiple of K, no z),
# Δ·u too being formed a step at a time.
# How many chunks: each step's work is a few elementwise ops on one (b, K, d, n) state, each with a fixed
# cost beside its size and cheaper per element while the state stays in the CPU's cache, so on a CPU K is
# chosen to make that state fit the L2 of two cores (_STATE_FLOATS): at SS2D's shapes a few long chunks,
# not hundreds of short ones. When it leaves K = 1, passes (1)-(2) vanish. On a GPU the elementwise work is
# nearly free and each step costs its kernel launches, about 30 per step of passes (1) and (3) and 4 per
# step of pass (2): 30·T + 4·K with K·T = l is least at K ≈ √(8l). The backward holds ~2·_SUB states of
# b·K·d·n floats. Measurements: docs/performance.md, "The selective scan on a CPU".
# Internal layout: time-major, channels last — u, Δ, y as (b, l, d) and B, C as (b, l, g, n) — so that one
# step of every chunk is a plain strided view (no copies), and the state is (b, K, g, n, d/g), channels
# innermost. The contractions (y = Cᵀh and Σ_n B·ĝ over n; ∂C = h·dy and ∂B = ĝ·Δu over d) are a product
# into one preallocated state-sized buffer and a sum written straight into the output's step: as batched
# matmuls of (1, n) x (n, d/g) matrices they are slower at these small n (docs/performance.md, "The selective
# scan on a CPU").

_STATE_FLOATS = 2 ** 19          # on a CPU, target size of one step's state (b, K, d, n): 2 MB of float32
_SUB = 16                        # steps between kept states; the backward holds 2·_SUB states at once


def _steps(x: Tensor, K: int) -> tuple[Tensor, ...]:
    """(b, K·T, …) -> T views (b, K, …): step t of every chunk."""
    return x.view(x.shape[0], K, x.shape[1] // K, *x.shape[2:]).unbind(2)


def _base2(A: Tensor, g: int) -> Tensor:
    """A (d, n) -> log2(e)·A as (g, n, d/g), so that exp(Δ·A) = exp2(Δ·A2): the same number, but torch's
    CPU exp2 is faster than its exp, and exponentiation is the scan's largest cost (docs/performance.md)."""
    d, n = A.shape
    return (A * math.log2(math.e)).view(g, d // g, n).transpose(1, 2).contiguous()


def _decay(dt: Tensor, A2: Tensor, out: Tensor | None = None) -> Tensor:
    """exp(Δ_t·A), (b, K, g, n, d/g), from dt (b, K, g, d/g) and A2 = log2(e)·A (g, n, d/g), written into
    `out` if given. Zero-order hold."""
    return torch.mul(dt[..., None, :], A2, out=out).exp2_()


def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, K: int, keep: bool
                  ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Chunked forward. u, delta (b, l, d); A (d, n); B, C (b, l, g, n); D (d,) or None; l a multiple of K.

    Returns y (b, l, d), last state (b, d, n), and the states before every `_SUB`-th step of each chunk,
    a list of (b, K, g, n, d/g); empty unless `keep` (only the backward needs them).
    """
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    dg, T = d // g, l // K
    A2 = _base2(A, g)                                            # (g, n, d/g)
    dts, us = (_steps(x.view(b, l, g, dg), K) for x in (delta, u))   # T × (b, K, g, d/g)
    Bs, Cs = _steps(B[..., None], K), _steps(C[..., None], K)    # T × (b, K, g, n, 1)

    # The loops below update preallocated tensors in place: a fresh state-sized tensor per step would cost
    # more than the arithmetic (the allocator hands such blocks back to the OS, and every reuse page-faults).
    # Δ·u too is taken a step at a time: as one tensor it would be another full-size (b, l, d) temporary
    # (passes (1) and (3) both form it: one small product per step more).
    h = A2.new_zeros(b, K, g, n, dg)                                   # the state
    a, prod = torch.empty_like(h), torch.empty_like(h)                 # its decay; a product before its sum
    dtu = u.new_empty(b, K, g, 1, dg)                                  # Δ_t·u_t

    # (1)-(2) true chunk starts (the last chunk's end is not needed): end states from zero, then the carry.
    if K > 1:
        ends = torch.zeros_like(h[:, :-1])
        for dt, u_t, B_t in zip(dts, us, Bs):
            torch.mul(dt[:, :-1, :, None], u_t[:, :-1, :, None], out=dtu[:, :-1])
            ends.mul_(_decay(dt[:, :-1], A2, a[:, :-1])).addcmul_(B_t[:, :-1], dtu[:, :-1])
        chunk_decay = _decay(delta.view(b, K, T, g, dg).sum(2), A2)  # (b, K, g, n, d/g)  exp(A·ΣΔ)
        for k in range(1, K):
            h[:, k] = torch.addcmul(ends[:, k - 1], chunk_decay[:, k - 1], h[:, k - 1])

    # (3) every chunk from its true start, reading out y and keeping every _SUB-th state for the backward.
    y, kept = u.new_empty(b, K, T, g, dg), []
    for t, (dt, u_t, B_t, C_t) in enumerate(zip(dts, us, Bs, Cs)):
        if keep and t % _SUB == 0:
            kept.append(h.clone())
        torch.mul(dt[..., None, :], u_t[..., None, :], out=dtu)
        h.mul_(_decay(dt, A2, a)).addcmul_(B_t, dtu)                    # (b, K, g, n, d/g)
        torch.sum(torch.mul(C_t, h, out=prod), -2, out=y[:, :, t])  # (b, K, g, d/g)  Σ_n C·h
    last = h[:, -1].transpose(-1, -2).reshape(b, d, n)          # a copy
    y = y.view(b, l, d)
    # the skip D·u, added into y: as y + D·u outside the scan it would take another full-size tensor
    # (docs/performance.md, "SS2D memory")
    if D is not None:
        y.addcmul_(u, D)
    return y, last, kept


def _scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, kept: list[Tensor],
                   dy: Tensor, dlast: Tensor | None, K: int) -> tuple[Tensor, ...]:
    """Gradients (du, ddelta, dA, dB, dC) of the chunked scan, in the layout of the forward's inputs (D's,
    a sum over b and l, is left to the caller, which knows whether it is wanted).

    The states are recomputed from the kept ones `_SUB` steps at a time, so that 2·_SUB per-step tensors
    (b, K, g, n, d/g) — states and decays — are alive at once, not all T.
    """
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    dg, T = d // g, l // K
    A2 = _base2(A, g)                                            # (g, n, d/g)
    A_n = A.view(g, dg, n).transpose(1, 2).contiguous()          # (g, n, d/g)
    dts, dys = (_steps(x.view(b, l, g, dg), K) for x in (delta, dy))               # T × (b, K, g, d/g)
    dtus = _steps((delta * u).view(b, l, g, dg), K)
    Bs, Cs = _steps(B[..., None], K), _steps(C[..., None], K)     # T × (b, K, g, n, 1)

    # (1)-(2) adjoint entering each chunk's last step: dlast at the very end; for the others, what the
    #     later chunks send back — each chunk's own dy from a zero adjoint (chunk 0's is not needed),
    #     and the adjoint entering it carried through with its total decay.
    s = A2.new_zeros(b, K, g, n, dg)
    if dlast is not None:
        s[:, -1] = dlast.view(b, g, dg, n).transpose(-1, -2)
    if K > 1:
        out, a = torch.zeros_like(s[:, 1:]), torch.empty_like(s[:, 1:])   # exp(Δ_{t+1}A)·ĝ_{t+1} from zero; decay
        for dt, C_t, dy_t in zip(reversed(dts), reversed(Cs), reversed(dys)):
            out.addcmul_(C_t[:, 1:], dy_t[:, 1:, :, None, :]).mul_(_decay(dt[:, 1:], A2, a))
        chunk_decay = _decay(delta.view(b, K, T, g, dg).sum(2), A2)  # (b, K, g, n, d/g)
        for k in reversed(range(1, K)):
            s[:, k - 1] = torch.addcmul(out[:, k - 1], chunk_decay[:, k], s[:, k])
        del out, a, chunk_decay

    # (3) blocks of _SUB steps, last first: recompute their states from the kept one, walk back through them.
    #     Preallocated, updated in place, for the reason given in `_scan_forward`.
    dA = torch.zeros_like(s)                                      # Σ_t Δ_t·∂loss/∂(Δ_t A); summed over b, K at the end
    hs, decays = s.new_empty(_SUB + 1, *s.shape), s.new_empty(_SUB, *s.shape)
    q, prod = torch.empty_like(s), torch.empty_like(s)                  # ∂loss/∂(Δ_t A); a product before its sum
    gB, ddelta = u.new_empty(b, K, T, g, dg), u.new_empty(b, K, T, g, dg)      # Σ_n B·ĝ_t; Σ_n A·∂loss/∂(Δ_t A)
    dB, dC = B.new_empty(b, K, T, g, n), C.new_empty(b, K, T, g, n)
    for first in reversed(range(0, T, _SUB)):
        block = range(first, min(first + _SUB, T))
        hs[0] = kept.pop()                                        # hs[i] = state before step first + i
        for i, t in enumerate(block):
            torch.mul(_decay(dts[t], A2, decays[i]), hs[i], out=hs[i + 1]).addcmul_(Bs[t], dtus[t][..., None, :])
        for i, t in reversed(list(enumerate(block))):
            dt, dy_t = dts[t], dys[t]
            grad_h = s.addcmul_(Cs[t], dy_t[..., None, :])        # ĝ_t  (b, K, g, n, d/g)
            # Σ_d dy·h_t, Σ_d Δu·ĝ_t: (b, K, g, n);  Σ_n B·ĝ_t: (b, K, g, d/g)
            torch.sum(torch.mul(dy_t[..., None, :], hs[i + 1], out=prod), -1, out=dC[:, :, t])
            torch.sum(torch.mul(dtus[t][..., None, :], grad_h, out=prod), -1, out=dB[:, :, t])
            torch.sum(torch.mul(Bs[t], grad_h, out=prod), -2, out=gB[:, :, t])
            s = grad_h.mul_(decays[i])                            # exp(Δ_t A)·ĝ_t, sent to step t − 1
            torch.mul(s, hs[i], out=q)                            # ∂loss/∂(Δ_t A) = ĝ_t ⊙ exp(Δ_t A) ⊙ h_{t-1}
            dA.addcmul_(q, dt[..., None, :])
            ddelta[:, :, t] = q.mul_(A_n).sum(-2)                 # (b, K, g, d/g)
    dA = dA.sum((0, 1)).transpose(-1, -2).reshape(d, n)
    gB = gB.view(b, l, d)                                         # du = Δ·gB, ddelta += u·gB: whole tensors at once
    du = delta * gB
    if D is not None:                                             # the skip D·u
        du.addcmul_(dy, D)
    return du, ddelta.view(b, l, d).addcmul_(u, gB), dA, dB.view(B.shape), dC.view(C.shape)


class _ChunkedScan(torch.autograd.Function):
    """y, last_state = scan(u, delta, A, B, C, D) in the internal layout; saves the inputs and the kept states."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, K: int, keep: bool):
        y, last, kept = _scan_forward(u, delta, A, B, C, D, K, keep)
        ctx.save_for_backward(u, delta, A, B, C, D, *kept)
        ctx.K = K
        ctx.set_materialize_grads(False)                         # dy or dlast is None when unused
        return y, last

    @staticmethod
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, D, *kept = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        with torch.autocast(u.device.type, enabled=False):  # in the forward's precision, as selective_scan says
            grads = _scan_backward(u, delta, A, B, C, D, kept, dy, dlast, ctx.K)
            dD = (dy * u).sum((0, 1)) if ctx.needs_input_grad[5] else None  # a full-size product: only if wanted
        return (*grads, dD, None, None)


def selective_scan_chunks(b: int, d: int, n: int, l: int, device: torch.device) -> int:
    """The automatic number of chunks K of a scan of these sizes (see above): a power of two, so that the
    usual l (image sizes) need no padding; on a CPU, one step's state (b, K, d, n) about 2 MB and at least
    √l steps per chunk; on a GPU K ≈ √(8l)."""
    K = min(_STATE_FLOATS // (b * d * n), math.isqrt(l)) if device.type == "cpu" else math.isqrt(8 * l)
    return 1 << max(0, K.bit_length() - 1)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Chunk-parallel selective scan: same arguments, layout and results as `selective_scan_ref`.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,); z: (b, d, l).
    Any l works: the tail is padded with identity steps (Δ = 0 so exp(Δ·A) = 1, and B = C = 0).
    chunk_size: steps per chunk T; None picks the number of chunks K: on a CPU so that one step's state
    (b, K, d, n) is about 2 MB, on a GPU K ≈ √(8l) (see above). Inputs laid out (b, l, d) in memory,
    i.e. u = x.transpose(1, 2) for a contiguous x (b, l, d), are used without a copy, and y comes back
    in that layout.
    Under autocast (bf16 training) it runs in float32, with half-precision inputs promoted: the state sums
    up to l steps, and exp(Δ·A) of a slow channel (Δ·|A| ~ 1e-3) rounds to 1 in bfloat16's 8 significant
    bits, so that channel would never forget. y is then float32 too.
    Returns y (b, d, l), and the final state (b, d, n) if `return_last_state`.
    """
    with torch.autocast(u.device.type, enabled=False):
        dtype = torch.promote_types(u.dtype, torch.float32)
        u, delta, B, C, z = (x if x is None else x.to(dtype) for x in (u, delta, B, C, z))
        return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)


def _selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                    delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool, chunk_size: int | None
                    ) -> Tensor | tuple[Tensor, Tensor]:
    """selective_scan's body, in the precision of its inputs."""
    b, d, l = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]                      # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    B4, C4 = (B, C) if B.dim() == 4 else (B.unsqueeze(1), C.unsqueeze(1))   # (b, g, n, l)
    if chunk_size is None:
        K = selective_scan_chunks(b, d, n, l, u.device)
    else:
        K = math.ceil(l / max(1, min(chunk_size, l)))
    T = math.ceil(l / K)
    pad = K * T - l
    # Internal layout (b, l, d) and (b, l, g, n), padded with identity steps to K·T.
    u_p, delta_p, B_p, C_p = ((F.pad(x, (0,) * (2 * x.dim() - 3) + (pad,)) if pad else x).contiguous()
                              for x in (u.transpose(1, 2), delta.transpose(1, 2), B4.permute(0, 3, 1, 2),
                                        C4.permute(0, 3, 1, 2)))
    # the states the backward restarts from, only if there will be one: at inference they would be a
    # full-size (b, K, d, n) per sub-block kept for nothing
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (u_p, delta_p, A, B_p, C_p, D))
    y, last = _ChunkedScan.apply(u_p, delta_p, A.contiguous(), B_p, C_p, D, K, keep)
    y = y[:, :l].transpose(1, 2)                                 # (b, d, l)
    if z is not None:
        y = y * F.silu(z)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------------------------------
# SS2D: four scan routes over an image (VMamba)
# ----------------------------------------------------------------------------------------------------

# Routes by index, in the order of the per-route parameters: 0 row-major, 1 column-major, 2 and 3 those reversed.
ALL_ROUTES = slice(None)
ROW_PAIR, COL_PAIR = slice(0, 4, 2), slice(1, 4, 2)        # routes 0 and 2, 1 and 3: an order and its reverse


class SS2D(nn.Module):
    """2-D selective scan block, (b, dim, h, w) -> (b, dim, h, w).

    in_proj to 2E channels (x, z); depthwise 3×3 conv + SiLU on x; four selective scans over the h·w
    pixels — row-major, column-major, and both reversed — each with its own Δ/B/C projections, A and D;
    the four outputs are put back in image order and summed; LayerNorm; gate with silu(z); out_proj.
    Each pixel thus sees the whole image: the row-major scan reaches it from every earlier row (and the
    earlier pixels of its own), its reverse from every later one, and the column-major pair likewise by columns.
    Parameters with a leading dimension 4 are per route, in the order above.
    forward reads as routes (the four orders), scan (their selective scans in one call) and merge (back to
    image order); at inference on a CPU (`paired`), as two pairs, each a route and its reverse scanned
    together. `ss2d_ref`, after the class, is the same block written route by route with the loop.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2):
        super().__init__()
        E, n, R = expand * dim, d_state, math.ceil(dim / 16)     # R = dt_rank, as in Mamba
        self.E, self.n, self.R = E, n, R
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.conv = nn.Conv2d(E, E, 3, padding=1, groups=E)
        # Per route: x -> (Δ low-rank, B, C); Δ low-rank -> E channels.
        self.x_proj_weight = nn.Parameter(torch.empty(4, R + 2 * n, E).uniform_(-E ** -0.5, E ** -0.5))
        self.dt_proj_weight = nn.Parameter(torch.empty(4, E, R).uniform_(-R ** -0.5, R ** -0.5))
        # Δ bias: softplus(bias) starts log-uniform in [1e-3, 1e-1] (Mamba); softplus⁻¹(Δ) = Δ + log(1 − e^{−Δ}).
        dt = torch.exp(torch.empty(4, E).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init: A = −(1, 2, …, n) for every channel; kept as log(−A) so A stays negative.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(4, E, 1))  # (4, E, n)
        self.D = nn.Parameter(torch.ones(4, E))
        self.norm = nn.LayerNorm(E)
        self.out_proj = nn.Linear(E, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (b, dim, h, w) -> (b, dim, h, w)."""
        hh, ww = x.shape[-2:]
        inp = x.permute(0, 2, 3, 1)                                           # (b, h, w, dim)
        # in_proj's two halves applied apart (it has no bias), so that z is made only where it gates and the
        # scans do not hold it (docs/performance.md, "SS2D memory")
        w_x, w_z = self.in_proj.weight.chunk(2)                               # (E, dim) each
        x = F.silu(self.conv(F.linear(inp, w_x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1)   # (b, h, w, E)
        if self.paired(x):
            # a route and its reverse at a time, rows then columns (the column-major routes are the
            # row-major ones of the transposed image)
            y = self.pair(x, ROW_PAIR) + self.pair(x.transpose(1, 2), COL_PAIR).transpose(1, 2)
        else:
            y = self.merge(self.scan(self.routes(x)), hh, ww)                # (b, h, w, E)
        y = self.norm(y) * F.silu(F.linear(inp, w_z))                         # (b, h, w, E)
        return self.out_proj(y).permute(0, 3, 1, 2)                           # (b, dim, h, w)

    @staticmethod
    def paired(x: Tensor) -> bool:
        """Whether forward scans the routes two at a time (two scan calls) rather than all four in one.
        Only at inference on a CPU, where autograd keeps none of the scan's full-size tensors, so pairs
        halve them (docs/performance.md, "SS2D memory"), and cost no time: a CPU scan's step count is set by
        its ~2 MB state (selective_scan_chunks), not by the number of routes. On a GPU the step count is set by l, so two calls would launch twice the kernels."""
        return not torch.is_grad_enabled() and x.device.type == "cpu"

    @staticmethod
    def routes(x: Tensor) -> Tensor:
        """(b, h, w, E) -> (b, l, 4, E): the image read row-major, column-major, and both reversed.
        Channels last throughout: the scan works in (b, l, channels) layout, so handing it sequences laid
        out that way (as transposed views) spares it two layout copies in and one out."""
        bsz, hh, ww, E = x.shape
        rows = x.reshape(bsz, hh * ww, E)                                     # (b, l, E) row-major
        cols = x.transpose(1, 2).reshape(bsz, hh * ww, E)                     # (b, l, E) column-major
        return torch.stack([rows, cols, rows.flip(1), cols.flip(1)], dim=2)   # (b, l, 4, E)

    def pair(self, x: Tensor, routes: slice) -> Tensor:
        """Half of a `paired` SS2D: x read row-major, forward with the first route's parameters and reversed
        with the second's, scanned together and put back in image order and summed, (b, h, w, E) -> (b, h, w, E)."""
        bsz, hh, ww, E = x.shape
        rows = x.reshape(bsz, hh * ww, E)                                     # (b, l, E)
        y, y_rev = self.scan(torch.stack([rows, rows.flip(1)], dim=2), routes).unbind(2)
        return (y + y_rev.flip(1)).view(bsz, hh, ww, E)

    def scan(self, xs: Tensor, routes: slice = ALL_ROUTES) -> Tensor:
        """Each route's selective scan with its own Δ/B/C projections, A and D, (b, l, k, E) -> (b, l, k, E)
        for the k routes named (a slice of the per-route parameters: a view, so training indexes nothing).
        One scan call for all of them: routes are stacked as channel groups (kE channels, B/C in g = k
        groups), so the chunked scan's sequential loop runs once on tensors k times larger, instead of k
        times on small ones."""
        bsz, l, k, E = xs.shape
        n, R = self.n, self.R
        x_dbl = torch.einsum("blke,kce->blkc", xs, self.x_proj_weight[routes])  # (b, l, k, R + 2n)
        dts, Bs, Cs = x_dbl.split([R, n, n], dim=3)                           # (b, l, k, R), (b, l, k, n) twice
        delta = self.delta(dts.reshape(bsz, l, k * R), routes)                # (b, l, kE)
        ys = selective_scan(xs.view(bsz, l, k * E).transpose(1, 2), delta.transpose(1, 2),
                            -torch.exp(self.A_log[routes]).reshape(k * E, n), Bs.permute(0, 2, 3, 1),
                            Cs.permute(0, 2, 3, 1), D=self.D[routes].reshape(-1))
        return ys.transpose(1, 2).view(bsz, l, k, E)                          # a view: ys is laid out so already

    def delta(self, dts: Tensor, routes: slice = ALL_ROUTES) -> Tensor:
        """Δ = softplus(dt_proj(dts) + bias) of the k routes named, (b, l, kR) -> (b, l, kE).

        The routes' projections are one block-diagonal (kE, kR) matrix, so that Δ comes out laid out as the
        scan reads it, bias added; a per-route einsum leaves it route-major, at the cost of a full-size copy
        and a separate add. In float32 under bf16 autocast, as the scan: with a bias near -7 (Δ ~ 1e-3)
        bfloat16 would be ~3 % off in Δ."""
        with torch.autocast(dts.device.type, enabled=False):
            w = torch.block_diag(*self.dt_proj_weight[routes])               # (kE, kR)
            return F.softplus(F.linear(dts.to(w.dtype), w, self.dt_proj_bias[routes].reshape(-1)))

    @staticmethod
    def merge(ys: Tensor, hh: int, ww: int) -> Tensor:
        """(b, l, 4, E) -> (b, h, w, E): each route back to image order (the reversal undone, then the
        transpose), summed. (unbind, not ys[:, :, k]: its backward is one stack, where each indexing's
        would be a full-size tensor of zeros.)"""
        bsz, _, _, E = ys.shape
        y_row, y_col, y_row_rev, y_col_rev = ys.unbind(2)                     # (b, l, E) each
        y_rows = y_row + y_row_rev.flip(1)                                    # (b, l, E) row-major
        y_cols = (y_col + y_col_rev.flip(1)).view(bsz, ww, hh, E).transpose(1, 2)
        return y_rows.view(bsz, hh, ww, E) + y_cols                           # (b, h, w, E)


def ss2d_ref(block: SS2D, x: Tensor) -> Tensor:
    """SS2D written out route by route with the sequential scan, as VMamba describes it: what SS2D.forward
    (routes stacked as channel groups, a block-diagonal Δ projection and a chunked scan per call, one call
    or, `paired`, two) must reproduce.
    x (b, dim, h, w) -> (b, dim, h, w)."""
    b, _, h, w = x.shape
    u, z = block.in_proj(x.permute(0, 2, 3, 1)).chunk(2, dim=-1)            # (b, h, w, E) each
    u = F.silu(block.conv(u.permute(0, 3, 1, 2)))                           # (b, E, h, w)
    routes = [u.flatten(2), u.transpose(2, 3).flatten(2)]                   # (b, E, l) row-, column-major
    routes += [r.flip(-1) for r in routes]                                  # and both reversed
    y = torch.zeros_like(u)
    for k, seq in enumerate(routes):
        dt, B, C = (block.x_proj_weight[k] @ seq).split([block.R, block.n, block.n], dim=1)  # (b, R | n | n, l)
        delta = block.dt_proj_weight[k] @ dt                                # (b, E, l)
        yk = selective_scan_ref(seq, delta, -torch.exp(block.A_log[k]), B, C, block.D[k],
                                delta_bias=block.dt_proj_bias[k], delta_softplus=True)
        yk = yk.flip(-1) if k >= 2 else yk                                  # back to the route's own order
        y = y + (yk.view(b, block.E, w, h).transpose(2, 3) if k % 2 else yk.view(b, block.E, h, w))
    return block.out_proj(block.norm(y.permute(0, 2, 3, 1)) * F.silu(z)).permute(0, 3, 1, 2)
