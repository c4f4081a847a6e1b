"""KSLLoss: the whole objective of eq. 1 for a multi-branch network; module forms of the ops
(ProbConsensusLoss, EmbeddingConsensusLoss, BranchTripletLoss) and BatchHardTripletLoss, a fused
drop-in for torchreid's TripletLoss."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._typing import Backend, Recipe, Reduction
from .functional import (
    TensorOrBranches,
    _check_backend,
    _check_positive_number,
    _reduction_code,
    _stack_branches,
    branch_triplet,
    embedding_consensus,
    prob_consensus,
)
from .recipes import DEFAULT_RECIPE, check_recipe, recipe_value

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass
class KSLOutput:
    """`total` is the scalar to backpropagate; `terms` holds each named part as a 0-d tensor.

    `parts` converts the terms to Python floats on access (one device sync), so a training step that
    does not read them stays sync-free and traceable by torch.compile.
    """

    total: torch.Tensor
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def parts(self) -> Dict[str, float]:
        return {name: float(value.detach()) for name, value in self.terms.items()}


class KSLLoss(nn.Module):
    """Eq. 1: L_aux + L_ksl_p + L_ksl_e + L_ksl_h, every weight 1 as in the paper unless `weight_e` is set.

    - L_aux (eq. 2): per-branch label-smoothed cross-entropy ("ce", summed over branches) and per-branch
      batch-hard triplet ("triplet", from `triplet_start_epoch` on).
    - KSL-P (eq. 3-6): "ksl_pp" + "ksl_pa" when `use_p` (`use_pp` / `use_pa` switch one sub-term).
    - KSL-E (eq. 7-10): "ksl_ep" + "ksl_ea" when `use_e` (`use_ep` / `use_ea` switch one sub-term).
    - KSL-H (eq. 11): "ksl_h" when `use_h`; it is a triplet loss too, so it starts with the per-branch
      triplet at `triplet_start_epoch` (the paper: triplets from the start diverge from scratch).

    Recipe (the ops compute the equations exactly; a recipe changes what they are fed and when; the
    table is ksl_ops.recipes.RECIPES, shared with `ksl train`):

    - `recipe="ksl-ops"` (default, the recipe of `ksl train`): KSL-E and the triplets on L2-normalised
      embeddings, KSL-P/KSL-E from `triplet_start_epoch` on (with the triplets).
    - `recipe="paper"`: the paper's text taken literally: raw embeddings, every consensus term from
      the first epoch. From scratch this collapses training (docs/recipe.md).

    Each option below overrides the recipe when given (None: the recipe's value):

    - `normalize_e`: feed KSL-E unit-length (L2-normalised) embeddings. On raw embeddings eq. 8-10 can
      be lowered by shrinking every embedding towards 0, and with weight 1 on six distance terms that
      gradient dominates cross-entropy when training from scratch (docs/recipe.md has the
      measurements). Retrieval compares embeddings by cosine distance, so the
      normalised distance is the one that matters at test time.
    - `normalize_triplet`: feed the triplets (per-branch and KSL-H) unit-length embeddings.
    - `consensus_start_epoch`: KSL-P and KSL-E are added from this 0-based epoch on; "triplet" means
      `triplet_start_epoch`; 0 means from the start (as the paper; the "paper" recipe's value None
      means the same). The resolved epoch (or None) is the attribute `consensus_start_epoch`.
    - `weight_e`: KSL-E's two terms enter `total` multiplied by this (>= 0); `terms` keeps their
      unweighted values, the equations' own. On unit vectors a distance is at most 2, so the
      normalised terms pull on the trunk about 19 times less than the raw ones at the consensus
      start; weighting them back to that share (19) measured worse on the synthetic set, so both
      recipes keep 1 (docs/recipe.md, "KSL-E: why it does not help here").

    Inputs: logits [B, N, K] (or a list of B tensors [N, K]), embeddings [B, N, L] (or a list), labels
    int64 [N]. With a single branch (B = 1, the paper's baseline) only "ce" and "triplet" apply.
    `epoch=None` switches every term on.

    Several processes: with `process_group` (e.g. dist.group.WORLD) the triplet terms mine each rank's
    anchors against the samples of every rank (ksl_ops.distributed). Every term follows one
    convention: each rank returns W times its share of the loss of the concatenated batch, so DDP's
    gradient average is the single-process gradient and the mean over ranks of `total` is the
    single-process loss. For the per-sample terms (CE, KSL-P, KSL-E) that share is the local mean,
    given the same N on every rank; only the triplets need the gather.

    Mixed precision (docs/mixed-precision.md). Under ``torch.autocast`` for the inputs' device (the
    way a training step runs with ``ksl train --amp``) every term is computed in float32: float16 /
    bfloat16 logits and embeddings are cast to float32 (a differentiable cast, so their gradients
    come back in their own dtype), autocast is switched off for the body of the loss, and every
    entry of ``terms`` and ``total`` is float32. float32 and float64 inputs are used as they are.
    The reasons: the consensus terms are small differences of nearly equal quantities (KL between
    close distributions, distances between close embeddings), which the 8 significant bits of
    bfloat16 round off; the two backends then compute the same float32 maths (autocast would otherwise
    recast the reference's operators, not the fused ones'), so they agree as in float32; and a
    float32 total is what a gradient scaler multiplies. The cost is small: the loss inputs are
    [B, N, K] and [B, N, L]. Outside autocast the inputs' dtype is kept: float16 / bfloat16 inputs
    run the fused kernels in that dtype (accumulating in float32) and ``total`` has the logits' dtype.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.1, margin: Optional[float] = 0.3,
                 temperature: float = 1.0, use_p: bool = True, use_e: bool = True, use_h: bool = True,
                 triplet_start_epoch: int = 150, backend: Backend = "fused",
                 process_group: Optional[ProcessGroup] = None, *,
                 use_pp: Optional[bool] = None, use_pa: Optional[bool] = None,
                 use_ep: Optional[bool] = None, use_ea: Optional[bool] = None,
                 recipe: Recipe = DEFAULT_RECIPE, normalize_e: Optional[bool] = None,
                 normalize_triplet: Optional[bool] = None,
                 consensus_start_epoch: Optional[Union[int, str]] = None,
                 weight_e: Optional[float] = None) -> None:
        super().__init__()
        self.recipe = check_recipe(recipe)
        weight_e = recipe_value(recipe, "weight_e", weight_e)
        normalize_e = recipe_value(recipe, "normalize_e", normalize_e)
        normalize_triplet = recipe_value(recipe, "normalize_triplet", normalize_triplet)
        consensus_start_epoch = recipe_value(recipe, "consensus_start_epoch", consensus_start_epoch)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if margin is not None:
            _check_positive_number(margin, "margin", allow_zero=True)
        _check_positive_number(temperature, "temperature")
        _check_positive_number(weight_e, "weight_e", allow_zero=True)
        if isinstance(consensus_start_epoch, str) and consensus_start_epoch == "triplet":
            consensus_start_epoch = int(triplet_start_epoch)
        if consensus_start_epoch is not None and (isinstance(consensus_start_epoch, bool)
                                                  or not isinstance(consensus_start_epoch, int)
                                                  or consensus_start_epoch < 0):
            raise ValueError(f"consensus_start_epoch must be None, 'triplet' or an int >= 0, "
                             f"got {consensus_start_epoch!r}")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.margin = margin
        self.temperature = float(temperature)
        self.use_pp = bool(use_p if use_pp is None else use_pp)
        self.use_pa = bool(use_p if use_pa is None else use_pa)
        self.use_ep = bool(use_e if use_ep is None else use_ep)
        self.use_ea = bool(use_e if use_ea is None else use_ea)
        self.use_h = bool(use_h)
        self.normalize_e, self.normalize_triplet = bool(normalize_e), bool(normalize_triplet)
        self.triplet_start_epoch = int(triplet_start_epoch)
        self.consensus_start_epoch = consensus_start_epoch
        self.weight_e = float(weight_e)
        self.backend = _check_backend(backend)
        self.process_group = process_group

    @property
    def use_p(self) -> bool:
        return self.use_pp or self.use_pa

    @property
    def use_e(self) -> bool:
        return self.use_ep or self.use_ea

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, recipe={self.recipe!r}, label_smoothing={self.label_smoothing}, "
                f"margin={self.margin}, temperature={self.temperature}, use_pp={self.use_pp}, use_pa={self.use_pa}, "
                f"use_ep={self.use_ep}, use_ea={self.use_ea}, use_h={self.use_h}, "
                f"normalize_e={self.normalize_e}, normalize_triplet={self.normalize_triplet}, "
                f"triplet_start_epoch={self.triplet_start_epoch}, "
                f"consensus_start_epoch={self.consensus_start_epoch}, weight_e={self.weight_e}, "
                f"backend={self.backend!r}")

    def triplet_active(self, epoch: Optional[int]) -> bool:
        return epoch is None or epoch >= self.triplet_start_epoch

    def consensus_active(self, epoch: Optional[int]) -> bool:
        return epoch is None or self.consensus_start_epoch is None or epoch >= self.consensus_start_epoch

    def forward(self, logits: TensorOrBranches, embeddings: TensorOrBranches, labels: torch.Tensor,
                epoch: Optional[int] = None) -> KSLOutput:
        z = _as_branches(logits, "logits")
        e = _as_branches(embeddings, "embeddings")
        B, N, K = z.shape
        if K != self.num_classes:
            raise ValueError(f"logits must have num_classes={self.num_classes} classes in the last dim, got {K}")
        if e.shape[:2] != (B, N):
            raise ValueError(f"embeddings must be [B, N, L] with B={B}, N={N} as logits, got {tuple(e.shape)}")
        _check_labels(labels, N, "labels")

        device_type = z.device.type
        if _autocast_enabled(device_type):
            # The autocast contract (class docstring): float32 terms, whatever autocast would choose.
            with torch.autocast(device_type, enabled=False):
                return self._terms(_upcast(z), _upcast(e), labels, epoch)
        return self._terms(z, e, labels, epoch)

    def _terms(self, z: torch.Tensor, e: torch.Tensor, labels: torch.Tensor, epoch: Optional[int]) -> KSLOutput:
        B, N, K = z.shape
        terms: Dict[str, torch.Tensor] = {}
        # Σ_b mean_n CE(z^b_n, y_n) as one call over the B·N rows.
        terms["ce"] = B * F.cross_entropy(z.reshape(B * N, K), labels.repeat(B),
                                          label_smoothing=self.label_smoothing)
        if self.triplet_active(epoch):
            et = F.normalize(e, dim=-1) if self.normalize_triplet else e
            if B == 1:
                # branch_triplet needs two branches; two copies of one branch give each term twice.
                aux_t, _ = branch_triplet(et.expand(2, N, et.size(2)), labels, self.margin, backend=self.backend,
                                          process_group=self.process_group)
                terms["triplet"] = aux_t / 2
            else:
                aux_t, ksl_h = branch_triplet(et, labels, self.margin, backend=self.backend,
                                              process_group=self.process_group)
                terms["triplet"] = aux_t
                if self.use_h:
                    terms["ksl_h"] = ksl_h
        if B > 1 and self.consensus_active(epoch):
            if self.use_p:
                pp, pa = prob_consensus(z, self.temperature, True, backend=self.backend)
                if self.use_pp:
                    terms["ksl_pp"] = pp
                if self.use_pa:
                    terms["ksl_pa"] = pa
            if self.use_e:
                ep, ea = embedding_consensus(F.normalize(e, dim=-1) if self.normalize_e else e, backend=self.backend)
                if self.use_ep:
                    terms["ksl_ep"] = ep
                if self.use_ea:
                    terms["ksl_ea"] = ea
        # Every term enters the total with weight 1 but KSL-E's two, which take weight_e.
        total = torch.stack([t.to(z.dtype) * self.weight_e if name in _KSL_E_TERMS else t.to(z.dtype)
                             for name, t in terms.items()]).sum()
        return KSLOutput(total, terms)


