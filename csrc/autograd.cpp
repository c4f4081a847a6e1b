// Autograd of the three forward ops, in C++ (TORCH_LIBRARY_IMPL(ksl_ops, Autograd, m)): a call from
// Python is one dispatch forward and one backward, with no Python autograd.Function, setup_context or
// backward formula on the way. Each kernel is a torch::autograd::Function that calls the op below the
// autograd key (so it reaches the CPU / CUDA kernel, or the fake kernel registered from Python under
// torch.compile) and, in its backward, the op's *_backward operator through the dispatcher.
//
// The fake (meta) kernels stay in Python (ksl_ops/functional.py): torch.library.register_fake is what
// opcheck and torch.compile see, and AOTAutograd traces this backward like any other C++ formula.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

constexpr int64_t kNone = 0;

// The typed handle of ksl_ops::<name>, looked up once per call site.
#define KSL_OP(name, Sig)                                                                                  \
  ([]() -> const c10::TypedOperatorHandle<Sig>& {                                                          \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("ksl_ops::" name, "").typed<Sig>(); \
    return handle;                                                                                         \
  }())

// The upstream gradient of one loss output for a *_backward op: a loss output that did not reach the
// loss arrives undefined and contributes nothing, so it becomes zeros of the output's shape (a scalar
// for mean/sum, `none_shape` for reduction none).
Tensor upstream_or_zeros(const Tensor& g, int64_t reduction, at::IntArrayRef none_shape, const Tensor& like) {
  if (g.defined()) return g;
  return reduction == kNone ? at::zeros(none_shape, like.options()) : at::zeros({}, like.options());
}

// ---- prob_consensus -------------------------------------------------------------------------------
using ProbFwd = Tensor4(const Tensor&, double, bool, int64_t, bool);
using ProbBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool, int64_t);
using ProbBwdSaved = Tensor(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&);

// An upstream gradient as an optional argument: absent when that output did not reach the loss.
std::optional<Tensor> given(const Tensor& g) { return g.defined() ? std::optional<Tensor>(g) : std::nullopt; }

class ProbConsensus : public torch::autograd::Function<ProbConsensus> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, double temperature, bool detach_target,
                               int64_t reduction, bool save_grad) {
    Tensor pp, pa, row_lse, grad_dir;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(pp, pa, row_lse, grad_dir) = KSL_OP("prob_consensus", ProbFwd)
                                                .call(logits, temperature, detach_target, reduction, save_grad);
    }
    // With save_grad, detach_target and a scalar reduction the forward wrote the whole gradient's
    // direction (d pa / d logits; d pp / d logits = (B-1) times it): the backward only scales it.
    const bool uses_grad_dir = save_grad && detach_target && reduction != kNone;
    ctx->saved_data["uses_grad_dir"] = uses_grad_dir;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["detach_target"] = detach_target;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["B"] = logits.size(0);
    ctx->saved_data["N"] = logits.size(1);
    if (uses_grad_dir) {
      ctx->save_for_backward({grad_dir});
    } else {
      ctx->save_for_backward({logits, row_lse});
    }
    // row_lse and grad_dir are saved state, not losses: no zero-filled [B, N, K] gradient for them.
    ctx->mark_non_differentiable({row_lse, grad_dir});
    ctx->set_materialize_grads(false);
    return {pp, pa, row_lse, grad_dir};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& g_pp = grads[0];
    const Tensor& g_pa = grads[1];
    variable_list out(5);
    if (!g_pp.defined() && !g_pa.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const int64_t B = ctx->saved_data["B"].toInt(), N = ctx->saved_data["N"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (ctx->saved_data["uses_grad_dir"].toBool()) {
      // grad = grad_dir · ((B−1)·g_pp + g_pa), g scalars here (reduction mean/sum): one op, one launch.
      out[0] = KSL_OP("prob_consensus_backward_saved", ProbBwdSaved).call(given(g_pp), given(g_pa), saved[0]);
      return out;
    }
    const Tensor& logits = saved[0];
    const Tensor& row_lse = saved[1];
    const Tensor gpp = upstream_or_zeros(g_pp, reduction, {B, B, N}, logits);
    const Tensor gpa = upstream_or_zeros(g_pa, reduction, {B, N}, logits);
    out[0] = KSL_OP("prob_consensus_backward", ProbBwd)
                 .call(gpp, gpa, logits, row_lse, ctx->saved_data["temperature"].toDouble(),
                       ctx->saved_data["detach_target"].toBool(), reduction);
    return out;
  }
};

