// The fused SE / SaE operator on CPU: ops, autograd and registration.
//
// Forward, per chunk of samples small enough to stay in cache between its two passes:
//   pool (z) -> p = W1 z + b1 -> h = act(p) -> u = W2 h + b2 -> s = gate(u) -> rescale.
// Backward, per chunk: ds = sum g'*x -> du, dh, dp, dz -> dx = g' * scale + dz / HW;
// then the weight gradients over the whole batch. The passes over x and the FCs run in
// kernels.h (vectorized per instruction set, chosen at run time); activations and
// gates on the small (chunk, C) and (chunk, K) tensors are ATen's own vectorized ops,
// so they match the reference exactly. Work is split across threads only where each
// output element is produced by one thread in a fixed order: the same inputs give the
// same bits with any number of threads.
//
// Ops (namespace sae_kernels):
//   cpu_sae       the differentiable operator (autograd below), returns y
//   cpu_forward   y and the saved z (N, C), p (N, K), u (N, C)
//   cpu_backward  dx, d_identity, and the weight and bias gradients
//   cpu_copy_like_output  x copied into an output allocated as the operator's are

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "sae_cpu.h"

namespace sae_cpu {
namespace {

using at::Tensor;
using std::optional;

// Act and gate codes: indices into sae_kernels.options.ACTIVATIONS / GATES.
enum Act : int64_t { kRelu = 0, kSilu = 1, kHardswish = 2, kGelu = 3 };
enum Gate : int64_t { kSigmoid = 0, kHardsigmoid = 1 };

// Samples per chunk: as many as fit in this many bytes (at least one), so the second
// pass over a chunk reads it from cache. SAE_KERNELS_CPU_CHUNK_BYTES overrides it.
constexpr int64_t kDefaultChunkBytes = 4 << 20;
// Elements of work below which a loop is not split across threads.
constexpr int64_t kGrainElements = 1 << 14;
// Most pieces per thread a parallel loop is cut into, for balance.
constexpr int64_t kPiecesPerThread = 8;
// Outputs per tile of the FC kernel (kernels.h): a piece of an FC's outputs is whole tiles.
constexpr int64_t kLinearOutputs = 4;
// Outputs from this size on are advised onto huge pages (glibc's largest mmap threshold).
constexpr size_t kHugePageMinBytes = size_t(32) << 20;
// Columns per piece of the FC backward's split (a multiple of every vector width).
constexpr int64_t kColumnBlock = 64;
// Bytes of consecutive pixels per task in the channels_last per-channel sums.
constexpr int64_t kPixelBlockBytes = 64 << 10;

const KernelTable& pick_table() {
  const char* forced = std::getenv("SAE_KERNELS_CPU_ISA");
  std::string want = forced ? forced : "";
#if defined(__x86_64__)
  __builtin_cpu_init();
  bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want.empty() ? has_avx512 : want == "avx512") {
    TORCH_CHECK(has_avx512, "SAE_KERNELS_CPU_ISA=avx512 but this CPU lacks AVX-512");
    return avx512::table();
  }
  if (want.empty() ? has_avx2 : want == "avx2") {
    TORCH_CHECK(has_avx2, "SAE_KERNELS_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return avx2::table();
  }
#endif
  TORCH_CHECK(want.empty() || want == "generic", "SAE_KERNELS_CPU_ISA must be avx512, avx2 or "
              "generic (on this CPU), got ", want);
  return generic::table();
}

const KernelTable& kernels() {
  static const KernelTable& table = pick_table();
  return table;
}

// A non-negative integer from the environment, or `fallback` where it is unset.
int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env ? std::max<int64_t>(0, std::atoll(env)) : fallback;
}

int64_t chunk_bytes() {
  static const int64_t bytes =
      std::max<int64_t>(1, env_int("SAE_KERNELS_CPU_CHUNK_BYTES", kDefaultChunkBytes));
  return bytes;
}

// Samples of x (N >= 1) per chunk: as many as fit in chunk_bytes(), at least one.
int64_t samples_per_chunk(const Tensor& x) {
  int64_t sample_bytes = x.size(1) * x.size(2) * x.size(3) * x.element_size();
  return std::clamp<int64_t>(chunk_bytes() / std::max<int64_t>(1, sample_bytes), 1, x.size(0));
}

// How one 4-D tensor is walked: as channel rows (NCHW) or pixel rows (channels_last).
struct View {
  bool pixels;      // rows are pixels with C contiguous channels
  int64_t sample;   // stride between samples
  int64_t row;      // stride between rows (channels for NCHW, pixels for channels_last)
};

optional<View> view_of(const Tensor& t) {
  auto s = t.strides();
  int64_t c = t.size(1), h = t.size(2), w = t.size(3);
  bool hw_flat = w == 1 || h == 1 || s[2] == w * s[3];
  int64_t hw_stride = w == 1 ? s[2] : s[3];
  if (!hw_flat) return std::nullopt;
  if (c > 1 && s[1] == 1) return View{true, s[0], hw_stride};
  if (hw_stride == 1 || h * w == 1) return View{false, s[0], s[1]};
  return std::nullopt;
}

// `t` in the same walk as `like` (copied when its layout differs).
Tensor same_walk(const Tensor& t, const View& like) {
  auto v = view_of(t);
  if (v && v->pixels == like.pixels) return t;
  return t.contiguous(like.pixels ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Asks for transparent huge pages under a CPU tensor of at least kHugePageMinBytes not
// yet written. glibc serves allocations that large with a fresh mapping every time, and
// at one page fault per 4 KiB their first write cost more than the operator (half the
// time at N = 32 on SE-ResNet's first stage); with 2 MiB pages it is 512 times fewer
// faults. Smaller outputs are reused heap memory, already mapped, where the advice only
// costs. Off with SAE_KERNELS_CPU_HUGE_PAGES=0; a no-op where the kernel's THP setting
// is `never`.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = env_int("SAE_KERNELS_CPU_HUGE_PAGES", 1) != 0;
  constexpr uintptr_t kHugePage = 2 << 20;
  if (!enabled || !t.is_cpu() || t.nbytes() < kHugePageMinBytes) return;
  auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  uintptr_t end = (begin + t.nbytes()) & ~(kHugePage - 1);
  begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#endif
}

// A new output shaped like x, always walkable: x's layout when x is, else NCHW.
Tensor output_like(const Tensor& x) {
  Tensor out = at::empty_like(x);
  if (!view_of(out)) out = at::empty_like(x, at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  return out;
}

Tensor activation_backward(const Tensor& grad, const Tensor& p, const Tensor& h, int64_t act) {
  switch (act) {
    case kRelu: return at::threshold_backward(grad, h, 0);
    case kSilu: return at::silu_backward(grad, p);
    case kHardswish: return at::hardswish_backward(grad, p);
    default: return at::gelu_backward(grad, p);
  }
}

Tensor gate_backward(const Tensor& grad, const Tensor& u, const Tensor& s, int64_t g) {
  return g == kSigmoid ? at::sigmoid_backward(grad, s) : at::hardsigmoid_backward(grad, u);
}

// Runs f(begin, end) over [0, n) in parallel: in pieces of at least `grain`, at most
// kPiecesPerThread per thread, handed to the threads as they come free (on a shared
// machine a loop split once, evenly, waits for its slowest thread). Serial inside
// another parallel region.
template <typename F>
void parallel(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(1, grain);
  int64_t threads = at::get_num_threads();
  int64_t pieces = std::min((n + grain - 1) / grain, threads * kPiecesPerThread);
  if (pieces <= 1 || threads <= 1 || at::in_parallel_region() || omp_in_parallel()) {
    if (n > 0) f(0, n);
    return;
  }
  int64_t size = (n + pieces - 1) / pieces;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::min(threads, pieces))
  for (int64_t piece = 0; piece < pieces; ++piece) {
    int64_t begin = piece * size;
    if (begin < n) f(begin, std::min(n, begin + size));
  }
}

template <typename A>
const FcKernels<A>& fc_kernels() {
  if constexpr (std::is_same_v<A, double>) return kernels().fc_f64;
  else return kernels().fc_f32;
}

// out (rows, outs) = in (rows, ins) @ w^T + bias, split over output columns.
template <typename A>
void linear(const A* in, int64_t rows, int64_t ins, const A* const* w, const A* bias, A* out,
            int64_t outs) {
  // whole tiles of kLinearOutputs per piece
  int64_t tiles = (outs + kLinearOutputs - 1) / kLinearOutputs;
  parallel(tiles, kGrainElements / std::max<int64_t>(1, rows * ins * kLinearOutputs),
           [&](int64_t b, int64_t e) {
             fc_kernels<A>().linear(in, rows, ins, w, bias, out, outs, b * kLinearOutputs,
                                    std::min(outs, e * kLinearOutputs));
           });
}

// d_in (rows, ins) = d_out (rows, outs) @ w (outs, ins), split over columns of d_in.
template <typename A>
void linear_backward_input(const A* d_out, int64_t rows, int64_t outs, const A* const* w,
                           int64_t ins, A* d_in) {
  // whole blocks of kColumnBlock columns per piece, so the kernel runs on whole vectors
  int64_t blocks = (ins + kColumnBlock - 1) / kColumnBlock;
  parallel(blocks, kGrainElements / std::max<int64_t>(1, rows * outs * kColumnBlock),
           [&](int64_t b, int64_t e) {
             fc_kernels<A>().linear_backward_input(d_out, rows, outs, w, ins, d_in,
                                                   b * kColumnBlock,
                                                   std::min(ins, e * kColumnBlock));
           });
}

template <typename T, typename A>
const PassKernels<T, A>& pass_kernels() {
  if constexpr (std::is_same_v<T, Bf16>) return kernels().bf16;
  else if constexpr (std::is_same_v<T, double>) return kernels().f64;
  else return kernels().f32;
}

template <typename T>
T* data(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// `t` as a contiguous tensor of the accumulation type (itself where it already is one).
template <typename A>
Tensor as_acc(const Tensor& t) {
  constexpr auto acc = c10::CppTypeToScalarType<A>::value;
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}

// act(p) and gate(u) of the small (rows, width) tensors of the accumulation type, by the
// forward's own loops (kernels.h), so the backward sees the values the forward used.
template <typename F>
Tensor elementwise(const Tensor& in, const F& f) {
  Tensor out = at::empty(in.sizes(), in.options());
  Tensor src = in.contiguous();
  if (in.scalar_type() == at::kDouble) f(fc_kernels<double>(), data<double>(src), data<double>(out));
  else f(fc_kernels<float>(), data<float>(src), data<float>(out));
  return out;
}

Tensor activation(const Tensor& p, int64_t act) {
  return elementwise(p, [&](const auto& fc, auto in, auto out) {
    fc.activate(in, p.numel(), act, out);
  });
}

Tensor gate(const Tensor& u, int64_t g) {
  return elementwise(u, [&](const auto& fc, auto in, auto out) { fc.gate(in, u.numel(), g, out); });
}

// Per-channel sums over the pixels of `count` samples: out[i * c + channel] for sample i.
// sum(i, p0, pixels, c0, width, dst) writes the sums over pixels [p0, p0 + pixels) of
// channels [c0, c0 + width) of sample i to dst[0, width).
// NCHW: a task sums whole channel rows. channels_last: a task sums one block of
// kPixelBlockBytes of consecutive pixels across all channels (reading memory in order:
// a task per channel slice would stride a whole pixel per step), and the blocks' partial
// sums are then added in block order. Blocks are fixed by the shape, so the result does
// not depend on the thread count.
// With `values` > 1 the sum writes that many sums per channel, the k-th at dst[k * c + ...]:
// sample i's sums are out[i * values * c, (i + 1) * values * c).
template <typename A, typename F>
void channel_sums(const View& v, int64_t count, int64_t c, int64_t hw, int64_t element_bytes,
                  A* out, const F& sum, int64_t values = 1) {
  if (!v.pixels) {
    parallel(count * c, kGrainElements / std::max<int64_t>(1, hw), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        int64_t c0 = i % c, width = std::min(e - i, c - c0);
        sum(i / c, 0, hw, c0, width, out + (i / c) * values * c + c0);
        i += width;
      }
    });
    return;
  }
  int64_t per_block = std::max<int64_t>(1, kPixelBlockBytes / (c * element_bytes));
  int64_t blocks = (hw + per_block - 1) / per_block;
  int64_t stride = values * c;
  auto block_sums = [&](A* dst) {
    parallel(count * blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        int64_t p0 = (t % blocks) * per_block;
        sum(t / blocks, p0, std::min(per_block, hw - p0), 0, c, dst + t * stride);
      }
    });
  };
  if (blocks == 1) return block_sums(out);
  std::vector<A> partial(count * blocks * stride);
  block_sums(partial.data());
  parallel(count, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const A* first = partial.data() + i * blocks * stride;
      A* row = out + i * stride;
      std::copy(first, first + stride, row);
      for (int64_t j = 1; j < blocks; ++j)
        for (int64_t ch = 0; ch < stride; ++ch) row[ch] += first[j * stride + ch];
    }
  });
}

