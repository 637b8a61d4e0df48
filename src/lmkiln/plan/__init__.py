"""Planning a run before it starts: memory and time predictions (`lmkiln plan`), checked by
benchmarks/plan_accuracy.py against measurement.

memory.py   peak memory by part, from autograd's saved tensors of a probe model
speed.py    step time from a few real steps on this machine
planner.py  the plan: figures, predictions, the advice (model size, micro-batch, repeats)
"""

from lmkiln.plan.planner import Plan, format_bytes, parse_duration, parse_memory, plan_training

__all__ = ["Plan", "format_bytes", "parse_duration", "parse_memory", "plan_training"]
