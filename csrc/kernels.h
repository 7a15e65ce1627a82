// Inner loops of the CPU path, compiled once per instruction set.
//
// This header is included by kernels_{avx512,avx2,generic}.cpp after a
// `#pragma GCC target(...)` and with SAE_ISA naming the namespace, so every loop below
// is vectorized for that instruction set; op_common.h picks one table at run time.
// Nothing here calls a function defined outside this header (GCC will not inline
// across target options), and nothing depends on the thread count: every output
// element is produced by one call, summing in a fixed order, so results are the same
// bits with any number of threads.
//
// Layouts: a sample of x is read either as `rows` (NCHW: one row of HW contiguous
// elements per channel) or as `pixels` (channels_last: one row of C contiguous
// channels per pixel). T is the storage type (float, double or Bf16), A the
// accumulation type (float, or double for double).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sae_cpu.h"

namespace sae_cpu {
namespace SAE_ISA {

inline float to_acc(Bf16 v) {
  uint32_t bits = uint32_t(v.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

template <typename T, typename A>
inline T from_acc(A v);
template <>
inline float from_acc<float, float>(float v) { return v; }
template <>
inline double from_acc<double, double>(double v) { return v; }
template <>
inline Bf16 from_acc<Bf16, float>(float v) {
  // round to nearest even, NaN kept quiet (as c10::BFloat16 does)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return Bf16{uint16_t(is_nan ? 0x7FC0u : rounded)};
}

// ---------------------------------------------------------------- vectors

// One register of the accumulation type, as a GCC/Clang vector of SAE_VECTOR_BYTES (set
// per instruction set). The reductions below are written with these instead of
// `omp simd reduction`, which GCC finishes with one scalar add per lane in order: per
// row or per output that serial tail cost more than the loads.
typedef float VecF __attribute__((vector_size(SAE_VECTOR_BYTES)));
typedef double VecD __attribute__((vector_size(SAE_VECTOR_BYTES)));
typedef uint16_t VecBf16 __attribute__((vector_size(SAE_VECTOR_BYTES / 2)));
typedef uint32_t VecU32 __attribute__((vector_size(SAE_VECTOR_BYTES)));

template <typename A>
struct Simd;
template <>
struct Simd<float> {
  using V = VecF;
  static constexpr int64_t lanes = SAE_VECTOR_BYTES / sizeof(float);
};
template <>
struct Simd<double> {
  using V = VecD;
  static constexpr int64_t lanes = SAE_VECTOR_BYTES / sizeof(double);
};

// Simd<A>::lanes consecutive elements of p, in the accumulation type.
template <typename A>
inline typename Simd<A>::V load(const A* p) {
  typename Simd<A>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
inline typename Simd<A>::V load(const Bf16* p) {
  VecBf16 half;
  std::memcpy(&half, p, sizeof(half));
  VecU32 bits = __builtin_convertvector(half, VecU32) << 16;
  VecF v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The sum of the lanes as a fixed pairwise tree: the two halves added, until two lanes.
template <typename V>
inline auto lane_sum(V v) {
  using A = std::remove_cvref_t<decltype(v[0])>;
  if constexpr (sizeof(V) == 2 * sizeof(A)) {
    return v[0] + v[1];
  } else {
    typedef A Half __attribute__((vector_size(sizeof(V) / 2)));
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return lane_sum(low + high);
  }
}

// The lanes where y <= 0 (the ReLU tail clamped) zeroed in g; NaN in y keeps g.
template <typename V>
inline V zero_where_clamped(V g, V y) {
  auto clamped = y <= V{};
  using M = decltype(clamped);
  M bits;
  std::memcpy(&bits, &g, sizeof(bits));
  bits &= ~clamped;
  std::memcpy(&g, &bits, sizeof(g));
  return g;
}

// ---------------------------------------------------------------- forward passes

// out[r] = sum_i x[r * row_stride + i], i < len: four vector accumulators over the
// whole vectors of a row, a lane tree, then the tail in order.
template <typename T, typename A>
void sum_rows(const T* x, int64_t rows, int64_t row_stride, int64_t len, A* out) {
  using V = typename Simd<A>::V;
  constexpr int64_t L = Simd<A>::lanes;
  const int64_t full = len / L * L;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * row_stride;
    V a0{}, a1{}, a2{}, a3{};
    int64_t i = 0;
    for (; i + 4 * L <= full; i += 4 * L) {
      a0 += load<A>(row + i);
      a1 += load<A>(row + i + L);
      a2 += load<A>(row + i + 2 * L);
      a3 += load<A>(row + i + 3 * L);
    }
    for (; i < full; i += L) a0 += load<A>(row + i);
    A tail = 0;
    for (; i < len; ++i) tail += to_acc(row[i]);
    out[r] = lane_sum((a0 + a1) + (a2 + a3)) + tail;
  }
}

// out[c] = sum over pixels p < pixels of value(p, c), c < width (channels_last sums):
// four pixels at a time, added pairwise and then to the running sums, the last pixels
// one by one. A load and a store of each running sum per four elements, not per
// element: those bound the pass, which ran at about half the speed of the NCHW rows'.
template <typename A, typename F>
inline void pixel_sums(int64_t pixels, int64_t width, A* out, const F& value) {
  for (int64_t c = 0; c < width; ++c) out[c] = 0;
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c)
      out[c] += (value(p, c) + value(p + 1, c)) + (value(p + 2, c) + value(p + 3, c));
  }
  for (; p < pixels; ++p) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) out[c] += value(p, c);
  }
}

// out[c] = sum_p x[p * pixel_stride + c], c < width
template <typename T, typename A>
void sum_pixels(const T* x, int64_t pixels, int64_t pixel_stride, int64_t width, A* out) {
  pixel_sums(pixels, width, out,
             [&](int64_t p, int64_t c) { return to_acc(x[p * pixel_stride + c]); });
}

// y = act_out(x * s [+ x] [+ identity]); `s` is per channel
template <bool RESIDUAL, bool IDENTITY, bool RELU, typename A>
inline A rescaled(A x, A s, A identity) {
  A v = x * s;
  if (RESIDUAL) v += x;  // x * s + x, not x * (1 + s): inf * 0 gives NaN as in PyTorch
  if (IDENTITY) v += identity;
  if (RELU) v = v < A(0) ? A(0) : v;  // keeps NaN, as torch.relu
  return v;
}

template <bool RESIDUAL, bool IDENTITY, bool RELU, typename T, typename A>
void rescale_rows_impl(const Rows<T>& t, const A* s) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* x = t.x + r * t.x_stride;
    const T* id = IDENTITY ? t.identity + r * t.identity_stride : nullptr;
    T* y = t.y + r * t.y_stride;
    const A scale = s[r];
#pragma omp simd
    for (int64_t i = 0; i < t.len; ++i) {
      A identity = IDENTITY ? to_acc(id[i]) : A(0);
      y[i] = from_acc<T, A>(rescaled<RESIDUAL, IDENTITY, RELU>(to_acc(x[i]), scale, identity));
    }
  }
}

