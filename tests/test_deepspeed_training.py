"""Each public-style DeepSpeed config trains the small GPT 5 steps with the losses of its native
equivalent (the same run written as our YAML), on 2 gloo ranks — the offload configs too (their
nvme_path moved under the test's temporary folder)."""
import os

from harness import run_ranks
from reference import assert_close_curve, reference_losses
from test_deepspeed_config import BASE, DS_DIR, NATIVE

from parallel.config import load_config
from parallel.config.deepspeed import merge_tree

OFFLOADED = [n for n in sorted(NATIVE) if NATIVE[n]["zero"]["offload"]["optimizer"] != "none"]


def _train_both(rank, world, names, tmp):
    from launch.train import run
    from parallel.mesh import Mesh
    out = {}
    for name in names:
        pair = []
        for kw in (dict(data=BASE, deepspeed=os.path.join(DS_DIR, name + ".json")),
                   dict(data=merge_tree(BASE, NATIVE[name]))):
            over = [f"zero.offload.nvme_path={tmp}"] if name in OFFLOADED else []
            cfg = load_config(overrides=over, **kw).validate(world)
            res = run(cfg, Mesh(dp=2), print_fn=lambda *a, **k: None)
            pair.append((res["losses"], cfg.zero.offload.optimizer, cfg.zero.offload.params))
        out[name] = pair
    return out


def test_deepspeed_configs_train_like_their_native_equivalents(tmp_path):
    assert set(OFFLOADED) == {"zero2_offload_cpu", "zero3_nvme"}
    res = run_ranks(_train_both, 2, sorted(NATIVE), str(tmp_path), timeout=900)[0]
    assert sorted(res) == sorted(NATIVE)
    for name, ((ds, *ds_off), (native, *native_off)) in res.items():
        assert ds_off == native_off, (name, ds_off, native_off)
        assert len(ds) == 5 and ds == native, (name, ds, native)
        assert len(set(ds)) == 5, (name, ds)                    # the weights change every step
    assert res["zero2_offload_cpu"][0][1:] == ("cpu", "none")
    assert res["zero3_nvme"][0][1:] == ("nvme", "nvme")
    # the fp32 ZeRO-1 config is also the plain single-process loop
    assert_close_curve(res["zero1"][0][0], reference_losses(load_config(data=merge_tree(BASE, NATIVE["zero1"]))),
                       1e-5, "zero1.json")
    # and offloading changes nothing but where the state lives: the offloaded curves equal the same run
    # kept in memory
    for name in OFFLOADED:
        no_offload = {"zero": {"offload": {"optimizer": "none", "params": "none"}}}
        plain = merge_tree(BASE, merge_tree(NATIVE[name], no_offload))
        assert_close_curve(res[name][0][0], reference_losses(load_config(data=plain)), 1e-5, f"{name}.json")
