// Autograd for the ops whose forward and backward are both C++ kernels (group_norm), registered under the
// Autograd dispatch key so a training step stays in C++: torch.library.register_autograd from Python cost
// ~100 us per forward call (filling the schema's defaults, a Python autograd.Function) and as much again in the
// backward, more than the kernels themselves at the U-Net's small feature maps. The Triton ops keep their
// Python registration (fastdiff/ops/<op>.py): their kernels are Python anyway.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastdiff {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

using GroupNormFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, const OptT&,
                                                                     const OptT&, const OptT&, const OptT&, double,
                                                                     c10::string_view);
using GroupNormBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptT&, const OptT&,
    const OptT&, const OptT&, c10::string_view);

// The ops below autograd, looked up once.
const c10::TypedOperatorHandle<GroupNormFn>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::group_norm", "").typed<GroupNormFn>();
  return op;
}

const c10::TypedOperatorHandle<GroupNormBackwardFn>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastdiff::group_norm_backward", "")
                             .typed<GroupNormBackwardFn>();
  return op;
}

// An absent optional tensor is saved as an undefined tensor and comes back as nullopt.
at::Tensor or_undefined(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }
OptT as_optional(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t num_groups, const OptT& weight,
                               const OptT& bias, const OptT& scale, const OptT& shift, double eps,
                               c10::string_view activation) {
    at::Tensor y, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, rstd) = forward_op().call(x, num_groups, weight, bias, scale, shift, eps, activation);
    }
    ctx->save_for_backward({x, mean, rstd, or_undefined(weight), or_undefined(bias), or_undefined(scale),
                            or_undefined(shift)});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  // One gradient per forward argument: grad_x, none for num_groups, the four parameters' (undefined where the
  // parameter was None, where the kernel returns an empty tensor), none for eps and activation.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2];
    const OptT w = as_optional(saved[3]), b = as_optional(saved[4]), s = as_optional(saved[5]),
               t = as_optional(saved[6]);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    if (at::GradMode::is_enabled() && grads[0].defined()) {
      // create_graph=True: the gradients as differentiable ops (ATen's group_norm and the AdaGN/SiLU ops), so a
      // second derivative exists (gradient penalties, Hessian-vector products). Slower than the fused backward,
      // which has no derivative of its own.
      return composite_backward(ctx, grads[0], x, w, b, s, t, activation);
    }
    auto [gx, gw, gb, gs, gt] =
        backward_op().call(grads[0], x, mean, rstd, ctx->saved_data["num_groups"].toInt(), w, b, s, t,
                           activation);
    auto keep = [](const OptT& p, const at::Tensor& g) { return p.has_value() ? g : at::Tensor(); };
    return {gx, at::Tensor(), keep(w, gw), keep(b, gb), keep(s, gs), keep(t, gt), at::Tensor(), at::Tensor()};
  }

 private:
  // y recomputed from the saved inputs with differentiable ops (statistics in fp32 at least, as the kernels),
  // then differentiated with create_graph: the gradients carry a graph back to x and the parameters.
  static variable_list composite_backward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& x,
                                          const OptT& w, const OptT& b, const OptT& s, const OptT& t,
                                          const std::string& activation) {
    const auto cd = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto up = [&](const OptT& p) { return p.has_value() ? OptT(p->to(cd)) : std::nullopt; };
    const int64_t G = ctx->saved_data["num_groups"].toInt();
    std::vector<int64_t> nc(x.dim(), 1);  // (N, C, 1, ...): scale and shift broadcast over the spatial dims
    nc[0] = x.size(0);
    nc[1] = x.size(1);
    at::Tensor h;
    if (x.numel() == 0) {
      // a 0-sized channel or spatial dim, which at::group_norm rejects: the empty result, still connected to x
      // and the parameters (as fastdiff.reference.group_norm builds it)
      std::vector<int64_t> c(x.dim(), 1);
      c[1] = x.size(1);
      h = x.to(cd).mul(0);
      if (w.has_value()) h = h.mul(w->to(cd).reshape(c));
      if (b.has_value()) h = h.add(b->to(cd).reshape(c));
    } else {
      h = at::group_norm(x.to(cd), G, up(w), up(b), ctx->saved_data["eps"].toDouble());
    }
    if (s.has_value()) h = h.mul(s->to(cd).reshape(nc).add(1));
    if (t.has_value()) h = h.add(t->to(cd).reshape(nc));
    if (activation == "silu") h = at::silu(h);
    const at::Tensor y = h.to(x.scalar_type());
    // differentiate with respect to the inputs whose gradient is asked for: `pos` is the forward argument's
    // position, `edge` its index among the tensors given (an absent optional parameter has no edge)
    const std::pair<int, OptT> args[] = {{0, OptT(x)}, {2, w}, {3, b}, {4, s}, {5, t}};
    variable_list inputs;
    std::vector<int> where;
    size_t edge = 0;
    for (const auto& [pos, p] : args) {
      if (!p.has_value()) continue;
      if (ctx->needs_input_grad(edge++)) {
        inputs.push_back(*p);
        where.push_back(pos);
      }
    }
    variable_list out(8);
    if (inputs.empty()) return out;
    const variable_list g = torch::autograd::grad({y}, inputs, {grad_y}, /*retain_graph=*/true,
                                                  /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t k = 0; k < g.size(); ++k) out[where[k]] = g[k];
    return out;
  }
};

// group_norm_backward called directly under autograd: its outputs are differentiable in form but
// backpropagating through them raises: the fused kernels have no second derivative, and the dispatcher's fallback
// for an op without an autograd kernel would only warn. (group_norm's own backward under create_graph=True does
// not come here: it takes the composite path above, which has a second derivative.)
class GroupNormBackwardFunction : public torch::autograd::Function<GroupNormBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                               const OptT& weight, const OptT& bias, const OptT& scale, const OptT& shift,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gw, gb, gs, gt] =
        backward_op().call(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, activation);
    return {gx, gw, gb, gs, gt};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastdiff group_norm: no double backward (a gradient of its gradient) on the cpu/cuda "
                "backends; use backend=\"torch\" for that");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, const OptT& weight, const OptT& bias, const OptT& scale, const OptT& shift,
    c10::string_view activation) {
  const variable_list out = GroupNormBackwardFunction::apply(grad_y, x, mean, rstd, num_groups, weight, bias, scale,
                                                             shift, activation);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_autograd(const at::Tensor& x, int64_t num_groups,
                                                                   const OptT& weight, const OptT& bias,
                                                                   const OptT& scale, const OptT& shift, double eps,
                                                                   c10::string_view activation) {
  const variable_list out = GroupNormFunction::apply(x, num_groups, weight, bias, scale, shift, eps, activation);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("group_norm", &group_norm_autograd);
  m.impl("group_norm_backward", &group_norm_backward_autograd);
}

}  // namespace fastdiff
