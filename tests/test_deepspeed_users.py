"""A user coming from DeepSpeed: values DeepSpeed would read differently are refused naming the JSON key, keys
DeepSpeed accepts but does not use are ignored with a reason, an absent stage-3 key does not override the YAML, and
errors raised after the mapping (validation, pre-flight, the run itself) name the JSON key that set the native key
they are about (a YAML value for it would be overridden by the JSON)."""
import json
import os
import subprocess
import sys

import pytest
from test_deepspeed_config import BASE, DS_DIR

from parallel.config import ConfigError
from parallel.config import deepspeed as D
from parallel.config.deepspeed import load_deepspeed_json, map_deepspeed, merge_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ds, needle", [
    ({"fp16": {"enabled": "false"}}, 'fp16.enabled: expected true, false or "auto", got "false"'),
    ({"bf16": {"enabled": "true"}}, 'bf16.enabled: expected true, false or "auto", got "true"'),
    ({"bfloat16": {"enabled": 1}}, "bfloat16.enabled: expected true, false"),
    ({"curriculum_learning": {"enabled": "false"}}, 'curriculum_learning.enabled: expected true or false, got "false"'),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}},
     "zero_optimization.reduce_bucket_size: -1 must be a positive number of elements"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}, "reduce_bucket_size: 0 must be a positive"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "buffer_count": 0}}},
     "zero_optimization.offload_optimizer.buffer_count: 0 must be 1 or more buffers"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "buffer_size": -1}}},
     "zero_optimization.offload_param.buffer_size: -1 must be a positive number of elements"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": 5}}},
     "zero_optimization.offload_param.nvme_path: expected the path of a directory (a string), got 5"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "auto"}}},
     "zero_optimization.offload_param.nvme_path: \"auto\" takes zero.offload.nvme_path from the YAML, which does not"),
])
def test_values_deepspeed_would_read_otherwise_are_refused_naming_the_json_key(ds, needle):
    """bool("false") is True: a quoted ``"enabled": "false"`` turned fp16 on (main mapped it to precision fp16);
    a negative bucket / buffer got an error naming zero.bucket_mb=-3.8e-06 (a key the user never wrote)."""
    with pytest.raises(ConfigError) as e:
        map_deepspeed(ds, BASE, dp_size=2)
    assert needle in str(e.value), str(e.value)


def test_stage3_prefetch_bucket_below_stage3_is_ignored_with_a_reason():
    """DeepSpeed accepts stage3_prefetch_bucket_size at stage 1/2 and does nothing with it; main mapped it onto
    zero.prefetch (a stage-3 setting)."""
    for key in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
        ov, rep = map_deepspeed({"zero_optimization": {"stage": 2, key: 5e7}}, BASE, 2)
        assert "prefetch" not in ov["zero"] and "unit_mb" not in ov["zero"], ov
        assert f"ignored: zero_optimization.{key} (stage 2: parameters are not sharded, nothing is fetched)" in rep


def test_absent_stage3_keys_keep_the_yaml_and_stated_keys_win():
    """As gradient_clipping: DeepSpeed's default for an absent key does not override a YAML zero.unit_mb (a model
    with a ZeRO-3 region needs 0) nor its kept units; a key the JSON states still wins."""
    base = merge_tree(BASE, {"zero": {"stage": 3, "unit_mb": 0, "keep_after_forward": 1}})
    ov, rep = map_deepspeed({"zero_optimization": {"stage": 3}}, base, 2)
    assert "unit_mb" not in ov["zero"] and "max_reuse_distance" not in ov["zero"], ov
    assert any(x.endswith("-> zero.unit_mb = 0 kept (the YAML sets it)") for x in rep), rep
    assert any(x.endswith("-> zero.keep_after_forward = 1 kept (the YAML sets it)") for x in rep), rep
    ov, _ = map_deepspeed({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 ** 18,
                                                 "stage3_max_reuse_distance": 0}}, base, 2)
    assert ov["zero"]["unit_mb"] == 1.0 and ov["zero"]["max_reuse_distance"] == 0


def test_hint_names_the_json_keys_behind_the_native_keys_of_a_message():
    deepspeed_hint = D.deepspeed_hint
    _, rep = map_deepspeed(load_deepspeed_json(os.path.join(DS_DIR, "zero3_nvme.json")), BASE, 2)
    hint = deepspeed_hint("zero.offload.nvme_path '/x' does not exist", rep)
    assert ("zero.offload.nvme_path came from the DeepSpeed config: zero_optimization.offload_optimizer.nvme_path = "
            "\"runs/nvme\" and zero_optimization.offload_param.nvme_path = \"runs/nvme\"") in hint, hint
    assert hint.count("\n") == 1
    hint = deepspeed_hint("zero.unit_mb: ... set zero.unit_mb: 0", rep)
    assert "zero_optimization.stage3_prefetch_bucket_size = 900000.0" in hint and "nvme" not in hint, hint
    assert deepspeed_hint("zero.unit_mbx and xzero.unit_mb", rep) == ""        # whole keys only
    _, rep = map_deepspeed({"zero_optimization": {"stage": 3}}, merge_tree(BASE, {"zero": {"unit_mb": 0}}), 2)
    assert deepspeed_hint("set zero.unit_mb: 0", rep) == ""                    # kept from the YAML: not the JSON's


def _launch(tmp_path, tree, ds, timeout):
    cfg, js = tmp_path / "run.yaml", tmp_path / "ds.json"
    cfg.write_text(json.dumps(tree))                 # JSON is YAML
    js.write_text(json.dumps(ds))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch", "--config", str(cfg), "--deepspeed", str(js)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_preflight_error_names_the_deepspeed_key(tmp_path):
    """No worker starts: the missing nvme directory is named by the JSON key that set it."""
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "missing")}}}
    out = _launch(tmp_path, BASE, ds, 120)
    assert out.returncode == 2, out.stderr
    assert "no worker was started" in out.stderr and "does not exist" in out.stderr, out.stderr
    assert "(zero.offload.nvme_path came from the DeepSpeed config: zero_optimization.offload_param.nvme_path" \
           in out.stderr, out.stderr


