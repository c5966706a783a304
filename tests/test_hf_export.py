"""Sharded Hugging Face export, streamed tensor by tensor (issue 25, item 5): shards and an index as
transformers writes them, opened by ``from_pretrained`` with the consolidated model's logits, written with a
tracked peak far below the model's size; and imported into another layout reading only each rank's ranges."""
import json
import os

import pytest
import torch
from engine_cases import layout, train
from harness import run_ranks

X = torch.arange(48).reshape(3, 16) % 64


def _save(rank, world, d):
    _, eng = train(rank, world, "llama", layout(1, 2, 1, 1) + [f"train.checkpoint.dir={d}", "train.checkpoint.every=2",
                                                                "train.steps=2"])
    eng.close()


def _import(rank, world, src):
    from engine_cases import config

    from examples.hf_causal_lm import llama_tiny
    from parallel.checkpoint.hf_export import import_into_engine
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = config("llama", layout(1, 2, 2, 1), world)
    torch.manual_seed(123)                                       # other initial weights: the import replaces them
    eng = parallelize(llama_tiny(), cfg, Mesh(pp=2, dp=1, tp=2))
    st = import_into_engine(eng, src)
    sd = eng.full_state_dict()
    eng.close()
    return sd, st.data, st.whole_tensors


@pytest.mark.slow
def test_sharded_export_streams_and_opens_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from launch.consolidate import consolidated_model, main
    from parallel.checkpoint.hf_export import INDEX, export_sharded
    from parallel.planning.measure import LiveBytes
    d, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    run_ranks(_save, 2, d)
    ck = os.path.join(d, "step_00000002")
    ref = consolidated_model(ck)                                  # the one-process consolidation
    model_bytes = sum(p.numel() * 4 for p in ref.parameters())
    biggest = max(p.numel() * 4 for p in ref.parameters())
    with LiveBytes() as m:
        files = export_sharded(ck, out, max_shard_bytes=model_bytes // 5)
    assert m.peak <= 2 * biggest < model_bytes / 2, (m.peak, biggest, model_bytes)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    n = len(shards)
    assert n >= 5 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    with open(os.path.join(out, INDEX)) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards) and len(files) == n + 2
    assert index["metadata"]["total_size"] == sum(os.path.getsize(os.path.join(out, s)) for s in shards) - \
        sum(8 + int.from_bytes(open(os.path.join(out, s), "rb").read(8), "little") for s in shards)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf(X).logits, ref(X).logits)
    assert main([ck, str(tmp_path / "cli"), "--sharded", "--max-shard-size", f"{model_bytes // 3}B"]) == 0
    assert os.path.isfile(os.path.join(tmp_path / "cli", INDEX))
    # into another layout (tp2 × pp2), each rank reading its own ranges
    res = run_ranks(_import, 4, out)
    sd = res[0][0]
    want = ref.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, want[k]), k
    assert sum(r[1] for r in res) < 2 * model_bytes and all(r[1] < r[2] for r in res)
