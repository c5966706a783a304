"""Learning-rate schedules: exact multipliers against closed forms, DeepSpeed's schedulers, torch's LambdaLR."""
import dataclasses
import math

import pytest
import torch

from parallel.config import ConfigError, SchedulerConfig
from parallel.optim.lr_schedule import Schedule, build_scheduler, make_schedule


def sched(name, **kw):
    return Schedule(name=name, **kw)


# --- native convention: closed forms at chosen steps (W = 4, T = 10, r = 0.1) ------------------------------
@pytest.mark.parametrize("name,t,expected", [
    ("constant", 0, 1.0), ("constant", 57, 1.0),
    ("warmup", 0, 0.0), ("warmup", 1, 0.25), ("warmup", 3, 0.75), ("warmup", 4, 1.0), ("warmup", 100, 1.0),
    ("warmup_linear", 2, 0.5), ("warmup_linear", 4, 1.0), ("warmup_linear", 7, 0.1 + 0.9 * 3 / 6),
    ("warmup_linear", 10, 0.1), ("warmup_linear", 13, 0.1),
    ("warmup_cosine", 2, 0.5), ("warmup_cosine", 4, 1.0), ("warmup_cosine", 7, 0.1 + 0.9 * 0.5),
    ("warmup_cosine", 5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6))), ("warmup_cosine", 10, 0.1),
    ("warmup_cosine", 30, 0.1),
])
def test_native_closed_forms(name, t, expected):
    kw = {} if name == "constant" else dict(warmup_steps=4, total_steps=10, min_lr_ratio=0.1)
    assert sched(name, **kw)(t) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_native_start_ratio_log_warmup_and_no_warmup():
    s = sched("warmup_cosine", warmup_steps=4, total_steps=8, warmup_start_ratio=0.2)
    assert [s(t) for t in range(3)] == pytest.approx([0.2, 0.4, 0.6], rel=1e-12)
    g = sched("warmup", warmup_steps=4, warmup_type="log")
    assert [g(t) for t in range(5)] == pytest.approx([0.0, math.log(2) / math.log(4), math.log(3) / math.log(4),
                                                     1.0, 1.0], rel=1e-12)
    n = sched("warmup_linear", warmup_steps=0, total_steps=4)
    assert [n(t) for t in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-15)
    e = sched("warmup_cosine", warmup_steps=3, total_steps=3, min_lr_ratio=0.3)       # T == W: straight to r
    assert [e(t) for t in range(5)] == pytest.approx([0.0, 1 / 3, 2 / 3, 0.3, 0.3], rel=1e-12)


