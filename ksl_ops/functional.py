"""The three KSL loss ops as differentiable functions.

Each public function validates its inputs (docs/design.md §3.4), then runs either the fused operator
(torch.ops.ksl_ops.*) or, with backend="reference", the pure-PyTorch reference in ksl_ops.reference.
The autograd of every op is C++ (csrc/autograd.cpp), so a call is one dispatch forward and one
backward. Fake (meta) kernels are registered here with torch.library so that opcheck and
torch.compile(fullgraph=True) work.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple, Union, cast

import torch

from . import _ext
from ._typing import Backend, Reduction

if TYPE_CHECKING:
    from torch._ops import OpOverload
    from torch.distributed import ProcessGroup

    from .distributed import TripletFn


def _reference() -> ModuleType:
    """The pure-PyTorch reference (reference/ in the repository, installed as ksl_ops.reference)."""
    try:
        from . import reference
    except ImportError:  # a source checkout used without installing: reference/ is on sys.path
        import reference
    return reference

TensorOrBranches = Union[torch.Tensor, Sequence[torch.Tensor]]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_BACKENDS = ("fused", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_OPS_CACHE: Dict[str, OpOverload] = {}


def _op(name: str) -> OpOverload:
    """torch.ops.ksl_ops.<name>.default, looked up once (a clear error if the extension is missing)."""
    try:
        return _OPS_CACHE[name]
    except KeyError:
        op = _OPS_CACHE[name] = getattr(_ext.ops(), name).default
        return op


def _reduction_code(reduction: str) -> int:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def _check_backend(backend: str) -> Backend:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return cast(Backend, backend)  # one of _BACKENDS, the values of Backend


def _stack_branches(x: TensorOrBranches, name: str, shape: str) -> torch.Tensor:
    """[B, N, D] from a stacked tensor or a sequence of B tensors [N, D]; checks B, N, dtype.

    `shape` names the expected layout in error messages, e.g. "[B, N, K]".
    """
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"{name} must be a {shape} tensor or a list of B {shape.replace('B, ', '')} tensors, "
                             f"got a tensor of shape {tuple(x.shape)}")
        # The common case costs a few attribute reads; anything unusual falls through to the checks
        # below, which name the problem.
        b, n, d = x.shape
        if b >= 2 and n and d and x.dtype in _FLOAT_DTYPES:
            return x
        stacked = x
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(t, torch.Tensor) for t in x):
            raise TypeError(f"{name} must be a tensor or a list of tensors, got a list containing "
                            f"{sorted({type(t).__name__ for t in x if not isinstance(t, torch.Tensor)})}")
        if len(x) < 2:
            raise ValueError(f"{name} needs at least 2 branches (B >= 2), got {len(x)}")
        first = x[0]
        for b, t in enumerate(x):
            if t.dim() != 2:
                raise ValueError(f"{name}[{b}] must be {shape.replace('B, ', '')}, got shape {tuple(t.shape)}")
            if t.shape != first.shape:
                raise ValueError(f"{name}: all branches must have the same shape; {name}[0] is "
                                 f"{tuple(first.shape)} but {name}[{b}] is {tuple(t.shape)}")
            if t.dtype != first.dtype:
                raise TypeError(f"{name}: all branches must have the same dtype; {name}[0] is "
                                f"{first.dtype} but {name}[{b}] is {t.dtype}")
            if t.device != first.device:
                raise ValueError(f"{name}: all branches must be on the same device; {name}[0] is on "
                                 f"{first.device} but {name}[{b}] is on {t.device}")
        stacked = torch.stack(list(x))
    else:
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")

    if stacked.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got {stacked.dtype}")
    if stacked.size(0) < 2:
        raise ValueError(f"{name} needs at least 2 branches (B >= 2), got B={stacked.size(0)}")
    if stacked.size(1) == 0:
        raise ValueError(f"{name} has no samples (N = 0), shape {tuple(stacked.shape)}")
    if stacked.size(2) == 0:
        dim = shape.strip("[]").split(", ")[-1]
        what = {"K": "class", "L": "dimension"}.get(dim, "entry")
        raise ValueError(f"{name} must have at least one {what} ({dim} >= 1), got shape {tuple(stacked.shape)}")
    return stacked


def _check_positive_number(value: object, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def _check_labels(labels: object, emb: torch.Tensor) -> torch.Tensor:
    n = emb.size(1)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 tensor of shape [N] = [{n}], got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 (torch.long) of shape [N] = [{n}], got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.numel() != n:
        raise ValueError(f"labels must have shape [N] = [{n}] (one label per sample, shared by all branches), "
                         f"got shape {tuple(labels.shape)}")
    if labels.device != emb.device:
        raise ValueError(f"labels must be on the embeddings' device {emb.device}, got {labels.device}")
    # Negative labels are rejected by the operator itself, where it costs no host synchronisation: the
    # CPU kernel raises a ValueError, CUDA a device-side assert.
    return labels


def _check_one_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """The fake (meta) kernels' device check, worded as the C++ kernels word theirs.

    A call whose tensors sit on different devices is dispatched to the kernel of the highest-priority
    device among them; for meta that is the fake kernel below, which would otherwise return
    uninitialised tensors on the first argument's device. The first tensor named is the reference.
    """
    items = [(name, t) for name, t in tensors.items() if t is not None]
    ref_name, ref = items[0]
    owner = ref_name + ("'" if ref_name.endswith("s") else "'s")
    for name, t in items[1:]:
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} must be on {owner} device {ref.device}, got {t.device}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The ops' accumulation dtype (at::opmath_type): float64 for float64, float32 otherwise; also the
    dtype of what they save for the backward (row_lse, norms, hard_sq)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_shapes(x: torch.Tensor, reduction: int, *none_shapes: Tuple[int, ...]) -> Tuple[torch.Tensor, ...]:
    """A fake kernel's loss outputs: a tensor of each of `none_shapes` for reduction none, else scalars."""
    if reduction == _REDUCTIONS["none"]:
        return tuple(x.new_empty(shape) for shape in none_shapes)
    return tuple(x.new_empty(()) for _ in none_shapes)


