// Operator schemas of ksl_ops, and nothing else: the kernels are in cpu/ and cuda/, the autograd in
// autograd.cpp, the fake (meta) kernels in Python (ksl_ops/functional.py).
//
// `reduction` is 0 = none, 1 = mean, 2 = sum (ksl::Reduction). Backward ops take the gradients of
// the forward's loss outputs and whatever the forward saved for them.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing ksl_ops._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ksl_ops, m) {
  // KSL-P (eq. 3-6). Returns (pp, pa, row_lse, grad_dir): row_lse [B, N] (float32, float64 for
  // float64 logits) is log-sum-exp of logits/T, saved for the backward. With save_grad,
  // detach_target and reduction mean/sum, grad_dir [B, N, K] is the gradient computed with the loss
  // (d pa / d logits; d pp / d logits = (B-1) grad_dir) and the backward only scales it; otherwise
  // it is empty and the backward recomputes from row_lse.
  m.def(
      "prob_consensus(Tensor logits, float temperature, bool detach_target, int reduction, "
      "bool save_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prob_consensus_backward(Tensor grad_pp, Tensor grad_pa, Tensor logits, Tensor row_lse, "
      "float temperature, bool detach_target, int reduction) -> Tensor");
  // The backward when the forward saved grad_dir: grad_dir · ((B-1)·grad_pp + grad_pa), the upstream
  // gradients scalars of grad_dir's dtype (an absent one counts 0); one elementwise pass.
  m.def("prob_consensus_backward_saved(Tensor? grad_pp, Tensor? grad_pa, Tensor grad_dir) -> Tensor");

  // KSL-E (eq. 7-10). Returns (ep, ea, norms): norms [N, B(B-1)/2 + B] (float32; float64 for
  // float64 emb) holds every sample's pair norms then average norms, saved for the backward so
  // that it makes one pass over emb instead of two.
  m.def("embedding_consensus(Tensor emb, int reduction) -> (Tensor, Tensor, Tensor)");
  m.def(
      "embedding_consensus_backward(Tensor grad_ep, Tensor grad_ea, Tensor emb, Tensor norms, int reduction) -> "
      "Tensor");

  // Per-branch (eq. 2) and cross-branch (KSL-H, eq. 11) batch-hard triplets. Returns
  // (self, cross, pos_idx, neg_idx, hard_sq): the indices are int32 [B, B, N], -1 for an invalid
  // anchor; hard_sq [2, B, B, N] (float32; float64 for float64 emb) holds the squared distances of
  // each anchor to its hardest positive (plane 0) and negative (plane 1), saved so that the
  // backward's coefficients are elementwise instead of recomputing two distances per anchor.
  m.def(
      "branch_triplet(Tensor emb, Tensor labels, float margin, bool soft_margin, int reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "branch_triplet_backward(Tensor grad_self, Tensor grad_cross, Tensor emb, Tensor pos_idx, "
      "Tensor neg_idx, Tensor hard_sq, float margin, bool soft_margin, int reduction) -> Tensor");
}
