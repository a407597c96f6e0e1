"""Benchmarks are not tests: run them with ``python -m pytest benchmarks``."""
