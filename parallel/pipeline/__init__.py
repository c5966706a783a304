"""Pipeline parallelism: schedules as data (:mod:`.schedules`), their process-free
simulation (:mod:`.simulate`); the stage split and runtime executor build on these."""
from .schedules import (
    KINDS, NAMES, Action, P2P, Schedule, ScheduleError, Step, comm_ops, get_schedule, gpipe,
    interleaved_1f1b, max_in_flight, one_f_one_b, validate, zero_bubble_h1,
)
from .simulate import SimResult, default_costs, execute, format_grid, simulate, unit_cost

__all__ = [
    "KINDS", "NAMES", "Action", "P2P", "Schedule", "ScheduleError", "Step", "comm_ops",
    "get_schedule", "gpipe", "interleaved_1f1b", "max_in_flight", "one_f_one_b", "validate",
    "zero_bubble_h1", "SimResult", "default_costs", "execute", "format_grid", "simulate",
    "unit_cost",
]
from .runtime import PipelineExecutor, Record, microbatches
from .split import describe_split, find_body, split_model, sync_tied_grads

__all__ += ["PipelineExecutor", "Record", "microbatches", "describe_split", "find_body", "split_model",
            "sync_tied_grads"]
