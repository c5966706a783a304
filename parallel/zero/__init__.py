"""ZeRO (Rajbhandari et al., arXiv 1910.02054): optimizer state, gradients and parameters
partitioned over the dp axis. See optimizer.py for the entry point."""
from parallel.data_parallel.bucket import FlatBucket
from parallel.zero.meta_init import InitRecord, deferred_init
from parallel.zero.optimizer import NonFiniteError, StepResult, ZeroOptimizer
from parallel.zero.stage3 import plan_units

__all__ = ["ZeroOptimizer", "StepResult", "NonFiniteError", "deferred_init", "InitRecord", "FlatBucket", "plan_units"]
