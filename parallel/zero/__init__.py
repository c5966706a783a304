"""ZeRO (Rajbhandari et al., arXiv 1910.02054): optimizer state, gradients and parameters
partitioned over the dp axis. See optimizer.py for the entry point."""
from .meta_init import InitRecord, deferred_init
from .optimizer import StepResult, ZeroOptimizer
from .partition import FlatBucket
from .stage3 import plan_units

__all__ = ["ZeroOptimizer", "StepResult", "deferred_init", "InitRecord", "FlatBucket", "plan_units"]