# ---------------------------------------------------------------------------------------------
# KSL-P: prob_consensus
# ---------------------------------------------------------------------------------------------


# The op returns (pp, pa, row_lse, grad_dir). With detach_target and a scalar reduction, both losses'
# gradients are multiples of one tensor (d pp/dz = (B-1) d pa/dz = (B-1) T c (p - a)), which the
# forward writes as grad_dir while the logits are in cache; the backward then only scales it. The
# call passes save_grad only when a gradient will be needed, so inference and no_grad calls write
# nothing; the op decides whether grad_dir applies (csrc/host/prob_consensus.h: writes_grad_dir,
# which _prob_writes_grad_dir mirrors for the fake kernel's shapes).


def _prob_writes_grad_dir(save_grad: bool, detach_target: bool, reduction: int) -> bool:
    return bool(save_grad) and bool(detach_target) and reduction != _REDUCTIONS["none"]


def _prob_consensus_fused(z: torch.Tensor, temperature: float, detach_target: bool,
                          reduction: int) -> Tuple[torch.Tensor, torch.Tensor]:
    save_grad = z.requires_grad and torch.is_grad_enabled()
    pp, pa, _, _ = _op("prob_consensus")(z, temperature, detach_target, reduction, save_grad)
    return pp, pa


def _prob_consensus_fake(logits: torch.Tensor, temperature: float, detach_target: bool, reduction: int,
                         save_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, K = logits.shape
    pp, pa = _loss_shapes(logits, reduction, (B, B, N), (B, N))
    row_lse = logits.new_empty((B, N), dtype=_acc_dtype(logits.dtype))
    writes = _prob_writes_grad_dir(save_grad, detach_target, reduction)
    grad_dir = logits.new_empty((B, N, K) if writes else (0,))
    return pp, pa, row_lse, grad_dir


def _prob_consensus_backward_fake(grad_pp: torch.Tensor, grad_pa: torch.Tensor, logits: torch.Tensor,
                                  row_lse: torch.Tensor, temperature: float, detach_target: bool,
                                  reduction: int) -> torch.Tensor:
    _check_one_device("prob_consensus_backward", logits=logits, row_lse=row_lse, grad_pp=grad_pp, grad_pa=grad_pa)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _prob_consensus_backward_saved_fake(grad_pp: torch.Tensor, grad_pa: torch.Tensor,
                                        grad_dir: torch.Tensor) -> torch.Tensor:
    _check_one_device("prob_consensus_backward_saved", grad_dir=grad_dir, grad_pp=grad_pp, grad_pa=grad_pa)
    return torch.empty_like(grad_dir, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# KSL-E: embedding_consensus
# ---------------------------------------------------------------------------------------------


# The op returns (ep, ea, norms); norms [N, P + B] (P = B(B-1)/2) are every sample's pair norms then
# average norms in the accumulation dtype, saved so that the backward is one pass.


def _embedding_consensus_fake(emb: torch.Tensor, reduction: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N = emb.shape[0], emb.shape[1]
    ep, ea = _loss_shapes(emb, reduction, (B, B, N), (B, N))
    norms = emb.new_empty(N, B * (B - 1) // 2 + B, dtype=_acc_dtype(emb.dtype))
    return ep, ea, norms


def _embedding_consensus_backward_fake(grad_ep: torch.Tensor, grad_ea: torch.Tensor, emb: torch.Tensor,
                                       norms: torch.Tensor, reduction: int) -> torch.Tensor:
    _check_one_device("embedding_consensus_backward", emb=emb, grad_ep=grad_ep, grad_ea=grad_ea, norms=norms)
    return torch.empty_like(emb, memory_format=torch.contiguous_format)


def _embedding_consensus_fused(e: torch.Tensor, reduction: int) -> Tuple[torch.Tensor, torch.Tensor]:
    ep, ea, _ = _op("embedding_consensus")(e, reduction)
    return ep, ea


# ---------------------------------------------------------------------------------------------
# Triplets within and across branches: branch_triplet
# ---------------------------------------------------------------------------------------------


def _branch_triplet_fused(e: torch.Tensor, labels: torch.Tensor, margin: float, soft_margin: bool,
                          reduction: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pass of torch.ops.ksl_ops.branch_triplet; the winners' indices and squared distances stay
    internal (saved for the backward by the op's C++ autograd)."""
    self_loss, cross_loss, *_ = _op("branch_triplet")(e, labels, margin, soft_margin, reduction)
    return self_loss, cross_loss


def _branch_triplet_fake(emb: torch.Tensor, labels: torch.Tensor, margin: float, soft_margin: bool,
                         reduction: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_one_device("branch_triplet", emb=emb, labels=labels)
    B, N = emb.shape[0], emb.shape[1]
    self_loss, cross_loss = _loss_shapes(emb, reduction, (B, N), (B, B, N))
    pos_idx = emb.new_empty((B, B, N), dtype=torch.int32)
    hard_sq = emb.new_empty((2, B, B, N), dtype=_acc_dtype(emb.dtype))
    return self_loss, cross_loss, pos_idx, torch.empty_like(pos_idx), hard_sq


def _branch_triplet_backward_fake(grad_self: torch.Tensor, grad_cross: torch.Tensor, emb: torch.Tensor,
                                  pos_idx: torch.Tensor, neg_idx: torch.Tensor, hard_sq: torch.Tensor, margin: float,
                                  soft_margin: bool, reduction: int) -> torch.Tensor:
    _check_one_device("branch_triplet_backward", emb=emb, pos_idx=pos_idx, neg_idx=neg_idx, hard_sq=hard_sq,
                      grad_self=grad_self, grad_cross=grad_cross)
    return torch.empty_like(emb, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels, registered once the extension has loaded (it defines the operators); without
# it only backend="reference" works and there is nothing to register.
# ---------------------------------------------------------------------------------------------

_FAKE_KERNELS = {
    "prob_consensus": _prob_consensus_fake,
    "prob_consensus_backward": _prob_consensus_backward_fake,
    "prob_consensus_backward_saved": _prob_consensus_backward_saved_fake,
    "embedding_consensus": _embedding_consensus_fake,
    "embedding_consensus_backward": _embedding_consensus_backward_fake,
    "branch_triplet": _branch_triplet_fake,
    "branch_triplet_backward": _branch_triplet_backward_fake,
}

if _ext.available():
    for _name, _fake in _FAKE_KERNELS.items():
        torch.library.register_fake(f"ksl_ops::{_name}")(_fake)


# ---------------------------------------------------------------------------------------------
# Public API (docs/design.md §4)
# ---------------------------------------------------------------------------------------------


def prob_consensus(logits: TensorOrBranches, temperature: float = 1.0, detach_target: bool = True,
                   reduction: Reduction = "mean", backend: Backend = "fused") -> Tuple[torch.Tensor, torch.Tensor]:
    """KSL-P (eq. 3-6): returns (pp, pa).

    pp = (1/N) Σ_n Σ_{u≠v} KL(p^u_n || p^v_n); pa = (1/N) Σ_n Σ_b KL(a^b_n || p^b_n) with a^b the
    average of the other branches' probabilities; p^b = softmax(logits^b / temperature); both times
    temperature². With detach_target the targets (p^u, a^b) carry no gradient.
    logits: [B, N, K] or a list of B tensors [N, K]. reduction: "mean" | "sum" | "none" (pp [B, B, N],
    pa [B, N]).
    """
    z = _stack_branches(logits, "logits", "[B, N, K]")
    temperature = _check_positive_number(temperature, "temperature")
    code = _reduction_code(reduction)
    if _check_backend(backend) == "reference":
        return _reference().prob_consensus(z, temperature, bool(detach_target), reduction)
    return _prob_consensus_fused(z, temperature, bool(detach_target), code)


def embedding_consensus(embeddings: TensorOrBranches, reduction: Reduction = "mean",
                        backend: Backend = "fused") -> Tuple[torch.Tensor, torch.Tensor]:
    """KSL-E (eq. 7-10): returns (ep, ea).

    ep = (1/N) Σ_n Σ_{u<v} ||e^u_n − e^v_n||₂; ea = (1/N) Σ_n Σ_b ||m^b_n − e^b_n||₂ with m^b the
    average of the other branches' embeddings. embeddings: [B, N, L] or a list of B tensors [N, L].
    reduction: "mean" | "sum" | "none" (ep [B, B, N] filled for u < v, ea [B, N]).
    """
    e = _stack_branches(embeddings, "embeddings", "[B, N, L]")
    code = _reduction_code(reduction)
    if _check_backend(backend) == "reference":
        return _reference().embedding_consensus(e, reduction)
    return _embedding_consensus_fused(e, code)


def branch_triplet(embeddings: TensorOrBranches, labels: torch.Tensor, margin: Optional[float] = 0.3,
                   reduction: Reduction = "mean", backend: Backend = "fused",
                   process_group: Optional[ProcessGroup] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard triplets within each branch (L_aux_t, eq. 2) and across branches (KSL-H, eq. 11):
    returns (aux_t, ksl_h).

    For branches (u, v) and anchor m of branch u, d⁺ is the largest distance to a same-identity sample
    n ≠ m of branch v and d⁻ the smallest to another identity; the term is [d⁺ − d⁻ + margin]₊, or
    log(1 + exp(d⁺ − d⁻)) with margin=None. aux_t sums u = v over branches, ksl_h sums u ≠ v; "mean"
    averages over valid anchors (those with a positive and a negative). reduction "none" gives
    aux_t [B, N] and ksl_h [B, B, N].

    process_group (a torch.distributed group, e.g. dist.group.WORLD): every rank's embeddings and
    labels are gathered (differentiably) and this rank's anchors are mined against the candidates of
    all W ranks. Each rank returns W times its share of the loss of the concatenated batch ("mean"
    divides by the global number of valid anchors), so that DDP's gradient average equals the
    single-process gradient on that batch; "none" returns this rank's anchors' terms. All ranks must
    pass the same shapes. See ksl_ops.distributed.
    """
    e = _stack_branches(embeddings, "embeddings", "[B, N, L]")
    _check_labels(labels, e)
    soft_margin = margin is None
    margin_value = 0.0 if soft_margin else _check_positive_number(margin, "margin", allow_zero=True)
    code = _reduction_code(reduction)
    if process_group is not None:
        from . import distributed

        return distributed.branch_triplet(e, labels, None if soft_margin else margin_value, reduction,
                                          process_group, _triplet_terms_fn(_check_backend(backend)))
    if _check_backend(backend) == "reference":
        return _reference().branch_triplet(e, labels, None if soft_margin else margin_value, reduction)
    return _branch_triplet_fused(e, labels, margin_value, soft_margin, code)


def _triplet_terms_fn(backend: Backend) -> TripletFn:
    """(emb, labels, margin or None, reduction) -> (self, cross) with the chosen backend."""
    if backend == "reference":
        return _reference().branch_triplet
    return lambda e, y, m, r: _branch_triplet_fused(e, y, 0.0 if m is None else m, m is None, _REDUCTIONS[r])
