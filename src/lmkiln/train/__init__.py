"""The one training loop and its parts: step, state, objectives, evaluators, metrics, optimizers, runtime."""
