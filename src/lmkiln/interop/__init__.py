"""Hugging Face interop: export runs as transformers directories, import Llama/Mistral/Qwen2/GPT-2 checkpoints."""
