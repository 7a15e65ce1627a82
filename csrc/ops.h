// The operator's kernels as the dispatcher calls them (registered in register.cpp).

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace sae_cpu {

using at::Tensor;
using std::optional;

// dx, d_identity, d fc1 weights, d fc1 biases, d fc2 weight, d fc2 bias, d prologue scale,
// d prologue shift (an unused gradient is an empty tensor)
using BackwardResult = std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>,
                                  Tensor, Tensor, Tensor, Tensor>;

// forward.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_forward(
    const Tensor& x, at::TensorList w1s, at::TensorList b1s, const optional<Tensor>& w2,
    const optional<Tensor>& b2, const optional<Tensor>& identity, int64_t act,
    int64_t gate_code, bool residual, bool relu_out, const optional<Tensor>& prologue_scale,
    const optional<Tensor>& prologue_shift, int64_t prologue_act);
Tensor cpu_infer(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                 const optional<Tensor>& w2, const optional<Tensor>& b2,
                 const optional<Tensor>& identity, int64_t act, int64_t gate_code, bool residual,
                 bool relu_out, const optional<Tensor>& prologue_scale,
                 const optional<Tensor>& prologue_shift, int64_t prologue_act);
void cpu_sae_(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
              const optional<Tensor>& w2, const optional<Tensor>& b2,
              const optional<Tensor>& identity, int64_t act, int64_t gate_code, bool residual,
              bool relu_out, const optional<Tensor>& prologue_scale,
              const optional<Tensor>& prologue_shift, int64_t prologue_act);
Tensor copy_like_output(const Tensor& x);

// excite.cpp
Tensor cpu_excite(const Tensor& z, at::TensorList w1s, at::TensorList b1s,
                  const optional<Tensor>& w2, const optional<Tensor>& b2, int64_t act,
                  int64_t gate_code);

// backward.cpp
BackwardResult cpu_backward(const Tensor& grad, const Tensor& x, const optional<Tensor>& y,
                            at::TensorList w1s, const optional<Tensor>& w2, const Tensor& z,
                            const Tensor& p, const Tensor& u, int64_t act, int64_t gate_code,
                            bool residual, bool relu_out, bool has_identity,
                            const optional<Tensor>& prologue_scale,
                            const optional<Tensor>& prologue_shift, int64_t prologue_act,
                            bool prologue_grads);

}  // namespace sae_cpu
