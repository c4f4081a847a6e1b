"""Helpers that several test files share: `from _helpers import ...`.

pytest puts this folder on sys.path (tests/ is not a package and holds conftest.py), so the import works
in a source checkout and in a copy of tests/ run against an installed ksl-ops, as CI runs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch

import ksl_ops
from ksl_ops.data import render_synthetic
from ksl_ops.engine import TrainConfig

# A tiny synthetic set: 6 train ids x 2 cameras x 3 images (36 train images), 4 test ids; 32x16 pixels.
SYNTH = dict(num_train_ids=6, num_test_ids=4, num_cams=2, images_per_cam=3)


def render_tiny_synth(tmp_path_factory: pytest.TempPathFactory, name: str = "synth", **synth: int) -> Path:
    """The tiny set (SYNTH, with `synth` overriding it) rendered into a fresh temporary folder; its root."""
    root = tmp_path_factory.mktemp(name) / "synthetic"
    render_synthetic(root, height=32, width=16, **{**SYNTH, **synth})
    return root


def tiny_config(root, out, synth: Optional[dict] = None, **kw) -> TrainConfig:
    """The "cpu" preset on the tiny set at `root` (rendered with `synth`, default SYNTH), writing to `out`:
    32x16 images, batches of 8 (4 ids x 2), no loader workers, no progress bar, seed 3. `kw` sets the
    rest (epochs, max_iters_per_epoch, backend, losses, ...)."""
    base = dict(data_root=str(root), synthetic=dict(SYNTH if synth is None else synth), height=32, width=16,
                batch_size=8, num_instances=2, workers=0, output_dir=str(out), progress="off", seed=3,
                eval_batch_size=16)
    base.update(kw)
    return TrainConfig.from_preset("cpu", **base)


Step = Tuple[torch.Tensor, List[torch.Tensor]]


def compiled_step_vs_eager(autocast_dtype: Optional[torch.dtype] = None) -> Tuple[Step, Step]:
    """One KSL training step of three linear heads (N = 8, every term on), run eagerly and through
    torch.compile(fullgraph=True, backend="aot_eager"), under CPU autocast to `autocast_dtype` if given.

    Returns ((total, parameter gradients) of the eager step, the same of the compiled step)."""
    torch.manual_seed(0)
    B, N, K, L = 3, 8, 5, 16
    heads = torch.nn.ModuleList(torch.nn.Linear(12, L + K) for _ in range(B))
    crit = ksl_ops.KSLLoss(K, triplet_start_epoch=0)
    x = torch.randn(N, 12)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])

    def step(x, labels):
        outs = [h(x) for h in heads]
        return crit([o[:, L:] for o in outs], [o[:, :L] for o in outs], labels, epoch=1).total

    def loss(x, labels):
        if autocast_dtype is None:
            return step(x, labels)
        with torch.autocast("cpu", dtype=autocast_dtype):
            return step(x, labels)

    def run(fn) -> Step:
        heads.zero_grad()
        total = fn(x, labels)
        total.backward()
        return total.detach(), [p.grad.clone() for p in heads.parameters()]

    eager = run(loss)
    compiled = run(torch.compile(loss, backend="aot_eager", fullgraph=True))
    return eager, compiled
