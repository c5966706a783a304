"""Checkpoint pieces: save from one layout, load into another (DCP underneath)."""
import os

import pytest
import torch
from harness import run_ranks

FULL = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10) * 0.5


def _pieces_cols(rank, world):
    """Column split (non-contiguous in flat order) plus a replicated bias owned by rank 0."""
    from parallel.checkpoint.sharded import Piece
    idx = torch.arange(60).reshape(6, 10).chunk(world, dim=1)[rank].contiguous()
    w = FULL.reshape(-1)[idx]
    b = torch.tensor([1.0, 2.0, 3.0])
    return [Piece("model/w", (6, 10), w.clone(), idx, True),
            Piece("model/b", (3,), b, torch.arange(3), rank == 0)]


def _save(rank, world, path):
    from parallel.checkpoint.sharded import save_pieces
    out = save_pieces(_pieces_cols(rank, world), path, {"step": 10}, {"rng": torch.get_rng_state()})
    return sorted(os.listdir(os.path.dirname(out)))


def _load_rows(rank, world, path):
    from parallel.checkpoint.sharded import Piece, load_pieces
    idx = torch.tensor_split(torch.arange(60).reshape(6, 10), world, dim=0)[rank]
    p = Piece("model/w", (6, 10), torch.zeros(idx.shape), idx, True)
    q = Piece("model/b", (3,), torch.zeros(3), torch.arange(3), False)
    meta = load_pieces([p, q], path)
    return meta["step"], torch.equal(p.local, FULL.reshape(-1)[idx]), q.local.tolist()


def test_save_two_ranks_load_four_and_one(tmp_path):
    path = str(tmp_path / "ck" / "step_00000010")
    listing = run_ranks(_save, 2, path)
    assert listing[0] == ["step_00000010"]                  # the temp folder was renamed away
    for step, ok, b in run_ranks(_load_rows, 4, path):
        assert (step, ok, b) == (10, True, [1.0, 2.0, 3.0])
    from parallel.checkpoint.sharded import latest, load_full
    assert latest(str(tmp_path / "ck")) == path
    full = load_full(path, ["model/w"])["model/w"].view(6, 10)
    assert torch.equal(full, FULL)


def test_load_errors_name_the_cause(tmp_path):
    from parallel.checkpoint.sharded import Piece, load_pieces
    path = str(tmp_path / "step_00000001")
    run_ranks(_save, 2, path)
    with pytest.raises(ValueError, match=r"has shape \(6, 10\) but this model's is \(5, 10\)"):
        load_pieces([Piece("model/w", (5, 10), torch.zeros(50), torch.arange(50), True)], path)
    with pytest.raises(KeyError, match="has no tensor 'model/other'"):
        load_pieces([Piece("model/other", (3,), torch.zeros(3), torch.arange(3), True)], path)
    with pytest.raises(FileNotFoundError, match="not a complete parallel3d checkpoint"):
        load_pieces([], str(tmp_path))
