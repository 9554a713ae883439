"""
macs.py, the counting of multiply-accumulates: macs.macs, flop_counter's count less SS2D's zero blocks, is what torch's flop counter
finds in the route-by-route form of SS2D; macs.MACCount's two counts, layers-only and real, count what
their docstring says; and, so counted, DyPro-Mamba's parts cost what the paper's Table 4 says they do
(bench.py's timings are measurements, not tests).
"""

import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import macs
import pixelssr as P
from conftest import _ss2d, examples
from ssm import selective_scan, ss2d_ref


@pytest.mark.parametrize("grad", [True, False])
@examples(10)
@given(h=st.integers(1, 6), w=st.integers(1, 6), dim=st.integers(2, 9), d_state=st.integers(1, 4),
       expand=st.integers(1, 2))
def test_macs_counts_the_multiply_accumulates_of_ss2d_route_by_route(grad, h, w, dim, d_state, expand):
    """macs.macs of SS2D is what flop_counter finds in the route-by-route form: the zero blocks of the
    block-diagonal Δ projection are not counted as work, whether the routes go four at once (with
    autograd) or in pairs (without). So is MACCount's: its real count plus the four scans' recurrences
    (2·b·E·l·n each; the route-by-route form's loop is not counted), its layers-only count with in_proj
    called as a layer there. (dim from 2: an einsum over one channel is a plain product, which flop_counter
    does not count.)"""
    model, x = _ss2d(0, dim, d_state, expand), torch.randn(2, dim, h, w, dtype=torch.float64)
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(grad):
        with counter:
            ss2d_ref(model, x)
        assert macs.macs(lambda: model(x)) == counter.get_total_flops() / 2
        with macs.MACCount() as ref_count:
            ss2d_ref(model, x)
        with macs.MACCount() as count:
            model(x)
    scans = 4 * 2 * x.shape[0] * model.E * h * w * model.n  # four routes of E channels, l = h·w
    assert count.real.total() == ref_count.real.total() + scans
    assert count.layers.total() == ref_count.layers.total()


@examples(20)
@given(kind=st.sampled_from(["conv", "transposed", "linear"]), b=st.integers(1, 2), groups=st.integers(1, 3),
       cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2),
       h=st.integers(3, 6), w=st.integers(3, 6))
