"""DeepSpeed JSON configs: every key mapped or ignored with a reason, the mapped config equal to its native
equivalent field by field, DeepSpeed's Adam/AdamW semantics in numbers, and one clear error per bad key."""
import copy
import dataclasses
import glob
import json
import os

import pytest
import torch

from parallel.config import ConfigError, SchedulerConfig, load_config
from parallel.config.deepspeed import format_report, load_deepspeed_json, map_deepspeed, merge_tree, resolve_path
from parallel.config.deepspeed_defaults import clip_default
from parallel.optim.factory import optimizer_factory
from parallel.optim.lr_schedule import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_DIR = os.path.join(ROOT, "configs", "deepspeed")
BASE = {
    "model": {"factory": "examples.gpt:build",
              "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 2, "n_head": 4, "n_embd": 32}},
    "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64},
             "global_batch_size": 8, "micro_batch_size": 2},
    "parallel": {"dp": 2},
    "optimizer": {"name": "adamw", "lr": 0.001},
    "train": {"steps": 5, "seed": 0},
}
MiB = 2 ** 20
ADAM = {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8}
NONE = {"optimizer": "none", "params": "none"}
# a file without gradient_clipping means DeepSpeed's default (1.0 in current releases, 0 = off in <= 0.19.1;
# the installed DeepSpeed's when there is one): tests/test_deepspeed_defaults.py checks where it comes from
CLIP = {"train": {"grad_clip": clip_default()[0] or None}}
# the native YAML each public-style DeepSpeed config means (on top of BASE)
NATIVE = {
    "zero1": {**CLIP, "optimizer": {**ADAM, "weight_decay": 0.01},
              "zero": {"stage": 1, "bucket_mb": 5e8 * 4 / MiB, "offload": NONE}},
    "zero2": {"optimizer": {**ADAM, "betas": [0.9, 0.95], "weight_decay": 0.1}, "train": {"grad_clip": 1.0},
              "zero": {"stage": 2, "bucket_mb": 2e8 * 4 / MiB, "offload": NONE},
              "scheduler": {"name": "warmup_linear", "convention": "deepspeed", "warmup_type": "linear",
                            "warmup_steps": 2, "total_steps": 5, "warmup_start_ratio": 0.0, "min_lr_ratio": 0.0}},
    "zero3": {"optimizer": {**ADAM, "weight_decay": 0.0}, "train": {"grad_clip": 1.0},
              "zero": {"stage": 3, "bucket_mb": 1e6 * 4 / MiB, "prefetch": True, "unit_mb": 9e5 * 4 / MiB,
                       "max_reuse_distance": 1e9, "offload": NONE},
              "scheduler": {"name": "warmup_cosine", "convention": "deepspeed", "warmup_type": "linear",
                            "warmup_steps": 2, "total_steps": 5, "warmup_start_ratio": 0.1, "min_lr_ratio": 0.1}},
    "zero2_offload_cpu": {**CLIP, "optimizer": {**ADAM, "weight_decay": 0.01},
                          "zero": {"stage": 2, "bucket_mb": 2e8 * 4 / MiB, "offload": {**NONE, "optimizer": "cpu"}}},
    "zero3_nvme": {**CLIP, "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.01},
                   "zero": {"stage": 3, "bucket_mb": 1e6 * 4 / MiB, "prefetch": True, "unit_mb": 9e5 * 4 / MiB,
                            "max_reuse_distance": 1e9,
                            "offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": "runs/nvme",
                                        "buffer_count": 5, "buffer_mb": 1e8 * 4 / MiB}}},
    "bf16": {"precision": "bf16", "optimizer": {**ADAM, "weight_decay": 0.01}, "train": {"grad_clip": 1.0},
             "zero": {"stage": 2, "offload": NONE}},
    "fp16": {**CLIP, "precision": "fp16", "optimizer": {**ADAM, "weight_decay": 0.0},
             "zero": {"stage": 1, "offload": NONE},
             "loss_scale": {"static": None, "initial": 4096, "growth_interval": 500, "hysteresis": 2, "min": 1}},
    "auto": {"precision": "fp32", "optimizer": {"name": "adamw", "lr": 0.001}, "zero": {"stage": 2, "offload": NONE},
             "scheduler": {"name": "warmup", "convention": "deepspeed", "warmup_type": "log", "warmup_steps": 2,
                           "warmup_start_ratio": 0.0, "min_lr_ratio": 0.0}},
}
SCHED_FIELDS = ("warmup_start_ratio", "warmup_type", "convention")
HAS_SCHED_FIELDS = all(f in {x.name for x in dataclasses.fields(SchedulerConfig)} for f in SCHED_FIELDS)