template <bool RESIDUAL, bool IDENTITY, bool RELU, typename T, typename A>
void rescale_pixels_impl(const Rows<T>& t, const A* s) {
  for (int64_t p = 0; p < t.rows; ++p) {
    const T* x = t.x + p * t.x_stride;
    const T* id = IDENTITY ? t.identity + p * t.identity_stride : nullptr;
    T* y = t.y + p * t.y_stride;
#pragma omp simd
    for (int64_t c = 0; c < t.len; ++c) {
      A identity = IDENTITY ? to_acc(id[c]) : A(0);
      y[c] = from_acc<T, A>(rescaled<RESIDUAL, IDENTITY, RELU>(to_acc(x[c]), s[c], identity));
    }
  }
}

// Calls f with the run-time epilogue flags as template arguments (outside the loops: a
// flag tested per element keeps the loop scalar where the vectors have no mask registers)
template <typename F>
inline void with_epilogue(Epilogue e, const F& f) {
  auto relu = [&](auto residual, auto identity) {
    if (e.relu) f(residual, identity, std::true_type{});
    else f(residual, identity, std::false_type{});
  };
  auto identity = [&](auto residual) {
    if (e.identity) relu(residual, std::true_type{});
    else relu(residual, std::false_type{});
  };
  if (e.residual) identity(std::true_type{});
  else identity(std::false_type{});
}

template <bool PIXELS, typename T, typename A>
void rescale(const Rows<T>& t, const A* s, Epilogue e) {
  with_epilogue(e, [&](auto residual, auto identity, auto relu) {
    constexpr bool R = residual.value, I = identity.value, U = relu.value;
    if (PIXELS) rescale_pixels_impl<R, I, U, T, A>(t, s);
    else rescale_rows_impl<R, I, U, T, A>(t, s);
  });
}

// ---------------------------------------------------------------- backward passes

// g' = g, zeroed where the ReLU tail clamped (PyTorch's `y <= 0` rule)
template <bool RELU, typename T, typename A>
inline A masked_grad(const T* g, const T* y, int64_t i) {
  A grad = to_acc(g[i]);
  if (RELU) grad = to_acc(y[i]) <= A(0) ? A(0) : grad;
  return grad;
}

