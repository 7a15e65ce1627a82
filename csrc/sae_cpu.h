// Plain types shared by the per-instruction-set kernels and the operator code.
// No torch headers here: kernels_*.cpp compile this under `#pragma GCC target`.

#pragma once

#include <cstdint>

namespace sae_cpu {

struct Bf16 {
  uint16_t bits;
};

// The output epilogue: act_out(x * s [+ x] [+ identity]).
struct Epilogue {
  bool residual;
  bool identity;
  bool relu;
};

// The prologue x' = act(x * scale + shift), per channel, applied to x on the fly in every
// pass (x' is never stored). Codes: indices into sae_kernels.options.PROLOGUE_ACTIVATIONS.
enum PrologueAct : int64_t { kPrologueNone = 0, kPrologueRelu = 1, kPrologueSilu = 2,
                             kPrologueHardswish = 3 };

// scale and shift point at the values of the call's first row (NCHW: one value per row)
// or first channel (channels_last: one value per element of a row).
template <typename A>
struct Prologue {
  const A* scale;
  const A* shift;
  int64_t act;
};

// Per-channel sums the prologue's own gradients are made of (the gradient pass writes
// them after the sum of g' * x'), with v = x * scale + shift and act' its derivative:
enum PrologueSum : int64_t { kGradActX = 0, kActX = 1, kGradAct = 2, kAct = 3, kPrologueSums = 4 };

// `rows` rows of `len` contiguous elements; row r of each tensor at ptr + r * stride.
// NCHW: a row is one channel's H*W values. channels_last: a row is one pixel's C values.
// x may be y itself (a rescale in place): the passes write each element of y after
// reading the same element of x, and no other.
template <typename T>
struct Rows {
  const T* x;
  int64_t x_stride;
  const T* identity;
  int64_t identity_stride;
  T* y;
  int64_t y_stride;
  int64_t rows;
  int64_t len;
};

template <typename T>
struct GradRows {
  const T* x;
  int64_t x_stride;
  const T* grad;
  int64_t grad_stride;
  const T* y;  // the forward output, read under the ReLU tail
  int64_t y_stride;
  T* dx;
  int64_t dx_stride;
  T* d_identity;
  int64_t d_identity_stride;
  int64_t rows;
  int64_t len;
};

// The passes over the big tensors, for storage type T and accumulation type A.
template <typename T, typename A>
struct PassKernels {
  void (*sum_rows)(const T* x, int64_t rows, int64_t row_stride, int64_t len, A* out);
  void (*sum_pixels)(const T* x, int64_t pixels, int64_t pixel_stride, int64_t width, A* out);
  void (*rescale_rows)(const Rows<T>& t, const A* s, Epilogue e);
  void (*rescale_pixels)(const Rows<T>& t, const A* s, Epilogue e);
  void (*grad_dot_rows)(const GradRows<T>& t, A* out, bool relu);
  void (*grad_dot_pixels)(const GradRows<T>& t, A* out, bool relu);
  void (*grad_input_rows)(const GradRows<T>& t, const A* scale, const A* shift, bool relu,
                          bool write_id);
  void (*grad_input_pixels)(const GradRows<T>& t, const A* scale, const A* shift, bool relu,
                            bool write_id);

  // The same passes with a prologue. The gradient sums write out[r] = sum g' * x' and,
  // with `sums`, out[(1 + k) * sum_stride + r] for each PrologueSum k.
  void (*prologue_sum_rows)(const T* x, int64_t rows, int64_t row_stride, int64_t len,
                            const Prologue<A>& p, A* out);
  void (*prologue_sum_pixels)(const T* x, int64_t pixels, int64_t pixel_stride, int64_t width,
                              const Prologue<A>& p, A* out);
  // the sums, and x' stored to xp (rows xp_stride apart) for the pass after
  void (*prologue_sum_store_rows)(const T* x, int64_t rows, int64_t row_stride, int64_t len,
                                  const Prologue<A>& p, A* out, T* xp, int64_t xp_stride);
  void (*prologue_sum_store_pixels)(const T* x, int64_t pixels, int64_t pixel_stride,
                                    int64_t width, const Prologue<A>& p, A* out, T* xp,
                                    int64_t xp_stride);
  void (*prologue_rescale_rows)(const Rows<T>& t, const A* s, Epilogue e, const Prologue<A>& p);
  void (*prologue_rescale_pixels)(const Rows<T>& t, const A* s, Epilogue e,
                                  const Prologue<A>& p);
  void (*prologue_grad_dot_rows)(const GradRows<T>& t, A* out, int64_t sum_stride, bool relu,
                                 const Prologue<A>& p, bool sums);
  void (*prologue_grad_dot_pixels)(const GradRows<T>& t, A* out, int64_t sum_stride, bool relu,
                                   const Prologue<A>& p, bool sums);
  void (*prologue_grad_input_rows)(const GradRows<T>& t, const A* scale, const A* shift,
                                   bool relu, bool write_id, const Prologue<A>& p);
  void (*prologue_grad_input_pixels)(const GradRows<T>& t, const A* scale, const A* shift,
                                     bool relu, bool write_id, const Prologue<A>& p);
};

// The rows of an FC weight matrix (outs, ins): one matrix's first row and row stride, or
// a table of row pointers where the rows lie in several matrices (the branch matrices of
// SaE's fc1, which need no stacking). A table costs a pass over its pointers per call,
// memory that the call before has pushed out of cache: 2 us at C = 2048 for fc2's.
template <typename A>
struct WeightRows {
  const A* first = nullptr;
  int64_t stride = 0;
  const A* const* table = nullptr;

  const A* operator[](int64_t r) const { return table ? table[r] : first + r * stride; }
};

// The small FCs over a chunk of samples, in the accumulation type.
template <typename A>
struct FcKernels {
  void (*linear)(const A* in, int64_t batch, int64_t ins, WeightRows<A> w, const A* bias,
                 A* out, int64_t outs, int64_t o_begin, int64_t o_end);
  void (*linear_backward_input)(const A* d_out, int64_t batch, int64_t outs, WeightRows<A> w,
                                int64_t ins, A* d_in, int64_t i_begin, int64_t i_end);
  void (*outer_sum)(const A* a, int64_t batch, int64_t a_cols, const A* v, int64_t width, A* out,
                    int64_t m_begin, int64_t m_end);
  // out[i] = act(in[i]) / gate(in[i]) for i < n (codes: options.ACTIVATIONS / GATES)
  void (*activate)(const A* in, int64_t n, int64_t act, A* out);
  void (*gate)(const A* in, int64_t n, int64_t gate, A* out);
};

struct KernelTable {
  const char* isa;
  PassKernels<float, float> f32;
  PassKernels<double, double> f64;
  PassKernels<Bf16, float> bf16;
  FcKernels<float> fc_f32;
  FcKernels<double> fc_f64;
};

namespace avx512 { const KernelTable& table(); }
namespace avx2 { const KernelTable& table(); }
namespace generic { const KernelTable& table(); }

}  // namespace sae_cpu
