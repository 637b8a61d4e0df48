"""The models: the transformer (plain PyTorch), its loss, generation with a KV cache, LoRA merging, heads, CPU GEMM swaps."""
