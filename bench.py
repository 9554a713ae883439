"""
Speed and memory of pixelssr on the device at hand. Numbers live here, not in the tests.

  python bench.py                      # everything, on CUDA when present, else the CPU
  python bench.py --only scan frft     # some sections
  python bench.py --device cpu --threads 2

  python bench.py --device cuda        # one short run on a GPU: every section, bf16 training included

Sections:
  scan   the chunked selective scan (ssm.selective_scan) against the sequential loop it is tested
         against and against a Blelloch parallel scan, the usual pure-PyTorch alternative: forward,
         forward+backward and peak memory at b=1, d=64, n=16, l in {1024, 4096, 16384};
  chunks the chunk length T of selective_scan (32, 64, 128, 256 and the automatic choice) on the
         model's largest scan at batch 8 of 128x128 (b=8, d=4x80 in 4 groups, n=8, l=16384);
  frft   frft2 against torch.fft.fft2 at (8, 8, 128, 128) float32, the Spa-FRFT branch's shape at batch 8;
  bodies the universal paradigm's bodies (dypro, mst++, hscnn+, maektsr; Table 2): parameters and MACs at
         128x128 per part (the DRPN's F1, P_spa, P_hf, P_spe and Y1-Y3, the body, the output head, H2R),
         with and without the shared DRPN, beside the paper's Tables 10 and 4 and the bodies' own papers; MACs
         counted "layers only" (the paper's convention as best it can be inferred) and "real" (every product
         run, complex ones as four real ones, and the selective scan's recurrence): macs.MACCount says exactly how;
  model  DyPro-Mamba's parameters and FLOPs (torch.utils.flop_counter; multiply-accumulates, as the
         paper counts them), forward and forward+backward per 128x128 patch, a training step
         (train.train_step) at batch 8 of 128x128 in float32 (and bf16 autocast on CUDA) with its
         time split (scan forward / backward, convolutions, the rest);
  scene  whole-image inference on a 512x512 scene: the network alone, and evaluate.eval_scene (the network
         and the metrics), the times `train.py eval` of a CAVE scene is measured against.
"""

import argparse
import inspect
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import backbones
import cameras
import evaluate
import losses
import maektsr
import pixelssr as P
import runs
import train
from frft import frft2
from macs import COUNTS, PARTS, TABLE_4, MACCount, count_parts, inference_total, macs
from ssm import selective_scan, selective_scan_chunks, selective_scan_ref

