"""The GPU plans and their model (``gpu_plan``), every plan through the kernels against the
float64 reference, and the absence of state between calls."""

import dataclasses
import itertools

import pytest
import torch
from test_prologue import check_prologue

from helpers import DEVICE, DTYPES, LAYOUTS, Case, check_case
from sae_kernels import gpu_plan
from sae_kernels.functional import sae
from sae_kernels.gpu_plan import A100, H100, FcTiles, Problem, plan_launch
from sae_kernels.kernels import sae_triton
from sae_kernels.sites import resnet50_sites


def _problem(n, c, hw, k, element_size=2, channels_last=False, **kw) -> Problem:
    return Problem(n, c, hw, k, element_size, channels_last, **kw)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiles_follow_the_contiguous_axis(channels_last):
    plan = plan_launch(_problem(8, 256, 3136, 16, 4, channels_last), H100)
    assert plan.block_c * plan.block_hw <= H100.tile_elements
    contiguous = plan.block_c if channels_last else plan.block_hw
    # rows of at least 64 elements: 128 bytes or more per row
    assert contiguous in ((64, H100.max_contiguous_block) if channels_last
                          else (H100.max_contiguous_block,))
    for n, c, hw in [(1, 1, 1), (3, 19, 221), (2, 3, 1)]:  # tiles never exceed the tensor
        plan = plan_launch(_problem(n, c, hw, 5, 4, channels_last), H100, "split")
        assert plan.block_c <= max(1, 2 * c - 1) and plan.block_hw <= max(1, 2 * hw - 1)
        assert plan.hw_chunk % plan.block_hw == 0 and plan.hw_chunk >= plan.block_hw


def test_split_grid_fills_the_device():
    plan = plan_launch(_problem(1, 256, 3136, 16, 4), H100, "split")
    assert plan.blocks(256) * plan.hw_chunks(3136) >= H100.sms


def test_residency_follows_the_register_limit_launches_get():
    """An SM holds 64K registers: one 8-warp program at 255 per thread, two at 128; four
    4-warp programs at 128. Launches get 128 where each thread's elements load as whole
    vectors (not 2-D tiles on rows of 49 in NCHW, not fp64), and the forward's pool; the
    model counts the same limit, and fewer programs in flight take longer."""
    assert [gpu_plan.resident_programs(H100, warps, registers)
            for warps, registers in ((8, 255), (8, 128), (4, 255), (4, 128))] == [1, 2, 2, 4]
    rows_of_49 = _problem(128, 2048, 49, 128, flat=True)
    assert gpu_plan.register_limit(rows_of_49, 8) == gpu_plan.MAX_REGISTERS
    for kind in ("flat", "pool"):
        assert gpu_plan.register_limit(rows_of_49, 8, kind) == gpu_plan.VECTOR_REGISTERS
    assert gpu_plan.register_limit(rows_of_49, 4) == gpu_plan.VECTOR_REGISTERS
    # a flat vector of FLAT_BLOCK elements is 16 a thread at 4 warps
    assert gpu_plan.register_limit(rows_of_49, 4, "flat") == gpu_plan.MAX_REGISTERS
    assert gpu_plan.register_limit(_problem(128, 2048, 49, 128, channels_last=True),
                                   8) == gpu_plan.VECTOR_REGISTERS
    assert gpu_plan.register_limit(_problem(128, 2048, 56, 128, element_size=8),
                                   8, "flat") == gpu_plan.MAX_REGISTERS
    plan = dataclasses.replace(plan_launch(rows_of_49, H100, "split"), flat_rescale=True,
                               gemv_in_stream=False)
    launches = {launch.kernel: launch for launch in
                gpu_plan.forward_launches(rows_of_49, plan, H100)}
    assert launches["pool"].registers == plan.launch_options("pool")["maxnreg"] == 128
    assert launches["rescale"].registers == plan.launch_options("flat")["maxnreg"] == 128
    assert plan.launch_options()["maxnreg"] == 255  # the 2-D tiles of the other passes
    backward = gpu_plan.backward_launches(rows_of_49, plan, H100)
    reduce = next(launch for launch in backward if launch.kernel == "reduce")
    assert reduce.registers == 255
    assert (gpu_plan.device_seconds(reduce, H100)
            > gpu_plan.device_seconds(dataclasses.replace(reduce, registers=128), H100))