def test_lambda_lr_applies_m_t_to_optimizer_step_t():
    """SGD on loss = sum(p): every step moves p by exactly -lr_t, so the applied lr is observable."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.5)
    cfg = SchedulerConfig(name="warmup_cosine", warmup_steps=3, total_steps=8, min_lr_ratio=0.25)
    sc = build_scheduler(opt, cfg, steps=8)
    m = make_schedule(cfg, 8)
    for t in range(10):
        before = p.item()
        opt.zero_grad()
        p.sum().backward()
        opt.step()
        sc.step()
        assert before - p.item() == pytest.approx(0.5 * m(t), rel=1e-12, abs=1e-15), t


def test_total_steps_defaults_to_steps_and_state_dict_resumes():
    cfg = SchedulerConfig(name="warmup_linear", warmup_steps=2)
    assert make_schedule(cfg, steps=6).total_steps == 6
    opts = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2)]
    a = build_scheduler(opts[0], cfg, steps=6)
    for _ in range(3):
        opts[0].step()
        a.step()
    b = build_scheduler(opts[1], cfg, steps=6)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        opts[0].step(); a.step(); opts[1].step(); b.step()           # noqa: E702
        assert a.get_last_lr() == b.get_last_lr()
    assert a.get_last_lr()[0] == pytest.approx(make_schedule(cfg, 6)(6))


def test_extra_fields_come_from_cfg_or_keywords():
    @dataclasses.dataclass
    class Extended(SchedulerConfig):          # what SchedulerConfig looks like once the proposed fields exist
        warmup_start_ratio: float = 0.0
        warmup_type: str = "linear"
        convention: str = "native"
    cfg = Extended(name="warmup", warmup_steps=4, warmup_start_ratio=0.5, warmup_type="log", convention="deepspeed")
    s = make_schedule(cfg, 10)
    assert (s.warmup_start_ratio, s.warmup_type, s.convention) == (0.5, "log", "deepspeed")
    s = make_schedule(cfg, 10, warmup_type="linear", convention="native")
    assert (s.warmup_type, s.convention) == ("linear", "native") and s(2) == pytest.approx(0.75)
    assert make_schedule(SchedulerConfig(name="warmup", warmup_steps=4), 10).convention == "native"


# --- DeepSpeed convention: a transcription of DeepSpeed's scheduler classes as the reference -----------
class DeepSpeedReference:
    """deepspeed/runtime/lr_schedules.py, stateful as DeepSpeed runs it: the constructor sets the lr for
    last_batch_iteration = -1, ``step()`` (called after each optimizer step) advances it. One param group."""

    def __init__(self, kind, lr, total_num_steps=None, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type="log", warmup_min_ratio=0.0, cos_min_ratio=0.0001):
        self.kind, self.org_lr, self.total = kind, lr, total_num_steps
        self.min_lr = warmup_min_lr
        self.max_lr = lr if warmup_max_lr is None else warmup_max_lr
        self.warmup = max(2, warmup_num_steps)
        self.warmup_type, self.wmr, self.cmr = warmup_type, warmup_min_ratio, cos_min_ratio
        self.inv_log = 1.0 / math.log(self.warmup)
        self.it = -1
        self.lr = self.get_lr()

    def _warm(self):
        if self.warmup_type == "log":
            return self.inv_log * math.log(self.it + 1)
        return self.it / self.warmup

    def get_lr(self):
        if self.kind == "WarmupCosineLR":
            if self.it < 0:
                return 0.0                         # get_lr() returns [0.0] before the first step
            if self.it < self.warmup:
                ratio = self.wmr + self._warm() * (1.0 - self.wmr)
            else:
                real_last, real_total = self.it - self.warmup + 1, self.total - self.warmup
                ratio = max(0.0, self.cmr + (1.0 - self.cmr) * (1 + math.cos(math.pi * real_last / real_total)) / 2)
            return self.org_lr * ratio
        if self.it < 0:
            return self.min_lr
        if self.it < self.warmup:
            gamma = self._warm()
        elif self.kind == "WarmupLR":
            gamma = 1.0
        else:
            gamma = max(0.0, float(self.total - self.it) / float(max(1.0, self.total - self.warmup)))
        return self.min_lr + (self.max_lr - self.min_lr) * gamma

    def step(self):
        self.it += 1
        self.lr = self.get_lr()


CASES = [
    ("WarmupLR", dict(warmup_num_steps=5, warmup_type="linear")),
    ("WarmupLR", dict(warmup_num_steps=5)),                                       # DeepSpeed's default: log
    ("WarmupLR", dict(warmup_num_steps=0, warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_type="linear")),
    ("WarmupDecayLR", dict(total_num_steps=12, warmup_num_steps=4, warmup_type="linear")),
    ("WarmupDecayLR", dict(total_num_steps=12, warmup_num_steps=4, warmup_min_lr=0.02, warmup_max_lr=0.2)),
    ("WarmupDecayLR", dict(total_num_steps=3, warmup_num_steps=3, warmup_type="linear")),
    ("WarmupCosineLR", dict(total_num_steps=12, warmup_num_steps=4, warmup_type="linear")),
    ("WarmupCosineLR", dict(total_num_steps=10, warmup_num_steps=3, warmup_min_ratio=0.1, cos_min_ratio=0.05)),
    ("WarmupCosineLR", dict(total_num_steps=6, warmup_num_steps=1, warmup_type="linear", cos_min_ratio=0.0)),
]


def ours_for(kind, p, lr):
    """The Schedule that parallel/deepspeed_config.py maps ``kind``/``p`` to (written out by hand)."""
    name = {"WarmupLR": "warmup", "WarmupDecayLR": "warmup_linear", "WarmupCosineLR": "warmup_cosine"}[kind]
    kw = dict(name=name, warmup_steps=max(2, p.get("warmup_num_steps", 1000)), total_steps=p.get("total_num_steps", 0),
              warmup_type=p.get("warmup_type", "log"), convention="deepspeed")
    if kind == "WarmupCosineLR":
        return lr, Schedule(**kw, warmup_start_ratio=p.get("warmup_min_ratio", 0.0),
                            min_lr_ratio=p.get("cos_min_ratio", 0.0001))
    hi = p.get("warmup_max_lr", lr)
    ratio = p.get("warmup_min_lr", 0.0) / hi
    return hi, Schedule(**kw, warmup_start_ratio=ratio, min_lr_ratio=ratio)


@pytest.mark.parametrize("kind,params", CASES)
def test_deepspeed_convention_matches_deepspeed_schedulers(kind, params):
    ref = DeepSpeedReference(kind, 0.3, **params)
    base_lr, s = ours_for(kind, params, 0.3)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, s)
    for t in range(2 * (params.get("total_num_steps") or 8) + 3):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.lr, rel=1e-12, abs=1e-15), (kind, t)
        opt.step()
        lam.step()
        ref.step()


def test_deepspeed_cosine_numbers_written_out():
    """WarmupCosineLR(total 5, warmup 2, warmup_min_ratio .1, cos_min_ratio .1, linear) step by step."""
    s = Schedule(name="warmup_cosine", warmup_steps=2, total_steps=5, warmup_start_ratio=0.1, min_lr_ratio=0.1,
                 convention="deepspeed")
    want = [0.0, 0.1, 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25, 0.1, 0.1 + 0.9 * 0.25]
    assert [s(t) for t in range(7)] == pytest.approx(want, rel=1e-12, abs=1e-15)
    d = Schedule(name="warmup_linear", warmup_steps=2, total_steps=5, convention="deepspeed")
    assert [d(t) for t in range(7)] == pytest.approx([0, 0, 0.5, 1, 2 / 3, 1 / 3, 0], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kw,needle", [
    (dict(name="cosine"), "scheduler.name='cosine' is not one of"),
    (dict(name="constant", warmup_steps=3), "scheduler.name=constant has no warm-up"),
    (dict(name="warmup_linear", warmup_steps=5, total_steps=3), "scheduler.total_steps=3 is before the end"),
    (dict(name="warmup", warmup_steps=1, warmup_type="log"), "warmup_type=log needs scheduler.warmup_steps >= 2"),
    (dict(name="warmup", warmup_steps=2, warmup_type="exp"), "scheduler.warmup_type='exp' is not one of"),
    (dict(name="warmup", min_lr_ratio=1.5), "scheduler.min_lr_ratio=1.5 must be within [0, 1]"),
    (dict(name="warmup", warmup_steps=-1), "scheduler.warmup_steps=-1 must be 0 or more"),
    (dict(name="warmup", convention="megatron"), "scheduler.convention='megatron' is not one of"),
    (dict(name="warmup_cosine", warmup_steps=4, total_steps=4, convention="deepspeed"),
     "must exceed the warm-up max(2, warmup_steps)=4"),
    (dict(name="warmup_linear", warmup_steps=0, total_steps=1, convention="deepspeed"),
     "before the end of the warm-up max(2, warmup_steps)=2"),
])
def test_bad_schedules_fail_with_the_key_and_the_fix(kw, needle):
    with pytest.raises(ConfigError) as e:
        Schedule(**kw)
    assert needle in str(e.value)


def test_negative_steps_is_an_error():
    with pytest.raises(ConfigError, match="steps=-1 must be 0 or more"):
        make_schedule(SchedulerConfig(), -1)
