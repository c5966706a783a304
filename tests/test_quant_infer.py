"""Weight-only int8 / int4 streamed inference: the codec's error bound holds per element; a quantized
stream computes exactly what the model with dequantized weights computes, reads the payload bytes the
codec states (≈ 1/4 and 1/8 of fp32 plus scales), stays within the stated logit tolerance of fp32 and
generates the same greedy tokens as fp32 on a prompt set (a briefly trained model: a random one's
logits are too flat for argmax to mean anything)."""
import pytest
import torch
import torch.nn.functional as F

from examples.gpt import GPT, Block
from parallel.offload import CpuStore, NvmeStore
from parallel.quant import QMAX, UnitCodec, dequantize_groups, quantize_groups
from parallel.zero.inference import StreamedInference

KW = dict(vocab_size=32, seq_len=16, n_layer=2, n_head=4, n_embd=64)
# stated tolerance: ‖Δlogits‖ / ‖logits‖ on the trained model below
TOL = {"int8": 0.01, "int4": 0.10}


@pytest.mark.parametrize("bits,n,group", [(8, 1000, 64), (4, 999, 32), (4, 64, 64), (8, 7, 4)])
def test_group_quantization_error_bound(bits, n, group):
    w = torch.randn(n, generator=torch.Generator().manual_seed(bits + n)) * 3
    w[:5] = 0.0                                                   # a zero group scale stays finite
    codes, scale = quantize_groups(w, bits, group)
    assert scale.numel() == -(-n // group)
    assert codes.numel() == (scale.numel() * group if bits == 8 else scale.numel() * group // 2)
    back = dequantize_groups(codes, scale, bits, group, n)
    pad = torch.cat([w, w.new_zeros(-n % group)]).view(-1, group)
    bound = (pad.abs().amax(1) / QMAX[bits] / 2).repeat_interleave(group)[:n]   # |ŵ − w| ≤ s/2
    assert torch.all((back - w).abs() <= bound * (1 + 1e-6) + 1e-12)
    assert (back - w).abs().max() > 0                            # it does round


def _trained():
    """A tiny GPT trained 60 Adam steps on x_{t+1} = (3·x_t + 1) mod 32: confident next-token logits."""
    torch.manual_seed(0)
    m = GPT(**KW)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x0 = torch.randint(0, 32, (16, 1), generator=g)
        seq = [x0]
        for _ in range(16):
            seq.append((3 * seq[-1] + 1) % 32)
        s = torch.cat(seq, 1)
        loss = F.cross_entropy(m(s[:, :-1]).reshape(-1, 32), s[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), loss.item()


@pytest.fixture(scope="module")
def trained():
    return _trained()


def _dequantized_copy(model, bits, group):
    """The model with every ≥2-D weight replaced by its quantize→dequantize round trip (the reference)."""
    import copy
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                c, s = quantize_groups(p, bits, group)
                p.copy_(dequantize_groups(c, s, bits, group, p.numel()).view_as(p))
    return m


@pytest.mark.parametrize("quant,group", [("int8", 64), ("int4", 32)])
def test_quantized_stream_logits_bytes_and_tokens(trained, quant, group, tmp_path):
    model, loss = trained
    assert loss < 0.5                                              # the task was learnt
    bits = {"int8": 8, "int4": 4}[quant]
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp32 = StreamedInference(GPT(**KW), CpuStore(), unit_types=(Block,), weights=state)
    store = NvmeStore(str(tmp_path), buffer_count=4, buffer_bytes=64 << 10, workers=2, chunk_bytes=16 << 10)
    eng = StreamedInference(GPT(**KW), store, unit_types=(Block,), weights=state, quantize=quant, group_size=group)
    prompts = torch.arange(32).view(8, 4)                          # every token once as a prompt start
    with torch.no_grad():
        want = model(prompts)
        ref_q = _dequantized_copy(model, bits, group)(prompts)
    got = eng(prompts)
    assert torch.allclose(got, ref_q, atol=1e-5, rtol=1e-5)       # the stream = dequantized weights exactly
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < TOL[quant], rel
    # bytes: every unit's payload read once per forward; quantized weights take bits/8 + 4/group bytes each
    before = eng.stats
    eng(prompts)
    read = eng.stats["bytes_read"] - before["bytes_read"]
    # after the traced first forward every unit but the first is dequantized ahead on the worker thread
    assert eng.stats["dequant_overlapped"] - before["dequant_overlapped"] == len(eng.units) - 1
    assert read == sum(eng.unit_bytes.values()) == sum(c.nbytes for c in eng.codecs.values())
    qel = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    rest = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    payload = qel * bits / 8 + 4 * (-(-qel // group)) + 4 * rest
    assert payload <= read <= payload + 48 * len(eng.units)         # + the 16-byte alignment of three parts
    assert read < {8: 0.30, 4: 0.18}[bits] * sum(fp32.unit_bytes.values())
    # greedy tokens on the prompt set equal fp32's
    assert torch.equal(eng.generate(prompts, 8), fp32.generate(prompts, 8))
    eng.close()
    fp32.close()


def test_quantize_errors():
    with pytest.raises(ValueError, match="int8' or 'int4"):
        StreamedInference(GPT(**KW), CpuStore(), quantize="fp8")
    with pytest.raises(ValueError, match="even number"):
        UnitCodec([(4, 4)], [0], 16, bits=4, group=3)
    with pytest.raises(ValueError, match="dequantizes to fp32"):
        StreamedInference(GPT(**KW), CpuStore(), quantize="int8", dtype=torch.bfloat16)
