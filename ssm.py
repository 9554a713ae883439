"""Selective state-space scan (Mamba) and its 2-D, four-route form (VMamba's SS2D), in plain PyTorch.

What is here
- `selective_scan_ref`: the Mamba selective scan (Gu & Dao 2023, "Mamba: linear-time sequence modeling
  with selective state spaces") as a plain loop over time. It is the definition and the test oracle.
- `selective_scan`: the same function computed chunk-parallel with a hand-written backward; a drop-in
  replacement for mamba_ssm's `selective_scan_fn` (same arguments, same layout) that runs anywhere.
- `SS2D`: the 2-D selective scan block of VMamba (Liu et al. 2024): four scan routes over the image.
  In Pixel-SSR it is M_scan of Eq. (4) (DRPN, Sec. 3.2.1) and the SSM of every PromptSSM (Sec. 3.2.2).

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
# inputs and the chunk start states (1/T of a full tensor), backward recomputes the states.
# Internal layout: the state is (b, K, g, n, d/g), channels innermost, so that the contractions over n
# (y = Cᵀh, ∂C = h·dy, Σ_n B·ĝ, ∂B = ĝ·Δu) are plain batched matmuls.

def _steps(x: Tensor, T: int) -> tuple[Tensor, ...]:
    """(b, g, c, K·T) -> T tensors (b, K, g, c): step t of every chunk, contiguous."""
    b, g, c, l = x.shape
    return x.view(b, g, c, l // T, T).permute(4, 0, 3, 1, 2).contiguous().unbind(0)


def _new_steps(like: Tensor, b: int, g: int, c: int, K: int, T: int) -> tuple[Tensor, Tensor]:
    """A new (b, g·c, K·T) tensor and its (T, b, K, g, c) view, to be filled step by step (inverse of `_steps`)."""
    x = like.new_empty(b, g, c, K, T)
    return x.view(b, g * c, K * T), x.permute(4, 0, 3, 1, 2)


def _base2(A: Tensor, g: int) -> Tensor:
    """A (d, n) -> log2(e)·A as (g, n, d/g), so that exp(Δ·A) = exp2(Δ·A2): the same number, but torch's
    CPU exp2 is ~2.5× faster than its exp (and exponentiation is the scan's largest cost)."""
    d, n = A.shape
    return (A * math.log2(math.e)).view(g, d // g, n).transpose(1, 2).contiguous()


def _decay(dt: Tensor, A2: Tensor) -> Tensor:
    """exp(Δ_t·A), (b, K, g, n, d/g), from dt (b, K, g, d/g) and A2 = log2(e)·A (g, n, d/g). Zero-order hold."""
    return (dt[..., None, :] * A2).exp2_()


def _advance(h: Tensor, a: Tensor, dtu: Tensor, B_t: Tensor) -> Tensor:
    """One step of every chunk: a ⊙ h + B_t·(Δ_t u_t), (b, K, g, n, d/g), written into `a`. Euler step for B."""
    return a.mul_(h).addcmul_(B_t[..., None], dtu[..., None, :])


def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, T: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked forward. u, delta (b, d, l); A (d, n); B, C (b, g, n, l); l a multiple of T.

    Returns y (b, d, l), last state (b, d, n), chunk start states h0 (b, K, g, n, d/g).
    """
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    dg, K = d // g, l // T
    A2 = _base2(A, g)                                            # (g, n, d/g)
    dts, us = _steps(delta.view(b, g, dg, l), T), _steps(u.view(b, g, dg, l), T)   # T × (b, K, g, d/g)
    Bs, Cs = _steps(B, T), _steps(C, T)                                              # T × (b, K, g, n)

    # (1) end state of every chunk from a zero start.
    h = torch.zeros_like(A2).expand(b, K, g, n, dg)
    for dt, u_t, B_t in zip(dts, us, Bs):
        h = _advance(h, _decay(dt, A2), dt * u_t, B_t)           # (b, K, g, n, d/g)

    # (2) true chunk starts: carry the state across chunks with each chunk's total decay exp(A·ΣΔ).
    dt_sum = delta.view(b, g, dg, K, T).sum(-1).permute(0, 3, 1, 2)             # (b, K, g, d/g)
    state, starts = torch.zeros_like(h[:, 0]), []                # (b, g, n, d/g)
    for decay_k, end_k in zip(_decay(dt_sum, A2).unbind(1), h.unbind(1)):
        starts.append(state)
        state = torch.addcmul(end_k, decay_k, state)
    h0 = torch.stack(starts, 1)                                  # (b, K, g, n, d/g)

    # (3) re-scan every chunk from its true start, reading out y.
    y, ys = _new_steps(u, b, g, dg, K, T)                        # (b, d, l) and its view T × (b, K, g, d/g)
    h = h0
    for t, (dt, u_t, B_t, C_t) in enumerate(zip(dts, us, Bs, Cs)):
        h = _advance(h, _decay(dt, A2), dt * u_t, B_t)
        ys[t] = (C_t[..., None, :] @ h).squeeze(-2)               # (b, K, g, d/g)  Σ_n C·h
    last = state.transpose(-1, -2).reshape(b, d, n)
    return y, last, h0


def _scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, dy: Tensor,
                   dlast: Tensor | None, T: int) -> tuple[Tensor, ...]:
    """Gradients (du, ddelta, dA, dB, dC) of the chunked scan.

    The states are recomputed from h0 in sub-blocks of ~√T steps, so that about 2√T of the T per-step
    state tensors (b, K, g, n, d/g) are alive at once, not all T: 0.4 of a full (b, l, d, n) tensor at T = 32.
    """
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    dg, K = d // g, l // T
    A2 = _base2(A, g)                                            # (g, n, d/g)
    A_n = A.view(g, dg, n).transpose(1, 2).contiguous()          # (g, n, d/g)
    dts, us, dys = (_steps(x.view(b, g, dg, l), T) for x in (delta, u, dy))      # T × (b, K, g, d/g)
    Bs, Cs = _steps(B, T), _steps(C, T)                                              # T × (b, K, g, n)
    sub = max(1, round(math.sqrt(T)))                            # steps per sub-block

    # (1) Forward through every chunk from its true start: keep the state at each sub-block start, and
    #     sum what dy alone sends back out of the chunk's start, Σ_t exp(A·(Δ_0 + … + Δ_t)) ⊙ C_t·dy_t,
    #     the decay kept as a running product (no division; underflow to 0 is the right answer).
    kept, h = [], h0
    decay, out = torch.ones_like(h0), torch.zeros_like(h0)      # (b, K, g, n, d/g)
    for t, (dt, u_t, B_t, C_t, dy_t) in enumerate(zip(dts, us, Bs, Cs, dys)):
        if t % sub == 0:
            kept.append(h)
        a = _decay(dt, A2)
        out.addcmul_(decay.mul_(a), C_t[..., None] * dy_t[..., None, :])
        h = _advance(h, a, dt * u_t, B_t)                        # reuses a's memory

    # (2) Adjoint entering each chunk's last step, carried backwards across chunks; `decay` now holds
    #     each chunk's total decay. dlast, the gradient of the final state, enters at the very end.
    state = torch.zeros_like(h0[:, 0]) if dlast is None else dlast.reshape(b, g, dg, n).transpose(-1, -2)
    ends = [state] * K
    for k in reversed(range(K)):
        ends[k] = state
        state = torch.addcmul(out[:, k], decay[:, k], state)
    s = torch.stack(ends, 1)                                      # (b, K, g, n, d/g)  exp(Δ_{t+1}A)·ĝ_{t+1}
    del decay, out

    # (3) Sub-blocks, last first: recompute their states from the kept start, walk back through them.
    dA = torch.zeros_like(h0)                                     # Σ_t Δ_t·∂loss/∂(Δ_t A); summed over b, K at the end
    (du, du_s), (ddelta, ddelta_s) = _new_steps(u, b, g, dg, K, T), _new_steps(u, b, g, dg, K, T)
    (dB, dB_s), (dC, dC_s) = _new_steps(B, b, g, n, K, T), _new_steps(C, b, g, n, K, T)
    for first in reversed(range(0, T, sub)):
        block = range(first, min(first + sub, T))
        hs = [kept.pop()]                                         # hs[-1] = h_{t-1} when at step t
        for t in block:
            hs.append(_advance(hs[-1], _decay(dts[t], A2), dts[t] * us[t], Bs[t]))
        for t in reversed(block):
            dt, u_t, B_t, C_t, dy_t = dts[t], us[t], Bs[t], Cs[t], dys[t]
            grad_h = torch.addcmul(s, C_t[..., None], dy_t[..., None, :])        # ĝ_t  (b, K, g, n, d/g)
            # Σ_d dy·h_t, Σ_d Δu·ĝ_t: (b, K, g, n);  Σ_n B·ĝ_t: (b, K, g, d/g)
            dC_s[t] = (dy_t[..., None, :] @ hs.pop().transpose(-1, -2)).squeeze(-2)
            dB_s[t] = ((dt * u_t)[..., None, :] @ grad_h.transpose(-1, -2)).squeeze(-2)
            gB = (B_t[..., None, :] @ grad_h).squeeze(-2)
            s = _decay(dt, A2).mul_(grad_h)                       # exp(Δ_t A)·ĝ_t, sent to step t − 1
            q = s * hs[-1]                                        # ∂loss/∂(Δ_t A) = ĝ_t ⊙ exp(Δ_t A) ⊙ h_{t-1}
            dA.addcmul_(q, dt[..., None, :])
            ddelta_s[t] = u_t * gB + (q * A_n).sum(-2)            # (b, K, g, d/g)
            du_s[t] = dt * gB
    dA = dA.sum((0, 1)).transpose(-1, -2).reshape(d, n)
    return du, ddelta, dA, dB.view(B.shape), dC.view(C.shape)


class _ChunkedScan(torch.autograd.Function):
    """y, last_state = scan(u, delta, A, B, C); saves only the inputs and the chunk start states."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, T: int):
        y, last, h0 = _scan_forward(u, delta, A, B, C, T)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        ctx.T = T
        ctx.set_materialize_grads(False)                         # dy or dlast is None when unused
        return y, last

    @staticmethod
    def backward(ctx, dy: Tensor | None, dlast: Tensor | None):
        u, delta, A, B, C, h0 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        return (*_scan_backward(u, delta, A, B, C, h0, dy.contiguous(), dlast, ctx.T), None)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, chunk_size: int = 32) -> Tensor | tuple[Tensor, Tensor]:
    """Chunk-parallel selective scan: same arguments, layout and results as `selective_scan_ref`.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,); z: (b, d, l).
    Any l works: the tail is padded with identity steps (Δ = 0 so exp(Δ·A) = 1, and B = C = 0).
    chunk_size: steps per chunk T; the work is ~T sequential steps plus l/T carries. On 2 CPU cores 32 is
    best at l = 4k; 16 is ~30% faster at l = 1k, 64 ~10% faster at l = 16k (d = 64, n = 16).
    Returns y (b, d, l), and the final state (b, d, n) if `return_last_state`.
    """
    b, d, l = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]                      # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    B4, C4 = (B, C) if B.dim() == 4 else (B.unsqueeze(1), C.unsqueeze(1))   # (b, g, n, l)
    T = max(1, min(chunk_size, l))                                # one chunk if the sequence is short
    pad = (-l) % T
    u_p, delta_p, B_p, C_p = ((F.pad(x, (0, pad)) if pad else x).contiguous() for x in (u, delta, B4, C4))
    y, last = _ChunkedScan.apply(u_p, delta_p, A.contiguous(), B_p, C_p, T)
    y = y[..., :l]                                               # (b, d, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, last) if return_last_state else y


