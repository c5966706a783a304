"""A small GPT (Radford et al. 2019) written as an ordinary PyTorch model, plus its datasets.

Nothing here knows about parallelism: the framework converts it (tensor-parallel plan, pipeline
split, ZeRO) from the outside. Layout, as the TP plan and the pipeline splitter see it:

    GPT.wte   token embedding (vocab, h)        GPT.wpe   position embedding (seq, h)
    GPT.blocks = ModuleList[Block]:  ln1 → attn (qkv: h → 3h fused [q; k; v], proj: h → h)
                                     ln2 → mlp  (fc: h → 4h, GELU, proj: 4h → h)
    GPT.ln_f, GPT.lm_head (h → vocab, weight tied to wte when tie=True)

Factories are referenced from configs as "examples.gpt:build" and "examples.gpt:char_dataset".
"""
from __future__ import annotations

import inspect
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Megatron-style plan (parallel/tp_plan.py): the fused qkv is split by heads (q, k, v each), the MLP
# column then row, the tied wte/lm_head by vocabulary (logits stay vocab-split for the vocab-parallel
# loss). With sequence parallel the residual stream is sequence-split from wte (reduce-scatter) to
# lm_head (all-gather); wpe keeps this rank's positions; LayerNorm grads are summed over tp.
TP_PLAN = {
    "wte": "vocab",
    "wpe": "seq_scatter_output",
    "blocks.*.attn.qkv": "colwise_qkv",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
    "lm_head": "colwise_vocab",
}


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def forward(self, x, attention_mask=None):
        """``attention_mask``: None (causal) or bool [b, 1, s, s], True where query t may attend key u
        (packed documents: :func:`parallel.corpus.document_mask`, causal inside each document)."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_head * self.head_dim, dim=-1)
        q, k, v = (t.view(b, s, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, s, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x, attention_mask=None):
        x = x + self.attn(self.ln1(x), attention_mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size=64, seq_len=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0, tie=True):
        super().__init__()
        self.seq_len = seq_len
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():       # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, position_ids=None, attention_mask=None):
        """``position_ids`` (optional, (s,) or (b, s)): the tokens' positions, as in transformers models
        (context parallelism gives each rank its shard's global positions; packed documents restart).
        ``attention_mask`` (optional, bool [b, 1, s, s]): which keys each query sees — the document mask
        of packed samples (``PackedCorpus(mask="4d")``, the quickstart); None: causal over the window."""
        s = idx.shape[1]
        if s > self.seq_len:
            raise ValueError(f"sequence length {s} exceeds the model's seq_len {self.seq_len}")
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
            raise ValueError(f"GPT takes attention_mask as a bool [b, 1, s, s] mask (True = attend; packed documents: "
                             f"PackedCorpus(mask='4d')), got {attention_mask.dtype} {tuple(attention_mask.shape)}; a "
                             f"[b, s] padding mask is not needed by this causal model with right padding: drop it "
                             f"and mark the padding's labels -100")
        pos = torch.arange(s, device=idx.device) if position_ids is None else position_ids
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x) if attention_mask is None else block(x, attention_mask)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx, n_new: int, temperature: float = 1.0, generator=None):
        for _ in range(n_new):
            logits = self(idx[:, -self.seq_len:])[:, -1] / max(temperature, 1e-6)
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx


def build(**kwargs) -> GPT:
    """Model factory for configs: ``model.factory: examples.gpt:build``."""
    return GPT(**kwargs)


build.__signature__ = inspect.signature(GPT)      # the launcher's pre-flight checks model.kwargs against it


class TokenWindows(torch.utils.data.Dataset):
    """Next-token pairs (x = tokens[i : i+s], y = tokens[i+1 : i+s+1]) over a 1-D token tensor."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int | None = None):
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len
        self.stride = stride or seq_len
        self.n = (tokens.numel() - seq_len - 1) // self.stride + 1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        w = self.tokens[i * self.stride: i * self.stride + self.seq_len + 1]
        return w[:-1], w[1:]


def random_tokens(n: int = 256, seq_len: int = 32, vocab_size: int = 64, seed: int = 0) -> TokenWindows:
    """``n`` windows of a seeded random token stream (tests: exactness needs no real text)."""
    g = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(0, vocab_size, (n * seq_len + 1,), generator=g), seq_len)


CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")


def default_corpus(path: str = CORPUS, max_chars: int = 400_000) -> str:
    """The quickstart corpus: Python's own reference documentation (the stdlib's pydoc_data
    topics), written once to ``examples/data/corpus.txt`` so every run reads the same text."""
    if not os.path.isfile(path):
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k].strip() for k in sorted(topics))[:max_chars]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


class CharCodec:
    """Characters ↔ ids over a fixed alphabet (printable ASCII), so every text maps the same way."""
    alphabet = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self):
        self.index = {c: i for i, c in enumerate(self.alphabet)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, self.index[" "]) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


def char_dataset(path: str | None = None, seq_len: int = 64, stride: int | None = None) -> TokenWindows:
    """Character-level windows of a text file (default: :func:`default_corpus`).
    Vocabulary size is ``len(CharCodec.alphabet)`` = 96."""
    path = path or default_corpus()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.kwargs.path: no text file at {path!r}; give an existing file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return TokenWindows(CharCodec().encode(f.read()), seq_len, stride)


def sample(model: GPT, cfg=None, prompt: str = "The ", n_new: int = 200, seed: int = 0) -> str:
    """``train.finish: examples.gpt:sample`` — print text generated by the trained model."""
    codec = CharCodec()
    g = torch.Generator().manual_seed(seed)
    model.eval()
    out = model.generate(codec.encode(prompt)[None], n_new, temperature=0.8, generator=g)
    text = codec.decode(out[0])
    print("--- sample ---\n" + text + "\n--------------", flush=True)
    return text
