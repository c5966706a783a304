"""Metrics of a run: FLOPs against FlopCounterMode, MFU, the per-step record and the per-rank sidecar.

* The FLOP formula 6·N + 12·L·h·s per token (parallel/flops.py) against
  torch.utils.flop_counter.FlopCounterMode on forward + backward of the small GPT (tied and untied,
  two sequence lengths) and of transformers' Llama (GQA, SwiGLU): within 1% (exact in practice).
* A 4-step pp=2 run through launch.train.run on 2 gloo ranks, warm-up LR schedule: every record's
  flops_per_step is the formula's, mfu = flops / (step_s · world · peak) with the peak from
  $P3D_PEAK_FLOPS, lr follows the scheduler, tokens/s = G·s / step_s, the bubble is the records'
  Σwait / Σ(wait + compute); the sidecar has exactly the gathered steps, each rank's executed
  actions equal its schedule, its model-state bytes equal the engine's, its comm equals the
  pipeline byte formula; the console shows the progress bar.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, H, L = 64, 32, 2


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("seq", [16, 32])
def test_flop_formula_matches_flop_counter(tie, seq):
    from torch.utils.flop_counter import FlopCounterMode

    from examples.gpt import GPT
    from parallel.checkpoint.layout import meta_copy
    from parallel.planning.flops import count_training_flops, gpt_flops_per_token
    torch.manual_seed(0)
    model = GPT(vocab_size=V, seq_len=seq, n_layer=L, n_head=4, n_embd=H, tie=tie)
    x = torch.randint(0, V, (4, seq))
    want = gpt_flops_per_token(L, H, seq, V) * x.numel()
    with FlopCounterMode(display=False) as plain:            # torch's own table: no CPU attention kernel
        F.cross_entropy(model(x).reshape(-1, V), x.reshape(-1)).backward()
    matmuls = sum(v for k, v in plain.get_flop_counts()["Global"].items() if "mm" in str(k))
    assert matmuls == pytest.approx(want - 12 * L * H * seq * x.numel(), rel=0.01)     # the 6N part alone
    got = count_training_flops(model, x, lambda out: F.cross_entropy(out.reshape(-1, V), x.reshape(-1)))
    assert got == pytest.approx(want, rel=0.01)
    assert count_training_flops(meta_copy(model), x) == pytest.approx(want, rel=0.01)   # shapes only


def test_flop_formula_for_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from parallel.planning.flops import count_training_flops, gpt_flops_per_token
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    x = torch.randint(0, V, (2, 16))
    want = gpt_flops_per_token(L, H, 16, V, ffn=64, kv_hidden=16, mlp_matrices=3) * x.numel()
    assert count_training_flops(LlamaForCausalLM(cfg), x) == pytest.approx(want, rel=0.01)


def test_flops_of_a_batchnorm_cnn_on_its_meta_template():
    """A meta template keeps real BatchNorm buffers; counting still works and leaves them alone.
    Theory (B=8, 8×8 images, C=8, 4 blocks): a conv costs 2·Cin·Cout·9·64·B forward, its weight
    gradient the same and its input gradient the same again (not for the stem: the images need none);
    the head Linear(8→4) 2·8·4·B forward, twice that backward."""
    from examples.cnn import build
    from parallel.checkpoint.layout import meta_copy
    from parallel.planning.flops import count_training_flops
    torch.manual_seed(0)
    model, x, B = build(channels=8, n_blocks=4), torch.randn(8, 3, 8, 8), 8
    conv = lambda cin, cout: 2 * cin * cout * 9 * 64 * B  # noqa: E731
    want = 2 * conv(3, 8) + 4 * 3 * conv(8, 8) + 3 * 2 * 8 * 4 * B
    template = meta_copy(model)
    before = template[1].bn.running_mean.clone()
    assert count_training_flops(template, x) == want
    assert count_training_flops(model, x) == want
    assert torch.equal(template[1].bn.running_mean, before) and not template[1].bn.running_mean.is_meta


def test_peak_and_mfu(monkeypatch):
    from parallel.planning.flops import measure_matmul_flops, mfu, peak_flops
    monkeypatch.setenv("P3D_PEAK_FLOPS", "2e9")
    assert peak_flops() == (2e9, "P3D_PEAK_FLOPS")
    assert peak_flops(override=5e9) == (5e9, "config")
    monkeypatch.setenv("P3D_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="P3D_PEAK_FLOPS='fast' is not a number"):
        peak_flops()
    assert measure_matmul_flops(n=64, seconds=0.01) > 1e6
    assert mfu(4e9, 2.0, 2, 2e9) == 0.5 and mfu(None, 1.0, 1, 1e9) is None and mfu(1e9, 1.0, 1, None) is None


# --- a run ------------------------------------------------------------------------------------------

STEPS, G, MB, SEQ = 4, 8, 2, 16


def _pp2_run(rank, world, run_dir):
    from launch.train import run
    from parallel.config import load_config
    from parallel.mesh import Mesh
    os.environ["P3D_PEAK_FLOPS"] = "1e10"
    lines = []
    try:
        cfg = load_config(os.path.join(ROOT, "configs/gpt_dp2.yaml"), [
            "parallel.dp=1", "parallel.pp=2", f"train.steps={STEPS}", "train.log_every=2",
            f"train.metrics_file={run_dir}/metrics.jsonl", "scheduler.name=warmup_linear",
            "scheduler.warmup_steps=2"]).validate(world)
        out = run(cfg, Mesh(pp=2), print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    finally:
        del os.environ["P3D_PEAK_FLOPS"]
    eng = out["engine"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    from parallel.optim.lr_schedule import build_scheduler
    sched = build_scheduler(opt, cfg.scheduler, cfg.train.steps)
    lrs = []
    for _ in range(STEPS):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return {"state": eng.zero.model_state_bytes(), "grad_norm": eng.last_result.grad_norm, "lines": lines,
            "lrs": lrs, "actions": [(a.kind, a.microbatch, a.stage) for a in eng.executor.schedule.actions[rank]]}


def test_run_records(tmp_path):
    from parallel.planning.flops import gpt_flops_per_token
    res = run_ranks(_pp2_run, 2, str(tmp_path))
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    side = [json.loads(x) for x in open(tmp_path / "ranks.jsonl")]
    assert [r["step"] for r in recs] == list(range(STEPS)) and [s["step"] for s in side] == [0, 2, 3]
    flops = gpt_flops_per_token(L, H, SEQ, V) * G * SEQ
    act = MB * SEQ * H * 4                                  # b·s·h fp32 per micro-batch
    m = G // MB
    for r in recs:
        assert r["flops_per_step"] == flops and r["peak_flops"] == 1e10
        assert r["mfu"] == pytest.approx(flops / (r["step_s"] * 2 * 1e10), rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(G * SEQ / r["step_s"], rel=1e-12)
        assert r["lr"] == pytest.approx(res[0]["lrs"][r["step"]], rel=1e-12)
        assert len(r["peak_rss_bytes_per_rank"]) == 2 and r["peak_rss_bytes"] == max(r["peak_rss_bytes_per_rank"])
        assert 0 <= r["bubble"] < 1 and r["skipped"] is False and r["loss_scale"] == 1.0
        # no header, not even step 0's: the engine declares the activation shapes (pipeline/shapes.py)
        assert r["comm"]["pp"]["send"] == {"calls": m, "payload_bytes": m * act, "wire_bytes": m * act,
                                           "meta_bytes": 0}
    assert recs[0]["lr"] != recs[-1]["lr"]                  # the warm-up shows
    assert recs[-1]["grad_norm"] == pytest.approx(res[0]["grad_norm"], rel=1e-12)
    for s in side:
        rec = recs[s["step"]]
        assert s["layout"]["pp"] == 2 and s["layout"]["micro_batches"] == m
        wait = sum(x[3] for rk in s["ranks"] for x in rk["records"])
        busy = sum(x[4] for rk in s["ranks"] for x in rk["records"])
        assert rec["bubble"] == pytest.approx(wait / (wait + busy), rel=1e-9)
        assert rec["model_state_bytes_per_rank"] == [rk["model_state_bytes"] for rk in s["ranks"]]
        for rk in s["ranks"]:
            assert [tuple(x[:3]) for x in rk["records"]] == [tuple(a) for a in res[rk["rank"]]["actions"]]
            assert all(x[3] >= 0 and x[4] > 0 for x in rk["records"])
            assert rk["coord"] == {"pp": rk["rank"], "dp": 0, "cp": 0, "tp": 0}
    for rk in side[-1]["ranks"]:
        assert rk["model_state_bytes"] == res[rk["rank"]]["state"]
    lines = res[0]["lines"]
    assert len(lines) == 3 and lines[-1].startswith("step     4/4 [####################]") and "ETA 0:00" in lines[-1]
    assert "MFU" in lines[0] and "bubble" in lines[0] and "tok/s" in lines[0]
    assert res[1]["lines"] == []


class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def _direct(rank, world, run_dir):
    """MetricsLog without an engine (an unusual caller): TensorBoard scalars, appending on resume."""
    from launch.metrics import MetricsLog
    from parallel.config import load_config
    from parallel.mesh import Mesh
    cfg = load_config(os.path.join(ROOT, "configs/gpt_dp2.yaml"),
                      [f"train.metrics_file={run_dir}/m.jsonl", "train.steps=3", "train.log_every=5"]).validate(world)
    w = _Writer()
    log = MetricsLog(cfg, Mesh(dp=2), print_fn=lambda *a, **k: None, tb_writer=w)
    comm = {"dp": {"all_reduce": {"calls": 1, "payload_bytes": 8, "wire_bytes": 8.0, "meta_bytes": 0}}}
    for step in range(2):
        log.log(step, 1.0 / (step + 1), 0.5, comm)
    again = MetricsLog(cfg, Mesh(dp=2), print_fn=lambda *a, **k: None, append=True, tb_writer=w)
    again.log(2, 0.25, 0.5, comm)
    return w.scalars


def test_metrics_log_without_engine_and_tensorboard(tmp_path):
    scalars = run_ranks(_direct, 2, str(tmp_path))
    assert scalars[1] == []                                 # only rank 0 writes
    s = scalars[0]
    assert ("train/loss", 0.5, 1) in s and ("train/samples_per_s", 16.0, 2) in s and ("comm/dp_wire_bytes", 8.0, 0) in s
    recs = [json.loads(x) for x in open(tmp_path / "m.jsonl")]
    assert [r["step"] for r in recs] == [0, 1, 2]           # appended, not truncated
    assert recs[0]["flops_per_step"] is None and recs[0]["mfu"] is None and recs[0]["tokens_per_s"] == 8 * 16 / 0.5
    side = [json.loads(x) for x in open(tmp_path / "ranks.jsonl")]
    assert [e["step"] for e in side] == [0, 2] and side[0]["ranks"][1]["model_state_bytes"] is None
