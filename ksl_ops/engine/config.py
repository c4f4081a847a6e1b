"""Training configuration: the paper's recipe (§4.2) and the shortened CPU default.

The paper (KSL, ACM MM'21, §4.2) trains from scratch with SGD, cosine-annealed learning rate from
0.0015, batch 64, weight decay 5e-4, 350 epochs at 256×128, label-smoothed cross-entropy from the
start and the triplet losses (with the switch to the P×K RandomIdentity sampler) from epoch 150.
That is the "paper" preset.

The "cpu" preset is what `ksl train` runs with no arguments: the same recipe shortened so that
installing, rendering the synthetic set, training with full KSL and evaluating finish in under ten
minutes on a 2-core CPU. It keeps every ingredient (branches, all KSL terms, label smoothing, cosine
LR, triplets + P×K from the same 150/350 of the schedule) and changes only the sizes: ShuffleNetV2
(2.5× the training images/s of CMSNet on a CPU, and the backbone of the ablation tables in
docs/reproduction.md), 64×32 inputs, 16 epochs on a 64-identity synthetic set (~380 SGD steps), and a
larger learning rate (0.01 with a 1-epoch linear warm-up), because 0.0015 is tuned for 350 epochs and barely moves a
from-scratch network in a few hundred steps. 0.01 is also about the largest rate that trains with all
KSL terms on: at SGD 0.02 and above the cross-entropy climbs above its uniform value, and at 0.05 the
network collapses to input-independent embeddings (every consensus term ~0, cross-entropy = log K),
because the unnormalised embedding-distance terms (eq. 8-10) dominate the early gradients. The
"paper" preset trains CMSNet, the paper's own backbone.

What the KSL losses are fed, and when, is the *recipe* (ksl_ops.recipes, `--recipe`): "ksl-ops", the
default, L2-normalises the embeddings of KSL-E and of the triplets and starts KSL-P/KSL-E with the
triplets; "paper" is the paper's text taken literally (docs/recipe.md has the measurements).

Note on the paper's rate: 0.0015 with cosine decay over 350 epochs is the setting OSNet-style
Re-ID code uses with AMSGrad; `optimizer="amsgrad"` is available to try it that way, SGD (as the
paper states) is the default.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Dict, NamedTuple, Optional

from ..recipes import DEFAULT_RECIPE, RECIPES, recipe_value

__all__ = ["TrainConfig", "AMP_MODES", "LOSS_PRESETS", "LossSet", "RECIPES", "PAPER_EPOCHS", "PAPER_TRIPLET_START",
           "PRESETS", "default_data_root", "MAX_INPUT_SIDE", "MAX_WORKERS", "check_device_name"]

PAPER_EPOCHS = 350
PAPER_TRIPLET_START = 150

# --amp: the autocast dtype of a training step (docs/mixed-precision.md). "bf16": bfloat16 autocast
# (CPU, and GPUs with bfloat16 support); "fp16": float16 autocast with a gradient scaler (for GPUs;
# CPU autocast supports it too); "auto": bf16 on a CPU or on a GPU that supports it, else fp16.
AMP_MODES = ("off", "bf16", "fp16", "auto")


class LossSet(NamedTuple):
    """Which losses a --losses preset switches on (every preset has CE and the per-branch triplet)."""

    branches: bool      # the isomorphic auxiliary branches (False: the single-branch baseline)
    pp: bool = False    # KSL-PP, eq. 4
    pa: bool = False    # KSL-PA, eq. 5-6
    ep: bool = False    # KSL-EP, eq. 8
    ea: bool = False    # KSL-EA, eq. 9-10
    h: bool = False     # KSL-H, eq. 11


# --losses presets: the rows of the paper's Tables 4-6. "baseline" is the single-branch network
# (CE + triplet); "aux" adds the isomorphic branches (L_aux, eq. 2); the others add constraints to AUX.
LOSS_PRESETS: Dict[str, LossSet] = {
    "baseline": LossSet(False),
    "aux": LossSet(True),
    "ksl-p": LossSet(True, pp=True, pa=True),                       # Table 4 "+KSL-P", Table 5 "KSL-P"
    "ksl-pp": LossSet(True, pp=True),                               # Table 5
    "ksl-pa": LossSet(True, pa=True),                               # Table 5
    "ksl-e": LossSet(True, ep=True, ea=True),                       # Table 4/6 "KSL-E" (AUX + KSL-E)
    "ksl-ep": LossSet(True, ep=True),                               # Table 6
    "ksl-ea": LossSet(True, ea=True),                               # Table 6
    "ksl-h": LossSet(True, h=True),                                 # Table 4 "KSL-H" (AUX + KSL-H)
    "ksl-pe": LossSet(True, pp=True, pa=True, ep=True, ea=True),    # Table 4 "+KSL-E" (AUX + P + E)
    "ksl": LossSet(True, True, True, True, True, True),             # Table 4 "+KSL-H" (everything)
}

# Training recipes (what the KSL losses are fed, and when) live in ksl_ops.recipes, the one table that
# KSLLoss, this config and the CLI read; re-exported here. Explicit --neck/--normalize-*/--consensus-start
# override the recipe.

# Hyper-parameters that differ between the two presets; everything else is shared.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": dict(backbone="cmsnet", epochs=350, lr=0.0015, warmup_epochs=0, height=256, width=128, batch_size=64),
    "cpu": dict(backbone="shufflenetv2", epochs=16, lr=0.01, warmup_epochs=1, height=64, width=32, batch_size=64),
}

# The synthetic set of the default CPU run (see ksl_ops.data.render_synthetic). It is rendered at the
# training input size unless "height"/"width" are given here.
SYNTHETIC_DEFAULTS = dict(num_train_ids=64, num_test_ids=40, num_cams=4, images_per_cam=6)


# Limits on what a config may ask for, so that a hand-made config (a shared checkpoint's) cannot make
# `ksl eval` or `--resume` allocate or spawn without bound: Re-ID inputs are at most a few hundred
# pixels a side (the paper: 256x128) and no loader needs hundreds of processes.
MAX_INPUT_SIDE = 2048
MAX_WORKERS = 256
SYNTHETIC_KEYS = frozenset({"num_train_ids", "num_test_ids", "num_cams", "images_per_cam", "height", "width",
                            "seed"})


def _short(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit - 20]}... ({len(r)} characters)"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _dataset_key(name: str) -> Optional[str]:
    from ..data import dataset_key

    return dataset_key(name)


def check_device_name(device: str) -> str:
    """`device` if it names a device `ksl` can run on ("auto", "cpu", "cuda", "cuda:N"); ValueError
    otherwise. Whether that device exists here is checked when it is used (trainer.resolve_device)."""
    if device == "auto" or device == "cpu" or re.fullmatch(r"cuda(:\d{1,4})?", str(device)):
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (the ksl_ops kernels run on CPUs and "
                     f"CUDA GPUs), got {_short(device)}")


def default_data_root() -> Path:
    """Where `ksl train` renders the synthetic set: $KSL_DATA if set, else ./data/synthetic."""
    env = os.environ.get("KSL_DATA")
    return Path(env) if env else Path("data") / "synthetic"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and in metrics.json."""

    preset: str = "cpu"
    # data
    dataset: str = "synthetic"
    data_root: Optional[str] = None           # None: default_data_root() (synthetic) / required otherwise
    synthetic: Dict[str, int] = field(default_factory=lambda: dict(SYNTHETIC_DEFAULTS))
    height: int = 64
    width: int = 32
    batch_size: int = 64
    num_instances: int = 4                    # K of the P×K sampler (P = batch_size / K)
    workers: int = 2
    sync_bn: bool = False                     # several GPU processes: BatchNorm statistics over all ranks
    # model and losses
    backbone: str = "shufflenetv2"
    losses: str = "ksl"
    label_smoothing: float = 0.1
    margin: float = 0.3
    label_noise: float = 0.0                  # share of training labels made wrong, redrawn every epoch (Fig. 6)
    temperature: float = 1.0
    backend: str = "auto"                     # "fused", "reference", or "auto" (fused if compiled)
    recipe: str = DEFAULT_RECIPE              # a RECIPES key (ksl_ops.recipes); the five fields below override it
    neck: Optional[str] = None                # "fc", "bnneck", "osnet" (ksl_ops.models.NECKS)
    normalize_e: Optional[bool] = None        # KSL-E on L2-normalised embeddings
    normalize_triplet: Optional[bool] = None  # triplets and KSL-H on L2-normalised embeddings
    consensus_start_epoch: Optional[Any] = None  # KSL-P/KSL-E from this 0-based epoch, or "triplet"
                                              # (with the triplets); None: the recipe's
    weight_e: Optional[float] = None          # KSL-E's weight in the total; None: the recipe's
    # optimisation
    epochs: int = 16
    triplet_start_epoch: Optional[int] = None  # None: round(epochs * 150 / 350)
    optimizer: str = "sgd"                   # "sgd" (the paper), "adam" or "amsgrad"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    min_lr_ratio: float = 0.0                 # cosine annealing floor, as a fraction of lr
    max_iters_per_epoch: Optional[int] = None  # cap (smoke tests); None = the whole epoch
    # evaluation and output
    val_ids: int = 0                          # > 0: hold out this many training identities as a validation
                                              # query/gallery split and evaluate there (recipe selection)
    eval_every: int = 0                       # 0: evaluate at the end only
    rerank: bool = False
    max_rank: int = 50
    eval_batch_size: int = 128
    output_dir: str = "runs/ksl"
    checkpoint_every: int = 1
    seed: int = 0
    device: str = "auto"
    progress: str = "auto"                    # "auto" (bars on a TTY outside CI), "on", "off"
    time_losses: bool = True                  # time the loss forward+backward inside each step
    diagnostics: bool = True                  # per-branch CE, embedding norms, active triplets (diagnostics.py)
    amp: str = "off"                          # mixed precision (AMP_MODES): "off", "bf16", "fp16" (with a
                                              # gradient scaler) or "auto" (resolved by the Trainer for its
                                              # device); docs/mixed-precision.md

    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides: Any) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preset=preset, **values).validated()

    def validated(self) -> "TrainConfig":
        """This config, checked field by field; ValueError naming the field otherwise.

        The one check for a config, wherever it comes from: the command line (from_preset), a
        checkpoint or metrics.json (from_dict), or code. Every field must have its type (an int is not
        a bool, a float is finite), lie in its range, and name a known choice; sizes that only a
        hand-made file would hold (an input side above MAX_INPUT_SIDE, more than MAX_WORKERS loader
        processes, a synthetic set over its limits) are refused too, before anything is allocated,
        rendered or written.
        """
        from ..models import BACKBONES, NECKS

        def choice(name: str, options: Collection[str], optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, str) or v not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {_short(v)}")

        def integer(name: str, lo: int, hi: Optional[int] = None, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{name} must be an integer {rng}, got {_short(v)}")

        def real(name: str, lo: float, hi: Optional[float], lo_open: bool = False, hi_open: bool = False,
                 what: str = "a finite number") -> None:
            v = getattr(self, name)
            ok = _is_real(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
            if not ok:
                left, right = ("(" if lo_open else "["), (")" if hi_open or hi is None else "]")
                raise ValueError(f"{name} must be {what} in {left}{lo:g}, "
                                 f"{'inf' if hi is None else format(hi, 'g')}{right}, got {_short(v)}")

        def flag(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if not (isinstance(v, bool) or (optional and v is None)):
                raise ValueError(f"{name} must be {'None, ' if optional else ''}True or False, got {_short(v)}")

        choice("preset", PRESETS)
        if not isinstance(self.dataset, str) or _dataset_key(self.dataset) is None:
            from ..data import DATASETS

            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {_short(self.dataset)}")
        if self.data_root is not None and (not isinstance(self.data_root, (str, os.PathLike))
                                           or not os.fspath(self.data_root)):
            raise ValueError(f"data_root must be None or a non-empty path, got {_short(self.data_root)}")
        choice("losses", LOSS_PRESETS)
        choice("backbone", BACKBONES)
        choice("backend", ("auto", "fused", "reference"))
        choice("recipe", RECIPES)
        choice("neck", NECKS, optional=True)
        choice("optimizer", ("sgd", "adam", "amsgrad"))
        choice("progress", ("auto", "on", "off"))
        if not isinstance(self.amp, str) or self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(repr(m) for m in AMP_MODES)}, got {_short(self.amp)}")
        for name in ("epochs", "batch_size", "num_instances", "eval_batch_size", "checkpoint_every", "max_rank"):
            integer(name, 1)
        for name in ("height", "width"):
            integer(name, 1, MAX_INPUT_SIDE)
        integer("workers", 0, MAX_WORKERS)
        for name in ("warmup_epochs", "eval_every", "val_ids"):
            integer(name, 0)
        integer("seed", 0, 2 ** 63 - 1)
        integer("triplet_start_epoch", 0, optional=True)
        integer("max_iters_per_epoch", 1, optional=True)
        self._check_synthetic()
        if self.batch_size % self.num_instances:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_instances "
                             f"({self.num_instances}) for the P×K sampler")
        real("label_smoothing", 0.0, 1.0, hi_open=True)
        real("margin", 0.0, None)
        real("label_noise", 0.0, 1.0, hi_open=True, what="a fraction")
        real("temperature", 0.0, None, lo_open=True)
        if self.weight_e is not None:
            real("weight_e", 0.0, None)
        real("lr", 0.0, None, lo_open=True)
        real("momentum", 0.0, 1.0, hi_open=True)
        real("weight_decay", 0.0, None)
        real("min_lr_ratio", 0.0, 1.0)
        for name in ("sync_bn", "nesterov", "rerank", "time_losses", "diagnostics"):
            flag(name)
        for name in ("normalize_e", "normalize_triplet"):
            flag(name, optional=True)
        cs = self.consensus_start_epoch
        if cs is not None and cs != "triplet" and not (_is_int(cs) and cs >= 0):
            raise ValueError(f"consensus_start_epoch must be None, 'triplet' or an integer >= 0, got {_short(cs)}")
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise ValueError(f"output_dir must be a non-empty path, got {_short(self.output_dir)}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {_short(self.device)}")
        check_device_name(self.device)
        return self

    def _check_synthetic(self) -> None:
        from ..data.synthetic import check_synthetic_config

        syn = self.synthetic
        if not isinstance(syn, dict) or not all(isinstance(k, str) for k in syn):
            raise ValueError(f"synthetic must be a dict of render_synthetic settings, got {_short(syn)}")
        unknown = sorted(set(syn) - SYNTHETIC_KEYS)
        if unknown:
            raise ValueError(f"synthetic: unknown setting {_short(unknown[0])}; known: {sorted(SYNTHETIC_KEYS)}")
        # Rendered at the input size unless the dict says otherwise (trainer.load_dataset); a config of
        # another dataset keeps the dict only for the record, so render_synthetic's own defaults stand in.
        synthetic = _dataset_key(self.dataset) == "synthetic"
        params = dict(SYNTHETIC_DEFAULTS, height=self.height if synthetic else 128,
                      width=self.width if synthetic else 64, seed=0)
        params.update(syn)
        try:
            check_synthetic_config(params)
        except ValueError as exc:
            raise ValueError(f"synthetic: {exc}") from None

    @property
    def triplet_start(self) -> int:
        """0-based epoch from which triplets and the P×K sampler are on (150/350 of the schedule)."""
        if self.triplet_start_epoch is not None:
            return self.triplet_start_epoch
        return int(round(self.epochs * PAPER_TRIPLET_START / PAPER_EPOCHS))

    @property
    def branches(self) -> bool:
        return LOSS_PRESETS[self.losses].branches

    def resolved(self, name: str) -> Any:
        """A recipe field (neck, normalize_e, normalize_triplet, consensus_start_epoch, weight_e): the explicit
        value if one was given, else the recipe's."""
        return recipe_value(self.recipe, name, getattr(self, name))

    @property
    def consensus_start(self) -> Optional[int]:
        """0-based epoch from which KSL-P/KSL-E are on (None: from the start)."""
        cs = self.resolved("consensus_start_epoch")
        return self.triplet_start if cs == "triplet" else cs

    def loss_kwargs(self) -> Dict[str, Any]:
        """The KSLLoss switches and recipe options of this config (the recipe's options resolved here,
        so that KSLLoss gets explicit values and the same recipe name)."""
        ls = LOSS_PRESETS[self.losses]
        return dict(label_smoothing=self.label_smoothing, margin=self.margin, temperature=self.temperature,
                    use_p=ls.pp or ls.pa, use_e=ls.ep or ls.ea, use_h=ls.h, use_pp=ls.pp, use_pa=ls.pa,
                    use_ep=ls.ep, use_ea=ls.ea, triplet_start_epoch=self.triplet_start, recipe=self.recipe,
                    normalize_e=self.resolved("normalize_e"), normalize_triplet=self.resolved("normalize_triplet"),
                    consensus_start_epoch=self.consensus_start, weight_e=self.resolved("weight_e"))

    def resolved_data_root(self) -> Path:
        if self.data_root:
            return Path(self.data_root)
        if self.dataset == "synthetic":
            return default_data_root()
        raise ValueError(f"--data-root is required for dataset {self.dataset!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """A validated config from a dict (a checkpoint's or metrics.json's "config"); keys this
        version does not know are ignored, missing ones take their defaults; ValueError naming the
        field if a value is of the wrong type or out of range (see validated)."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}).validated()

    def describe(self) -> str:
        short = ""
        if self.preset == "cpu":
            short = " (shortened CPU schedule; the paper's is 350 epochs at 256x128, lr 0.0015)"
        recipe = (f"recipe {self.recipe} (neck {self.resolved('neck')}, "
                  f"KSL-E on {'L2-normalised' if self.resolved('normalize_e') else 'raw'} embeddings, "
                  f"triplets on {'L2-normalised' if self.resolved('normalize_triplet') else 'raw'} embeddings, "
                  f"KSL-P/KSL-E from epoch {(self.consensus_start or 0) + 1}"
                  + (f", KSL-E weight {self.resolved('weight_e'):g}" if self.resolved("weight_e") != 1 else "")
                  + ")")
        return (f"{self.backbone} | losses={self.losses} | {recipe} | input {self.height}x{self.width} | "
                f"{self.epochs} epochs, triplet + PxK sampler from epoch {self.triplet_start + 1} | "
                f"{self.optimizer.upper()} lr={self.lr:g} (cosine, warm-up {self.warmup_epochs}) "
                f"wd={self.weight_decay:g} "
                f"batch={self.batch_size}{short}"
                + (f" | amp {self.amp}" if self.amp != "off" else "")
                + (f" | label noise {self.label_noise:g} (redrawn every epoch)" if self.label_noise else ""))
