"""Built-in recipes: short YAML deltas over the config defaults (`lmkiln recipes`)."""
