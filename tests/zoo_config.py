"""The model zoo's tiny configs (tests/zoo.py): any config class of the installed transformers, made tiny.

Each architecture's config class names its sizes differently (n_embd, d_model, hidden_size, …): every name of a
group that the config's ``__init__`` takes is set (:data:`SIZES`), nested sub-configs (``text_config``,
``vision_config``) likewise, dropout off (typed as the default: an ``int`` field gets ``0``).

* **Layers.** Two layers are kept: by default the first two. Per-layer lists of the default (``layer_types``,
  ``attn_layers``, …: as long as the layer count) keep the entries of the kept layers. When the default config is
  heterogeneous (transformers' ``per_layer_config``: per-layer ``head_dim``, ``kv_lora_rank``, expert counts, …),
  or when the first two layers do not make a valid config (OLMo-Hybrid needs an attention layer), the second kept
  layer is the first that differs from layer 0 — so the tiny model has both kinds.
* **Per-layer overrides** of the kept layers are shrunk consistently with the global sizes: an integer attribute
  that :data:`SIZES` sets to ``t`` becomes ``2t`` where the layer's value exceeds the default's global one,
  ``t / 2`` where it is smaller (gemma4: head_dim 256 / 512 on full-attention layers → 16 / 32).
* **Token ids** the small vocabulary lacks (50256, …) become ``None``; where the config (or a sub-config) then does
  not build (a strict dataclass field typed ``int``: cwm, emu3's and mllama's text configs), every dropped id of
  that config is the vocabulary's last id.
* :data:`FAMILY` merges what an architecture's validators or defaults need beyond that, each with its reason.
"""
from __future__ import annotations

import inspect

