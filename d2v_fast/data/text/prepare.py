"""Corpus preparation: text files -> tokenizer + memory-mapped token shards.

    python -m d2v_fast.data.prepare --input PATH... --out DIR [--tokenizer DIR | --vocab-size N]
                                    [--workers N] [--txt-docs block|file] [--text-field text]

Everything is written into a hidden staging directory beside ``--out`` and renamed into
place when complete (``meta.json`` last), so an interrupted run never leaves a corpus that
looks valid. Re-running with the same inputs and options is a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ... import __version__
from ...errors import UsageError, cli_entry
from ..publish import (_describe_files, _say, already_prepared, corpus_parser, default_workers, finish_corpus,
                       new_staging)
from .corpus import FORMAT, FORMAT_VERSION, ShardWriter, read_meta, token_dtype
from .sources import check_inputs, expand_inputs, iter_documents
from .tokenizer import load_tokenizer, save_tokenizer, special_ids, train_bpe

DEFAULT_VOCAB_SIZE = 32768
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
_CHUNK_DOCS, _CHUNK_CHARS = 256, 1 << 20


# ----------------------------------------------------------------------------- tokenizing
_worker_tok = None
_worker_eos = None


def _init_worker(tokenizer_json: str, eos: int) -> None:
    global _worker_tok, _worker_eos
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer

    _worker_tok, _worker_eos = Tokenizer.from_str(tokenizer_json), eos


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents; return their ids concatenated (each followed by </s>) and lengths."""
    encode = getattr(_worker_tok, "encode_batch_fast", _worker_tok.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for x in ids:
        flat[pos:pos + len(x)] = x
        flat[pos + len(x)] = _worker_eos
        pos += len(x) + 1
    return flat, lengths


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(tok, docs: Iterable[str], workers: int, eos: int):
    if workers <= 1:
        _init_worker(tok.to_str(), eos)
        yield from map(_encode_chunk, _chunks(docs))
        return
    # spawn: the parent may hold tokenizer/torch threads, which fork would copy half-alive.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), eos)) as pool:
        yield from pool.imap(_encode_chunk, _chunks(docs), chunksize=1)



# ----------------------------------------------------------------------------- main entry
def prepare_corpus(out: str | os.PathLike, *, inputs: Sequence[str] | None = None,
                   documents: Iterable[str] | None = None, source_id: str | None = None,
                   tokenizer: str | os.PathLike | None = None, vocab_size: int | None = None,
                   workers: int | None = None, txt_docs: str = "block", text_field: str = "text",
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, min_frequency: int = 2,
                   force: bool = False, progress: bool = True, extra_files: dict[str, bytes] | None = None,
                   extra_meta: dict | None = None) -> Path:
    """Build a corpus directory from input files (``inputs``) or an in-memory document
    iterable (``documents`` with a stable ``source_id``). Returns the corpus path.
    ``extra_files`` (name -> content) and ``extra_meta`` (merged into ``meta.json``) are
    published with the corpus, atomically with it."""
    out = Path(out)
    if (inputs is None) == (documents is None):
        raise ValueError("pass exactly one of inputs= or documents=")
    if documents is not None and not source_id:
        raise ValueError("documents= needs a source_id that identifies them")
    if tokenizer is not None and vocab_size is not None:
        raise UsageError("--tokenizer and --vocab-size exclude each other: a loaded tokenizer has its own vocabulary")
    if txt_docs not in ("block", "file"):
        raise UsageError(f"--txt-docs {txt_docs!r}: expected 'block' or 'file'")
    if shard_tokens < 1:
        raise UsageError(f"--shard-tokens {shard_tokens}: must be positive")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    vocab_size = DEFAULT_VOCAB_SIZE if tokenizer is None and vocab_size is None else vocab_size

    files = expand_inputs(inputs) if inputs is not None else []
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    source = {
        "inputs": _describe_files(files) if inputs is not None else [source_id],
        "txt_docs": txt_docs, "text_field": text_field, "shard_tokens": shard_tokens,
        "tokenizer": ({"loaded_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest()}
                      if tok is not None else {"trained_vocab_size": vocab_size, "min_frequency": min_frequency}),
    }
    if already_prepared(out, source, force=force, read=read_meta, progress=progress):
        return out

    if inputs is not None:
        files = check_inputs(files)
        names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

        def docs() -> Iterator[str]:
            return iter_documents(files, txt_docs=txt_docs, text_field=text_field)
    else:
        names = source_id
        cached = list(documents)  # an in-memory source is read twice (tokenizer, shards)

        def docs() -> Iterator[str]:
            return iter(cached)

    staging = new_staging(out)
    try:
        t0 = time.perf_counter()
        if tok is None:
            counted = _Counter(docs())
            _say(progress, f"training a byte-level BPE of {vocab_size} tokens on {names}")
            tok = train_bpe(counted, vocab_size, min_frequency=min_frequency, show_progress=progress)
            if counted.n == 0:
                raise UsageError(f"the inputs ({names}) hold no documents (only blank lines or "
                                 f"empty text fields); check the files")
        ids = special_ids(tok)
        vsize = tok.get_vocab_size(with_added_tokens=True)
        checksum = save_tokenizer(tok, staging / "tokenizer")
        dtype = token_dtype(vsize)

        writer = ShardWriter(staging, dtype, ids["eos"], shard_tokens)
        n_docs = n_tokens = 0
        bar = _bar(progress)
        for flat, lengths in _encoded(tok, docs(), workers, ids["eos"]):
            if flat.size and int(flat.max()) >= vsize:  # a tokenizer/vocab inconsistency, never silent
                raise UsageError(f"tokenizer produced id {int(flat.max())} >= its vocabulary size {vsize}")
            writer.add(flat, lengths)
            n_docs += len(lengths)
            n_tokens += int(flat.size)
            if bar is not None:
                bar.update(len(lengths))
                bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        if bar is not None:
            bar.close()
        if n_docs == 0:
            raise UsageError(f"the inputs ({names}) hold no documents (only blank lines or "
                             f"empty text fields); check the files")
        shards = writer.finish()
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "d2v_fast_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "vocab_size": vsize, "dtype": dtype.name, "special_ids": ids,
            "num_tokens": n_tokens, "num_documents": n_docs,
            "document_separator": "</s> after every document",
            "tokenizer": {"dir": "tokenizer", "sha256": checksum},
            "shards": shards, "source": source, **(extra_meta or {}),
        }
        for name, content in (extra_files or {}).items():
            (staging / name).write_bytes(content)
        finish_corpus(staging, out, meta, sync=[*(extra_files or {}), *(shard["tokens"] for shard in shards)])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    _say(progress, f"wrote {out}: {n_docs:,} documents, {n_tokens:,} tokens ({dtype.name}), "
                   f"vocabulary {vsize:,}, {len(shards)} shard(s) in {dt:.1f}s")
    return out


class _Counter:
    """Iterate documents while counting them (the BPE trainer consumes the iterator)."""

    def __init__(self, it: Iterable[str]):
        self.it, self.n = iter(it), 0

    def __iter__(self):
        for doc in self.it:
            self.n += 1
            yield doc


def _bar(progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(desc="tokenizing", unit=" docs", file=sys.stderr, dynamic_ncols=True)


def build_parser() -> argparse.ArgumentParser:
    def more(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--tokenizer", metavar="DIR", help="RoBERTa-format tokenizer directory to use")
        g.add_argument("--vocab-size", type=int, metavar="N",
                       help=f"train a byte-level BPE of N tokens on the inputs (default {DEFAULT_VOCAB_SIZE})")
        p.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes")
        p.add_argument("--txt-docs", choices=("block", "file"), default="block",
                       help="a .txt document is a blank-line-separated block, or the whole file")
        p.add_argument("--text-field", default="text", help="the .jsonl field holding the text")
        p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
        p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair frequency to merge")

    return corpus_parser(prog="python -m d2v_fast.data.prepare", description=__doc__.split("\n\n")[0],
                         inputs=".txt/.jsonl files (optionally .gz), directories or globs", more=more)


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prepare_corpus(args.out, inputs=args.input, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   workers=args.workers, txt_docs=args.txt_docs, text_field=args.text_field,
                   shard_tokens=args.shard_tokens, min_frequency=args.min_frequency,
                   force=args.force, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
