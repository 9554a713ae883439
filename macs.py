"""
Counting multiply-accumulates (MACs), three ways, each stated exactly (bench.py --only bodies prints them).

  macs          torch.utils.flop_counter's FLOPs / 2 less SS2D's zero blocks ("flop/2"): what torch's own counter
                says, beside the two counts below
  MACCount      two counts at once, per part of a model:
                "layers only", the paper's convention as best it can be inferred (thop-style: nn.Conv2d,
                nn.ConvTranspose2d and nn.Linear calls alone), and
                "real", the arithmetic the forward runs: every product, a complex one as four real ones,
                and the selective scan's recurrence
  count_parts   parameters and both counts per part (PARTS) of a backbones.network

Why two: the paper's Table 4 gives P_spa ~0.05 G, far less than its FRFT alone computes, so its counter
saw convolutions and linear layers only (docs/design.md, "Model size", and test_macs.py compare under it); a reader comparing proportions needs that count, and a reader
sizing hardware needs the real one.
"""

import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import pixelssr as P
import ssm
from ssm import SS2D


def ss2d_zero_macs(block: SS2D, x: torch.Tensor) -> int:
    """The multiply-adds by zero in one forward of `block` on x (b, dim, h, w), which a product counter takes
    for work: the k routes scanned together get their Δ projections as one block-diagonal (kE, kR) matrix
    (ssm.SS2D.delta), k² blocks of which only the k diagonal ones are the routes' own (E, R) projections."""
    b, _, h, w = x.shape
    # all four routes in one call: 16ER per pixel counted, 4ER done; SS2D.paired: 2 x 4ER counted
    zero = 4 if SS2D.paired(x) else 12
    return b * h * w * zero * block.E * block.R


def macs(fn: Callable[[], object]) -> float:
    """Multiply-accumulates of fn(), a forward pass: torch.utils.flop_counter's FLOPs / 2, the count papers
    call FLOPs, less the zero blocks of each SS2D's block-diagonal Δ projection (ss2d_zero_macs). This is
    flop_counter's convention ("flop/2" in bench_bodies): a complex
    product counts as one real product, the selective scan's recurrence not at all, and CPU attention
    (scaled_dot_product_attention's CPU kernel, which flop_counter does not know) not at all; MACCount
    counts those too. (Only forwards are corrected: a backward in fn would count the Δ matrix's two
    products in full.)"""
    zero_blocks = []

    def count(module, args, output):
        if isinstance(module, SS2D):
            zero_blocks.append(ss2d_zero_macs(module, args[0]))

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        hook.remove()
    return counter.get_total_flops() / 2 - sum(zero_blocks)


