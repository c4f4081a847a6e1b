"""The KSL training loop (paper §4.2) with evaluation, checkpoints, metrics and curves.

    cfg = TrainConfig.from_preset("cpu", backbone="cmsnet", losses="ksl")
    trainer = Trainer(cfg)
    result = trainer.fit()          # trains, evaluates, writes output_dir/{last.ckpt,metrics.json,curves.png}

The loop runs the step (`Trainer.run_step`) and, around it, hooks (ksl_ops.engine.hooks,
docs/training-hooks.md): the learning-rate schedule, label noise, the NaN guard, diagnostics,
evaluation, progress, the checkpoint and metrics.json/curves.png are each a hook that
`Trainer(cfg, hooks=...)`, `register_hooks` and `remove_hooks` can leave out, replace or add to.

A step: the network's B branches give (logits, embeddings); KSLLoss turns them into eq. 1; SGD steps.
The loss is differentiated in two phases -- first the loss alone w.r.t. the network outputs, then
the network with those gradients -- which gives exactly the gradients of one backward pass, and lets
the step time spent in the losses (forward + backward) be measured on its own.

Randomness is re-seeded at the start of every epoch from (seed, epoch), so an epoch draws the same
shuffles, augmentations and dropout whether the run was interrupted before it or not: `--resume`
continues exactly (the RNG states are also saved in the checkpoint).

Mixed precision (`cfg.amp`, `ksl train --amp`; docs/mixed-precision.md): the network's forward and
the loss run under torch.autocast in bfloat16 or float16; KSLLoss computes every term in float32
under autocast (its docstring has the contract); the backward runs outside autocast. With float16
a torch.amp.GradScaler scales the loss, skips the steps whose gradients overflow and adapts the
scale; its state is saved in the checkpoint and restored by `--resume`. Evaluation runs in float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np
import torch

from .._typing import Backend, Sampler, StrPath
from .checkpoint import (
    CheckpointError,
    checkpoint_num_classes,
    describe_checkpoint,
    load_checkpoint,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, check_device_name
from .distributed import DistEnv, main_only
from .evaluation import cosine_distance, evaluate_reid, extract_features
from .hooks import HookBase, default_hooks
from .outputs import prepare_output_dir
from .rerank import re_ranking

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

    from ..data.base import ReIDDataset
    from ..losses import KSLOutput

__all__ = ["Trainer", "TrainBatch", "StepOutput", "WarmupCosineLR", "train", "evaluate_checkpoint", "resolve_device",
           "resolve_amp", "AMP_DTYPES", "load_dataset", "build_model", "load_trained_model", "config_from_checkpoint",
           "use_data_root"]


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------

class WarmupCosineLR:
    """Linear warm-up then cosine annealing, evaluated at a *fractional* epoch.

    Stepping with the fractional epoch (epoch + iteration / iterations_this_epoch) makes the curve
    smooth within epochs and independent of how many iterations an epoch has, which changes when
    the P×K sampler takes over. Its state is just the last position, so resuming is exact.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                 min_lr_ratio: float = 0.0):
        self.optimizer = optimizer
        self.epochs = int(epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.min_lr_ratio = float(min_lr_ratio)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.last_epoch = 0.0
        self.step(0.0)

    def factor(self, t: float) -> float:
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            # Start at a small fraction rather than 0 so the first step already moves.
            return max(t / self.warmup_epochs, 0.01)
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(max((t - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, t: float) -> None:
        self.last_epoch = float(t)
        f = self.factor(self.last_epoch)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "warmup_epochs": self.warmup_epochs, "min_lr_ratio": self.min_lr_ratio,
                "base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state_dict(); ValueError (nothing changed) if a value is of the wrong type or range."""
        def number(v: Any, name: str, lo: float = 0.0) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise ValueError(f"scheduler {name} must be a finite number >= {lo:g}, got {v!r}")
            return v

        for name in ("epochs", "warmup_epochs"):
            if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"scheduler {name} must be an integer >= 0, got {state[name]!r}")
        base_lrs = state["base_lrs"]
        if not isinstance(base_lrs, (list, tuple)) or len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"scheduler base_lrs must be a list of {len(self.optimizer.param_groups)} learning "
                             f"rates, got {base_lrs!r}"[:300])
        base_lrs = [number(v, "base_lrs") for v in base_lrs]
        min_lr_ratio = number(state["min_lr_ratio"], "min_lr_ratio")
        last_epoch = number(state["last_epoch"], "last_epoch")
        self.epochs, self.warmup_epochs = state["epochs"], state["warmup_epochs"]
        self.min_lr_ratio, self.base_lrs = min_lr_ratio, base_lrs
        self.step(last_epoch)


def resolve_device(device: str) -> torch.device:
    """The torch.device `device` names ("auto": CUDA if available, else the CPU); ValueError if it is
    not one of auto / cpu / cuda / cuda:N, or names a GPU this machine does not have."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        device = str(device)
    check_device_name(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_bf16(native_only: bool) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=not native_only))
    except TypeError:  # a torch without the including_emulation argument
        return bool(torch.cuda.is_bf16_supported())


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mixed-precision mode a run on ``device`` uses for ``cfg.amp``: "off", "bf16" or "fp16".

    "auto" is bf16 on a CPU and on a GPU with native bfloat16 (compute capability 8.0 and later),
    fp16 (with a gradient scaler) on older GPUs. A mode the device cannot run is a ValueError.
    """
    if amp == "off":
        return amp
    if amp not in ("bf16", "fp16", "auto"):
        raise ValueError(f"amp must be 'off', 'bf16', 'fp16' or 'auto', got {amp!r}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--amp {amp}: mixed precision runs on cpu and cuda devices, not {device.type!r}; "
                         f"use --amp off")
    if device.type == "cuda":
        if amp == "auto":
            return "bf16" if _cuda_bf16(native_only=True) else "fp16"
        if amp == "bf16" and not _cuda_bf16(native_only=False):
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                             f"use --amp fp16 (float16 with a gradient scaler)")
        return amp
    return "bf16" if amp == "auto" else amp


