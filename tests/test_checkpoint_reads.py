"""Checkpoint IO in proportion to a rank's own shard (issue 25, item 3).

The layout probe runs on the meta device (no copy of the model) and gives the same positions as the
float64 value probe; a load reads exactly the byte ranges of the rank's pieces — counted, per rank, at 8
real ranks. (The simulated ranks of a 4096-rank job plan their load without a checkpoint: tests/test_simulate.py.)
"""
import pytest
import torch
from engine_cases import config, layout, train
from harness import run_ranks

HEADER_BYTES = 600          # zip end record + central directory + local header per stored item (measured: 515)


def _probe(rank, world, model, lay):
    from parallel.checkpoint.layout import probe_origins
    from parallel.checkpoint.meta_probe import meta_origins
    from parallel.config import import_object
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = config(model, lay, world)
    p = cfg.parallel
    torch.manual_seed(0)
    m = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
    engine = parallelize(m, cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp))
    meta = meta_origins(engine.template, engine._shard, engine.stages, engine.tp.size, engine.tp.rank)
    ref = probe_origins(engine.template, engine._shard, engine.stages)
    assert sorted(meta) == sorted(ref)
    for k, o in ref.items():
        got = meta[k]
        assert (got.name, got.full_shape) == (o.name, o.full_shape)
        assert torch.equal(got.index.full(), o.index), o.name
        a, e = 3, max(4, got.index.numel - 2)                   # a range inside, as a ZeRO piece asks
        assert torch.equal(got.index.range(a, e), o.index.reshape(-1)[a:e]), o.name
    engine.close()
    return len(ref)


LLAMA_PAD = ["model.kwargs.vocab_size=101", "data.kwargs.vocab_size=101", "model.kwargs.num_key_value_heads=1",
             "model.kwargs.tie_word_embeddings=true"]


@pytest.mark.parametrize("model,world,lay", [
    ("gpt", 2, layout(1, 2, 1, 1)),                              # fused qkv sections, row/column splits
    ("gpt", 2, layout(1, 1, 2, 1)),                              # pipeline split, tied embedding copied
    pytest.param("llama", 2, layout(1, 2, 1, 1) + LLAMA_PAD, marks=pytest.mark.slow),   # padded vocab, kv 1, tied
    pytest.param("llama", 4, layout(1, 4, 1, 1) + LLAMA_PAD, marks=pytest.mark.slow),
    pytest.param("gpt", 4, layout(1, 2, 2, 1), marks=pytest.mark.slow),
    pytest.param("llama", 4, layout(1, 2, 2, 1), marks=pytest.mark.slow)],
    ids=["gpt-tp2", "gpt-pp2", "llama-tp2-pad-kv1-tied", "llama-tp4-pad-kv1", "gpt-tp2-pp2", "llama-tp2-pp2"])
def test_meta_probe_equals_the_float64_probe(model, world, lay):
    assert all(n > 0 for n in run_ranks(_probe, world, model, lay))


def _reads(rank, world, d, lay, lay2):
    """Train 2 steps and save (layout ``lay``); resume into ``lay2``: the bytes the load read, and this
    rank's shard — the elements of its ZeRO partition × (fp32 value + Adam's two moments)."""
    ck = [f"train.checkpoint.dir={d}", "train.steps=2"]
    _, eng = train(rank, world, "gpt", lay + ck + ["train.checkpoint.every=2"])
    want = eng.full_state_dict()
    eng.close()
    _, eng2 = train(rank, world, "gpt", lay2 + ck + ["train.resume=true"])
    st, z = eng2.checkpoint_reads, eng2.zero
    shard = sum(e - a for _, _, a, e, _ in z._pieces)            # gpt: no vocabulary padding
    got = eng2.full_state_dict()
    same = None if want is None else all(torch.equal(got[k], want[k]) for k in want)
    out = {"data": st.data, "headers": st.headers, "fallback": st.fallback, "metadata": st.metadata,
           "items": st.items, "whole": st.whole_tensors, "shard": shard, "local": z.num_params,
           "coord": (eng2.mesh.coord["pp"], eng2.mesh.coord["tp"]), "same": same}
    eng2.close()
    return out


def _check_reads(res, dp):
    for r in res:
        assert r["data"] == 12 * r["shard"], r                    # exactly its shard: 4 + 8 bytes per element
        assert r["fallback"] == 0 and 0 < r["headers"] <= HEADER_BYTES * r["items"], r
        assert r["whole"] >= r["data"], r                        # the former loader read the touched tensors whole
    by = {}
    for r in res:
        by.setdefault(r["coord"], []).append(r)
    for rs in by.values():                                         # the dp ranks of a (pp, tp) cover its params once
        assert len(rs) == dp and sum(r["shard"] for r in rs) == rs[0]["local"], rs
    assert res[0]["same"] is True


@pytest.mark.slow
def test_eight_ranks_read_their_own_shard(tmp_path):
    """dp2 × tp2 × pp2, ZeRO-1, saved and resumed in the same layout, then into dp4 × tp2 (ZeRO-2)."""
    res = run_ranks(_reads, 8, str(tmp_path / "a"), layout(2, 2, 2, 1), layout(2, 2, 2, 1))
    _check_reads(res, 2)
    for r in res:
        print({k: r[k] for k in ("coord", "data", "headers", "metadata", "items", "whole")})
    res = run_ranks(_reads, 8, str(tmp_path / "b"), layout(2, 2, 2, 1), layout(4, 2, 1, 2))
    _check_reads(res, 4)


def test_two_ranks_read_their_own_shard(tmp_path):
    """dp2 ZeRO-1 (the default suite's share of the 8-rank check)."""
    _check_reads(run_ranks(_reads, 2, str(tmp_path / "a"), layout(2, 1, 1, 1), layout(2, 1, 1, 1)), 2)
