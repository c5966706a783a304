"""Consolidation: a sharded checkpoint becomes one ordinary state_dict / a save_pretrained folder."""
import os

import torch
from engine_cases import config, layout, train
from harness import run_ranks

X = torch.arange(48).reshape(3, 16) % 64


def _train_and_save(rank, world, model, lay, d):
    losses, engine = train(rank, world, model, lay + [f"train.checkpoint.dir={d}", "train.checkpoint.every=3",
                                                       "train.steps=3"])
    full = engine.full_model()                      # collective; the model on rank 0
    return None if full is None else full(X).logits.detach() if model == "llama" else full(X).detach()


def test_llama_checkpoint_opens_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from launch.consolidate import main
    d, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    want = run_ranks(_train_and_save, 4, "llama", layout(1, 2, 2, 1), d)[0]
    assert main([d, out]) == 0
    assert {"config.json", "model.safetensors", "pytorch_model.pt"} <= set(os.listdir(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(model(X).logits, want, rtol=1e-5, atol=1e-6)


def test_gpt_checkpoint_loads_strict_into_unmodified_model(tmp_path):
    from safetensors.torch import load_model

    from examples.gpt import build
    from launch.consolidate import main
    d, out = str(tmp_path / "ck"), str(tmp_path / "out")
    want = run_ranks(_train_and_save, 2, "gpt", layout(1, 1, 2, 0), d)[0]
    assert main([os.path.join(d, "step_00000003"), out]) == 0
    kw = config("gpt").model.kwargs
    m1, m2 = build(**kw), build(**kw)
    m1.load_state_dict(torch.load(os.path.join(out, "pytorch_model.pt")), strict=True)
    load_model(m2, os.path.join(out, "model.safetensors"), strict=True)
    assert m2.lm_head.weight is m2.wte.weight                   # still tied after loading
    for m in (m1, m2):
        assert torch.allclose(m(X), want, rtol=1e-5, atol=1e-6)