# The profiler that measures CPU peak memory (kineto) logs `USDT ... profiler_start/stop` lines to
# stderr at its highest level (5); 6 silences it. Read when the profiler first starts, so setting it here is enough.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _pscan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = a_t ⊙ h_{t-1} + x_t along dim 1 (a power of two long): Blelloch's work-efficient scan, written
    recursively — combine neighbour pairs (up-sweep), scan the odd positions, fill in the even ones
    (down-sweep). The usual pure-PyTorch parallel scan; autograd does the backward."""
    if a.shape[1] == 1:
        return x
    a_e, a_o, x_e, x_o = a[:, 0::2], a[:, 1::2], x[:, 0::2], x[:, 1::2]
    h_o = _pscan(a_o * a_e, torch.addcmul(x_o, a_o, x_e))
    h_e = torch.cat([x_e[:, :1], torch.addcmul(x_e[:, 1:], a_e[:, 1:], h_o[:, :-1])], 1)
    return torch.stack([h_e, h_o], 2).flatten(1, 2)


def selective_scan_blelloch(u, delta, A, B, C):
    """Selective scan (B, C (b, n, l); no D, z) by the Blelloch scan over the length padded to a power of two."""
    l = u.shape[-1]
    pad = (0, 0, 0, 0, 0, (1 << (l - 1).bit_length()) - l)
    dA = torch.exp(torch.einsum("bdl,dn->bldn", delta, A))              # (b, l, d, n)
    dBu = torch.einsum("bdl,bnl->bldn", delta * u, B)                    # (b, l, d, n)
    h = _pscan(F.pad(dA, pad), F.pad(dBu, pad))[:, :l]                   # (b, l, d, n)
    return torch.einsum("bldn,bnl->bdl", h, C)


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Best wall time in s of fn() over `repeat` runs after one warm-up, synchronising on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _scan_time_and_peak(fn, inputs: list, device: torch.device, backward: bool, repeat: int) -> tuple[float, int]:
    """(best wall time in s, peak bytes of tensors allocated during the call) of fn(*inputs), with its
    backward if asked (else under no_grad). Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU
    the running total of every tensor allocation and free recorded by torch.profiler(profile_memory=True)
    in one extra run — live tensor bytes, the quantity CUDA reports (not RSS, not allocator caches)."""
    def run():
        if backward:
            torch.autograd.grad(fn(*inputs).square().sum(), inputs)
        else:
            with torch.no_grad():
                fn(*inputs)
    best = _timed(run, device, repeat)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync()
        return best, torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return best, peak


def bench_scan(device: torch.device) -> None:
    """Chunked vs sequential vs Blelloch selective scan, fwd and fwd+bwd, at b=1, d=64, n=16, float32."""
    b, d, n = 1, 64, 16
    chunk = inspect.signature(selective_scan).parameters["chunk_size"].default or "auto"
    methods = {f"chunked (T={chunk})": selective_scan, "blelloch (2^k)": selective_scan_blelloch,
               "sequential loop": selective_scan_ref}
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events"
    print(f"\nselective scan on {device}, b={b} d={d} n={n} float32, {torch.get_num_threads()} threads; best of runs; "
          f"peak = bytes of tensors allocated during the call ({memory})")
    print(f"{'method':<18}{'l':>7}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak fwd MB':>13}{'peak f+b MB':>13}")
    results = {}
    for l in (1024, 4096, 16384):
        gen = torch.Generator().manual_seed(0)
        u, delta, B, C = (torch.randn(*shape, generator=gen).to(device)
                          for shape in ((b, d, l), (b, d, l), (b, n, l), (b, n, l)))
        delta = 0.1 * delta.sigmoid()
        A = -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(d, 1)
        inputs = [x.requires_grad_() for x in (u, delta, A, B, C)]
        for name, fn in methods.items():
            note = ""
            if fn is selective_scan_ref and l > 4096:
                # The loop is linear in l (time and memory): extrapolate from l = 4096 rather than wait.
                results[name, l] = tuple(x * l / 4096 for x in results[name, 4096])
                note = "   (extrapolated linearly from l=4096)"
            else:
                repeat = 1 if fn is selective_scan_ref else 3
                f, mf = _scan_time_and_peak(fn, inputs, device, backward=False, repeat=repeat)
                fb, mfb = _scan_time_and_peak(fn, inputs, device, backward=True, repeat=repeat)
                results[name, l] = (f, fb, mf, mfb)
            f, fb, mf, mfb = results[name, l]
            print(f"{name:<18}{l:>7}{f * 1e3:>10.1f}{fb * 1e3:>12.1f}{mf / 2**20:>13.1f}{mfb / 2**20:>13.1f}{note}")
    (chunked, blelloch, loop) = (results[name, 16384] for name in methods)
    print(f"at l=16384, fwd+bwd: chunked is {loop[1] / chunked[1]:.0f}x faster than the loop with "
          f"{loop[3] / chunked[3]:.1f}x less peak memory, {blelloch[1] / chunked[1]:.0f}x faster than Blelloch "
          f"with {blelloch[3] / chunked[3]:.1f}x less")


def bench_chunks(device: torch.device, b: int, repeat: int) -> None:
    """selective_scan forward+backward for chunk lengths T = 32, 64, 128, 256 and the automatic choice, on
    the model's largest scan in a training batch of b 128x128 patches: a level-0 SS2D's four routes of
    E = 80 channels as 4 B/C groups, n = 8, l = 128², Δ through softplus as SS2D has it."""
    g, e, n, l = 4, 80, 8, 128 * 128
    gen = torch.Generator().manual_seed(0)
    u, delta = (torch.randn(b, g * e, l, generator=gen).to(device) for _ in range(2))
    B, C = (torch.randn(b, g, n, l, generator=gen).to(device) for _ in range(2))
    A = -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(g * e, 1)
    inputs = [x.requires_grad_() for x in (u, delta - 4, A, B, C)]   # softplus(delta - 4): Δ ~ 0.02
    auto_T = -(-l // selective_scan_chunks(b, g * e, n, l, device))
    print(f"\nselective scan chunk length on {device}, b={b} d={g * e} (g={g}) n={n} l={l} float32, forward+backward, "
          f"best of {repeat}")
    print(f"{'T':>6}{'K':>6}{'fwd+bwd ms':>12}{'peak MB':>10}")
    for T in (32, 64, 128, 256, None):
        t, peak = _scan_time_and_peak(lambda *x: selective_scan(*x, delta_softplus=True, chunk_size=T), inputs,
                                      device, backward=True, repeat=repeat)
        T = T or auto_T
        print(f"{T:>6}{-(-l // T):>6}{t * 1e3:>12.1f}{peak / 2**20:>10.1f}" + ("   (automatic)" if T == auto_T else ""))


def bench_frft(device: torch.device) -> None:
    """Print frft2 against torch.fft.fft2(norm="ortho") at (8, drpn_width, 128, 128) float32 — the Spa-FRFT
    prompt's shape in a training step at batch 8 — forward and forward+backward, median of 9 runs after 5 warm-ups
    (the first runs of a fresh shape pay for memory from the OS). frft2 costs dense N×N matrix products
    where the FFT is O(N log N), so some ratio is expected; how much is printed as a floor: the FLOPs of
    those products at the rate of one large complex64 matmul on this device."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(8, P.Config().drpn_width, 128, 128, device=device, generator=g, requires_grad=True)
    grad_out = torch.randn(x.shape, device=device, dtype=torch.complex64, generator=g)
    order = torch.tensor(0.5, device=device, requires_grad=True)

    def median_ms(fn) -> float:
        times = []
        for i in range(14):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 5:
                times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def forward_ms(transform) -> float:
        with torch.no_grad():
            return median_ms(transform)

    def forward_backward_ms(transform, inputs) -> float:
        return median_ms(lambda: torch.autograd.grad(transform(), inputs, grad_out))

    def fft() -> torch.Tensor:
        return torch.fft.fft2(x, norm="ortho")

    def frft_fixed_order() -> torch.Tensor:
        return frft2(x, 0.5)

    def frft_learnt_order() -> torch.Tensor:
        return frft2(x, order)

    # Forward on real x: x @ [Re Fᵀ, Im Fᵀ] (4·b·N³ FLOPs) then F @ (complex, 8·b·N³); the backward runs
    # the same two products in reverse. b = 160 images of N = 128.
    dense_flops = 24 * x.numel() * x.shape[-1]  # 24·b·N³ with b·N² = x.numel()

    fwd_fft, fwd_frft = forward_ms(fft), forward_ms(frft_fixed_order)
    both_fft, both_frft = forward_backward_ms(fft, x), forward_backward_ms(frft_fixed_order, x)
    both_learnt = forward_backward_ms(frft_learnt_order, (x, order))
    m = 4096 if device.type == "cuda" else 1024  # long enough per call that timing it is fair
    big = torch.randn(m, m, device=device, dtype=torch.complex64, generator=g)
    peak = 8 * m**3 / (median_ms(lambda: big @ big) / 1e3)  # FLOP/s
    print(f"frft2 vs fft2 (norm='ortho'), {tuple(x.shape)} float32 on {device}, median ms:")
    print(f"  forward           fft2 {fwd_fft:8.2f}   frft2 {fwd_frft:8.2f}   ratio {fwd_frft / fwd_fft:5.2f}")
    print(f"  forward+backward  fft2 {both_fft:8.2f}   frft2 {both_frft:8.2f}   ratio {both_frft / both_fft:5.2f}")
    print(f"  forward+backward, order learnt too:   frft2 {both_learnt:8.2f}   ratio {both_learnt / both_fft:5.2f}")
    floor = 1e3 * dense_flops / peak
    print(f"  floor, fixed order: its {dense_flops / 1e9:.2f} GFLOP of matrix products at {peak / 1e9:.0f} GFLOP/s "
          f"(one {m}² complex64 matmul here)\n    take {floor:.2f} ms, ratio {floor / both_fft:5.2f}; "
          f"frft2 takes {both_frft / floor:.2f}× that")