// The prologue's per-channel values in the accumulation type; absent: no prologue.
template <typename A>
struct PrologueValues {
  bool present = false;
  int64_t act = kPrologueNone;
  std::vector<A> scale, shift;  // C values each (1 and 0 where a tensor was not given)

  // The prologue from channel c0 on.
  Prologue<A> from(int64_t c0) const { return {scale.data() + c0, shift.data() + c0, act}; }
};

template <typename A>
PrologueValues<A> prologue_values(int64_t c, const optional<Tensor>& scale,
                                  const optional<Tensor>& shift, int64_t act) {
  PrologueValues<A> p;
  p.present = scale || shift || act != kPrologueNone;
  p.act = act;
  auto values = [&](const optional<Tensor>& t, A fill) {
    if (!t) return std::vector<A>(p.present ? c : 0, fill);
    Tensor v = as_acc<A>(*t);
    return std::vector<A>(data<A>(v), data<A>(v) + c);
  };
  p.scale = values(scale, A(1));
  p.shift = values(shift, A(0));
  return p;
}

// x' of a chunk of samples, kept for the pass after the pool where the prologue has an
// activation (float32 and float64): it is computed once per element, and the chunk stays
// in cache between the passes as x itself does.
template <typename T>
struct Scratch {
  Tensor tensor;  // undefined: no scratch, x' is recomputed from x
  View view{};

