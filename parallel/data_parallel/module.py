"""Plain data parallelism for a user's own optimizer: a module wrapper over :class:`GradReducer`."""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel.comm import Group
from parallel.data_parallel.bucket import FlatBucket, make_buckets
from parallel.data_parallel.reducer import GradReducer
from parallel.parameters import param_info

__all__ = ["DataParallel"]


class DataParallel(nn.Module):
    """Plain data parallelism for a user's own optimizer (torch DDP's contract on a counted group).

    ``DataParallel(module, dp_group, bucket_mb=25)``: after ``loss.backward()`` every ``p.grad`` is
    the dp mean (the reduction is waited for at the end of backward); ``no_sync()`` or
    ``prepare_step(m)`` for accumulation; ``finish_grad_sync()`` when deferred params exist.
    Replicas must start identical (seed before building the model, as the parity contract says).
    """

    def __init__(self, module: nn.Module, dp_group: Group, bucket_mb: float = 25.0):
        super().__init__()
        if not isinstance(dp_group, Group):
            raise TypeError(f"dp_group must be a parallel.comm.Group (mesh.group('dp')), got {type(dp_group).__name__}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be positive")
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("DataParallel: the module has no parameters that require grad")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"DataParallel: parameters have mixed dtypes {dtypes}; cast the model to one dtype")
        dtype = dtypes.pop()
        esize = torch.empty(0, dtype=dtype).element_size()
        deferred = [(n, p) for n, p in named if param_info(p).defer_reduce]
        normal = [(n, p) for n, p in named if not param_info(p).defer_reduce]
        buckets = make_buckets(normal, bucket_mb * 2 ** 20, esize, dp_group.size, dp_group.rank, pad=False)
        d = None
        if deferred:
            d = FlatBucket(len(buckets), deferred, dp_group.size, dp_group.rank, pad=False)
            d.deferred = True
        self.reducer = GradReducer(buckets, dp_group, "all_reduce", dtype, True, d, auto_reset=True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return self.reducer.no_sync()

    def prepare_step(self, num_micro_batches: int = 1) -> None:
        self.reducer.prepare_step(num_micro_batches)

    def finish_grad_sync(self) -> None:
        self.reducer.finish()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.reducer.zero_grad()
