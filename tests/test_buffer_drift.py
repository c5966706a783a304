"""A buffer the forward updates from its batch drifts apart over dp ranks: the engine names it after step 1.

The model centres each block's input by an EMA of the batch mean kept in a buffer (a custom normaliser,
not BatchNorm). At dp = 2 each rank updates it from its own samples: after the first step the two ranks'
buffers differ (asserted: the drift is real, and a checkpoint would keep dp rank 0's value), and
dp rank 0 warns naming the buffers (parallel/data_parallel/buffer_drift.py). A model whose buffers the
forward does not write (a constant shift) and BatchNorm's statistics (parallel.sync_batchnorm's) are not
named; a checkpoint load before the first step is not taken for a forward write.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks


class Centre(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.register_buffer("mean", torch.zeros(h))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * x.detach().reshape(-1, x.shape[-1]).mean(0))
        return x - self.mean


class Block(nn.Module):
    def __init__(self, h, centre):
        super().__init__()
        self.centre = Centre(h) if centre else nn.Identity()
        self.bn = nn.BatchNorm1d(h)
        self.fc = nn.Linear(h, h)

    def forward(self, x):
        x = self.centre(x)
        return x + self.fc(F.gelu(self.bn(x.transpose(1, 2)).transpose(1, 2)))


class Net(nn.Module):
    def __init__(self, centre=True, vocab=16, h=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(Block(h, centre) for _ in range(2))
        self.register_buffer("shift", torch.full((h,), 0.1))        # read, never written
        self.head = nn.Linear(h, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.shift
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _body(rank, world, centre, ckpt):
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build"},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 4, "micro_batch_size": 2},
        "parallel": {"dp": world, "sync_batchnorm": True}}).validate(world)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = parallelize(Net(centre), cfg, Mesh(dp=world))
        if ckpt:                               # a load before the first step replaces the buffers: no forward write
            engine.stages[0].shift.add_(1.0)
            engine.save(ckpt)
            engine.load(ckpt)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            x = torch.randint(0, 16, (2, 6), generator=g)[rank::world].repeat(2, 1)
            engine.train_step((x, (x + 1) % 16))
    said = [str(w.message) for w in caught if "changed the model's buffer" in str(w.message)]
    bufs = {n: b.clone() for n, b in engine.stages[0].named_buffers() if b.is_floating_point()}
    engine.close()
    return said, bufs


def test_forward_written_buffers_are_named_on_dp_rank_0():
    (said0, b0), (said1, b1) = run_ranks(_body, 2, True, None, timeout=120)
    assert not torch.equal(b0["blocks.0.centre.mean"], b1["blocks.0.centre.mean"])     # the drift is real
    assert len(said0) == 1 and not said1, (said0, said1)
    assert "blocks.0.centre.mean, blocks.1.centre.mean: the forward updates them" in said0[0], said0[0]
    assert "With 2 dp ranks" in said0[0] and "shift" not in said0[0] and ".bn." not in said0[0], said0[0]


def test_buffers_the_forward_only_reads_are_not_named(tmp_path):
    (said0, b0), (said1, b1) = run_ranks(_body, 2, False, str(tmp_path / "ck"), timeout=120)
    assert not said0 and not said1
    torch.testing.assert_close(b0["shift"], b1["shift"])
    torch.testing.assert_close(b0["blocks.0.bn.running_mean"], b1["blocks.0.bn.running_mean"])   # synchronised
