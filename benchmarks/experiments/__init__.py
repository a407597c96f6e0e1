"""One-off measurements behind benchmarks/NOTES.md: what-ifs the suite cannot time because
adam_triton does not (yet) do them. Run as modules: ``python -m benchmarks.experiments.NAME``."""
