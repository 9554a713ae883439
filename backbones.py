"""
Other bodies for Pixel-SSR's universal paradigm (paper Sec. 4.3, Tables 2 and 13): the networks the
paper puts in the dotted box of Fig. 3 in place of DyPro-Mamba's U of PromptSSMs, sharing the same
DRPN, point spectra and losses. Each is written from its own paper; widths and stage counts are the
published ones, so that parameter counts can be checked against the published figures.

  - MSTPlusPlus: MST++ (Cai et al., "MST++: Multi-stage Spectral-wise Transformer for Efficient Spectral
    Reconstruction", CVPRW 2022, NTIRE 2022 winner): three MSTs in a row, each a two-level U of
    spectral-wise attention blocks. 1.62 M parameters.
  - HSCNNPlus: HSCNN+ (Shi et al., "HSCNN+: Advanced CNN-Based Hyperspectral Recovery from RGB Images",
    CVPRW 2018, NTIRE 2018 winner), its dense variant HSCNN-D: a chain of dense blocks, each widening into
    two paths (3x3 then 1x1 convolutions) and adding 32 channels; at the depth of the NTIRE 2022 benchmark
    (30 blocks, as in the MST++ paper's table), 4.65 M parameters.

One interface (pixelssr.PromptSSMU's): `prompt_shapes(cfg)` (the blocks that take a spectral prompt
P_spe: none here, they have no slot for one, so the DRPN builds no P_spe for them), `multiple` (what the
height and width must divide), `out` (the last layer), and forward(rgb (b, 3, h, w), y3 (b, 31, h, w),
p_spe) -> (b, 31, h, w). Where the published networks take the RGB image alone, these take the RGB image
and the DRPN's preliminary HSI Y3 stacked (3 + 31 channels) in their first convolution: that is what
"sharing the same DRPN" changes in them.

Glossary: X = rgb, Y3 = y3 (the DRPN's preliminary HSI); S-MSA = spectral-wise multi-head self-attention
(attention over channels, not pixels); MSAB = spectral-wise attention block (S-MSA, then an FFN).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from maektsr import MAEKTSR
from pixelssr import Config, DyProMamba, LayerNorm2d, PromptSSMU, channel_attention, no_prompts


# -----------------------------------------------------------------------------
# MST++ (Cai et al. 2022)

class SpectralMSA(nn.Module):
    """S-MSA (MST, Cai et al. CVPR 2022, Sec. 3.3): self-attention across channels. Q, K, V are linear maps
    of the channels (no bias); per head of d channels, A = softmax(sigma . K^ Q^T) (d x d, q and k
    L2-normalised over pixels, a learnable temperature sigma per head), the output is proj(A V) plus a
    position embedding of V (depthwise 3x3, GELU, depthwise 3x3), since channel attention alone cannot
    see where a pixel is."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.sigma = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Conv2d(dim, dim, 1)
        self.pos = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.GELU(),
                                 nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)  # (b, heads, d, L)
        attn = channel_attention(q, k, self.sigma)  # (b, heads, d, d)
        return self.proj((attn @ v).reshape(b, c, h, w)) + self.pos(v.reshape(b, c, h, w))


