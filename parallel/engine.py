"""parallelize(model, config) → an Engine that trains the model over the 3D mesh.

The engine only composes: tensor parallelism inside each pipeline stage, the pipeline split over
the pp axis, and ZeRO over the dp axis of each (pp, tp) coordinate. Each part lives in its own
module; this file decides the order and passes each part its group.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import comm
from .config import Config
from .data import split_micro
from .loss import resolve_loss
from .mesh import Mesh
from .optim import optimizer_factory


class Engine:
    """Train/eval one step at a time. ``train_step(batch)`` takes this dp rank's share of the
    global batch (``parallel.data.rank_batch``) and returns the mean loss over the global batch."""

    def __init__(self, model: nn.Module, config: Config, mesh: Mesh):
        self.cfg, self.mesh = config, mesh
        self.loss_fn = resolve_loss(config.loss)
        self.model = model.to(mesh.device)
        self.dp = mesh.group("dp")
        self.optimizer = optimizer_factory(config.optimizer)(list(self.model.parameters()))
        self.step_count = 0

    def _sync_grads(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.dp.size == 1 or not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        comm.all_reduce(flat, self.dp)
        flat /= self.dp.size
        off = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n

    def _mean_over_dp(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        comm.all_reduce(t, self.dp.control())
        return t.item() / self.dp.size

    def train_step(self, batch) -> float:
        self.model.train()
        micro = split_micro(batch, self.cfg.data.micro_batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in micro:
            x, y = x.to(self.mesh.device), y.to(self.mesh.device)
            loss = self.loss_fn(self.model(x), y) / len(micro)
            loss.backward()
            total += loss.item()
        self._sync_grads()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        return self._mean_over_dp(total)

    def full_model(self) -> nn.Module:
        """The whole, unsharded model (collective; the result is meaningful on rank 0)."""
        return self.model

    @torch.no_grad()
    def eval_step(self, batch) -> float:
        self.model.eval()
        micro = split_micro(batch, self.cfg.data.micro_batch_size)
        total = sum(self.loss_fn(self.model(x.to(self.mesh.device)), y.to(self.mesh.device)).item()
                    for x, y in micro) / len(micro)
        return self._mean_over_dp(total)


def parallelize(model: nn.Module, config: Config, mesh: Mesh | None = None) -> Engine:
    """Compose the configured parallelism around ``model`` (built identically on every rank)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize needs an nn.Module, got {type(model).__name__}")
    p = config.parallel
    mesh = mesh or Mesh(pp=p.pp, dp=p.dp, tp=p.tp)
    return Engine(model, config, mesh)
