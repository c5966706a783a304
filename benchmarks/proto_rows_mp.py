"""Model-parallel rows of the benchmark protocol: tensor parallel and pipeline parallel, ours against
torch's own, on the whole global batch (``per · world`` sequences: tp or pp spans every rank, dp = 1).

* ``tp_dtensor``: torch's DTensor TP as its tutorial runs it — ``parallelize_module`` with
  ``ColwiseParallel`` on ``attn.qkv`` and ``mlp.fc`` and ``RowwiseParallel`` on ``attn.proj`` and
  ``mlp.proj`` per block, the attention's head count divided by t (as torchtitan does). The fused
  qkv weight's rows are first permuted to [q_0 k_0 v_0 | q_1 k_1 v_1 …] so that each rank's contiguous
  column shard holds its own heads of q, k and v (the same function of the input: a permutation of
  the layer's outputs that the attention's split undoes). Embeddings, norms and the tied head stay
  replicated (DTensor TP of a tied vocabulary head needs loss_parallel and untying; we leave it out
  and say so). Wire bytes (theory): per block 2 all-reduces forward and 2 backward of b·s·h.
* ``tp_ours``: our engine with ``parallel.tp = world`` (the automatic plan: vocab-parallel
  embedding and head, Megatron's column/row pairs), its bytes measured by CommStats.
* ``pp_torch``: ``torch.distributed.pipelining`` — two ``PipelineStage`` modules cut at the middle
  block (embeddings on the first, norm and head on the last, the tied embedding as two copies whose
  gradients are summed between the end stages after backward, as users of untied PP do by hand),
  ``Schedule1F1B`` over ``PP_MICRO`` micro-batches; its loss is the mean over micro-batches, sent from
  the last stage to all. Wire bytes (theory, per rank): b·s·h per micro-batch sent (activations
  forward from the first stage, their gradients back from the last), plus the tied gradient's all-reduce.
* ``pp_ours``: our engine with ``parallel.pp = world``, ``pp_schedule = 1f1b``, the same micro-batches.

Every row's step returns the global-batch loss on every rank (``Row.global_loss``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MP_ROWS = ["tp_dtensor", "tp_ours", "pp_torch", "pp_ours", "pp_1f1b_m8", "pp_zbh1_m8", "pp_zbv_m8"]
PP_MICRO = 2
# Issue 19's wall-clock rows: pp = world with m = 8 micro-batches, the same global batch, three schedules.
PP_M8 = {"pp_1f1b_m8": ("1f1b", 1), "pp_zbh1_m8": ("zero_bubble", 1), "pp_zbv_m8": ("zb_v", 2)}
WHAT_MP = {"tp_dtensor": "torch DTensor TP (Colwise/Rowwise per block)", "tp_ours": "ours tensor parallel",
           "pp_torch": f"torch pipelining Schedule1F1B, {PP_MICRO} micro-batches",
           "pp_ours": f"ours 1F1B, {PP_MICRO} micro-batches",
           "pp_1f1b_m8": "ours 1F1B, 8 micro-batches", "pp_zbh1_m8": "ours ZB-H1 (I/W split), 8 micro-batches",
           "pp_zbv_m8": "ours ZB-V (2 stages per rank), 8 micro-batches"}
PEER_OF_MP = {"tp_ours": "tp_dtensor", "pp_ours": "pp_torch", "pp_zbh1_m8": "pp_1f1b_m8", "pp_zbv_m8": "pp_zbh1_m8"}


def micro_sizes(rows, per: int, world: int) -> list:
    """Sequences per micro-batch of the pipeline rows among ``rows`` (their compute rate is calibrated too)."""
    out = [per * world // PP_MICRO for r in rows if r in ("pp_ours", "pp_torch")]
    return sorted(set(out + [per * world // 8 for r in rows if r in PP_M8]))


def _global_batch(kw, per, world):
    from examples.gpt import random_tokens
    ds = random_tokens(per * world, kw["seq_len"], kw["vocab_size"])
    return tuple(torch.stack(t) for t in zip(*(ds[i] for i in range(per * world))))


def build_mp(name: str, kw: dict, per: int, world: int, rank: int, row_cls, op, lr: float, wd: float):
    """Row ``name`` (module docstring); ``row_cls``/``op``: proto_rows' Row and _op."""
    if name == "tp_ours":
        return _ours(kw, per, world, row_cls, lr, wd, {"tp": world}, {"dp": 1, "tp": world})
    if name == "pp_ours":
        lay = {"dp": 1, "pp": world, "micro_batches": PP_MICRO, "schedule": "1f1b"}
        return _ours(kw, per, world, row_cls, lr, wd, {"pp": world, "pp_schedule": "1f1b"}, lay,
                     micro=per * world // PP_MICRO)
    if name in PP_M8:
        sched, v = PP_M8[name]
        par = {"pp": world, "pp_schedule": sched, **({"pp_virtual_stages": v} if v > 1 else {})}
        lay = {"dp": 1, "pp": world, "micro_batches": 8, "schedule": sched, **({"v": v} if v > 1 else {})}
        return _ours(kw, per, world, row_cls, lr, wd, par, lay, micro=per * world // 8)
    if name == "tp_dtensor":
        return _tp_dtensor(kw, per, world, row_cls, op, lr, wd)
    if name == "pp_torch":
        return _pp_torch(kw, per, world, rank, row_cls, op, lr, wd)
    raise ValueError(f"unknown model-parallel row {name!r} (choose from {MP_ROWS})")


def _ours(kw, per, world, row_cls, lr, wd, par, layout, micro=None):
    from examples.gpt import GPT, random_tokens
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    G = per * world
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": G, "micro_batch_size": micro or G,
                 "kwargs": {"n": G, "seq_len": kw["seq_len"], "vocab_size": kw["vocab_size"]}},
        "parallel": par, "optimizer": {"name": "adamw", "lr": lr, "weight_decay": wd}}).validate(world)
    ds = random_tokens(G, kw["seq_len"], kw["vocab_size"])
    mesh = Mesh(**{k: v for k, v in par.items() if k in ("tp", "pp")})
    torch.manual_seed(0)
    engine = parallelize(GPT(**kw), cfg, mesh)
    batch = tuple(torch.stack(t) for t in zip(*(ds[i] for i in range(G))))
    owned = sum(p.numel() for g in engine.zero.optimizer.param_groups for p in g["params"])
    row = row_cls("ours", lambda: engine.train_step(batch), owned=owned, source="measured", ours=True, layout=layout)
    row.stats, row.engine = mesh.stats, engine                 # engine: benchmarks/proto_profile.py's phases
    return row