# Table 10 of the paper (params in M, FLOPs in G at 128x128, multiply-accumulates); HSCNN+ is not in it:
# the MST++ paper's table gives 4.65 M and 304.45 G at 256x256, i.e. 76.1 G at 128x128
TABLE_10 = {"dypro": (0.61, 4.65), "mst++": (1.62, 5.83), "hscnn+": (4.65, 304.45 / 4)}


def bench_bodies(device: torch.device) -> None:
    """Each body (backbones.BODIES) with the shared DRPN and without it (Table 4's "no DRPN": the body fed the
    point cube), and DyPro-Mamba's other Table 4 ablations: parameters and MACs of one 1x3x128x128 forward, per part
    (PARTS) and in total, counted three ways: layers-only and real (MACCount: exactly what each counts is
    in its docstring, and printed), and flop/2 (`macs`, torch's flop counter). Totals exclude
    H2R, which only L_P2I uses; beside them the paper's Table 10 and Table 4."""
    rgb = torch.rand(1, 3, 128, 128, device=device)
    pts = P.sample_points((1, 31, 128, 128), 1e-4, 2.0, 0.1, device=device)
    counts = {}
    for name in backbones.BODIES:
        for variant, (_, cfg) in TABLE_4.items():
            if name != "dypro" and variant not in ("whole", "no DRPN"):
                continue
            torch.manual_seed(0)
            model = backbones.network(P.Config(backbone=name, **cfg)).to(device).eval()
            counts[name, variant] = count_parts(model, rgb, pts)

    print(f"\nbodies of the universal paradigm at 1x3x128x128 on {device}: parameters in M; {COUNTS}")
    print(f"{'body':<9}{'part':<14}{'params M':>10}{'layers G':>10}{'real G':>10}")
    for name in backbones.BODIES:
        params, layers, real, _ = counts[name, "whole"]
        rows = [(part, params[part], layers[part], real[part]) for part in PARTS if part != "H2R"]
        rows += [("total", inference_total(params), inference_total(layers), inference_total(real)),
                 ("H2R", params["H2R"], layers["H2R"], real["H2R"])]
        for i, (part, n, lay, rea) in enumerate(rows):
            print(f"{name if i == 0 else '':<9}{part:<14}{n / 1e6:>10.3f}{lay / 1e9:>10.3f}{rea / 1e9:>10.3f}")

    print("\ntotals (without H2R) beside the paper's Table 10 (hscnn+: the MST++ paper's table scaled to 128x128);\n"
          "  flop/2 = macs.macs: flop_counter's FLOPs / 2 less SS2D's zero blocks (a complex product as one real "
          "product,\n  the scan and CPU attention not counted)")
    print(f"{'body':<8}{'params M':>10}{'flop/2 G':>10}{'layers G':>10}{'real G':>9}{'no DRPN: M':>12}{'flop/2 G':>10}"
          f"{'layers G':>10}{'real G':>9}{'paper M':>9}{'paper G':>9}")
    for name in backbones.BODIES:
        row = ""
        for variant in ("whole", "no DRPN"):
            params, layers, real, flop2 = counts[name, variant]
            row += (f"{inference_total(params) / 1e6:>{10 if variant == 'whole' else 12}.3f}{flop2 / 1e9:>10.2f}"
                    f"{inference_total(layers) / 1e9:>10.2f}{inference_total(real) / 1e9:>9.2f}")
        paper = "".join(f"{v:>9.2f}" for v in TABLE_10[name]) if name in TABLE_10 else f"{'-':>9}{'-':>9}"
        print(f"{name:<8}{row}{paper}")

    print(f"\ndypro beside the paper's Table 4 (params M / G)\n{'':<13}{'params M':>10}{'layers G':>10}{'real G':>9}"
          f"{'paper M':>9}{'paper G':>9}")
    for variant, ((paper_m, paper_g), _) in TABLE_4.items():
        params, layers, real, _ = counts["dypro", variant]
        print(f"{variant:<13}{inference_total(params) / 1e6:>10.3f}{inference_total(layers) / 1e9:>10.2f}"
              f"{inference_total(real) / 1e9:>9.2f}{paper_m:>9.2f}{paper_g:>9.2f}")
    bench_maektsr(device, rgb, pts)