def test_the_backward_first_pass_keeps_whole_tiles_under_a_prologue():
    """A prologue halves the backward's tiles for its dx pass (NCHW: half the channels);
    its first pass, whose live values per element are the forward pool's and g's, keeps
    the forward's channels per tile over the same HW chunks, half the programs, twice the
    bytes in flight each: at 255 registers (rows of 49) one program per SM."""
    p = _problem(128, 2048, 49, 128, prologue=True, flat=True)
    plan = plan_launch(p, H100, "split", backward=True)
    forward = plan_launch(p, H100, "split")
    assert plan.sums_block_c == forward.block_c == 2 * plan.block_c
    assert plan.first_pass().blocks(p.c) * 2 == plan.blocks(p.c)
    reduce = next(launch for launch in gpu_plan.backward_launches(p, plan, H100)
                  if launch.kernel == "reduce")
    halved = next(launch for launch in gpu_plan.backward_launches(
        p, dataclasses.replace(plan, sums_block_c=0), H100) if launch.kernel == "reduce")
    assert reduce.programs * 2 == halved.programs and reduce.in_flight == 2 * halved.in_flight
    assert gpu_plan.device_seconds(reduce, H100) < 0.6 * gpu_plan.device_seconds(halved, H100)
    # channels_last halves HW instead: its first pass keeps the dx pass's tiles
    assert plan_launch(dataclasses.replace(p, channels_last=True, flat=False), H100, "split",
                       backward=True).sums_block_c == 0


@pytest.mark.parametrize("spec", [H100, A100], ids=lambda s: s.name)
@pytest.mark.parametrize("n", [1, 8, 32])
def test_the_weights_come_from_hbm_about_once_per_call(spec, n):
    """The batched FCs read the weights from HBM once per group of samples, not once per
    sample: doubling the batch adds far less FC traffic than a weight read per sample
    (checked where the weights outweigh a sample's partial sums, C >= 1024). Per-sample
    GEMVs (``single``) are chosen only where the weights are small beside the sample."""
    for site in resnet50_sites():
        p = _problem(n, site.channels, site.size**2, site.stacked_width)
        if plan_launch(p, spec).strategy == "single":
            assert 2 * p.weight_bytes <= p.sample_bytes, site.name
        if site.channels < 1024:
            continue

        # the doubled batch's plan for both batches: the same launches, each batch whole
        double = dataclasses.replace(p, n=2 * n)
        plan = plan_launch(double, spec, "split")

        def fc_hbm_bytes(problem, plan=plan):
            whole = dataclasses.replace(plan, sample_group=problem.n)
            return sum(x.hbm_bytes for x in gpu_plan.forward_launches(problem, whole, spec)
                       if x.kernel.startswith("fc"))

        added = fc_hbm_bytes(double) - fc_hbm_bytes(p)
        assert added < n * 2 * p.weight_bytes / 4, site.name


def test_the_model_counts_every_byte():
    """More of anything costs more: bytes of x, weights, an identity, a launch on the
    device and on the host."""
    spec = dataclasses.replace(H100, host_launch_seconds=0.0)  # the device's time alone
    base = _problem(8, 1024, 196, 64)
    plan = plan_launch(base, spec, "split")

    def seconds(p, backward=False):
        return gpu_plan.model_seconds(p, plan, spec, backward)

    assert seconds(dataclasses.replace(base, hw=784)) > seconds(base)
    assert seconds(dataclasses.replace(base, k=256)) > seconds(base)
    assert seconds(dataclasses.replace(base, has_identity=True)) > seconds(base)
    assert seconds(base, backward=True) > seconds(base)
    # the ReLU tail: the training forward writes a bit per element, the backward reads it
    relu = dataclasses.replace(base, relu_out=True)
    x_bytes = base.n * base.sample_bytes

    def hbm_bytes(p, launches):
        return sum(x.hbm_bytes for x in launches(p, plan, spec))

    for launches, p in ((gpu_plan.forward_launches, gpu_plan.training_forward(relu)),
                        (gpu_plan.backward_launches, relu)):
        added = hbm_bytes(p, launches) - hbm_bytes(base, launches)
        assert added == pytest.approx(x_bytes / 16, rel=0.01), launches.__name__
    assert hbm_bytes(relu, gpu_plan.forward_launches) == hbm_bytes(base, gpu_plan.forward_launches)
    for constant in ("kernel_gap_seconds", "host_launch_seconds"):
        slower = dataclasses.replace(spec, **{constant: 10 * getattr(H100, constant)})
        assert gpu_plan.model_seconds(base, plan, slower) > seconds(base), constant
    fc2_launch, in_stream = (dataclasses.replace(plan, gemv_in_stream=g) for g in (False, True))
    assert len(gpu_plan.forward_launches(base, in_stream, spec)) == len(
        gpu_plan.forward_launches(base, fc2_launch, spec)) - 1

    def rescale_l2_bytes(p_splits):
        """A rescale program's L2 bytes when it computes FC2 from p's split parts."""
        split = dataclasses.replace(in_stream, fc_to_k=dataclasses.replace(
            in_stream.fc_to_k, splits=p_splits))
        return next(launch.gemv_l2_bytes for launch in
                    gpu_plan.forward_launches(base, split, spec) if launch.kernel == "rescale")

    assert rescale_l2_bytes(8) - rescale_l2_bytes(1) == 7 * base.k * gpu_plan.ACC_BYTES


