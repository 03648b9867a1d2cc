"""The compression search on Ray Tune: the best validation AUC per serving byte.

`config` and `space` (what is searched), `trial` (one point, trained by the training run),
`driver` (Optuna, the early stopping, the Tuner), `results` and `pareto` (the front, the
files and the best model). `jobs.tune` is the command that runs it.
"""