def _three_counts(fn: Callable[[], object]) -> str:
    """fn()'s MACs (a forward) the three ways, in G, as a phrase."""
    with torch.no_grad():
        flop2 = macs(fn)
        with MACCount() as count:
            fn()
    return (f"{flop2 / 1e9:.2f} G MACs (flop/2), layers-only {count.layers.total() / 1e9:.2f} G, "
            f"real {count.real.total() / 1e9:.2f} G")


def bench_maektsr(device: torch.device, rgb: torch.Tensor, pts: torch.Tensor) -> None:
    """MAE-KTSR's two stages at 1x3x128x128 (its paper's sizes are not public): S2-MAE in pre-training (the
    loss of one batch of 1, default masks), and stage 2 with the DRPN as fit builds it: all parameters, the
    trainable ones (the encoder frozen), and the CNN alone (--no-isff). MACs the three ways bench_bodies
    prints (flop/2 misses the encoder's attention on a CPU)."""
    torch.manual_seed(0)
    mae = maektsr.S2MAE().to(device)
    hsi = torch.rand(1, 31, 128, 128, device=device)
    keep = maektsr.draw_mask(mae.cfg, 1, 256, torch.Generator().manual_seed(0)).to(device)
    srf = torch.full((3, 31), 1 / 31, device=device)
    pre = _three_counts(lambda: mae.loss(hsi, hsi[:, :3], srf, keep))
    print(f"\nS2-MAE pre-training: {sum(p.numel() for p in mae.parameters()) / 1e6:.3f} M parameters (encoder "
          f"{sum(p.numel() for p in mae.encoder.parameters()) / 1e6:.3f} M), a 128x128 crop {pre}")
    for label, cfg in (("stage 2 (DRPN, CNN, ISFF, encoder)", P.Config(backbone="maektsr", h2r=False)),
                       ("stage-2 CNN alone (--no-isff)", P.Config(backbone="maektsr", use_isff=False, h2r=False))):
        model = backbones.network(cfg).to(device).eval()
        n = sum(p.numel() for p in model.parameters()) / 1e6
        trains = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"{label}: {n:.3f} M parameters, {trains:.3f} M trainable, {_three_counts(lambda: model(rgb, pts))}")


