// What the operator's forward, backward and registration share: the kernel table, how a
// tensor is walked, output allocation, the FC wrappers, the per-channel sums, the
// operands read into plain arrays, and the input rules.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "output_pool.h"
#include "parallel.h"
#include "sae_cpu.h"

namespace sae_cpu {

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
// Multiply-adds per piece, at least, of an FC run by a team already forked: a piece costs
// no fork there, and the weights a call reads are mostly out of cache (the passes over x
// and y, or a model's other layers, pushed them out), so more threads reading them in
// parallel shorten the serial stage between the passes (channels_last, N = 1: 1-8 % of
// a call against kGrainElements, in-process A/B).
constexpr int64_t kTeamFcGrain = 1 << 12;
// Outputs per tile of the FC kernel (kernels.h): a piece of an FC's outputs is whole tiles.
constexpr int64_t kLinearOutputs = 4;
// Columns per piece of the FC backward's split (a multiple of every vector width).
constexpr int64_t kColumnBlock = 64;
// Bytes of consecutive pixels per task in the channels_last per-channel sums.
constexpr int64_t kPixelBlockBytes = 64 << 10;
// Values per piece, at least, where the channels_last sums' blocks are added together.
constexpr int64_t kCombineGrain = 64;

inline const KernelTable& pick_table() {
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

inline const KernelTable& kernels() {
  static const KernelTable& table = pick_table();
  return table;
}

// A non-negative integer from the environment, or `fallback` where it is unset.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env ? std::max<int64_t>(0, std::atoll(env)) : fallback;
}

inline int64_t chunk_bytes() {
  static const int64_t bytes =
      std::max<int64_t>(1, env_int("SAE_KERNELS_CPU_CHUNK_BYTES", kDefaultChunkBytes));
  return bytes;
}

// Samples of x (N >= 1) per chunk: as many as fit in chunk_bytes(), at least one.
inline int64_t samples_per_chunk(const Tensor& x) {
  int64_t sample_bytes = x.size(1) * x.size(2) * x.size(3) * x.element_size();
  return std::clamp<int64_t>(chunk_bytes() / std::max<int64_t>(1, sample_bytes), 1, x.size(0));
}

// How one 4-D tensor is walked: as channel rows (NCHW) or pixel rows (channels_last).
struct View {
  bool pixels;      // rows are pixels with C contiguous channels
  int64_t sample;   // stride between samples
  int64_t row;      // stride between rows (channels for NCHW, pixels for channels_last)
};

inline optional<View> view_of(const Tensor& t) {
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
inline Tensor same_walk(const Tensor& t, const View& like) {
  auto v = view_of(t);
  if (v && v->pixels == like.pixels) return t;
  return t.contiguous(like.pixels ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// A new output shaped like x, always walkable: x's layout when x is, else NCHW; a large
// one from the output pool (output_pool.h).
inline Tensor output_like(const Tensor& x) {
  if (!pooled(static_cast<size_t>(x.numel()) * x.element_size())) {
    Tensor out = at::empty_like(x);
    if (!view_of(out)) out = at::empty_like(x, at::MemoryFormat::Contiguous);
    advise_huge_pages(out.data_ptr(), out.nbytes());
    return out;
  }
  Tensor like = at::empty_like(x, x.options().device(at::kMeta));  // empty_like's strides
  if (!view_of(like)) like = at::empty_like(like, at::MemoryFormat::Contiguous);
  return pooled_empty(like.sizes(), like.strides(), x.scalar_type());
}

inline Tensor activation_backward(const Tensor& grad, const Tensor& p, const Tensor& h, int64_t act) {
  switch (act) {
    case kRelu: return at::threshold_backward(grad, h, 0);
    case kSilu: return at::silu_backward(grad, p);
    case kHardswish: return at::hardswish_backward(grad, p);
    default: return at::gelu_backward(grad, p);
  }
}

inline Tensor gate_backward(const Tensor& grad, const Tensor& u, const Tensor& s, int64_t g) {
  return g == kSigmoid ? at::sigmoid_backward(grad, s) : at::hardsigmoid_backward(grad, u);
}

template <typename A>
const FcKernels<A>& fc_kernels() {
  if constexpr (std::is_same_v<A, double>) return kernels().fc_f64;
  else return kernels().fc_f32;
}

// out (rows, outs) = in (rows, ins) @ w^T + bias, split over output columns across the
// team; then finish(o0, o1) on each piece's columns [o0, o1), by the thread that computed
// them.
template <typename A, typename F>
void linear(Team& team, const A* in, int64_t rows, int64_t ins, WeightRows<A> w,
            const A* bias, A* out, int64_t outs, const F& finish) {
  // whole tiles of kLinearOutputs per piece
  int64_t tiles = (outs + kLinearOutputs - 1) / kLinearOutputs;
  team.loop(tiles, kTeamFcGrain / std::max<int64_t>(1, rows * ins * kLinearOutputs),
             [&](int64_t b, int64_t e) {
               int64_t o0 = b * kLinearOutputs, o1 = std::min(outs, e * kLinearOutputs);
               fc_kernels<A>().linear(in, rows, ins, w, bias, out, outs, o0, o1);
               finish(o0, o1);
             });
}

// d_in (rows, ins) = d_out (rows, outs) @ w (outs, ins), split over columns of d_in.
template <typename A>
void linear_backward_input(const A* d_out, int64_t rows, int64_t outs, WeightRows<A> w,
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

inline Tensor activation(const Tensor& p, int64_t act) {
  return elementwise(p, [&](const auto& fc, auto in, auto out) {
    fc.activate(in, p.numel(), act, out);
  });
}

inline Tensor gate(const Tensor& u, int64_t g) {
  return elementwise(u, [&](const auto& fc, auto in, auto out) { fc.gate(in, u.numel(), g, out); });
}

// Where channel_sums writes: `values` sums per channel, sample i's at
// out[i * values * c, (i + 1) * values * c), each divided by `divisor` once complete;
// `partial` holds channel_sums_scratch() values (channels_last blocks' sums).
template <typename A>
struct SumsTarget {
  A* out;
  A* partial;
  int64_t values = 1;
  A divisor = 1;
};

// Consecutive pixels per task of the channels_last per-channel sums, and tasks per sample.
inline int64_t pixels_per_block(int64_t c, int64_t element_bytes) {
  return std::max<int64_t>(1, kPixelBlockBytes / (c * element_bytes));
}

inline int64_t pixel_blocks(int64_t c, int64_t hw, int64_t element_bytes) {
  int64_t per_block = pixels_per_block(c, element_bytes);
  return (hw + per_block - 1) / per_block;
}

// Values of SumsTarget::partial that channel_sums needs for `count` samples.
inline int64_t channel_sums_scratch(const View& v, int64_t count, int64_t c, int64_t hw,
                                    int64_t element_bytes, int64_t values) {
  int64_t blocks = pixel_blocks(c, hw, element_bytes);
  return v.pixels && blocks > 1 ? count * blocks * values * c : 0;
}

// Per-channel sums over the pixels of `count` samples into `to`. sum(i, p0, pixels, c0,
// width, dst) writes the sums over pixels [p0, p0 + pixels) of channels [c0, c0 + width)
// of sample i to dst[0, width), the k-th of `values` at dst[k * c + ...].
// NCHW: a task sums whole channel rows. channels_last: a task sums one block of
// kPixelBlockBytes of consecutive pixels across all channels (reading memory in order:
// a task per channel slice would stride a whole pixel per step), and the blocks' partial
// sums are then added in block order. Blocks are fixed by the shape, so the result does
// not depend on the thread count.
template <typename A, typename Loops, typename F>
void channel_sums(Loops& loops, const View& v, int64_t count, int64_t c, int64_t hw,
                  int64_t element_bytes, const SumsTarget<A>& to, const F& sum) {
  auto complete = [&](A* first, int64_t width) {
    if (to.divisor != A(1))
      for (int64_t i = 0; i < width; ++i) first[i] /= to.divisor;
  };
  int64_t stride = to.values * c;
  if (!v.pixels) {
    loops.loop(count * c, kGrainElements / std::max<int64_t>(1, hw), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        int64_t c0 = i % c, width = std::min(e - i, c - c0);
        A* dst = to.out + (i / c) * stride + c0;
        sum(i / c, 0, hw, c0, width, dst);
        for (int64_t k = 0; k < to.values; ++k) complete(dst + k * c, width);
        i += width;
      }
    });
    return;
  }
  int64_t per_block = pixels_per_block(c, element_bytes);
  int64_t blocks = pixel_blocks(c, hw, element_bytes);
  A* dst = blocks == 1 ? to.out : to.partial;
  loops.loop(count * blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int64_t p0 = (t % blocks) * per_block;
      sum(t / blocks, p0, std::min(per_block, hw - p0), 0, c, dst + t * stride);
      if (blocks == 1) complete(dst + t * stride, stride);
    }
  });
  if (blocks == 1) return;
  // each sample's values cut into ranges across threads (one sample was one thread's
  // work: at N = 1 the others waited for it, 3-4 us at 1024 x 14 x 14 on 2 threads)
  loops.loop(count * stride, kCombineGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      int64_t v0 = i % stride, width = std::min(e - i, stride - v0);
      const A* first = to.partial + (i / stride) * blocks * stride + v0;
      A* row = to.out + i;
      std::copy(first, first + width, row);
      for (int64_t j = 1; j < blocks; ++j)
        for (int64_t ch = 0; ch < width; ++ch) row[ch] += first[j * stride + ch];
      complete(row, width);
      i += width;
    }
  });
}

