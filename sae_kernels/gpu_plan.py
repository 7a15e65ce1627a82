"""How the Triton kernels run a call on a GPU, chosen by a model of every byte and launch.

Plans (kernels in ``kernels/sae_triton.py``):
    ``single``  one launch, one program per sample: pool, both FCs as per-sample GEMVs,
                rescale. The forward only; it wins where C*K is small and N fills the GPU.
    ``split``   sample-major grids spread every sample over the device:
                forward   pool -> FC1 -> [FC2] -> rescale
                backward  sum g'*x -> FC2 backward -> [FC1 backward] -> dx
                The FCs run over the whole batch at once (tensor cores through ``tl.dot``
                where the weights are 16-bit), so the weights come from HBM about once per
                call. The bracketed launch exists only when ``gemv_in_stream`` is off:
                otherwise each program of the last pass computes FC2 (forward) or
                FC1-backward for its own channels from L2, one launch fewer. Contiguous
                NCHW takes a flat, vectorised rescale (and dx pass) where the model says
                so. Batches
                larger than half the L2 run in ``sample_group``-sized groups, so that a
                group's second pass finds its x (and g) in L2.

The model (:func:`call_seconds`): on the device each launch costs the gap between
dependent kernels plus the larger of its HBM bytes at the device's bandwidth and its
serial tail: waves of programs (as many resident per SM as the launch's warps and register
limit allow), each program moving its bytes at what Little's law allows for the bytes it
keeps in flight, plus its CUDA-core FLOPs (:func:`device_seconds`). The
host issues the launches while the device runs them, so a call takes the longer of the
two. Every byte counted: x, y, identity, g and the ReLU mask, the weights (per program
for the GEMVs, once from HBM for the batched FCs), the slots, the split parts, z, p and
u. The same terms model what torch.compile generates for the block (:func:`compile_launches`).
Constants are per GPU in :data:`GPUS`, with their sources; ``sae-kernels gpu-check`` fits
the kernel gap and the bandwidth to measured times.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import torch

from .cost import sae_cost
from .dispatch import check_strategy
from .layout import MASK_BITS


@dataclass(frozen=True)
class GpuSpec:
    """What the plan and the model need to know about a GPU."""

    name: str
    sms: int
    hbm_bytes_per_second: float
    l2_bytes: int
    #: Loaded DRAM latency: with Little's law, what one program's bytes in flight buy.
    memory_latency_seconds: float
    #: fp32 FMA throughput of one SM (2 * FP32 lanes * boost clock), FLOP/s.
    sm_flops: float
    #: The host's cost to issue one kernel launch (PyTorch's dispatch, the launcher).
    host_launch_seconds: float
    #: Device time between two dependent kernels on one stream while the host keeps the
    #: queue filled: one grid drains, the next is fetched and fills the SMs.
    kernel_gap_seconds: float
    #: Shared memory of one SM (the most a program may take is 1 KB less): with a launch's
    #: shared memory it may cap its resident programs below what the registers allow.
    shared_bytes_per_sm: int
    #: Registers and threads of one SM (compute capability 8.0 and 9.0 alike): with a
    #: launch's warps and register limit they set how many of its programs are resident.
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    #: Shared memory the system reserves per resident program (compute capability 8.0+).
    reserved_shared_bytes: int = 1024
    #: Elements of x in one streaming tile (BLOCK_C * BLOCK_HW).
    tile_elements: int = 4096
    #: Largest tile side along the contiguous axis (HW for NCHW, C for channels_last).
    max_contiguous_block: int = 256


# Sources: NVIDIA H100 / A100 datasheets and whitepapers (SMs, HBM bandwidth, L2 size,
# FP32 lanes and clocks; shared memory per SM from the CUDA C++ Programming Guide's table of
# compute capabilities); the latencies are those of published microbenchmarks
# (Jia et al. 2018 method; Luo et al. 2024, "Benchmarking and Dissecting the Nvidia Hopper
# GPU Architecture": ~480-700 ns loaded); the host's launch cost is PyTorch's usual few
# microseconds per kernel in eager mode; the gap is NVIDIA's "Getting Started with CUDA
# Graphs" (2019): about 1 us per kernel left once launches overlap execution, 0.5 with a
# graph. ``gpu-check`` refits the gap and the bandwidth.
H100 = GpuSpec("H100 SXM", sms=132, hbm_bytes_per_second=3.35e12, l2_bytes=50 << 20,
               memory_latency_seconds=600e-9, sm_flops=2 * 128 * 1.98e9,
               shared_bytes_per_sm=228 << 10,
               host_launch_seconds=3e-6, kernel_gap_seconds=1e-6)
A100 = GpuSpec("A100 SXM", sms=108, hbm_bytes_per_second=2.0e12, l2_bytes=40 << 20,
               memory_latency_seconds=600e-9, sm_flops=2 * 64 * 1.41e9,
               shared_bytes_per_sm=164 << 10,
               host_launch_seconds=3e-6, kernel_gap_seconds=1e-6)
GPUS = {"h100": H100, "a100": A100}

#: Triton's interpreter runs programs one after another and pays per tile step, so CPU
#: tensors get large tiles and a small grid; the odd shapes of the tests still exercise
#: every mask, multi-block loop and multi-chunk grid.
INTERPRETER = dataclasses.replace(H100, name="Triton interpreter", sms=2, tile_elements=32768,
                                  max_contiguous_block=1024)

#: Register limits per thread (``maxnreg``; :func:`register_limit`). Without one, ptxas
#: gives some kernels 48-80 registers and spills a few bytes (for occupancy); with one it
#: allocates what they need, spill-free (``sae-kernels compile-report``). The model counts
#: every thread at its launch's limit (:func:`resident_programs`): all a thread can have
#: means one 8-warp or two 4-warp programs per SM ...
MAX_REGISTERS = 255
#: ... 128, two 8-warp or four 4-warp programs.
VECTOR_REGISTERS = 128
#: Warps of a batched FC launch.
FC_WARPS = 4
#: Samples per tile of the batched FCs at most; ``tl.dot`` needs every side >= 16.
MAX_FC_SAMPLES = 64
MIN_DOT = 16
#: The fewest HW chunks a split plan is offered beside the grid-filling count.
MAX_CHUNKS = 16
#: Pipeline depth (``num_stages``) of the batched FC launches: a loop Triton's pipeliner
#: transforms keeps the loads of stages - 1 steps ahead in flight (``fc_pipelined``), each
#: stage's tiles in shared memory. Their programs are few and each streams its weight
#: slice: bytes in flight are their speed. So a launch takes as many stages as fit in
#: FC_SHARED_BYTES, within FC_STAGES (from Triton's default). With the few KB a kernel's
#: other uses add, two programs (what their registers allow, :func:`resident_programs`)
#: then fit in an A100's SM, which ``sae-kernels compile-report`` checks for every build
#: (:func:`shared_resident_programs`).
FC_SHARED_BYTES = 72 << 10
FC_STAGES = (3, 10)
#: Input tiles a step of each batched FC kernel's loop loads beside its weight tile: the
#: chunk slots or split parts, and in FC2-backward u as well.
FC_INPUT_TILES = {"fc1": 1, "fc2": 1, "fc2_backward": 2, "fc1_backward": 1}
#: Elements of one flat-rescale vector step.
FLAT_BLOCK = 2048


def device_spec(device: torch.device) -> GpuSpec:
    """H100 or A100 constants for a GPU of that kind (the SM count and L2 as reported), the
    interpreter's for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER
    props = torch.cuda.get_device_properties(device)
    base = A100 if "A100" in props.name else H100
    return dataclasses.replace(base, name=props.name, sms=props.multi_processor_count,
                               l2_bytes=props.L2_cache_size)