def bench_model(device: torch.device, batch: int, repeat: int) -> None:
    """DyPro-Mamba: size, FLOPs, forward / forward+backward per 128x128 patch, and training steps at `batch`
    patches of 128x128."""
    torch.manual_seed(0)
    cfg = P.Config()
    model = P.DyProMamba(cfg).to(device)
    n_all = sum(p.numel() for p in model.parameters())
    n_h2r = sum(p.numel() for p in model.h2r.parameters())
    n_drpn = sum(p.numel() for p in model.drpn.parameters())
    rgb = torch.rand(1, 3, 128, 128, device=device)
    pts = P.sample_points((1, 31, 128, 128), 1e-4, 2.0, 0.1, device=device)
    with torch.no_grad():
        model_macs = macs(lambda: model(rgb, pts))
        z = torch.randn(1, cfg.drpn_width, 128, 128, device=device)  # what the Spa-FRFT branch transforms
        frft_macs = macs(lambda: model.drpn.spa.transform(model.drpn.spa.transform(z), inverse=True))
        drpn_macs = macs(lambda: model.drpn(rgb, pts))
    print(f"\nDyPro-Mamba (width {cfg.width}) on {device}")
    print(f"parameters: {(n_all - n_h2r) / 1e6:.3f} M for inference (+{n_h2r / 1e6:.3f} M of the training-only "
          f"H2R of L_P2I); DRPN {n_drpn / 1e6:.3f} M      paper (Table 10): 0.61 M")
    print(f"FLOPs at 1x3x128x128 (multiply-accumulates, macs.macs: flop_counter / 2): {model_macs / 1e9:.2f} G, "
          f"DRPN {drpn_macs / 1e9:.2f} G, of which the FRFT matrix products {frft_macs / 1e9:.2f} G      paper: 4.65 G\n"
          f"  (flop_counter counts a complex multiply-add as one, a quarter of its real cost, and would not count "
          f"an FFT-based FRFT at all)")
    model.eval()
    with torch.no_grad():
        t_fwd = _timed(lambda: model(rgb, pts), device, repeat)
    model.train()
    t_fb = _timed(lambda: sum(y.sum() for y in model(rgb, pts)).backward(), device, repeat)
    print(f"one 128x128 patch: forward {t_fwd * 1e3:.0f} ms, forward+backward {t_fb * 1e3:.0f} ms")

    # a real training step (train.train_step): batch of patches, all four losses, Adam; channels-last, as fit trains
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))
    srf = torch.from_numpy(cameras.srf_matrix())
    rgb_b = torch.rand(batch, 3, 128, 128, device=device)
    mask = torch.zeros(batch, 1, 128, 128, dtype=torch.bool, device=device)
    mask[:, :, 64, 64] = True
    train_batch = (rgb_b, torch.rand(batch, 31, 128, 128, device=device) * mask, mask)
    pts_b = P.sample_points((batch, 31, 128, 128), 1e-4, 2.0, 0.1, device=device)
    for amp in ("none", "bf16") if device.type == "cuda" else ("none",):
        def step():
            train.train_step(model, opt, train_batch, pts_b, srf.to(device), 2e-4, losses.LOSS_WEIGHTS, amp=amp)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_step = _timed(step, device, repeat)
        mem = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        kind = "float32" if amp == "none" else "bf16 autocast"
        print(f"training, {kind}: {1 / t_step:.3f} it/s at batch {batch} of 128x128 ({t_step:.2f} s per step){mem}")
        total, parts = _step_split(step, device)
        print(f"  one profiled step, {total:.2f} s: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f} %)"
                                                                for k, v in parts.items()))


