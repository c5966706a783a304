"""Each public-style DeepSpeed config trains the small GPT 5 steps with the losses of its native
equivalent (the same run written as our YAML), on 2 gloo ranks."""
import os

from harness import run_ranks
from parallel.config import load_config
from parallel.deepspeed_config import merge_tree
from reference import assert_close_curve, reference_losses
from test_deepspeed_config import BASE, DS_DIR, NATIVE

TRAINABLE = [n for n in sorted(NATIVE) if "offload" not in n and "nvme" not in n]


def _train_both(rank, world, names):
    from launch.train import run
    from parallel.mesh import Mesh
    out = {}
    for name in names:
        pair = []
        for cfg in (load_config(data=BASE, deepspeed=os.path.join(DS_DIR, name + ".json")),
                    load_config(data=merge_tree(BASE, NATIVE[name]))):
            cfg = cfg.validate(world)
            pair.append(run(cfg, Mesh(dp=2), print_fn=lambda *a, **k: None)["losses"])
        out[name] = pair
    return out


def test_deepspeed_configs_train_like_their_native_equivalents():
    res = run_ranks(_train_both, 2, TRAINABLE, timeout=600)[0]
    for name, (ds, native) in res.items():
        assert len(ds) == 5 and ds == native, (name, ds, native)
        assert len(set(ds)) == 5, (name, ds)                    # the weights change every step
    # the fp32 ZeRO-1 config is also the plain single-process loop
    assert_close_curve(res["zero1"][0], reference_losses(load_config(data=merge_tree(BASE, NATIVE["zero1"]))),
                       1e-5, "zero1.json")
