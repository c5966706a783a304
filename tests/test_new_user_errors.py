"""Defects a new user met following the README (session 10): each test failed on the code before its fix."""
import os
import re

import pytest
import torch


def test_mse_refuses_a_target_that_is_not_one_value_per_prediction():
    """`loss=mse` on the GPT config (integer class ids) ended in torch's "shape '[2, 16, 64]' is invalid for input
    of size 32"; a transposed target of the same size was reshaped onto the wrong predictions silently."""
    from parallel.loss import mse
    logits, ids = torch.randn(2, 16, 64), torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match=r"predicts \(2, 16, 64\) \(2048 values\) but the target is torch.int64 "
                                         r"\(2, 16\) \(32 values\) \(integer class ids: use loss: cross_entropy\)"):
        mse(logits, ids)
    pred, target = torch.randn(3, 2), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"predicts \(3, 2\) \(6 values\) but the target is torch.float32 \(2, 3\)"):
        mse(pred, target)
    # what trains: the same shape, or the same up to size-1 dimensions (XOR's (B, 1) against (B,))
    torch.testing.assert_close(mse(pred, target.T), torch.nn.functional.mse_loss(pred, target.T))
    p1, t1 = torch.randn(4, 1), torch.randn(4)
    torch.testing.assert_close(mse(p1, t1), torch.nn.functional.mse_loss(p1, t1[:, None]))
    assert float(mse(p1, t1)) == pytest.approx(float(((p1[:, 0] - t1) ** 2).mean()), rel=1e-6)


def test_a_tokenizer_directory_without_a_tokenizer_is_named(tmp_path):
    """`prepare_data --tokenizer DIR` with a DIR holding no tokenizer said "reading it needs the `tokenizers` or
    `transformers` package: pip install tokenizers" (tokenizers installed, no transformers) or transformers'
    "Couldn't instantiate the backend tokenizer ... install sentencepiece or tiktoken" (with it)."""
    from parallel.corpus.tokenizer import load_tokenizer, train_bpe
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(FileNotFoundError, match=r"the directory holds no tokenizer \(none of \['tokenizer.json', "
                                                r"'tokenizer_config.json'.*--train-bpe VOCAB"):
        load_tokenizer(str(tmp_path))
    pytest.importorskip("tokenizers")
    want = train_bpe(["a b c ab abc " * 20] * 4, 260, str(tmp_path / "bpe"))
    got = load_tokenizer(str(tmp_path / "bpe"))                    # a directory holding tokenizer.json still loads
    assert got.vocab_size == want.vocab_size and got.encode("abc ab") == want.encode("abc ab")


def test_a_resumed_steps_counter_sits_where_torchs_fused_kernel_reads_it():
    """A checkpoint load made Adam's `step` on the CPU for every group. torch's own load_state_dict puts it on the
    parameter's device for fused/capturable groups, whose CUDA kernel reads it there (optimizer.fused is on by
    default with every parameter on CUDA): a GPU resume handed the fused kernel a host pointer. The meta device
    stands in for CUDA here; benchmarks/gpu_check.py resumes a fused engine on the GPU."""
    from parallel.checkpoint.engine_state import scalar_state
    for fused, where in ((True, "meta"), (False, "cpu")):
        p = torch.nn.Parameter(torch.zeros(4, device="meta"))
        opt = torch.optim.AdamW([p], lr=1e-3, fused=fused)
        got = scalar_state(opt, p, 3)
        assert (got.device.type, got.dtype, got.shape) == (where, torch.float32, torch.Size([]))
        # what torch itself does with a saved step on load
        ref = torch.optim.Optimizer._process_value_according_to_param_policy(p, torch.tensor(3.0), 0,
                                                                            [{"params": [0], "fused": fused}], "step")
        assert ref.device.type == where
    p = torch.nn.Parameter(torch.zeros(4))
    assert float(scalar_state(torch.optim.AdamW([p], fused=True), p, 7)) == 7.0


def _resume_fused(rank, world, tmp):
    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, seq_len=16)
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 4, "micro_batch_size": 2,
                 "kwargs": {"n": 4, "seq_len": 16, "vocab_size": 64}},
        "parallel": {"dp": world}, "zero": {"stage": 1}, "optimizer": {"name": "adamw", "lr": 1e-2, "fused": True}}
    ).validate(world)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 17), generator=g)
    batch = (x[:, :-1], x[:, 1:])

    def engine():
        torch.manual_seed(0)
        return parallelize(GPT(**kw), cfg, Mesh(dp=world))
    a = engine()
    full = [a.train_step(batch) for _ in range(4)]
    b = engine()
    [b.train_step(batch) for _ in range(2)]
    b.save(f"{tmp}/ck")
    c = engine()
    c.load(f"{tmp}/ck")
    step = next(iter(c.zero.optimizer.state.values()))["step"]
    return full, [c.train_step(batch) for _ in range(2)], str(step.device)


