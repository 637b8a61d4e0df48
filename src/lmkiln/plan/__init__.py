"""Planning a run before it starts: memory and time predictions (`lmkiln plan`), checked by
benchmarks/plan_accuracy.py against measurement.

memory.py   peak memory by part, from autograd's saved tensors of a probe model
speed.py    step time from a few real steps on this machine
planner.py  the plan of a transformer: figures, predictions, the advice (model size,
            micro-batch, repeats)
tabular.py  the plan of an MLP on a table (task=supervised)
measure.py  the measurement the predictions are checked against (and the runtime's overhead)
text.py     what `lmkiln plan` prints
"""

from lmkiln.plan.planner import Plan, format_bytes, parse_duration, parse_memory, plan_training
from lmkiln.plan.tabular import TablePlan, plan_table

__all__ = [
    "Plan",
    "TablePlan",
    "format_bytes",
    "parse_duration",
    "parse_memory",
    "plan_table",
    "plan_training",
]
