"""The device runtime: onnxruntime, numpy, Pillow, cryptography, bsdiff4 (no torch, no Dagster)."""
