"""Tokenize local text into a corpus that :class:`parallel.corpus.TokenCorpus` trains on.

    python -m launch.prepare_data corpus.txt --out data/corpus --tokenizer bytes
    python -m launch.prepare_data docs/*.jsonl --text-key text --out data/docs --tokenizer path/to/tokenizer_dir
    python -m launch.prepare_data corpus.txt --out data/corpus --train-bpe 2048 --tokenizer-out data/bpe

Inputs: ``.txt`` (documents separated by blank lines, or one per line / per file with --split),
``.jsonl`` (one document per line, the text under --text-key), ``.parquet`` (the --text-key column;
needs pyarrow). Writes <out>.bin / .idx / .json (format: parallel/corpus/token_file.py), shows
progress on stderr and ends with a summary: documents, tokens, bytes, tokenizer. Then train with

    data: {factory: parallel.corpus:TokenCorpus, kwargs: {path: data/corpus, seq_len: 256, vocab_size: V}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from parallel.corpus.token_file import CorpusError, TokenWriter
from parallel.corpus.tokenizer import load_tokenizer, train_bpe


def _documents(path: str, split: str, text_key: str):
    """Yield the documents of one input file."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise CorpusError(f"{path}:{n}: not a JSON line ({e}); fix the line or remove it") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                    keys = sorted(rec) if isinstance(rec, dict) else "-"
                    raise CorpusError(f"{path}:{n}: no string field {text_key!r}; pass --text-key with the field "
                                      f"that holds the text (keys here: {keys})")
                yield rec[text_key]
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise CorpusError(f"{path}: no column {text_key!r}; pass --text-key (columns: {table.column_names})")
        yield from (t for t in table.column(text_key).to_pylist() if t)
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if split == "file":
            yield text
        elif split == "line":
            yield from (line for line in text.splitlines() if line.strip())
        else:
            yield from (d.strip("\n") for d in text.split("\n\n") if d.strip())


def _all_documents(args):
    for path in args.inputs:
        yield from _documents(path, args.split, args.text_key)


def prepare(args) -> dict:
    for path in args.inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} does not exist; give text, .jsonl or .parquet files")
    if args.train_bpe:
        tok = train_bpe(_all_documents(args), args.train_bpe, args.tokenizer_out or args.out + "_tokenizer")
    else:
        tok = load_tokenizer(args.tokenizer)
    writer = TokenWriter(args.out, tok.vocab_size, tok.eos_id, tok.name)
    last, tty = time.monotonic(), sys.stderr.isatty()
    for docs, text in enumerate(_all_documents(args), 1):
        writer.add(tok.encode(text))
        if time.monotonic() - last > 1.0:
            last = time.monotonic()
            line = f"prepare_data: {docs:,} documents, {writer.tokens:,} tokens"
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    meta = writer.close()
    if tty:
        print(file=sys.stderr)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.prepare_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files")
    ap.add_argument("--out", required=True, help="output prefix: writes <out>.bin, <out>.idx, <out>.json")
    ap.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a local tokenizer directory")
    ap.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size on the input")
    ap.add_argument("--tokenizer-out", help="where --train-bpe saves tokenizer.json (default <out>_tokenizer/)")
    ap.add_argument("--text-key", default="text", help="the text field of .jsonl / .parquet inputs")
    ap.add_argument("--split", choices=("blank", "line", "file"), default="blank",
                    help=".txt documents: separated by blank lines (default), one per line, or one per file")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args)
    except (CorpusError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    print(f"prepare_data: {meta['documents']:,} documents, {meta['tokens']:,} tokens, {meta['bytes']:,} bytes "
          f"({meta['dtype']}), vocabulary {meta['vocab_size']} ({meta['tokenizer']}), EOS {meta['eos_id']}\n"
          f"  wrote {args.out}.bin, {args.out}.idx, {args.out}.json\n"
          f"  train on it: data.factory: parallel.corpus:TokenCorpus, data.kwargs: {{path: {args.out}, "
          f"seq_len: ..., vocab_size: {meta['vocab_size']}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
