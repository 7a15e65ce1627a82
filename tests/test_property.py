"""Property test: random shapes and options, fused vs the float64 reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Case, check_case
from sae_kernels import ACTIVATIONS, GATES, OUTPUT_ACTIVATIONS


@st.composite
def cases(draw):
    return Case(
        n=draw(st.integers(0, 3)),
        c=draw(st.integers(1, 40)),
        h=draw(st.integers(1, 20)),
        w=draw(st.integers(1, 20)),
        cardinality=draw(st.integers(1, 4)),
        rd_channels=draw(st.integers(1, 12)),
        act=draw(st.sampled_from(ACTIVATIONS)),
        gate=draw(st.sampled_from(GATES)),
        bias=draw(st.booleans()),
        residual=draw(st.booleans()),
        with_identity=draw(st.booleans()),
        act_out=draw(st.sampled_from(OUTPUT_ACTIVATIONS)),
        channels_last=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        strategy=draw(st.sampled_from(["auto", "single", "split"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fused_matches_reference(case):
    check_case(case)
