"""A tensor-parallel plan that leaves per-head q/k norms replicated without summing their gradients over tp
(transformers' published Glm4Moe plan; found by the zoo as param2moe tp2 off by 1.4e-5 after Adam's first step,
which hides a gradient's scale) is completed by ``missing_grad_sums``: their gradients = one process."""
import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks

from parallel.tensor_parallel.auto_plan import missing_grad_sums
from parallel.tensor_parallel.plan import apply_tensor_parallel

V = 64


def _qwen3():
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg)


def _plan_without_norms(model) -> dict:
    return {g: s for g, s in model.tp_plan.items() if "norm" not in g}     # as Glm4Moe publishes it


def test_missing_norm_entries_are_found():
    model = _qwen3()
    found = missing_grad_sums(model, _plan_without_norms(model), 2, apply_tensor_parallel)
    assert found == {"model.layers.*.self_attn.q_norm": "replicated_grad_allreduce",
                     "model.layers.*.self_attn.k_norm": "replicated_grad_allreduce"}, found
    assert missing_grad_sums(model, dict(model.tp_plan), 2, apply_tensor_parallel) == {}   # published: complete


def _grads(rank, world):
    from parallel.mesh import Mesh
    model = _qwen3()
    if world > 1:
        apply_tensor_parallel(model, Mesh(tp=world), _plan_without_norms(model), gather_logits=True)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(x).logits.flatten(0, 1), ((x + 1) % V).flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "norm" in n}


@pytest.mark.slow
def test_norm_gradients_equal_one_process_at_tp2():
    want = _grads(0, 1)
    got = run_ranks(_grads, 2, timeout=120)[0]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
