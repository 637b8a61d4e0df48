"""Run directories: their setup, checkpoint I/O, a run loaded for use (LoRA merged), model tensors."""