# The entries of torch.amp.GradScaler.state_dict(), each with what a usable value is.
_SCALER_FIELDS = {
    "scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "growth_factor": (lambda v: math.isfinite(v) and v > 1, "a finite number > 1"),
    "backoff_factor": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "growth_interval": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "_growth_tracker": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
}


def _check_scaler_state(state: Any, path: StrPath) -> Dict[str, Any]:
    """The gradient-scaler entry of a checkpoint, checked to be what GradScaler.state_dict() writes;
    CheckpointError naming the file and the entry otherwise (a NaN or zero scale would silently skip
    every later step)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its gradient-scaler state ('grad_scaler') is a "
                              f"{type(state).__name__}, not a dict")
    for key, (ok, what) in _SCALER_FIELDS.items():
        if key not in state:
            raise CheckpointError(f"{path}: its gradient-scaler state has no {key!r} entry")
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise CheckpointError(f"{path}: its gradient-scaler state has {key}={v!r}; it must be {what}")
    return {k: state[k] for k in _SCALER_FIELDS}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible stream per (seed, epoch); the constant keeps epoch e of seed s away
    # from epoch 0 of seed s+e.
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 31)


def _synthetic_params(cfg: TrainConfig) -> Dict[str, Any]:
    params = dict(cfg.synthetic)
    params.setdefault("height", cfg.height)
    params.setdefault("width", cfg.width)
    return params


def load_dataset(cfg: TrainConfig, log: Callable[[str], None] = print,
                 check: Sequence[str] = ("train", "query", "gallery"), when: str = "training") -> ReIDDataset:
    """Render (if synthetic) and parse the dataset of a config, then check every image of the splits
    in `check` (ksl_ops.data.check: ValueError naming the bad files, found before `when`)."""
    from ..data import build_dataset, dataset_key
    from ..data.check import check_images

    root = cfg.resolved_data_root()
    if dataset_key(cfg.dataset) == "synthetic":
        from ..data import render_synthetic

        params = _synthetic_params(cfg)
        t0 = time.perf_counter()
        root = render_synthetic(root, **params)
        log(f"synthetic set ready in {root} ({time.perf_counter() - t0:.1f}s; "
            f"{params['num_train_ids']} train ids, {params['num_test_ids']} test ids, "
            f"{params['num_cams']} cameras, rendered at {params['height']}x{params['width']})")
    ds = build_dataset(cfg.dataset, root)
    if cfg.val_ids:
        from ..data import split_validation

        ds = split_validation(ds, cfg.val_ids, seed=0)
        log(f"validation split: {cfg.val_ids} training identities held out as query/gallery "
            f"({len(ds.query)} queries, {len(ds.gallery)} gallery); the test split is not used")
    if check:
        check_images([(split, getattr(ds, split)) for split in check], ds.name, when)
    return ds


def config_from_checkpoint(state: Dict[str, Any], path: StrPath) -> TrainConfig:
    """The run config saved in a checkpoint, validated like one from the command line
    (TrainConfig.validated); CheckpointError naming the file and the field otherwise."""
    try:
        return TrainConfig.from_dict(state["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its config is not valid: {exc}") from None


def use_data_root(cfg: TrainConfig, data_root: Optional[str], log: Callable[[str], None] = print) -> None:
    """Set the data root of a config that came from a checkpoint (`ksl eval`, `--resume`, `ksl analyze`).

    A checkpoint is shared data, so the folders a run writes are the user's choice, never the file's:
    `data_root` (the command line's --data-root) wins; without it, the checkpoint's data root is used
    only where nothing is written into it -- a real dataset (the parsers only read), or a synthetic set
    already rendered there with exactly the checkpoint's settings. Otherwise the synthetic set is
    rendered into the default root ($KSL_DATA or ./data/synthetic).
    """
    from ..data import dataset_key
    from ..data.synthetic import is_rendered

    if data_root is not None:
        cfg.data_root = data_root
        return
    saved = cfg.data_root
    if saved is None or dataset_key(cfg.dataset) != "synthetic":
        return
    if is_rendered(saved, **_synthetic_params(cfg)):
        log(f"data: the synthetic set in {saved} (the checkpoint's data root; only read)")
        return
    cfg.data_root = None
    log(f"data: the checkpoint's data root {saved} holds no synthetic set rendered with its settings, and a "
        f"checkpoint never chooses where files are written: using {cfg.resolved_data_root()} "
        f"(--data-root chooses another)")


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    from ..models import build_backbone, with_isomorphic_branches

    model = build_backbone(cfg.backbone, num_classes=num_classes, neck=cfg.resolved("neck"))
    if cfg.branches:
        model = with_isomorphic_branches(model)
    return model


def build_optimizer(cfg: TrainConfig, params: ParamsT) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    # Adam / AMSGrad with L2 weight decay, as the Re-ID code that trains OSNet-like nets from scratch.
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                            amsgrad=cfg.optimizer == "amsgrad")


def _resolve_backend(backend: str) -> Backend:
    if backend != "auto":
        return cast(Backend, backend)  # "fused" or "reference": TrainConfig.validated() admits no other
    import ksl_ops

    return "fused" if ksl_ops.backend() != "none" else "reference"


def _holds_tensor(obj: Any) -> bool:
    stack = [obj]  # read_checkpoint has bounded the depth
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainBatch:
    """The batch of a step: images and labels on the training device, and each image's index in
    ``dataset.train`` (on the CPU). A ``before_step`` hook may replace ``labels`` (LabelNoise does)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class StepOutput(NamedTuple):
    """What a step computed: the KSLLoss output (``loss.total``, ``loss.terms``, ``loss.parts``), the
    network outputs of every branch (main branch first; not detached) and the seconds spent in the
    loss's forward and backward (0 unless ``cfg.time_losses``)."""

    loss: Any
    logits: List[torch.Tensor]
    embeddings: List[torch.Tensor]
    loss_time_s: float


class _IndexedImages(torch.utils.data.Dataset):
    """A training ImageDataset whose samples also carry their index: (image, pid, camid, index)."""

    def __init__(self, images: Any):
        self.images = images

    @property
    def items(self) -> List[Any]:
        return self.images.items

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        return (*self.images[index], index)


def _with_indices(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """The same loader (sampler, batch size, workers, seeding, generator) over _IndexedImages."""
    return torch.utils.data.DataLoader(
        _IndexedImages(loader.dataset), batch_size=loader.batch_size, sampler=loader.sampler,
        num_workers=loader.num_workers, drop_last=loader.drop_last, pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers, worker_init_fn=loader.worker_init_fn,
        generator=loader.generator)


# The entries of an epoch record in the order metrics.json lists them, whichever hooks add them;
# entries not named here follow, in the order they were added.
_RECORD_ORDER = ("epoch", "lr", "sampler", "iters", "label_noise", "grad_scale", "time_s", "images_per_s", "loss",
                 "diag", "loss_time_s", "loss_time_share")


class Trainer:
    """Builds data, model, KSL loss, optimizer and schedule from a TrainConfig and runs the training
    loop: the step (:meth:`run_step`) and, around it, hooks (ksl_ops.engine.hooks).

    ``hooks``: None registers :func:`~ksl_ops.engine.hooks.default_hooks` of the config (what
    ``ksl train`` runs); a sequence registers exactly those hooks, in that order.

    The state the hooks read and change, besides ``cfg``, ``model``, ``optimizer``, ``scheduler``,
    ``scaler``, ``criterion``, ``dataset``, ``num_classes``, ``device``, ``dist``, ``log`` and
    ``output_dir``:

    - ``epoch`` (0-based), ``iter`` (0-based step within the epoch), ``iters`` (steps this epoch),
      ``loader`` (this epoch's train loader);
    - ``batch`` (TrainBatch) before and after a step, ``step_output`` (StepOutput) after it;
    - ``record``: the epoch's record (a dict that becomes an entry of metrics.json's history);
    - ``history``: the records of the epochs done; ``final``: the final evaluation, once run;
    - ``stop_after``: stop (checkpointed) after this many epochs of the schedule; ``--resume`` continues.
    """

    CHECKPOINT = "last.ckpt"
    METRICS = "metrics.json"
    CURVES = "curves.png"

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print, dataset: Any = None,
                 hooks: Optional[Sequence[HookBase]] = None):
        from ..losses import KSLLoss

        self.cfg = cfg.validated()
        # Under torchrun: join the process group; only rank 0 logs (engine/distributed.py).
        self.dist, self.device = DistEnv.setup(resolve_device(cfg.device))
        self.log = main_only(self.dist, log)
        self.output_dir = Path(cfg.output_dir)
        _seed_everything(cfg.seed)
        with self.dist.main_first():
            if self.dist.is_main:  # rank 0 alone writes; find an unusable folder before any work
                removed = prepare_output_dir(self.output_dir, (self.CHECKPOINT, self.METRICS, self.CURVES))
                if removed:
                    self.log(f"removed {len(removed)} temp file(s) left by an interrupted write: "
                             f"{', '.join(p.name for p in removed)}")
            self.dataset = dataset if dataset is not None else load_dataset(cfg, self.log)
        self.num_classes = int(self.dataset.num_train_pids)
        # self.model is what is saved and evaluated; self.train_model (DDP around it) what a step runs.
        self.model, self.train_model = self.dist.wrap(build_model(cfg, self.num_classes).to(self.device),
                                                      self.device, cfg.sync_bn)
        self.backend = _resolve_backend(cfg.backend)
        # Mixed precision: "auto" becomes the mode this device runs, so the checkpoint and metrics.json
        # record what ran. The scaler is a pass-through unless fp16.
        amp = resolve_amp(cfg.amp, self.device)
        if amp != cfg.amp:
            self.cfg = cfg = dataclasses.replace(cfg, amp=amp)
        self.amp_dtype: Optional[torch.dtype] = AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.criterion = KSLLoss(self.num_classes, backend=self.backend, process_group=self.dist.group,
                                 **cfg.loss_kwargs())
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = WarmupCosineLR(self.optimizer, cfg.epochs, cfg.warmup_epochs, cfg.min_lr_ratio)
        self.start_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.stop_after: Optional[int] = None
        self.final: Optional[Dict[str, Any]] = None
        self.epoch, self.iter, self.iters = 0, 0, 0
        self.loader: Any = None
        self.batch: Optional[TrainBatch] = None
        self.step_output: Optional[StepOutput] = None
        self.record: Dict[str, Any] = {}
        self._loss_sums: Dict[str, Any] = {}
        self._loss_counts: Dict[str, int] = {}
        self._loaders: Dict[str, Any] = {}
        self._test_loaders: Optional[Tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]] = None
        self._check_batches()
        self.hooks: List[HookBase] = []
        self.register_hooks(*(default_hooks(self.cfg) if hooks is None else hooks))

    # -- hooks ---------------------------------------------------------------------------------
    def register_hooks(self, *hooks: HookBase, before: Optional[type] = None) -> None:
        """Add hooks, in the order given: at the end (at every event they run after the hooks already
        registered), or with ``before`` (a hook class) just before the first registered hook of that
        class (ValueError if there is none)."""
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"a hook must be a ksl_ops.engine.hooks.HookBase, got {type(h).__name__}")
        at = len(self.hooks)
        if before is not None:
            at = next((i for i, h in enumerate(self.hooks) if isinstance(h, before)), -1)
            if at < 0:
                raise ValueError(f"no {before.__name__} hook is registered to insert before; the hooks are "
                                 f"{[type(h).__name__ for h in self.hooks]}")
        for h in hooks:
            h.trainer = self
        self.hooks[at:at] = hooks

    def remove_hooks(self, kind: type) -> List[HookBase]:
        """Take out every registered hook that is an instance of ``kind``; returns them (ValueError if
        there is none)."""
        removed = [h for h in self.hooks if isinstance(h, kind)]
        if not removed:
            raise ValueError(f"no {kind.__name__} hook is registered; the hooks are "
                             f"{[type(h).__name__ for h in self.hooks]}")
        self.hooks = [h for h in self.hooks if not isinstance(h, kind)]
        return removed

    def _call_hooks(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)()

    def _check_batches(self) -> None:
        """Build the train loader of each sampler the schedule uses and check it yields a batch, so that
        a batch the data cannot fill is an error now, not at the epoch where that sampler starts."""
        for epoch in sorted({0, self.cfg.epochs - 1}):  # the sampler switches once: these see both
            kind = self.sampler_for(epoch)
            if len(self.train_loader(epoch)) == 0:
                raise ValueError(f"the {kind} sampler yields no batch of {self.cfg.batch_size} from the "
                                 f"{len(self.dataset.train)} train images of {self.dataset.num_train_pids} "
                                 f"identities; lower --batch-size")

    # -- data --------------------------------------------------------------------------------
    def sampler_for(self, epoch: int) -> Sampler:
        """The random sampler before the triplets start, P×K from then on (paper §4.2)."""
        return "pk" if epoch >= self.cfg.triplet_start else "random"

    def train_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """The train loader of ``epoch``, set to that epoch's order; its batches are
        (images, pids, camids, indices into dataset.train)."""
        from ..data import build_train_loader

        kind = self.sampler_for(epoch)
        if kind not in self._loaders:
            from ..data.transforms import build_transforms, crop_padding

            cfg = self.cfg
            tf = build_transforms(cfg.height, cfg.width, train=True, padding=crop_padding(cfg.height))
            batch = self.dist.per_rank_batch(cfg.batch_size, cfg.num_instances)
            self._loaders[kind] = _with_indices(build_train_loader(
                self.dataset, cfg.height, cfg.width, batch, sampler=kind, num_instances=cfg.num_instances,
                workers=cfg.workers, seed=cfg.seed, transform=tf, num_replicas=self.dist.world_size,
                rank=self.dist.rank))
        loader = self._loaders[kind]
        # Make the epoch's order a function of (seed, epoch) only, whatever came before.
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        gen = getattr(loader, "generator", None)
        if gen is not None:
            gen.manual_seed(self.dist.rank_seed(_epoch_seed(self.cfg.seed, epoch)))
        return loader

    def test_loaders(self) -> Tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
        """(query loader, gallery loader) of the evaluation, built once."""
        if self._test_loaders is None:
            from ..data import build_test_loaders

            self._test_loaders = build_test_loaders(self.dataset, self.cfg.height, self.cfg.width,
                                                    self.cfg.eval_batch_size, workers=self.cfg.workers)
        return self._test_loaders

    # -- resume --------------------------------------------------------------------------------
    def resume(self, path: Union[str, "os.PathLike[str]"]) -> int:
        """Load model, optimizer, schedule, history and RNG from a checkpoint; returns the next epoch."""
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, map_location=self.device,
                                restore_rng=True, backbone=self.cfg.backbone, num_classes=self.num_classes)
        if self.scaler.is_enabled():
            if state.get("grad_scaler") is None:
                self.log(f"note: {path} has no gradient-scaler state (it was not trained with --amp fp16); "
                         f"the loss scale starts at {self.scaler.get_scale():g}")
            else:
                self.scaler.load_state_dict(_check_scaler_state(state["grad_scaler"], path))
        epoch = int(state["epoch"])
        if epoch > self.cfg.epochs:
            raise CheckpointError(f"{path} was saved after epoch {epoch}, past the {self.cfg.epochs} epochs of its "
                                  f"schedule")
        metrics = state.get("metrics")
        history = (metrics or {}).get("history", []) if isinstance(metrics, (dict, type(None))) else None
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history) \
                or _holds_tensor(history):
            raise CheckpointError(f"{path}: its metrics are not a history of epoch records (a list of dicts of "
                                  f"numbers and strings)")
        self.start_epoch = epoch
        self.history = list(history)
        self.log(f"resumed from {path} after epoch {self.start_epoch}/{self.cfg.epochs}")
        return self.start_epoch

    # -- the step ------------------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        """The autocast context of a training step's forward (a no-op without --amp)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_step(self) -> StepOutput:
        """One optimisation step on ``self.batch``: forward and loss (under autocast with --amp),
        backward, optimizer step (fp16: through the gradient scaler)."""
        batch = self.batch
        assert batch is not None
        with self.autocast():
            outs = self.train_model(batch.images)
        if isinstance(outs, tuple) and len(outs) == 2 and isinstance(outs[0], torch.Tensor):
            outs = [outs]  # a plain backbone: one branch
        logits = [o[0] for o in outs]
        embs = [o[1] for o in outs]
        self.optimizer.zero_grad(set_to_none=True)
        loss, loss_time = self._loss_backward(logits, embs, batch.labels)
        # optimizer.step() (fp16: on the unscaled gradients, skipped if any is inf/NaN; then the scale
        # adapts). Without a scaler these two lines are optimizer.step().
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepOutput(loss, logits, embs, loss_time)

    def _loss_backward(self, logits: List[torch.Tensor], embs: List[torch.Tensor],
                       labels: torch.Tensor) -> Tuple[KSLOutput, float]:
        """The loss and its backward through the network (the backward outside autocast, as torch.amp
        prescribes); returns (KSLLoss output, seconds in the loss's forward + backward)."""
        if not self.cfg.time_losses:
            with self.autocast():
                out = self.criterion(logits, embs, labels, epoch=self.epoch)
            self.scaler.scale(out.total).backward()
            return out, 0.0
        # Phase 1: the loss alone, from detached copies of the network outputs.
        leaves = [t.detach().requires_grad_() for t in logits + embs]
        self._sync()
        t0 = time.perf_counter()
        with self.autocast():
            out = self.criterion(leaves[: len(logits)], leaves[len(logits):], labels, epoch=self.epoch)
        grads = torch.autograd.grad(self.scaler.scale(out.total), leaves, allow_unused=True)
        self._sync()
        dt = time.perf_counter() - t0
        # Phase 2: the network, fed the loss's gradients (outputs the loss did not use get none).
        pairs = [(t, g) for t, g in zip(logits + embs, grads) if g is not None]
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return out, dt

    def running_loss(self) -> Dict[str, float]:
        """The mean of each loss part over this epoch's steps so far (a host sync on a GPU)."""
        return {k: float(v) / self._loss_counts[k] for k, v in self._loss_sums.items()}

    def _add_loss(self, out: Any) -> None:
        for name, value in out.terms.items():
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value.detach()
            self._loss_counts[name] = self._loss_counts.get(name, 0) + 1
        self._loss_sums["total"] = self._loss_sums.get("total", 0.0) + out.total.detach()
        self._loss_counts["total"] = self._loss_counts.get("total", 0) + 1

    # -- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        """Train one epoch (before_epoch, the steps with before_step/after_step, record_epoch); returns
        this process's record of it (also ``self.record``)."""
        cfg = self.cfg
        _seed_everything(self.dist.rank_seed(_epoch_seed(cfg.seed, epoch)))
        loader = self.train_loader(epoch)
        self.model.train()
        iters = len(loader)
        if cfg.max_iters_per_epoch is not None:
            iters = min(iters, cfg.max_iters_per_epoch)
        if iters == 0:
            raise RuntimeError(f"the train loader yields no batch (batch_size={cfg.batch_size}, "
                               f"{len(self.dataset.train)} train images); lower --batch-size")
        self.epoch, self.iter, self.iters, self.loader = epoch, 0, iters, loader
        self.record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                       "sampler": self.sampler_for(epoch), "iters": iters}
        self._loss_sums, self._loss_counts = {}, {}
        n_images = 0
        loss_time = 0.0
        self._call_hooks("before_epoch")
        self._sync()
        t_epoch = time.perf_counter()
        for it, batch in enumerate(loader):
            if it >= iters:
                break
            self.iter = it
            self.batch = TrainBatch(images=batch[0].to(self.device, non_blocking=True),
                                    labels=batch[1].to(self.device, non_blocking=True).long(), indices=batch[3])
            self._call_hooks("before_step")
            self.step_output = out = self.run_step()
            loss_time += out.loss_time_s
            n_images += self.batch.images.size(0)
            self._add_loss(out.loss)
            self._call_hooks("after_step")
        self._sync()
        elapsed = time.perf_counter() - t_epoch
        self.batch = self.step_output = None
        if self.scaler.is_enabled():  # fp16: the loss scale at the end of the epoch (it halves at every skipped step)
            self.record["grad_scale"] = float(self.scaler.get_scale())
        self.record.update({"time_s": elapsed, "images_per_s": n_images / max(elapsed, 1e-9),
                            "loss": self.running_loss(), "loss_time_s": loss_time,
                            "loss_time_share": loss_time / max(elapsed, 1e-9)})
        self._call_hooks("record_epoch")
        r = self.record
        self.record = {**{k: r[k] for k in _RECORD_ORDER if k in r}, **r}
        return self.record

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rerank: Optional[bool] = None) -> Dict[str, Any]:
        """Single-query CMC/mAP of the main branch on cosine distance (+ re-ranking if asked)."""
        return evaluate_model(self.model, self.test_loaders(), self.device, self.cfg.max_rank,
                              self.cfg.rerank if rerank is None else rerank)

    # -- the run ---------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Run the epochs from ``start_epoch`` with the hooks; returns {"config", "final" (the final
        evaluation, None on other ranks or without the Evaluation hook), "train_time_s", "history"},
        or {"config", "final": None, "stopped_after", "history"} when ``stop_after`` ends it early."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"train: {cfg.describe()}")
        self.log(f"data: {self.dataset.name} ({len(self.dataset.train)} train images, "
                 f"{self.num_classes} ids) | device {self.device} | loss backend {self.backend} | "
                 f"output {self.output_dir}")
        t_run = time.perf_counter()
        self.final = None
        self._call_hooks("before_train")
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.stop_after is not None and epoch >= self.stop_after:
                self.log(f"stopping after epoch {epoch}/{cfg.epochs} as asked; "
                         f"--resume {self.output_dir / self.CHECKPOINT} continues")
                return {"config": cfg.to_dict(), "final": None, "stopped_after": epoch, "history": self.history}
            self.record = self.dist.reduce_record(self.train_epoch(epoch), self.device)
            self.history.append(self.record)
            self._call_hooks("after_epoch")
            self.dist.barrier()
        self._call_hooks("after_train")
        return {"config": cfg.to_dict(), "final": self.final, "train_time_s": time.perf_counter() - t_run,
                "history": self.history}

    def save(self, epoch: int) -> Path:
        """Write the checkpoint (model, optimizer, schedule, RNG, config, history; atomically) as
        saved after ``epoch`` epochs."""
        extra: Dict[str, Any] = {"num_classes": self.num_classes, "backend": self.backend}
        if self.scaler.is_enabled():
            extra["grad_scaler"] = self.scaler.state_dict()
        return save_checkpoint(self.output_dir / self.CHECKPOINT, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, epoch=epoch, config=self.cfg.to_dict(),
                               metrics={"history": self.history}, extra=extra)