class FFN(nn.Module):
    """MST++'s feed-forward network: 1x1 up (x mult), GELU, depthwise 3x3, GELU, 1x1 down, no biases."""

    def __init__(self, width: int, mult: int):
        super().__init__()
        hidden = mult * width
        self.net = nn.Sequential(
            nn.Conv2d(width, hidden, 1, bias=False), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.GELU(),
            nn.Conv2d(hidden, width, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MSAB(nn.Module):
    """Spectral-wise attention block: x += S-MSA(x) (MST applies it to x unnormalised); x += FFN(LN(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = SpectralMSA(dim, heads)
        self.norm, self.ffn = LayerNorm2d(dim), FFN(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(self.norm(x))


class MST(nn.Module):
    """One stage of MST++: a U with `levels` down-samplings, one MSAB per level on the way down, at the
    bottom and on the way up. Level i has dim.2^i channels in 2^i heads of `dim` channels each; down:
    conv 4x4 stride 2 (doubling the channels), up: transposed conv 2x2 stride 2, fused with the skip by a
    1x1 conv; a residual over the whole stage."""

    def __init__(self, dim: int, levels: int = 2):
        super().__init__()
        widths = [dim * 2**i for i in range(levels + 1)]  # 31, 62, 124
        self.embed = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.enc = nn.ModuleList(MSAB(c, c // dim) for c in widths[:-1])
        self.down = nn.ModuleList(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1, bias=False) for c in widths[:-1])
        self.bottom = MSAB(widths[-1], widths[-1] // dim)
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2) for c in reversed(widths[:-1]))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * c, c, 1, bias=False) for c in reversed(widths[:-1]))
        self.dec = nn.ModuleList(MSAB(c, c // dim) for c in reversed(widths[:-1]))
        self.mapping = nn.Conv2d(dim, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, skips = self.embed(x), []
        for block, down in zip(self.enc, self.down):
            f = block(f)
            skips.append(f)
            f = down(f)
        f = self.bottom(f)
        for up, fuse, block in zip(self.up, self.fuse, self.dec):
            f = block(fuse(torch.cat([up(f), skips.pop()], 1)))
        return self.mapping(f) + x


class MSTPlusPlus(nn.Module):
    """MST++: conv_in (3x3) to 31 channels, three MSTs in a row, conv_out (3x3), a residual over the stages.
    Here conv_in takes X and Y3 (34 channels) instead of X (3)."""

    multiple = 4  # two down-samplings per MST
    prompt_shapes = staticmethod(no_prompts)

    def __init__(self, cfg: Config, stages: int = 3):
        super().__init__()
        nb = cfg.bands
        self.conv_in = nn.Conv2d(3 + nb, nb, 3, padding=1, bias=False)
        self.stages = nn.Sequential(*(MST(nb) for _ in range(stages)))
        self.out = nn.Conv2d(nb, nb, 3, padding=1, bias=False)

    def forward(self, rgb: torch.Tensor, y3: torch.Tensor, p_spe=None) -> torch.Tensor:
        x = self.conv_in(torch.cat([rgb, y3], 1))  # (b, 31, h, w)
        return self.out(self.stages(x)) + x


# -----------------------------------------------------------------------------
# HSCNN+ (Shi et al. 2018), the dense variant HSCNN-D

class PathWidening(nn.Module):
    """HSCNN+'s path-widening: two parallel paths, each a 3x3 conv to `width` channels then a 1x1 conv to
    `narrow`, ReLU after each; all four maps are concatenated (2 (width + narrow) channels out)."""

    def __init__(self, cin: int, width: int, narrow: int):
        super().__init__()
        self.paths = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.Conv2d(width, narrow, 1, bias=False)])
            for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for wide, thin in self.paths:
            a = F.relu(wide(x))
            maps += [a, F.relu(thin(a))]
        return torch.cat(maps, 1)


class DenseFusionBlock(nn.Module):
    """One dense block of HSCNN-D: squeeze its input to 128 channels (1x1), widen into two paths (32 + 16
    channels each), fuse them to 32 new channels (1x1) and append those to the input (dense connection)."""

    growth = 32

    def __init__(self, cin: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, 128, 1, bias=False)
        self.widen = PathWidening(128, 32, 16)
        self.fuse = nn.Conv2d(2 * (32 + 16), self.growth, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = F.relu(self.fuse(self.widen(F.relu(self.squeeze(x)))))
        return torch.cat([x, new], 1)


class HSCNNPlus(nn.Module):
    """HSCNN-D: a path-widening stem (128 channels), `blocks` dense blocks (128 + 32 i channels in), and a
    1x1 conv of all the accumulated channels to 31 bands. Here the stem takes X and Y3 (34 channels)."""

    multiple = 1  # no down-sampling
    prompt_shapes = staticmethod(no_prompts)

    def __init__(self, cfg: Config, blocks: int = 30):
        super().__init__()
        self.stem = PathWidening(3 + cfg.bands, 32, 32)  # 128 channels
        self.blocks = nn.Sequential(*(DenseFusionBlock(128 + DenseFusionBlock.growth * i) for i in range(blocks)))
        self.out = nn.Conv2d(128 + DenseFusionBlock.growth * blocks, cfg.bands, 1, bias=False)

    def forward(self, rgb: torch.Tensor, y3: torch.Tensor, p_spe=None) -> torch.Tensor:
        return self.out(self.blocks(self.stem(torch.cat([rgb, y3], 1))))


# cfg.backbone -> the body class that pixelssr.DyProMamba(cfg, body=...) builds (--backbone, Table 2)
BODIES = {"dypro": PromptSSMU, "mst++": MSTPlusPlus, "hscnn+": HSCNNPlus, "maektsr": MAEKTSR}
# the bodies' own parameter counts in their papers (MST++: its Table 1; HSCNN+: the MST++ paper's table at
# its 30 blocks), published for RGB input: checked by the tests, printed by bench.py
PAPER_PARAMS = {"mst++": 1.62e6, "hscnn+": 4.65e6}


def network(cfg: Config) -> DyProMamba:
    """The whole network of a configuration: the DRPN, the body cfg.backbone names, the output layer."""
    if cfg.backbone not in BODIES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}: use one of {', '.join(BODIES)}")
    return DyProMamba(cfg, body=BODIES[cfg.backbone])
