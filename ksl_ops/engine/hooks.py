"""Hooks of the training loop: everything around the step that a run can do without, or do otherwise.

A hook subclasses :class:`HookBase` and overrides the events it needs. ``Trainer(cfg)`` registers
:func:`default_hooks` (what ``ksl train`` does); ``Trainer(cfg, hooks=[...])`` runs exactly the
hooks given, and ``trainer.register_hooks`` / ``trainer.remove_hooks`` add or take away hooks before
``fit``. docs/training-hooks.md is the user's guide.

Events, in the order they fire (``Trainer.fit``)::

    before_train
    for each epoch:
        before_epoch          RNG seeded from (seed, epoch), trainer.loader ready, trainer.record started
        for each step:
            before_step       trainer.batch holds the batch (a hook may replace its labels)
            (the step: forward, loss, backward, optimizer step)
            after_step        trainer.step_output holds the loss and the network outputs
        record_epoch          the epoch's steps are done: add entries to trainer.record (this process's)
        after_epoch           trainer.record is the run's record (averaged over processes), in
                              trainer.history: evaluate, log, save
    after_train               the schedule is complete (not after stop_after ends a run early)

At every event the hooks run in the order of ``trainer.hooks``, which is the order they were given
or registered in. The default order matters in two places: evaluation comes before the epoch's log
line and the checkpoint, so that both hold the epoch's R1/mAP; and the checkpoint comes before
metrics.json, so that metrics.json never runs ahead of the checkpoint a resume would start from.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import torch

from .diagnostics import head_bn_variance, step_diagnostics

if TYPE_CHECKING:
    from .config import TrainConfig
    from .trainer import Trainer

__all__ = ["HookBase", "LRSchedule", "LabelNoise", "NaNGuard", "Diagnostics", "Evaluation", "Progress",
           "Checkpoint", "Metrics",
           "default_hooks", "progress_bars_enabled"]


class HookBase:
    """A training hook: override any of the events; each one here does nothing.

    ``self.trainer`` is the Trainer the hook is registered with (set by ``Trainer.register_hooks``);
    the state a hook reads or changes lives there (see the Trainer's docstring): ``cfg``, ``model``,
    ``optimizer``, ``scheduler``, ``epoch``, ``iter``, ``iters``, ``batch``, ``step_output``,
    ``record``, ``history``, ``final``, ``dist``, ``log``, ``output_dir``.
    """

    trainer: "Trainer"

    def before_train(self) -> None:
        """Once, at the start of ``fit`` (after a resume has restored the trainer's state)."""

    def before_epoch(self) -> None:
        """At the start of an epoch, before its first step."""

    def before_step(self) -> None:
        """Before each step; ``trainer.batch`` is the batch the step will train on."""

    def after_step(self) -> None:
        """After each step; ``trainer.step_output`` is what the step computed."""

    def record_epoch(self) -> None:
        """After the epoch's last step: add per-epoch entries to ``trainer.record``."""

    def after_epoch(self) -> None:
        """After the epoch's record is complete and appended to ``trainer.history``."""

    def after_train(self) -> None:
        """Once, when every epoch of the schedule has run (``fit`` then returns)."""


# ---------------------------------------------------------------------------------------------
# the default hooks
# ---------------------------------------------------------------------------------------------

class LRSchedule(HookBase):
    """Steps ``trainer.scheduler`` (warm-up + cosine, WarmupCosineLR) at the fractional epoch
    ``epoch + iter / iters`` before every step, and to ``epoch + 1`` when the epoch ends, so the
    schedule does not depend on how many steps an epoch has."""

    def before_step(self) -> None:
        t = self.trainer
        t.scheduler.step(t.epoch + t.iter / t.iters)

    def record_epoch(self) -> None:
        t = self.trainer
        t.scheduler.step(t.epoch + 1)


class LabelNoise(HookBase):
    """Gives a share ``fraction`` of the training images a wrong identity, drawn anew every epoch
    (the paper's Figure 6 robustness study).

    The wrong labels of an epoch depend only on (run seed, epoch) (:meth:`labels`), so every row of
    a paired comparison, every process of a distributed run and a resumed run see the same ones. The
    dataset and the loader are left as they are -- the sampler keeps grouping images by their true
    identity, as when an annotator mislabels an image -- and only the labels of each batch change,
    looked up by the index of each image in ``trainer.dataset.train``. The realised share is the
    epoch record's ``label_noise``.
    """

    def __init__(self, fraction: float):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0.0 <= float(fraction) < 1.0:
            raise ValueError(f"LabelNoise: fraction must be a number in [0, 1), got {fraction!r}")
        self.fraction = float(fraction)
        self.table: Optional[torch.Tensor] = None  # the current epoch's label of every training image

    def labels(self, epoch: int) -> List[int]:
        """The label of every training image (in ``trainer.dataset.train`` order) at ``epoch``."""
        from ..data.label_noise import noisy_labels
        from .trainer import _epoch_seed

        t = self.trainer
        return noisy_labels([pid for _, pid, _ in t.dataset.train], t.num_classes, self.fraction,
                            seed=_epoch_seed(t.cfg.seed, epoch) ^ 0x5EED)

    def before_epoch(self) -> None:
        t = self.trainer
        noisy = self.labels(t.epoch)
        clean = t.dataset.train
        self.table = torch.tensor(noisy, dtype=torch.int64)
        t.record["label_noise"] = sum(y != pid for y, (_, pid, _) in zip(noisy, clean)) / max(len(clean), 1)

    def before_step(self) -> None:
        batch = self.trainer.batch
        assert self.table is not None and batch is not None
        batch.labels = self.table[batch.indices].to(batch.labels.device, non_blocking=True)

    def after_train(self) -> None:
        self.table = None


class NaNGuard(HookBase):
    """Stops the run with FloatingPointError when the loss is not finite. Checked every ``every``
    steps and at an epoch's last step, not at every step: the check is a host sync on a GPU. The
    checkpoints of the epochs before it stay."""

    def __init__(self, every: int = 10):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"NaNGuard: every must be an integer >= 1, got {every!r}")
        self.every = every

    def after_step(self) -> None:
        t = self.trainer
        out = t.step_output
        assert out is not None
        if (t.iter % self.every == 0 or t.iter == t.iters - 1) and not bool(torch.isfinite(out.loss.total.detach())):
            raise FloatingPointError(
                f"the loss became {float(out.loss.total.detach())} at epoch {t.epoch + 1}, iteration {t.iter + 1} "
                f"(parts: {out.loss.parts}); lower --lr (now {t.cfg.lr}) or check the data")


class Diagnostics(HookBase):
    """The epoch record's ``diag``: per-step diagnostics averaged over the epoch (per-branch CE,
    embedding norms, active triplets; :func:`step_diagnostics`) when ``per_step``, and always the head
    BatchNorm variances at the end of the epoch (:func:`head_bn_variance`)."""

    def __init__(self, per_step: bool = True):
        self.per_step = bool(per_step)
        self._sums: Dict[str, Any] = {}
        self._counts: Dict[str, int] = {}

    def before_epoch(self) -> None:
        self._sums, self._counts = {}, {}

    def after_step(self) -> None:
        if not self.per_step:
            return
        t = self.trainer
        out, batch = t.step_output, t.batch
        assert out is not None and batch is not None
        diag = step_diagnostics(out.logits, out.embeddings, batch.labels, t.criterion, t.epoch)
        for name, value in diag.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def record_epoch(self) -> None:
        diag = {k: float(v) / self._counts[k] for k, v in self._sums.items()}
        diag.update(head_bn_variance(self.trainer.model))
        self.trainer.record["diag"] = diag


class Evaluation(HookBase):
    """Evaluates the main branch (``trainer.evaluate``: single-query CMC/mAP, re-ranking if the
    config asks) after the last epoch and, with ``every`` > 0, after every ``every``-th epoch, into
    the epoch record's ``eval``; the last epoch's result is ``trainer.final``. A run resumed after
    its last epoch is evaluated at the end. Rank 0 alone evaluates."""

    def __init__(self, every: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"Evaluation: every must be an integer >= 0, got {every!r}")
        self.every = every

    def after_epoch(self) -> None:
        t = self.trainer
        last = t.epoch + 1 == t.cfg.epochs
        if t.dist.is_main and (last or (self.every and (t.epoch + 1) % self.every == 0)):
            t.record["eval"] = t.evaluate()
            if last:
                t.final = t.record["eval"]

    def after_train(self) -> None:
        t = self.trainer
        if t.final is None and t.dist.is_main:
            t.final = t.evaluate()


def progress_bars_enabled(mode: str) -> bool:
    """Whether ``--progress mode`` ("on", "off", "auto") draws bars: auto draws them only for a person
    watching a terminal, not in CI logs or pipes."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress(HookBase):
    """A tqdm bar per epoch with the running mean of each loss part (when ``bars`` is true; None: on a
    terminal outside CI; rank 0 only), and the epoch's line in the log (losses, learning rate,
    images/s, share of the step spent in the losses, R1/mAP when evaluated)."""

    def __init__(self, bars: Optional[bool] = None):
        self.bars = progress_bars_enabled("auto") if bars is None else bool(bars)
        self._bar: Any = None

    def before_epoch(self) -> None:
        t = self.trainer
        if self.bars and t.dist.is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=t.iters, desc=f"epoch {t.epoch + 1}/{t.cfg.epochs}", leave=False,
                             dynamic_ncols=True)

    def after_step(self) -> None:
        if self._bar is None:
            return
        t = self.trainer
        self._bar.update(1)
        if t.iter % 5 == 0 or t.iter == t.iters - 1:
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in t.running_loss().items()}, refresh=False)

    def record_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def after_epoch(self) -> None:
        t = self.trainer
        t.log(self.epoch_line(t.record))

    def epoch_line(self, r: Dict[str, Any]) -> str:
        """The log line of an epoch record."""
        parts = " ".join(f"{k}={v:.3f}" for k, v in r["loss"].items())
        line = (f"epoch {r['epoch']:>3}/{self.trainer.cfg.epochs} | lr {r['lr']:.2e} | {r['sampler']:>6} | "
                f"{parts} | {r['images_per_s']:.0f} img/s | loss share {100 * r['loss_time_share']:.1f}% | "
                f"{r['time_s']:.1f}s")
        if "eval" in r:
            e = r["eval"]
            line += f" | R1 {e['R1']:.1f} R5 {e['R5']:.1f} mAP {e['mAP']:.1f}"
        return line


class Checkpoint(HookBase):
    """Writes ``output_dir/last.ckpt`` (atomically: ``Trainer.save``) after the last epoch, every
    ``every`` epochs, and at the epoch where ``trainer.stop_after`` stops the run; ``Trainer.resume``
    continues from it. Rank 0 alone writes."""

    def __init__(self, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Checkpoint: every must be an integer >= 1, got {every!r}")
        self.every = every

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epoch + 1
        if t.dist.is_main and (done == t.cfg.epochs or done % self.every == 0 or done == t.stop_after):
            t.save(done)


class Metrics(HookBase):
    """Writes ``output_dir/metrics.json`` (config and history) after every epoch, and with the final
    evaluation plus ``curves.png`` (the training curves) at the end. Rank 0 alone writes."""

    def after_epoch(self) -> None:
        if self.trainer.dist.is_main:
            self.write()

    def after_train(self) -> None:
        t = self.trainer
        if not t.dist.is_main:
            return
        self.write(final=t.final)
        try:
            from .plots import plot_training_curves

            cfg = t.cfg
            plot_training_curves(t.history, t.output_dir / t.CURVES,
                                 title=f"{cfg.backbone} / {cfg.losses} / {cfg.height}x{cfg.width}",
                                 num_classes=t.num_classes)
        except Exception as exc:  # a plotting failure must not lose a finished run
            t.log(f"warning: could not write {t.CURVES}: {exc}")

    def write(self, final: Optional[Dict[str, Any]] = None) -> None:
        """Write metrics.json now (atomically), with ``final`` if given."""
        t = self.trainer
        obj: Dict[str, Any] = {"config": t.cfg.to_dict(), "history": t.history}
        if final is not None:
            obj["final"] = final
        _write_json(obj, t.output_dir / t.METRICS)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def default_hooks(cfg: "TrainConfig") -> List[HookBase]:
    """The hooks of ``ksl train`` for a config, in their order: the schedule, label noise (when
    ``cfg.label_noise`` > 0), the NaN guard, diagnostics, evaluation, progress and the epoch line,
    the checkpoint, metrics.json and curves.png."""
    hooks: List[HookBase] = [LRSchedule()]
    if cfg.label_noise:
        hooks.append(LabelNoise(cfg.label_noise))
    hooks += [NaNGuard(), Diagnostics(per_step=cfg.diagnostics), Evaluation(cfg.eval_every),
              Progress(bars=progress_bars_enabled(cfg.progress)), Checkpoint(cfg.checkpoint_every), Metrics()]
    return hooks

