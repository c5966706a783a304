"""Dict-batch datasets, a nanoGPT-style model and the one-process reference for tests/test_dict_batches.py
(imported by the rank processes too)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

from parallel.config import import_object, load_config
from parallel.data import global_indices
from parallel.optim.factory import optimizer_factory


class Padded(torch.utils.data.Dataset):
    """SFT-like samples of ragged length, right-padded to ``seq_len``: input_ids (pad 0), attention_mask,
    labels (−100 on the padding and on a prompt of 1..3 tokens), so every sample scores a different count."""

    def __init__(self, n=32, seq_len=16, vocab_size=64, key="labels", seed=0, mask=True):
        self.n, self.s, self.v, self.key, self.seed, self.mask = n, seq_len, vocab_size, key, seed, mask

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        length = int(torch.randint(3, self.s + 1, (1,), generator=g))
        ids = torch.zeros(self.s, dtype=torch.long)
        ids[:length] = torch.randint(1, self.v, (length,), generator=g)
        am = (torch.arange(self.s) < length).long()
        labels = torch.where(am.bool(), ids, -100)
        labels[:int(torch.randint(1, 4, (1,), generator=g))] = -100
        if self.key == "targets":                        # aligned (nanoGPT): target t is token t+1
            labels = torch.cat([labels[1:], torch.tensor([-100])])
            labels = torch.where(labels == -100, -1, labels)
        out = {"input_ids": ids, self.key: labels}
        if self.mask:
            out["attention_mask"] = am
        return out


def padded(**kw):
    return Padded(**kw)


# --- nanoGPT (Karpathy's model.py, trimmed; forward(idx, targets) unmodified) --------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])           # inference: only the last position
            loss = None
        return logits, loss


def nanogpt(**kw):
    return NanoGPT(**kw)


# --- configs and the one-process reference ---------------------------------------------------------

MODELS = {"llama": {"factory": "examples.hf_causal_lm:llama_tiny", "kwargs": {}},
          "nanogpt": {"factory": "dict_cases:nanogpt", "kwargs": {}}}


def config(model, overrides=(), world=None, data_kwargs=None, factory="dict_cases:padded"):
    base = {"model": MODELS[model],
            "data": {"factory": factory, "kwargs": data_kwargs or {"n": 32, "seq_len": 16, "vocab_size": 64},
                     "global_batch_size": 8, "micro_batch_size": 2},
            "optimizer": {"name": "adamw", "lr": 0.003}, "train": {"steps": 3, "metrics_file": None}}
    cfg = load_config(data=base, overrides=list(overrides))
    return cfg.validate(world) if world else cfg


def reference(cfg, steps=None, return_model=False):
    """One process, the whole global batch in one forward; the loss is the mean over its scored tokens:
    the model's own (loss=model) or cross-entropy with the batch key's convention."""
    torch.manual_seed(cfg.train.seed)
    model = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
    data = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    losses = []
    for t in range(cfg.train.steps if steps is None else steps):
        idx = global_indices(t, cfg.data.global_batch_size, len(data), cfg.train.seed, cfg.data.shuffle)
        b = default_collate([data[i] for i in idx])
        key = "labels" if "labels" in b else "targets"
        y = b.pop(key)
        x = b.pop("input_ids")
        opt.zero_grad()
        if cfg.loss == "model":
            name = "targets" if isinstance(model, NanoGPT) else "labels"
            out = model(x, **b, **{name: y})
            loss = out[1] if isinstance(out, tuple) else out.loss
        else:
            out = model(x, **b)
            logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
            if key == "labels":
                logits, y = logits[:, :-1], y[:, 1:]
            y = torch.where(y < 0, -100, y)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return (losses, model) if return_model else losses


def train(rank, world, model, overrides, data_kwargs=None, factory="dict_cases:padded"):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config(model, overrides, world, data_kwargs, factory)
    p = cfg.parallel
    return run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp), print_fn=lambda *a, **k: None)["losses"]
