"""lmkiln: build language models from scratch and fine-tune them.

Importing lmkiln is cheap and has no side effects; heavy modules (torch, transformers, peft) load
only when the code that needs them runs.
"""

__version__ = "0.1.0"
