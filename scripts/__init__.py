"""Tools beside the two stages (data preparation, sweeps, plots, the GPU check): run them from the repository
root as modules, ``python -m scripts.NAME``."""
