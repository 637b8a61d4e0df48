"""Fine-tuning methods (full, frozen layers, LoRA) and the ingredients of a fine-tuning run."""
