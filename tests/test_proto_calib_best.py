"""benchmarks/proto_calib.calibrate takes ``train_flops`` twice, first and last, and keeps the faster
(proto_calib._best_rate): one short median at a calibration's start read 48.9–62.8 GFLOP/s in four invocations
(session 12's MP 5M start among them) against 70.7–73.4 at their ends. Stubbed timings: no clock read."""
import pytest

from benchmarks import proto_calib

KW = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, seq_len=32)


def _stub(monkeypatch, rates):
    calls = []

    def train_rate(kw, per, reps=5):
        calls.append(per)
        return rates[len(calls) - 1]
    monkeypatch.setattr(proto_calib, "train_rate", train_rate)
    monkeypatch.setattr(proto_calib, "matmul_rate", lambda *a, **k: 9e10)
    monkeypatch.setattr(proto_calib, "mem_bandwidth", lambda *a, **k: 2e10)
    monkeypatch.setattr(proto_calib, "calibrate_host", lambda *a, **k: {"host.op_s": 1e-6})
    return calls


def test_slow_first_reading_is_not_the_rate(monkeypatch):
    calls = _stub(monkeypatch, [48.9e9, 70.7e9])          # session 12's MP 5M: start 48.9, end 70.7
    out = proto_calib.calibrate(KW, 4)
    assert calls == [4, 4]                                  # the per-rank batch, timed twice
    assert out["train_flops"] == 70.7e9
    assert (out["train_flops_first"], out["train_flops_last"]) == (48.9e9, 70.7e9)
    assert out["matmul_flops"] == 9e10 and out["host.op_s"] == 1e-6


def test_slow_last_reading_is_not_the_rate(monkeypatch):
    _stub(monkeypatch, [75.9e9, 60.0e9])
    assert proto_calib.calibrate(KW, 4)["train_flops"] == 75.9e9


def test_micro_rates_keep_their_keys(monkeypatch):
    calls = _stub(monkeypatch, [70e9, 50e9, 72e9])
    monkeypatch.setattr(proto_calib, "split_fractions", lambda *a, **k: (0.55, 0.52))
    out = proto_calib.calibrate(KW, 4, micro=(1,))
    assert calls == [4, 1, 4]
    assert (out["train_flops"], out["train_flops@1"], out["split_i@1"]) == (72e9, 50e9, 0.55)


def test_zero_rate_refused():
    with pytest.raises(ValueError, match="must be > 0"):
        proto_calib._best_rate(0.0, 7e10)
