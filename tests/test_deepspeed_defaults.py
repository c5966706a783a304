"""A DeepSpeed JSON without ``gradient_clipping`` means DeepSpeed's default, which changed from 0 (off, <= 0.19.1)
to 1.0 (deepspeedai/DeepSpeed PR #8068): the mapping uses the installed DeepSpeed's value (read from its
constants.py), else the current release's 1.0, keeps a YAML's own train.grad_clip, and says which in the report."""
import importlib
import sys

import pytest

from parallel.config import deepspeed_defaults as D
from parallel.config import load_config
from parallel.config.deepspeed import map_deepspeed, merge_tree

BASE = {"model": {"factory": "examples.gpt:build",
                  "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 2, "n_head": 4, "n_embd": 32}},
        "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64},
                 "global_batch_size": 8, "micro_batch_size": 2},
        "parallel": {"dp": 2}, "optimizer": {"name": "adamw", "lr": 0.001}, "train": {"steps": 5, "seed": 0}}
DS = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}


def fake_deepspeed(root, constant_line: str | None, version="0.19.1"):
    """A DeepSpeed package folder (never imported) whose runtime/constants.py holds ``constant_line``."""
    pkg = root / "deepspeed"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the mapping must not import DeepSpeed')\n")
    lines = ["GRADIENT_CLIPPING = 'gradient_clipping'"] + ([constant_line] if constant_line else [])
    (pkg / "runtime" / "constants.py").write_text("\n".join(lines) + "\n")
    dist = root / f"deepspeed-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {version}\n")
    return pkg


@pytest.fixture
def installed(tmp_path, monkeypatch):
    def install(constant_line, version="0.19.1"):
        pkg = fake_deepspeed(tmp_path, constant_line, version)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
        importlib.invalidate_caches()
        return pkg
    return install


def clip_line(report):
    hits = [ln for ln in report if ln.startswith("gradient_clipping = ")]
    assert len(hits) == 1, report
    return hits[0]


def test_old_installed_deepspeed_means_no_clipping(installed):
    pkg = installed("GRADIENT_CLIPPING_DEFAULT = 0.")
    ov, report = map_deepspeed(DS, BASE, 2)
    assert ov["train"] == {"grad_clip": None}
    line = clip_line(report)
    assert "DeepSpeed's default 0" in line and "installed DeepSpeed 0.19.1" in line, line
    assert str(pkg / "runtime" / "constants.py") in line and "no clipping" in line   # (its __init__ would raise)


def test_new_installed_deepspeed_clips_at_its_value(installed):
    installed("GRADIENT_CLIPPING_DEFAULT = 1.0", version="0.19.8")
    ov, report = map_deepspeed(DS, BASE, 2)
    assert ov["train"] == {"grad_clip": 1.0}
    line = clip_line(report)
    assert "installed DeepSpeed 0.19.8" in line and "max global L2 norm 1" in line
    assert 'write "gradient_clipping": 0.0' in line                    # how to ask for the other meaning
    cfg = load_config(data=merge_tree(BASE, ov)).validate(2)
    assert cfg.train.grad_clip == 1.0


def test_unreadable_constant_falls_back_to_the_documented_default(installed):
    installed(None, version="9.9.9")                                   # the constant moved or was renamed
    ov, report = map_deepspeed(DS, BASE, 2)
    assert ov["train"] == {"grad_clip": D.DOCUMENTED_CLIP_DEFAULT} and D.DOCUMENTED_CLIP_DEFAULT == 1.0
    assert "DeepSpeed 9.9.9 is installed" in clip_line(report) and "could not be read" in clip_line(report)


def test_without_deepspeed_the_current_release_default(monkeypatch):
    monkeypatch.setattr(D, "_deepspeed_dir", lambda: None)
    ov, report = map_deepspeed(DS, BASE, 2)
    assert ov["train"] == {"grad_clip": 1.0}
    assert "DeepSpeed is not installed here" in clip_line(report) and "PR #8068" in clip_line(report)


@pytest.mark.parametrize("yaml_clip", [None, 0.5])
def test_a_yaml_grad_clip_is_kept_and_the_stated_key_still_wins(monkeypatch, yaml_clip):
    monkeypatch.setattr(D, "_deepspeed_dir", lambda: None)
    base = merge_tree(BASE, {"train": {"grad_clip": yaml_clip}})
    ov, report = map_deepspeed(DS, base, 2)
    assert "train" not in ov
    assert "kept (the YAML sets it)" in clip_line(report) and "would be 1" in clip_line(report)
    assert load_config(data=merge_tree(base, ov)).validate(2).train.grad_clip == yaml_clip
    ov, _ = map_deepspeed({**DS, "gradient_clipping": 0.0}, base, 2)
    assert ov["train"] == {"grad_clip": None}                         # what the file states replaces the YAML


@pytest.mark.slow
def test_the_mapped_default_changes_the_update_like_deepspeeds_clipping(monkeypatch):
    """The default is not a label: after the mapping the reference loop clips to norm 1 (2 Adam steps differ)."""
    from reference import reference_losses
    monkeypatch.setattr(D, "_deepspeed_dir", lambda: None)
    base = merge_tree(BASE, {"parallel": {"dp": 1}, "train": {"steps": 3}})
    ds = {"train_micro_batch_size_per_gpu": 8}
    clipped = reference_losses(load_config(data=merge_tree(base, map_deepspeed(ds, base, 1)[0])))
    off = reference_losses(load_config(data=merge_tree(base, map_deepspeed({**ds, "gradient_clipping": 0}, base,
                                                                           1)[0])))
    assert clipped[0] == off[0] and clipped[1] == pytest.approx(off[1], rel=1e-6)     # Adam step 1 is scale-free
    assert abs(clipped[2] - off[2]) > 1e-5, (clipped, off)          # 4.9e-5 apart after the 2nd update


def test_the_real_installed_deepspeed_agrees():
    """In an environment with DeepSpeed (e.g. /work/bench/venv): the parsed value is DeepSpeed's own constant."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed in this environment")
    constants = pytest.importorskip("deepspeed.runtime.constants")
    assert D.clip_default()[0] == float(constants.GRADIENT_CLIPPING_DEFAULT)
