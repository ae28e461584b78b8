"""Benchmarks: `./dev bench` (or `python -m benchmarks [name ...]`) writes JSON to
benchmarks/results/."""
