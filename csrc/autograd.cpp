// Autograd of the three forward ops, in C++ (TORCH_LIBRARY_IMPL(ksl_ops, Autograd, m)): a call from
// Python is one dispatch forward and one backward, with no Python autograd.Function, setup_context or
// backward formula on the way. Each kernel is a torch::autograd::Function that calls the op below the
// autograd key (so it reaches the CPU / CUDA kernel, or the fake kernel registered from Python under
// torch.compile) and, in its backward, the op's *_backward operator through the dispatcher.
//
// The fake (meta) kernels stay in Python (ksl_ops/functional.py): torch.library.register_fake is what
// opcheck and torch.compile see, and AOTAutograd traces this backward like any other C++ formula. The
// sizes the backward needs are kept as SymInt, so that the same code traces under
// torch.compile(dynamic=True), where the sizes are symbols.
//
// The gradients are first derivatives only. Each *_backward operator has its own autograd kernel
// here (a Function whose backward raises), so a gradient computed with create_graph=True carries a
// node that raises a clear error when differentiated again, instead of PyTorch's autograd fallback (a
// warning, then missing second derivatives). Where the backward reads no differentiable input (KSL-P's
// saved-direction path reads only grad_dir), the forward keeps the logits' gradient edge (no tensor)
// and the backward attaches the raising node to it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/macros.h"
#include "host/prob_consensus.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

using ksl::kNone;

// The typed handle of ksl_ops::<name>, looked up once per call site.
#define KSL_OP(name, Sig)                                                                                         \
  ([]() -> const c10::TypedOperatorHandle<Sig>& {                                                                 \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("ksl_ops::" name, "").typed<Sig>(); \
    return handle;                                                                                                \
  }())

// The upstream gradient of one loss output for a *_backward op: a loss output that did not reach the
// loss arrives undefined and contributes nothing, so it becomes zeros of the output's shape (a scalar
// for mean/sum, `none_shape` for reduction none).
Tensor upstream_or_zeros(const Tensor& g, int64_t reduction, c10::SymIntArrayRef none_shape, const Tensor& like) {
  if (g.defined()) return g;
  return reduction == kNone ? at::zeros_symint(none_shape, like.options()) : at::zeros({}, like.options());
}

// ---- first derivatives only -------------------------------------------------------------------------
std::string double_backward_message(const char* op) {
  return std::string("ksl_ops.") + op + ": double backward is not supported (the gradient computed by ksl_ops::" + op +
         "_backward is not itself differentiable). Call ksl_ops." + op +
         "(..., backend=\"reference\") where second derivatives are needed.";
}

// The gradient edge of a forward input that the backward does not save as a tensor, kept in
// saved_data (as a capsule) so that the backward can attach the raising node to it.
struct EdgeHolder : torch::CustomClassHolder {
  explicit EdgeHolder(torch::autograd::Edge e) : edge(std::move(e)) {}
  torch::autograd::Edge edge;
};

// A new autograd node, held as the installed torch holds them: std::shared_ptr<Node> in older releases,
// c10::intrusive_ptr<Node> in newer ones (the extension builds against whichever torch is installed).
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename NodeType, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

// `grad` (computed with create_graph=True) as a tensor whose grad_fn raises double_backward_message
// and leads to `edges`, so that differentiating it with respect to anything upstream raises instead of
// silently missing this op's second derivative.
Tensor raise_when_differentiated(const Tensor& grad, torch::autograd::edge_list edges, const char* op) {
  if (!grad.defined()) return grad;
  if (grad.requires_grad()) edges.push_back(torch::autograd::impl::gradient_edge(grad));
  auto node = make_node<torch::autograd::Error>(double_backward_message(op), std::move(edges));
  Tensor out = torch::autograd::make_variable(grad.tensor_data(), /*requires_grad=*/false);
  torch::autograd::create_gradient_edge(out, std::move(node));
  return out;
}

// ---- prob_consensus -------------------------------------------------------------------------------
using ProbFwd = Tensor4(const Tensor&, double, bool, int64_t, bool);
using ProbBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool, int64_t);
using ProbBwdSaved = Tensor(const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&);