template <bool RELU, typename T, typename A>
void dot_rows_impl(const GradRows<T>& t, A* out) {
  using V = typename Simd<A>::V;
  constexpr int64_t L = Simd<A>::lanes;
  const int64_t full = t.len / L * L;
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* x = t.x + r * t.x_stride;
    const T* g = t.grad + r * t.grad_stride;
    const T* y = RELU ? t.y + r * t.y_stride : nullptr;
    V a0{}, a1{};
    int64_t i = 0;
    for (; i + 2 * L <= full; i += 2 * L) {
      V g0 = load<A>(g + i), g1 = load<A>(g + i + L);
      if (RELU) {
        g0 = zero_where_clamped(g0, load<A>(y + i));
        g1 = zero_where_clamped(g1, load<A>(y + i + L));
      }
      a0 += g0 * load<A>(x + i);
      a1 += g1 * load<A>(x + i + L);
    }
    for (; i < full; i += L) {
      V g0 = load<A>(g + i);
      if (RELU) g0 = zero_where_clamped(g0, load<A>(y + i));
      a0 += g0 * load<A>(x + i);
    }
    A tail = 0;
    for (; i < t.len; ++i) tail += masked_grad<RELU, T, A>(g, y, i) * to_acc(x[i]);
    out[r] = lane_sum(a0 + a1) + tail;
  }
}

template <bool RELU, typename T, typename A>
void dot_pixels_impl(const GradRows<T>& t, A* out) {
  pixel_sums(t.rows, t.len, out, [&](int64_t p, int64_t c) {
    const T* y = RELU ? t.y + p * t.y_stride : nullptr;
    return masked_grad<RELU, T, A>(t.grad + p * t.grad_stride, y, c) *
           to_acc(t.x[p * t.x_stride + c]);
  });
}

// out[r or c] = sum over the sample of g' * x
template <bool PIXELS, typename T, typename A>
void grad_dot(const GradRows<T>& t, A* out, bool relu) {
  if (PIXELS) {
    relu ? dot_pixels_impl<true, T, A>(t, out) : dot_pixels_impl<false, T, A>(t, out);
  } else {
    relu ? dot_rows_impl<true, T, A>(t, out) : dot_rows_impl<false, T, A>(t, out);
  }
}

// dx = g' * scale + shift (per channel); d_identity = g' when written
template <bool PIXELS, bool RELU, bool WRITE_ID, typename T, typename A>
void dx_impl(const GradRows<T>& t, const A* scale, const A* shift) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* g = t.grad + r * t.grad_stride;
    const T* y = RELU ? t.y + r * t.y_stride : nullptr;
    T* dx = t.dx + r * t.dx_stride;
    T* did = WRITE_ID ? t.d_identity + r * t.d_identity_stride : nullptr;
    const A row_scale = PIXELS ? A(0) : scale[r];
    const A row_shift = PIXELS ? A(0) : shift[r];
#pragma omp simd
    for (int64_t i = 0; i < t.len; ++i) {
      A grad = masked_grad<RELU, T, A>(g, y, i);
      A a = PIXELS ? scale[i] : row_scale;
      A b = PIXELS ? shift[i] : row_shift;
      dx[i] = from_acc<T, A>(grad * a + b);
      if (WRITE_ID) did[i] = from_acc<T, A>(grad);
    }
  }
}

template <bool PIXELS, typename T, typename A>
void grad_input(const GradRows<T>& t, const A* scale, const A* shift, bool relu, bool write_id) {
  if (relu) {
    write_id ? dx_impl<PIXELS, true, true, T, A>(t, scale, shift)
             : dx_impl<PIXELS, true, false, T, A>(t, scale, shift);
  } else {
    dx_impl<PIXELS, false, false, T, A>(t, scale, shift);
  }
}

// ---------------------------------------------------------------- the prologue

// e^v, vectorizable: 2^n * e^r with n = round(v / ln 2), |r| <= ln 2 / 2, e^r by Cephes'
// degree-6 polynomial (within 2 ulp of expf). n is rounded by adding and subtracting
// 1.5 * 2^23 (which leaves it in the low mantissa bits), not by floorf, which GCC leaves
// a library call inside the vector loops. 0 below -87.3 (where 2^n would be subnormal)
// and inf above 88.3; NaN stays NaN.
//
// The range is handled by a select on the result, not by clamping v: with v clamped, e^v
// is a constant below the range, and GCC's jump threading gave each caller a copy of its
// code for that constant, which the vector loops computed for every lane and then
// discarded. For silu that was one more division per element (v / (1 + e^88.3), whose
// result is subnormal): the backward with a silu prologue took 1.5x the time (C = 256,
// 56 x 56, N = 8, one thread).
inline float exp_acc(float v) {
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
  float t = v * 1.44269504088896341f + kShifter;
  float n = t - kShifter;
  uint32_t n_bits;
  std::memcpy(&n_bits, &t, sizeof(n_bits));
  float r = v - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits = (n_bits - 0x4B400000u + 127u) << 23;  // wraps outside the range
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float e = p * scale;
  e = v < -87.3f ? 0.0f : e;
  return v > 88.3f ? __builtin_inff() : e;
}
// float64 is the checking dtype: libm's exp, exact to the ulp.
inline double exp_acc(double v) { return std::exp(v); }

