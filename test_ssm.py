"""
Property tests of ssm.py: the chunked selective scan against the sequential loop it replaces
(selective_scan_ref: outputs, last state and every gradient, at any chunk size, strides and extreme
decays), its causality and determinism; SS2D against its four routes scanned one by one, its symmetries
and its receptive field; and both under bfloat16 autocast.
"""

import copy
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, strategies as st

import ssm
from conftest import _assert_close, _ss2d, examples
from ssm import SS2D, selective_scan, selective_scan_ref, ss2d_ref


SCAN_SETTINGS = examples(100, suppress_health_check=[HealthCheck.too_slow])


SCAN_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


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
def test_scan_output_and_last_state_match_the_loop(case):
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
def test_scan_gradients_match_the_loop(case):
    # Every input carries a gradient here (D, z and delta_bias always present).
    inputs = _scan_inputs(case)
    _assert_scans_agree(case, inputs, SCAN_TOL[case["dtype"]])


@examples(25, suppress_health_check=[HealthCheck.too_slow])
@given(case=scan_cases(optional=False), chunk=st.integers(ssm._SUB + 1, 3 * ssm._SUB + 3),
       n_chunks=st.integers(1, 3), tail=st.integers(0, 2))
@example(case=dict(seed=0, b=1, dg=2, g=1, grouped=False, n=2, l=0, chunk=0, dtype=torch.float64,
                   softplus=True, D=True, z=True, delta_bias=True), chunk=2 * ssm._SUB + 1, n_chunks=3, tail=2)
def test_scan_gradients_match_the_loop_with_chunks_longer_than_the_backward_block(case, chunk, n_chunks, tail):
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
def test_scan_is_exact_at_zero_delta_a_or_b(case, edge):
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
def test_scan_gives_the_same_result_at_any_chunk_size(case, chunks):
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
def test_scan_passes_gradcheck(grouped):
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
def test_scan_gives_the_same_result_on_strided_inputs(case):
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


@SCAN_SETTINGS
@given(scan_cases())
def test_scan_default_chunking_matches_the_loop(case):
    """chunk_size=None (the automatic K: a power of two, at most √l, tail padded) agrees with the loop."""
    _assert_scans_agree({**case, "chunk": None}, _scan_inputs(case), SCAN_TOL[case["dtype"]])


def test_scan_keeps_float32_under_bf16_autocast():
    """Under CPU bfloat16 autocast SS2D's projections hand the scan bfloat16 u, Δ, B, C and z; the scan
    promotes them and gives exactly the float32 scan of those same values (y, last state, every gradient,
    a bfloat16 input's rounded to bfloat16 as its cast back does). Guards against a scan run in bfloat16,
    whose 8 significant bits lose the slow channels' decay (see runs.autocast)."""
    case = dict(seed=0, b=2, dg=3, g=2, grouped=True, n=4, l=37, chunk=8, dtype=torch.float32, softplus=True,
                D=True, z=True, delta_bias=True)
    activations = ("u", "delta", "B", "C", "z")
    half = {k: v.to(torch.bfloat16) if k in activations else v for k, v in _scan_inputs(case).items()}
    plain = _scan_with_grads(selective_scan, {k: v.float() for k, v in half.items()}, True, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _scan_with_grads(selective_scan, half, True, chunk_size=8)
    assert mixed[0].dtype == torch.float32 and torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], plain[1])
    assert all(torch.equal(mixed[2][k], plain[2][k].to(half[k].dtype)) for k in plain[2])


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


@SCAN_SETTINGS
@given(h=st.sampled_from([1, 3, 5, 7]), w=st.sampled_from([1, 3, 5, 7]), dim=st.integers(1, 9),
       d_state=st.integers(1, 4), expand=st.integers(1, 2), seed=st.integers(0, 1000))
def test_ss2d_keeps_shape_and_stays_finite(h, w, dim, d_state, expand, seed):
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