#: Streaming launches by their register limits: 2-D tiles, the flat rescale, the forward's
#: pool.
LAUNCH_KINDS = ("tiles", "flat", "pool")


def register_limit(p: Problem, num_warps: int, kind: str = "tiles") -> int:
    """The register limit of a streaming launch of ``kind`` over ``p``. The threads of an
    8-warp 2-D tile hold 16 of its elements (8 in fp64); loaded as vectors that fits in
    VECTOR_REGISTERS, and so do 4-warp tiles (smaller). 2-D tiles on rows that are not
    (``Problem.rows_in_vectors``: HW = 49 or 196 in NCHW, C = 228 in channels_last) load
    element by element, an address per element: up to 250 registers, spilling at 128, as
    fp64 does; the forward's pool (one stream in, a sum per row) fits even then. The flat
    passes' FLAT_BLOCK vectors are 8 elements a thread at 8 warps, 16 at 4 (the flat dx
    pass with a prologue spills at 128 there). Batched FC launches take MAX_REGISTERS."""
    if p.element_size == 8:
        return MAX_REGISTERS
    if kind == "flat":
        return VECTOR_REGISTERS if num_warps == 8 else MAX_REGISTERS
    vectors = kind == "pool" or num_warps == 4 or p.rows_in_vectors
    return VECTOR_REGISTERS if vectors else MAX_REGISTERS