def names():
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(DS_DIR, "*.json")))


def ds_file(name):
    return load_deepspeed_json(os.path.join(DS_DIR, name + ".json"))


def native_cfg(tree):
    return load_config(data=tree).validate(2).to_dict()


def leaf_keys(d, prefix=""):
    """Dotted keys the report must name: leaves, except that optimizer/scheduler params are leaves too."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("aio",):
            yield from leaf_keys(v, key + ".")
        else:
            yield key


def test_the_public_style_configs_are_all_here():
    assert names() == sorted(NATIVE)


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_every_key_is_mapped_or_ignored_one_line_each(name):
    ds = ds_file(name)
    _, report = map_deepspeed(ds, BASE, dp_size=2)
    for key in leaf_keys(ds):
        hits = [line for line in report if line.split(" = ")[0] == key or line.startswith(f"ignored: {key} (")]
        assert hits, f"{key} is neither mapped nor ignored in:\n" + "\n".join(report)
        if any(h.startswith("ignored:") for h in hits):
            assert len(hits) == 1, hits
    text = format_report(report, name)
    assert text.splitlines()[0].startswith(f"{name}: ") and len(text.splitlines()) == len(report) + 1


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_mapped_config_equals_the_native_config_field_by_field(name):
    overrides, _ = map_deepspeed(ds_file(name), BASE, dp_size=2)
    mapped, native = merge_tree(BASE, overrides), merge_tree(BASE, NATIVE[name])
    assert mapped.pop("scheduler", None) == native.pop("scheduler", None)     # the proposed scheduler fields
    got, want = native_cfg(mapped), native_cfg(native)
    assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}


@pytest.mark.skipif(not HAS_SCHED_FIELDS, reason=f"SchedulerConfig lacks the proposed fields {SCHED_FIELDS}")
@pytest.mark.parametrize("name", [n for n in sorted(NATIVE) if "scheduler" in NATIVE[n]])
def test_mapped_scheduler_equals_native_through_load_config(name):
    overrides, _ = map_deepspeed(ds_file(name), BASE, dp_size=2)
    assert native_cfg(merge_tree(BASE, overrides)) == native_cfg(merge_tree(BASE, NATIVE[name]))


def test_mapped_warmup_decay_gives_deepspeeds_learning_rates():
    """zero2.json's WarmupDecayLR(0 → 1e-3 over 2 steps, total 5, linear), DeepSpeed's lr per optimizer step."""
    sc = map_deepspeed(ds_file("zero2"), BASE, 2)[0]["scheduler"]
    s = Schedule(**sc)
    want = [0.0, 0.0, 0.5e-3, 1e-3, 2e-3 / 3, 1e-3 / 3, 0.0]
    assert [1e-3 * s(t) for t in range(7)] == pytest.approx(want, abs=1e-15)


# --- optimizer: DeepSpeed's FusedAdam semantics, in numbers ---------------------------------------------------
def fused_adam(p, grads, lr, betas, eps, wd, adam_w_mode):
    """DeepSpeed FusedAdam (multi_tensor_adam): mode 1 = decoupled decay, mode 0 = L2 added to the gradient."""
    m = v = torch.zeros_like(p)
    for step, g in enumerate(grads, 1):
        if not adam_w_mode:
            g = g + wd * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        denom = (v / (1 - betas[1] ** step)).sqrt() + eps
        update = (m / (1 - betas[0] ** step)) / denom
        if adam_w_mode:
            update = update + wd * p
        p = p - lr * update
    return p


@pytest.mark.parametrize("block,w_mode", [
    ({"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.2}}, True),            # "Adam" means AdamW here
    ({"type": "adam", "params": {"lr": 0.1, "weight_decay": 0.2, "adam_w_mode": False}}, False),
    ({"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.2, "adam_w_mode": False}}, True),
    ({"type": "AdamW", "params": {"lr": 0.1}}, True),                                # FusedAdam's weight_decay 0.0
    ({"type": "Adam", "params": {"lr": 0.1, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.3,
                                 "torch_adam": True}}, True),
])
def test_adam_types_map_to_the_same_numbers(block, w_mode):
    ov, _ = map_deepspeed({"optimizer": block}, BASE, 2)
    cfg = load_config(data=merge_tree(BASE, ov)).validate(2)
    p0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    grads = [torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64), torch.tensor([-0.2, 0.4, 0.05], dtype=torch.float64)]
    prm = torch.nn.Parameter(p0.clone())
    opt = optimizer_factory(cfg.optimizer)([prm])
    for g in grads:
        prm.grad = g.clone()
        opt.step()
    hp = block["params"]
    want = fused_adam(p0, grads, hp["lr"], hp.get("betas", (0.9, 0.999)), hp.get("eps", 1e-8),
                      hp.get("weight_decay", 0.0), w_mode)
    torch.testing.assert_close(prm.detach(), want, rtol=1e-12, atol=1e-14)


def test_torch_adam_without_weight_decay_keeps_torchs_default_and_sgd_drops_adam_fields():
    base = merge_tree(BASE, {"optimizer": {"weight_decay": 0.5, "betas": [0.8, 0.9]}})
    ov, _ = map_deepspeed({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, base, 2)
    assert ov["optimizer"]["weight_decay"] is None                                  # torch.optim.AdamW's 0.01
    ov, report = map_deepspeed({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}, base, 2)
    cfg = load_config(data=merge_tree(base, ov)).validate(2)
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.betas) == ("sgd", 0.1, 0.9, None)
    assert "optimizer.params.betas = (not used) -> optimizer.betas = null (SGD has no betas)" in report


# --- batch sizes, precision, ZeRO, auto ---------------------------------------------------------------------
@pytest.mark.parametrize("ds,dp,want", [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, (16, 2)),     # gas derived = 4
    ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 2, (16, 4)),
    ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 4, (24, 3)),
    ({"train_batch_size": 12}, 4, (12, 3)),                                           # gas = 1
    ({"train_micro_batch_size_per_gpu": 5}, 2, (10, 5)),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"},
     2, (8, 2)),
    ({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": "auto"}, 2, (4, 1)),   # native gas 2
])
def test_batch_triple_follows_deepspeeds_rule(ds, dp, want):
    ov, _ = map_deepspeed(ds, BASE, dp)
    assert (ov["data"]["global_batch_size"], ov["data"]["micro_batch_size"]) == want


def test_precision_loss_scale_buckets_and_auto_from_native():
    base = merge_tree(BASE, {"precision": "bf16", "zero": {"stage": 2}, "train": {"grad_clip": 0.5},
                             "optimizer": {"lr": 0.01}})
    ds = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": "auto", "reduce_bucket_size": 1048576,
                                                             "stage3_prefetch_bucket_size": 0},
          "gradient_clipping": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    ov, rep = map_deepspeed(ds, base, 2)
    assert ov["precision"] == "bf16" and ov["zero"]["stage"] == 2 and ov["train"]["grad_clip"] == 0.5
    assert ov["zero"]["bucket_mb"] == 2.0 and "prefetch" not in ov["zero"]          # 2**20 bf16 elements = 2 MiB
    assert any(x.startswith("ignored: zero_optimization.stage3_prefetch_bucket_size (stage 2") for x in rep)
    assert ov["optimizer"]["lr"] == 0.01
    ov, rep = map_deepspeed({"fp16": {"enabled": True, "loss_scale": 128, "initial_scale_power": 10}}, BASE, 2)
    assert ov["loss_scale"]["static"] == 128.0 and ov["loss_scale"]["initial"] == 1024.0
    assert ov["loss_scale"]["growth_interval"] == 1000 and ov["loss_scale"]["hysteresis"] == 2    # DeepSpeed defaults
    assert ov["loss_scale"]["consecutive_hysteresis"] is False
    ov, rep = map_deepspeed({"fp16": {"enabled": True, "consecutive_hysteresis": True}}, BASE, 2)
    assert ov["loss_scale"]["consecutive_hysteresis"] is True
    assert "fp16.consecutive_hysteresis = true -> loss_scale.consecutive_hysteresis = true" in rep
    ov, rep = map_deepspeed({"fp16": {"enabled": False, "loss_scale_window": 7}, "gradient_clipping": 0.0}, BASE, 2)
    assert ov == {"precision": "fp32", "train": {"grad_clip": None}}
    assert "ignored: fp16.loss_scale_window (fp16 is off)" in rep


def test_legacy_forms_and_merge_semantics():
    ov, _ = map_deepspeed({"zero_optimization": {"stage": 2, "cpu_offload": True}}, BASE, 2)
    assert ov["zero"]["offload"] == {"optimizer": "cpu", "params": "none"}
    assert map_deepspeed({"zero_optimization": True}, BASE, 2)[0] == {"zero": {"stage": 1}, **CLIP}
    ov, _ = map_deepspeed({"bfloat16": {"enabled": True}}, BASE, 2)
    assert ov == {"precision": "bf16", **CLIP}
    base = copy.deepcopy(BASE)
    merged = merge_tree(base, {"optimizer": {"lr": 0.5}, "zero": {"stage": 3}})
    assert merged["optimizer"] == {"name": "adamw", "lr": 0.5} and merged["zero"] == {"stage": 3}
    assert base == BASE                                                               # not mutated


@pytest.mark.parametrize("ds,needle", [
    ({"optimizer": {"type": "Adagrad"}}, 'optimizer.type: "Adagrad" is not available'),
    ({"optimizer": {"type": "OneBitLamb", "params": {"coef_beta": 0.9}}}, "optimizer.params.coef_beta: unknown key"),
    ({"optimizer": {"type": "ZeroOneAdam", "params": {"eps_inside_sqrt": True}}}, "optimizer.params.eps_inside_sqrt"),
    ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, "optimizer.params.amsgrad: true is not supported"),
    ({"optimizer": {"type": "Adam", "params": {"bias_correction": False}}}, "optimizer.params.bias_correction"),
    ({"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}}, "use the top-level gradient_clipping"),
    ({"optimizer": {"type": "SGD", "params": {"nesterov": True}}}, "optimizer.params.nesterov: true"),
    ({"optimizer": {"type": "Adam", "params": {"lr": [1e-3]}}}, "optimizer.params.lr: expected a number"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled and bf16.enabled: both are on"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}, "fp16.fp16_master_weights_and_grads: true"),
    ({"fp16": {"enabled": True, "consecutive_hysteresis": 1}}, "fp16.consecutive_hysteresis: expected true or false"),
    ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "keep only bf16"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: 4 must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "parameter offload needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "optimizer offload needs ZeRO stage"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "nvme_path is not set"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/a"},
                            "offload_optimizer": {"device": "nvme", "nvme_path": "/b"}}}, "differ (/b vs /a)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}, 'device: "gpu" must be "cpu"'),
    ({"zero_optimization": {"stage": 2, "zero_quantized_gradients": True}}, "quantized ZeRO communication"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com: unknown key"),
    ({"scheduler": {"type": "OneCycle", "params": {}}}, 'scheduler.type: "OneCycle" cannot be reproduced exactly'),
    ({"scheduler": {"type": "StepLR", "params": {"step_size": 1}}}, '"StepLR" cannot be reproduced'),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2}}},
     "total_num_steps: WarmupDecayLR needs"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "exp"}}}, 'warmup_type: "exp" is not linear or log'),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": [0.1, 0.2]}}}, "one number (parallel3d has one"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 2, "warmup_num_steps": 2}}},
     "must exceed the warm-up"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 9, "warmup_max_lr": 1}}},
     "scheduler.params.warmup_max_lr: unknown key"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     "train_batch_size=10 must equal train_micro_batch_size_per_gpu=2 x gradient_accumulation_steps=2 x dp=2 (= 8)"),
    ({"train_batch_size": 7}, "train_batch_size=7 must equal train_micro_batch_size_per_gpu=3"),
    ({"gradient_accumulation_steps": 2}, "neither train_batch_size nor train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu: 0 must be a positive integer"),
    ({"gradient_clipping": -1}, "gradient_clipping: -1 must be 0 (off)"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, 'data_types.grad_accum_dtype: "bf16" is not supported'),
    ({"gradient_allreduce_op": "sum"}, "gradient_allreduce_op"),
    ({"sparse_attention": {"mode": "fixed"}}, "sparse_attention changes the model"),
    ({"tensor_parallel": {"autotp_size": 2}}, "use parallel.tp instead"),
    ({"curriculum_learning": {"enabled": True}}, "curriculum_learning changes"),
    ({"train_batch_sise": 8}, "train_batch_sise: unknown DeepSpeed key"),
])
def test_keys_whose_meaning_would_change_are_errors(ds, needle):
    with pytest.raises(ConfigError) as e:
        map_deepspeed(ds, BASE, dp_size=2)
    assert needle in str(e.value) and str(e.value).startswith("deepspeed config: ")


def test_harmless_keys_are_ignored_with_a_reason():
    ds = {"steps_per_print": 10, "wall_clock_breakdown": True, "zero_allow_untested_optimizer": True,
          "activation_checkpointing": {"partition_activations": True}, "curriculum_learning": {"enabled": False},
          "zero_optimization": {"stage": 1, "overlap_comm": True, "round_robin_gradients": True}}
    _, report = map_deepspeed(ds, BASE, 2)
    ignored = [line for line in report if line.startswith("ignored: ")]
    assert len(ignored) == 7 and all(line.endswith(")") and " (" in line for line in ignored)
    assert any(line.startswith("ignored: zero_optimization.overlap_comm (parallel3d overlaps") for line in ignored)


def test_load_deepspeed_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: pass --deepspeed"):
        load_deepspeed_json(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,\n "fp16": {enabled: true}}')
    with pytest.raises(ConfigError, match="is not valid JSON: .* at line 2 column 11"):
        load_deepspeed_json(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        load_deepspeed_json(str(bad))
    bad.write_text('{"fp16": {}, "fp16": {}}')
    with pytest.raises(ConfigError, match="duplicate key 'fp16'"):
        load_deepspeed_json(str(bad))
    with pytest.raises(ConfigError, match="is a directory"):
        load_deepspeed_json(str(tmp_path))
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_batch_size": 8}))
    assert resolve_path("ds.json", str(tmp_path / "run.yaml")) == str(good)
    assert resolve_path("elsewhere.json", str(tmp_path / "run.yaml")) == "elsewhere.json"
    with pytest.raises(ConfigError, match="dp_size=0 must be a positive int"):
        map_deepspeed({}, BASE, 0)


def test_stage3_prefetch_bucket_and_reuse_distance_map_to_units_and_kept():
    """DeepSpeed's stage-3 knobs (issue 18): the prefetch bucket (elements) → zero.unit_mb (MiB of merged units), the
    reuse distance → zero.max_reuse_distance; absent, DeepSpeed's defaults (5e7, 1e9); stage < 3 ignores the
    reuse distance; bad values refused."""
    ov, rep = map_deepspeed({"zero_optimization": {"stage": 3}}, BASE, 2)
    assert ov["zero"]["unit_mb"] == 5e7 * 4 / MiB and ov["zero"]["max_reuse_distance"] == 1e9
    assert any("stage3_prefetch_bucket_size = (unset: DeepSpeed's default 5e+07) -> zero.unit_mb" in x for x in rep)
    bf = merge_tree(BASE, {"precision": "bf16"})
    ov, rep = map_deepspeed({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 ** 20,
                                                   "stage3_max_reuse_distance": 0}}, bf, 2)
    assert ov["zero"]["unit_mb"] == 2.0 and ov["zero"]["max_reuse_distance"] == 0      # 2**20 bf16 elements
    ov, rep = map_deepspeed({"zero_optimization": {"stage": 2, "stage3_max_reuse_distance": 5}}, BASE, 2)
    assert "unit_mb" not in ov["zero"] and "max_reuse_distance" not in ov["zero"]
    assert "ignored: zero_optimization.stage3_max_reuse_distance (stage 2: parameters are not sharded)" in rep
    for bad, msg in (({"stage3_max_reuse_distance": -1}, "stage3_max_reuse_distance: -1 must be >= 0"),
                     ({"stage3_prefetch_bucket_size": "x"}, "stage3_prefetch_bucket_size: expected a number")):
        with pytest.raises(ConfigError, match=msg):
            map_deepspeed({"zero_optimization": {"stage": 3, **bad}}, BASE, 2)
