"""Evaluation: cross-validation (the protocol), splits, baselines, ablation, the summary table, figures
and the reader of a run folder. The figures themselves are defined in :mod:`gnnst.metrics`."""
