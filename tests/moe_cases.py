"""MoE configs and the single-process MoE reference (imported by the rank processes too).

The reference is a plain loop over the global batch cut the way the engine cuts it — dp ranks, then
micro-batches — because an MoE layer's aux losses and capacity are per group of tokens (one
micro-batch on one rank, as Switch computes them per device): each chunk's loss (task + aux) is
backpropagated with weight 1/(dp·m), the optimizer steps once.
"""
import torch
from torch.utils.data import default_collate

from parallel.config import import_object, load_config
from parallel.data import global_indices
from parallel.loss import cross_entropy, resolve_loss
from parallel.moe import moe_layers, set_aux_scale
from parallel.optim.factory import optimizer_factory

MOE = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32, num_experts=4, top_k=2,
           capacity_factor=1.0, aux_loss_coef=0.01, z_loss_coef=0.001)


def moe_config(dp=2, ep=2, stage=0, cf=1.0, steps=4, G=8, mbs=2, world=None, pp=1, tp=1, **model):
    kw = dict(MOE, capacity_factor=cf, **model)
    cfg = load_config(data={
        "model": {"factory": "examples.moe_gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64},
                 "global_batch_size": G, "micro_batch_size": mbs},
        "optimizer": {"name": "adamw", "lr": 0.01}, "train": {"steps": steps},
        "parallel": {"dp": dp, "ep": ep, "pp": pp, "tp": tp}, "zero": {"stage": stage}})
    return cfg.validate(world) if world else cfg


HF_AUX = 0.02
HF_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                 output_router_logits=True, router_aux_loss_coef=HF_AUX)
HF_MOE = {"mixtral": dict(num_local_experts=4),
          "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True),
          "olmoe": dict(num_experts=4),
          "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                            decoder_sparse_step=1, norm_topk_prob=True),
          "llama4_text": dict(num_local_experts=4, intermediate_size_mlp=64, interleave_moe_layer_step=1)}


def ce_plus_aux(output, target):
    """The task loss plus the transformers model's own load-balancing loss (output.aux_loss, computed from
    its router logits when output_router_logits is set), weighted as the model weights it with labels."""
    return cross_entropy(output, target) + HF_AUX * output.aux_loss


def hf_config(model_type, dp=2, ep=2, stage=0, steps=3, world=None, tp=1):
    cfg = moe_config(dp=dp, ep=ep, stage=stage, steps=steps, tp=tp)
    cfg.model.factory = "examples.hf_causal_lm:build"
    cfg.model.kwargs = dict(model_type=model_type, **HF_COMMON, **HF_MOE[model_type])
    cfg.loss = "moe_cases:ce_plus_aux" if tp == 1 else "cross_entropy"     # tp: vocab-split logits need the latter
    return cfg.validate(world) if world else cfg


def build(cfg):
    torch.manual_seed(cfg.train.seed)
    return import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)


def dataset(cfg):
    return import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)


def reference_moe(cfg):
    """(losses, gradient norms) of one process training the whole MoE model on the same chunks (see the
    module doc); the norms detect a mis-scaled gradient that Adam's update would hide."""
    model, data, loss_fn = build(cfg), dataset(cfg), resolve_loss(cfg.loss)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    n = cfg.parallel.dp * cfg.micro_batches
    mbs = cfg.data.micro_batch_size
    set_aux_scale(moe_layers(model), 1.0 / n)
    losses, norms = [], []
    for t in range(cfg.train.steps):
        idx = global_indices(t, cfg.data.global_batch_size, len(data), cfg.train.seed, cfg.data.shuffle)
        x, y = default_collate([data[i] for i in idx])
        opt.zero_grad()
        total = 0.0
        for c in range(n):
            loss = loss_fn(model(x[c * mbs:(c + 1) * mbs]), y[c * mbs:(c + 1) * mbs])
            (loss / n).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])))
        opt.step()
        losses.append(total / n)
    return losses, norms


def train_counted(eng, cfg, data, count_from: int = 0) -> tuple[list, list, dict]:
    """Train ``eng`` for ``cfg.train.steps`` steps on this dp rank's batches: (losses, grad norms, CommStats by axis
    of the steps from ``count_from`` on, control traffic left out). ``count_from=1`` leaves out step 0, whose first
    forward traces the module order (ZeRO-3 cannot keep units gathered into backward before it knows which are
    freed last: the planner predicts the steady step)."""
    from parallel.data import rank_batch
    before = eng.mesh.stats.snapshot()
    losses, norms = [], []
    for t in range(cfg.train.steps):
        if t == count_from and t:
            before = eng.mesh.stats.snapshot()
        losses.append(eng.train_step(rank_batch(data, t, cfg.data.global_batch_size, cfg.parallel.dp,
                                                eng.mesh.coord["dp"])))
        norms.append(eng.last_result.grad_norm)
    comm = eng.mesh.stats.diff(eng.mesh.stats.snapshot(), before)
    return losses, norms, {a: o for a, o in comm.items() if not a.startswith("control:")}