// act(v) for a prologue activation, as PyTorch defines it
template <int64_t ACT, typename A>
inline A prologue_act(A v) {
  if constexpr (ACT == kPrologueRelu) {
    return v < A(0) ? A(0) : v;  // keeps NaN
  } else if constexpr (ACT == kPrologueSilu) {
    return v / (A(1) + exp_acc(-v));
  } else if constexpr (ACT == kPrologueHardswish) {
    A t = v + A(3);
    t = t < A(0) ? A(0) : t;
    t = t > A(6) ? A(6) : t;
    return v * t / A(6);
  } else {
    return v;
  }
}

// d act / dv, with PyTorch's choices at the kinks (threshold_backward, hardswish_backward)
template <int64_t ACT, typename A>
inline A prologue_act_grad(A v) {
  if constexpr (ACT == kPrologueRelu) {
    return v > A(0) ? A(1) : A(0);
  } else if constexpr (ACT == kPrologueSilu) {
    A sig = A(1) / (A(1) + exp_acc(-v));
    return sig * (A(1) + v * (A(1) - sig));
  } else if constexpr (ACT == kPrologueHardswish) {
    return v < A(-3) ? A(0) : v <= A(3) ? v / A(3) + A(0.5) : A(1);
  } else {
    return A(1);
  }
}

// Calls f with the prologue activation as a template argument (outside the loops).
template <typename F>
inline void with_prologue_act(int64_t act, const F& f) {
  switch (act) {
    case kPrologueRelu: return f(std::integral_constant<int64_t, kPrologueRelu>{});
    case kPrologueSilu: return f(std::integral_constant<int64_t, kPrologueSilu>{});
    case kPrologueHardswish: return f(std::integral_constant<int64_t, kPrologueHardswish>{});
    default: return f(std::integral_constant<int64_t, kPrologueNone>{});
  }
}

template <int64_t ACT, typename T, typename A>
void prologue_sum_rows_impl(const T* x, int64_t rows, int64_t row_stride, int64_t len,
                            const Prologue<A>& p, A* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * row_stride;
    const A a = p.scale[r], b = p.shift[r];
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < len; ++i) acc += prologue_act<ACT>(to_acc(row[i]) * a + b);
    out[r] = acc;
  }
}

template <int64_t ACT, typename T, typename A>
void prologue_sum_pixels_impl(const T* x, int64_t pixels, int64_t pixel_stride, int64_t width,
                              const Prologue<A>& p, A* out) {
  pixel_sums(pixels, width, out, [&](int64_t q, int64_t c) {
    return prologue_act<ACT>(to_acc(x[q * pixel_stride + c]) * p.scale[c] + p.shift[c]);
  });
}

// prologue_sum that also stores x' (in T) to xp, rows xp_stride apart
template <int64_t ACT, typename T, typename A>
void prologue_sum_store_rows_impl(const T* x, int64_t rows, int64_t row_stride, int64_t len,
                                  const Prologue<A>& p, A* out, T* xp, int64_t xp_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * row_stride;
    T* dst = xp + r * xp_stride;
    const A a = p.scale[r], b = p.shift[r];
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < len; ++i) {
      A v = prologue_act<ACT>(to_acc(row[i]) * a + b);
      acc += v;
      dst[i] = from_acc<T, A>(v);
    }
    out[r] = acc;
  }
}

template <int64_t ACT, typename T, typename A>
void prologue_sum_store_pixels_impl(const T* x, int64_t pixels, int64_t pixel_stride,
                                    int64_t width, const Prologue<A>& p, A* out, T* xp,
                                    int64_t xp_stride) {
  pixel_sums(pixels, width, out, [&](int64_t q, int64_t c) {
    A v = prologue_act<ACT>(to_acc(x[q * pixel_stride + c]) * p.scale[c] + p.shift[c]);
    xp[q * xp_stride + c] = from_acc<T, A>(v);
    return v;
  });
}

template <bool PIXELS, typename T, typename A>
void prologue_sum_store(const T* x, int64_t rows, int64_t row_stride, int64_t len,
                        const Prologue<A>& p, A* out, T* xp, int64_t xp_stride) {
  with_prologue_act(p.act, [&](auto act) {
    if (PIXELS) {
      prologue_sum_store_pixels_impl<act.value, T, A>(x, rows, row_stride, len, p, out, xp,
                                                      xp_stride);
    } else {
      prologue_sum_store_rows_impl<act.value, T, A>(x, rows, row_stride, len, p, out, xp,
                                                    xp_stride);
    }
  });
}

