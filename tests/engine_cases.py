"""Configs shared by the engine tests (imported by the rank processes too)."""
from parallel.config import load_config

GPT = {"factory": "examples.gpt:build",
       "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 4, "n_head": 4, "n_embd": 32}}
LLAMA = {"factory": "examples.hf_causal_lm:llama_tiny", "kwargs": {}}
MODELS = {"gpt": GPT, "llama": LLAMA}


def config(model: str, overrides=(), world=None):
    base = {"model": MODELS[model],
            "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64},
                     "global_batch_size": 8, "micro_batch_size": 2},
            "optimizer": {"name": "adamw", "lr": 0.003}, "train": {"steps": 20}}
    cfg = load_config(data=base, overrides=list(overrides))
    return cfg.validate(world) if world else cfg


def layout(dp, tp, pp, stage, **extra):
    """Overrides for a dp × tp × pp layout (the issues' notation) with a ZeRO stage."""
    return [f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"zero.stage={stage}"] + \
        [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def train(rank, world, model, overrides, quiet=True):
    """Rank body: train through launch.train.run; returns (losses, engine)."""
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config(model, overrides, world)
    p = cfg.parallel
    out = run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp, cp=p.cp), print_fn=(lambda *a, **k: None) if quiet else print)
    return out["losses"], out["engine"]