Tensor4 prob_consensus_autograd(const Tensor& logits, double temperature, bool detach_target, int64_t reduction,
                                bool save_grad) {
  auto r = ProbConsensus::apply(logits, temperature, detach_target, reduction, save_grad);
  return {r[0], r[1], r[2], r[3]};
}

// ---- embedding_consensus --------------------------------------------------------------------------
using EmbFwd = Tensor3(const Tensor&, int64_t);
using EmbBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);

class EmbeddingConsensus : public torch::autograd::Function<EmbeddingConsensus> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& emb, int64_t reduction) {
    Tensor ep, ea, norms;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(ep, ea, norms) = KSL_OP("embedding_consensus", EmbFwd).call(emb, reduction);
    }
    ctx->saved_data["reduction"] = reduction;
    ctx->save_for_backward({emb, norms});
    ctx->mark_non_differentiable({norms});
    ctx->set_materialize_grads(false);
    return {ep, ea, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor& emb = saved[0];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t B = emb.size(0), N = emb.size(1);
    const Tensor g_ep = upstream_or_zeros(grads[0], reduction, {B, B, N}, emb);
    const Tensor g_ea = upstream_or_zeros(grads[1], reduction, {B, N}, emb);
    out[0] = KSL_OP("embedding_consensus_backward", EmbBwd).call(g_ep, g_ea, emb, saved[1], reduction);
    return out;
  }
};

Tensor3 embedding_consensus_autograd(const Tensor& emb, int64_t reduction) {
  auto r = EmbeddingConsensus::apply(emb, reduction);
  return {r[0], r[1], r[2]};
}

// ---- branch_triplet -------------------------------------------------------------------------------
using TripFwd = Tensor5(const Tensor&, const Tensor&, double, bool, int64_t);
using TripBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       double, bool, int64_t);

class BranchTriplet : public torch::autograd::Function<BranchTriplet> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& emb, const Tensor& labels, double margin,
                               bool soft_margin, int64_t reduction) {
    Tensor self_loss, cross_loss, pos_idx, neg_idx, hard_sq;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(self_loss, cross_loss, pos_idx, neg_idx, hard_sq) =
          KSL_OP("branch_triplet", TripFwd).call(emb, labels, margin, soft_margin, reduction);
    }
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["soft_margin"] = soft_margin;
    ctx->saved_data["reduction"] = reduction;
    ctx->save_for_backward({emb, pos_idx, neg_idx, hard_sq});
    ctx->mark_non_differentiable({pos_idx, neg_idx, hard_sq});
    ctx->set_materialize_grads(false);
    return {self_loss, cross_loss, pos_idx, neg_idx, hard_sq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor& emb = saved[0];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t B = emb.size(0), N = emb.size(1);
    const Tensor g_self = upstream_or_zeros(grads[0], reduction, {B, N}, emb);
    const Tensor g_cross = upstream_or_zeros(grads[1], reduction, {B, B, N}, emb);
    out[0] = KSL_OP("branch_triplet_backward", TripBwd)
                 .call(g_self, g_cross, emb, saved[1], saved[2], saved[3], ctx->saved_data["margin"].toDouble(),
                       ctx->saved_data["soft_margin"].toBool(), reduction);
    return out;
  }
};

Tensor5 branch_triplet_autograd(const Tensor& emb, const Tensor& labels, double margin, bool soft_margin,
                                int64_t reduction) {
  auto r = BranchTriplet::apply(emb, labels, margin, soft_margin, reduction);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, Autograd, m) {
  m.impl("prob_consensus", &prob_consensus_autograd);
  m.impl("embedding_consensus", &embedding_consensus_autograd);
  m.impl("branch_triplet", &branch_triplet_autograd);
}
