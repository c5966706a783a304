"""Streaming inference from the tensor store: outputs, losses and generated tokens equal the in-memory
model's exactly; each forward reads every unit once (Σ unit bytes) and holds only a few units; the
model goes to the store unit by unit from a meta build, a safetensors file or its own weights."""
import pytest
import torch
import torch.nn.functional as F

from parallel.offload import CpuStore, NvmeStore, StoreConfigError
from parallel.zero.inference import StreamedInference

GPT_KW = dict(vocab_size=64, seq_len=16, n_layer=3, n_head=4, n_embd=32)
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)


def _store(kind, tmp_path, buffer_bytes=64 << 10, count=4):
    return CpuStore() if kind == "cpu" else NvmeStore(str(tmp_path), buffer_count=count, buffer_bytes=buffer_bytes,
                                                      workers=2, chunk_bytes=16 << 10)


def _greedy(model, idx, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(idx[:, -16:])[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
    return idx


@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_gpt_from_meta_build_is_exact_and_streams_each_unit_once(kind, tmp_path):
    from examples.gpt import GPT, Block
    from parallel.zero import deferred_init
    torch.manual_seed(0)
    ref = GPT(**GPT_KW).eval()
    torch.manual_seed(0)
    meta, rec = deferred_init(GPT, **GPT_KW)
    eng = StreamedInference(meta, _store(kind, tmp_path), unit_types=(Block,), init=rec, prefetch_depth=1)
    assert all(p.numel() == 0 for p in meta.parameters())         # no weights held outside the store
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    with torch.no_grad():
        want = ref(x)
    before = eng.stats
    assert torch.equal(eng(x), want)                              # first forward: traced
    assert torch.equal(eng(x), want)                              # later ones: with read-ahead
    s = eng.stats
    psi = sum(p.numel() for p in ref.parameters())                # tied wte/lm_head counted once
    unit = [eng.unit_bytes[u] for u in eng.units]
    assert sum(unit) == 4 * psi == s["weight_bytes"]
    assert s["bytes_read"] - before["bytes_read"] == 2 * 4 * psi  # every unit read once per forward
    assert s["reads"] - before["reads"] == 2 * len(eng.units)
    root, blocks = unit[0], unit[1:]                              # units in module pre-order: root first
    assert len(blocks) == GPT_KW["n_layer"]
    # resident at once: the root (embeddings, final norm, tied head) + one block (+ prefetch: one more)
    assert root + max(blocks) <= s["peak_resident_bytes"] <= root + 2 * max(blocks) < sum(unit)
    if kind == "nvme":
        assert s["peak_buffers"] <= 3 and s["disk_bytes_read"] >= s["bytes_read"]
    ids = x[:1, :4]
    assert torch.equal(eng.generate(ids, 6), _greedy(ref, ids, 6))
    with torch.no_grad():
        loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).item()
    assert eng.eval_loss([(x, y)]) == loss
    eng.close()


def test_llama_from_safetensors_one_tensor_at_a_time(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from parallel.zero import deferred_init
    cfg = LlamaConfig(**LLAMA)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    path = str(tmp_path / "model.safetensors")
    save_file({n: p.detach().contiguous() for n, p in ref.named_parameters()}, path)
    torch.manual_seed(1)                                         # other weights: all must come from the file
    meta, rec = deferred_init(LlamaForCausalLM, cfg)
    reads = []
    with safe_open(path, "pt") as f:
        class Spy:
            def get_tensor(self, name):
                reads.append(name)
                return f.get_tensor(name)
        (tmp_path / "nv").mkdir()
        eng = StreamedInference(meta, _store("nvme", tmp_path / "nv"), unit_types=(LlamaDecoderLayer,),
                                weights=Spy(), init=rec)
    assert sorted(reads) == sorted(n for n, _ in ref.named_parameters())    # each tensor read once
    from parallel.zero.inference import SafetensorsFile
    with SafetensorsFile(path) as sf, safe_open(path, "pt") as f:             # pread reader = mmap reader
        assert sf.keys() and all(torch.equal(sf.get_tensor(k), f.get_tensor(k)) for k in f.keys())
        torch.manual_seed(1)
        meta2, rec2 = deferred_init(LlamaForCausalLM, cfg)
        eng2 = StreamedInference(meta2, CpuStore(), unit_types=(LlamaDecoderLayer,), weights=sf, init=rec2)
        with pytest.raises(ValueError, match=r"has shape \(64, 32\), the model's parameter \(32, 64\)"):
            sf.read_into("model.embed_tokens.weight", torch.empty(2048), (32, 64))
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).logits
    assert torch.equal(eng(x).logits, want)
    assert torch.equal(eng(x).logits, want)
    assert torch.equal(eng2(x).logits, want)                                # read straight into the unit
    assert eng.stats["peak_resident_bytes"] < eng.stats["weight_bytes"]
    eng.close()


def test_real_model_is_moved_into_the_store(tmp_path):
    from examples.gpt import GPT
    torch.manual_seed(0)
    model = GPT(**GPT_KW)
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        want = model(x)
    eng = StreamedInference(model, _store("cpu", tmp_path))       # default units: every module with params
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    assert torch.equal(eng(x), want) and torch.equal(eng(x), want)
    holders = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    assert len(eng.units) == holders - 1          # the tied lm_head has no unit: it needs (fetches) wte's
    two = sorted(eng.unit_bytes.values())[-2:]
    assert max(two) <= eng.stats["peak_resident_bytes"] <= sum(two)   # one leaf in use, one read ahead
    eng.close()


def test_bad_inputs_raise_clear_errors(tmp_path):
    from examples.gpt import GPT, Block
    from parallel.zero import deferred_init
    torch.manual_seed(0)
    meta, rec = deferred_init(GPT, **GPT_KW)
    with pytest.raises(ValueError, match="meta device: pass init="):
        StreamedInference(meta, CpuStore())
    with pytest.raises(StoreConfigError, match=r"more than one IO buffer.*buffer_mb to at least 1"):
        StreamedInference(meta, _store("nvme", tmp_path, buffer_bytes=16 << 10), unit_types=(Block,), init=rec)
    with pytest.raises(ValueError, match=r"weights\['wte.weight'\] has shape \(3,\)"):
        StreamedInference(meta, CpuStore(), weights={"wte.weight": torch.zeros(3)}, init=rec)
    with pytest.raises(TypeError, match="nn.Module"):
        StreamedInference("gpt", CpuStore())