def evaluate_model(model: torch.nn.Module, loaders: Tuple[Iterable[Any], Iterable[Any]],
                   device: Union[str, torch.device], max_rank: int = 50, rerank: bool = False) -> Dict[str, Any]:
    """R1/R5/R10/mAP (in %) of the main-branch embeddings; with rerank also the re-ranked ones."""
    query_loader, gallery_loader = loaders
    t0 = time.perf_counter()
    qf, q_pids, q_camids = extract_features(model, query_loader, device)
    gf, g_pids, g_camids = extract_features(model, gallery_loader, device)
    max_rank = min(max_rank, len(g_pids))
    dist = cosine_distance(qf, gf)
    r = evaluate_reid(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    out = _summary(r)
    if rerank:
        rr = re_ranking(dist, cosine_distance(qf, qf), cosine_distance(gf, gf))
        out["rerank"] = _summary(evaluate_reid(rr, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank))
    out["num_query"], out["num_gallery"] = int(len(q_pids)), int(len(g_pids))
    out["time_s"] = time.perf_counter() - t0
    return out


def _summary(r: Dict[str, Any]) -> Dict[str, Any]:
    cmc = r["cmc"]
    at = lambda k: float(100.0 * cmc[min(k, len(cmc)) - 1])  # noqa: E731
    return {"R1": at(1), "R5": at(5), "R10": at(10), "mAP": float(100.0 * r["mAP"]),
            "num_valid_queries": int(r["num_valid_queries"])}


# ---------------------------------------------------------------------------------------------
# functional entry points
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    trainer = Trainer(cfg, log=log)
    if resume:
        trainer.resume(resume)
    return trainer.fit()


def load_trained_model(path: StrPath, device: Union[str, torch.device] = "cpu", log: Callable[[str], None] = print
                       ) -> Tuple[Any, TrainConfig, Dict[str, Any]]:
    """(model, config, checkpoint state) of a `ksl train` checkpoint: the network it trained (with its
    branches, if it had them) rebuilt from the saved config, weights loaded, in eval mode on ``device``.

    The model is a torch.nn.Module, typed Any because callers read the attributes of the network
    (``model.num_classes``), which nn.Module's annotations do not declare."""
    state = read_checkpoint(path)  # runs no code from the file; CheckpointError on a bad one
    cfg = config_from_checkpoint(state, path)
    log(f"loaded {path}: {describe_checkpoint(state)}")
    if not any(k.endswith("classifier.weight") for k in state["model"]):
        # The class count is taken from the classifier's own shape (backed by the file's bytes), never
        # from a bare number that could ask for a model of any size.
        raise CheckpointError(f"{path} has no classifier weight to rebuild the model from")
    num_classes = checkpoint_num_classes(state)
    assert num_classes is not None  # the classifier weight checked above gives it
    model = build_model(cfg, num_classes)
    load_model_state(model, state, path)
    return model.to(torch.device(device)).eval(), cfg, state


def evaluate_checkpoint(path: StrPath, data_root: Optional[str] = None, dataset: Optional[str] = None,
                        rerank: bool = False, device: str = "auto", workers: Optional[int] = None,
                        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate the main branch of a saved checkpoint (on its own dataset unless another is given).

    The checkpoint gives the model and the maths (input size, dataset, split); where data is read or
    rendered, the device and the loader processes are this call's: see use_data_root for the data
    root; `device` and `workers` (default: 0 on a CPU, 4 on a GPU) are never the checkpoint's."""
    dev = resolve_device(device)
    model, cfg, state = load_trained_model(path, dev, log)
    if dataset is not None:
        cfg.dataset = dataset
    cfg.workers = workers if workers is not None else (4 if dev.type == "cuda" else 0)
    cfg.device = str(dev)
    cfg.validated()  # the arguments of this call, checked like the rest
    use_data_root(cfg, data_root, log)
    ds = load_dataset(cfg, log, check=("query", "gallery"), when="evaluating")
    from ..data import build_test_loaders

    loaders = build_test_loaders(ds, cfg.height, cfg.width, cfg.eval_batch_size, workers=cfg.workers)
    res = evaluate_model(model, loaders, dev, cfg.max_rank, rerank)
    res["checkpoint"], res["epoch"] = str(path), int(state.get("epoch", 0))
    res["config"] = cfg.to_dict()
    return res
