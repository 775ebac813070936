"""Speed, memory and outcome benchmarks: run them from the repository root as modules, ``python -m benchmarks.NAME``."""
