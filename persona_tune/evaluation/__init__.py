"""Evaluation: rating prediction (scoring and generation), metrics with bootstrap CIs, classical
baselines, the Table-1 report and the experiment grid. See docs/evaluation.md."""
