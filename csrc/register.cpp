// The ops' autograd (a C++ autograd function: inference saves nothing) and their
// registration with the dispatcher (namespace sae_kernels; the schemas are in schemas.h,
// the fake kernels in Python).

#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "op_common.h"
#include "ops.h"

namespace sae_cpu {

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

// Whether a call records a gradient: grad mode is on and an operand requires one.
bool gradient_due(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                  std::initializer_list<const optional<Tensor>*> optionals) {
  auto needs = [](const Tensor& t) { return t.requires_grad(); };
  return at::GradMode::is_enabled() &&
         (needs(x) || std::any_of(w1s.begin(), w1s.end(), needs) ||
          std::any_of(b1s.begin(), b1s.end(), needs) ||
          std::any_of(optionals.begin(), optionals.end(),
                      [&](const optional<Tensor>* t) { return *t && needs(**t); }));
}

Tensor sae_autograd(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                    const optional<Tensor>& w2, const optional<Tensor>& b2,
                    const optional<Tensor>& identity, int64_t act, int64_t gate_code,
                    bool residual, bool relu_out, const optional<Tensor>& prologue_scale,
                    const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  if (!gradient_due(x, w1s, b1s, {&w2, &b2, &identity, &prologue_scale, &prologue_shift})) {
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

// cpu_sae_ keeps no graph: refused where a gradient is due; else the kernel below
// autograd, and x's version moves on as after any in-place op.
void sae_inplace_autograd(const Tensor& x, at::TensorList w1s, at::TensorList b1s,
                          const optional<Tensor>& w2, const optional<Tensor>& b2,
                          const optional<Tensor>& identity, int64_t act, int64_t gate_code,
                          bool residual, bool relu_out, const optional<Tensor>& prologue_scale,
                          const optional<Tensor>& prologue_shift, int64_t prologue_act) {
  TORCH_CHECK(!gradient_due(x, w1s, b1s, {&w2, &b2, &identity, &prologue_scale, &prologue_shift}),
              "sae_kernels::cpu_sae_ writes y over x and records no gradient, but an operand "
              "requires grad: call sae_kernels::cpu_sae where a gradient is due");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sae_kernels::cpu_sae_", "")
                         .typed<decltype(cpu_sae_)>();
    op.call(x, w1s, b1s, w2, b2, identity, act, gate_code, residual, relu_out, prologue_scale,
            prologue_shift, prologue_act);
  }
  torch::autograd::increment_version(x);
}

std::string isa() { return kernels().isa; }

}  // namespace sae_cpu

namespace {

const char* const kSchemas[] = {
#define SAE_SCHEMA(schema) schema,
#include "schemas.h"
#undef SAE_SCHEMA
};

// Defines the schemas unless they are defined already: the Python package defines them at
// import (saved graphs must find the ops before this library is built or loaded); a C++
// program that loads this library gets them from here.
class SchemaDefinitions {
 public:
  SchemaDefinitions() {
    if (c10::Dispatcher::singleton().findSchema({"sae_kernels::cpu_sae", ""})) return;
    library_.emplace(torch::Library::FRAGMENT, "sae_kernels", std::nullopt, __FILE__, __LINE__);
    for (const char* schema : kSchemas) library_->def(schema, {at::Tag::flexible_layout});
  }

 private:
  std::optional<torch::Library> library_;
};

const SchemaDefinitions schema_definitions;

}  // namespace

TORCH_LIBRARY_IMPL(sae_kernels, CPU, m) {
  m.impl("cpu_sae", &sae_cpu::cpu_infer);
  m.impl("cpu_sae_", &sae_cpu::cpu_sae_);
  m.impl("cpu_copy_like_output", &sae_cpu::copy_like_output);
  m.impl("cpu_forward", &sae_cpu::cpu_forward);
  m.impl("cpu_backward", &sae_cpu::cpu_backward);
  m.impl("cpu_excite", &sae_cpu::cpu_excite);
}

TORCH_LIBRARY_IMPL(sae_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_isa", &sae_cpu::isa);
}

TORCH_LIBRARY_IMPL(sae_kernels, Autograd, m) {
  m.impl("cpu_sae", &sae_cpu::sae_autograd);
  m.impl("cpu_sae_", &sae_cpu::sae_inplace_autograd);
}
