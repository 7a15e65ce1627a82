// The forward: per chunk of samples small enough to stay in cache between its two passes,
//   pool (z) -> p = W1 z + b1 -> h = act(p) -> u = W2 h + b2 -> s = gate(u) -> rescale,
// with the prologue applied to x as it is loaded and the epilogue as y is stored.

#include <ATen/MemoryOverlap.h>
#include <ATen/record_function.h>

#include <array>
#include <optional>
#include <string_view>

#include "op_common.h"
#include "ops.h"

namespace sae_cpu {

// Where the pool pass leaves x' for the rescale, for the samples of one chunk, when it
// keeps it (see forward_typed): in y itself, which the rescale then overwrites in place
// with y = x' * s (and the epilogue), element by element.
template <typename T>
struct KeptPrologue {
  T* base = nullptr;  // null: x' is recomputed from x
  View view{};

  T* at(int64_t sample, int64_t row) const { return base + sample * view.sample + row * view.row; }
};

// Pool samples [n0, n0 + count) of x (or of the prologue's x') into `z` (means, with
// z.divisor = HW); x' also goes to `xp` when it has a place.
template <typename T, typename A>
void pool(Team& team, const Tensor& x, const View& v, int64_t n0, int64_t count,
          const PrologueValues<A>& pro, const SumsTarget<A>& z, const KeptPrologue<T>& xp) {
  const auto& k = pass_kernels<T, A>();
  const T* base = data<T>(x) + n0 * v.sample;
  int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  bool store = xp.base != nullptr;
  channel_sums(team, v, count, c, hw, sizeof(T), z,
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

// A profiler range around one stage of the operator (sae_kernels::<name> in torch.profiler
// and its traces), on the team's leader, the thread the profiler follows; close to free
// while no profiler runs.
class Stage {
 public:
  Stage(const Team& team, std::string_view name) {
    if (!team.leader()) return;
    guard_.emplace(at::RecordScope::FUNCTION);
    if (guard_->isActive()) guard_->before(name);
  }

 private:
  std::optional<at::RecordFunction> guard_;
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
  auto h = unfilled<A>(w.has_fc2() ? chunk * k : 0), s = unfilled<A>(chunk * c);
  // x' is kept (in y, KeptPrologue) where the activation costs more than reading x' back
  // from cache: SiLU (an exp and a division per element) and hardswish (measured even);
  // ReLU and a prologue without activation are recomputed (keeping them in y measured
  // 1.02x the time at the median). bf16 always recomputes: x' rounded to bf16 would move
  // the output off the reference's by more than its own rounding.
  bool keep_prologue = std::is_same_v<T, A> &&
                       (pro.act == kPrologueSilu || pro.act == kPrologueHardswish);
  auto partial = unfilled<A>(channel_sums_scratch(xv, chunk, c, hw, sizeof(T), 1));
  // One team for the whole call: its loops are separated by barriers instead of each
  // forking and joining threads of its own (up to four per chunk; 7 % of a call at N = 1
  // on SE-ResNet-50's and SENetV2-ResNet-50's sites). It is as wide as the chunk's pass
  // over x or its FCs would be split.
  int64_t work = chunk * c * std::max(hw, k);
  run_team(loop_threads(work, kGrainElements, available_threads()), [&](Team& team) {
    for (int64_t n0 = 0; n0 < n; n0 += chunk) {
      int64_t count = std::min(chunk, n - n0);
      A* zc = z + n0 * c;
      A* uc = u + n0 * c;
      A* pc = p + n0 * k;
      // One NCHW sample: each piece of the rescale computes FC2 and the gate for its own
      // channels first, where a loop of their own would cost a barrier more (the piece's
      // rows of u sum as in that loop: the same bits). Several samples share each load of
      // W2 in the FC2 loop instead.
      bool fc2_per_piece = w.has_fc2() && !xv.pixels && count == 1;
      KeptPrologue<T> xp{keep_prologue ? data<T>(y) + n0 * yv.sample : nullptr, yv};
      {
        Stage stage(team, "sae_kernels::pool");
        pool<T, A>(team, x, xv, n0, count, pro, {zc, partial.get(), 1, static_cast<A>(hw)}, xp);
      }
      {
        Stage stage(team, "sae_kernels::excitation");
        // act and gate on each piece of FC outputs as it is computed
        auto rows = [&](int64_t o0, int64_t o1, int64_t width, auto each) {
          for (int64_t i = 0; i < count; ++i) each(i * width + o0, o1 - o0);
        };
        linear<A>(team, zc, count, c, w.w1(), w.b1_data(), pc, k,
                  [&](int64_t o0, int64_t o1) {
                    rows(o0, o1, k, [&](int64_t at, int64_t len) {
                      if (w.has_fc2()) return fc.activate(pc + at, len, o.act, h.get() + at);
                      std::copy(pc + at, pc + at + len, uc + at);
                      fc.gate(uc + at, len, o.gate, s.get() + at);
                    });
                  });
        if (w.has_fc2() && !fc2_per_piece)
          linear<A>(team, h.get(), count, k, w.w2(), w.b2_data(), uc, c,
                    [&](int64_t o0, int64_t o1) {
                      rows(o0, o1, c, [&](int64_t at, int64_t len) {
                        fc.gate(uc + at, len, o.gate, s.get() + at);
                      });
                    });
      }
      const A* sp = s.get();
      Stage stage(team, "sae_kernels::rescale");
      for_rows(team, xv, count, c, hw, [&](int64_t i, int64_t r0, int64_t rows) {
        if (fc2_per_piece) {
          Stage stage(team, "sae_kernels::excitation");  // within the rescale's range
          fc.linear(h.get(), 1, k, w.w2(), w.b2_data(), uc, c, r0, r0 + rows);
          fc.gate(uc + r0, rows, o.gate, s.get() + r0);
        }
        int64_t sample = n0 + i;
        Rows<T> t{data<T>(x) + sample * xv.sample + r0 * xv.row, xv.row,
                  identity ? data<T>(*identity) + sample * iv.sample + r0 * iv.row : nullptr,
                  iv.row,
                  data<T>(y) + sample * yv.sample + r0 * yv.row, yv.row,
                  rows, xv.pixels ? c : hw};
        if (xp.base != nullptr) {  // x' itself, from the pool pass (y, rescaled in place)
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
  });
}

// y for checked operands, in `out` when given (x itself: cpu_sae_), else in a new output;
// the saved values (z, p, u: see forward_typed) go to `saved` when given, else to scratch
// memory.
Tensor run_forward(const Tensor& x_in, at::TensorList w1s, at::TensorList b1s,
                   const optional<Tensor>& w2, const optional<Tensor>& b2,
                   const optional<Tensor>& identity_in, const optional<Tensor>& prologue_scale,
                   const optional<Tensor>& prologue_shift, const Options& o,
                   const std::array<Tensor, 3>* saved, const Tensor* out = nullptr) {
  Tensor y = out ? *out : output_like(x_in);
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
    auto scratch = unfilled<A>(saved ? 0 : n * (2 * c + k));
    A* z = saved ? data<A>((*saved)[0]) : scratch.get();
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

// cpu_sae below autograd, the forward alone and nothing saved: y in a new output, or
// over x itself (cpu_sae_).
Tensor infer(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
             const optional<Tensor>& w2, const optional<Tensor>& b2,
             const optional<Tensor>& identity, int64_t act, int64_t gate_code, bool residual,
             bool relu_out, const optional<Tensor>& prologue_scale,
             const optional<Tensor>& prologue_shift, int64_t prologue_act, bool over_x) {
  check_operands(x, w1s, b1s, w2, b2, identity, act, gate_code, prologue_scale, prologue_shift,
                 prologue_act);
  check_dtype(x);
  if (over_x) {
    TORCH_CHECK_VALUE(view_of(x) && at::has_internal_overlap(x) == at::MemOverlap::No,
                      "cpu_sae_ writes y over x, which must be a dense NCHW or channels_last "
                      "tensor, got sizes ", x.sizes(), " and strides ", x.strides());
    TORCH_CHECK_VALUE(
        !identity || at::get_overlap_status(x, *identity) == at::MemOverlapStatus::No,
        "cpu_sae_ writes y over x, so identity must not share x's memory");
  }
  Options o{act, gate_code, residual, relu_out, prologue_act};
  return run_forward(x, w1s, b1s, w2, b2, identity, prologue_scale, prologue_shift, o, nullptr,
                     over_x ? &x : nullptr);
}

Tensor cpu_infer(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                 const optional<Tensor>& w2, const optional<Tensor>& b2,
                 const optional<Tensor>& identity, int64_t act, int64_t gate_code, bool residual,
                 bool relu_out, const optional<Tensor>& prologue_scale,
                 const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  return infer(x, w1s, b1s, w2, b2, identity, act, gate_code, residual, relu_out,
               prologue_scale, prologue_shift, prologue_act, false);
}

// cpu_sae_: y written over x, for callers whose x is a temporary that nothing reads after
// the call: no output to allocate (or to fault in), and the rescale writes back the lines
// it has just read instead of pulling a second buffer's into cache. Each element of y is
// written after the element of x at its place was last read (the pool pass is over before
// the rescale starts, and the rescale reads and writes each element in one step), so the
// kernels are the out-of-place ones.
void cpu_sae_(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
              const optional<Tensor>& w2, const optional<Tensor>& b2,
              const optional<Tensor>& identity, int64_t act, int64_t gate_code, bool residual,
              bool relu_out, const optional<Tensor>& prologue_scale,
              const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  infer(x, w1s, b1s, w2, b2, identity, act, gate_code, residual, relu_out, prologue_scale,
        prologue_shift, prologue_act, true);
}

// A copy of x in a tensor allocated as the operator allocates its outputs (huge pages from
// kHugePageMinBytes on): the benchmark's memory floor with the fused op's allocation.
Tensor copy_like_output(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  return output_like(x).copy_(x);
}

}  // namespace sae_cpu
