"""The reference training script: `ksl train` from a source checkout, with the same options and output.

    python reference/train.py                      # synthetic set, ShuffleNetV2 + full KSL, CPU schedule
    python reference/train.py --preset paper --dataset market1501 --data-root /data --device cuda
    python reference/train.py --resume runs/shufflenetv2_ksl/last.ckpt
    python reference/train.py --help

What it runs, and where to read it:
- the command line and its summary: ksl_ops/train_cli.py;
- the training loop (the step, and the hooks around it: schedule, label noise, NaN guard,
  diagnostics, evaluation, progress, checkpoint, metrics): ksl_ops/engine/trainer.py and
  ksl_ops/engine/hooks.py (docs/training-hooks.md);
- the losses of the paper's equations, as readable PyTorch: the other modules of reference/, which
  backend="reference" runs and the fused kernels are tested against.
"""
import os
import sys


def main() -> int:
    """Run `ksl train` with this script's arguments; returns the exit status."""
    try:
        import ksl_ops  # noqa: F401
    except ImportError:  # a source checkout that is not installed: the package sits beside reference/
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ksl_ops.train_cli import main as train_main

    return train_main()


if __name__ == "__main__":
    sys.exit(main())