@pytest.mark.parametrize("single_fc", [False, True], ids=["two-fc", "single-fc"])
def test_fc2_and_fc1_backward_split_over_k(single_fc):
    """FC2 and FC1-backward over K in parts spread their weights over more programs, each
    a share of the weight bytes; the last pass reads the parts of u (dz) per channel. The
    single-FC form has no FC2, but its backward has FC1-backward (dz = dp W1) like any."""
    k = 2048 if single_fc else 256
    p = _problem(128, 2048, 49, k, single_fc=single_fc)
    plan = dataclasses.replace(plan_launch(p, H100, "split"), gemv_in_stream=False,
                               fc_to_c=FcTiles(64, 64, 16, splits=1))
    split = dataclasses.replace(plan, fc_to_c=FcTiles(64, 64, 16, splits=4))

    def launches(pl, backward):
        model = gpu_plan.backward_launches if backward else gpu_plan.forward_launches
        return {launch.kernel: launch for launch in model(p, pl, H100)}

    for backward, fc, last in ((False, "fc2", "rescale"), (True, "fc1_backward", "dx")):
        one, four = launches(plan, backward), launches(split, backward)
        if single_fc and not backward:
            assert fc not in one and one[last] == four[last]
            continue
        assert four[fc].programs == 4 * one[fc].programs
        assert four[fc].program_hbm_bytes == one[fc].program_hbm_bytes / 4
        assert (four[last].program_l2_bytes - one[last].program_l2_bytes
                == 3 * plan.block_c * gpu_plan.ACC_BYTES)
    # tiles of 16 samples beside the largest: more output tiles, fewer split parts
    options = gpu_plan._fc_tile_options(128, 256, 2048, False, H100, 16, True)
    assert {o.block_n for o in options} == {16, 64}
    assert (max(o.splits for o in options if o.block_n == 16)
            < max(o.splits for o in options if o.block_n == 64))
    # SENetV2's last stage at N = 128: FC2 (64 tiles of 64 x 64) takes more programs
    senet = _problem(128, 2048, 49, 256)
    chosen = plan_launch(gpu_plan.training_forward(senet), H100, "split")
    assert not chosen.gemv_in_stream and chosen.fc_to_c.splits > 1


