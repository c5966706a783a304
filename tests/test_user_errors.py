"""What a new user runs into first: configs and inputs that must fail once, before any worker starts,
naming the key and the fix (found by trying the README's commands from a fresh install)."""
import pytest

from parallel.config import ConfigError, load_config

BASE = {
    "model": {"factory": "examples.gpt:build"},
    "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 8, "micro_batch_size": 2},
    "parallel": {"dp": 2},
}


def cfg(*overrides, world=2):
    return load_config(data=BASE, overrides=list(overrides)).validate(world)


@pytest.mark.parametrize("overrides,needle", [
    # configs/hf_causal_lm.yaml has warmup_steps 10: `train.steps=3` for a quick try failed inside the workers
    (["scheduler.name=warmup_cosine", "scheduler.warmup_steps=10", "train.steps=3"],
     "train.steps=3 (the decay horizon while scheduler.total_steps is unset) is before the end of the warm-up "
     "(scheduler.warmup_steps=10): raise train.steps to at least 10 or lower scheduler.warmup_steps"),
    (["scheduler.name=warmup_linear", "scheduler.warmup_steps=10", "scheduler.total_steps=4"],
     "scheduler.total_steps=4 is before the end of the warm-up (scheduler.warmup_steps=10): raise "
     "scheduler.total_steps to at least 10 or lower scheduler.warmup_steps"),
    (["scheduler.name=constant", "scheduler.warmup_steps=2"], "scheduler.name=constant has no warm-up"),
])
def test_schedule_checked_by_validate(overrides, needle):
    with pytest.raises(ConfigError) as e:
        cfg(*overrides)
    assert needle in str(e.value), str(e.value)
