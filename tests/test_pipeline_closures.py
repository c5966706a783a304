"""Stage copies never call modules they do not own: functions kept on modules (minGPT's
``self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))``) survive the stage's deepcopy by
reference, so before the fix a stage ran the *original* modules (wrong gradients under pp; under
ZeRO-3 a crash, "mat2 must be a matrix"). Exact against one process at pp2 and pp2 × dp2 ZeRO-3."""
import torch.nn as nn
from harness import run_ranks
from reference import assert_close_curve, reference_losses

V, H, L, S = 32, 16, 4, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(H)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(H, 4 * H), c_proj=nn.Linear(4 * H, H), act=nn.GELU()))
        m = self.mlp
        self.mlpf = lambda x: m.c_proj(m.act(m.c_fc(x)))          # minGPT's closure over its own modules

    def forward(self, x):
        return x + self.mlpf(self.ln(x))


class MinGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.blocks = nn.ModuleList([Block() for _ in range(L)])
        self.ln_f = nn.LayerNorm(H)
        self.head = nn.Linear(H, V)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def build():
    return MinGPT()


def _cfg(dp, pp, stage):
    from parallel.config import load_config
    return load_config(data={
        "model": {"factory": "test_pipeline_closures:build"},
        "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": S, "vocab_size": V},
                 "global_batch_size": 8, "micro_batch_size": 8 // (dp * 2)},
        "parallel": {"dp": dp, "pp": pp}, "zero": {"stage": stage},
        "optimizer": {"name": "adamw", "lr": 0.01}, "train": {"steps": 4, "seed": 0, "metrics_file": None}})


def _train(rank, world, dp, pp, stage):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _cfg(dp, pp, stage).validate(world)
    out = run(cfg, Mesh(pp=pp, dp=dp), print_fn=lambda *a, **k: None)
    for st in out["engine"].stages:                 # every function kept on a stage calls the stage's own modules
        for mod in st.modules():
            fn = vars(mod).get("mlpf")
            if fn is not None:
                assert fn.__closure__[0].cell_contents is mod.mlp
    return out["losses"]


def test_closures_rebound_pp2():
    want = reference_losses(_cfg(1, 2, 0))
    for losses in run_ranks(_train, 2, 1, 2, 0):
        assert_close_curve(losses, want, 1e-5, "minGPT closures, pp2")


def test_closures_rebound_pp2_dp2_zero3():
    want = reference_losses(_cfg(2, 2, 3))
    for losses in run_ranks(_train, 4, 2, 2, 3):
        assert_close_curve(losses, want, 1e-5, "minGPT closures, pp2 × dp2 ZeRO-3")