def test_pipelining_is_credited_where_triton_pipelines():
    """Every FC loop with a product keeps its stages - 1 next steps' loads in flight
    (``compile-report`` checks each build's TTGIR for the asynchronous copies). Over
    several HW-chunk slots a step loads one chunk's slots, the weight tile with the last:
    FC1 reads each further chunk's slots, and its weights once; FC2 the same over p's
    split parts."""
    p = _problem(128, 2048, 49, 256)
    plan = plan_launch(p, H100, "split")

    def fc1(hw_chunk):
        launches = gpu_plan.forward_launches(p, dataclasses.replace(plan, hw_chunk=hw_chunk),
                                             H100)
        return next(launch for launch in launches if launch.kernel == "fc1")

    tiles = plan.fc_to_k
    one, four = fc1(plan.hw_chunk), fc1(13)
    assert plan.hw_chunks(p.hw) == 1
    steps = (tiles.stages("fc1", 2, 2) - 1) * tiles.block_r
    assert one.in_flight == steps * (tiles.block_m * 2 + tiles.block_n * 4)
    assert four.in_flight == steps * (tiles.block_m * 2 / 4 + tiles.block_n * 4)
    assert four.program_hbm_bytes == one.program_hbm_bytes
    assert four.program_l2_bytes == 4 * one.program_l2_bytes
    assert gpu_plan.fc_pipelined("fc2_backward", single_fc=False, one_chunk=False)
    # the single-FC form's FC2-backward only adds up the slots: a plain loop
    assert not gpu_plan.fc_pipelined("fc2_backward", single_fc=True, one_chunk=False)
    assert gpu_plan.fc_pipelined("fc2_backward", single_fc=True, one_chunk=True)
    # FC2 and FC1-backward take the split parts of p (dp) as steps of their loop too
    p_parts = dataclasses.replace(plan, gemv_in_stream=False,
                                  fc_to_k=dataclasses.replace(tiles, splits=9))
    fc2 = next(launch for launch in gpu_plan.forward_launches(p, p_parts, H100)
               if launch.kernel == "fc2")
    to_c = p_parts.fc_to_c
    assert fc2.in_flight == pytest.approx((to_c.stages("fc2", 2, 2) - 1) * to_c.block_r
                                          * (to_c.block_m * 2 / 9 + to_c.block_n * 4))
    for kernel in ("fc2", "fc1_backward"):
        assert gpu_plan.fc_pipelined(kernel, single_fc=False, one_chunk=False)


def test_fc_pipelines_fill_a_budget_of_shared_memory_and_no_more_steps_than_the_loop():
    """A batched FC launch takes as many stages as FC_SHARED_BYTES holds (between Triton's
    default of 3 and FC_STAGES' most): small bf16 tiles the most, fp64's wider stages
    fewer, and FC2-backward, whose steps load u beside the slots, fewer than FC1 on the
    same tiles. A loop shorter than its stages keeps only its own steps in flight: FC2
    over K = 16 in one split has one step, which more stages do not speed up."""
    lowest, most = gpu_plan.FC_STAGES
    small, wide = FcTiles(16, 16, 32), FcTiles(64, 64, 16)
    assert small.stages("fc1", 2, 2) == most
    assert lowest <= wide.stages("fc1", 8, 8) < wide.stages("fc1", 4, 4) <= most
    assert wide.stages("fc2_backward", 4, 4) < wide.stages("fc1", 4, 4)
    for kernel, tiles, element in itertools.product(gpu_plan.FC_INPUT_TILES, (small, wide),
                                                    (2, 4, 8)):
        stage = tiles.block_r * (gpu_plan.FC_INPUT_TILES[kernel] * tiles.block_n
                                 * gpu_plan.acc_bytes(element) + tiles.block_m * element)
        stages = tiles.stages(kernel, element, element)
        assert stages * stage <= gpu_plan.FC_SHARED_BYTES or stages == lowest
    p = _problem(64, 256, 3136, 16)
    plan = dataclasses.replace(plan_launch(p, H100, "split"), gemv_in_stream=False,
                               sample_group=p.n, fc_to_k=FcTiles(16, 16, 16),
                               fc_to_c=FcTiles(64, 64, 16))

    def fc2():
        return next(launch for launch in gpu_plan.forward_launches(p, plan, H100)
                    if launch.kernel == "fc2")

    assert fc2().in_flight == 16 * (64 * 2 + 64 * 4)  # one step
    shallow = fc2()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_plan, "FC_STAGES", (most + 4, most + 4))
        assert fc2() == shallow


