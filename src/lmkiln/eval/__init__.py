"""Evaluation of a trained run on a task file (`lmkiln eval`): generation metrics, perplexity, classification."""
