"""Pipeline parallelism: schedules as data (:mod:`.schedules` over the actions of :mod:`.actions`),
their process-free simulation (:mod:`.simulate`) and validator (:mod:`.validate`); the stage split
(:mod:`.split`, :mod:`.stage`, :mod:`.split_names` for named boundaries and mixed layers) and the
runtime executor (:mod:`.runtime`, with the I/W split of :mod:`.backward_split`, the message order
of :mod:`.p2p_order` and its NCCL deadlock check :mod:`.p2p_streams`) build on these."""
from parallel.pipeline.actions import KINDS, Action, ScheduleError
from parallel.pipeline.runtime import PipelineExecutor, Record, microbatches
from parallel.pipeline.schedules import (
                                         NAMES,
                                         P2P,
                                         Schedule,
                                         Step,
                                         comm_ops,
                                         forward_only,
                                         get_schedule,
                                         gpipe,
                                         interleaved_1f1b,
                                         max_in_flight,
                                         one_f_one_b,
                                         zero_bubble_h1,
)
from parallel.pipeline.schedules_v import V_SCHEDULES, dualpipe_v, split_for, split_model_v, zb_v
from parallel.pipeline.simulate import SimResult, default_costs, execute, format_grid, simulate, unit_cost
from parallel.pipeline.split import describe_split, find_body, split_model, sync_tied_grads
from parallel.pipeline.validate import validate

__all__ = [
    "KINDS", "NAMES", "Action", "P2P", "Schedule", "ScheduleError", "Step", "comm_ops",
    "get_schedule", "gpipe", "interleaved_1f1b", "max_in_flight", "one_f_one_b", "validate",
    "zero_bubble_h1", "forward_only", "SimResult", "default_costs", "execute", "format_grid", "simulate",
    "unit_cost", "PipelineExecutor", "Record", "microbatches", "describe_split", "find_body", "split_model",
    "sync_tied_grads", "zb_v", "dualpipe_v", "split_model_v", "split_for", "V_SCHEDULES",
]
