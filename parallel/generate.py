"""Text generation for causal LMs: on a plain model (e.g. ``launch.consolidate.consolidated_model(dir)``)
or on a trained :class:`~parallel.engine.Engine` of any layout, without consolidating it.

Each new token is drawn from the last position's logits z: greedy takes argmax z; otherwise
p = softmax(z / temperature) restricted to the ``top_k`` largest (the rest set to −∞ before the
softmax), sampled with ``generator`` (torch.multinomial). The whole (cropped) sequence is run again
for every token — no KV cache: this is an inspection tool, not a server.

On an engine (collective: every rank calls it with the same prompts and seed): ZeRO-3 parameters
are gathered for the call; tensor-parallel logits split by vocabulary are all-gathered over tp (the
padding of an uneven vocabulary dropped), so every tp rank draws the same token from the same
numbers and the same seed; with pp the stages run forward in turn (as
:meth:`Engine.eval_step` does), the last stage draws the token and broadcasts it over pp.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from launch.train import input_vocab
from parallel import comm
from parallel.engine import Engine
from parallel.loss import logits_of
from parallel.tensor_parallel.uneven import gather_vocab_logits

__all__ = ["generate", "sample_next"]


def sample_next(logits: torch.Tensor, greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[b, V] logits → [b, 1] token ids (module docstring)."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 (got {temperature}); use greedy=True for argmax")
    z = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"generate: top_k must be ≥ 1, got {top_k}")
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.multinomial(F.softmax(z, -1).cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, max_len: int | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """``input_ids`` [b, s] followed by up to ``max_new_tokens`` generated ids (stops early when every row
    has produced ``eos_id``). ``max_len``: crop the context to its last ``max_len`` tokens (a model with a
    fixed number of positions). ``model``: an nn.Module or an Engine."""
    if input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    _check_prompt(model, input_ids, max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    last = _engine_last_logits if isinstance(model, Engine) else _module_last_logits
    ids, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool)
    was = _set_eval(model)
    try:
        for _ in range(max_new_tokens):
            ctx = ids if max_len is None else ids[:, -max_len:]
            nxt = last(model, ctx, lambda z: sample_next(z, greedy, temperature, top_k, gen))
            ids = torch.cat([ids, nxt.to(ids.device)], 1)
            if eos_id is not None:
                done |= nxt.reshape(-1).cpu() == eos_id
                if bool(done.all()):
                    break
    finally:
        _restore(model, was)
    return ids


def _check_prompt(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Token ids in [0, V) of the model's input embedding, and a count ≥ 0. An id ≥ V gave a plain model's
    "IndexError: index out of range in self", and under tp no error at all: each rank's vocabulary-parallel
    embedding masks ids outside its range, so the prompt token became a zero vector and generation went on."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"generate: input_ids must be integer token ids, got {input_ids.dtype}")
    vocab = input_vocab(model.template if isinstance(model, Engine) else model)
    if vocab is not None and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"generate: token ids must lie in [0, {vocab}) (the model's input vocabulary), got "
                             f"{lo}..{hi}: encode the prompt with the model's tokenizer")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}")


def _modules(model):
    return list(model.stages) if isinstance(model, Engine) else [model]


def _set_eval(model) -> list:
    mods = _modules(model)
    was = [m.training for m in mods]
    for m in mods:
        m.eval()
    return was


def _restore(model, was: list) -> None:
    for m, w in zip(_modules(model), was):
        m.train(w)


def _module_last_logits(model, ids, draw):
    dev = next((p.device for p in model.parameters()), ids.device)
    return draw(logits_of(model(ids.to(dev)))[:, -1])


def _full_vocab(engine, logits):
    tpc = engine.tensor_parallel
    if tpc is None or not tpc.vocab_parallel_output:
        return logits
    return gather_vocab_logits(logits.contiguous(), engine.tp, input_vocab(engine.template))


def _engine_last_logits(engine, ids, draw):
    ids = engine._to(ids)
    gathered = engine.zero.gathered() if engine.cfg.zero.stage == 3 else contextlib.nullcontext()
    with gathered:
        if engine.executor is None:
            return draw(_full_vocab(engine, logits_of(engine.module(ids))[:, -1]))
        p, n = engine.pp.size, engine.pp.size * len(engine.stages)
        mine = {engine.pp.rank + j * p: st for j, st in enumerate(engine.stages)}
        h, nxt = ids, torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        for s in range(n):
            if s not in mine:
                continue
            if s > 0:
                h = comm.recv(engine.pp.ranks[(s - 1) % p], engine.pp, device=engine.mesh.device)
            out = mine[s](h)
            if s < n - 1:
                comm.isend(out, engine.pp.ranks[(s + 1) % p], engine.pp).wait()
            else:
                nxt = draw(_full_vocab(engine, logits_of(out)[:, -1]))
        comm.broadcast(nxt, engine.pp, src=engine.pp.size - 1)
        return nxt