  T* at(int64_t sample, int64_t row) const {
    return data<T>(tensor) + sample * view.sample + row * view.row;
  }
};

// Pool samples [n0, n0 + count) of x (or of the prologue's x') into z (sums, not yet
// divided by HW); x' also goes to `xp` when it holds a tensor.
template <typename T, typename A>
void pool(const Tensor& x, const View& v, int64_t n0, int64_t count, const PrologueValues<A>& pro,
          A* z, const Scratch<T>& xp) {
  const auto& k = pass_kernels<T, A>();
  const T* base = data<T>(x) + n0 * v.sample;
  int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  bool store = xp.tensor.defined();
  channel_sums(v, count, c, hw, sizeof(T), z,
               [&](int64_t i, int64_t p0, int64_t pixels, int64_t c0, int64_t width, A* dst) {
                 const T* sample = base + i * v.sample;
                 if (v.pixels) {
                   const T* first = sample + p0 * v.row + c0;
                   if (store) k.prologue_sum_store_pixels(first, pixels, v.row, width,
                                                          pro.from(c0), dst, xp.at(i, p0) + c0,
                                                          xp.view.row);
                   else if (pro.present) k.prologue_sum_pixels(first, pixels, v.row, width,
                                                               pro.from(c0), dst);
                   else k.sum_pixels(first, pixels, v.row, width, dst);
                 } else if (store) {
                   k.prologue_sum_store_rows(sample + c0 * v.row, width, v.row, hw, pro.from(c0),
                                             dst, xp.at(i, c0), xp.view.row);
                 } else if (pro.present) {
                   k.prologue_sum_rows(sample + c0 * v.row, width, v.row, hw, pro.from(c0), dst);
                 } else {
                   k.sum_rows(sample + c0 * v.row, width, v.row, hw, dst);
                 }
               });
}

// Rows of samples [n0, n0 + count) split across threads: pixel blocks or channel rows.
template <typename F>
void for_rows(const View& v, int64_t count, int64_t c, int64_t hw, const F& f) {
  if (v.pixels) {
    int64_t per_task = std::max<int64_t>(1, kGrainElements / c);
    int64_t blocks = (hw + per_task - 1) / per_task;
    parallel(count * blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        int64_t n = i / blocks, r0 = (i % blocks) * per_task;
        f(n, r0, std::min(per_task, hw - r0));
      }
    });
  } else {
    parallel(count * c, kGrainElements / std::max<int64_t>(1, hw), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        int64_t n = i / c, r0 = i % c, len = std::min(e - i, c - r0);
        f(n, r0, len);
        i += len;
      }
    });
  }
}

struct Options {
  int64_t act, gate;
  bool residual, relu_out;
  int64_t prologue_act;
};

// The FC weights in the accumulation dtype, by rows: fc1 is its branch matrices in order
// (together the rows of the stacked W1, (K, C)), fc2 one (C, K) matrix, or none (the
// single-FC form, K = C, u = p).
template <typename A>
struct Weights {
  std::vector<Tensor> keep;  // owners of the rows (copies only where the dtype differed)
  std::vector<const A*> w1_rows, w2_rows;
  std::vector<A> b1;  // the branch biases, concatenated (K values)
  Tensor b2;
  int64_t k = 0;

  bool has_fc2() const { return !w2_rows.empty(); }
  const A* b1_data() const { return b1.empty() ? nullptr : b1.data(); }
  const A* b2_data() const { return b2.defined() ? data<A>(b2) : nullptr; }
};

// K: the rows of the stacked fc1.
int64_t fc1_rows(at::TensorList w1s) {
  int64_t k = 0;
  for (const Tensor& w : w1s) k += w.size(0);
  return k;
}

template <typename A>
void add_rows(const Tensor& w, std::vector<const A*>& rows, std::vector<Tensor>& keep) {
  Tensor t = as_acc<A>(w);
  for (int64_t r = 0; r < t.size(0); ++r) rows.push_back(data<A>(t) + r * t.size(1));
  keep.push_back(std::move(t));
}

template <typename A>
Weights<A> weights_by_rows(at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
                           const optional<Tensor>& b2) {
  Weights<A> w;
  for (const Tensor& t : w1s) add_rows<A>(t, w.w1_rows, w.keep);
  if (w2) add_rows<A>(*w2, w.w2_rows, w.keep);
  w.k = static_cast<int64_t>(w.w1_rows.size());
  for (const Tensor& b : b1s) {
    Tensor t = as_acc<A>(b);
    w.b1.insert(w.b1.end(), data<A>(t), data<A>(t) + t.numel());
  }
  if (b2) w.b2 = as_acc<A>(*b2);
  return w;
}

// A profiler range around one stage of the operator (sae_kernels::<name> in torch.profiler
// and its traces); close to free while no profiler runs.
struct Stage {
  explicit Stage(std::string_view name) : guard(at::RecordScope::FUNCTION) {
    if (guard.isActive()) guard.before(name);
  }
  at::RecordFunction guard;
};

