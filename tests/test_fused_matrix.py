"""The fused Triton operator against the float64 reference: outputs and every gradient."""

import pytest
import torch

from helpers import DTYPES, EPILOGUES, LAYOUTS, Case, assert_close_to_truth, check_case
from sae_kernels.accuracy import TOLERANCES

CHANNELS = [1, 3, 19, 64, 228]
SPATIAL = [(1, 1), (7, 7), (13, 17), (56, 56)]
BATCH = [0, 1, 3]
STRATEGIES = ["single", "split"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", BATCH)
@pytest.mark.parametrize("hw", SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("c", CHANNELS)
def test_shapes(c, hw, n, layout, strategy):
    check_case(Case(n, c, *hw, channels_last=LAYOUTS[layout], strategy=strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weights", ["same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 19, 13, 17), (1, 64, 7, 7), (3, 3, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dtypes(shape, dtype, weights, layout, strategy):
    if weights == "fp32" and dtype in ("fp32", "fp64"):
        pytest.skip("same as weights='same'")
    check_case(Case(*shape, dtype=DTYPES[dtype], channels_last=LAYOUTS[layout],
                    weight_dtype=torch.float32 if weights == "fp32" else None,
                    strategy=strategy, with_identity=True, act_out="relu"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cardinality", [1, 2, 4])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu", "hardswish", "gelu"])
def test_options(act, gate, epilogue, cardinality, strategy):
    residual, with_identity, act_out = EPILOGUES[epilogue]
    check_case(Case(3, 19, 7, 7, act=act, gate=gate, residual=residual,
                    with_identity=with_identity, act_out=act_out, cardinality=cardinality,
                    strategy=strategy))


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu", "hardswish", "gelu"])
def test_options_bf16_channels_last(act, gate, epilogue):
    residual, with_identity, act_out = EPILOGUES[epilogue]
    check_case(Case(2, 19, 5, 6, act=act, gate=gate, residual=residual,
                    with_identity=with_identity, act_out=act_out, cardinality=4,
                    dtype=torch.bfloat16, channels_last=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rd_channels", [1, 7, 80])
def test_widths_and_bias(rd_channels, bias, strategy):
    check_case(Case(2, 64, 9, 9, rd_channels=rd_channels, cardinality=3, bias=bias,
                    strategy=strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate,bias", [("hardsigmoid", True), ("sigmoid", False)])
@pytest.mark.parametrize("shape", [(3, 19, 13, 17), (1, 1, 1, 1), (0, 3, 2, 2), (2, 64, 7, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_single_fc(shape, gate, bias, dtype, layout, strategy):
    """The single-FC form (effective SE: one C -> C FC, no fc2, no act)."""
    check_case(Case(*shape, single_fc=True, gate=gate, bias=bias, dtype=DTYPES[dtype],
                    channels_last=LAYOUTS[layout], strategy=strategy))


def test_tolerance_check_is_strict():
    """The comparison rejects an error of a few ulps of the I/O dtype."""
    truth = torch.linspace(-3, 3, 101, dtype=torch.float64)
    for dtype, (rtol, _) in TOLERANCES.items():
        assert_close_to_truth("exact", truth.to(dtype), truth.to(dtype).double(), dtype)
        with pytest.raises(AssertionError):
            assert_close_to_truth("off", truth * (1 + 3 * rtol) + 1e-30, truth, dtype,
                                  record=False)