// An upstream gradient as an optional argument: absent when that output did not reach the loss.
std::optional<Tensor> optional_if_defined(const Tensor& g) {
  return g.defined() ? std::optional<Tensor>(g) : std::nullopt;
}

class ProbConsensus : public torch::autograd::Function<ProbConsensus> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, double temperature, bool detach_target,
                               int64_t reduction, bool save_grad) {
    Tensor pp, pa, row_lse, grad_dir;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(pp, pa, row_lse, grad_dir) =
          KSL_OP("prob_consensus", ProbFwd).call(logits, temperature, detach_target, reduction, save_grad);
    }
    // Where the forward wrote the whole gradient's direction grad_dir (d pa / d logits; d pp / d logits
    // = (B-1) times it), the backward only scales it.
    const bool uses_grad_dir = ksl::prob::writes_grad_dir(save_grad, detach_target, reduction);
    ctx->saved_data["uses_grad_dir"] = uses_grad_dir;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["detach_target"] = detach_target;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["B"] = logits.sym_size(0);
    ctx->saved_data["N"] = logits.sym_size(1);
    if (uses_grad_dir) {
      ctx->save_for_backward({grad_dir});
      // grad_dir does not lead back to the logits: keep their edge for a create_graph backward.
      if (logits.requires_grad()) {
        ctx->saved_data["logits_edge"] =
            c10::IValue::make_capsule(c10::make_intrusive<EdgeHolder>(torch::autograd::impl::gradient_edge(logits)));
      }
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
    const c10::SymInt B = ctx->saved_data["B"].toSymInt(), N = ctx->saved_data["N"].toSymInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (ctx->saved_data["uses_grad_dir"].toBool()) {
      // grad = grad_dir · ((B−1)·g_pp + g_pa), g scalars here (reduction mean/sum): one op, one launch.
      out[0] = KSL_OP("prob_consensus_backward_saved", ProbBwdSaved)
                   .call(optional_if_defined(g_pp), optional_if_defined(g_pa), saved[0]);
      // create_graph=True: the result must still lead back to the logits, through a raising node.
      if (at::GradMode::is_enabled() && ctx->saved_data.count("logits_edge") > 0) {
        const auto holder = ctx->saved_data["logits_edge"].toCapsule();
        out[0] =
            raise_when_differentiated(out[0], {static_cast<const EdgeHolder*>(holder.get())->edge}, "prob_consensus");
      }
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
    const c10::SymInt B = emb.sym_size(0), N = emb.sym_size(1);
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
using TripBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                       bool, int64_t);

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
    const c10::SymInt B = emb.sym_size(0), N = emb.sym_size(1);
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

// ---- the *_backward operators: differentiable once ----------------------------------------------------
// torch.autograd.grad(..., create_graph=True) runs the forward ops' backward above with grad mode on;
// the *_backward op then records one of these Functions, whose backward raises. Without grad mode (the
// usual backward) or without an input that requires grad, the op is called directly: no node.

bool records_graph(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

class ProbConsensusBackward : public torch::autograd::Function<ProbConsensusBackward> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_pp, const Tensor& grad_pa, const Tensor& logits,
                               const Tensor& row_lse, double temperature, bool detach_target, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {KSL_OP("prob_consensus_backward", ProbBwd)
                .call(grad_pp, grad_pa, logits, row_lse, temperature, detach_target, reduction)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, double_backward_message("prob_consensus"));
    return {};
  }
};

Tensor prob_consensus_backward_autograd(const Tensor& grad_pp, const Tensor& grad_pa, const Tensor& logits,
                                        const Tensor& row_lse, double temperature, bool detach_target,
                                        int64_t reduction) {
  if (!records_graph({&grad_pp, &grad_pa, &logits, &row_lse})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return KSL_OP("prob_consensus_backward", ProbBwd)
        .call(grad_pp, grad_pa, logits, row_lse, temperature, detach_target, reduction);
  }
  return ProbConsensusBackward::apply(grad_pp, grad_pa, logits, row_lse, temperature, detach_target, reduction)[0];
}