def test_a_fused_run_resumes_exactly(tmp_path):
    from harness import run_ranks
    for full, resumed, dev in run_ranks(_resume_fused, 2, str(tmp_path)):
        assert dev == "cpu" and max(abs(a - b) for a, b in zip(full[2:], resumed)) <= 1e-6 * abs(full[2])


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_fused_with_an_offloaded_optimizer_is_refused(fused):
    """With zero.offload.optimizer the step is the CPU kernel timed at start (parallel/offload/cpu_adam.py):
    optimizer.fused was accepted and silently had no effect (fused=false could still run torch's fused kernel)."""
    from parallel.config import ConfigError, load_config

    def cfg(**opt):
        return load_config(data={"model": {"factory": "examples.gpt:build"}, "optimizer": {"name": "adamw", **opt},
                                 "data": {"factory": "examples.gpt:random_tokens"},
                                 "zero": {"stage": 1, "offload": {"optimizer": "cpu"}}})
    with pytest.raises(ConfigError, match=rf"optimizer.fused={str(fused).lower()} with zero.offload.optimizer=cpu: "
                                          r"the offloaded step runs on the CPU .*remove optimizer.fused"):
        cfg(fused=fused).validate(1)
    assert cfg().validate(1).optimizer.fused is None                # unset: the timed kernel, as before


def _save_on_a_full_disk(rank, world, d):
    from torch.distributed.checkpoint.api import CheckpointException

    from launch.train import build_model, save_checkpoint
    from parallel.checkpoint import step_dir
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config("configs/gpt_dp2.yaml", ["train.metrics_file=null", "parallel.dp=1"]).validate(world)
    engine = parallelize(build_model(cfg), cfg, Mesh(dp=1))

    def full(phase, step):                     # what dcp.save raised on a full 5 MiB tmpfs (torch 2.13, as root)
        if phase == "checkpoint_written":
            short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            raise CheckpointException("write", {0: (short, [])})
    engine.add_callback(full)
    try:
        save_checkpoint(engine, step_dir(d, 2), d)
    except Exception as e:                     # noqa: BLE001 — the message is the result
        return f"{type(e).__name__}: {e}".splitlines()[0], sorted(os.listdir(d))


def test_a_checkpoint_on_a_full_disk_says_so(tmp_path):
    """On a full disk (a 5 MiB tmpfs, as root) the launcher's last line was `CheckpointError: writing checkpoint
    .../step_00000002 failed: CheckpointException: CheckpointException ranks:dict_keys([0])`: torch.save's zip
    writer reports the short write as "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
    with no errno, so the disk-full check (an OSError's ENOSPC) missed it."""
    from harness import run_ranks
    d = str(tmp_path / "ck")
    err, listing = run_ranks(_save_on_a_full_disk, 1, d)[0]
    assert err == (f"CheckpointError: writing checkpoint {d}/step_00000002 failed: no space left on device (a write "
                   f"came up short: RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs "
                   f"598). The partial save .tmp-step_00000002 was removed; there is no earlier checkpoint. Free space "
                   f"on the disk of train.checkpoint.dir={d!r} or point it elsewhere"), err
    assert listing == []


@pytest.mark.parametrize("memory", ["0", "0.0GB", "1.2.3GiB"])
def test_dry_run_memory_must_be_a_positive_size(memory, capsys):
    """`python -m launch --config X --dry-run --memory 0` ended in a ZeroDivisionError traceback (the headroom's
    percentage); '1.2.3GiB' passed the pattern and gave float()'s "could not convert string to float"."""
    from launch.__main__ import main
    assert main(["--config", "configs/gpt_dp2.yaml", "--dry-run", "--memory", memory]) == 2
    assert (f"--memory '{memory}': give bytes with an optional unit, e.g. 24GiB, 512MB or 8e9 (a positive number)"
            in capsys.readouterr().err)


def _two_checkpoints(rank, world, d):
    from launch.train import build_model
    from parallel.checkpoint import step_dir
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config("configs/gpt_dp2.yaml", ["train.metrics_file=null", "parallel.dp=1"]).validate(world)
    torch.manual_seed(0)
    engine = parallelize(build_model(cfg), cfg, Mesh(dp=1))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (8, 17), generator=g)
    for step in (1, 2):
        engine.train_step((x[:, :-1], x[:, 1:]))
        engine.save(step_dir(d, step))


