"""ParamInfo: one record per Parameter, the only protocol the parallel layers use for per-parameter facts."""
import os
import re

import torch
import torch.nn as nn

from parallel.parameters import ParamInfo, param_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_is_created_once_and_follows_the_parameter():
    p = nn.Parameter(torch.zeros(3))
    info = param_info(p)
    assert info == ParamInfo() and not info.tp_split and info.tie is None
    info.tp_dim, info.sections = 1, (2, 1)
    assert param_info(p) is info and param_info(p).tp_split
    p.data = torch.ones(5)                                   # ZeRO swaps .data: the record stays
    assert param_info(p) is info
    q = nn.Parameter(torch.zeros(()).expand(3))             # ZeRO's meta replacement copies __dict__
    q.__dict__.update(p.__dict__)
    assert param_info(q) is info
    fresh = nn.Parameter(torch.zeros(3))
    assert param_info(fresh) == ParamInfo() and param_info(fresh) is not info


def test_no_other_per_parameter_attributes_in_the_package():
    """The former ad-hoc attributes (tp_sharded, tp_shard_dim, tp_sections, p3d_*) appear nowhere in
    parallel/ or launch/ except parameters.py, and apply_tensor_parallel sets no tp_* on the model."""
    old = re.compile(r"tp_sharded|tp_shard_dim|tp_sections|p3d_|tp_vocab_parallel_output|tp_sequence_parallel")
    hits = []
    for pkg in ("parallel", "launch"):
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                path = os.path.join(d, f)
                if f.endswith(".py") and os.path.relpath(path, ROOT) != os.path.join("parallel", "parameters.py"):
                    with open(path) as fh:
                        hits += [f"{path}:{i}" for i, line in enumerate(fh, 1) if old.search(line)]
    assert hits == []