def test_large_batches_are_offered_groups_that_fit_l2():
    """A batch whose x is larger than half the L2 is offered in groups whose first pass's
    streams fit in it: x alone (the forward), and g, x and the ReLU tail's mask (the
    backward); grouped, the second pass reads them from L2, which the model counts
    (whether the saved bytes pay for the extra launches is the model's choice)."""
    p = _problem(128, 256, 3136, 16, relu_out=True)  # 205 MB of bf16: four times the L2
    half_l2 = H100.l2_bytes // 2
    offered = {plan.sample_group for plan in gpu_plan._candidates(p, H100, "split")}
    assert p.n in offered and all(g * p.sample_bytes <= half_l2 for g in offered - {p.n})
    backward = plan_launch(p, H100, "split", backward=True)
    assert backward.sample_group < p.n

    def hbm_bytes(plan, launches):
        return sum(x.hbm_bytes for x in launches(p, plan, H100))

    # x; g, x and the mask (a bit per element of 16-bit x)
    for streams, launches in ((1, gpu_plan.forward_launches),
                              (2 + 1 / 16, gpu_plan.backward_launches)):
        largest = max(g for g in offered if streams * g * p.sample_bytes <= half_l2)
        assert streams * (largest + 1) * p.sample_bytes > half_l2, streams
        grouped = dataclasses.replace(backward, sample_group=largest)
        whole = dataclasses.replace(backward, sample_group=p.n)
        # most of the second pass's read of x (g) no longer reaches HBM
        saved = hbm_bytes(whole, launches) - hbm_bytes(grouped, launches)
        assert saved > 0.8 * p.n * p.sample_bytes, streams


def test_a_second_read_comes_from_hbm_only_where_x_left_l2():
    """The split path's last pass takes the samples last first, so it finds the most
    recently pooled half of the L2 there and reads only the rest of x from HBM again;
    inductor's pointwise kernel, in sample order, finds none of it once x exceeds the L2.
    ``single`` re-reads each sample in its own program, from L2 while the samples in
    flight fit."""
    p = _problem(32, 256, 3136, 16)  # x of 51 MB in bf16
    x_bytes = p.n * p.sample_bytes

    def hbm_bytes(plan, spec):
        return sum(x.hbm_bytes for x in gpu_plan.forward_launches(p, plan, spec))

    split = dataclasses.replace(plan_launch(p, H100, "split"), sample_group=p.n)
    compiled = sum(x.hbm_bytes for x in gpu_plan.compile_launches(p, H100))
    assert 2.2 * x_bytes < hbm_bytes(split, H100) < compiled - 0.3 * x_bytes
    assert compiled > 3 * x_bytes
    big_l2 = dataclasses.replace(H100, l2_bytes=1 << 30)
    assert hbm_bytes(split, big_l2) < 2.1 * x_bytes
    single = plan_launch(p, H100, "single")
    assert hbm_bytes(single, H100) > 3 * x_bytes  # 528 programs in flight: 51 MB
    few_sms = dataclasses.replace(H100, sms=4)
    assert hbm_bytes(single, few_sms) < 2.1 * x_bytes