def _permute_qkv(lin: nn.Linear, t: int, h: int) -> None:
    """Rows [q; k; v] → [q_0 k_0 v_0 | … | q_{t−1} k_{t−1} v_{t−1}] (each a block of h/t rows)."""
    c = h // t
    idx = torch.cat([torch.arange(j * h + r * c, j * h + (r + 1) * c) for r in range(t) for j in range(3)])
    with torch.no_grad():
        lin.weight.copy_(lin.weight[idx])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[idx])


def _tp_dtensor(kw, per, world, row_cls, op, lr, wd):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from examples.gpt import GPT
    torch.manual_seed(0)
    model, h, V, t = GPT(**kw), kw["n_embd"], kw["vocab_size"], world
    mesh = init_device_mesh("cpu", (t,))
    for blk in model.blocks:
        _permute_qkv(blk.attn.qkv, t, h)
        blk.attn.n_head //= t
        parallelize_module(blk, mesh, {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                       "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})
    x, y = _global_batch(kw, per, world)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()
    act, L = x.numel() * h * 4, kw["n_layer"]
    comm: dict = {}
    op(comm, "all_reduce", 4 * L, 4 * L * 2 * (t - 1) / t * act)
    owned = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return row_cls("tp_dtensor", step, owned=owned, comm=comm, layout={"dp": 1, "tp": t})


def _pp_torch(kw, per, world, rank, row_cls, op, lr, wd):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from examples.gpt import GPT
    if world != 2:
        raise ValueError(f"pp_torch: built for 2 stages (world 2), not {world}")
    torch.manual_seed(0)
    full, V, L, h = GPT(**kw), kw["vocab_size"], kw["n_layer"], kw["n_embd"]
    cut = L // 2

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe, self.blocks = full.wte, full.wpe, nn.ModuleList(full.blocks[:cut])

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return x

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.ln_f = nn.ModuleList(full.blocks[cut:]), full.ln_f
            self.lm_head = nn.Linear(h, V, bias=False)
            with torch.no_grad():
                self.lm_head.weight.copy_(full.wte.weight)        # the tied weight's second copy

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.lm_head(self.ln_f(x))
    mod = First() if rank == 0 else Last()
    tied = mod.wte.weight if rank == 0 else mod.lm_head.weight
    stage = PipelineStage(mod, rank, 2, torch.device("cpu"))
    sched = Schedule1F1B(stage, PP_MICRO, loss_fn=lambda out, tgt: F.cross_entropy(out.reshape(-1, V), tgt.reshape(-1)))
    x, y = _global_batch(kw, per, world)
    opt = torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=wd)

    def step():
        opt.zero_grad()
        losses: list = []
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y, losses=losses)
        dist.all_reduce(tied.grad)                   # the tied embedding: both copies get the summed gradient
        opt.step()
        loss = torch.tensor([sum(float(v) for v in losses) / PP_MICRO if rank == 1 else 0.0], dtype=torch.float64)
        dist.broadcast(loss, src=1)
        return loss.item()
    act = x.numel() // PP_MICRO * h * 4
    comm: dict = {}
    op(comm, "send_recv", PP_MICRO, PP_MICRO * act)       # per rank: activations out (or gradients back)
    op(comm, "all_reduce", 1, V * h * 4)
    owned = sum(p.numel() for p in mod.parameters())
    return row_cls("pp_torch", step, owned=owned, comm=comm,
                   layout={"dp": 1, "pp": 2, "micro_batches": PP_MICRO, "schedule": "1f1b"})