// The forward over x into y; z (N, C), p (N, K) and u (N, C) receive the pooled means,
// the fc1 outputs and the gate inputs (the backward's saved values).
template <typename T, typename A>
void forward_typed(const Tensor& x, const View& xv, const optional<Tensor>& identity,
                   const View& iv, const Tensor& y, const View& yv, const Weights<A>& w,
                   const PrologueValues<A>& pro, A* z, A* p, A* u, const Options& o) {
  int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = w.k;
  int64_t chunk = samples_per_chunk(x);
  const auto& kern = pass_kernels<T, A>();
  const auto& fc = fc_kernels<A>();
  Epilogue e{o.residual, identity.has_value(), o.relu_out};
  std::vector<A> h(w.has_fc2() ? chunk * k : 0), s(chunk * c);
  Scratch<T> xp;
  // bf16 keeps x' in fp32 (recomputed): rounded to bf16 for the scratch it would move the
  // output off the reference's by more than its own rounding
  if (std::is_same_v<T, A> && pro.act != kPrologueNone) {
    xp.tensor = at::empty({chunk, c, x.size(2), x.size(3)},
                          x.options().memory_format(xv.pixels ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
    xp.view = *view_of(xp.tensor);
  }
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    int64_t count = std::min(chunk, n - n0);
    A* zc = z + n0 * c;
    {
      Stage stage("sae_kernels::pool");
      pool<T, A>(x, xv, n0, count, pro, zc, xp);
      for (int64_t i = 0; i < count * c; ++i) zc[i] /= static_cast<A>(hw);
    }
    {
      Stage stage("sae_kernels::excitation");
      linear<A>(zc, count, c, w.w1_rows.data(), w.b1_data(), p + n0 * k, k);
      if (w.has_fc2()) {
        fc.activate(p + n0 * k, count * k, o.act, h.data());
        linear<A>(h.data(), count, k, w.w2_rows.data(), w.b2_data(), u + n0 * c, c);
      } else {
        std::copy(p + n0 * k, p + (n0 + count) * k, u + n0 * c);
      }
      fc.gate(u + n0 * c, count * c, o.gate, s.data());
    }
    const A* sp = s.data();
    Stage stage("sae_kernels::rescale");
    for_rows(xv, count, c, hw, [&](int64_t i, int64_t r0, int64_t rows) {
      int64_t sample = n0 + i;
      Rows<T> t{data<T>(x) + sample * xv.sample + r0 * xv.row, xv.row,
                identity ? data<T>(*identity) + sample * iv.sample + r0 * iv.row : nullptr,
                iv.row,
                data<T>(y) + sample * yv.sample + r0 * yv.row, yv.row,
                rows, xv.pixels ? c : hw};
      if (xp.tensor.defined()) {  // x' itself, from the pool pass
        t.x = xp.at(i, r0);
        t.x_stride = xp.view.row;
        if (xv.pixels) kern.rescale_pixels(t, sp + i * c, e);
        else kern.rescale_rows(t, sp + i * c + r0, e);
      } else if (pro.present) {
        if (xv.pixels) kern.prologue_rescale_pixels(t, sp + i * c, e, pro.from(0));
        else kern.prologue_rescale_rows(t, sp + i * c + r0, e, pro.from(r0));
      } else if (xv.pixels) {
        kern.rescale_pixels(t, sp + i * c, e);
      } else {
        kern.rescale_rows(t, sp + i * c + r0, e);
      }
    });
  }
}

at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_dtype(const Tensor& x) {
  auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                   "the CPU kernels take float32, float64 or bfloat16, got ", t);
}

bool is_float(const Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// The rules of sae_kernels.options.check_operands, with the same messages: this op is
// reached without the Python checks.
void check_operands(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                    const optional<Tensor>& w2, const optional<Tensor>& b2,
                    const optional<Tensor>& identity, int64_t act, int64_t gate_code,
                    const optional<Tensor>& prologue_scale,
                    const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  TORCH_CHECK_VALUE(act >= kRelu && act <= kGelu, "unknown act code ", act);
  TORCH_CHECK_VALUE(prologue_act >= kPrologueNone && prologue_act <= kPrologueHardswish,
                    "unknown prologue_act code ", prologue_act);
  TORCH_CHECK_VALUE(gate_code == kSigmoid || gate_code == kHardsigmoid, "unknown gate code ",
                    gate_code);
  TORCH_CHECK_TYPE(is_float(x), "x must be float16, bfloat16, float32 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D shape ",
                    x.sizes());
  int64_t c = x.size(1);
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) >= 1, "x must have a spatial size H*W >= 1, got H=",
                    x.size(2), ", W=", x.size(3));
  auto check = [&](const Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(is_float(t), name, " must be float16, bfloat16, float32 or float64, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                      x.device());
  };
  TORCH_CHECK_VALUE(!w1s.empty(), "fc1_weights must hold at least one branch matrix");
  TORCH_CHECK_VALUE(b1s.empty() || b1s.size() == w1s.size(), "fc1_biases must be empty or one "
                    "per branch matrix: ", b1s.size(), " biases for ", w1s.size(), " matrices");
  int64_t k = 0;
  for (size_t i = 0; i < w1s.size(); ++i) {
    const Tensor& w1 = w1s[i];
    check(w1, "fc1_weight");
    TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == c, "x has ", c,
                      " channels but fc1_weight has shape ", w1.sizes(),
                      "; fc1_weight must have shape (K, C=", c, ")");
    TORCH_CHECK_VALUE(w1.size(0) >= 1,
                      "fc1_weight must have at least one row (reduced width >= 1)");
    if (!b1s.empty()) {
      check(b1s[i], "fc1_bias");
      TORCH_CHECK_VALUE(b1s[i].dim() == 1 && b1s[i].size(0) == w1.size(0),
                        "fc1_bias must have shape (", w1.size(0), ",), got ", b1s[i].sizes());
    }
    k += w1.size(0);
  }
  if (w2) check(*w2, "fc2_weight");
  TORCH_CHECK_VALUE(w2 || !b2, "fc2_bias must be None when fc2_weight is None (the single-FC "
                    "form)");
  if (b2) check(*b2, "fc2_bias");
  if (identity) check(*identity, "identity");
  TORCH_CHECK_VALUE(w2 || k == c, "without fc2_weight (the single-FC form) fc1_weight must "
                    "have shape (C=", c, ", C=", c, "), got (", k, ", ", c, ")");
  TORCH_CHECK_VALUE(!w2 || (w2->dim() == 2 && w2->size(0) == c && w2->size(1) == k),
                    "fc2_weight must have shape (C=", c, ", K=", k, "), got ",
                    w2 ? w2->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!b2 || (b2->dim() == 1 && b2->size(0) == c), "fc2_bias must have shape (",
                    c, ",), got ", b2 ? b2->sizes() : at::IntArrayRef{});
  if (identity) {
    TORCH_CHECK_VALUE(identity->sizes() == x.sizes(), "identity must have x's shape ",
                      x.sizes(), ", got ", identity->sizes());
    TORCH_CHECK_TYPE(identity->scalar_type() == x.scalar_type(), "identity must have x's dtype ",
                     x.scalar_type(), ", got ", identity->scalar_type());
  }
  for (auto [t, name] : {std::pair{&prologue_scale, "prologue_scale"},
                         std::pair{&prologue_shift, "prologue_shift"}}) {
    if (!*t) continue;
    check(**t, name);
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == c, name, " must have shape (C=", c,
                      ",), got ", (*t)->sizes());
  }
}

