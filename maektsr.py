"""
MAE-KTSR, the second method of the project, in one file read top to bottom.

Paper: "Masked Autoencoder-Based Knowledge Transfer for Spectral Reconstruction From RGB Images" (Feng, Wang,
Huang, Wang, Zhu, Gamba, IEEE TCI 11, 2025). Only its abstract is public (../shared/seeds/002_*.txt): two
stages. Stage 1, S2-MAE, reconstructs spectral images from partially masked inputs "under constrained spectral
conditions" and so learns a spectral representation. Stage 2, a lightweight CNN, reconstructs the HSI from RGB
and takes that representation in through an Inter-Stage Feature Fusion module (ISFF). Everything below the
abstract's level is ours, chosen from the closest public work (SpectralMAE, SS-MAE, MAE, MAE-FAR) and listed
under the assumptions; the code marks each where it is made: (A1) ... (A13).

What is here, in reading order:
  - tokens: patchify, unpatchify, the sin-cos embeddings, draw_mask               stage 1
  - Block (pre-norm ViT block), Encoder, S2MAE and its loss                        stage 1
  - SEResBlock, local_attention, ISFF, MAEKTSR, the body of pixelssr's paradigm    stage 2
  - encoder_state, load_encoder, pretrain_step: what the training script calls
Sizes (defaults): S2-MAE about 1 M parameters, stage 2 about 0.75 M trainable with the encoder frozen; the
measured counts, parameters and MACs per part: `python bench.py --only bodies` (docs/performance.md, "Parameters and MACs").

Glossary (code name = symbol):
  hsi   = Y, the cube (b, 31, H, W)           rgb   = X = S.Y (b, 3, H, W)      srf = S (3, 31)
  p     = cfg.patch, the token's side          n     = (H/p).(W/p) positions     keep = visible band tokens (b, n, 31)
  known = pixels whose spectrum the run has (b, 1, H, W); None: all (the "cubes" regime)
  tokens = the encoder's RGB-token grid (b, width, H/p, W/p), what stage 2 reads

Assumptions (the abstract is silent):
  A1  Tokens: p x p patches, p = 8. One RGB token per position (its 3.p^2 values) and one band token per
      (position, band) (its p^2 values), as SpectralMAE's band tokens; SS-MAE's spatial and spectral views
      become one sequence, spatial masking removing positions and band masking removing bands.
  A2  The "constrained spectral condition": the RGB tokens are never masked, so the visible input always holds
      the camera's view X = S.Y; masking removes band tokens only. Ratio 1 (RGB tokens alone) is the
      stage-2 case, so pre-training draws it for a quarter of the samples and train and test agree.
  A3  Masking, per sample: a band ratio r ~ U(0.6, 0.97), r = 1 with probability 0.25, and half the positions
      lose all their band tokens; counts are exact (floored, as MAE's). The RGB-only draw applies in every
      masking mode: "spectral" (no spatial masking) and "spatial" (no band masking) change only the rest.
  A4  Embeddings are fixed sin-cos: the 2-D position (MAE's) in the first 3/4 of the channels, the band's
      wavelength index in the last 1/4, concatenated as SatMAE does with its band groups, so the two codes
      share no channel. Fixed, not learnable: they work at any grid size (any window of A13), and they
      give neighbouring wavelengths similar codes without having to learn it from a few scenes.
  A5  Encoder: MAE's pre-norm ViT, width 128, 4 blocks, 4 heads, MLP x4. Samples of a batch keep their own
      ratios, so their visible counts differ: the band tokens are padded to the batch's largest count and
      the padding is masked out of attention (keys), and padded slots hold zeros.
  A6  Decoder: one query per position, the encoder's output at that position's RGB token, 2 blocks of width 64,
      a linear head to the 31.p^2 values. No mask tokens: every position keeps its RGB token. Reading only the
      RGB tokens makes pre-training teach exactly the grid stage 2 reads (S2MAE.encode_rgb).
  A7  Loss: MSE over the masked entries (MAE's loss on removed tokens, on raw values: no per-patch
      normalisation, since a spectrum's level matters here) + 0.1 MSE over visible entries + 0.01 SAM
      (radians, per known pixel) + 0.1 camera consistency mean (S.Y_hat - X)^2 over all pixels. The weights
      are small by design and untuned.
  A8  The "points" regime (only labelled pixels' spectra are known): band tokens carry the known pixels' values
      (unknown entries 0) and the known mask as p^2 more inputs; a band token with no known pixel is never
      visible; the spectral terms count known pixels only; the camera term, which reads X alone, counts all.
      Unknown spectra are selected away by torch.where before any arithmetic, so they influence nothing.
  A9  Stage 2: conv3 34 -> 64 (RGB and Y3 stacked, as backbones.py's bodies), 8 residual blocks with
      squeeze-excitation (RCAN's, reduction 4), a residual over the blocks, conv3 64 -> 31 (`out`).
  A10 ISFF after blocks 2, 4 and 6: the token grid, 1x1-projected and bilinearly upsampled, plus cross-attention
      from each pixel's CNN feature to the 3 x 3 tokens around its patch, added through a per-channel scale that
      starts at 0 (MAE-FAR), so training starts as the plain CNN. Local, not global: the tokens already hold
      their window's context (the encoder attends across it, A13), and global pixel-to-token attention
      costs 2.pixels.tokens.c multiply-adds per ISFF (at 512 x 512: 2.512^2.64^2.64, some 10^11), which
      whole-image evaluation cannot pay.
  A11 Freezing (Config.mae_freeze): "all" (default): the encoder is frozen and run without autograd; "last": its
      last block and final norm train, the rest is frozen; "none": all of it trains.
  A12 Inputs are used as they are, values in [0, 1]: no normalisation that pre-training and stage 2 would
      have to share.
  A13 Stage 2 runs the encoder window by window, over windows of Config.mae_window pixels (fit sets it to its
      --patch), at training and at inference alike: attention then spans the context the encoder and ISFF
      were trained on. The last window of a row or column ends flush with the image, overlapping the one
      before, so that every window is full-size where the image is. A4's embeddings do extend to a whole
      image, but attention over 64 times the tokens it was trained on does not: an S2-MAE pre-trained on
      64 x 64 crops reconstructs a 512 x 512 scene from its RGB several dB worse in one piece than window by
      window (docs/results.md, "MAE-KTSR").
"""

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelssr import Config, LayerNorm2d, conv3, no_prompts


