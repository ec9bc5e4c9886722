"""Plan a training layout before launching it: exact state bytes and a cost model.

`predict_state_bytes` (state.py) reproduces, from shapes alone, the bytes a real run logs per
rank; `predict_memory` (cost_model.py) predicts a rank's peak of allocated bytes; `plan`
(search.py) enumerates the layouts (spec.py) a model admits on N GPUs and predicts memory,
traffic and step time for each (cost_model.py); report.py formats the result for
`parallm plan`.
"""

from parallm.planner.cost_model import Candidate, Hardware, Memory, estimate, predict_memory
from parallm.planner.report import format_plan, plan_command, plan_json, plan_to_dict
from parallm.planner.search import plan, recommend, valid_layouts
from parallm.planner.spec import Layout, PlanRequest
from parallm.planner.state import local_numels, predict_state_bytes

__all__ = [
    "Candidate",
    "Hardware",
    "Layout",
    "Memory",
    "PlanRequest",
    "estimate",
    "format_plan",
    "local_numels",
    "plan",
    "plan_command",
    "plan_json",
    "plan_to_dict",
    "predict_memory",
    "predict_state_bytes",
    "recommend",
    "valid_layouts",
]