// y for checked operands; the saved values (z, p, u: see forward_typed) go to `saved`
// when given, else to scratch memory.
Tensor run_forward(const Tensor& x_in, at::TensorList w1s, at::TensorList b1s,
                   const optional<Tensor>& w2, const optional<Tensor>& b2,
                   const optional<Tensor>& identity_in, const optional<Tensor>& prologue_scale,
                   const optional<Tensor>& prologue_shift, const Options& o,
                   const std::array<Tensor, 3>* saved) {
  Tensor y = output_like(x_in);
  int64_t n = x_in.size(0), c = x_in.size(1), k = fc1_rows(w1s);
  if (n == 0) return y;
  View yv = *view_of(y);
  Tensor x = same_walk(x_in, yv);
  View xv = *view_of(x);
  optional<Tensor> identity;
  View iv = xv;
  if (identity_in) {
    identity = same_walk(*identity_in, xv);
    iv = *view_of(*identity);
  }
  auto run = [&](auto storage, auto accumulation) {
    using T = decltype(storage);
    using A = decltype(accumulation);
    std::vector<A> scratch(saved ? 0 : n * (2 * c + k));
    A* z = saved ? data<A>((*saved)[0]) : scratch.data();
    A* p = saved ? data<A>((*saved)[1]) : z + n * c;
    A* u = saved ? data<A>((*saved)[2]) : p + n * k;
    forward_typed<T, A>(x, xv, identity, iv, y, yv, weights_by_rows<A>(w1s, b1s, w2, b2),
                        prologue_values<A>(c, prologue_scale, prologue_shift, o.prologue_act), z,
                        p, u, o);
  };
  switch (x.scalar_type()) {
    case at::kDouble: run(double{}, double{}); break;
    case at::kBFloat16: run(Bf16{}, float{}); break;
    default: run(float{}, float{});
  }
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_forward(
    const Tensor& x, at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
    const optional<Tensor>& b2, const optional<Tensor>& identity, int64_t act,
    int64_t gate_code, bool residual, bool relu_out, const optional<Tensor>& prologue_scale,
    const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  check_operands(x, w1s, b1s, w2, b2, identity, act, gate_code, prologue_scale, prologue_shift,
                 prologue_act);
  check_dtype(x);
  auto acc = x.options().dtype(acc_type(x));
  int64_t n = x.size(0), c = x.size(1), k = fc1_rows(w1s);
  std::array<Tensor, 3> saved{at::empty({n, c}, acc), at::empty({n, k}, acc),
                              at::empty({n, c}, acc)};
  Options o{act, gate_code, residual, relu_out, prologue_act};
  Tensor y = run_forward(x, w1s, b1s, w2, b2, identity, prologue_scale, prologue_shift, o, &saved);
  return {y, saved[0], saved[1], saved[2]};
}

// cpu_sae below autograd: the forward alone, nothing saved.
Tensor cpu_infer(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                 const optional<Tensor>& w2, const optional<Tensor>& b2,
                 const optional<Tensor>& identity, int64_t act, int64_t gate_code, bool residual,
                 bool relu_out, const optional<Tensor>& prologue_scale,
                 const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  check_operands(x, w1s, b1s, w2, b2, identity, act, gate_code, prologue_scale, prologue_shift,
                 prologue_act);
  check_dtype(x);
  Options o{act, gate_code, residual, relu_out, prologue_act};
  return run_forward(x, w1s, b1s, w2, b2, identity, prologue_scale, prologue_shift, o, nullptr);
}

template <typename T, typename A>
void backward_typed(const Tensor& grad, const View& gv, const Tensor& x, const View& xv,
                    const optional<Tensor>& y, const View& yv, const Tensor& dx, const View& dxv,
                    const optional<Tensor>& d_identity, const View& div, const Weights<A>& w,
                    const PrologueValues<A>& pro, A* d_pro_scale, A* d_pro_shift,
                    const Tensor& p, const Tensor& u, const Tensor& du, const Tensor& dp,
                    const Options& o) {
  int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), k = w.k;
  int64_t chunk = samples_per_chunk(x);
  const auto& kern = pass_kernels<T, A>();
  bool write_id = d_identity.has_value();
  // per sample: sum g' * x', then (with prologue gradients) the PrologueSum sums
  bool pro_sums = d_pro_scale != nullptr;
  int64_t values = pro_sums ? 1 + kPrologueSums : 1;
  Tensor sums = at::empty({chunk, values, c}, u.options());
  Tensor dh = at::empty({chunk, k}, u.options());
  Tensor dz = at::empty({chunk, c}, u.options());
  auto rows_at = [&](int64_t sample, int64_t r0, int64_t rows) {
    return GradRows<T>{data<T>(x) + sample * xv.sample + r0 * xv.row, xv.row,
                       data<T>(grad) + sample * gv.sample + r0 * gv.row, gv.row,
                       y ? data<T>(*y) + sample * yv.sample + r0 * yv.row : nullptr, yv.row,
                       data<T>(dx) + sample * dxv.sample + r0 * dxv.row, dxv.row,
                       write_id ? data<T>(*d_identity) + sample * div.sample + r0 * div.row
                                : nullptr,
                       div.row, rows, xv.pixels ? c : hw};
  };
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    int64_t count = std::min(chunk, n - n0);
    // ds = sum g' * x', per channel
    channel_sums(xv, count, c, hw, sizeof(T), data<A>(sums),
                 [&](int64_t i, int64_t p0, int64_t pixels, int64_t c0, int64_t width, A* dst) {
                   if (xv.pixels) {
                     GradRows<T> t = rows_at(n0 + i, p0, pixels);
                     if (pro.present) kern.prologue_grad_dot_pixels(t, dst, c, o.relu_out,
                                                                    pro.from(0), pro_sums);
                     else kern.grad_dot_pixels(t, dst, o.relu_out);
                   } else {
                     GradRows<T> t = rows_at(n0 + i, c0, width);
                     if (pro.present) kern.prologue_grad_dot_rows(t, dst, c, o.relu_out,
                                                                  pro.from(c0), pro_sums);
                     else kern.grad_dot_rows(t, dst, o.relu_out);
                   }
                 }, values);
    Tensor ds = sums.narrow(0, 0, count).select(1, 0);
    Tensor u_c = u.narrow(0, n0, count), p_c = p.narrow(0, n0, count);
    Tensor s = gate(u_c, o.gate);
    du.narrow(0, n0, count).copy_(gate_backward(ds, u_c, s, o.gate));
    if (w.has_fc2()) {
      linear_backward_input<A>(data<A>(du) + n0 * c, count, c, w.w2_rows.data(), k,
                               data<A>(dh));
      Tensor h = o.act == kRelu ? activation(p_c, o.act) : Tensor();
      dp.narrow(0, n0, count).copy_(activation_backward(dh.narrow(0, 0, count), p_c, h, o.act));
    } else {
      dp.narrow(0, n0, count).copy_(du.narrow(0, n0, count));
    }
    linear_backward_input<A>(data<A>(dp) + n0 * k, count, k, w.w1_rows.data(), c, data<A>(dz));
    Tensor scale = o.residual ? s + 1 : s;
    A* shift = data<A>(dz);
    for (int64_t i = 0; i < count * c; ++i) shift[i] /= static_cast<A>(hw);
    const A* scale_p = data<A>(scale);
    if (pro_sums) {
      // dx' = g' * scale + shift, and the prologue's gradients are sums of dx' * act'(v) * x
      // and of dx' * act'(v): each a combination of the sums taken with ds
      for (int64_t i = 0; i < count; ++i) {
        const A* sum = data<A>(sums) + i * values * c;
        for (int64_t ch = 0; ch < c; ++ch) {
          A a = scale_p[i * c + ch], b = shift[i * c + ch];
          auto at = [&](int64_t kind) { return sum[(1 + kind) * c + ch]; };
          d_pro_scale[ch] += a * at(kGradActX) + b * at(kActX);
          d_pro_shift[ch] += a * at(kGradAct) + b * at(kAct);
        }
      }
    }
    for_rows(xv, count, c, hw, [&](int64_t i, int64_t r0, int64_t rows) {
      GradRows<T> t = rows_at(n0 + i, r0, rows);
      if (pro.present) {
        if (xv.pixels) kern.prologue_grad_input_pixels(t, scale_p + i * c, shift + i * c,
                                                       o.relu_out, write_id, pro.from(0));
        else kern.prologue_grad_input_rows(t, scale_p + i * c + r0, shift + i * c + r0,
                                           o.relu_out, write_id, pro.from(r0));
      } else if (xv.pixels) {
        kern.grad_input_pixels(t, scale_p + i * c, shift + i * c, o.relu_out, write_id);
      } else {
        kern.grad_input_rows(t, scale_p + i * c + r0, shift + i * c + r0, o.relu_out, write_id);
      }
    });
  }
}

