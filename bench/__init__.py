"""Benchmarks of ksl-ops: kernel micro-benchmarks (kernels.py) and full training runs (train.py)."""
