"""Training configuration: the paper's recipe (§4.2) and the shortened CPU default.

The paper (KSL, ACM MM'21, §4.2) trains from scratch with SGD, cosine-annealed learning rate from
0.0015, batch 64, weight decay 5e-4, 350 epochs at 256×128, label-smoothed cross-entropy from the
start and the triplet losses (with the switch to the P×K RandomIdentity sampler) from epoch 150.
That is the "paper" preset.

The "cpu" preset is what `ksl train` runs with no arguments: the same recipe shortened so that
installing, rendering the synthetic set, training with full KSL and evaluating finish in under ten
minutes on a 2-core CPU. It keeps every ingredient (branches, all KSL terms, label smoothing, cosine
LR, triplets + P×K from the same 150/350 of the schedule) and changes only the sizes: ShuffleNetV2
(2.5× the training images/s of CMSNet on a CPU, and the backbone of the README's ablation tables),
64×32 inputs, 16 epochs on a 64-identity synthetic set (~380 SGD steps), and a larger learning rate
(0.01 with a 1-epoch linear warm-up), because 0.0015 is tuned for 350 epochs and barely moves a
from-scratch network in a few hundred steps. Larger rates were tried and fail with all KSL terms on:
at SGD 0.02 and above the cross-entropy climbs above its uniform value and at 0.05 the network
collapses to input-independent embeddings (every consensus term ~0, cross-entropy = log K), because
the unnormalised embedding-distance terms (eq. 8-10) dominate the early gradients. The "paper"
preset trains CMSNet, the paper's own backbone.

What the KSL losses are fed, and when, is the *recipe* (ksl_ops.recipes, `--recipe`): "ksl-ops", the
default, L2-normalises the embeddings of KSL-E and of the triplets and starts KSL-P/KSL-E with the
triplets; "paper" is the paper's text taken literally (README, "The KSL recipe", has the measurements).

Note on the paper's rate: 0.0015 with cosine decay over 350 epochs is the setting OSNet-style
Re-ID code uses with AMSGrad; `optimizer="amsgrad"` is available to try it that way, SGD (as the
paper states) is the default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

from ..recipes import DEFAULT_RECIPE, RECIPES, check_recipe, recipe_value

__all__ = ["TrainConfig", "AMP_MODES", "LOSS_PRESETS", "LossSet", "RECIPES", "PAPER_EPOCHS", "PAPER_TRIPLET_START", "PRESETS", "default_data_root"]

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
    recipe: str = DEFAULT_RECIPE              # a RECIPES key (ksl_ops.recipes); the four fields below override it
    neck: Optional[str] = None                # "fc", "bnneck", "osnet" (ksl_ops.models.NECKS)
    normalize_e: Optional[bool] = None        # KSL-E on L2-normalised embeddings
    normalize_triplet: Optional[bool] = None  # triplets and KSL-H on L2-normalised embeddings
    consensus_start_epoch: Optional[Any] = None  # KSL-P/KSL-E from this 0-based epoch, or "triplet"
                                              # (with the triplets); None: the recipe's
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
    def from_preset(cls, preset: str = "cpu", **overrides) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preset=preset, **values).validated()

    def validated(self) -> "TrainConfig":
        if self.losses not in LOSS_PRESETS:
            raise ValueError(f"losses must be one of {list(LOSS_PRESETS)}, got {self.losses!r}")
        if self.backend not in ("auto", "fused", "reference"):
            raise ValueError(f"backend must be 'auto', 'fused' or 'reference', got {self.backend!r}")
        if self.optimizer not in ("sgd", "adam", "amsgrad"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'amsgrad', got {self.optimizer!r}")
        if not isinstance(self.amp, str) or self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(repr(m) for m in AMP_MODES)}, got {self.amp!r}")
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"progress must be 'auto', 'on' or 'off', got {self.progress!r}")
        for name in ("epochs", "batch_size", "num_instances", "height", "width", "eval_batch_size",
                     "checkpoint_every", "max_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.batch_size % self.num_instances:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_instances "
                             f"({self.num_instances}) for the P×K sampler")
        if self.workers < 0 or self.warmup_epochs < 0 or self.eval_every < 0:
            raise ValueError("workers, warmup_epochs and eval_every must be >= 0")
        if (isinstance(self.label_noise, bool) or not isinstance(self.label_noise, (int, float))
                or not 0.0 <= self.label_noise < 1.0):
            raise ValueError(f"label_noise must be a fraction in [0, 1), got {self.label_noise!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_recipe(self.recipe)
        from ..models.head import check_neck

        check_neck(self.resolved("neck"))
        if not isinstance(self.val_ids, int) or isinstance(self.val_ids, bool) or self.val_ids < 0:
            raise ValueError(f"val_ids must be an integer >= 0, got {self.val_ids!r}")
        cs = self.resolved("consensus_start_epoch")
        if cs is not None and cs != "triplet" and (not isinstance(cs, int) or isinstance(cs, bool) or cs < 0):
            raise ValueError(f"consensus_start_epoch must be None, 'triplet' or an integer >= 0, got {cs!r}")
        if self.triplet_start_epoch is not None and self.triplet_start_epoch < 0:
            raise ValueError(f"triplet_start_epoch must be >= 0, got {self.triplet_start_epoch}")
        if self.max_iters_per_epoch is not None and self.max_iters_per_epoch < 1:
            raise ValueError(f"max_iters_per_epoch must be >= 1, got {self.max_iters_per_epoch}")
        return self

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
        """A recipe field (neck, normalize_e, normalize_triplet, consensus_start_epoch): the explicit
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
                    consensus_start_epoch=self.consensus_start)

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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        short = " (shortened CPU schedule; the paper's is 350 epochs at 256x128, lr 0.0015)" if self.preset == "cpu" else ""
        recipe = (f"recipe {self.recipe} (neck {self.resolved('neck')}, "
                  f"KSL-E on {'L2-normalised' if self.resolved('normalize_e') else 'raw'} embeddings, "
                  f"triplets on {'L2-normalised' if self.resolved('normalize_triplet') else 'raw'} embeddings, "
                  f"KSL-P/KSL-E from epoch {(self.consensus_start or 0) + 1})")
        return (f"{self.backbone} | losses={self.losses} | {recipe} | input {self.height}x{self.width} | "
                f"{self.epochs} epochs, triplet + PxK sampler from epoch {self.triplet_start + 1} | "
                f"{self.optimizer.upper()} lr={self.lr:g} (cosine, warm-up {self.warmup_epochs}) wd={self.weight_decay:g} "
                f"batch={self.batch_size}{short}"
                + (f" | amp {self.amp}" if self.amp != "off" else "")
                + (f" | label noise {self.label_noise:g} (redrawn every epoch)" if self.label_noise else ""))