// out (M, width) = a^T (M, N) @ v (N, width), split over rows of out.
template <typename A>
Tensor weight_grad(const Tensor& a, const Tensor& v) {
  int64_t batch = a.size(0), m = a.size(1), width = v.size(1);
  Tensor out = at::empty({m, width}, a.options());
  parallel(m, kGrainElements / std::max<int64_t>(1, batch * width), [&](int64_t b, int64_t e) {
    fc_kernels<A>().outer_sum(data<A>(a), batch, m, data<A>(v), width, data<A>(out), b, e);
  });
  return out;
}

// Sum over the batch, column by column in sample order (ATen's sum may reorder by threads).
template <typename A>
Tensor bias_grad(const Tensor& d) {
  int64_t batch = d.size(0), width = d.size(1);
  Tensor out = at::zeros({width}, d.options());
  A* o = data<A>(out);
  const A* src = data<A>(d);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < width; ++i) o[i] += src[b * width + i];
  return out;
}

// dx, d_identity, d fc1 weights, d fc1 biases, d fc2 weight, d fc2 bias, d prologue scale,
// d prologue shift (an unused gradient is an empty tensor)
using BackwardResult = std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>,
                                  Tensor, Tensor, Tensor, Tensor>;

// Splits the rows of a stacked fc1 gradient (K, ...) back into one per branch matrix.
std::vector<Tensor> per_branch(const Tensor& stacked, at::TensorList w1s, bool cast) {
  std::vector<int64_t> sizes;
  for (const Tensor& w : w1s) sizes.push_back(w.size(0));
  auto parts = stacked.split_with_sizes(sizes);
  std::vector<Tensor> out;
  for (size_t i = 0; i < parts.size(); ++i)
    out.push_back(cast ? parts[i].to(w1s[i].scalar_type()) : parts[i]);
  return out;
}

BackwardResult cpu_backward(const Tensor& grad_in, const Tensor& x_in,
                            const optional<Tensor>& y_in, at::TensorList w1s,
                            const optional<Tensor>& w2,
                            const Tensor& z, const Tensor& p, const Tensor& u, int64_t act,
                            int64_t gate_code, bool residual, bool relu_out, bool has_identity,
                            const optional<Tensor>& prologue_scale,
                            const optional<Tensor>& prologue_shift, int64_t prologue_act,
                            bool prologue_grads) {
  check_dtype(x_in);
  auto acc = acc_type(x_in);
  int64_t n = x_in.size(0), c = x_in.size(1), k = fc1_rows(w1s);
  bool write_id = has_identity && relu_out;
  Tensor du = at::empty({n, c}, u.options()), dp = at::empty({n, k}, p.options());
  bool pro_grads = prologue_grads && (prologue_scale || prologue_shift);
  Tensor d_pro_scale = at::zeros({pro_grads ? c : 0}, u.options());
  Tensor d_pro_shift = at::zeros({pro_grads ? c : 0}, u.options());
  Tensor dx = output_like(x_in);
  optional<Tensor> d_identity = write_id ? optional<Tensor>(output_like(x_in)) : std::nullopt;
  if (n > 0) {
    View dxv = *view_of(dx);
    Tensor x = same_walk(x_in, dxv);
    View xv = *view_of(x);
    Tensor grad = same_walk(grad_in.to(x.scalar_type()), xv);
    optional<Tensor> y = relu_out ? optional<Tensor>(same_walk(*y_in, xv)) : std::nullopt;
    View gv = *view_of(grad), yv = y ? *view_of(*y) : xv;
    View div = d_identity ? *view_of(*d_identity) : xv;
    Options o{act, gate_code, residual, relu_out, prologue_act};
    auto run = [&](auto storage, auto accumulation) {
      using T = decltype(storage);
      using A = decltype(accumulation);
      backward_typed<T, A>(grad, gv, x, xv, y, yv, dx, dxv, d_identity, div,
                           weights_by_rows<A>(w1s, {}, w2, std::nullopt),
                           prologue_values<A>(c, prologue_scale, prologue_shift, prologue_act),
                           pro_grads ? data<A>(d_pro_scale) : nullptr,
                           pro_grads ? data<A>(d_pro_shift) : nullptr, p, u, du, dp, o);
    };
    switch (x.scalar_type()) {
      case at::kDouble: run(double{}, double{}); break;
      case at::kBFloat16: run(Bf16{}, float{}); break;
      default: run(float{}, float{});
    }
  }
  bool wide = acc == at::kDouble;
  Tensor dw1 = wide ? weight_grad<double>(dp, z) : weight_grad<float>(dp, z);
  Tensor db1 = wide ? bias_grad<double>(dp) : bias_grad<float>(dp);
  Tensor dw2 = at::empty({0}, u.options()), db2 = at::empty({0}, u.options());  // no fc2
  if (w2) {
    Tensor h = activation(p, act);
    dw2 = (wide ? weight_grad<double>(du, h) : weight_grad<float>(du, h)).to(w2->scalar_type());
    db2 = wide ? bias_grad<double>(du) : bias_grad<float>(du);
  }
  return {dx, d_identity ? *d_identity : Tensor(), per_branch(dw1, w1s, true),
          per_branch(db1, w1s, false), dw2, db2, d_pro_scale, d_pro_shift};
}

