"""Config loading, overrides, and one clear error per bad config — before any process group."""
import pytest

from parallel.config import ConfigError, load_config

BASE = {
    "model": {"factory": "examples.gpt:build"},
    "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 8, "micro_batch_size": 2},
    "parallel": {"dp": 2, "tp": 2, "pp": 2},
}


def cfg(*overrides, data=None, world=8):
    return load_config(data=data or BASE, overrides=list(overrides)).validate(world)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {factory: 'examples.gpt:build', kwargs: {n_layer: 2}}\n"
                 "data: {factory: 'examples.gpt:random_tokens', global_batch_size: 8, micro_batch_size: 4}\n"
                 "optimizer: {name: sgd}\n")
    c = load_config(str(p), ["train.steps=7", "optimizer.lr=0.5", "optimizer.momentum=0.9",
                             "model.kwargs.n_layer=3", "parallel.tp_plan={wte: vocab}"]).validate(1)
    assert (c.train.steps, c.optimizer.lr, c.optimizer.momentum) == (7, 0.5, 0.9)
    assert c.model.kwargs == {"n_layer": 3}
    assert c.parallel.tp_plan == {"wte": "vocab"}
    assert c.micro_batches == 2 and c.world_size == 1
    assert c.optimizer.weight_decay is None          # unset: torch's default applies
    assert isinstance(c.optimizer.lr, float)


@pytest.mark.parametrize("overrides,world,needle", [
    (["train.stepz=3"], 8, "unknown key 'train.stepz': did you mean 'train.steps'?"),
    (["parallel.dp=two"], 8, "parallel.dp: expected int, got str 'two'"),
    (["parallel.dp=1"], 8, "parallel.dp*tp*pp = 1*2*2 = 4 but the job has 8 processes"),
    (["data.global_batch_size=9"], 8, "data.global_batch_size=9 does not divide over parallel.dp=2"),
    (["data.micro_batch_size=3"], 8, "data.micro_batch_size=3 does not divide the 4 samples"),
    (["optimizer.name=adafactor"], 8, "optimizer.name='adafactor' is not one of ['adamw', 'adam', 'sgd', 'lamb', "
                                      "'muon', 'onebit_adam', 'onebit_lamb', 'zero_one_adam']"),
    (["precision=fp8"], 8, "precision='fp8' is not one of"),
    (["zero.stage=4"], 8, "zero.stage=4 must be 0, 1, 2 or 3"),
    (["model.factory=examples.gpt.build"], 8,
     "model.factory='examples.gpt.build' must look like 'pkg.module:function'"),
    (["parallel.pp_schedule=interleaved"], 8, "needs parallel.pp_virtual_stages >= 2"),
    (["parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2", "data.micro_batch_size=4"], 8,
     "needs the micro-batch count (1) to be a multiple of parallel.pp=2"),
    (["parallel.pp_virtual_stages=2"], 8, "only applies to parallel.pp_schedule=interleaved"),
    (["parallel.pp_schedule=zb_v"], 8, "places two stages on each pp rank (a V: stages r and 2·pp−1−r), but "
     "parallel.pp_virtual_stages=1: set parallel.pp_virtual_stages=2"),
    (["parallel.pp_schedule=dualpipe_v", "parallel.pp_virtual_stages=2"], 8,
     "dualpipe_v needs at least 2·pp = 4 micro-batches per dp rank, got 2"),
    (["parallel.pp_microbatches=3"], 8, "'parallel.pp_microbatches' is no longer a config key: the micro-batch count "
     "is data.global_batch_size / (parallel.dp × data.micro_batch_size); remove the key"),
    (["parallel.tp=1", "parallel.dp=4", "parallel.sequence_parallel=true"], 8,
     "sequence_parallel=true needs parallel.tp > 1"),
    (["train.grad_clip=-1"], 8, "train.grad_clip=-1.0 must be positive"),
    (["train.eval_every=-1"], 8, "train.eval_every=-1 must be 0"),
    (["train.log_every=0"], 8, "train.log_every=0 must be >= 1"),
    (["data.eval={factory: 'examples.gpt:random_tokens', kwarg: {n: 8}}"], 8, "data.eval has unknown keys ['kwarg']"),
    (["zero.offload.params=cpu"], 8, "zero.offload.params=cpu needs zero.stage=3"),
    (["zero.offload.optimizer=nvme"], 8, "zero.offload.nvme_path is not set"),
    (["train.checkpoint.every=5"], 8, "train.checkpoint.dir is not"),
    (["optimizer.betas=[0.9]"], 8, "optimizer.betas=[0.9] must be two numbers"),
    (["optimizer.momentum=0.9"], 8, "optimizer.momentum applies to sgd, not adamw"),
    (["parallel.dp=0"], 8, "parallel.dp=0 must be at least 1"),
    (["model=3"], 8, "model: expected a mapping"),
    (["steps=3"], 8, "unknown key 'steps'"),
    (["oops"], 8, "is not of the form key.sub=value"),
    (["parallel.pp_split=[1, x]"], 8, "parallel.pp_split"),
])
def test_bad_configs_fail_with_one_clear_message(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        cfg(*overrides, world=world)
    assert needle in str(e.value), str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(lst))


def test_factory_import_errors():
    from parallel.config import import_object
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.mod'"):
        import_object("no_such_pkg.mod:build", "model.factory")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        import_object("examples.gpt:nope", "model.factory")


def test_yaml_float_strings(tmp_path):
    """PyYAML reads ``lr: 1e-3`` as the string '1e-3' (YAML 1.1 wants 1.0e-3); a float field takes it."""
    p = tmp_path / "c.yaml"
    p.write_text("model: {factory: 'examples.gpt:build'}\ndata: {factory: 'examples.gpt:random_tokens'}\n"
                 "optimizer: {lr: 1e-3, weight_decay: 1E2, eps: -.5e-8}\n")
    c = load_config(str(p), ["train.grad_clip=1e0"])
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.eps, c.train.grad_clip) == (1e-3, 100.0, -5e-9, 1.0)
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float or NoneType, got 'fast'"):
        load_config(str(p), ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got str '1e3'"):
        load_config(str(p), ["train.steps=1e3"])           # only float fields read numbers from strings


def test_v_schedules_are_selectable():
    """zb_v and dualpipe_v: two stages per rank (pp_virtual_stages=2); DualPipeV with m >= 2·pp."""
    assert cfg("parallel.pp_schedule=zb_v", "parallel.pp_virtual_stages=2").parallel.pp_schedule == "zb_v"
    c = cfg("parallel.pp_schedule=dualpipe_v", "parallel.pp_virtual_stages=2", "data.micro_batch_size=1")
    assert c.micro_batches == 4