def test_layers_only_macs_of_a_lone_layer_are_its_closed_form(kind, b, groups, cin, cout, k, stride, h, w):
    """A lone nn.Conv2d or nn.ConvTranspose2d counts (output elements) x (input channels / groups) x k²,
    an nn.Linear (output elements) x in_features: here from the input's size and the layer's arithmetic."""
    cin, cout = cin * groups, cout * groups  # channels per group
    if kind == "linear":
        layer, x = nn.Linear(cin, cout), torch.randn(b, h, w, cin)
        expected = b * h * w * cout * cin
    else:
        conv = nn.Conv2d if kind == "conv" else nn.ConvTranspose2d
        layer, x = conv(cin, cout, k, stride=stride, padding=k // 2, groups=groups), torch.randn(b, cin, h, w)
        # output size of a conv, and of its transpose
        ho, wo = (((s + 2 * (k // 2) - k) // stride + 1) if kind == "conv" else ((s - 1) * stride - 2 * (k // 2) + k)
                  for s in (h, w))
        expected = b * cout * ho * wo * (cin // groups) * k * k
    with torch.no_grad(), macs.MACCount() as count:
        layer(x)
    assert count.layers.total() == expected


@examples(10)
@given(batch=st.integers(1, 3), m=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 9))
def test_real_macs_count_a_complex_product_as_four_real_ones(batch, m, k, n):
    """A product of complex matrices is four real products of the same shape, batch·m·k·n multiply-adds each."""
    x, y = torch.randn(batch, m, k, dtype=torch.complex64), torch.randn(batch, k, n, dtype=torch.complex64)
    with macs.MACCount() as complex_count:
        x @ y
    with macs.MACCount() as real_count:
        x.real @ y.real
    assert complex_count.real.total() == 4 * real_count.real.total() == 4 * batch * m * k * n


@examples(10)
@given(b=st.integers(1, 2), d=st.integers(1, 6), l=st.integers(1, 40), n=st.integers(1, 4), chunk=st.integers(1, 16))
def test_real_macs_count_the_selective_scans_recurrence(b, d, l, n, chunk):
    """A forward whose only op is the selective scan counts 2·b·d·l·n real MACs (one multiply-add per
    state element and step for the update, one for the read-out C·h), whatever its chunking, and no
    layers-only MACs."""
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(b, d, l, generator=g), torch.rand(b, d, l, generator=g)
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    A = -torch.rand(d, n, generator=g)
    with macs.MACCount() as count:
        selective_scan(u, delta, A, B, C, chunk_size=chunk)
    assert count.real.total() == 2 * b * d * l * n
    assert count.layers.total() == 0


@functools.cache
def _dypro_costs() -> dict[str, tuple[float, float]]:
    """Parameters (M) and layers-only MACs (G) of the default DyPro-Mamba's parts at 1x3x128x128, the paper's
    measure (Table 4 / Table 10), grouped as Table 4's rows take them apart."""
    torch.manual_seed(0)
    params, layers, _, _ = macs.count_parts(P.DyProMamba(P.Config(h2r=False)).eval(),
                                            torch.rand(1, 3, 128, 128), torch.zeros(1, 31, 128, 128))
    groups = {"whole": [p for p in macs.PARTS if p != "H2R"], "body": ["body", "output head"],
              "DRPN": ["F1", "P_spa", "P_hf", "P_spe", "Y1-Y3"], "P_spa": ["P_spa"], "P_hf": ["P_hf"],
              "P_spe and Y1-Y3": ["P_spe", "Y1-Y3"]}
    return {g: (sum(params[p] for p in parts) / 1e6, sum(layers[p] for p in parts) / 1e9)
            for g, parts in groups.items()}


@pytest.mark.parametrize("part,row", [("whole", "whole"), ("body", "no DRPN"), ("DRPN", None)])
def test_the_body_the_drpn_and_the_whole_cost_what_table_4_says(part, row):
    """Within ±15 % in parameters and in MACs: the whole network (0.61 M, 4.65 G), the body alone (the row
    without the DRPN: 0.56 M, 4.18 G) and the DRPN (their difference: 0.05 M, 0.47 G). The totals alone
    could hold (they once did, within 30 %) with a DRPN 3x too large and a body too small."""
    (whole_m, whole_g), _ = macs.TABLE_4["whole"]
    paper = macs.TABLE_4[row][0] if row else (whole_m - macs.TABLE_4["no DRPN"][0][0],
                                              whole_g - macs.TABLE_4["no DRPN"][0][1])
    m, g = _dypro_costs()[part]
    assert m == pytest.approx(paper[0], rel=0.15)
    assert g == pytest.approx(paper[1], rel=0.15)


@pytest.mark.parametrize("prompt,lo,hi", [("P_spa", 0.03, 0.06), ("P_hf", 0.01, 0.03)])
def test_the_spatial_prompts_are_as_light_as_in_table_4(prompt, lo, hi):
    """Removing P_spa or P_hf leaves the paper's model at 0.61 M and takes 0.05 G or 0.02 G away (Table 4,
    rounded to 0.01): each branch is under 0.01 M and within its own row's G, give or take the rounding
    (the bands do not overlap: a branch counted as nothing, or the two named the other way, fails), although
    the FRFT and the scans of P_spa are far more arithmetic (the real count, bench.py --only bodies) than
    its layers."""
    m, g = _dypro_costs()[prompt]
    assert 0 < m < 0.01 and lo < g < hi


def test_the_spectral_prompt_with_its_y_path_costs_table_4s_p_spe_row():
    """Table 4 without P_spe: 0.04 M and 0.41 G less. That much fits the spectral branch of Sec. 3.2.1 as a
    whole, Eq. (6)-(7)'s convs from the point cube to Y3 and the self-attention that makes P_spe (the
    self-attention alone is a quarter of its parameters: docs/design.md, "Model size"): within 0.01 M (the table's
    rounding) and 15 % of the MACs."""
    m, g = _dypro_costs()["P_spe and Y1-Y3"]
    assert m == pytest.approx(0.04, abs=0.01)
    assert g == pytest.approx(0.41, rel=0.15)