// ------------------------------------------------------------------ autograd and ops

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_forward_meta(
    const Tensor& x, at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
    const optional<Tensor>& b2, const optional<Tensor>& identity, int64_t act, int64_t gate_code,
    bool, bool, const optional<Tensor>& prologue_scale, const optional<Tensor>& prologue_shift,
    int64_t prologue_act) {
  check_operands(x, w1s, b1s, w2, b2, identity, act, gate_code, prologue_scale, prologue_shift,
                 prologue_act);
  auto acc = acc_type(x);
  int64_t n = x.size(0), c = x.size(1), k = fc1_rows(w1s);
  return {output_like(x), at::empty({n, c}, x.options().dtype(acc)),
          at::empty({n, k}, x.options().dtype(acc)), at::empty({n, c}, x.options().dtype(acc))};
}

BackwardResult cpu_backward_meta(const Tensor&, const Tensor& x, const optional<Tensor>&,
                                 at::TensorList w1s, const optional<Tensor>& w2, const Tensor&,
                                 const Tensor& p, const Tensor& u, int64_t, int64_t, bool,
                                 bool relu_out, bool has_identity,
                                 const optional<Tensor>& prologue_scale,
                                 const optional<Tensor>& prologue_shift, int64_t,
                                 bool prologue_grads) {
  Tensor d_identity = has_identity && relu_out ? output_like(x) : Tensor();
  std::vector<Tensor> dw1, db1;
  for (const Tensor& w : w1s) {
    dw1.push_back(at::empty_like(w));
    db1.push_back(at::empty({w.size(0)}, p.options()));
  }
  bool pro_grads = prologue_grads && (prologue_scale || prologue_shift);
  Tensor d_pro = at::empty({pro_grads ? x.size(1) : 0}, u.options());
  if (!w2) return {output_like(x), d_identity, dw1, db1, at::empty({0}, u.options()),
                   at::empty({0}, u.options()), d_pro, at::empty_like(d_pro)};
  return {output_like(x), d_identity, dw1, db1, at::empty_like(*w2),
          at::empty({w2->size(0)}, u.options()), d_pro, at::empty_like(d_pro)};
}

// The arguments of cpu_sae after the weights, as the autograd function passes them on.
struct Config {
  const optional<Tensor>& identity;
  int64_t act, gate;
  bool residual, relu_out;
  const optional<Tensor>& prologue_scale;
  const optional<Tensor>& prologue_shift;
  int64_t prologue_act;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> call_forward(
    const Tensor& x, at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
    const optional<Tensor>& b2, const Config& f) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sae_kernels::cpu_forward", "")
                       .typed<decltype(cpu_forward)>();
  return op.call(x, w1s, b1s, w2, b2, f.identity, f.act, f.gate, f.residual, f.relu_out,
                 f.prologue_scale, f.prologue_shift, f.prologue_act);
}

class SaeFunction : public torch::autograd::Function<SaeFunction> {
 public:
  // The gradients returned follow the inputs, each tensor of a list counting as one.
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
                        const optional<Tensor>& b2, const optional<Tensor>& identity, int64_t act,
                        int64_t gate_code, bool residual, bool relu_out,
                        const optional<Tensor>& prologue_scale,
                        const optional<Tensor>& prologue_shift, int64_t prologue_act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Config f{identity, act, gate_code, residual, relu_out, prologue_scale, prologue_shift,
             prologue_act};
    auto [y, z, p, u] = call_forward(x, w1s, b1s, w2, b2, f);
    auto given = [](const optional<Tensor>& t) { return t ? *t : Tensor(); };
    std::vector<Tensor> saved{x,          given(w2), z, p, u, relu_out ? y : Tensor(),
                              given(prologue_scale), given(prologue_shift)};
    saved.insert(saved.end(), w1s.begin(), w1s.end());
    ctx->save_for_backward(saved);
    auto dtype = [](const optional<Tensor>& t) {
      return t ? c10::IValue(t->scalar_type()) : c10::IValue();
    };
    auto needs_grad = [](const optional<Tensor>& t) { return t && t->requires_grad(); };
    ctx->saved_data["act"] = act;
    ctx->saved_data["gate"] = gate_code;
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["relu_out"] = relu_out;
    ctx->saved_data["has_identity"] = identity.has_value();
    ctx->saved_data["b1_dtype"] = b1s.empty() ? c10::IValue() : c10::IValue(b1s[0].scalar_type());
    ctx->saved_data["b2_dtype"] = dtype(b2);
    ctx->saved_data["prologue_act"] = prologue_act;
    ctx->saved_data["prologue_grads"] = needs_grad(prologue_scale) || needs_grad(prologue_shift);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    constexpr size_t kFirstBranch = 8;
    std::vector<Tensor> w1s(saved.begin() + kFirstBranch, saved.end());
    auto maybe = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    bool relu_out = ctx->saved_data["relu_out"].toBool();
    bool has_identity = ctx->saved_data["has_identity"].toBool();
    bool prologue_grads = ctx->saved_data["prologue_grads"].toBool();
    const Tensor &pro_scale = saved[6], &pro_shift = saved[7];
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sae_kernels::cpu_backward", "")
                         .typed<decltype(cpu_backward)>();
    auto [dx, d_identity, dw1, db1, dw2, db2, d_pro_scale, d_pro_shift] =
        op.call(grads[0], saved[0], relu_out ? maybe(saved[5]) : std::nullopt, w1s,
                maybe(saved[1]), saved[2], saved[3], saved[4], ctx->saved_data["act"].toInt(),
                ctx->saved_data["gate"].toInt(), ctx->saved_data["residual"].toBool(), relu_out,
                has_identity, maybe(pro_scale), maybe(pro_shift),
                ctx->saved_data["prologue_act"].toInt(), prologue_grads);
    torch::autograd::variable_list out{dx};
    out.insert(out.end(), dw1.begin(), dw1.end());
    auto b1_dtype = ctx->saved_data["b1_dtype"];
    if (!b1_dtype.isNone())
      for (const Tensor& g : db1) out.push_back(g.to(b1_dtype.toScalarType()));
    out.push_back(saved[1].defined() ? dw2 : Tensor());
    auto b2_dtype = ctx->saved_data["b2_dtype"];
    out.push_back(b2_dtype.isNone() ? Tensor() : db2.to(b2_dtype.toScalarType()));
    out.push_back(!has_identity ? Tensor() : relu_out ? d_identity : grads[0]);
    out.insert(out.end(), 4, Tensor());  // act, gate, residual, relu_out
    auto prologue_grad = [&](const Tensor& given, const Tensor& grad) {
      return given.defined() && prologue_grads ? grad.to(given.scalar_type()) : Tensor();
    };
    out.push_back(prologue_grad(pro_scale, d_pro_scale));
    out.push_back(prologue_grad(pro_shift, d_pro_shift));
    out.push_back(Tensor());  // prologue_act
    return out;
  }
};

