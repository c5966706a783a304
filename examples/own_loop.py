"""Keep your own training loop: only parallelize() is new.

    torchrun --nproc_per_node 4 examples/own_loop.py        # dp=2 × tp=2, ZeRO-2 (or any layout with pp=1)

The loop, the optimizer and the learning-rate schedule are the user's; parallelize() shards the
model (tensor parallel), the optimizer state and gradients (ZeRO) and averages gradients over dp.
With pp > 1 use ``engine.train_step(batch)``: the pipeline schedule then runs forward and backward.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.gpt import build, random_tokens  # noqa: E402
from parallel import Mesh, init_distributed  # noqa: E402
from parallel.config import load_config  # noqa: E402
from parallel.data import rank_batch  # noqa: E402
from parallel.engine import parallelize  # noqa: E402


def main():
    init_distributed()
    world = torch.distributed.get_world_size()
    tp = 2 if world % 2 == 0 else 1
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build"}, "data": {"factory": "examples.gpt:random_tokens",
                                                             "global_batch_size": 8, "micro_batch_size": 2},
        "parallel": {"dp": world // tp, "tp": tp}, "zero": {"stage": 2}}).validate(world)
    torch.manual_seed(0)
    model = build(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32)     # your model, unchanged
    data = random_tokens(64, 16, 64)

    def my_optimizer(params):                                                  # your optimizer code
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)

    mesh = Mesh(dp=cfg.parallel.dp, tp=cfg.parallel.tp)
    engine = parallelize(model, cfg, mesh, optimizer=my_optimizer)             # the only new line
    for step in range(20):                                                     # your loop
        x, y = rank_batch(data, step, cfg.data.global_batch_size, mesh.size("dp"), mesh.local_rank("dp"))
        engine.zero_grad()
        for xm, ym in zip(x.split(cfg.data.micro_batch_size), y.split(cfg.data.micro_batch_size)):
            loss = engine.loss(engine(xm), ym)
            engine.backward(loss)
        engine.step()
        if mesh.rank == 0 and step % 5 == 0:
            print(f"step {step}: micro-batch loss {loss.item():.4f}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
