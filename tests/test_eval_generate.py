"""data.eval / train.eval_every (eval loss and perplexity in the metrics) and the generation helper on
an engine of any layout, on the unmodified model and on a consolidated checkpoint."""
import json
import math
import os

import pytest
import torch
from engine_cases import config
from harness import run_ranks
from reference import reference_losses
from torch.utils.data import default_collate

from parallel.config import ConfigError, import_object
from parallel.generate import generate, sample_next

EVAL = ["data.eval={factory: 'examples.gpt:random_tokens', kwargs: {n: 16, seq_len: 16, vocab_size: 64, seed: 7}}",
        "train.eval_every=2", "train.steps=3"]


def _train(rank, world, overrides, metrics):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config("gpt", overrides + [f"train.metrics_file={metrics}"], world)
    p = cfg.parallel
    run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp), print_fn=lambda *a, **k: None)


def _eval_reference(cfg, steps):
    _, model = reference_losses(cfg, steps=steps, return_model=True)
    ev = cfg.data.eval
    ds = import_object(ev["factory"], "f")(**ev["kwargs"])
    G = cfg.data.global_batch_size
    with torch.no_grad():
        losses = []
        for j in range(len(ds) // G):
            x, y = default_collate([ds[i] for i in range(j * G, (j + 1) * G)])
            logits = model(x)
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)).item())
    return sum(losses) / len(losses)


def test_eval_every_logs_eval_loss_and_ppl_at_dp2(tmp_path):
    metrics = str(tmp_path / "m.jsonl")
    ov = ["parallel.dp=2", "zero.stage=1"] + EVAL
    run_ranks(_train, 2, ov, metrics, timeout=300)
    recs = [json.loads(line) for line in open(metrics)]
    with_eval = [r for r in recs if "eval_loss" in r]
    assert all(r["data_wait_s"] >= 0 for r in recs)           # the step's wait for its batch (no prefetch yet)
    assert [r["step"] for r in with_eval] == [1, 2]           # every 2nd step, and after the last
    cfg = config("gpt", ov)
    for r in with_eval:
        want = _eval_reference(cfg, r["step"] + 1)
        assert abs(r["eval_loss"] - want) <= 1e-5 * want, (r["step"], r["eval_loss"], want)
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
        assert r["eval_batches"] == 2


def test_eval_config_errors():
    from launch.evaluate import Evaluator
    with pytest.raises(ConfigError, match=r"train.eval_every=2 but data.eval is not set"):
        Evaluator(config("gpt", ["train.eval_every=2"]))
    with pytest.raises(ConfigError, match=r"data.eval.batches=9: the eval set has 16 samples"):
        Evaluator(config("gpt", [EVAL[0].replace("seed: 7}", "seed: 7}, batches: 9")]))


def test_sample_next():
    z = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(z, greedy=True).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(z, top_k=2, generator=g).item() for _ in range(50)}
    assert draws == {1, 3}                                    # only the two largest are ever drawn
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_next(z, temperature=0)


def _generate(rank, world, overrides, ckpt):
    from launch.consolidate import consolidated_model
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config("gpt", overrides + ["train.steps=2", "train.metrics_file=null"], world)
    p = cfg.parallel
    engine = run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp), print_fn=lambda *a, **k: None)["engine"]
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    kw = dict(max_new_tokens=6, max_len=16)
    got = [generate(engine, prompt, greedy=True, **kw), generate(engine, prompt, top_k=8, temperature=0.8,
                                                                  seed=3, **kw)]
    engine.save(ckpt)
    full = engine.full_model()
    if rank != 0:
        return None
    ref = consolidated_model(ckpt)
    want = [generate(m, prompt, greedy=True, **kw) for m in (full, ref)] + \
           [generate(m, prompt, top_k=8, temperature=0.8, seed=3, **kw) for m in (full, ref)]
    return [t.tolist() for t in got], [t.tolist() for t in want]


@pytest.mark.parametrize("layout", [["parallel.pp=2"], pytest.param(["parallel.tp=2"], marks=pytest.mark.slow)])
def test_generate_on_engine_equals_full_model_and_checkpoint(tmp_path, layout):
    got, want = run_ranks(_generate, 2, layout, str(tmp_path / "ck"), timeout=300)[0]
    assert got[0] == want[0] == want[1]                       # greedy: engine = full model = checkpoint
    assert got[1] == want[2] == want[3]                       # top-k sampling, same seed
    assert len(got[0][0]) == 10
    assert got[0] != got[1]


def test_generate_nanogpt_last_position_logits():
    """nanoGPT's forward(idx) without targets returns the last position only; generate takes it as is."""
    from dict_cases import NanoGPT
    torch.manual_seed(0)
    out = generate(NanoGPT(), torch.tensor([[1, 2, 3]]), 4, greedy=True, max_len=16)
    assert out.shape == (1, 7) and out[0, :3].tolist() == [1, 2, 3]
    assert os.path.basename(__file__)
