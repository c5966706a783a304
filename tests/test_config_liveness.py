"""Every config key is live: some code acts on it in a few representative runs.

The config tree is copied into instances of test-only subclasses of its dataclasses whose
``__getattribute__`` records each field read, with its dotted key. Reads do not count when they come
from this file, from the validation (``Config.validate``: checking a value is not using it), or
from whole-tree copies and dumps (``dataclasses.asdict``/``copy``, dataclass-generated
``__eq__``/``__repr__``). The runs: the ``--dry-run`` description, then three 2-rank training runs
through ``launch.train.run``: ZeRO-3 with nvme/cpu offload, fp16 dynamic loss scale, a
DeepSpeed-convention schedule, checkpoints, metrics, the ``finish`` hook and full activation
recompute; an interleaved pipeline with an explicit split in bf16, recomputing every 2nd block;
tensor parallel with sequence parallel, an explicit plan, a static fp16 scale and selective recompute.
Every field must be read, or be in ALLOW with the reason; an ALLOW entry that is read fails too (the
list stays short).
"""
import copy
import dataclasses
import os
import sys

from harness import run_ranks

from parallel.config import Config, load_config

ALLOW = {
    "device": "read only by launch.train.main, which picks the device before run() receives the config "
              "(tests/test_launch.py starts that path)",
    "train.timeout_s": "read only by launch.train.main: the watchdog and process-group timeouts",
    "train.save_on_signal": "read only by launch.train.main, which installs the signal handlers (tests/test_stop.py "
                            "starts that path)",
    "optimizer.adamw_lr": "read only with optimizer.name=muon (tests/test_tensorwise_optim.py)",
    "optimizer.freeze_step": "read only with optimizer.name=onebit_adam (tests/test_onebit_adam.py)",
    "optimizer.update_bound": "read only with the 1-bit optimizers (tests/test_zero_one_adam.py)",
    **{f"optimizer.{k}": "read only with optimizer.name=zero_one_adam (tests/test_zero_one_adam.py)"
       for k in ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper", "bias_correction")},
    **{f"optimizer.{k}": "read only with optimizer.name=onebit_lamb (tests/test_zero_one_adam.py)"
       for k in ("max_coeff", "min_coeff", "coeff_beta", "factor_max", "factor_min", "factor_threshold")},
    "pld.theta": "read only with pld.enabled=true (tests/test_layer_drop.py trains with it)",
    "pld.gamma": "read only with pld.enabled=true (tests/test_layer_drop.py trains with it)",
    **{f"compile.{k}": "read only with compile.enabled=true (tests/test_compile.py trains with it)"
       for k in ("backend", "mode", "fullgraph")},
}
GPT = {"vocab_size": 96, "seq_len": 16, "n_layer": 4, "n_head": 4, "n_embd": 32}
BASE = {"model": {"factory": "examples.gpt:build", "kwargs": GPT},
        "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64},
                 "global_batch_size": 8, "micro_batch_size": 2},
        "optimizer": {"name": "adamw", "lr": 0.001}, "train": {"steps": 2, "seed": 0}}
_HERE = os.path.abspath(__file__)
READS: set = set()
_FIELDS: dict = {}                                  # recording subclass -> its field names


def _counts(frame) -> bool:
    """Whether the read made in ``frame`` counts (see the module docstring)."""
    if frame.f_code.co_filename == "<string>" or os.path.abspath(frame.f_code.co_filename) == _HERE:
        return False                                # dataclass-generated __eq__/__repr__, or this file
    f = frame
    while f is not None:
        fn, name = f.f_code.co_filename, f.f_code.co_name
        if os.path.basename(fn) in ("dataclasses.py", "copy.py"):
            return False
        if name in ("validate", "_validate") and f"{os.sep}parallel{os.sep}config" in fn:
            return False
        f = f.f_back
    return True


def _getattribute(self, name):
    v = object.__getattribute__(self, name)
    if name in _FIELDS[type(self)] and _counts(sys._getframe(1)):
        READS.add(object.__getattribute__(self, "_p3d_key") + name)
    return v


def _make_subclasses(cls):
    """A module-level recording subclass for every dataclass in the tree (so copies can be pickled)."""
    sub_name = f"Recording{cls.__name__}"
    if sub_name not in globals():
        sub = type(sub_name, (cls,), {"__getattribute__": _getattribute, "__module__": __name__})
        globals()[sub_name] = sub
        _FIELDS[sub] = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            _make_subclasses(f.default_factory)
    return globals()[sub_name]


_make_subclasses(Config)