template <bool PIXELS, typename T, typename A>
void prologue_sum(const T* x, int64_t rows, int64_t row_stride, int64_t len, const Prologue<A>& p,
                  A* out) {
  with_prologue_act(p.act, [&](auto act) {
    if (PIXELS) prologue_sum_pixels_impl<act.value, T, A>(x, rows, row_stride, len, p, out);
    else prologue_sum_rows_impl<act.value, T, A>(x, rows, row_stride, len, p, out);
  });
}

// y = act_out(x' * s [+ x'] [+ identity]), x' = act(x * scale + shift)
template <bool PIXELS, int64_t ACT, bool RESIDUAL, bool IDENTITY, bool RELU, typename T,
          typename A>
void prologue_rescale_impl(const Rows<T>& t, const A* s, const Prologue<A>& p) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* x = t.x + r * t.x_stride;
    const T* id = IDENTITY ? t.identity + r * t.identity_stride : nullptr;
    T* y = t.y + r * t.y_stride;
    const A row_s = PIXELS ? A(0) : s[r];
    const A row_a = PIXELS ? A(0) : p.scale[r], row_b = PIXELS ? A(0) : p.shift[r];
#pragma omp simd
    for (int64_t i = 0; i < t.len; ++i) {
      A a = PIXELS ? p.scale[i] : row_a, b = PIXELS ? p.shift[i] : row_b;
      A xp = prologue_act<ACT>(to_acc(x[i]) * a + b);
      A identity = IDENTITY ? to_acc(id[i]) : A(0);
      A scale = PIXELS ? s[i] : row_s;
      y[i] = from_acc<T, A>(rescaled<RESIDUAL, IDENTITY, RELU>(xp, scale, identity));
    }
  }
}

template <bool PIXELS, typename T, typename A>
void prologue_rescale(const Rows<T>& t, const A* s, Epilogue e, const Prologue<A>& p) {
  with_prologue_act(p.act, [&](auto act) {
    with_epilogue(e, [&](auto residual, auto identity, auto relu) {
      prologue_rescale_impl<PIXELS, act.value, residual.value, identity.value, relu.value, T,
                            A>(t, s, p);
    });
  });
}

// out[r] = sum g' * x'; with SUMS the PrologueSum sums too (see sae_cpu.h)
template <int64_t ACT, bool SUMS, bool RELU, typename T, typename A>
void prologue_dot_rows_impl(const GradRows<T>& t, A* out, int64_t sum_stride,
                            const Prologue<A>& p) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* x = t.x + r * t.x_stride;
    const T* g = t.grad + r * t.grad_stride;
    const T* y = RELU ? t.y + r * t.y_stride : nullptr;
    const A a = p.scale[r], b = p.shift[r];
    A dot = 0, grad_act_x = 0, act_x = 0, grad_act = 0, act = 0;
#pragma omp simd reduction(+ : dot, grad_act_x, act_x, grad_act, act)
    for (int64_t i = 0; i < t.len; ++i) {
      A grad = masked_grad<RELU, T, A>(g, y, i);
      A xi = to_acc(x[i]), v = xi * a + b;
      dot += grad * prologue_act<ACT>(v);
      if (SUMS) {
        A d = prologue_act_grad<ACT>(v);
        grad_act_x += grad * d * xi;
        act_x += d * xi;
        grad_act += grad * d;
        act += d;
      }
    }
    out[r] = dot;
    if (SUMS) {
      out[(1 + kGradActX) * sum_stride + r] = grad_act_x;
      out[(1 + kActX) * sum_stride + r] = act_x;
      out[(1 + kGradAct) * sum_stride + r] = grad_act;
      out[(1 + kAct) * sum_stride + r] = act;
    }
  }
}

