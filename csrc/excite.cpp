// The excitation alone: s = gate(W2 act(W1 z + b1) + b2) for pooled means z (N, C), the
// forward's FC stage without its passes over x. A graph torch.compile traces from the
// composite calls it between inductor's own pool and rescale kernels (the rule in
// sae_kernels/dispatch.py): there each FC would otherwise be an `addmm` of N rows, which
// reads weights that the network's other layers pushed out of cache at a half to a third
// of the speed of these loops (benchmarks/excitation_cost.py).

#include "op_common.h"
#include "ops.h"

namespace sae_cpu {

namespace {

// s (n, c) from z (n, c), both contiguous in the accumulation type.
template <typename A>
void excite_typed(const A* z, int64_t n, const Weights<A>& w, A* s, int64_t act,
                  int64_t gate_code) {
  int64_t c = w.c, k = w.k;
  const auto& fc = fc_kernels<A>();
  auto p = unfilled<A>(n * k), h = unfilled<A>(w.has_fc2() ? n * k : 0),
       u = unfilled<A>(w.has_fc2() ? n * c : 0);
  // the FC1 outputs of columns [o0, o1) of each sample, `width` columns a sample
  auto each_sample = [&](int64_t o0, int64_t o1, int64_t width, auto f) {
    for (int64_t i = 0; i < n; ++i) f(i * width + o0, o1 - o0);
  };
  // one team for both FCs: FC2 reads every FC1 output, so it starts at the team's barrier
  run_team(loop_threads(n * c * k, kGrainElements, available_threads()), [&](Team& team) {
    linear<A>(team, z, n, c, w.w1(), w.b1_data(), p.get(), k, [&](int64_t o0, int64_t o1) {
      each_sample(o0, o1, k, [&](int64_t at, int64_t len) {
        if (w.has_fc2()) fc.activate(p.get() + at, len, act, h.get() + at);
        else fc.gate(p.get() + at, len, gate_code, s + at);
      });
    });
    if (w.has_fc2())
      linear<A>(team, h.get(), n, k, w.w2(), w.b2_data(), u.get(), c,
                [&](int64_t o0, int64_t o1) {
                  each_sample(o0, o1, c, [&](int64_t at, int64_t len) {
                    fc.gate(u.get() + at, len, gate_code, s + at);
                  });
                });
  });
}

}  // namespace

Tensor cpu_excite(const Tensor& z, at::TensorList w1s, at::TensorList b1s,
                  const optional<Tensor>& w2, const optional<Tensor>& b2, int64_t act,
                  int64_t gate_code) {
  TORCH_CHECK_VALUE(z.dim() == 2, "z must be 2-D (N, C), got ", z.dim(), "-D shape ", z.sizes());
  // the operator's rules on the weights, z standing for x's pooled means
  check_operands(z.view({z.size(0), z.size(1), 1, 1}), w1s, b1s, w2, b2, std::nullopt, act,
                 gate_code, std::nullopt, std::nullopt, kPrologueNone);
  check_dtype(z);
  auto acc = acc_type(z);
  Tensor s = at::empty(z.sizes(), z.options().dtype(acc));
  int64_t n = z.size(0);
  if (n > 0) {
    auto run = [&](auto accumulation) {
      using A = decltype(accumulation);
      Tensor zc = as_acc<A>(z);
      excite_typed<A>(data<A>(zc), n, weights_by_rows<A>(w1s, b1s, w2, b2), data<A>(s), act,
                      gate_code);
    };
    if (acc == at::kDouble) run(double{});
    else run(float{});
  }
  return z.scalar_type() == acc ? s : s.to(z.scalar_type());
}

}  // namespace sae_cpu