def resident_programs(spec: GpuSpec, num_warps: int, registers: int = MAX_REGISTERS) -> int:
    """Programs of ``num_warps`` warps that one SM holds at once when each thread may take
    ``registers`` (allocated per warp in steps of 8 per thread)."""
    threads = 32 * num_warps
    per_thread = triton_cdiv(registers, 8) * 8
    return max(1, min(spec.threads_per_sm // threads,
                      spec.registers_per_sm // (threads * per_thread)))


def shared_resident_programs(spec: GpuSpec, shared_bytes: int) -> int:
    """Programs that one SM's shared memory holds at once when each takes ``shared_bytes``
    (the build's, ``compiled.metadata.shared``)."""
    return spec.shared_bytes_per_sm // (shared_bytes + spec.reserved_shared_bytes)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclass(frozen=True)
class Problem:
    """One call: x (N, C, HW) of ``element_size`` bytes, stacked FC width K."""

    n: int
    c: int
    hw: int
    k: int
    element_size: int
    channels_last: bool
    weight_element_size: int = 0
    has_identity: bool = False
    #: the ReLU tail (its backward reads the mask of ``layout.relu_mask``)
    relu_out: bool = False
    #: the forward writes that mask (for a backward to come)
    writes_mask: bool = False
    prologue: bool = False
    #: the single-FC form (one C x C FC, no FC2)
    single_fc: bool = False
    #: x, identity and y contiguous NCHW (the flat rescale reads them as rows); in the
    #: backward x, g and dx, no prologue gradients and not fp64 (the flat dx pass)
    flat: bool = False

    @property
    def sample_bytes(self) -> int:
        return self.c * self.hw * self.element_size

    @property
    def weight_bytes(self) -> int:
        """Bytes of one FC's weight (FC1 K x C; FC2 C x K)."""
        return self.k * self.c * (self.weight_element_size or self.element_size)

    @property
    def flat_rescale_fits(self) -> bool:
        """Whether the flat rescale can run: x, identity and y in rows, and where it writes
        the ReLU mask, whole bytes of it per channel."""
        return self.flat and (not self.writes_mask or self.hw % MASK_BITS == 0)

    @property
    def rows_in_vectors(self) -> bool:
        """Whether the 2-D tiles load x's rows (HW for NCHW, C for channels_last) as
        vectors: rows a multiple of 16 elements long, which Triton's specialisation of
        the strides tells it (fp32 rows of 196 are whole 16-byte vectors, but it cannot
        know)."""
        return (self.c if self.channels_last else self.hw) % 16 == 0

    @property
    def mask_streams(self) -> float:
        """The ReLU mask's bytes per element of x, in elements of x (one bit each)."""
        return 1 / (MASK_BITS * self.element_size)


@dataclass(frozen=True)
class FcTiles:
    """Tiles of a batched FC launch: samples, outputs, reduction; and how many programs
    share the reduction (each writes its partial result, summed in order by the next
    launch)."""

    block_n: int
    block_m: int
    block_r: int
    splits: int = 1

    def grid(self, n: int, outputs: int) -> tuple[int, int, int]:
        return triton_cdiv(n, self.block_n), triton_cdiv(outputs, self.block_m), self.splits

    def per_split(self, reduction: int) -> int:
        """Reduction elements per split, a whole number of BLOCK_R steps."""
        return triton_cdiv(triton_cdiv(reduction, self.splits), self.block_r) * self.block_r

    def stages(self, kernel: str, element_size: int, weight_element_size: int) -> int:
        """The pipeline depth of batched FC ``kernel`` (of FC_INPUT_TILES) on these tiles:
        a stage holds its [samples, reduction] input tiles in the accumulation dtype and a
        [reduction, outputs] weight tile."""
        stage = self.block_r * (FC_INPUT_TILES[kernel] * self.block_n * acc_bytes(element_size)
                                + self.block_m * weight_element_size)
        return min(max(FC_SHARED_BYTES // stage, FC_STAGES[0]), FC_STAGES[1])


@dataclass(frozen=True)
class LaunchPlan:
    """Strategy, tiles and grids of one call."""

    strategy: str
    block_c: int
    block_hw: int
    #: HW elements per program of the split grids (pool, rescale, backward).
    hw_chunk: int
    num_warps: int
    #: FC tiles of the single strategy's per-sample GEMVs (BLOCK_K, BLOCK_FC).
    block_k: int = 64
    block_fc: int = 64
    #: split: the last pass computes FC2 (FC1-backward) itself, one launch fewer
    gemv_in_stream: bool = False
    #: split: the forward's rescale, or the backward's dx pass, reads contiguous NCHW as
    #: flat rows (with the GEMV in stream only when one chunk spans HW: each program then
    #: takes whole channels)
    flat_rescale: bool = False
    #: split: samples per group of launches (N: one group)
    sample_group: int = 1
    #: reduction-side tile of the in-stream GEMVs (BLOCK_C * BLOCK_R <= the tile)
    block_r: int = 16
    #: FC1 forward / FC2 backward: K outputs, a reduction over C; the other two: C outputs
    fc_to_k: FcTiles = FcTiles(16, 16, 64)
    fc_to_c: FcTiles = FcTiles(16, 64, 64)
    #: ptxas's limit on registers per thread (``maxnreg``) of each of LAUNCH_KINDS
    registers: tuple[int, ...] = (MAX_REGISTERS,) * len(LAUNCH_KINDS)
    #: backward: channels per tile of the first pass (the sums of g'*x), where it takes
    #: more than the dx pass (0: BLOCK_C)
    sums_block_c: int = 0

    def hw_chunks(self, hw: int) -> int:
        return triton_cdiv(hw, self.hw_chunk)

    def flat_chunk(self, c: int, hw: int) -> int:
        """Elements per program of the flat rescale: the tile's share of one sample."""
        return triton_cdiv(triton_cdiv(c * hw, self.blocks(c) * self.hw_chunks(hw)),
                           FLAT_BLOCK) * FLAT_BLOCK

    def blocks(self, c: int) -> int:
        return triton_cdiv(c, self.block_c)

    def first_pass(self) -> LaunchPlan:
        """The plan as the backward's first pass takes it: its own channels per tile."""
        return dataclasses.replace(self, block_c=self.sums_block_c or self.block_c)

    def register_limit(self, kind: str = "tiles") -> int:
        """The register limit of a streaming launch of ``kind`` (LAUNCH_KINDS)."""
        return self.registers[LAUNCH_KINDS.index(kind)]

    def launch_options(self, kind: str = "tiles") -> dict:
        """The compile options of a streaming launch of ``kind``: the warps and the
        register limit."""
        return dict(num_warps=self.num_warps, maxnreg=self.register_limit(kind))


def _streaming_tiles(p: Problem, spec: GpuSpec,
                     backward: bool) -> tuple[list[tuple[int, int]], int]:
    """([(BLOCK_C, BLOCK_HW) to choose from], tile elements): tiles follow the contiguous
    axis. channels_last is also offered 64 channels per tile (128 bytes or more per row
    still): each program of the pool writes BLOCK_C partial sums, so narrower tiles spread
    a sample over as many programs with fewer partial sums for FC1 to add up.

    fp64 accumulates in fp64, and under a prologue the ``backward``'s dx pass keeps more
    values live per element (a second input stream and two sums): each halves the
    elements per tile, which keeps the registers per thread (the forward's passes under a
    prologue build spill-free with whole tiles, and so does the backward's first pass,
    ``LaunchPlan.sums_block_c``). Where the forward writes the ReLU mask the contiguous
    side holds whole bytes of it.
    """
    wide = p.element_size == 8
    tile = spec.tile_elements // (2 if wide else 1) // (2 if p.prologue and backward else 1)
    shortest = MASK_BITS if p.writes_mask else 1  # the mask's whole bytes
    if p.channels_last:
        widths = {max(shortest, min(_pow2(p.c), width))
                  for width in (spec.max_contiguous_block, 64)}
        return [(c, min(_pow2(p.hw), max(1, tile // c))) for c in sorted(widths)], tile
    block_hw = max(shortest, min(_pow2(p.hw), spec.max_contiguous_block))
    return [(min(_pow2(p.c), max(1, tile // block_hw)), block_hw)], tile


def _fc_tile_options(n: int, outputs: int, reduction: int, wide: bool, spec: GpuSpec,
                     min_m: int, may_split: bool) -> list[FcTiles]:
    """The tiles of a batched FC to choose from: samples per tile up to 64, or 16 (more
    programs over the outputs, and so fewer split parts for the next launch to add up, for
    the weights read once per tile of samples); outputs per tile from 64 down to
    ``min_m`` (narrow tiles put more programs on a small FC; wide ones read each sample's
    inputs fewer times); for each, where allowed, the reduction split until the grid
    covers every SM. The reduction side keeps both operand tiles near 512 elements (256
    in fp64; larger tiles spill under 3xTF32), and no larger than a split's share; an
    fp64 accumulator tile holds at most 1024 values (64 x 32 spills in a pipelined
    loop)."""
    most_n = 1024 // min_m if wide else MAX_FC_SAMPLES
    shapes = []
    for block_n in sorted({min(MAX_FC_SAMPLES, most_n, max(MIN_DOT, _pow2(n))), MIN_DOT},
                          reverse=True):
        widest = min(64, _pow2(outputs), 1024 // block_n if wide else 64)
        shapes += [(block_n, block_m)
                   for block_m in sorted({max(min_m, widest >> i) for i in range(3)},
                                         reverse=True)]
    options = []
    for block_n, block_m in shapes:
        tiles = triton_cdiv(n, block_n) * triton_cdiv(outputs, block_m)
        budget = (256 if wide else 512) // max(block_n, block_m)
        wanted = triton_cdiv(spec.sms, tiles) if may_split else 1
        block_r = max(MIN_DOT, min(_pow2(triton_cdiv(reduction, wanted)), 128, budget))
        # no empty split: each takes whole BLOCK_R steps
        splits = triton_cdiv(reduction, FcTiles(block_n, block_m, block_r, wanted).per_split(
            reduction)) if may_split else 1
        options.append(FcTiles(block_n, block_m, block_r, splits))
    return options


def _hw_chunks(p: Problem, group: int, block_c: int, block_hw: int, resident: int,
               spec: GpuSpec) -> list[int]:
    """HW elements per program of the split grids to choose from: enough chunks for the
    ``resident`` programs of every SM, one more or twice as many (the last wave is then
    shorter or fuller), or at most MAX_CHUNKS (more tile steps per program, fewer partial
    sums for FC1 to add up)."""
    programs_per_chunk = max(1, group * triton_cdiv(p.c, block_c))
    steps = triton_cdiv(p.hw, block_hw)
    most = max(1, min(steps, triton_cdiv(resident * spec.sms, programs_per_chunk)))
    return sorted({triton_cdiv(triton_cdiv(p.hw, chunks), block_hw) * block_hw
                   for chunks in (most, min(steps, most + 1), min(steps, 2 * most),
                                  min(most, MAX_CHUNKS))})


def _sample_groups(p: Problem, spec: GpuSpec) -> list[int]:
    """Samples per group to offer: the whole batch, and for each first pass the largest
    group whose streams fit in half the L2, so that the second pass finds them there: the
    forward's x; the backward's g and x (and the ReLU tail's mask). Each is evened out
    over the batch (128 in groups of 65 runs as 64 + 64), no group a small remainder."""
    groups = {p.n}
    for streams in sorted({1, 2 + p.relu_out * p.mask_streams}):
        fits = max(1, int(spec.l2_bytes // 2 // max(1, streams * p.sample_bytes)))
        if fits < p.n:
            groups.add(triton_cdiv(p.n, triton_cdiv(p.n, fits)))
    return sorted(groups)


def _candidates(p: Problem, spec: GpuSpec, strategy: str,
                backward: bool = False) -> list[LaunchPlan]:
    tiles, tile = _streaming_tiles(p, spec, backward)
    wide = p.element_size == 8
    groups = _sample_groups(p, spec)
    plans = []
    whole = _streaming_tiles(p, spec, False)[0]  # the same widths, whole tiles
    for (block_c, block_hw), (whole_c, _) in zip(tiles, whole, strict=True):
        warps = 8 if block_c * block_hw >= min(tile, 4096) else 4
        # a prologue halves the backward's tiles along C only with NCHW (where the first
        # pass may take whole ones over the same HW chunks)
        registers = tuple(register_limit(p, warps, kind) for kind in LAUNCH_KINDS)
        resident = resident_programs(spec, warps, registers[LAUNCH_KINDS.index("tiles")])
        base = dict(block_c=block_c, block_hw=block_hw, num_warps=warps,
                    sums_block_c=whole_c if not p.channels_last else 0, registers=registers,
                    block_k=min(_pow2(p.k), 32 if wide else 64), block_fc=min(_pow2(p.c), 64),
                    block_r=max(1, min(_pow2(p.k), max(1, tile // block_c), 64)))
        if strategy in ("auto", "single"):
            plans.append(LaunchPlan("single", hw_chunk=p.hw, **base))
        if strategy not in ("auto", "split"):
            continue
        for group in groups:
            to_k = _fc_tile_options(group, p.k, p.c, wide, spec, 16, not p.single_fc)
            # FC2 (the single-FC form has none) or FC1-backward, over K
            has_to_c = backward or not p.single_fc
            to_c = _fc_tile_options(group, p.c, p.k, wide, spec, 32, has_to_c)
            for hw_chunk, in_stream, fc_to_k in itertools.product(
                    _hw_chunks(p, group, block_c, block_hw, resident, spec),
                    (False, True) if not p.single_fc else (False,), to_k):
                # FC2 (FC1-backward) tiles matter only when it has a launch of its own
                for fc_to_c in to_c if has_to_c and not in_stream else to_c[:1]:
                    # the flat rescale (dx pass) computes FC2 (FC1-backward) itself, or
                    # adds up its split parts, only over whole channel blocks
                    whole_channels = in_stream or fc_to_c.splits > 1
                    flat = p.flat_rescale_fits and (not whole_channels or hw_chunk >= p.hw)
                    plans.append(LaunchPlan(
                        "split", hw_chunk=hw_chunk, gemv_in_stream=in_stream, flat_rescale=flat,
                        sample_group=max(1, group), fc_to_k=fc_to_k, fc_to_c=fc_to_c, **base))
    return plans


@functools.lru_cache(maxsize=4096)
def plan_launch(problem: Problem, spec: GpuSpec, strategy: str = "auto",
                backward: bool = False) -> LaunchPlan:
    """The plan of least modelled forward time among ``strategy``'s candidates, or with
    ``backward`` the split plan of least modelled backward time: the backward reads only
    z, p and u of the forward, whatever its plan, so each pass takes its own. Cached:
    weighing the candidates costs milliseconds of Python, every call asks."""
    check_strategy(strategy)
    if backward:
        problem = dataclasses.replace(problem, writes_mask=False)
        return min(_candidates(problem, spec, "split", backward=True),
                   key=lambda pl: call_seconds(backward_launches(problem, pl, spec), spec))
    return min(_candidates(problem, spec, strategy),
               key=lambda pl: call_seconds(forward_launches(problem, pl, spec), spec))


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

#: Bytes of the fp32 vectors the kernels keep per sample and channel (z, p, u, slots).
ACC_BYTES = 4


def acc_bytes(element_size: int) -> int:
    """Bytes of the accumulation dtype for x of ``element_size`` bytes: fp32, fp64 for fp64."""
    return 8 if element_size == 8 else ACC_BYTES


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the model sees it."""

    kernel: str
    programs: int
    #: bytes one program moves from HBM, and from L2
    program_hbm_bytes: float
    program_l2_bytes: float
    #: bytes one program keeps in flight (one tile step's loads)
    in_flight: float
    #: bytes of the whole launch that reach HBM (reads and writes)
    hbm_bytes: float
    #: fp32 FMA FLOPs one program runs on CUDA cores (exact-fp32 dots, GEMVs)
    program_flops: float = 0.0
    #: bytes one program's GEMVs read from L2 (weights, fp32 vectors of K), and what one
    #: of their steps keeps in flight (those loops are not pipelined)
    gemv_l2_bytes: float = 0.0
    gemv_in_flight: float = 1.0
    #: warps per program and the register limit per thread: how many programs are
    #: resident per SM (:func:`resident_programs`)
    warps: int = FC_WARPS
    registers: int = MAX_REGISTERS


def device_seconds(launch: Launch, spec: GpuSpec) -> float:
    """A launch's time on the device: the kernel gap + max(HBM bytes / bandwidth, waves x
    one program's time), a wave being the programs resident on every SM at once."""
    per_sm = resident_programs(spec, launch.warps, launch.registers)
    waves = math.ceil(launch.programs / (spec.sms * per_sm))
    program = (((launch.program_hbm_bytes + launch.program_l2_bytes / 2) / launch.in_flight
                + launch.gemv_l2_bytes / 2 / launch.gemv_in_flight)
               * spec.memory_latency_seconds
               + launch.program_flops / (spec.sm_flops / per_sm))
    return spec.kernel_gap_seconds + max(launch.hbm_bytes / spec.hbm_bytes_per_second,
                                         waves * program)


def call_seconds(launches: list[Launch], spec: GpuSpec) -> float:
    """A call among others, as a network's layers run: the host issues the launches while
    the device runs them, so the slower of the two sets the pace (the host at small
    sizes, the device at large ones; a CUDA graph takes the host out)."""
    return max(len(launches) * spec.host_launch_seconds, device_total(launches, spec))


def device_total(launches: list[Launch], spec: GpuSpec) -> float:
    """The launches' time on the device, back to back."""
    return sum(device_seconds(launch, spec) for launch in launches)


def fc_pipelined(kernel: str, single_fc: bool, one_chunk: bool) -> bool:
    """Whether Triton software-pipelines the loop of the batched FC launch ``kernel``
    ("fc1", "fc2", "fc2_backward", "fc1_backward"): every loop with a product, those over
    inputs in parts included (one loop over (reduction elements, part) steps: FC1's and
    FC2-backward's HW-chunk slots, FC2's and FC1-backward's split parts of p or dp). Not
    the single-FC form's FC2-backward, which has no product (dp = du) and adds up the
    slots in a plain loop; with ``one_chunk`` (an argument equal to 1, compiled in as a
    constant) that loop is gone. ``sae-kernels compile-report`` checks this against
    every build's TTGIR."""
    return not (kernel == "fc2_backward" and single_fc) or one_chunk


def _fc_launch(name: str, n: int, outputs: int, reduction: int, tiles: FcTiles, p: Problem,
               inputs: int, parts: int = 1) -> Launch:
    """A batched FC over ``n`` samples: each program reads its weight slice and, over its
    share of the reduction, ``inputs`` fp32 values per sample and reduction element (the
    chunk slots, the split parts of the launch before, u or p); its first output tile
    stores the finished input (z, du, p or dp). Split reductions write their parts, which
    the next launch reads. The products run on tensor cores (3xTF32; fp64 MMA): at these
    sizes they are not the bound. A step loads an input tile and the weight tile, and over
    an input in ``parts`` (chunk slots, split parts) one part's tile, the weight tile with
    the last; a pipelined loop (:func:`fc_pipelined`) keeps the loads of its stages - 1
    next steps in flight (``FcTiles.stages``; no more than the loop has), else one."""
    we = p.weight_element_size or p.element_size
    acc = acc_bytes(p.element_size)
    rows, cols, splits = tiles.grid(n, outputs)
    share = tiles.per_split(reduction) if splits > 1 else reduction
    written = n * outputs * acc * splits  # the output, or its split parts
    samples = min(n, tiles.block_n)  # masked-off rows of a tile load nothing
    steps = 1
    if fc_pipelined(name, p.single_fc, parts == 1):
        steps = min(tiles.stages(name, p.element_size, we) - 1,
                    triton_cdiv(share, tiles.block_r) * parts)
    return Launch(
        name, rows * cols * splits, program_hbm_bytes=tiles.block_m * share * we,
        program_l2_bytes=samples * share * acc * inputs,
        in_flight=steps * tiles.block_r * (tiles.block_m * we / parts + samples * acc),
        hbm_bytes=(outputs * reduction * we + n * reduction * (inputs + 1) * acc + written))


def _stream_launch(name: str, p: Problem, plan: LaunchPlan, group: int, hbm_streams: float,
                   l2_streams: float, gemv: int = 0, kind: str = "tiles",
                   vectors: int = 0) -> Launch:
    """A sample-major pass over ``group`` samples: per element, ``hbm_streams`` tensors of
    x's dtype to or from HBM and ``l2_streams`` from L2; ``gemv`` > 0: each program also
    runs the GEMV for its channels, reading their weight slice and ``gemv`` fp32 vectors
    of K of its sample (p or its split parts; dp or its split parts) from L2; ``vectors``: it
    reads as many fp32 values per channel of its sample from L2 (u, dz or their split
    parts); ``kind`` (of LAUNCH_KINDS) "flat": 1-D vectors over contiguous rows instead
    of 2-D tiles."""
    programs = group * plan.blocks(p.c) * plan.hw_chunks(p.hw)
    elements = plan.block_c * min(plan.hw_chunk, p.hw)
    e = p.element_size
    we = p.weight_element_size or e
    gemv_step = plan.block_r * (plan.block_c * we + gemv * ACC_BYTES)
    # a step loads one tile, or one FLAT_BLOCK vector
    step = (min(elements, FLAT_BLOCK) if kind == "flat"
            else plan.block_c * plan.block_hw * _row_efficiency(p, plan))
    return Launch(
        name, programs, program_hbm_bytes=elements * e * hbm_streams,
        program_l2_bytes=elements * e * l2_streams + plan.block_c * vectors * ACC_BYTES,
        in_flight=step * e * max(1.0, hbm_streams + l2_streams),
        hbm_bytes=(group * p.c * p.hw * e * hbm_streams
                   + (p.weight_bytes + group * gemv * p.k * ACC_BYTES) * (gemv > 0)),
        program_flops=2.0 * plan.block_c * p.k if gemv else 0.0,
        gemv_l2_bytes=gemv_step * triton_cdiv(p.k, plan.block_r) if gemv else 0.0,
        gemv_in_flight=gemv_step, warps=plan.num_warps, registers=plan.register_limit(kind))


def forward_launches(p: Problem, plan: LaunchPlan, spec: GpuSpec) -> list[Launch]:
    """The forward's launches under ``plan``."""
    if p.n == 0:
        return []
    fcs = 1 if p.single_fc else 2
    if plan.strategy == "single":
        # one program per sample: x from HBM, again from L2 if the samples in flight fit
        resident = resident_programs(spec, plan.num_warps, plan.register_limit())
        in_flight = min(p.n, spec.sms * resident) * p.sample_bytes
        reread = in_flight > spec.l2_bytes // 2
        single = _stream_launch("single", p, plan, p.n,
                                2 + reread + p.has_identity + p.writes_mask * p.mask_streams,
                                float(not reread))
        # one program: the whole sample, and both GEMVs over the whole weights (from L2)
        return [dataclasses.replace(
            single, programs=p.n,
            program_hbm_bytes=single.program_hbm_bytes * plan.blocks(p.c),
            program_l2_bytes=single.program_l2_bytes * plan.blocks(p.c),
            hbm_bytes=single.hbm_bytes + fcs * p.weight_bytes,
            program_flops=2.0 * fcs * p.k * p.c, gemv_l2_bytes=fcs * p.weight_bytes,
            gemv_in_flight=plan.block_k * plan.block_fc * p.weight_bytes / (p.k * p.c))]
    launches = []
    for n in _groups(p.n, plan.sample_group):
        chunks = plan.hw_chunks(p.hw)
        in_l2 = _share_in_l2(n * p.sample_bytes, spec)
        p_parts = plan.fc_to_k.splits
        launches.append(_stream_launch("pool", p, plan, n, 1, 0, kind="pool"))
        launches.append(_fc_launch("fc1", n, p.k, p.c, plan.fc_to_k, p, chunks, chunks))
        if fcs == 2 and not plan.gemv_in_stream:
            launches.append(_fc_launch("fc2", n, p.c, p.k, plan.fc_to_c, p, p_parts, p_parts))
        hbm_streams = 2 - in_l2 + p.has_identity + p.writes_mask * p.mask_streams
        in_stream = plan.gemv_in_stream and fcs == 2
        u_parts = 0 if in_stream else plan.fc_to_c.splits if fcs == 2 else 1
        launches.append(_stream_launch(
            "rescale", p, plan, n, hbm_streams, in_l2, p_parts * in_stream,
            "flat" if plan.flat_rescale else "tiles", vectors=u_parts))
    return launches


def backward_launches(p: Problem, plan: LaunchPlan, spec: GpuSpec) -> list[Launch]:
    """The backward's launches under (split) ``plan``, and the weight gradients the caller
    computes over the batch with PyTorch ops (a matmul per FC and the bias sums)."""
    if p.n == 0:
        return []
    fcs = 1 if p.single_fc else 2
    launches = []
    reads = 2 + p.relu_out * p.mask_streams  # g, x, and the ReLU tail's mask
    # the dx pass reads g (and the mask) again, and x with a prologue; writes dx (and
    # d_identity)
    second_reads = 1 + p.relu_out * p.mask_streams + p.prologue
    writes = 1 + (p.has_identity and p.relu_out)
    for n in _groups(p.n, plan.sample_group):
        chunks = plan.hw_chunks(p.hw)
        in_l2 = _share_in_l2(n * p.sample_bytes * reads, spec)
        # dp's split parts (FC2-backward applies act' to each)
        dp_inputs = plan.fc_to_k.splits
        launches.append(_stream_launch("reduce", p, plan.first_pass(), n, reads, 0))
        launches.append(_fc_launch("fc2_backward", n, p.k, p.c, plan.fc_to_k, p, chunks + 1,
                                   chunks))
        # FC1-backward (the single FC's too) unless the dx pass runs it; that pass reads u
        # and dz's split parts, or dp's
        in_stream = plan.gemv_in_stream and fcs == 2
        if not in_stream:
            launches.append(_fc_launch("fc1_backward", n, p.c, p.k, plan.fc_to_c, p, dp_inputs,
                                       plan.fc_to_k.splits))
        launches.append(_stream_launch(
            "dx", p, plan, n, writes + second_reads * (1 - in_l2), second_reads * in_l2,
            dp_inputs * in_stream, "flat" if plan.flat_rescale else "tiles",
            vectors=1 + (0 if in_stream else plan.fc_to_c.splits)))
    vectors = p.n * (p.k + p.c) * ACC_BYTES
    for name in ("dW1", "dW2")[:fcs]:
        launches.append(_device_wide(name, spec, vectors + p.weight_bytes))
    launches.append(_device_wide("bias sums", spec, vectors))
    return launches


def _device_wide(name: str, spec: GpuSpec, hbm_bytes: float) -> Launch:
    """A launch that streams ``hbm_bytes`` at the device's bandwidth (a library kernel)."""
    return Launch(name, spec.sms, 0, 0, 1, hbm_bytes)


def _share_in_l2(first_pass_bytes: float, spec: GpuSpec) -> float:
    """Share of what a first pass read that a second pass finds in L2 when it takes the
    samples last first (``_sample_major``): the most recent half of the L2 (the other half
    holds the lines being written)."""
    return min(1.0, (spec.l2_bytes / 2) / max(1.0, first_pass_bytes))


def _groups(n: int, group: int) -> list[int]:
    return [min(group, n - start) for start in range(0, n, group)]


def _row_efficiency(p: Problem, plan: LaunchPlan) -> float:
    """Share of a 2-D tile that carries data: with NCHW the tile's HW side beyond HW is
    masked off (rows of 49 in tiles of 64). Rows that are not a multiple of 16 bytes also
    load element by element; that costs instructions, not bytes in flight, and is not
    modelled."""
    return 1.0 if p.channels_last else min(1.0, p.hw / plan.block_hw)


def training_forward(p: Problem) -> Problem:
    """The forward's problem where a backward follows: it writes the ReLU tail's mask."""
    return dataclasses.replace(p, writes_mask=p.relu_out)


def model_seconds(p: Problem, plan: LaunchPlan, spec: GpuSpec, backward: bool = False) -> float:
    """Modelled seconds of the forward under ``plan``, or of it and the backward under
    its own plan (two calls; ``p`` then the :func:`training_forward`'s)."""
    seconds = call_seconds(forward_launches(p, plan, spec), spec)
    if backward:
        backward_plan = plan_launch(p, spec, "split", backward=True)
        seconds += call_seconds(backward_launches(p, backward_plan, spec), spec)
    return seconds


def floor_seconds(p: Problem, spec: GpuSpec, backward: bool = False) -> float:
    """The HBM floor: the compulsory bytes of ``cost.sae_cost`` (x read once, y written
    once, the weights read once; the backward g and x read once, dx written once, the
    weights read and their gradients written once), the identity read once and, behind
    the ReLU tail, its gradient written once, at the device's bandwidth. No launch."""
    compulsory = sae_cost(p.n, p.c, p.hw, p.k, p.element_size, backward,
                          p.single_fc).compulsory_bytes
    identity = p.has_identity * (1 + (backward and p.relu_out)) * p.n * p.sample_bytes
    return (compulsory + identity) / spec.hbm_bytes_per_second


def compile_passes(p: Problem, spec: GpuSpec, backward: bool = False) -> list[list[Launch]]:
    """What torch.compile (inductor, default mode) generates for the same block on a GPU,
    modelled in the same terms as the fused op's launches: the forward's launches, and
    the backward's.

    Forward: a reduction kernel with the prologue folded in (x read once, z written), the
    FCs as cuBLAS GEMMs with the activation a pointwise kernel between them, and one
    pointwise kernel with the gate, the rescale and the tail (x read again, from L2 if the
    whole tensor fits in half of it). Backward: a reduction of g'*x with du in its epilogue,
    two GEMMs with act' between them, the two weight-gradient GEMMs and the bias sums, and
    the dx kernel (g, y for the ReLU mask, x with a prologue).

    How: inductor's reductions take [rows, HW] tiles as the fused pool does, so they are
    modelled with the fastest of the pool's tiles and grids over the whole batch; its
    pointwise kernels are flat 1-D blocks, modelled as the flat rescale; the GEMMs
    (cuBLAS) stream at the device's bandwidth.
    """
    if p.n == 0:
        return [[] for _ in range(1 + backward)]
    tiles = min((dataclasses.replace(plan, flat_rescale=True, gemv_in_stream=False,
                                     sample_group=p.n)
                 for plan in _candidates(p, spec, "split")),
                key=lambda plan: device_seconds(
                    _stream_launch("reduction", p, plan, p.n, 1, 0, kind="pool"), spec))
    tensor = p.n * p.sample_bytes
    x_in_l2 = tensor <= spec.l2_bytes // 2
    fcs = 1 if p.single_fc else 2
    vectors = p.n * (p.c + p.k) * ACC_BYTES

    def gemm(name: str) -> Launch:
        return _device_wide(name, spec, p.weight_bytes + vectors)

    def stream(name: str, hbm: float, l2: float, kind: str) -> Launch:
        return _stream_launch(name, p, tiles, p.n, hbm, l2, kind=kind)

    forward = [stream("reduction", 1, 0, "pool")]
    forward += [gemm(f"gemm{i + 1}") for i in range(fcs)]
    if fcs == 2:
        forward.append(_device_wide("act", spec, vectors))
    forward.append(stream("rescale", 1 + (not x_in_l2) + p.has_identity, x_in_l2, "flat"))
    if not backward:
        return [forward]
    reads = 2 + p.relu_out
    launches = [stream("reduction g*x", reads, 0, "tiles")]
    launches += [gemm(f"gemm{i + 1} backward") for i in range(fcs)]
    if fcs == 2:
        launches.append(_device_wide("act backward", spec, vectors))
    launches += [gemm(f"dW{i + 1}") for i in range(fcs)]
    launches.append(_device_wide("bias sums", spec, vectors))
    in_l2 = tensor * reads <= spec.l2_bytes // 2
    second_reads = 1 + p.relu_out + p.prologue
    writes = 1 + (p.has_identity and p.relu_out)
    launches.append(stream("dx", writes + second_reads * (not in_l2), second_reads * in_l2,
                           "flat"))
    return [forward, launches]


def compile_launches(p: Problem, spec: GpuSpec, backward: bool = False) -> list[Launch]:
    """:func:`compile_passes`' launches in one list."""
    return [launch for launches in compile_passes(p, spec, backward) for launch in launches]


def compile_seconds(p: Problem, spec: GpuSpec, backward: bool = False) -> float:
    """torch.compile's modelled seconds: the forward, or it and the backward (two calls)."""
    return sum(call_seconds(launches, spec) for launches in compile_passes(p, spec, backward))
