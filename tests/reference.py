"""The single-process reference every layout is compared with: a plain PyTorch loop.

It follows the parity contract of DESIGN.md literally — seed, factory, whole global batch in one
forward, mean loss, torch optimizer with the configured fields — and shares no code with the
engine beyond the config object, the factories and the dataset index rule.
"""
import torch
from torch.utils.data import default_collate

from parallel.config import Config, import_object
from parallel.data import global_indices
from parallel.loss import resolve_loss
from parallel.optim.factory import optimizer_factory


def reference_losses(cfg: Config, steps: int | None = None, return_model: bool = False):
    torch.manual_seed(cfg.train.seed)
    model = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
    data = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    loss_fn = resolve_loss(cfg.loss)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    losses = []
    for t in range(cfg.train.steps if steps is None else steps):
        idx = global_indices(t, cfg.data.global_batch_size, len(data), cfg.train.seed, cfg.data.shuffle)
        x, y = default_collate([data[i] for i in idx])
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        losses.append(loss.item())
    return (losses, model) if return_model else losses


def assert_close_curve(got, want, rtol, what="", atol=0.0):
    assert len(got) == len(want), f"{what}: {len(got)} losses, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= rtol * abs(w) + atol, \
            f"{what}: step {i}: loss {g!r} vs reference {w!r} (rtol {rtol}, atol {atol})"
