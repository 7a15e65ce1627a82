// A typed Python entry to sae_kernels::cpu_sae (and cpu_sae_), for the fused modules'
// eager calls.
//
// torch.ops parses its arguments against the schema into boxed values, one Python
// object at a time: about 3 us of the operator's fixed cost at N = 1. This entry casts
// them to their C++ types directly and calls the op through the dispatcher's typed
// handle, so autograd, tracing, dispatch modes, torch.func transforms and the profiler
// see the same call as through torch.ops. Calls that involve __torch_function__ (tensor
// subclasses, torch function modes) go to torch.ops, which handles them. This module is
// separate from the kernels' library: that one must load into C++ programs without Python.

#include <ATen/MemoryOverlap.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

namespace {

namespace py = pybind11;
using at::Tensor;
using std::optional;

using CpuSae = Tensor(const Tensor&, at::TensorList, at::TensorList, const optional<Tensor>&,
                      const optional<Tensor>&, const optional<Tensor>&, int64_t, int64_t, bool,
                      bool, const optional<Tensor>&, const optional<Tensor>&, int64_t);

using CpuSaeInPlace = void(const Tensor&, at::TensorList, at::TensorList,
                           const optional<Tensor>&, const optional<Tensor>&,
                           const optional<Tensor>&, int64_t, int64_t, bool, bool,
                           const optional<Tensor>&, const optional<Tensor>&, int64_t);

const c10::TypedOperatorHandle<CpuSae>& cpu_sae_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("sae_kernels::cpu_sae", "")
                                 .typed<CpuSae>();
  return handle;
}

// One call's tensor arguments, unpacked as they are collected; `plain` turns false at
// the first that torch.ops must handle: anything but a Tensor or a Parameter (a tensor
// subclass with __torch_function__, an FX proxy, a wrong type whose error torch.ops words).
struct Arguments {
  bool plain = true;

  Tensor tensor(py::handle h) {
    if (!plain || !THPVariable_CheckExact(h.ptr())) {
      plain = false;
      return Tensor();
    }
    return THPVariable_Unpack(h.ptr());
  }

  optional<Tensor> maybe(py::handle h) {
    if (h.is_none()) return std::nullopt;
    return tensor(h);
  }

  std::vector<Tensor> list(py::handle h) {
    std::vector<Tensor> tensors;
    if (!PyList_Check(h.ptr()) && !PyTuple_Check(h.ptr())) {
      plain = false;
      return tensors;
    }
    for (py::handle item : py::reinterpret_borrow<py::sequence>(h)) tensors.push_back(tensor(item));
    return tensors;
  }

  bool direct() const { return plain && !at::impl::torch_function_mode_enabled(); }
};

const c10::TypedOperatorHandle<CpuSaeInPlace>& cpu_sae_in_place_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("sae_kernels::cpu_sae_", "")
                                 .typed<CpuSaeInPlace>();
  return handle;
}

// Whether cpu_sae_ may take a call whose caller lets y overwrite x: no gradient is
// recorded (grad mode off), no trace records the call (a traced graph may be replayed
// where one is), x is dense, and the shortcut added in the rescale is not x.
bool may_overwrite(const Tensor& x, const optional<Tensor>& identity) {
  return !at::GradMode::is_enabled() && !torch::jit::tracer::isTracing() &&
         (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) &&
         (!identity || at::get_overlap_status(x, *identity) == at::MemOverlapStatus::No);
}

template <bool overwrite_x>
py::object cpu_sae(py::handle x, py::handle fc1_weights, py::handle fc1_biases,
                   py::handle fc2_weight, py::handle fc2_bias, py::handle identity, int64_t act,
                   int64_t gate, bool residual, bool relu_out, py::handle prologue_scale,
                   py::handle prologue_shift, int64_t prologue_act) {
  Arguments a;
  Tensor x_ = a.tensor(x);
  std::vector<Tensor> w1s = a.list(fc1_weights), b1s = a.list(fc1_biases);
  optional<Tensor> w2 = a.maybe(fc2_weight), b2 = a.maybe(fc2_bias), id = a.maybe(identity),
                   scale = a.maybe(prologue_scale), shift = a.maybe(prologue_shift);
  if (!a.direct()) {
    py::object op = py::module_::import("torch").attr("ops").attr("sae_kernels").attr("cpu_sae");
    return op(x, fc1_weights, fc1_biases, fc2_weight, fc2_bias, identity, act, gate, residual,
              relu_out, prologue_scale, prologue_shift, prologue_act);
  }
  if (overwrite_x && may_overwrite(x_, id)) {
    {
      py::gil_scoped_release no_gil;
      cpu_sae_in_place_handle().call(x_, w1s, b1s, w2, b2, id, act, gate, residual, relu_out,
                                     scale, shift, prologue_act);
    }
    return py::reinterpret_borrow<py::object>(x);
  }
  Tensor y;
  {
    py::gil_scoped_release no_gil;  // as torch.ops does
    y = cpu_sae_handle().call(x_, w1s, b1s, w2, b2, id, act, gate, residual, relu_out, scale,
                              shift, prologue_act);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Typed entries to sae_kernels::cpu_sae (same arguments as torch.ops).";
  m.def("cpu_sae", &cpu_sae<false>,
        "torch.ops.sae_kernels.cpu_sae, with typed argument parsing");
  m.def("cpu_sae_over_x", &cpu_sae<true>,
        "cpu_sae with y written over x (sae_kernels::cpu_sae_; x returned) where no gradient "
        "is recorded, x is dense and identity is not x; else cpu_sae");
}