// The prologue's per-channel values in the accumulation type, read in place where given
// in it; absent: no prologue.
template <typename A>
struct PrologueValues {
  bool present = false;
  int64_t act = kPrologueNone;
  Tensor scale, shift;  // C values each (1 and 0 where a tensor was not given)

  // The prologue from channel c0 on.
  Prologue<A> from(int64_t c0) const {
    if (!present) return {nullptr, nullptr, act};
    return {data<A>(scale) + c0, data<A>(shift) + c0, act};
  }
};

template <typename A>
PrologueValues<A> prologue_values(int64_t c, const optional<Tensor>& scale,
                                  const optional<Tensor>& shift, int64_t act) {
  PrologueValues<A> p;
  p.present = scale || shift || act != kPrologueNone;
  p.act = act;
  auto values = [&](const optional<Tensor>& t, A fill) {
    if (t) return as_acc<A>(*t);
    if (!p.present) return Tensor();
    return at::full({c}, fill, at::TensorOptions(c10::CppTypeToScalarType<A>::value));
  };
  p.scale = values(scale, A(1));
  p.shift = values(shift, A(0));
  return p;
}

// Rows of samples [n0, n0 + count) split across threads: pixel blocks or channel rows. It
// is the second pass over rows channel_sums read, so each thread takes its pieces last
// first (Team::loop).
template <typename Loops, typename F>
void for_rows(Loops& loops, const View& v, int64_t count, int64_t c, int64_t hw, const F& f) {
  if (v.pixels) {
    int64_t per_task = std::max<int64_t>(1, kGrainElements / c);
    int64_t blocks = (hw + per_task - 1) / per_task;
    loops.loop(count * blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        int64_t n = i / blocks, r0 = (i % blocks) * per_task;
        f(n, r0, std::min(per_task, hw - r0));
      }
    }, true);
  } else {
    loops.loop(count * c, kGrainElements / std::max<int64_t>(1, hw), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        int64_t n = i / c, r0 = i % c, len = std::min(e - i, c - r0);
        f(n, r0, len);
        i += len;
      }
    }, true);
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
  std::vector<const A*> w1_table;  // fc1's rows where it has several branches
  const A* w1_first = nullptr;     // else its one matrix
  const A* w2_first = nullptr;     // nullptr: no fc2
  int64_t c = 0, k = 0;
  std::vector<A> b1;  // the branch biases, concatenated (K values)
  Tensor b2;

  WeightRows<A> w1() const {
    if (w1_table.empty()) return {w1_first, c};
    return {nullptr, 0, w1_table.data()};
  }
  WeightRows<A> w2() const { return {w2_first, k}; }
  bool has_fc2() const { return w2_first != nullptr; }
  const A* b1_data() const { return b1.empty() ? nullptr : b1.data(); }
  const A* b2_data() const { return b2.defined() ? data<A>(b2) : nullptr; }
};

