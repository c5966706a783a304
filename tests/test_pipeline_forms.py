"""Pipeline split of model forms the zoo found (tests/zoo.py), process-free: stages chained on one
process give the whole model's logits and gradients, or the split refuses at plan time naming why.

* Blenderbot: its learned position embedding is called with a shape tuple and ``position_ids=``, so
  the zeros standing in for it on a later stage take their shape from the first tensor input.
* DeepSeek-V4: the blocks carry (b, s, streams, h) — two dims beyond the ids — so a later stage
  rebuilds its (b, s) ids from the activation without those two dims.
* CPM-Ant passes a position bias computed by a module with parameters to every block: a later stage
  would get zeros for it, so the split refuses; Dory loops over its blocks: refused too.
"""
import pytest
import torch
import zoo

from parallel.comm import Group
from parallel.pipeline.split import describe_split, split_model, sync_tied_grads


def _chain_equals_whole(arch: str):
    torch.manual_seed(0)
    model = zoo.build(arch).eval()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    want = model(ids, use_cache=False).logits
    want.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    stages = [split_model(model, r, 2)[0] for r in range(2)]
    for st in stages:
        st.eval()
    h0 = stages[0](ids)
    x1 = h0.detach().requires_grad_(True)
    got = stages[1](x1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.square().mean().backward()
    h0.backward(x1.grad)
    sync_tied_grads(stages, Group(None, "pp", (0,), 0))           # both ends local: summed in place
    tied_copies = {post for _, post in stages[0].stage_info.plan.tied}
    grads = {n: p.grad for st in stages for n, p in st.named_parameters()
             if p.grad is not None and not (st.stage_info.last and n in tied_copies)}
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("arch", ["deepseek_v4", pytest.param("blenderbot", marks=pytest.mark.slow),
                                  pytest.param("blenderbot-small", marks=pytest.mark.slow)])
def test_stages_equal_the_whole_model(arch):
    _chain_equals_whole(arch)


def test_learned_block_inputs_and_looped_blocks_are_refused():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"CpmAntForCausalLM receive `position_bias`.*computed with parameters"
                                         r".*parallel.pp=1"):
        describe_split(zoo.build("cpmant"), 2)
    with pytest.raises(ValueError, match=r"called more than once.*looped or recurrent.*parallel.pp=1"):
        describe_split(zoo.build("dory"), 2)
