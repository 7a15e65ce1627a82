// The backward: per chunk, ds = sum g' * x' (with the prologue's own sums) -> du, dh,
// dp, dz -> dx = (g' * scale + dz / HW) [* act'(v) * prologue scale]; then the weight
// gradients over the whole batch, each output summed by one thread in a fixed order.

#include "op_common.h"
#include "ops.h"

namespace sae_cpu {

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
  auto partial = unfilled<A>(channel_sums_scratch(xv, chunk, c, hw, sizeof(T), values));
  Forking loops;  // ATen's calls between the loops run on this thread alone
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    int64_t count = std::min(chunk, n - n0);
    // ds = sum g' * x', per channel
    SumsTarget<A> to{data<A>(sums), partial.get(), values};
    channel_sums(loops, xv, count, c, hw, sizeof(T), to,
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
                 });
    Tensor ds = sums.narrow(0, 0, count).select(1, 0);
    Tensor u_c = u.narrow(0, n0, count), p_c = p.narrow(0, n0, count);
    Tensor s = gate(u_c, o.gate);
    du.narrow(0, n0, count).copy_(gate_backward(ds, u_c, s, o.gate));
    if (w.has_fc2()) {
      linear_backward_input<A>(data<A>(du) + n0 * c, count, c, w.w2(), k,
                               data<A>(dh));
      Tensor h = o.act == kRelu ? activation(p_c, o.act) : Tensor();
      dp.narrow(0, n0, count).copy_(activation_backward(dh.narrow(0, 0, count), p_c, h, o.act));
    } else {
      dp.narrow(0, n0, count).copy_(du.narrow(0, n0, count));
    }
    linear_backward_input<A>(data<A>(dp) + n0 * k, count, k, w.w1(), c, data<A>(dz));
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
    for_rows(loops, xv, count, c, hw, [&](int64_t i, int64_t r0, int64_t rows) {
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
  Tensor no_identity_grad = at::empty({0}, x_in.options());
  return {dx, d_identity ? *d_identity : no_identity_grad, per_branch(dw1, w1s, true),
          per_branch(db1, w1s, false), dw2, db2, d_pro_scale, d_pro_shift};
}

}  // namespace sae_cpu