template <int64_t ACT, bool SUMS, bool RELU, typename T, typename A>
void prologue_dot_pixels_impl(const GradRows<T>& t, A* out, int64_t sum_stride,
                              const Prologue<A>& p) {
  const int64_t values = SUMS ? 1 + kPrologueSums : 1;
  for (int64_t k = 0; k < values; ++k)
    for (int64_t c = 0; c < t.len; ++c) out[k * sum_stride + c] = 0;
  A* grad_act_x = out + (1 + kGradActX) * sum_stride;
  A* act_x = out + (1 + kActX) * sum_stride;
  A* grad_act = out + (1 + kGradAct) * sum_stride;
  A* act = out + (1 + kAct) * sum_stride;
  for (int64_t q = 0; q < t.rows; ++q) {
    const T* x = t.x + q * t.x_stride;
    const T* g = t.grad + q * t.grad_stride;
    const T* y = RELU ? t.y + q * t.y_stride : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < t.len; ++c) {
      A grad = masked_grad<RELU, T, A>(g, y, c);
      A xc = to_acc(x[c]), v = xc * p.scale[c] + p.shift[c];
      out[c] += grad * prologue_act<ACT>(v);
      if (SUMS) {
        A d = prologue_act_grad<ACT>(v);
        grad_act_x[c] += grad * d * xc;
        act_x[c] += d * xc;
        grad_act[c] += grad * d;
        act[c] += d;
      }
    }
  }
}

template <bool PIXELS, typename T, typename A>
void prologue_grad_dot(const GradRows<T>& t, A* out, int64_t sum_stride, bool relu,
                       const Prologue<A>& p, bool sums) {
  with_prologue_act(p.act, [&](auto act) {
    constexpr int64_t ACT = act.value;
    auto run = [&]<bool SUMS, bool RELU>() {
      if (PIXELS) prologue_dot_pixels_impl<ACT, SUMS, RELU, T, A>(t, out, sum_stride, p);
      else prologue_dot_rows_impl<ACT, SUMS, RELU, T, A>(t, out, sum_stride, p);
    };
    if (sums) relu ? run.template operator()<true, true>() : run.template operator()<true, false>();
    else relu ? run.template operator()<false, true>() : run.template operator()<false, false>();
  });
}

// dx = (g' * scale + shift) * act'(v) * prologue scale, v = x * prologue scale + shift;
// d_identity = g' when written
template <bool PIXELS, int64_t ACT, bool RELU, bool WRITE_ID, typename T, typename A>
void prologue_dx_impl(const GradRows<T>& t, const A* scale, const A* shift,
                      const Prologue<A>& p) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* x = t.x + r * t.x_stride;
    const T* g = t.grad + r * t.grad_stride;
    const T* y = RELU ? t.y + r * t.y_stride : nullptr;
    T* dx = t.dx + r * t.dx_stride;
    T* did = WRITE_ID ? t.d_identity + r * t.d_identity_stride : nullptr;
    const A row_scale = PIXELS ? A(0) : scale[r], row_shift = PIXELS ? A(0) : shift[r];
    const A row_a = PIXELS ? A(0) : p.scale[r], row_b = PIXELS ? A(0) : p.shift[r];
#pragma omp simd
    for (int64_t i = 0; i < t.len; ++i) {
      A grad = masked_grad<RELU, T, A>(g, y, i);
      A a = PIXELS ? p.scale[i] : row_a, b = PIXELS ? p.shift[i] : row_b;
      A d_xp = grad * (PIXELS ? scale[i] : row_scale) + (PIXELS ? shift[i] : row_shift);
      dx[i] = from_acc<T, A>(d_xp * prologue_act_grad<ACT>(to_acc(x[i]) * a + b) * a);
      if (WRITE_ID) did[i] = from_acc<T, A>(grad);
    }
  }
}

template <bool PIXELS, typename T, typename A>
void prologue_grad_input(const GradRows<T>& t, const A* scale, const A* shift, bool relu,
                         bool write_id, const Prologue<A>& p) {
  with_prologue_act(p.act, [&](auto act) {
    constexpr int64_t ACT = act.value;
    if (!relu) prologue_dx_impl<PIXELS, ACT, false, false, T, A>(t, scale, shift, p);
    else if (write_id) prologue_dx_impl<PIXELS, ACT, true, true, T, A>(t, scale, shift, p);
    else prologue_dx_impl<PIXELS, ACT, true, false, T, A>(t, scale, shift, p);
  });
}

// ---------------------------------------------------------------- the small FCs

// Samples per tile of `linear`: 4 outputs x this many samples of vector accumulators,
// within the 16 (AVX2, SSE) or 32 (AVX-512) vector registers.
constexpr int64_t kLinearSamples = SAE_VECTOR_BYTES == 64 ? 4 : 2;

