"""Tokenized corpora: the on-disk format and its memory-mapped dataset (token_file.py), packed samples
with document boundaries (packed.py), and the tokenizers that :mod:`launch.prepare_data` writes them
with (tokenizer.py)."""
from parallel.corpus.packed import PackedCorpus, cu_seqlens, document_mask, document_positions
from parallel.corpus.token_file import FORMAT, CorpusError, TokenCorpus, TokenWriter, token_dtype

__all__ = ["FORMAT", "CorpusError", "TokenCorpus", "TokenWriter", "token_dtype", "PackedCorpus", "cu_seqlens",
           "document_mask", "document_positions"]
