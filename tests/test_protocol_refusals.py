"""benchmarks/protocol.py's refusals and set-up for the DeepSpeed rows (which CI does not install): rows without ddp
(no reference for the loss check), DeepSpeed rows named in a python without deepspeed, a named row that cannot be
built (strict: every rank stops with the reason), and the venv's own ninja first on PATH for DeepSpeed's JIT ops."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_protocol_refuses_rows_it_cannot_check_or_run(monkeypatch, capsys):
    """Before spawning a rank: rows without ddp (no reference for the loss check: every warm-up loss would go
    unchecked) and DeepSpeed rows named in a python without deepspeed (they would be skipped) are refused."""
    from benchmarks import protocol
    from benchmarks.proto_run import run_rank
    monkeypatch.setattr(protocol, "_deepspeed_missing", lambda: "ModuleNotFoundError: no")
    monkeypatch.setattr(protocol, "run", lambda *a: pytest.fail("the protocol ran"))
    for argv, want in ((["--rows", "zero1", "ds1"], "add ddp"),
                       (["--rows", "ddp", "zero1", "ds3"], "cannot import deepspeed (ModuleNotFoundError: no")):
        with pytest.raises(SystemExit):
            protocol.main(["--sizes", "tiny", *argv])
        assert want in capsys.readouterr().err
    with pytest.raises(ValueError, match="lack ddp"):            # run_rank too, before pinning or calibrating
        run_rank(0, 1, {"size": "tiny", "per_rank_batch": 1, "rows": ["zero1"]})


def test_deepspeed_rows_build_with_the_venvs_own_ninja(tmp_path, monkeypatch):
    """A venv's python run without activating the venv: its ninja goes first on PATH (else DeepSpeed's JIT ops are
    rebuilt by /usr/bin/ninja, whose .ninja_log hashes differ from the venv's ninja's), once; without one, no change."""
    from benchmarks import protocol
    (tmp_path / "bin").mkdir()
    ninja = tmp_path / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert protocol.venv_ninja_first() and os.environ["PATH"] == f"{tmp_path / 'bin'}:/usr/bin:/bin"
    assert not protocol.venv_ninja_first() and os.environ["PATH"].count(str(tmp_path)) == 1
    ninja.unlink()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert not protocol.venv_ninja_first() and os.environ["PATH"] == "/usr/bin:/bin"


def _strict(rank, world):
    sys.path.insert(0, ROOT)
    from benchmarks import proto_rows
    from benchmarks.proto_run import run_rank
    real = proto_rows.build

    def build(name, *a):
        if name == "local" and rank == 1:
            raise ImportError("no local row on rank 1")
        return real(name, *a)
    proto_rows.build = build
    try:
        run_rank(rank, world, {"size": "tiny", "per_rank_batch": 1, "rounds": 1, "warmup": 1, "seed": 0, "pin": False,
                               "rows": ["ddp", "local"], "calib_reps": 1, "mem_mb": 1, "comm_mb": 0.1, "strict": True})
    except RuntimeError as e:
        return str(e)
    finally:
        proto_rows.build = real
    return "ran"


def test_protocol_strict_raises_on_every_rank_when_a_named_row_cannot_be_built():
    """--rows named explicitly (strict): a row failing to build on one rank stops every rank with its reason."""
    from harness import run_ranks
    for msg in run_ranks(_strict, 2):
        assert "'local': 'failed on another rank'" in msg or "ImportError: no local row on rank 1" in msg, msg
        assert "DeepSpeed peers" in msg
