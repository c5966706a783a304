"""Context parallelism with a sliding window and with a dense (b, 1, s, s) mask (parallel/context_parallel/masks.py):
ring and Ulysses attention against plain masked softmax attention (fp32, forward and backward, 1e-5), and
the errors. (A transformers model with a sliding window through the registered attention: the slow test.)"""
import pytest
import torch
from harness import run_ranks

from parallel.context_parallel.masks import Visibility, dense_allow


def _reference(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sc = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(sc.masked_fill(~mask[:, None], float("-inf")), -1) @ v


def _masks(b, s):
    """name → (the (b, s, s) mask one process applies, window, dense mask given to the cp context)."""
    i = torch.arange(s)
    causal = i[:, None] >= i[None, :]
    gen = torch.Generator().manual_seed(1)
    dense = (torch.rand(b, s, s, generator=gen) < 0.4) | torch.eye(s, dtype=torch.bool)   # sees future keys too
    doc = torch.tensor([0] * 7 + [1] * (s - 7))
    same = doc[:, None] == doc[None, :]
    return {"window5": ((causal & (i[:, None] - i[None, :] < 5)).expand(b, s, s), 5, None, None),
            "window3+docs": ((causal & same & (i[:, None] - i[None, :] < 3)).expand(b, s, s), 3, None, doc),
            "dense": (dense, None, dense[:, None].float().log().clamp(min=torch.finfo(torch.float32).min), None)}


def _case(rank, world, algorithm, rows=None):
    import parallel.context_parallel.blocks as blocks
    from parallel.context_parallel import ContextParallel, shard
    from parallel.context_parallel.ring import fused_blocks
    from parallel.mesh import Mesh
    mesh = Mesh(cp=world)
    b, h, hk, s, d = 2, 4, 2, 16, 8
    out = {}
    for name, (want_mask, window, dense, doc) in _masks(b, s).items():
        gen = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(b, h, s, d, generator=gen) for _ in range(2))
        k, v = (torch.randn(b, hk, s, d, generator=gen) for _ in range(2))
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref = _reference(qr, kr, vr, want_mask)
        ref.backward(dout)
        cp = ContextParallel(mesh.group("cp"), algorithm)
        pos = None if doc is None else torch.cat([torch.arange(7), torch.arange(s - 7)])
        cp.shard_batch(torch.zeros(b, s, dtype=torch.long), None, pos)
        if dense is not None:
            cp.docs = Visibility(allow=dense_allow(dense, b, s))            # what micro.shard_micro sets
        r = mesh.local_rank("cp")
        ql, kl, vl = (shard(t, world, r, dim=2).requires_grad_() for t in (q, k, v))
        old, blocks.ROWS = blocks.ROWS, rows or blocks.ROWS
        try:
            with fused_blocks(rows is None):                 # rows: the reference blocks, a few rows at a time
                o = cp.attention(ql, kl, vl, causal=True, window=window)
            o.backward(shard(dout, world, r, dim=2))
        finally:
            blocks.ROWS = old
        out[name] = max((a - shard(w, world, r, dim=2)).abs().max().item()
                        for a, w in ((o, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)))
    return out


def _all(rank, world):
    return {(a, rows): _case(rank, world, a, rows) for a, rows in (("ring", None), ("ulysses", None), ("ring", 3))}


def test_sliding_window_and_dense_mask_match_one_process():
    for res in run_ranks(_all, 2):
        for key, errs in res.items():
            assert set(errs) == {"window5", "window3+docs", "dense"}
            assert max(errs.values()) < 1e-5, (key, errs)


def test_mask_errors():
    with pytest.raises(ValueError, match="per-head attention mask"):
        dense_allow(torch.zeros(2, 4, 8, 8), 2, 8)
    with pytest.raises(ValueError, match="additive bias"):
        dense_allow(torch.full((2, 1, 8, 8), -1.5), 2, 8)
    with pytest.raises(ValueError, match="neither a \\(b, s\\) padding"):
        dense_allow(torch.zeros(2, 1, 8, 4, dtype=torch.bool), 2, 8)
    with pytest.raises(ValueError, match="positive number of tokens"):
        Visibility(window=0)
    from parallel.batch import MicroBatch as Micro
    from parallel.comm import Group
    from parallel.context_parallel import ContextParallel
    from parallel.context_parallel.micro import shard_micro
    cp = ContextParallel(Group(None, "cp", (0, 1), 0))
    m = torch.eye(8, dtype=torch.bool)[None, None].clone()
    m[0, 0, 3, 3] = False                                                  # query 3 sees nothing
    mb = Micro(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long), {"attention_mask": m})
    with pytest.raises(ValueError, match="hides every key from some query"):
        shard_micro(cp, mb, "plain", None)


# --- slow: through a transformers model -------------------------------------------------------------

def mistral_window(vocab_size=64, **kw):
    """A tiny Mistral whose attention has a sliding window of 5 tokens (sequence 16)."""
    from examples.hf_causal_lm import build
    return build("mistral", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=5, **kw)


class PrefixLM(torch.utils.data.Dataset):
    """dict_cases.Padded samples with a (1, s, s) boolean prefix-LM mask instead of the padding mask: the
    prompt's tokens see each other both ways, the rest causally; padding keys are hidden (a padding query
    sees itself)."""

    def __init__(self, **kw):
        from dict_cases import Padded
        self.inner = Padded(**kw)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        d = self.inner[i]
        am = d.pop("attention_mask").bool()
        s = am.shape[0]
        prompt = int((d["labels"] == -100).long().cumprod(0).sum())        # the leading unscored tokens
        j = torch.arange(s)
        m = ((j[:, None] >= j[None, :]) | ((j[:, None] < prompt) & (j[None, :] < prompt))) & am[None, :]
        d["attention_mask"] = (m | torch.eye(s, dtype=torch.bool))[None]
        return d


def prefix_lm(**kw):
    return PrefixLM(**kw)


def _train_window(rank, world, overrides):
    from engine_cases import train
    return train(rank, world, "llama", overrides)[0]


def _train_dict(rank, world, overrides):
    from dict_cases import config

    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config("llama", overrides, world, factory="test_context_parallel_masks:prefix_lm")
    return run(cfg, Mesh(cp=cfg.parallel.cp), print_fn=lambda *a, **k: None)["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_mistral_sliding_window_and_llama_prefix_mask_cp2(algorithm):
    from dict_cases import config as dict_config
    from dict_cases import reference as dict_reference
    from engine_cases import config
    from reference import assert_close_curve, reference_losses
    window = ["model.factory=test_context_parallel_masks:mistral_window", "train.steps=4"]
    got = run_ranks(_train_window, 2, window + ["parallel.cp=2", f"parallel.cp_algorithm={algorithm}"], timeout=300)
    want = reference_losses(config("llama", window))
    for losses in got:
        assert_close_curve(losses, want, 1e-5, f"mistral window cp2 {algorithm}")
    cp = ["parallel.cp=2", f"parallel.cp_algorithm={algorithm}"]
    got = run_ranks(_train_dict, 2, cp, timeout=300)
    want = dict_reference(dict_config("llama", [], factory="test_context_parallel_masks:prefix_lm"))
    for losses in got:
        assert_close_curve(losses, want, 1e-5, f"llama prefix-LM 4-D mask cp2 {algorithm}")
