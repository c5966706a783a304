"""Tokenize local text into a corpus that :class:`parallel.corpus.TokenCorpus` trains on.

    python -m launch.prepare_data corpus.txt --out data/corpus --tokenizer bytes
    python -m launch.prepare_data docs/*.jsonl --text-key text --out data/docs --tokenizer path/to/tokenizer_dir
    python -m launch.prepare_data corpus.txt --out data/corpus --train-bpe 2048 --tokenizer-out data/bpe

Inputs: ``.txt`` (documents separated by blank lines, or one per line / per file with --split),
``.jsonl`` (one document per line, the text under --text-key), ``.parquet`` (the --text-key column;
needs pyarrow), a directory saved by Hugging Face ``datasets`` (``save_to_disk``; the --text-key column,
--hf-split for a DatasetDict; :mod:`parallel.corpus.hf_source`). Writes <out>.bin / .idx / .json (format:
parallel/corpus/token_file.py), shows progress on stderr and ends with a summary: documents, tokens,
bytes, tokenizer. An empty input, or one without documents, is refused naming it. Then train with

    data: {factory: parallel.corpus:PackedCorpus, kwargs: {path: data/corpus, seq_len: 256, vocab_size: V}}

(or ``parallel.corpus:TokenCorpus`` for plain windows across documents; the quickstart's
``examples.text_corpus:packed`` runs this same tool on its bundled text on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from parallel.corpus.hf_source import hf_documents, is_dataset_dir
from parallel.corpus.token_file import CorpusError, TokenWriter
from parallel.corpus.tokenizer import load_tokenizer
from parallel.corpus.tokenizer import train_bpe as train_bpe_on


def _not_text(path: str, e: UnicodeDecodeError, encoding: str, line: int | None = None) -> CorpusError:
    """A decode error as the file, the line and the fix (the codec's own message names neither)."""
    where = f"{path}:{line}" if line else path
    return CorpusError(f"{where}: not {encoding.upper()} text (byte 0x{e.object[e.start]:02x} at byte offset {e.start}"
                       f"{' of the line' if line else ''}: {e.reason}); convert it (e.g. iconv -f latin1 -t utf-8 "
                       f"{path} > {path}.utf8) or pass its encoding (--encoding latin-1, cp1252, ...)")


def _documents(path: str, split: str, text_key: str, hf_split: str | None = None, encoding: str = "utf-8"):
    """Yield the documents of one input file (or saved Hugging Face dataset directory)."""
    if is_dataset_dir(path):
        yield from hf_documents(path, text_key, hf_split)
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as e:
                    raise _not_text(path, e, encoding, n) from None
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
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise CorpusError(f"{path}: no column {text_key!r}; pass --text-key (columns: {table.column_names})")
        kind = table.schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            texts = [n for n in table.column_names if pa.types.is_string(table.schema.field(n).type)
                     or pa.types.is_large_string(table.schema.field(n).type)]
            raise CorpusError(f"{path}: column {text_key!r} holds {kind}, not text; pass --text-key with a text "
                              f"column (text columns here: {texts})")
        yield from (t for t in table.column(text_key).to_pylist() if t)
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise _not_text(path, e, encoding) from None
        if split == "file":
            yield text
        elif split == "line":
            yield from (line for line in text.splitlines() if line.strip())
        else:
            yield from (d.strip("\n") for d in text.split("\n\n") if d.strip())


def _all_documents(inputs, split: str, text_key: str, hf_split: str | None = None, encoding: str = "utf-8"):
    for path in inputs:
        yield from _documents(path, split, text_key, hf_split, encoding)


def prepare_files(inputs, out: str, tokenizer: str = "bytes", train_bpe: int | None = None,
                  tokenizer_out: str | None = None, text_key: str = "text", split: str = "blank",
                  progress: bool = True, hf_split: str | None = None, encoding: str = "utf-8") -> dict:
    """Tokenize ``inputs`` into ``<out>.bin/.idx/.json`` (with ``train_bpe``: train a byte-level BPE of that
    size on them first, saved in ``tokenizer_out``, default ``<out>_tokenizer/``); returns the metadata."""
    for path in inputs:
        if is_dataset_dir(path):
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} does not exist; give text, .jsonl or .parquet files, or a "
                                    f"directory written by datasets' save_to_disk")
        if os.path.getsize(path) == 0:
            raise CorpusError(f"input {path} is empty: there is no text to tokenize; give a file with text")
    if train_bpe is not None:                          # 0 is refused there, not read as 'no BPE'
        tok = train_bpe_on(_all_documents(inputs, split, text_key, hf_split, encoding), train_bpe,
                           tokenizer_out or out + "_tokenizer")
    else:
        tok = load_tokenizer(tokenizer)
    writer = TokenWriter(out, tok.vocab_size, tok.eos_id, tok.name)
    last, tty = time.monotonic(), progress and sys.stderr.isatty()
    docs = 0
    try:
        for docs, text in enumerate(_all_documents(inputs, split, text_key, hf_split, encoding), 1):
            writer.add(tok.encode(text))
            if progress and time.monotonic() - last > 1.0:
                last = time.monotonic()
                line = f"prepare_data: {docs:,} documents, {writer.tokens:,} tokens"
                print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    except BaseException:
        writer.abort()                                   # a bad line late in the input leaves no <out>.bin.tmp
        raise
    if tty:
        print(file=sys.stderr)
    if docs == 0:
        writer.abort()
        raise CorpusError(f"{', '.join(inputs)}: no documents found (only blank lines, or no rows); give text to "
                          f"tokenize (--split line|file for .txt inputs without blank-line separated documents)")
    return writer.close()


def prepare(args) -> dict:
    return prepare_files(args.inputs, args.out, args.tokenizer, args.train_bpe, args.tokenizer_out, args.text_key,
                         args.split, hf_split=args.hf_split, encoding=args.encoding)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.prepare_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files, or saved Hugging Face datasets")
    ap.add_argument("--out", required=True, help="output prefix: writes <out>.bin, <out>.idx, <out>.json")
    ap.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a local tokenizer directory")
    ap.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size on the input")
    ap.add_argument("--tokenizer-out", help="where --train-bpe saves tokenizer.json (default <out>_tokenizer/)")
    ap.add_argument("--text-key", default="text", help="the text field of .jsonl / .parquet / dataset inputs")
    ap.add_argument("--hf-split", default=None, help="the split of a saved DatasetDict (default: train)")
    ap.add_argument("--split", choices=("blank", "line", "file"), default="blank",
                    help=".txt documents: separated by blank lines (default), one per line, or one per file")
    ap.add_argument("--encoding", default="utf-8", help=".txt / .jsonl inputs: their text encoding (default utf-8)")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args)
    except (CorpusError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    print(f"prepare_data: {meta['documents']:,} documents, {meta['tokens']:,} tokens, {meta['bytes']:,} bytes "
          f"({meta['dtype']}), vocabulary {meta['vocab_size']} ({meta['tokenizer']}), EOS {meta['eos_id']}\n"
          f"  wrote {args.out}.bin, {args.out}.idx, {args.out}.json\n"
          f"  train on it: data.factory: parallel.corpus:PackedCorpus (documents packed, attention inside each) or "
          f"parallel.corpus:TokenCorpus (plain windows), data.kwargs: {{path: {args.out}, seq_len: ..., "
          f"vocab_size: {meta['vocab_size']}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