class ProbConsensusBackwardSaved : public torch::autograd::Function<ProbConsensusBackwardSaved> {
 public:
  static variable_list forward(AutogradContext*, const std::optional<Tensor>& grad_pp,
                               const std::optional<Tensor>& grad_pa, const Tensor& grad_dir) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {KSL_OP("prob_consensus_backward_saved", ProbBwdSaved).call(grad_pp, grad_pa, grad_dir)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, double_backward_message("prob_consensus"));
    return {};
  }
};

Tensor prob_consensus_backward_saved_autograd(const std::optional<Tensor>& grad_pp,
                                              const std::optional<Tensor>& grad_pa, const Tensor& grad_dir) {
  if (!records_graph({grad_pp ? &*grad_pp : nullptr, grad_pa ? &*grad_pa : nullptr, &grad_dir})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return KSL_OP("prob_consensus_backward_saved", ProbBwdSaved).call(grad_pp, grad_pa, grad_dir);
  }
  return ProbConsensusBackwardSaved::apply(grad_pp, grad_pa, grad_dir)[0];
}

class EmbeddingConsensusBackward : public torch::autograd::Function<EmbeddingConsensusBackward> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_ep, const Tensor& grad_ea, const Tensor& emb,
                               const Tensor& norms, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {KSL_OP("embedding_consensus_backward", EmbBwd).call(grad_ep, grad_ea, emb, norms, reduction)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, double_backward_message("embedding_consensus"));
    return {};
  }
};

Tensor embedding_consensus_backward_autograd(const Tensor& grad_ep, const Tensor& grad_ea, const Tensor& emb,
                                             const Tensor& norms, int64_t reduction) {
  if (!records_graph({&grad_ep, &grad_ea, &emb, &norms})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return KSL_OP("embedding_consensus_backward", EmbBwd).call(grad_ep, grad_ea, emb, norms, reduction);
  }
  return EmbeddingConsensusBackward::apply(grad_ep, grad_ea, emb, norms, reduction)[0];
}

class BranchTripletBackward : public torch::autograd::Function<BranchTripletBackward> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_self, const Tensor& grad_cross, const Tensor& emb,
                               const Tensor& pos_idx, const Tensor& neg_idx, const Tensor& hard_sq, double margin,
                               bool soft_margin, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {KSL_OP("branch_triplet_backward", TripBwd)
                .call(grad_self, grad_cross, emb, pos_idx, neg_idx, hard_sq, margin, soft_margin, reduction)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, double_backward_message("branch_triplet"));
    return {};
  }
};

Tensor branch_triplet_backward_autograd(const Tensor& grad_self, const Tensor& grad_cross, const Tensor& emb,
                                        const Tensor& pos_idx, const Tensor& neg_idx, const Tensor& hard_sq,
                                        double margin, bool soft_margin, int64_t reduction) {
  if (!records_graph({&grad_self, &grad_cross, &emb, &hard_sq})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return KSL_OP("branch_triplet_backward", TripBwd)
        .call(grad_self, grad_cross, emb, pos_idx, neg_idx, hard_sq, margin, soft_margin, reduction);
  }
  return BranchTripletBackward::apply(grad_self, grad_cross, emb, pos_idx, neg_idx, hard_sq, margin, soft_margin,
                                      reduction)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, Autograd, m) {
  m.impl("prob_consensus", &prob_consensus_autograd);
  m.impl("embedding_consensus", &embedding_consensus_autograd);
  m.impl("branch_triplet", &branch_triplet_autograd);
  m.impl("prob_consensus_backward", &prob_consensus_backward_autograd);
  m.impl("prob_consensus_backward_saved", &prob_consensus_backward_saved_autograd);
  m.impl("embedding_consensus_backward", &embedding_consensus_backward_autograd);
  m.impl("branch_triplet_backward", &branch_triplet_backward_autograd);
}