bool any_requires_grad(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                       std::initializer_list<const optional<Tensor>*> optionals) {
  auto needs = [](const Tensor& t) { return t.requires_grad(); };
  return needs(x) || std::any_of(w1s.begin(), w1s.end(), needs) ||
         std::any_of(b1s.begin(), b1s.end(), needs) ||
         std::any_of(optionals.begin(), optionals.end(),
                     [&](const optional<Tensor>* t) { return *t && needs(**t); });
}

Tensor sae_autograd(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                    const optional<Tensor>& w2, const optional<Tensor>& b2,
                    const optional<Tensor>& identity, int64_t act, int64_t gate_code,
                    bool residual, bool relu_out, const optional<Tensor>& prologue_scale,
                    const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  if (!at::GradMode::is_enabled() ||
      !any_requires_grad(x, w1s, b1s, {&w2, &b2, &identity, &prologue_scale, &prologue_shift})) {
    at::AutoDispatchBelowADInplaceOrView guard;  // inference: no graph node, nothing saved
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sae_kernels::cpu_sae", "")
                         .typed<decltype(cpu_infer)>();
    return op.call(x, w1s, b1s, w2, b2, identity, act, gate_code, residual, relu_out,
                   prologue_scale, prologue_shift, prologue_act);
  }
  return SaeFunction::apply(x, w1s, b1s, w2, b2, identity, act, gate_code, residual, relu_out,
                            prologue_scale, prologue_shift, prologue_act);
}

Tensor cpu_sae_meta(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                    const optional<Tensor>& w2, const optional<Tensor>& b2,
                    const optional<Tensor>& identity, int64_t act, int64_t gate_code,
                    bool residual, bool relu_out, const optional<Tensor>& prologue_scale,
                    const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  return std::get<0>(cpu_forward_meta(x, w1s, b1s, w2, b2, identity, act, gate_code, residual,
                                      relu_out, prologue_scale, prologue_shift, prologue_act));
}

std::string isa() { return kernels().isa; }

// A copy of x in a tensor allocated as the operator allocates its outputs (huge pages from
// kHugePageMinBytes on): the benchmark's memory floor with the fused op's allocation.
Tensor copy_like_output(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  return output_like(x).copy_(x);
}

}  // namespace
}  // namespace sae_cpu

TORCH_LIBRARY_FRAGMENT(sae_kernels, m) {
  // fc1_weights: the branch matrices (rows of the stacked W1); fc1_biases: empty or one each;
  // fc2_weight None: the single-FC form (fc1 is C x C, u = p)
  // prologue_*: x' = prologue_act(x * prologue_scale + prologue_shift) replaces x
  m.def("cpu_sae(Tensor x, Tensor[] fc1_weights, Tensor[] fc1_biases, Tensor? fc2_weight, "
        "Tensor? fc2_bias, Tensor? identity, int act, int gate, bool residual, bool relu_out, "
        "Tensor? prologue_scale=None, Tensor? prologue_shift=None, int prologue_act=0) "
        "-> Tensor");
  m.def("cpu_forward(Tensor x, Tensor[] fc1_weights, Tensor[] fc1_biases, Tensor? fc2_weight, "
        "Tensor? fc2_bias, Tensor? identity, int act, int gate, bool residual, bool relu_out, "
        "Tensor? prologue_scale=None, Tensor? prologue_shift=None, int prologue_act=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_backward(Tensor grad, Tensor x, Tensor? y, Tensor[] fc1_weights, "
        "Tensor? fc2_weight, Tensor z, Tensor p, Tensor u, int act, int gate, bool residual, "
        "bool relu_out, bool has_identity, Tensor? prologue_scale=None, "
        "Tensor? prologue_shift=None, int prologue_act=0, bool prologue_grads=False) "
        "-> (Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", &sae_cpu::isa);
  m.def("cpu_copy_like_output(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(sae_kernels, CPU, m) {
  m.impl("cpu_sae", &sae_cpu::cpu_infer);
  m.impl("cpu_copy_like_output", &sae_cpu::copy_like_output);
  m.impl("cpu_forward", &sae_cpu::cpu_forward);
  m.impl("cpu_backward", &sae_cpu::cpu_backward);
}

TORCH_LIBRARY_IMPL(sae_kernels, Meta, m) {
  m.impl("cpu_sae", &sae_cpu::cpu_sae_meta);
  m.impl("cpu_forward", &sae_cpu::cpu_forward_meta);
  m.impl("cpu_backward", &sae_cpu::cpu_backward_meta);
}

TORCH_LIBRARY_IMPL(sae_kernels, Autograd, m) {
  m.impl("cpu_sae", &sae_cpu::sae_autograd);
}