def layer_macs(module: nn.Module, args: tuple, output: object) -> int:
    """The layers-only MACs of one call of `module` (0 for modules that are not such layers): an nn.Conv2d or
    nn.ConvTranspose2d (output elements) x (input channels / groups) x (kernel size product), an nn.Linear
    (output elements) x in_features, as thop counts them, and an SS2D's in_proj (see below)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, SS2D):
        # in_proj is an nn.Linear that SS2D applies by halves through F.linear (to keep z out of the scans'
        # memory), so its own hook never fires; VMamba calls it as a layer, so a layer counter counts it there
        x = args[0]  # (b, dim, h, w)
        return x.numel() * module.in_proj.out_features
    return 0


# The real count's ops: flop_counter's formulas (FLOPs, two per multiply-add) for matrix products,
# convolutions and attention kernels, and the CPU attention kernel, which flop_counter does not list
_FLOP_FORMULAS = {**flop_registry, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                  flop_registry[torch.ops.aten._scaled_dot_product_flash_attention]}


class MACCount(TorchDispatchMode):
    """Multiply-accumulates (MACs) of the forward passes run inside `with MACCount(model, parts) as count:`,
    counted two ways, each a Counter {part: MACs} (parts None: everything under "all"):

    count.layers, "layers only", the paper's convention as best it can be inferred (thop's count of these
      layers; fvcore would count functional products too): each call of an nn.Conv2d or nn.ConvTranspose2d,
      (output elements) x (input channels / groups) x (kernel size product), and of an nn.Linear, (output
      elements) x in_features (layer_macs; SS2D's in_proj, applied through F.linear, included). Nothing
      else: not functional matrix products (SS2D's x_proj and dt_proj, the FRFT's), not attention products,
      not the selective scan's recurrence, not norms, activations, biases or other element-wise ops. (A
      transposed conv so counted is stride² over its real MACs, as in thop.)
    count.real, the arithmetic the forward runs: every matrix product and convolution at the aten level
      (mm, addmm, bmm, baddbmm, convolution, attention kernels; flop_counter's formulas / 2), a product of
      complex inputs 4 times (four real products; flop_counter counts it as one), less the zero blocks of
      SS2D's block-diagonal Δ projection (ss2d_zero_macs); plus, per call of the chunked selective scan
      (ssm._selective_scan, which ssm.selective_scan and SS2D run), 2·b·d·l·n: b·d·l·n for the state
      update h = exp(Δ·A)·h + Δ·B·u and b·d·l·n for the read-out C·h, one multiply-add per state element
      and step each. Not counted: exp, the products Δ·A and Δ·u, the skip D·u, the scan's padding steps,
      norms, activations, biases and other element-wise ops.

    parts: {part: module names of `model`}; an op (or a layer) belongs to the part with the longest name
    that is, or contains, the innermost running module of `model` ("" names the model itself). Forward
    passes only: the Δ correction and the scan count know nothing of backwards.
    """

    def __init__(self, model: nn.Module | None = None, parts: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.names = {m: name for name, m in model.named_modules()} if model is not None else {}
        self.parts = parts or {"all": ("",)}
        self.running: list[nn.Module] = []  # the modules whose forward is under way, outermost first
        self.layers, self.real = Counter(), Counter()

    def part(self, name: str) -> str:
        """The part of the module called `name` (dotted, as named_modules has it)."""
        owners = [(len(p), part) for part, names in self.parts.items() for p in names
                  if p == "" or name == p or name.startswith(p + ".")]
        return max(owners, default=(0, "other"))[1]

    def current(self) -> str:
        """The part of the innermost running module that belongs to `model`."""
        return self.part(next((self.names[m] for m in reversed(self.running) if m in self.names), ""))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.running.append(module)

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        part = self.current()  # the module is still on the stack: its own part, if it has one
        self.layers[part] += layer_macs(module, args, output)
        if isinstance(module, SS2D):
            self.real[part] -= ss2d_zero_macs(module, args[0])
        self.running.pop()

    def _scan(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b, d, l = u.shape  # A (d, n)
        self.real[self.current()] += 2 * b * d * l * A.shape[1]
        return self._scan_impl(u, delta, A, *args, **kwargs)

    def __enter__(self) -> "MACCount":
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                       torch.nn.modules.module.register_module_forward_hook(self._leave)]
        # The scan's arithmetic is element-wise ops, which no product counter sees; the one place that knows
        # its b, d, l, n is its call, so the count wraps the function that ssm.selective_scan calls by name.
        self._scan_impl, ssm._selective_scan = ssm._selective_scan, self._scan
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        ssm._selective_scan = self._scan_impl
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            complex_product = any(isinstance(a, torch.Tensor) and a.is_complex() for a in args)
            self.real[self.current()] += formula(*args, **kwargs, out_val=out) // 2 * (4 if complex_product else 1)
        return out


# The parts bench_bodies prints, as MACCount's parts of a backbones.network: the DRPN's F1 (shared by both
# spatial branches), its three prompts, what its ablation switch takes away (cfg.use_spa: the Spa-FRFT
# branch), and the Y path of Eq. (6)-(7) (Y1 to Y3, with the DRPN's own glue); the output head is the body's
# last conv and DyProMamba's own forward (|.|); H2R, the training-only head of L_P2I.
PARTS = {"F1": ("drpn.f1",), "P_spa": ("drpn.spa",), "P_hf": ("drpn.hf",), "P_spe": ("drpn.spe",),
         "Y1-Y3": ("drpn",), "body": ("body",), "output head": ("", "body.out"), "H2R": ("h2r",)}


# What bench_bodies prints above its tables: what the two counts count (in full: MACCount's docstring)
COUNTS = """MACs of one forward in G (1e9 multiply-accumulates), two counts (macs.MACCount):
  layers-only, the paper's convention as best it can be inferred (thop-style): each nn.Conv2d and nn.ConvTranspose2d
    call (output elements) x (input channels / groups) x (kernel size product), each nn.Linear call (output
    elements) x in_features, SS2D's in_proj included (a transposed conv so counts stride^2 times its real MACs);
    NOT counted: functional matmuls (SS2D's x_proj, dt_proj), attention products, the FRFT, the selective scan's
    recurrence, norms, activations, biases
  real: every matmul, bmm, convolution and attention kernel run (flop_counter's formulas / 2), a product of complex
    inputs as 4 real ones, less SS2D's zero delta blocks; plus the selective scan's recurrence, 2.b.d.l.n per call
    (state update h = exp(dt.A).h + dt.B.u: b.d.l.n; read-out C.h: b.d.l.n); NOT counted: exp, other element-wise
    products and sums, norms, activations, biases
parts: F1 = the DRPN's shallow RGB feature; P_spa, P_hf, P_spe = its three prompts (Eq. 4, 5 and the spectral
  self-attention); Y1-Y3 = Eq. (6)-(7)'s convs and the DRPN's glue; body = Fig. 3's dotted box less its last conv;
  output head = that conv and |.|; H2R = the training-only head of L_P2I, run on the forward's Y3, not in the totals"""


def count_parts(model: P.DyProMamba, rgb: torch.Tensor, pts: torch.Tensor) -> tuple[Counter, Counter, Counter, float]:
    """(parameters, layers-only MACs, real MACs) per part (PARTS) of model(rgb, pts) and of its H2R (if built)
    on that forward's Y3, and the forward's MACs by `macs` (without H2R). rgb (b, 3, h, w), pts (b, 31, h, w)."""
    with torch.no_grad():
        model(rgb, pts)  # once first: work cached on a first call (frft's eigenbases) is no forward's
        flop2 = macs(lambda: model(rgb, pts))
        with MACCount(model, PARTS) as count:
            _, y3 = model(rgb, pts)
            if model.h2r is not None:
                model.h2r(y3)
    params = Counter()
    for name, p in model.named_parameters():
        params[count.part(name.rpartition(".")[0])] += p.numel()
    return params, count.layers, count.real, flop2


def inference_total(c: Counter) -> float:
    """A Counter's total less the training-only H2R."""
    return sum(v for part, v in c.items() if part != "H2R")


# -----------------------------------------------------------------------------
# The paper's Table 4 (CAVE; Table 12, NTIRE, agrees): DyPro-Mamba and its ablations, parameters in M and G MACs
# at 128x128 as the paper counts them, and the Config fields that build each
TABLE_4 = {"whole": ((0.61, 4.65), {}), "no P_spa": ((0.61, 4.60), {"use_spa": False}),
           "no P_hf": ((0.61, 4.63), {"use_hf": False}), "no P_spe": ((0.57, 4.24), {"use_spe": False}),
           "no DRPN": ((0.56, 4.18), {"use_drpn": False}), "no PromptSSM": ((0.56, 3.92), {"use_prompt_ssm": False})}