# ----------------------------------------------------------------------------------------------------
# SS2D: four scan routes over an image (VMamba)
# ----------------------------------------------------------------------------------------------------

class SS2D(nn.Module):
    """2-D selective scan block, (b, dim, h, w) -> (b, dim, h, w).

    in_proj to 2E channels (x, z); depthwise 3×3 conv + SiLU on x; four selective scans over the h·w
    pixels — row-major, column-major, and both reversed — each with its own Δ/B/C projections, A and D;
    the four outputs are put back in image order and summed; LayerNorm; gate with silu(z); out_proj.
    Each pixel thus sees the whole image: the row-major scan reaches it from every earlier row (and the
    earlier pixels of its own), its reverse from every later one, and the column-major pair likewise by columns.
    Parameters with a leading dimension 4 are per route, in the order above.
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
        bsz, _, hh, ww = x.shape
        E, n, R, l = self.E, self.n, self.R, hh * ww
        x, z = self.in_proj(x.permute(0, 2, 3, 1)).chunk(2, dim=-1)          # (b, h, w, E) each
        x = F.silu(self.conv(x.permute(0, 3, 1, 2)))                          # (b, E, h, w)

        rows = x.flatten(2)                                                   # (b, E, l) row-major
        cols = x.transpose(2, 3).flatten(2)                                   # (b, E, l) column-major
        xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)   # (b, 4, E, l)
        x_dbl = torch.einsum("bkel,kce->bkcl", xs, self.x_proj_weight)        # (b, 4, R + 2n, l)
        dts, Bs, Cs = x_dbl.split([R, n, n], dim=2)                           # Bs, Cs (b, 4, n, l)
        dts = torch.einsum("bkrl,ker->bkel", dts, self.dt_proj_weight)        # (b, 4, E, l)
        # One scan call for all four routes: routes are stacked as channel groups (4E channels, B/C in
        # g = 4 groups), so the chunked scan's sequential loop runs once on tensors four times larger,
        # instead of four times on small ones.
        ys = selective_scan(xs.reshape(bsz, 4 * E, l), dts.reshape(bsz, 4 * E, l),
                            -torch.exp(self.A_log).view(4 * E, n), Bs, Cs, D=self.D.view(-1),
                            delta_bias=self.dt_proj_bias.view(-1), delta_softplus=True)
        ys = ys.view(bsz, 4, E, l)
        # Back to image order: undo the reversal, then the transpose; sum the routes.
        y_rows = ys[:, 0] + ys[:, 2].flip(-1)                                 # (b, E, l) row-major
        y_cols = (ys[:, 1] + ys[:, 3].flip(-1)).view(bsz, E, ww, hh).transpose(2, 3)
        y = y_rows.view(bsz, E, hh, ww) + y_cols                              # (b, E, h, w)
        y = self.norm(y.permute(0, 2, 3, 1)) * F.silu(z)                      # (b, h, w, E)
        return self.out_proj(y).permute(0, 3, 1, 2)                           # (b, dim, h, w)
