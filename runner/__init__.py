"""Solvers, the training loop, the CLI, ONNX export and per-layer probes."""
