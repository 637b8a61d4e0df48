"""Side-by-side benchmarks of lmkiln against its peers; run them with `python -m benchmarks.run`."""