def test_consolidated_model_takes_a_checkpoint_dir_as_the_cli_does(tmp_path):
    """README: "samples from ... `launch.consolidate.consolidated_model(dir)`"; the CLI takes a train.checkpoint.dir
    (newest checkpoint), the function raised "'runs/qs/ckpt' is not a complete parallel3d checkpoint (no meta.json)"."""
    from harness import run_ranks

    from launch.consolidate import consolidated_model
    d = str(tmp_path / "ck")
    run_ranks(_two_checkpoints, 1, d)
    got, newest, older = (consolidated_model(p).state_dict() for p in (d, f"{d}/step_00000002", f"{d}/step_00000001"))
    assert all(torch.equal(got[k], newest[k]) for k in newest)
    assert any(not torch.equal(got[k], older[k]) for k in older)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        consolidated_model(str(tmp_path))                     # no checkpoint below it: the same error as before


def _generate_tp(rank, world, prompt):
    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.generate import generate
    from parallel.mesh import Mesh
    kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, seq_len=16)
    cfg = load_config(data={"model": {"factory": "examples.gpt:build", "kwargs": kw},
                            "data": {"factory": "examples.gpt:random_tokens"}, "parallel": {"dp": 1, "tp": world}}
                      ).validate(world)
    torch.manual_seed(0)
    engine = parallelize(GPT(**kw), cfg, Mesh(dp=1, tp=world))
    try:
        return generate(engine, torch.tensor(prompt), 3, greedy=True).tolist()
    except ValueError as e:
        return str(e)


def test_generate_refuses_token_ids_outside_the_vocabulary():
    """A prompt id ≥ the vocabulary: a plain model raised "IndexError: index out of range in self"; an engine at
    tp = 2 generated from it without an error (each rank's vocabulary-parallel embedding masked the id)."""
    from harness import run_ranks

    from examples.gpt import GPT
    from parallel.generate import generate
    model = GPT(n_embd=32, n_layer=2, n_head=4, vocab_size=64, seq_len=16)
    want = "generate: token ids must lie in [0, 64) (the model's input vocabulary), got 1..64: encode the prompt"
    with pytest.raises(ValueError, match=re.escape(want)):
        generate(model, torch.tensor([[1, 64]]), 2)
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids, got torch.float32"):
        generate(model, torch.tensor([[1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer ≥ 0, got -1"):
        generate(model, torch.tensor([[1, 2]]), -1)
    assert all(r.startswith(want) for r in run_ranks(_generate_tp, 2, [[1, 64]]))
    ok = run_ranks(_generate_tp, 2, [[1, 63]])
    assert ok[0] == ok[1] and len(ok[0][0]) == 5


def _train_tp_with(rank, world, bad, where=0):
    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, seq_len=16)
    cfg = load_config(data={"model": {"factory": "examples.gpt:build", "kwargs": kw},
                            "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 2,
                                     "micro_batch_size": 2},
                            "parallel": {"dp": 1, "tp": world}}).validate(world)
    torch.manual_seed(0)
    engine = parallelize(GPT(**kw), cfg, Mesh(dp=1, tp=world))
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = x[:, :-1].clone(), x[:, 1:].clone()
    (targets if where else inputs)[0, 3] = bad      # where = 1: the bad id in the targets only
    try:
        return engine.train_step((inputs, targets))
    except RuntimeError as e:
        return str(e)


def test_an_id_outside_the_vocabulary_stops_a_tp_run():
    """Your own loop (README "In your own code": engine.train_step(batch)) with a token id ≥ V at tp = 2 trained
    without an error — no rank owns the id, so its embedding was a zero vector (one process raises IndexError)."""
    from harness import run_ranks
    for bad in (64, -1):
        out = run_ranks(_train_tp_with, 2, bad)
        assert all(isinstance(o, str) and "VocabParallelEmbedding: a token id is outside [0, 64), the vocabulary of "
                   "the embedding split over tp = 2" in o for o in out), out
    ok = run_ranks(_train_tp_with, 2, 63)
    assert isinstance(ok[0], float) and ok[0] == ok[1]


def test_a_target_outside_the_vocabulary_stops_a_tp_run():
    """The same for a target id (not -100) at tp = 2: the vocab-parallel loss picked a 0 logit for it and returned a
    finite, wrong loss (F.cross_entropy in one process raises "Target 64 is out of bounds")."""
    from harness import run_ranks
    for bad in (64, -1):
        out = run_ranks(_train_tp_with, 2, bad, 1)
        assert all(isinstance(o, str) and "vocab_parallel_cross_entropy: a target id is outside [0, 64), the "
                   "vocabulary split over tp = 2, and is not ignore_index=-100" in o for o in out), out
    ok = run_ranks(_train_tp_with, 2, -100, 1)                # ignore_index still means "not scored"
    assert isinstance(ok[0], float) and ok[0] == ok[1]