_KSL_E_TERMS = ("ksl_ep", "ksl_ea")


def _check_labels(labels: object, n: int, name: str) -> None:
    """ValueError naming `name` unless `labels` is an int64 tensor of shape [n]."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
        raise ValueError(f"{name} must be an int64 tensor of shape [N] = [{n}], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


# Device types with an autocast mode, listed rather than asked for: torch.amp.is_autocast_available
# cannot be traced by torch.compile(fullgraph=True) on torch 2.11.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types autocast does not know, e.g. meta)."""
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 (differentiable); other dtypes unchanged."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _as_branches(x: TensorOrBranches, name: str) -> torch.Tensor:
    """Like functional._stack_branches but also accepts a single branch (B = 1): [N, D] or [1, N, D]."""
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        x = x.unsqueeze(0)
    if isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], torch.Tensor):
        x = x[0].unsqueeze(0)
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.size(0) == 1:
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        return x
    return _stack_branches(x, name, "[B, N, D]")


# ---------------------------------------------------------------------------------------------
# Module forms of the ops, with the call conventions of Re-ID code
# ---------------------------------------------------------------------------------------------


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on one branch: `loss = crit(inputs, targets)`.

    A drop-in for torchreid's `TripletLoss(margin)`: same call (`inputs` [N, L] features, `targets`
    int64 [N] identities), same value and gradient. For every anchor m, d⁺ is the largest Euclidean
    distance to a sample of the same identity *including m itself* and d⁻ the smallest to another
    identity; distances are sqrt(max(‖a − b‖², 1e-12)); the loss is mean over all N anchors of
    max(0, d⁺ − d⁻ + margin). So an anchor whose identity has no other sample in the batch still
    counts: its d⁺ is its distance to itself, 1e-6 (the clamp), and it pushes its nearest negative
    beyond the margin, exactly as torchreid's loss does.

    It runs the fused `branch_triplet` op, which mines d⁺ only over samples n ≠ m and leaves anchors
    without such a positive out of the mean. To get torchreid's semantics from it, the batch is fed
    twice ([x; x], labels [y; y]): each anchor's copy is a positive at distance 1e-6, every other
    candidate appears twice at the same distance (same hardest positive and negative), and each
    original and its copy have the same term, so the op's mean over the 2N anchors is torchreid's mean
    over N and the gradient through both copies sums onto x. No host synchronisation.

    Differences from torchreid's `TripletLoss`:

    - A batch with a single identity (no anchor has a negative) gives 0 with zero gradient, where
      torchreid raises a RuntimeError (a reduction over an empty tensor).
    - Distances are computed as ‖a − b‖² from the differences, torchreid's as ‖a‖² + ‖b‖² − 2a·b.
      They agree to rounding (relative 1e-12 in float64), except where torchreid's cancellation error
      exceeds its own 1e-12 clamp: in float32 its distance of an anchor to itself can be up to
      ~sqrt(1e-7)·‖x‖ instead of 1e-6, which changes the term of an anchor without another positive.

    Options beyond torchreid's: `margin=None` is the soft margin log(1 + exp(d⁺ − d⁻));
    `normalize=True` mines on L2-normalised features (the "ksl-ops" recipe's `normalize_triplet`);
    `process_group` (e.g. dist.group.WORLD) mines each rank's anchors against the samples of every
    rank, with KSLLoss's convention (each rank returns W times its share of the loss of the
    concatenated batch, so DDP's gradient average is the single-process gradient; the mean is over
    all anchors of all ranks); `reduction` "mean" (torchreid's), "sum" or "none" ([N] per-anchor
    terms); `backend="reference"` runs the pure-PyTorch reference instead of the fused op.
    """

    def __init__(self, margin: Optional[float] = 0.3, *, normalize: bool = False, reduction: Reduction = "mean",
                 process_group: Optional[ProcessGroup] = None, backend: Backend = "fused") -> None:
        super().__init__()
        if margin is not None:
            margin = _check_positive_number(margin, "margin", allow_zero=True)
        _reduction_code(reduction)
        self.margin = margin
        self.normalize = bool(normalize)
        self.reduction = reduction
        self.process_group = process_group
        self.backend = _check_backend(backend)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}" + (", process_group=set" if self.process_group is not None else ""))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
            raise ValueError("inputs must be a [N, L] feature tensor (one row per sample), got "
                             + (f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor)
                                else type(inputs).__name__))
        if not inputs.is_floating_point():
            raise TypeError(f"inputs must be a floating tensor, got {inputs.dtype}")
        n = inputs.size(0)
        _check_labels(targets, n, "targets")
        x = F.normalize(inputs, dim=1) if self.normalize else inputs
        x2 = torch.cat([x, x])
        y2 = torch.cat([targets, targets])
        # branch_triplet needs B >= 2: two views of the one branch; the self term then counts twice.
        e = x2.unsqueeze(0).expand(2, 2 * n, x2.size(1))
        if self.reduction == "none":
            self_t, _ = branch_triplet(e, y2, self.margin, "none", self.backend, self.process_group)
            return self_t[0, :n]
        aux_t, _ = branch_triplet(e, y2, self.margin, self.reduction, self.backend, self.process_group)
        # mean: Σ over 2 views of the mean over 2N anchors; sum: 2 views × 2 copies of every term.
        return aux_t / (2 if self.reduction == "mean" else 4)


class ProbConsensusLoss(nn.Module):
    """KSL-P (eq. 3-6) as a module: `pp, pa = ProbConsensusLoss(temperature)(logits)`.

    The options are `ksl_ops.prob_consensus`'s; `forward(logits)` takes logits [B, N, K] (or a list of
    B tensors [N, K]) and returns what the function returns, (pp, pa).
    """

    def __init__(self, temperature: float = 1.0, detach_target: bool = True, reduction: Reduction = "mean",
                 backend: Backend = "fused") -> None:
        super().__init__()
        self.temperature = _check_positive_number(temperature, "temperature")
        self.detach_target = bool(detach_target)
        _reduction_code(reduction)
        self.reduction = reduction
        self.backend = _check_backend(backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, detach_target={self.detach_target}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")

    def forward(self, logits: TensorOrBranches) -> Tuple[torch.Tensor, torch.Tensor]:
        return prob_consensus(logits, self.temperature, self.detach_target, self.reduction, self.backend)


class EmbeddingConsensusLoss(nn.Module):
    """KSL-E (eq. 7-10) as a module: `ep, ea = EmbeddingConsensusLoss()(embeddings)`.

    The options are `ksl_ops.embedding_consensus`'s, plus `normalize` (feed L2-normalised embeddings,
    the "ksl-ops" recipe's `normalize_e`; default False, the equations as written). `forward(embeddings)`
    takes [B, N, L] (or a list of B tensors [N, L]) and returns (ep, ea).
    """

    def __init__(self, reduction: Reduction = "mean", backend: Backend = "fused", *, normalize: bool = False) -> None:
        super().__init__()
        _reduction_code(reduction)
        self.reduction = reduction
        self.backend = _check_backend(backend)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}, normalize={self.normalize}"

    def forward(self, embeddings: TensorOrBranches) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.normalize:
            embeddings = F.normalize(_stack_branches(embeddings, "embeddings", "[B, N, L]"), dim=-1)
        return embedding_consensus(embeddings, self.reduction, self.backend)


class BranchTripletLoss(nn.Module):
    """Batch-hard triplets within (eq. 2) and across branches (KSL-H, eq. 11) as a module:
    `aux_t, ksl_h = BranchTripletLoss(margin)(embeddings, labels)`.

    The options are `ksl_ops.branch_triplet`'s (margin None: soft margin; "mean" over valid anchors),
    plus `normalize` (mine on L2-normalised embeddings, the "ksl-ops" recipe's `normalize_triplet`;
    default False). `forward(embeddings, labels)` takes [B, N, L] (or a list of B tensors [N, L]) and
    int64 labels [N] and returns (aux_t, ksl_h). For one branch in torchreid's convention, see
    `BatchHardTripletLoss`.
    """

    def __init__(self, margin: Optional[float] = 0.3, reduction: Reduction = "mean", backend: Backend = "fused",
                 process_group: Optional[ProcessGroup] = None, *, normalize: bool = False) -> None:
        super().__init__()
        if margin is not None:
            margin = _check_positive_number(margin, "margin", allow_zero=True)
        _reduction_code(reduction)
        self.margin = margin
        self.reduction = reduction
        self.backend = _check_backend(backend)
        self.process_group = process_group
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"normalize={self.normalize}" + (", process_group=set" if self.process_group is not None else ""))

    def forward(self, embeddings: TensorOrBranches, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.normalize:
            embeddings = F.normalize(_stack_branches(embeddings, "embeddings", "[B, N, L]"), dim=-1)
        return branch_triplet(embeddings, labels, self.margin, self.reduction, self.backend, self.process_group)