// acc[q][s] (+)= the dot products of rows w[q] (Q of them) with inputs in[s] (S of them)
// over their whole vectors; tail[q][s] the rest in order. Every (row, input) pair sums
// in the same order whatever Q and S are, so the tiling never changes a result.
template <int64_t Q, int64_t S, typename A>
inline void dot_tile(const A* const* w, const A* const* in, int64_t len, A (&out)[Q][S]) {
  using V = typename Simd<A>::V;
  constexpr int64_t L = Simd<A>::lanes;
  const int64_t full = len / L * L;
  V acc[Q][S];
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t s = 0; s < S; ++s) acc[q][s] = V{};
  for (int64_t i = 0; i < full; i += L) {
    V x[S];
    for (int64_t s = 0; s < S; ++s) x[s] = load<A>(in[s] + i);
    for (int64_t q = 0; q < Q; ++q) {
      V v = load<A>(w[q] + i);
      for (int64_t s = 0; s < S; ++s) acc[q][s] += v * x[s];
    }
  }
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t s = 0; s < S; ++s) {
      A tail = 0;
      for (int64_t i = full; i < len; ++i) tail += w[q][i] * in[s][i];
      out[q][s] = lane_sum(acc[q][s]) + tail;
    }
  }
}

// out[b, o] = bias[o] + sum_i w[o, i] * in[b, i] for o in [o_begin, o_end): tiles of 4
// outputs x kLinearSamples samples share each load. Samples left over (all of them at
// N = 1) go one at a time in tiles of 8 outputs, more weight rows per input vector; at
// N = 1 the FCs then match ATen's addmm (2048 x 128, 1 and 2 threads).
template <typename A>
void linear(const A* in, int64_t batch, int64_t ins, WeightRows<A> w, const A* bias, A* out,
            int64_t outs, int64_t o_begin, int64_t o_end) {
  constexpr int64_t Q = 4, S = kLinearSamples;  // Q: kLinearOutputs in op_common.h
  auto tile = [&]<int64_t Rows, int64_t Samples>(int64_t o, int64_t b) {
    const A* inputs[Samples];
    for (int64_t s = 0; s < Samples; ++s) inputs[s] = in + (b + s) * ins;
    const A* rows[Rows];
    for (int64_t q = 0; q < Rows; ++q) rows[q] = w[o + q];
    A sums[Rows][Samples];
    dot_tile<Rows, Samples>(rows, inputs, ins, sums);
    for (int64_t q = 0; q < Rows; ++q)
      for (int64_t s = 0; s < Samples; ++s)
        out[(b + s) * outs + o + q] = sums[q][s] + (bias ? bias[o + q] : A(0));
  };
  int64_t whole = batch / S * S;
  int64_t o = o_begin;
  for (; o + Q <= o_end; o += Q)
    for (int64_t b = 0; b < whole; b += S) tile.template operator()<Q, S>(o, b);
  for (; o < o_end; ++o)
    for (int64_t b = 0; b < whole; ++b) tile.template operator()<1, 1>(o, b);
  for (int64_t b = whole; b < batch; ++b) {
    o = o_begin;
    for (; o + 2 * Q <= o_end; o += 2 * Q) tile.template operator()<2 * Q, 1>(o, b);
    for (; o + Q <= o_end; o += Q) tile.template operator()<Q, 1>(o, b);
    for (; o < o_end; ++o) tile.template operator()<1, 1>(o, b);
  }
}

// out(s)[i, i + W * lanes) = sum_t coef(s0 + s, t) * row(t)[i, ...) for S outputs rows from
// s0: S x W vector accumulators, the terms t added in order (as in the scalar tail of
// `axpy_rows`, so the column tiling never changes a result).
template <int64_t S, int64_t W, typename A, typename Coef, typename Row, typename Out>
inline void axpy_tile(int64_t s0, int64_t terms, const Coef& coef, const Row& row, const Out& out,
                      int64_t i) {
  using V = typename Simd<A>::V;
  constexpr int64_t L = Simd<A>::lanes;
  V acc[S][W];
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < W; ++j) acc[s][j] = V{};
  for (int64_t t = 0; t < terms; ++t) {
    const A* r = row(t);
    V rv[W];
    for (int64_t j = 0; j < W; ++j) rv[j] = load<A>(r + i + j * L);
    for (int64_t s = 0; s < S; ++s) {
      V c = V{} + coef(s0 + s, t);
      for (int64_t j = 0; j < W; ++j) acc[s][j] += c * rv[j];
    }
  }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < W; ++j) std::memcpy(out(s0 + s) + i + j * L, &acc[s][j], sizeof(V));
}

// out(s)[i] = sum_t coef(s, t) * row(t)[i] for s < count and i in [i_begin, i_end): the
// product of a (count, terms) matrix given by `coef` and a (terms, columns) one given by
// its rows, in tiles of kLinearSamples output rows x 4 vectors of columns.
template <typename A, typename Coef, typename Row, typename Out>
void axpy_rows(int64_t count, int64_t terms, const Coef& coef, const Row& row, const Out& out,
               int64_t i_begin, int64_t i_end) {
  constexpr int64_t L = Simd<A>::lanes, S = kLinearSamples, W = 4;
  auto columns = [&]<int64_t Rows>(int64_t s0) {
    int64_t i = i_begin;
    for (; i + W * L <= i_end; i += W * L) axpy_tile<Rows, W, A>(s0, terms, coef, row, out, i);
    for (; i + L <= i_end; i += L) axpy_tile<Rows, 1, A>(s0, terms, coef, row, out, i);
    for (; i < i_end; ++i) {
      for (int64_t s = s0; s < s0 + Rows; ++s) {
        A acc = 0;
        for (int64_t t = 0; t < terms; ++t) acc += coef(s, t) * row(t)[i];
        out(s)[i] = acc;
      }
    }
  };
  int64_t s = 0;
  for (; s + S <= count; s += S) columns.template operator()<S>(s);
  for (; s < count; ++s) columns.template operator()<1>(s);
}