@dataclass
class MAEConfig:
    bands: int = 31                 # the project's 400-700 nm in 10 nm steps
    patch: int = 8                  # p (A1): 256 positions in a 128 x 128 crop, few enough for global attention
    width: int = 128                # encoder width, a multiple of 16 (A4's channel split); ~1 M parameters in all
    depth: int = 4                  # encoder blocks
    heads: int = 4                  # encoder heads, 32 channels each
    mlp: int = 4                    # MLP hidden width = mlp * width, as ViT
    dec_width: int = 64             # the decoder is narrower than the encoder, as MAE's: it is dropped at stage 2
    dec_depth: int = 2
    dec_heads: int = 4
    band_ratio: tuple[float, float] = (0.6, 0.97)  # the range of a sample's band mask ratio (A3)
    rgb_only: float = 0.25          # probability of ratio 1, the stage-2 case (A2)
    spatial_ratio: float = 0.5      # fraction of positions that lose all their band tokens (A3)
    masking: str = "both"           # "both", "spectral" (no spatial masking) or "spatial" (no band masking): ablations
    w_visible: float = 0.1          # loss weights (A7): visible entries, a copying task, weigh little
    w_sam: float = 0.01             # the angle in radians has far larger gradients than the MSE on [0, 1] values
    w_camera: float = 0.1           # mean (S.Y_hat - X)^2, in the MSE's units


# -----------------------------------------------------------------------------
# Tokens (stage 1)

def _grid(x: torch.Tensor, p: int) -> tuple[int, int]:
    """(H/p, W/p) of a (b, c, H, W) tensor; H and W must be multiples of p (callers pad)."""
    h, w = x.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"height and width must be multiples of the patch {p}, got {h} x {w}")
    return h // p, w // p


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(b, c, H, W) -> (b, n, c, p*p), positions in row-major order."""
    b, c = x.shape[:2]
    gh, gw = _grid(x, p)
    return x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p * p)


def unpatchify(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(b, n, c, p*p) -> (b, c, gh.p, gw.p), the inverse of patchify."""
    b, _, c, pp = x.shape
    p = round(pp ** 0.5)
    return x.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)


def sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(L,) positions -> (L, dim): [sin | cos] at dim/2 frequencies 1/10000^(k/(dim/2)), the formula of MAE's embeddings."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    arg = pos.double()[:, None] * omega
    return torch.cat([arg.sin(), arg.cos()], 1).float()


@lru_cache(maxsize=64)
def grid_embedding(gh: int, gw: int, dim: int) -> torch.Tensor:
    """(gh.gw, dim) 2-D sin-cos of each position, row code then column code; any grid size (A4). On the CPU."""
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([sincos(rows.flatten(), dim // 2), sincos(cols.flatten(), dim // 2)], 1)


def draw_mask(cfg: MAEConfig, b: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which band tokens the encoder sees (A3): keep (b, n, bands) bool, True = visible.

    Every draw comes from `generator` (a CPU one: the mask is drawn on the CPU), the same draws whatever
    the outcome, so a seed fixes the masks of a whole run. RGB tokens are not in it: they are never masked (A2).
    """
    if cfg.masking not in ("both", "spectral", "spatial"):
        raise ValueError(f"masking must be both, spectral or spatial, got {cfg.masking!r}")
    nb = cfg.bands
    rgb_only = torch.rand(b, generator=generator) < cfg.rgb_only
    lo, hi = cfg.band_ratio
    ratio = lo + (hi - lo) * torch.rand(b, generator=generator)
    pos_noise = torch.rand(b, n, generator=generator)
    tok_noise = torch.rand(b, n, nb, generator=generator)
    n_off = int(cfg.spatial_ratio * n) if cfg.masking != "spectral" else 0
    on = pos_noise.argsort(1).argsort(1) >= n_off  # (b, n): positions that keep band tokens
    if cfg.masking == "spatial":
        keep = on[:, :, None].expand(b, n, nb).clone()
    else:
        n_keep = ((1 - ratio) * (n - n_off) * nb).floor().long()  # (b,)
        tok_noise = torch.where(on[:, :, None], tok_noise, 2.0).flatten(1)  # removed positions rank last
        keep = (tok_noise.argsort(1).argsort(1) < n_keep[:, None]).view(b, n, nb)
    keep[rgb_only] = False  # ratio 1: RGB tokens alone
    return keep


# -----------------------------------------------------------------------------
# S2-MAE (stage 1)

class Block(nn.Module):
    """Pre-norm ViT block: x += attn(LN(x)); x += MLP(LN(x)). `mask` (b, 1, 1, L) bool: the keys attended to."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp * dim), nn.GELU(), nn.Linear(mlp * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, heads, L, d/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, L, d))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """What S2MAE.encode_rgb runs, and all that stage 2 keeps of stage 1: the RGB-token embedding, the blocks
    and the final norm. Band tokens are embedded by S2MAE, which only pre-training needs."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if cfg.width % 16:
            raise ValueError(f"the encoder width must be a multiple of 16 (A4's channel split), got {cfg.width}")
        self.cfg = cfg
        self.rgb_embed = nn.Linear(3 * cfg.patch ** 2, cfg.width)
        self.rgb_type = nn.Parameter(0.02 * torch.randn(cfg.width))  # marks RGB tokens, whose wavelength part is 0
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    def position(self, gh: int, gw: int) -> torch.Tensor:
        """(n, width): the position code in the first 3/4 of the channels, 0 in the wavelength quarter (A4)."""
        d = self.cfg.width
        return F.pad(grid_embedding(gh, gw, d - d // 4), (0, d // 4))

    def embed_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> RGB tokens (b, n, width); values as they come, no normalisation (A12)."""
        gh, gw = _grid(rgb, self.cfg.patch)
        return self.rgb_embed(patchify(rgb, self.cfg.patch).flatten(2)) + self.position(gh, gw).to(rgb) + self.rgb_type

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, frozen: int = 0) -> torch.Tensor:
        """Tokens (b, L, width), valid (b, L) bool (None: all) -> (b, L, width). The first `frozen` blocks run
        without autograd: nothing of them trains, so none of their activations are kept."""
        mask = None if valid is None or bool(valid.all()) else valid[:, None, None, :]  # (b, 1, 1, L): keys only (A5)
        grad = torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            with torch.set_grad_enabled(grad and i >= frozen):
                x = block(x, mask)
        return self.norm(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):  # MAE's initialisation
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


class S2MAE(nn.Module):
    """S2-MAE: RGB tokens and visible band tokens in, all 31 bands at every position out (A1-A7).

    pretrain=False builds only the Encoder (what encode_rgb runs): stage 2 has no use for the rest.
    """

    def __init__(self, cfg: MAEConfig | None = None, pretrain: bool = True):
        super().__init__()
        cfg = MAEConfig() if cfg is None else cfg
        self.cfg, p, d, dd = cfg, cfg.patch, cfg.width, cfg.dec_width
        self.encoder = Encoder(cfg)
        self.band_embed = nn.Linear(2 * p * p, d) if pretrain else None  # p^2 values, then p^2 known flags (A8)
        if pretrain:
            self.dec_embed = nn.Linear(d, dd)
            self.dec_blocks = nn.ModuleList(Block(dd, cfg.dec_heads, cfg.mlp) for _ in range(cfg.dec_depth))
            self.dec_norm, self.head = nn.LayerNorm(dd), nn.Linear(dd, cfg.bands * p * p)
        self.apply(_init)

    def tokens(self, hsi: torch.Tensor, rgb: torch.Tensor, keep: torch.Tensor,
               known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's input: n RGB tokens, then the visible band tokens padded to the batch's largest count.

        hsi (b, 31, H, W), rgb (b, 3, H, W), keep (b, n, 31) bool, known (b, 1, H, W) or None (all known).
        Returns x (b, n + k, width) and valid (b, n + k) bool, False on padding.
        """
        if self.band_embed is None:
            raise ValueError("this S2MAE was built for stage 2 (pretrain=False): it encodes RGB tokens only")
        p, nb = self.cfg.patch, self.cfg.bands
        gh, gw = _grid(hsi, p)
        known = torch.ones_like(hsi[:, :1], dtype=torch.bool) if known is None else known.bool()
        values = torch.where(known, hsi, 0.0)  # the one read of hsi: an unknown value never enters, not even as NaN*0 (A8)
        flags = patchify(known.to(hsi.dtype), p)  # (b, n, 1, p^2)
        raw = torch.cat([patchify(values, p), flags.expand(-1, -1, nb, -1)], -1).flatten(1, 2)  # (b, n.31, 2p^2)
        seen = (keep & (flags.sum(-1) > 0)).flatten(1)  # a band token without a known pixel is never visible (A8)
        count = seen.sum(1)
        k = int(count.max())
        idx = torch.argsort((~seen).to(torch.int8), dim=1, stable=True)[:, :k]  # (b, k): visible ones first
        valid = torch.arange(k, device=hsi.device) < count[:, None]  # (b, k)
        band = raw.gather(1, idx[..., None].expand(-1, -1, raw.shape[-1]))
        band = torch.where(valid[..., None], band, 0.0)  # padding holds zeros, not the masked token it points at
        d = self.cfg.width
        code = torch.cat([grid_embedding(gh, gw, d - d // 4).to(hsi)[idx // nb],
                          sincos(torch.arange(nb), d // 4).to(hsi)[idx % nb]], -1)  # (b, k, width): position | wavelength
        x = torch.cat([self.encoder.embed_rgb(rgb), self.band_embed(band) + code], 1)
        return x, torch.cat([valid.new_ones(valid.shape[0], gh * gw), valid], 1)

    def encode(self, hsi: torch.Tensor, rgb: torch.Tensor, keep: torch.Tensor,
               known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder over the visible tokens only -> (z (b, n + k, width), valid (b, n + k))."""
        x, valid = self.tokens(hsi, rgb, keep, known)
        return self.encoder(x, valid), valid

    def encode_rgb(self, rgb: torch.Tensor, frozen: int = 0) -> torch.Tensor:
        """The encoder on RGB tokens alone, the ratio-1 case (A2): (b, 3, H, W) -> grid (b, width, H/p, W/p).
        frozen > 0: the embedding and the first `frozen` blocks run without autograd (stage 2's freezing)."""
        gh, gw = _grid(rgb, self.cfg.patch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen == 0):
            x = self.encoder.embed_rgb(rgb)
        z = self.encoder(x, frozen=frozen)  # (b, n, width)
        return z.transpose(1, 2).reshape(z.shape[0], -1, gh, gw)

    def forward(self, hsi: torch.Tensor, rgb: torch.Tensor, keep: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        """-> Y_hat (b, 31, H, W): every band at every position, decoded from the RGB-token outputs (A6)."""
        gh, gw = _grid(hsi, self.cfg.patch)
        z, _ = self.encode(hsi, rgb, keep, known)
        y = self.dec_embed(z[:, :gh * gw]) + grid_embedding(gh, gw, self.cfg.dec_width).to(z)  # (b, n, dec_width)
        for block in self.dec_blocks:
            y = block(y)
        y = self.head(self.dec_norm(y))  # (b, n, 31.p^2)
        return unpatchify(y.view(y.shape[0], gh * gw, self.cfg.bands, -1), gh, gw)

    def loss(self, hsi: torch.Tensor, rgb: torch.Tensor, srf: torch.Tensor, keep: torch.Tensor,
             known: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The pre-training loss (A7, A8) -> {"masked", "visible", "sam", "camera", "total"}, scalars.

        masked / visible: mean squared error over the entries (band, pixel) of masked / visible band tokens
        at known pixels (0 where there are none); sam: mean angle in radians between Y_hat and Y over known
        pixels; camera: mean (S.Y_hat - X)^2 over all pixels. srf (3, 31).
        """
        cfg = self.cfg
        gh, gw = _grid(hsi, cfg.patch)
        pred = self(hsi, rgb, keep, known)
        known = torch.ones_like(hsi[:, :1], dtype=torch.bool) if known is None else known.bool()
        target = torch.where(known, hsi, 0.0)  # (b, 31, H, W)
        seen = unpatchify(keep[..., None].expand(-1, -1, -1, cfg.patch ** 2), gh, gw)  # entries of kept tokens
        # (tokens() also hides kept tokens without a known pixel: all their entries are unknown, counted nowhere)
        sq = (pred - target).square()

        def mean_over(sel: torch.Tensor) -> torch.Tensor:
            return torch.where(sel, sq, 0.0).sum() / sel.sum().clamp_min(1)

        px = known[:, 0]  # (b, H, W)
        yp, yt = pred.permute(0, 2, 3, 1)[px], target.permute(0, 2, 3, 1)[px]  # (pixels, 31)
        cos = (yp * yt).sum(1) / (yp.norm(dim=1) * yt.norm(dim=1)).clamp_min(1e-8)
        terms = {
            "masked": mean_over(known & ~seen),
            "visible": mean_over(known & seen),
            "sam": torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).mean() if len(cos) else pred.new_zeros(()),
            "camera": (torch.einsum("cn,bnhw->bchw", srf.to(pred), pred) - rgb).square().mean(),
        }
        terms["total"] = (terms["masked"] + cfg.w_visible * terms["visible"] + cfg.w_sam * terms["sam"]
                          + cfg.w_camera * terms["camera"])
        return terms


# -----------------------------------------------------------------------------
# Stage 2: the lightweight CNN with ISFF, a body of pixelssr's paradigm

class SEResBlock(nn.Module):
    """conv3, ReLU, conv3, squeeze-excitation (a per-channel gate from the pooled features), plus the input (A9)."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.body = nn.Sequential(conv3(c, c), nn.ReLU(), conv3(c, c))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // reduction, 1), nn.ReLU(),
                                nn.Conv2d(c // reduction, c, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y * self.se(y)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Each pixel attends to the 3 x 3 tokens around its own patch (A10); tokens past the border are left out.

    q (b, c, H, W) per pixel; k, v (b, c, gh, gw) per token, H = gh.p. Returns (b, c, H, W).
    """
    b, c, h, w = q.shape
    gh, gw = k.shape[-2:]
    p, d, n = h // gh, c // heads, gh * gw
    kv = F.unfold(torch.cat([k, v], 1), 3, padding=1)  # (b, 2c.9, n), channel-major
    k9, v9 = kv.view(b, 2, heads, d, 9, n).permute(1, 0, 5, 2, 4, 3).unbind(0)  # (b, n, heads, 9, d)
    inside = F.unfold(q.new_ones(1, 1, gh, gw), 3, padding=1) > 0  # (1, 9, n)
    qq = q.view(b, heads, d, gh, p, gw, p).permute(0, 3, 5, 1, 4, 6, 2).reshape(b, n, heads, p * p, d)
    # written out rather than through scaled_dot_product_attention: its fused kernels want 4-D inputs and limit
    # the batch dimension, here b.n, which a whole image makes large; the logits are only pixels x heads x 9
    logits = torch.einsum("bnhqd,bnhkd->bnhqk", qq, k9) / d ** 0.5  # (b, n, heads, p^2, 9)
    logits = logits.masked_fill(~inside.permute(0, 2, 1)[:, :, None, None, :], float("-inf"))
    out = torch.einsum("bnhqk,bnhkd->bnhqd", logits.softmax(-1), v9)  # (b, n, heads, p^2, d)
    return out.view(b, gh, gw, heads, p, p, d).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, h, w)


class ISFF(nn.Module):
    """Inter-Stage Feature Fusion (A10): x + scale * (up(P.tokens) + proj(local cross-attention(x -> tokens))).

    The 1x1 projection runs at token resolution before the bilinear upsampling: both are linear and the
    upsampling's weights sum to one, so the order changes nothing but the cost. scale starts at 0.
    """

    def __init__(self, c: int, token_width: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.tok = nn.Conv2d(token_width, 3 * c, 1)  # tokens -> upsampled branch, keys, values
        self.norm, self.q, self.proj = LayerNorm2d(c), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.scale = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        up, k, v = self.tok(tokens).chunk(3, 1)  # (b, c, gh, gw) each
        up = F.interpolate(up, size=x.shape[-2:], mode="bilinear", align_corners=False)
        att = local_attention(self.q(self.norm(x)), k, v, self.heads)
        return x + self.scale * (up + self.proj(att))


FREEZE = {"all", "none", "last"}


def windows(n: int, s: int, p: int) -> list[tuple[int, int]]:
    """(start, overlap) of A13's windows along a side of n pixels: every s pixels from 0, the last flush with
    the far edge (a full window where n >= s); overlap = its leading tokens of p pixels the window before
    already gives. n and s are multiples of p."""
    starts = sorted({*range(0, n - s + 1, s), max(n - s, 0)})
    return [(a, (before + s - a) // p if k else 0) for k, (before, a) in enumerate(zip([0, *starts], starts))]


class MAEKTSR(nn.Module):
    """MAE-KTSR's stage 2 as a body of pixelssr's paradigm (PromptSSMU's interface): no P_spe, `multiple`
    the MAE patch, `out` the last conv; forward(rgb (b, 3, h, w), y3 (b, 31, h, w), p_spe=None) -> (b, 31, h, w).

    The S2-MAE encoder sits at self.mae, randomly initialised (load_encoder puts pre-trained weights in);
    with cfg.use_isff off there is neither ISFF nor encoder: the stage-2 CNN alone.
    """

    prompt_shapes = staticmethod(no_prompts)

    def __init__(self, cfg: Config, mae_cfg: MAEConfig | None = None, width: int = 64, blocks: int = 8,
                 fuse_after: tuple[int, ...] = (2, 4, 6)):
        super().__init__()
        mae_cfg = MAEConfig(bands=cfg.bands) if mae_cfg is None else mae_cfg
        if cfg.mae_freeze not in FREEZE:
            raise ValueError(f"mae_freeze must be all, none or last, got {cfg.mae_freeze!r}")
        self.freeze = cfg.mae_freeze
        self.window = max(1, cfg.mae_window // mae_cfg.patch) * mae_cfg.patch  # A13, whole tokens
        self.multiple = mae_cfg.patch  # also without ISFF, so that --no-isff pads exactly as the full body does
        self.conv_in = conv3(3 + cfg.bands, width)
        self.blocks = nn.ModuleList(SEResBlock(width) for _ in range(blocks))
        self.out = conv3(width, cfg.bands)
        self.mae = S2MAE(mae_cfg, pretrain=False) if cfg.use_isff else None
        self.isff = nn.ModuleDict({str(i): ISFF(width, mae_cfg.width) for i in fuse_after}) if cfg.use_isff else None
        if self.mae is not None:  # A11
            self.mae.requires_grad_(self.freeze == "none")
            if self.freeze == "last":
                self.mae.encoder.blocks[-1].requires_grad_(True)
                self.mae.encoder.norm.requires_grad_(True)

    def tokens(self, rgb: torch.Tensor) -> torch.Tensor:
        """The encoder's RGB-token grid (b, width, h/p, w/p), each window of self.window pixels encoded on its
        own (A13); where the last window overlaps the one before, its tokens past the overlap are kept."""
        (h, w), s, p = rgb.shape[-2:], self.window, self.mae.cfg.patch
        rows = [[self.encode_window(rgb[..., t:t + s, l:l + s])[..., i:, j:] for l, j in windows(w, s, p)]
                for t, i in windows(h, s, p)]
        return torch.cat([torch.cat(row, -1) for row in rows], -2)

    def encode_window(self, rgb: torch.Tensor) -> torch.Tensor:
        """encode_rgb on one window, (b, 3, hw, ww) -> (b, width, hw/p, ww/p), with autograd only where
        parameters train (A11)."""
        if self.freeze == "all":
            with torch.no_grad():
                return self.mae.encode_rgb(rgb)
        return self.mae.encode_rgb(rgb, frozen=self.mae.cfg.depth - 1 if self.freeze == "last" else 0)

    def forward(self, rgb: torch.Tensor, y3: torch.Tensor, p_spe: None = None) -> torch.Tensor:
        f0 = self.conv_in(torch.cat([rgb, y3], 1))  # (b, 64, h, w)
        tokens = self.tokens(rgb) if self.mae is not None else None
        x = f0
        for i, block in enumerate(self.blocks, 1):
            x = block(x)
            if self.isff is not None and str(i) in self.isff:
                x = self.isff[str(i)](x, tokens)
        return self.out(x + f0)


# -----------------------------------------------------------------------------
# What the training script calls

def encoder_state(mae: S2MAE) -> dict:
    """The pre-trained encoder, what stage 2 loads: {"config": MAEConfig as a dict, "encoder": state dict}
    (CPU tensors, for torch.save)."""
    return {"config": dataclasses.asdict(mae.cfg),
            "encoder": {k: v.detach().cpu().clone() for k, v in mae.encoder.state_dict().items()}}


def load_encoder(body: MAEKTSR, state: dict) -> None:
    """Loads encoder_state's output into body.mae; ValueError, in one sentence, where it does not fit."""
    if body.mae is None:
        raise ValueError("this body has no encoder to load into: it was built with use_isff off.")
    own, theirs = body.mae.encoder.state_dict(), state["encoder"]
    for key in sorted(own.keys() | theirs.keys()):
        a, b = tuple(theirs[key].shape) if key in theirs else None, tuple(own[key].shape) if key in own else None
        if a != b:
            raise ValueError(f"the encoder state does not fit this body: {key} is {a} in the state and {b} here.")
    if state["config"]["heads"] != body.mae.cfg.heads:  # the one architectural choice shapes do not show
        raise ValueError(f"the encoder state has {state['config']['heads']} heads and this body's encoder "
                         f"{body.mae.cfg.heads}.")
    body.mae.encoder.load_state_dict(theirs)


def pretrain_step(mae: S2MAE, optimizer: torch.optim.Optimizer, hsi: torch.Tensor, rgb: torch.Tensor,
                  srf: torch.Tensor, generator: torch.Generator, lr: float,
                  known: torch.Tensor | None = None) -> dict[str, float]:
    """One optimiser step of S2-MAE at learning rate lr on a batch: hsi (b, 31, H, W), rgb (b, 3, H, W),
    srf (3, 31); masks drawn from `generator` (CPU); known (b, 1, H, W): the "points" regime (A8), where
    hsi is read at known pixels only. Returns the loss terms as floats."""
    mae.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    gh, gw = _grid(hsi, mae.cfg.patch)
    keep = draw_mask(mae.cfg, hsi.shape[0], gh * gw, generator).to(hsi.device)
    terms = mae.loss(hsi, rgb, srf, keep, known)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}