# (names a config class may use, tiny value): every name the config's __init__ takes is set
SIZES = [
    (("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), 2),
    (("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "hidden_dim", "word_embed_proj_dim"), 64),
    (("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads"), 4),
    (("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2),
    (("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "decoder_ffn_dim", "d_inner"), 128),
    (("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    (("num_experts_per_tok", "moe_top_k", "top_k", "moe_k"), 2),
    (("head_dim",), 16),
    (("rotary_dim",), 8),                                      # gptj / codegen: at most the head dim (16)
    # multi-head latent attention (deepseek_v2/v3, axk, …): ranks and per-head dims to match 4 heads of 16
    (("kv_lora_rank",), 32), (("q_lora_rank",), 32), (("qk_rope_head_dim",), 8), (("qk_nope_head_dim",), 8),
    (("v_head_dim",), 16),
    (("n_group", "num_expert_group"), 1), (("topk_group",), 1),   # grouped routing over 4 experts: one group
    (("first_k_dense_replace",), 1),                           # 2 layers: one dense, one MoE
    # state-space layers (bamba, falcon_h1, mamba2, …): 8 heads of 16 over expand·hidden = 128, a small state and
    # chunks no longer than the sequence (the defaults, 128 heads, state 256, chunks of 256, cost minutes a step)
    (("mamba_n_heads",), 8), (("mamba_d_state", "state_size", "ssm_state_size"), 16),
    (("mamba_chunk_size", "chunk_size"), 16), (("mamba_d_ssm",), 128),
    (("n_shared_experts",), 1),                                # dots1: None by default
    # the sparse-attention indexer (deepseek_v32, axk2): fewer heads and keys than the sequence
    (("index_n_heads",), 4), (("index_head_dim",), 16), (("index_topk",), 8),
    (("vocab_size",), 128),
    # per-layer token embeddings (gemma3n, gemma4): 262144 ids × layers × 256 by default (134 M parameters)
    (("vocab_size_per_layer_input",), 128), (("hidden_size_per_layer_input",), 16),
    (("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 64),
]
LAYER_NAMES = SIZES[0][0]
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")

# Per family, what the generic sizes or the installed transformers' defaults leave unbuildable (merged into the
# tiny kwargs; dicts one level deep, a sub-config's under its name).
FAMILY = {
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define, and clamps by clip_qkv,
    # which defaults to None (torch.clamp raises)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "mamba2": {"num_heads": 8},                        # its heads span expand·hidden = 128: 8 heads of 16
    # validate_architecture: len(attention_layers) == num_layers, attention_layers expanded from attention_types
    # (default [[["global", "local"], 12]]: 24 layers)
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # validate_architecture: a sliding layer reads its own K/V, an indexed one an earlier indexed layer's, the first
    # indexed layer is an indexer, index_num_heads ≤ heads per kv head (4 / 2), pool a multiple of the compression,
    # mlp_only_layers are layer indices (default [0, 1] of 50: one dense-MLP layer of 2 here)
    "kolibri1_1": {"layer_types": ["sliding_attention", "indexed_attention"], "index_layers": [1],
                   "kv_source_layers": [0, 1], "index_num_heads": 2, "index_pool_size": 64, "index_compression": 4,
                   "index_num_local_tokens": 4, "index_num_sink_tokens": 2, "mlp_only_layers": [0]},
    "zaya": {"num_experts_per_tok": 1},                # validate_architecture: top-1 routing only
    # the last num_kv_shared_layers layers reuse K/V of earlier ones of their type (default 15 of 30); with 2
    # layers every type must still have a producer: none shared
    # pad_token_id 0 is a character of the zoo's data (ids < 96): its embedding rows (token and per-layer) are zero,
    # so a 0 at position 0 keeps a zero hidden state through both layers and the output's magnitude
    # sqrt(mean h²) has an infinite gradient there (NaN from the first step): the pad id is the vocabulary's last
    "gemma3n_text": {"num_kv_shared_layers": 0, "pad_token_id": 127},
    "gemma3n": {"text_config": {"num_kv_shared_layers": 0, "pad_token_id": 127}},
    # the default leaves layer_types None, which the decoder layer indexes (transformers' default cannot build);
    # num_dense_layers (default 2) would make both tiny layers dense: one short-conv + dense, one attention + MoE
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # the default rope_parameters is {} while the rotary embedding reads rope_parameters[layer_type]
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # axial position embeddings: the dims sum to hidden (64), the shape multiplies to the sequence (16) in training;
    # local / LSH chunks of the sequence; the LSH hashing's random rotations seeded (else each rank draws its own)
    "reformer": {"axial_pos_shape": [4, 4], "axial_pos_embds_dim": [32, 32], "local_attn_chunk_length": 8,
                 "lsh_attn_chunk_length": 8, "num_buckets": 2, "hash_seed": 0},
    "xmod": {"default_language": "en_XX"},             # its adapters need a language; the forward raises without one
    # the local encoder / decoder project to and from the global transformer's width (default 2048, the global's
    # default); the hash n-gram embeddings: 2 sizes of 64 buckets instead of 6 of 500002 (192 M parameters)
    "blt": {"encoder_config": {"hidden_size_global": 64}, "decoder_config": {"hidden_size_global": 64},
            "encoder_hash_byte_group_size": [3, 4], "encoder_hash_byte_group_vocab": 64},
    # its rotary embedding is head_dim wide and rotates the qk_rope_head_dim part (8); top-12 routing and 256 zero
    # (identity) experts by default: top-2 over 4 experts and 2 zero experts of 32
    "longcat_flash": {"head_dim": 8, "moe_topk": 2, "zero_expert_num": 2, "expert_ffn_hidden_size": 32},
    # validate_architecture: a sliding layer's head_dim is its qk_nope + qk_rope dims (its override doubles qk_nope
    # to 16, + 8; the default 256 = 192 + 64 likewise)
    "dots3_note_text": {"head_dim": 24},
    # validate_architecture: the vision / audio adapters' input is their tower's width, their output the text width
    "dots3_note": {"text_config": {"head_dim": 24}, "vision_config": {"adapter_in_dim": 64, "adapter_out_dim": 64},
                   "audio_config": {"adapter_input_size": 64, "adapter_out_dim": 64}},
    # MusicgenForCausalLM is built from the decoder's config (CAUSAL_SUB_CONFIG); one codebook: token ids in,
    # (batch, sequence, vocabulary) logits out
    "musicgen": {"decoder": {"num_codebooks": 1}},
    "musicgen_melody": {"decoder": {"num_codebooks": 1}},
}

# Architectures whose causal-LM class (transformers' auto mapping) is built from a sub-config of the
# model type's config: the composite config has no decoder fields (MusicgenForCausalLM(MusicgenConfig) fails
# on config.dropout), so the class gets the part it is documented to take.
CAUSAL_SUB_CONFIG = {"musicgen": "decoder", "musicgen_melody": "decoder"}


def _params(cls) -> set:
    try:
        return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    except (TypeError, ValueError):
        return set()


def _get(cfg, name: str, default=None):
    """``cfg.name`` without transformers' per-layer guard (a heterogeneous config raises on a per-layer name)."""
    if cfg is None:
        return default
    raw = getattr(cfg, "_getattr_without_heterogeneous_validation", None)
    if raw is not None:
        return raw(name, default)
    return getattr(cfg, name, default)


def _overrides(default) -> dict:
    spec = getattr(default, "__dict__", {}).get("_heterogeneity_spec") if default is not None else None
    return dict(spec.per_layer_overrides) if spec is not None else {}


def _layer_lists(default, names, layers: int) -> dict:
    return {n: list(v) for n in names if isinstance(v := _get(default, n), (list, tuple)) and len(v) == layers}


def kept_layers(default, names, diverse: bool = False) -> list[int]:
    """The two layers of the default config the tiny one keeps: [0, 1]; for a heterogeneous default [0, the first
    layer whose per-layer overrides differ from layer 0's]; with ``diverse`` [0, the first layer whose overrides or
    per-layer list entries (layer_types, …) differ]."""
    layers = next((v for n in LAYER_NAMES if n in names and isinstance(v := _get(default, n), int)), None)
    over = _overrides(default)
    if not layers or layers < 2 or not (diverse or over):
        return [0, 1]
    lists = _layer_lists(default, names, layers)
    other = [i for i in range(1, layers) if over.get(i, {}) != over.get(0, {})]
    other += [i for i in range(1, layers) if diverse and any(v[i] != v[0] for v in lists.values())]
    return [0, other[0] if other else 1]


def _shrink(value, glob, tiny):
    """A per-layer override ``value`` of an attribute whose default global value is ``glob`` and tiny one ``tiny``."""
    if tiny is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in (value, glob, tiny)):
        return value
    return tiny * 2 if value > glob else max(1, tiny // 2) if value < glob else tiny


def tiny_kwargs(cls, diverse: bool = False, extra: dict | None = None) -> dict:
    """Keyword arguments that make ``cls`` (a config class) tiny; sub-configs as dicts, recursively; ``extra``
    (:data:`FAMILY`'s entry) merged in, a sub-config's part at each level."""
    extra = extra or {}
    names = _params(cls)
    try:
        default = cls()
    except Exception:
        default = None
    keep = kept_layers(default, names, diverse) if default is not None else [0, 1]
    kw, layers = {}, None
    for group, value in SIZES:
        for n in group:
            if n in names:
                kw[n] = value
                if group is LAYER_NAMES:
                    layers = _get(default, n)
    for n in names:
        low = n.lower()
        cur = _get(default, n)
        if ("dropout" in low or "pdrop" in low or low in ("layerdrop", "router_jitter_noise")) \
                and isinstance(cur, (int, float)) and not isinstance(cur, bool):
            kw[n] = type(cur)(0)                   # a strict field typed int takes 0, not 0.0
        elif isinstance(cur, (list, tuple)) and layers and len(cur) == layers and n not in kw:
            kw[n] = [cur[i] for i in keep]         # per-layer lists (layer_types, …) follow the kept layers
        elif hasattr(cur, "to_dict") and hasattr(cur, "model_type"):
            sub = extra.get(n) if isinstance(extra.get(n), dict) else None
            kw[n] = {"model_type": cur.model_type, **tiny_kwargs(type(cur), diverse, sub)}
    if "kv_lora_rank" in names and "num_key_value_heads" in names:
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)   # latent attention: kv heads = heads
    over = _overrides(default)
    if over:
        small = {}
        for new, old in enumerate(keep):
            layer = {a: _shrink(v, _get(default, a), kw.get(a)) for a, v in over.get(old, {}).items()}
            if layer:
                small[new] = layer
        kw["per_layer_config"] = small
    if "use_cache" in names:
        kw["use_cache"] = False
    kw = _merge(kw, {k: v for k, v in extra.items() if not (isinstance(v, dict) and isinstance(kw.get(k), dict))})
    vocab = kw.get("vocab_size", 128)
    dropped = [n for n in TOKEN_IDS if n in names and n not in extra and isinstance(v := _get(default, n), int)
               and v >= vocab]
    for n in dropped:                              # a small vocabulary has no id 50256
        kw[n] = None
    if dropped and not _builds(cls, kw):           # a field typed int (cwm: bos_token_id): the last id
        last = {**kw, **{n: vocab - 1 for n in dropped}}
        if _builds(cls, last):
            kw = last
    return kw


def _builds(cls, kw: dict) -> bool:
    try:
        cls(**kw)
    except ImportError:
        raise
    except Exception:
        return False
    return True


def _merge(kw: dict, extra: dict) -> dict:
    out = dict(kw)
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    kw = tiny_kwargs(cls, extra=FAMILY.get(model_type))
    try:
        cfg = cls(**kw)
    except ImportError:
        raise
    except Exception:                                # a validator refuses the first two layers (OLMo-Hybrid: no
        diverse = tiny_kwargs(cls, diverse=True, extra=FAMILY.get(model_type))          # attention layer)
        if diverse == kw:
            raise
        cfg = cls(**diverse)
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True                        # the *ForCausalLM of encoder families asks for it
    return cfg
