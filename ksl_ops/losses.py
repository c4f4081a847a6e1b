"""KSLLoss: the whole objective of eq. 1 for a multi-branch network."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (TensorOrBranches, _check_backend, _check_positive_number, _stack_branches,
                         branch_triplet, embedding_consensus, prob_consensus)


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
    """Eq. 1: L_aux + L_ksl_p + L_ksl_e + L_ksl_h, every weight 1 (the paper adds no hyper-parameter).

    - L_aux (eq. 2): per-branch label-smoothed cross-entropy ("ce", summed over branches) and per-branch
      batch-hard triplet ("triplet", from `triplet_start_epoch` on).
    - KSL-P (eq. 3-6): "ksl_pp" + "ksl_pa" when `use_p` (`use_pp` / `use_pa` switch one sub-term).
    - KSL-E (eq. 7-10): "ksl_ep" + "ksl_ea" when `use_e` (`use_ep` / `use_ea` switch one sub-term).
    - KSL-H (eq. 11): "ksl_h" when `use_h`; it is a triplet loss too, so it starts with the per-branch
      triplet at `triplet_start_epoch` (the paper: triplets from the start diverge from scratch).

    Recipe options (the ops compute the equations exactly; these change what they are fed and when):

    - `normalize_e`: feed KSL-E unit-length (L2-normalised) embeddings. On raw embeddings eq. 8-10 can
      be lowered by shrinking every embedding towards 0, and with weight 1 on six distance terms that
      gradient dominates cross-entropy when training from scratch (see the README's KSL recipe
      section for the measurements). Retrieval compares embeddings by cosine distance, so the
      normalised distance is the one that matters at test time.
    - `normalize_triplet`: feed the triplets (per-branch and KSL-H) unit-length embeddings.
    - `consensus_start_epoch`: KSL-P and KSL-E are added from this epoch on (None: from the start,
      as the paper).

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
                 triplet_start_epoch: int = 150, backend: str = "fused", process_group=None, *,
                 use_pp: Optional[bool] = None, use_pa: Optional[bool] = None,
                 use_ep: Optional[bool] = None, use_ea: Optional[bool] = None,
                 normalize_e: bool = False, normalize_triplet: bool = False,
                 consensus_start_epoch: Optional[int] = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if margin is not None:
            _check_positive_number(margin, "margin", allow_zero=True)
        _check_positive_number(temperature, "temperature")
        if consensus_start_epoch is not None and (isinstance(consensus_start_epoch, bool)
                                                  or not isinstance(consensus_start_epoch, int)
                                                  or consensus_start_epoch < 0):
            raise ValueError(f"consensus_start_epoch must be None or an int >= 0, got {consensus_start_epoch!r}")
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
        self.backend = _check_backend(backend)
        self.process_group = process_group

    @property
    def use_p(self) -> bool:
        return self.use_pp or self.use_pa

    @property
    def use_e(self) -> bool:
        return self.use_ep or self.use_ea

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}, margin={self.margin}, "
                f"temperature={self.temperature}, use_pp={self.use_pp}, use_pa={self.use_pa}, "
                f"use_ep={self.use_ep}, use_ea={self.use_ea}, use_h={self.use_h}, "
                f"normalize_e={self.normalize_e}, normalize_triplet={self.normalize_triplet}, "
                f"triplet_start_epoch={self.triplet_start_epoch}, "
                f"consensus_start_epoch={self.consensus_start_epoch}, backend={self.backend!r}")

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
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (N,):
            raise ValueError(f"labels must be an int64 tensor of shape [N] = [{N}], got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")

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
        kw = dict(backend=self.backend)
        if self.triplet_active(epoch):
            et = F.normalize(e, dim=-1) if self.normalize_triplet else e
            group = dict(process_group=self.process_group)
            if B == 1:
                # branch_triplet needs two branches; two copies of one branch give each term twice.
                aux_t, _ = branch_triplet(et.expand(2, N, et.size(2)), labels, self.margin, **kw, **group)
                terms["triplet"] = aux_t / 2
            else:
                aux_t, ksl_h = branch_triplet(et, labels, self.margin, **kw, **group)
                terms["triplet"] = aux_t
                if self.use_h:
                    terms["ksl_h"] = ksl_h
        if B > 1 and self.consensus_active(epoch):
            if self.use_p:
                pp, pa = prob_consensus(z, self.temperature, True, **kw)
                if self.use_pp:
                    terms["ksl_pp"] = pp
                if self.use_pa:
                    terms["ksl_pa"] = pa
            if self.use_e:
                ep, ea = embedding_consensus(F.normalize(e, dim=-1) if self.normalize_e else e, **kw)
                if self.use_ep:
                    terms["ksl_ep"] = ep
                if self.use_ea:
                    terms["ksl_ea"] = ea
        total = torch.stack([t.to(z.dtype) for t in terms.values()]).sum()
        return KSLOutput(total, terms)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types autocast does not know, e.g. meta)."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4.1
    if not (available(device_type) if available is not None else device_type in ("cpu", "cuda")):
        return False
    return torch.is_autocast_enabled(device_type)


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