def _one_process(cfg):
    """The plain loop of tests/reference.py plus the configured scheduler (the DeepSpeed files set one)."""
    import torch
    from torch.utils.data import default_collate

    from parallel.config import import_object
    from parallel.data import global_indices
    from parallel.loss import resolve_loss
    from parallel.optim.factory import optimizer_factory
    from parallel.optim.lr_schedule import build_scheduler
    torch.manual_seed(cfg.train.seed)
    model = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
    data = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    sched, losses = build_scheduler(opt, cfg.scheduler, cfg.train.steps), []
    for t in range(cfg.train.steps):
        idx = global_indices(t, cfg.data.global_batch_size, len(data), cfg.train.seed, cfg.data.shuffle)
        x, y = default_collate([data[i] for i in idx])
        opt.zero_grad()
        loss = resolve_loss(cfg.loss)(model(x), y)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow                   # two 2-rank torchrun jobs of a transformers model: ~37 s loaded
def test_region_refusing_the_deepspeed_prefetch_bucket_is_run_again_unmerged(tmp_path):
    """transformers' DBRX calls its expert GLU once per hit expert (a ZeRO-3 region, parallel/zero/regions.py);
    configs/deepspeed/zero3.json's stage3_prefetch_bucket_size merges its units, which both ranks refuse at the first
    forward (no hang), naming the JSON key (a YAML zero.unit_mb would be overridden by it). DeepSpeed runs that file
    (its bucket only sets fetching ahead), so the launcher runs the job once more with zero.unit_mb=0 (launch/
    unmerged.py), taking back its own checkpoint directory: the losses are one process's."""
    pytest.importorskip("transformers")
    from parallel.config import load_config
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    tree = merge_tree(BASE, {"model": {"factory": "tests.zoo:build", "kwargs": {"model_type": "dbrx"}},
                             "zero": {"stage": 3}, "train": {"steps": 2, "metrics_file": str(metrics),
                                                             "checkpoint": {"dir": str(ck), "every": 1}}})
    ds = load_deepspeed_json(os.path.join(DS_DIR, "zero3.json"))
    out = _launch(tmp_path, tree, ds, 300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "transformer.blocks.0.ffn.experts" in text and "hold merged stage-3 units" in text, text[-3000:]
    assert ("(zero.unit_mb came from the DeepSpeed config: zero_optimization.stage3_prefetch_bucket_size = "
            "900000.0; change zero_optimization.stage3_prefetch_bucket_size in the JSON") in text, text[-3000:]
    assert text.count("launch: the ranks refused merged ZeRO-3 units") == 1, text[-3000:]
    got = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()]
    want = _one_process(load_config(data=tree, deepspeed=str(tmp_path / "ds.json")).validate(2))
    assert len(got) == 2 and all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)
    assert sorted(os.listdir(ck)) == ["step_00000001", "step_00000002"]      # the owner file released at exit


class _Failure:
    def __init__(self, reason, kind="error"):
        self.error_file_data = {"p3d": {"kind": kind, "reason": reason}}


def test_retry_only_for_a_refusal_of_the_json_bucket(tmp_path):
    from launch.unmerged import release_refused_owner, retry_unmerged
    refused = {0: _Failure("ConfigError: zero.unit_mb: the region(s) ['e'] call ..."),
               1: _Failure("ConfigError: zero.unit_mb: the region(s) ['e'] call ...")}
    _, rep = map_deepspeed(load_deepspeed_json(os.path.join(DS_DIR, "zero3.json")), BASE, 2)
    assert "stage3_prefetch_bucket_size = 900000.0" in retry_unmerged(refused, rep, [])
    _, absent = map_deepspeed({"zero_optimization": {"stage": 3}}, BASE, 2)          # DeepSpeed's default: retried
    assert "(unset: DeepSpeed's default 5e+07)" in retry_unmerged(refused, absent, [])
    assert retry_unmerged(refused, rep, ["zero.unit_mb=4"]) is None                  # the user's own value
    _, kept = map_deepspeed({"zero_optimization": {"stage": 3}}, merge_tree(BASE, {"zero": {"unit_mb": 4}}), 2)
    assert retry_unmerged(refused, kept, []) is None                                  # the YAML's
    _, auto = map_deepspeed({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}, BASE, 2)
    assert retry_unmerged(refused, auto, []) is None                                  # "auto": the YAML's
    assert retry_unmerged({**refused, 1: _Failure("RuntimeError: peer", "peer")}, rep, [])   # stopped by torchrun
    assert retry_unmerged({**refused, 1: _Failure("RuntimeError: a bug")}, rep, []) is None  # its own failure
    assert retry_unmerged({0: _Failure("ConfigError: zero.bucket_mb ...")}, rep, []) is None
    assert retry_unmerged({}, rep, []) is None
    assert retry_unmerged(refused, rep, [], nnodes=2) is None    # per-node decisions could differ: no retry
    owner = tmp_path / "OWNER.json"
    owner.write_text(json.dumps({"job": "a", "host": __import__("socket").gethostname(), "launcher_pid": 1, "pid": 2}))
    assert not release_refused_owner(str(tmp_path)) and owner.exists()               # another launcher's
    owner.write_text(json.dumps({"job": "a", "host": __import__("socket").gethostname(),
                                 "launcher_pid": os.getpid(), "pid": 2}))
    assert release_refused_owner(str(tmp_path)) and not owner.exists()               # this launcher's refused run
