"""Hyper-parameter search with Optuna (`lmkiln sweep`) and the learning-rate range test (`lmkiln lr-find`)."""