// out[m, :] = sum_b a[b, m] * v[b, :] for m in [m_begin, m_end): a weight gradient
// (dW = d_out^T @ in) with a: (batch, a_cols), v: (batch, width), out: (a_cols, width).
template <typename A>
void outer_sum(const A* a, int64_t batch, int64_t a_cols, const A* v, int64_t width, A* out,
               int64_t m_begin, int64_t m_end) {
  axpy_rows<A>(
      m_end - m_begin, batch, [&](int64_t m, int64_t b) { return a[b * a_cols + m_begin + m]; },
      [&](int64_t b) { return v + b * width; },
      [&](int64_t m) { return out + (m_begin + m) * width; }, 0, width);
}

// d_in[b, i] = sum_o d_out[b, o] * w[o, i], for i in [i_begin, i_end)
template <typename A>
void linear_backward_input(const A* d_out, int64_t batch, int64_t outs, WeightRows<A> w,
                           int64_t ins, A* d_in, int64_t i_begin, int64_t i_end) {
  axpy_rows<A>(
      batch, outs, [&](int64_t b, int64_t o) { return d_out[b * outs + o]; },
      [&](int64_t o) { return w[o]; }, [&](int64_t b) { return d_in + b * ins; }, i_begin,
      i_end);
}

// ---------------------------------------------------------------- act and gate

// The branch activation over n values (codes: sae_kernels.options.ACTIVATIONS), as
// PyTorch defines each: relu, silu, hardswish, and gelu(x) = x / 2 * (1 + erf(x / sqrt 2)).
template <typename A>
void activate(const A* in, int64_t n, int64_t act, A* out) {
  auto each = [&](auto f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = f(in[i]);
  };
  switch (act) {
    case 0: return each([](A v) { return prologue_act<kPrologueRelu>(v); });
    case 1: return each([](A v) { return prologue_act<kPrologueSilu>(v); });
    case 2: return each([](A v) { return prologue_act<kPrologueHardswish>(v); });
    default:
      for (int64_t i = 0; i < n; ++i)
        out[i] = in[i] * A(0.5) * (A(1) + std::erf(in[i] * A(0.70710678118654752440)));
  }
}

// The excitation gate over n values (codes: sae_kernels.options.GATES): sigmoid, or
// hardsigmoid(x) = clamp(x + 3, 0, 6) / 6.
template <typename A>
void gate(const A* in, int64_t n, int64_t g, A* out) {
  if (g == 0) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = A(1) / (A(1) + exp_acc(-in[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      A t = in[i] + A(3);
      t = t < A(0) ? A(0) : t;
      out[i] = (t > A(6) ? A(6) : t) / A(6);
    }
  }
}

template <typename T, typename A>
PassKernels<T, A> pass_kernels() {
  return {sum_rows<T, A>,
          sum_pixels<T, A>,
          rescale<false, T, A>,
          rescale<true, T, A>,
          grad_dot<false, T, A>,
          grad_dot<true, T, A>,
          grad_input<false, T, A>,
          grad_input<true, T, A>,
          prologue_sum<false, T, A>,
          prologue_sum<true, T, A>,
          prologue_sum_store<false, T, A>,
          prologue_sum_store<true, T, A>,
          prologue_rescale<false, T, A>,
          prologue_rescale<true, T, A>,
          prologue_grad_dot<false, T, A>,
          prologue_grad_dot<true, T, A>,
          prologue_grad_input<false, T, A>,
          prologue_grad_input<true, T, A>};
}

template <typename A>
FcKernels<A> fc_kernels() {
  return {linear<A>, linear_backward_input<A>, outer_sum<A>, activate<A>, gate<A>};
}

const KernelTable& table() {
  static const KernelTable kernels = {SAE_ISA_NAME, pass_kernels<float, float>(),
                                      pass_kernels<double, double>(), pass_kernels<Bf16, float>(),
                                      fc_kernels<float>(), fc_kernels<double>()};
  return kernels;
}

}  // namespace SAE_ISA
}  // namespace sae_cpu
