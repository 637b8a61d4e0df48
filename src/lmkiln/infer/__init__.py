"""Inference: text generation with streaming and stop strings on a loaded model."""
