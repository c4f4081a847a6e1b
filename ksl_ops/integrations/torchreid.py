"""KSL inside torchreid: an engine that trains a torchreid model with isomorphic branches and KSLLoss.

    import torchreid
    from ksl_ops import KSLLoss
    from ksl_ops.models import with_isomorphic_branches
    from ksl_ops.integrations.torchreid import ImageKSLEngine

    dm = torchreid.data.ImageDataManager(root=..., sources="market1501", height=256, width=128,
                                         batch_size_train=64, train_sampler="RandomIdentitySampler")
    model = torchreid.models.build_model("osnet_x1_0", dm.num_train_pids, loss="triplet")
    net = with_isomorphic_branches(model, taps=["conv3", "conv4"], init="copy",
                                   example_input=torch.randn(2, 3, 256, 128))
    optimizer = torchreid.optim.build_optimizer(net, optim="adam", lr=3e-4)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="cosine", max_epoch=60)
    engine = ImageKSLEngine(dm, net, optimizer, scheduler=scheduler)
    engine.run(save_dir="log/osnet-ksl", max_epoch=60, normalize_feature=True)
    engine.results   # {"market1501": {"rank1": ..., "mAP": ..., "epoch": ...}}

Everything but the step is torchreid's own: its data manager and samplers, optimizer, scheduler,
``run()`` loop, logging and ``test()`` (the branches' eval forward is the main branch alone, so
torchreid's feature extraction and ranking see the plain model). Both package layouts work: the
registry's ``torchreid`` 0.2.5 (modules under ``torchreid.reid``) and upstream's (``torchreid.engine``).
torchreid is imported when :class:`ImageKSLEngine` is first used, not when ``ksl_ops`` is.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

import torch

from .._typing import Backend

if TYPE_CHECKING:
    from ..losses import KSLLoss

# ImageKSLEngine is built by the module __getattr__ on first use (it subclasses torchreid's Engine).
__all__ = ["ImageKSLEngine", "torchreid_module"]  # noqa: F822

_CLASS: Optional[type] = None


def torchreid_module(name: str) -> ModuleType:
    """``torchreid.<name>`` in upstream's layout or ``torchreid.reid.<name>`` in the registry's 0.2.5."""
    errors = []
    for prefix in ("torchreid.reid.", "torchreid."):
        try:
            return importlib.import_module(prefix + name)
        except ImportError as exc:
            errors.append(f"{prefix}{name}: {exc}")
    raise ImportError("ksl_ops.integrations.torchreid needs torchreid (pip install torchreid, with a "
                      "torchvision that matches your torch); " + "; ".join(errors))


def default_loss(num_classes: int, backend: Optional[Backend] = None) -> KSLLoss:
    """The KSL objective the engine uses when none is given: every term from the first step (as
    torchreid's triplet engine runs its triplet), with the project's recipe (KSL-E and the triplets
    on L2-normalised embeddings). Pass your own :class:`ksl_ops.KSLLoss` for a from-scratch schedule
    (``triplet_start_epoch``, ``consensus_start_epoch``) or the paper's literal recipe."""
    from .. import KSLLoss, _ext

    return KSLLoss(num_classes, backend=backend or ("fused" if _ext.available() else "reference"),
                   normalize_e=True, normalize_triplet=True, triplet_start_epoch=0, consensus_start_epoch=None)


def _build_class() -> type:
    engine_mod = torchreid_module("engine")
    metrics = torchreid_module("metrics")
    Engine: Any = engine_mod.Engine

    class ImageKSLEngine(Engine):
        """torchreid ``Engine`` whose step is one KSL step (eq. 1) over every branch of ``model``.

        Args:
            datamanager: a torchreid ``ImageDataManager``.
            model: a torchreid model built with ``loss="triplet"`` and wrapped by
                :func:`ksl_ops.models.with_isomorphic_branches` (train forward: a list of
                ``(logits, embedding)`` per branch, main first). An unwrapped model (``(logits, emb)``)
                trains as B = 1: cross-entropy + triplet only.
            optimizer, scheduler: torchreid's (``torchreid.optim``) or any torch ones; the scheduler is
                stepped once per epoch by torchreid's ``train()``.
            loss: a :class:`ksl_ops.KSLLoss` (default :func:`default_loss`). Its epoch-dependent terms
                follow torchreid's ``self.epoch`` (0-based).
            pk_loader: optional second training loader (e.g. with torchreid's ``RandomIdentitySampler``)
                used from epoch ``pk_start_epoch`` on (default: the loss's ``triplet_start_epoch``); the
                data manager's loader is used before. This is the paper's schedule: random batches for
                cross-entropy alone, P x K batches once the triplets start.
            use_gpu: as torchreid's engines (moves each batch to CUDA when available; the model's
                placement is yours).

        After ``test()`` (also run by ``run()`` at the end), ``self.results[dataset]`` holds torchreid's
        Rank-1 and mAP (fractions) and the epoch they were measured at.
        """

        def __init__(self, datamanager: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any = None, loss: Optional[KSLLoss] = None, use_gpu: bool = True,
                     pk_loader: Optional[Iterable[Any]] = None, pk_start_epoch: Optional[int] = None) -> None:
            super().__init__(datamanager, use_gpu)
            self.model = model
            self.optimizer = optimizer
            self.scheduler = scheduler
            self.register_model("model", model, optimizer, scheduler)
            self.criterion = loss if loss is not None else default_loss(datamanager.num_train_pids)
            self.first_loader = self.train_loader
            self.pk_loader = pk_loader
            self.pk_start_epoch = (pk_start_epoch if pk_start_epoch is not None
                                   else getattr(self.criterion, "triplet_start_epoch", 0))
            self.results: Dict[str, Dict[str, Any]] = {}

        def train(self, *args: Any, **kwargs: Any) -> Any:
            use_pk = self.pk_loader is not None and self.epoch >= self.pk_start_epoch
            self.train_loader: Any = self.pk_loader if use_pk else self.first_loader
            return super().train(*args, **kwargs)

        def branch_outputs(self, imgs: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
            """[(logits, embedding)] * B from the model's train forward."""
            outs = self.model(imgs)
            if isinstance(outs, tuple) and len(outs) == 2 and all(isinstance(t, torch.Tensor) for t in outs):
                return [outs]
            if not isinstance(outs, list):
                raise TypeError(
                    f"ImageKSLEngine needs the model's train forward to return a list of (logits, embedding) "
                    f"per branch (ksl_ops.models.with_isomorphic_branches) or one (logits, embedding) pair "
                    f"(a torchreid model built with loss='triplet'); got {type(outs).__name__}")
            return outs

        def forward_backward(self, data: Any) -> Dict[str, float]:
            imgs, pids = self.parse_data_for_train(data)
            if self.use_gpu:
                imgs, pids = imgs.cuda(), pids.cuda()
            outs = self.branch_outputs(imgs)
            out = self.criterion([o[0] for o in outs], [o[1] for o in outs], pids.long(), epoch=self.epoch)
            self.optimizer.zero_grad()
            out.total.backward()
            self.optimizer.step()
            summary = {"loss": float(out.total.detach())}
            summary.update({f"loss_{k}": v for k, v in out.parts.items()})
            summary["acc"] = metrics.accuracy(outs[0][0].detach(), pids)[0].item()
            return summary

        def _evaluate(self, dataset_name: str = "", *args: Any, **kwargs: Any) -> Tuple[float, float]:
            rank1, mAP = super()._evaluate(dataset_name, *args, **kwargs)
            self.results[dataset_name] = {"rank1": float(rank1), "mAP": float(mAP), "epoch": int(self.epoch)}
            return rank1, mAP

    ImageKSLEngine.__module__ = __name__
    return ImageKSLEngine


def __getattr__(name: str) -> Any:
    global _CLASS
    if name == "ImageKSLEngine":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
