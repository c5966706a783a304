"""Unmodified Hugging Face transformers causal LMs, built from a config (no download) or loaded
from a local pretrained directory, as model factories for parallel3d configs.

    model:
      factory: examples.hf_causal_lm:build
      kwargs: {model_type: llama, vocab_size: 1024, hidden_size: 64, num_hidden_layers: 4,
               num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 128}

``pretrained: /path/to/dir`` loads ``from_pretrained`` instead (a local directory, e.g. one a
consolidated parallel3d checkpoint wrote). The model is returned as transformers builds it: the
framework applies the published tp plan, finds the decoder layers for the pipeline split, and
reads ``.logits`` from its output.
"""
from __future__ import annotations


def build(model_type: str | None = None, pretrained: str | None = None, attn_implementation: str | None = None,
          **config_kwargs):
    """``attn_implementation``: transformers' name; unset, ``sdpa`` where the architecture has it, else
    ``eager`` (Bloom, Gemma-2, ... support no SDPA attention)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError("examples.hf_causal_lm needs transformers: pip install -e '.[hf]'") from None
    if pretrained:
        import os
        if not os.path.isdir(pretrained):            # transformers would take it for a Hub repo id
            raise ValueError(f"model.kwargs.pretrained={pretrained!r}: no such directory; give a local model "
                             f"directory (save_pretrained's, or `python -m launch.consolidate CKPT OUT`'s): nothing "
                             f"is downloaded")
        return _with_attention(lambda a: AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation=a),
                               attn_implementation)
    if not model_type:
        raise ValueError("model.kwargs.model_type is required (e.g. llama, gpt2, qwen2, mistral) unless "
                         "model.kwargs.pretrained names a local model directory")
    _check_model_type(model_type)
    config_kwargs.setdefault("use_cache", False)
    cfg = _config(model_type, config_kwargs)
    _check_fields(model_type, cfg, config_kwargs)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):   # a small vocabulary has no id 50256
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v >= cfg.vocab_size and k not in config_kwargs:
            setattr(cfg, k, None)
    for k in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "dropout"):
        if hasattr(cfg, k) and k not in config_kwargs:
            setattr(cfg, k, 0.0)                         # exactness: no dropout unless asked for
    return _with_attention(lambda a: AutoModelForCausalLM.from_config(cfg, attn_implementation=a), attn_implementation)


def _config(model_type: str, config_kwargs: dict):
    """The config, built with ``None`` for each default special-token id the given vocab_size does not hold (GPT-2's
    eos 50256 with vocab_size 1024), so transformers' check does not warn "eos_token_id must be None or an integer
    within the vocabulary" on every rank about an id :func:`build` drops anyway; a config whose fields refuse None
    (CWM's bos, ModernBERT-decoder's pad: strict int fields) is built as given, warning and all."""
    from transformers import AutoConfig
    vocab, drop = config_kwargs.get("vocab_size"), {}
    if isinstance(vocab, int):
        base = AutoConfig.for_model(model_type)
        drop = {k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k not in config_kwargs
                and isinstance(getattr(base, k, None), int) and getattr(base, k) >= vocab}
    if drop:
        try:
            return AutoConfig.for_model(model_type, **config_kwargs, **drop)
        except Exception:          # huggingface_hub's StrictDataclassError (an Exception); the plain build below
            pass                   # raises whatever is really wrong
    return AutoConfig.for_model(model_type, **config_kwargs)


def _check_model_type(model_type: str) -> None:
    """An unknown model_type got transformers' "Unrecognized model identifier: lama. Should contain one of" and
    ~400 names, on every rank: name the close causal LMs instead."""
    import difflib

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type in CONFIG_MAPPING:
        return
    close = difflib.get_close_matches(model_type, sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), 3, 0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ValueError(f"model.kwargs.model_type={model_type!r} is no transformers model type; {hint}(the causal LMs: "
                     f"python -c \"from transformers.models.auto.modeling_auto import "
                     f"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as m; print(sorted(m))\")")


def _check_fields(model_type: str, cfg, config_kwargs: dict) -> None:
    """transformers keep a key their config does not know as a plain attribute: ``hidden_sise: 64`` built the
    default 4096-wide model without a word. A key that is no field of the default config but close to one is
    refused naming it (other unknown keys pass: some architectures read attributes of their own)."""
    import difflib
    import inspect

    from transformers import AutoConfig
    known = set(AutoConfig.for_model(model_type).to_dict()) | set(inspect.signature(type(cfg).__init__).parameters)
    for k in config_kwargs:
        close = [] if k in known else difflib.get_close_matches(k, sorted(known), 1, 0.8)
        if close:
            raise ValueError(f"model.kwargs.{k}: {type(cfg).__name__} has no field {k!r}; did you mean {close[0]!r}? "
                             f"(transformers would keep it as an unused attribute and build the model with its "
                             f"default {close[0]}={getattr(cfg, close[0], None)!r})")


def _with_attention(make, attn_implementation):
    if attn_implementation is not None:
        return make(attn_implementation)
    try:
        return make("sdpa")
    except ValueError as e:                          # "... does not support an attention implementation through sdpa"
        if "does not support" not in str(e):
            raise
        return make("eager")


def main(argv=None) -> int:
    """``python examples/hf_causal_lm.py --model-type qwen2 --data PREFIX --dp 2 --tp 2 --pp 2 --zero 1 [--sp]``:
    train a transformers architecture on a tokenized corpus (packed documents) through the launcher."""
    import argparse
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    # the workers are new processes: they find examples.hf_causal_lm (model.factory) through PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    from launch.__main__ import main as launch
    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0], epilog=(
        "Any other argument goes to python -m launch: a config override key=value on configs/hf_causal_lm.yaml "
        "(train.steps=20 data.kwargs.seq_len=128 parallel.pp_schedule=gpipe activation_checkpointing.policy=full) "
        "or one of its flags (--dry-run: check the layout and print the plan, start nothing)."))
    ap.add_argument("--model-type", default="llama", help="any transformers causal-LM model_type (no download)")
    ap.add_argument("--pretrained", default=None, help="a local model directory (from_pretrained) instead")
    ap.add_argument("--data", default=None, help="a corpus prefix written by `python -m launch.prepare_data` "
                    "(default: the bundled text, BPE-tokenized on first use); --vocab must cover its ids")
    ap.add_argument("--vocab", type=int, default=1024, help="the model's vocab_size (≥ the corpus tokenizer's)")
    for axis, what in (("dp", "data-parallel replicas"), ("tp", "tensor-parallel ranks (a divisor of the head "
                       "counts)"), ("pp", "pipeline stages")):
        ap.add_argument(f"--{axis}", type=int, default=1, help=f"{what}; the job starts dp·tp·pp processes")
    ap.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    ap.add_argument("--sp", action="store_true", help="sequence parallel over the tp ranks (needs --tp > 1; "
                    "parallel.sequence_parallel=true)")
    a, rest = ap.parse_known_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    ov = [f"model.kwargs.model_type={a.model_type}", f"parallel.dp={a.dp}", f"parallel.tp={a.tp}",
          f"parallel.pp={a.pp}", f"zero.stage={a.zero}", f"parallel.sequence_parallel={str(a.sp).lower()}"]
    if a.pretrained:
        ov.append(f"model.kwargs.pretrained={a.pretrained}")
    ov += [f"model.kwargs.vocab_size={a.vocab}", f"data.kwargs.vocab_size={a.vocab}"]
    if a.data:
        ov.append(f"data.kwargs.path={a.data}")
    return launch(["--config", os.path.join(here, "..", "configs", "hf_causal_lm.yaml"), *ov, *rest])


def llama_tiny(vocab_size: int = 64, **kw):
    """The small Llama with grouped-query attention the tests use."""
    args = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    args.update(kw)
    return build("llama", **args)


if __name__ == "__main__":
    raise SystemExit(main())