def _forcing(monkeypatch, **options):
    """Make every split plan take ``options`` (where the shape allows them)."""
    plan_for = gpu_plan.plan_launch

    def forced(problem, spec, strategy="auto", backward=False):
        plan = plan_for(problem, spec, strategy, backward)
        if plan.strategy != "split":
            return plan
        chosen = dict(options)
        chosen["flat_rescale"] = chosen.get("flat_rescale", False) and problem.flat_rescale_fits
        chosen["gemv_in_stream"] = chosen.get("gemv_in_stream", False) and not problem.single_fc
        whole_channels = chosen["gemv_in_stream"] or chosen.get("fc_to_c", plan.fc_to_c).splits > 1
        if chosen["flat_rescale"] and whole_channels:  # one chunk spans HW
            chosen["hw_chunk"] = -(-problem.hw // plan.block_hw) * plan.block_hw
        if problem.single_fc:  # one C x C FC: its reduction is never split
            chosen.pop("fc_to_k", None)
        return dataclasses.replace(plan, **chosen)

    monkeypatch.setattr(gpu_plan, "plan_launch", forced)


#: every option of the split plan: FC launches of their own, GEMVs in the last pass, the
#: flat rescale, sample groups, FC1 (FC2-backward) with its reduction split in parts, FC2
#: (FC1-backward) split over K, and the backward's first pass over more channels per tile
#: than its dx pass
SPLIT_OPTIONS = {
    "fc-launches": dict(),
    "gemv-in-stream": dict(gemv_in_stream=True),
    "flat-rescale": dict(flat_rescale=True),
    "flat-rescale-gemv": dict(flat_rescale=True, gemv_in_stream=True),
    "groups-of-1": dict(sample_group=1),
    "groups-of-2-gemv": dict(sample_group=2, gemv_in_stream=True),
    "split-reduction": dict(fc_to_k=FcTiles(16, 16, 16, splits=2)),
    "split-reduction-gemv": dict(fc_to_k=FcTiles(16, 16, 16, splits=2), gemv_in_stream=True),
    "split-fc2": dict(fc_to_c=FcTiles(16, 32, 16, splits=2)),
    "split-fc2-flat": dict(fc_to_c=FcTiles(16, 32, 16, splits=2), flat_rescale=True),
    "wider-first-pass": dict(block_c=8, sums_block_c=16),
}


@pytest.mark.parametrize("options", SPLIT_OPTIONS)
@pytest.mark.parametrize("single_fc", [False, True], ids=["two-fc", "single-fc"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_split_option(monkeypatch, options, single_fc, dtype, layout):
    """7 x 9 without the ReLU tail, 7 x 8 with it: the flat rescale writes its mask only
    where each channel is whole bytes of it."""
    _forcing(monkeypatch, **SPLIT_OPTIONS[options])
    tail = dict(residual=True, with_identity=True, act_out="relu") if not single_fc else {}
    check_case(Case(3, 19, 7, 9 - bool(tail), cardinality=3, act="silu",
                    channels_last=LAYOUTS[layout], dtype=DTYPES[dtype], strategy="split",
                    single_fc=single_fc, **tail))


@pytest.mark.parametrize("options", SPLIT_OPTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_split_option_with_a_prologue(monkeypatch, options, layout):
    _forcing(monkeypatch, **SPLIT_OPTIONS[options])
    check_prologue(3, 19, 7, 8, act="hardswish", epilogue="residual_identity_relu",
                   channels_last=LAYOUTS[layout], backend="triton", strategy="split")


class _Launches:
    """A kernel in place of ``name`` in ``sae_triton`` that counts its launches."""

    def __init__(self, monkeypatch, name):
        self.kernel, self.count = getattr(sae_triton, name), 0
        monkeypatch.setattr(sae_triton, name, self)

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", ["none", "frozen", "trained"])
@pytest.mark.parametrize("hw", [(7, 9), (1, 1)], ids=["7x9", "1x1"])
def test_the_flat_dx_pass(monkeypatch, hw, prologue, dtype):
    """The backward's dx pass over flat rows of NCHW, at HW = 63 (each channel's row of
    the ReLU mask ends in a padding bit) and HW = 1 (x is channels_last too, and the mask
    packs channels), under a prologue that takes no gradient too; where the prologue's
    scale and shift do (sums per channel), and in fp64, the 2-D tiles run."""
    flat = _Launches(monkeypatch, "sae_backward_dx_flat_kernel")
    _forcing(monkeypatch, flat_rescale=True)
    if prologue == "none":
        check_case(Case(3, 19, *hw, cardinality=3, act="silu", residual=True,
                        with_identity=True, act_out="relu", dtype=DTYPES[dtype],
                        strategy="split"))
    else:
        check_prologue(3, 19, *hw, act="silu", epilogue="residual_identity_relu",
                       dtype=DTYPES[dtype], backend="triton", strategy="split",
                       frozen_prologue=prologue == "frozen")
    assert flat.count == (prologue != "trained" and dtype != "fp64")


def test_the_flat_passes_find_each_channel_without_a_division():
    """``hw_divisor``'s reciprocal gives offs // HW exactly for every offset a sample can
    have (below 2**31), the sum inside it never wrapping 32 bits: checked at the edges and
    at random offsets for every HW up to 4096 and a few larger ones."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 2**31 - 1, (64,), generator=gen).tolist()
    for hw in [*range(1, 4097), 3136, 12544, 2**20 + 7, 2**31 - 1]:
        magic, shift = sae_triton.hw_divisor(hw)
        assert -(2**31) <= magic < 2**31 and 0 <= shift <= 31
        for n in [0, 1, hw - 1, hw, hw + 1, 2**31 - 2, 2**31 - 1, *offsets]:
            high = (n * (magic % 2**32)) >> 32
            assert high + n < 2**32 and (high + n) >> shift == n // hw, (hw, n)


@pytest.mark.parametrize("flat", [False, True], ids=["tiles", "flat"])
@pytest.mark.parametrize("gemv_in_stream", [False, True], ids=["fc-launches", "gemv-in-stream"])
def test_a_reduction_split_in_three_parts(monkeypatch, gemv_in_stream, flat):
    """FC1 and FC2-backward over C = 40 in three parts of 16 channels, which the next
    launch adds up (FC2 and FC1-backward, or the last pass's GEMVs); FC2 and FC1-backward
    over K = 30 in two, which the last pass adds up."""
    _forcing(monkeypatch, fc_to_k=FcTiles(16, 16, 16, splits=3), gemv_in_stream=gemv_in_stream,
             fc_to_c=FcTiles(16, 32, 16, splits=2), flat_rescale=flat)
    check_case(Case(3, 40, 7, 8, cardinality=3, act="silu", strategy="split", residual=True,
                    with_identity=True, act_out="relu"))


@pytest.mark.parametrize("strategy", ["single", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_tiles_through_the_interpreter(monkeypatch, strategy, channels_last):
    """The tiles and grids an H100 gets (not the interpreter's) on a shape with several
    channel blocks, HW steps and chunks."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(gpu_plan, "device_spec", lambda device: H100)
    check_case(Case(2, 40, 23, 29, cardinality=3, channels_last=channels_last,
                    strategy=strategy, with_identity=True, act_out="relu", residual=True))


# ----------------------------------------------------------------------------------------
# Nothing is kept between calls
# ----------------------------------------------------------------------------------------


def _operands(n, c=64, hw=(32, 32), seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = c // 4
    return dict(x=torch.randn(n, c, *hw, generator=gen).to(DEVICE),
                fc1_weight=(torch.randn(k, c, generator=gen) / c**0.5).to(DEVICE),
                fc1_bias=torch.randn(k, generator=gen).to(DEVICE),
                fc2_weight=(torch.randn(c, k, generator=gen) / k**0.5).to(DEVICE),
                fc2_bias=torch.randn(c, generator=gen).to(DEVICE))


def _fused(operands):
    return sae(**operands, backend="triton", strategy="split")


def _truth(operands):
    return sae(**{k: v.double().cpu() for k, v in operands.items()}, backend="reference")


def test_the_kernels_keep_no_tensors_between_calls():
    """No module-level buffers (a cached counter or scratch tensor would be shared by CUDA
    graphs, streams and devices)."""
    kept = [name for name, value in vars(sae_triton).items()
            if isinstance(value, torch.Tensor)
            or (isinstance(value, dict) and any(isinstance(v, torch.Tensor)
                                                for v in value.values()))]
    assert kept == []


def test_interleaved_calls_give_the_same_bits_as_each_alone():
    a, b = _operands(3), _operands(2, c=19, hw=(5, 7), seed=1)
    alone_a, alone_b = _fused(a), _fused(b)
    for _ in range(2):
        assert torch.equal(_fused(a), alone_a)
        assert torch.equal(_fused(b), alone_b)


def test_a_failed_call_leaves_nothing_behind(monkeypatch):
    """A launch that fails half-way through its grid (here the pool, on its second program)
    does not change what the next call computes."""
    operands = _operands(3)
    expected = _fused(operands)
    if DEVICE.type != "cpu":
        pytest.skip("the failure is injected into the interpreter's programs")
    channel_sums = sae_triton._channel_sums
    calls = []

    def fail_on_the_second_program(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return channel_sums(*args, **kwargs)

    monkeypatch.setattr(sae_triton, "_channel_sums", fail_on_the_second_program)
    with pytest.raises(Exception, match="injected failure"):
        _fused(operands)
    monkeypatch.undo()
    assert len(calls) == 2
    y = _fused(operands)
    assert torch.equal(y, expected)
    torch.testing.assert_close(y.double().cpu(), _truth(operands), rtol=1e-5, atol=1e-6)


def test_plan_command_prints_every_site_and_batch(capsys):
    """``sae-kernels plan --json``: a row per SE site and batch, each with the modelled
    times of the fused op, the floor and torch.compile, and their ratios."""
    import json

    from sae_kernels.__main__ import main

    assert main(["plan", "--device", "a100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert "A100" in report["device"] and len(rows) == len(resnet50_sites()) * 4
    assert {r["n"] for r in rows} == {1, 8, 32, 128}
    for r in rows:
        for name in ("fwd", "fwd+bwd"):
            fused, floor = r[f"{name} fused us"], r[f"{name} floor us"]
            assert 0 < floor < fused
            if floor >= 5:  # the times are rounded to 0.1 us
                assert r[f"{name} fused/floor"] == pytest.approx(fused / floor, rel=0.02)
    assert main(["plan", "--device", "h100", "--markdown", "--layouts"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + len(rows) * 2
