"""examples/hf_causal_lm.py as a new user meets it (session 13): what --help offers, and the mistakes it must turn
into a named cause and fix before a worker starts.

Found by running it as such a user (olmo, qwen2, gpt2 at tp2 + sequence parallel, dp2 ZeRO-3, pp2; CPU ranks):
--help named no way to ask for sequence parallel (``--sp`` was "unknown flag") nor that other arguments are config
overrides; a sequence length not divisible by tp under sequence parallel failed only at step 0's first scatter,
after every rank had built the model; and every rank printed transformers' "eos_token_id must be None or an integer
within the vocabulary" for an id the builder then dropped. The rest (a tp not dividing the heads, a missing corpus,
malformed or misspelt YAML) already failed with cause and fix, and no rank hung.
"""
import os
import subprocess
import sys

import pytest

from parallel.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "hf_causal_lm.py")
YAML = os.path.join(ROOT, "configs", "hf_causal_lm.yaml")


def _example(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_offers_sequence_parallel_and_overrides():
    out = _example("--help").stdout
    assert "--sp" in out and "parallel.sequence_parallel=true" in out
    assert "key=value" in out and "--dry-run" in out


def test_sp_flag_reaches_the_plan():
    """--sp on OLMo (its final norm holds no weight): the region leaves at the last block, nothing refused."""
    r = _example("--model-type", "olmo", "--tp", "2", "--sp", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "  sequence_parallel: true" in r.stdout
    assert "model.layers.0: seq_scatter_input" in r.stdout and "model.layers.3: seq_gather_output" in r.stdout
    assert "REFUSED" not in r.stdout


@pytest.mark.parametrize("over,local,key", [
    (["parallel.tp=2", "data.kwargs.seq_len=63"], "63", "data.kwargs"),
    (["parallel.tp=4", "parallel.cp=2", "data.kwargs.seq_len=12"], "12 / cp = 6", "data.kwargs"),
    (["parallel.tp=2", "data.eval={factory: 'examples.text_corpus:packed', kwargs: {seq_len: 33}}"], "33",
     "data.eval.kwargs"),
])
def test_sequence_length_not_divisible_by_tp_is_a_config_error(over, local, key):
    ov = ["parallel.dp=1", "parallel.pp=1", "parallel.sequence_parallel=true"] + over
    cfg = load_config(YAML, ov)
    with pytest.raises(ConfigError, match=rf"the sequence length {local} \({key}.seq_len\) is not divisible "
                                          rf"by parallel.tp=\d.*set parallel.sequence_parallel=false"):
        cfg.validate(cfg.world_size)
    load_config(YAML, ov[:2] + over).validate()                 # the same length without sp: no complaint


def test_small_vocabulary_builds_without_the_token_id_warning(capfd):
    from examples.hf_causal_lm import _config, build
    m = build("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    assert (m.config.bos_token_id, m.config.eos_token_id) == (None, None)
    assert "within the vocabulary" not in capfd.readouterr().err
    assert build("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2).config.eos_token_id == 2          # an id inside the vocabulary stays
    assert _config("cwm", {"vocab_size": 64}).bos_token_id is not None    # strict int field: built as given


def test_flop_count_of_a_meta_transformers_model():
    """The metrics' MFU counts FLOPs on the engine's meta template; transformers' packed-sequence check reads a
    value (``.all()`` on the position ids), so every run printed "no FLOP count (… Tensor.item() cannot be called
    on meta tensors); MFU is not reported". The meta count now equals the count on real weights."""
    import torch

    from examples.hf_causal_lm import build
    from parallel.planning.flops import count_training_flops
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    x = torch.randint(0, 128, (2, 16))
    real = count_training_flops(build("qwen2", **kw), x)
    with torch.device("meta"):
        meta = build("qwen2", **kw)
    assert count_training_flops(meta, x) == real > 0
    assert all(p.grad is None for p in meta.parameters())


def test_eval_sequence_length_not_divisible_by_two_cp_is_a_config_error():
    """Eval batches go through the same zig-zag split into 2·cp chunks as training ones: an eval seq_len that
    does not divide fails before any worker starts, not at the first evaluation (after training steps)."""
    ov = ["parallel.dp=1", "parallel.tp=1", "parallel.pp=1", "parallel.cp=2", "data.kwargs.seq_len=64",
          "data.eval={factory: 'examples.text_corpus:packed', kwargs: {seq_len: 30}}"]
    cfg = load_config(YAML, ov)
    with pytest.raises(ConfigError, match=r"the sequence length 30 \(data\.eval\.kwargs\.seq_len\) must be divisible "
                                          r"by 2·cp = 4"):
        cfg.validate(cfg.world_size)
    load_config(YAML, ov[:-1] + ["data.eval={factory: 'examples.text_corpus:packed', kwargs: {seq_len: 32}}"]
                ).validate()


def test_sp_suggestion_with_cp_also_divides_into_two_cp_chunks():
    """tp = 3, cp = 2, seq_len 20: 20 / cp = 10 is not divisible by 3; a multiple of tp·cp = 6 (18, 30) would fail
    the 2·cp = 4 zig-zag check next, so the suggestion is lcm(tp·cp, 2·cp) = 12."""
    ov = ["parallel.dp=1", "parallel.pp=1", "parallel.tp=3", "parallel.cp=2", "parallel.sequence_parallel=true",
          "data.kwargs.seq_len=20"]
    cfg = load_config(YAML, ov)
    with pytest.raises(ConfigError, match=r"use a multiple of 12 for data\.kwargs\.seq_len"):
        cfg.validate(cfg.world_size)
    load_config(YAML, ov[:-1] + ["data.kwargs.seq_len=24"]).validate()
