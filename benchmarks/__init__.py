"""Benchmarks of the optimizer step (``python -m pytest benchmarks``) and their report
(``python -m benchmarks.report``).

A package so that the report runs as a module and so that pytest puts the repository root,
and with it ``adam_triton``, on ``sys.path`` when the suite is run as ``pytest benchmarks/``.
"""