def recording(obj, key=""):
    """A copy of the dataclass tree ``obj`` that records field reads into READS."""
    new = object.__new__(globals()[f"Recording{type(obj).__name__}"])
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        object.__setattr__(new, f.name, recording(v, f"{key}{f.name}.") if dataclasses.is_dataclass(v) else v)
    object.__setattr__(new, "_p3d_key", key)
    return new


def all_keys(cls, key=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from all_keys(f.default_factory, f"{key}{f.name}.")
        else:
            yield key + f.name


def _train(rank, world, cfg):
    """launch.train.run on this rank with a recording copy of cfg; the keys read on this rank."""
    from launch.train import run
    from parallel.mesh import Mesh
    READS.clear()
    rec = recording(cfg)
    run(rec, Mesh(pp=cfg.parallel.pp, dp=cfg.parallel.dp, tp=cfg.parallel.tp), print_fn=lambda *a, **k: None)
    return sorted(READS)


def _cfg(over: dict, *args) -> Config:
    tree = copy.deepcopy(BASE)
    for k, v in over.items():
        tree[k] = {**tree.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(data=tree, overrides=list(args)).validate(2)


def test_validation_and_dumps_do_not_count():
    """The recorder's exclusions: validating, dumping and copying a config reads nothing that counts."""
    from launch.dry_run import describe
    rec = recording(_cfg({"parallel": {"dp": 2}}))
    READS.clear()
    rec.validate(2)
    copy.deepcopy(rec.to_dict())
    assert rec == rec and READS == set()
    describe(rec)                                     # the dry run acts on the config: reads count
    assert {"parallel.dp", "zero.stage", "model.factory"} <= READS and "loss_scale.hysteresis" not in READS


def test_every_config_key_is_read(tmp_path):
    from launch.dry_run import describe
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    ck = str(tmp_path / "ck")
    READS.clear()
    describe(recording(_cfg({"parallel": {"dp": 2}})))
    seen = set(READS)
    main = _cfg({"parallel": {"dp": 2}, "precision": "fp16", "loss": "cross_entropy", "device": "cpu",
                 "data": {"shuffle": True},
                 "optimizer": {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01},
                 "scheduler": {"name": "warmup_cosine", "warmup_steps": 1, "total_steps": 3, "min_lr_ratio": 0.1,
                               "warmup_start_ratio": 0.1, "warmup_type": "log", "convention": "deepspeed"},
                 "loss_scale": {"initial": 1024.0, "growth_interval": 2, "hysteresis": 2, "min": 1.0,
                                "consecutive_hysteresis": True},
                 "zero": {"stage": 3, "bucket_mb": 0.01, "prefetch": True, "units": "block",
                          "offload": {"optimizer": "nvme", "params": "cpu", "nvme_path": str(nvme), "buffer_count": 2,
                                      "buffer_mb": 0.05, "prefetch_depth": 1}},
                 "train": {"steps": 2, "log_every": 1, "grad_clip": 1.0, "metrics_file": str(tmp_path / "m.jsonl"),
                           "checkpoint": {"dir": ck, "every": 2, "keep_last": 1}, "resume": True,
                           "finish": "examples.gpt:sample",
                           "peak_flops": 1e12, "on_nonfinite": "stop", "check_collectives": True},
                 "activation_checkpointing": {"policy": "full"}})
    for reads in run_ranks(_train, 2, main):
        seen |= set(reads)
    pipe = _cfg({"parallel": {"pp": 2, "pp_schedule": "interleaved", "pp_virtual_stages": 2,
                              "pp_split": [1, 2, 3]}, "precision": "bf16",
                 "activation_checkpointing": {"policy": "every", "every": 2}})
    from examples.gpt import TP_PLAN
    tp = _cfg({"parallel": {"tp": 2, "sequence_parallel": True, "tp_plan": dict(TP_PLAN)},
               "precision": "fp16", "loss_scale": {"static": 64.0},
               "activation_checkpointing": {"policy": "selective", "save_ops": ["mm", "addmm"]}})
    for cfg in (pipe, tp):
        for reads in run_ranks(_train, 2, cfg):
            seen |= set(reads)
    keys = set(all_keys(Config))
    assert set(ALLOW) <= keys, f"ALLOW names keys that do not exist: {sorted(set(ALLOW) - keys)}"
    dead = sorted(keys - seen - set(ALLOW))
    assert not dead, (f"config keys no code reads in these runs: {dead}. Make each act (or remove it, with a clear "
                      f"error for old configs), or add it to ALLOW with the reason it is not read here")
    stale = sorted(set(ALLOW) & seen)
    assert not stale, f"ALLOW entries that are read after all: {stale}; remove them from ALLOW"