// K: the rows of the stacked fc1.
inline int64_t fc1_rows(at::TensorList w1s) {
  int64_t k = 0;
  for (const Tensor& w : w1s) k += w.size(0);
  return k;
}

// n values left uninitialised, for buffers whose every value is written before it is read:
// zeroing them would be one more pass over memory that the call before pushed out of cache.
template <typename A>
std::unique_ptr<A[]> unfilled(int64_t n) {
  return std::unique_ptr<A[]>(new A[n]);
}

// The first row of matrix `w` in the accumulation dtype, kept alive by `keep`.
template <typename A>
const A* kept_rows(const Tensor& w, std::vector<Tensor>& keep) {
  keep.push_back(as_acc<A>(w));
  return data<A>(keep.back());
}

template <typename A>
Weights<A> weights_by_rows(at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
                           const optional<Tensor>& b2) {
  Weights<A> w;
  w.c = w1s[0].size(1);
  w.k = fc1_rows(w1s);
  if (w1s.size() == 1) {
    w.w1_first = kept_rows<A>(w1s[0], w.keep);
  } else {
    w.w1_table.reserve(w.k);
    for (const Tensor& t : w1s) {
      // sizes and the data pointer read once: out-of-line calls per row cost as much as
      // the FCs themselves at N = 1
      const A* first = kept_rows<A>(t, w.keep);
      for (int64_t r = 0, rows = t.size(0); r < rows; ++r) w.w1_table.push_back(first + r * w.c);
    }
  }
  if (w2) w.w2_first = kept_rows<A>(*w2, w.keep);
  for (const Tensor& b : b1s) {
    Tensor t = as_acc<A>(b);
    w.b1.insert(w.b1.end(), data<A>(t), data<A>(t) + t.numel());
  }
  if (b2) w.b2 = as_acc<A>(*b2);
  return w;
}

inline at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_dtype(const Tensor& x) {
  auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                   "the CPU kernels take float32, float64 or bfloat16, got ", t);
}

inline bool is_float(const Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// The rules of sae_kernels.options.check_operands, with the same messages: this op is
// reached without the Python checks.
inline void check_operands(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
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


}  // namespace sae_cpu
