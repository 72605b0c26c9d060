"""Benchmarks (not tests: no assertions on wall time). Run one with ``python -m benchmarks.<name>``."""