def bench_scene(device: torch.device, repeat: int) -> None:
    """Whole-image inference on a 512x512 scene (a CAVE scene's size), as eval runs it: the network alone,
    and evaluate.eval_scene (the network, then the metrics)."""
    torch.manual_seed(0)
    model = P.DyProMamba(P.Config()).to(device).eval()
    srf = torch.from_numpy(cameras.srf_matrix())
    rgb5 = torch.rand(1, 3, 512, 512, device=device)
    pts5 = P.sample_points((1, 31, 512, 512), 1e-4, 2.0, 0.1, device=device)
    print(f"\nwhole-image inference, DyPro-Mamba on {device}")
    with torch.no_grad():  # best of `repeat`, as the eval below: timed once, it varied 8.5-12.9 s on a 2-core CPU
        t5 = _timed(lambda: model(rgb5, pts5), device, repeat)
    print(f"inference of one whole 512x512 scene, the network alone: {t5:.2f} s (best of {repeat})")
    hsi5 = torch.rand(512, 512, 31, generator=torch.Generator().manual_seed(0)).numpy()
    t_eval = _timed(lambda: evaluate.eval_scene(model, hsi5, srf, 1e-4, (2.0, 0.1), "gamma", seed=0), device, repeat)
    print(f"eval of one whole 512x512 scene and seed (evaluate.eval_scene: the network, then the metrics in float64 "
          f"on the CPU): {t_eval:.2f} s (best of {repeat}), {t_eval / t5:.2f}x the network alone")


def _step_split(step, device: torch.device) -> tuple[float, dict[str, float]]:
    """(wall time of one call of `step` under torch.profiler, {part: seconds}): the selective scan's forward and
    backward (ssm._ChunkedScan), the convolutions forward and backward (aten::convolution, transposed ones
    included, and its backward), and the rest. On the CPU the parts are those ops' CPU time; on CUDA the
    time of the kernels they launched (the rest is then the wall time they do not cover). The profiler
    adds its own small cost to every op."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
    events = {e.key: e for e in prof.key_averages()}

    def seconds(*names: str) -> float:
        return sum((events[k].device_time_total if cuda else events[k].cpu_time_total) / 1e6
                   for k in names if k in events)

    parts = {"scan forward": seconds("_ChunkedScan"), "scan backward": seconds("_ChunkedScanBackward"),
             "convolutions": seconds("aten::convolution", "aten::convolution_backward")}
    return total, {**parts, "the rest": total - sum(parts.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = ["scan", "chunks", "frft", "bodies", "model", "scene"]
    ap.add_argument("--only", nargs="*", default=sections, choices=sections)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=8, help="training batch of 128x128 patches")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each model measurement (best is kept)")
    args = ap.parse_args()
    runs.keep_freed_cpu_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    where = runs.provenance(device)
    print(f"pixelssr bench on {name}, torch {torch.__version__}, code {where['commit']}: {where['command']}")
    run = {"scan": lambda: bench_scan(device), "chunks": lambda: bench_chunks(device, args.batch, args.repeat),
           "frft": lambda: bench_frft(device), "bodies": lambda: bench_bodies(device),
           "model": lambda: bench_model(device, args.batch, args.repeat),
           "scene": lambda: bench_scene(device, args.repeat)}
    for s in args.only:
        run[s]()


if __name__ == "__main__":
    main()
