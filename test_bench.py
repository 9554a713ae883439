"""
bench.py's counting: bench.macs, the multiply-accumulates Table 10 reports, is what torch's flop counter
finds in the route-by-route form of SS2D (bench.py's timings are measurements, not tests).
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import bench
from conftest import _ss2d, examples
from ssm import ss2d_ref


@pytest.mark.parametrize("grad", [True, False])
@examples(10)
@given(h=st.integers(1, 6), w=st.integers(1, 6), dim=st.integers(2, 9), d_state=st.integers(1, 4),
       expand=st.integers(1, 2))
def test_macs_counts_the_multiply_accumulates_of_ss2d_route_by_route(grad, h, w, dim, d_state, expand):
    """bench.macs of SS2D is what flop_counter finds in the route-by-route form: the zero blocks of the
    block-diagonal Δ projection are not counted as work, whether the routes go four at once (with
    autograd) or in pairs (without). (dim from 2: an einsum over one channel is a plain product, which
    flop_counter does not count.)"""
    model, x = _ss2d(0, dim, d_state, expand), torch.randn(2, dim, h, w, dtype=torch.float64)
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(grad):
        with counter:
            ss2d_ref(model, x)
        assert bench.macs(lambda: model(x)) == counter.get_total_flops() / 2
